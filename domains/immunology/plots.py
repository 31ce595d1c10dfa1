"""UMAP figures through scanpy (seeded ``sc.pp.neighbors`` + ``sc.tl.umap`` on an ``adata.obsm``
representation): cells coloured by type, library size and SAE feature activations."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sciscope.core.plotting import save_figure

__all__ = ["compute_umap", "plot_umap", "umap_figures"]


def compute_umap(adata: Any, rep: str, *, key: str, n_neighbors: int = 15, seed: int = 0) -> np.ndarray:
    """UMAP of ``adata.obsm[rep]`` (cosine kNN graph, kept as ``uns[f"neighbors_{rep}"]``), stored as
    ``adata.obsm[key]``; returns it. Several UMAPs live side by side in one AnnData."""
    import scanpy as sc

    n_neighbors = max(2, min(n_neighbors, adata.n_obs - 1))
    sc.pp.neighbors(adata, use_rep=rep, n_neighbors=n_neighbors, metric="cosine", random_state=seed,
                    key_added=f"neighbors_{rep}")
    sc.tl.umap(adata, random_state=seed, neighbors_key=f"neighbors_{rep}", key_added=None if key == "X_umap" else key)
    adata.obsm[key] = coords = np.asarray(adata.obsm[key], dtype=np.float32)
    return coords


def plot_umap(adata: Any, basis: str, color: Sequence[str], path: str | Path, *, titles: Sequence[str] | None = None,
              suptitle: str = "", ncols: int = 3, wspace: float = 0.7) -> Path:
    """``sc.pl.umap`` of ``adata.obsm[basis]`` coloured by obs columns or var names; saved to ``path``
    (``wspace``: room between panels for a categorical legend)."""
    import matplotlib

    matplotlib.use("Agg")
    import scanpy as sc

    basis_name = basis[2:] if basis.startswith("X_") else basis
    fig = sc.pl.embedding(adata, basis=basis_name, color=list(color), title=list(titles) if titles else None,
                          show=False, return_fig=True, ncols=ncols, frameon=False, size=max(8.0, 12000 / max(adata.n_obs, 1)),
                          wspace=wspace, color_map="viridis")
    if suptitle:
        fig.suptitle(suptitle)
    return save_figure(fig, path, tight_bbox=True)


def umap_figures(adata: Any, latents: np.ndarray, ct: pd.DataFrame, *, site: str, n_features: int, seed: int,
                 output: Callable[[str], Path]) -> list[Path]:
    """UMAPs of the expression PCA and of the ``site`` embeddings (kept as ``obsm['X_umap']``), and
    that embedding coloured by the most specific feature of each of the top cell types (``ct``)."""
    compute_umap(adata, "X_pca", key="X_umap_expression", seed=seed)
    compute_umap(adata, f"X_{site}", key="X_umap", seed=seed)  # the default basis of sc.pl.umap
    color = ["cell_type"] + [c for c in ("log10_library_size", "n_genes_detected") if c in adata.obs]
    paths = [plot_umap(adata, "X_umap_expression", color, output("umap_expression.png"),
                       suptitle="Baseline view: UMAP of the expression PCA (log-normalised)"),
             plot_umap(adata, "X_umap", color, output("umap_embedding.png"),
                       suptitle=f"UMAP of the model's cell embeddings at {site} (mean over gene tokens)")]
    live = ct[ct["significant"].fillna(False).astype(bool)].sort_values("auroc", ascending=False)
    picks = live.drop_duplicates("cell_type").head(n_features)  # the best feature of each type, most specific first
    if len(picks):
        cols = [f"feature {int(f)}" for f in picks.feature]
        for name, f in zip(cols, picks.feature):
            adata.obs[name] = latents[:, int(f)]
        titles = [f"feature {int(r.feature)}: {r.cell_type}\n(AUROC {r.auroc:.2f})" for r in picks.itertuples()]
        paths.append(plot_umap(adata, "X_umap", cols, output("umap_features.png"), titles=titles, wspace=0.25,
                               suptitle="SAE feature activations on the embedding UMAP (most specific feature per type)"))
        adata.obs.drop(columns=cols, inplace=True)
    return paths
