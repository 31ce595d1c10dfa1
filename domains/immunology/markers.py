"""Canonical PBMC marker genes and the cell types each one marks.

The textbook panel for peripheral blood (the Seurat/scanpy PBMC tutorials); a marker is
"recovered" when an SAE feature specific to one of its cell types is driven by that gene's token
(:func:`.features.marker_recovery`). Cell types are matched by case-insensitive regular expressions
on the label text, so the table fits ``pbmc68k_reduced``'s ``bulk_labels`` ("CD19+ B", "CD14+
Monocyte" ...) and common annotations of user data ("B cells", "CD14 Mono", "NK"). A marker whose
cell type or gene is absent from the data (PPBP: platelets; CD14, CD34 and PPBP are not among the
765 genes of ``pbmc68k_reduced``) is reported as such, never dropped silently.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

import pandas as pd

__all__ = ["CANONICAL_MARKERS", "marker_table", "match_types", "wilcoxon_markers"]

# "cd4(?!\d)": CD4 but not the CD45RA/CD45RO of "CD8+/CD45RA+ Naive Cytotoxic"
_T = r"(\bt\b|t[ -]?cell|t[ -]?reg|cytotoxic|cd4(?!\d)|cd8|memory t|naive t)"
_CD8 = r"(cd8|cytotoxic)"
_CD4 = r"(cd4(?!\d)|t[ -]?reg|memory)"
_B = r"(\bb\b|b[ -]?cell|cd19|plasma)"
_MONO = r"(mono|cd14)"
_NK = r"(\bnk\b|cd56|natural killer)"
_DC = r"(dendritic|\bdc\b|fcer1a)"

#: (gene, what it marks, regex over cell-type labels)
CANONICAL_MARKERS: tuple[tuple[str, str, str], ...] = (
    ("CD3E", "T cells", _T),
    ("CD3D", "T cells", _T),
    ("IL7R", "CD4 T cells", _CD4),
    ("CD8A", "CD8 T cells", _CD8),
    ("MS4A1", "B cells", _B),
    ("CD79A", "B cells", _B),
    ("CD79B", "B cells", _B),
    ("CD14", "CD14+ monocytes", _MONO),
    ("LYZ", "monocytes", _MONO),
    ("S100A8", "monocytes", _MONO),
    ("FCGR3A", "NK cells / CD16+ monocytes", _NK),
    ("NKG7", "NK cells", _NK),
    ("GNLY", "NK cells", _NK),
    ("FCER1A", "dendritic cells", _DC),
    ("CST3", "dendritic cells", _DC),
    ("CD34", "progenitors", r"cd34|progenitor|hsc"),
    ("PPBP", "platelets", r"platelet|megakaryocyte|\bmk\b"),
)


def match_types(pattern: str, cell_types: Iterable[str]) -> list[str]:
    """The cell-type labels that ``pattern`` matches (case-insensitive regex search)."""
    rx = re.compile(pattern, re.IGNORECASE)
    return [t for t in cell_types if rx.search(str(t))]


def marker_table(cell_types: Iterable[str], genes: Iterable[str]) -> pd.DataFrame:
    """One row per canonical marker: whether its gene and its cell types are in the data.

    Parameters
    ----------
    cell_types
        The cell-type labels present in the data.
    genes
        The gene symbols the model can read (the vocabulary restricted to the data).

    Returns
    -------
    DataFrame with ``gene``, ``marks``, ``cell_types`` (``"; "``-joined matching labels),
    ``gene_in_data``, ``type_in_data`` and ``testable`` (both).
    """
    types = list(dict.fromkeys(str(t) for t in cell_types))
    gene_set = {str(g).upper() for g in genes}
    rows = []
    for gene, marks, pattern in CANONICAL_MARKERS:
        hit = match_types(pattern, types)
        rows.append({
            "gene": gene, "marks": marks, "cell_types": "; ".join(hit), "gene_in_data": gene.upper() in gene_set,
            "type_in_data": bool(hit),
        })
    df = pd.DataFrame(rows)
    df["testable"] = df["gene_in_data"] & df["type_in_data"]
    return df


def wilcoxon_markers(X: Any, labels: Sequence[str] | np.ndarray, genes: Sequence[str], n: int) -> dict[str, list[str]]:
    """Top ``n`` markers per label by scanpy's one-vs-rest Wilcoxon rank-sum test.

    Parameters
    ----------
    X
        ``(n_cells, n_genes)`` log-normalised expression (sparse or dense).
    labels
        The cell type of each cell.
    genes
        Column names of ``X``.
    n
        Markers kept per type (at most ``len(genes)``).
    """
    import anndata as ad
    import scanpy as sc

    lab = [str(t) for t in labels]
    a = ad.AnnData(X=X, obs=pd.DataFrame({"cell_type": pd.Categorical(lab)}, index=[f"c{i}" for i in range(len(lab))]),
                   var=pd.DataFrame(index=[str(g) for g in genes]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc.tl.rank_genes_groups(a, "cell_type", method="wilcoxon", n_genes=min(int(n), a.n_vars), use_raw=False)
    names = a.uns["rank_genes_groups"]["names"]
    return {t: [str(g) for g in names[t]] for t in names.dtype.names}
