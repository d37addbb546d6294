"""Dataset generation is resumable: an interrupted generation continues from its chunks and
gives the same data (issue 9); cache files have normal permissions."""

import os
import signal

import jax.numpy as jnp
import numpy as np
import pytest

from hcmoe import data
from hcmoe.problems import heat


def _fn(v):
    return {"double": 2.0 * v, "sin": jnp.sin(v)}


def _generator(x):
    return lambda: data.map_batched(_fn, x, batch_size=3, progress=False)


def _interrupt_after(monkeypatch, chunks: int) -> list:
    """Make the `chunks + 1`-th chunk write raise KeyboardInterrupt; record every write."""
    real, written = data._save_chunk, []

    def save(path, leaves, fingerprint):
        if len(written) == chunks:
            raise KeyboardInterrupt
        real(path, leaves, fingerprint)
        written.append(path.name)

    monkeypatch.setattr(data, "_save_chunk", save)
    return written


def _counting(monkeypatch) -> list:
    real, written = data._save_chunk, []

    def save(path, leaves, fingerprint):
        real(path, leaves, fingerprint)
        written.append(path.name)

    monkeypatch.setattr(data, "_save_chunk", save)
    return written


def test_interrupted_generation_continues_from_its_chunks(tmp_path, monkeypatch, capsys):
    x = np.linspace(0.0, 1.0, 10)  # 4 batches of 3
    reference = data.cached(tmp_path / "reference", {"n": 10}, _generator(x))
    path = tmp_path / "ds"
    with monkeypatch.context() as patch:
        written = _interrupt_after(patch, 2)
        with pytest.raises(KeyboardInterrupt):
            data.cached(path, {"n": 10}, _generator(x))
    assert written == ["chunk_000000000.npz", "chunk_000000003.npz"]
    assert not path.with_suffix(".npz").exists()
    assert "a rerun continues" in capsys.readouterr().err
    with monkeypatch.context() as patch:
        recomputed = _counting(patch)
        resumed = data.cached(path, {"n": 10}, _generator(x))
    assert recomputed == ["chunk_000000006.npz", "chunk_000000009.npz"]  # only the rest
    for name in ("double", "sin"):
        np.testing.assert_array_equal(resumed[name], reference[name])
    assert not (tmp_path / "ds.parts").exists()  # chunks are removed once the cache is saved
    assert data.load_cached(path, {"n": 10}) is not None


def test_chunks_of_other_parameters_or_inputs_are_not_reused(tmp_path, monkeypatch):
    x = np.linspace(0.0, 1.0, 10)
    with monkeypatch.context() as patch:
        _interrupt_after(patch, 2)
        with pytest.raises(KeyboardInterrupt):
            data.cached(tmp_path / "ds", {"n": 10, "seed": 0}, _generator(x))
    with monkeypatch.context() as patch:
        recomputed = _counting(patch)
        data.cached(tmp_path / "ds", {"n": 10, "seed": 1}, _generator(x))
    assert len(recomputed) == 4  # other parameters: nothing reused
    directory = tmp_path / "chunks"
    data.map_batched(_fn, x, batch_size=3, progress=False, resume_dir=directory)
    shifted = data.map_batched(_fn, x + 1.0, batch_size=3, progress=False, resume_dir=directory)
    np.testing.assert_allclose(shifted["double"], 2.0 * (x + 1.0))  # other inputs: recomputed
    (directory / "chunk_000000003.npz").write_bytes(b"PK\x03\x04 truncated")
    again = data.map_batched(_fn, x + 1.0, batch_size=3, progress=False, resume_dir=directory)
    np.testing.assert_allclose(again["sin"], np.sin(x + 1.0))  # a damaged chunk: recomputed


def test_problem_dataset_generation_resumes(tmp_path, monkeypatch):
    options = dict(n=600, size="small", cache_dir=tmp_path, progress=False)  # 3 batches of 256
    reference = heat.make_dataset("train", **(options | {"cache_dir": tmp_path / "reference"}))
    with monkeypatch.context() as patch:
        _interrupt_after(patch, 1)
        with pytest.raises(KeyboardInterrupt):
            heat.make_dataset("train", **options)
    with monkeypatch.context() as patch:
        recomputed = _counting(patch)
        resumed = heat.make_dataset("train", **options)
    assert len(recomputed) == 2
    for name in reference:
        np.testing.assert_array_equal(resumed[name], reference[name])


def test_cache_files_have_normal_permissions(tmp_path):
    previous = os.umask(0o022)
    try:
        data.cached(tmp_path / "ds", {"n": 10}, _generator(np.arange(10.0)))
    finally:
        os.umask(previous)
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in tmp_path.iterdir()}
    assert modes == {"ds.npz": "0o644", "ds.json": "0o644"}


class _SignalsWhenCollected:
    """Sends SIGINT from `__del__`, where Python would swallow the KeyboardInterrupt."""

    def __del__(self):
        signal.raise_signal(signal.SIGINT)


def test_ctrl_c_during_generation_is_never_lost(tmp_path, monkeypatch, default_sigint):
    x = np.linspace(0.0, 1.0, 10)
    real, written = data._save_chunk, []

    def save(path, leaves, fingerprint):
        real(path, leaves, fingerprint)
        written.append(path.name)
        if len(written) == 2:
            _SignalsWhenCollected()  # collected at once: the interrupt lands in __del__

    monkeypatch.setattr(data, "_save_chunk", save)
    with pytest.raises(KeyboardInterrupt):
        data.cached(tmp_path / "ds", {"n": 10}, _generator(x))
    assert len(written) == 2  # stopped after the batch in flight, which was saved
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
