"""Feature analysis: how often each feature fires, on what, and which domain concept it tracks.

Works on any feature-activation matrix ``(n_obs, n_features)`` -- an SAE's latent activations or
raw neurons -- row-aligned with an ``obs`` table of concept columns. Pass either the array and
``obs``, or an :class:`~sciscope.core.store.ActivationStore` and a ``site``.

- :func:`feature_density` -- fraction of rows where a feature is > 0, mean and max activation.
- :func:`top_examples` -- the ``k`` rows with the largest activation of each feature, with obs.
- :func:`concept_associations` -- every feature against every concept column: one-vs-rest AUROC
  with a tie-corrected Mann-Whitney p-value for categorical concepts, Spearman's rho for numeric
  ones; Benjamini-Hochberg across all tests; optionally on shuffled concepts as a control, and
  optionally at the level of groups of rows that are not independent (``groups=``).
- :func:`analyze_features` -- all of the above plus statistics a domain adapter supplies (e.g.
  Moran's I for places), in one :class:`FeatureAnalysis`.

Memory stays bounded: density and top examples stream over row blocks; associations rank one
block of feature columns at a time (about 32 MB of float64 per block by default), so 20k rows x
16k features never needs more than a few hundred MB.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from .errors import NonFiniteError, SciscopeError, ShapeError, close_matches
from .io import atomic_path, write_json, write_table
from .probe import infer_kind

__all__ = [
    "ConceptError",
    "FeatureAnalysis",
    "analyze_features",
    "concept_associations",
    "feature_density",
    "statistics_table",
    "top_examples",
]

Method = Literal["auto", "auroc", "spearman"]
Correction = Literal["fdr_bh", "fdr_by", "bonferroni", "none"]
#: A statistic supplied by a domain adapter: ``fn(acts_chunk (n, f), obs) -> one row per feature``.
Statistic = Callable[[np.ndarray, pd.DataFrame], Any]

_BLOCK_BYTES = 32 * 2**20  # float64 bytes per working block
_ASSOC_COLUMNS = [
    "feature", "concept", "value", "stat", "statistic", "effect", "n_pos", "n", "p", "q", "significant", "condition",
]


class ConceptError(SciscopeError, ValueError):
    """A concept column that is missing from obs or cannot be tested."""


# ------------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------------


def _resolve(acts: Any, obs: pd.DataFrame | None, site: str | None, *, need_obs: bool) -> tuple[Any, pd.DataFrame | None]:
    """(matrix, obs) from an array or a store + site; checks shapes. The matrix may be a memmap."""
    if hasattr(acts, "array") and hasattr(acts, "obs") and hasattr(acts, "sites"):  # an ActivationStore
        if site is None:
            if len(acts.sites) != 1:
                raise ShapeError(f"pass site= to choose one of the store's sites {acts.sites}")
            site = acts.sites[0]
        arr = acts.array(site)
        obs = acts.obs if obs is None else obs
    else:
        if hasattr(acts, "detach"):
            acts = acts.detach().cpu().numpy()
        arr = acts if isinstance(acts, np.ndarray) else np.asarray(acts)
    if arr.ndim != 2:
        raise ShapeError(f"feature activations must be (n_obs, n_features), got shape {arr.shape}")
    if obs is not None:
        if not isinstance(obs, pd.DataFrame):
            raise ShapeError(f"obs must be a pandas DataFrame, got {type(obs).__name__}")
        if len(obs) != arr.shape[0]:
            raise ShapeError(f"acts has {arr.shape[0]} rows but obs has {len(obs)} rows")
        obs = obs.reset_index(drop=True)
    elif need_obs:
        raise ShapeError("obs is required (pass a DataFrame row-aligned with acts, or a store)")
    return arr, obs


def _rows_per_block(width: int) -> int:
    return max(1, _BLOCK_BYTES // (8 * max(1, width)))


def _features_per_block(n_rows: int, chunk_size: int | None) -> int:
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        return int(chunk_size)
    # Ranking holds ~5 (n, c) 8-byte arrays at once; keep each near the block budget.
    return max(1, _BLOCK_BYTES // (8 * max(1, n_rows)))


def _feature_index(features: Sequence[int] | np.ndarray | None, n_features: int) -> np.ndarray:
    if features is None:
        return np.arange(n_features)
    idx = np.asarray(features)
    if idx.dtype == bool:
        if idx.shape != (n_features,):
            raise ShapeError(f"feature mask has shape {idx.shape}, acts have {n_features} features")
        return np.flatnonzero(idx)
    idx = idx.astype(np.int64).ravel()
    if idx.size and (idx.min() < 0 or idx.max() >= n_features):
        raise ShapeError(f"feature indices must lie in [0, {n_features}), got {idx.min()}..{idx.max()}")
    return idx


def _columns(arr: Any, feats: np.ndarray, start: int, stop: int) -> np.ndarray:
    """float64 copy of acts[:, feats[start:stop]] (contiguous slices read without fancy indexing)."""
    sel = feats[start:stop]
    if sel.size and sel[-1] - sel[0] == sel.size - 1 and np.all(np.diff(sel) == 1):
        block = arr[:, sel[0] : sel[-1] + 1]
    else:
        block = arr[:, sel]
    return np.array(block, dtype=np.float64)


def _check_block(block: np.ndarray, rows: np.ndarray | int, col_ids: np.ndarray) -> None:
    """Raise NonFiniteError naming the first bad (row, feature); ``rows`` is an offset or indices."""
    if not np.isfinite(block).all():
        bad = ~np.isfinite(block)
        r, c = np.argwhere(bad)[0]
        row = int(rows[r]) if isinstance(rows, np.ndarray) else rows + int(r)
        raise NonFiniteError(
            f"feature activations hold NaN or inf ({int(bad.sum())} values in this block; "
            f"first at row {row}, feature {int(col_ids[c])})"
        )


# ------------------------------------------------------------------------------------------------
# Density and top examples (one streaming pass over rows)
# ------------------------------------------------------------------------------------------------


def _row_pass(
    arr: Any, feats: np.ndarray, *, k: int, threshold: float
) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """Density stats and a running top-k for the selected features, streaming over row blocks."""
    n = arr.shape[0]
    f = feats.size
    count = np.zeros(f)
    total = np.zeros(f)
    total_active = np.zeros(f)
    mx = np.full(f, -np.inf)
    k = min(k, n)
    top_val = np.full((0, f), -np.inf)
    top_row = np.zeros((0, f), dtype=np.int64)
    contiguous = f == arr.shape[1] and np.array_equal(feats, np.arange(f))
    step = _rows_per_block(arr.shape[1])
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        block = np.asarray(arr[r0:r1] if contiguous else arr[r0:r1][:, feats], dtype=np.float64)
        _check_block(block, r0, feats)
        active = block > threshold
        count += active.sum(0)
        total += block.sum(0)
        total_active += np.where(active, block, 0.0).sum(0)
        mx = np.maximum(mx, block.max(0))
        if k:
            # Merge this block's rows into the running top-k: (k + rows, f) candidates.
            vals = np.concatenate([top_val, block])
            rows = np.concatenate([top_row, np.broadcast_to(np.arange(r0, r1)[:, None], block.shape)])
            if vals.shape[0] > k:
                part = np.argpartition(-vals, k - 1, axis=0)[:k]
                vals = np.take_along_axis(vals, part, 0)
                rows = np.take_along_axis(rows, part, 0)
            top_val, top_row = vals, rows
    # Order each feature's top rows by activation (descending), ties by row index.
    order = np.lexsort((top_row, -top_val), axis=0)
    top_val = np.take_along_axis(top_val, order, 0)
    top_row = np.take_along_axis(top_row, order, 0)
    mean = total / max(n, 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        density = pd.DataFrame(
            {
                "feature": feats,
                "density": count / max(n, 1),
                "mean": mean,
                "max": mx if n else np.full(f, np.nan),
                "mean_active": np.where(count > 0, total_active / np.maximum(count, 1), np.nan),
            }
        )
    return density, top_val, top_row


def feature_density(
    acts: Any,
    *,
    site: str | None = None,
    features: Sequence[int] | np.ndarray | None = None,
    threshold: float = 0.0,
) -> pd.DataFrame:
    """Per-feature firing density and activation statistics.

    Parameters
    ----------
    acts
        ``(n_obs, n_features)`` array (numpy, memmap, torch) or an ActivationStore (with ``site``).
    site
        The store's site to read (optional when the store holds a single site).
    features
        Indices (or a boolean mask) of the features to describe; default all.
    threshold
        A feature "fires" on a row when its activation is greater than this (default 0).

    Returns
    -------
    DataFrame with one row per feature: ``feature``, ``density`` (fraction of rows firing),
    ``mean`` (over all rows), ``max``, ``mean_active`` (mean over firing rows).
    """
    arr, _ = _resolve(acts, None, site, need_obs=False)
    feats = _feature_index(features, arr.shape[1])
    density, _, _ = _row_pass(arr, feats, k=0, threshold=threshold)
    return density


def _top_frame(
    feats: np.ndarray, top_val: np.ndarray, top_row: np.ndarray, obs: pd.DataFrame | None, min_activation: float | None
) -> pd.DataFrame:
    k = top_val.shape[0]
    df = pd.DataFrame(
        {
            "feature": np.repeat(feats, k),
            "rank": np.tile(np.arange(1, k + 1), feats.size),
            "activation": top_val.T.ravel(),
            "row": top_row.T.ravel(),
        }
    )
    if min_activation is not None:
        df = df[df["activation"] > min_activation].reset_index(drop=True)
    if obs is not None and len(obs.columns):
        meta = obs.iloc[df["row"].to_numpy()].reset_index(drop=True)
        meta.columns = [c if c not in df.columns else f"obs_{c}" for c in meta.columns]
        df = pd.concat([df, meta], axis=1)
    return df


def top_examples(
    acts: Any,
    obs: pd.DataFrame | None = None,
    *,
    site: str | None = None,
    k: int = 10,
    features: Sequence[int] | np.ndarray | None = None,
    min_activation: float | None = None,
) -> pd.DataFrame:
    """The ``k`` rows with the largest activation of each feature, joined with their obs.

    Parameters
    ----------
    acts
        ``(n_obs, n_features)`` array or an ActivationStore (with ``site``).
    obs
        Row metadata (default: the store's obs). Columns named like the output's own
        (feature, rank, activation, row) come back prefixed ``obs_``.
    site
        The store's site to read.
    k
        Rows per feature.
    features
        Indices (or a boolean mask) of features; default all.
    min_activation
        Drop rows whose activation is not above this (e.g. 0 to skip an SAE latent's silent rows).

    Returns
    -------
    Long DataFrame: ``feature``, ``rank`` (1 = largest), ``activation``, ``row`` (index into
    acts/obs), then the obs columns of that row. Ties are broken by lower row index.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    arr, obs = _resolve(acts, obs, site, need_obs=False)
    feats = _feature_index(features, arr.shape[1])
    _, top_val, top_row = _row_pass(arr, feats, k=k, threshold=0.0)
    return _top_frame(feats, top_val, top_row, obs, min_activation)


# ------------------------------------------------------------------------------------------------
# Concept associations
# ------------------------------------------------------------------------------------------------


def _rank_columns(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Average ranks (1-based) of every column and the tie term sum(t^3 - t) per column.

    One argsort per block; run starts/ends of tied values found with cumulative max/min, so the
    whole block is ranked without a Python loop over columns (scipy's rankdata ranks one axis
    slice at a time).
    """
    n, c = x.shape
    order = np.argsort(x, axis=0)
    xs = np.take_along_axis(x, order, axis=0)
    new = np.empty((n, c), dtype=bool)
    new[0] = True
    np.not_equal(xs[1:], xs[:-1], out=new[1:])
    del xs
    pos = np.arange(n, dtype=np.int64)[:, None]
    start = np.maximum.accumulate(np.where(new, pos, 0), axis=0)
    last = np.empty((n, c), dtype=bool)
    last[-1] = True
    last[:-1] = new[1:]
    end = np.minimum.accumulate(np.where(last, pos, n - 1)[::-1], axis=0)[::-1]
    run = (end - start + 1).astype(np.float64)
    ranks = np.empty((n, c), dtype=np.float64)
    np.put_along_axis(ranks, order, (start + end) / 2.0 + 1.0, axis=0)
    tie = (run * run - 1.0).sum(axis=0)  # each element of a run of length t adds t^2 - 1
    return ranks, tie


@dataclass
class _Concept:
    name: str
    method: str  # "auroc" or "spearman"
    valid: np.ndarray  # bool (n,)
    values: list[Any] = field(default_factory=list)  # tested category values (auroc)
    indicator: np.ndarray | None = None  # (n_valid, V) float64
    ranks: np.ndarray | None = None  # centred ranks of the concept (spearman), (n_valid,)


def _is_positive_binary(values: list[Any]) -> bool:
    vs = set(values)
    return vs <= {True, False} or vs <= {0, 1}


def _concept_method(obs: pd.DataFrame, name: str, method: Method | Mapping[str, Method], *, max_classes: int) -> str:
    """``"auroc"`` or ``"spearman"`` for concept column ``name`` (checks it exists)."""
    if name not in obs.columns:
        hint = close_matches(str(name), [str(c) for c in obs.columns])
        raise ConceptError(
            f"concept column {name!r} is not in obs"
            + (f"; did you mean {hint}?" if hint else f"; obs has {list(obs.columns)}")
        )
    m = method.get(name, "auto") if isinstance(method, Mapping) else method
    if m not in ("auto", "auroc", "spearman"):
        raise ConceptError(f"concept {name!r}: method must be 'auto', 'auroc' or 'spearman', got {m!r}")
    if m == "auto":
        m = "auroc" if infer_kind(obs[name], max_classes=max_classes) == "logistic" else "spearman"
    return m


def _prepare_concepts(
    obs: pd.DataFrame,
    concepts: Sequence[str],
    method: Method | Mapping[str, Method],
    *,
    max_classes: int,
    max_categories: int,
) -> list[_Concept]:
    out = []
    for name in concepts:
        m = _concept_method(obs, name, method, max_classes=max_classes)
        col = obs[name]
        valid = ~col.isna().to_numpy()
        v = col[valid]
        if m == "spearman":
            if not pd.api.types.is_numeric_dtype(v):
                raise ConceptError(f"concept {name!r} is not numeric (dtype {v.dtype}); use method='auroc'")
            vals = v.to_numpy(dtype=np.float64)
            if vals.size < 3 or np.ptp(vals) == 0:
                warnings.warn(f"concept {name!r} is constant (or has < 3 rows); skipped", stacklevel=3)
                continue
            r, _ = _rank_columns(vals[:, None])
            out.append(_Concept(name, "spearman", valid, ranks=r[:, 0] - r[:, 0].mean()))
            continue
        codes, cats = pd.factorize(v, sort=True)
        cats = list(cats)
        if len(cats) < 2:
            warnings.warn(f"concept {name!r} has a single value {cats!r}; skipped", stacklevel=3)
            continue
        if len(cats) > max_categories:
            raise ConceptError(
                f"concept {name!r} has {len(cats)} distinct values (> max_categories={max_categories}); "
                "use method='spearman' for a quantity, or raise max_categories"
            )
        tested = [len(cats) - 1] if len(cats) == 2 and _is_positive_binary(cats) else list(range(len(cats)))
        ind = np.zeros((codes.size, len(tested)))
        for j, c in enumerate(tested):
            ind[:, j] = codes == c
        out.append(_Concept(name, "auroc", valid, values=[_plain(cats[c]) for c in tested], indicator=ind))
    return out


def _plain(v: Any) -> Any:
    return v.item() if isinstance(v, np.generic) else v


def _correct(p: np.ndarray, correction: str) -> np.ndarray:
    """Multiple-testing correction over the finite p-values (NaN = not testable, left NaN)."""
    from scipy.stats import false_discovery_control

    q = np.full(p.shape, np.nan)
    ok = np.isfinite(p)
    if not ok.any():
        return q
    if correction == "fdr_bh":
        q[ok] = false_discovery_control(p[ok], method="bh")
    elif correction == "fdr_by":
        q[ok] = false_discovery_control(p[ok], method="by")
    elif correction == "bonferroni":
        q[ok] = np.minimum(p[ok] * ok.sum(), 1.0)
    elif correction in ("none", None):
        q[ok] = p[ok]
    else:
        raise ValueError(f"correction must be 'fdr_bh', 'fdr_by', 'bonferroni' or 'none', got {correction!r}")
    return q


def _associate(
    arr: Any, feats: np.ndarray, concepts: list[_Concept], *, chunk: int
) -> pd.DataFrame:
    """Raw statistics and p-values (no correction) for every feature x concept (x value)."""
    from scipy.special import ndtr
    from scipy.stats import t as t_dist

    parts: list[pd.DataFrame] = []
    # Concepts that keep the same rows share one ranking of each feature block.
    by_mask: dict[bytes, list[_Concept]] = {}
    for c in concepts:
        by_mask.setdefault(np.packbits(c.valid).tobytes(), []).append(c)
    for group in by_mask.values():
        valid = group[0].valid
        rows = None if valid.all() else np.flatnonzero(valid)
        n = int(valid.sum())
        auroc = [c for c in group if c.method == "auroc"]
        spear = [c for c in group if c.method == "spearman"]
        ind = np.hstack([c.indicator for c in auroc]) if auroc else None  # (n, V)
        labels = [(c.name, v) for c in auroc for v in c.values]
        rc = np.column_stack([c.ranks for c in spear]) if spear else None  # (n, S) centred
        for f0 in range(0, feats.size, chunk):
            block = _columns(arr, feats, f0, f0 + chunk)
            if rows is not None:
                block = block[rows]
            _check_block(block, rows if rows is not None else 0, feats[f0 : f0 + chunk])
            ids = feats[f0 : f0 + chunk]
            ranks, tie = _rank_columns(block)  # (n, c), (c,)
            del block
            if ind is not None:
                n1 = ind.sum(0)[:, None]  # (V, 1)
                n0 = n - n1
                R1 = ind.T @ ranks  # (V, c) rank sums of the positive rows
                U1 = R1 - n1 * (n1 + 1) / 2
                auc = U1 / (n1 * n0)
                U = np.maximum(U1, n1 * n0 - U1)
                with np.errstate(divide="ignore", invalid="ignore"):
                    sigma = np.sqrt(n1 * n0 / 12.0 * ((n + 1) - tie[None, :] / (n * (n - 1))))
                    z = (U - n1 * n0 / 2 - 0.5) / sigma  # two-sided, continuity-corrected (scipy)
                    p = np.clip(2 * ndtr(-z), 0.0, 1.0)
                p[~(sigma > 0)] = np.nan  # every value tied: no test (e.g. a dead latent)
                V, c = auc.shape
                parts.append(
                    pd.DataFrame(
                        {
                            "feature": np.tile(ids, V),
                            "concept": np.repeat([lab[0] for lab in labels], c),
                            "value": np.repeat(np.array([lab[1] for lab in labels], dtype=object), c),
                            "stat": "auroc",
                            "statistic": auc.ravel(),
                            "effect": (2 * auc - 1).ravel(),  # rank-biserial correlation
                            "n_pos": np.repeat(n1[:, 0], c).astype(np.int64),
                            "n": n,
                            "p": p.ravel(),
                        }
                    )
                )
            if rc is not None:
                rf = ranks - ranks.mean(0)
                with np.errstate(divide="ignore", invalid="ignore"):
                    rho = (rc.T @ rf) / np.sqrt(np.outer((rc * rc).sum(0), (rf * rf).sum(0)))  # (S, c)
                    dof = n - 2
                    tt = rho * np.sqrt(np.clip(dof / ((rho + 1.0) * (1.0 - rho)), 0, None))
                    p = 2 * t_dist.sf(np.abs(tt), dof)
                p[~np.isfinite(rho)] = np.nan
                S, c = rho.shape
                parts.append(
                    pd.DataFrame(
                        {
                            "feature": np.tile(ids, S),
                            "concept": np.repeat([cc.name for cc in spear], c),
                            "value": None,
                            "stat": "spearman_rho",
                            "statistic": rho.ravel(),
                            "effect": rho.ravel(),
                            "n_pos": -1,
                            "n": n,
                            "p": p.ravel(),
                        }
                    )
                )
    if not parts:
        return pd.DataFrame(columns=_ASSOC_COLUMNS[:-3])
    df = pd.concat(parts, ignore_index=True)
    order = {c.name: i for i, c in enumerate(concepts)}
    df["_c"] = df["concept"].map(order)
    df = df.sort_values(["_c", "feature"], kind="stable").drop(columns="_c").reset_index(drop=True)
    return df


# ------------------------------------------------------------------------------------------------
# Group-level associations (rows that are not independent)
# ------------------------------------------------------------------------------------------------

#: Groups of rows: an obs column name, or one label per row (NaN: the row belongs to no group).
Groups = str | Sequence[Any] | np.ndarray | pd.Series


class _GroupMeans:
    """The ``(n_groups, n_features)`` matrix of group means of ``arr``, computed per column block.

    :func:`_associate` reads its matrix one block of feature columns at a time (``m[:, cols]``);
    averaging each block as it is read keeps memory at one row-level block however many groups.
    """

    def __init__(self, arr: Any, codes: np.ndarray, n_groups: int) -> None:
        from scipy import sparse

        self._arr = arr
        self.shape = (n_groups, arr.shape[1])
        self.ndim = 2
        rows = np.flatnonzero(codes >= 0)
        size = np.bincount(codes[rows], minlength=n_groups).astype(np.float64)
        # (G, n) averaging operator: row g holds 1/|g| at the rows of group g
        self._mean = sparse.csr_matrix((1.0 / size[codes[rows]], (codes[rows], rows)), shape=(n_groups, arr.shape[0]))

    def __getitem__(self, key: Any) -> np.ndarray:
        return np.asarray(self._mean @ np.asarray(self._arr[key], dtype=np.float64))


def _group_codes(obs: pd.DataFrame, groups: Groups) -> tuple[np.ndarray, int, str]:
    """Group code per row (-1: no group), the number of groups, and a label for the params."""
    if isinstance(groups, str):
        if groups not in obs.columns:
            hint = close_matches(groups, [str(c) for c in obs.columns])
            raise ConceptError(f"groups column {groups!r} is not in obs" + (f"; did you mean {hint}?" if hint else ""))
        values, label = obs[groups], groups
    else:
        values, label = pd.Series(np.asarray(groups, dtype=object)), "<array>"
        if len(values) != len(obs):
            raise ShapeError(f"groups has {len(values)} labels but obs has {len(obs)} rows")
    codes, uniq = pd.factorize(values.reset_index(drop=True), sort=True)  # NaN -> -1
    if len(uniq) < 2:
        raise ConceptError(f"groups {label!r} has {len(uniq)} group(s); a group-level test needs at least 2")
    return codes.astype(np.int64), len(uniq), label


def _group_obs(
    obs: pd.DataFrame, concepts: Sequence[str], method: Method | Mapping[str, Method], codes: np.ndarray, n_groups: int,
    *, max_classes: int, max_categories: int,
) -> tuple[pd.DataFrame, dict[str, str], dict[str, tuple[str, Any]]]:
    """Every concept at the level of the group: one row per group.

    Returns the group-level table, the method of each of its columns, and ``{column: (concept,
    value)}`` for the one-vs-rest fraction columns of categorical concepts that vary within groups.
    """
    key = pd.Series(codes)
    cols: dict[str, pd.Series] = {}
    methods: dict[str, str] = {}
    relabel: dict[str, tuple[str, Any]] = {}
    every = pd.RangeIndex(n_groups)
    for name in concepts:
        m = _concept_method(obs, name, method, max_classes=max_classes)
        col = obs[name].reset_index(drop=True)
        ok = (codes >= 0) & ~col.isna().to_numpy()
        v, g = col[ok], key[ok]
        if m == "spearman":
            if not pd.api.types.is_numeric_dtype(v):
                raise ConceptError(f"concept {name!r} is not numeric (dtype {v.dtype}); use method='auroc'")
            cols[name], methods[name] = v.astype(np.float64).groupby(g).mean().reindex(every), "spearman"
            continue
        if (v.groupby(g).nunique() <= 1).all():
            # constant within every group (a trajectory's regime, a country's continent): the group
            # carries the row's label, and the test is the one-vs-rest AUROC across groups
            cols[name], methods[name] = v.groupby(g).first().reindex(every), "auroc"
            continue
        # varies within groups (cell types within a donor): per value, the share of the group's rows
        # that have it, against the group's mean activation (Spearman across groups)
        cats = list(pd.factorize(v, sort=True)[1])
        if len(cats) > max_categories:
            raise ConceptError(f"concept {name!r} has {len(cats)} distinct values (> max_categories={max_categories})")
        tested = cats[-1:] if len(cats) == 2 and _is_positive_binary(cats) else cats
        for value in tested:
            cname = f"{name}=={value}"
            while cname in cols:
                cname += "_"
            cols[cname] = (v == value).astype(np.float64).groupby(g).mean().reindex(every)
            methods[cname], relabel[cname] = "spearman", (name, _plain(value))
    return pd.DataFrame(cols, index=every), methods, relabel


def _group_associate(
    arr: Any, obs: pd.DataFrame, concepts: Sequence[str], feats: np.ndarray, groups: Groups, *,
    method: Method | Mapping[str, Method], shuffle_seed: int | None, max_classes: int, max_categories: int,
    chunk: int,
) -> pd.DataFrame:
    """Raw group-level statistics and p-values (see :func:`concept_associations`, ``groups``)."""
    codes, n_groups, _ = _group_codes(obs, groups)
    obs_g, methods, relabel = _group_obs(obs, concepts, method, codes, n_groups, max_classes=max_classes,
                                         max_categories=max_categories)
    if shuffle_seed is not None:  # the null at the level the test is read: whole groups swap labels
        obs_g = obs_g.iloc[np.random.default_rng(shuffle_seed).permutation(n_groups)].reset_index(drop=True)
    prepared = _prepare_concepts(obs_g, list(obs_g.columns), methods, max_classes=max_classes, max_categories=max_categories)
    df = _associate(_GroupMeans(arr, codes, n_groups), feats, prepared, chunk=chunk)
    if relabel and len(df):
        hit = df["concept"].isin(list(relabel))
        df.loc[hit, "value"] = df.loc[hit, "concept"].map(lambda c: relabel[c][1])
        df.loc[hit, "concept"] = df.loc[hit, "concept"].map(lambda c: relabel[c][0])
        order = {c: i for i, c in enumerate(concepts)}
        df = df.sort_values(["concept", "feature"], key=lambda s: s.map(order) if s.name == "concept" else s,
                            kind="stable").reset_index(drop=True)
    return df


def concept_associations(
    acts: Any,
    obs: pd.DataFrame | None = None,
    concepts: str | Sequence[str] | None = None,
    *,
    site: str | None = None,
    method: Method | Mapping[str, Method] = "auto",
    correction: Correction = "fdr_bh",
    alpha: float = 0.05,
    features: Sequence[int] | np.ndarray | None = None,
    control: Literal["shuffle"] | None = None,
    seed: int = 0,
    max_classes: int = 10,
    max_categories: int = 100,
    chunk_size: int | None = None,
    groups: Groups | None = None,
) -> pd.DataFrame:
    """Test every feature against every concept column, with multiple-testing correction.

    Categorical concepts (bool, category, string, integers with at most ``max_classes`` values):
    for each value, one-vs-rest AUROC of the activation, with a two-sided tie-corrected
    Mann-Whitney U p-value (normal approximation with continuity correction, i.e. scipy's
    ``mannwhitneyu(method="asymptotic")``). Bool and 0/1 concepts test only the positive value.
    Numeric concepts: Spearman's rho with its t-distribution p-value (as ``scipy.stats.spearmanr``).
    Rows with a missing concept value are left out of that concept's tests.

    Parameters
    ----------
    acts
        ``(n_obs, n_features)`` array or an ActivationStore (with ``site``).
    obs
        Row metadata with the concept columns (default: the store's obs).
    concepts
        Column name(s) to test (default: every obs column).
    site
        The store's site to read.
    method
        ``"auto"``, ``"auroc"`` or ``"spearman"``, or ``{concept: method}``.
    correction
        ``"fdr_bh"`` (Benjamini-Hochberg over all tests of this call), ``"fdr_by"``,
        ``"bonferroni"`` or ``"none"``.
    alpha
        ``significant`` is ``q < alpha``.
    features
        Indices (or a boolean mask) of features to test; default all.
    control
        ``"shuffle"``: permute the obs rows (seeded) before testing, breaking every
        feature-concept link; the number of significant rows should then be ~``alpha`` x the
        number of true-null tests at most (about none after FDR).
    seed
        Seed of the shuffle.
    max_classes, max_categories
        Integer columns with at most ``max_classes`` values are categorical; a categorical
        concept with more than ``max_categories`` values is an error (a likely identifier).
    chunk_size
        Features ranked per block (default: a ~32 MB block).
    groups
        Test at the level of the group where rows are not independent (windows of one
        trajectory, cells of one donor, places of one country): an obs column name or one label
        per row (rows whose label is missing are left out). Rows are averaged within each group
        -- the activation, and the concept: a numeric concept's group mean; a categorical concept
        that is constant within every group keeps its value; one that varies within groups
        becomes, per value, the share of the group's rows that have it (tested by Spearman's rho,
        ``stat`` "spearman_rho" with ``value`` set) -- and the test runs across groups, so ``n``
        is the number of groups. This is the "pseudobulk" test of single-cell analysis: the
        p-value answers "do groups with the concept have higher activations?", with the groups
        as the independent units. Row-level tests of such data count one group's shared
        offset once per row and their p-values are far too small; a mixed model would use the
        within-group variation too, but needs a model per feature and assumptions about it, and
        the group-level test is exact (it is a row-level test on the group means) and as fast.
        With ``control="shuffle"`` whole groups swap concept values.

    Returns
    -------
    Tidy DataFrame, one row per test: ``feature``, ``concept``, ``value`` (category tested, or
    None for numeric), ``stat`` ("auroc" / "spearman_rho"), ``statistic``, ``effect``
    (rank-biserial 2*AUROC-1, or rho: comparable on [-1, 1]), ``n_pos``, ``n``, ``p``, ``q``,
    ``significant``, ``condition`` ("observed" or "shuffled"). Features whose activations are all
    tied (e.g. dead latents) get NaN p and q and are not counted as tests.
    """
    arr, obs = _resolve(acts, obs, site, need_obs=True)
    assert obs is not None
    concept_list = list(obs.columns) if concepts is None else ([concepts] if isinstance(concepts, str) else list(concepts))
    if control not in (None, "shuffle"):
        raise ValueError(f"control must be None or 'shuffle', got {control!r}")
    feats = _feature_index(features, arr.shape[1])
    chunk = _features_per_block(arr.shape[0], chunk_size)
    if groups is not None:
        if concepts is None and isinstance(groups, str):
            concept_list = [c for c in concept_list if c != groups]  # the group id is no concept
        df = _group_associate(arr, obs, concept_list, feats, groups, method=method,
                              shuffle_seed=seed if control == "shuffle" else None, max_classes=max_classes,
                              max_categories=max_categories, chunk=chunk)
    else:
        if control == "shuffle":
            perm = np.random.default_rng(seed).permutation(len(obs))
            obs = obs.iloc[perm].reset_index(drop=True)
        prepared = _prepare_concepts(obs, concept_list, method, max_classes=max_classes, max_categories=max_categories)
        df = _associate(arr, feats, prepared, chunk=chunk)
    df["q"] = _correct(df["p"].to_numpy(dtype=np.float64), correction)
    df["significant"] = (df["q"] < alpha).to_numpy()
    df["condition"] = "shuffled" if control == "shuffle" else "observed"
    return df[_ASSOC_COLUMNS]


def _best_concept(assoc: pd.DataFrame) -> pd.DataFrame:
    """Per feature, the strongest association (|effect|), preferring significant ones."""
    cols = ["feature", "concept", "value", "stat", "statistic", "effect", "p", "q", "significant"]
    if assoc.empty:
        return pd.DataFrame(columns=cols)
    a = assoc[np.isfinite(assoc["p"].to_numpy(dtype=np.float64))].copy()
    a["_abs"] = a["effect"].abs()
    a = a.sort_values(["feature", "significant", "_abs"], ascending=[True, False, False], kind="stable")
    return a.drop_duplicates("feature")[cols].reset_index(drop=True)


# ------------------------------------------------------------------------------------------------
# Adapter statistics and the FeatureAnalysis result
# ------------------------------------------------------------------------------------------------


def _run_statistics(
    arr: Any, obs: pd.DataFrame, feats: np.ndarray, statistics: Mapping[str, Statistic], *, chunk: int
) -> pd.DataFrame:
    extra = pd.DataFrame({"feature": feats})
    for name, fn in statistics.items():
        pieces = []
        for f0 in range(0, feats.size, chunk):
            block = _columns(arr, feats, f0, f0 + chunk)
            out = fn(block, obs)
            if isinstance(out, pd.Series):
                out = out.to_frame(name)
            elif not isinstance(out, pd.DataFrame):
                a = np.asarray(out)
                out = pd.DataFrame({name: a}) if a.ndim == 1 else pd.DataFrame(a).add_prefix(f"{name}_")
            if len(out) != block.shape[1]:
                raise ShapeError(
                    f"statistic {name!r} returned {len(out)} rows for a chunk of {block.shape[1]} features "
                    "(it must return one row per feature column, in order)"
                )
            out = out.drop(columns=[c for c in ("feature",) if c in out.columns]).reset_index(drop=True)
            pieces.append(out)
        stat = pd.concat(pieces, ignore_index=True)
        if stat.shape[1] == 1:
            stat.columns = [name]
        else:
            stat.columns = [f"{name}_{c}" for c in stat.columns]
        extra = pd.concat([extra, stat], axis=1)
    return extra


def statistics_table(
    acts: Any,
    obs: pd.DataFrame,
    statistics: Mapping[str, Statistic],
    *,
    features: Sequence[int] | np.ndarray | None = None,
    chunk_size: int | None = None,
) -> pd.DataFrame:
    """Adapter-supplied statistics of every feature, one row per feature (``FeatureAnalysis.extra``).

    Parameters
    ----------
    acts
        ``(n_obs, n_features)`` array, row-aligned with ``obs``.
    obs
        Row metadata the statistics read (e.g. coordinates).
    statistics
        ``{name: fn}`` as in :func:`analyze_features`.
    features, chunk_size
        As in :func:`analyze_features`.

    Returns
    -------
    DataFrame: ``feature`` and one column per statistic (``name_col`` for one returning several).
    """
    arr, obs = _resolve(acts, obs, None, need_obs=True)
    assert obs is not None
    feats = _feature_index(features, arr.shape[1])
    return _run_statistics(arr, obs, feats, statistics, chunk=_features_per_block(arr.shape[0], chunk_size))


@dataclass
class FeatureAnalysis:
    """Everything known about a set of features, with the parameters that produced it.

    Attributes
    ----------
    density : DataFrame
        Per feature: density, mean, max, mean_active (:func:`feature_density`).
    top_examples : DataFrame
        Long table of the top-``k`` rows per feature with their obs (:func:`top_examples`).
    associations : DataFrame
        Every feature x concept (x value) test (:func:`concept_associations`).
    control_associations : DataFrame or None
        The same tests on shuffled concepts (the null: should have ~no significant rows).
    best_concept : DataFrame
        Per feature, its strongest association (significant ones first, then by |effect|).
    extra : DataFrame
        Adapter-supplied statistics, one row per feature (column ``feature`` + one column per
        statistic, or ``name_col`` for statistics that return several columns).
    params : dict
    """

    density: pd.DataFrame
    top_examples: pd.DataFrame
    associations: pd.DataFrame
    best_concept: pd.DataFrame
    extra: pd.DataFrame
    control_associations: pd.DataFrame | None = None
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def features(self) -> pd.DataFrame:
        """One row per feature: density stats, best concept (prefixed ``best_``) and extras."""
        best = self.best_concept.rename(columns={c: f"best_{c}" for c in self.best_concept.columns if c != "feature"})
        out = self.density.merge(best, on="feature", how="left")
        return out.merge(self.extra, on="feature", how="left")

    def summary(self) -> dict[str, Any]:
        """Headline counts: features, dead fraction, tests, significant (observed vs shuffled)."""
        a = self.associations
        s: dict[str, Any] = {
            "n_features": int(len(self.density)),
            "dead_fraction": float((self.density["density"] == 0).mean()) if len(self.density) else float("nan"),
            "n_tests": int(np.isfinite(a["p"].to_numpy(dtype=np.float64)).sum()) if len(a) else 0,
            "n_significant": int(a["significant"].sum()) if len(a) else 0,
            "n_features_significant": int(a.loc[a["significant"], "feature"].nunique()) if len(a) else 0,
        }
        if self.control_associations is not None:
            c = self.control_associations
            s["control_n_significant"] = int(c["significant"].sum()) if len(c) else 0
            s["control_n_features_significant"] = int(c.loc[c["significant"], "feature"].nunique()) if len(c) else 0
        return s

    def plot_density(self, ax: Any = None, *, bins: int = 50) -> Any:
        """Histogram of log10 feature density (dead features counted in the title); returns ax."""
        from .plotting import get_ax

        ax = get_ax(ax)
        d = self.density["density"].to_numpy(dtype=np.float64)
        alive = d[d > 0]
        if alive.size:
            ax.hist(np.log10(alive), bins=bins, color="C0")
        ax.set_xlabel("log10 feature density (fraction of rows > 0)")
        ax.set_ylabel("features")
        ax.set_title(f"{alive.size} live / {d.size - alive.size} dead features")
        return ax

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write every table as CSV plus ``params.json`` and ``summary.json``, atomically."""
        path = Path(path)
        with atomic_path(path) as tmp:
            tmp.mkdir(parents=True)
            write_table(tmp / "density.csv", self.density)
            write_table(tmp / "top_examples.csv", self.top_examples)
            write_table(tmp / "associations.csv", self.associations)
            if self.control_associations is not None:
                write_table(tmp / "control_associations.csv", self.control_associations)
            write_table(tmp / "best_concept.csv", self.best_concept)
            write_table(tmp / "extra.csv", self.extra)
            write_table(tmp / "features.csv", self.features)
            write_json(tmp / "params.json", self.params)
            write_json(tmp / "summary.json", self.summary())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "FeatureAnalysis":
        """Read an analysis written by :meth:`save`."""
        import json

        path = Path(path)
        read = lambda name: pd.read_csv(path / name) if (path / name).is_file() else pd.DataFrame()  # noqa: E731
        ctrl = path / "control_associations.csv"
        return cls(density=read("density.csv"), top_examples=read("top_examples.csv"),
                   associations=read("associations.csv"), best_concept=read("best_concept.csv"), extra=read("extra.csv"),
                   control_associations=pd.read_csv(ctrl) if ctrl.is_file() else None,
                   params=json.loads((path / "params.json").read_text()) if (path / "params.json").is_file() else {})

    def __repr__(self) -> str:
        s = self.summary()
        ctrl = f", {s['control_n_significant']} on shuffled concepts" if "control_n_significant" in s else ""
        return (
            f"FeatureAnalysis({s['n_features']} features, dead {s['dead_fraction']:.1%}, "
            f"{s['n_significant']}/{s['n_tests']} significant tests{ctrl})"
        )


def analyze_features(
    acts: Any,
    obs: pd.DataFrame | None = None,
    *,
    concepts: str | Sequence[str] | None,
    site: str | None = None,
    statistics: Mapping[str, Statistic] | None = None,
    k: int = 10,
    features: Sequence[int] | np.ndarray | None = None,
    method: Method | Mapping[str, Method] = "auto",
    correction: Correction = "fdr_bh",
    alpha: float = 0.05,
    control: bool = True,
    seed: int = 0,
    threshold: float = 0.0,
    min_activation: float | None = None,
    max_classes: int = 10,
    max_categories: int = 100,
    chunk_size: int | None = None,
    groups: Groups | None = None,
) -> FeatureAnalysis:
    """Density, top examples, concept associations (with a shuffled control) and adapter stats.

    Parameters
    ----------
    acts
        ``(n_obs, n_features)`` array (SAE latents or raw neurons) or an ActivationStore.
    obs
        Row metadata with the concept columns (default: the store's obs).
    concepts
        Concept column(s) to test; None tests every obs column.
    site
        The store's site to read.
    statistics
        Domain statistics supplied by an adapter: ``{name: fn}`` with
        ``fn(acts_chunk: (n_obs, f) ndarray, obs: DataFrame)`` returning one row per feature
        column of the chunk, in order (a DataFrame, Series or 1-D array). Results are merged by
        feature into :attr:`FeatureAnalysis.extra`. Example: ``{"morans_i": morans_i_fn}``.
    k
        Top examples per feature.
    features
        Indices (or boolean mask) of features to analyse; default all.
    method, correction, alpha, max_classes, max_categories, chunk_size
        As in :func:`concept_associations`.
    control
        Also run the associations on shuffled concepts (same seed -> same shuffle).
    seed
        Seed of the control shuffle.
    threshold
        Density threshold (see :func:`feature_density`).
    min_activation
        See :func:`top_examples`.
    groups
        Test the concept associations (and their shuffled control) at the level of the group:
        an obs column or one label per row (see :func:`concept_associations`). Density, top
        examples and the adapter's statistics stay per row.

    Returns
    -------
    FeatureAnalysis
    """
    arr, obs = _resolve(acts, obs, site, need_obs=True)
    assert obs is not None
    feats = _feature_index(features, arr.shape[1])
    density, top_val, top_row = _row_pass(arr, feats, k=k, threshold=threshold)
    top = _top_frame(feats, top_val, top_row, obs, min_activation)
    kw: dict[str, Any] = dict(
        method=method, correction=correction, alpha=alpha, features=feats, max_classes=max_classes,
        max_categories=max_categories, chunk_size=chunk_size, groups=groups,
    )
    concept_list = list(obs.columns) if concepts is None else ([concepts] if isinstance(concepts, str) else list(concepts))
    if concepts is None and isinstance(groups, str):
        concept_list = [c for c in concept_list if c != groups]
    assoc = concept_associations(arr, obs, concept_list, **kw)
    ctrl = concept_associations(arr, obs, concept_list, control="shuffle", seed=seed, **kw) if control else None
    extra = (
        _run_statistics(arr, obs, feats, statistics, chunk=_features_per_block(arr.shape[0], chunk_size))
        if statistics
        else pd.DataFrame({"feature": feats})
    )
    params = {
        "concepts": concept_list,
        "statistics": list(statistics or {}),
        "k": k,
        "method": method if isinstance(method, str) else dict(method),
        "correction": correction,
        "alpha": alpha,
        "control": "shuffle" if control else None,
        "seed": seed,
        "threshold": threshold,
        "min_activation": min_activation,
        "max_classes": max_classes,
        "groups": None if groups is None else (groups if isinstance(groups, str) else "<array>"),
        "n_obs": int(arr.shape[0]),
        "n_features": int(feats.size),
        "site": site,
    }
    return FeatureAnalysis(
        density=density,
        top_examples=top,
        associations=assoc,
        best_concept=_best_concept(assoc),
        extra=extra,
        control_associations=ctrl,
        params=params,
    )
