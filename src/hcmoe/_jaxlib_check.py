"""A warning for the jaxlib releases whose CPU linear algebra can hang.

jaxlib 0.10.0 added a parallel path to its CPU LAPACK kernels (Cholesky, triangular solve, LU,
QR, ...): a batch of matrices whose total cost passes a threshold is split into chunks that are
scheduled on XLA's intra-op thread pool, and the kernel then blocks until they are done. The
kernel itself runs on a thread of that pool. When as many such kernels run at once as the pool
has threads (two on a two-core machine), every thread waits for chunks that no thread is left
to run, and the program stops without an error. jaxlib 0.11.1 compiles that path out of its
open-source builds; 0.9.2 does not have it.

The constraint solves are batched small linear systems (Levenberg–Marquardt's Cholesky steps,
the adjoint's solves), vmapped over experts and samples, so they reach that threshold: measured
on a 2-core CPU with jaxlib 0.10.2, a jitted, vmapped joint PI-HC-MoE solve (32 unknowns) over
64 samples hung every time, and ran in 14 s with jaxlib 0.9.2 (`tests/test_batched_solves.py`).
`--xla_cpu_multi_thread_eigen=false` did not prevent it. hcmoe's requirements exclude those
releases; this warning covers an environment that has one anyway.
"""

from __future__ import annotations

import functools
import importlib.metadata
import re
import warnings


# First release with the blocking parallel batch path, and the first without it again.
FIRST_AFFECTED = (0, 10, 0)
FIXED = (0, 11, 1)


class JaxlibHangWarning(RuntimeWarning):
    """The installed jaxlib can hang in batched linear algebra on CPU (`hcmoe._jaxlib_check`)."""


def _release(version: str) -> tuple[int, ...]:
    numbers = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", version)
    if numbers is None:
        return ()
    return tuple(int(part or 0) for part in numbers.groups())


def hang_message(jaxlib_version: str, backend: str) -> str | None:
    """Why `jaxlib_version` on `backend` can hang, or None when it cannot."""
    release = _release(jaxlib_version)
    if backend != "cpu" or not release or not FIRST_AFFECTED <= release < FIXED:
        return None
    return (
        f"jaxlib {jaxlib_version} can hang on CPU, without an error, when several batched "
        "linear solves run at once (its LAPACK kernels wait for work queued on the thread pool "
        "they run on; fixed in jaxlib 0.11.1). hcmoe's constraint solves are such batches: a "
        "vmapped solve over 64 samples hung with jaxlib 0.10.2. Install jax and jaxlib 0.9.2 "
        "(pip install 'jax==0.9.2' 'jaxlib==0.9.2') or 0.11.1 and newer."
    )


@functools.cache
def warn_if_hang_prone() -> None:
    """Warn (once per process) if the installed jaxlib can hang on the default backend."""
    import jax

    try:
        version = importlib.metadata.version("jaxlib")
    except importlib.metadata.PackageNotFoundError:
        return
    message = hang_message(version, jax.default_backend())
    if message is not None:
        warnings.warn(message, JaxlibHangWarning, stacklevel=3)
