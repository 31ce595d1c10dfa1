"""Small plotting helpers shared by result objects (scanpy style: take ``ax=``, return it).

Plots only read results. Nothing here picks a backend or calls ``show()``, so figures work
headless (matplotlib falls back to Agg without a display) and inside notebooks alike.

Conventions every result plot follows, so a reader can trust a figure without its caption:

* the measured curve is solid, in :data:`MAIN_COLOUR`, with its uncertainty as a shaded band;
* random controls are grey (:data:`CONTROL_GREY`): thin lines inside their min-max envelope;
* each baseline or reference is a horizontal line in its own colour (:data:`BASELINE_COLOURS`)
  and is named in the legend;
* site axes carry short labels (:func:`short_site_labels`), thinned to stay readable.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

#: The measured curve (steered model, probe score).
MAIN_COLOUR = "C0"
#: Random controls and shuffled-label controls.
CONTROL_GREY = "0.55"
#: Baselines and references, in order: distinct from the main colour, from grey and from the red
#: of broken runs (matplotlib's tab10 without C0, C3 and C7).
BASELINE_COLOURS = ("C1", "C2", "C4", "C9", "C6", "C5", "C8")
#: Broken runs.
BROKEN_COLOUR = "C3"

_SEP = re.compile(r"([./:])")


def get_ax(ax: Any = None, *, figsize: tuple[float, float] = (6.0, 4.0)) -> Any:
    """Return ``ax``, or a fresh Axes on a new figure when ``ax`` is None.

    pyplot is imported only here, lazily, so importing sciscope never touches a GUI backend.
    """
    if ax is not None:
        return ax
    import matplotlib.pyplot as plt

    _, ax = plt.subplots(figsize=figsize)
    return ax


def _tokens(site: str) -> list[str]:
    # "model.layers.12.mlp:input" -> ["model", ".", "layers", ".", "12", ".", "mlp", ":", "input"]
    return [t for t in _SEP.split(site) if t != ""]


def _common_prefix(toks: Sequence[Sequence[str]]) -> int:
    """Length of the token prefix shared by all, ending just after a separator, leaving a name each."""
    k = 0
    for column in zip(*toks):
        if len(set(column)) > 1:
            break
        k += 1
    k = min(k, min(len(t) for t in toks) - 1)  # every label keeps at least one token
    while k > 0 and not _SEP.fullmatch(toks[0][k - 1]):
        k -= 1  # never cut inside a name ("layer1" / "layer2" stay whole)
    return k


def _middle_ellipsis(label: str, max_chars: int) -> str:
    if len(label) <= max_chars:
        return label
    head = (max_chars - 1) // 2
    return label[:head] + "…" + label[len(label) - (max_chars - 1 - head):]


def _majority_cut(core: list[list[str]], labels: list[str], *, reverse: bool = False) -> tuple[list[list[str]], list[str], str]:
    """Drop the token prefix most (over half) of ``core`` share from those that share it.

    Kept only when every label stays non-empty and distinct. With ``reverse`` the token lists are
    read backwards (a shared suffix). Returns the new token lists, labels and the cut text.
    """
    counts: dict[tuple[str, ...], int] = {}
    for c in core:
        for k in range(2, len(c)):
            if _SEP.fullmatch(c[k - 1]):
                counts[tuple(c[:k])] = counts.get(tuple(c[:k]), 0) + 1
    if not counts:
        return core, labels, ""
    best = max(counts, key=lambda p: (counts[p] * len("".join(p)), len(p)))
    if counts[best] * 2 <= len(core):
        return core, labels, ""
    cut_core = [c[len(best):] if tuple(c[:len(best)]) == best else c for c in core]
    cut = ["".join(c[::-1] if reverse else c) for c in cut_core]
    if len(set(cut)) < len(cut) or not all(cut):
        return core, labels, ""
    return cut_core, cut, "".join(best[::-1] if reverse else best)


def short_site_labels(sites: Sequence[str], *, max_chars: int = 14) -> tuple[list[str], str]:
    """Short, distinct labels for site paths, and a template saying what was cut.

    The token prefix and suffix every site shares are dropped (``"model.layers.12.mlp"`` ->
    ``"12"``, template ``"model.layers.<i>.mlp"``); then a prefix and a suffix most sites share
    (``"layers."`` beside ``"embed_tokens"`` and ``"norm"``) are dropped from those sites; labels still longer
    than ``max_chars`` lose their middle. A step that would make two labels equal is skipped, so
    the labels always name the sites one-to-one.

    Parameters
    ----------
    sites
        Site paths in axis order.
    max_chars
        Longest label kept whole.

    Returns
    -------
    labels : list of str
        One per site.
    template : str
        The full path with ``<i>`` where the labels go (``""`` when nothing was cut).
    """
    sites = [str(s) for s in sites]
    if len(sites) < 2 or len(set(sites)) < len(sites):
        return [_middle_ellipsis(s, max_chars) if len(set(sites)) == len(sites) else s for s in sites], ""
    toks = [_tokens(s) for s in sites]
    pre = _common_prefix(toks)
    # the same on the reversed tokens: a shared suffix, cut where it starts with a separator
    suf = _common_prefix([t[pre:][::-1] for t in toks])
    core = [t[pre:len(t) - suf] for t in toks]
    prefix, suffix = "".join(toks[0][:pre]), "".join(toks[0][len(toks[0]) - suf:]) if suf else ""
    labels = ["".join(c) for c in core]
    if len(set(labels)) < len(labels) or any(not lab for lab in labels):
        labels, prefix, suffix, core = list(sites), "", "", toks
    # a prefix most (not all) sites share: "layers." beside "embed_tokens" and "norm"; then a suffix
    core, labels, majority = _majority_cut(core, labels)
    core, labels, majority_end = _majority_cut([c[::-1] for c in core], labels, reverse=True)
    core = [c[::-1] for c in core]
    short = [_middle_ellipsis(lab, max_chars) for lab in labels]
    if len(set(short)) == len(short):
        labels = short
    template = f"{prefix}{majority}<i>{majority_end}{suffix}" if (prefix or suffix or majority or majority_end) else ""
    return labels, template


_NICE_STEPS = (1, 2, 3, 4, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1000)


def label_sites(ax: Any, sites: Sequence[str], *, max_labels: int = 15, max_chars: int = 14) -> str:
    """Put short site names on the x axis (positions 0..n-1), thinned to at most ``max_labels``.

    Labels come from :func:`short_site_labels`. When most are layer numbers, the numbers are
    labelled on a round step (0, 5, 10, ...), the smallest that lets them stand flat side by
    side, and the few named sites (``embed_tokens``, ``norm``) are always labelled; otherwise
    every ``ceil(n / max_labels)``-th site is. A label is slanted only when it would touch its
    neighbours flat. Every site keeps a tick.

    Returns
    -------
    str
        The template of the cut labels (``"model.layers.<i>.mlp"``), ``""`` when none was cut:
        callers put it in the axis label (:func:`site_axis_label`) so the short labels stay
        unambiguous.
    """
    n = len(sites)
    labels, template = short_site_labels(sites, max_chars=max_chars)
    max_labels = max(1, max_labels)
    # geometry in inches: a character is about 0.65 em wide at the tick font size
    per_site = ax.get_position().width * ax.figure.get_figwidth() / max(n, 1)
    em = _tick_fontsize(ax) / 72
    width = [0.65 * len(lab) * em for lab in labels]
    gap = 0.6 * em

    def fits(a: int, b: int) -> bool:
        return (width[a] + width[b]) / 2 + gap <= abs(b - a) * per_site

    numeric = [i for i, lab in enumerate(labels) if lab.isdigit()]
    named = [i for i in range(n) if not labels[i].isdigit()]
    if n > 1 and len(numeric) * 2 > n and len(named) < max_labels // 2:
        need = len(numeric) / max(1, max_labels - len(named))
        steps = [k for k in _NICE_STEPS if k >= need] or [math.ceil(need)]
        options = [[i for i in numeric if int(labels[i]) % k == 0] for k in steps]
        options = [o for o in options if o] or [numeric[:1]]
        # the densest round step whose numbers stand flat; keep at least 4 numbers if none does
        ok = [o for o in options if all(fits(a, b) for a, b in zip(o, o[1:]))]
        chosen = next((o for o in ok), None) or next((o for o in options if len(o) <= 4), options[-1])
        # a number right beside a named site would run into its (slanted) name: leave it unlabelled
        crowded = lambda i: any(not fits(i, u) and abs(i - u) * per_site < width[i] / 2 + 2 * em for u in named)  # noqa: E731
        ticks = sorted(named + [i for i in chosen if not crowded(i)])
    else:
        ticks = list(range(0, n, max(1, math.ceil(n / max_labels))))
    ax.set_xticks(ticks)
    if len(ticks) < n:
        ax.set_xticks(range(n), minor=True)
    ax.set_xticklabels([labels[i] for i in ticks])
    flat_all = all(fits(a, b) for a, b in zip(ticks, ticks[1:]))
    for k, (t, text) in enumerate(zip(ticks, ax.get_xticklabels())):
        near = [ticks[k - 1]] if k > 0 else []
        near += [ticks[k + 1]] if k + 1 < len(ticks) else []
        # a short number beside a slanted name stays flat; everything that collides slants
        slant = not flat_all and (not all(fits(t, o) for o in near) or not labels[t].isdigit())
        if slant and labels[t].isdigit() and all(fits(t, o) or not labels[o].isdigit() for o in near):
            slant = False
        text.set_rotation(35 if slant else 0)
        text.set_horizontalalignment("right" if slant else "center")
        text.set_rotation_mode("anchor" if slant else "default")
    ax.set_xlim(-0.5, n - 0.5)
    return template


def _tick_fontsize(ax: Any) -> float:
    import matplotlib as mpl
    from matplotlib.font_manager import FontProperties

    size = mpl.rcParams["xtick.labelsize"]
    return float(FontProperties(size=size).get_size_in_points())


def site_axis_label(template: str, what: str = "site") -> str:
    """``"site"`` or ``"site: model.layers.<i>.mlp"`` for an axis labelled by :func:`label_sites`."""
    return f"{what}: {template}" if template else what


def draw_alpha_sweep(
    ax: Any,
    steered: Any,
    controls: Mapping[str, Any] | None = None,
    *,
    label: str = "steering vector",
    band: tuple[Sequence[float], Sequence[float]] | None = None,
    band_label: str = "95% CI",
    broken: Sequence[float] = (),
    references: Mapping[str, float] | None = None,
    zero_label: str = "alpha = 0 (unsteered)",
    legend: bool = True,
) -> Any:
    """Draw a score against alpha the way every sweep plot in sciscope does.

    Parameters
    ----------
    ax
        Axes to draw into.
    steered
        The intervention's curve: a pandas Series indexed by alpha.
    controls
        ``{name: Series}`` of random controls: thin grey lines inside their grey min-max
        envelope, named "random directions (N)" once in the legend.
    label
        Legend name of the intervention's curve.
    band
        ``(low, high)`` per alpha of ``steered``: its confidence band, shaded.
    band_label
        Legend name of the band.
    broken
        Alphas where the intervention broke runs (red crosses on the curve).
    references
        ``{condition: value}``: horizontal dashed lines in distinct colours, named in the legend.
    zero_label
        Legend name of the alpha = 0 point (a hollow black circle on a dotted vertical line).
    legend
        Draw the legend below the axes (two columns), where it never hides a curve.

    Returns
    -------
    matplotlib.axes.Axes
    """
    import numpy as np
    import pandas as pd
    from matplotlib.patches import Patch

    handles: list[tuple[Any, str]] = []
    s = pd.Series(steered, dtype=float).sort_index()
    x = s.index.to_numpy(dtype=float)
    (line,) = ax.plot(x, s.to_numpy(), "o-", color=MAIN_COLOUR, ms=4, lw=1.8, zorder=3)
    handles.append((line, label))
    if band is not None:
        lo, hi = np.asarray(band[0], dtype=float), np.asarray(band[1], dtype=float)
        ok = np.isfinite(lo) & np.isfinite(hi)
        if ok.any():
            ax.fill_between(x[ok], lo[ok], hi[ok], color=MAIN_COLOUR, alpha=0.22, lw=0, zorder=2)
            handles.append((Patch(color=MAIN_COLOUR, alpha=0.22, lw=0), band_label))
    ax.axvline(0, color="0.6", lw=0.8, ls=(0, (3, 3)), zorder=0)
    if 0.0 in s.index and np.isfinite(s[0.0]):
        (zero,) = ax.plot([0.0], [s[0.0]], "o", mfc="white", mec="black", mew=1.2, ms=7, zorder=4)
        handles.append((zero, zero_label))
    controls = dict(controls or {})
    if controls:
        c = pd.DataFrame({k: pd.Series(v, dtype=float) for k, v in controls.items()}).sort_index()
        cx = c.index.to_numpy(dtype=float)
        with np.errstate(all="ignore"):
            lo, hi = c.min(axis=1, skipna=True).to_numpy(), c.max(axis=1, skipna=True).to_numpy()
        ok = np.isfinite(lo) & np.isfinite(hi)
        ax.fill_between(cx[ok], lo[ok], hi[ok], color="0.88", lw=0, zorder=1)
        for name in c:
            (thin,) = ax.plot(cx, c[name].to_numpy(), "-", color=CONTROL_GREY, lw=0.6, alpha=0.8, zorder=1.5)
        # one legend entry for lines and envelope together: a grey patch with a thin grey line on it
        handles.append(((Patch(color="0.88", lw=0), thin), f"random directions ({c.shape[1]})"))
    bad = [a for a in broken if a in s.index]
    if bad:
        y = s.reindex(bad).to_numpy()
        y = np.where(np.isfinite(y), y, np.nanmean(s.to_numpy()) if np.isfinite(s.to_numpy()).any() else 0.0)
        (cross,) = ax.plot(bad, y, "x", color=BROKEN_COLOUR, ms=9, mew=2, zorder=5)
        handles.append((cross, "broken runs"))
    for j, (name, value) in enumerate((references or {}).items()):
        if value is not None and np.isfinite(value):
            ref = ax.axhline(float(value), color=BASELINE_COLOURS[j % len(BASELINE_COLOURS)], ls="--", lw=1.4, zorder=2.5)
            handles.append((ref, str(name)))
    ax.set_xlabel("alpha")
    if legend:
        from matplotlib.legend_handler import HandlerTuple

        legend_below(ax, [h for h, _ in handles], [n for _, n in handles], handler_map={tuple: HandlerTuple(ndivide=1)})
    return ax


def legend_below(ax: Any, handles: Sequence[Any] | None = None, labels: Sequence[str] | None = None, *,
                 ncol: int = 2, fontsize: float = 7, **kwargs: Any) -> Any:
    """A legend under the axes, clear of the tick labels and the axis label: it never hides a curve.

    It hangs a fixed distance (in inches) below the axes, measured from what is drawn there now,
    so it stays put when ``tight_layout`` later resizes the axes (and makes room for it).

    Parameters
    ----------
    ax
        Axes whose artists the legend names.
    handles, labels
        As for ``Axes.legend`` (default: the labelled artists of ``ax``).
    ncol, fontsize, kwargs
        Passed on to ``Axes.legend``.

    Returns
    -------
    matplotlib.legend.Legend
    """
    from matplotlib.transforms import ScaledTranslation

    fig = ax.figure
    drop_in = 0.42  # tick labels and axis label of a plain axis
    try:
        bbox = ax.get_tightbbox(fig.canvas.get_renderer())
        if bbox is not None:
            drop_in = max(0.0, (ax.get_window_extent().y0 - bbox.y0) / fig.dpi) + 0.04
    except (AttributeError, TypeError):  # a canvas without a renderer: keep the plain estimate
        pass
    below = ax.transAxes + ScaledTranslation(0, -drop_in, fig.dpi_scale_trans)
    args = [] if handles is None else [list(handles), list(labels or [])]
    return ax.legend(*args, frameon=False, fontsize=fontsize, loc="upper center", bbox_to_anchor=(0.5, 0.0),
                     bbox_transform=below, ncol=ncol, columnspacing=1.0, handlelength=1.8, borderaxespad=0.0, **kwargs)


def save_figure(fig: Any, path: Any, *, dpi: int = 110, tight_bbox: bool = False) -> Any:
    """Write ``fig`` as a PNG atomically (temp file + rename), close it, return the path.

    ``tight_bbox`` crops the canvas to what is drawn (figures with a suptitle over panels of
    fixed aspect, such as UMAPs, otherwise keep empty margins).
    """
    from pathlib import Path

    import matplotlib.pyplot as plt

    from .io import atomic_path

    path = Path(path)
    if fig.get_layout_engine() is None:  # a figure laid out already (constrained layout) keeps its engine
        fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png", bbox_inches="tight" if tight_bbox else None)
    plt.close(fig)
    return path


def save_training_history(history: Sequence[dict[str, float]], out_png: Any, *, ylabel: str = "training loss",
                          title: str = "training") -> None:
    """Loss vs step of a training run: ``out_png`` and the table beside it (same name, ``.csv``).

    ``history`` is a list of ``{"step": ..., "loss": ...}`` rows; nothing is written when empty.
    """
    if not history:
        return
    from pathlib import Path

    import matplotlib.pyplot as plt
    import pandas as pd

    from .io import write_table

    h = pd.DataFrame(list(history))
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(h["step"], h["loss"], lw=1)
    ax.set_xlabel("step"), ax.set_ylabel(ylabel), ax.set_title(title)
    save_figure(fig, out_png)
    write_table(Path(out_png).with_suffix(".csv"), h)
