"""The constraint layer's share of a full training step with the reference FNO backbone.

Three jitted functions per configuration, timed interleaved in the same rounds:

- `backbone_step`: Adam step (grad-norm clip 1.0) of the FNO alone, with the same physics loss
  applied to the unconstrained combination `u = sum_i B_i` (the solver's initial weights);
- `full_step`: the same step through `hcmoe.constrain(fno, pde, partition, ...)`: FNO, the
  constraint solve, the physics loss, gradients through the solve (implicit adjoint), Adam;
- `constraint_gradient`: the constraint layer alone (forward + backward with respect to the
  basis, on a fixed FNO output).

Reports `constraint / backbone = (full - backbone) / backbone` and the share
`(full - backbone) / full`, from the same rounds. Loss: mean squared PDE residual over the whole
grid plus the condition loss (diffusion–sorption) / the residual only (Navier–Stokes), as in
the paper. Full mode is the paper configuration (diffusion–sorption: FNO2D 5 x 64 x 8 modes,
N = 16, 101 x 1024, batch 6, 20,000 points per expert; Navier–Stokes: FNO3D 8 x 64 x 8 modes,
N = 64, 64^3, batch 4, 20,000 points per expert); K = 1 (PI-HC) and K = 4 (PI-HC-MoE).

    python benchmarks/backbone_share.py --quick
    python benchmarks/backbone_share.py                # paper configuration (GPU)
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import optax

import _common as common
import hcmoe
from hcmoe import losses
from hcmoe.models import FNO, fno_input


SIZES = {
    "smoke": [
        dict(
            problem="ds",
            grid=dict(nt=11, nx=64),
            fno="diffusion_sorption_small",
            n_basis=8,
            batch=1,
            points=64,
            experts=[1, 2],
        ),
    ],
    "quick": [
        dict(
            problem="ds",
            grid=dict(),
            fno="diffusion_sorption_paper",
            n_basis=16,
            batch=1,
            points=20_000,
            experts=[1, 4],
        ),
        dict(
            problem="ns",
            grid=dict(nt=16, n=32),
            fno="navier_stokes_small",
            n_basis=16,
            batch=1,
            points=2_000,
            experts=[1, 4],
        ),
    ],
    "full": [
        dict(
            problem="ds",
            grid=dict(),
            fno="diffusion_sorption_paper",
            n_basis=16,
            batch=6,
            points=20_000,
            experts=[1, 4],
        ),
        dict(
            problem="ns",
            grid=dict(),
            fno="navier_stokes_paper",
            n_basis=64,
            batch=4,
            points=20_000,
            experts=[1, 4],
        ),
    ],
}


class Batched(eqx.Module):
    """The FNO is unbatched; `hcmoe.constrain` wants `(batch, *grid, N)` bases."""

    model: FNO

    def __call__(self, x):
        return jax.vmap(self.model)(x)


def physics_loss(problem, u, data):
    """Mean over the batch of the whole-grid residual loss (+ condition loss)."""

    def one(u, data):
        loss = losses.residual_loss(u, problem.pde, problem.grid, data)
        if problem.name == "diffusion_sorption":
            loss = loss + losses.condition_loss(u, problem.pde, problem.grid, data)
        return loss

    return jnp.mean(jax.vmap(one)(u, data))


def make_problem(config) -> common.Problem:
    if config["problem"] == "ds":
        return common.diffusion_sorption(n_basis=config["n_basis"], **config["grid"])
    return common.navier_stokes(n_basis=config["n_basis"], **config["grid"])


def batch_inputs(problem, batch: int):
    """FNO inputs and per-sample data: the problem's initial condition, repeated."""
    ((name, value),) = problem.data.items()
    data = {name: jnp.broadcast_to(value, (batch,) + value.shape)}
    x = jax.vmap(lambda v: fno_input(problem.grid, v, dtype=jnp.float32))(data[name])
    return x, data


def measure(config: dict, args) -> dict:
    problem = make_problem(config)
    fno = getattr(FNO, config["fno"])(jr.key(0))
    backbone = Batched(fno)
    x, data = batch_inputs(problem, config["batch"])
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3))
    opt_state = optimizer.init(eqx.filter(backbone, eqx.is_array))
    key = jr.key(1)

    def update(model, opt_state, loss_fn):
        loss, grads = eqx.filter_value_and_grad(loss_fn)(model)
        updates, opt_state = optimizer.update(grads, opt_state, eqx.filter(model, eqx.is_array))
        return eqx.apply_updates(model, updates), opt_state, loss

    def backbone_step(model, opt_state, x, data):
        return update(
            model, opt_state, lambda m: physics_loss(problem, jnp.sum(m(x), axis=-1), data)
        )

    record = {
        "config": config,
        "problem": problem.describe(),
        "parameters": sum(a.size for a in jax.tree_util.tree_leaves(eqx.filter(fno, eqx.is_array))),
        "experts": {},
    }
    calls = {"backbone_step": common.compile_fn(backbone_step, backbone, opt_state, x, data)}
    basis = eqx.filter_jit(backbone)(x)  # a fixed FNO output for the constraint-only gradient
    for experts in config["experts"]:
        options = common.solve_kwargs(config["points"])
        model = hcmoe.constrain(
            backbone, problem.pde, problem.partition(experts), grid=problem.grid, **options
        )
        model_state = optimizer.init(eqx.filter(model, eqx.is_array))

        def full_step(model, opt_state, x, data, key):
            return update(
                model, opt_state, lambda m: physics_loss(problem, m(x, data, key=key).u, data)
            )

        def constraint_loss(basis, data, key, experts=experts):
            keys = jr.split(key, basis.shape[0])
            u = jax.vmap(
                lambda b, d, k: (
                    hcmoe.solve(
                        b,
                        problem.pde,
                        problem.partition(experts),
                        problem.grid,
                        d,
                        key=k,
                        **options,
                    ).u
                )
            )(basis, data, keys)
            return physics_loss(problem, u, data)

        calls[f"{experts}/full_step"] = common.compile_fn(
            full_step, model, model_state, x, data, key
        )
        calls[f"{experts}/constraint_gradient"] = common.compile_fn(
            jax.grad(constraint_loss), basis, data, key
        )
        solution = eqx.filter_jit(lambda m, x, d, k: m(x, d, key=k))(model, x, data, key)
        record["experts"][experts] = {
            "lm_steps": jnp.asarray(solution.stats.num_steps).tolist(),
            "converged_fraction": float(jnp.mean(solution.stats.converged)),
        }
        print(
            f"  K={experts}: compiled (LM steps per sample/expert "
            f"{record['experts'][experts]['lm_steps']})",
            flush=True,
        )
    record["compile_s"] = {name: c.compile_s for name, c in calls.items()}
    record["memory_peak_bytes"] = {name: c.memory.get("peak_bytes") for name, c in calls.items()}
    timing = common.time_interleaved(
        {name: c.call for name, c in calls.items()},
        repeats=common.repeats(args, quick=3, full=5),
        budget_s=common.budget(args, quick=60.0, full=300.0),
    )
    record["timing"] = timing
    t_backbone = timing["backbone_step"]["median_s"]
    for experts in config["experts"]:
        t_full = timing[f"{experts}/full_step"]["median_s"]
        entry = record["experts"][experts]
        entry["full_over_backbone"] = common.ratio(timing, f"{experts}/full_step", "backbone_step")
        entry["constraint_over_backbone"] = entry["full_over_backbone"] - 1.0
        entry["constraint_share_of_step"] = (t_full - t_backbone) / t_full
        print(
            f"  K={experts}: backbone step {t_backbone:.2f} s, full step {t_full:.2f} s, "
            f"constraint/backbone {entry['constraint_over_backbone']:.2f}, "
            f"share {entry['constraint_share_of_step']:.0%}",
            flush=True,
        )
    return record


def plot(payload: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = payload["results"]
    fig, axes = plt.subplots(1, len(records), figsize=(5.5 * len(records), 4), squeeze=False)
    for ax, record in zip(axes[0], records):
        timing = record["timing"]
        names = ["backbone_step"] + [
            f"{k}/{part}"
            for k in record["config"]["experts"]
            for part in ("full_step", "constraint_gradient")
        ]
        values = [timing[n]["median_s"] for n in names]
        errors = [timing[n]["iqr_s"] / 2 for n in names]
        ax.bar(range(len(names)), values, yerr=errors, color=["C0"] + ["C1", "C2"] * 4)
        ax.set_xticks(range(len(names)), [n.replace("/", "\n") for n in names], fontsize=8)
        ax.set_ylabel("seconds (median)")
        config = record["config"]
        ax.set_title(
            f"{record['problem']['name']} (batch {config['batch']}, {config['points']} pts/expert)",
            fontsize=9,
        )
    fig.suptitle(
        f"training step: backbone vs constraint ({payload['mode']}): {common.describe_machine()}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


def main():
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--problem", choices=["ds", "ns", "both"], default="both")
    args = p.parse_args()
    mode = common.mode(args)
    configs = [c for c in SIZES[mode] if args.problem in ("both", c["problem"])]
    results = []
    for config in configs:
        print(f"{config['problem']}: {config['fno']}, batch {config['batch']}", flush=True)
        results.append(measure(config, args))
    payload = {"mode": mode, "results": results}
    name = common.output_name("backbone_share", args)
    common.write_json(args, name, payload)
    if not args.no_plot:
        plot(payload, common.plot_path(args, name))


if __name__ == "__main__":
    main()
