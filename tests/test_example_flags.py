"""Examples check every flag before any work: a one-line argparse error, no traceback, no data
generated (issue 9), and pass the flags on to the solve. Covers examples/navier_stokes.py,
examples/custom_pde.py and the research flags of examples/diffusion_sorption.py (the
quickstart's before hcmoe 0.2)."""

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
        for flags in (
            [],
            ["--scale", "1"],
            ["--ridge", "0.02"],
            ["--ridge-toward", "init"],
            ["--scale", "1", "--ridge", "0.02", "--ridge-toward", "init"],
            ["--train-n-xy", "64"],
            ["--backbone", "small"],
            ["--backbone", "wide"],
            ["--seed", "0"],
            ["--seed", "2"],
            ["--backbone", "small", "--seed", "1"],
            ["--backbone", "wide16"],
            ["--initial-damping", "1"],
            ["--termination", "cauchy"],
            ["--experts", "1x2x1"],
            ["--experts", "1x2x2"],
        )
    }
    assert names == {
        "small",
        "small_scale1",
        "small_ridge0.02",
        "small_towardinit",
        "small_scale1_ridge0.02_towardinit",
        "small_train64",
        "small_backbonesmall",
        "small_seed2",
        "small_backbonesmall_seed1",
        "small_backbonewide16",
        "small_lambda01",
        "small_stopcauchy",
        "small_experts1x2x2",
    }
    # PI-SC has no solve: the old solver's start does not retrain it.
    args = example.parse_args(["--out", str(tmp_path), "--initial-damping", "1"])
    assert example.run_directory(args, "sc").name == "small"


def test_navier_stokes_paths_must_be_directories(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    _rejects(
        _load("navier_stokes").main,
        ["--data-dir", str(tmp_path / "file")],
        "--data-dir: expected a directory",
        capsys,
    )


def test_custom_pde_flags(tmp_path, capsys):
    example = _load("custom_pde")
    _rejects(
        example.main,
        ["--steps", "-5", "--out", str(tmp_path)],
        "--steps: expected a positive integer; got -5",
        capsys,
    )
    (tmp_path / "file").write_text("")
    _rejects(example.main, ["--out", str(tmp_path / "file")], "--out: expected a directory", capsys)


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
    args = example.parse_args(
        ["--out", str(tmp_path), "--coupling", "independent", "--total-points", "--seed", "1"]
    )
    assert {kind: example.run_directory(args, kind).name for kind in ("sc", "hc", "moe")} == {
        "sc": "small_seed1",
        "hc": "small_totalpoints_seed1",
        "moe": "small_independent_seed1",
    }
    assert example.run_directory(args).name == "small_independent_totalpoints_seed1"
    damped = example.parse_args(["--out", str(tmp_path), "--initial-damping", "1"])
    assert {kind: example.run_directory(damped, kind).name for kind in ("sc", "hc", "moe")} == {
        "sc": "small",
        "hc": "small_lambda01",
        "moe": "small_lambda01",
    }
    cauchy = example.parse_args(["--out", str(tmp_path), "--termination", "cauchy"])
    assert {kind: example.run_directory(cauchy, kind).name for kind in ("sc", "hc", "moe")} == {
        "sc": "small",
        "hc": "small_stopcauchy",
        "moe": "small_stopcauchy",
    }
    assert example.run_settings(args, "hc")["total_points"] is True
    assert "coupling" not in example.run_settings(args, "sc")


def test_diffusion_sorption_research_flags_get_their_own_directory(tmp_path):
    example = _load("diffusion_sorption")

    def names(*flags):
        args = example.parse_args(["--out", str(tmp_path), *flags])
        return {kind: example.run_directory(args, kind).name for kind in ("sc", "hc", "moe")}

    # The formulation's pieces shape every method's problem (and PI-SC's loss).
    assert names("--ic-weight", "2", "--no-exact-ic") == dict.fromkeys(
        ("sc", "hc", "moe"), "small_noexactic_icweight2"
    )
    assert names(
        "--scope",
        "owned",
        "--boundary",
        "cell",
        "--time-derivative",
        "backward",
        "--initial-layer",
        "5",
    ) == dict.fromkeys(
        ("sc", "hc", "moe"), "small_scopeowned_initiallayer5_boundarycell_timederivativebackward"
    )
    assert names("--decay-every", "60") == dict.fromkeys(("sc", "hc", "moe"), "small_decay60")
    # The solves' settings: PI-SC solves nothing and keeps its run.
    assert names("--ridge", "0.001", "--max-steps", "100", "--warm-start", "--balance", "sum") == {
        "sc": "small",
        "hc": "small_balancesum_ridge0.001_maxsteps100_warmstart",
        "moe": "small_balancesum_ridge0.001_maxsteps100_warmstart",
    }
    # A flag at the formulation's or the library's value is the default run (its checkpoints
    # resume); --formulation paper's balance is sum.
    assert names(
        "--exact-ic",
        "--bc-weight",
        "10",
        "--ridge",
        "1e-4",
        "--max-steps",
        "50",
        "--balance",
        "mean",
        "--decay-every",
        "300",
    ) == dict.fromkeys(("sc", "hc", "moe"), "small")
    assert names("--formulation", "paper", "--balance", "sum") == dict.fromkeys(
        ("sc", "hc", "moe"), "small_paper"
    )
    default = example.parse_args(["--out", str(tmp_path)])
    assert example.run_settings(default, "hc") == example.run_settings(
        example.parse_args(["--out", str(tmp_path), "--ridge", "1e-4"]), "hc"
    )
    changed = example.parse_args(["--out", str(tmp_path), "--ic-weight", "2", "--ridge", "0.01"])
    assert example.run_settings(changed, "hc") == example.run_settings(default, "hc") | {
        "ic_weight": 2.0,
        "ridge": 0.01,
    }
    assert "ridge" not in example.run_settings(changed, "sc")


def test_diffusion_sorption_research_flags_reach_the_solve(tmp_path, monkeypatch):
    import hcmoe

    example = _load("diffusion_sorption")
    made = {}

    class Made(Exception):
        pass

    def make_method(kind, backbone, pde, grid, partition, **options):
        made[kind] = dict(options, pde=pde, partition=partition)
        raise Made

    monkeypatch.setattr(example.methods, "make_method", make_method)
    flags = [
        "--scope",
        "owned",
        "--no-exact-ic",
        "--ic-weight",
        "2",
        "--bc-weight",
        "3",
        "--initial-layer",
        "5",
        "--boundary",
        "cell",
        "--time-derivative",
        "backward",
        "--balance",
        "sum",
        "--ridge",
        "0.01",
        "--max-steps",
        "7",
        "--warm-start",
        "--initial-damping",
        "1",
        "--termination",
        "cauchy",
        "--coupling",
        "independent",
        "--total-points",
        "--experts",
        "2",
        "--overlap",
        "0.2",
    ]
    args = example.parse_args(["--out", str(tmp_path), *flags])
    grid = example.diffusion_sorption.grid("small")
    for kind in ("hc", "moe"):
        with pytest.raises(Made):
            example.run(kind, args, None, None, grid)
    pde = made["hc"]["pde"]
    assert (
        pde.scope,
        pde.exact_initial,
        pde.initial_weight,
        pde.boundary_weight,
        pde.initial_layer,
        pde.boundary,
        pde.time_derivative,
    ) == ("owned", False, 2.0, 3.0, 5.0, "cell", "backward")
    assert made["hc"]["rows"] == hcmoe.Rows(points_per_expert=800, ridge=0.01, balance="sum")
    assert made["moe"]["rows"] == hcmoe.Rows(points_per_expert=400, ridge=0.01, balance="sum")
    assert made["moe"]["coupling"] == "independent" and "coupling" not in made["hc"]
    assert made["moe"]["partition"] == hcmoe.Partition(t=1, x=2, overlap=0.2)
    for options in made.values():
        assert options["max_steps"] == 7
        solver = options["solver"]
        assert isinstance(solver, hcmoe.WarmStart)
        assert isinstance(solver.solver, hcmoe.LevenbergMarquardt)
        assert solver.solver.termination == "cauchy"
        assert solver.solver.search.initial_damping == 1.0
    # No flag: the library's own defaults (solver None, the formulation as published).
    made.clear()
    args = example.parse_args(["--out", str(tmp_path), "--formulation", "paper"])
    with pytest.raises(Made):
        example.run("hc", args, None, None, grid)
    assert made["hc"]["solver"] is None and made["hc"]["max_steps"] == 50
    assert made["hc"]["rows"] == hcmoe.Rows(points_per_expert=400, balance="sum")
    assert made["hc"]["pde"] == example.diffusion_sorption.formulation("paper")


def test_navier_stokes_methods_share_runs_across_settings_they_ignore(tmp_path):
    example = _load("navier_stokes")
    args = example.parse_args(
        ["--out", str(tmp_path), "--ridge", "0.02", "--overlap", "0", "--coupling", "independent"]
    )
    assert {kind: example.run_directory(args, kind).name for kind in ("sc", "hc", "moe")} == {
        "sc": "small",
        "hc": "small_ridge0.02",
        "moe": "small_overlap0_independent_ridge0.02",
    }
    assert example.run_directory(args).name == "small_overlap0_independent_ridge0.02"
    assert "ridge" not in example.run_settings(args, "sc")
    assert example.run_settings(args, "moe")["overlap"] == 0
    # --experts: only PI-HC-MoE's run moves. The paper's 1x2x2 (every run before the flag) is
    # not recorded in its settings, so those checkpoints still resume.
    split = example.parse_args(["--out", str(tmp_path), "--experts", "1x2x2"])
    assert {kind: example.run_directory(split, kind).name for kind in ("sc", "hc", "moe")} == {
        "sc": "small",
        "hc": "small",
        "moe": "small_experts1x2x2",
    }
    assert "experts" not in example.run_settings(split, "moe")
    default = example.parse_args(["--out", str(tmp_path)])
    assert example.run_settings(default, "moe")["experts"] == "1x2x1"
    blocks = example.partition(default)
    assert dict(blocks.blocks) == {"t": 1, "x": 2, "y": 1} and dict(blocks.overlap) == {"x": 0.125}
    assert dict(example.partition(split).overlap) == {"x": 0.125, "y": 0.125}
    assert example.parse_args(["--size", "paper"]).experts == "1x2x2"
