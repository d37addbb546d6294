import json

import numpy as np
import pytest

from hcmoe import plotting
from hcmoe._grid import uniform_grid


def _fields(shape, seed=0):
    rng = np.random.default_rng(seed)
    reference = rng.normal(size=shape)
    return reference + 0.1 * rng.normal(size=shape), reference


def _block_labels(shape, blocks):
    """Expert labels of a block partition (`blocks` experts per axis)."""
    index = np.meshgrid(*(np.arange(n) * b // n for n, b in zip(shape, blocks)), indexing="ij")
    return np.ravel_multi_index(index, blocks)


def _is_png(path):
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_prediction(tmp_path):
    grid = uniform_grid(t=(0.0, 500.0, 11), x=(0.0, 1.0, 32))
    prediction, reference = _fields(grid.shape)
    path = tmp_path / "figs" / "prediction.png"
    figure = plotting.plot_prediction(
        prediction,
        reference,
        grid=grid,
        labels=_block_labels(grid.shape, (1, 4)),
        title="PI-HC-MoE",
        path=path,
    )
    assert _is_png(path)
    assert "relative L2 error" in figure.get_suptitle()
    assert figure.axes[0].get_xlabel() == "x" and figure.axes[0].get_ylabel() == "t"
    plotting.plot_prediction(prediction, reference, path=tmp_path / "plain.pdf")
    assert (tmp_path / "plain.pdf").read_bytes()[:4] == b"%PDF"


def test_expert_boundaries_follow_labels():
    labels = _block_labels((3, 4), (1, 2))  # columns 0-1 expert 0, columns 2-3 expert 1
    segments = plotting.expert_boundary_segments(labels, np.arange(3.0), np.arange(4.0))
    assert segments.shape == (3, 2, 2)
    np.testing.assert_allclose(segments[:, :, 0], 1.5)  # the vertical line x = 1.5
    np.testing.assert_allclose(np.sort(segments[:, :, 1].ravel()), [-0.5, 0.5, 0.5, 1.5, 1.5, 2.5])
    random_labels = np.random.default_rng(0).integers(0, 4, (8, 8))
    assert len(plotting.expert_boundary_segments(random_labels, np.arange(8.0), np.arange(8.0)))


def test_plot_snapshots(tmp_path):
    grid = uniform_grid(t=(0.0, 5.0, 6), x=(0.0, 1.0, 16), y=(0.0, 1.0, 16), periodic=("x", "y"))
    prediction, reference = _fields(grid.shape)
    path = tmp_path / "snapshots.png"
    figure = plotting.plot_snapshots(
        prediction,
        reference,
        grid=grid,
        times=(0, 2, -1),
        labels=_block_labels(grid.shape, (1, 2, 2)),
        path=path,
    )
    assert _is_png(path)
    assert len([ax for ax in figure.axes if ax.get_title()]) == 9
    plotting.plot_snapshots(prediction, reference, times=[3])
    # An exact snapshot's error panel starts at zero (not a constant field's -0.1 .. 0.1).
    exact = plotting.plot_snapshots(reference, reference, grid=grid, times=(0,))
    error_panel = [ax for ax in exact.axes if ax.get_title() == "|error|"][0]
    assert error_panel.collections[0].get_clim() == (0.0, 1.0)
    error_panel = [ax for ax in figure.axes if ax.get_title() == "|error|"][0]
    low, high = error_panel.collections[0].get_clim()
    assert low == 0.0 and high == pytest.approx(np.abs(prediction - reference)[0].max())


def test_plot_training_curves(tmp_path):
    records = [
        {"kind": "train", "step": s, "loss": 1.0 / s**2, "solver_steps": 5.0, "time": s}
        for s in range(1, 11)
    ] + [
        {"kind": "eval", "step": 5, "relative_l2": 0.3},
        {"kind": "eval", "step": 10, "relative_l2": 0.2},
    ]
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in records))
    figure = plotting.plot_training_curves(metrics, path=tmp_path / "curves.png")
    assert _is_png(tmp_path / "curves.png")
    titles = [ax.get_title() for ax in figure.axes if ax.get_visible()]
    assert titles == ["loss", "solver_steps", "relative_l2"]
    assert figure.axes[0].get_yscale() == "log"
    plotting.plot_training_curves(records, keys=["relative_l2"])
    with pytest.raises(ValueError, match=r"keys: expected metrics .*missing \['nope'\]"):
        plotting.plot_training_curves(records, keys=["nope"])


def test_method_comparison(tmp_path):
    errors = {
        "PI-SC": np.array([0.80, 0.90]),
        "PI-HC": np.array([0.05, 0.10]),
        "PI-HC-MoE": np.array([0.03, 0.04]),
    }
    plotting.plot_method_comparison(errors, title="diffusion–sorption", path=tmp_path / "b.png")
    assert _is_png(tmp_path / "b.png")
    table = plotting.comparison_table(errors)
    assert table.splitlines()[0] == "| method | relative L2 error |"
    assert "| PI-HC-MoE | 3.50% ± 0.50% |" in table
    assert "| PI-SC | 0.85 ± 0.05 |" in plotting.comparison_table(errors, percent=False)


def test_errors():
    prediction, reference = _fields((4, 5))
    with pytest.raises(ValueError, match=r"reference: expected shape \(4, 5\)"):
        plotting.plot_prediction(prediction, reference[:3])
    with pytest.raises(ValueError, match="prediction: expected a field with 2 grid axes"):
        plotting.plot_prediction(prediction[None], reference[None])
    with pytest.raises(ValueError, match=r"labels: expected integer expert labels of shape"):
        plotting.plot_prediction(prediction, reference, labels=np.zeros((5, 4), int))
    with pytest.raises(ValueError, match=r"grid: expected shape \(4, 5\)"):
        grid = uniform_grid(t=(0.0, 1.0, 5), x=(0.0, 1.0, 5))
        plotting.plot_prediction(prediction, reference, grid=grid)
    with pytest.raises(ValueError, match="times: expected"):
        plotting.plot_snapshots(np.ones((2, 3, 3)), np.ones((2, 3, 3)), times=[2])
    with pytest.raises(ValueError, match="errors: expected at least one method"):
        plotting.comparison_table({})
