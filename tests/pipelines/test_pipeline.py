"""The Snakemake pipeline end to end on a `new-domain` skeleton: run, no-op rerun, partial rerun, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from sciscope.pipelines.skeleton import write_skeleton

pytestmark = pytest.mark.slow


def sciscope(*args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sciscope.pipelines.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("project")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        write_skeleton("toyscience", root)
    finally:
        os.chdir(cwd)
    return root


def mtimes(run: Path, stages: list[str]) -> dict[str, float]:
    return {s: (run / s / "done.json").stat().st_mtime for s in stages}


def test_run_noop_and_partial_rerun(project):
    args = ["run", "toyscience", "--quiet", "--set", "sae_steps=150"]
    first = sciscope(*args, cwd=project)
    assert first.returncode == 0, first.stderr[-3000:]
    run = project / "runs" / "toyscience" / "quick"
    assert (run / "report" / "report.html").is_file()
    # --cores 2 (the default): a stage that runs alone gets both, the ones that may overlap one each
    assert "(threads: 2)" in (run / "logs" / "model.log").read_text()
    assert all("(threads: 1)" in (run / "logs" / f"{s}.log").read_text() for s in ("probes", "sae", "steering"))
    before = mtimes(run, ["examples", "model", "activations", "probes", "sae", "features", "steering"])
    t0 = time.time()
    again = sciscope(*args, cwd=project)
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr
    assert time.time() - t0 < 30  # the issue asks < 10 s on the real run; CI machines vary
    assert mtimes(run, list(before)) == before
    changed = sciscope("run", "toyscience", "--quiet", "--set", "sae_steps=160", cwd=project)
    assert changed.returncode == 0, changed.stderr[-3000:]
    after = mtimes(run, list(before))
    for stage in ["examples", "model", "activations", "probes", "steering"]:
        assert after[stage] == before[stage], f"{stage} reran although only sae_steps changed"
    for stage in ["sae", "features"]:
        assert after[stage] > before[stage], f"{stage} did not rerun"


def test_report_headlines_agree_with_tables(project):
    from sciscope.pipelines.report import headline_values

    run = project / "runs" / "toyscience" / "quick"
    if not (run / "report" / "report.html").is_file():
        assert sciscope("run", "toyscience", "--quiet", "--set", "sae_steps=150", cwd=project).returncode == 0
    rows = headline_values(run / "report" / "report.html")
    by_name = {r["name"]: r for r in rows}
    summary = pd.read_csv(run / "probes" / "summary.csv")
    label = summary[(summary.target == "label") & summary.site.notna()]
    assert float(by_name["label (accuracy)"]["value"]) == pytest.approx(label.score_mean.max(), rel=1e-3)
    metrics = json.loads((run / "sae" / "metrics.json").read_text())
    assert float(by_name["explained variance"]["value"]) == pytest.approx(metrics["explained_variance"], rel=1e-3)


def test_killed_during_sae_resumes_without_redoing_earlier_stages(project):
    run = project / "runs" / "toyscience" / "killed"
    slow = [sys.executable, "-m", "sciscope.pipelines.cli", "run", "toyscience", "--run", "killed", "--quiet",
            "--cores", "1", "--set", "sae_steps=1000000"]
    proc = subprocess.Popen(slow, cwd=project, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 240
        while not (run / "logs" / "sae.log").is_file() or not (run / "activations" / "done.json").is_file():
            assert time.time() < deadline, "the SAE stage never started"
            assert proc.poll() is None, "the pipeline ended before the SAE stage"
            time.sleep(0.5)
        time.sleep(3)  # well inside SAE training
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (run / "sae" / "done.json").exists()
    done_before = {s: (run / s / "done.json").stat().st_mtime for s in ["examples", "model", "activations"]}
    resumed = sciscope("run", "toyscience", "--run", "killed", "--quiet", "--set", "sae_steps=150", cwd=project)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (run / "report" / "report.html").is_file()
    for stage, t in done_before.items():
        assert (run / stage / "done.json").stat().st_mtime == t, f"{stage} was redone after the kill"


def test_bad_config_is_a_usage_error(project):
    bad = sciscope("run", "toyscience", "--set", "sae_stepz=3", cwd=project)
    assert bad.returncode == 2 and "sae_stepz" in bad.stderr and "sae_steps" in bad.stderr
    unknown = sciscope("run", "no_such_domain", cwd=project)
    assert unknown.returncode == 2 and "no_such_domain" in unknown.stderr


def test_skeleton_passes_conformance(project, tmp_path):
    from sciscope.core.testing import check_adapter
    from sciscope.pipelines.config import load_adapter_class

    cls = load_adapter_class(str(project / "sciscope-toyscience" / "sciscope_toyscience" / "adapter.py") + ":ToyscienceAdapter")
    check_adapter(cls(cls.test_config), tmp_path)


def test_sharded_capture_jobs_merge_to_the_same_store(project):
    """capture_shards=3: three Snakemake jobs capture every third batch; the merged store equals
    the one-job store of another run, and the shard parts are gone. The same run trains its SAE
    with 2 DDP processes (gloo on CPU), chosen by configuration."""
    from sciscope.core import ActivationStore
    from sciscope.core.sae import load_sae

    # only the stages up to the capture
    base = ["run", "toyscience", "--quiet", "--set", "batch_size=16", "--until", "activations"]
    one = sciscope(*base, "--run", "one-shard", cwd=project)
    sharded = sciscope(*base[:-1], "sae", "--run", "three-shards", "--set", "capture_shards=3", "--set", "sae_steps=40",
                       "--set", "strategy=ddp", "--set", "devices=2", cwd=project)
    assert one.returncode == 0, one.stderr[-3000:]
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    runs = project / "runs" / "toyscience"
    a = ActivationStore.open(runs / "one-shard" / "activations" / "store")
    b = ActivationStore.open(runs / "three-shards" / "activations" / "store")
    assert a.equals(b) and b.manifest["merged_from_shards"] == 3
    assert sorted(p.name for p in (runs / "three-shards" / "logs").glob("activations.shard*.log")) == [
        "activations.shard0.log", "activations.shard1.log", "activations.shard2.log"]
    assert not list((runs / "three-shards" / "activations" / "shards").glob("*/store"))
    log = (runs / "three-shards" / "logs" / "sae.log").read_text()
    assert log.count("stage sae of") == 2 and '{"rank": "secondary"}' in log  # two processes, rank 0 wrote
    metrics = json.loads((runs / "three-shards" / "sae" / "metrics.json").read_text())
    assert load_sae(runs / "three-shards" / "sae" / "model").cfg.d_in == b.dim(metrics["site"])
    assert 0.0 < metrics["explained_variance"] <= 1.0


def finished_run(project) -> Path:
    run = project / "runs" / "toyscience" / "quick"
    if not (run / "report" / "done.json").is_file():
        assert sciscope("run", "toyscience", "--quiet", "--set", "sae_steps=150", cwd=project).returncode == 0
    return run


def same_config(run: Path) -> list[str]:
    """The --set arguments that reproduce the run's config (earlier tests change sae_steps)."""
    return ["--set", f"sae_steps={json.loads((run / 'run.json').read_text())['config']['sae_steps']}"]


def test_a_rerun_imports_no_adapter_until_code_changes_and_any_name_of_the_interpreter_reruns_nothing(project):
    run = finished_run(project)
    stages = ["examples", "model", "activations", "probes", "sae", "features", "steering", "report"]
    adapter = project / "sciscope-toyscience" / "sciscope_toyscience" / "adapter.py"
    text = adapter.read_text()
    adapter.write_text(text + '\nimport sys as _sys\n_sys.stderr.write("toyscience adapter imported\\n")\n')
    try:
        before = mtimes(run, stages)
        changed = sciscope("run", "toyscience", "--quiet", *same_config(run), cwd=project)
        # the adapter's code changed: the CLI validates the config again (Snakemake still reruns nothing)
        assert changed.returncode == 0 and "toyscience adapter imported" in changed.stderr, changed.stderr[-2000:]
        assert "stages" in json.loads((run / "run.json").read_text())  # the report's stage times are kept
        again = sciscope("run", "toyscience", "--quiet", *same_config(run), cwd=project)
        # same command, same code: neither the CLI nor Snakemake's planning imports the adapter
        assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr
        assert "toyscience adapter imported" not in again.stderr
        # another name of the same interpreter (the console script's python3, a user's python) and
        # another progress flag change the rules' command lines, and rerun no stage
        python3 = Path(sys.executable).with_name("python3")
        other = subprocess.run([str(python3 if python3.exists() else sys.executable), "-m", "sciscope.pipelines.cli",
                                "run", "toyscience", *same_config(run)], cwd=project, capture_output=True, text=True, timeout=300)
        assert other.returncode == 0 and "Nothing to be done" in other.stdout + other.stderr, other.stderr[-2000:]
        assert mtimes(run, stages) == before
    finally:
        adapter.write_text(text)


def test_copied_and_moved_run_folders_do_not_rerun(project):
    import shutil

    run = finished_run(project)
    stages = ["examples", "model", "activations", "probes", "sae", "features", "steering", "report"]
    shutil.copytree(run, run.with_name("copied"))
    shutil.copytree(run, run.with_name("to-move"))
    (run.with_name("to-move")).rename(run.with_name("moved"))
    for name in ("copied", "moved"):
        before = mtimes(run.with_name(name), stages)
        again = sciscope("run", "toyscience", "--run", name, "--quiet", *same_config(run), cwd=project)
        assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr, again.stderr[-2000:]
        assert mtimes(run.with_name(name), stages) == before


def test_deleting_a_done_marker_reruns_that_stage_and_what_needs_it(project):
    import shutil

    run = finished_run(project).with_name("marker")
    shutil.copytree(finished_run(project), run)
    before = mtimes(run, ["activations", "probes", "sae", "features", "steering", "report"])
    (run / "probes" / "done.json").unlink()
    again = sciscope("run", "toyscience", "--run", "marker", "--quiet", *same_config(run), cwd=project)
    assert again.returncode == 0, again.stderr[-3000:]
    after = mtimes(run, list(before))
    assert after["probes"] > before["probes"] and after["report"] > before["report"]
    assert all(after[s] == before[s] for s in ("activations", "sae", "features", "steering"))


def test_dry_run_leaves_the_run_as_it_was(project):
    run = finished_run(project)
    info = (run / "run.json").read_text()
    dry = sciscope("run", "toyscience", "--quiet", "--set", "sae_steps=999", "--dry-run", cwd=project)
    assert "sae_steps=999" not in same_config(run)
    assert dry.returncode == 0 and "nothing ran" in dry.stdout and "report:" not in dry.stdout
    assert "sae" in dry.stdout  # it shows that the SAE stage would rerun
    assert (run / "run.json").read_text() == info


def test_a_store_array_changed_after_capture_stops_the_next_stage_naming_the_file(project):
    """Rows shuffled in place (same size): the probes stage refuses the store instead of fitting it."""
    import shutil

    import numpy as np

    run = finished_run(project).with_name("shuffled")
    shutil.copytree(finished_run(project), run)
    array = sorted((run / "activations" / "store" / "arrays").glob("*.npy"))[0]
    rows = np.load(array, mmap_mode="r+")
    rows[:] = rows[::-1].copy()
    rows.flush()
    del rows
    (run / "probes" / "done.json").unlink()
    again = sciscope("run", "toyscience", "--run", "shuffled", "--quiet", *same_config(run), cwd=project)
    assert again.returncode == 1
    last = again.stderr.strip().splitlines()[-1]
    assert "changed since the store was written" in last and array.name in last and "probes.log" in last
