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
shrink `λ` by 3.5x per accepted step. Measured (docs: how-to-choose.md#initial-damping): 1.3–2.5x
fewer LM iterations and no more unconverged solves on every trained checkpoint tried
(diffusion–sorption, Navier–Stokes), predictions equal to the solver's tolerance; faster on 7
of 8 random-basis benchmarks (one small single-expert problem took 38 steps instead of 20).

**When it stops.** optimistix's Cauchy test asks both the weights and the residuals to change by
less than `atol + rtol` times their size. The constraint layer's problems are ill-conditioned
by design: the ridge (`1e-4 w`) is the only curvature in the directions the PDE and condition
rows cannot see, `ridge^2 = 1e-8` against Gram eigenvalues up to `1e4`. There the weights walk
for tens of iterations while `½‖r‖²` changes in its seventh to tenth digit (the paper-size
benchmark: one expert ran 56 iterations when uncapped, its objective the same to 1e-9 after
the ninth).
So by default (`termination="objective"`) the solve also stops as soon as the objective has
converged: the last accepted step lowered `½‖r‖²` by at most `rtol ½‖r‖² + atol^2`, and the
Gauss–Newton model predicts no more than that from here (the decrement
`½ gᵀ (JᵀJ)⁻¹ g`, which weighs each direction by its curvature). This is MINPACK's `ftol`
test, with the prediction as well as the actual reduction. The prediction `u` keeps whatever
component the flat directions have at that point; measured on trained diffusion–sorption
bases (docs: how-to-choose.md#termination) this changed the test error by less than 0.02 points and
training over five seeds by nothing beyond the seeds' spread, with 3x fewer iterations.
`termination="cauchy"` keeps optimistix's test alone (the paper's release).

The measurements behind these defaults: docs, how-to-choose.md#termination and #initial-damping.
"""

from __future__ import annotations

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.scipy as jsp
import optimistix as optx
from jaxtyping import Array, Float, Scalar


INITIAL_DAMPING = 1e-6
TERMINATIONS = ("objective", "cauchy")


def check_initial_damping(value) -> None:
    """A clear error unless `value` is a positive number (LM's first damping)."""
    if not (isinstance(value, (int, float)) and value > 0):
        raise ValueError(f"initial_damping: expected a positive number; got {value!r}.")


def check_termination(value) -> None:
    """A clear error unless `value` names a termination test."""
    if value not in TERMINATIONS:
        raise ValueError(f"termination: expected one of {TERMINATIONS}; got {value!r}.")


def gauss_newton_decrement(gram: Array, gradient: Array) -> Array:
    """`½ gᵀ (JᵀJ)⁻¹ g`: the decrease of `½‖r‖²` that one undamped Gauss–Newton step would
    give in the linearised model (`gram = JᵀJ`, which includes the ridge rows' `ridge² I`,
    `gradient = Jᵀ r`). Unlike the Gauss–Newton *step*, which divides by the curvature of
    the flattest direction (as low as `ridge²`) and so amplifies rounding there by up to
    `1 / ridge²`, the decrement weights each direction by its curvature: directions that do
    not change the objective do not count."""
    factor = jsp.linalg.cho_factor(gram)
    return 0.5 * gradient @ jsp.linalg.cho_solve(factor, gradient)


def _silent(**kwargs) -> None:
    del kwargs


class _NormalState(eqx.Module):
    """The descent's view of the last accepted iterate: its Jacobian, residual, `JᵀJ`,
    `Jᵀ r`, objective `½‖r‖²`, the objective of the accepted iterate before it (`inf` before
    the second) and the Gauss–Newton decrement (`gauss_newton_decrement`)."""

    jac: Float[Array, "rows n"]
    residual: Float[Array, " rows"]
    gram: Float[Array, "n n"]
    gradient: Float[Array, " n"]
    objective: Scalar
    previous: Scalar
    decrement: Scalar


def objective_converged(state: _NormalState, rtol: float, atol: float) -> Array:
    """The objective test: the last accepted step lowered `½‖r‖²` by at most `rtol ½‖r‖² +
    atol²`, and one more undamped Gauss–Newton step is predicted to lower it by no more."""
    tol = rtol * state.objective + atol**2
    return (state.previous - state.objective <= tol) & (state.decrement <= tol)


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
        inf = jnp.array(jnp.inf, y.dtype)
        return _NormalState(zeros, zeros[:, 0], zeros[: y.size], jnp.zeros_like(y), inf, inf, inf)

    def query(self, y: Array, f_info, state: _NormalState) -> _NormalState:
        if self.jacobian is None:
            jac = f_info.jac.as_matrix()
        else:
            jac = self.jacobian(y)
        residual = f_info.residual
        gram = jac.T @ jac
        # `r @ J`, not `J.T @ r`: on CPU XLA copies a transposed J for the latter (3x slower).
        gradient = residual @ jac
        return _NormalState(
            jac,
            residual,
            gram,
            gradient,
            0.5 * residual @ residual,
            state.objective,
            gauss_newton_decrement(gram, gradient),
        )

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


class TrustRegion(optx.AbstractSearch):
    """`optimistix.ClassicalTrustRegion` whose first step size is `1 / initial_damping`
    (optimistix's starts at 1, i.e. damping `λ = 1`, whatever the scale of the problem), in
    the dtype of the weights (optimistix's is float64 whenever x64 is on, which breaks its QR
    descent on float32 weights).

    It wraps `search` (default `optimistix.ClassicalTrustRegion()`: the step size `1 / λ`
    grows 3.5x after a step whose reduction is within 1% of the predicted one, and falls 4x
    after a rejected one) and changes only its initial step size.
    """

    initial_damping: float = INITIAL_DAMPING
    search: optx.ClassicalTrustRegion = optx.ClassicalTrustRegion()

    def __check_init__(self):
        check_initial_damping(self.initial_damping)

    def init(self, y, f_info_struct):
        state = self.search.init(y, f_info_struct)
        return eqx.tree_at(
            lambda s: s.step_size,
            state,
            jnp.asarray(1.0 / self.initial_damping, jnp.result_type(y)),
        )

    def step(self, first_step, y, y_eval, f_info, f_eval_info, state):
        return self.search.step(first_step, y, y_eval, f_info, f_eval_info, state)


class _NormalGaussNewton(optx.AbstractGaussNewton):
    """optimistix's Gauss–Newton loop with the normal-equation descent and a trust region:
    the solver `LevenbergMarquardt` wraps (its fields only; every method is optimistix's)."""

    rtol: float
    atol: float
    norm: Callable
    descent: NormalDampedNewtonDescent
    search: optx.AbstractSearch
    verbose: Callable


class LevenbergMarquardt(optx.AbstractLeastSquaresSolver):
    """`optimistix.LevenbergMarquardt` (same trust-region search) with normal-equation steps,
    for tall problems in float64, which also stops once the objective has converged (see the
    module docstring). The default solver of `hcmoe.solve` in float64; any optimistix
    least-squares solver can replace it (`hcmoe.solve(..., solver=...)`).

    **Arguments:**

    - `rtol`, `atol`: termination tolerances, of both tests below (the paper: 1e-4).
    - `norm`: the norm of optimistix's Cauchy test (default `optimistix.max_norm`).
    - `jacobian`: optional `y -> dense Jacobian of the residuals` (`hcmoe.solve` gives each
      expert's, built from its operator stacks).
    - `search`: the trust region (default `TrustRegion(initial_damping)`, optimistix's
      classical one from `λ = initial_damping`). Faster growth of the step size halves the
      steps on random smooth bases but, measured on trained diffusion–sorption bases, left
      2–4x more solves unconverged (docs: how-to-choose.md#initial-damping).
    - `initial_damping`: `λ` of the first step (default `INITIAL_DAMPING`, 1e-6, nearly a
      Gauss–Newton step; optimistix's is 1); only with the default `search`. Rejected steps
      are cheap here (a residual and an `N x N` Cholesky, no new Jacobian).
    - `termination`: `"objective"` (default): stop at optimistix's Cauchy test (weights and
      residuals changed by less than `atol + rtol` times their size) or as soon as the
      objective has converged (`objective_converged`: the last accepted step and the
      Gauss–Newton decrement both within `rtol ½‖r‖² + atol²`), whichever comes first.
      `"cauchy"`: optimistix's test alone, as the paper's release; ill-conditioned problems
      then run until their weights stop moving in directions the objective cannot see.

    It wraps optimistix's Gauss–Newton loop (`init`, `step`, `postprocess` are optimistix's)
    and adds the objective test to its `terminate`.
    """

    solver: _NormalGaussNewton
    termination: str = eqx.field(static=True)

    def __init__(
        self,
        rtol: float = 1e-4,
        atol: float = 1e-4,
        norm: Callable = optx.max_norm,
        jacobian: Callable[[Array], Array] | None = None,
        *,
        search: optx.AbstractSearch | None = None,
        initial_damping: float | None = None,
        termination: str = "objective",
    ):
        if search is not None and initial_damping is not None:
            raise ValueError(
                f"initial_damping: {initial_damping!r} applies to the default search; got a "
                f"search ({type(search).__name__}) as well. Pass "
                "search=hcmoe.TrustRegion(initial_damping=...) instead."
            )
        for name, value in (("rtol", rtol), ("atol", atol)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"{name}: expected a non-negative number; got {value!r}.")
        check_termination(termination)
        if search is None:
            search = TrustRegion(
                initial_damping=INITIAL_DAMPING if initial_damping is None else initial_damping
            )
        self.solver = _NormalGaussNewton(
            rtol, atol, norm, NormalDampedNewtonDescent(jacobian), search, _silent
        )
        self.termination = termination

    @property
    def rtol(self):  # pyright: ignore[reportIncompatibleVariableOverride]
        return self.solver.rtol

    @property
    def atol(self):  # pyright: ignore[reportIncompatibleVariableOverride]
        return self.solver.atol

    @property
    def norm(self):  # pyright: ignore[reportIncompatibleVariableOverride]
        return self.solver.norm

    @property
    def search(self) -> optx.AbstractSearch:
        return self.solver.search

    def init(self, fn, y, args, options, f_struct, aux_struct, tags):
        return self.solver.init(fn, y, args, options, f_struct, aux_struct, tags)

    def step(self, fn, y, args, options, state, tags):
        return self.solver.step(fn, y, args, options, state, tags)

    def terminate(self, fn, y, args, options, state, tags):
        cauchy, result = self.solver.terminate(fn, y, args, options, state, tags)
        if self.termination == "cauchy":
            return cauchy, result
        return cauchy | objective_converged(state.descent_state, self.rtol, self.atol), result

    def postprocess(self, fn, y, aux, args, options, state, tags, result):
        return self.solver.postprocess(fn, y, aux, args, options, state, tags, result)

    def with_jacobian(self, jacobian: Callable[[Array], Array]) -> LevenbergMarquardt:
        """The same solver, forming its steps from `jacobian(y)`."""
        return LevenbergMarquardt(
            self.rtol,
            self.atol,
            self.norm,
            jacobian,
            search=self.search,
            termination=self.termination,
        )

    def stationary(self, state) -> Array:
        """Whether the weights at the end of a solve (`state`: the solution's `state`) are
        stationary: the Gauss–Newton decrement there is within `rtol ½‖r‖² + atol²`."""
        descent = jax.lax.stop_gradient(state.descent_state)
        return descent.decrement <= self.rtol * descent.objective + self.atol**2


class WarmStart(optx.AbstractLeastSquaresSolver):
    """Any least-squares `solver`, started from one undamped Gauss–Newton step off `init`
    (kept only where it lowers the residual) instead of `init` itself.

    Meant to reach the same minimiser in fewer iterations when the learned weights are far
    from `init`; the step is computed without gradient (at a converged minimiser nothing
    depends on the start, nor, by the implicit function theorem, does its gradient).
    **Caution:** Levenberg–Marquardt then starts with its usual damping, and where the
    objective is very flat (ill-conditioned stacks) that first damped step can be small
    enough to pass the termination test far from the minimiser: measured on a random
    diffusion–sorption basis, 2 steps, `u` 0.04-0.08 off a tight solve, reported as
    converged. Compare against a cold start before relying on it.

    `hcmoe.solve(..., solver=hcmoe.WarmStart(hcmoe.LevenbergMarquardt()))`. Used as an
    optimistix solver outside `hcmoe.solve` it is `solver` unchanged (the start is
    `hcmoe.solve`'s).
    """

    solver: optx.AbstractLeastSquaresSolver

    def __init__(self, solver: optx.AbstractLeastSquaresSolver):
        self.solver = solver

    @property
    def rtol(self):  # pyright: ignore[reportIncompatibleVariableOverride]
        return self.solver.rtol

    @property
    def atol(self):  # pyright: ignore[reportIncompatibleVariableOverride]
        return self.solver.atol

    @property
    def norm(self):  # pyright: ignore[reportIncompatibleVariableOverride]
        return self.solver.norm

    def init(self, fn, y, args, options, f_struct, aux_struct, tags):
        return self.solver.init(fn, y, args, options, f_struct, aux_struct, tags)

    def step(self, fn, y, args, options, state, tags):
        return self.solver.step(fn, y, args, options, state, tags)

    def terminate(self, fn, y, args, options, state, tags):
        return self.solver.terminate(fn, y, args, options, state, tags)

    def postprocess(self, fn, y, aux, args, options, state, tags, result):
        return self.solver.postprocess(fn, y, aux, args, options, state, tags, result)
