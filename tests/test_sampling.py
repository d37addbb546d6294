"""The PDE points drawn per expert: the `count` lowest of i.i.d. scores (`_lowest`), by
bisection on their bits instead of a sort; the set must be the one `top_k` picks, with the
same tie rule (equal scores: the lower positions first)."""

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

from hcmoe._rows import _lowest


def _reference(scores, count):
    """`top_k` of the negated scores (ties: lower positions first), listed in position order."""
    _, position = jax.lax.top_k(-scores, count)
    return np.sort(np.asarray(position), axis=1)


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
@pytest.mark.parametrize("num, n, count", [(1, 5000, 700), (4, 1200, 1199), (3, 257, 1)])
def test_lowest_is_top_k(getkey, dtype, num, n, count):
    scores = jr.uniform(getkey(), (num, n), dtype)
    np.testing.assert_array_equal(
        np.asarray(jax.jit(_lowest, static_argnums=1)(scores, count)), _reference(scores, count)
    )


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
def test_lowest_breaks_ties_by_position(getkey, dtype):
    """Padding (score 2, more slots than needed) and equal draws at the threshold: the lowest
    positions among the ties, in every row independently."""
    num, n = 4, 600
    scores = jr.uniform(getkey(), (num, n), dtype)
    scores = scores.at[0, 500:].set(2.0)  # row 0: 500 valid rows, 560 asked: 60 padding slots
    levels = jnp.round(jr.uniform(getkey(), (n,), dtype) * 8) / 8  # row 1: 9 distinct values
    scores = scores.at[1].set(levels)
    scores = scores.at[2, ::3].set(scores[2, 7])  # row 2: a third of it equal
    for count in (560, 301, 37):
        got = np.asarray(jax.jit(_lowest, static_argnums=1)(scores, count))
        np.testing.assert_array_equal(got, _reference(scores, count))
        assert np.all(np.diff(got, axis=1) > 0)  # distinct, in position order
    assert set(np.asarray(_lowest(scores, 560))[0, :500].tolist()) == set(range(500))


def test_lowest_float64_ties_in_the_high_word(getkey):
    """float64 scores that share their high 32 bits (and the threshold's), told apart by
    their low words only; and scores equal in all 64 bits."""
    num, n = 2, 400
    bits = jr.bits(getkey(), (num, n), jnp.uint32).astype(jnp.uint64)
    high = jnp.uint64(0x3FE00000) << 32  # one high word for every score: [0.5, 0.5 + 2^-21)
    scores = jax.lax.bitcast_convert_type(high | bits, jnp.float64)
    scores = scores.at[1, 100:200].set(scores[1, 0])  # a hundred equal to one score
    scores = scores.at[1, 300].set(
        jax.lax.bitcast_convert_type(high | jnp.uint64(2**32 - 1), jnp.float64)
    )
    for count in (1, 150, 399):
        np.testing.assert_array_equal(np.asarray(_lowest(scores, count)), _reference(scores, count))
