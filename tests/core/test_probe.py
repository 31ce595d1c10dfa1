"""Probes: planted signals are found, controls stay at chance, numbers match scikit-learn."""

from __future__ import annotations

import json
import warnings

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression, RidgeCV
from sklearn.metrics import accuracy_score, r2_score, roc_auc_score
from sklearn.model_selection import KFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from sciscope.core.errors import NonFiniteError, ProbeError, SiteError
from sciscope.core.probe import DEFAULT_ALPHAS, ProbeResult, fit_probe, infer_kind, probe_sweep
from sciscope.core.store import ActivationStore


def _regression(n: int = 400, d: int = 20, noise: float = 0.3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    # Uneven scales and offsets, so standardisation and the raw-space mapping are exercised.
    X = rng.normal(size=(n, d)) * rng.uniform(0.2, 5.0, size=d) + rng.normal(size=d) * 3
    w = rng.normal(size=d)
    y = X @ w
    y = y + noise * y.std() * rng.normal(size=n)
    return X, y


def _classes(n: int = 450, d: int = 16, k: int = 3, sep: float = 3.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    means = rng.normal(size=(k, d)) * sep / np.sqrt(d)
    X = means[y] + rng.normal(size=(n, d))
    return X, y


# -- planted signals and controls ---------------------------------------------------------------


def test_ridge_recovers_planted_signal_control_near_zero() -> None:
    X, y = _regression(noise=0.1)
    res = fit_probe(X, y, kind="ridge")
    assert res.kind == "ridge" and res.metric == "r2"
    assert res.mean > 0.9
    assert abs(res.control_mean) < 0.1
    assert res.scores["r2"].shape == (5,)
    assert np.all(res.scores["pearson_r"] > 0.95)


def test_logistic_recovers_planted_classes_control_at_chance() -> None:
    X, y = _classes(k=3, sep=6.0)
    res = fit_probe(X, y)
    assert res.kind == "logistic" and res.metric == "accuracy"
    assert res.mean > 0.9
    chance = res.params["chance_accuracy"]
    assert abs(res.control_mean - chance) < 0.1
    assert set(res.scores) == {"accuracy", "f1_macro"}


def test_binary_logistic_reports_auroc() -> None:
    X, y = _classes(k=2, sep=4.0)
    res = fit_probe(X, np.where(y == 1, "active", "inactive"))
    assert set(res.scores) == {"accuracy", "f1_macro", "auroc"}
    assert res.scores["auroc"].mean() > 0.9
    assert abs(res.control_scores["auroc"].mean() - 0.5) < 0.1
    assert list(res.classes) == ["active", "inactive"]
    assert res.coef.shape == (X.shape[1],)
    assert np.mean(res.predict(X) == np.where(y == 1, "active", "inactive")) > 0.9


# -- numerical agreement with scikit-learn --------------------------------------------------------


@pytest.mark.parametrize("shape", [(300, 12), (40, 60)], ids=["long", "wide"])
def test_ridge_matches_sklearn_ridgecv_svd(shape: tuple[int, int]) -> None:
    X, y = _regression(*shape, noise=1.0, seed=1)
    res = fit_probe(X, y, kind="ridge", seed=3)
    folds = list(KFold(5, shuffle=True, random_state=3).split(X))
    ref, ref_alpha = [], []
    for (tr, te), (rtr, rte) in zip(folds, res.folds):
        np.testing.assert_array_equal(te, rte)
        model = make_pipeline(StandardScaler(), RidgeCV(alphas=DEFAULT_ALPHAS, gcv_mode="svd")).fit(X[tr], y[tr])
        ref.append(r2_score(y[te], model.predict(X[te])))
        ref_alpha.append(model[-1].alpha_)
    np.testing.assert_allclose(res.scores["r2"], ref, atol=1e-6, rtol=0)
    np.testing.assert_allclose(res.alphas, ref_alpha)
    # The all-rows direction, mapped back to raw features, equals sklearn's.
    full = make_pipeline(StandardScaler(), RidgeCV(alphas=DEFAULT_ALPHAS, gcv_mode="svd")).fit(X, y)
    np.testing.assert_allclose(res.coef, full[-1].coef_ / full[0].scale_, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(res.predict(X), full.predict(X), rtol=1e-6, atol=1e-6)


def test_ridge_without_standardisation_matches_plain_ridgecv() -> None:
    X, y = _regression(noise=1.0, seed=2)
    alphas = (0.1, 1.0, 10.0, 100.0)
    res = fit_probe(X, y, kind="ridge", alphas=alphas, standardize=False, control=False)
    ref = [
        r2_score(y[te], RidgeCV(alphas=alphas, gcv_mode="svd").fit(X[tr], y[tr]).predict(X[te]))
        for tr, te in res.folds
    ]
    np.testing.assert_allclose(res.scores["r2"], ref, atol=1e-6, rtol=0)
    assert res.control_scores is None


@pytest.mark.parametrize("k", [2, 4])
def test_logistic_matches_sklearn(k: int) -> None:
    X, y = _classes(n=500, d=24, k=k, sep=1.5, seed=k)
    res = fit_probe(X, y, kind="logistic", C=0.5)
    ref = []
    for tr, te in res.folds:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = make_pipeline(StandardScaler(), LogisticRegression(C=0.5, max_iter=2000)).fit(X[tr], y[tr])
        ref.append(accuracy_score(y[te], model.predict(X[te])))
    assert abs(res.mean - np.mean(ref)) < 0.01
    assert np.max(np.abs(res.scores["accuracy"] - ref)) < 0.02
    full = make_pipeline(StandardScaler(), LogisticRegression(C=0.5, max_iter=5000, tol=1e-10)).fit(X, y)
    coef = np.atleast_2d(full[-1].coef_ / full[0].scale_)
    np.testing.assert_allclose(np.atleast_2d(res.coef), coef, atol=1e-3 * np.abs(coef).max())


# -- splits ---------------------------------------------------------------------------------------


def test_group_split_never_puts_a_group_on_both_sides() -> None:
    X, y = _regression(n=300)
    groups = np.repeat(np.arange(30), 10)
    res = fit_probe(X, y, groups=groups)
    assert res.params["split"] == "group"
    for tr, te in res.folds:
        assert not set(groups[tr]) & set(groups[te])
    assert np.array_equal(np.sort(np.concatenate([te for _, te in res.folds])), np.arange(300))


def test_stratified_is_default_for_classes() -> None:
    X, y = _classes(n=300, k=3)
    res = fit_probe(X, y)
    assert res.params["split"] == "stratified"
    for _, te in res.folds:
        frac = np.bincount(y[te], minlength=3) / te.size
        np.testing.assert_allclose(frac, np.bincount(y, minlength=3) / y.size, atol=0.03)


def test_sweep_groups_rows_of_one_example_by_default() -> None:
    X, y = _regression(n=240, d=8)
    obs = pd.DataFrame({"example": np.repeat(np.arange(40), 6), "y": y})
    store = ActivationStore.from_arrays(obs, {"a": X})
    sweep = probe_sweep(store, "y", progress=False)
    res = sweep[("a", "y")]
    assert res.params["split"] == "group" and res.params["groups"] == "example"
    assert "example" in sweep.params["split_note"]
    ex = obs["example"].to_numpy()
    for tr, te in res.folds:
        assert not set(ex[tr]) & set(ex[te])


# -- sweeps ---------------------------------------------------------------------------------------


@pytest.fixture()
def sweep_store() -> ActivationStore:
    rng = np.random.default_rng(0)
    n, d = 300, 10
    latent = rng.normal(size=n)
    label = (latent + 0.3 * rng.normal(size=n) > 0).astype(int)
    obs = pd.DataFrame({"value": latent, "cls": np.where(label == 1, "yes", "no")})
    arrays = {}
    for layer, strength in enumerate([0.0, 0.5, 3.0]):  # the signal grows with depth
        X = rng.normal(size=(n, d))
        X[:, 0] += strength * latent
        arrays[f"layers.{layer}"] = X
    return ActivationStore.from_arrays(obs, arrays)


def test_sweep_table_summary_best_plot_save(sweep_store: ActivationStore, tmp_path) -> None:
    base = np.random.default_rng(1).normal(size=(300, 4))
    sweep = probe_sweep(sweep_store, ["value", "cls"], baseline={"noise": base}, progress=False)
    assert sweep.sites == ["layers.0", "layers.1", "layers.2"]
    table = sweep.table
    assert list(table.columns) == ["site", "target", "kind", "metric", "condition", "baseline", "fold", "score", "alpha"]
    # per site: value (2 metrics) + cls (3 metrics) = 5 metrics x 5 folds x (probe, control)
    assert (table["condition"] != "baseline").sum() == 3 * 5 * 5 * 2
    # baselines once per target: 5 metrics x 5 folds
    assert (table["condition"] == "baseline").sum() == 5 * 5
    summary = sweep.summary()
    assert summary.shape[0] == 3 * 2
    assert {"score_mean", "score_std", "control_mean", "baseline_mean", "alpha"} <= set(summary.columns)
    assert summary.loc[summary.target == "cls", "metric"].eq("accuracy").all()
    best = sweep.best("value")
    assert isinstance(best, ProbeResult) and best.site == "layers.2" and best.mean > 0.8
    assert sweep.best("cls").site == "layers.2"
    assert summary.loc[summary.target == "value", "baseline_mean"].max() < 0.1

    import matplotlib.axes

    ax = sweep.plot("value")
    assert isinstance(ax, matplotlib.axes.Axes)
    assert isinstance(sweep.plot(), matplotlib.axes.Axes)
    matplotlib.pyplot.close("all")

    out = sweep.save(tmp_path / "probes")
    assert {p.name for p in out.iterdir()} == {"table.csv", "summary.csv", "params.json", "directions.npz"}
    params = json.loads((out / "params.json").read_text())
    assert params["seed"] == 0 and params["targets"] == ["value", "cls"] and params["baselines"] == ["noise"]
    assert len(pd.read_csv(out / "table.csv")) == len(table)


def test_probe_plot_bands_span_the_folds_and_baselines_have_their_own_named_colours(sweep_store: ActivationStore, tmp_path) -> None:
    from matplotlib.colors import to_rgba

    rng = np.random.default_rng(1)
    baselines = {"noise": rng.normal(size=(300, 4)), "half signal": np.c_[sweep_store.obs["value"].to_numpy()
                                                                          + rng.normal(size=300)]}
    sweep = probe_sweep(sweep_store, ["value"], baseline=baselines, progress=False)
    ax = sweep.plot("value")
    labels = ax.get_legend_handles_labels()[1]
    assert labels == ["probe (band: fold range)", "shuffled labels (control)", "baseline: noise", "baseline: half signal"]
    lines = dict(zip(labels, ax.get_legend_handles_labels()[0]))
    colours = {name: to_rgba(h.get_color()) for name, h in lines.items()}
    assert len(set(colours.values())) == 4  # probe, control and each baseline told apart by colour
    # the probe's band runs from the lowest to the highest fold score at every site
    folds = np.array([sweep[(s, "value")].scores["r2"] for s in sweep.sites])
    ys = ax.collections[0].get_paths()[0].vertices[:, 1]
    assert ys.min() == pytest.approx(folds.min()) and ys.max() == pytest.approx(folds.max())
    # each baseline sits at its mean over folds
    for name in baselines:
        y = lines[f"baseline: {name}"].get_ydata()[0]
        assert y == pytest.approx(np.mean(sweep[(sweep.sites[0], "value")].baseline_scores[name]["r2"]))
    assert ax.get_xlabel() == "site: layers.<i>" and [t.get_text() for t in ax.get_xticklabels()] == ["0", "1", "2"]
    se = sweep.plot("value", band="se")
    assert se.get_legend_handles_labels()[1][0] == "probe (band: ± SE over folds)"
    with pytest.raises(ValueError, match="band"):
        sweep.plot("value", band="iqr")  # type: ignore[arg-type]
    matplotlib.pyplot.close("all")

    # a saved sweep reads back: same summary, same plot
    from sciscope.core.probe import ProbeSweepResult

    back = ProbeSweepResult.load(sweep.save(tmp_path / "probes"))
    assert back.sites == sweep.sites and back.targets == ["value"]
    cols = ["site", "target", "metric", "score_mean", "score_std", "control_mean", "baseline", "baseline_mean", "alpha"]
    pd.testing.assert_frame_equal(back.summary()[cols], sweep.summary()[cols])
    assert np.allclose(back[("layers.2", "value")].coef, sweep[("layers.2", "value")].coef)
    assert back.plot("value").get_legend_handles_labels()[1] == labels
    matplotlib.pyplot.close("all")


def test_thirty_layer_site_axis_stays_readable() -> None:
    """30 sites: at most 16 labels, short and distinct, none overlapping; the cut prefix in the axis label."""
    import matplotlib.pyplot as plt

    from sciscope.core.plotting import label_sites, short_site_labels, site_axis_label

    sites = [f"model.layers.{i}.mlp.down_proj:input" for i in range(30)]
    labels, template = short_site_labels(sites)
    assert labels == [str(i) for i in range(30)] and template == "model.layers.<i>.mlp.down_proj:input"
    mixed = ["model.embed_tokens", *[f"model.layers.{i}" for i in range(30)], "model.norm"]
    labels, template = short_site_labels(mixed)
    assert labels[:3] == ["embed_tokens", "0", "1"] and labels[-1] == "norm" and template == "model.layers.<i>"
    assert len(set(labels)) == len(labels)
    # a suffix most sites share goes too, though the named sites lack it
    labels, template = short_site_labels(["model.embed_tokens", *[f"model.layers.{i}.mlp" for i in range(30)]])
    assert labels[:2] == ["embed_tokens", "0"] and labels[-1] == "29" and template == "model.layers.<i>.mlp"
    assert short_site_labels(["layer1", "layer2"]) == (["layer1", "layer2"], "")  # never cut inside a name

    for names in (sites, mixed):
        fig, ax = plt.subplots(figsize=(4.2, 3.6))  # one panel of the probe stage's figure
        ax.plot(range(len(names)), np.linspace(0, 1, len(names)))
        ax.set_xlabel(site_axis_label(label_sites(ax, names)))
        fig.tight_layout()
        fig.canvas.draw()
        shown = [t for t in ax.get_xticklabels() if t.get_text()]
        texts = [t.get_text() for t in shown]
        assert 2 <= len(shown) <= 16 and len(set(texts)) == len(texts)
        assert max(len(t) for t in texts) <= 14
        # every site keeps a tick (matplotlib hides the minor ticks under the major ones)
        assert set(ax.get_xticks()) | set(ax.get_xticks(minor=True)) == set(range(len(names)))
        boxes = sorted((t.get_window_extent() for t in shown), key=lambda b: b.x0)
        assert all(a.x1 <= b.x0 for a, b in zip(boxes, boxes[1:])), "tick labels overlap"
        assert ax.get_xlabel().startswith("site: model.layers.<i>")
        plt.close(fig)


def test_sweep_is_deterministic(sweep_store: ActivationStore) -> None:
    a = probe_sweep(sweep_store, ["value", "cls"], seed=7, progress=False).table
    b = probe_sweep(sweep_store, ["value", "cls"], seed=7, progress=False).table
    pd.testing.assert_frame_equal(a, b)
    c = probe_sweep(sweep_store, ["value", "cls"], seed=8, progress=False).table
    assert not np.allclose(a["score"], c["score"])


def test_infer_kind() -> None:
    assert infer_kind(pd.Series([0.1, 2.5, 3.3, 4.0, 5.1, 6.2, 7.7, 8.0, 9.9, 10.5, 11.0])) == "ridge"
    assert infer_kind(pd.Series(np.arange(100))) == "ridge"
    assert infer_kind(pd.Series([0, 1, 2, 1, 0])) == "logistic"
    assert infer_kind(pd.Series([True, False])) == "logistic"
    assert infer_kind(pd.Series(["a", "b"])) == "logistic"
    assert infer_kind(pd.Series(["a", "b"], dtype="category")) == "logistic"


# -- errors ---------------------------------------------------------------------------------------


def test_error_single_class() -> None:
    X, _ = _classes(n=50)
    with pytest.raises(ProbeError, match=r"'label'.*single class"):
        fit_probe(X, pd.Series(["x"] * 50, name="label"))


def test_error_missing_target_lists_close_matches(sweep_store: ActivationStore) -> None:
    with pytest.raises(ProbeError, match=r"'valeu'.*value"):
        probe_sweep(sweep_store, "valeu", progress=False)


def test_error_unknown_site(sweep_store: ActivationStore) -> None:
    with pytest.raises(SiteError, match="layers.9"):
        probe_sweep(sweep_store, "value", sites=["layers.9"], progress=False)


def test_error_nan_target_counts_rows_and_dropna_works() -> None:
    X, y = _regression(n=100)
    y = pd.Series(y, name="logP")
    y[[3, 10, 20]] = np.nan
    with pytest.raises(ProbeError, match=r"'logP'.*3 missing.*dropna=True"):
        fit_probe(X, y)
    res = fit_probe(X, y, dropna=True)
    assert res.params["n_obs"] == 97 and res.params["n_dropped"] == 3
    assert not {3, 10, 20} & set(np.concatenate([te for _, te in res.folds]))


def test_error_nonfinite_activations_names_site(sweep_store: ActivationStore) -> None:
    X = sweep_store.array("layers.1").copy()
    X[5, 2] = np.inf
    store = ActivationStore.from_arrays(sweep_store.obs, {"layers.0": sweep_store.array("layers.0"), "layers.1": X})
    with pytest.raises(ProbeError, match=r"'layers.1'.*1 rows.*row 5") as err:
        probe_sweep(store, "value", progress=False)
    assert isinstance(err.value, NonFiniteError)


def test_error_fewer_rows_than_folds() -> None:
    with pytest.raises(ProbeError, match=r"'y'.*3 rows.*cv=5"):
        fit_probe(np.random.default_rng(0).normal(size=(3, 2)), [0.1, 0.5, 0.9])


def test_error_rare_class_in_stratified_split() -> None:
    X, _ = _classes(n=60)
    y = np.array(["a"] * 30 + ["b"] * 27 + ["rare"] * 3)
    with pytest.raises(ProbeError, match=r"class 'rare' has only 3 rows.*cv=5"):
        fit_probe(X, y)


def test_error_too_few_groups() -> None:
    X, y = _regression(n=60)
    with pytest.raises(ProbeError, match=r"only 3 distinct groups in 'scaffold'.*cv=5"):
        store = ActivationStore.from_arrays(pd.DataFrame({"y": y, "scaffold": np.repeat([0, 1, 2], 20)}), {"s": X})
        probe_sweep(store, "y", groups="scaffold", progress=False)


def test_logistic_matches_sklearn_when_fold_means_differ() -> None:
    # Groups shifted far apart make each training fold's mean differ from the global one, which
    # exercises the per-fold standardisation folded into the weights.
    rng = np.random.default_rng(5)
    groups = np.repeat(np.arange(10), 40)
    X = rng.normal(size=(400, 12)) + rng.normal(scale=4.0, size=(10, 12))[groups]
    y = (X[:, 0] - X[:, 0].mean() + 2 * rng.normal(size=400) > 0).astype(int)
    res = fit_probe(X, y, groups=groups, C=0.05, control=False)
    ref = []
    for tr, te in res.folds:
        model = make_pipeline(StandardScaler(), LogisticRegression(C=0.05, tol=1e-10, max_iter=5000)).fit(X[tr], y[tr])
        ref.append(roc_auc_score(y[te], model.decision_function(X[te])))
    np.testing.assert_allclose(res.scores["auroc"], ref, atol=2e-3)


def test_ridge_folds_treat_a_column_constant_on_the_training_rows_as_sklearn_does():
    """A one-hot column none of a fold's training rows has (a country held out whole) is constant
    there: StandardScaler gives it scale 1. The fold downdate's round-off must not turn it into a
    tiny spread that blows up the test rows (this test fails without the fix)."""
    from sciscope.core.probe import _ridge_cv

    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(40), 8)  # 40 countries, 8 places each
    X = np.eye(40)[groups] + 0.0  # (320, 40) one-hot
    y = rng.normal(size=40)[groups] + 0.3 * rng.normal(size=len(groups))
    order = rng.permutation(40)
    folds = [(np.flatnonzero(~np.isin(groups, order[k::5])), np.flatnonzero(np.isin(groups, order[k::5]))) for k in range(5)]
    alphas = np.asarray(DEFAULT_ALPHAS, dtype=float)
    ours = _ridge_cv(X, y[:, None], folds, alphas, standardize=True)["r2"][0]
    ref = [r2_score(y[te], make_pipeline(StandardScaler(), RidgeCV(alphas=alphas)).fit(X[tr], y[tr]).predict(X[te]))
           for tr, te in folds]
    np.testing.assert_allclose(ours, ref, atol=1e-6)
