"""Feature cards: everything a reader needs to judge one SAE feature, on one card.

A card holds, for one feature of a run's SAE:

- its density and a histogram of its activations (all rows);
- the top-``k`` examples with their metadata, and a few examples from lower quantiles of its
  non-zero activations (what it does when it fires weakly);
- its concept associations with their q-values (from the features stage);
- its decoder direction read through the lens, where the adapter gives an (un)embedding basis;
- its steering: every plan that steered with it, and the cosine of its decoder direction with
  every delta vector the run built at the SAE's site (beside its rank among all latents);
- its duplicates: other latents whose decoder directions have cosine > 0.9 with it;
- the adapter's pictures of its examples (:meth:`DomainAdapter.render_examples`): molecules with
  atoms coloured by activation, cells on the UMAP, places on a map, fields, robot frames.

:func:`select_features` picks the features worth a card: the top ones by the domain's own measure
of interest (:attr:`DomainAdapter.card_ranking`) and, as the control, a seeded random sample of
live features -- what a card of an arbitrary feature looks like. :func:`build_cards` makes them,
:func:`write_cards` / :func:`read_cards` keep them as JSON (figures as base64 PNG inside, nothing
unpickled), :meth:`FeatureCard.html` renders one (Jupyter shows it inline), and
:func:`feature_browser_html` writes the self-contained, searchable page of all cards.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .errors import SciscopeError
from .io import write_text

if TYPE_CHECKING:
    from .context import RunContext
    from .features import FeatureAnalysis

__all__ = ["FeatureCard", "Panel", "build_card", "build_cards", "feature_browser_html", "position_activations",
           "read_cards", "select_features", "write_cards", "DUPLICATE_COSINE", "QUANTILE_BANDS"]

#: Decoder cosine above which two latents are called duplicates.
DUPLICATE_COSINE = 0.9
#: Lower quantiles of a feature's non-zero activations that a card shows examples from.
QUANTILE_BANDS = (0.75, 0.5, 0.25)
PER_BAND = 2  # examples per lower-quantile band
MAX_ASSOCIATIONS = 8  # association rows on a card
LENS_TOKENS = 8
_INTERNAL_COLUMNS = {"split", "example_row", "position", "row", "feature", "rank", "activation", "band"}
_esc = html.escape


# ------------------------------------------------------------------------------------------------
# the card and its pictures
# ------------------------------------------------------------------------------------------------


@dataclass
class Panel:
    """One picture on a card: PNG bytes with a title and a caption."""

    title: str
    png: bytes
    caption: str = ""

    @classmethod
    def from_figure(cls, fig: Any, title: str = "", caption: str = "", *, dpi: int = 80) -> "Panel":
        """Render a matplotlib figure to a panel (and close it)."""
        import matplotlib.pyplot as plt

        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
        plt.close(fig)
        return cls(title=title, png=buf.getvalue(), caption=caption)

    def to_dict(self) -> dict[str, str]:
        return {"title": self.title, "caption": self.caption, "png": base64.b64encode(self.png).decode("ascii")}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Panel":
        return cls(title=str(d.get("title", "")), caption=str(d.get("caption", "")), png=base64.b64decode(d["png"]))

    def html(self) -> str:
        src = "data:image/png;base64," + base64.b64encode(self.png).decode("ascii")
        cap = f"<figcaption>{_esc(self.title)}{': ' if self.title and self.caption else ''}{_esc(self.caption)}</figcaption>"
        return f'<figure class="panel"><img src="{src}" alt="{_esc(self.title or "panel")}">{cap}</figure>'


def _plain(v: Any) -> Any:
    """A JSON-able scalar (numpy scalars unwrapped, NaN as None)."""
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    return str(v)


def _fmt(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return "" if v is None else str(v)
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        v = float(v)
        if not math.isfinite(v):
            return "nan"
        return f"{v:.3g}" if v != 0 else "0"
    text = str(v)
    return text if len(text) <= 60 else text[:60] + "…"


def _table(rows: list[dict[str, Any]], columns: Sequence[str], cls: str = "") -> str:
    if not rows:
        return ""
    head = "".join(f"<th>{_esc(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{_esc(_fmt(r.get(c)))}</td>" for c in columns) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


@dataclass
class FeatureCard:
    """One feature's card (see the module docstring for what each part means).

    Attributes
    ----------
    feature : int
        The latent's index in the SAE.
    selection : str
        ``"top"`` (chosen by the domain's interest), ``"control"`` (a random live feature) or
        ``"chosen"`` (asked for by name).
    reason : str
        Why it is on a card, in words.
    interest : float or None
        Its value of the ranking statistic.
    stats : dict
        ``density``, ``mean_active``, ``max``, ``n_rows``.
    examples : list of dict
        ``band`` ("top" or "q75" ...), ``rank``, ``activation``, ``row`` and the shown obs columns.
    columns : list of str
        The obs columns shown in the example table.
    associations : list of dict
        ``concept``, ``value``, ``statistic``, ``effect``, ``q``, ``significant``; strongest first.
    lens : list of dict
        ``token``, ``score``: the top tokens of the decoder direction (empty without a basis).
    lens_label : str
        Which basis the lens read (the adapter's third item of :meth:`DomainAdapter.lens_basis`).
    steering : list of dict
        ``plan``, ``how`` and numbers: plans that steered with this feature, and cosines with
        the run's delta vectors.
    duplicates : list of dict
        ``feature``, ``cosine`` (> :data:`DUPLICATE_COSINE`).
    histogram : Panel or None
    panels : list of Panel
        The adapter's pictures of the examples.
    notes : list of str
        What could not be shown, and why.
    """

    feature: int
    selection: str = "chosen"
    reason: str = ""
    interest: float | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    examples: list[dict[str, Any]] = field(default_factory=list)
    columns: list[str] = field(default_factory=list)
    associations: list[dict[str, Any]] = field(default_factory=list)
    lens: list[dict[str, Any]] = field(default_factory=list)
    lens_label: str = ""
    steering: list[dict[str, Any]] = field(default_factory=list)
    duplicates: list[dict[str, Any]] = field(default_factory=list)
    histogram: Panel | None = None
    panels: list[Panel] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    # -- serialisation ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (pictures as base64 PNG)."""
        d = {k: getattr(self, k) for k in ("feature", "selection", "reason", "interest", "stats", "examples", "columns",
                                            "associations", "lens", "lens_label", "steering", "duplicates", "notes")}
        d["histogram"] = None if self.histogram is None else self.histogram.to_dict()
        d["panels"] = [p.to_dict() for p in self.panels]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FeatureCard":
        kw = {k: d[k] for k in ("feature", "selection", "reason", "interest", "stats", "examples", "columns",
                                "associations", "lens", "lens_label", "steering", "duplicates", "notes") if k in d}
        return cls(**kw, histogram=Panel.from_dict(d["histogram"]) if d.get("histogram") else None,
                   panels=[Panel.from_dict(p) for p in d.get("panels", [])])

    # -- what a search matches ---------------------------------------------------------------------
    @property
    def concepts(self) -> list[str]:
        """Concepts this feature is significantly tied to (``concept=value`` for categories)."""
        out = []
        for a in self.associations:
            if a.get("significant"):
                v = a.get("value")
                out.append(f"{a['concept']}={v}" if v not in (None, "", "nan") else str(a["concept"]))
        return out

    def search_text(self) -> str:
        """Lower-case text a browser search matches: id, selection, concepts, lens tokens, example labels."""
        parts = [f"feature {self.feature}", f"f{self.feature}", self.selection, self.reason, *self.concepts,
                 *(str(t.get("token")) for t in self.lens), *(str(s.get("plan")) for s in self.steering)]
        for e in self.examples[:10]:
            parts += [str(e.get(c)) for c in self.columns]
        return " ".join(parts).lower()

    # -- HTML --------------------------------------------------------------------------------------
    def html(self) -> str:
        """The card as a self-contained HTML fragment (inline CSS classes of :data:`CARD_CSS`)."""
        s = self.stats
        head = (f'<h3>Feature {self.feature} <span class="sel sel-{_esc(self.selection)}">{_esc(self.selection)}</span></h3>'
                f'<p class="why">{_esc(self.reason)}</p>'
                f'<p class="stats">fires on {_fmt(100 * float(s.get("density", 0.0)))}% of {_fmt(s.get("n_rows"))} rows · '
                f'mean when active {_fmt(s.get("mean_active"))} · max {_fmt(s.get("max"))}</p>')
        parts = [head]
        top = [e for e in self.examples if e.get("band") == "top"]
        low = [e for e in self.examples if e.get("band") != "top"]
        pics = ([self.histogram] if self.histogram is not None else []) + list(self.panels)
        if pics:
            parts.append('<div class="panels">' + "".join(p.html() for p in pics) + "</div>")
        cols = ["rank", "activation", *self.columns]
        if top:
            parts.append("<h4>Top examples</h4>" + _table(top, cols, "examples"))
        if low:
            parts.append("<h4>Weaker activations (lower quantiles of its non-zero values)</h4>"
                         + _table(low, ["band", "activation", *self.columns], "examples"))
        if self.associations:
            parts.append("<h4>Concept associations</h4>"
                         + _table(self.associations, ["concept", "value", "statistic", "effect", "q", "significant"], "assoc"))
        else:
            parts.append('<p class="muted">No concept association was tested for this feature.</p>')
        if self.lens:
            through = f" ({_esc(self.lens_label)})" if self.lens_label else ""
            parts.append(f"<h4>Decoder direction through the lens{through}</h4><p class=\"lens\">"
                         + " ".join(f'<span class="tok" title="{_esc(_fmt(t["score"]))}">{_esc(str(t["token"]))}</span>'
                                    for t in self.lens) + "</p>")
        if self.steering:
            parts.append("<h4>Steering</h4><ul>" + "".join(f"<li>{_esc(str(x['text']))}</li>" for x in self.steering) + "</ul>")
        if self.duplicates:
            parts.append(f"<h4>Duplicates (decoder cosine &gt; {DUPLICATE_COSINE})</h4><p>"
                         + ", ".join(f"feature {d['feature']} ({_fmt(d['cosine'])})" for d in self.duplicates) + "</p>")
        if self.notes:
            parts.append('<p class="muted">' + " ".join(_esc(n) for n in self.notes) + "</p>")
        return (f'<article class="card" id="card-{self.feature}" data-feature="{self.feature}" '
                f'data-selection="{_esc(self.selection)}" data-concepts="{_esc("|".join(self.concepts))}" '
                f'data-density="{_esc(str(_plain(s.get("density"))))}" data-interest="{_esc(str(_plain(self.interest)))}" '
                f'data-search="{_esc(self.search_text())}">' + "".join(parts) + "</article>")

    def _repr_html_(self) -> str:
        return f"<style>{CARD_CSS}</style>{self.html()}"

    def __repr__(self) -> str:
        return (f"FeatureCard(feature={self.feature}, {self.selection}, density={_fmt(self.stats.get('density'))}, "
                f"{len(self.examples)} examples, {len(self.concepts)} significant concepts, {len(self.panels)} pictures)")


CARD_CSS = """
.card { border: 1px solid #d9dde3; border-radius: 6px; padding: .6rem .9rem; margin: 0 0 1rem; background: #fff;
  font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, Arial, sans-serif; color: #1d1f23; }
.card h3 { margin: .1rem 0 .2rem; font-size: 1.1rem; }
.card h4 { margin: .7rem 0 .2rem; font-size: .9rem; }
.card .why, .card .stats, .card .muted { color: #5f6670; margin: .1rem 0; font-size: .85rem; }
.card .sel { font-size: .72rem; padding: 0 .4rem; border-radius: .6rem; border: 1px solid #9fb6d9; color: #2857a4;
  vertical-align: middle; font-weight: normal; }
.card .sel-control { border-color: #ccc; color: #666; }
.card table { border-collapse: collapse; font-size: .8rem; margin: .2rem 0 .4rem; }
.card th, .card td { border: 1px solid #e3e6ea; padding: .1rem .35rem; text-align: left; }
.card th { background: #f5f7fa; }
.card .panels { display: flex; flex-wrap: wrap; gap: .6rem; align-items: flex-start; }
.card figure.panel { margin: 0; max-width: 100%; display: table; }  /* the caption as wide as its picture */
.card figure.panel img { max-width: 100%; max-height: 320px; border: 1px solid #e3e6ea; }
.card figcaption { font-size: .75rem; color: #5f6670; display: table-caption; caption-side: bottom; }
.card .tok { display: inline-block; font-family: ui-monospace, Menlo, Consolas, monospace; background: #f0f3f8;
  border-radius: 3px; padding: 0 .3rem; margin: 0 .2rem .2rem 0; }
"""


# ------------------------------------------------------------------------------------------------
# choosing features
# ------------------------------------------------------------------------------------------------


def _interest(analysis: "FeatureAnalysis", ranking: str | None) -> tuple[pd.Series, str]:
    """Per live feature, the value it is ranked by (larger |value| first) and the measure's name."""
    table = analysis.features.set_index("feature")
    live = table["density"] > 0
    declared = ranking
    if ranking is not None:
        if ranking not in table.columns:
            raise SciscopeError(f"card_ranking {ranking!r} is not a column of the feature table (a features stage "
                                f"older than the adapter? rerun it); columns: {sorted(map(str, table.columns))}")
        values = pd.to_numeric(table.loc[live, ranking], errors="coerce")
        values = values[np.isfinite(values)]  # a statistic undefined for a feature (too few groups) ranks nothing
        if len(values):
            return values, ranking
        ranking = None  # undefined for every feature (a tiny run): the default below, and the reason says so
    # default: the strongest significant concept association (|effect|: AUROC - 0.5 scaled, or rho)
    eff = table["best_effect"].astype(float).abs() if "best_effect" in table.columns else pd.Series(0.0, index=table.index)
    sig = table["best_significant"].map(lambda v: v is True or v == "True" or v == 1).astype(bool) if "best_significant" in table.columns else eff > 0
    label = "|effect| of its strongest significant concept association"
    if declared is not None:
        label += f" ({declared!r} is undefined for every feature)"
    return eff.where(sig & live).dropna(), label


def _concept_words(table: pd.DataFrame, f: Any) -> str:
    """"; strongest concept: fluoro=True (auroc 0.98, q 2e-199)" for a card's reason line."""
    if "best_concept" not in table.columns or pd.isna(table.at[f, "best_concept"]):
        return ""
    value = table.at[f, "best_value"] if "best_value" in table.columns else None
    name = str(table.at[f, "best_concept"]) + ("" if value is None or pd.isna(value) or value == "" else f"={value}")
    stat = table.at[f, "best_stat"] if "best_stat" in table.columns else "statistic"
    return (f"; strongest concept: {name} ({stat} {_fmt(table.at[f, 'best_statistic'])}, "
            f"q {_fmt(table.at[f, 'best_q'])})" if "best_statistic" in table.columns and "best_q" in table.columns else
            f"; strongest concept: {name}")


def select_features(analysis: "FeatureAnalysis", *, ranking: str | None = None, n_top: int = 12, n_control: int = 6,
                    seed: int = 0, always: Sequence[int] = (), per_concept: int | None = 2
                    ) -> list[tuple[int, str, str, float | None]]:
    """The features that get a card: the top ``n_top`` by interest and ``n_control`` random live ones.

    Parameters
    ----------
    analysis
        The features stage's analysis (density, best concept, adapter statistics).
    ranking
        A column of ``analysis.features`` (e.g. ``"morans_i_I"``); features are ranked by its
        absolute value. None: the |effect| of each feature's strongest significant concept.
    n_top, n_control
        How many top features, and how many random live features as the control (drawn, seeded,
        from the live features not already chosen).
    seed
        Seed of the control draw.
    always
        Features that get a card whatever their rank (e.g. those a steering plan used).
    per_concept
        At most this many top cards per strongest concept (``best_concept`` = ``best_value``) while
        other concepts have candidates, so twelve cards are not twelve detectors of one group; the
        rest of the ranking fills the remaining places. None: the plain ranking.

    Returns
    -------
    list of (feature, selection, reason, interest)
    """
    score, label = _interest(analysis, ranking)
    order = score.abs().sort_values(ascending=False, kind="stable")
    table = analysis.features.set_index("feature")
    rank_of = {int(f): r for r, f in enumerate(order.index, start=1)}
    picked = list(order.index[:n_top])
    if per_concept is not None and "best_concept" in table.columns:
        key = lambda f: (str(table.at[f, "best_concept"]), str(table.at[f, "best_value"]))  # noqa: E731
        counts: dict[tuple[str, str], int] = {}
        picked = []
        for f in order.index:
            if len(picked) < n_top and counts.get(key(f), 0) < per_concept:
                picked.append(f)
                counts[key(f)] = counts.get(key(f), 0) + 1
        picked += [f for f in order.index if f not in set(picked)][: n_top - len(picked)]
    chosen: list[tuple[int, str, str, float | None]] = []
    for f in picked:
        chosen.append((int(f), "top", f"rank {rank_of[int(f)]} by {label}: {_fmt(float(score[f]))}{_concept_words(table, f)}",
                       float(score[f])))
    for f in always:
        if int(f) not in {c[0] for c in chosen}:
            chosen.append((int(f), "top", "used by a steering plan", float(score.get(f, np.nan))))
    taken = {c[0] for c in chosen}
    dens = analysis.density.set_index("feature")["density"]
    pool = np.array(sorted(int(f) for f in dens.index[dens > 0] if int(f) not in taken))
    if n_control > 0 and pool.size:
        pick = np.random.default_rng([seed, 0xCA7D]).choice(pool, size=min(n_control, pool.size), replace=False)
        for f in sorted(pick.tolist()):
            v = score.get(f, np.nan)
            chosen.append((int(f), "control", "random live feature (the control: what an arbitrary feature's card "
                                              f"looks like); its {label}: {_fmt(float(v))}", _plain(float(v))))
    return chosen


# ------------------------------------------------------------------------------------------------
# building a card
# ------------------------------------------------------------------------------------------------


def position_activations(ctx: "RunContext", rows: Sequence[int], feature: int) -> dict[int, pd.DataFrame]:
    """Per example row, the feature's activation at every position of the SAE site.

    Only in per-position SAE runs (:attr:`RunContext.sae_row_mode` ``"positions"``, the position
    store on disk); otherwise an empty dict. Each frame has the position store's obs columns
    (``position`` ...) and ``activation``, in position order.
    """
    import torch

    from .sae.rows import EXAMPLE_ROW

    if ctx.sae_row_mode != "positions" or not (ctx._root() / "activations" / "positions").exists():
        return {}
    if "card_positions" not in ctx.live:
        store = ctx.position_store()
        ctx.live["card_positions"] = (store, store.obs[EXAMPLE_ROW].to_numpy(), ctx.sae())
    store, example_row, sae = ctx.live["card_positions"]
    site = ctx.adapter.sae_site
    out = {}
    for r in rows:
        idx = np.flatnonzero(example_row == int(r))
        if not idx.size:
            continue
        with torch.no_grad():
            codes = sae.encode(torch.as_tensor(np.asarray(store.array(site, idx)), dtype=torch.float32))[:, int(feature)]
        frame = store.obs.iloc[idx].reset_index(drop=True).copy()
        frame["activation"] = codes.numpy().astype(np.float64)
        out[int(r)] = frame
    return out


def _examples(column: np.ndarray, obs: pd.DataFrame, k: int) -> pd.DataFrame:
    """Top-``k`` rows and :data:`PER_BAND` rows nearest each lower quantile of the non-zero values."""
    order = np.argsort(-column, kind="stable")
    top = [int(i) for i in order[:k] if column[i] > 0]
    frames = [pd.DataFrame({"band": "top", "rank": range(1, len(top) + 1), "row": top})]
    nz = np.flatnonzero(column > 0)
    used = set(top)
    if nz.size > k:
        for q in QUANTILE_BANDS:
            target = np.quantile(column[nz], q)
            near = nz[np.argsort(np.abs(column[nz] - target), kind="stable")]
            pick = [int(i) for i in near if int(i) not in used][:PER_BAND]
            used.update(pick)
            frames.append(pd.DataFrame({"band": f"q{int(q * 100)}", "rank": range(1, len(pick) + 1), "row": pick}))
    ex = pd.concat(frames, ignore_index=True).astype({"row": np.int64, "rank": np.int64})  # empty bands are object
    ex["activation"] = column[ex["row"].to_numpy()]
    meta = obs.iloc[ex["row"].to_numpy()].reset_index(drop=True)
    meta = meta[[c for c in meta.columns if c not in ex.columns]]
    return pd.concat([ex, meta], axis=1)


def _histogram(column: np.ndarray, feature: int) -> Panel:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(3.4, 2.3))
    active = column[column > 0]
    if active.size:
        ax.hist(active, bins=min(40, max(5, active.size // 5)), color="#2857a4")
        ax.set_yscale("log")
    ax.set_xlabel("activation (non-zero rows)")
    ax.set_ylabel("rows")
    ax.set_title(f"feature {feature}: {active.size} of {column.size} rows fire", fontsize=9)
    return Panel.from_figure(fig, "activations", f"{column.size - active.size} rows at zero not drawn")


def _associations(analysis: "FeatureAnalysis", feature: int) -> list[dict[str, Any]]:
    a = analysis.associations
    if not len(a):
        return []
    mine = a[a["feature"] == feature].copy()
    if not len(mine):
        return []
    mine["_sig"] = mine["significant"].astype(bool)
    mine["_abs"] = mine["effect"].astype(float).abs()
    mine = mine.sort_values(["_sig", "_abs"], ascending=[False, False]).head(MAX_ASSOCIATIONS)
    return [{k: _plain(r.get(k)) for k in ("concept", "value", "statistic", "effect", "q", "significant")}
            for r in mine.to_dict("records")]


def _unit(w: np.ndarray) -> np.ndarray:
    return w / np.maximum(np.linalg.norm(w, axis=-1, keepdims=True), 1e-12)


def _steering_plans(ctx: "RunContext", w_unit: np.ndarray) -> list[dict[str, Any]]:
    """The run's steering plans, read once per context: name, intervention, headline, and the cosine
    ``(d_sae,)`` of every decoder direction with the plan's delta vector when it lives at the SAE site."""
    if "card_plans" in ctx.live:
        return ctx.live["card_plans"]
    root = ctx._root() / "steering"
    plans = []
    for summary in sorted(root.glob("*/summary.json")) if root.is_dir() else []:
        try:
            info = json.loads(summary.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        plan = info.get("plan", {})
        inter = plan.get("intervention", {})
        cos = None
        vec_file = summary.parent / "vector.safetensors"
        if vec_file.is_file() and inter.get("site") in (ctx.adapter.sae_site, ctx.adapter.aliases.get(ctx.adapter.sae_site)):
            from .steer import SteeringVector

            v = SteeringVector.load(vec_file).vector.detach().float().numpy().ravel()
            cos = w_unit @ _unit(v) if v.shape[0] == w_unit.shape[1] else None  # (d_sae,)
        plans.append({"name": str(plan.get("name") or summary.parent.name), "intervention": inter,
                      "headline": info.get("headline", {}), "cosine": cos})
    ctx.live["card_plans"] = plans
    return plans


def _steering(ctx: "RunContext", feature: int, w_unit: np.ndarray) -> list[dict[str, Any]]:
    """Plans that steered with this feature, and its cosine with each delta vector at the SAE site."""
    out = []
    for p in _steering_plans(ctx, w_unit):
        name, inter, head, cos = p["name"], p["intervention"], p["headline"], p["cosine"]
        if feature in (inter.get("features") or []):
            out.append({"plan": name, "how": "steered with this feature",
                        "text": f"plan {name} ({inter.get('kind')}) steered with this feature: {head.get('score')} changed by "
                                f"{_fmt(head.get('effect_plus'))} at alpha {_fmt(head.get('alpha_plus'))} (largest of "
                                f"{head.get('n_controls')} matched random features: {_fmt(head.get('control_effect_plus_max_abs'))})"})
        if cos is not None:
            rank = int((np.abs(cos) > abs(cos[feature])).sum()) + 1
            out.append({"plan": name, "how": "cosine with the plan's delta vector", "cosine": float(cos[feature]), "rank": rank,
                        "text": f"decoder cosine with plan {name}'s delta vector {_fmt(float(cos[feature]))}: rank {rank} of "
                                f"{cos.size} latents by |cosine| (the most aligned latent: {_fmt(float(np.abs(cos).max()))})"})
    return out


def _show_columns(ctx: "RunContext", obs: pd.DataFrame) -> list[str]:
    declared = ctx.adapter.card_columns
    if declared is not None:
        missing = [c for c in declared if c not in obs.columns]
        if missing:
            raise SciscopeError(f"{ctx.adapter.name}: card_columns {missing} are not obs columns; obs has {list(obs.columns)}")
        return list(declared)
    concepts = [c for c in ctx.adapter.concepts if c in obs.columns]
    rest = [c for c in obs.columns if c not in concepts and c not in _INTERNAL_COLUMNS and obs[c].dtype == object]
    return (rest[:2] + concepts)[:6]


def _card_state(ctx: "RunContext") -> tuple[Any, np.ndarray, Any]:
    """The latents store, the unit decoder rows ``(d_sae, d_in)`` and the lens basis, read once per context."""
    if "card_latents" not in ctx.live:
        w = ctx.sae().W_dec.detach().float().numpy()  # (d_sae, d_in)
        ctx.live["card_latents"] = (ctx.latents(), _unit(w), ctx.adapter.lens_basis(ctx))
    return ctx.live["card_latents"]


def build_card(ctx: "RunContext", feature: int, *, analysis: "FeatureAnalysis | None" = None, selection: str = "chosen",
               reason: str = "", interest: float | None = None, k: int | None = None) -> FeatureCard:
    """One feature's card from a finished (or running) run.

    Parameters
    ----------
    ctx
        The run's context (the SAE, its latents and the features stage's analysis must exist).
    feature
        The latent's index.
    analysis
        The features stage's analysis (default: ``ctx.features()``).
    selection, reason, interest
        Why the card was made (see :func:`select_features`).
    k
        Top examples (default: the run's ``feature_top_k``).

    Returns
    -------
    FeatureCard
    """
    import torch

    analysis = analysis if analysis is not None else ctx.features()
    latents, w_unit, basis = _card_state(ctx)
    acts = latents.array("latents")
    feature = int(feature)
    if not 0 <= feature < acts.shape[1]:
        raise SciscopeError(f"feature {feature} is not a latent of this SAE (it has {acts.shape[1]})")
    column = np.asarray(acts[:, feature], dtype=np.float64)  # (n_examples,)
    obs = latents.obs
    k = int(k if k is not None else ctx.config.get("feature_top_k", 10))
    examples = _examples(column, obs, k)
    active = column[column > 0]
    card = FeatureCard(feature=feature, selection=selection, reason=reason, interest=_plain(interest),
                       stats={"density": float(active.size / max(1, column.size)), "mean_active": float(active.mean()) if active.size else 0.0,
                              "max": float(column.max()) if column.size else 0.0, "n_rows": int(column.size)})
    card.columns = _show_columns(ctx, obs)
    card.examples = [{k2: _plain(v) for k2, v in r.items() if k2 in ("band", "rank", "activation", "row", *card.columns)}
                     for r in examples.to_dict("records")]
    card.histogram = _histogram(column, feature)
    card.associations = _associations(analysis, feature)
    if basis is not None:
        from .lens import lens

        matrix, tokens, *named = basis
        card.lens_label = str(named[0]) if named else ""
        table = lens(torch.as_tensor(w_unit[feature]), torch.as_tensor(np.asarray(matrix, dtype=np.float32)), tokens=list(tokens),
                     k=LENS_TOKENS)
        card.lens = [{"token": _plain(r["token"]), "score": float(r["score"])} for r in table.to_dict("records")]
    cos = w_unit @ w_unit[feature]
    dup = np.flatnonzero(cos > DUPLICATE_COSINE)
    card.duplicates = [{"feature": int(j), "cosine": float(cos[j])} for j in dup[np.argsort(-cos[dup])] if j != feature]
    card.steering = _steering(ctx, feature, w_unit)
    if not active.size:
        card.notes.append("This feature never fires on the run's examples (dead): nothing to draw.")
    else:
        try:
            card.panels = list(ctx.adapter.render_examples(ctx, feature, examples))
        except Exception as e:  # noqa: BLE001 - a picture that fails must not cost the card; say why on it
            card.notes.append(f"The adapter's pictures failed: {type(e).__name__}: {e}")
    return card


def build_cards(ctx: "RunContext", *, n_top: int | None = None, n_control: int | None = None,
                progress: bool = False) -> list[FeatureCard]:
    """Cards for the top features by the domain's interest and a random control sample.

    Counts default to the run's ``card_top`` and ``card_controls``; features a steering plan used
    always get a card.
    """
    analysis = ctx.features()
    c = ctx.config
    n_top = int(c.get("card_top", 12) if n_top is None else n_top)
    n_control = int(c.get("card_controls", 6) if n_control is None else n_control)
    w_unit = _card_state(ctx)[1]
    used = [f for p in _steering_plans(ctx, w_unit) for f in (p["intervention"].get("features") or [])]
    chosen = select_features(analysis, ranking=ctx.adapter.card_ranking, n_top=n_top, n_control=n_control,
                             seed=ctx.seed, always=sorted(set(int(f) for f in used)))
    from tqdm.auto import tqdm

    return [build_card(ctx, f, analysis=analysis, selection=sel, reason=why, interest=v)
            for f, sel, why, v in tqdm(chosen, desc="feature cards", disable=not progress)]


def write_cards(cards: Sequence[FeatureCard], path: str | os.PathLike[str]) -> Path:
    """Write cards as one JSON file (atomically)."""
    path = Path(path)
    write_text(path, json.dumps([c.to_dict() for c in cards], default=_plain))
    return path


def read_cards(path: str | os.PathLike[str]) -> list[FeatureCard]:
    """Read cards written by :func:`write_cards`."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise SciscopeError(f"cannot read feature cards {path}: {e}") from e
    return [FeatureCard.from_dict(d) for d in data]


# ------------------------------------------------------------------------------------------------
# the browser
# ------------------------------------------------------------------------------------------------

BROWSER_CSS = """
body { margin: 0 auto; padding: 1rem 1.25rem 3rem; max-width: 1200px; background: #fafbfc; color: #1d1f23;
  font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, Arial, sans-serif; }
h1 { font-size: 1.5rem; margin: 0 0 .2rem; }
.sub { color: #5f6670; margin: 0 0 .8rem; }
.controls { position: sticky; top: 0; background: #fafbfc; padding: .5rem 0; border-bottom: 1px solid #d9dde3;
  margin-bottom: .8rem; display: flex; flex-wrap: wrap; gap: .6rem; align-items: center; z-index: 1; }
.controls input, .controls select { font: inherit; padding: .2rem .4rem; }
#search { width: 22rem; max-width: 100%; }
#count { color: #5f6670; }
.card[hidden] { display: none; }
"""

BROWSER_JS = """
(function () {
  var cards = Array.prototype.slice.call(document.querySelectorAll('article.card'));
  var search = document.getElementById('search'), sel = document.getElementById('selection'),
      concept = document.getElementById('concept'), sort = document.getElementById('sort'),
      count = document.getElementById('count'), list = document.getElementById('cards');
  function apply() {
    var words = search.value.toLowerCase().split(/\\s+/).filter(Boolean), shown = 0;
    cards.forEach(function (c) {
      var text = c.getAttribute('data-search') || '';
      var ok = words.every(function (w) {  // a number or f<number> is a feature id; other words match text
        var id = w.match(/^f?(\\d+)$/); return id ? c.dataset.feature === id[1] : text.indexOf(w) >= 0; });
      if (sel.value && c.dataset.selection !== sel.value) ok = false;
      if (concept.value && (c.dataset.concepts || '').split('|').map(function (x) { return x.split('=')[0]; })
            .indexOf(concept.value) < 0) ok = false;
      c.hidden = !ok; if (ok) shown++;
    });
    count.textContent = shown + ' of ' + cards.length + ' cards';
    document.body.setAttribute('data-shown', String(shown));
  }
  function order() {
    var key = sort.value;
    var val = function (c) { var v = parseFloat(c.dataset[key]); return isNaN(v) ? -Infinity : Math.abs(v); };
    cards.slice().sort(function (a, b) {
      return key === 'feature' ? a.dataset.feature - b.dataset.feature : val(b) - val(a);
    }).forEach(function (c) { list.appendChild(c); });
  }
  var q = new URLSearchParams(location.search).get('q') || decodeURIComponent((location.hash || '').replace(/^#q=/, ''));
  if (q && (location.search || location.hash.indexOf('#q=') === 0)) search.value = q;
  [search, sel, concept].forEach(function (el) { el.addEventListener('input', apply); el.addEventListener('change', apply); });
  sort.addEventListener('change', function () { order(); apply(); });
  function checkImages() {
    var imgs = Array.prototype.slice.call(document.images), broken = imgs.filter(function (i) {
      return !i.complete || i.naturalWidth === 0; });
    document.body.setAttribute('data-images', String(imgs.length));
    document.body.setAttribute('data-broken-images', String(broken.length));
  }
  apply();
  if (document.readyState === 'complete') checkImages(); else window.addEventListener('load', checkImages);
})();
"""


def feature_browser_html(cards: Sequence[FeatureCard], *, title: str, report_href: str | None = None,
                         intro: str = "") -> str:
    """A self-contained HTML page of cards: search, filter by selection and concept, sort.

    Works offline from a file: CSS, script and pictures are inside the page. The search matches
    feature ids exactly (``12`` or ``f12``), and as text: concepts, lens tokens, plan names and the example labels; a
    ``?q=...`` or ``#q=...`` in the address fills the search box on load. After the script ran the
    ``body`` carries ``data-shown`` (cards visible), ``data-images`` and ``data-broken-images``.
    """
    concepts = sorted({c.split("=")[0] for card in cards for c in card.concepts})
    n_top = sum(c.selection == "top" for c in cards)
    n_ctrl = sum(c.selection == "control" for c in cards)
    back = f' · <a href="{_esc(report_href)}">back to the report</a>' if report_href else ""
    options = "".join(f'<option value="{_esc(c)}">{_esc(c)}</option>' for c in concepts)
    body = "\n".join(c.html() for c in cards) if cards else '<p class="sub">No feature cards in this run.</p>'
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{_esc(title)}</title><style>{BROWSER_CSS}{CARD_CSS}</style></head><body>"
            f"<h1>{_esc(title)}</h1><p class=\"sub\">{n_top} features chosen by the domain's measure of interest and "
            f"{n_ctrl} random live features as the control{back}. {_esc(intro)}</p>"
            '<div class="controls"><input id="search" type="search" placeholder="search: feature id, concept, token, label" '
            'aria-label="search cards">'
            '<select id="selection" aria-label="selection"><option value="">all cards</option><option value="top">top</option>'
            '<option value="control">control</option><option value="chosen">chosen</option></select>'
            f'<select id="concept" aria-label="concept"><option value="">any concept</option>{options}</select>'
            '<select id="sort" aria-label="sort"><option value="interest">sort by interest</option>'
            '<option value="density">sort by density</option><option value="feature">sort by feature id</option></select>'
            '<span id="count"></span></div>'
            f'<div id="cards">{body}</div><script>{BROWSER_JS}</script></body></html>\n')
