"""One training loop for soft-constrained, hard-constrained and mixture-of-experts models.

`fit` takes any Equinox model and a loss `loss_fn(model, batch, key) -> (loss, aux)`, so PI-SC,
PI-HC and PI-HC-MoE differ only in the loss they pass:

```python
def loss_fn(model, batch, key):
    keys = jr.split(key, batch["u0"].shape[0])
    solution = jax.vmap(model)(batch["x"], batch["data"], key=keys)
    loss = jnp.mean(jax.vmap(residual)(solution.u, batch["data"]))
    return loss, hcmoe.training.solver_metrics(solution.stats)

result = hcmoe.training.fit(
    model, loss_fn, train_data, optimizer=hcmoe.training.paper_optimizer(), steps=4000,
    batch_size=6, key=jr.key(0), checkpoint_dir="runs/ds/checkpoints",
    metrics_path="runs/ds/metrics.jsonl",
)
```

Every random choice is a pure function of `(key, step)`: the batch of step `s` is slice `s` of
a per-epoch permutation, the loss key is `fold_in(key, s)`. A checkpoint therefore only needs
the model, the optimizer state and the step, and a resumed run reproduces an uninterrupted one
bit for bit.

One concept per module:

- `_fit.py`: `fit`, the jitted step, Ctrl-C and SIGTERM handling (`Terminated`);
- `_distributed.py`: where the state and the batches go on a device mesh, across processes;
- `_checkpoints.py`: `save_checkpoint` / `load_checkpoint` (atomic, verified, with fallback,
  onto any mesh);
- `_orbax.py`: the checkpoints' arrays, written and read by Orbax;
- `_metrics.py`: `solver_metrics`, the JSON-lines / CSV metrics files;
- `_optimizer.py`: `paper_optimizer`, `paper_schedule`;
- `_batches.py`: deterministic minibatches.
"""

from .._interrupt import Terminated as Terminated
from ._checkpoints import (
    Checkpoint as Checkpoint,
    CheckpointWarning as CheckpointWarning,
    load_checkpoint as load_checkpoint,
    save_checkpoint as save_checkpoint,
)
from ._fit import (
    FitResult as FitResult,
    LossFn as LossFn,
    RunMismatchError as RunMismatchError,
    fit as fit,
)
from ._metrics import (
    read_metrics as read_metrics,
    solver_metrics as solver_metrics,
    write_metrics_csv as write_metrics_csv,
)
from ._optimizer import (
    current_learning_rate as current_learning_rate,
    paper_optimizer as paper_optimizer,
    paper_schedule as paper_schedule,
)
