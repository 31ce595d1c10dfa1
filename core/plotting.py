"""Small plotting helpers shared by result objects (scanpy style: take ``ax=``, return it).

Plots only read results. Nothing here picks a backend or calls ``show()``, so figures work
headless (matplotlib falls back to Agg without a display) and inside notebooks alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def get_ax(ax: Any = None, *, figsize: tuple[float, float] = (6.0, 4.0)) -> Any:
    """Return ``ax``, or a fresh Axes on a new figure when ``ax`` is None.

    pyplot is imported only here, lazily, so importing sciscope never touches a GUI backend.
    """
    if ax is not None:
        return ax
    import matplotlib.pyplot as plt

    _, ax = plt.subplots(figsize=figsize)
    return ax


def label_sites(ax: Any, sites: Sequence[str], *, max_labels: int = 40) -> None:
    """Put site names on the x axis (positions 0..n-1), thinned when there are many."""
    n = len(sites)
    step = max(1, -(-n // max_labels))  # ceil(n / max_labels)
    ticks = list(range(0, n, step))
    ax.set_xticks(ticks)
    # Site paths are long ("transformer.h.1"): slant them unless they are short and few.
    slant = n > 4 or max((len(s) for s in sites), default=0) * n > 30
    ax.set_xticklabels([sites[i] for i in ticks], rotation=30 if slant else 0, ha="right" if slant else "center")
    ax.set_xlim(-0.5, n - 0.5)
