"""Feature cards of the physics domain: what a feature is ranked by, and its windows drawn as fields.

* :func:`within_regime_association` (the features stage's ``within_regime_*`` columns, and the
  cards' ranking): per feature, the strongest Spearman correlation between its per-trajectory mean
  activation and a physical parameter *inside one regime*. Across regimes a feature that only
  detects the regime correlates with the parameters too (the regimes' parameter ranges do not
  overlap), and in a quick run 84 of 384 features separate a regime or the system perfectly
  (AUROC 1), so the default ranking (|effect| of the strongest concept association) ties them all
  and picks arbitrary regime detectors; inside a regime only a feature that follows the parameter
  scores.
* :func:`render_field_windows` (the adapter's ``render_examples``): the main scalar field (Gray–Scott
  ``v``, flow vorticity) at every context frame of a feature's strongest windows, one row per
  window, with the feature's per-patch activation outlined over it when the SAE is trained per
  position (space-time patches), and a window from the median of its non-zero activations for
  contrast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .diagnostics import main_field

if TYPE_CHECKING:
    from sciscope.core.cards import Panel

    from .adapter import PhysicsAdapter

__all__ = ["CARD_RANKING", "MIN_TRAJECTORIES", "patch_maps", "render_field_windows",
           "within_regime_association"]

#: The features-table column cards are ranked by (``within_regime`` statistic, its ``rho``).
CARD_RANKING = "within_regime_rho"
#: Fewest trajectories of a regime for a within-regime correlation (fewer: not tested).
MIN_TRAJECTORIES = 6
#: Physical parameters correlated within a regime, per system (Spearman: log scales change nothing).
_PARAMETERS = {"gray_scott": ("feed", "kill"), "flow": ("viscosity", "reynolds")}
#: Top windows drawn (the table lists all of them), and the lower band drawn for contrast.
N_TOP_WINDOWS = 4
CONTRAST_BAND = "q50"
#: Colour of the outline of a feature's strongest patches on the field: not in its colour map (viridis, RdBu_r).
_OVERLAY = {"gray_scott": "#ff2a8a", "flow": "#1b1b1b"}
_FONT = 9


# ------------------------------------------------------------------------------------------------
# ranking
# ------------------------------------------------------------------------------------------------


def _spearman_columns(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman rho of every column of ``x`` (n, f) with ``y`` (n,); NaN for a constant column."""
    from scipy.stats import rankdata

    rx = rankdata(x, axis=0)
    ry = rankdata(y)
    rx = rx - rx.mean(0)
    ry = ry - ry.mean()
    denom = np.sqrt((rx**2).sum(0) * (ry**2).sum())
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (rx * ry[:, None]).sum(0) / np.where(denom > 0, denom, 1.0), np.nan)


def within_regime_association(acts: np.ndarray, obs: pd.DataFrame, *, min_trajectories: int = MIN_TRAJECTORIES
                              ) -> pd.DataFrame:
    """Per feature, its strongest within-regime correlation with a physical parameter.

    Activations are averaged per trajectory (its windows share its parameters, so trajectories are
    the independent units); inside every (system, regime) with at least ``min_trajectories``
    trajectories, each parameter of the system (Gray–Scott feed and kill, flow viscosity and
    Reynolds number) is correlated (Spearman) with every feature across those trajectories.

    Parameters
    ----------
    acts
        ``(n_windows, n_features)`` activations, row-aligned with ``obs``.
    obs
        The windows' table: ``trajectory``, ``system``, ``regime`` and the parameters.
    min_trajectories
        Fewest trajectories of a regime to correlate within it.

    Returns
    -------
    DataFrame
        One row per feature: ``rho`` (signed, the largest |rho| over regimes and parameters; NaN
        when nothing could be tested or the feature is constant within every regime), ``of``
        (``"feed in gray_scott/stripes"``) and ``n`` (trajectories in that regime). The largest of
        up to eight correlations per feature: read it as a ranking, not as a test.
    """
    acts = np.asarray(acts, dtype=np.float64)
    n_feat = acts.shape[1]
    rho = np.full(n_feat, np.nan)
    of = np.full(n_feat, "", dtype=object)
    n_used = np.zeros(n_feat, dtype=np.int64)
    traj = obs["trajectory"].to_numpy()
    per = pd.DataFrame(acts).groupby(traj, sort=True).mean()  # (n_trajectories, f)
    meta = obs.drop_duplicates("trajectory").set_index("trajectory").loc[per.index]
    for (system, regime), idx in meta.groupby(["system", "regime"], sort=True).indices.items():
        for param in _PARAMETERS.get(str(system), ()):
            if param not in meta.columns:
                continue
            y = meta[param].to_numpy(dtype=np.float64)[idx]
            keep = np.isfinite(y)
            if keep.sum() < min_trajectories:
                continue
            r = _spearman_columns(per.to_numpy()[idx][keep], y[keep])
            better = np.isfinite(r) & ~(np.abs(r) <= np.abs(rho))  # NaN in rho: anything finite is better
            rho[better], of[better], n_used[better] = r[better], f"{param} in {system}/{regime}", int(keep.sum())
    return pd.DataFrame({"rho": rho, "of": of, "n": n_used})


# ------------------------------------------------------------------------------------------------
# pictures
# ------------------------------------------------------------------------------------------------


def patch_maps(frame: pd.DataFrame, *, n_patches_side: int, context: int) -> tuple[np.ndarray, float]:
    """A window's per-position activations as ``(context, side, side)`` patch maps and its class token's.

    The predictor's block outputs are a class token (position 0), then patch-major, frame-minor
    tokens: position ``1 + patch * context + frame``, patches row-major over the grid.

    Parameters
    ----------
    frame
        One window's :func:`sciscope.core.cards.position_activations` frame (``position``, ``activation``).
    n_patches_side, context
        Patches per side of the grid, context frames per window.

    Returns
    -------
    (maps, cls)
        ``maps[f, i, j]``: the activation at frame ``f``'s patch ``(i, j)``; ``cls``: at the class
        token (NaN when absent). Positions the SAE did not read stay NaN.
    """
    n_patch = n_patches_side**2
    flat = np.full(n_patch * context, np.nan)
    pos = frame["position"].to_numpy(dtype=np.int64)
    act = frame["activation"].to_numpy(dtype=np.float64)
    inside = (pos >= 1) & (pos <= n_patch * context)
    flat[pos[inside] - 1] = act[inside]
    maps = flat.reshape(n_patch, context).T.reshape(context, n_patches_side, n_patches_side)
    cls = act[pos == 0]
    return maps, float(cls[0]) if cls.size else float("nan")


def _pick_windows(examples: pd.DataFrame, n_top: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The top windows to draw (the best window of each trajectory first: consecutive windows of one
    trajectory look alike; then the next-ranked ones) and one contrast window (band q50, else the
    weakest band there is)."""
    top = examples[examples["band"] == "top"].sort_values("rank")
    first = top.drop_duplicates("trajectory")
    chosen = pd.concat([first, top.drop(first.index)]).head(n_top)
    low = examples[examples["band"] == CONTRAST_BAND]
    if not len(low):
        low = examples[examples["band"] != "top"].sort_values("activation", ascending=False)
    return chosen, low.head(1)


def _label(r: pd.Series, cls: float) -> str:
    """A row's label: which window, its physics and its activation."""
    params = (f"F={r['feed']:.3f} k={r['kill']:.4f}" if r["system"] == "gray_scott"
              else f"ν={r['viscosity']:.3g} Re={r['reynolds']:.3g}")
    band = f"#{int(r['rank'])}" if r["band"] == "top" else str(r["band"])
    act = f"act {r['activation']:.3g}" + ("" if not np.isfinite(cls) else f" · cls {cls:.2g}")
    return f"{band} {r['system']}/{r['regime']}\ntraj {int(r['trajectory'])}, t={int(r['t'])}\n{params}\n{act}"


def _draw(rows: pd.DataFrame, fields: dict[int, np.ndarray], maps: dict[int, tuple[np.ndarray, float]],
          limits: dict[str, tuple[float, float]], amax: float, patch: int, title: str) -> Any:
    """One figure: a row per window; its field at every context frame (the half-maximum outline of
    the feature's patch activation on it) and, per position SAE, the patch activation maps beside;
    a colour bar per system's field and one for the activation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .plots import _CMAP

    context, n = next(iter(fields.values())).shape[:2]
    systems = list(dict.fromkeys(rows["system"]))
    overlay = bool(maps)
    # columns (inches): fields | gap | activation maps | gap, bar | gap, bar ... (a bar's ticks and
    # label need room before the next one)
    cell = 0.95
    widths = [cell] * context + ([0.12] + [cell] * context if overlay else [])
    bars = [*systems, *(["activation"] if overlay else [])]
    for b in range(len(bars)):
        widths += [0.12 if b == 0 else 0.75, 0.08]
    # the card shows a picture at most 320 px tall: text is set large for a cell of 0.95 in, so that it
    # still reads at about 10 px when a four-row picture is scaled down to that height
    label_w, right_w = 1.75, 0.8  # row labels on the left; the last bar's ticks and label on the right
    fig_w = label_w + sum(widths) + right_w
    fig_h = cell * len(rows) + 0.5
    fig = plt.figure(figsize=(fig_w, fig_h))
    grid = fig.add_gridspec(len(rows), len(widths), width_ratios=widths, left=label_w / fig_w,
                            right=1 - right_w / fig_w, wspace=0.1, hspace=0.06, top=1 - 0.45 / fig_h, bottom=0.02)
    first_act = context + 1
    images: dict[str, Any] = {}
    extent = (-0.5, n - 0.5, n - 0.5, -0.5)
    for i, (_, r) in enumerate(rows.iterrows()):
        row, system = int(r["row"]), str(r["system"])
        amap = maps[row][0] if row in maps else None
        for f in range(context):
            ax = fig.add_subplot(grid[i, f])
            ax.set_xticks([]), ax.set_yticks([])
            images[system] = ax.imshow(fields[row][f], cmap=_CMAP.get(system, "viridis"), vmin=limits[system][0],
                                       vmax=limits[system][1], interpolation="nearest")
            if amap is not None and np.nanmax(amap[f], initial=0.0) >= 0.5 * amax:
                # where the feature fires at half its maximum or more (over every drawn window), outlined
                # on the field itself: the patch grid, upsampled to pixels
                up = np.kron(np.nan_to_num(amap[f]), np.ones((patch, patch)))
                ax.contour(np.arange(n), np.arange(n), up, levels=[0.5 * amax], colors=[_OVERLAY[system]],
                           linewidths=1.3)
            if i == 0:
                ax.set_title(f"field t{f - context + 1:+d}" if f < context - 1 else "field t", fontsize=_FONT)
            if f == 0:
                ax.set_ylabel(_label(r, maps.get(row, (None, np.nan))[1]), fontsize=_FONT, rotation=0, ha="right",
                              va="center", labelpad=4)
            if amap is not None:
                ax2 = fig.add_subplot(grid[i, first_act + f])
                ax2.set_xticks([]), ax2.set_yticks([])
                images["activation"] = ax2.imshow(amap[f], cmap="magma", vmin=0.0, vmax=amax, extent=extent,
                                                  interpolation="nearest")
                if i == 0:
                    ax2.set_title(f"activation t{f - context + 1:+d}" if f < context - 1 else "activation t", fontsize=_FONT)
    for b, name in enumerate(bars):
        cax = fig.add_subplot(grid[:, len(widths) - 2 * len(bars) + 2 * b + 1])
        bar = fig.colorbar(images[name], cax=cax)
        bar.set_label({"gray_scott": "v (Gray–Scott)", "flow": "vorticity (flow)"}.get(name, "activation per patch"),
                      fontsize=_FONT, labelpad=2)
        bar.ax.tick_params(labelsize=_FONT - 1)
    fig.suptitle(title, fontsize=_FONT + 1, x=(label_w + 0.5 * sum(widths[:len(widths) - 2 * len(bars)])) / fig_w)
    return fig


def _within_regime_figure(column: np.ndarray, obs: pd.DataFrame, feature: int) -> tuple[Any, str] | None:
    """The ranking's evidence: per-trajectory mean activation against the parameter of the feature's
    strongest within-regime correlation, that regime's trajectories in colour and the system's other
    regime in grey (a regime detector separates the two clouds; a parameter feature orders the
    coloured one). None when no regime could be tested."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best = within_regime_association(column[:, None], obs).iloc[0]
    if not np.isfinite(best["rho"]):
        return None
    param, where = str(best["of"]).split(" in ", 1)
    system, regime = where.split("/", 1)
    per = (obs.assign(_act=np.asarray(column, dtype=np.float64)).groupby("trajectory", sort=True)
           .agg(_act=("_act", "mean"), system=("system", "first"), regime=("regime", "first"), x=(param, "first")))
    per = per[per["system"] == system]
    fig, ax = plt.subplots(figsize=(3.4, 2.5))
    for r, part in per.groupby("regime"):
        mine = r == regime
        ax.scatter(part["x"], part["_act"], s=14 if mine else 9, color="C3" if mine else "0.7", zorder=2 if mine else 1,
                   label=f"{r} ({len(part)})")
    if system == "flow":  # viscosity and Reynolds number are drawn log-uniformly
        ax.set_xscale("log")
    ax.set_xlabel({"feed": "feed F", "kill": "kill k", "viscosity": "viscosity ν", "reynolds": "Reynolds number"}.get(param, param),
                  fontsize=_FONT)
    ax.set_ylabel("mean activation\nper trajectory", fontsize=_FONT)
    ax.tick_params(labelsize=_FONT - 1)
    ax.legend(frameon=False, fontsize=_FONT - 1, title=system, title_fontsize=_FONT - 1)
    ax.set_title(f"feature {feature}: Spearman ρ = {best['rho']:.2f} within {regime}", fontsize=_FONT)
    caption = (f"each point a {system} trajectory (its windows averaged); ρ over the {int(best['n'])} {regime} "
               "trajectories, the largest |ρ| over every regime and parameter (the cards' ranking); the other "
               "regime in grey")
    return fig, caption


def render_field_windows(adapter: "PhysicsAdapter", ctx: Any, feature: int, examples: pd.DataFrame, *,
                         n_top: int = N_TOP_WINDOWS) -> list["Panel"]:
    """Field snapshots of a feature's strongest windows and of one weaker window, for its card.

    Each window is drawn as its main scalar field (Gray–Scott ``v``, flow vorticity; the colour maps
    of :mod:`.plots`) at every context frame, one row per window labelled with system, regime,
    trajectory, time, parameters and the window's activation (the mean over its positions, as the
    SAE's example rows are pooled). When the SAE is trained per position, the feature's activation
    on every space-time patch shades that patch (opacity grows with the activation, on one scale for
    every window of the card, so weaker windows look weaker). Colour limits are shared per system
    over all drawn windows (the limits rule of :mod:`.plots`).

    Parameters
    ----------
    adapter
        The run's physics adapter (its trajectories and config).
    ctx
        The run's context (per-position activations through :func:`sciscope.core.cards.position_activations`).
    feature
        The latent.
    examples
        The card's examples (``band``, ``rank``, ``activation``, ``row`` and the windows' obs).
    n_top
        Top windows drawn: the best window of each trajectory first (consecutive windows of one
        trajectory look alike), then the next ranked.

    Returns
    -------
    list of Panel
        The strongest windows, and the contrast window (band ``q50``) when the feature has one.
    """
    from sciscope.core.cards import Panel, position_activations

    top, low = _pick_windows(examples, n_top)
    if not len(top):
        return []
    c = adapter.config
    context, patch = int(c["context_frames"]), int(c["patch_size"])
    ts = adapter.trajectories
    shown = pd.concat([top, low])
    fields = {int(r["row"]): main_field(str(r["system"]), ts.frames[int(r["trajectory"]), int(r["t"]) - context + 1:
                                                                   int(r["t"]) + 1].astype(np.float64))
              for _, r in shown.iterrows()}  # (context, n, n) per row
    from .plots import _limits

    limits = {s: _limits(s, [fields[int(r)] for r in shown.loc[shown["system"] == s, "row"]]) for s in set(shown["system"])}
    positions = position_activations(ctx, [int(r) for r in shown["row"]], feature)
    side = int(c["grid"]) // patch
    maps = {r: patch_maps(f, n_patches_side=side, context=context) for r, f in positions.items()}
    amax = max([float(np.nanmax(m)) for m, _ in maps.values() if np.isfinite(m).any()] + [1e-12])
    where = (f"right: the feature's activation on each {patch}x{patch} patch of each frame (0 to {amax:.3g}, one scale "
             "for both pictures), outlined on the field where it reaches half of that; cls = its activation on the "
             "class token" if maps else
             "the SAE reads pooled windows here: no per-patch activation to show")
    panels = [Panel.from_figure(_draw(top, fields, maps, limits, amax, patch, f"feature {feature}: strongest windows"),
                                "strongest windows",
                                f"main field (Gray–Scott v, flow vorticity) at the {context} context frames; best window "
                                f"of each trajectory first; {where}")]
    live = getattr(ctx, "live", {}) if ctx is not None else {}
    latents = live["card_latents"][0] if "card_latents" in live else (ctx.latents() if ctx is not None else None)
    if latents is not None:
        evidence = _within_regime_figure(np.asarray(latents.array("latents")[:, int(feature)]), latents.obs, feature)
        if evidence is not None:
            panels.append(Panel.from_figure(evidence[0], "within-regime association", evidence[1]))
    if len(low):
        band = str(low["band"].iloc[0])
        panels.append(Panel.from_figure(_draw(low, fields, maps, limits, amax, patch, f"feature {feature}: a {band} window"),
                                        f"contrast ({band})",
                                        f"a window near the {band[1:]}th percentile of its non-zero activations, on the "
                                        "same colour scales"))
    return panels

