"""A one-machine stand-in for a batch scheduler, for Snakemake's ``cluster-generic`` executor.

``submit`` plays ``sbatch``; ``status`` plays ``squeue``/``sacct``::

    sciscope run geospatial --snakemake-arg=--executor=cluster-generic --snakemake-arg=--jobs=2 \\
        --snakemake-arg=--cluster-generic-submit-cmd="python $PWD/tests/pipelines/local_cluster.py submit" \\
        --snakemake-arg=--cluster-generic-status-cmd="python $PWD/tests/pipelines/local_cluster.py status"

``submit [--log-dir DIR] JOBSCRIPT`` (Snakemake appends the jobscript path as the last argument)
starts the jobscript as its own detached process, as a scheduler would on a node: a new session
(so it outlives this command and Snakemake's signals to its own process group), stdin closed,
stdout and stderr in ``DIR/<jobid>.log``. When the jobscript ends its exit status goes to
``DIR/<jobid>.exit``. It prints the job id (the process id) and returns at once.

``status [--log-dir DIR] JOBID`` prints ``running``, ``success`` or ``failed``: the exit file when
there is one, else ``running`` while the process lives, else ``failed`` (it died without writing
its status: killed). ``DIR`` defaults to ``logs/cluster`` under the working directory, which is the
run folder when Snakemake runs with ``--directory`` (as ``sciscope run`` does); both commands must
be given the same ``DIR``.

This is test scaffolding, not a scheduler: no queue, no resource limits, no cancel command.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

DEFAULT_LOG_DIR = "logs/cluster"


def submit(jobscript: str, log_dir: str = DEFAULT_LOG_DIR) -> str:
    """Start ``jobscript`` detached; return its job id (the process id of the job's shell).

    Parameters
    ----------
    jobscript : str
        The shell script Snakemake wrote for one job.
    log_dir : str
        Folder for the job's log (stdout and stderr) and exit-status file.

    Returns
    -------
    str
        The job id, which ``status`` takes.
    """
    out = Path(log_dir)
    out.mkdir(parents=True, exist_ok=True)
    # The job's shell writes its own status: `$$` is its pid, i.e. the job id printed below. The
    # file appears whole (written beside, then renamed) so that `status` never reads it half-written.
    wrapper = (f"sh {shlex.quote(str(Path(jobscript).resolve()))}; rc=$?; "
               f'echo $rc > {shlex.quote(str(out.resolve()))}/$$.exit.tmp && '
               f'mv {shlex.quote(str(out.resolve()))}/$$.exit.tmp {shlex.quote(str(out.resolve()))}/$$.exit')
    # The log is named after the job id, which exists only once the process does: open it under a
    # temporary name and rename it (the open descriptor follows the file).
    fd, pending = tempfile.mkstemp(prefix=".pending-", suffix=".log", dir=out)
    try:
        proc = subprocess.Popen(["sh", "-c", wrapper], stdin=subprocess.DEVNULL, stdout=fd, stderr=subprocess.STDOUT,
                                start_new_session=True, close_fds=True)
    finally:
        os.close(fd)
    os.replace(pending, out / f"{proc.pid}.log")
    return str(proc.pid)


def _alive(pid: int) -> bool:
    """The process exists and is not a zombie (an unreaped child of a container's init still answers kill 0)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        # /proc/PID/stat: "pid (comm) STATE ...": the state follows the last ')'
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True  # no /proc (macOS): kill 0 answered, so it runs


def status(jobid: str, log_dir: str = DEFAULT_LOG_DIR) -> str:
    """``running``, ``success`` or ``failed`` for a job that ``submit`` started.

    Parameters
    ----------
    jobid : str
        What ``submit`` printed.
    log_dir : str
        The ``log_dir`` that ``submit`` was given.

    Returns
    -------
    str
        One of ``running``, ``success``, ``failed``.
    """
    exit_file = Path(log_dir) / f"{jobid}.exit"
    if exit_file.is_file():
        return "success" if exit_file.read_text().strip() == "0" else "failed"
    if _alive(int(jobid)):
        return "running"
    # It may have written its status between the two looks above.
    if exit_file.is_file():
        return "success" if exit_file.read_text().strip() == "0" else "failed"
    return "failed"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, arg in (("submit", "jobscript"), ("status", "jobid")):
        p = sub.add_parser(name)
        p.add_argument("--log-dir", default=DEFAULT_LOG_DIR)
        p.add_argument(arg)
    args = parser.parse_args(argv)
    if args.command == "submit":
        print(submit(args.jobscript, args.log_dir), flush=True)
    else:
        print(status(args.jobid, args.log_dir), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
