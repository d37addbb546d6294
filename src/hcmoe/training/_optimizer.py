"""The paper's optimiser and learning-rate schedule."""

from __future__ import annotations

import equinox as eqx
import optax


def paper_schedule(
    learning_rate: float = 1e-3,
    *,
    decay_every: int = 800,
    decay_rate: float = 0.5,
    min_learning_rate: float = 1e-4,
) -> optax.Schedule:
    """The paper's step schedule: `learning_rate · decay_rate^⌊step / decay_every⌋`, floored.

    With the defaults: 1e-3, halved every 800 steps, never below 1e-4.
    """
    return optax.exponential_decay(
        learning_rate,
        transition_steps=decay_every,
        decay_rate=decay_rate,
        staircase=True,
        end_value=min_learning_rate,
    )


def paper_optimizer(
    learning_rate: float = 1e-3,
    *,
    decay_every: int = 800,
    decay_rate: float = 0.5,
    min_learning_rate: float = 1e-4,
    clip_norm: float = 1.0,
) -> optax.GradientTransformation:
    """The paper's optimiser: gradients clipped to global norm `clip_norm`, then Adam with
    `paper_schedule`. The learning rate is an injected hyperparameter, so `fit` logs it."""
    schedule = paper_schedule(
        learning_rate,
        decay_every=decay_every,
        decay_rate=decay_rate,
        min_learning_rate=min_learning_rate,
    )
    return optax.chain(
        optax.clip_by_global_norm(clip_norm),
        optax.inject_hyperparams(optax.adam)(learning_rate=schedule),
    )


def current_learning_rate(opt_state) -> float | None:
    """The learning rate held by an `optax.inject_hyperparams` state, or `None` if there is
    no unique one."""
    try:
        value = optax.tree_utils.tree_get(
            opt_state, "learning_rate", filtering=lambda _, value: eqx.is_array(value)
        )
    except KeyError:
        return None
    return None if value is None else float(value)
