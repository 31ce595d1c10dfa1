"""The robotics pipeline on a tiny configuration: report numbers vs tables, controls, the notebook."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytestmark = pytest.mark.slow

TINY = ["card_top=3", "card_controls=2", "n_episodes=60", "n_example_episodes=16", "image_size=16", "n_bins=32", "hidden=32", "n_layers=2",
        "n_heads=2", "intermediate=64", "train_steps=40", "train_batch_size=32", "n_eval_episodes=6", "max_steps=15",
        "sae_steps=100", "sae_expansion=4", "probe_cv=3", "clusters=fast,right", "clamp_alphas=2.0",
        "clamp_n_random=1", "steer_n_random=1", "steer_alphas=1.0", "cluster_min_share=0.3", "cluster_direction_share=0.3", "n_trajectory_plots=1"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("robotics")
    # by module path: works whether or not the installed metadata lists the entry point yet
    domain = "sciscope.domains.robotics.adapter:RoboticsAdapter"
    args = [sys.executable, "-m", "sciscope.pipelines.cli", "run", domain, "--quiet", "--run", "tiny"]
    for s in TINY:
        args += ["--set", s]
    proc = subprocess.run(args, cwd=root, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return root / "runs" / "robotics" / "tiny"


def test_report_headlines_agree_with_tables(run_dir):
    from sciscope.pipelines.report import headline_values

    rows = {r["name"]: r for r in headline_values(run_dir / "report" / "report.html")}
    closed = pd.read_csv(run_dir / "model" / "closed_loop.csv").set_index("agent")
    row = rows["policy success rate (closed loop)"]
    assert float(row["value"]) == pytest.approx(closed.loc["policy", "success_rate"])
    assert float(row["control"]) == pytest.approx(closed.loc["random actions", "success_rate"])
    expert = pd.read_csv(run_dir / "examples" / "expert_vs_random.csv").set_index("agent")
    assert float(rows["expert success rate (closed loop)"]["value"]) == pytest.approx(expert.loc["expert (noise-free)", "success_rate"])
    episodes = pd.read_csv(run_dir / "examples" / "episodes.csv")
    clipped = int(rows["demonstration actions clipped to [-1, 1]"]["value"])
    assert clipped >= episodes["n_clipped_steps"].sum() > 0  # counted, and at least one per clipped step
    layers = pd.read_csv(run_dir / "model" / "lens_by_layer.csv")
    lens_row = [r for n, r in rows.items() if n.startswith("last-layer FFN neurons")][0]
    assert float(lens_row["value"]) == pytest.approx(layers["share_neurons_mostly_action"].iloc[-1])
    plans = sorted(p.name for p in (run_dir / "steering").glob("clamp_*") if p.is_dir())
    assert plans  # with the tiny rule at least one cluster is non-empty: one clamp plan each
    for plan in plans:
        summary = json.loads((run_dir / "steering" / plan / "summary.json").read_text())
        head = summary["headline"]
        assert head["score"] == {"clamp_fast": "displacement", "clamp_right": "rightward"}[plan]
        row = rows[f"{plan}: change in {head['score']} at alpha {head['alpha_plus']:.4g}"]
        sweep = pd.read_csv(run_dir / "steering" / plan / "sweep.csv")
        s = sweep[sweep.metric == head["score"]].set_index(["condition", "alpha"])["value"]
        assert float(row["value"]) == pytest.approx(s[("steer", 2.0)] - s[("steer", 0.0)])
        assert float(row["control"]) == pytest.approx(s[("random-0", 2.0)] - s[("random-0", 0.0)])
        assert {"prompt: quickly", "prompt: slowly"} <= set(summary["reference"])
        assert summary["plan"]["n_controls"] == 1 and summary["plan"]["damage"] == ["success_rate"]
    _claims_carry_their_baseline(run_dir, rows, plans)
    sweep = pd.read_csv(run_dir / "steering" / "fast_vs_slow" / "sweep.csv")
    s = sweep[(sweep.metric == "displacement") & (sweep.condition == "steer")]
    slope = np.polyfit(s.alpha, s.value, 1)[0]
    assert float(rows["fast_vs_slow: slope of displacement per unit alpha"]["value"]) == pytest.approx(slope, rel=1e-6)


def _claims_carry_their_baseline(run_dir: Path, rows: dict, plans: list[str]) -> None:
    """The lens shares, the speed clusters (vs the prompt) and the direction clusters (vs random clamps)
    carry their strongest baseline, and each verdict follows from the numbers in the tables."""
    from sciscope.core.verdict import VERDICTS, verdict

    layers = pd.read_csv(run_dir / "model" / "lens_by_layer.csv")
    for name, col in (("mostly action tokens", "share_neurons_mostly_action"), ("one coherent action meaning", "share_neurons_coherent")):
        row = next(r for n, r in rows.items() if n.startswith("last-layer FFN neurons") and name in n)
        last = layers.iloc[-1]
        assert float(row["baseline"]) == pytest.approx(max(last[f"{col}_null"], last[f"{col}_untrained"]))
        assert row["verdict"] in VERDICTS
    for r in rows.values():  # every row with a baseline has a verdict
        assert (r.get("baseline") in (None, "", "nan")) or r.get("verdict") in VERDICTS, r
    if "clamp_fast" in plans:
        speed = pd.read_csv(run_dir / "steering" / "speed_vs_prompt.csv").set_index("cluster").loc["fast"]
        row = rows["clamp_fast: speed gained at matched success (vs 'quickly')"]
        assert float(row["baseline"]) == pytest.approx(speed["prompt_gain"]) and row["verdict"] == speed["verdict"]
        if np.isfinite(speed["gain"]):
            assert speed["success"] >= speed["prompt_success"]  # matched success
            assert speed["verdict"] == verdict(speed["gain"], speed["prompt_gain"], tolerance=speed["margin"])
    if "clamp_right" in plans:
        d = pd.read_csv(run_dir / "steering" / "direction_vs_controls.csv").set_index("cluster").loc["right"]
        row = rows[f"clamp_right: rightward displacement gained at alpha {d['alpha']:g}"]
        assert float(row["baseline"]) == pytest.approx(d["strongest_control"]) and row["verdict"] == d["verdict"]
        assert d["verdict"] == verdict(d["effect"], d["strongest_control"], tolerance=d["margin"])


def test_controls_and_outputs_are_there(run_dir):
    """Probes of the instruction's words beat their shuffled control; clusters follow the rule;
    every random cluster matches its cluster's size; figures were drawn."""
    summary = pd.read_csv(run_dir / "probes" / "summary.csv")
    color = summary[(summary.target == "target_color") & summary.site.notna()]
    assert color.score_mean.max() > color.control_mean.max() + 0.2
    clusters = pd.read_csv(run_dir / "steering" / "clusters.csv")
    cfg = json.loads((run_dir / "run.json").read_text())["config"]
    assert clusters.groupby("cluster").size().max() <= cfg["cluster_max_size"]
    for name, members in clusters.groupby("cluster"):
        plan = json.loads((run_dir / "steering" / f"clamp_{name}" / "summary.json").read_text())["plan"]
        assert plan["intervention"]["n_units"] == len(members)  # its random controls draw as many per layer
        sweep = pd.read_csv(run_dir / "steering" / f"clamp_{name}" / "sweep.csv")
        assert set(sweep.condition) == {"steer", "random-0"} and set(sweep.alpha) == {0.0, 2.0}
    for f in ("model/lens_by_layer.png", "model/training_history.png", "model/training_history.csv"):
        assert (run_dir / f).is_file(), f
    assert list((run_dir / "steering").glob("clamp_*/alpha_sweep.png"))
    assert list((run_dir / "steering").glob("trajectories_*.png"))


def test_notebook_executes_on_the_run(run_dir):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(Path(__file__).parents[2] / "notebooks" / "robotics.ipynb", as_version=4)
    os.environ["SCISCOPE_RUN_DIR"] = str(run_dir)
    try:
        NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(run_dir)}}).execute()
    finally:
        os.environ.pop("SCISCOPE_RUN_DIR", None)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert any(o.get("output_type") == "display_data" and "image/png" in o.get("data", {}) for o in outputs)


def test_feature_cards_carry_the_domain_pictures(run_dir: Path):
    from tests.pipelines.cards_check import check_domain_cards

    check_domain_cards(run_dir)
