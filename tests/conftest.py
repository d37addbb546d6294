import importlib.util
import os
from pathlib import Path


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
import jaxtyping  # noqa: E402
import pytest  # noqa: E402


jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")

# Modules left out of `--typecheck`: `ProblemRows` doubles as its own `vmap` axis spec
# (`ProblemRows(names, None, 0, ...)` in `_adjoint._expert_axes`), which its annotations
# (`operators: tuple`, `index: Array`, ...) do not describe.
UNCHECKED = ("hcmoe._rows",)


def pytest_addoption(parser):
    parser.addoption(
        "--typecheck",
        action="store_true",
        help="check hcmoe's annotations at run time (jaxtyping + beartype on every function "
        "and module of hcmoe but those in tests/conftest.py's UNCHECKED)",
    )


def _checked_modules() -> list[str]:
    """hcmoe's modules and subpackages (a package's name covers its modules), found on disk:
    importing hcmoe to list them would leave it unchecked."""
    root = Path(importlib.util.find_spec("hcmoe").origin).parent
    found = [p.stem for p in root.glob("*.py")] + [
        p.parent.name for p in root.glob("*/__init__.py")
    ]
    names = {f"hcmoe.{name}" for name in found if name != "__init__"}
    return sorted(names - set(UNCHECKED))


def pytest_configure(config):
    if config.getoption("--typecheck"):
        import sys

        if "hcmoe" in sys.modules:
            raise RuntimeError("--typecheck: hcmoe was imported before the checks could hook it")
        jaxtyping.install_import_hook(_checked_modules(), "beartype.beartype")


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


@pytest.fixture(autouse=True)
def _runtime_type_checks(request):
    """Under `pytest --typecheck`, jaxtyping's run-time checks of hcmoe's annotations hold
    in every test but those marked `ill_typed`: they pass a wrong type on purpose to check
    hcmoe's own `ValueError`, which is what a user (who runs without the checks) sees, where
    the checks would raise a `TypeCheckError` first."""
    if request.node.get_closest_marker("ill_typed") is None:
        yield
        return
    previous = jaxtyping.config.jaxtyping_disable
    jaxtyping.config.update("jaxtyping_disable", True)
    try:
        yield
    finally:
        jaxtyping.config.update("jaxtyping_disable", previous)
