"""Maps of features over places: activation maps, LISA cluster maps, Moran's I histograms.

Maps are lon/lat scatters with equal aspect over a land outline (:func:`.land.land_outline`:
Natural Earth where an installed package carries it, else drawn around GeoNames cities; never
downloaded). Each function returns a :class:`matplotlib.figure.Figure` (no pyplot state, no GUI
backend needed).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["LISA_COLOURS", "plot_feature_maps", "plot_lisa_map", "plot_morans_hist"]

#: Conventional LISA colours: hot spots red, cold spots blue, outliers pale, not significant grey.
LISA_COLOURS: dict[str, str] = {"HH": "#d7191c", "LL": "#2c7bb6", "HL": "#fdae61", "LH": "#abd9e9", "ns": "#d9d9d9"}


def _figure(nrows: int, ncols: int, size: tuple[float, float]) -> tuple[Any, np.ndarray]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=size)
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def _map_axes(ax: Any, lon: np.ndarray, lat: np.ndarray, *, land: bool = True) -> None:
    """Equal-aspect lon/lat axes fitted to the places, over the land outline (``land``)."""
    from .land import draw_land

    if land:
        draw_land(ax)  # under the points (zorder 0.5 < 2)
    ax.set_aspect("equal", adjustable="box")  # a degree is a degree on both axes
    pad_x = max(1.0, 0.03 * float(np.ptp(lon))) if lon.size else 1.0
    pad_y = max(1.0, 0.03 * float(np.ptp(lat))) if lat.size else 1.0
    if lon.size:
        ax.set_xlim(float(lon.min()) - pad_x, float(lon.max()) + pad_x)
        ax.set_ylim(float(lat.min()) - pad_y, float(lat.max()) + pad_y)
    ax.set_xlabel("longitude", fontsize=8)
    ax.set_ylabel("latitude", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(True, color="0.92", lw=0.5, zorder=0)


def _marker_size(n: int) -> float:
    return float(np.clip(6000.0 / max(n, 1), 1.5, 25.0))


def plot_feature_maps(acts: Any, obs: pd.DataFrame, features: Sequence[int], *, titles: Sequence[str] | None = None,
                      ncols: int = 3) -> Any:
    """One lon/lat map per feature, places coloured by the feature's activation (grey where a
    non-negative feature is 0).

    Parameters
    ----------
    acts
        ``(n_places, n_features)`` activations.
    obs
        Places with ``lat``/``lon``.
    features
        Column indices to map (e.g. the top features by Moran's I).
    titles
        One title per map (default ``"feature j"``).
    """
    A = np.asarray(acts)
    lon, lat = obs["lon"].to_numpy(dtype=np.float64), obs["lat"].to_numpy(dtype=np.float64)
    feats = list(features)
    k = max(1, len(feats))
    ncols = min(ncols, k)
    nrows = int(np.ceil(k / ncols))
    fig, axes = _figure(nrows, ncols, (4.2 * ncols, 3.0 * nrows))
    s = _marker_size(len(obs))
    for i, ax in enumerate(axes.ravel()):
        if i >= len(feats):
            ax.set_axis_off()
            continue
        v = np.asarray(A[:, feats[i]], dtype=np.float64)
        silent = v == 0 if (v >= 0).all() else np.zeros(v.shape, dtype=bool)  # a sparse latent's zeros in grey
        ax.scatter(lon[silent], lat[silent], c="#c9c9c9", s=0.6 * s, linewidths=0, zorder=2)
        order = np.flatnonzero(~silent)[np.argsort(v[~silent], kind="stable")]  # strongest drawn last, on top
        sc = ax.scatter(lon[order], lat[order], c=v[order], s=s, cmap="viridis", linewidths=0, zorder=2,
                        vmin=0.0 if (v >= 0).all() else None)
        fig.colorbar(sc, ax=ax, shrink=0.8, pad=0.01).ax.tick_params(labelsize=7)
        _map_axes(ax, lon, lat)
        ax.set_title(titles[i] if titles else f"feature {feats[i]}", fontsize=9)
    return fig


def plot_lisa_map(obs: pd.DataFrame, clusters: Any, *, title: str = "LISA clusters") -> Any:
    """Map of LISA cluster labels (HH, LL, HL, LH, ns) per place, with counts in the legend."""
    lon, lat = obs["lon"].to_numpy(dtype=np.float64), obs["lat"].to_numpy(dtype=np.float64)
    labels = np.asarray(clusters, dtype=object)
    fig, axes = _figure(1, 1, (7.5, 4.5))
    ax = axes[0, 0]
    s = _marker_size(len(obs))
    for lab in ("ns", "LH", "HL", "LL", "HH"):  # significant clusters drawn over the grey
        m = labels == lab
        if m.any() or lab != "ns":
            ax.scatter(lon[m], lat[m], s=s * (1.0 if lab == "ns" else 1.6), c=LISA_COLOURS[lab],
                       linewidths=0, label=f"{lab} ({int(m.sum())})", zorder=2 if lab == "ns" else 3)
    _map_axes(ax, lon, lat)
    ax.legend(fontsize=7, frameon=False, markerscale=2, loc="best")
    ax.set_title(title, fontsize=9)
    return fig


def plot_morans_hist(observed: Any, shuffled: Any, *, threshold: float = 0.3, title: str = "Moran's I of features") -> Any:
    """Histogram of per-feature Moran's I beside the shuffled-coordinates control, with the threshold marked."""
    obs_i, sh = (np.asarray(v, dtype=np.float64) for v in (observed, shuffled))
    obs_i, sh = obs_i[np.isfinite(obs_i)], sh[np.isfinite(sh)]
    fig, axes = _figure(1, 1, (6.0, 3.6))
    ax = axes[0, 0]
    allv = np.concatenate([obs_i, sh, [0.0]])  # 0 keeps an empty input plottable
    bins = np.linspace(min(-0.1, float(allv.min())), max(0.1, float(allv.max())), 50)
    ax.hist(obs_i, bins=bins, color="C0", alpha=0.8, label=f"features ({obs_i.size})")
    ax.hist(sh, bins=bins, color="0.5", alpha=0.6, label="shuffled-coordinates control")
    ax.axvline(threshold, color="C3", lw=1, ls="--", label=f"I >= {threshold:g}: {int((obs_i >= threshold).sum())}")
    ax.set_xlabel("Moran's I")
    # Log counts: the few strongly spatial features would vanish beside thousands near zero.
    ax.set_yscale("log")
    ax.set_ylabel("features (log scale)")
    ax.legend(fontsize=7, frameon=False)
    ax.set_title(title, fontsize=9)
    return fig
