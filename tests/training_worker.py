"""One process of the data-parallel training tests (`tests/test_training_scale.py`).

Run as `python -m tests.training_worker PROCESS_ID NUM_PROCESSES PORT RUN_DIR STEPS [PACE]`
from the repository root with `XLA_FLAGS=--xla_force_host_platform_device_count=2`. With
`NUM_PROCESSES > 1` it joins the JAX distributed runtime on 127.0.0.1:PORT (gloo CPU
collectives); it trains `train`'s small regression on a `("batch", "experts")` mesh over every
process's devices (the batch split over the processes), checkpointing every 2 steps in
`RUN_DIR/checkpoints`, prints `step N` after each step (sleeping `PACE` seconds there, so a
test can kill it mid-run), and process 0 writes the final parameters and the loss history to
`RUN_DIR/result.npz`. The test imports `train` to run the same steps on one device.
"""

import sys
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax

import hcmoe
from hcmoe import training


BATCH_SIZE = 8
CHECKPOINT_EVERY = 2
OPTIMIZER = optax.adam(1e-2)  # shared: a new optax object would be a new compilation


def _data():
    x = np.asarray(jr.normal(jr.key(0), (32, 2), dtype=jnp.float64))
    return {"x": x, "y": np.sin(x[:, :1]) + 0.5 * x[:, 1:]}


def _loss(model, batch, key):
    noise = 1e-3 * jr.normal(key, batch["y"].shape, dtype=batch["y"].dtype)
    error = jax.vmap(model)(batch["x"]) - batch["y"] + noise
    return jnp.mean(error**2), {"max_error": jnp.max(jnp.abs(error))}


def train(run_dir, steps: int, mesh=None, pace: float = 0.0) -> training.FitResult:
    """`steps` of Adam on a small MLP regression, on `mesh` (None: the default device)."""
    model = eqx.nn.MLP(2, 1, width_size=8, depth=1, key=jr.key(1), dtype=jnp.float64)

    def paced(model):
        paced.calls += 1
        print(f"step {paced.calls}", flush=True)
        time.sleep(pace)
        return {}

    paced.calls = 0
    run_dir = None if run_dir is None else Path(run_dir)
    return training.fit(
        model,
        _loss,
        _data(),
        optimizer=OPTIMIZER,
        steps=steps,
        batch_size=BATCH_SIZE,
        key=jr.key(2),
        checkpoint_dir=None if run_dir is None else run_dir / "checkpoints",
        checkpoint_every=CHECKPOINT_EVERY,
        metrics_path=None if run_dir is None else run_dir / "metrics.jsonl",
        log_every=1,
        eval_fn=paced if pace else None,
        eval_every=1 if pace else None,
        progress=False,
        mesh=mesh,
    )


def flat_params(model) -> np.ndarray:
    leaves = jax.tree.leaves(eqx.filter(model, eqx.is_inexact_array))
    return np.concatenate([np.ravel(np.asarray(leaf)) for leaf in leaves])


def losses(history) -> np.ndarray:
    return np.asarray([r["loss"] for r in history if r["kind"] == "train"])


def main(process_id: int, num_processes: int, port: int, run_dir: str, steps: int, pace: float):
    jax.config.update("jax_enable_x64", True)
    if num_processes > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            f"127.0.0.1:{port}",
            num_processes=num_processes,
            process_id=process_id,
            initialization_timeout=60,
            heartbeat_timeout_seconds=30,
            shutdown_timeout_seconds=30,
        )
    mesh = hcmoe.expert_mesh(batch=num_processes)  # one "batch" row of devices per process
    result = train(run_dir, steps, mesh, pace)
    if process_id == 0:
        np.savez(
            Path(run_dir) / "result.npz",
            params=flat_params(result.model),
            losses=losses(result.history),
            devices=jax.device_count(),
        )
    if num_processes > 1:
        jax.distributed.shutdown()


if __name__ == "__main__":
    pace = float(sys.argv[6]) if len(sys.argv) > 6 else 0.0
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5]), pace)
