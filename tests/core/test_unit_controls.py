"""A maximum or a count over units beside the same over control units: planted cases."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sciscope.core import StoreWriter
from sciscope.core.context import RunContext
from sciscope.core.errors import ConfigError
from sciscope.core.experiment import core_analyses
from sciscope.core.features import analyze_features
from sciscope.core.spatial import PermutationWarning, check_permutations, permutations_for
from sciscope.core.unit_controls import (
    ASSOCIATION,
    UnitRule,
    control_bases,
    unit_controls_analysis,
    unit_controls_headline,
    unit_controls_table,
)
from tests.domains.experiment_adapter import PlantedAdapter

N = 150
rng = np.random.default_rng(0)
Y = rng.standard_normal(N)
OBS = pd.DataFrame({"y": Y, "flag": Y > 0})


def _abs_corr(acts: np.ndarray, obs: pd.DataFrame) -> np.ndarray:
    """|Pearson r| of every column with ``y``: a per-unit statistic an adapter could declare."""
    a = acts - acts.mean(0)
    y = obs["y"].to_numpy() - obs["y"].mean()
    return np.abs(a.T @ y) / (np.linalg.norm(a, axis=0) * np.linalg.norm(y) + 1e-12)


def _bases(signal: float) -> dict[str, np.ndarray]:
    r = np.random.default_rng(1)
    sae = r.standard_normal((N, 8))
    sae[:, 2] += signal * Y  # one planted real unit (signal 0: none)
    return {"sae": sae, "random_directions": r.standard_normal((N, 3000))}  # many pure-noise units


def test_a_basis_of_many_noise_units_has_a_high_max_by_chance_and_the_planted_unit_beats_it():
    rule = UnitRule("corr", threshold=0.25, label="|r| with y")
    t = unit_controls_table(_bases(1.0), OBS, statistics={"corr": _abs_corr}, rules={"corr": rule}, concepts=["y"])
    t = t.set_index(["statistic", "basis"])
    noise = t.loc[("|r| with y", "random_directions")]
    # the best of 3000 noise units clears a threshold no single noise unit would (sd of r ~ 0.08)
    assert noise["max"] > 0.25 and noise["count"] >= 1
    assert noise["n_units"] == 3000 and noise["fraction"] == pytest.approx(noise["count"] / 3000)
    sae = t.loc[("|r| with y", "sae")]
    assert sae["max"] > 0.6 > noise["max"] and sae["count"] == 1 and sae["fraction"] == pytest.approx(1 / 8)
    # FDR over all tests of the basis: the noise basis ties (almost) no unit to the concept, the planted one is tied
    assoc_noise, assoc_sae = t.loc[(ASSOCIATION, "random_directions")], t.loc[(ASSOCIATION, "sae")]
    assert assoc_noise["count"] <= 3 and assoc_noise["max"] > 0.25
    assert assoc_sae["count"] == 1 and assoc_sae["max"] > 0.6 and assoc_sae["threshold"] == 0.05


def test_headline_says_whether_the_sae_beats_the_controls_and_compares_counts_as_fractions():
    rule = UnitRule("corr", threshold=0.25, label="|r| with y")
    for signal, beats in ((1.0, True), (0.0, False)):
        t = unit_controls_table(_bases(signal), OBS, statistics={"corr": _abs_corr}, rules={"corr": rule})
        rows = {r["name"]: r for r in unit_controls_headline(t)}
        mx = rows["SAE max |r| with y over units"]
        assert mx["value"] == pytest.approx(t[(t.basis == "sae")]["max"].iloc[0])
        assert mx["control"] == pytest.approx(t[(t.basis == "random_directions")]["max"].iloc[0])
        assert ("beats all of them" in mx["note"]) is beats
        assert ("does NOT beat random directions" in mx["note"]) is (not beats)
        count = rows["SAE units with corr >= 0.25"]
        assert "different sizes" in count["note"] and "/3000 (" in count["note"] and "/8 (" in count["note"]


def test_the_stronger_of_pca_and_raw_units_is_the_baseline_and_the_verdict_follows(tmp_path: Path):
    """A raw unit planted stronger than the SAE's best: the SAE reads "below baseline", and its
    count is read against the raw units' rate (1 of 4) times the SAE's 8 latents."""
    from sciscope.core.verdict import ABOVE, BELOW
    from sciscope.pipelines.layout import write_headline

    rule = UnitRule("corr", threshold=0.25, label="|r| with y")
    r = np.random.default_rng(2)
    for raw_signal, expected in ((3.0, BELOW), (0.0, ABOVE)):
        bases = _bases(1.0)
        bases["pca"] = r.standard_normal((N, 4))
        bases["raw_units"] = r.standard_normal((N, 4)) + raw_signal * Y[:, None] * np.array([1, 0, 0, 0])
        t = unit_controls_table(bases, OBS, statistics={"corr": _abs_corr}, rules={"corr": rule})
        write_headline(tmp_path, unit_controls_headline(t))
        rows = {row["name"]: row for row in json.loads((tmp_path / "headline.json").read_text())}
        mx = rows["SAE max |r| with y over units"]
        assert mx["verdict"] == expected, mx
        if raw_signal:
            assert mx["baseline"] == pytest.approx(t[(t.basis == "raw_units")]["max"].iloc[0])
            count = rows["SAE units with corr >= 0.25"]
            assert count["value"] == 1 and count["baseline"] == pytest.approx(8 * 1 / 4)
            assert count["verdict"] == BELOW and "raw units' rate (25.0% of 4)" in count["baseline_label"]


def test_unit_rule_with_p_values_and_too_few_permutations():
    def stat(acts: np.ndarray, obs: pd.DataFrame) -> pd.DataFrame:
        return pd.DataFrame({"v": _abs_corr(acts, obs), "p": np.where(_abs_corr(acts, obs) > 0.5, 0.001, 0.5)})

    ok = UnitRule("s", column="v", threshold=0.25, p_column="p", alpha=0.01, permutations=999)
    t = unit_controls_table(_bases(1.0), OBS, statistics={"s": stat}, rules={"s": ok})
    assert t.set_index("basis").loc["random_directions", "count"] == 0  # its chance max is above 0.25, its p is not < 0.01
    assert t.rule.iloc[0] == "v >= 0.25 and p < 0.01"
    few = UnitRule("s", column="v", threshold=0.25, p_column="p", alpha=0.01, permutations=99)
    with pytest.warns(PermutationWarning, match="permutations=99"):
        t = unit_controls_table(_bases(1.0), OBS, statistics={"s": stat}, rules={"s": few})
    assert t.set_index("basis").loc["random_directions", "count"] >= 1  # counted on the effect size alone
    assert "p not read" in t.rule.iloc[0]


def test_check_permutations():
    assert permutations_for(0.01) == 999 and permutations_for(0.05) == 199
    assert check_permutations(999, 0.01, what="x") and check_permutations(0, 0.01, what="x")
    with pytest.warns(PermutationWarning, match="1/100"):
        assert not check_permutations(99, 0.01, what="Moran's I")
    with pytest.raises(ConfigError, match="--set permutations=999"):
        check_permutations(99, 0.01, what="Moran's I", strict=True)


def test_morans_i_statistic_gets_the_papers_rule_without_a_declared_one():
    pytest.importorskip("libpysal")
    from sciscope.core.spatial import morans_i_table

    side = 14
    lat, lon = np.meshgrid(40 + 0.5 * np.arange(side), 10 + 0.5 * np.arange(side), indexing="ij")
    obs = pd.DataFrame({"lat": lat.ravel(), "lon": lon.ravel()})
    r = np.random.default_rng(2)
    smooth = np.column_stack([obs.lat, obs.lon]) - [43, 13]
    bases = {"sae": np.column_stack([smooth, r.standard_normal((len(obs), 6))]),
             "raw_units": r.standard_normal((len(obs), 8))}

    def moran(perms: int):
        return lambda a, o: morans_i_table(a, o, permutations=perms)[["I", "EI", "z", "p_rand", "p_sim"]]

    t = unit_controls_table(bases, obs, statistics={"morans_i": moran(999)}).set_index("basis")
    assert (t.statistic == "Moran's I").all() and t.rule.iloc[0] == "I >= 0.3 and p_sim < 0.01"
    assert t.loc["sae", "count"] == 2 and t.loc["raw_units", "count"] == 0 and t.loc["sae", "max"] > 0.8
    with pytest.warns(PermutationWarning, match="no unit of any basis"):
        t = unit_controls_table(bases, obs, statistics={"morans_i": moran(19)}).set_index("basis")
    assert t.loc["sae", "count"] == 2 and "p not read" in t.rule.iloc[0]


def test_control_bases_shapes_and_pca_fitted_on_training_rows():
    x = np.random.default_rng(3).standard_normal((40, 5))
    train = np.arange(40) < 30
    b = control_bases(x, n_random=12, train=train, seed=0)
    assert b["pca"].shape == (40, 5) and b["raw_units"].shape == (40, 5) and b["random_directions"].shape == (40, 12)
    scores = b["pca"][train]
    assert np.allclose(scores.mean(0), 0, atol=1e-5)  # centred on the training rows' mean
    assert np.var(scores[:, 0]) >= np.var(scores[:, -1])
    again = control_bases(x, n_random=12, train=train, seed=0)["random_directions"]
    assert np.array_equal(again, b["random_directions"])


class _SpatialPlanted(PlantedAdapter):
    """The planted adapter plus a declared statistic and its rule."""

    @property
    def feature_statistics(self):
        return {"x0_corr": lambda a, o: pd.DataFrame({"r": np.abs(np.corrcoef(a.T, o["x0"].to_numpy())[-1, :-1])})}

    @property
    def unit_rules(self):
        return {"x0_corr": UnitRule("x0_corr", column="r", threshold=0.5, label="|r| with x0")}


def _tiny_run(path: Path, adapter: PlantedAdapter) -> RunContext:
    """A run folder with the planted adapter's store (site "hidden") and ReLU 'latents', one with x0 planted."""
    ex = adapter.examples("all")
    r = np.random.default_rng(5)
    hidden = np.column_stack([ex.obs.x0, r.standard_normal((len(ex), 7))]).astype(np.float32)
    with StoreWriter(path / "activations" / "store", ["hidden"]) as w:
        w.append({"hidden": hidden}, ex.obs)
    latents = np.maximum(0, r.standard_normal((len(ex), 16))).astype(np.float32)
    latents[:, 4] = np.maximum(0, ex.obs.x0)  # the planted latent
    latents[:, 9] = 0.0  # a dead latent
    with StoreWriter(path / "sae" / "latents", ["latents"]) as w:
        w.append({"latents": latents}, ex.obs)
    ctx = RunContext(adapter, run_dir=path)
    ctx.stage = "features"
    return ctx


def test_the_analysis_on_a_tiny_run(tmp_path: Path):
    assert "unit_controls" in [a.name for a in core_analyses() if a.stage == "features"]
    ad = _SpatialPlanted({"n_examples": 200})
    assert ad.sae_site == "hidden"
    ctx = _tiny_run(tmp_path, ad)
    rows, _ = unit_controls_analysis().run(ctx)
    t = pd.read_csv(tmp_path / "features" / "unit_controls.csv")
    assert list(t.columns[:8]) == ["statistic", "basis", "n_units", "n_live", "max", "count", "fraction", "threshold"]
    assert set(t.basis) == {"sae", "pca", "raw_units", "random_directions"}
    s = t.set_index(["statistic", "basis"])
    assert s.loc[("|r| with x0", "sae"), "n_units"] == 16 and s.loc[("|r| with x0", "random_directions"), "n_units"] == 16
    assert s.loc[("|r| with x0", "raw_units"), "n_units"] == 8 and s.loc[("|r| with x0", "sae"), "n_live"] == 15
    assert s.loc[("|r| with x0", "sae"), "count"] == 1 and s.loc[("|r| with x0", "raw_units"), "count"] == 1
    assert s.loc[(ASSOCIATION, "sae"), "count"] >= 1
    names = [r["name"] for r in rows]
    assert "SAE max |r| with x0 over units" in names and "SAE units tied to a concept (FDR 0.05)" in names
    assert all(r["source"] == "features/unit_controls.csv" for r in rows)
    # the features stage's SAE analysis, when there is one, is read rather than recomputed
    lat = ctx.latents()
    fa = analyze_features(np.asarray(lat.array("latents")), lat.obs, concepts=list(ad.concepts),
                          statistics=ad.feature_statistics, control=False)
    fa.associations = fa.associations.iloc[:0]  # empty: recomputed
    fa.extra["x0_corr"] = 0.99  # a marker: every latent 'passes'
    ctx.live["features"] = fa
    unit_controls_analysis().run(ctx)
    s = pd.read_csv(tmp_path / "features" / "unit_controls.csv").set_index(["statistic", "basis"])
    assert s.loc[("|r| with x0", "sae"), "count"] == 16
