"""One ``sciscope run`` per run folder at a time.

Two runs on one folder would both run every stage, and the second would rewrite ``run.json`` under
the first, which then reports success over outputs built with the other config. The lock is an
advisory ``flock`` on ``<run>/.sciscope.lock``: the kernel releases it when its holder ends, however
it ends, so a killed run never blocks the next one. The file keeps the holder's record (pid, host,
command, start) while it runs and is emptied on a clean exit; a record found by the next run is the
trace of a holder that was killed.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sciscope.core.errors import SciscopeError

LOCK_FILE = ".sciscope.lock"


class RunLockedError(SciscopeError):
    """Another process holds the run folder's lock."""


def describe_holder(holder: dict[str, Any]) -> str:
    """``pid 123 on host (sciscope run ..., started 2026-12-02T00:40:00)``."""
    if not holder:
        return "another process"
    return (f"pid {holder.get('pid')} on {holder.get('host', '?')} "
            f"({holder.get('command', '?')}, started {holder.get('started', '?')})")


def _read_record(fd: int) -> dict[str, Any]:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 1 << 16).decode("utf-8", "replace").strip()
    try:
        record = json.loads(text) if text else {}
    except json.JSONDecodeError:
        return {"command": f"an unreadable lock record {text[:60]!r}"}
    return record if isinstance(record, dict) else {}


def _write_record(fd: int, record: dict[str, Any]) -> None:
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, json.dumps(record).encode())
    os.fsync(fd)


@contextlib.contextmanager
def run_lock(run_dir: str | os.PathLike[str], *, command: str) -> Iterator[dict[str, Any]]:
    """Hold ``run_dir``'s lock for the ``with`` block.

    Parameters
    ----------
    run_dir
        An existing run folder.
    command
        What the holder does (shown to a second run that is refused).

    Yields
    ------
    dict
        The record of a previous holder that was killed before it released the lock (empty when the
        last run ended cleanly or there was none), so the caller can say so.

    Raises
    ------
    RunLockedError
        A live process holds the lock; the message names it.
    """
    path = Path(run_dir) / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunLockedError(f"run folder {run_dir} is in use by {describe_holder(_read_record(fd))}; "
                                 "wait for that run to end or stop it") from None
        stale = _read_record(fd)
        _write_record(fd, {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
                           "started": time.strftime("%Y-%m-%dT%H:%M:%S")})
        try:
            yield stale
        finally:
            # emptied, not removed: removing would let a third process lock a file no one else sees
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
