"""What could explain the immunology adapter's claims, measured on the same cells.

A shuffled-label control shows a number is not chance; these show whether something simpler
explains it (issue 15):

* :func:`merge_rare_types`: cell types with fewer than ``min_test_cells`` held-out cells are merged
  into ``"other"`` (or dropped): a per-type score from 2-4 test cells is noise, and the run says so;
* :func:`within_type_spearman` / :func:`within_type_technical_table`: a feature "tracks library
  size" only if it does so *within* cell types (pooled within-type Spearman, i.e. a partial rank
  correlation controlling for type). Monocytes have smaller libraries than lymphocytes, so a
  monocyte feature correlates with library size across cells without being technical at all;
* :func:`token_frequency_scores`: the bar for "an SAE feature's driver genes recover markers": the
  genes most often *present as tokens* in the cells where the feature fires, with no attribution;
* :func:`recovery`: markers (a curated list or data-driven Wilcoxon markers) recovered by a
  gene x feature score table, beside random genes in the markers' place, with the paired margin
  that decides the verdict against a baseline table.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy import stats

from sciscope.core.errors import ConfigError
from sciscope.core.verdict import verdict

__all__ = ["OTHER", "RARE_ACTIONS", "benjamini_hochberg", "driver_ranks", "merge_rare_types", "paired_count_verdict",
           "rare_types_note", "recovery", "token_frequency_scores", "within_type_spearman", "within_type_technical_table"]

#: the label rare cell types are merged into (config ``rare_test_types = "other"``)
OTHER = "other"
RARE_ACTIONS = ("other", "drop")


def merge_rare_types(obs: pd.DataFrame, min_test_cells: int, action: str = "other") -> tuple[pd.DataFrame, dict[str, Any]]:
    """Merge (or drop) cell types with fewer than ``min_test_cells`` cells in the ``test`` split.

    Parameters
    ----------
    obs
        One row per cell with ``cell_type`` (categorical) and ``split`` (``"train"``/``"test"``).
    min_test_cells
        0 turns the rule off.
    action
        ``"other"``: their cells get the label :data:`OTHER` (which is itself dropped when it still
        has fewer than ``min_test_cells`` test cells); ``"drop"``: their cells are removed.

    Returns
    -------
    (obs, notes): ``obs`` with ``cell_type_original`` added when anything changed (dropped rows
    removed, the index kept, so callers can align other per-cell data); ``notes``:
    ``few_test_types`` (type -> test cells), ``rare_type_action``, ``n_cells_rare_dropped``,
    ``other_dropped``, ``min_test_cells``.
    """
    if action not in RARE_ACTIONS:
        raise ConfigError(f"immunology: config 'rare_test_types' = {action!r}; choose one of {list(RARE_ACTIONS)}")
    types = [str(t) for t in obs["cell_type"].cat.categories]
    test = obs.loc[obs["split"].to_numpy() == "test", "cell_type"].astype(str).value_counts()
    n_test = {t: int(test.get(t, 0)) for t in types}
    rare = [t for t in types if n_test[t] < min_test_cells] if min_test_cells > 0 else []
    notes: dict[str, Any] = {"min_test_cells": int(min_test_cells), "rare_type_action": action,
                             "few_test_types": {t: n_test[t] for t in rare}, "n_cells_rare_dropped": 0, "other_dropped": False}
    if not rare:
        return obs, notes
    obs = obs.copy()
    label = obs["cell_type"].astype(str)
    obs["cell_type_original"] = label.to_numpy()
    is_rare = label.isin(rare).to_numpy()
    if action == "other":
        merged_test = sum(n_test[t] for t in rare) + n_test.get(OTHER, 0) * (OTHER not in rare)
        if merged_test >= min_test_cells:
            label = label.where(~is_rare, OTHER)
            is_rare = np.zeros(len(obs), dtype=bool)
        else:
            notes["other_dropped"] = True
    notes["n_cells_rare_dropped"] = int(is_rare.sum())
    obs = obs.assign(cell_type=pd.Categorical(label)).loc[~is_rare]
    if obs["cell_type"].nunique() < 2:
        raise ConfigError(f"immunology: config 'min_test_cells' = {min_test_cells} leaves fewer than 2 cell types "
                          f"(test cells per type: {n_test}); lower it or raise 'test_fraction'")
    obs["cell_type"] = obs["cell_type"].cat.remove_unused_categories()
    return obs, notes


def rare_types_note(notes: Mapping[str, Any]) -> str:
    """One sentence on what :func:`merge_rare_types` did ('' when nothing)."""
    rare = notes.get("few_test_types") or {}
    if not rare:
        return ""
    listed = ", ".join(f"{t} ({n})" for t, n in rare.items())
    where = (f"merged into '{OTHER}'" if notes["rare_type_action"] == "other" and not notes.get("other_dropped")
             else f"dropped ({notes['n_cells_rare_dropped']} cells)")
    return f"types with < {notes['min_test_cells']} test cells {where}: {listed}"


def benjamini_hochberg(p: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg q-values (NaN p-values stay NaN and are not counted)."""
    p = np.asarray(p, dtype=np.float64)
    q = np.full(p.shape, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    if ok.size:
        order = ok[np.argsort(p[ok], kind="stable")]
        scaled = p[order] * ok.size / np.arange(1, ok.size + 1)
        q[order] = np.minimum(1.0, np.minimum.accumulate(scaled[::-1])[::-1])
    return q


def within_type_spearman(X: np.ndarray, covariate: np.ndarray, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pooled within-group Spearman correlation of every column of ``X`` with ``covariate``.

    Inside each group both are turned into centred rank quantiles (average ranks / group size, minus
    their mean), so each cell weighs the same whatever its group's size and the differences between
    group means -- what cell type alone explains -- are removed; the pooled correlation of those
    residuals is a partial rank correlation controlling for the group.

    Returns
    -------
    (rho, p): per column; p two-sided from Student's t with ``n - n_groups - 1`` degrees of freedom;
    NaN for a column constant within every group.
    """
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(covariate, dtype=np.float64)
    g = pd.Series(np.asarray(groups)).astype(str).to_numpy()
    RX, ry = np.zeros_like(X), np.zeros_like(y)
    for grp in np.unique(g):
        idx = np.flatnonzero(g == grp)
        if idx.size < 2:
            continue
        rx = stats.rankdata(X[idx], axis=0) / idx.size
        r = stats.rankdata(y[idx]) / idx.size
        RX[idx], ry[idx] = rx - rx.mean(0), r - r.mean()
    den = np.sqrt((RX ** 2).sum(0) * (ry ** 2).sum())
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = np.where(den > 0, (RX * ry[:, None]).sum(0) / den, np.nan)
        dof = max(1, len(y) - len(np.unique(g)) - 1)
        t = rho * np.sqrt(dof / np.clip(1.0 - rho ** 2, 1e-12, None))
    p = np.where(np.isfinite(rho), 2.0 * stats.t.sf(np.abs(t), dof), np.nan)
    return rho, p


def within_type_technical_table(latents: np.ndarray, obs: pd.DataFrame, covariates: Sequence[str], threshold: float,
                                raw: pd.DataFrame, specific: set[int], seed: int = 0) -> pd.DataFrame:
    """Per technical covariate: features that track it *within* cell type.

    A feature survives when its pooled within-type Spearman ``|rho| >= threshold`` and its BH
    q < 0.05 over the live features (:func:`within_type_spearman`). The control is the same rule
    with the covariate shuffled within each cell type (seeded). ``raw`` is the across-cell table
    (:func:`.features.technical_feature_table`): its count and features are kept beside, so the
    table says how many "technical" features were cell-type differences.

    Returns
    -------
    DataFrame: ``covariate``, ``n_features`` (survivors), ``n_features_shuffled``,
    ``max_abs_partial_rho`` (and ``_shuffled``), ``n_raw`` (across cells), ``n_raw_survive``,
    ``n_also_cell_type_specific`` (survivors), ``n_raw_cell_type_specific``, ``features``.
    """
    A = np.asarray(latents, dtype=np.float64)
    live = np.flatnonzero((A > 0).any(0))
    types = obs["cell_type"].astype(str).to_numpy()
    rng = np.random.default_rng([int(seed), 0x7EC])
    raw_by = raw.set_index("covariate") if len(raw) else pd.DataFrame()
    rows = []
    for cov in covariates:
        y = obs[cov].to_numpy(dtype=np.float64)
        shuffled = y.copy()
        for t in np.unique(types):
            idx = np.flatnonzero(types == t)
            shuffled[idx] = y[rng.permutation(idx)]
        found, best = [], []
        for target in (y, shuffled):
            rho, p = within_type_spearman(A[:, live], target, types)
            q = benjamini_hochberg(p)
            hit = np.isfinite(rho) & (np.abs(rho) >= threshold) & (q < 0.05)
            found.append({int(f) for f in live[hit]})
            best.append(float(np.nanmax(np.abs(rho))) if np.isfinite(rho).any() else float("nan"))
        raw_feats = ({int(f) for f in str(raw_by.loc[cov, "features"]).split()} if cov in raw_by.index else set())
        rows.append({"covariate": cov, "n_features": len(found[0]), "n_features_shuffled": len(found[1]),
                     "max_abs_partial_rho": best[0], "max_abs_partial_rho_shuffled": best[1],
                     "n_raw": int(raw_by.loc[cov, "n_features"]) if cov in raw_by.index else 0,
                     "n_raw_survive": len(found[0] & raw_feats), "n_also_cell_type_specific": len(found[0] & specific),
                     "n_raw_cell_type_specific": len(raw_feats & specific),
                     "features": " ".join(str(f) for f in sorted(found[0])[:50])})
    return pd.DataFrame(rows)


def token_frequency_scores(inputs: Sequence[Sequence[str]], latents: np.ndarray, genes: Sequence[str]) -> pd.DataFrame:
    """Gene x feature: the share of the cells where the feature fires that carry the gene as a token.

    The baseline for driver genes: a feature that fires on B cells has B-cell genes among the
    tokens of its cells whatever it reads, so a marker "recovered" by the driver scores is only
    evidence when the driver scores beat this frequency list on the same rule.
    """
    pos = {g: i for i, g in enumerate(genes)}
    rows, cols = [], []
    for r, cell in enumerate(inputs):
        js = {pos[g] for g in cell if g in pos}
        rows += [r] * len(js)
        cols += sorted(js)
    T = sp.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(inputs), len(genes)))
    active = sp.csr_matrix((np.asarray(latents) > 0).astype(np.float64))
    n_active = np.asarray(active.sum(0)).ravel()
    freq = (T.T @ active).toarray() / np.maximum(n_active, 1.0)[None, :]
    df = pd.DataFrame(freq.astype(np.float32), index=list(genes))
    df.attrs["n_active"] = n_active
    return df


def driver_ranks(scores: pd.DataFrame) -> np.ndarray:
    """Rank (1 = top) of every gene within every feature's column of ``scores`` (ties: first wins)."""
    D = scores.to_numpy()
    ranks = np.empty_like(D, dtype=np.int64)
    np.put_along_axis(ranks, np.argsort(-D, axis=0, kind="stable"),
                      np.arange(1, D.shape[0] + 1)[:, None].repeat(D.shape[1], 1), 0)
    return ranks


def recovery(pairs: Sequence[tuple[str, Sequence[str]]], genes: Sequence[str], features_of: Mapping[str, np.ndarray],
             ranks: np.ndarray, k: int, *, n_random: int = 50, seed: int = 0) -> tuple[np.ndarray, float]:
    """Which markers a gene x feature ranking recovers, and the chance level.

    Parameters
    ----------
    pairs
        ``(gene, cell types it marks)`` per marker (genes absent from ``genes`` are never recovered).
    genes
        The row names of ``ranks``.
    features_of
        Cell type -> the features specific to it.
    ranks
        ``(n_genes, n_features)`` rank of each gene within each feature (:func:`driver_ranks`).
    k
        A marker is recovered when a feature specific to one of its types ranks it in the top ``k``.

    Returns
    -------
    (recovered per pair (bool array), control): the mean count when each marker is replaced by a
    random gene (``n_random`` seeded draws).
    """
    pos = {str(g).upper(): i for i, g in enumerate(genes)}
    empty = np.zeros(0, dtype=np.int64)
    feats = [np.unique(np.concatenate([np.asarray(features_of.get(t, empty), dtype=np.int64) for t in types] or [empty]))
             for _, types in pairs]
    hit = np.array([bool(f.size) and g.upper() in pos and bool(ranks[pos[g.upper()], f].min() <= k)
                    for (g, _), f in zip(pairs, feats)], dtype=bool)
    rng = np.random.default_rng([int(seed), 0x3A4])
    counts = [sum(int(f.size > 0 and ranks[int(rng.integers(ranks.shape[0])), f].min() <= k) for f in feats)
              for _ in range(n_random if pairs and ranks.shape[0] else 0)]
    return hit, float(np.mean(counts)) if counts else float("nan")


def paired_count_verdict(ours: np.ndarray, theirs: np.ndarray) -> tuple[str | None, float]:
    """The verdict of a recovered count against a baseline's on the same markers, and its margin.

    The margin is two standard errors of a paired sign test (McNemar): ``2 sqrt(b + c)``, ``b``
    and ``c`` the markers only one of the two recovers. Equal lists read "no better than baseline".
    """
    ours, theirs = np.asarray(ours, dtype=bool), np.asarray(theirs, dtype=bool)
    margin = 2.0 * math.sqrt(float((ours & ~theirs).sum() + (theirs & ~ours).sum()))
    return verdict(float(ours.sum()), float(theirs.sum()), tolerance=margin), margin
