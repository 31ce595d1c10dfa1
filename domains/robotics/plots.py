"""Figures of the robotics adapter: trajectories, displacement vs alpha, lens per layer, training."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from .env import COLORS, Scenes

__all__ = ["plot_alpha_curves", "plot_layer_lens", "plot_trajectories", "plot_training", "save_figure"]

#: The metric each cluster is meant to move.
CLUSTER_METRIC: dict[str, str] = {"fast": "displacement", "slow": "displacement", "right": "dx", "left": "dx",
                                  "up": "dy", "down": "dy"}


def save_figure(fig: "object", path: str | Path) -> Path:
    """Save a Matplotlib figure as PNG atomically and close it."""
    import matplotlib.pyplot as plt

    from sciscope.core.io import atomic_path

    path = Path(path)
    fig.tight_layout()  # type: ignore[attr-defined]
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")  # type: ignore[attr-defined]
    plt.close(fig)  # type: ignore[arg-type]
    return path


def _mpl() -> "object":
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_trajectories(
    scenes: Scenes, paths: Mapping[str, np.ndarray], out: str | Path, *, n: int = 6, title: str = "",
    success_radius: float = 0.05,
) -> Path:
    """Gripper paths of the same scenes under several conditions (baseline vs steered).

    ``paths``: ``{label: (T + 1, N, 2) positions (NaN after the end)}``; the first label is drawn
    grey (the baseline), the others in colour. Blocks are squares in their colour, the target
    ringed by its success radius.
    """
    plt = _mpl()
    n = min(n, len(scenes))
    cols = min(n, 3)
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), squeeze=False)
    names = list(COLORS)
    styles = ["0.45", "C1", "C0", "C2", "C3"]
    for i in range(rows * cols):
        ax = axes[i // cols][i % cols]
        if i >= n:
            ax.axis("off")
            continue
        for j in range(scenes.blocks.shape[1]):
            rgb = np.array(COLORS[names[int(scenes.colors[i, j])]]) / 255
            ax.scatter(*scenes.blocks[i, j], marker="s", s=120, color=rgb, edgecolor="k", zorder=2)
        tgt = scenes.target_pos[i]
        ax.add_patch(plt.Circle(tuple(tgt), success_radius, fill=False, ls=":", color="k"))
        for k, (label, p) in enumerate(paths.items()):
            xy = p[:, i]
            xy = xy[np.isfinite(xy).all(1)]
            # the baseline wide and pale underneath, so the steered paths stay readable on top of it
            kw = {"lw": 4, "alpha": 0.45, "zorder": 2.5} if k == 0 else {"lw": 1.2, "zorder": 3}
            ax.plot(xy[:, 0], xy[:, 1], "-o", ms=2, color=styles[k % len(styles)], label=label, **kw)
        ax.scatter(*scenes.gripper[i], marker="x", color="k", zorder=4)
        ax.set_xlim(0, 1), ax.set_ylim(0, 1), ax.set_aspect("equal")
        ax.set_xticks([]), ax.set_yticks([])
        ax.set_title(scenes.instruction[i], fontsize=8)
    axes[0][0].legend(fontsize=7, frameon=False, loc="lower left")
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, out)


def plot_alpha_curves(
    sweep: pd.DataFrame, reference: pd.DataFrame, out: str | Path, *, metric_of: Mapping[str, str] = CLUSTER_METRIC,
) -> Path:
    """Per cluster: its metric vs clamp value alpha, random clusters dashed, references flat.

    ``sweep``: :func:`.lens.clamp_sweep`'s table; ``reference``: ``condition, metric, value`` for
    the unclamped baseline and the prompt modifiers (drawn as horizontal lines).
    """
    plt = _mpl()
    clusters = list(dict.fromkeys(sweep["cluster"]))
    if not clusters:
        fig, ax = plt.subplots(figsize=(4, 2))
        ax.text(0.5, 0.5, "no cluster met the rule", ha="center", va="center")
        ax.axis("off")
        return save_figure(fig, out)
    metrics = [metric_of.get(c, "displacement") for c in clusters]
    pairs = list(dict.fromkeys(zip(clusters, metrics)))
    extra = [("all", "success_rate")]
    cols = min(3, len(pairs) + 1)
    rows = int(np.ceil((len(pairs) + 1) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.8 * cols, 3.0 * rows), squeeze=False)
    ref_styles = {"baseline": ("k", "-"), "prompt: quickly": ("C2", ":"), "prompt: slowly": ("C4", ":")}
    for i, (cl, m) in enumerate(pairs + extra):
        ax = axes[i // cols][i % cols]
        t = sweep[sweep["metric"] == m] if cl == "all" else sweep[(sweep["cluster"] == cl) & (sweep["metric"] == m)]
        for (c, cond), g in t.groupby(["cluster", "condition"]):
            g = g.sort_values("alpha")
            if cond == "cluster":
                ax.plot(g["alpha"], g["value"], "o-", lw=1.6, label=f"{c} cluster" if cl == "all" else f"{c} ({int(g.n_neurons.iloc[0])} neurons)")
            else:
                ax.plot(g["alpha"], g["value"], "--", color="0.6", lw=1,
                        label="random, same size" if cond.endswith("-0") and (cl != "all" or c == clusters[0]) else None)
        for cond, (color, ls) in ref_styles.items():
            r = reference[(reference["condition"] == cond) & (reference["metric"] == m)]
            if len(r):
                ax.axhline(float(r["value"].iloc[0]), color=color, ls=ls, lw=1, label=cond)
        ax.set_xlabel("clamp value alpha")
        ax.set_ylabel(m + (" (x max step)" if m in ("displacement", "dx", "dy") else ""))
        ax.set_title("success rate, every cluster" if cl == "all" else f"{cl} cluster", fontsize=9)
        ax.legend(fontsize=6, frameon=False)
    for j in range(len(pairs) + 1, rows * cols):
        axes[j // cols][j % cols].axis("off")
    return save_figure(fig, out)


def plot_layer_lens(summary: pd.DataFrame, out: str | Path) -> Path:
    """Share of FFN neurons whose top tokens are mostly action tokens, per layer, vs the controls."""
    plt = _mpl()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    x = summary["layer"].to_numpy()
    ax = axes[0]
    ax.plot(x, summary["share_neurons_mostly_action"], "o-", color="C0", label="mostly action tokens")
    ax.plot(x, summary["share_neurons_coherent"], "o-", color="C1", label="one coherent action meaning")
    if "share_neurons_coherent_untrained" in summary:
        ax.plot(x, summary["share_neurons_mostly_action_untrained"], "s--", color="C0", alpha=0.5,
                label="mostly action, untrained")
        ax.plot(x, summary["share_neurons_coherent_untrained"], "s--", color="C1", alpha=0.5, label="coherent, untrained")
    ax.axhline(float(summary["vocabulary_action_share"].iloc[0]), color="0.6", lw=0.8, ls=":", label="vocabulary action share")
    ax.set_xlabel("layer"), ax.set_ylabel("share of FFN neurons"), ax.set_ylim(-0.02, 1.02)
    ax.set_xticks(x), ax.legend(fontsize=7, frameon=False)
    ax = axes[1]
    width = 0.13
    cats = [c for c in ("fast", "slow", "right", "left", "up", "down") if f"n_{c}" in summary]
    for i, c in enumerate(cats):
        ax.bar(x + (i - len(cats) / 2) * width, summary[f"n_{c}"], width, label=c)
    ax.set_xlabel("layer"), ax.set_ylabel("neurons meeting the cluster rule"), ax.set_xticks(x)
    ax.legend(fontsize=7, frameon=False, ncol=2)
    return save_figure(fig, out)


def plot_training(history: Sequence[Mapping[str, float]], out: str | Path) -> Path:
    """Behaviour-cloning loss and bin accuracy vs step."""
    plt = _mpl()
    h = pd.DataFrame(list(history))
    fig, axes = plt.subplots(1, 2, figsize=(8, 3))
    axes[0].plot(h["step"], h["loss"], lw=1)
    axes[0].set_xlabel("step"), axes[0].set_ylabel("BC loss (soft cross-entropy)")
    axes[1].plot(h["step"], h["bin_accuracy"], lw=1, color="C1")
    axes[1].set_xlabel("step"), axes[1].set_ylabel("exact-bin accuracy (teacher forced)")
    return save_figure(fig, out)
