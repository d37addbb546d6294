import os


# The suite compiles a few thousand small XLA programs and runs each a few times: LLVM's
# optimisation of the generated CPU code is a quarter to a third of the suite's CPU time and
# buys nothing at these sizes (docs/notes/2026-12-07-test-suite-time.md). XLA's own passes
# (fusion, SPMD partitioning, algebraic simplification) still run. Set before JAX starts its
# backend; subprocesses of the tests inherit it. HCMOE_TEST_XLA_OPT=1 keeps XLA's default.
if os.environ.get("HCMOE_TEST_XLA_OPT") != "1" and "optimization_level" not in os.environ.get(
    "XLA_FLAGS", ""
):
    flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = f"{flags} --xla_backend_optimization_level=0".strip()

import jax  # noqa: E402
import jax.random as jr  # noqa: E402
import pytest  # noqa: E402


jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def getkey():
    """Return a function that hands out fresh, deterministic PRNG keys."""
    keys = iter(jr.split(jr.key(5678), 10_000))
    return lambda: next(keys)


@pytest.fixture
def default_sigint():
    """Python's own Ctrl-C handler for the test, whatever the test process inherited: a job
    started in the background of a non-interactive shell (`cmd &`) ignores SIGINT, and then no
    Ctrl-C reaches Python at all."""
    import signal

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)
