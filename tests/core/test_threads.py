"""The thread-pool policy: a stage's share of the cores caps torch's and the BLAS pools."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from sciscope.core.threads import limit_threads, threads_per_device, use_threads


def test_limit_threads_caps_both_pools_and_restores() -> None:
    from threadpoolctl import threadpool_info

    before = torch.get_num_threads()
    with limit_threads(1):
        assert torch.get_num_threads() == 1
        assert all(pool["num_threads"] == 1 for pool in threadpool_info())
    assert torch.get_num_threads() == before


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs 2 cores to tell a cap of 1 from the default")
def test_use_threads_is_process_wide_and_reaches_children() -> None:
    # process-wide, so in a child interpreter that starts with 2 threads everywhere; the
    # grandchild's torch must come up capped through the environment
    script = textwrap.dedent(
        """
        import subprocess, sys
        import numpy, torch
        from threadpoolctl import threadpool_info
        from sciscope.core.threads import use_threads
        assert torch.get_num_threads() == 2, torch.get_num_threads()
        use_threads(1)
        child = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
                               capture_output=True, text=True, check=True).stdout.strip()
        print(torch.get_num_threads(), max(p["num_threads"] for p in threadpool_info()), child)
        """
    )
    env = {**os.environ, **{k: "2" for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["1", "1", "1"]


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "2"])
def test_bad_thread_counts_are_named(bad) -> None:  # noqa: ANN001
    with pytest.raises(ValueError, match=f"positive integer, got {bad!r}"):
        use_threads(bad)
    with pytest.raises(ValueError, match="positive integer"):
        with limit_threads(bad):
            pass


def test_threads_per_device_splits_and_restores(monkeypatch) -> None:  # noqa: ANN001
    import os as _os

    torch.set_num_threads(2)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    try:
        with threads_per_device(2):  # two CPU DDP processes share the two threads
            assert torch.get_num_threads() == 1 and _os.environ["OMP_NUM_THREADS"] == "1"
        assert torch.get_num_threads() == 2 and "OMP_NUM_THREADS" not in _os.environ
        with threads_per_device("auto"), threads_per_device(1), threads_per_device([0]):
            assert torch.get_num_threads() == 2  # one process, or a count Lightning decides: untouched
        with threads_per_device([0, 1, 2, 3]):
            assert torch.get_num_threads() == 1  # never below one
    finally:
        torch.set_num_threads(2)


def test_use_threads_after_numba_started_its_pool() -> None:
    """numba refuses a changed NUMBA_NUM_THREADS once its pool runs; use_threads must not change it then."""
    pytest.importorskip("numba")
    script = textwrap.dedent(
        """
        import numba, numpy as np
        @numba.njit(parallel=True)
        def total(x):
            s = 0.0
            for i in numba.prange(x.size):
                s += x[i]
            return s
        total(np.ones(10))  # starts the pool
        from sciscope.core.threads import use_threads
        use_threads(1)
        @numba.njit
        def twice(x):
            return 2 * x
        print(twice(2), numba.get_num_threads())
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["4", "1"]
