"""Immunology domain: a Geneformer-style single-cell foundation model (:class:`ImmunologyAdapter`,
registered as ``immunology``; see :mod:`.adapter` for what it reads, trains and declares)."""

from .adapter import ImmunologyAdapter
from .data import detect_input_type, load_cells, read_h5ad
from .features import gene_drivers, marker_recovery, results_anndata, token_shares, write_h5ad
from .markers import marker_table
from .tokenize import GeneVocab, collate, rank_value_encode

__all__ = ["GeneVocab", "ImmunologyAdapter", "collate", "detect_input_type", "gene_drivers", "load_cells", "marker_recovery",
           "marker_table", "rank_value_encode", "read_h5ad", "results_anndata", "token_shares", "write_h5ad"]
