"""The geospatial pictures on a feature card (:meth:`GeospatialAdapter.render_examples`).

Three panels for one SAE feature:

- **map**: every place of the run, grey where the feature is silent and coloured by its
  activation where it fires (with a colourbar), over the land outline; the top examples ringed and
  labelled ``rank name`` (the rank of the card's example table);
- **tokens**: the prompts of the top examples split into the model's tokens, each coloured by the
  feature's activation there (per-position SAE runs only): whether it reads the place or a piece
  of its spelling (a hyphen, ``##burg``, the closing ``[SEP]``);
- **profile**: activation against latitude and against longitude, with the mean per band.

The card's own caption names the country confound: the best one-vs-rest country AUROC of the
feature (:func:`.confounds.best_country_auroc`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from sciscope.core.cards import Panel
    from sciscope.core.context import RunContext

__all__ = ["activation_map", "activation_profile", "render_examples", "token_strips"]

ZERO_COLOUR = "#c9c9c9"
CMAP = "plasma_r"  # sequential, strongest darkest: reads against the pale land and the grey zeros
LABEL_CHARS = 22  # longer names are cut: "Rivière-des-Prairies–Poi…"
MAX_TOKEN_ROWS = 8
TOKEN_PT = 9.0


def _figure(size: tuple[float, float]) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)  # a renderer for measuring the labels' extents
    return fig


def _short(text: Any) -> str:
    t = str(text)
    return t if len(t) <= LABEL_CHARS else t[: LABEL_CHARS - 1] + "…"


def _place_labels(ax: Any, x: np.ndarray, y: np.ndarray, texts: list[str], *, fontsize: float = 8.0) -> list[Any]:
    """Labels beside points, each at the nearest of rings of candidate offsets (growing radius,
    twelve directions) that overlaps no earlier label and stays inside the axes; far ones get a
    leader line. A cluster of top places (five districts of one city) stays readable."""
    from matplotlib.text import Text

    renderer = ax.figure.canvas.get_renderer()
    locator = ax.get_axes_locator()  # the axes' final box: its locator and aspect otherwise apply only at draw
    ax.apply_aspect(locator(ax, renderer) if locator is not None else None)
    box_ax = ax.get_window_extent(renderer)
    angles = np.radians(np.arange(0, 360, 30) + 15)
    offsets = [(r * np.cos(a), r * np.sin(a)) for r in (6.0, 18.0, 32.0, 48.0, 66.0) for a in angles]
    placed, out = [], []
    for xi, yi, text in zip(x, y, texts):
        best = None
        for dx, dy in offsets:
            far = np.hypot(dx, dy) > 10
            t = ax.annotate(text, (xi, yi), xytext=(dx, dy), textcoords="offset points", fontsize=fontsize,
                            ha="left" if dx >= 0 else "right", va="bottom" if dy >= 0 else "top", zorder=6,
                            bbox={"boxstyle": "round,pad=0.12", "fc": "white", "ec": "none", "alpha": 0.8},
                            arrowprops={"arrowstyle": "-", "lw": 0.5, "color": "0.35", "shrinkA": 0, "shrinkB": 3}
                            if far else None)
            t.update_positions(renderer)
            bb = Text.get_window_extent(t, renderer)  # the text alone: a leader line may cross labels
            inside = box_ax.x0 <= bb.x0 and bb.x1 <= box_ax.x1 and box_ax.y0 <= bb.y0 and bb.y1 <= box_ax.y1
            if inside and not any(bb.overlaps(p) for p in placed):
                best = (t, bb)
                break
            t.remove()
        if best is None:  # nowhere free: the nearest spot, overlapping (rare: > 10 labels in one spot)
            dx, dy = offsets[0]
            t = ax.annotate(text, (xi, yi), xytext=(dx, dy), textcoords="offset points", fontsize=fontsize, zorder=6,
                            bbox={"boxstyle": "round,pad=0.12", "fc": "white", "ec": "none", "alpha": 0.8})
            best = (t, t.get_window_extent(renderer))
        placed.append(best[1])
        out.append(best[0])
    return out


def _degrees(ax: Any) -> None:
    """Tick labels as 40°N / 100°W instead of axis titles: more room for the map."""
    from matplotlib.ticker import FuncFormatter

    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{abs(v):g}°{'W' if v < 0 else 'E' if v > 0 else ''}"))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{abs(v):g}°{'S' if v < 0 else 'N' if v > 0 else ''}"))
    ax.set_xlabel("")
    ax.set_ylabel("")


def activation_map(obs: pd.DataFrame, column: np.ndarray, top: pd.DataFrame, *, title: str = "",
                   land: bool = True) -> Any:
    """Every place, grey where ``column`` is 0 and coloured by it elsewhere; ``top`` ringed and labelled.

    Parameters
    ----------
    obs
        All places of the run (``lat``, ``lon``), row ``i`` for activation ``column[i]``.
    column
        ``(n_places,)`` activations of one feature.
    top
        The examples to mark: ``row`` (into ``obs``), ``rank`` and ``name``.
    title
        The axes' title.
    land
        Draw the land outline under the places.

    Returns
    -------
    matplotlib Figure
        Sized for a card (about 880 x 330 px at 80 dpi).
    """
    from .plots import _map_axes, _marker_size

    lon, lat = obs["lon"].to_numpy(dtype=np.float64), obs["lat"].to_numpy(dtype=np.float64)
    v = np.asarray(column, dtype=np.float64)
    from mpl_toolkits.axes_grid1 import make_axes_locatable

    fig = _figure((11.0, 4.1))
    ax = fig.add_axes((0.04, 0.07, 0.9, 0.84))
    cax = make_axes_locatable(ax).append_axes("right", size="1.2%", pad=0.08)  # beside the map, whatever its aspect
    s = 2.0 * _marker_size(len(obs))
    zero = ~(v > 0)
    ax.scatter(lon[zero], lat[zero], s=0.6 * s, c=ZERO_COLOUR, linewidths=0, zorder=2,
               label=f"silent ({int(zero.sum())} places)")
    fire = np.flatnonzero(~zero)
    fire = fire[np.argsort(v[fire], kind="stable")]  # the strongest drawn last, on top
    vmax = float(v[fire].max()) if fire.size else 1.0
    sc = ax.scatter(lon[fire], lat[fire], s=1.5 * s, c=v[fire], cmap=CMAP, vmin=0.0, vmax=vmax,
                    linewidths=0.25, edgecolors="white", zorder=3, label=f"fires ({fire.size} places)")
    cb = fig.colorbar(sc, cax=cax)
    cb.set_label("activation", fontsize=9)
    cb.ax.tick_params(labelsize=8)
    _map_axes(ax, lon, lat, land=land)
    _degrees(ax)
    ax.tick_params(labelsize=8)
    rows = top["row"].to_numpy(dtype=np.int64)
    if rows.size:
        ax.scatter(lon[rows], lat[rows], s=3.0 * s + 25, facecolors="none", edgecolors="black", linewidths=1.0,
                   zorder=5, label="top examples: rank, name")
        _place_labels(ax, lon[rows], lat[rows], [f"{int(r)} {_short(n)}" for r, n in zip(top["rank"], top["name"])])
    ax.legend(fontsize=8, loc="lower left", frameon=True, framealpha=0.85, markerscale=1.3)
    ax.set_title(title, fontsize=10)
    return fig


def activation_profile(obs: pd.DataFrame, column: np.ndarray, *, band: float = 10.0) -> Any:
    """Activation against latitude and against longitude (all places), with the mean per ``band`` degrees."""
    v = np.asarray(column, dtype=np.float64)
    fig = _figure((6.4, 2.4))
    axes = fig.subplots(1, 2, sharey=True)
    for ax, key, lo, hi in ((axes[0], "lat", -90.0, 90.0), (axes[1], "lon", -180.0, 180.0)):
        x = obs[key].to_numpy(dtype=np.float64)
        zero = ~(v > 0)
        ax.scatter(x[zero], v[zero], s=3, c=ZERO_COLOUR, linewidths=0, zorder=2)
        ax.scatter(x[~zero], v[~zero], s=5, c="#7e03a8", alpha=0.6, linewidths=0, zorder=3)
        edges = np.arange(lo, hi + band, band)
        idx = np.digitize(x, edges)
        centres, means = [], []
        for b in np.unique(idx):
            m = idx == b
            if m.sum() >= 5:  # a band's mean from fewer places is noise
                centres.append(float(x[m].mean()))
                means.append(float(v[m].mean()))
        ax.plot(centres, means, color="black", lw=1.2, zorder=4, label=f"mean per {band:g}° band")
        ax.set_xlabel("latitude" if key == "lat" else "longitude", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(True, color="0.92", lw=0.5, zorder=0)
    axes[0].set_ylabel("activation", fontsize=8)
    axes[0].legend(fontsize=7, frameon=False, loc="upper left")
    return fig


def token_strips(labels: list[str], tokens: list[list[str]], acts: list[np.ndarray]) -> Any:
    """One row per example: its label, then its tokens as boxes shaded by the feature's activation
    at each (one scale for all rows, white where it is 0).

    Parameters
    ----------
    labels
        Row labels (``"1 Leipzig"``).
    tokens
        Each example's tokens, in order.
    acts
        Each example's activation per token, aligned with ``tokens``.

    Returns
    -------
    matplotlib Figure
    """
    import matplotlib as mpl

    n = len(labels)
    vmax = max([float(np.max(a)) for a in acts if len(a)] + [1e-9])
    cmap, norm = mpl.colormaps[CMAP], mpl.colors.Normalize(0.0, vmax)
    height = 0.3 * n + 0.8
    fig = _figure((7.4, height))
    ax = fig.add_axes((0.0, 0.65 / height, 1.0, 1.0 - 0.7 / height))
    ax.set_xlim(0, 100)
    ax.set_ylim(n - 0.5, -0.5)
    ax.set_axis_off()
    # Widths from the monospace advance (DejaVu Sans Mono: 0.602 em) rather than measured: measuring
    # every token's text is most of a card's drawing time. Units: percent of the axes' width.
    per_char = 100.0 * 0.602 * TOKEN_PT / (72.0 * 7.4)
    pad = 100.0 * (2 * 0.2 * TOKEN_PT + 3.0) / (72.0 * 7.4)
    for i, (label, toks, a) in enumerate(zip(labels, tokens, acts)):
        ax.text(0.5, i, label, fontsize=8.5, va="center", ha="left", color="0.2")
        x = 27.0
        for t, ai in zip(toks, a):
            colour = cmap(norm(ai)) if ai > 0 else "white"
            ax.text(x, i, t, fontsize=TOKEN_PT, va="center", ha="left", family="monospace",
                    color="white" if ai > 0.55 * vmax else "black",
                    bbox={"boxstyle": "square,pad=0.2", "fc": colour, "ec": "0.7", "lw": 0.4})
            x += len(t) * per_char + pad
            if x > 96:  # a long name runs out of room: cut, and say so
                ax.text(x, i, "…", fontsize=9, va="center")
                break
    cax = fig.add_axes((0.3, 0.3 / height, 0.4, 0.12 / height))
    cb = fig.colorbar(mpl.cm.ScalarMappable(norm=norm, cmap=cmap), cax=cax, orientation="horizontal")
    cb.set_label("activation at the token (white: 0)", fontsize=8)
    cb.ax.tick_params(labelsize=7)
    return fig


def _token_panel(ctx: "RunContext", feature: int, top: pd.DataFrame, obs: pd.DataFrame) -> "Panel | None":
    """The tokens of the top examples shaded by the feature (None outside per-position runs)."""
    from sciscope.core.cards import Panel, position_activations

    top = top.head(MAX_TOKEN_ROWS)
    per_row = position_activations(ctx, top["row"].tolist(), feature)
    if not per_row:
        return None
    ad = ctx.adapter
    tok = ad._tokenizer()
    labels, tokens, acts = [], [], []
    for r in top.itertuples():
        frame = per_row.get(int(r.row))
        if frame is None:
            continue
        prompt = str(obs["prompt"].iloc[int(r.row)])
        ids = tok(prompt, truncation=True, max_length=int(ad.config["max_length"]))["input_ids"]
        pos = frame["position"].to_numpy(dtype=np.int64)
        # the store's positions are the tokenizer's, [CLS]/<s> included; decode each one alone
        names = [tok.decode([ids[p]]).strip() or repr(tok.convert_ids_to_tokens(ids[p])) if p < len(ids) else f"#{p}"
                 for p in pos]
        labels.append(f"{int(r.rank)} {_short(r.name)}")
        tokens.append(names)
        acts.append(frame["activation"].to_numpy(dtype=np.float64))
    if not labels:
        return None
    fig = token_strips(labels, tokens, acts)
    return Panel.from_figure(fig, "tokens", "the top places' prompts as the model reads them, each token shaded by the "
                                            "feature's activation there (special tokens included)")


def render_examples(ctx: "RunContext", feature: int, examples: pd.DataFrame) -> list["Panel"]:
    """The card's pictures: the map, the tokens of the top examples, the latitude/longitude profile.

    Parameters
    ----------
    ctx
        The run's context (latents and obs of every place).
    feature
        The SAE latent.
    examples
        The card's examples (``band``, ``rank``, ``row``, obs columns).

    Returns
    -------
    list of Panel
    """
    from sciscope.core.cards import Panel

    from .confounds import best_country_auroc
    from .land import land_outline

    latents = ctx.latents()
    obs = latents.obs.reset_index(drop=True)
    column = np.asarray(latents.array("latents")[:, int(feature)], dtype=np.float64)
    top = examples[examples["band"] == "top"].sort_values("rank")
    if "name" not in top.columns:
        top = top.assign(name=obs["name"].iloc[top["row"].to_numpy()].to_numpy())
    if "geospatial_card_moran" not in ctx.live:  # the features table is read from disk on every ctx.features()
        table = ctx.features().features
        ctx.live["geospatial_card_moran"] = (table.set_index("feature")["morans_i_I"].astype(float)
                                             if "morans_i_I" in table.columns else pd.Series(dtype=float))
    moran = ctx.live["geospatial_card_moran"]
    title = f"feature {int(feature)}"
    i_val = float(moran.get(int(feature), np.nan))
    title += f": Moran's I = {i_val:.2f}" if np.isfinite(i_val) else ""
    bc = best_country_auroc(column[:, None], obs["country"], min_places=int(ctx.adapter.config["country_min_places"]))
    auroc, country = float(bc["auroc"].iloc[0]), str(bc["best_country"].iloc[0])
    if "country_name" in obs.columns:  # "Madagascar (MG)" reads better than "MG"
        names = obs.loc[obs["country"].astype(str) == country, "country_name"]
        country = f"{names.iloc[0]} ({country})" if len(names) else country
    confound = ""
    if np.isfinite(auroc):
        detector = auroc >= float(ctx.adapter.config["country_auroc"])
        confound = (f"; its best country is {country} (one-vs-rest AUROC {auroc:.2f}"
                    + (": a country detector)" if detector else ")"))
        title += f" · best country {country}, AUROC {auroc:.2f}" + (" (a country detector)" if detector else "")
    try:
        source = land_outline().source
    except Exception:  # noqa: BLE001 - the map is drawn without land then
        source = "no land outline could be made"
    fires = int((column > 0).sum())
    panels = [Panel.from_figure(
        activation_map(obs, column, top, title=title), "map",
        f"all {len(obs)} places: grey where the feature is silent, coloured where it fires ({fires}); the top "
        f"{len(top)} examples ringed, labelled with their rank{confound}; {source}")]
    tokens = _token_panel(ctx, int(feature), top, obs)
    if tokens is not None:
        panels.append(tokens)
    panels.append(Panel.from_figure(activation_profile(obs, column), "latitude and longitude",
                                    "activation of every place against its latitude and longitude; the line is the "
                                    "mean per 10° band (bands of at least 5 places)"))
    return panels


def lens_basis(adapter: Any, ctx: "RunContext") -> tuple[Any, list[str], str] | None:
    """A causal LM's unembedding (what a direction writes toward, as next tokens); an encoder's
    *input* embedding (MiniLM has no LM head): which tokens' embeddings a direction at the SAE
    site points along. The residual stream of a middle layer still carries the identity of its
    token, and on the quick run this reads it: the lens of a feature that fires on hyphens is
    ``-``, of one on "Paris 11 ..." ``11``, of one on "Ara..." ``ara``; features that fire on
    the closing ``[SEP]`` get no readable lens. None where the basis's width is not the site's."""
    from sciscope.core.lens import embedding_matrix, unembedding_matrix

    model = ctx.model()
    head = model.get_output_embeddings() if adapter.causal and hasattr(model, "get_output_embeddings") else None
    matrix = (unembedding_matrix(model) if head is not None else embedding_matrix(model)).float().cpu()
    width = int(ctx.sae().W_dec.shape[-1])
    if matrix.ndim != 2 or matrix.shape[1] != width:
        return None
    tokens = adapter._tokenizer().convert_ids_to_tokens(list(range(matrix.shape[0])))
    return matrix, [str(t) for t in tokens], "the LM head" if head is not None else "the input embedding"
