import json

import jax.numpy as jnp
import numpy as np
import pytest

from hcmoe import data


def _generator(calls, n=6):
    def generate():
        calls.append(1)
        return {"u0": np.arange(n, dtype=np.float64), "u": np.ones((n, 3, 2)) * len(calls)}

    return generate


def test_cache_is_reused(tmp_path):
    calls = []
    path = tmp_path / "sub" / "ds"
    first = data.cached(path, {"n": 6, "shape": (3, 2)}, _generator(calls))
    second = data.cached(path, {"shape": [3, 2], "n": np.int64(6)}, _generator(calls))
    assert len(calls) == 1
    assert set(second) == {"u0", "u"}
    np.testing.assert_array_equal(first["u"], second["u"])
    manifest = json.loads((tmp_path / "sub" / "ds.json").read_text())
    assert manifest["params"] == {"n": 6, "shape": [3, 2]}
    assert manifest["arrays"]["u"]["shape"] == [6, 3, 2]
    assert not [p for p in (tmp_path / "sub").iterdir() if p.suffix == ".tmp"]


def test_cache_rebuilt_on_parameter_change(tmp_path):
    calls = []
    path = tmp_path / "ds"
    data.cached(path, {"n": 6, "seed": 0}, _generator(calls))
    rebuilt = data.cached(path, {"n": 6, "seed": 1}, _generator(calls))
    assert len(calls) == 2 and rebuilt["u"][0, 0, 0] == 2
    assert data.load_cached(path, {"n": 6, "seed": 0}) is None
    assert data.load_cached(path, {"n": 6, "seed": 1}) is not None
    data.cached(path, {"n": 6, "seed": 1}, _generator(calls), rebuild=True)
    assert len(calls) == 3


def test_interrupted_write_is_never_read(tmp_path, monkeypatch):
    calls = []
    path = tmp_path / "ds"
    data.cached(path, {"seed": 0}, _generator(calls))

    # A crash while the new archive is being written: the old files must not be read for
    # the new parameters, no temporary file may remain, and the next call regenerates.
    def crash(file, **arrays):
        file.write(b"PK\x03\x04 half an archive")
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez", crash)
    with pytest.raises(KeyboardInterrupt):
        data.cached(path, {"seed": 1}, _generator(calls))
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds.npz"]  # manifest invalidated
    assert data.load_cached(path, {"seed": 0}) is None
    assert data.load_cached(path, {"seed": 1}) is None
    data.cached(path, {"seed": 1}, _generator(calls))
    assert len(calls) == 3


def test_mismatched_or_corrupt_archive_is_regenerated(tmp_path):
    calls = []
    path = tmp_path / "ds"
    data.cached(path, {"seed": 0}, _generator(calls))
    manifest = (tmp_path / "ds.json").read_text()
    # Archive from another run next to this manifest (crash between the two replaces).
    data.save_cached(path, {"u": np.zeros(2)}, {"seed": 5})
    (tmp_path / "ds.json").write_text(manifest)
    assert data.load_cached(path, {"seed": 0}) is None
    # Truncated archive with a matching manifest.
    data.cached(path, {"seed": 0}, _generator(calls))
    archive = tmp_path / "ds.npz"
    archive.write_bytes(archive.read_bytes()[:50])
    assert data.load_cached(path, {"seed": 0}) is None
    # Unparseable manifest.
    (tmp_path / "ds.json").write_text("{not json")
    assert data.load_cached(path, {"seed": 0}) is None
    assert data.cached(path, {"seed": 0}, _generator(calls))["u"].shape == (6, 3, 2)


def test_cache_bad_input(tmp_path):
    # A ValueError from the function itself, or a TypeError under runtime type checking.
    with pytest.raises((ValueError, TypeError), match="params"):
        data.cached(tmp_path / "ds", [1, 2], lambda: {"u": np.zeros(1)})
    with pytest.raises(TypeError, match="JSON-serialisable"):
        data.cached(tmp_path / "ds", {"f": object()}, lambda: {"u": np.zeros(1)})
    with pytest.raises(ValueError, match="arrays: expected a non-empty dict"):
        data.cached(tmp_path / "ds", {}, lambda: {})


def test_batches_shuffle_and_cover(getkey):
    dataset = {"u0": np.arange(10), "u": np.arange(10)[:, None] * np.ones((10, 3))}
    key = getkey()
    epochs = list(data.batches(dataset, 3, key=key, num_epochs=2))
    assert len(epochs) == 2 * data.num_batches(10, 3) == 6
    for batch in epochs:
        assert batch["u0"].shape == (3,) and batch["u"].shape == (3, 3)
        np.testing.assert_array_equal(batch["u"][:, 0], batch["u0"])
    first_epoch = np.concatenate([b["u0"] for b in epochs[:3]])
    assert len(set(first_epoch.tolist())) == 9
    assert not np.array_equal(first_epoch, np.concatenate([b["u0"] for b in epochs[3:]]))
    again = list(data.batches(dataset, 3, key=key, num_epochs=2))
    np.testing.assert_array_equal(epochs[4]["u0"], again[4]["u0"])
    every = list(data.batches(dataset, 4, key=key, drop_remainder=False))
    assert [len(b["u0"]) for b in every] == [4, 4, 2]
    assert sorted(np.concatenate([b["u0"] for b in every]).tolist()) == list(range(10))


def test_batches_forever_and_errors(getkey):
    stream = data.batches((np.arange(4), jnp.arange(4.0)), 2, key=getkey(), num_epochs=None)
    assert len([next(stream) for _ in range(7)]) == 7
    with pytest.raises(ValueError, match="batch_size: expected an int in"):
        next(data.batches({"u": np.zeros(3)}, 5, key=getkey()))
    with pytest.raises(ValueError, match="sharing one leading"):
        next(data.batches({"u": np.zeros(3), "v": np.zeros(4)}, 1, key=getkey()))


def test_map_batched_pads_last_batch():
    inputs = {"a": np.arange(7.0), "b": np.ones((7, 2))}
    out = data.map_batched(
        lambda s: {"c": s["a"] + s["b"].sum()}, inputs, batch_size=3, progress=False
    )
    np.testing.assert_allclose(out["c"], np.arange(7.0) + 2)
    with pytest.raises(ValueError, match="batch_size: expected a positive int"):
        data.map_batched(lambda s: s, inputs, batch_size=0)


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("HCMOE_CACHE_DIR", str(tmp_path))
    assert data.cache_dir() == tmp_path
