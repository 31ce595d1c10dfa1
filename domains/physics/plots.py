"""Figures of the physics domain: regimes, training, rollout errors, steered rollouts, probe layers.

Every function draws with matplotlib (Agg), writes one PNG atomically and returns its path.
Fields are shown as their main scalar (Gray–Scott ``v``, flow vorticity), with one colour scale
per row so a steered rollout is read against the same scale as its baseline.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sciscope.core.plotting import save_figure

__all__ = [
    "plot_feature_diagnostics",
    "plot_parameter_probes",
    "plot_regime_examples",
    "plot_rollout_errors",
    "plot_rollout_strips",
    "plot_training",
]

_CMAP = {"gray_scott": "viridis", "flow": "RdBu_r"}


def _save(fig: Any, path: str | Path) -> Path:
    return save_figure(fig, path, dpi=100)


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _limits(system: str, fields: Sequence[np.ndarray]) -> tuple[float, float]:
    vals = np.concatenate([np.asarray(f, dtype=np.float64).ravel() for f in fields])
    vals = vals[np.isfinite(vals)]
    if not vals.size:
        return -1.0, 1.0
    if system == "flow":  # symmetric around zero vorticity
        m = float(np.percentile(np.abs(vals), 99)) or 1.0
        return -m, m
    return float(vals.min()), float(vals.max()) if vals.max() > vals.min() else float(vals.min()) + 1.0


def plot_regime_examples(fields: Mapping[tuple[str, str], np.ndarray], path: str | Path) -> Path:
    """One row per (system, regime): a few trajectories' last frames (main field).

    ``fields[(system, regime)]`` is ``(k, n, n)``.
    """
    plt = _plt()
    keys = list(fields)
    k = max(len(v) for v in fields.values())
    fig, axes = plt.subplots(len(keys), k, figsize=(1.6 * k, 1.7 * len(keys)), squeeze=False)
    for r, key in enumerate(keys):
        system, regime = key
        vmin, vmax = _limits(system, [fields[key]])
        for c in range(k):
            ax = axes[r][c]
            ax.set_xticks([]), ax.set_yticks([])
            if c < len(fields[key]):
                ax.imshow(fields[key][c], cmap=_CMAP.get(system, "viridis"), vmin=vmin, vmax=vmax)
            if c == 0:
                ax.set_ylabel(f"{system}\n{regime}", fontsize=8)
    fig.suptitle("simulated regimes (last frame; Gray-Scott v, flow vorticity)", fontsize=9)
    return _save(fig, path)


def plot_training(history: Sequence[Mapping[str, float]], path: str | Path) -> Path:
    """Training loss (weighted MSE of the change, relative to each system's mean squared change)."""
    plt = _plt()
    h = pd.DataFrame(list(history))
    fig, ax = plt.subplots(figsize=(5, 3.2))
    if len(h):
        ax.plot(h["step"], h["loss"], lw=1)
    ax.axhline(1.0, color="0.6", ls="--", lw=1, label="persistence (zero change)")
    ax.set_yscale("log")
    ax.set_xlabel("step"), ax.set_ylabel("loss / mean squared change")
    ax.set_title("next-frame change, training loss")
    ax.legend(frameon=False, fontsize=8)
    return _save(fig, path)


def plot_rollout_errors(errors: pd.DataFrame, path: str | Path) -> Path:
    """Rollout MSE vs horizon per system, model beside persistence (``errors`` from the adapter)."""
    plt = _plt()
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
    return _save(fig, path)


def plot_rollout_strips(system: str, rows: Mapping[str, np.ndarray], path: str | Path, *, steps: Sequence[int],
                        title: str = "") -> Path:
    """Image strips: one row per condition (truth, alpha = 0, steered, random), one column per step.

    ``rows[label]`` is ``(n_steps, n, n)`` (main field); NaN frames (diverged) are drawn blank
    with a "diverged" mark.
    """
    plt = _plt()
    labels = list(rows)
    vmin, vmax = _limits(system, [rows[lab][list(steps)] for lab in labels if np.isfinite(rows[lab][list(steps)]).any()] or [np.zeros(1)])
    fig, axes = plt.subplots(len(labels), len(steps), figsize=(1.45 * len(steps) + 0.8, 1.45 * len(labels) + 0.4),
                             squeeze=False)
    for r, lab in enumerate(labels):
        for c, s in enumerate(steps):
            ax = axes[r][c]
            ax.set_xticks([]), ax.set_yticks([])
            frame = rows[lab][s]
            if np.isfinite(frame).all():
                ax.imshow(frame, cmap=_CMAP.get(system, "viridis"), vmin=vmin, vmax=vmax)
            else:
                ax.text(0.5, 0.5, "diverged", ha="center", va="center", fontsize=7, color="C3", transform=ax.transAxes)
            if r == 0:
                ax.set_title(f"step {s + 1}", fontsize=7)
            if c == 0:
                ax.set_ylabel(lab, fontsize=7)
    fig.suptitle(title, fontsize=8)
    return _save(fig, path)


def plot_parameter_probes(summary: pd.DataFrame, path: str | Path) -> Path:
    """R^2 of per-system parameter probes vs layer, with the shuffled-label control dashed."""
    plt = _plt()
    summary = summary[summary["site"].notna() & (summary["site"].astype(str) != "")]
    targets = list(dict.fromkeys(zip(summary["system"], summary["target"])))
    fig, axes = plt.subplots(1, max(1, len(targets)), figsize=(3.2 * max(1, len(targets)), 3.0), squeeze=False, sharey=True)
    for ax, (system, target) in zip(axes[0], targets):
        t = summary[(summary["system"] == system) & (summary["target"] == target)]
        x = np.arange(len(t))
        ax.plot(x, t["score_mean"], "o-", label="probe")
        ax.plot(x, t["control_mean"], "--", color="0.5", label="shuffled")
        ax.set_xticks(x, t["site"], rotation=45, ha="right", fontsize=7)
        ax.set_title(f"{system}: {target}", fontsize=8)
    axes[0][0].set_ylabel("R$^2$ (trajectory-grouped CV)")
    axes[0][0].legend(frameon=False, fontsize=7)
    return _save(fig, path)


def plot_feature_diagnostics(acts: np.ndarray, obs: pd.DataFrame, pairs: Sequence[tuple[str, int, float]],
                             path: str | Path) -> Path:
    """Scatter of each (diagnostic, best SAE feature) pair, coloured by regime."""
    plt = _plt()
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
    return _save(fig, path)
