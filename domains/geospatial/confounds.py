"""The country, the confound of every geospatial claim: SAE features judged against country indicators.

A place's country tells much of where it is: a ridge on a one-hot of the country scores latitude
R^2 about as high as the model's layers do. A feature that is spatially autocorrelated (Moran's I
at the paper's threshold) may be no more than a detector of one country, or of the places
spelled like one country's. This module names such features:

- a feature's **best-country AUROC** is the largest one-vs-rest AUROC of its activation over the
  countries with at least ``country_min_places`` sampled places (fewer places make a perfect AUROC
  likely by chance: one place ranked first gives 1.0);
- a **spatial** unit passes the Moran's I rule the unit controls read (I >= ``moran_threshold`` and
  permutation p < 0.01, the analytic ``p_rand`` where no permutations were run; the p-value part is
  dropped, with a warning, where the run's permutations cannot reach it);
- its **border AUROC** is the AUROC of the same country against the places just across its borders
  (for each of its places, the ``knn_k`` nearest places of other countries): a smooth gradient (a
  latitude feature) reaches a high best-country AUROC at its extreme country, but does not change at
  the border, while a detector of that country does;
- a spatial unit whose best-country AUROC *and* border AUROC reach ``country_auroc`` is a **country
  detector**.

The headline counts the spatial SAE latents that are *not* country detectors, beside the same count
over as many random directions (the control) and the stronger of the PCA components' and the raw
units' rates scaled to the SAE's number of latents (the baseline), the bases the core's unit controls
use (:func:`sciscope.core.unit_controls.control_bases`, with the same seed and directions).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from sciscope.core.spatial import MORANS_I_ALPHA, check_permutations

if TYPE_CHECKING:
    from sciscope.core.context import RunContext

    from .adapter import GeospatialAdapter

__all__ = ["best_country_auroc", "border_auroc", "country_detector_rows", "country_detectors", "judge_units",
           "spatial_mask"]

#: bases in the summary's order, and how the headline names them
_NAMES = {"sae": "SAE latents", "pca": "PCA components", "raw_units": "raw units", "random_directions": "random directions"}


def best_country_auroc(acts: Any, countries: Any, *, min_places: int = 5, chunk: int = 512) -> pd.DataFrame:
    """The best one-vs-rest AUROC of each column of ``acts`` over the countries of the rows.

    Parameters
    ----------
    acts
        ``(n, units)`` activations, one row per place.
    countries
        ``(n,)`` country of each row.
    min_places
        Countries with fewer rows are never the positive class (they stay among the negatives).
    chunk
        Columns ranked at a time (memory).

    Returns
    -------
    DataFrame, one row per column: ``best_country`` and ``auroc`` (ties count one half; NaN and ""
    where no country has ``min_places`` rows, or one country holds every row).
    """
    A = np.asarray(acts, dtype=np.float64)
    if A.ndim != 2:
        raise ValueError(f"best_country_auroc: acts must be (n, units), got shape {A.shape}")
    c = pd.Series(np.asarray(countries)).astype(str)
    if len(c) != len(A):
        raise ValueError(f"best_country_auroc: {len(c)} countries for {len(A)} rows")
    counts = c.value_counts()
    keep = sorted(counts[(counts >= max(1, int(min_places))) & (counts < len(c))].index)
    out = pd.DataFrame({"best_country": [""] * A.shape[1], "auroc": np.full(A.shape[1], np.nan)})
    if not keep or not A.shape[1]:
        return out
    from scipy.stats import rankdata

    codes = pd.Categorical(c, categories=keep).codes
    M = np.zeros((len(c), len(keep)))
    M[codes >= 0, codes[codes >= 0]] = 1.0
    n_pos = M.sum(0)
    n_neg = len(c) - n_pos
    best_k, best = np.zeros(A.shape[1], dtype=np.int64), np.full(A.shape[1], np.nan)
    for s in range(0, A.shape[1], chunk):
        R = rankdata(A[:, s:s + chunk], axis=0)  # average ranks: ties count one half
        auc = (M.T @ R - (n_pos * (n_pos + 1) / 2)[:, None]) / (n_pos * n_neg)[:, None]  # (countries, units)
        best_k[s:s + chunk], best[s:s + chunk] = auc.argmax(0), auc.max(0)
    out["best_country"] = np.asarray(keep, dtype=object)[best_k]
    out["auroc"] = best
    return out


def _auroc(values: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """AUROC of every column of ``values`` (rows: the positives and negatives only); ties count one half."""
    from scipy.stats import rankdata

    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if not n_pos or not n_neg:
        return np.full(values.shape[1], np.nan)
    R = rankdata(values, axis=0)
    return (R[positive].sum(0) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def border_places(obs: pd.DataFrame, country: str, *, k: int = 8) -> np.ndarray:
    """Rows of the places just across ``country``'s borders: for each of its places, the ``k`` nearest
    places (great circle) of other countries."""
    from sciscope.core.spatial import haversine_km

    inside = (obs["country"].astype(str) == country).to_numpy()
    outside = np.flatnonzero(~inside)
    if not inside.any() or not outside.size:
        return np.array([], dtype=np.int64)
    lat, lon = obs["lat"].to_numpy(dtype=np.float64), obs["lon"].to_numpy(dtype=np.float64)
    d = haversine_km(lat[inside][:, None], lon[inside][:, None], lat[outside][None], lon[outside][None])
    near = np.argsort(d, axis=1, kind="stable")[:, : min(k, outside.size)]
    return np.unique(outside[near.ravel()])


def border_auroc(acts: Any, obs: pd.DataFrame, best: Any, *, k: int = 8) -> np.ndarray:
    """The AUROC of each column of ``acts`` for its country ``best[j]`` against :func:`border_places`
    of that country (NaN where ``best[j]`` is empty)."""
    A = np.asarray(acts, dtype=np.float64)
    best = np.asarray(best, dtype=object)
    out = np.full(A.shape[1], np.nan)
    countries = obs["country"].astype(str).to_numpy()
    for country in sorted({str(b) for b in best if b}):
        cols = np.flatnonzero(best == country)
        rows = np.concatenate([np.flatnonzero(countries == country), border_places(obs, country, k=k)])
        out[cols] = _auroc(A[np.ix_(rows, cols)], countries[rows] == country)
    return out


def spatial_mask(table: pd.DataFrame, *, threshold: float, alpha: float = MORANS_I_ALPHA, use_p: bool = True) -> np.ndarray:
    """Units passing the Moran's I rule: ``I >= threshold`` and (``use_p``) ``p_sim < alpha``, with
    ``p_rand`` where ``p_sim`` is NaN (no permutations run for the unit). ``table`` has columns
    ``I``, ``p_sim``, ``p_rand`` (:func:`sciscope.core.spatial.morans_i_table`)."""
    I = table["I"].to_numpy(dtype=np.float64)
    ok = np.isfinite(I) & (np.nan_to_num(I, nan=-np.inf) >= threshold)
    if use_p:
        p = table["p_sim"].to_numpy(dtype=np.float64) if "p_sim" in table else np.full(len(table), np.nan)
        if "p_rand" in table:
            p = np.where(np.isfinite(p), p, table["p_rand"].to_numpy(dtype=np.float64))
        ok &= np.nan_to_num(p, nan=np.inf) < alpha
    return ok


def judge_units(acts: Any, morans: pd.DataFrame, obs: pd.DataFrame, *, threshold: float, auroc: float, min_places: int,
                k: int = 8, use_p: bool = True) -> pd.DataFrame:
    """Every spatial unit of ``acts`` (rows: ``obs``, with ``country``, ``lat``, ``lon``), its best
    country and whether it is a country detector.

    Returns one row per spatial unit: ``unit``, ``I``, ``best_country``, ``auroc``, ``border_auroc``,
    ``country_detector`` (both AUROCs >= ``auroc``).
    """
    spatial = np.flatnonzero(spatial_mask(morans, threshold=threshold, use_p=use_p))
    sub = np.asarray(acts)[:, spatial]
    best = best_country_auroc(sub, obs["country"], min_places=min_places)
    border = border_auroc(sub, obs, best["best_country"].to_numpy(), k=k)
    a = best["auroc"].to_numpy()
    return pd.DataFrame({"unit": spatial, "I": morans["I"].to_numpy(dtype=np.float64)[spatial],
                         "best_country": best["best_country"].to_numpy(), "auroc": a, "border_auroc": border,
                         "country_detector": (np.nan_to_num(a) >= auroc) & (np.nan_to_num(border) >= auroc)})


def country_detectors(adapter: "GeospatialAdapter", ctx: "RunContext") -> dict[str, Any]:
    """The spatial SAE latents, each with its best-country AUROC, and the same over the control bases.

    Reads the features stage's Moran's I of the latents (``ctx.features().extra``), the latents and
    the raw units at the SAE's site; the control bases get Moran's I from the adapter's unit rule.
    Writes ``features/country_detectors.csv`` (every spatial SAE latent, ``label`` naming the
    detectors) and ``features/country_detectors_summary.csv`` (per basis: units, spatial units,
    country detectors, the rest, distinct countries).
    """
    from sciscope.core.unit_controls import control_bases

    c = adapter.config
    thr, auc, m = float(c["moran_threshold"]), float(c["country_auroc"]), int(c["country_min_places"])
    use_p = check_permutations(int(c["permutations"]), MORANS_I_ALPHA, what="the country detectors' Moran's I rule")
    latents = ctx.latents()
    obs = latents.obs.reset_index(drop=True)
    z = np.asarray(latents.array("latents"))
    extra = ctx.features().extra
    feats = extra["feature"].to_numpy(dtype=np.int64)  # the features stage's rows, placed by feature index
    sae_moran = pd.DataFrame({k: np.full(z.shape[1], np.nan) for k in ("I", "p_sim", "p_rand")})
    for k in sae_moran.columns:
        if f"morans_i_{k}" in extra:
            sae_moran.loc[feats, k] = extra[f"morans_i_{k}"].to_numpy(dtype=np.float64)
    x = np.asarray(ctx.store().array(adapter.sae_site))
    split = obs["split"] if "split" in obs.columns else None
    train = (split != "test").to_numpy() if split is not None and (split == "test").any() else None
    bases: dict[str, tuple[np.ndarray, pd.DataFrame]] = {"sae": (z, sae_moran)}
    compute = adapter.unit_rules["morans_i"].compute
    for b, a in control_bases(x, n_random=z.shape[1], train=train, seed=ctx.seed).items():
        bases[b] = (a, compute(a, obs))
    judged, rows = {}, []
    for b, (a, moran) in bases.items():
        t = judged[b] = judge_units(a, moran, obs, threshold=thr, auroc=auc, min_places=m, k=int(c["knn_k"]), use_p=use_p)
        det = t[t["country_detector"]]
        rows.append({"basis": b, "n_units": int(a.shape[1]), "n_spatial": len(t), "n_country_detectors": len(det),
                     "n_not_country_detectors": int(len(t) - len(det)),
                     "fraction_not_country_detectors": (len(t) - len(det)) / a.shape[1] if a.shape[1] else math.nan,
                     "share_of_spatial_detectors": len(det) / len(t) if len(t) else math.nan,
                     "n_countries": int(det["best_country"].nunique())})
    summary = pd.DataFrame(rows)
    names = obs.drop_duplicates("country").set_index("country")["country_name"] if "country_name" in obs else pd.Series(dtype=str)
    sae = judged["sae"].rename(columns={"unit": "feature"})
    sae["country_name"] = sae["best_country"].map(names).fillna(sae["best_country"])
    sae["label"] = np.where(sae["country_detector"], "country detector: " + sae["country_name"].astype(str), "spatial")
    sae = sae[["feature", "I", "best_country", "country_name", "auroc", "border_auroc", "country_detector", "label"]]
    sae = sae.sort_values("I", ascending=False, kind="stable").reset_index(drop=True)
    return {"summary": summary, "features": sae, "threshold": thr, "auroc": auc, "min_places": m, "use_p": use_p,
            "source": ctx.write_table("country_detectors_summary.csv", summary),
            "features_source": ctx.write_table("country_detectors.csv", sae)}


def country_detector_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Headline rows of :func:`country_detectors`: the spatial SAE latents that are not country
    detectors (control: as many random directions; baseline: the stronger of PCA's and the raw
    units' rate x the SAE's latents), and the share of spatial latents that are country detectors."""
    t = result["summary"].set_index("basis")
    sae = t.loc["sae"]
    ctrl = t.loc["random_directions"] if "random_directions" in t.index else None
    rule = f"Moran's I >= {result['threshold']:g}" + (f" and p < {MORANS_I_ALPHA:g}" if result["use_p"] else "")
    detector = (f"best-country AUROC >= {result['auroc']:g} (over countries with >= {result['min_places']} places) "
                "and the same against the places across its borders")
    per_basis = "; ".join(f"{_NAMES.get(b, b)} {int(r.n_not_country_detectors)} of {int(r.n_spatial)} spatial "
                          f"(of {int(r.n_units)} units)" for b, r in t.iterrows())
    top = result["features"]
    top = top[top["country_detector"]]["country_name"].value_counts().head(5)
    bases = [b for b in ("pca", "raw_units") if b in t.index]
    strongest = max(bases, key=lambda b: t.loc[b, "fraction_not_country_detectors"]) if bases else None
    src = result["source"]
    rows = [{
        "name": "spatial SAE latents that are not country detectors", "value": int(sae.n_not_country_detectors),
        "control": None if ctrl is None else int(ctrl.n_not_country_detectors),
        "control_label": "" if ctrl is None else f"as many random directions ({int(ctrl.n_units)})",
        **({"baseline": float(t.loc[strongest, "fraction_not_country_detectors"] * sae.n_units),
            "baseline_label": f"{_NAMES[strongest]}' rate ({t.loc[strongest, 'fraction_not_country_detectors']:.1%} of "
                              f"{int(t.loc[strongest, 'n_units'])}) x the SAE's {int(sae.n_units)} latents"} if strongest else {}),
        "note": f"spatial: {rule}; country detector: {detector}; {per_basis}", "source": src}]
    share = sae.share_of_spatial_detectors
    rows.append({
        "name": "spatial SAE latents that are country detectors", "value": float(share) if np.isfinite(share) else None,
        "unit": "share of spatial latents", "control": None if ctrl is None or not np.isfinite(ctrl.share_of_spatial_detectors)
        else float(ctrl.share_of_spatial_detectors),
        "control_label": "" if ctrl is None else "the same share among as many random directions",
        "note": f"{int(sae.n_country_detectors)} of {int(sae.n_spatial)} spatial latents, {int(sae.n_countries)} distinct countries"
                + (f" (most: {', '.join(f'{k} {v}' for k, v in top.items())})" if len(top) else "")
                + f"; named in {result['features_source']}", "source": src})
    return rows
