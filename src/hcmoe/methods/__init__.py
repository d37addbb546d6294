r"""PI-SC, PI-HC and PI-HC-MoE from one code path: the model, the physics loss, evaluation.

The three methods of the paper share the backbone `B` (basis functions on the grid), the
ansatz `u = u_p + T(B) w` of the PDE and the training loss; they differ only in how the
weights `w` are obtained:

| kind | name | weights |
|---|---|---|
| `"sc"` | PI-SC (soft constraint) | fixed at ones: `u = u_p + T(B) 1`, no solve |
| `"hc"` | PI-HC (hard constraint) | one least-squares solve on the whole grid |
| `"moe"` | PI-HC-MoE | one solve per expert of a `Partition` |

PI-SC is therefore the backbone's output used directly as the prediction (the sum of its
output channels; with `n_basis=1`, that channel): the physics only enters through the loss.
`w = 1` is also the initial guess of the hard-constraint solves, so the three models coincide
before any solver iteration.

```python
method = hcmoe.methods.make_method(
    "moe", backbone, pde, grid, hcmoe.Partition(t=1, x=4),
    rows=hcmoe.Rows(points_per_expert=500),
)
result = hcmoe.methods.train(
    method, {"u0": train["u0"]}, steps=400, batch_size=8, key=jr.key(0),
    eval_data=({"u0": test["u0"]}, test["u"]), run_dir="runs/moe",
)
print(hcmoe.methods.evaluate(result.model, {"u0": test["u0"]}, test["u"]).summary())
```

The loss is the same for every method (the paper's): the mean squared PDE residual of the
assembled prediction over the whole grid plus the mean squared IC/BC residuals
(`hcmoe.losses.residual_loss + hcmoe.losses.condition_loss`), no solution data.
"""

from ._evaluate import (
    Evaluation as Evaluation,
    evaluate as evaluate,
    physics_loss as physics_loss,
)
from ._method import (
    KINDS as KINDS,
    NAMES as NAMES,
    InitialConditionInput as InitialConditionInput,
    Method as Method,
    WeightedResidual as WeightedResidual,
    make_method as make_method,
    predict as predict,
)
from ._report import write_results as write_results
from ._tables import (
    result_row as result_row,
    results_table as results_table,
    seconds_per_step as seconds_per_step,
)
from ._train import load as load, loss_fn as loss_fn, train as train


__all__ = [
    "KINDS",
    "NAMES",
    "Evaluation",
    "InitialConditionInput",
    "Method",
    "WeightedResidual",
    "evaluate",
    "load",
    "loss_fn",
    "make_method",
    "physics_loss",
    "predict",
    "result_row",
    "results_table",
    "seconds_per_step",
    "train",
    "write_results",
]
