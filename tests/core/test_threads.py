"""The thread-pool policy: a stage's share of the cores caps torch's and the BLAS pools."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from sciscope.core.threads import limit_threads, use_threads


def test_limit_threads_caps_both_pools_and_restores() -> None:
    from threadpoolctl import threadpool_info

    before = torch.get_num_threads()
    with limit_threads(1):
        assert torch.get_num_threads() == 1
        assert all(pool["num_threads"] == 1 for pool in threadpool_info())
    assert torch.get_num_threads() == before


def test_use_threads_is_process_wide_and_reaches_children() -> None:
    # process-wide, so in a child interpreter; the grandchild sees the cap through the environment
    script = textwrap.dedent(
        """
        import os, subprocess, sys
        import numpy, torch
        from threadpoolctl import threadpool_info
        from sciscope.core.threads import use_threads
        use_threads(1)
        child = subprocess.run([sys.executable, "-c", "import os; print(os.environ['OMP_NUM_THREADS'])"],
                               capture_output=True, text=True, check=True).stdout.strip()
        print(torch.get_num_threads(), max(p["num_threads"] for p in threadpool_info()), child)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["1", "1", "1"]


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "2"])
def test_bad_thread_counts_are_named(bad) -> None:  # noqa: ANN001
    with pytest.raises(ValueError, match=f"positive integer, got {bad!r}"):
        use_threads(bad)
    with pytest.raises(ValueError, match="positive integer"):
        with limit_threads(bad):
            pass
