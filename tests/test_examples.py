"""The examples run end to end (tiny configurations; the longer ones are marked slow)."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"hcmoe_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses (Flax, Equinox) look their module up
    spec.loader.exec_module(module)
    return module


def _check_rows(rows, names):
    assert [row["method"] for row in rows] == names
    for row in rows:
        assert math.isfinite(row["rel_l2_mean"]) and math.isfinite(row["rel_l2_std"])
        assert row["non_converged"] >= 0


def test_quickstart_tiny(tmp_path):
    quickstart = _load("quickstart")
    argv = ["--tiny", "--steps", "3", "--out", str(tmp_path), "--no-progress"]
    rows = quickstart.main(argv + ["--methods", "sc", "moe"])
    _check_rows(rows, ["PI-SC", "PI-HC-MoE (joint)"])
    for name in (
        "results.json",
        "results.md",
        "prediction_sc.png",
        "prediction_moe.png",
        "comparison.png",
        "runs/moe/metrics.csv",
    ):
        assert (tmp_path / name).exists(), name
    record = json.loads((tmp_path / "results.json").read_text())
    assert record["grid"] == [26, 64] and len(record["results"]) == 2
    assert "PI-HC-MoE" in (tmp_path / "results.md").read_text()


@pytest.mark.slow
def test_quickstart_default(tmp_path):
    rows = _load("quickstart").main(["--out", str(tmp_path), "--no-progress"])
    _check_rows(rows, ["PI-SC", "PI-HC", "PI-HC-MoE (joint)"])


@pytest.mark.slow
def test_diffusion_sorption_small_resumes(tmp_path):
    example = _load("diffusion_sorption")
    argv = [
        "--steps",
        "2",
        "--n-train",
        "8",
        "--n-test",
        "4",
        "--out",
        str(tmp_path / "runs"),
        "--data-dir",
        str(tmp_path / "data"),
        "--no-progress",
        "--method",
        "hc",
        "moe",
    ]
    example.main(argv)
    example.main([*argv[:1], "3", *argv[2:]])  # continues from step 2
    metrics = (tmp_path / "runs/small/moe/metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in metrics if '"train"' in r][-1] == 3
    record = json.loads((tmp_path / "runs/small/results.json").read_text())
    _check_rows(record["results"], ["PI-HC", "PI-HC-MoE (joint)"])


@pytest.mark.slow
def test_navier_stokes_small_evaluates_finer_grids(tmp_path):
    example = _load("navier_stokes")
    example.main(
        [
            "--epochs",
            "1",
            "--n-train",
            "4",
            "--n-test",
            "2",
            "--out",
            str(tmp_path),
            "--data-dir",
            str(tmp_path / "data"),
            "--no-progress",
            "--method",
            "sc",
            "moe",
        ]
    )
    record = json.loads((tmp_path / "small/results.json").read_text())
    for row in record["results"]:
        assert sorted(row["resolutions"]) == ["32", "64"]
        _check_rows([row["resolutions"]["64"]], [row["method"]])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["flax_nnx_backbone", "flax_linen_backbone"])
def test_flax_backbones(name):
    errors = _load(name).main(["--steps", "3"])
    assert errors.shape == (16,)


@pytest.mark.slow
def test_custom_pde(tmp_path):
    rows = _load("custom_pde").main(["--steps", "3", "--out", str(tmp_path), "--no-progress"])
    _check_rows(rows, ["PI-SC", "PI-HC"])


SHARED_FLAGS = [  # the quickstart's flags, which the research script has too
    (["--steps", "-5"], "--steps: expected a positive int"),
    (["--experts", "0"], "--experts: expected a positive int"),
    (["--points-per-expert", "0"], "--points-per-expert: expected a positive int"),
]
RESEARCH_FLAGS = [  # examples/diffusion_sorption.py's own (the quickstart's before hcmoe 0.2)
    (["--batch-size", "0"], "--batch-size: expected a positive int"),
    (["--n-train", "0"], "--n-train: expected a positive int"),
    (["--decay-every", "0"], "--decay-every: expected a positive int"),
    (["--max-steps", "0"], "--max-steps: expected a positive int"),
    (["--overlap", "-0.1"], "--overlap: expected a non-negative number"),
    (["--ic-weight", "-1"], "--ic-weight: expected a non-negative number"),
    (["--bc-weight", "-1"], "--bc-weight: expected a non-negative number"),
    (["--initial-layer", "-5"], "--initial-layer: expected a non-negative number"),
    (["--ridge=-1e-4"], "--ridge: expected a non-negative number"),
    (["--termination", "never"], "invalid choice: 'never'"),
]


@pytest.mark.parametrize(
    "name, flags, message",
    [("quickstart", *case) for case in SHARED_FLAGS]
    + [("diffusion_sorption", *case) for case in SHARED_FLAGS + RESEARCH_FLAGS],
)
def test_example_flags_are_checked_before_any_work(name, flags, message, capsys):
    example = _load(name)
    with pytest.raises(SystemExit) as error:
        example.parse_args(flags)
    assert error.value.code == 2
    assert message in capsys.readouterr().err


def test_diffusion_sorption_example_checks_the_partition_up_front(capsys):
    with pytest.raises(SystemExit):
        _load("diffusion_sorption").parse_args(["--experts", "4", "--overlap", "5"])
    assert "--experts/--overlap" in capsys.readouterr().err


@pytest.mark.slow
def test_diffusion_sorption_extrapolation(tmp_path):
    example = _load("diffusion_sorption")
    example.main(
        [
            "--steps",
            "2",
            "--n-train",
            "8",
            "--n-test",
            "4",
            "--extrapolate",
            "--out",
            str(tmp_path / "runs"),
            "--data-dir",
            str(tmp_path / "data"),
            "--no-progress",
            "--method",
            "sc",
            "moe",
        ]
    )
    record = json.loads((tmp_path / "runs/small_extrapolate/results.json").read_text())
    _check_rows(record["results"], ["PI-SC", "PI-HC-MoE (joint)"])
    assert all("rel_l2_whole_horizon" in row for row in record["results"])
