"""The geospatial analyses (declared by :meth:`GeospatialAdapter.analyses`): each
``compute(adapter, ctx)`` reads the run through its context and writes through it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from sciscope.core.spatial import MORANS_I_ALPHA, MORANS_I_COLUMNS, check_permutations, lisa_clusters
from sciscope.core.unit_controls import morans_i_rule

from .data import median_error_km
from .plots import plot_feature_maps, plot_lisa_map, plot_morans_hist

if TYPE_CHECKING:
    from sciscope.core.context import RunContext
    from sciscope.core.unit_controls import UnitRule

    from .adapter import GeospatialAdapter

__all__ = ["feature_maps", "median_error", "median_error_rows", "morans_i_rows", "morans_i_summary", "unit_rules"]


def unit_rules(adapter: "GeospatialAdapter") -> dict[str, "UnitRule"]:
    """The rule the core's unit-controls analysis reads Moran's I with (``adapter.unit_rules``).

    The paper's: I >= ``moran_threshold`` and permutation p < 0.01, with the run's permutations
    (checked: 99 can never give p < 0.01). On the control bases (PCA, raw units, random
    directions) only units with I at the threshold get permutations, since the count reads no
    other unit's p-value.
    """
    c = adapter.config
    thr = float(c["moran_threshold"])

    def compute(acts: np.ndarray, obs: pd.DataFrame) -> pd.DataFrame:
        return adapter.morans_i_table(acts, obs, permute_min_i=thr)[list(MORANS_I_COLUMNS)]

    return {"morans_i": morans_i_rule("morans_i", threshold=thr, alpha=MORANS_I_ALPHA, permutations=c["permutations"],
                                      compute=compute)}


def median_error(adapter: "GeospatialAdapter", ctx: "RunContext") -> dict[str, Any]:
    """Median great-circle error of out-of-fold lat/lon ridge probes (spatial-block folds) at each
    target's best probe site, beside the same probes fitted to coordinates shuffled among places.

    Returns
    -------
    dict: ``table`` (conditions ``probe`` and ``shuffled coordinates``: median error in km, the
    sites, the folds) and its ``source`` (``probes/median_error_km.csv``).
    """
    from sklearn.linear_model import RidgeCV
    from sklearn.model_selection import GroupKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    store, summary = ctx.store(), ctx.probes().summary()
    obs = store.obs
    layers = summary[summary.site.notna() & (summary.site.astype(str) != "")]
    best = {t: layers[layers.target == t].sort_values("score_mean").site.iloc[-1] for t in ("lat", "lon")}
    n_folds = min(5, obs["block"].nunique())
    shuffled = np.random.default_rng(adapter.config["seed"]).permutation(len(obs))
    rows = []
    for condition, order in (("probe", np.arange(len(obs))), ("shuffled coordinates", shuffled)):
        pred = {t: cross_val_predict(make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-2, 6, 17))),
                                     np.asarray(store.array(best[t]), dtype=np.float64), obs[t].to_numpy()[order],
                                     groups=obs["block"], cv=GroupKFold(n_folds)) for t in ("lat", "lon")}
        rows.append({"condition": condition, "median_error_km": median_error_km(obs, pred["lat"], pred["lon"]),
                     "lat_site": best["lat"], "lon_site": best["lon"], "folds": n_folds})
    table = pd.DataFrame(rows)
    return {"table": table, "source": ctx.write_table("median_error_km.csv", table)}


def median_error_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The headline row of :func:`median_error`: the probes' error beside the shuffled control's."""
    t = result["table"].set_index("condition")
    probe, ctrl = t.loc["probe"], t.loc["shuffled coordinates"]
    return [{"name": "median error of lat/lon probes", "value": float(probe.median_error_km),
             "control": float(ctrl.median_error_km), "control_label": "same probes, shuffled coordinates", "unit": "km",
             "note": f"out-of-fold on held-out spatial blocks; lat at {probe.lat_site}, lon at {probe.lon_site}",
             "source": result["source"]}]


def morans_i_summary(adapter: "GeospatialAdapter", ctx: "RunContext") -> dict[str, Any]:
    """Moran's I of the live SAE latents (features stage, with its shuffled-coordinates control) and
    of the raw neurons at the SAE's site.

    Returns
    -------
    dict: ``table`` (one row each: max and median I, units with I >= ``moran_threshold``, the
    latents' max I on shuffled coordinates), its ``source``, ``threshold`` and ``k``.
    """
    c, feats, store, site = adapter.config, ctx.features().features, ctx.store(), adapter.sae_site
    raw = adapter.morans_i_table(np.asarray(store.array(site), dtype=np.float64), store.obs, permutations=0)
    live, thr = feats[feats["density"] > 0], c["moran_threshold"]
    table = pd.DataFrame([
        {"units": f"SAE latents ({len(live)} live of {len(feats)})", "max_I": live["morans_i_I"].max(),
         "median_I": live["morans_i_I"].median(), "n_I_at_least_threshold": int((live["morans_i_I"] >= thr).sum()),
         "max_I_shuffled_coordinates": live["morans_i_shuffled"].max()},
        {"units": f"raw neurons at {site} ({len(raw)})", "max_I": raw["I"].max(), "median_I": raw["I"].median(),
         "n_I_at_least_threshold": int((raw["I"] >= thr).sum()), "max_I_shuffled_coordinates": np.nan},
    ])
    return {"table": table, "source": ctx.write_table("morans_i_summary.csv", table), "threshold": thr, "k": c["knn_k"]}


def morans_i_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The headline rows of :func:`morans_i_summary`: max I beside the shuffled control, and the
    count of latents at the paper's threshold beside the raw neurons' count."""
    sae, raw = result["table"].iloc[0], result["table"].iloc[1]
    thr, src = result["threshold"], result["source"]
    return [
        {"name": "max Moran's I, SAE latents", "value": float(sae.max_I), "control": float(sae.max_I_shuffled_coordinates),
         "control_label": "coordinates shuffled among places", "source": src,
         "note": f"raw neurons: max {raw.max_I:.3f}, median {raw.median_I:.3f}; k={result['k']} neighbours"},
        {"name": f"SAE latents with Moran's I >= {thr}", "value": int(sae.n_I_at_least_threshold),
         "control": int(raw.n_I_at_least_threshold), "control_label": "raw neurons with I >= threshold",
         "note": "the paper's threshold for a spatially autocorrelated unit", "source": src},
    ]


def feature_maps(adapter: "GeospatialAdapter", ctx: "RunContext") -> list[str]:
    """Maps of the top ``n_map_features`` latents by Moran's I (``feature_maps.png``; each title names
    the feature's best country and whether it is a country detector), a LISA map of the top one (``lisa_top_feature.png``) and I beside its control (``morans_i_hist.png``); returns their sources.
    """
    c, extra, latents = adapter.config, ctx.features().extra, ctx.latents()
    A, obs = np.asarray(latents.array("latents")), latents.obs.reset_index(drop=True)
    feats = extra["feature"].to_numpy(dtype=np.int64)
    I, p = extra["morans_i_I"].to_numpy(dtype=np.float64), extra["morans_i_p_sim"].to_numpy(dtype=np.float64)
    finite = np.flatnonzero(np.isfinite(I))
    top = finite[np.argsort(-I[finite], kind="stable")][: c["n_map_features"]]
    sources = []
    if top.size:
        from .confounds import best_country_auroc

        bc = best_country_auroc(A[:, feats[top]], obs["country"], min_places=c["country_min_places"])
        detector = [f"\ncountry detector: {b.best_country} (AUROC {b.auroc:.2f})" if b.auroc >= c["country_auroc"]
                    else f"\nbest country {b.best_country}, AUROC {b.auroc:.2f}" if np.isfinite(b.auroc) else ""
                    for b in bc.itertuples()]
        titles = [f"feature {feats[i]}: I = {I[i]:.2f}" + (f", p = {p[i]:.3g}" if np.isfinite(p[i]) else "") + d
                  for i, d in zip(top, detector)]
        fig = plot_feature_maps(A, obs, [int(feats[i]) for i in top], titles=titles)
        sources.append(ctx.save_figure("feature_maps.png", fig))
        best = int(feats[top[0]])
        lisa = lisa_clusters(A[:, best], obs, k=c["knn_k"], coords=c["knn_coords"], permutations=c["lisa_permutations"],
                             alpha=c["lisa_alpha"], seed=c["seed"])
        title = f"LISA clusters of feature {best} (p < {c['lisa_alpha']:g}, {c['lisa_permutations']} permutations)"
        sources.append(ctx.save_figure("lisa_top_feature.png", plot_lisa_map(obs, lisa["cluster"], title=title)))
    fig = plot_morans_hist(I, extra["morans_i_shuffled"], threshold=c["moran_threshold"])
    return [*sources, ctx.save_figure("morans_i_hist.png", fig)]
