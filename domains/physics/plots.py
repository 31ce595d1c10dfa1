"""Figures of the physics domain: regimes, rollout errors, steered rollouts, probe layers, SAE features.

Every function draws with matplotlib, writes one PNG atomically and returns its path.
Fields are shown as their main scalar (Gray–Scott ``v``, flow vorticity), with one colour scale
per row so a steered rollout is read against the same scale as its baseline.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from sciscope.core.plotting import save_figure

__all__ = ["plot_feature_diagnostics", "plot_parameter_probes", "plot_regime_examples", "plot_rollout_errors",
           "plot_rollout_strips"]

_CMAP = {"gray_scott": "viridis", "flow": "RdBu_r"}


def _limits(system: str, fields: Sequence[np.ndarray]) -> tuple[float, float]:
    vals = np.concatenate([np.asarray(f, dtype=np.float64).ravel() for f in fields])
    vals = vals[np.isfinite(vals)]
    if not vals.size:
        return -1.0, 1.0
    if system == "flow":  # symmetric around zero vorticity
        m = float(np.percentile(np.abs(vals), 99)) or 1.0
        return -m, m
    lo, hi = float(vals.min()), float(vals.max())
    # a (nearly) uniform field, e.g. a Gray-Scott pattern that died out: a unit range, not one that
    # blows rounding noise up into a pattern
    return (lo, hi) if hi - lo > 1e-6 * max(1.0, abs(hi)) else (lo, lo + 1.0)


def _field_rows(rows: Mapping[str, np.ndarray], systems: Sequence[str], limits: Sequence[tuple[float, float]],
                path: str | Path, *, titles: Sequence[str] = (), suptitle: str = "", size: float = 1.5) -> Path:
    """One row of frames ``(k, n, n)`` per label with its system's colour map and limits; NaN frames marked "diverged"."""
    ncol = max(len(v) for v in rows.values())
    fig, axes = plt.subplots(len(rows), ncol, figsize=(size * ncol + 0.8, size * len(rows) + 0.4), squeeze=False)
    for r, (label, frames) in enumerate(rows.items()):
        for c in range(ncol):
            ax = axes[r][c]
            ax.set_xticks([]), ax.set_yticks([])
            if c < len(frames) and np.isfinite(frames[c]).all():
                ax.imshow(frames[c], cmap=_CMAP.get(systems[r], "viridis"), vmin=limits[r][0], vmax=limits[r][1])
            elif c < len(frames):
                ax.text(0.5, 0.5, "diverged", ha="center", va="center", fontsize=7, color="C3", transform=ax.transAxes)
            if r == 0 and c < len(titles):
                ax.set_title(titles[c], fontsize=7)
            if c == 0:
                ax.set_ylabel(label, fontsize=7)
    fig.suptitle(suptitle, fontsize=8)
    return save_figure(fig, path, dpi=100)


def plot_regime_examples(fields: Mapping[tuple[str, str], np.ndarray], path: str | Path) -> Path:
    """One row per (system, regime): a few trajectories' last frames (main field).

    ``fields[(system, regime)]`` is ``(k, n, n)``.
    """
    return _field_rows({f"{s}\n{r}": v for (s, r), v in fields.items()}, [s for s, _ in fields],
                       [_limits(s, [v]) for (s, _), v in fields.items()], path, size=1.6,
                       suptitle="simulated regimes (last frame; Gray-Scott v, flow vorticity)")


def plot_rollout_errors(errors: pd.DataFrame, path: str | Path) -> Path:
    """Rollout MSE vs horizon per system, model beside persistence (``errors`` from the adapter)."""
    systems = list(dict.fromkeys(errors["system"]))
    fig, axes = plt.subplots(1, len(systems), figsize=(4.4 * len(systems), 3.2), squeeze=False)
    for ax, system in zip(axes[0], systems):
        t = errors[errors["system"] == system].sort_values("horizon")
        ax.plot(t["horizon"], t["mse_model"], "o-", ms=3, label="model rollout")
        ax.plot(t["horizon"], t["mse_persistence"], "--", color="0.5", label="persistence")
        ax.set_yscale("log")
        ax.set_xlabel("rollout step"), ax.set_ylabel("MSE (standardised units)")
        ax.set_title(system)
        ax.legend(frameon=False, fontsize=8)
    return save_figure(fig, path, dpi=100)


def plot_rollout_strips(system: str, rows: Mapping[str, np.ndarray], path: str | Path, *, steps: Sequence[int],
                        title: str = "") -> Path:
    """Image strips: one row per condition (truth, alpha = 0, steered, random), one column per step.

    ``rows[label]`` is ``(n_steps, n, n)`` (main field); NaN frames (diverged) are drawn blank
    with a "diverged" mark. All rows share one colour scale.
    """
    shown = {label: frames[list(steps)] for label, frames in rows.items()}
    limits = _limits(system, [v for v in shown.values() if np.isfinite(v).any()] or [np.zeros(1)])
    return _field_rows(shown, [system] * len(shown), [limits] * len(shown), path,
                       titles=[f"step {s + 1}" for s in steps], suptitle=title, size=1.45)


def plot_parameter_probes(summary: pd.DataFrame, path: str | Path) -> Path:
    """R^2 of parameter probes vs layer per (``system`` label, target): the shuffled-label control dashed,
    the strongest baseline (``baseline_mean``, when present) dotted."""
    summary = summary[summary["site"].notna() & (summary["site"].astype(str) != "")]
    targets = list(dict.fromkeys(zip(summary["system"], summary["target"])))
    ncol = min(4, max(1, len(targets)))
    nrow = max(1, -(-len(targets) // ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.2 * ncol, 3.0 * nrow), squeeze=False, sharey=True)
    for ax in axes.ravel()[len(targets):]:
        ax.axis("off")
    for ax, (system, target) in zip(axes.ravel(), targets):
        t = summary[(summary["system"] == system) & (summary["target"] == target)]
        x = np.arange(len(t))
        ax.plot(x, t["score_mean"], "o-", label="probe")
        ax.plot(x, t["control_mean"], "--", color="0.5", label="shuffled")
        if "baseline_mean" in t and np.isfinite(t["baseline_mean"].to_numpy(dtype=np.float64)).any():
            name = t["baseline"].dropna().iloc[0] if "baseline" in t and t["baseline"].notna().any() else "baseline"
            ax.plot(x, t["baseline_mean"], ":", color="C3", label=f"{name} (strongest baseline)")
        ax.set_xticks(x, t["site"], rotation=45, ha="right", fontsize=7)
        ax.set_title(f"{system}: {target}", fontsize=8)
        ax.set_ylim(max(-1.0, float(np.nanmin(ax.get_ylim()))), 1.05)
    axes[0][0].set_ylabel("R$^2$ (trajectory-grouped CV)")
    axes[0][0].legend(frameon=False, fontsize=7)
    return save_figure(fig, path, dpi=100)


def plot_feature_diagnostics(acts: np.ndarray, obs: pd.DataFrame, pairs: Sequence[tuple[str, int, float]],
                             path: str | Path) -> Path:
    """Scatter of each (diagnostic, best SAE feature) pair, coloured by regime."""
    pairs = list(pairs)[:8]
    cols = min(4, max(1, len(pairs)))
    nrows = max(1, -(-len(pairs) // cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(3.2 * cols, 2.8 * nrows), squeeze=False)
    for ax in axes.ravel()[len(pairs):]:
        ax.axis("off")
    regimes = list(dict.fromkeys(obs["regime"]))
    for ax, (diag, feat, rho) in zip(axes.ravel(), pairs):
        y = obs[diag].to_numpy(dtype=np.float64)
        x = np.asarray(acts[:, feat], dtype=np.float64)
        for i, r in enumerate(regimes):
            m = (obs["regime"] == r).to_numpy() & np.isfinite(y)
            if m.any():
                ax.scatter(x[m], y[m], s=3, alpha=0.5, color=f"C{i}", label=r)
        ax.set_xlabel(f"SAE feature {feat}", fontsize=7)
        ax.set_ylabel(diag, fontsize=7)
        ax.set_title(f"rho = {rho:.2f}", fontsize=8)
        ax.tick_params(labelsize=6)
    if pairs:
        axes.ravel()[0].legend(frameon=False, fontsize=6, markerscale=3)
    fig.suptitle("SAE features vs physical diagnostics (best |Spearman rho| per diagnostic)", fontsize=9)
    return save_figure(fig, path, dpi=100)
