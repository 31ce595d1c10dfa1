"""One policy for the CPU thread pools a process uses: torch's, and the BLAS/OpenMP pools of numpy/scipy.

Why it matters: every pool sizes itself to the machine's cores unless told otherwise. Processes
that share the cores (two pipeline stages side by side, CPU DDP ranks, a neighbour's job) then run
more spinning threads than there are cores, and each threaded op waits for a scheduler tick (the
benchmarks saw 2-16x slowdowns on a loaded 2-core machine); told too little, a process that runs
alone leaves cores idle. A pipeline stage is given its share of the run's cores and caps every pool
at it; a stage that runs alone gets all of them.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from typing import Any

__all__ = ["limit_threads", "threads_per_device", "use_threads"]

# read by the OpenMP/BLAS runtimes and by the Rust pool of the fast tokenizers when they start:
# child processes (DDP workers, loader workers) and libraries loaded later inherit the cap
_THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "RAYON_NUM_THREADS")


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
    _cap_numba(n)
    torch.set_num_threads(n)
    threadpool_limits(limits=n)  # process-wide until changed: the returned handle is not needed


def _cap_numba(n: int) -> None:
    """numba (UMAP's engine) reads NUMBA_NUM_THREADS once; after its pool has started, a changed
    variable makes the next compilation fail, so a loaded numba is capped through its own call."""
    numba = sys.modules.get("numba")
    if numba is None:
        os.environ["NUMBA_NUM_THREADS"] = str(n)
    else:
        numba.set_num_threads(max(1, min(n, numba.config.NUMBA_NUM_THREADS)))


@contextlib.contextmanager
def threads_per_device(devices: Any) -> Iterator[None]:
    """Within the block, give each of ``devices`` training processes its share of this one's threads.

    CPU DDP on one machine: Lightning relaunches the command once per extra device, and every
    process would keep the whole thread budget (Lightning splits the cores only when
    ``OMP_NUM_THREADS`` is unset, and a pipeline stage has it set). Each process enters this block
    around its ``Trainer``; the relaunched ones inherit the share through the environment. On exit
    the threads and the environment are as before.

    Parameters
    ----------
    devices
        The Trainer's ``devices``: an int, or a list of device indices; anything else (``"auto"``)
        leaves the threads alone.
    """
    import torch
    from threadpoolctl import threadpool_limits

    k = len(devices) if isinstance(devices, (list, tuple)) else devices
    if not (isinstance(k, int) and not isinstance(k, bool) and k > 1):
        yield
        return
    before = torch.get_num_threads()
    share = max(1, before // k)
    saved = {name: os.environ.get(name) for name in _THREAD_ENV}
    try:
        os.environ.update({name: str(share) for name in _THREAD_ENV})
        torch.set_num_threads(share)
        with threadpool_limits(limits=share):
            yield
    finally:
        torch.set_num_threads(before)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


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
