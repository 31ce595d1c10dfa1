"""The cluster path, exercised: a domain pipeline through Snakemake's executor plugin, as on SLURM.

The README's cluster recipe is ``sciscope run DOMAIN --snakemake-arg=--executor=slurm ...``. SLURM
itself cannot run here, so the same path runs with the ``cluster-generic`` executor and a local
stand-in for ``sbatch``/``squeue`` (tests/pipelines/local_cluster.py): every stage is written to a
jobscript, submitted, started as its own detached process (new session, output to a log in the
run folder) that runs Snakemake again for that one job, and polled until its exit status says
success. Only the scheduler differs from a SLURM run.
"""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

import pytest

from sciscope.pipelines.layout import STAGES, read_headlines
from sciscope.pipelines.report import headline_values
from tests.pipelines.conftest import sciscope_run
from tests.pipelines.test_geospatial_run import TINY

pytestmark = pytest.mark.slow

LOCAL_CLUSTER = Path(__file__).with_name("local_cluster.py")


def cluster_args(python: str = sys.executable) -> list[str]:
    """The ``--snakemake-arg`` options that send every job through the cluster-generic executor
    (the README's command; a SLURM user swaps these for ``--executor=slurm``).

    ``--jobs``: a remote executor needs a job limit (2: probes and sae may run side by side, as
    they do locally). ``--seconds-between-status-checks=1``: Snakemake's default of 10 s between
    polls would add up to ~10 s of idle time to each of the eight stages, which run mostly one
    after another. The rest are Snakemake's defaults, which fit one machine's disk as a cluster's
    shared file system: the run folder (``--directory``, passed by the CLI) is the working
    directory of Snakemake, of the submit and status commands (so the job logs go to the default
    ``logs/cluster`` of the run) and of every job; jobs inherit ``--cores`` (so each stage gets the
    same threads as in a local run), ``--nolock`` and the ``--config`` pointing at run.json; a
    job's outputs are visible at once (the default ``--latency-wait`` of 5 s is never waited out).
    """
    script = f"{shlex.quote(python)} {shlex.quote(str(LOCAL_CLUSTER))}"
    return ["--snakemake-arg=--executor=cluster-generic", "--snakemake-arg=--jobs=2",
            f"--snakemake-arg=--cluster-generic-submit-cmd={script} submit",
            f"--snakemake-arg=--cluster-generic-status-cmd={script} status",
            "--snakemake-arg=--seconds-between-status-checks=1"]


def test_geospatial_through_the_cluster_executor_matches_the_local_run(tmp_path: Path, geospatial_tiny_run: Path):
    """The geospatial pipeline on the tests' tiny overrides of the quick profile (``TINY`` of
    test_geospatial_run.py: 600 places, 150 SAE steps, ...), run once through the cluster-generic
    executor, writes the same headline numbers as the same configuration run locally.

    Equal to the last bit, not to a tolerance: each job runs the same stage command with the same
    config and the same thread count (the jobs inherit ``--cores``), every stage is seeded, and the
    stages read only files, so where a stage's process starts cannot change a number. A difference
    here means the executor path changed what a stage computes (a lost ``--config`` key, another
    thread count, a stage that ran twice or read a half-written input).
    """
    run_dir = sciscope_run(tmp_path, "geospatial", "tiny", TINY, cluster_args())
    log_dir = run_dir / "logs" / "cluster"  # local_cluster.py's default, in the working directory

    # every stage was submitted through the executor and ran as its own process
    submitted = re.findall(r"Submitted job \d+ with external jobid '(\d+)'", (tmp_path / "tiny.out").read_text())
    assert len(submitted) == len(STAGES) == len(set(submitted)), submitted
    ran = {}
    for jobid in submitted:
        assert (log_dir / f"{jobid}.exit").read_text().strip() == "0", jobid
        rules = re.findall(r"^localrule (\w+):", (log_dir / f"{jobid}.log").read_text(), flags=re.M)
        assert len(rules) == 1, (jobid, rules)  # one job per process, run by that process's own Snakemake
        ran[rules[0]] = jobid
    assert sorted(ran) == sorted(STAGES)

    local = read_headlines(geospatial_tiny_run)
    assert len(local) > 20 and read_headlines(run_dir) == local
    # the report's headline table (its exact data- attributes) too
    assert headline_values(run_dir / "report" / "report.html") == headline_values(geospatial_tiny_run / "report" / "report.html")
