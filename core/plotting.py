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


def save_figure(fig: Any, path: Any, *, dpi: int = 110, tight_bbox: bool = False) -> Any:
    """Write ``fig`` as a PNG atomically (temp file + rename), close it, return the path.

    ``tight_bbox`` crops the canvas to what is drawn (figures with a suptitle over panels of
    fixed aspect, such as UMAPs, otherwise keep empty margins).
    """
    from pathlib import Path

    import matplotlib.pyplot as plt

    from .io import atomic_path

    path = Path(path)
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
