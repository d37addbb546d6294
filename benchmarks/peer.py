"""Side by side: hcmoe against the paper's public release (PI-HC-MoE, Chalapathi et al., ICLR 2024).

Diffusion–sorption, one random smooth basis shared by both (fixed seed), u0 = 0.1, float64, every
function jitted, timed in round robin between the two implementations (alternating order,
`--rounds` rounds, medians; ratios hcmoe / release are medians of per-round ratios). For K = 1
and K = 4 experts (blocks 1 (t) x K (x)) and each implementation:

- `forward`: the constrained prediction u (LM, rtol = atol = 1e-4, `--max-steps` cap, 50).
- `fwd+grad`: the gradient with respect to the basis of the scalar loss `sum(u * R) / size`
  (R a fixed random field), what a training step differentiates through the layer.
- `setup`: the forward with the LM capped at one step (everything but the iterations, plus
  the first one).
- `backward`: per round, fwd+grad minus forward; the median of those. On a 2-core CPU this
  difference can be negative (the forward-only program ran slower than the gradient's;
  benchmarks/README.md, section 10), so the backward is also timed on its own:
- `backward (VJP)`: applying the stored VJP of the loss (`jax.vjp` outside the timing, then
  only `vjp_fn(1.0)` timed): the implicit adjoint's solve and the transposes back to the basis,
  nothing of the forward.
- `per LM step`: (forward - setup) / (steps - 1), with `steps` the largest LM step count over
  the experts (the vmapped loop runs every expert until the slowest stops).

K = 1 runs the release's MoE path with ONE expert: its PI-HC path (no MoE) copies the IC rows to
every time level (nt x nx rows), a different problem. The load average is printed and stored
with every group of timings: on a shared machine timings are smoke runs, not results.

    python benchmarks/peer.py --release /path/to/physics-NNs-hard-constraints
    python benchmarks/peer.py --release PATH --size small --rounds 3   # a quick smoke run

The release is not part of this repository (it has no licence): get it with
`git clone https://github.com/ASK-Berkeley/physics-NNs-hard-constraints` (or any copy of its
tree) and pass the folder that holds `neptune/`. Without it, or when it cannot be imported, the
script prints a line starting with "peer.py: skipped" and exits 0.

**Import shims** (applied by this script in its own process, nothing of the release is copied):

- stub modules for `tensorflow`, `loguru` and `jaxopt` when they are not installed: the release
  imports them at module level (TF types in annotations, a logger, jaxopt's LM behind
  `use_jaxopt`), the path measured here never calls them (`use_jaxopt=False`, as in the
  release's DS configs);
- `neptune` and `neptune.models` registered as bare packages over the release's folders, so that
  only the modules the constraint layer needs load (`neptune.pdes`, `.geometry`, `.types`,
  `.utils`, `.models.constraints`, `.models.MoE`): the release's `neptune/__init__.py` imports
  the training stack (datasets, callbacks, wandb, TF) and runs `constants.setup()`, which flips
  process-wide JAX flags (`jax_threefry_partitionable=False`, `jax_disable_jit`) through the
  removed `jax.config` module; those flags are left at JAX's defaults here (they change which
  random points are drawn, not the cost);
- `jax.tree_map` (removed in JAX 0.6) set to `jax.tree_util.tree_map`, and
  `jax.sharding.PositionalSharding` (removed) replaced by a stand-in whose `reshape` and
  `replicate` return the equivalent `NamedSharding`s over the same devices.

**The two problems: same rows, as far as the release allows.** Each expert solves, from w = 1,
with ridge rows 1e-4 w and plain sums of squares (`hcmoe.Rows(ridge=1e-4, balance="sum")`):

- PDE rows `u_t - D / R(u) u_xx` at `--points` points drawn at random from the expert's block
  (hcmoe's `DiffusionSorption.residual`, the same formula and guard as the release's),
  every time level included (the release samples the whole block, the IC level too), in
  physical units (t in [0, 500], x the cell centres);
- the IC rows of the whole t = 0 line, divided by u0 (the release's relative IC error), given to
  every expert;
- both boundary rows, `u(t, x_0) = 1` and `u(t, x_last) = D u_x`, for t > t_0, given to every
  expert (the release's global boundary rows); the release takes that u_x in its normalised
  x / max(x), so hcmoe's row is `u - D max(x) u_x`.

Two hcmoe variants are timed against the release in the same rounds, both on the release's own
PDE points (the release's sampler called with the release's key splits, given to hcmoe as the
PDE's `residual_mask`, `hcmoe.Rows(points_per_expert=None)`):

- `hcmoe`: the release's first differences (`ops.Linear` of `jnp.gradient`: central inside,
  two-point one-sided at the ends; u_xx = that applied twice), so the two least-squares problems
  are identical: the script prints, per K, the relative L2 difference of the two predictions
  (overall and per expert) and of the two gradients; for converged experts they agree to ~1e-11
  (u) and ~1e-7 (gradient) at the paper size, and the LM step counts match.
- `hcmoe-fd`: hcmoe's own operators, `FiniteDifference("t")` for u_t,
  `Compose(FiniteDifference("x"), FiniteDifference("x"))` for u_xx (the release's 5-point-wide
  interior stencil) and `FiniteDifference("x")` in the Robin row: the same rows inside,
  second-order one-sided stencils at the edges where the release has first-order two-point
  ones. This is hcmoe's stencil path (`ops.Linear` is a full-grid callable, opaque to it); the
  edge rows differ, and so can the LM step counts (18 against 22 in one paper-size K = 1 run),
  which moves the forward time; the per-step column does not depend on them.

`--stencils release` or `--stencils hcmoe` times one variant only.

Where the problems still differ:

- *the solver*: hcmoe's default LM (normal equations, optimistix's trust-region search)
  against the release's `optimistix.LevenbergMarquardt` (QR); same tolerances and cap, and by
  default the same stopping rule: `--termination cauchy` (optimistix's Cauchy test, the
  release's), where hcmoe's own default, `--termination objective`, also stops once the
  objective has converged (fewer iterations where the weights walk along flat directions).
  An expert that hits the cap (at K = 4 the experts of the right half do, on this basis)
  stops at a solver-dependent iterate, so its block, and the gradient through it, differ more.
- *the draw of the points is not timed on hcmoe's side*: with the release's points the rows are
  fixed at trace time, while the release draws (permutation + nonzero) on every call, inside
  its setup. `--points-from hcmoe` times hcmoe with its own draw (`points_per_expert`, a top-k
  over the block per call); the rows are then a different random set, the LM step counts can
  differ a lot (paper size, K = 1: 31-33 steps against the release's 22 on this basis), and the
  same-rows check is solved separately (untimed).
- the release has no boundary rows at t_0; hcmoe has them with weight 0.
- gradients of the timed runs are only comparable on the same points: the cotangent reaches
  the basis at the sampled points' stencils, so with different draws the two gradient fields
  differ by O(1) however well each is computed.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import importlib
import importlib.util
import json
import os
import sys
import time
import types
from pathlib import Path


SKIP = "peer.py: skipped"
RESULTS = Path(__file__).resolve().parent / "results"
SIZES = {
    "paper": dict(nt=101, nx=1024, points=20_000),
    "small": dict(nt=26, nx=64, points=256),
}
EXPERTS = (1, 4)
N_BASIS = 16
U0 = 0.1
RIDGE = 1e-4
STUBBED = ("tensorflow", "loguru", "jaxopt")
VARIANTS = {"release": "hcmoe", "hcmoe": "hcmoe-fd"}  # --stencils value -> name in the tables


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--release",
        type=Path,
        required=True,
        help="folder of the release's tree (the one that holds neptune/)",
    )
    p.add_argument(
        "--size",
        choices=sorted(SIZES),
        default="paper",
        help="paper: 101 x 1024, 20k points per expert; small: 26 x 64, 256 points",
    )
    p.add_argument("--rounds", type=int, default=5, help="round-robin rounds (medians)")
    p.add_argument("--points", type=int, default=None, help="PDE points per expert")
    p.add_argument("--experts", type=int, nargs="+", default=list(EXPERTS))
    p.add_argument("--max-steps", type=int, default=50, help="LM iteration cap (paper: 50)")
    p.add_argument("--tol", type=float, default=1e-4, help="LM rtol = atol (paper: 1e-4)")
    p.add_argument(
        "--stencils",
        choices=sorted(VARIANTS),
        nargs="+",
        default=["release", "hcmoe"],
        help="hcmoe variants timed: with the release's first differences ('hcmoe') "
        "and/or with its own FiniteDifference operators ('hcmoe-fd')",
    )
    p.add_argument(
        "--points-from",
        choices=("hcmoe", "release"),
        default="release",
        help="hcmoe's PDE points in the timed runs: its own draw, or the release's",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the shared random basis")
    p.add_argument(
        "--termination",
        choices=("cauchy", "objective"),
        default="cauchy",
        help="hcmoe's stopping rule: the release's (cauchy, default: like for like) "
        "or hcmoe's default (objective)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON output (default results/peer.json, results/peer_small.json)",
    )
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error(f"--rounds must be >= 1; got {args.rounds}")
    if args.out is None:
        args.out = RESULTS / ("peer.json" if args.size == "paper" else f"peer_{args.size}.json")
    return args


def load_avg() -> list[float] | None:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


# --------------------------------------------------------------------------------------------
# Importing the release (shims)
# --------------------------------------------------------------------------------------------


def release_root(path: Path) -> Path | None:
    """The folder holding the release's `neptune/` package, or None."""
    path = path.expanduser()
    for root in (path, path.parent):
        if (root / "neptune" / "__init__.py").is_file() and (
            root / "neptune" / "models" / "MoE"
        ).is_dir():
            return root.resolve()
    return None


class _Placeholder:
    """Any attribute of a stubbed module: fine in annotations, an error if actually used."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Placeholder(f"{self._name}.{attr}")

    def __call__(self, *args, **kwargs):
        raise RuntimeError(
            f"peer.py: the stub {self._name} was called; the measured path of "
            "the release should not need it"
        )

    def __repr__(self):
        return f"<peer.py stub {self._name}>"


def _stub_module(name: str) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__peer_stub__ = True

    def __getattr__(attr):  # PEP 562
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Placeholder(f"{name}.{attr}")

    module.__getattr__ = __getattr__
    return module


def _positional_sharding():
    """A stand-in for the removed `jax.sharding.PositionalSharding` (reshape, replicate)."""
    import jax
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    class PositionalSharding:
        def __init__(self, devices):
            self._devices = np.asarray(devices)

        def reshape(self, *shape):
            if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
                shape = tuple(shape[0])
            names = tuple(f"axis{i}" for i in range(len(shape)))
            return NamedSharding(Mesh(self._devices.reshape(shape), names), PartitionSpec(*names))

        def replicate(self):
            return NamedSharding(Mesh(self._devices.reshape(-1), ("axis0",)), PartitionSpec())

    del jax
    return PositionalSharding


def install_shims(root: Path) -> list[str]:
    """Make the release's constraint-layer modules importable on today's JAX; returns what
    was shimmed."""
    import jax
    import jax.sharding

    applied = []
    for name in STUBBED:
        if name not in sys.modules and importlib.util.find_spec(name) is None:
            sys.modules[name] = _stub_module(name)
            applied.append(f"stub module {name}")
    if not hasattr(jax, "tree_map"):
        jax.tree_map = jax.tree_util.tree_map
        applied.append("jax.tree_map = jax.tree_util.tree_map")
    if not hasattr(jax.sharding, "PositionalSharding"):
        jax.sharding.PositionalSharding = _positional_sharding()
        applied.append("jax.sharding.PositionalSharding stand-in (NamedSharding)")
    for package in ("neptune", "neptune.models"):
        module = types.ModuleType(package)
        module.__path__ = [str(root.joinpath(*package.split(".")))]
        module.__peer_bare_package__ = True
        sys.modules[package] = module
    applied.append("neptune, neptune.models as bare packages (their __init__ not run)")
    return applied


def import_release(root: Path) -> types.SimpleNamespace:
    shims = install_shims(root)
    pdes = importlib.import_module("neptune.pdes")
    geometry = importlib.import_module("neptune.geometry")
    constraints = importlib.import_module("neptune.models.constraints")
    moe = importlib.import_module("neptune.models.MoE")
    moe_utils = importlib.import_module("neptune.models.MoE.moe_utils")
    return types.SimpleNamespace(
        DiffusionSorption1D=pdes.DiffusionSorption1D,
        Function=geometry.Function,
        DenseGrid=geometry.DenseGrid,
        generate_single_mask=geometry.generate_single_mask,
        ConstraintConfig=constraints.ConstraintConfig,
        HardConstraintLayer=constraints.HardConstraintLayer,
        MoEConfig=moe.MoEConfig,
        SpatialTemporalMoE=moe.SpatialTemporalMoE,
        dimension_partition=moe_utils.dimension_partition,
        shims=shims,
    )


def release_fingerprint(root: Path) -> str:
    """SHA-256 of the release's Python sources (which version was measured)."""
    digest = hashlib.sha256()
    for path in sorted((root / "neptune").rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# The benchmark (imports JAX and hcmoe; only reached with an importable release)
# --------------------------------------------------------------------------------------------


def run(args, rel, root: Path) -> dict:
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import jax.random as jr
    import numpy as np
    import optimistix as optx

    import _common as common
    import hcmoe
    from hcmoe.problems import diffusion_sorption as ds

    size = SIZES[args.size]
    nt, nx = size["nt"], size["nx"]
    points = args.points or size["points"]
    for k in args.experts:
        if nx % k:
            raise SystemExit(
                f"--experts: {k} does not divide nx = {nx} (the release splits evenly)"
            )
        if points > nt * nx // k:
            raise SystemExit(
                f"--points {points} exceeds a block of {nt * nx // k} points at "
                f"K = {k} (the release would pad with copies of one point)"
            )
    grid = ds.make_grid(nt=nt, nx=nx)
    t, x = np.asarray(grid.coords("t")), np.asarray(grid.coords("x"))
    physics = ds.DiffusionSorption()
    basis = common.smooth_basis(jr.key(args.seed), grid, N_BASIS)
    readout = jr.normal(jr.key(7), grid.shape)
    u0 = jnp.full((nx,), U0)
    data = {"u0": u0}
    hcmoe_key, release_key = jr.key(1), jr.PRNGKey(1)
    print(
        f"grid {nt} x {nx}, N = {N_BASIS}, {points} points per expert, u0 = {U0}, "
        f"LM tol {args.tol}, <= {args.max_steps} steps, {args.rounds} rounds; "
        f"{common.describe_machine()}; load average {load_avg()}",
        flush=True,
    )

    # ---- the release's side: its own input processing, MoE router and constraint layer ----
    rel_pde = rel.DiffusionSorption1D()
    inputs = {
        "D": physics.D,
        "phi": physics.phi,
        "rho_s": physics.rho_s,
        "n_f": physics.n_f,
        "k": physics.k_f,
        "u": jnp.full((nt, nx), U0),
        "x": jnp.asarray(x),
        "t": jnp.asarray(t),
    }
    model_input, _ = rel_pde.process_input(inputs)

    def release_solver(experts, max_steps):
        cfg = rel.ConstraintConfig(
            system="levenbergmarquardt",
            num_sampled_points=points,
            rtol=args.tol,
            atol=args.tol,
            maxiter=max_steps,
            ridge=RIDGE,
            use_jaxopt=False,
        )
        layer = rel.HardConstraintLayer(cfg, rel_pde)
        moe = rel.SpatialTemporalMoE(
            rel.MoEConfig(split="spatialtemporal", num_experts=(1, experts)), layer, rel_pde
        )

        def forward(basis, key):
            out = moe(
                key,
                rel.Function(model_input.domain, basis),
                model_input.initial_condition,
                model_input.pde_param,
            )
            converged = out.solver_status == optx.RESULTS.successful
            return {
                "u": out.solution.image[..., 0],
                "steps": out.solver_iter,
                "converged": converged,
            }

        return forward

    def release_points(experts):
        """The release's PDE points for `release_key`: its sampler, its key splits."""
        blocks = rel.dimension_partition(model_input.domain.grid, (1, experts))
        keys = jax.random.split(release_key, experts)
        mask, width = np.zeros((nt, nx), bool), nx // experts
        for k in range(experts):
            _, subkey = jax.random.split(keys[k])
            block = rel.generate_single_mask(rel.DenseGrid(blocks[k]), points, subkey)
            mask[:, k * width : (k + 1) * width] = np.asarray(block.mask)
        assert mask.sum() == experts * points
        return mask

    # ---- hcmoe's side: the public API, the same rows ----
    def hcmoe_solver(experts, max_steps, *, stencils, mask=None):
        pde = ReleaseRows(
            physics=physics,
            x_scale=float(x.max()),
            stencils=stencils,
            points_mask=None if mask is None else StaticMask(mask),
        )
        partition = hcmoe.Partition(x=experts)
        expected = np.broadcast_to(np.repeat(np.arange(experts), nx // experts), grid.shape)
        assert np.array_equal(partition.labels(grid), expected), "blocks differ from the release's"
        options = dict(
            rows=hcmoe.Rows(
                points_per_expert=None if mask is not None else points, ridge=RIDGE, balance="sum"
            ),
            solver=hcmoe.LevenbergMarquardt(
                rtol=args.tol, atol=args.tol, termination=args.termination
            ),
            max_steps=max_steps,
        )

        def forward(basis, key):
            solution = hcmoe.solve(basis, pde, partition, grid, data, key=key, **options)
            return {
                "u": solution.u,
                "steps": solution.stats.num_steps,
                "converged": solution.stats.converged,
            }

        return forward

    def loss_of(forward):
        def loss(basis, key):
            return jnp.sum(forward(basis, key)["u"] * readout) / readout.size

        return loss

    def with_grad(forward):
        return jax.grad(loss_of(forward))

    def vjp_backward(forward, key):
        """A zero-argument call that applies the loss's stored VJP (the backward alone)."""
        loss = loss_of(forward)
        _, vjp_fn = jax.jit(lambda b: jax.vjp(lambda b: loss(b, key), b))(basis)
        apply = jax.jit(lambda f: f(jnp.ones((), readout.dtype))[0])
        jax.block_until_ready(apply(vjp_fn))
        return lambda: apply(vjp_fn)

    def rel_diff(a, b) -> float:
        a, b = np.asarray(a), np.asarray(b)
        return float(np.linalg.norm(a - b) / np.linalg.norm(b))

    def per_block(a, b, experts) -> list[float]:
        """`rel_diff` on each expert's block (1 (t) x K (x), equal widths)."""
        a, b = np.split(np.asarray(a), experts, axis=1), np.split(np.asarray(b), experts, axis=1)
        return [rel_diff(p, q) for p, q in zip(a, b)]

    # The hcmoe variants timed: "hcmoe" with the release's stencils, "hcmoe-fd" with its own.
    variants = {VARIANTS[stencils]: stencils for stencils in args.stencils}
    results = []
    for experts in args.experts:
        print(f"\nK = {experts}: compiling ... (load average {load_avg()})", flush=True)
        release_mask = release_points(experts)
        timed_mask = release_mask if args.points_from == "release" else None
        solvers = {
            name: (
                functools.partial(hcmoe_solver, experts, stencils=stencils, mask=timed_mask),
                hcmoe_key,
            )
            for name, stencils in variants.items()
        }
        solvers["release"] = (functools.partial(release_solver, experts), release_key)
        compiled, compile_s, memory, outputs = {}, {}, {}, {}
        for impl, (make, key) in solvers.items():
            fns = {"forward": make(args.max_steps), "setup": make(1)}
            fns["fwd+grad"] = with_grad(fns["forward"])
            for what, fn in fns.items():
                c = common.compile_fn(fn, basis, key)
                name = f"{impl}/{what}"
                compiled[name] = c.call
                compile_s[name] = round(c.lower_s + c.compile_s, 3)
                memory[name] = c.memory.get("peak_bytes")
                outputs[name] = jax.block_until_ready(c.call())
            compiled[f"{impl}/backward-vjp"] = vjp_backward(fns["forward"], key)
        steps = {impl: np.asarray(outputs[f"{impl}/forward"]["steps"]).tolist() for impl in solvers}
        converged = {
            impl: np.asarray(outputs[f"{impl}/forward"]["converged"]).tolist() for impl in solvers
        }
        agreement = {
            name: {
                "u_relative_difference": rel_diff(
                    outputs[f"{name}/forward"]["u"], outputs["release/forward"]["u"]
                ),
                "grad_relative_difference": rel_diff(
                    outputs[f"{name}/fwd+grad"], outputs["release/fwd+grad"]
                ),
            }
            for name in variants
        }

        # Same problem: hcmoe on the release's points with the release's stencils (by default
        # the timed "hcmoe" variant already is that one).
        if args.points_from == "release" and "hcmoe" in variants:
            check_u, check_grad = outputs["hcmoe/forward"], outputs["hcmoe/fwd+grad"]
        else:
            check = hcmoe_solver(experts, args.max_steps, stencils="release", mask=release_mask)
            check_u = eqx.filter_jit(check)(basis, hcmoe_key)
            check_grad = jax.jit(with_grad(check))(basis, hcmoe_key)
        same_rows = {
            "u_relative_difference": rel_diff(check_u["u"], outputs["release/forward"]["u"]),
            "u_relative_difference_per_expert": per_block(
                check_u["u"], outputs["release/forward"]["u"], experts
            ),
            "grad_relative_difference": rel_diff(check_grad, outputs["release/fwd+grad"]),
            "hcmoe_steps": np.asarray(check_u["steps"]).tolist(),
        }
        print_agreement(experts, steps, converged, agreement, same_rows, args.points_from)

        load_before = load_avg()
        order = [
            f"{impl}/{what}"
            for what in ("forward", "fwd+grad", "setup", "backward-vjp")
            for impl in solvers
        ]
        t0 = time.perf_counter()
        timing = common.time_interleaved(
            {n: compiled[n] for n in order}, repeats=args.rounds, warmup=1
        )
        load_after = load_avg()
        record = summarize_k(experts, list(solvers), timing, steps, compile_s, memory, common)
        for impl in solvers:
            record["impls"][impl]["converged"] = converged[impl]
        record |= {
            "agreement_with_release": agreement,
            "same_rows_check": same_rows,
            "load_average_before": load_before,
            "load_average_after": load_after,
            "timing_wall_s": round(time.perf_counter() - t0, 2),
        }
        results.append(record)
        print_table([record], load_before, load_after)

    return {
        "config": {
            "size": args.size,
            "grid": {"t": nt, "x": nx},
            "n_basis": N_BASIS,
            "points_per_expert": points,
            "u0": U0,
            "ridge": RIDGE,
            "tol": args.tol,
            "max_steps": args.max_steps,
            "rounds": args.rounds,
            "hcmoe_variants": variants,
            "points_from": args.points_from,
            "basis_seed": args.seed,
            "dtype": "float64",
            "termination": args.termination,
        },
        "release": {
            "path": str(root),
            "sources_sha256_16": release_fingerprint(root),
            "shims": rel.shims,
        },
        "results": results,
    }


def summarize_k(experts, impls, timing, steps, compile_s, memory, common) -> dict:
    import numpy as np

    out = {}
    for impl in impls:
        fwd = np.asarray(timing[f"{impl}/forward"]["times_s"])
        grad = np.asarray(timing[f"{impl}/fwd+grad"]["times_s"])
        n = min(fwd.size, grad.size)
        forward_ms = 1e3 * timing[f"{impl}/forward"]["median_s"]
        setup_ms = 1e3 * timing[f"{impl}/setup"]["median_s"]
        max_steps = max(steps[impl])
        out[impl] = {
            "forward_ms": forward_ms,
            "fwd_grad_ms": 1e3 * timing[f"{impl}/fwd+grad"]["median_s"],
            "setup_ms": setup_ms,
            "backward_ms": 1e3 * float(np.median(grad[:n] - fwd[:n])),
            "backward_vjp_ms": 1e3 * timing[f"{impl}/backward-vjp"]["median_s"],
            "per_lm_step_ms": (forward_ms - setup_ms) / (max_steps - 1) if max_steps > 1 else None,
            "lm_steps": steps[impl],
            "compile_s": {w: compile_s[f"{impl}/{w}"] for w in ("forward", "fwd+grad", "setup")},
            "peak_bytes": {w: memory[f"{impl}/{w}"] for w in ("forward", "fwd+grad", "setup")},
            "timing": {
                w: timing[f"{impl}/{w}"] for w in ("forward", "fwd+grad", "setup", "backward-vjp")
            },
        }
    r = out["release"]

    def quotient(a, b):
        return a / b if a is not None and b is not None and min(a, b) > 0 else None

    ratios = {
        impl: {
            "forward": common.ratio(timing, f"{impl}/forward", "release/forward"),
            "fwd_grad": common.ratio(timing, f"{impl}/fwd+grad", "release/fwd+grad"),
            "setup": common.ratio(timing, f"{impl}/setup", "release/setup"),
            "backward": quotient(out[impl]["backward_ms"], r["backward_ms"]),
            "backward_vjp": common.ratio(timing, f"{impl}/backward-vjp", "release/backward-vjp"),
            "per_lm_step": quotient(out[impl]["per_lm_step_ms"], r["per_lm_step_ms"]),
        }
        for impl in impls
        if impl != "release"
    }
    return {"experts": experts, "impls": out, "ratio_over_release": ratios}


def print_agreement(experts, steps, converged, agreement, same_rows, points_from) -> None:
    """LM steps and how close the predictions (and gradients) are."""
    print(f"K = {experts}: LM steps per expert: {steps}; converged: {converged}")
    for name, a in agreement.items():
        print(
            f"K = {experts}: {name} vs release (points from {points_from}): u differs by "
            f"{a['u_relative_difference']:.2e} (relative L2), gradients by "
            f"{a['grad_relative_difference']:.2e}"
        )
    per_expert = ", ".join(f"{v:.1e}" for v in same_rows["u_relative_difference_per_expert"])
    print(
        f"K = {experts}: same rows (the release's points and stencils): u differs by "
        f"{same_rows['u_relative_difference']:.2e} (relative L2; per expert {per_expert}), "
        f"gradients by {same_rows['grad_relative_difference']:.2e}; hcmoe steps "
        f"{same_rows['hcmoe_steps']}",
        flush=True,
    )


def _ms(value) -> str:
    return "-" if value is None else f"{value:.1f}"


def print_table(records, load_before, load_after) -> None:
    print(f"\n(ms, medians; load average before {load_before}, after {load_after})")
    print(
        "| K | impl | forward | fwd + grad | setup (1 LM step) | backward | backward (VJP) "
        "| per LM step | LM steps | XLA peak fwd+grad |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for rec in records:
        for impl, d in rec["impls"].items():
            peak = d["peak_bytes"]["fwd+grad"]
            peak = "-" if peak is None else f"{peak / 2**20:.0f} MiB"
            print(
                f"| {rec['experts']} | {impl} | {_ms(d['forward_ms'])} | {_ms(d['fwd_grad_ms'])} "
                f"| {_ms(d['setup_ms'])} | {_ms(d['backward_ms'])} "
                f"| {_ms(d.get('backward_vjp_ms'))} | {_ms(d['per_lm_step_ms'])} "
                f"| {d['lm_steps']} | {peak} |"
            )
        for impl, q in rec["ratio_over_release"].items():
            fmt = {k: "-" if v is None else f"{v:.2f}x" for k, v in q.items()}
            print(
                f"| {rec['experts']} | {impl} / release | {fmt['forward']} | {fmt['fwd_grad']} "
                f"| {fmt['setup']} | {fmt['backward']} | {fmt.get('backward_vjp', '-')} "
                f"| {fmt['per_lm_step']} | | |"
            )


def hcmoe_changes() -> list[str] | None:
    """Uncommitted changes to hcmoe's sources at run time (`git status --porcelain src`):
    the commit alone does not say what was measured when the tree is dirty."""
    import subprocess

    try:
        done = subprocess.run(
            ["git", "status", "--porcelain", "src"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parent.parent,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.splitlines() if done.returncode == 0 else None


def write(path: Path, payload: dict) -> None:
    import _common as common

    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": "peer",
        "mode": payload["config"]["size"],
        "machine": common.machine(),
        "device_peak_bytes_since_start": common.device_peak_bytes(),
    } | payload
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=common._jsonable) + "\n")
    os.replace(tmp, path)
    print(f"wrote {path}")


# --------------------------------------------------------------------------------------------
# hcmoe's PDE with the release's rows (defined lazily: needs hcmoe, which needs JAX)
# --------------------------------------------------------------------------------------------


def _define_pde():
    import equinox as eqx
    import jax.numpy as jnp
    import numpy as np

    import hcmoe
    from hcmoe import ops
    from hcmoe.problems import diffusion_sorption as ds

    class StaticMask:
        """A boolean grid mask that can sit in a static field (hashable by content)."""

        def __init__(self, array):
            self.array = np.asarray(array, bool)
            self._hash = hash((self.array.shape, self.array.tobytes()))

        def __hash__(self):
            return self._hash

        def __eq__(self, other):
            return isinstance(other, StaticMask) and np.array_equal(self.array, other.array)

    def first_difference(name):
        """Central differences inside, two-point one-sided ones at the ends (`jnp.gradient`)."""

        def apply(field, grid):
            return jnp.gradient(field, grid.spacing(name), axis=grid.axis(name))

        return ops.Linear(apply)

    # One instance each, so that every ReleaseRows compares (and caches) equal.
    release_d = {"t": first_difference("t"), "x": first_difference("x")}

    class ReleaseRows(hcmoe.AbstractPDE):
        """Diffusion–sorption with the rows of the release's MoE experts (module docstring).

        `physics`: the constants and residual (`hcmoe.problems.diffusion_sorption`);
        `x_scale`: max(x), the release's Robin row differentiates in x / max(x);
        `stencils`: `"hcmoe"` or `"release"` derivative operators; `points_mask`: where the
        PDE rows may be drawn (None: everywhere, every time level included).
        """

        physics: ds.DiffusionSorption
        x_scale: float = eqx.field(static=True)
        stencils: str = eqx.field(static=True, default="hcmoe")
        points_mask: StaticMask | None = eqx.field(static=True, default=None)

        def derivative(self, name):
            return release_d[name] if self.stencils == "release" else ops.FiniteDifference(name)

        def operators(self):
            d_x = self.derivative("x")
            return {"u": ops.Identity(), "u_t": self.derivative("t"), "u_xx": ops.Compose(d_x, d_x)}

        def residual(self, values, coords, data):
            return self.physics.residual(values, coords, data)

        def conditions(self, grid, data):
            u0 = hcmoe.require(data, "u0", self)
            after_t0 = np.ones(grid.shape[grid.axis("t")])
            after_t0[0] = 0.0
            outflow = ops.Identity() - self.derivative("x") * (self.physics.D * self.x_scale)
            return (
                hcmoe.initial(u0, weight=1.0 / u0, scope="global"),
                hcmoe.dirichlet("x", "low", 1.0, weight=after_t0, scope="global"),
                hcmoe.Condition(
                    "x", -1, outflow, 0.0, after_t0, name="Robin condition", scope="global"
                ),
            )

        def residual_mask(self, grid):
            return None if self.points_mask is None else self.points_mask.array

    return ReleaseRows, StaticMask


def main(argv=None) -> int:
    args = parse_args(argv)
    root = release_root(args.release)
    if root is None:
        print(
            f"{SKIP}: no release at {args.release} (expected a folder holding "
            "neptune/ of github.com/ASK-Berkeley/physics-NNs-hard-constraints)"
        )
        return 0
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import _common  # noqa: F401  (float64 on before any JAX array exists)

    try:
        rel = import_release(root)
    except Exception as error:  # any import failure of a foreign tree is a skip, said plainly
        print(f"{SKIP}: the release at {root} does not import: {type(error).__name__}: {error}")
        return 0
    global ReleaseRows, StaticMask
    ReleaseRows, StaticMask = _define_pde()
    print(f"release: {root} (sources {release_fingerprint(root)}); shims: {'; '.join(rel.shims)}")
    load_start = load_avg()
    changes = hcmoe_changes()
    if changes:
        print(f"note: hcmoe's sources have uncommitted changes: {changes}")
    payload = run(args, rel, root)
    payload["hcmoe_uncommitted_changes"] = changes
    payload["load_average_start"] = load_start
    payload["load_average_end"] = load_avg()
    write(args.out, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
