"""A 150-line adapter with its own steering plans (AddVector, Clamp) and analysis, through the whole pipeline."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from sciscope.core.verdict import FRACTION_MARGIN, verdict

pytestmark = pytest.mark.slow

ADAPTER = Path(__file__).resolve().parents[1] / "domains" / "experiment_adapter.py"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("planted")
    proc = subprocess.run([sys.executable, "-m", "sciscope.pipelines.cli", "run", f"{ADAPTER}:PlantedAdapter", "--quiet",
                           "--run", "t"], cwd=root, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return root / "runs" / "planted" / "t"


def test_every_plan_reports_breakdown_symmetry_and_its_controls(run_dir: Path):
    plans = sorted(p.name for p in (run_dir / "steering").iterdir() if p.is_dir())
    assert plans == ["ablate_label_feature", "clamp_class1_units", "label", "label_relative", "steer_label_feature"]
    for plan in plans:
        summary = json.loads((run_dir / "steering" / plan / "summary.json").read_text())
        head = summary["headline"]
        for key in ("breakdown_alpha", "symmetry", "monotonic", "slope", "effect_plus", "effect_minus",
                    "control_slope_mean_abs", "control_effect_plus_mean", "control_breakdown_alpha", "p_slope"):
            assert key in head, (plan, key)
        assert head["n_controls"] == 10
        sweep = pd.read_csv(run_dir / "steering" / plan / "sweep.csv")
        assert sweep.condition.nunique() == 11 and 0.0 in set(sweep.alpha)
        assert (run_dir / "steering" / plan / "alpha_sweep.png").stat().st_size > 1000
    # the planted direction: the delta vector raises the class-1 margin far beyond random directions
    label = json.loads((run_dir / "steering" / "label" / "summary.json").read_text())["headline"]
    assert label["slope"] > label["control_slope_mean_abs"] > 0 and label["p_slope"] < 0.1  # beats all 10 controls
    assert label["effect_plus_ci"][0] > 0  # bootstrap over the held-out points excludes zero
    assert (run_dir / "steering" / "label" / "vector.safetensors").is_file()
    clamp = json.loads((run_dir / "steering" / "clamp_class1_units" / "summary.json").read_text())
    assert clamp["plan"]["intervention"]["kind"] == "clamp" and "reference[class-1 points]" in clamp["headline"]
    assert clamp["headline"]["effect_plus"] > clamp["headline"]["control_effect_plus_mean"]
    feature = json.loads((run_dir / "steering" / "steer_label_feature" / "summary.json").read_text())
    assert feature["plan"]["intervention"]["kind"] == "steer_feature" and len(feature["plan"]["intervention"]["features"]) == 1
    # the steering stage waited for the SAE and its feature analysis
    assert (run_dir / "steering" / "done.json").stat().st_mtime > (run_dir / "features" / "done.json").stat().st_mtime


def test_the_declared_analysis_ran_after_its_stage_and_reached_the_report(run_dir: Path):
    gap = pd.read_csv(run_dir / "probes" / "label_probe_gap.csv")
    assert gap.gap.max() > 0.2  # the label is linearly decodable far above shuffled labels
    assert "label_probe_gap" in json.loads((run_dir / "probes" / "analyses.json").read_text())
    rows = json.loads((run_dir / "probes" / "headline.json").read_text())
    row = next(r for r in rows if r["name"] == "label probe: best gap over shuffled labels")
    assert row["stage"] == "probes" and row["source"] == "probes/label_probe_gap.csv"
    html = (run_dir / "report" / "report.html").read_text()
    assert "label probe: best gap over shuffled labels" in html and "clamp_class1_units: change in margin" in html


def test_the_core_fidelity_analysis_spliced_the_sae_into_the_model(run_dir: Path):
    table = pd.read_csv(run_dir / "sae" / "fidelity.csv").set_index("condition")
    assert list(table.index) == ["clean", "sae", "pca_at_l0", "zero_ablation", "mean_ablation"]
    assert table.loss["zero_ablation"] > table.loss["clean"] and table.loss_recovered["zero_ablation"] == 0
    assert table.loss_recovered["sae"] > table.loss_recovered["mean_ablation"]  # the SAE keeps what the head reads
    assert table.kl["clean"] == 0 and table.kl["sae"] >= 0
    rows = json.loads((run_dir / "sae" / "headline.json").read_text())
    row = next(r for r in rows if r["name"] == "loss recovered (SAE spliced in)")
    assert row["value"] == pytest.approx(table.loss_recovered["sae"]) and row["baseline_label"].startswith("PCA")
    assert row["control"] == pytest.approx(table.loss_recovered["mean_ablation"])
    assert row["baseline"] == pytest.approx(table.loss_recovered["pca_at_l0"])
    # the verdict follows the two numbers, within the margin stated for fractions read once
    assert row["verdict"] == verdict(row["value"], row["baseline"], tolerance=FRACTION_MARGIN)
    assert "fidelity" in json.loads((run_dir / "sae" / "analyses.json").read_text())


def test_the_quality_table_sets_the_sae_beside_pca_raw_units_and_random_directions(run_dir: Path):
    table = pd.read_csv(run_dir / "sae" / "quality.csv").set_index("metric")
    assert list(table.columns) == ["sae", "pca", "raw_units", "random_directions", "note"]
    units = table.loc["units"]
    assert units.random_directions == units.sae == 2 * units.raw_units  # sae_expansion 2: as many random directions
    k1, k5 = table.loc["k=1 sparse probing, mean balanced accuracy"], table.loc["k=5 sparse probing, mean balanced accuracy"]
    assert k5.raw_units > 0.65 and all(0 <= float(k1[b]) <= 1 for b in ("sae", "pca", "raw_units", "random_directions"))
    assert table.loc["loss recovered", "sae"] == pytest.approx(
        pd.read_csv(run_dir / "sae" / "fidelity.csv").set_index("condition").loss_recovered["sae"])
    assert 0 < table.loc["stability (mean best decoder cosine to another seed)", "sae"] <= 1
    names = [r["name"] for r in json.loads((run_dir / "sae" / "headline.json").read_text())]
    assert "SAE k=1 sparse probing, mean balanced accuracy" in names and "SAE stability across seeds" in names


def test_feature_cards_agree_with_the_latents_and_the_browser_works_from_disk(run_dir: Path, tmp_path: Path):
    import numpy as np

    from sciscope.core import ActivationStore
    from sciscope.pipelines.cards import feature_card, feature_cards
    from tests.browser import dump_dom

    cards = feature_cards(run_dir)
    acts = np.asarray(ActivationStore.open(run_dir / "sae" / "latents").array("latents"))
    top = [c for c in cards if c.selection == "top"]
    controls = [c for c in cards if c.selection == "control"]
    assert top and controls and not {c.feature for c in top} & {c.feature for c in controls}
    for card in cards:
        column = acts[:, card.feature]
        assert card.stats["density"] == pytest.approx((column > 0).mean())
        rows = [e["row"] for e in card.examples if e["band"] == "top"]
        assert rows == list(np.argsort(-column, kind="stable")[:len(rows)]) and len(rows) == min(10, (column > 0).sum())
        assert card.histogram is not None and card.histogram.png.startswith(b"\x89PNG")
    assert all(acts[:, c.feature].max() > 0 for c in controls)  # the controls are live features
    # the feature the steer_label_feature plan used has a card that says so, with the plan's numbers
    used = json.loads((run_dir / "steering" / "steer_label_feature" / "summary.json").read_text())["plan"]["intervention"]["features"][0]
    steered = next(c for c in cards if c.feature == used)
    assert any(s["plan"] == "steer_label_feature" and s["how"] == "steered with this feature" for s in steered.steering)
    # the notebook call builds the same card from the finished run
    again = feature_card(run_dir, top[0].feature)
    assert again.examples == top[0].examples and again.associations == top[0].associations
    # the report links the browser; the browser opens from disk, its search narrows the cards, no picture is broken
    report = (run_dir / "report" / "report.html").read_text()
    assert 'href="features.html"' in report
    page = run_dir / "report" / "features.html"
    dom = dump_dom(page, tmp_path / "profile")
    assert f'data-shown="{len(cards)}"' in dom and 'data-broken-images="0"' in dom
    assert f'data-images="{sum(1 + len(c.panels) for c in cards)}"' in dom
    dom = dump_dom(page, tmp_path / "profile", query=f"f{controls[0].feature}")
    assert 'data-shown="1"' in dom
