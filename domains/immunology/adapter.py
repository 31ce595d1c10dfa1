"""The immunology adapter: a single-cell transcriptomics foundation model, opened up.

Follows Geneformer (rank-value gene tokens, BERT masked-gene pretraining; cell embedding = mean of
gene embeddings) and the SAE studies of single-cell models (EVA; TopK SAEs on Geneformer/scGPT
layers, features that carry biology *and* technical signal), at laptop scale: a 4-layer BERT
masked-gene model is trained here on scanpy's bundled ``pbmc68k_reduced`` (or any user
``.h5ad``) in a few minutes on a CPU; a local Geneformer-style checkpoint with a JSON token
dictionary can be given instead (config ``model``).

Analyses and their controls:

* per-layer cell-type probes (logistic, stratified 5-fold; macro-F1) beside a shuffled-label
  control and a PCA-50 + logistic-regression baseline on the log-normalised expression;
  a technical covariate, log10 library size (and genes detected), probed the same way;
* SAE features against every cell type (one-vs-rest AUROC, BH-FDR, with shuffled labels), and
  against genes: each gene token's exact share of a feature's encoder pre-activation (the cell
  embedding is a mean over gene positions and the encoder is affine, so the shares add up to the
  cell's pre-activation); recovery of canonical markers (CD3E, MS4A1, NKG7, ...) by the driver
  genes of cell-type-specific features, beside random genes in the markers' place;
* a delta vector between two cell types (default CD14+ monocytes -> CD19+ B cells) injected at a
  middle layer: the masked-gene predictions' probability mass on the target type's markers and a
  read-out probe's predicted type, per alpha, against random directions of the same norm;
* results back into AnnData: cell embeddings of every layer and SAE activations in ``.obsm``, the
  feature tables in ``.uns`` and the gene x feature driver matrix in ``.varm``
  (``features/cells.h5ad``), with UMAPs of embeddings and feature activations in the report.
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch
from torch import nn

from sciscope.core.adapter import DomainAdapter, Examples
from sciscope.core.errors import AdapterError, ConfigError, ShapeError
from sciscope.core.io import atomic_path, write_table, write_text
from sciscope.core.plotting import save_training_history

from . import data as _data
from .markers import marker_table, match_types
from .model import (
    ModelSpec,
    find_layer_stack,
    load_checkpoint,
    masked_gene_accuracy,
    save_trained,
    train_model,
)
from .tokenize import GeneVocab, collate, rank_value_encode

__all__ = ["ImmunologyAdapter", "token_shares", "write_h5ad"]

#: Trained default models kept in memory when the adapter has no run folder (tests, notebooks).
_MEMORY_CACHE: dict[str, tuple[nn.Module, GeneVocab, dict[str, Any]]] = {}
DEFAULT_PROBE_TARGETS = ("cell_type", "log10_library_size", "n_genes_detected")
TECHNICAL = ("log10_library_size", "n_genes_detected", "percent_mito")


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", str(text).lower()).strip("_") or "x"


def _key(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class ImmunologyAdapter(DomainAdapter):
    """Cells read by a masked-gene transformer: cell-type probes, SAE features vs cell types and
    marker genes, steering between cell states.

    Examples
    --------
    >>> ad = ImmunologyAdapter({"train_steps": 300})                 # doctest: +SKIP
    >>> ex = ad.examples("all"); model = ad.model()                   # doctest: +SKIP
    >>> store = collect(model, ad.batches(ex, model), ad.sites, out="acts", obs=ex.obs,
    ...                 pooling=ad.pooling, aliases=ad.aliases)        # doctest: +SKIP
    """

    name = "immunology"
    description = ("Single-cell transcriptomics with a rank-value masked-gene BERT: cell-type probes, "
                   "SAE features vs cell types and marker genes, steering between cell states")
    default_config: ClassVar[dict[str, Any]] = {
        # data
        "source": _data.BUNDLED,  # "pbmc68k_reduced" (bundled with scanpy) or a path to an .h5ad file
        "matrix": "auto",  # auto (a 'counts' layer, else .raw, else .X) | X | raw | a layer name
        "input_type": "auto",  # auto (detected) | counts | lognorm | normalized
        "gene_column": "",  # var column with gene ids ("" = var_names), e.g. Ensembl ids for Geneformer
        "cell_type_column": "",  # obs column of labels ("" = bulk_labels / cell_type / celltype ...)
        "library_size_column": "n_counts",  # obs column of total counts ("" = from counts when possible)
        "min_genes": 10,  # cells with fewer expressed genes are dropped
        "min_cells_per_type": 5,  # rarer cell types are dropped (cross-validation needs several per class)
        "n_cells": 0,  # seeded, type-stratified subsample (0 = every cell)
        "test_fraction": 0.2,  # held-out cells: the model and the SAE never train on them
        "seed": 0,
        # tokenizer and model
        "max_genes": 64,  # top-N genes per cell (rank-value encoding); Geneformer uses 2048
        "model": "",  # "" = train the default here; else a local HF directory with a gene vocabulary
        "n_layers": 4,
        "hidden": 64,
        "n_heads": 4,
        "train_steps": 1200,
        "train_batch_size": 32,
        "lr": 2e-3,
        "mask_prob": 0.15,
        # analyses
        "probe_targets": [],  # [] = cell_type, log10_library_size, n_genes_detected
        "gene_baseline": True,  # also probe the log-expression of the 2,000 most variable genes (beside PCA-50)
        "sae_layer": None,  # None = the penultimate layer (Geneformer's layer for cell embeddings)
        "steer_layer": None,  # None = the middle layer
        "readout_layer": None,  # the steering read-out probe's layer; None = the last layer
        "steer_pairs": [],  # "source>target" cell types; [] = CD14+ monocytes > B cells (or the two largest types)
        "n_markers": 10,  # data-driven markers per type (Wilcoxon) scored under steering
        "steer_max_cells": 64,  # source cells scored per steering evaluation
        "specific_auroc": 0.9,  # a feature is cell-type-specific at this one-vs-rest AUROC (and q < 0.05)
        "technical_rho": 0.3,  # a feature tracks a technical covariate at this |Spearman rho| (and q < 0.05)
        "top_genes": 10,  # driver genes listed per feature (marker recovery looks here)
        "n_umap_features": 6,  # features drawn on the UMAP
    }
    #: Overrides for ``sciscope run immunology --profile NAME``.
    profiles: ClassVar[dict[str, dict[str, Any]]] = {
        # within 15 minutes on 2 CPU cores (measured stage times are in the report)
        "quick": {"train_steps": 1200, "sae_steps": 1500, "sae_batch_size": 128, "sae_expansion": 4, "sae_k": 16,
                  "steer_n_random": 3, "steer_alphas": [-2.0, -1.0, -0.5, 0.5, 1.0, 2.0]},
        "full": {"max_genes": 256, "hidden": 128, "n_layers": 6, "n_heads": 8, "train_steps": 6000, "lr": 1e-3,
                 "sae_steps": 4000, "sae_batch_size": 128, "sae_expansion": 4, "sae_k": 16, "steer_n_random": 5, "steer_max_cells": 200},
    }
    #: The first pipeline stage each key affects (unlisted keys: "examples").
    config_stages: ClassVar[dict[str, str]] = {
        "model": "model", "n_layers": "model", "hidden": "model", "n_heads": "model", "train_steps": "model",
        "train_batch_size": "model", "lr": "model", "mask_prob": "model",
        "probe_targets": "probes", "gene_baseline": "probes", "sae_layer": "sae",
        "specific_auroc": "features", "technical_rho": "features", "top_genes": "features", "n_umap_features": "features",
        "steer_layer": "steering", "readout_layer": "steering", "steer_pairs": "steering", "n_markers": "steering",
        "steer_max_cells": "steering",
    }
    #: Tiny config for the conformance test and unit tests (trains in a few seconds).
    test_config: ClassVar[dict[str, Any]] = {
        "n_cells": 200, "max_genes": 24, "n_layers": 2, "hidden": 32, "n_heads": 2, "train_steps": 30,
        "train_batch_size": 16, "steer_max_cells": 16,
    }

    def __init__(self, config: Mapping[str, Any] | None = None) -> None:
        super().__init__(config)
        self._check_config()
        self.run_dir: Path | None = None  # set by the pipeline: the default model is kept under <run>/model
        self.vocab: GeneVocab | None = None  # the loaded model's vocabulary
        self.training_info: dict[str, Any] = {}
        self._cells: _data.CellData | None = None
        self._table: tuple[pd.DataFrame, list[list[str]], dict[str, Any]] | None = None
        self._stack: tuple[str, int] | None = None
        self._markers: dict[int, dict[str, list[str]]] = {}
        self._results: dict[str, Any] = {}

    # -- configuration ----------------------------------------------------------------------------
    def _check_config(self) -> None:
        c = self.config
        for key, lo in (("min_genes", 1), ("min_cells_per_type", 1), ("n_cells", 0), ("max_genes", 2), ("n_layers", 1),
                        ("hidden", 8), ("n_heads", 1), ("train_steps", 1), ("train_batch_size", 1), ("n_markers", 1),
                        ("steer_max_cells", 1), ("top_genes", 1), ("n_umap_features", 0)):
            if c[key] < lo:
                raise ConfigError(f"immunology: config {key!r} must be >= {lo}, got {c[key]!r}")
        if c["hidden"] % c["n_heads"]:
            raise ConfigError(f"immunology: config 'hidden' ({c['hidden']}) must be a multiple of 'n_heads' ({c['n_heads']})")
        for key in ("test_fraction", "mask_prob"):
            if not 0.0 < c[key] < 1.0:
                raise ConfigError(f"immunology: config {key!r} must lie in (0, 1), got {c[key]!r}")
        for key in ("specific_auroc", "technical_rho"):
            if not 0.0 < c[key] <= 1.0:
                raise ConfigError(f"immunology: config {key!r} must lie in (0, 1], got {c[key]!r}")
        if c["lr"] <= 0:
            raise ConfigError(f"immunology: config 'lr' must be > 0, got {c['lr']!r}")
        if c["input_type"] not in _data.INPUT_TYPES:
            raise ConfigError(f"immunology: config 'input_type' must be one of {list(_data.INPUT_TYPES)}, got {c['input_type']!r}")
        for pair in c["steer_pairs"]:
            if str(pair).count(">") != 1 or not all(s.strip() for s in str(pair).split(">")):
                raise ConfigError(f"immunology: config 'steer_pairs' entry {pair!r} must read 'source type>target type'")
        for key in ("sae_layer", "steer_layer", "readout_layer"):
            v = c[key]
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, str))):
                raise ConfigError(f"immunology: config {key!r} expects a layer index or 'layer.N', got {v!r}")
        if c["model"]:
            GeneVocab.load(_model_dir(c["model"]))  # fail early: not a model directory, no vocabulary

    # -- data ---------------------------------------------------------------------------------------
    @property
    def cells(self) -> _data.CellData:
        """The checked, filtered cells of the configured source (read once)."""
        if self._cells is None:
            c = self.config
            self._cells = _data.load_cells(
                c["source"], matrix=c["matrix"], input_type=c["input_type"], gene_column=c["gene_column"],
                cell_type_column=c["cell_type_column"], library_size_column=c["library_size_column"],
                min_genes=c["min_genes"], min_cells_per_type=c["min_cells_per_type"], n_cells=c["n_cells"], seed=c["seed"],
            )
        return self._cells

    @property
    def vocabulary(self) -> GeneVocab:
        """The model's gene vocabulary: the checkpoint's, or one built from this data's genes."""
        if self.vocab is None:
            if self.config["model"]:
                self.vocab = GeneVocab.load(_model_dir(self.config["model"]))
            else:
                cd = self.cells
                med = _data.gene_nonzero_medians(_data.normalised_expression(cd.X, cd.input_type))
                self.vocab = GeneVocab.build(cd.genes, med, max_genes=self.config["max_genes"])
        return self.vocab

    def _prepare(self) -> tuple[pd.DataFrame, list[list[str]], dict[str, Any]]:
        """obs table, ranked gene lists and data notes (built once).

        Genes unknown to the vocabulary are dropped before ranking (as Geneformer does), counted
        and listed; cells left without a known gene are dropped and counted.
        """
        if self._table is not None:
            return self._table
        cd, vocab = self.cells, self.vocabulary
        c = self.config
        known = np.array([g in vocab.ids for g in cd.genes])
        unknown = [g for g, k in zip(cd.genes, known) if not k]
        if not known.any():
            raise ConfigError(
                f"immunology: none of the {len(cd.genes)} genes of the data is in the model's vocabulary "
                f"({vocab.vocab_size} tokens, e.g. {vocab.genes[:3]}); data genes look like {cd.genes[:3]}: "
                "set config gene_column to the var column holding the vocabulary's identifiers"
            )
        X_norm = _data.normalised_expression(cd.X, cd.input_type)
        data_medians = _data.gene_nonzero_medians(X_norm)
        if self.config["model"] and vocab.medians:
            medians = np.array([vocab.medians.get(g, np.nan) for g in cd.genes])
            n_no_median = int((known & ~np.isfinite(medians)).sum())
            # a known gene without a corpus median falls back to the data's median (counted)
            medians = np.where(known & ~np.isfinite(medians), data_medians, medians)
            median_note = "the model's corpus medians" + (f" ({n_no_median} genes fall back to this data's)" if n_no_median else "")
        else:
            medians = data_medians
            median_note = "this data's non-zero gene medians" + (
                "" if not self.config["model"] else " (the checkpoint ships no gene_median_dictionary.json)")
        medians = np.where(known, medians, np.nan)
        max_genes = min(c["max_genes"], vocab.max_genes)
        ranked = rank_value_encode(X_norm, cd.genes, medians, max_genes=max_genes)
        n_tok = np.array([len(r) for r in ranked])
        keep = n_tok > 0
        obs = cd.obs.copy()
        obs["n_tokens"] = n_tok
        obs["split"] = _data.stratified_split(obs["cell_type"].astype(str), c["test_fraction"], c["seed"])
        if not keep.all():
            obs = obs[keep].reset_index(drop=True)
            ranked = [r for r, k in zip(ranked, keep) if k]
        if obs.empty:
            raise ConfigError("immunology: no cells left after filtering: no cell expresses a gene known to the vocabulary")
        obs["cell_type"] = obs["cell_type"].cat.remove_unused_categories()
        notes = dict(cd.notes)
        notes.update({
            "n_genes_known": int(known.sum()), "n_genes_unknown": len(unknown), "unknown_genes": unknown,
            "n_cells_no_known_gene": int((~keep).sum()), "median_source": median_note, "max_genes": max_genes,
            "vocabulary": vocab.source, "n_cells_final": int(len(obs)),
            "n_cells_filtered": int(cd.notes["n_cells_filtered"] + (~keep).sum()),
        })
        self._table = (obs, ranked, notes)
        return self._table

    @property
    def readable_genes(self) -> list[str]:
        """Genes of the data that the model can read (in its vocabulary)."""
        ids = self.vocabulary.ids
        return [g for g in self.cells.genes if g in ids]

    @property
    def obs(self) -> pd.DataFrame:
        """One row per kept cell: ids, cell type, technical covariates, split, the file's columns."""
        return self._prepare()[0]

    @property
    def data_notes(self) -> dict[str, Any]:
        """What was detected and filtered: input type, matrix, unknown genes, dropped cells."""
        return self._prepare()[2]

    def examples(self, split: str = "train") -> Examples:
        """Cells of one split (``train`` / ``test`` / ``all``); inputs are ranked gene lists."""
        obs, ranked, _ = self._prepare()
        splits = ["all", "test", "train"]
        if split not in splits:
            raise ConfigError(f"immunology: unknown split {split!r}; choose one of {splits}")
        rows = np.arange(len(obs)) if split == "all" else np.flatnonzero(obs["split"].to_numpy() == split)
        sub = obs.iloc[rows].reset_index(drop=True)
        if split == "all" and self.run_dir is not None:
            self._write_data_notes()
        return Examples(obs=sub, inputs=[ranked[i] for i in rows], concepts=self.concepts)

    def _write_data_notes(self) -> None:
        """In a pipeline run: the unknown-gene list and a notes.md saying what was read and detected."""
        if self.run_dir is None or self._results.get("notes_written"):
            return
        self._results["notes_written"] = True
        out = Path(self.run_dir) / "examples"
        n = self.data_notes
        if n["unknown_genes"]:
            write_table(out / "unknown_genes.csv", pd.DataFrame({"gene": n["unknown_genes"]}))
        mt = marker_table(self.obs["cell_type"].cat.categories, self.readable_genes)
        absent = mt[~mt.gene_in_data].gene.tolist()
        no_type = mt[mt.gene_in_data & ~mt.type_in_data].gene.tolist()
        lines = [
            "# Cells", "",
            f"- source: {n['source']}; matrix `{n['matrix']}`",
            f"- input detected as **{n['input_type']}**: {n['input_type_reason']}",
            f"- {n['n_cells_in_file']} cells in the file; {n['n_cells_low_genes']} with fewer than {n['min_genes']} "
            f"expressed genes and {n['n_cells_unlabelled']} without a label dropped; rare types dropped "
            f"(< {n['min_cells_per_type']} cells): {', '.join(n['rare_types_dropped']) or 'none'}; "
            f"{n['n_cells_no_known_gene']} cells without a known gene dropped"
            + (f"; stratified subsample of n_cells={n['n_cells_subsample']}" if n["n_cells_subsample"] else "")
            + f"; **{n['n_cells_final']} cells kept**",
            f"- cell types from obs[`{n['cell_type_column']}`]; library size from {n['library_size']}",
            f"- genes: {n['n_genes']} in the data ({n['n_duplicate_genes']} duplicate ids dropped), "
            f"**{n['n_genes_unknown']} unknown to the vocabulary** ({n['vocabulary']})"
            + (" (listed in `unknown_genes.csv`)" if n["unknown_genes"] else ""),
            f"- rank-value encoding: top {n['max_genes']} genes per cell, normalised by {n['median_source']}",
            f"- canonical markers absent from the data: {', '.join(absent) or 'none'}"
            + (f"; markers whose cell type is absent: {', '.join(no_type)}" if no_type else ""),
            "- splits are stratified by cell type; the model and the SAE train on `train` only",
        ]
        write_text(out / "notes.md", "\n".join(lines) + "\n")

    # -- model --------------------------------------------------------------------------------------
    def model_spec(self) -> ModelSpec:
        c = self.config
        return ModelSpec(n_layers=c["n_layers"], hidden=c["hidden"], n_heads=c["n_heads"], max_genes=self.data_notes["max_genes"],
                         steps=c["train_steps"], batch_size=c["train_batch_size"], lr=c["lr"], mask_prob=c["mask_prob"],
                         seed=c["seed"])

    def model(self, spec: str | None = None) -> nn.Module:
        """The default masked-gene BERT (trained here, or reloaded from the run folder) or a checkpoint.

        Default: ``BertForMaskedLM`` trained on the train-split cells by :func:`.model.train_model`
        and saved under ``<run>/model/checkpoint`` with its vocabulary (reused by every later stage
        while config and data are unchanged); without a run folder it is kept in memory. A
        directory (``spec`` or config ``model``) loads offline with its own gene vocabulary.
        """
        path = self.config["model"] if spec is None else spec
        if path:
            if path != self.config["model"]:
                raise ConfigError("immunology: give a checkpoint through config 'model' (its vocabulary decides the tokens)")
            model, vocab, info = load_checkpoint(_model_dir(path))
            self.vocab, self.training_info = vocab, info
        else:
            model = self._default_model()
        self._stack = find_layer_stack(model)
        return model

    def _train_seqs(self) -> tuple[list[list[int]], list[list[int]]]:
        obs, ranked, _ = self._prepare()
        vocab = self.vocabulary
        train = obs["split"].to_numpy() == "train"
        seqs = [vocab.encode(r) for r in ranked]
        return [s for s, t in zip(seqs, train) if t], [s for s, t in zip(seqs, train) if not t]

    def _default_model(self) -> nn.Module:
        train, _ = self._train_seqs()
        spec = self.model_spec()
        key = _key([asdict(spec), self.vocabulary.tokens, train])
        folder = Path(self.run_dir) / "model" / "checkpoint" if self.run_dir is not None else None
        if folder is not None and (folder / "training.json").is_file():
            model, vocab, info = load_checkpoint(folder)
            if info.get("key") == key:
                self.vocab, self.training_info = vocab, info
                return model
        if folder is None and key in _MEMORY_CACHE:
            model, vocab, info = _MEMORY_CACHE[key]
            self.vocab, self.training_info = vocab, info
            return model
        model, result = train_model(spec, self.vocabulary, train, progress=False, trainer_options=self.trainer_options)
        info = {"key": key, "spec": asdict(spec), **asdict(result)}
        if folder is not None:
            save_trained(folder, model, self.vocabulary, info)
            save_training_history(result.history, folder.parent / "training_loss.png", ylabel="masked-gene loss",
                                  title="masked-gene training (train cells)")
        else:
            _MEMORY_CACHE[key] = (model, self.vocabulary, info)
        self.training_info = info
        return model

    def batches(self, examples: Examples, model: nn.Module, *, batch_size: int = 32) -> Iterator[dict[str, torch.Tensor]]:
        """Token batches: ``input_ids``, ``attention_mask`` and ``position_mask`` (gene tokens)."""
        vocab = self.vocabulary
        seqs = [vocab.encode(list(genes)) for genes in examples.inputs]
        for i in range(0, len(seqs), batch_size):
            yield collate(seqs[i: i + batch_size], vocab)

    # -- sites --------------------------------------------------------------------------------------
    def _structure(self) -> tuple[str, int]:
        """(block-list path, n layers), from the config without training or loading weights."""
        if self._stack is None:
            if not self.config["model"]:
                self._stack = ("bert.encoder.layer", self.config["n_layers"])
            else:
                from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM

                path = _model_dir(self.config["model"])
                cfg = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
                archs = list(getattr(cfg, "architectures", None) or [])
                cls = AutoModelForMaskedLM if any(a.endswith("ForMaskedLM") or a.endswith("ForPreTraining") for a in archs) else AutoModel
                with torch.device("meta"):  # the module tree only
                    self._stack = find_layer_stack(cls.from_config(cfg))
        return self._stack

    @property
    def n_layers(self) -> int:
        return self._structure()[1]

    @property
    def aliases(self) -> dict[str, str]:
        """``layer.{i}`` -> the block list (``bert.encoder.layer.{i}``); ``embeddings`` -> the input embeddings."""
        stack = self._structure()[0]
        base = stack[: -len(".encoder.layer")] if stack.endswith(".encoder.layer") else ""
        out = {"layer.{i}": f"{stack}.{{i}}"}
        if stack.endswith("encoder.layer"):
            out["embeddings"] = f"{base}.embeddings" if base else "embeddings"
        return out

    def layer_site(self, key: str) -> str | None:
        """``layer.N`` of a layer config key (``sae_layer`` ...), None when unset."""
        v = self.config[key]
        if v is None or (isinstance(v, str) and not v.strip()):
            return None
        raw, n = v, self.n_layers
        if isinstance(v, str):
            s = v.strip().removeprefix("layer.")
            try:
                v = int(s)
            except ValueError:
                raise ConfigError(f"immunology: config {key!r} expects a layer index (0..{n - 1}) or 'layer.N', got {raw!r}") from None
        i = int(v) + (n if int(v) < 0 else 0)
        if not 0 <= i < n:
            raise ConfigError(f"immunology: config {key!r} = {raw!r} is out of range: the model has {n} layers (0..{n - 1})")
        return f"layer.{i}"

    @property
    def sites(self) -> list[str]:
        """The input embeddings (gene + rank-position embeddings) and every layer's output."""
        first = ["embeddings"] if "embeddings" in self.aliases else []
        return first + [f"layer.{i}" for i in range(self.n_layers)]

    @property
    def sae_site(self) -> str:
        """``sae_layer``, default the penultimate layer: Geneformer's default for cell embeddings
        (the last layer specialises in the masked-gene objective)."""
        return self.layer_site("sae_layer") or f"layer.{max(0, self.n_layers - 2)}"

    @property
    def steer_site(self) -> str:
        """``steer_layer``, default the middle layer (later layers and the masked-gene head read it)."""
        return self.layer_site("steer_layer") or f"layer.{self.n_layers // 2}"

    @property
    def readout_site(self) -> str:
        """Where the steering read-out probe reads: ``readout_layer`` (default: the last layer)."""
        return self.layer_site("readout_layer") or f"layer.{self.n_layers - 1}"

    @property
    def pooling(self) -> str:
        """Mean over gene tokens (``position_mask``; not ``<cls>``/``<eos>``), Geneformer's cell embedding."""
        return "masked"

    # -- concepts, probes, baselines ------------------------------------------------------------------
    @property
    def concepts(self) -> list[str]:
        """Cell type, the technical covariates, and cell-cycle phase where the file has it."""
        obs = self.obs
        out = ["cell_type"]
        for col in ("log10_library_size", "n_genes_detected", "percent_mito", "phase"):
            if col in obs.columns and obs[col].notna().all() and obs[col].nunique() > 1:
                out.append(col)
        return out

    @property
    def probe_targets(self) -> list[str]:
        """Config ``probe_targets`` or cell type + library size + genes detected (the technical pair)."""
        wanted = list(self.config["probe_targets"]) or list(DEFAULT_PROBE_TARGETS)
        obs = self.obs
        missing = [t for t in wanted if t not in obs.columns]
        if missing:
            raise ConfigError(f"immunology: config 'probe_targets' names {missing}, not obs columns; choose from {list(obs.columns)}")
        return [t for t in wanted if obs[t].notna().all() and obs[t].nunique() > 1]

    def baseline_features(self, examples: Examples) -> dict[str, np.ndarray]:
        """Three bars the model's embeddings are read against, probed through the same folds.

        * ``pca<k>_logexpr``: PCA (50 components) of the log-normalised expression, the standard
          single-cell view (fitted on all cells given, label-free);
        * ``logexpr_genes``: the log-expression of the 2,000 most variable genes (all when fewer;
          config ``gene_baseline``);
        * ``untrained_model``: the same architecture with random weights, same tokens, mean over
          gene tokens at the last layer -- what the rank-value tokens give without any training.
        """
        dense, pcs = self._expression_views(examples.obs)
        out = {f"pca{pcs.shape[1]}_logexpr": pcs}
        if self.config["gene_baseline"]:
            out["logexpr_genes"] = dense
        out["untrained_model"] = self._untrained_embeddings(examples)
        return out

    def _expression_views(self, obs: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """(log-expression of the <= 2,000 most variable genes, its PCA) for the cells of ``obs``."""
        from sklearn.decomposition import PCA

        logx = self._log_expression(obs)
        var = np.asarray(logx.power(2).mean(0)).ravel() - np.asarray(logx.mean(0)).ravel() ** 2
        top = np.sort(np.argsort(-var, kind="stable")[:2000])
        dense = logx[:, top].toarray().astype(np.float64)
        k = max(1, min(50, dense.shape[0] - 1, dense.shape[1]))
        pcs = PCA(n_components=k, random_state=self.config["seed"]).fit_transform(dense)
        return dense.astype(np.float32), pcs.astype(np.float32)

    def _untrained_embeddings(self, examples: Examples) -> np.ndarray:
        """Last-layer cell embeddings (mean over gene tokens) of a randomly initialised model."""
        from sciscope.core.capture import capture, pool

        vocab = self.vocabulary
        if self.config["model"]:
            from transformers import AutoConfig, AutoModelForMaskedLM

            cfg = AutoConfig.from_pretrained(_model_dir(self.config["model"]), local_files_only=True, trust_remote_code=False)
            torch.manual_seed(self.config["seed"])
            model = AutoModelForMaskedLM.from_config(cfg)
        else:
            from .model import build_model

            model = build_model(self.model_spec(), vocab)
        model.eval()
        stack, n = find_layer_stack(model)
        site = f"{stack}.{n - 1}"
        seqs = [vocab.encode(list(g)) for g in examples.inputs]
        rows = []
        with capture(model, [site]) as cap, torch.inference_mode():
            for i in range(0, len(seqs), 64):
                b = collate(seqs[i:i + 64], vocab)
                cap.clear()
                model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
                rows.append(pool(cap.records[site][0], "masked", position_mask=b["position_mask"], site=site)[0].numpy())
        return np.concatenate(rows).astype(np.float32)

    def _log_expression(self, obs: pd.DataFrame) -> Any:
        """``log1p`` normalised expression of the cells of ``obs`` (by ``cell_id``), csr float32."""
        cd = self.cells
        pos = pd.Series(np.arange(len(cd.obs)), index=cd.obs["cell_id"].to_numpy())
        rows = pos.loc[obs["cell_id"].to_numpy()].to_numpy()
        return _data.log_expression(cd.X[rows], cd.input_type)

    def type_markers(self, n: int | None = None) -> dict[str, list[str]]:
        """Top ``n`` data-driven markers per cell type (scanpy Wilcoxon, one vs rest, vocabulary genes).

        Read from the log-normalised expression of every kept cell; used to score steering and
        as context for canonical-marker recovery.
        """
        n = int(n or self.config["n_markers"])
        if n not in self._markers:
            import anndata as ad
            import scanpy as sc

            obs = self.obs
            known = set(self.vocabulary.ids)
            cd = self.cells
            cols = [j for j, g in enumerate(cd.genes) if g in known]
            a = ad.AnnData(X=self._log_expression(obs)[:, cols],
                           obs=pd.DataFrame({"cell_type": obs["cell_type"].to_numpy()}, index=obs["cell_id"].astype(str).to_numpy()),
                           var=pd.DataFrame(index=[cd.genes[j] for j in cols]))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                sc.tl.rank_genes_groups(a, "cell_type", method="wilcoxon", n_genes=min(n, a.n_vars), use_raw=False)
            names = a.uns["rank_genes_groups"]["names"]
            self._markers[n] = {t: [str(g) for g in names[t]] for t in names.dtype.names}
        return self._markers[n]

    # -- contrasts and steering ---------------------------------------------------------------------
    def steer_pairs(self) -> list[tuple[str, str]]:
        """(source, target) cell types to steer between (checked against the data)."""
        types = [str(t) for t in self.obs["cell_type"].cat.categories]
        pairs = []
        for p in self.config["steer_pairs"]:
            src, tgt = (s.strip() for s in str(p).split(">"))
            for t in (src, tgt):
                if t not in types:
                    raise ConfigError(f"immunology: config 'steer_pairs' names cell type {t!r}, not in the data; types: {types}")
            pairs.append((src, tgt))
        if not pairs and len(types) >= 2:
            from .markers import _B, _MONO

            mono, b = match_types(_MONO, types), match_types(_B, types)
            if mono and b and mono[0] != b[0]:
                pairs = [(mono[0], b[0])]
            else:
                big = self.obs["cell_type"].value_counts().index[:2]
                pairs = [(str(big[0]), str(big[1]))]
        return pairs

    @property
    def contrasts(self) -> dict[str, tuple[str, str]]:
        """``{source_to_target: (target query, source query)}``: the vector points source -> target."""
        return {f"{_slug(s)}_to_{_slug(t)}": (f"cell_type == {t!r}", f"cell_type == {s!r}") for s, t in self.steer_pairs()}

    def steering_evaluator(
        self, model: nn.Module, examples: Examples, contrast: str, site: str
    ) -> Callable[[nn.Module], dict[str, float]] | None:
        """Masked-gene predictions and a read-out probe on source cells, under steering.

        For the contrast's source cells (held-out ones when there are >= 8, at most
        ``steer_max_cells``), returns ``fn(model)`` ->

        * ``target_marker_prob`` / ``source_marker_prob``: at 15% masked gene positions (the same
          positions under every alpha), the probability the model's masked-gene head puts on the
          target (source) type's top ``n_markers`` Wilcoxon markers (softmax over gene tokens;
          genes on both lists left out), averaged over positions;
        * ``p_target_type`` / ``frac_classified_target``: a logistic probe of cell type on the
          read-out layer (default the last; fitted unsteered on the training cells) -- its mean
          probability of the target type and the fraction of cells it assigns to it.

        The same scores on real target cells (unsteered) are kept as ``fn.reference`` and, in a
        run, written to ``steering/<contrast>/reference.json``: how far the target really is.
        Checkpoints without a masked-gene head get the probe metrics only; an unknown contrast None.
        """
        pairs = {f"{_slug(s)}_to_{_slug(t)}": (s, t) for s, t in self.steer_pairs()}
        if contrast not in pairs:
            return None
        if not hasattr(model, "cls"):
            warnings.warn("immunology: the model has no masked-gene head; steering is scored by the read-out probe only",
                          stacklevel=2)
        src, tgt = pairs[contrast]
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        from sciscope.core.capture import capture, pool

        vocab, c = self.vocabulary, self.config
        obs = examples.obs.reset_index(drop=True)
        seqs = [vocab.encode(list(g)) for g in examples.inputs]
        stack, _ = find_layer_stack(model)
        aliases = {**self.aliases, "layer.{i}": f"{stack}.{{i}}"}
        readout = self.readout_site
        if site.startswith("layer.") and int(site.split(".")[1]) > int(readout.split(".")[1]):
            warnings.warn(f"immunology: steering site {site!r} is after the read-out layer {readout!r}; "
                          "the probe cannot see the injected vector", stacklevel=2)

        def pooled(m: nn.Module, batches: list[dict[str, torch.Tensor]]) -> np.ndarray:
            rows = []
            with capture(m, [readout], aliases=aliases) as cap, torch.inference_mode():
                for b in batches:
                    cap.clear()
                    m(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
                    p, _ = pool(cap.records[readout][0], "masked", position_mask=b["position_mask"], site=readout)
                    rows.append(p.numpy().astype(np.float64))
            return np.concatenate(rows)

        split = obs["split"].to_numpy() if "split" in obs else np.full(len(obs), "train")
        train = np.flatnonzero(split == "train") if (split == "train").sum() >= 10 else np.arange(len(obs))
        was = model.training
        model.eval()
        try:
            X_train = pooled(model, [collate([seqs[i] for i in train[j:j + 64]], vocab) for j in range(0, len(train), 64)])
        finally:
            model.train(was)
        y_train = obs["cell_type"].astype(str).to_numpy()[train]
        probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=1.0, random_state=c["seed"]))
        probe.fit(X_train, y_train)
        classes = list(probe.classes_)
        if tgt not in classes:
            return None
        t_idx = classes.index(tgt)

        def pick(cell_type: str) -> np.ndarray:
            """Held-out cells of a type (all of them when fewer than 8 are held out), at most steer_max_cells."""
            is_t = obs["cell_type"].astype(str).to_numpy() == cell_type
            held = np.flatnonzero(is_t & (split == "test"))
            cells = held if held.size >= 8 else np.flatnonzero(is_t)
            if cells.size > c["steer_max_cells"]:
                cells = np.sort(np.random.default_rng([c["seed"], 0x57E]).choice(cells, c["steer_max_cells"], replace=False))
            return cells

        def prepare(cells: np.ndarray) -> tuple[list[dict[str, torch.Tensor]], list[tuple[torch.Tensor, ...]]]:
            """Batches of ``cells`` and their masked copies: the same masked positions under every
            alpha and direction (seeded), so differences come from steering, at least one per cell."""
            batches = [collate([seqs[i] for i in cells[j:j + 64]], vocab) for j in range(0, cells.size, 64)]
            gen = torch.Generator().manual_seed(c["seed"] + 11)
            masked = []
            for b in batches:
                real = b["position_mask"]
                chosen = (torch.rand(real.shape, generator=gen) < 0.15) & real
                none = ~chosen.any(1)
                if none.any():
                    first = real.float().argmax(1)
                    chosen[none, first[none]] = True
                masked.append((b["input_ids"].masked_fill(chosen, vocab.special["mask"]), b["attention_mask"], chosen))
            return batches, masked

        cells = pick(src)
        if cells.size == 0:
            return None
        eval_batches, masked = prepare(cells)
        markers = self.type_markers()
        tm, sm = set(markers.get(tgt, [])), set(markers.get(src, []))
        gene_ids = torch.as_tensor(vocab.gene_ids())
        tgt_ids = torch.as_tensor(sorted(vocab.ids[g] for g in tm - sm if g in vocab.ids), dtype=torch.long)
        src_ids = torch.as_tensor(sorted(vocab.ids[g] for g in sm - tm if g in vocab.ids), dtype=torch.long)
        col = torch.full((vocab.vocab_size,), -1, dtype=torch.long)
        col[gene_ids] = torch.arange(len(gene_ids))
        has_head = hasattr(model, "cls")

        def score(m: nn.Module, batches: list[dict[str, torch.Tensor]], masked_: list[tuple[torch.Tensor, ...]]) -> dict[str, float]:
            was_ = m.training
            m.eval()
            try:
                out: dict[str, float] = {}
                if has_head:
                    pt, ps, n = 0.0, 0.0, 0
                    with torch.inference_mode():
                        for inputs, att, chosen in masked_:
                            logits = m(input_ids=inputs, attention_mask=att).logits  # (B, P, V)
                            prob = torch.softmax(logits[..., gene_ids].float(), dim=-1)[chosen]  # (n_masked, G)
                            pt += float(prob[:, col[tgt_ids]].sum()) if len(tgt_ids) else 0.0
                            ps += float(prob[:, col[src_ids]].sum()) if len(src_ids) else 0.0
                            n += int(chosen.sum())
                    out["target_marker_prob"] = pt / max(n, 1)
                    out["source_marker_prob"] = ps / max(n, 1)
                proba = probe.predict_proba(pooled(m, batches))
                out["p_target_type"] = float(proba[:, t_idx].mean())
                out["frac_classified_target"] = float((proba.argmax(1) == t_idx).mean())
                return out
            finally:
                m.train(was_)

        def evaluate(m: nn.Module) -> dict[str, float]:
            return score(m, eval_batches, masked)

        # where the target is: the same scores on real target cells, unsteered (a reference, not a control)
        ref_cells = pick(tgt)
        reference = score(model, *prepare(ref_cells)) if ref_cells.size else {}
        if self.run_dir is not None:
            from sciscope.core.io import write_json

            write_json(Path(self.run_dir) / "steering" / contrast / "reference.json",
                       {"source": src, "target": tgt, "n_source_cells": int(cells.size), "n_target_cells": int(ref_cells.size),
                        "target_cells_unsteered": reference, "readout_site": readout,
                        "target_markers": sorted(tm - sm), "source_markers": sorted(sm - tm)})
        evaluate.source, evaluate.target = src, tgt  # type: ignore[attr-defined]
        evaluate.n_cells = int(cells.size)  # type: ignore[attr-defined]
        evaluate.readout_site = readout  # type: ignore[attr-defined]
        evaluate.markers = {"target": sorted(tm - sm), "source": sorted(sm - tm)}  # type: ignore[attr-defined]
        evaluate.reference = reference  # type: ignore[attr-defined]
        return evaluate

    # -- features: cell types, genes, markers ---------------------------------------------------------
    def cell_type_feature_table(self, analysis: Any) -> pd.DataFrame:
        """Per feature: its best cell type by one-vs-rest AUROC, q, and whether it is specific.

        A feature is *specific* when that AUROC >= ``specific_auroc`` and q < 0.05; the same
        rule on the shuffled-label associations gives ``specific_shuffled`` (the control).
        """
        thr = self.config["specific_auroc"]

        def best(assoc: pd.DataFrame | None) -> pd.DataFrame:
            if assoc is None or assoc.empty:
                return pd.DataFrame(columns=["feature", "cell_type", "auroc", "q", "significant"])
            a = assoc[(assoc["concept"] == "cell_type") & (assoc["stat"] == "auroc")]
            a = a[np.isfinite(a["statistic"].to_numpy(dtype=np.float64))]
            a = a.sort_values(["feature", "statistic"], ascending=[True, False], kind="stable").drop_duplicates("feature")
            return a.rename(columns={"value": "cell_type", "statistic": "auroc"})[["feature", "cell_type", "auroc", "q", "significant"]]

        obs_best = best(analysis.associations)
        obs_best["specific"] = obs_best["significant"].astype(bool) & (obs_best["auroc"] >= thr)
        ctrl = best(analysis.control_associations)
        ctrl = ctrl.rename(columns={"cell_type": "cell_type_shuffled", "auroc": "auroc_shuffled", "q": "q_shuffled",
                                    "significant": "significant_shuffled"})
        ctrl["specific_shuffled"] = ctrl["significant_shuffled"].astype(bool) & (ctrl["auroc_shuffled"] >= thr)
        out = obs_best.merge(ctrl, on="feature", how="left")
        dens = analysis.density[["feature", "density"]]
        return dens.merge(out, on="feature", how="left").reset_index(drop=True)

    def technical_feature_table(self, analysis: Any) -> pd.DataFrame:
        """Per technical covariate: features with |Spearman rho| >= ``technical_rho`` and q < 0.05,
        beside the count on shuffled labels and the features that are also cell-type-specific."""
        thr = self.config["technical_rho"]
        rows = []
        ct = self.cell_type_feature_table(analysis)
        specific = set(ct.loc[ct["specific"].fillna(False).astype(bool), "feature"])
        for cov in [t for t in TECHNICAL if t in self.concepts]:
            def hits(a: pd.DataFrame | None) -> set[int]:
                if a is None or a.empty:
                    return set()
                a = a[(a["concept"] == cov) & a["significant"].astype(bool) & (a["effect"].abs() >= thr)]
                return set(a["feature"].astype(int))

            def max_rho(a: pd.DataFrame | None) -> float:
                if a is None or a.empty:
                    return float("nan")
                e = a.loc[a["concept"] == cov, "effect"].abs().to_numpy(dtype=np.float64)
                e = e[np.isfinite(e)]
                return float(e.max()) if e.size else float("nan")

            obs_hits, ctrl_hits = hits(analysis.associations), hits(analysis.control_associations)
            rows.append({"covariate": cov, "n_features": len(obs_hits), "n_features_shuffled": len(ctrl_hits),
                         "max_abs_rho": max_rho(analysis.associations),
                         "max_abs_rho_shuffled": max_rho(analysis.control_associations),
                         "n_also_cell_type_specific": len(obs_hits & specific),
                         "features": " ".join(str(f) for f in sorted(obs_hits)[:50])})
        return pd.DataFrame(rows)

    def gene_drivers(self, model: nn.Module, sae: Any, site: str | None = None, *, batch_size: int = 64) -> pd.DataFrame:
        """Gene x feature driver scores: each gene token's mean share of a feature's pre-activation.

        The cell embedding ``x = mean_p h_p`` (gene positions) and the SAE encoder is affine, so a
        cell's pre-activation of feature ``f`` is exactly ``sum_p pre_f(h_p) / P``: token ``p``'s
        share is ``pre_f(h_p) / P``. The driver score of gene ``g`` for ``f`` is that share summed
        over the cells where ``f`` fires, divided by how many cells that is (0 where ``g`` is
        absent). It says which gene tokens the feature reads at its layer (not which input genes
        cause it through earlier layers: that would need ablations).

        Returns
        -------
        DataFrame ``(n_genes, d_sae)``, index = vocabulary genes, plus ``attrs["n_active"]``.
        """
        from sciscope.core.capture import capture

        site = site or self.sae_site
        vocab = self.vocabulary
        ex = self.examples("all")
        seqs = [vocab.encode(list(g)) for g in ex.inputs]
        d_sae = int(sae.cfg.d_sae)
        G = torch.zeros(vocab.vocab_size, d_sae, dtype=torch.float64)
        n_active = torch.zeros(d_sae, dtype=torch.float64)
        stack, _ = find_layer_stack(model)
        aliases = {**self.aliases, "layer.{i}": f"{stack}.{{i}}"}
        was = model.training
        model.eval()
        try:
            with capture(model, [site], aliases=aliases) as cap, torch.inference_mode():
                for i in range(0, len(seqs), batch_size):
                    b = collate(seqs[i:i + batch_size], vocab)
                    cap.clear()
                    model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
                    h = cap.records[site][0]  # (B, P, D)
                    pm = b["position_mask"]  # (B, P) gene tokens
                    share, pooled = token_shares(sae, h, pm)  # (B, P, F), (B, D)
                    active = sae.encode(pooled) > 0  # (B, F)
                    share = share * active[:, None, :]
                    G.index_add_(0, b["input_ids"][pm], share[pm].double())  # sum over (cell, position) per gene
                    n_active += active.sum(0).double()
        finally:
            model.train(was)
        ids = vocab.gene_ids()
        name = {i: g for g, i in vocab.ids.items()}
        scores = (G[ids] / n_active.clamp_min(1)).numpy().astype(np.float32)
        df = pd.DataFrame(scores, index=[name[int(i)] for i in ids])
        df.attrs["n_active"] = n_active.numpy()
        return df

    def top_driver_genes(self, drivers: pd.DataFrame, k: int | None = None) -> pd.DataFrame:
        """Long table: the ``k`` genes with the largest driver score per live feature."""
        k = int(k or self.config["top_genes"])
        n_active = drivers.attrs.get("n_active")
        rows = []
        D = drivers.to_numpy()
        genes = drivers.index.to_numpy()
        for f in range(D.shape[1]):
            if n_active is not None and n_active[f] == 0:
                continue
            order = np.argsort(-D[:, f], kind="stable")[:k]
            for r, g in enumerate(order):
                rows.append({"feature": f, "rank": r + 1, "gene": genes[g], "driver_score": float(D[g, f])})
        return pd.DataFrame(rows, columns=["feature", "rank", "gene", "driver_score"])

    def marker_recovery(self, analysis: Any, drivers: pd.DataFrame, *, n_random: int = 50) -> tuple[pd.DataFrame, float]:
        """Canonical markers recovered by the driver genes of a cell-type-specific feature.

        A testable marker (gene in the vocabulary, cell type in the data) is *recovered* when a
        feature specific to one of its cell types (AUROC >= ``specific_auroc``, q < 0.05) has the
        marker among its top ``top_genes`` driver genes. Also listed: the best feature for the
        marker's types, the marker's driver rank there, and the marker's Wilcoxon rank among the
        type's expressed markers (is it a marker *in this data* at all?).

        Returns
        -------
        (table, control): ``control`` is the mean number recovered when each testable marker is
        replaced by a random vocabulary gene (``n_random`` seeded draws): the chance level.
        """
        k = self.config["top_genes"]
        types = [str(t) for t in self.obs["cell_type"].cat.categories]
        mt = marker_table(types, [g for g in self.readable_genes if g in set(drivers.index)])
        ct = self.cell_type_feature_table(analysis)
        a = analysis.associations
        a = a[(a["concept"] == "cell_type") & (a["stat"] == "auroc")]
        D = drivers.to_numpy()
        gene_pos = {str(g).upper(): i for i, g in enumerate(drivers.index)}
        # rank of every gene within every feature's driver scores (1 = top driver)
        ranks = np.empty_like(D, dtype=np.int64)
        order = np.argsort(-D, axis=0, kind="stable")
        np.put_along_axis(ranks, order, np.arange(1, D.shape[0] + 1)[:, None].repeat(D.shape[1], 1), axis=0)
        wil = self.type_markers(max(50, self.config["n_markers"]))

        def specific_features(expected: list[str]) -> np.ndarray:
            sel = ct[ct["specific"].fillna(False).astype(bool) & ct["cell_type"].isin(expected)]
            return sel["feature"].to_numpy(dtype=np.int64)

        rows = []
        for r in mt.itertuples():
            row = {"gene": r.gene, "marks": r.marks, "cell_types": r.cell_types, "gene_in_data": r.gene_in_data,
                   "type_in_data": r.type_in_data, "testable": r.testable}
            if r.testable:
                expected = r.cell_types.split("; ")
                g = gene_pos[r.gene.upper()]
                feats = specific_features(expected)
                best_rank = int(ranks[g, feats].min()) if feats.size else None
                t = a[a["value"].isin(expected)]
                t = t[np.isfinite(t["statistic"].to_numpy(dtype=np.float64))]
                bf = t.loc[t["statistic"].idxmax()] if len(t) else None
                de = [wil.get(e, []).index(r.gene) + 1 for e in expected if r.gene in wil.get(e, [])]
                row.update({
                    "n_specific_features": int(feats.size), "best_driver_rank_in_specific": best_rank,
                    "recovered": bool(best_rank is not None and best_rank <= k),
                    "best_feature": None if bf is None else int(bf["feature"]),
                    "best_feature_type": None if bf is None else str(bf["value"]),
                    "best_feature_auroc": None if bf is None else float(bf["statistic"]),
                    "driver_rank_in_best_feature": None if bf is None else int(ranks[g, int(bf["feature"])]),
                    "wilcoxon_rank_in_type": min(de) if de else None,
                })
            else:
                row["recovered"] = None
            rows.append(row)
        table = pd.DataFrame(rows)
        testable = [r for r in mt.itertuples() if r.testable]
        rng = np.random.default_rng([self.config["seed"], 0x3A4])
        counts = []
        for _ in range(n_random if testable else 0):
            n = 0
            for r in testable:
                feats = specific_features(r.cell_types.split("; "))
                g = int(rng.integers(D.shape[0]))
                n += int(feats.size > 0 and ranks[g, feats].min() <= k)
            counts.append(n)
        control = float(np.mean(counts)) if counts else float("nan")
        return table, control

    # -- results back into AnnData --------------------------------------------------------------------
    def results_anndata(self, store: Any, latents: np.ndarray, analysis: Any | None = None,
                        drivers: pd.DataFrame | None = None) -> Any:
        """An AnnData of the kept cells with the run's results attached.

        ``X``: log-normalised expression (genes of the data; ``var['in_vocabulary']``,
        ``var['median']``); ``obs``: the store's obs; ``obsm``: ``X_<site>`` cell embeddings of every
        captured site (e.g. ``X_layer.2``), ``X_sae`` the SAE feature activations, ``X_pca`` of the
        expression; ``varm['sae_driver']``: the gene x feature driver scores (0 for genes the
        vocabulary lacks); ``uns``: the feature tables. ``sc.pp.neighbors(adata,
        use_rep="X_layer.2")`` then ``sc.tl.umap`` / ``sc.pl.umap`` work on any of them.
        """
        import anndata as ad

        obs = store.obs.copy().reset_index(drop=True)
        obs.index = obs["cell_id"].astype(str).to_numpy() if "cell_id" in obs else obs.index.astype(str)
        for col in obs.columns:  # h5ad wants plain column types
            if obs[col].dtype == object:
                obs[col] = obs[col].astype(str)
        cd = self.cells
        var = pd.DataFrame(index=pd.Index([str(g) for g in cd.genes]))
        var["in_vocabulary"] = [g in self.vocabulary.ids for g in cd.genes]
        var["median"] = [self.vocabulary.medians.get(g, np.nan) for g in cd.genes]
        adata = ad.AnnData(X=self._log_expression(obs), obs=obs, var=var)
        for site in store.sites:
            adata.obsm[f"X_{site}"] = np.asarray(store.array(site), dtype=np.float32)
        lat = np.asarray(latents, dtype=np.float32)
        if lat.shape[0] != adata.n_obs:
            raise ShapeError(f"immunology: latents have {lat.shape[0]} rows, the store {adata.n_obs}")
        adata.obsm["X_sae"] = lat
        adata.obsm["X_pca"] = self._expression_views(obs)[1]
        if drivers is not None:
            M = np.zeros((adata.n_vars, drivers.shape[1]), dtype=np.float32)
            pos = {g: i for i, g in enumerate(adata.var_names)}
            for g, row in zip(drivers.index, drivers.to_numpy()):
                if g in pos:
                    M[pos[g]] = row
            adata.varm["sae_driver"] = M
        notes = self.data_notes
        adata.uns["sciscope"] = {
            "domain": self.name, "sae_site": self.sae_site, "sites": list(store.sites), "pooling": self.pooling,
            "input_type": notes["input_type"], "input_type_reason": notes["input_type_reason"], "matrix": notes["matrix"],
            "source": notes["source"], "n_genes_unknown": notes["n_genes_unknown"], "max_genes": notes["max_genes"],
        }
        if analysis is not None:
            adata.uns["sae_features"] = _plain_frame(analysis.features)
            adata.uns["cell_type_features"] = _plain_frame(self.cell_type_feature_table(analysis))
        return adata

    # -- pipeline hooks -------------------------------------------------------------------------------
    def _feature_results(self, analysis: Any, latents: np.ndarray) -> dict[str, Any]:
        """Driver genes, marker recovery and the results AnnData (computed once per features stage)."""
        if "features" in self._results:
            return self._results["features"]
        from sciscope.core import ActivationStore
        from sciscope.core.sae import load_sae

        if self.run_dir is None:
            raise AdapterError("immunology: the features hooks read the run folder (activations, sae); run them in a pipeline")
        run = Path(self.run_dir)
        store = ActivationStore.open(run / "activations" / "store")
        sae = load_sae(run / "sae" / "model")
        model = self.model()
        drivers = self.gene_drivers(model, sae, self.sae_site)
        recovery, control = self.marker_recovery(analysis, drivers)
        adata = self.results_anndata(store, latents, analysis, drivers)
        res = {"store": store, "drivers": drivers, "recovery": recovery, "recovery_control": control, "adata": adata}
        self._results["features"] = res
        return res

    def feature_plots(self, analysis: Any, acts: Any, obs: pd.DataFrame, out_dir: Any) -> list[Path]:
        """UMAPs (scanpy) of the expression PCA, of the SAE layer's embeddings, and of that embedding
        coloured by the most specific feature of each of the top cell types."""
        from .plots import compute_umap, plot_umap

        out_dir = Path(out_dir)
        A = np.asarray(acts.array(acts.sites[0]) if hasattr(acts, "array") else acts)
        res = self._feature_results(analysis, A)
        adata = res["adata"]
        seed = self.config["seed"]
        rep = f"X_{self.sae_site}"
        compute_umap(adata, "X_pca", key="X_umap_expression", seed=seed)
        compute_umap(adata, rep, key="X_umap", seed=seed)  # the default basis of sc.pl.umap
        color = ["cell_type"] + [c for c in ("log10_library_size", "n_genes_detected") if c in adata.obs]
        paths = [
            plot_umap(adata, "X_umap_expression", color, out_dir / "umap_expression.png",
                      suptitle="Baseline view: UMAP of the expression PCA (log-normalised)"),
            plot_umap(adata, "X_umap", color, out_dir / "umap_embedding.png",
                      suptitle=f"UMAP of the model's cell embeddings at {self.sae_site} (mean over gene tokens)"),
        ]
        ct = self.cell_type_feature_table(analysis)
        # the best feature of each cell type (significant ones), the most specific types first
        live = ct[ct["significant"].fillna(False).astype(bool)].sort_values("auroc", ascending=False)
        picks = live.drop_duplicates("cell_type").head(self.config["n_umap_features"])
        if len(picks):
            titles, cols = [], []
            for r in picks.itertuples():
                name = f"feature {int(r.feature)}"
                adata.obs[name] = A[:, int(r.feature)]
                cols.append(name)
                titles.append(f"feature {int(r.feature)}: {r.cell_type}\n(AUROC {r.auroc:.2f})")
            paths.append(plot_umap(adata, "X_umap", cols, out_dir / "umap_features.png", titles=titles, wspace=0.25,
                                   suptitle="SAE feature activations on the embedding UMAP (most specific feature per type)"))
            adata.obs.drop(columns=cols, inplace=True)
        return paths

    def headline_rows(self, stage: str, context: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Examples: unknown genes, dropped cells. Model: held-out masked-gene accuracy vs a frequency
        baseline. Probes: cell-type macro-F1 vs the PCA baseline. Features: cell-type-specific
        features, marker recovery, technical features, the .h5ad. Steering: effect at the largest alpha."""
        out = Path(context["out"])
        if stage == "examples":
            self._write_data_notes()
            n = self.data_notes
            return [
                {"stage": "examples", "name": "genes unknown to the vocabulary", "value": n["n_genes_unknown"],
                 "note": f"of {n['n_genes']} genes in the data ({n['vocabulary']} vocabulary); input {n['input_type']} from {n['matrix']}",
                 "source": "examples/unknown_genes.csv" if n["unknown_genes"] else "examples/notes.md"},
                {"stage": "examples", "name": "cells dropped by filters", "value": n["n_cells_filtered"],
                 "note": f"{n['n_cells_final']} of {n['n_cells_in_file']} cells kept"
                 + (f" (stratified subsample of {n['n_cells_subsample']})" if n["n_cells_subsample"] else ""),
                 "source": "examples/notes.md"},
            ]
        if stage == "model":
            return self._model_rows(context["model"], out)
        if stage == "probes":
            return self._probe_rows(context["sweep"], out)
        if stage == "features":
            return self._features_rows(context, out)
        if stage == "steering":
            return self._steering_rows(context, out)
        return []

    def _model_rows(self, model: nn.Module, out: Path) -> list[dict[str, Any]]:
        if not hasattr(model, "cls"):
            return []
        train, test = self._train_seqs()
        acc = masked_gene_accuracy(model, self.vocabulary, test or train, train, seed=self.config["seed"])
        from sciscope.core.io import write_json

        write_json(out / "masked_gene_accuracy.json", {**acc, "training": {k: v for k, v in self.training_info.items() if k != "history"}})
        return [{"stage": "model", "name": "held-out masked-gene top-1 accuracy", "value": acc["masked_gene_accuracy"],
                 "control": acc["position_frequency_accuracy"], "control_label": "most frequent gene at each rank position",
                 "note": f"{acc['n_masked']} masked genes of {len(test)} held-out cells; chance {acc['chance']:.4f}",
                 "source": "model/masked_gene_accuracy.json"}]

    def _probe_rows(self, sweep: Any, out: Path) -> list[dict[str, Any]]:
        if "cell_type" not in sweep.targets:
            return []
        s = sweep.summary(metric="f1_macro")
        t = s[(s.target == "cell_type")].copy()
        base_cols = [c for c in t.columns if c.startswith("baseline_mean[")]
        write_table(out / "cell_type_f1.csv", t)
        best = t.loc[t.score_mean.idxmax()]
        pca_col = next((c for c in base_cols if "pca" in c), None)
        pca = float(best[pca_col]) if pca_col else float(best.baseline_mean)
        others = ", ".join(f"{c[len('baseline_mean['):-1]} {float(best[c]):.3f}" for c in base_cols if c != pca_col)
        return [
            {"stage": "probes", "name": "cell_type macro-F1, best layer", "value": float(best.score_mean),
             "control": float(best.control_mean), "control_label": "shuffled labels",
             "note": f"at {best.site}; PCA + logistic baseline {pca:.3f}" + (f"; {others}" if others else ""),
             "source": "probes/cell_type_f1.csv"},
            {"stage": "probes", "name": "cell_type macro-F1, PCA + logistic baseline", "value": pca,
             "control": float(best.score_mean), "control_label": "best model layer",
             "note": "50 principal components of the log-normalised expression, same folds", "source": "probes/cell_type_f1.csv"},
        ]

    def _features_rows(self, context: Mapping[str, Any], out: Path) -> list[dict[str, Any]]:
        analysis = context["analysis"]
        latents = context["latents"]
        A = np.asarray(latents.array(latents.sites[0]))
        res = self._feature_results(analysis, A)
        ct = self.cell_type_feature_table(analysis)
        write_table(out / "cell_type_features.csv", ct)
        tech = self.technical_feature_table(analysis)
        write_table(out / "technical_features.csv", tech)
        drivers = res["drivers"]
        write_table(out / "gene_drivers.csv", self.top_driver_genes(drivers))
        rec, control = res["recovery"], res["recovery_control"]
        write_table(out / "marker_recovery.csv", rec)
        adata = res["adata"]
        adata.uns["technical_features"] = _plain_frame(tech)
        adata.uns["marker_recovery"] = _plain_frame(rec)
        adata.uns["gene_drivers_top"] = _plain_frame(self.top_driver_genes(drivers))
        write_h5ad(adata, out / "cells.h5ad")
        spec = ct["specific"].fillna(False).astype(bool)
        n_types = ct.loc[spec, "cell_type"].nunique()
        testable = rec[rec["testable"]]
        n_rec = int(testable["recovered"].astype(bool).sum())
        missing = rec[~rec["gene_in_data"]].gene.tolist()
        recovered = testable[testable["recovered"].astype(bool)].gene.tolist()
        rows = [
            {"stage": "features", "name": f"cell-type-specific features (AUROC >= {self.config['specific_auroc']}, q < 0.05)",
             "value": int(spec.sum()), "control": int(ct["specific_shuffled"].fillna(False).astype(bool).sum()),
             "control_label": "same rule on shuffled labels",
             "note": f"covering {n_types} of {self.obs['cell_type'].nunique()} cell types; {int((ct.density > 0).sum())} live features",
             "source": "features/cell_type_features.csv"},
            {"stage": "features", "name": f"canonical markers recovered (top-{self.config['top_genes']} driver gene of a specific feature)",
             "value": n_rec, "control": control, "control_label": "random genes in the markers' place (mean of 50)",
             "note": f"of {len(testable)} testable: {', '.join(recovered) or 'none'}; not in the data: {', '.join(missing) or 'none'}",
             "source": "features/marker_recovery.csv"},
        ]
        for r in tech.itertuples():
            rows.append({"stage": "features", "name": f"features tracking {r.covariate} (|rho| >= {self.config['technical_rho']}, q < 0.05)",
                         "value": int(r.n_features), "control": int(r.n_features_shuffled), "control_label": "shuffled labels",
                         "note": f"max |rho| {r.max_abs_rho:.2f} (shuffled {r.max_abs_rho_shuffled:.2f}); "
                                 f"{r.n_also_cell_type_specific} of them also cell-type-specific",
                         "source": "features/technical_features.csv"})
        rows.append({"stage": "features", "name": "cells in the results AnnData", "value": int(adata.n_obs),
                     "note": f"obsm: {', '.join(adata.obsm.keys())}; varm: {', '.join(adata.varm.keys())}",
                     "source": "features/cells.h5ad"})
        return rows

    def _steering_rows(self, context: Mapping[str, Any], out: Path) -> list[dict[str, Any]]:
        rows = []
        for name in context.get("sweeps", {}):
            f = out / name / "sweep.csv"
            if not f.is_file():
                continue
            sw = pd.read_csv(f)
            a_max = float(sw.alpha.max())
            base = sw[sw.alpha == 0.0].groupby("metric").value.mean()
            eff = []
            for m in sw.metric.unique():
                t = sw[(sw.metric == m) & (sw.alpha == a_max)]
                steer_v = float(t[t.condition == "steer"].value.mean()) - float(base[m])
                rand = t[t.condition != "steer"].value.to_numpy() - float(base[m])
                eff.append({"metric": m, "alpha": a_max, "effect_steer": steer_v,
                            "effect_random_mean": float(rand.mean()) if rand.size else np.nan,
                            "effect_random_max_abs": float(np.abs(rand).max()) if rand.size else np.nan,
                            "value_alpha0": float(base[m])})
            table = pd.DataFrame(eff)
            ref_file = out / name / "reference.json"
            reference = json.loads(ref_file.read_text())["target_cells_unsteered"] if ref_file.is_file() else {}
            table["target_cells_unsteered"] = table["metric"].map(reference)
            write_table(out / name / "effect_at_max_alpha.csv", table)
            for r in table.itertuples():
                if r.metric not in ("target_marker_prob", "p_target_type"):
                    continue
                ref = reference.get(r.metric)
                rows.append({"stage": "steering", "name": f"{name}: change in {r.metric} at alpha {a_max:g}",
                             "value": r.effect_steer, "control": r.effect_random_mean,
                             "control_label": "random directions of the same norm (mean)",
                             "note": f"alpha 0 value {r.value_alpha0:.4f}; largest random |change| {r.effect_random_max_abs:.4f}"
                                     + (f"; real target cells {ref:.4f}" if ref is not None else ""),
                             "source": f"steering/{name}/effect_at_max_alpha.csv"})
        return rows


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------


def token_shares(sae: Any, h: torch.Tensor, position_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each gene token's exact share of the SAE pre-activation of its cell's embedding.

    With ``x = sum_p m_p h_p / P`` (``m`` the gene-token mask, ``P = sum_p m_p``) and the affine
    encoder ``pre(x) = (x - b_dec) W_enc + b_enc``, ``pre(x) = sum_p m_p pre(h_p) / P``: the
    shares ``m_p pre(h_p) / P`` add up to the cell's pre-activation exactly.

    Parameters
    ----------
    sae
        A :class:`~sciscope.core.sae.SparseAutoencoder` (``pre_acts``).
    h
        ``(B, P, D)`` activations of every position at the SAE's site.
    position_mask
        ``(B, P)`` bool, the gene tokens.

    Returns
    -------
    (shares ``(B, P, F)``, pooled cell embeddings ``(B, D)``)
    """
    m = position_mask.to(h.dtype)  # (B, P)
    n_pos = m.sum(1).clamp_min(1.0)  # (B,)
    pooled = (h * m[..., None]).sum(1) / n_pos[:, None]  # (B, D)
    shares = sae.pre_acts(h) * (m / n_pos[:, None])[..., None]  # (B, P, F)
    return shares, pooled


def _model_dir(spec: str | Path) -> Path:
    path = Path(str(spec)).expanduser()
    if not path.exists():
        raise ConfigError(f"immunology: model path {str(path)!r} does not exist (config 'model')")
    if not path.is_dir() or not (path / "config.json").is_file():
        raise ConfigError(f"immunology: {str(path)!r} is not a Hugging Face model directory (no config.json)")
    return path


def _plain_frame(df: pd.DataFrame) -> pd.DataFrame:
    """A copy h5ad can store: object columns as strings (None -> ""), bools and numbers kept."""
    out = df.copy().reset_index(drop=True)
    for col in out.columns:
        s = out[col]
        if s.dtype == object or isinstance(s.dtype, pd.CategoricalDtype):
            out[col] = s.map(lambda v: "" if v is None or (isinstance(v, float) and np.isnan(v)) else str(v)).astype(str)
    out.columns = [str(c) for c in out.columns]
    return out


def write_h5ad(adata: Any, path: str | Path) -> Path:
    """Write an AnnData atomically: to a temporary name in the same folder, then rename."""
    path = Path(path)
    with atomic_path(path) as tmp:
        adata.write_h5ad(tmp)
    return path

