"""A maximum or a count over units, beside the same maximum or count over control units.

"The SAE's best feature has Moran's I 0.76" or "75 features are tied to a concept" says little on
its own: the best of 3,072 units is high by chance alone, and a basis we had for free may do as
well. In the geospatial run 3,072 random directions reach a max Moran's I of 0.56 and the PCA
components 0.73, against the SAE's 0.76 and the raw neurons' 0.49; by count the SAE had fewer units
above the paper's threshold than the raw neurons (75 vs 184). So every such figure is read here
beside the same figure over

- **random directions**: as many seeded unit-norm directions as the SAE has latents, projected
  from the raw units (the same directions as the quality table's);
- **PCA components**: the scores of every principal component fitted on the training rows (a
  rotation of the raw units, so as many units as the site has dimensions, fewer when rows are
  fewer);
- **raw units**: the site's neurons or channels.

Figures, per basis (:data:`~sciscope.core.sae.quality.BASES`):

- each statistic the adapter declares in ``feature_statistics`` (Moran's I in geospatial): its
  maximum over units, and the units that pass the statistic's :class:`UnitRule` (De Sabbata et
  al.: I >= 0.3 and permutation p < 0.01);
- the concept associations (:func:`~sciscope.core.features.concept_associations`): the best
  |effect| over units (rank-biserial correlation or Spearman's rho), and the units tied to at
  least one concept at FDR 0.05 (Benjamini-Hochberg over all tests of that basis).

Counts over bases of different sizes are given as counts and as fractions of the basis' units.
The core analysis (:func:`unit_controls_analysis`) runs after the features stage in every domain
and writes ``features/unit_controls.csv``.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .errors import SciscopeError
from .features import Groups, Statistic, concept_associations, statistics_table
from .verdict import FRACTION_MARGIN

if TYPE_CHECKING:
    from .context import RunContext
    from .experiment import Analysis

__all__ = [
    "ASSOCIATION",
    "UnitRule",
    "control_bases",
    "default_rule",
    "morans_i_rule",
    "unit_controls_analysis",
    "unit_controls_headline",
    "unit_controls_table",
]

log = logging.getLogger(__name__)

#: the bases, in the table's order (the quality table's)
BASES = ("sae", "pca", "raw_units", "random_directions")
#: the ``statistic`` of the concept-association rows
ASSOCIATION = "concept association"
_COLUMNS = ["statistic", "basis", "n_units", "n_live", "max", "count", "fraction", "threshold", "rule"]
_NAMES = {"sae": "SAE latents", "pca": "PCA components", "raw_units": "raw units", "random_directions": "random directions"}


@dataclass(frozen=True)
class UnitRule:
    """How to read a per-unit statistic: its value, and when a unit counts as having the property.

    A unit passes when ``value >= threshold`` and, with ``p_column``, ``p < alpha``.

    Attributes
    ----------
    statistic
        The name of the adapter's feature statistic (a key of ``feature_statistics``).
    column
        The column of its output that holds the value (``"I"``); None for a statistic that
        returns a single column.
    threshold
        The effect size a unit must reach (None: only the maximum is reported).
    p_column, alpha
        The p-value column and the level it is read at (None: the effect size alone).
    p_fallback
        A p-value column used where ``p_column`` is NaN (Moran's I: ``p_rand`` where no
        permutations were run because the unit's I was below ``permute_min_i``).
    permutations
        The permutations behind ``p_column``, when known: checked against ``alpha`` (with 99 the
        smallest p is 0.01 and ``p < 0.01`` can never be met), and the p-value part of the rule
        is then dropped with a :class:`~sciscope.core.spatial.PermutationWarning`.
    compute
        ``fn(acts, obs) -> DataFrame`` computing the statistic on the control bases (default: the
        adapter's own). Lets a rule skip work the count does not read, e.g. permutation p-values
        of units below the threshold (``permute_min_i``).
    label
        How the statistic is named in the table and headline (default: ``statistic``).
    """

    statistic: str
    column: str | None = None
    threshold: float | None = None
    p_column: str | None = None
    alpha: float | None = None
    p_fallback: str | None = None
    permutations: int | None = None
    compute: Callable[[np.ndarray, pd.DataFrame], Any] | None = None
    label: str = ""

    @property
    def name(self) -> str:
        return self.label or self.statistic

    def describe(self, *, with_p: bool = True) -> str:
        """The rule in words: ``"I >= 0.3 and p_sim < 0.01"``."""
        if self.threshold is None:
            return ""
        text = f"{self.column or self.statistic} >= {self.threshold:g}"
        if with_p and self.p_column and self.alpha is not None:
            text += f" and {self.p_column} < {self.alpha:g}"
        return text


def morans_i_rule(statistic: str = "morans_i", *, threshold: float | None = None, alpha: float | None = None,
                  permutations: int | None = None, compute: Any = None) -> UnitRule:
    """The rule of a Moran's I feature statistic (defaults: the geospatial paper's I >= 0.3, p < 0.01).

    A unit counts when ``I >= threshold`` and ``p_sim < alpha``; where no permutations were run
    for a unit (``permute_min_i`` above its I), its analytic ``p_rand`` stands in.
    ``permutations`` (when known) is checked against ``alpha``; ``compute`` (e.g.
    ``morans_i_table`` with ``permute_min_i=threshold``) computes it on the control bases, where
    only units at the threshold need a permutation p-value.
    """
    from .spatial import MORANS_I_ALPHA, MORANS_I_THRESHOLD

    return UnitRule(statistic, column="I", threshold=MORANS_I_THRESHOLD if threshold is None else threshold,
                    p_column="p_sim", alpha=MORANS_I_ALPHA if alpha is None else alpha, p_fallback="p_rand",
                    permutations=permutations, compute=compute, label="Moran's I")


def default_rule(statistic: str, columns: Sequence[str]) -> UnitRule:
    """The rule for a statistic an adapter declares no rule for, from its output columns.

    A statistic that returns :func:`sciscope.core.spatial.morans_i`'s columns is Moran's I and gets
    the geospatial paper's rule (I >= 0.3 and p_sim < 0.01); any other statistic reports its
    first column's maximum and no count (the core cannot guess a threshold).
    """
    from .spatial import MORANS_I_COLUMNS

    if set(MORANS_I_COLUMNS) <= set(columns):
        return morans_i_rule(statistic)
    return UnitRule(statistic, column=None if len(columns) == 1 else str(columns[0]))


# ------------------------------------------------------------------------------------------------
# bases
# ------------------------------------------------------------------------------------------------


def control_bases(x: np.ndarray, *, n_random: int, train: np.ndarray | None = None, seed: int = 0,
                  dtype: Any = np.float32) -> dict[str, np.ndarray]:
    """The control units of rows ``x`` ``(N, D)``: PCA scores, raw units, random projections.

    Parameters
    ----------
    x
        The site's raw units, one row per example.
    n_random
        Random directions (as many as the SAE has latents).
    train
        Boolean mask of the rows PCA is fitted on (default: every row).
    seed
        Seeds the random directions (:func:`sciscope.core.sae.metrics.random_directions`): the same
        directions as :func:`sciscope.core.sae.quality.quality_table`'s.
    dtype
        Of the returned arrays (float32 halves the memory of ``N x n_random`` projections).

    Returns
    -------
    ``{"pca": (N, min(n_train, D)), "raw_units": (N, D), "random_directions": (N, n_random)}``.
    """
    from .sae.metrics import random_directions

    x64 = np.asarray(x, dtype=np.float64)
    fit = x64 if train is None else x64[np.asarray(train, dtype=bool)]
    if len(fit) < 2:
        raise ValueError(f"PCA needs at least 2 training rows, got {len(fit)}")
    mean = fit.mean(0)
    _, _, vt = np.linalg.svd(fit - mean, full_matrices=False)  # (min(n_train, D), D)
    dirs = random_directions(int(n_random), x64.shape[1], seed)
    return {"pca": ((x64 - mean) @ vt.T).astype(dtype), "raw_units": x64.astype(dtype),
            "random_directions": (x64 @ dirs.T).astype(dtype)}


# ------------------------------------------------------------------------------------------------
# the table
# ------------------------------------------------------------------------------------------------


def _column(extra: pd.DataFrame, rule: UnitRule, column: str | None) -> pd.Series | None:
    """The statistic's column in a ``statistics_table`` (``name_col``, or ``name`` for a single column)."""
    if column is None:
        return extra[rule.statistic] if rule.statistic in extra.columns else None
    if f"{rule.statistic}_{column}" in extra.columns:
        return extra[f"{rule.statistic}_{column}"]
    if rule.statistic in extra.columns and column == rule.column:  # a single-column statistic, named by the statistic
        return extra[rule.statistic]
    return None


def _summarise(values: np.ndarray, passed: np.ndarray | None, n_units: int) -> dict[str, Any]:
    live = np.isfinite(values)
    count = int(np.count_nonzero(passed)) if passed is not None else None
    return {"n_units": int(n_units), "n_live": int(live.sum()),
            "max": float(np.max(values[live])) if live.any() else math.nan,
            "count": count if count is not None else math.nan,
            "fraction": count / n_units if count is not None and n_units else math.nan}


def _rule_rows(rule: UnitRule, extras: Mapping[str, pd.DataFrame], n_units: Mapping[str, int]) -> list[dict[str, Any]]:
    """One row per basis of one statistic; the p-value part dropped (with a warning) where unreachable."""
    from .spatial import PermutationWarning, check_permutations

    use_p = rule.threshold is not None and rule.p_column is not None and rule.alpha is not None
    why = ""
    if use_p and rule.permutations is not None:
        if not check_permutations(rule.permutations, rule.alpha, what=f"unit controls of {rule.name}"):  # type: ignore[arg-type]
            use_p, why = False, f"; p not read: {rule.permutations} permutations cannot give p < {rule.alpha:g}"
    p_all: dict[str, np.ndarray] = {}
    if use_p:
        for b, extra in extras.items():
            p = _column(extra, rule, rule.p_column)
            p = np.full(len(extra), np.nan) if p is None else p.to_numpy(dtype=np.float64).copy()
            if rule.p_fallback is not None and (fb := _column(extra, rule, rule.p_fallback)) is not None:
                p = np.where(np.isfinite(p), p, fb.to_numpy(dtype=np.float64))
            p_all[b] = p
        finite = np.concatenate([p[np.isfinite(p)] for p in p_all.values()]) if p_all else np.array([])
        if finite.size and finite.min() >= rule.alpha:  # type: ignore[operator]
            # with unknown permutations, no unit of any basis below alpha means the floor 1/(P+1) is too high
            warnings.warn(f"unit controls of {rule.name}: no unit of any basis has {rule.p_column} < {rule.alpha:g} "
                          f"(smallest {finite.min():.3g}): too few permutations for this threshold? Counting on "
                          f"the effect size alone", PermutationWarning, stacklevel=3)
            use_p, why = False, f"; p not read: the smallest {rule.p_column} is {finite.min():.3g}"
    rows = []
    for b, extra in extras.items():
        col = _column(extra, rule, rule.column)
        values = np.full(len(extra), np.nan) if col is None else col.to_numpy(dtype=np.float64)
        passed = None
        if rule.threshold is not None:
            passed = np.isfinite(values) & (np.nan_to_num(values, nan=-np.inf) >= rule.threshold)
            if use_p:
                passed &= np.nan_to_num(p_all[b], nan=np.inf) < rule.alpha  # type: ignore[operator]
        rows.append({"statistic": rule.name, "basis": b, **_summarise(values, passed, n_units[b]),
                     "threshold": rule.threshold if rule.threshold is not None else math.nan,
                     "rule": (rule.describe(with_p=use_p) + why) if rule.threshold is not None else "maximum only"})
    return rows


def _association_rows(assoc: Mapping[str, pd.DataFrame], n_units: Mapping[str, int], alpha: float) -> list[dict[str, Any]]:
    rows = []
    for b, a in assoc.items():
        values = np.full(n_units[b], np.nan)
        passed = np.zeros(n_units[b], dtype=bool)
        if len(a):
            ok = a[np.isfinite(a["p"].to_numpy(dtype=np.float64))]
            best = ok.assign(_abs=ok["effect"].abs()).groupby("feature")["_abs"].max()
            values[best.index.to_numpy(dtype=np.int64)] = best.to_numpy(dtype=np.float64)
            passed[a.loc[a["significant"].astype(bool), "feature"].unique().astype(np.int64)] = True
        rows.append({"statistic": ASSOCIATION, "basis": b, **_summarise(values, passed, n_units[b]),
                     "threshold": alpha,
                     "rule": f"max: best |effect| per unit; count: units with q < {alpha:g} for a concept "
                             "(Benjamini-Hochberg over every test of the basis)"})
    return rows


def unit_controls_table(
    bases: Mapping[str, Any],
    obs: pd.DataFrame,
    *,
    statistics: Mapping[str, Statistic] | None = None,
    rules: Mapping[str, UnitRule] | None = None,
    concepts: Sequence[str] = (),
    alpha: float = 0.05,
    groups: Groups | None = None,
    precomputed: Mapping[str, tuple[pd.DataFrame | None, pd.DataFrame | None]] | None = None,
) -> pd.DataFrame:
    """Maximum and count of every statistic and of the concept associations, per basis.

    Parameters
    ----------
    bases
        ``{basis: (n_obs, n_units) array}`` row-aligned with ``obs`` (the SAE's latents and
        :func:`control_bases`).
    obs
        Rows' metadata (concept columns, and what the statistics read).
    statistics
        The adapter's ``feature_statistics``.
    rules
        ``{statistic: UnitRule}``; a statistic without one gets :func:`default_rule`.
    concepts
        Concept columns for the associations (none: no association rows).
    alpha
        FDR level of "tied to a concept".
    groups
        Test the associations at the level of the group (see ``concept_associations``).
    precomputed
        ``{basis: (extra, associations)}`` already computed (the features stage's SAE analysis);
        either may be None to compute it here.

    Returns
    -------
    Tidy DataFrame: ``statistic``, ``basis``, ``n_units``, ``n_live`` (units with a finite
    value), ``max``, ``count`` (units passing the rule; NaN without a threshold), ``fraction``
    (count / n_units), ``threshold``, ``rule`` (in words).
    """
    statistics = dict(statistics or {})
    rules = dict(rules or {})
    precomputed = dict(precomputed or {})
    n_units = {b: int(np.shape(a)[1]) for b, a in bases.items()}
    for b, a in bases.items():
        if np.shape(a)[0] != len(obs):
            raise ValueError(f"basis {b!r} has {np.shape(a)[0]} rows, obs has {len(obs)}")
    rows: list[dict[str, Any]] = []
    if statistics:
        first = next(iter(bases.values()))
        for name, fn in statistics.items():
            rule = rules.get(name)
            if rule is None:
                probe = statistics_table(np.asarray(first[:, :1], dtype=np.float64), obs, {name: fn})
                cols = [c[len(name) + 1:] if c.startswith(f"{name}_") else c for c in probe.columns if c != "feature"]
                rule = default_rule(name, cols)
            compute = rule.compute or fn
            extras = {}
            for b, a in bases.items():
                pre = precomputed.get(b, (None, None))[0]
                if pre is not None and _column(pre, rule, rule.column) is not None and len(pre) == n_units[b]:
                    extras[b] = pre.sort_values("feature").reset_index(drop=True)
                else:
                    extras[b] = statistics_table(a, obs, {name: compute})
            rows += _rule_rows(rule, extras, n_units)
    if concepts:
        assoc = {}
        for b, a in bases.items():
            pre = precomputed.get(b, (None, None))[1]
            assoc[b] = pre if pre is not None else concept_associations(a, obs, list(concepts), alpha=alpha, groups=groups)
        rows += _association_rows(assoc, n_units, alpha)
    return pd.DataFrame(rows, columns=_COLUMNS)


# ------------------------------------------------------------------------------------------------
# headline and the core analysis
# ------------------------------------------------------------------------------------------------


def _fmt(v: float) -> str:
    return "n/a" if not np.isfinite(v) else f"{v:.3g}"


def unit_controls_headline(table: pd.DataFrame, *, source: str = "features/unit_controls.csv") -> list[dict[str, Any]]:
    """Headline rows: per statistic, the SAE's maximum and count beside random directions'.

    The note names PCA and the raw units and says in words whether the SAE beats each; the
    stronger of the two is the row's ``baseline`` (its verdict follows). Counts are compared as
    fractions of each basis' units (the bases differ in size): a count's baseline is the stronger
    basis' fraction times the SAE's number of latents.
    """
    out: list[dict[str, Any]] = []
    for stat, t in table.groupby("statistic", sort=False):
        t = t.set_index("basis")
        if "sae" not in t.index:
            continue
        sae = t.loc["sae"]
        if stat != ASSOCIATION and not np.isfinite(sae["threshold"]):
            continue  # a statistic without a rule (e.g. a shuffled control): in the table, not the headline
        others = [b for b in ("random_directions", "pca", "raw_units") if b in t.index]
        ctrl = t.loc["random_directions"] if "random_directions" in t.index else None
        what = "best |effect| over units" if stat == ASSOCIATION else f"max {stat} over units"
        beaten = [b for b in others if np.isfinite(t.loc[b, "max"]) and not sae["max"] > t.loc[b, "max"]]
        bases = [b for b in ("pca", "raw_units") if b in t.index and np.isfinite(t.loc[b, "max"])]
        strongest = max(bases, key=lambda b: t.loc[b, "max"]) if bases else None
        out.append({
            "name": f"SAE {what}", "value": float(sae["max"]),
            "control": float(ctrl["max"]) if ctrl is not None else None,
            "control_label": f"as many random directions ({int(ctrl['n_units'])})" if ctrl is not None else "",
            **({"baseline": float(t.loc[strongest, "max"]),
                "baseline_label": f"{_NAMES[strongest]} ({int(t.loc[strongest, 'n_units'])}), the stronger of PCA and the raw units",
                "tolerance": FRACTION_MARGIN}
               if strongest else {}),
            "note": "; ".join(f"{_NAMES[b]} ({int(t.loc[b, 'n_units'])}) {_fmt(t.loc[b, 'max'])}" for b in others if b != "random_directions")
                    + ("; the SAE beats all of them" if not beaten else
                       f"; the SAE does NOT beat {', '.join(_NAMES[b] for b in beaten)}"),
            "source": source})
        if not np.isfinite(sae["count"]):
            continue
        rule = str(sae["rule"])
        label = f"units tied to a concept (FDR {sae['threshold']:g})" if stat == ASSOCIATION else f"units with {rule}"
        frac_beaten = [b for b in others if np.isfinite(t.loc[b, "fraction"]) and not sae["fraction"] > t.loc[b, "fraction"]]
        bases = [b for b in ("pca", "raw_units") if b in t.index and np.isfinite(t.loc[b, "fraction"])]
        strongest = max(bases, key=lambda b: t.loc[b, "fraction"]) if bases else None
        out.append({
            "name": f"SAE {label}", "value": int(sae["count"]),
            "control": int(ctrl["count"]) if ctrl is not None and np.isfinite(ctrl["count"]) else None,
            "control_label": f"as many random directions ({int(ctrl['n_units'])})" if ctrl is not None else "",
            # the bases differ in size: the baseline is the count the SAE would have at the
            # stronger basis' rate, so the verdict compares fractions
            **({"baseline": float(t.loc[strongest, "fraction"] * sae["n_units"]),
                "baseline_label": f"{_NAMES[strongest]}' rate ({t.loc[strongest, 'fraction']:.1%} of "
                                  f"{int(t.loc[strongest, 'n_units'])}) x the SAE's {int(sae['n_units'])} latents"}
               if strongest else {}),
            "note": "counts over bases of different sizes, so compare fractions: "
                    + "; ".join(f"{_NAMES[b]} {int(t.loc[b, 'count'])}/{int(t.loc[b, 'n_units'])} ({t.loc[b, 'fraction']:.1%})"
                                for b in ("sae", *others) if np.isfinite(t.loc[b, "count"]))
                    + ("; by fraction the SAE beats all of them" if not frac_beaten else
                       f"; by fraction the SAE does NOT beat {', '.join(_NAMES[b] for b in frac_beaten)}"),
            "source": source})
    return out


def unit_controls_analysis() -> "Analysis":
    """The core's unit-controls analysis (after the features stage): ``features/unit_controls.csv``.

    Reads the SAE latents (``ctx.latents()``), the raw units at the adapter's ``sae_site``
    (``ctx.store()``), the features stage's analysis (its SAE statistics and associations are
    reused, not recomputed), the adapter's ``feature_statistics`` and, when it declares them,
    its ``unit_rules`` (``{statistic: UnitRule}``, an optional adapter attribute).
    """
    from .experiment import Analysis

    def compute(ctx: "RunContext") -> pd.DataFrame:
        ad = ctx.adapter
        latents = ctx.latents()
        store = ctx.store()
        obs = latents.obs.reset_index(drop=True)
        z = np.asarray(latents.array("latents"))
        x = np.asarray(store.array(ad.sae_site))
        if len(x) != len(z):
            raise ValueError(f"the store has {len(x)} rows but the latents {len(z)}: not row-aligned")
        split = obs["split"] if "split" in obs.columns else None
        # PCA is fitted on the examples the SAE trained on (not held out), one row per example
        train = (split != "test").to_numpy() if split is not None and (split == "test").any() and (split != "test").sum() >= 2 else None
        bases = {"sae": z, **control_bases(x, n_random=z.shape[1], train=train, seed=ctx.seed)}
        try:
            fa = ctx.features()
            pre = {"sae": (fa.extra, fa.associations if len(fa.associations) else None)}
        except SciscopeError as e:  # no features analysis in this context: the SAE's figures are computed here
            log.info("unit controls: %s; computing the SAE's statistics here", e)
            pre = {}
        # the features stage's grouping, so the control bases are tested as the SAE's latents were
        table = unit_controls_table(bases, obs, statistics=ad.feature_statistics, rules=ad.unit_rules,
                                    concepts=[c for c in ad.concepts if c in obs.columns], precomputed=pre,
                                    groups=ad.association_groups)
        ctx.write_table("unit_controls.csv", table)
        ctx.live["unit_controls"] = table  # for the adapter's analyses after the features stage
        return table

    return Analysis("unit_controls", "features", compute, unit_controls_headline)
