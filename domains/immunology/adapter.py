"""The immunology adapter: a single-cell transcriptomics foundation model, opened up.

Follows Geneformer (rank-value gene tokens, BERT masked-gene pretraining; cell embedding = mean of
gene embeddings) and the SAE studies of single-cell models (EVA; TopK SAEs on Geneformer/scGPT
layers), at laptop scale: a 4-layer BERT masked-gene model is trained on scanpy's bundled
``pbmc68k_reduced`` (raw counts or log-normalised user ``.h5ad``, detected) in minutes on a CPU, or a
local Geneformer-style checkpoint with a JSON token dictionary is loaded (config ``model``).

What it declares (the core's stages run each with its controls):

* per-layer cell-type and technical-covariate probes beside shuffled labels and three baselines
  (:meth:`ImmunologyAdapter.baseline_features`), the cell-type headline judged against the stronger
  of PCA and log-expression (same folds); types with < ``min_test_cells`` test cells merged (:mod:`.confounds`);
* SAE features against every cell type and technical covariate (technical only *within* cell type),
  against genes (:mod:`.features`), and the recovery of curated (CD3E, MS4A1, NKG7, ...) and
  Wilcoxon markers by the driver genes of cell-type-specific features, beside random genes and the
  token-frequency list of the feature's cells (:mod:`.marker_rows`);
* a delta vector between two cell types (default CD14+ monocytes -> CD19+ B cells) at a middle
  layer, scored on source cells by the masked-gene head's mass on the target's markers and a
  read-out probe's target-type probability, against random directions and beside real target cells;
* the results as AnnData (``features/cells.h5ad``) with UMAPs of embeddings and features.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import pandas as pd
import torch
from torch import nn

from sciscope.core.adapter import DomainAdapter, Examples
from sciscope.core.capture import pooled_activations
from sciscope.core.config import Key
from sciscope.core.context import RunContext, stable_key
from sciscope.core.errors import ConfigError
from sciscope.core.experiment import Analysis, SteeringPlan, contrast_plan
from sciscope.core.fidelity import TaskLoss, TokenPredictionTask
from sciscope.core.loading import (auto_model_class, checkpoint_dir, checkpoint_layer_stack, find_layer_stack, layer_aliases,
                                   layer_index)

from . import analyses as _a
from . import confounds as _cf
from . import data as _data
from . import features as _f
from . import tracing as _tracing
from .markers import _B, _MONO, match_types, wilcoxon_markers
from .model import ModelSpec, build_model, load_checkpoint, save_trained, train_model
from .tokenize import GeneVocab, collate, rank_value_encode

if TYPE_CHECKING:
    from sciscope.core.tracing import CounterfactualPairs

__all__ = ["ImmunologyAdapter"]

DEFAULT_PROBE_TARGETS = ("cell_type", "log10_library_size", "n_genes_detected")
_LAYER = "a layer index or 'layer.N'; None = "
#: Held-out cells the task loss (fidelity) is measured on, at most (a seeded subset beyond).
TASK_MAX_CELLS = 512


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", str(text).lower()).strip("_") or "x"


class ImmunologyAdapter(DomainAdapter):
    """Cells read by a masked-gene transformer (what it declares: the module docstring).

    Examples
    --------
    >>> ad = ImmunologyAdapter({"train_steps": 300})                 # doctest: +SKIP
    >>> ex = ad.examples("all"); model = ad.model()                   # doctest: +SKIP
    """

    name = "immunology"
    description = ("Single-cell transcriptomics with a rank-value masked-gene BERT: cell-type probes, "
                   "SAE features vs cell types and marker genes, steering between cell states")
    config_keys: ClassVar[dict[str, Key]] = {
        "source": Key(_data.BUNDLED, help="'pbmc68k_reduced' (bundled with scanpy) or a path to an .h5ad file"),
        "matrix": Key("auto", help="auto (a 'counts' layer, else .raw, else .X) | X | raw | a layer name"),
        "input_type": Key("auto", choices=_data.INPUT_TYPES, help="auto = detected"),
        "gene_column": Key("", help="var column of gene ids ('' = var_names), e.g. Ensembl ids for Geneformer"),
        "cell_type_column": Key("", help="obs column of labels ('' = bulk_labels / cell_type / celltype ...)"),
        "library_size_column": Key("n_counts", help="obs column of total counts ('' = from counts when possible)"),
        "min_genes": Key(10, min=1, help="cells with fewer expressed genes are dropped"),
        "min_cells_per_type": Key(5, min=1, help="rarer cell types are dropped"),
        "min_test_cells": Key(5, min=0, help="types with fewer held-out cells are merged or dropped (rare_test_types); 0 = off"),
        "rare_test_types": Key("other", choices=_cf.RARE_ACTIONS, help="'other' (merged into one label) | 'drop'"),
        "n_cells": Key(0, min=0, help="seeded, type-stratified subsample (0 = every cell)"),
        "test_fraction": Key(0.2, help="held-out cells, in (0, 1): the model and the SAE never train on them"),
        "seed": Key(0),
        "max_genes": Key(64, min=2, help="top-N genes per cell (rank-value encoding); Geneformer uses 2048"),
        "model": Key("", "model", help="'' = train the default here; else a local HF directory with a gene vocabulary"),
        "n_layers": Key(4, "model", min=1),
        "hidden": Key(64, "model", min=8),
        "n_heads": Key(4, "model", min=1),
        "train_steps": Key(1200, "model", min=1),
        "train_batch_size": Key(32, "model", min=1),
        "lr": Key(2e-3, "model", help="> 0"),
        "mask_prob": Key(0.15, "model", help="in (0, 1)"),
        "probe_targets": Key([], "probes", help="[] = cell_type, log10_library_size, n_genes_detected"),
        "gene_baseline": Key(True, "probes", help="also probe the log-expression of the 2,000 most variable genes"),
        "sae_layer": Key(None, "sae", help=_LAYER + "the penultimate layer (Geneformer's cell-embedding layer)"),
        "steer_layer": Key(None, "steering", help=_LAYER + "the middle layer"),
        "readout_layer": Key(None, "steering", help=_LAYER + "the last layer (the steering read-out probe's)"),
        "steer_pairs": Key([], "steering", help="'source>target' cell types; [] = CD14+ monocytes > B cells"),
        "n_markers": Key(10, "steering", min=1, help="data-driven markers per type (Wilcoxon) scored under steering"),
        "steer_max_cells": Key(64, "steering", min=1, help="source cells scored per steering evaluation"),
        "specific_auroc": Key(0.9, "features", max=1.0, help="in (0, 1]: one-vs-rest AUROC of a cell-type-specific feature"),
        "technical_rho": Key(0.3, "features", max=1.0, help="in (0, 1]: |Spearman rho| of a technical feature"),
        "top_genes": Key(10, "features", min=1, help="driver genes listed per feature (marker recovery looks here)"),
        "n_data_markers": Key(3, "features", min=1, help="data-driven (Wilcoxon) markers per type tested for recovery"),
        "n_umap_features": Key(6, "features", min=0, help="features drawn on the UMAP"),
        **_tracing.CONFIG_KEYS,  # trace_pairs, trace_mask_rank
    }
    #: Overrides for ``sciscope run immunology --profile NAME`` (quick: within 15 minutes on 2 CPU cores).
    profiles: ClassVar[dict[str, dict[str, Any]]] = {
        "quick": {"train_steps": 1200, "sae_steps": 1500, "sae_batch_size": 128, "sae_expansion": 4, "sae_k": 16,
                  "steer_alphas": [-2.0, -1.0, -0.5, 0.5, 1.0, 2.0]},
        "full": {"max_genes": 256, "hidden": 128, "n_layers": 6, "n_heads": 8, "train_steps": 6000, "lr": 1e-3,
                 "sae_steps": 4000, "sae_batch_size": 128, "sae_expansion": 4, "sae_k": 16, "steer_max_cells": 200},
    }
    #: Tiny config for the conformance test and unit tests (trains in a few seconds).
    test_config: ClassVar[dict[str, Any]] = {
        "n_cells": 200, "max_genes": 24, "n_layers": 2, "hidden": 32, "n_heads": 2, "train_steps": 30,
        "train_batch_size": 16, "steer_max_cells": 16,
    }

    def __init__(self, config: Mapping[str, Any] | None = None) -> None:
        super().__init__(config)
        self.vocab: GeneVocab | None = None  # the loaded model's vocabulary
        self.training_info: dict[str, Any] = {}
        self._cells: _data.CellData | None = None
        self._table: tuple[pd.DataFrame, list[list[str]], dict[str, Any]] | None = None
        self._stack: tuple[str, int] | None = None
        self._markers: dict[int, dict[str, list[str]]] = {}

    @classmethod
    def check_config(cls, c: dict[str, Any]) -> None:
        """Open intervals, heads dividing the width, 'source>target' pairs, layer keys, the checkpoint."""
        bad = [k for k in ("test_fraction", "mask_prob") if not 0.0 < c[k] < 1.0]
        bad += [k for k in ("specific_auroc", "technical_rho", "lr") if not c[k] > 0.0]
        if bad:
            raise ConfigError(f"immunology: config {bad[0]!r} = {c[bad[0]]!r} is out of range (see its help)")
        if c["hidden"] % c["n_heads"]:
            raise ConfigError(f"immunology: config 'hidden' ({c['hidden']}) must be a multiple of 'n_heads' ({c['n_heads']})")
        for pair in c["steer_pairs"]:
            if str(pair).count(">") != 1 or not all(s.strip() for s in str(pair).split(">")):
                raise ConfigError(f"immunology: config 'steer_pairs' entry {pair!r} must read 'source type>target type'")
        for key in ("sae_layer", "steer_layer", "readout_layer"):
            if c[key] is not None and (isinstance(c[key], bool) or not isinstance(c[key], (int, str))):
                raise ConfigError(f"immunology: config {key!r} expects a layer index or 'layer.N', got {c[key]!r}")
        if c["model"]:
            GeneVocab.load(_model_dir(c["model"]))  # fail early: not a model directory, no vocabulary

    # -- data ---------------------------------------------------------------------------------------
    @property
    def cells(self) -> _data.CellData:
        """The checked, filtered cells of the configured source (read once)."""
        if self._cells is None:
            keys = ("matrix", "input_type", "gene_column", "cell_type_column", "library_size_column", "min_genes",
                    "min_cells_per_type", "n_cells", "seed")
            self._cells = _data.load_cells(self.config["source"], **{k: self.config[k] for k in keys})
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
        """obs table, ranked gene lists and data notes (built once). Genes unknown to the vocabulary are
        dropped before ranking (as Geneformer does) and listed; cells left without one are dropped."""
        if self._table is not None:
            return self._table
        cd, vocab, c = self.cells, self.vocabulary, self.config
        known = np.array([g in vocab.ids for g in cd.genes])
        unknown = [g for g, k in zip(cd.genes, known) if not k]
        if not known.any():
            raise ConfigError(f"immunology: none of the {len(cd.genes)} genes of the data is in the model's vocabulary "
                              f"({vocab.vocab_size} tokens, e.g. {vocab.genes[:3]}); data genes look like {cd.genes[:3]}: "
                              "set config gene_column to the var column holding the vocabulary's identifiers")
        X_norm = _data.normalised_expression(cd.X, cd.input_type)
        data_medians = _data.gene_nonzero_medians(X_norm)
        if c["model"] and vocab.medians:
            medians = np.array([vocab.medians.get(g, np.nan) for g in cd.genes])
            n_no_median = int((known & ~np.isfinite(medians)).sum())
            # a known gene without a corpus median falls back to the data's median (counted)
            medians = np.where(known & ~np.isfinite(medians), data_medians, medians)
            median_note = "the model's corpus medians" + (f" ({n_no_median} genes fall back to this data's)" if n_no_median else "")
        else:
            medians = data_medians
            median_note = "this data's non-zero gene medians" + (
                "" if not c["model"] else " (the checkpoint ships no gene_median_dictionary.json)")
        max_genes = min(c["max_genes"], vocab.max_genes)
        ranked = rank_value_encode(X_norm, cd.genes, np.where(known, medians, np.nan), max_genes=max_genes)
        keep = np.array([len(r) > 0 for r in ranked])
        obs = cd.obs.copy()
        obs["n_tokens"] = [len(r) for r in ranked]
        obs["split"] = _data.stratified_split(obs["cell_type"].astype(str), c["test_fraction"], c["seed"])
        if not keep.all():
            obs = obs[keep].reset_index(drop=True)
            ranked = [r for r, k in zip(ranked, keep) if k]
        if obs.empty:
            raise ConfigError("immunology: no cells left after filtering: no cell expresses a gene known to the vocabulary")
        obs["cell_type"] = obs["cell_type"].cat.remove_unused_categories()
        obs, few = _cf.merge_rare_types(obs, c["min_test_cells"], c["rare_test_types"])
        ranked = [ranked[i] for i in obs.index]
        obs = obs.reset_index(drop=True)
        notes = {**cd.notes, **few, "n_genes_known": int(known.sum()), "n_genes_unknown": len(unknown), "unknown_genes": unknown,
                 "n_cells_no_known_gene": int((~keep).sum()), "median_source": median_note, "max_genes": max_genes,
                 "vocabulary": vocab.source, "n_cells_final": int(len(obs)),
                 "n_cells_filtered": int(cd.notes["n_cells_filtered"] + (~keep).sum() + few["n_cells_rare_dropped"])}
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
        if split not in ("all", "test", "train"):
            raise ConfigError(f"immunology: unknown split {split!r}; choose one of ['all', 'test', 'train']")
        rows = np.arange(len(obs)) if split == "all" else np.flatnonzero(obs["split"].to_numpy() == split)
        return Examples(obs=obs.iloc[rows].reset_index(drop=True), inputs=[ranked[i] for i in rows], concepts=self.concepts)

    # -- model --------------------------------------------------------------------------------------
    def model_spec(self) -> ModelSpec:
        c = self.config
        return ModelSpec(n_layers=c["n_layers"], hidden=c["hidden"], n_heads=c["n_heads"], max_genes=self.data_notes["max_genes"],
                         steps=c["train_steps"], batch_size=c["train_batch_size"], lr=c["lr"], mask_prob=c["mask_prob"],
                         seed=c["seed"])

    def model(self, spec: str | None = None) -> nn.Module:
        """The default masked-gene BERT, trained on the train-split cells once per config and data
        (kept by ``ctx.cached``), or the checkpoint of config ``model`` with its own vocabulary."""
        path = self.config["model"] if spec is None else spec
        if path and path != self.config["model"]:
            raise ConfigError("immunology: give a checkpoint through config 'model' (its vocabulary decides the tokens)")
        if path:
            model, self.vocab, self.training_info = load_checkpoint(_model_dir(path))
        else:
            train, _ = self._train_seqs()
            ms, vocab = self.model_spec(), self.vocabulary

            def build() -> tuple[nn.Module, GeneVocab, dict[str, Any]]:
                m, result = train_model(ms, vocab, train, trainer_options=self.trainer_options)
                return m, vocab, {"spec": asdict(ms), **result}

            model, self.vocab, self.training_info = self.ctx.cached(
                "immunology-model", stable_key(asdict(ms), vocab.tokens, train), build,
                save=lambda obj, folder: save_trained(folder, *obj), load=load_checkpoint)
        self._stack = find_layer_stack(model)
        return model

    def _train_seqs(self) -> tuple[list[list[int]], list[list[int]]]:
        """Token ids of the (train, test) cells."""
        obs, ranked, _ = self._prepare()
        train = obs["split"].to_numpy() == "train"
        seqs = [self.vocabulary.encode(r) for r in ranked]
        return [s for s, t in zip(seqs, train) if t], [s for s, t in zip(seqs, train) if not t]

    def batches(self, examples: Examples, model: nn.Module, *, batch_size: int = 32) -> Iterator[dict[str, torch.Tensor]]:
        """Token batches: ``input_ids``, ``attention_mask`` and ``position_mask`` (gene tokens)."""
        seqs = [self.vocabulary.encode(list(genes)) for genes in examples.inputs]
        for i in range(0, len(seqs), batch_size):
            yield collate(seqs[i: i + batch_size], self.vocabulary)

    # -- sites --------------------------------------------------------------------------------------
    def _structure(self) -> tuple[str, int]:
        """(block-list path, n layers), from the config without training or loading weights."""
        if self._stack is None:
            m = self.config["model"]
            self._stack = checkpoint_layer_stack(_model_dir(m)) if m else ("bert.encoder.layer", self.config["n_layers"])
        return self._stack

    @property
    def n_layers(self) -> int:
        return self._structure()[1]

    @property
    def aliases(self) -> dict[str, str]:
        """``layer.{i}`` -> the block list (``bert.encoder.layer.{i}``); ``embeddings`` -> the input embeddings."""
        stack = self._structure()[0]
        out = layer_aliases(stack)
        if stack.endswith("encoder.layer"):
            out["embeddings"] = stack[: -len("encoder.layer")] + "embeddings"
        return out

    def layer_site(self, key: str) -> str | None:
        """``layer.N`` of a layer config key (``sae_layer`` ...), None when unset."""
        v = self.config[key]
        if v is None or (isinstance(v, str) and not v.strip()):
            return None
        return f"layer.{layer_index(str(v).strip(), self.n_layers, key)}"

    @property
    def sites(self) -> list[str]:
        """The input embeddings (gene + rank-position embeddings) and every layer's output."""
        return (["embeddings"] if "embeddings" in self.aliases else []) + [f"layer.{i}" for i in range(self.n_layers)]

    @property
    def sae_site(self) -> str:
        """``sae_layer``, default the penultimate layer (Geneformer's cell-embedding default)."""
        return self.layer_site("sae_layer") or f"layer.{max(0, self.n_layers - 2)}"

    @property
    def steer_site(self) -> str:
        """``steer_layer``, default the middle layer (later layers and the masked-gene head read it)."""
        return self.layer_site("steer_layer") or f"layer.{self.n_layers // 2}"

    @property
    def readout_site(self) -> str:
        """Where the steering read-out probe reads: ``readout_layer`` (default: the last layer)."""
        return self.layer_site("readout_layer") or f"layer.{self.n_layers - 1}"

    #: mean over gene tokens (``position_mask``; not ``<cls>``/``<eos>``), Geneformer's cell embedding
    pooling = "masked"

    # -- fidelity -----------------------------------------------------------------------------------
    def task_loss(self, ctx: RunContext) -> TaskLoss | None:
        """Masked-gene cross-entropy on held-out (test-split) cells, at most ``TASK_MAX_CELLS`` (a
        seeded subset): a fixed seeded ``mask_prob`` of each cell's gene tokens replaced by ``<mask>``;
        ``log_probs`` over the vocabulary at the masked genes. None for a checkpoint without its
        masked-gene head (an encoder has no task of its own to splice into).

        Held out: the tiny default reads rank-value tokens of a few hundred cells and generalises to
        new cells of the same types (its held-out masked-gene accuracy is reported beside the
        position-frequency baseline), so held-out loss sits well below the zero-ablated loss.
        """
        model = ctx.model()  # also loads the vocabulary of a checkpoint
        if getattr(model, "get_output_embeddings", lambda: None)() is None:
            return None
        train, test = self._train_seqs()
        seqs = test or train
        if len(seqs) > TASK_MAX_CELLS:
            keep = np.sort(np.random.default_rng([self.config["seed"], 0x7A5]).choice(len(seqs), TASK_MAX_CELLS, replace=False))
            seqs = [seqs[i] for i in keep]
        # every chosen gene token replaced by <mask> (not BERT's 80/10/10): the same inputs every call
        batches = [collate(seqs[i:i + 64], self.vocabulary) for i in range(0, len(seqs), 64)]
        task = TokenPredictionTask.masked(batches, maskable=lambda b: b["position_mask"], mask_id=self.vocabulary.special["mask"],
                                          prob=self.config["mask_prob"], seed=self.config["seed"],
                                          name=f"masked-gene cross-entropy of {len(seqs)} {'held-out ' if test else ''}cells")
        return task.task_loss()

    @property
    def fidelity_positions(self) -> Any:
        """The gene positions when sequences start with ``<cls>``: position 0 is skipped. The SAE learns
        cell embeddings pooled over gene tokens only (``pooling = "masked"``), so ``<cls>`` -- the same
        token opening every cell -- is a vector it never saw. (``<eos>`` sits at a different position in
        each cell and cannot be named by a position; padding is masked out of attention, so splicing
        it changes nothing.)"""
        return slice(1, None) if self.vocabulary.use_cls else None

    # -- concepts, probes, baselines ------------------------------------------------------------------
    @property
    def concepts(self) -> list[str]:
        """Cell type, the technical covariates, and cell-cycle phase where the file has it."""
        obs = self.obs
        return ["cell_type"] + [c for c in (*_f.TECHNICAL, "phase")
                                if c in obs.columns and obs[c].notna().all() and obs[c].nunique() > 1]

    @property
    def probe_targets(self) -> list[str]:
        """Config ``probe_targets`` or cell type + library size + genes detected (the technical pair)."""
        wanted, obs = list(self.config["probe_targets"]) or list(DEFAULT_PROBE_TARGETS), self.obs
        missing = [t for t in wanted if t not in obs.columns]
        if missing:
            raise ConfigError(f"immunology: config 'probe_targets' names {missing}, not obs columns; choose from {list(obs.columns)}")
        return [t for t in wanted if obs[t].notna().all() and obs[t].nunique() > 1]

    def baseline_features(self, examples: Examples) -> dict[str, np.ndarray]:
        """Bars the model's embeddings are read against, probed through the same folds: ``pca<k>_logexpr``
        (PCA-50 of the log-normalised expression, label-free), ``logexpr_genes`` (the 2,000 most variable
        genes; config ``gene_baseline``) and ``untrained_model`` (random weights, same tokens, last layer)."""
        dense, pcs = self.expression_views(examples.obs)
        out = {f"pca{pcs.shape[1]}_logexpr": pcs}
        if self.config["gene_baseline"]:
            out["logexpr_genes"] = dense
        out["untrained_model"] = self._untrained_embeddings(examples)
        return out

    def expression_views(self, obs: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """(log-expression of the <= 2,000 most variable genes, its PCA) for the cells of ``obs``."""
        from sklearn.decomposition import PCA

        logx = self.log_expression(obs)
        var = np.asarray(logx.power(2).mean(0)).ravel() - np.asarray(logx.mean(0)).ravel() ** 2
        dense = logx[:, np.sort(np.argsort(-var, kind="stable")[:2000])].toarray().astype(np.float64)
        k = max(1, min(50, dense.shape[0] - 1, dense.shape[1]))
        pcs = PCA(n_components=k, random_state=self.config["seed"]).fit_transform(dense)
        return dense.astype(np.float32), pcs.astype(np.float32)

    def _untrained_embeddings(self, examples: Examples) -> np.ndarray:
        """Last-layer cell embeddings (mean over gene tokens) of a randomly initialised model."""
        if self.config["model"]:
            from transformers import AutoConfig

            cfg = AutoConfig.from_pretrained(_model_dir(self.config["model"]), local_files_only=True, trust_remote_code=False)
            torch.manual_seed(self.config["seed"])
            model = auto_model_class(cfg).from_config(cfg).eval()
        else:
            model = build_model(self.model_spec(), self.vocabulary).eval()
        batches = self.batches(examples, model, batch_size=64)
        last = f"layer.{self.n_layers - 1}"
        return pooled_activations(model, batches, last, pooling="masked", aliases=self.aliases).astype(np.float32)

    def log_expression(self, obs: pd.DataFrame) -> Any:
        """``log1p`` normalised expression of the cells of ``obs`` (by ``cell_id``), csr float32."""
        cd = self.cells
        pos = pd.Series(np.arange(len(cd.obs)), index=cd.obs["cell_id"].to_numpy())
        return _data.log_expression(cd.X[pos.loc[obs["cell_id"].to_numpy()].to_numpy()], cd.input_type)

    def type_markers(self, n: int | None = None) -> dict[str, list[str]]:
        """Top ``n`` data-driven markers per cell type (:func:`.markers.wilcoxon_markers` on the
        log-normalised expression of every kept cell, vocabulary genes): steering scores, marker recovery."""
        n = int(n or self.config["n_markers"])
        if n not in self._markers:
            known = set(self.vocabulary.ids)
            cols = [j for j, g in enumerate(self.cells.genes) if g in known]
            self._markers[n] = wilcoxon_markers(self.log_expression(self.obs)[:, cols], self.obs["cell_type"].to_numpy(),
                                                [self.cells.genes[j] for j in cols], n)
        return self._markers[n]

    # -- contrasts and steering ---------------------------------------------------------------------
    def steer_pairs(self) -> list[tuple[str, str]]:
        """(source, target) cell types to steer between (checked against the data)."""
        types = [str(t) for t in self.obs["cell_type"].cat.categories]
        pairs = [tuple(s.strip() for s in str(p).split(">")) for p in self.config["steer_pairs"]]
        for t in (t for p in pairs for t in p):
            if t not in types:
                raise ConfigError(f"immunology: config 'steer_pairs' names cell type {t!r}, not in the data; types: {types}")
        if not pairs and len(types) >= 2:
            mono, b = match_types(_MONO, types), match_types(_B, types)
            big = self.obs["cell_type"].value_counts().index[:2]
            pairs = [(mono[0], b[0])] if mono and b and mono[0] != b[0] else [(str(big[0]), str(big[1]))]
        return pairs  # type: ignore[return-value]

    @property
    def contrasts(self) -> dict[str, tuple[str, str]]:
        """``{source_to_target: (target query, source query)}``: the vector points source -> target."""
        return {f"{_slug(s)}_to_{_slug(t)}": (f"cell_type == {t!r}", f"cell_type == {s!r}") for s, t in self.steer_pairs()}

    def steering_plans(self, ctx: RunContext) -> list[SteeringPlan]:
        """One difference-of-means plan per steer pair at :attr:`steer_site`, scored on the source cells
        beside the real target cells (:func:`.analyses.steering`)."""
        plans = []
        for s, t in self.steer_pairs():
            name = f"{_slug(s)}_to_{_slug(t)}"
            scorer, reference = _a.steering(self, ctx, s, t)
            if scorer is not None:
                plans.append(contrast_plan(ctx, name, *self.contrasts[name], scorer, site=self.steer_site,
                                           headline="p_target_type", reference=reference))
        return plans

    def tracing_pairs(self, ctx: RunContext) -> "CounterfactualPairs | None":
        """A source-type and a target-type cell, rank slot by rank slot (:func:`.tracing.tracing_pairs`)."""
        return _tracing.tracing_pairs(self, ctx)

    # -- feature cards (:mod:`.cards`); ranked by the core's default, which here is the cell-type AUROC
    @property
    def card_columns(self) -> list[str]:
        """Cell type, clustering, phase, genes detected, library size, split (:func:`.cards.card_columns`)."""
        from . import cards

        return cards.card_columns(self.obs)

    def lens_basis(self, ctx: RunContext) -> tuple[Any, list[str], str] | None:
        """The masked-gene head's gene embeddings (:func:`.cards.lens_basis`)."""
        from . import cards

        return cards.lens_basis(self, ctx)

    def render_examples(self, ctx: RunContext, feature: int, examples: pd.DataFrame) -> list[Any]:
        """The cells on the UMAP and the genes the feature fires on (:func:`.cards.render_examples`)."""
        from .cards import render_examples

        return render_examples(ctx, feature, examples)

    # -- analyses the stages run ----------------------------------------------------------------------
    def analyses(self) -> list[Analysis]:
        """One per stage (examples, model, probes, features): the functions of :mod:`.analyses`."""
        return [Analysis("data notes", "examples", lambda ctx: _a.data_notes(self, ctx)),
                Analysis("masked-gene accuracy", "model", lambda ctx: _a.masked_gene_rows(self, ctx)),
                Analysis("cell-type macro-F1", "probes", _a.cell_type_f1),
                Analysis("cell types, markers and technical features", "features", lambda ctx: _a.feature_rows(self, ctx))]


def _model_dir(spec: str | Path) -> Path:
    """A local Hugging Face model directory (config ``model``); ConfigError otherwise."""
    if not Path(str(spec)).expanduser().exists():
        raise ConfigError(f"immunology: model path {str(spec)!r} does not exist (config 'model')")
    return checkpoint_dir(spec)
