"""Examples check every flag before any work: a one-line argparse error, no traceback, no data
generated (issue 9). Covers examples/navier_stokes.py and examples/custom_pde.py."""

import importlib.util
import sys
from pathlib import Path

import pytest


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"hcmoe_flags_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _rejects(main, argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2  # argparse's usage error, not a traceback
    err = capsys.readouterr().err
    assert message in err, err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--epochs", "0"], "--epochs: expected a positive integer; got 0"),
        (["--batch-size", "0"], "--batch-size: expected a positive integer; got 0"),
        (["--points-per-expert", "-3"], "--points-per-expert: expected a positive integer"),
        (["--n-train", "0"], "--n-train: expected a positive integer; got 0"),
        (["--n-test", "-1"], "--n-test: expected a positive integer; got -1"),
        (["--seed", "-1"], "--seed: expected a non-negative integer"),
        (["--learning-rate", "0"], "--learning-rate: expected a positive number; got 0.0"),
        (["--decay-every", "0"], "--decay-every: expected a positive integer; got 0"),
        (["--overlap", "-0.1"], "--overlap: expected a non-negative number; got -0.1"),
        (["--overlap", "2"], "--overlap: overlap: 2.0 along 'x' is more than"),
        (["--coupling", "loose"], "invalid choice: 'loose'"),
        (["--experts", "2x2"], "--experts: expected three positive integers joined by 'x'"),
        (["--experts", "1x0x2"], "--experts: expected three positive integers joined by 'x'"),
        (["--experts", "1x64x1"], "--experts: partition: 64 blocks along 'x'"),
        (["--scale", "0"], "--scale: expected a positive number; got 0.0"),
        (["--ridge", "0"], "--ridge: expected a positive number; got 0.0"),
        (["--ridge-toward", "one"], "invalid choice: 'one'"),
        (["--train-n-xy", "0"], "--train-n-xy: expected a positive integer; got 0"),
        (["--backbone", "huge"], "invalid choice: 'huge'"),
        (["--n-train", "4", "--batch-size", "8"], "--batch-size: expected at most the 4"),
        (["--size", "huge"], "invalid choice: 'huge'"),
        (["--method", "pinn"], "invalid choice: 'pinn'"),
    ],
)
def test_navier_stokes_flags(flags, message, tmp_path, monkeypatch, capsys):
    example = _load("navier_stokes")

    def no_work(*args, **kwargs):
        raise AssertionError("data generation started before the flags were checked")

    monkeypatch.setattr(example.navier_stokes, "make_dataset", no_work)
    argv = ["--out", str(tmp_path / "out"), "--data-dir", str(tmp_path / "data"), *flags]
    _rejects(example.main, argv, message, capsys)
    assert not (tmp_path / "out").exists() and not (tmp_path / "data").exists()


def test_navier_stokes_runs_with_other_solve_settings_get_their_own_directory(tmp_path):
    example = _load("navier_stokes")
    names = {
        example.run_directory(example.parse_args(["--out", str(tmp_path), *flags])).name
        for flags in ([], ["--scale", "1"], ["--ridge", "0.02"], ["--ridge-toward", "init"],
                      ["--scale", "1", "--ridge", "0.02", "--ridge-toward", "init"],
                      ["--train-n-xy", "64"], ["--backbone", "small"], ["--backbone", "wide"],
                      ["--seed", "0"], ["--seed", "2"], ["--backbone", "small", "--seed", "1"],
                      ["--backbone", "wide16"], ["--initial-damping", "1"],
                      ["--termination", "cauchy"], ["--experts", "1x2x1"],
                      ["--experts", "1x2x2"])
    }
    assert names == {"small", "small_scale1", "small_ridge0.02", "small_towardinit",
                     "small_scale1_ridge0.02_towardinit", "small_train64", "small_backbonesmall",
                     "small_seed2", "small_backbonesmall_seed1", "small_backbonewide16",
                     "small_lambda01", "small_stopcauchy", "small_experts1x2x2"}
    # PI-SC has no solve: the old solver's start does not retrain it.
    args = example.parse_args(["--out", str(tmp_path), "--initial-damping", "1"])
    assert example.run_directory(args, "sc").name == "small"


def test_navier_stokes_paths_must_be_directories(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    _rejects(_load("navier_stokes").main, ["--data-dir", str(tmp_path / "file")],
             "--data-dir: expected a directory", capsys)


def test_custom_pde_flags(tmp_path, capsys):
    example = _load("custom_pde")
    _rejects(example.main, ["--steps", "-5", "--out", str(tmp_path)],
             "--steps: expected a positive integer; got -5", capsys)
    (tmp_path / "file").write_text("")
    _rejects(example.main, ["--out", str(tmp_path / "file")], "--out: expected a directory",
             capsys)


def test_diffusion_sorption_seeds_get_their_own_directory(tmp_path):
    # A checkpoint refuses to resume under another seed's key: each seed needs its own runs.
    example = _load("diffusion_sorption")
    names = [
        example.run_directory(example.parse_args(["--out", str(tmp_path), *flags])).name
        for flags in ([], ["--seed", "1"], ["--extrapolate", "--seed", "2"])
    ]
    assert names == ["small", "small_seed1", "small_extrapolate_seed2"]
    # PI-SC and PI-HC share runs across the experts' coupling, PI-SC and PI-HC-MoE across
    # PI-HC's --total-points; the comparison lives where every setting is named.
    args = example.parse_args(["--out", str(tmp_path), "--coupling", "independent",
                               "--total-points", "--seed", "1"])
    assert {kind: example.run_directory(args, kind).name for kind in ("sc", "hc", "moe")} == {
        "sc": "small_seed1", "hc": "small_totalpoints_seed1", "moe": "small_independent_seed1"}
    assert example.run_directory(args).name == "small_independent_totalpoints_seed1"
    damped = example.parse_args(["--out", str(tmp_path), "--initial-damping", "1"])
    assert {kind: example.run_directory(damped, kind).name for kind in ("sc", "hc", "moe")} == {
        "sc": "small", "hc": "small_lambda01", "moe": "small_lambda01"}
    cauchy = example.parse_args(["--out", str(tmp_path), "--termination", "cauchy"])
    assert {kind: example.run_directory(cauchy, kind).name for kind in ("sc", "hc", "moe")} == {
        "sc": "small", "hc": "small_stopcauchy", "moe": "small_stopcauchy"}
    assert example.run_settings(args, "hc")["total_points"] is True
    assert "coupling" not in example.run_settings(args, "sc")


def test_navier_stokes_methods_share_runs_across_settings_they_ignore(tmp_path):
    example = _load("navier_stokes")
    args = example.parse_args(["--out", str(tmp_path), "--ridge", "0.02", "--overlap", "0",
                               "--coupling", "independent"])
    assert {kind: example.run_directory(args, kind).name for kind in ("sc", "hc", "moe")} == {
        "sc": "small", "hc": "small_ridge0.02", "moe": "small_overlap0_independent_ridge0.02"}
    assert example.run_directory(args).name == "small_overlap0_independent_ridge0.02"
    assert "ridge" not in example.run_settings(args, "sc")
    assert example.run_settings(args, "moe")["overlap"] == 0
    # --experts: only PI-HC-MoE's run moves. The paper's 1x2x2 (every run before the flag) is
    # not recorded in its settings, so those checkpoints still resume.
    split = example.parse_args(["--out", str(tmp_path), "--experts", "1x2x2"])
    assert {kind: example.run_directory(split, kind).name for kind in ("sc", "hc", "moe")} == {
        "sc": "small", "hc": "small", "moe": "small_experts1x2x2"}
    assert "experts" not in example.run_settings(split, "moe")
    default = example.parse_args(["--out", str(tmp_path)])
    assert example.run_settings(default, "moe")["experts"] == "1x2x1"
    blocks = example.partition(default)
    assert dict(blocks.blocks) == {"t": 1, "x": 2, "y": 1} and dict(blocks.overlap) == {"x": 0.125}
    assert dict(example.partition(split).overlap) == {"x": 0.125, "y": 0.125}
    assert example.parse_args(["--size", "paper"]).experts == "1x2x2"
