"""Pictures of a feature's cells for its card: the cells on the expression UMAP coloured by the
feature, and the gene tokens of its top cells where it fires most, marker genes named.

The run's SAE reads gene tokens (one row per gene position of a cell; the cell's code is the mean
over its gene tokens), so a feature's activation at each gene token of a top cell is known
(:func:`sciscope.core.cards.position_activations`). :func:`gene_activation_table` pools those over
the top cells: which genes the feature fires on in the cells that carry it most. The run-wide
driver genes (:func:`.features.gene_drivers`, over every cell where it fires) are named beside it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .markers import CANONICAL_MARKERS, match_types

if TYPE_CHECKING:
    from sciscope.core.context import RunContext

    from .adapter import ImmunologyAdapter

__all__ = ["cell_map", "gene_activation_table", "gene_figure", "marker_labels", "position_genes", "render_examples",
           "umap_figure"]

#: genes drawn in the bar chart of a card
N_GENES = 12
#: resolution of the pictures (sized to sit beside the histogram, about 320 px high)
DPI = 100
_LIVE = "immunology_cards"  # ctx.live key of what every card of a run shares (map, genes, markers)
_MARKER_OWN = "#d95f02"  # a marker of the top cells' own type
_MARKER_OTHER = "#f2b480"  # a marker of another type
_PLAIN = "#6f8fb8"


# ------------------------------------------------------------------------------------------------
# what the cards of a run share
# ------------------------------------------------------------------------------------------------


def _obsm_rows(path: Path, keys: Sequence[str], ids: np.ndarray, *, make_unique: bool = False) -> tuple[np.ndarray, str] | None:
    """``obsm[key]`` of the first of ``keys`` an ``.h5ad`` file holds, at the cells ``ids`` (by
    ``cell_id`` or obs name); None when the file has none of them or lacks a cell."""
    import warnings

    import anndata as ad

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # old-format notices, the renaming notice of make-unique
        a = ad.read_h5ad(path, backed="r")  # obs and obsm only; the expression stays on disk
        try:
            key = next((k for k in keys if k in a.obsm), None)
            if key is None:
                return None
            names = a.obs["cell_id"].astype(str) if "cell_id" in a.obs else pd.Series(a.obs_names.astype(str))
            if make_unique:  # load_cells renames repeated ids so; the same names find the same cells
                from anndata.utils import make_index_unique

                names = pd.Series(make_index_unique(pd.Index(names.to_numpy())).astype(str))
            pos = pd.Series(np.arange(a.n_obs), index=names.to_numpy())
            if not pos.index.is_unique or not pd.Index(ids).isin(pos.index).all():
                return None
            xy = np.asarray(a.obsm[key], dtype=np.float64)
            return (xy[pos.loc[ids].to_numpy(), :2], key) if xy.ndim == 2 and xy.shape[1] >= 2 else None
        finally:
            if a.isbacked:
                a.file.close()


def cell_map(ctx: "RunContext", obs: pd.DataFrame) -> tuple[np.ndarray, str, str]:
    """UMAP coordinates of the cells of ``obs`` (row-aligned by ``cell_id``), which UMAP it is, and
    where it comes from.

    In order: the UMAP the data came with (``obsm['X_umap']`` of the source file: for the bundled
    ``pbmc68k_reduced`` the published map of those cells, which readers know); else the
    expression UMAP the features stage stored in ``features/cells.h5ad``; else that UMAP computed
    here once with scanpy (seeded; kept by ``ctx.cached``). Each is a map of what the cells
    express, not of the model, so a feature is read against the data's own map.
    """
    from .data import source_path

    adapter: "ImmunologyAdapter" = ctx.adapter  # type: ignore[assignment]
    ids = obs["cell_id"].astype(str).to_numpy()
    src = source_path(str(adapter.config["source"]))
    if src is not None:
        found = _obsm_rows(src, ["X_umap"], ids, make_unique=True)
        if found is not None:
            return found[0], "data's own UMAP", f"obsm['X_umap'] of {src.name}"
    path = ctx._root() / "features" / "cells.h5ad"
    if path.is_file():
        found = _obsm_rows(path, ["X_umap_expression"], ids)
        if found is not None:
            return found[0], "expression UMAP", "features/cells.h5ad, of the expression PCA"

    def build() -> np.ndarray:
        import anndata as ad

        from .plots import compute_umap

        _, pcs = adapter.expression_views(obs)
        a = ad.AnnData(obs=pd.DataFrame(index=ids))
        a.obsm["X_pca"] = pcs
        return compute_umap(a, "X_pca", key="X_umap_expression", seed=ctx.seed).astype(np.float64)

    xy = ctx.cached("immunology-card-umap", {"cells": ids.tolist(), "seed": ctx.seed}, build,
                    save=lambda arr, folder: np.save(Path(folder) / "umap.npy", arr),
                    load=lambda folder: np.load(Path(folder) / "umap.npy", allow_pickle=False))
    return np.asarray(xy, dtype=np.float64), "expression UMAP", "computed here from the expression PCA"


def marker_labels(cell_types: Sequence[str], data_markers: Mapping[str, Sequence[str]] | None = None) -> dict[str, list[str]]:
    """``{gene: [cell types of the data it marks]}``: the canonical PBMC panel
    (:data:`.markers.CANONICAL_MARKERS`, matched to the data's labels) and the data-driven
    (Wilcoxon) markers of each type, canonical first."""
    out: dict[str, list[str]] = {}
    for gene, _, pattern in CANONICAL_MARKERS:
        for t in match_types(pattern, cell_types):
            out.setdefault(gene, []).append(str(t))
    for t, genes in (data_markers or {}).items():
        for g in genes:
            if str(t) not in out.setdefault(str(g), []):
                out[str(g)].append(str(t))
    return {g: ts for g, ts in out.items() if ts}


def position_genes(adapter: "ImmunologyAdapter", inputs: Sequence[str]) -> list[str]:
    """The token at every position of a cell's sequence (``<cls>``, genes, ``<eos>``): what the
    model read at the ``position`` of the position store."""
    vocab = adapter.vocabulary
    return [vocab.tokens[i] for i in vocab.encode(list(inputs))]


def _shared(ctx: "RunContext") -> dict[str, Any]:
    """The run's cells, their map, tokens, markers and top driver genes, read once per context."""
    if _LIVE not in ctx.live:
        adapter: "ImmunologyAdapter" = ctx.adapter  # type: ignore[assignment]
        ex = ctx.examples()
        obs = ex.obs
        xy, what, where = cell_map(ctx, obs)
        types = [str(t) for t in obs["cell_type"].astype(str).unique()]
        try:
            data_markers = adapter.type_markers()
        except Exception:  # noqa: BLE001 - the canonical panel still names markers
            data_markers = {}
        drivers = None
        path = ctx._root() / "features" / "gene_drivers.csv"
        if path.is_file():
            drivers = pd.read_csv(path)
        ctx.live[_LIVE] = {"obs": obs, "inputs": ex.inputs, "xy": xy, "map": what, "map_source": where,
                           "markers": marker_labels(types, data_markers), "n_data_markers": int(adapter.config["n_markers"]),
                           "drivers": drivers}
    return ctx.live[_LIVE]


# ------------------------------------------------------------------------------------------------
# the numbers
# ------------------------------------------------------------------------------------------------


def gene_activation_table(frames: Mapping[int, pd.DataFrame], tokens: Mapping[int, Sequence[str]]) -> pd.DataFrame:
    """The feature's activation at each gene token, pooled over cells.

    Parameters
    ----------
    frames
        ``{row: frame}`` with ``position`` and ``activation`` (one row per gene position of the
        cell: :func:`sciscope.core.cards.position_activations`).
    tokens
        ``{row: token at each position}`` (:func:`position_genes`).

    Returns
    -------
    DataFrame, one row per gene seen in any cell, strongest first: ``gene``, ``mean_activation``
    (over all the cells, a cell without the gene counting 0: a gene in one cell cannot top the
    list by a fluke), ``mean_where_present``, ``n_cells`` (cells whose sequence holds the gene),
    ``n_firing`` (cells where the feature fires on it), ``n_total`` (cells pooled).
    """
    per_cell = []
    for row, frame in frames.items():
        toks = tokens[row]
        genes = [toks[int(p)] for p in frame["position"].to_numpy()]
        per_cell.append(pd.DataFrame({"gene": genes, "activation": frame["activation"].to_numpy(dtype=np.float64)})
                        .groupby("gene", sort=False)["activation"].max())  # a gene occurs once per cell
    cols = ["gene", "mean_activation", "mean_where_present", "n_cells", "n_firing", "n_total"]
    if not per_cell:
        return pd.DataFrame(columns=cols)
    wide = pd.concat(per_cell, axis=1)  # genes x cells, NaN where a cell lacks the gene
    n = wide.shape[1]
    out = pd.DataFrame({"gene": wide.index.astype(str), "mean_activation": wide.fillna(0.0).sum(1).to_numpy() / n,
                        "mean_where_present": wide.mean(1).to_numpy(), "n_cells": wide.notna().sum(1).to_numpy(),
                        "n_firing": (wide > 0).sum(1).to_numpy(), "n_total": n})
    return out.sort_values(["mean_activation", "gene"], ascending=[False, True], kind="stable").reset_index(drop=True)[cols]


# ------------------------------------------------------------------------------------------------
# the pictures
# ------------------------------------------------------------------------------------------------


def _type_labels(ax: Any, fig: Any, xy: np.ndarray, cell_types: Sequence[str], fontsize: float = 6.0) -> None:
    """Each cell type named at its cells' median, labels nudged apart vertically so none overlaps
    another (a greedy pass, largest type first; label boxes estimated from the font size)."""
    labels = pd.Series(np.asarray(cell_types, dtype=object).astype(str))
    groups = sorted(labels.groupby(labels).groups.items(), key=lambda kv: -len(kv[1]))
    ax.set_xlim(*ax.get_xlim()), ax.set_ylim(*ax.get_ylim())  # freeze the limits the scatter set
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    bbox = ax.get_window_extent().transformed(fig.dpi_scale_trans.inverted())  # axes size in inches
    char_w = 0.55 * fontsize / 72 * (x1 - x0) / max(bbox.width, 1e-6)
    line_h = 1.45 * fontsize / 72 * (y1 - y0) / max(bbox.height, 1e-6)
    placed: list[tuple[float, float, float]] = []  # (x, y, half width)
    for t, idx in groups:
        idx = np.asarray(idx)
        cx, cy = float(np.median(xy[idx, 0])), float(np.median(xy[idx, 1]))
        half = 0.5 * len(str(t)) * char_w + 0.3 * char_w
        for step in (0, 1, -1, 2, -2, 3, -3, 4, -4, 5, -5):
            y = cy + step * line_h
            if all(abs(y - py) >= line_h or abs(cx - px) >= half + ph for px, py, ph in placed):
                break
        placed.append((cx, y, half))
        ax.text(cx, y, str(t), fontsize=fontsize, ha="center", va="center", color="#222",
                bbox={"boxstyle": "round,pad=0.12", "fc": "white", "ec": "none", "alpha": 0.55})


def umap_figure(xy: np.ndarray, activation: np.ndarray, top: Sequence[int], cell_types: Sequence[str], *,
                feature: int, what: str = "expression UMAP") -> Any:
    """Every cell on the map, grey where the feature is 0, a sequential colour where it fires (with
    a colour bar); the ``top`` rows outlined; each cell type named at its cells' median."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xy, activation = np.asarray(xy, dtype=np.float64), np.asarray(activation, dtype=np.float64)
    fig, ax = plt.subplots(figsize=(4.0, 3.15))
    size = float(np.clip(6000 / max(len(xy), 1), 2, 25))
    off = activation <= 0
    ax.scatter(xy[off, 0], xy[off, 1], s=size, c="#d4d4d4", linewidths=0, label=f"0 ({int(off.sum())} cells)")
    on = np.flatnonzero(~off)
    on = on[np.argsort(activation[on], kind="stable")]  # strongest drawn last, on top
    vmax = float(activation.max()) if on.size else 1.0
    sc = ax.scatter(xy[on, 0], xy[on, 1], s=size, c=activation[on], cmap="viridis", vmin=0.0, vmax=vmax, linewidths=0)
    top = np.asarray(list(top), dtype=np.int64)
    if top.size:
        ax.scatter(xy[top, 0], xy[top, 1], s=size * 4 + 20, facecolors="none", edgecolors="#d62728", linewidths=1.3,
                   label=f"top {top.size} cells")
    _type_labels(ax, fig, xy, cell_types)
    cb = fig.colorbar(sc, ax=ax, fraction=0.045, pad=0.02)
    cb.set_label("activation", fontsize=8)
    cb.ax.tick_params(labelsize=7)
    # below the map, where no cluster or type name sits
    ax.legend(loc="upper left", bbox_to_anchor=(0.0, 0.0), ncol=2, fontsize=7, frameon=False, handletextpad=0.3,
              borderaxespad=0.2, columnspacing=1.2)
    ax.set_xticks([]), ax.set_yticks([])
    for s in ax.spines.values():
        s.set_visible(False)
    ax.set_title(f"feature {feature} on the {what}", fontsize=8.5)
    return fig


def gene_figure(table: pd.DataFrame, markers: Mapping[str, Sequence[str]], *, own_type: str | None = None,
                feature: int, n: int = N_GENES) -> Any:
    """Horizontal bars of the ``n`` strongest genes of :func:`gene_activation_table`, the number of
    top cells each sits in beside its bar; marker genes coloured and named with the types they mark
    (darker: a marker of ``own_type``, the top cells' commonest type)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    t = table.head(n).iloc[::-1]
    fig, ax = plt.subplots(figsize=(3.65, 0.19 * max(len(t), 4) + 0.85))
    colours, labels = [], []
    for g in t["gene"]:
        types = list(markers.get(str(g), []))
        if own_type is not None and own_type in types:
            colours.append(_MARKER_OWN)
        elif types:
            colours.append(_MARKER_OTHER)
        else:
            colours.append(_PLAIN)
        if types:
            first = own_type if own_type in types else types[0]
            more = f" +{len(types) - 1}" if len(types) > 1 else ""
            labels.append(f"{g}  ({first[:18]}{more})")
        else:
            labels.append(str(g))
    y = np.arange(len(t))
    ax.barh(y, t["mean_activation"], color=colours, height=0.7)
    ax.set_yticks(y, labels, fontsize=7.5)
    xmax = float(t["mean_activation"].max()) if len(t) else 1.0
    for yi, (v, k, m, tot) in enumerate(zip(t["mean_activation"], t["n_firing"], t["n_cells"], t["n_total"])):
        note = f"{int(k)}/{int(tot)}" + (f" (in {int(m)})" if m != k else "")
        ax.text(v + 0.01 * xmax, yi, note, va="center", fontsize=6.5, color="#444")
    ax.set_xlim(0, xmax * 1.25 if xmax > 0 else 1)
    ax.set_xlabel("mean activation at the gene's token (top cells; absent = 0)", fontsize=7.5)
    ax.tick_params(axis="x", labelsize=7)
    for s in ("top", "right"):
        ax.spines[s].set_visible(False)
    handles = [Patch(color=_MARKER_OWN, label=f"marker of {own_type[:22]}" if own_type else "marker"),
               Patch(color=_MARKER_OTHER, label="marker of another type"), Patch(color=_PLAIN, label="other gene")]
    ax.legend(handles=handles, loc="lower right", fontsize=6.5, frameon=False)
    ax.set_title(f"feature {feature}: genes it fires on in its top cells", fontsize=9)
    return fig


def render_examples(ctx: "RunContext", feature: int, examples: pd.DataFrame) -> list[Any]:
    """The card's pictures (see the module docstring): the map, and the genes of the top cells.

    Parameters
    ----------
    ctx
        The run's context.
    feature
        The latent's index.
    examples
        The card's examples (``band``, ``rank``, ``activation``, ``row`` and obs columns).

    Returns
    -------
    list of :class:`sciscope.core.cards.Panel`
    """
    from sciscope.core.cards import Panel, position_activations

    shared = _shared(ctx)
    obs, xy = shared["obs"], shared["xy"]
    activation = np.asarray(ctx.latents().array("latents")[:, int(feature)], dtype=np.float64)
    if activation.shape[0] != len(obs):
        raise ValueError(f"the latents have {activation.shape[0]} rows, the run's cells {len(obs)}")
    top = [int(r) for r in examples.loc[examples["band"] == "top", "row"]]
    types = obs["cell_type"].astype(str).to_numpy()
    n_on = int((activation > 0).sum())
    panels = [Panel.from_figure(
        umap_figure(xy, activation, top, types, feature=feature, what=shared["map"]), "cells",
        f"{n_on} of {len(obs)} cells fire (grey: 0); the top {len(top)} outlined in red. The {shared['map']} "
        f"({shared['map_source']}): a map of the cells made without the model.", dpi=DPI)]
    frames = position_activations(ctx, top, feature)
    if not frames:
        return panels  # a run whose SAE read pooled cells: no per-gene activations to show
    tokens = {r: position_genes(ctx.adapter, shared["inputs"][r]) for r in frames}  # type: ignore[arg-type]
    table = gene_activation_table(frames, tokens)
    own = pd.Series(types[top]).value_counts()
    own_type = str(own.index[0]) if len(own) else None
    caption = (f"The feature's activation at each gene token of its top {len(frames)} cells, averaged over them; "
               f"k/{len(frames)}: cells where it fires on that gene (in m: cells whose sequence holds it, where more). "
               f"Markers: the canonical PBMC panel and the top "
               f"{shared['n_data_markers']} Wilcoxon markers of each type, named with the type they mark "
               f"(top cells' commonest type: {own_type}, {int(own.iloc[0]) if len(own) else 0} of {len(top)}).")
    drivers = shared["drivers"]
    if drivers is not None:
        mine = drivers[drivers["feature"] == int(feature)].sort_values("rank")["gene"].astype(str).tolist()[:6]
        if mine:
            caption += f" Over every cell where it fires, its top driver genes are {', '.join(mine)}."
    panels.append(Panel.from_figure(gene_figure(table, shared["markers"], own_type=own_type, feature=feature),
                                    "genes", caption, dpi=DPI))
    return panels


def card_columns(obs: pd.DataFrame) -> list[str]:
    """Cell type, the file's clustering (``louvain`` / ``leiden``) and cell-cycle phase where
    present, genes detected, library size, the split; the original label where rare types
    were merged."""
    cols = ["cell_type"]
    if "cell_type_original" in obs and (obs["cell_type_original"].astype(str) != obs["cell_type"].astype(str)).any():
        cols.append("cell_type_original")
    cols += [c for c in ("louvain", "leiden", "phase", "n_genes_detected", "log10_library_size", "split") if c in obs]
    return cols


def lens_basis(adapter: Any, ctx: "RunContext") -> tuple[Any, list[str], str] | None:
    """The masked-gene head's output embedding (gene rows only, ``(n_genes, hidden)``) and the
    gene names: a decoder direction read as the genes the head would predict from it (the
    head's dense + LayerNorm transform skipped, as a logit lens does). None for an encoder
    without a head, or when the SAE's site is not the hidden width."""
    model = ctx.model()
    emb = getattr(model, "get_output_embeddings", lambda: None)()
    if emb is None:
        return None
    W = emb.weight.detach().float().cpu().numpy()
    if W.shape[1] != int(ctx.sae().cfg.d_in):
        return None
    vocab = adapter.vocabulary
    ids = vocab.gene_ids()
    return W[ids], [vocab.tokens[int(i)] for i in ids], "the masked-gene head's gene embeddings"
