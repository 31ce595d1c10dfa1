"""The geospatial pipeline on a tiny configuration: report numbers vs tables, and the notebook."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytestmark = pytest.mark.slow

TINY = ["card_top=3", "card_controls=2", "n_places=600", "min_population=150000", "n_blocks=60", "sae_steps=150", "permutations=19",
        "steer_max_eval=60", "steer_n_random=2", "sae_expansion=4"]


@pytest.fixture(scope="module")
def run_dir(geospatial_tiny_run: Path) -> Path:
    """The session's tiny geospatial run (tests/pipelines/conftest.py), which the cluster test also
    compares with: these tests only read the run folder."""
    return geospatial_tiny_run


def test_report_headlines_agree_with_tables(run_dir):
    from sciscope.pipelines.report import headline_values

    rows = {r["name"]: r for r in headline_values(run_dir / "report" / "report.html")}
    summary = pd.read_csv(run_dir / "probes" / "summary.csv")
    lat = summary[(summary.target == "lat") & summary.site.notna()]
    assert float(rows["lat (r2)"]["value"]) == pytest.approx(lat.score_mean.max(), rel=1e-6)
    assert float(rows["lat (r2)"]["control"]) == pytest.approx(lat.loc[lat.score_mean.idxmax(), "control_mean"], rel=1e-6)
    err = pd.read_csv(run_dir / "probes" / "median_error_km.csv").set_index("condition")
    assert float(rows["median error of lat/lon probes"]["value"]) == pytest.approx(err.loc["probe", "median_error_km"])
    assert float(rows["median error of lat/lon probes"]["control"]) == pytest.approx(err.loc["shuffled coordinates", "median_error_km"])
    moran = pd.read_csv(run_dir / "features" / "morans_i_summary.csv")
    assert float(rows["max Moran's I, SAE latents"]["value"]) == pytest.approx(moran.max_I.iloc[0])
    metrics = json.loads((run_dir / "sae" / "metrics.json").read_text())
    assert float(rows["explained variance"]["value"]) == pytest.approx(metrics["explained_variance"])
    sweep = pd.read_csv(run_dir / "steering" / "north_south" / "sweep.csv")
    s = sweep[(sweep.metric == "predicted_lat") & (sweep.condition == "steer")]
    slope = np.polyfit(s.alpha, s.value, 1)[0]
    assert float(rows["north_south: slope of predicted_lat per unit alpha"]["value"]) == pytest.approx(slope, rel=1e-6)
    for score in ("predicted_lat_south", "predicted_lon"):  # the other target and the off-target score
        assert f"north_south: slope of {score} per unit alpha" in rows
    s = s.set_index("alpha").value
    change = rows["north_south: change in predicted_lat at alpha 2"]
    assert float(change["value"]) == pytest.approx(s[2.0] - s[0.0], rel=1e-6)
    summary = json.loads((run_dir / "steering" / "north_south" / "summary.json").read_text())
    assert summary["plan"]["n_controls"] == 2 and summary["headline"]["n_examples"] == 60  # per-place scores: CIs
    ref = summary["reference"]
    assert ref["held-out northern places"]["predicted_lat"] > ref["held-out southern places"]["predicted_lat"]
    for name in ("feature_maps.png", "lisa_top_feature.png", "morans_i_hist.png", "analyses.json"):
        assert (run_dir / "features" / name).is_file(), name


def test_confounds_carry_baselines_and_verdicts(run_dir):
    """The default prompt names no country; the country prompt is a variant probed beside it; the
    within-country probes and the country-detector count carry a baseline and a verdict."""
    from sciscope.core.verdict import VERDICTS
    from sciscope.pipelines.layout import read_headlines

    rows = {r["name"]: r for r in read_headlines(run_dir)}
    for name in ("lat (r2)", "country_prompt: lat (r2)", "within_country: lat_in_country (r2)",
                 "spatial SAE latents that are not country detectors"):
        assert rows[name]["baseline"] is not None and rows[name]["verdict"] in VERDICTS, rows[name]
    assert rows["country_prompt: lat (r2)"]["baseline_label"] == "country_centroid"  # where the country lies
    store = json.loads((run_dir / "activations" / "store" / "manifest.json").read_text())
    assert store["pooling"] == "mean"  # the encoder's; a causal LM's default is "last"
    obs = pd.read_parquet(run_dir / "examples" / "obs.parquet")
    assert (obs["prompt"] == obs["name"]).all() and obs["variant_prompt"].str.contains(", ").all()
    assert (run_dir / "activations" / "variants" / "country_prompt").is_dir()
    det = pd.read_csv(run_dir / "features" / "country_detectors.csv")
    summary = pd.read_csv(run_dir / "features" / "country_detectors_summary.csv").set_index("basis")
    assert len(det) == summary.loc["sae", "n_spatial"] and int(det["country_detector"].sum()) == summary.loc["sae", "n_country_detectors"]
    assert det["label"].str.match(r"^(country detector: .+|spatial)$").all()
    assert rows["spatial SAE latents that are not country detectors"]["value"] == summary.loc["sae", "n_not_country_detectors"]


def test_controls_behave(run_dir):
    """Probes beat their shuffled control (the place name alone by less than the country prompt);
    Moran's I of the shuffled-coordinate control is near 0."""
    summary = pd.read_csv(run_dir / "probes" / "summary.csv")
    lat = summary[(summary.target == "lat") & summary.site.notna()]
    assert lat.score_mean.max() > lat.control_mean.max() + 0.05
    variant = pd.read_csv(run_dir / "probes" / "country_prompt.csv")
    vlat = variant[(variant.target == "lat") & variant.site.notna()]
    assert vlat.score_mean.max() > vlat.control_mean.max() + 0.2
    moran = pd.read_csv(run_dir / "features" / "morans_i_summary.csv")
    assert moran.max_I_shuffled_coordinates.iloc[0] < moran.max_I.iloc[0]
    summary = json.loads((run_dir / "steering" / "north_south" / "summary.json").read_text())["headline"]
    assert summary["slope"] > summary["control_slope_mean_abs"]  # steering north beats random directions


def test_notebook_executes_on_the_run(run_dir):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(Path(__file__).parents[2] / "notebooks" / "geospatial.ipynb", as_version=4)
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
