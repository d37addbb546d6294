"""The quickstart's PI-HC-MoE trained data parallel: on one process, or several (jax.distributed).

    # one process, every local device (CPU: fake 4 with XLA_FLAGS)
    XLA_FLAGS=--xla_force_host_platform_device_count=4 python examples/quickstart_distributed.py

    # 2 processes x 2 CPU devices on this machine (loopback)
    export XLA_FLAGS=--xla_force_host_platform_device_count=2
    for i in 0 1; do
      python examples/quickstart_distributed.py --coordinator 127.0.0.1:12355 \
          --num-processes 2 --process-id $i &
    done; wait

    # SLURM (one task per GPU or per host; jax.distributed reads the job's variables)
    srun --ntasks=4 python examples/quickstart_distributed.py --slurm

Trains the quickstart's model (a small FNO, four experts along x fitted together, 64 cached
trajectories, 300 steps) on a `("batch", "experts")` mesh over every process's devices: each
step's batch of 8 is split over "batch" (every device its own samples, so the device count
must divide 8; every process loads only its devices' samples), the parameters and the
optimizer state are replicated. Process 0 writes the metrics and checkpoint records to
`--out` (a directory every process can reach); a rerun resumes from the newest intact
checkpoint, on any number of processes or devices. See docs/scaling.md.
"""

import argparse
import os
from pathlib import Path

import jax


jax.config.update("jax_enable_x64", True)  # the constraint solves run in float64

import jax.random as jr  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

import hcmoe  # noqa: E402
from hcmoe import methods, training  # noqa: E402
from hcmoe.problems import diffusion_sorption as ds  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    env = os.environ.get
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", type=Path, default=Path("outputs/quickstart_distributed"))
    parser.add_argument("--tiny", action="store_true", help="a seconds-long smoke run")
    group = parser.add_argument_group("processes (default: one, or the JAX_* variables)")
    group.add_argument("--coordinator", default=env("JAX_COORDINATOR_ADDRESS"), help="host:port")
    group.add_argument("--num-processes", type=int, default=int(env("JAX_NUM_PROCESSES", "1")))
    group.add_argument("--process-id", type=int, default=int(env("JAX_PROCESS_ID", "0")))
    group.add_argument("--slurm", action="store_true", help="read them from SLURM")
    return parser.parse_args(argv)


def start_processes(args) -> None:
    if args.slurm:
        jax.distributed.initialize()  # SLURM, Open MPI, Kubernetes, Cloud TPU: detected
    elif args.num_processes > 1:
        # Cross-process collectives on CPU (GPUs use NCCL whatever this says).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)


def make_data(args):
    """Train and test splits and their grid; process 0 builds the cache, the others read it."""
    if args.tiny:
        grid = ds.make_grid(nt=6, nx=16)
        u0 = ds.sample_initial_conditions(jr.key(0), 12, grid)
        u = jax.vmap(lambda v: ds.reference_solution(v, grid, max_dt=25.0))(u0)
        return {"u0": u0[:8]}, ({"u0": u0[8:]}, u[8:]), grid
    options = dict(cache_dir=args.out / "data", progress=jax.process_index() == 0)
    if jax.process_index() == 0:
        ds.make_dataset("train", 64, "small", **options)
        ds.make_dataset("test", 32, "small", **options)
    multihost_utils.sync_global_devices("datasets cached")
    train, test = (
        ds.make_dataset(s, n, "small", **options) for s, n in [("train", 64), ("test", 32)]
    )
    return {"u0": train["u0"]}, ({"u0": test["u0"]}, test["u"]), ds.grid("small")


def main(argv=None):
    args = parse_args(argv)
    start_processes(args)
    train, (test_data, references), grid = make_data(args)
    # Joint experts are one problem per sample: every device takes its own samples.
    mesh = hcmoe.expert_mesh(batch=jax.device_count())
    size = dict(width=8, n_layers=2, modes=3, fc_width=16) if args.tiny else {}
    method = methods.make_method(
        "moe",
        hcmoe.models.FNO.diffusion_sorption_small(jr.key(0), **size),
        ds.formulation("hcmoe"),
        grid,
        hcmoe.Partition(t=1, x=4, overlap=0.1 if args.tiny else 0.3),
        residual_weight=ds.T_FINAL,
        rows=hcmoe.Rows(points_per_expert=16 if args.tiny else 400),
        coupling=hcmoe.Joint(),
    )
    result = methods.train(
        method,
        train,
        steps=args.steps,
        batch_size=8,
        key=jr.key(1),
        eval_data=(test_data, references),
        optimizer=training.paper_optimizer(decay_every=max(1, args.steps // 5)),
        eval_every=max(1, args.steps // 3),
        run_dir=args.out / "run",
        mesh=mesh,
    )
    if jax.process_index() == 0:
        evaluation = methods.evaluate(jax.device_get(result.model), test_data, references)
        print(f"{method.name} on {jax.device_count()} devices, {jax.process_count()} processes:")
        print(evaluation)
    if jax.process_count() > 1:
        jax.distributed.shutdown()


if __name__ == "__main__":
    main()
