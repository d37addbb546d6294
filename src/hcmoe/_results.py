"""The results of a constraint solve: `Solution`, `SolveStats` and the `RESULTS` enumeration."""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax.numpy as jnp
import numpy as np
import optimistix as optx
from jaxtyping import Array, Bool, Float, Int


class RESULTS(optx.RESULTS):  # pyright: ignore[reportGeneralTypeIssues]
    """Why an expert's constraint solve stopped (`hcmoe.SolveStats.result`).

    Every `optimistix.RESULTS` and `lineax.RESULTS` entry, and:

    - `not_stationary`: the solver reported success, but the returned weights are not a
      minimiser (the Gauss–Newton model still predicts a decrease of the objective beyond
      `rtol`): the trust region collapsed to tiny steps. Try more `max_steps`, a larger ridge
      (`hcmoe.Rows(ridge=...)`) or another `termination`.
    - `nonfinite_residual`: the residual at the returned weights is NaN or infinite (a
      non-finite basis, data or PDE constant, or a residual that overflows).
    """

    not_stationary = (
        "The solver stopped, but the returned weights are not a minimiser: the Gauss-Newton "
        "model still predicts a decrease of the objective beyond rtol (the trust region "
        "collapsed to tiny steps). Try more max_steps, a larger ridge "
        "(hcmoe.Rows(ridge=...)) or another termination."
    )
    nonfinite_residual = (
        "The residual at the returned weights is NaN or infinite: check the basis, the data "
        "and the PDE's constants for non-finite values, and the residual for overflow."
    )


class SolveStats(eqx.Module):
    """Per-expert diagnostics of the constraint solve (each field has a leading `K` axis).

    - `num_steps`: solver iterations (0 for the direct linear solve).
    - `residual_norm`: `||r_k(w_k)||_2` at the returned weights (PDE, condition and ridge rows).
    - `converged`: the solver reported success, the residual is finite and, with hcmoe's
      default Levenberg–Marquardt, the returned weights are stationary: the Gauss–Newton
      model predicts no further decrease of `½‖r‖²` beyond `rtol` of it (plus `atol²`; see
      `hcmoe._levenberg_marquardt.gauss_newton_decrement`). The Cauchy test alone also
      passes where the trust region has collapsed and the last accepted step was tiny, far
      from a minimiser (measured: gradient 0.2 and a negative Hessian eigenvalue at an expert
      reported converged at rtol = atol = 1e-12). Gradients through an expert that did not
      converge are unreliable: the implicit adjoint assumes a stationary point
      (measured: a gradient norm changing 3-6x with the summation order at two capped
      experts; docs: how-to-choose.md#adjoint).
    - `result`: an `hcmoe.RESULTS` per expert: `successful`, or why the expert did not
      converge (`RESULTS[stats.result]`, or `stats.messages()`, gives the readable message).
    - `condition_error`: the largest unweighted residual `|L u - g|` of the expert's own
      function over its least-squares condition rows (0 without any; exact conditions hold by
      construction and are not counted).
    - `points`: the flat grid indices (`numpy.unravel_index(points, grid.shape)`) of the PDE
      points each expert used, shape `(*batch, experts, m)`, `-1` in padding slots.
    - `inner_steps`, `coupling_residual` (`hcmoe.Coupled` only, else None): the conjugate
      gradient iterations of the last Gauss–Newton system the coupled solve met (at its
      final weights) and that system's relative residual `‖g - H d‖ / ‖g‖`. With
      `Coupled`, `num_steps`, `converged` and `result` are the one coupled solve's,
      repeated for every expert.
    """

    num_steps: Int[Array, "*batch experts"]
    residual_norm: Float[Array, "*batch experts"]
    converged: Bool[Array, "*batch experts"]
    result: Any
    condition_error: Float[Array, "*batch experts"] | None = None
    points: Int[Array, "*batch experts m"] | None = None
    inner_steps: Int[Array, "*batch experts"] | None = None
    coupling_residual: Float[Array, "*batch experts"] | None = None

    @property
    def num_failed(self) -> Array:
        """Number of experts that did not converge."""
        return jnp.sum(~self.converged, axis=-1)

    def messages(self) -> np.ndarray:
        """The readable message of every expert's `result` (`""` where it converged), as a
        numpy array of strings shaped like `converged`. Needs concrete values (not under
        `jit`)."""
        index = np.asarray(self.result._value)
        table = RESULTS._index_to_message  # pyright: ignore[reportAttributeAccessIssue]
        return np.vectorize(lambda i: table[int(i)], otypes=[object])(index)


class Solution(eqx.Module):
    """The constrained prediction.

    - `u`: the prediction on the grid, `u = u_p + T(B) w_k` on expert `k`'s block,
      shape `grid.shape`, in the basis dtype.
    - `weights`: the basis weights of each expert, shape `(K, n_basis)`.
    - `stats`: a `SolveStats` (None from PI-SC, `hcmoe.methods`' soft constraint, which
      solves nothing).

    Batched calls add a leading batch axis to every field.
    """

    u: Array
    weights: Array
    stats: SolveStats | None
