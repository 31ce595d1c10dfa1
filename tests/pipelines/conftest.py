"""Pipeline runs shared across test modules (session-scoped, so each configuration runs once)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


def sciscope_run(root: Path, domain: str, run: str, sets: list[str], extra: list[str] = (), timeout: int = 900) -> Path:
    """``sciscope run DOMAIN --quiet --run RUN --set ...`` in ``root``; the run folder.

    Parameters
    ----------
    root : Path
        Working directory of the command; the run goes to ``root/runs/DOMAIN/RUN``.
    domain, run : str
        Registered domain name and run name.
    sets : list of str
        ``key=value`` config overrides, each passed as ``--set``.
    extra : list of str
        More CLI arguments (``--snakemake-arg=...``).
    timeout : int
        Seconds before the run is killed (and the test fails).

    Returns
    -------
    Path
        The run folder, after the command succeeded; the command's output (stdout and stderr)
        is in ``root/RUN.out``.
    """
    args = [sys.executable, "-m", "sciscope.pipelines.cli", "run", domain, "--quiet", "--run", run]
    for s in sets:
        args += ["--set", s]
    proc = subprocess.run([*args, *extra], cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-6000:]
    # Kept for tests that read what Snakemake said (it logs to stderr, the CLI to stdout).
    (root / f"{run}.out").write_text(proc.stdout)
    return root / "runs" / domain / run


@pytest.fixture(scope="session")
def geospatial_tiny_run(tmp_path_factory) -> Path:
    """The geospatial pipeline run locally on the tests' tiny configuration (``TINY`` of
    test_geospatial_run.py), once per session: a module that needs this run takes this fixture
    instead of running it again."""
    from tests.pipelines.test_geospatial_run import TINY

    return sciscope_run(tmp_path_factory.mktemp("geo-local"), "geospatial", "tiny", TINY)
