"""How good is an SAE, against the bases it must beat: PCA, the site's raw units, random directions.

An SAE's features are only interesting if they are better units than the ones we had for free. The
quality table (``sae/quality.csv``) puts the SAE beside

- **PCA** (explained variance and loss recovered with as many components as the SAE's L0; as units,
  the principal components' scores),
- the site's **raw units** (its neurons or channels),
- **random directions** (as many unit-norm directions as the SAE has latents: the control for every
  maximum over units -- the best of many units is high by chance alone),

on held-out rows (the SAE's own rows -- positions when it learns positions -- for explained variance
and live fraction; one row per held-out example for the concept measures, the SAE's units there
being its example latents): explained variance, loss recovered (from the fidelity analysis), live fraction,
k-sparse probing of the domain's concepts (SAEBench: the k units whose class means differ most on
the training rows, then a logistic regression on them; balanced accuracy on held-out rows, k = 1
and 5), the best single unit's F1 for each concept (InterPLM: unit and threshold chosen on a
validation split, scored on the test split), duplicates (pairs of live latents whose decoder rows
have cosine > 0.9) and stability (mean over live latents of the best decoder cosine to an SAE
trained from another seed).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from ..verdict import FRACTION_MARGIN

if TYPE_CHECKING:
    from ..context import RunContext
    from ..experiment import Analysis

#: the units each basis offers, as columns of the quality table
BASES = ("sae", "pca", "raw_units", "random_directions")


def binary_targets(obs: pd.DataFrame, concepts: list[str], *, min_rows: int = 10) -> dict[str, np.ndarray]:
    """Binary classification targets from concept columns.

    A boolean or two-valued column is one target; a categorical column with 3-20 values gives one
    one-vs-rest target per value with at least ``min_rows`` rows (``"cell_type=B"``); continuous
    columns are skipped (k-sparse probing is a classification benchmark).
    """
    out: dict[str, np.ndarray] = {}
    for c in concepts:
        if c not in obs.columns:
            continue
        col = obs[c]
        values = col.dropna().unique()
        if len(values) < 2:
            continue
        numeric = pd.api.types.is_numeric_dtype(col) and not pd.api.types.is_bool_dtype(col)
        if len(values) == 2:
            positive = sorted(values, key=str)[-1]
            out[c] = (col == positive).to_numpy()
        elif not numeric and len(values) <= 20:
            for v in sorted(values, key=str):
                y = (col == v).to_numpy()
                if min_rows <= y.sum() <= len(y) - min_rows:
                    out[f"{c}={v}"] = y
    return {k: y for k, y in out.items() if min_rows <= y.sum() <= len(y) - min_rows}


def _balanced_accuracy(y: np.ndarray, pred: np.ndarray) -> float:
    return float(0.5 * ((pred[y] == 1).mean() + (pred[~y] == 0).mean()))


def k_sparse_probe(train: np.ndarray, y_train: np.ndarray, test: np.ndarray, y_test: np.ndarray, k: int) -> float:
    """Balanced held-out accuracy of a logistic regression on the ``k`` units whose class means
    differ most (in units of their spread) on the training rows.

    Parameters
    ----------
    train, test
        ``(N, U)`` unit activations.
    y_train, y_test
        Boolean targets.
    k
        Units kept.
    """
    from sklearn.linear_model import LogisticRegression

    spread = train.std(0) + 1e-8
    gap = np.abs(train[y_train].mean(0) - train[~y_train].mean(0)) / spread
    top = np.argsort(-gap, kind="stable")[:k]
    mu, sd = train[:, top].mean(0), train[:, top].std(0) + 1e-8
    clf = LogisticRegression(max_iter=1000, class_weight="balanced").fit((train[:, top] - mu) / sd, y_train)
    return _balanced_accuracy(y_test, clf.predict((test[:, top] - mu) / sd).astype(int))


def best_unit_f1(val: np.ndarray, y_val: np.ndarray, test: np.ndarray, y_test: np.ndarray,
                 *, n_thresholds: int = 10) -> tuple[float, int, float]:
    """InterPLM's feature-concept F1: the (unit, threshold) pair with the best F1 on the validation
    rows, scored on the test rows; thresholds are quantiles of each unit on the validation rows
    (a unit fires when above). Returns ``(test F1, unit, threshold)``."""
    qs = np.quantile(val, np.linspace(0.5, 0.99, n_thresholds), axis=0)  # (T, U)
    best = (-1.0, 0, 0.0)
    pos = y_val.sum()
    for t in range(qs.shape[0]):
        fire = val > qs[t]  # (N, U)
        tp = (fire & y_val[:, None]).sum(0)
        f1 = 2 * tp / (fire.sum(0) + pos + 1e-12)
        u = int(f1.argmax())
        if f1[u] > best[0]:
            best = (float(f1[u]), u, float(qs[t, u]))
    _, unit, thr = best
    fire = test[:, unit] > thr
    tp = float((fire & y_test).sum())
    return 2 * tp / (fire.sum() + y_test.sum() + 1e-12), unit, thr


def decoder_duplicates(w_dec: np.ndarray, live: np.ndarray, threshold: float = 0.9) -> int:
    """Pairs of live latents whose decoder rows ``(d_sae, d_in)`` have cosine above ``threshold``."""
    w = w_dec[live]
    w = w / (np.linalg.norm(w, axis=1, keepdims=True) + 1e-12)
    cos = w @ w.T
    return int((np.triu(cos, 1) > threshold).sum())


def stability(w_a: np.ndarray, w_b: np.ndarray, live: np.ndarray) -> float:
    """Mean over ``w_a``'s live latents of the best cosine to any decoder row of ``w_b``."""
    a = w_a[live] / (np.linalg.norm(w_a[live], axis=1, keepdims=True) + 1e-12)
    b = w_b / (np.linalg.norm(w_b, axis=1, keepdims=True) + 1e-12)
    return float((a @ b.T).max(1).mean()) if len(a) else float("nan")


def unit_activations(x: np.ndarray, sae: Any, pca_basis: np.ndarray, pca_mean: np.ndarray,
                     random_dirs: np.ndarray) -> dict[str, np.ndarray]:
    """The units of every basis on rows ``x`` ``(N, D)``: SAE codes, PCA scores, raw units, random projections."""
    with torch.no_grad():
        codes = sae.encode(torch.as_tensor(x, dtype=torch.float32)).numpy()
    return {"sae": codes, "pca": (x - pca_mean) @ pca_basis.T, "raw_units": x, "random_directions": x @ random_dirs.T}


def quality_table(ctx: "RunContext", *, stability_seed: int | None = None) -> pd.DataFrame:
    """The run's SAE beside PCA, the raw units and random directions (see the module docstring).

    Returns
    -------
    pandas.DataFrame
        Columns ``metric``, one per basis (:data:`BASES`), ``note``.
    """
    from ..errors import SciscopeError
    from .metrics import random_directions

    site = ctx.adapter.sae_site
    sae = ctx.live["sae"] if "sae" in ctx.live else ctx.sae()
    metrics = ctx.sae_metrics()
    train_rows, test_rows = ctx.sae_rows()  # the SAE's own rows: positions, or pooled rows
    rng = np.random.default_rng(ctx.seed)
    # reconstruction-side measures read at most this many held-out rows (codes are (N, d_sae) dense)
    test_idx = np.sort(rng.choice(test_rows.n_obs, size=min(test_rows.n_obs, 20_000), replace=False))
    x_test = np.asarray(test_rows.array(site, test_idx), dtype=np.float64)
    d, d_sae = x_test.shape[1], int(sae.cfg.d_sae)
    mean, vt = ctx.sae_pca()  # (D,), (D, D)
    random_dirs = random_directions(d_sae, d, ctx.seed)
    units_test = unit_activations(x_test, sae, vt, mean, random_dirs)
    # concept measures read one row per example: the pooled rows and the SAE's example latents (the
    # mean code of an example's positions when the SAE learns positions); PCA scores and random
    # projections are linear, so those of the pooled row are the pooled scores
    store = ctx.store()
    if "latents" in ctx.live:
        latents = ctx.live["latents"]
    else:
        try:
            latents = ctx.latents().array("latents")
        except SciscopeError:
            latents = ctx.example_latents(sae)
    ex_x = np.asarray(store.array(site), dtype=np.float64)
    ex_units = unit_activations(ex_x, sae, vt, mean, random_dirs)
    ex_units["sae"] = np.asarray(latents, dtype=np.float64)
    obs = store.obs
    held = (obs["split"] == "test").to_numpy() if "split" in obs.columns else np.zeros(len(obs), bool)
    if held.any() and (~held).sum() >= 2:
        ex_train, ex_test = np.flatnonzero(~held), np.flatnonzero(held)
    else:
        ex_train = ex_test = np.arange(len(obs))
    units_train = {b: u[ex_train] for b, u in ex_units.items()}
    units_ex_test = {b: u[ex_test] for b, u in ex_units.items()}

    rows: list[dict[str, Any]] = []

    def add(metric: str, values: Mapping[str, float], note: str = "") -> None:
        rows.append({"metric": metric, **{b: values.get(b, np.nan) for b in BASES}, "note": note})

    add("explained variance (held-out)", {"sae": metrics["explained_variance"], "pca": metrics["pca_explained_variance"],
                                          "raw_units": 1.0},
        f"PCA with {round(metrics['l0'])} components (the SAE's L0); raw units reconstruct themselves")
    fid = _fidelity_table(ctx)
    if fid is not None:
        add("loss recovered", {"sae": fid["sae"], "pca": fid["pca_at_l0"], "raw_units": 1.0},
            "task loss with the reconstruction spliced in (sae/fidelity.csv); 0 = zero ablation")
        if "sae vs mean" in fid:
            add("loss recovered vs mean ablation", {"sae": fid["sae vs mean"], "pca": fid["pca_at_l0 vs mean"], "raw_units": 1.0},
                "the same, with the site's mean as the floor (0 = no better than mean ablation)")
    live = {b: (np.abs(u) > 1e-8).any(0) for b, u in units_test.items()}
    add("live fraction (held-out)", {b: float(v.mean()) for b, v in live.items()},
        "units that are non-zero on at least one held-out row")
    add("units", {"sae": d_sae, "pca": vt.shape[0], "raw_units": d, "random_directions": d_sae})

    concepts = list(ctx.adapter.concepts)
    targets = binary_targets(obs.iloc[ex_train], concepts)
    test_targets = binary_targets(obs.iloc[ex_test], concepts, min_rows=1)
    targets = {t: y for t, y in targets.items() if t in test_targets and 0 < test_targets[t].sum() < len(test_targets[t])}
    if ex_test is ex_train:
        note_split = "no held-out split: scored on the training examples"
    else:
        note_split = f"{len(ex_train)} training / {len(ex_test)} held-out examples"
    val = rng.random(len(ex_train)) < 0.25  # validation rows for the F1 threshold, inside the training rows
    for k in (1, 5):
        per = {b: [k_sparse_probe(units_train[b], y, units_ex_test[b], test_targets[t], k) for t, y in targets.items()]
               for b in BASES}
        if targets:
            add(f"k={k} sparse probing, mean balanced accuracy", {b: float(np.mean(v)) for b, v in per.items()},
                f"{len(targets)} concept targets: {', '.join(targets)}; {note_split}")
    if targets:
        f1 = {b: [best_unit_f1(units_train[b][val], y[val], units_ex_test[b], test_targets[t])[0] for t, y in targets.items()]
              for b in BASES}
        add("best single-unit F1, mean over concepts", {b: float(np.mean(v)) for b, v in f1.items()},
            "unit and threshold chosen on a validation quarter of the training rows, F1 on held-out rows")
    w_dec = sae.W_dec.detach().float().cpu().numpy()
    live_all = np.asarray((np.abs(ex_units["sae"]) > 1e-8).any(0) | live["sae"])
    add("duplicate pairs (decoder cosine > 0.9)", {"sae": decoder_duplicates(w_dec, live_all), "pca": 0, "raw_units": 0},
        "orthogonal bases have none by construction")
    if stability_seed is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        # rank 0 runs the analyses alone, and an SAE trained here would all-reduce with workers that are gone
        add("stability (mean best decoder cosine to another seed)", {},
            "not measured: the run trains its SAE with DDP; rerun with devices=1 to measure it")
    elif stability_seed is not None:
        other = ctx.train_sae(seed=stability_seed, single_process=True).sae
        add("stability (mean best decoder cosine to another seed)",
            {"sae": stability(w_dec, other.W_dec.detach().float().cpu().numpy(), live_all), "pca": 1.0, "raw_units": 1.0},
            f"the same recipe trained from seed {stability_seed}; PCA and raw units are deterministic")
    return pd.DataFrame(rows)


def _fidelity_table(ctx: "RunContext") -> dict[str, float] | None:
    """Loss recovered per condition from the fidelity analysis (None: the adapter has no task loss)."""
    t = ctx.live.get("fidelity")
    if t is None:
        return None
    t = t.set_index("condition")
    out = {c: float(t.loss_recovered[c]) for c in t.index}
    if "loss_recovered_vs_mean" in t.columns:
        out.update({f"{c} vs mean": float(t.loss_recovered_vs_mean[c]) for c in t.index})
    return out


#: the targets every domain's quick profile is held to: (metric row, what the SAE is compared with, words)
TARGETS: tuple[tuple[str, str, str], ...] = (
    ("explained variance (held-out)", "pca", "held-out explained variance at or above PCA with as many components as its L0"),
    ("loss recovered", "0.9", "loss recovered of at least 0.9 with its reconstruction spliced in"),
    ("live fraction (held-out)", "0.5", "at least half of its latents alive on held-out rows"),
    ("k=1 sparse probing, mean balanced accuracy", "raw_units", "k = 1 sparse probing at or above the best single raw unit"),
)


def target_checks(table: pd.DataFrame) -> pd.DataFrame:
    """The quality table read against :data:`TARGETS`: one row per target with ``target``, ``sae``,
    ``bar`` (the number to reach), ``met`` (True / False / None when not measured) and ``words``
    (what the result means, said plainly when a target is missed)."""
    t = table.set_index("metric")
    out = []
    for metric, against, words in TARGETS:
        if metric not in t.index or not np.isfinite(float(t.loc[metric, "sae"])):
            out.append({"target": words, "sae": np.nan, "bar": np.nan, "met": None, "words": "not measured in this run"})
            continue
        sae = float(t.loc[metric, "sae"])
        bar = float(t.loc[metric, against]) if against in BASES else float(against)
        label = {"pca": "PCA ", "raw_units": "the best single raw unit "}.get(against, "")
        met = bool(sae >= bar)
        said = (f"met: SAE {sae:.3f} >= {label}{bar:.3f}" if met
                else f"MISSED: SAE {sae:.3f} < {label}{bar:.3f}; target: {words}")
        out.append({"target": words, "sae": sae, "bar": bar, "met": met, "words": said})
    return pd.DataFrame(out)


def quality_headline(table: pd.DataFrame) -> list[dict[str, Any]]:
    """Headline rows of the quality table: targets met, k=1 probing and single-unit F1 (random
    directions as the control, the stronger of PCA and the raw units as the baseline), stability."""
    t = table.set_index("metric")
    checks = target_checks(table)
    measured = checks[checks.met.notna()]
    missed = measured[measured.met == False]  # noqa: E712 (an object column of True/False/None)
    out = [{"name": "SAE targets met", "value": int(measured.met.sum()), "unit": f"of {len(measured)}",
            "note": ("every target met" if missed.empty else "; ".join(missed.words))
                    + ("" if len(measured) == len(checks) else f"; {len(checks) - len(measured)} not measured"),
            "source": "sae/targets.csv"}]
    for metric in ("k=1 sparse probing, mean balanced accuracy", "best single-unit F1, mean over concepts"):
        if metric in t.index:
            r = t.loc[metric]
            best_other = max(r["pca"], r["raw_units"])
            stronger = "PCA components" if r["pca"] >= r["raw_units"] else "raw units"
            out.append({"name": f"SAE {metric}", "value": float(r["sae"]), "control": float(r["random_directions"]),
                        "control_label": "as many random directions",
                        "baseline": float(best_other), "baseline_label": f"{stronger}, the stronger of PCA and the raw units",
                    "tolerance": FRACTION_MARGIN,
                        "note": f"PCA components {r['pca']:.3f}, raw units {r['raw_units']:.3f}; "
                                + ("the SAE beats both" if r["sae"] > best_other else "the SAE does NOT beat the best of them"),
                        "source": "sae/quality.csv"})
    if "stability (mean best decoder cosine to another seed)" in t.index:
        out.append({"name": "SAE stability across seeds", "source": "sae/quality.csv",
                    "value": float(t.loc["stability (mean best decoder cosine to another seed)", "sae"]),
                    "note": f"duplicate pairs: {int(t.loc['duplicate pairs (decoder cosine > 0.9)', 'sae'])}"})
    return out


def quality_analysis() -> "Analysis":
    """The core's quality analysis (after the sae stage, after fidelity): ``sae/quality.csv``."""
    from ..experiment import Analysis

    def compute(ctx: "RunContext") -> pd.DataFrame:
        seed = ctx.seed + 1 if ctx.config.get("sae_stability", True) else None
        table = quality_table(ctx, stability_seed=seed)
        ctx.write_table("quality.csv", table)
        ctx.write_table("targets.csv", target_checks(table))
        return table

    return Analysis("sae_quality", "sae", compute, quality_headline)
