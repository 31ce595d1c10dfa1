"""One policy for the CPU thread pools a process uses: torch's, and the BLAS/OpenMP pools of numpy/scipy.

Why it matters: every pool sizes itself to the machine's cores. Two pipeline stages running side by
side (probes and the SAE, say) then run 2 x cores spinning threads on the cores, and on a small
machine each threaded op waits for a scheduler tick; the benchmarks saw 2-16x slowdowns that way.
A stage that knows its share of the cores caps every pool at it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

__all__ = ["limit_threads", "use_threads"]

# read by OpenMP/BLAS runtimes (and numba) when they start: child processes (DDP workers, loader
# workers) and libraries imported later inherit the cap through them
_THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS")


def _check(n: int) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"threads must be a positive integer, got {n!r}")
    return n


def use_threads(n: int) -> None:
    """Cap this process's thread pools at ``n`` threads from now on (a stage process calls it first).

    Sets torch's intra-op threads, the BLAS/OpenMP pools already loaded (through threadpoolctl),
    and the environment variables that later-loaded runtimes and child processes read.

    Parameters
    ----------
    n
        Threads per pool, >= 1.
    """
    import torch
    from threadpoolctl import threadpool_limits

    _check(n)
    for name in _THREAD_ENV:
        os.environ[name] = str(n)
    torch.set_num_threads(n)
    threadpool_limits(limits=n)  # process-wide until changed: the returned handle is not needed


@contextlib.contextmanager
def limit_threads(n: int) -> Iterator[None]:
    """Run a block with torch's and the BLAS pools capped at ``n`` threads; restore them after.

    Parameters
    ----------
    n
        Threads per pool inside the block, >= 1.

    Examples
    --------
    >>> with limit_threads(1):  # many small solves: one thread avoids pool hand-offs
    ...     pass
    """
    import torch
    from threadpoolctl import threadpool_limits

    _check(n)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(n)
        with threadpool_limits(limits=n):
            yield
    finally:
        torch.set_num_threads(before)
