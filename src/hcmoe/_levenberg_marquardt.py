r"""Levenberg–Marquardt with normal-equation steps: the default float64 constraint solver.

`optimistix.LevenbergMarquardt` solves every damped step

$$\begin{bmatrix} J \\ \sqrt{\lambda} I \end{bmatrix} \delta
= \begin{bmatrix} r \\ 0 \end{bmatrix}$$

by QR of the `(m + N) x N` matrix, and re-materialises `J` (`N` Jacobian-vector products) at
every step, accepted or rejected. In the constraint layer `m` (10^2 .. 10^5 rows) is much larger
than `N` (16 .. 64 weights), so this descent forms the `N x N` Gram matrix `J^T J` and `J^T r`
once per *accepted* iterate, and solves `(J^T J + λ I) δ = J^T r` by Cholesky at every step:
`O(m N^2)` per accepted iterate, `O(N^3)` per step. `hcmoe.solve` also hands it the Jacobian
built directly from the operator stacks (see `_solve.jacobian`), which avoids the `m x N x N`
products of Jacobian-vector products against the identity.

Normal equations square the condition number of `J`: fine in float64 (the ridge rows keep
`J^T J >= ridge^2 I`), not in float32, where `hcmoe.solve` keeps the QR solver. A step whose
Cholesky factorisation breaks down is not finite; the trust-region search rejects it and raises
the damping, as for any failed step.

The first step is damped with `λ = INITIAL_DAMPING = 1e-6` (optimistix starts at `λ = 1`), so it
is nearly a Gauss–Newton step. A rejected step costs one residual and one `N x N` Cholesky here
(no new Jacobian), so where the problem is far from linear the trust region raises `λ` (4x per
rejection) for little; where it is nearly linear, starting at 1 spends the iterations that
shrink `λ` by 3.5x per accepted step. Measured (benchmarks/README.md, section 8): 1.3–2.5x
fewer LM iterations and no more unconverged solves on every trained checkpoint tried
(diffusion–sorption, Navier–Stokes), predictions equal to the solver's tolerance; faster on 7
of 8 random-basis benchmarks (one small single-expert problem took 38 steps instead of 20).
"""

from __future__ import annotations

from collections.abc import Callable

import equinox as eqx
import jax.numpy as jnp
import jax.scipy as jsp
import optimistix as optx
from jaxtyping import Array, Float, Scalar


INITIAL_DAMPING = 1e-6


def check_initial_damping(value) -> None:
    """A clear error unless `value` is a positive number (LM's first damping)."""
    if not (isinstance(value, (int, float)) and value > 0):
        raise ValueError(f"initial_damping: expected a positive number; got {value!r}.")


def _silent(**kwargs) -> None:
    del kwargs


class _NormalState(eqx.Module):
    jac: Float[Array, "rows n"]
    residual: Float[Array, " rows"]
    gram: Float[Array, "n n"]
    gradient: Float[Array, " n"]


class NormalDampedNewtonDescent(optx.AbstractDescent):
    """The damped Newton (Levenberg–Marquardt) step from the normal equations.

    Solves `(J^T J + λ I) δ = J^T r` by Cholesky, then refines once with the residual of the
    damped least-squares problem, `δ += (J^T J + λ I)^{-1} (J^T (r - J δ) - λ δ)` (two
    products with `J`, no new factorisation): without it, the rounding error of `J^T J`
    (relative `eps cond(J)^2`) lands in the flattest directions and stalls LM on ill-conditioned
    experts.

    `jacobian(y)`, when given, returns the dense Jacobian of the residuals at `y` (shape
    `(rows, n)`); otherwise the descent materialises the solver's Jacobian operator. For
    one-dimensional `y` and residuals.
    """

    jacobian: Callable[[Array], Array] | None = None

    def init(self, y: Array, f_info_struct) -> _NormalState:
        rows = f_info_struct.residual.shape[0]
        zeros = jnp.zeros((rows, y.size), y.dtype)
        return _NormalState(zeros, zeros[:, 0], zeros[: y.size], jnp.zeros_like(y))

    def query(self, y: Array, f_info, state: _NormalState) -> _NormalState:
        del state
        if self.jacobian is None:
            jac = f_info.jac.as_matrix()
        else:
            jac = self.jacobian(y)
        residual = f_info.residual
        # `r @ J`, not `J.T @ r`: on CPU XLA copies a transposed J for the latter (3x slower).
        return _NormalState(jac, residual, jac.T @ jac, residual @ jac)

    def step(self, step_size: Scalar, state: _NormalState) -> tuple[Array, optx.RESULTS]:
        # λ = 1 / step_size, as in optimistix's damped Newton descent.
        tiny = step_size <= jnp.finfo(step_size.dtype).eps
        damping = jnp.where(tiny, jnp.finfo(step_size.dtype).max, 1 / jnp.where(tiny, 1, step_size))
        eye = jnp.eye(state.gram.shape[0], dtype=state.gram.dtype)
        factor = jsp.linalg.cho_factor(state.gram + damping * eye)
        diff = jsp.linalg.cho_solve(factor, state.gradient)
        correction = (state.residual - state.jac @ diff) @ state.jac - damping * diff
        diff = diff + jsp.linalg.cho_solve(factor, correction)
        return -diff, optx.RESULTS.successful


class TrustRegion(optx.ClassicalTrustRegion):
    """`optimistix.ClassicalTrustRegion` whose first step size is `1 / initial_damping`
    (optimistix's starts at 1, i.e. damping `λ = 1`, whatever the scale of the problem)."""

    initial_damping: float = INITIAL_DAMPING

    def __check_init__(self):
        check_initial_damping(self.initial_damping)

    def init(self, y, f_info_struct):
        state = super().init(y, f_info_struct)
        return eqx.tree_at(lambda s: s.step_size, state,
                           jnp.asarray(1.0 / self.initial_damping, state.step_size.dtype))


class LevenbergMarquardt(optx.AbstractGaussNewton):
    """`optimistix.LevenbergMarquardt` (same trust-region search and termination) with
    normal-equation steps, for tall problems in float64. Any optimistix least-squares solver
    can replace it in `hcmoe.solve(..., solver=...)`.

    **Arguments:**

    - `rtol`, `atol`: termination tolerances (Cauchy criterion on `y` and the residuals).
    - `norm`: the norm of the termination test (default `optimistix.max_norm`).
    - `jacobian`: optional `y -> dense Jacobian of the residuals`.
    - `search`: the trust region (default `TrustRegion(initial_damping)`, optimistix's
      classical one from `λ = initial_damping`: the step size `1 / λ` grows 3.5x after a step
      whose reduction is within 1% of the predicted one, and falls 4x after a rejected one).
      Faster growth halves the steps on random smooth bases but, measured on trained
      diffusion–sorption bases, left 2–4x more solves unconverged (benchmarks/README.md, section 7).
    - `initial_damping`: `λ` of the first step (default `INITIAL_DAMPING`, 1e-6; optimistix's
      is 1); only with the default `search`.
    """

    rtol: float
    atol: float
    norm: Callable
    descent: NormalDampedNewtonDescent
    search: optx.ClassicalTrustRegion
    verbose: Callable

    def __init__(
        self,
        rtol: float,
        atol: float,
        norm: Callable = optx.max_norm,
        jacobian: Callable[[Array], Array] | None = None,
        *,
        search: optx.ClassicalTrustRegion | None = None,
        initial_damping: float | None = None,
    ):
        if search is not None and initial_damping is not None:
            raise ValueError(
                f"initial_damping: {initial_damping!r} applies to the default search; got a "
                f"search ({type(search).__name__}) as well. Pass "
                "search=hcmoe.TrustRegion(initial_damping=...) instead."
            )
        self.rtol = rtol
        self.atol = atol
        self.norm = norm
        self.descent = NormalDampedNewtonDescent(jacobian)
        if search is None:
            search = TrustRegion(
                initial_damping=INITIAL_DAMPING if initial_damping is None else initial_damping
            )
        self.search = search
        self.verbose = _silent

    def with_jacobian(self, jacobian: Callable[[Array], Array]) -> LevenbergMarquardt:
        """The same solver, forming its steps from `jacobian(y)`."""
        return LevenbergMarquardt(self.rtol, self.atol, self.norm, jacobian, search=self.search)
