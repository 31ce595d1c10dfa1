"""UMAP figures through scanpy: cells coloured by type, library size and SAE feature activations.

Each figure is computed with ``sc.pp.neighbors`` + ``sc.tl.umap`` on a representation stored in
``adata.obsm`` (seeded), drawn with ``sc.pl.umap`` and written atomically.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sciscope.core.io import atomic_path

__all__ = ["compute_umap", "plot_umap", "save_figure"]


def compute_umap(adata: Any, rep: str, *, key: str, n_neighbors: int = 15, seed: int = 0) -> np.ndarray:
    """UMAP of ``adata.obsm[rep]`` (cosine kNN graph), stored as ``adata.obsm[key]``; returns it.

    The neighbour graph of each representation is kept under ``adata.uns[f"neighbors_{rep}"]``
    (scanpy's ``key_added``), so several UMAPs live side by side in one AnnData.
    """
    import scanpy as sc

    n_neighbors = max(2, min(n_neighbors, adata.n_obs - 1))
    sc.pp.neighbors(adata, use_rep=rep, n_neighbors=n_neighbors, metric="cosine", random_state=seed,
                    key_added=f"neighbors_{rep}")
    # sc.tl.umap writes obsm["X_umap"]; keep the previous one (if any) and move the new one to ``key``
    previous = adata.obsm["X_umap"].copy() if "X_umap" in adata.obsm else None
    sc.tl.umap(adata, random_state=seed, neighbors_key=f"neighbors_{rep}")
    coords = np.asarray(adata.obsm["X_umap"], dtype=np.float32)
    if key != "X_umap":
        if previous is not None:
            adata.obsm["X_umap"] = previous
        else:
            del adata.obsm["X_umap"]
    adata.obsm[key] = coords
    return coords


def save_figure(fig: Any, path: str | Path) -> Path:
    """Write a matplotlib figure as PNG atomically (``bbox_inches="tight"`` for legends outside); closes it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png", bbox_inches="tight")
    plt.close(fig)
    return path


def plot_umap(
    adata: Any, basis: str, color: Sequence[str], path: str | Path, *, titles: Sequence[str] | None = None,
    suptitle: str = "", ncols: int = 3, wspace: float = 0.7,
) -> Path:
    """``sc.pl.umap`` of ``adata.obsm[basis]`` coloured by obs columns or var names; saved to ``path``.

    ``wspace`` leaves room between panels for a categorical legend (use less for colour bars only).
    """
    import matplotlib

    matplotlib.use("Agg")
    import scanpy as sc

    basis_name = basis[2:] if basis.startswith("X_") else basis
    fig = sc.pl.embedding(adata, basis=basis_name, color=list(color), title=list(titles) if titles else None,
                          show=False, return_fig=True, ncols=ncols, frameon=False, size=max(8.0, 12000 / max(adata.n_obs, 1)),
                          wspace=wspace, color_map="viridis")
    if suptitle:
        fig.suptitle(suptitle, y=1.02)
    return save_figure(fig, path)
