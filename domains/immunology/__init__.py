"""Immunology domain: a single-cell transcriptomics foundation model (Geneformer-style).

:class:`ImmunologyAdapter` (registered as ``immunology``) reads scanpy's bundled
``pbmc68k_reduced`` or a user ``.h5ad`` (raw counts or log-normalised, detected), encodes each
cell as its genes ranked by median-normalised expression, trains a small BERT masked-gene model
with PyTorch Lightning (or loads a local Geneformer-style checkpoint with a JSON token
dictionary), and supplies cell-type and technical probe targets with a PCA baseline, SAE
feature analyses against cell types and marker genes, steering between cell types, and the
results as an AnnData (``.h5ad``).
"""

from .adapter import ImmunologyAdapter
from .data import CellData, detect_input_type, load_cells, read_h5ad
from .features import gene_drivers, marker_recovery, results_anndata, token_shares, write_h5ad
from .markers import CANONICAL_MARKERS, marker_table
from .model import ModelSpec, load_checkpoint, masked_gene_accuracy, train_model
from .tokenize import GeneVocab, collate, rank_value_encode

__all__ = ["CANONICAL_MARKERS", "CellData", "GeneVocab", "ImmunologyAdapter", "ModelSpec", "collate", "detect_input_type",
           "gene_drivers", "load_cells", "load_checkpoint", "marker_recovery", "marker_table", "masked_gene_accuracy",
           "rank_value_encode", "read_h5ad", "results_anndata", "token_shares", "train_model", "write_h5ad"]
