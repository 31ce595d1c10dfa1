"""Single-cell data for the immunology adapter: read, check, detect the input type, filter.

``"pbmc68k_reduced"`` (the default) is the file scanpy ships (``scanpy/datasets/10x_pbmc68k_reduced.h5ad``):
700 PBMCs x 765 genes. Its ``.X`` is z-scored (unusable for ranking); its ``.raw`` holds
``log1p(counts / n_counts * 1e4)`` of the same genes (checked: every cell's ``expm1`` values are
integer multiples of ``1e4 / n_counts`` to within the file's 3-decimal rounding), so the default
reads ``.raw`` as log-normalised data. Labels are ``obs['bulk_labels']`` (10 types assigned by
correlation with FACS-sorted reference profiles). Any other source is a path to a user ``.h5ad``.
Every problem with a user file is a :class:`~sciscope.core.errors.ConfigError` naming it.
"""

from __future__ import annotations

import importlib.util
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from sciscope.core.errors import ConfigError

__all__ = ["BUNDLED", "CellData", "INPUT_TYPES", "bundled_path", "detect_input_type", "gene_nonzero_medians", "load_cells",
           "log_expression", "normalised_expression", "read_h5ad", "source_path", "stratified_split"]

BUNDLED = "pbmc68k_reduced"
INPUT_TYPES = ("auto", "counts", "lognorm", "normalized")
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
_CELL_TYPE_CANDIDATES = ("cell_type", "celltype", "cell_types", "bulk_labels", "labels", "cell_label", "annotation")
#: log1p of the largest plausible normalised value: larger non-integer data is not log-scaled
_MAX_LOG_VALUE = 25.0


@dataclass
class CellData:
    """Cells x genes after checks and filters: ``X`` ``(n_cells, n_genes)`` csr float32 as read (>= 0),
    unique gene identifiers, ``obs`` (``cell_id``, ``cell_type``, the file's columns), the detected
    ``input_type`` and ``notes`` (source, matrix, how the type was decided, filter counts)."""

    X: sp.csr_matrix
    genes: list[str]
    obs: pd.DataFrame
    input_type: str
    notes: dict[str, Any] = field(default_factory=dict)


def read_h5ad(path: str | Path) -> Any:
    """Read an ``.h5ad`` file with anndata; a :class:`ConfigError` when it is not one (the HDF5
    signature is checked first, so a CSV or a truncated download is named, not an h5py traceback)."""
    import anndata as ad

    p = Path(str(path)).expanduser()
    if not p.exists():
        raise ConfigError(f"immunology: data file {str(p)!r} does not exist (config 'source')")
    if p.is_dir():
        raise ConfigError(f"immunology: data source {str(p)!r} is a directory, not an .h5ad file (config 'source')")
    with open(p, "rb") as f:
        head = f.read(len(_HDF5_MAGIC))
    if head != _HDF5_MAGIC:
        raise ConfigError(f"immunology: {str(p)!r} is not an h5ad file (no HDF5 signature; starts with {head[:8]!r}); "
                          "save AnnData objects with adata.write_h5ad(path)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # old-format notices of anndata
            return ad.read_h5ad(p)
    except Exception as e:  # h5py/anndata raise many kinds for a broken or foreign HDF5 file
        raise ConfigError(f"immunology: {str(p)!r} is an HDF5 file but not a readable h5ad: {type(e).__name__}: {e}") from None


def _select_matrix(adata: Any, matrix: str) -> tuple[Any, list[str], pd.DataFrame, str]:
    """(matrix, gene names, var table, description) for config ``matrix``."""
    if matrix == "auto":
        matrix = "counts" if "counts" in adata.layers else "raw" if adata.raw is not None else "X"
    if matrix == "X":
        return adata.X, list(adata.var_names), adata.var, ".X"
    if matrix == "raw":
        if adata.raw is None:
            raise ConfigError("immunology: config matrix='raw' but the file has no .raw; use matrix=X or a layer name")
        return adata.raw.X, list(adata.raw.var_names), adata.raw.var, ".raw.X"
    if matrix in adata.layers:
        return adata.layers[matrix], list(adata.var_names), adata.var, f".layers[{matrix!r}]"
    raise ConfigError(f"immunology: config matrix={matrix!r} is not 'auto', 'X', 'raw' or a layer of the file; "
                      f"layers: {list(adata.layers) or 'none'}")


def _check_values(X: sp.csr_matrix, genes: list[str], cells: pd.Index, where: str) -> None:
    """NaN, inf and negative values are errors naming the first offending cell and gene."""
    data = X.data
    for what, bad in (("NaN", np.isnan(data)), ("infinite", np.isinf(data)), ("negative", data < 0)):
        n_bad = int(bad.sum())
        if n_bad:
            k = int(np.flatnonzero(bad)[0])
            row = int(np.searchsorted(X.indptr, k, side="right") - 1)
            col = int(X.indices[k])
            hint = " (z-scored data, e.g. after sc.pp.scale? give counts or log-normalised values)" if what == "negative" else ""
            raise ConfigError(f"immunology: {where} holds {n_bad} {what} value(s); first at cell {str(cells[row])!r}, "
                              f"gene {genes[col]!r} ({float(data[k])!r}){hint}")


def detect_input_type(X: sp.csr_matrix, declared: str = "auto") -> tuple[str, str]:
    """Decide whether non-negative expression is raw counts, log-normalised or normalised.

    On the stored non-zero values: all integers -> ``"counts"``; else a maximum <= 25 (``log1p`` of
    7e10) -> ``"lognorm"``; else ``"normalized"``. A declared type other than ``"auto"`` is kept, but
    a declared ``"counts"`` with non-integer values is an error (it would be ranked wrongly).

    Returns
    -------
    (input_type, reason)
    """
    if declared not in INPUT_TYPES:
        raise ConfigError(f"immunology: config 'input_type' must be one of {list(INPUT_TYPES)}, got {declared!r}")
    data = X.data
    if data.size == 0:
        raise ConfigError("immunology: the expression matrix has no non-zero value")
    integer = bool(np.all(data == np.round(data)))
    vmax = float(data.max())
    if declared == "counts" and not integer:
        raise ConfigError(f"immunology: config input_type='counts' but the matrix holds non-integer values (max {vmax:.4g})")
    if declared != "auto":
        return declared, "declared (config input_type)"
    if integer:
        return "counts", f"every value is an integer (max {vmax:.0f})"
    if vmax <= _MAX_LOG_VALUE:
        return "lognorm", f"non-integer values with max {vmax:.3g} <= {_MAX_LOG_VALUE:g} (log1p scale)"
    return "normalized", f"non-integer values with max {vmax:.4g} > {_MAX_LOG_VALUE:g} (normalised, not logged)"


def normalised_expression(X: sp.csr_matrix, input_type: str, target_sum: float = 1e4) -> sp.csr_matrix:
    """Per-cell normalised expression on a linear scale (what rank-value encoding ranks): counts
    scaled to ``target_sum`` per cell (as Geneformer), log-normalised values ``expm1``'d back."""
    X = sp.csr_matrix(X, dtype=np.float64, copy=True)
    if input_type == "counts":
        totals = np.asarray(X.sum(1)).ravel()
        scale = np.divide(target_sum, totals, out=np.zeros_like(totals), where=totals > 0)
        X = sp.csr_matrix(sp.diags(scale) @ X)
    elif input_type == "lognorm":
        X.data = np.expm1(X.data)
    return X


def log_expression(X: sp.csr_matrix, input_type: str) -> sp.csr_matrix:
    """``log1p`` of normalised expression: the matrix PCA baselines and marker tests read (float32)."""
    if input_type == "lognorm":
        return sp.csr_matrix(X, dtype=np.float32, copy=True)
    Y = normalised_expression(X, input_type)
    Y.data = np.log1p(Y.data)
    return sp.csr_matrix(Y, dtype=np.float32)


def gene_nonzero_medians(X_norm: sp.csr_matrix) -> np.ndarray:
    """Median of each gene's non-zero normalised values over cells (Geneformer's normaliser); NaN if never expressed."""
    C = sp.csc_matrix(X_norm)
    out = np.full(C.shape[1], np.nan)
    for j in range(C.shape[1]):
        v = C.data[C.indptr[j]:C.indptr[j + 1]]
        v = v[v > 0]
        if v.size:
            out[j] = float(np.median(v))
    return out


def stratified_split(labels: pd.Series, test_fraction: float, seed: int) -> np.ndarray:
    """``"train"``/``"test"`` per cell, stratified by label (each type keeps >= 1 training cell)."""
    rng = np.random.default_rng([int(seed), 0x1337])
    split = np.full(len(labels), "train", dtype=object)
    for _, idx in pd.Series(np.arange(len(labels))).groupby(labels.to_numpy()):
        idx = idx.to_numpy()
        n_test = min(int(round(test_fraction * idx.size)), idx.size - 1)
        if n_test > 0:
            split[rng.choice(idx, n_test, replace=False)] = "test"
    return split


def _repeated(ids: pd.Index) -> dict[str, int]:
    """``{id: extra occurrences}`` of every id that occurs more than once, in first-seen order."""
    counts = pd.Series(ids.astype(str)).value_counts(sort=False)
    return {str(k): int(v) - 1 for k, v in counts[counts > 1].items()}


def _find_cell_type_column(obs: pd.DataFrame, column: str, source: str) -> str:
    if column and column not in obs.columns:
        raise ConfigError(f"immunology: config cell_type_column={column!r} is not an obs column of {source}; "
                          f"obs columns: {list(obs.columns)}")
    found = column or next((c for c in _CELL_TYPE_CANDIDATES if c in obs.columns), None)
    if found:
        return found
    raise ConfigError(f"immunology: cannot tell which obs column of {source} holds cell types; set config cell_type_column "
                      f"to one of {list(obs.columns)}")


def bundled_path() -> Path | None:
    """Where scanpy's bundled ``pbmc68k_reduced`` file sits in the installed package (None without scanpy)."""
    spec = importlib.util.find_spec("scanpy")
    return Path(spec.origin).parent / "datasets" / "10x_pbmc68k_reduced.h5ad" if spec and spec.origin else None


def source_path(source: str) -> Path | None:
    """The ``.h5ad`` file of config ``source``: the bundled file or the user's path (None when absent)."""
    path = bundled_path() if source == BUNDLED else Path(str(source)).expanduser()
    return path if path is not None and path.is_file() else None


def load_cells(source: str = BUNDLED, *, matrix: str = "auto", input_type: str = "auto", gene_column: str = "",
               cell_type_column: str = "", library_size_column: str = "n_counts", min_genes: int = 10,
               min_cells_per_type: int = 5, n_cells: int = 0, seed: int = 0) -> CellData:
    """Read, check and filter cells; detect raw counts vs log-normalised input.

    Repeated cell ids (``obs_names``) and gene ids get anndata's ``-1``, ``-2`` suffixes (the first
    keeps its name), counted in ``notes`` (``n_cell_ids_renamed``, ``n_duplicate_genes``) with examples.

    Parameters
    ----------
    source, matrix, input_type, gene_column, cell_type_column, min_genes, min_cells_per_type, n_cells, seed
        As the adapter's config keys of the same names (see their help).
    library_size_column
        ``obs`` column of total counts per cell; "" or missing: computed from counts, or NaN for
        normalised input, where it cannot be recovered in general.

    Raises
    ------
    ConfigError
        Bad path or file, missing column, NaN/inf/negative values, no cells left after filtering.
    """
    if source == BUNDLED:  # the file inside the installed scanpy package (no download)
        path = bundled_path()
        if path is None or not path.is_file():
            raise ConfigError(f"immunology: source 'pbmc68k_reduced' needs scanpy's bundled dataset (pip install "
                              f"'sciscope[immunology]'); not found at {path}")
        adata = read_h5ad(path)
        src = "scanpy's bundled pbmc68k_reduced (10x PBMC 68k, 700-cell subsample)"
        if not cell_type_column:
            cell_type_column = "bulk_labels"
    else:
        adata = read_h5ad(source)
        src = f"{Path(source).name}"
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise ConfigError(f"immunology: {src} is empty ({adata.n_obs} cells x {adata.n_vars} genes)")
    # cells are looked up by id later (expression of probe/steering cells): a repeated id (scanpy's
    # krumsiek11 has 160 ids for 640 cells) would return several rows for one cell, so repeats get
    # anndata's "-1", "-2" suffixes here, before any training, and are counted in the notes
    cell_repeats = _repeated(adata.obs_names)
    if cell_repeats:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # anndata's notice that it renames
            adata.obs_names_make_unique()
    X, genes, var, where = _select_matrix(adata, matrix)
    if gene_column:
        if gene_column not in var.columns:
            raise ConfigError(f"immunology: config gene_column={gene_column!r} is not a var column of {src} ({where}); "
                              f"var columns: {list(var.columns)}")
        genes = [str(g) for g in var[gene_column]]
    genes = [str(g) for g in genes]
    X = sp.csr_matrix(X, dtype=np.float32)
    X.eliminate_zeros()
    _check_values(X, genes, adata.obs_names, f"{src} {where}")
    kind, reason = detect_input_type(X, input_type)

    # repeated gene identifiers (e.g. symbols shared by two Ensembl ids) are tokens of their own:
    # made unique like cell ids (the first keeps its name), so no gene's column is lost
    gene_repeats = _repeated(pd.Index(genes))
    if gene_repeats:
        from anndata.utils import make_index_unique

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            genes = [str(g) for g in make_index_unique(pd.Index(genes))]

    cell_col = _find_cell_type_column(adata.obs, cell_type_column, src)
    obs = adata.obs.copy()
    obs.insert(0, "cell_id", obs.index.astype(str))
    obs["cell_type"] = obs[cell_col].astype(str).to_numpy()
    unlabelled = obs[cell_col].isna().to_numpy()
    n_genes = np.diff(X.indptr)
    obs["n_genes_detected"] = n_genes.astype(np.int64)
    if library_size_column and library_size_column in obs.columns:
        lib = pd.to_numeric(obs[library_size_column], errors="coerce").to_numpy(dtype=np.float64)
        lib_note = f"obs[{library_size_column!r}]"
    elif kind == "counts":
        lib = np.asarray(X.sum(1)).ravel().astype(np.float64)
        lib_note = "total counts of the matrix"
    else:
        lib = np.full(X.shape[0], np.nan)
        lib_note = "not available (normalised input without a library-size column)"
    with np.errstate(divide="ignore", invalid="ignore"):
        obs["log10_library_size"] = np.where(lib > 0, np.log10(lib), np.nan)

    n_in = X.shape[0]
    keep = (n_genes >= min_genes) & ~unlabelled
    n_low = int(((n_genes < min_genes) & ~unlabelled).sum())
    counts = obs.loc[keep, "cell_type"].value_counts()
    rare = sorted(counts[counts < min_cells_per_type].index)
    keep &= ~obs["cell_type"].isin(rare).to_numpy()
    if not keep.any():
        raise ConfigError(
            f"immunology: no cells left after filtering {src}: {n_in} cells, {n_low} with fewer than "
            f"min_genes={min_genes} expressed genes, {int(unlabelled.sum())} without a label in {cell_col!r}, "
            f"cell types with fewer than min_cells_per_type={min_cells_per_type} cells dropped: {rare or 'none'}"
        )
    idx = np.flatnonzero(keep)
    n_filtered = int(n_in - idx.size)
    subsample = bool(n_cells and idx.size > n_cells)
    if subsample:
        # stratified by type: every kept type keeps its share (at least min_cells_per_type cells)
        rng = np.random.default_rng([int(seed), 0xCE11])
        types = obs["cell_type"].to_numpy()[idx]
        chosen = []
        for t in sorted(set(types)):
            members = idx[types == t]
            k = max(min(min_cells_per_type, members.size), int(round(n_cells * members.size / idx.size)))
            chosen.append(rng.choice(members, min(k, members.size), replace=False))
        idx = np.sort(np.concatenate(chosen))
    X = X[idx]
    obs = obs.iloc[idx].reset_index(drop=True)
    # genes expressed in no kept cell can never be ranked
    expressed = np.asarray((X > 0).sum(0)).ravel() > 0
    n_unexpressed = int((~expressed).sum())
    obs["cell_type"] = pd.Categorical(obs["cell_type"], categories=sorted(obs["cell_type"].unique()))
    notes = {
        "source": src, "matrix": where, "input_type": kind, "input_type_reason": reason,
        "cell_type_column": cell_col, "library_size": lib_note, "n_cells_in_file": int(n_in),
        "n_cells_low_genes": n_low, "n_cells_unlabelled": int(unlabelled.sum()), "rare_types_dropped": rare,
        "n_cells": int(X.shape[0]), "n_cells_filtered": n_filtered, "n_cells_subsample": int(n_cells) if subsample else 0,
        "n_genes": len(genes), "n_duplicate_genes": sum(gene_repeats.values()), "repeated_genes": list(gene_repeats)[:5],
        "n_cell_ids_renamed": sum(cell_repeats.values()), "repeated_cell_ids": list(cell_repeats)[:5],
        "n_genes_unexpressed": n_unexpressed, "min_genes": min_genes, "min_cells_per_type": min_cells_per_type,
    }
    return CellData(X=X, genes=genes, obs=obs, input_type=kind, notes=notes)
