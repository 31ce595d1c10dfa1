"""The physics pipeline on a tiny configuration: report numbers vs tables, controls, and the notebook."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sciscope.core.verdict import VERDICTS

pytestmark = pytest.mark.slow

TINY = ["card_top=3", "card_controls=2", "n_per_regime=4", "grid=16", "n_frames=8", "gs_burn_in=200", "gs_frame_every=50", "flow_burn_in=0.5",
        "flow_k_forcing=2", "hidden=16", "n_layers=2", "n_heads=2", "train_steps=30", "train_batch_size=8",
        "rollout_start=1", "rollout_steps=3", "n_rollouts=2", "score_frames=2", "sae_steps=60", "sae_expansion=4", "sae_k=8",
        "probe_cv=3", "steer_alphas=-0.5,0.5", "steer_n_random=1", "transfer_alphas=-0.2,0.2", "strip_alpha=0.5"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("phys")
    args = [sys.executable, "-m", "sciscope.pipelines.cli", "run", "physics", "--quiet", "--run", "tiny"]
    for s in TINY:
        args += ["--set", s]
    proc = subprocess.run(args, cwd=root, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return root / "runs" / "physics" / "tiny"


def test_report_headlines_agree_with_tables(run_dir: Path) -> None:
    from sciscope.pipelines.report import headline_values

    rows = {r["name"]: r for r in headline_values(run_dir / "report" / "report.html")}
    one = pd.read_csv(run_dir / "model" / "one_step_error.csv").set_index("system")
    for system in ("gray_scott", "flow"):
        row = rows[f"{system}: one-step MSE"]
        assert float(row["value"]) == pytest.approx(one.loc[system, "mse_model"], rel=1e-6)
        assert float(row["control"]) == pytest.approx(one.loc[system, "mse_persistence"], rel=1e-6)
    sweep = pd.read_csv(run_dir / "steering" / "recipe_flow" / "sweep.csv")
    curve = lambda m, c: sweep[(sweep.metric == m) & (sweep.condition == c)].set_index("alpha").value  # noqa: E731
    # the headline counts a regime change only on a physical rollout
    steer, rand = curve("p_vortex_physical_from_laminar", "steer"), curve("p_vortex_physical_from_laminar", "random-0")
    row = rows["recipe_flow: change in p_vortex_physical_from_laminar at alpha 0.5"]
    assert float(row["value"]) == pytest.approx(steer[0.5] - steer[0.0], rel=1e-6, abs=1e-12)
    assert float(row["control"]) == pytest.approx(rand[0.5] - rand[0.0], rel=1e-6, abs=1e-12)
    assert (curve("p_vortex_physical_from_laminar", "steer") <= curve("p_vortex_from_laminar", "steer").fillna(0) + 1e-12).all()
    safe = curve("__broken__", "steer")
    x = curve("p_vortex_from_laminar", "steer")[safe[safe == 0].index]
    assert float(rows["recipe_flow: slope of p_vortex_from_laminar per unit alpha"]["value"]) == pytest.approx(
        np.polyfit(x.index, x.to_numpy(), 1)[0], rel=1e-6, abs=1e-12)
    # P(changed and physical) beside P(changed), each against the random directions, with a verdict
    shares = pd.read_csv(run_dir / "steering" / "steering_verdicts.csv").set_index(["plan", "alpha"])
    both = rows["recipe_flow: P(vortex and physical) from laminar at alpha 0.5"]
    clf = rows["recipe_flow: P(vortex) by the regime classifier alone from laminar at alpha 0.5"]
    at = shares.loc[("recipe_flow", 0.5)]
    assert float(both["value"]) == pytest.approx(at.p_changed_and_physical_value) and float(both["control"]) == pytest.approx(at.p_changed_and_physical_zero)
    assert float(clf["baseline"]) == pytest.approx(at.p_changed_random) and both["verdict"] in VERDICTS and clf["verdict"] in VERDICTS
    # every slope read against the random directions' |slopes| (their mean is the core summary's)
    summary = pd.read_csv(run_dir / "steering" / "recipe_flow" / "summary.csv").set_index("score")
    slopes = pd.read_csv(run_dir / "steering" / "slope_verdicts.csv").set_index(["plan", "score"])
    assert slopes.loc[("recipe_flow", "p_vortex_from_laminar"), "control_mean_abs_slope"] == pytest.approx(
        summary.loc["p_vortex_from_laminar", "control_slope_mean_abs"], rel=1e-6)
    assert slopes.verdict.isin(VERDICTS).all()
    assert rows["recipe_flow: slope of p_vortex_from_laminar per unit alpha"]["verdict"] in VERDICTS
    # parameters probed within each regime too, beside the radial spectrum
    within = pd.read_csv(run_dir / "probes" / "parameters_flow_laminar.csv")
    visc_w = within[(within.target == "log10_viscosity") & within.site.notna()]
    best = visc_w.loc[visc_w.score_mean.idxmax()]
    row = rows["parameters_flow_laminar: log10_viscosity (r2)"]
    assert float(row["value"]) == pytest.approx(best.score_mean, rel=1e-6) and float(row["baseline"]) == pytest.approx(best.baseline_mean, rel=1e-6)
    assert row["verdict"] in VERDICTS and rows["regime (accuracy)"]["baseline_label"]
    # features: single-trajectory features flagged, correlations against the radial spectrum
    spread = pd.read_csv(run_dir / "features" / "feature_trajectories.csv")
    top_k = rows["SAE features whose top-10 windows all come from one trajectory"]
    assert int(top_k["value"]) == int(spread.single_trajectory.sum())
    assert not (run_dir / "steering" / "flow").exists()  # the plain contrast sweep is replaced by the recipe plans
    for plan in ("transfer_gray_scott_to_flow", "transfer_flow_to_gray_scott"):
        summary = json.loads((run_dir / "steering" / plan / "summary.json").read_text())
        assert summary["plan"]["n_controls"] == 1 and summary["plan"]["alphas"] == [0.0, -0.2, 0.2]
        assert f"{plan}: change in " in " ".join(rows)
    probes = pd.read_csv(run_dir / "probes" / "parameters_flow.csv")
    visc = probes[(probes.target == "log10_viscosity") & probes.site.notna()]
    assert float(rows["parameters_flow: log10_viscosity (r2)"]["value"]) == pytest.approx(visc.score_mean.max(), rel=1e-6)
    assert (run_dir / "probes" / "parameter_probes_vs_layer.png").is_file()
    corr = pd.read_csv(run_dir / "features" / "diagnostic_correlations.csv").set_index("diagnostic")
    xv = rows["SAE feature vs x_variation (|Spearman rho| across trajectories)"]
    assert float(xv["value"]) == pytest.approx(abs(corr.loc["x_variation", "rho"]), rel=1e-6)
    assert float(xv["baseline"]) == pytest.approx(abs(corr.loc["x_variation", "baseline_rho"]), rel=1e-6) and xv["verdict"] in VERDICTS
    assert corr.loc["x_variation", "feature"] not in set(spread.loc[spread.single_trajectory, "feature"])
    transfer = pd.read_csv(run_dir / "steering" / "transfer.csv")
    assert len(transfer) == 2 and transfer.cosine_source_target_vectors.abs().le(1 + 1e-9).all()
    assert -1 <= float(rows["flow: cosine(plain mean difference, recipe vector)"]["value"]) <= 1
    # the report embeds the physics figures
    html = (run_dir / "report" / "report.html").read_text()
    for name in ("rollout_strips_from_laminar.png", "alpha_sweep.png", "rollout_error.png", "regimes.png", "changed_vs_physical.png"):
        assert name in html, name


def test_controls_behave(run_dir: Path) -> None:
    """Regime is decodable far above shuffled labels; the classifier beats its control; alpha = 0 is finite."""
    summary = pd.read_csv(run_dir / "probes" / "summary.csv")
    regime = summary[(summary.target == "regime") & summary.site.notna()]
    assert regime.score_mean.max() > regime.control_mean.max() + 0.2
    clf = pd.read_csv(run_dir / "examples" / "regime_classifier.csv")
    assert (clf.cv_accuracy > clf.shuffled_accuracy).all()
    sweep = pd.read_csv(run_dir / "steering" / "recipe_gray_scott" / "sweep.csv")
    zero = sweep[(sweep.alpha == 0) & sweep.metric.isin(["diverged_fraction", "__broken__"])]
    assert len(zero) and (zero.value == 0).all()
    info = json.loads((run_dir / "run.json").read_text())
    assert info["config"]["steer_scale"] == "relative"  # the quick profile's default carried into the run


def test_notebook_executes_on_the_run(run_dir: Path) -> None:
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(Path(__file__).parents[2] / "notebooks" / "physics.ipynb", as_version=4)
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
