"""Figures of the robotics adapter: trajectories and the lens per layer (each returns the figure)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from .env import COLORS, Scenes

__all__ = ["plot_layer_lens", "plot_trajectories"]


def plot_trajectories(
    scenes: Scenes, paths: Mapping[str, np.ndarray], *, n: int = 6, title: str = "", success_radius: float = 0.05,
) -> Any:
    """Gripper paths of the same scenes under several conditions (baseline vs steered).

    ``paths``: ``{label: (T + 1, N, 2) positions (NaN after the end)}``; the first label is drawn
    grey (the baseline), the others in colour. Blocks are squares in their colour, the target
    ringed by its success radius.
    """
    import matplotlib.pyplot as plt

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
    return fig


def plot_layer_lens(summary: pd.DataFrame) -> Any:
    """Share of FFN neurons whose top tokens are mostly action tokens, per layer, vs the controls."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    x = summary["layer"].to_numpy()
    ax = axes[0]
    for col, color, label in (("share_neurons_mostly_action", "C0", "mostly action tokens"),
                              ("share_neurons_coherent", "C1", "one coherent action meaning")):
        ax.plot(x, summary[col], "o-", color=color, label=label)
        if f"{col}_untrained" in summary:
            ax.plot(x, summary[f"{col}_untrained"], "s--", color=color, alpha=0.5, label=f"{label}, untrained")
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
    return fig
