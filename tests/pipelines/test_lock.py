"""One run per run folder: a live holder refuses a second run, a killed holder leaves a lock that is taken over."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from sciscope.pipelines.lock import LOCK_FILE, RunLockedError, run_lock

HOLD = """
import sys, time
from sciscope.pipelines.lock import run_lock
with run_lock(sys.argv[1], command="sciscope run toy (holder)"):
    print("locked", flush=True)
    time.sleep(120)
"""


@pytest.fixture
def holder(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    yield proc
    proc.kill()
    proc.wait()


def test_a_live_holder_refuses_a_second_run_and_is_named(tmp_path, holder):
    with pytest.raises(RunLockedError, match=rf"pid {holder.pid} .*holder"):
        with run_lock(tmp_path, command="second"):
            pass


def test_a_killed_holder_is_detected_and_its_lock_taken_over(tmp_path, holder):
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    with run_lock(tmp_path, command="after the kill") as stale:
        assert stale["pid"] == holder.pid and "holder" in stale["command"]
    # a clean exit leaves no record: the next run finds nothing stale
    with run_lock(tmp_path, command="next") as stale:
        assert stale == {}
    assert (tmp_path / LOCK_FILE).read_text() == ""


def test_the_lock_is_released_when_the_block_raises(tmp_path):
    with pytest.raises(ZeroDivisionError):
        with run_lock(tmp_path, command="fails"):
            1 / 0
    t0 = time.time()
    with run_lock(tmp_path, command="again") as stale:
        assert stale == {} and time.time() - t0 < 5
