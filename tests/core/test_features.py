"""Feature analysis: statistics equal their scipy/sklearn definitions, planted features are found."""

from __future__ import annotations

import json

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pandas as pd
import pytest
from scipy.stats import false_discovery_control, mannwhitneyu, spearmanr
from sklearn.metrics import roc_auc_score

import sciscope.core.features as features_mod
from sciscope.core.errors import NonFiniteError, ShapeError
from sciscope.core.features import (
    ConceptError,
    FeatureAnalysis,
    analyze_features,
    concept_associations,
    feature_density,
    top_examples,
)
from sciscope.core.store import ActivationStore

PLANTED = 5  # the feature that fires only on cell_type == "B"


@pytest.fixture()
def data() -> tuple[np.ndarray, pd.DataFrame]:
    rng = np.random.default_rng(0)
    n, f = 600, 24
    obs = pd.DataFrame(
        {
            "cell_type": rng.choice(["T", "B", "NK", "Mono"], n),
            "is_cycling": rng.random(n) < 0.3,
            "age": rng.normal(50, 10, n),
            "n_genes": rng.integers(0, 3, n),  # few integers -> categorical
        }
    )
    # SAE-like: sparse, non-negative, many exact zeros (ties) and rounded values (more ties).
    acts = np.maximum(rng.normal(-0.5, 1.0, size=(n, f)), 0.0).round(2)
    acts[:, PLANTED] = np.where(obs["cell_type"] == "B", rng.uniform(1.0, 3.0, n), 0.0)
    acts[:, 7] = 0.0  # a dead feature
    acts[:, 9] = np.maximum(obs["age"].to_numpy() - 50 + rng.normal(0, 3, n), 0)  # tracks age
    return acts, obs


# -- the statistics equal their reference definitions ------------------------------------------


def test_auroc_and_mannwhitney_match_references(data) -> None:
    acts, obs = data
    df = concept_associations(acts, obs, ["cell_type"])
    for value in ["B", "T"]:
        rows = df[(df["value"] == value)].set_index("feature")
        pos = (obs["cell_type"] == value).to_numpy()
        for j in [0, 3, PLANTED, 9]:
            assert rows.loc[j, "statistic"] == pytest.approx(roc_auc_score(pos, acts[:, j]), abs=1e-12)
            ref = mannwhitneyu(acts[pos, j], acts[~pos, j], method="asymptotic").pvalue
            assert rows.loc[j, "p"] == pytest.approx(ref, rel=1e-9, abs=1e-300)
            assert rows.loc[j, "n_pos"] == pos.sum()


def test_spearman_matches_scipy(data) -> None:
    acts, obs = data
    df = concept_associations(acts, obs, "age").set_index("feature")
    assert (df["stat"] == "spearman_rho").all() and df["value"].isna().all()
    for j in [0, 1, 9]:
        ref = spearmanr(acts[:, j], obs["age"])
        assert df.loc[j, "statistic"] == pytest.approx(ref.statistic, abs=1e-12)
        assert df.loc[j, "p"] == pytest.approx(ref.pvalue, rel=1e-8, abs=1e-300)


def test_missing_concept_values_are_left_out(data) -> None:
    acts, obs = data
    obs = obs.copy()
    obs.loc[::7, "age"] = np.nan
    keep = obs["age"].notna().to_numpy()
    df = concept_associations(acts, obs, "age").set_index("feature")
    ref = spearmanr(acts[keep, 9], obs.loc[keep, "age"])
    assert df.loc[9, "statistic"] == pytest.approx(ref.statistic, abs=1e-12)
    assert df.loc[9, "n"] == keep.sum()


def test_bh_qvalues_match_scipy_and_dead_features_are_not_tests(data) -> None:
    acts, obs = data
    df = concept_associations(acts, obs, ["cell_type", "is_cycling", "age", "n_genes"])
    dead = df[df["feature"] == 7]
    assert dead["p"].isna().all() and not dead["significant"].any()
    tested = df[df["p"].notna()]
    np.testing.assert_allclose(tested["q"], false_discovery_control(tested["p"].to_numpy()), rtol=1e-12)
    assert (df["significant"] == (df["q"] < 0.05)).all()
    # bool concepts test the positive value only; 4 cell types -> 4 one-vs-rest tests
    assert set(df.loc[df["concept"] == "is_cycling", "value"]) == {True}
    assert df[(df["concept"] == "cell_type") & (df["feature"] == 0)].shape[0] == 4
    assert set(df.loc[df["concept"] == "n_genes", "stat"]) == {"auroc"}


def test_chunking_does_not_change_results(data) -> None:
    acts, obs = data
    a = concept_associations(acts, obs, ["cell_type", "age"])
    b = concept_associations(acts, obs, ["cell_type", "age"], chunk_size=5)
    pd.testing.assert_frame_equal(a, b)


# -- planted signal and the shuffled control ------------------------------------------------------


def test_planted_feature_is_found_and_control_is_empty(data) -> None:
    acts, obs = data
    fa = analyze_features(acts, obs, concepts=["cell_type", "is_cycling", "age"], k=5)
    assert isinstance(fa, FeatureAnalysis)
    hit = fa.associations.query("feature == @PLANTED and concept == 'cell_type' and value == 'B'").iloc[0]
    assert hit["significant"] and hit["statistic"] > 0.99
    best = fa.best_concept.set_index("feature")
    assert best.loc[PLANTED, "concept"] == "cell_type" and best.loc[PLANTED, "value"] == "B"
    assert best.loc[9, "concept"] == "age" and best.loc[9, "stat"] == "spearman_rho"
    assert 7 not in best.index  # the dead feature has no testable association
    summary = fa.summary()
    assert summary["n_significant"] >= 2
    assert summary["control_n_significant"] <= 1
    assert (fa.control_associations["condition"] == "shuffled").all()


def test_shuffled_control_on_pure_noise_has_no_hits() -> None:
    rng = np.random.default_rng(1)
    acts = rng.exponential(size=(500, 60))
    obs = pd.DataFrame({"c": rng.choice(list("abc"), 500), "x": rng.normal(size=500)})
    a = concept_associations(acts, obs, ["c", "x"], control="shuffle", seed=3)
    assert a["significant"].sum() == 0
    b = concept_associations(acts, obs, ["c", "x"], control="shuffle", seed=3)
    pd.testing.assert_frame_equal(a, b)


# -- density, top examples, the statistics slot -----------------------------------------------


def test_density(data) -> None:
    acts, _ = data
    d = feature_density(acts)
    np.testing.assert_allclose(d["density"], (acts > 0).mean(0))
    np.testing.assert_allclose(d["max"], acts.max(0))
    np.testing.assert_allclose(d["mean"], acts.mean(0))
    assert d.loc[7, "density"] == 0 and np.isnan(d.loc[7, "mean_active"])


def test_top_examples_are_the_largest(data, monkeypatch) -> None:
    acts, obs = data
    # A tiny block budget forces the streaming merge over many row blocks.
    monkeypatch.setattr(features_mod, "_BLOCK_BYTES", 8 * 24 * 37)
    top = top_examples(acts, obs, k=4, features=[0, PLANTED, 9])
    assert list(top.columns[:4]) == ["feature", "rank", "activation", "row"]
    assert len(top) == 3 * 4
    for j in [0, PLANTED, 9]:
        t = top[top["feature"] == j]
        np.testing.assert_allclose(t["activation"], np.sort(acts[:, j])[::-1][:4])
        np.testing.assert_allclose(acts[t["row"], j], t["activation"])
        assert list(t["rank"]) == [1, 2, 3, 4]
    planted = top[top["feature"] == PLANTED]
    assert (planted["cell_type"] == "B").all()


def test_statistics_slot_merges_adapter_stat(data) -> None:
    acts, obs = data

    def spread(chunk: np.ndarray, o: pd.DataFrame) -> pd.DataFrame:
        assert len(o) == chunk.shape[0]
        return pd.DataFrame({"I": chunk.std(0), "p_sim": np.full(chunk.shape[1], 0.5)})

    fa = analyze_features(
        acts, obs, concepts="cell_type", statistics={"morans_i": spread, "peak": lambda c, o: c.max(0)},
        chunk_size=5, control=False,
    )
    assert list(fa.extra.columns) == ["feature", "morans_i_I", "morans_i_p_sim", "peak"]
    np.testing.assert_allclose(fa.extra["morans_i_I"], acts.std(0))
    np.testing.assert_allclose(fa.extra["peak"], acts.max(0))
    merged = fa.features
    assert len(merged) == acts.shape[1] and "best_concept" in merged and "peak" in merged
    assert fa.control_associations is None


def test_statistic_with_wrong_length_is_an_error(data) -> None:
    acts, obs = data
    with pytest.raises(ShapeError, match="'bad'"):
        analyze_features(acts, obs, concepts="age", statistics={"bad": lambda c, o: np.zeros(2)}, control=False)


def test_store_input_equals_array_input(data, tmp_path) -> None:
    acts, obs = data
    store = ActivationStore.from_arrays(obs, {"sae.latents": acts, "other": acts[:, :3]})
    a = concept_associations(store, concepts=["cell_type"], site="sae.latents")
    b = concept_associations(acts, obs, ["cell_type"])
    pd.testing.assert_frame_equal(a, b)
    fa = analyze_features(store, site="sae.latents", concepts=["cell_type"], k=3)
    out = fa.save(tmp_path / "features")
    assert {"density.csv", "top_examples.csv", "associations.csv", "control_associations.csv", "params.json"} <= {
        p.name for p in out.iterdir()
    }
    assert json.loads((out / "params.json").read_text())["concepts"] == ["cell_type"]
    import matplotlib.axes

    assert isinstance(fa.plot_density(), matplotlib.axes.Axes)
    matplotlib.pyplot.close("all")


# -- errors ---------------------------------------------------------------------------------------


def test_error_unknown_concept_lists_close_matches(data) -> None:
    acts, obs = data
    with pytest.raises(ConceptError, match=r"'cell_typ'.*cell_type"):
        concept_associations(acts, obs, ["cell_typ"])


def test_error_row_mismatch_names_both_counts(data) -> None:
    acts, obs = data
    with pytest.raises(ShapeError, match=r"600 rows.*599 rows"):
        analyze_features(acts, obs.iloc[:-1], concepts="age")


def test_error_nan_in_acts(data) -> None:
    acts, obs = data
    acts = acts.copy()
    acts[11, 3] = np.nan
    with pytest.raises(NonFiniteError, match=r"row 11, feature 3"):
        concept_associations(acts, obs, "age")
    with pytest.raises(NonFiniteError):
        feature_density(acts)


def test_error_identifier_like_concept(data) -> None:
    acts, obs = data
    obs = obs.assign(barcode=[f"cell{i}" for i in range(len(obs))])
    with pytest.raises(ConceptError, match=r"'barcode' has 600 distinct values"):
        concept_associations(acts, obs, "barcode")


# ------------------------------------------------------------------------------------------------
# Group-level associations
# ------------------------------------------------------------------------------------------------


def _grouped(n_groups: int = 30, per_group: int = 60, n_features: int = 40, seed: int = 0):
    """Rows nested in groups: the concept is constant within a group; each feature is a group effect
    plus row noise, with no link to the concept -- every true association is null."""
    rng = np.random.default_rng(seed)
    g = np.repeat(np.arange(n_groups), per_group)
    flag = rng.random(n_groups) < 0.5
    dose = rng.normal(size=n_groups)
    acts = rng.normal(size=(n_groups, n_features))[g] + 0.3 * rng.normal(size=(g.size, n_features))
    obs = pd.DataFrame({"donor": [f"d{i:02d}" for i in g], "flag": flag[g], "dose": dose[g],
                        "cell_type": rng.choice(["T", "B", "NK"], g.size)})
    return acts, obs


def test_group_level_p_values_are_calibrated_where_row_level_ones_are_wildly_optimistic():
    acts, obs = _grouped()
    rows = concept_associations(acts, obs, ["flag", "dose"])
    groups = concept_associations(acts, obs, ["flag", "dose"], groups="donor")
    # pseudo-replication: 60 rows per group count each group's offset 60 times
    assert (rows.p < 0.05).mean() > 0.6 and rows.significant.mean() > 0.4
    assert (groups.p < 0.05).mean() < 0.15 and groups.significant.sum() == 0
    assert (groups.n == 30).all() and (rows.n == 1800).all()
    flag = groups[groups.concept == "flag"]
    assert (flag.value == True).all() and (flag.n_pos == obs.groupby("donor").flag.first().sum()).all()  # noqa: E712
    # the group-level test is the row-level test of the group means
    means = pd.DataFrame(acts).groupby(obs.donor.to_numpy()).mean().to_numpy()
    gobs = obs.groupby("donor")[["flag", "dose"]].first().reset_index(drop=True)
    direct = concept_associations(means, gobs, ["flag", "dose"])
    np.testing.assert_allclose(groups.p.to_numpy(), direct.p.to_numpy())
    np.testing.assert_allclose(groups.statistic.to_numpy(), direct.statistic.to_numpy())


def test_group_level_finds_a_real_group_effect_and_singleton_groups_equal_rows():
    acts, obs = _grouped(n_features=5)
    flag = obs.flag.to_numpy()
    acts[:, 0] += 2.0 * flag  # a feature that really tracks the groups' concept
    g = concept_associations(acts, obs, ["flag"], groups="donor")
    assert g.loc[g.feature == 0, "significant"].item() and g.loc[g.feature != 0, "significant"].sum() == 0
    one = concept_associations(acts[:200], obs.iloc[:200], ["flag", "dose", "cell_type"])
    single = concept_associations(acts[:200], obs.iloc[:200], ["flag", "dose", "cell_type"], groups=np.arange(200))
    pd.testing.assert_frame_equal(one, single)


def test_group_level_concept_that_varies_within_groups_becomes_a_share_and_shuffle_swaps_groups():
    acts, obs = _grouped(n_features=6)
    share_b = obs.assign(b=obs.cell_type == "B").groupby("donor").b.mean().to_numpy()
    acts[:, 2] += 50.0 * share_b[np.repeat(np.arange(30), 60)]  # tracks the donor's share of B cells
    g = concept_associations(acts, obs, ["cell_type"], groups="donor")
    assert set(g.value) == {"B", "NK", "T"} and (g.stat == "spearman_rho").all() and (g.concept == "cell_type").all()
    b = g[g.value == "B"].set_index("feature")
    assert b.loc[2, "effect"] > 0.5 and b.loc[2, "p"] < 1e-3
    ctrl = concept_associations(acts, obs, ["flag", "cell_type"], groups="donor", control="shuffle", seed=3)
    assert (ctrl.condition == "shuffled").all() and (ctrl.n == 30).all()
    fa = analyze_features(acts, obs, concepts=None, groups="donor", k=2)
    assert "donor" not in set(fa.associations.concept) and fa.params["groups"] == "donor"
    assert fa.control_associations is not None and (fa.control_associations.n == 30).all()
    with pytest.raises(ConceptError, match="donr"):
        concept_associations(acts, obs, ["flag"], groups="donr")
