"""A small BERT masked-gene model (Geneformer's recipe at laptop scale), trained with Lightning.

Geneformer pretrains a BERT encoder by masked-gene prediction on rank-value encoded cells (15% of
each cell's gene tokens hidden, the model predicts which gene sat at that rank). A trained model is
saved as a Hugging Face directory with its :class:`~.tokenize.GeneVocab` and ``training.json``; a
Geneformer checkpoint with a JSON token dictionary loads the same way (:func:`load_checkpoint`).
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sciscope.core.errors import ConfigError
from sciscope.core.training import fit_lightning, loss_module

from .tokenize import GeneVocab, collate

__all__ = ["ModelSpec", "build_model", "load_checkpoint", "mask_genes", "masked_gene_accuracy",
           "save_trained", "train_model"]


@dataclass
class ModelSpec:
    """Size and training recipe of the default model (every field enters the cache key)."""

    n_layers: int = 4
    hidden: int = 128
    n_heads: int = 4
    max_genes: int = 128
    steps: int = 1500
    batch_size: int = 32
    lr: float = 1e-3
    warmup: int = 100
    mask_prob: float = 0.15
    dropout: float = 0.0  # tiny model, few cells: dropout mostly slows convergence
    seed: int = 0


def build_model(spec: ModelSpec, vocab: GeneVocab) -> nn.Module:
    """A randomly initialised ``BertForMaskedLM`` of the spec's size over ``vocab``."""
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(spec.seed)
    cfg = BertConfig(vocab_size=vocab.vocab_size, hidden_size=spec.hidden, num_hidden_layers=spec.n_layers,
                     num_attention_heads=spec.n_heads, intermediate_size=4 * spec.hidden, type_vocab_size=1,
                     max_position_embeddings=spec.max_genes + (2 if vocab.use_cls else 0), pad_token_id=vocab.special["pad"],
                     hidden_dropout_prob=spec.dropout, attention_probs_dropout_prob=spec.dropout)
    return BertForMaskedLM(cfg)


def mask_genes(
    ids: torch.Tensor, vocab: GeneVocab, *, prob: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking of gene tokens: ``prob`` of them become targets; 80% ``<mask>``, 10% a random
    gene, 10% unchanged. Returns ``(inputs, labels)`` with labels -100 off target. (B, P) each."""
    real = ~vocab.special_mask(ids)
    chosen = (torch.rand(ids.shape, generator=generator) < prob) & real
    # every cell contributes at least one target, so no row of a batch is wasted
    none = (chosen.sum(1) == 0) & real.any(1)
    if none.any():
        pick = (torch.rand(ids.shape, generator=generator) * real).argmax(1)
        rows = torch.nonzero(none).reshape(-1)
        chosen[rows, pick[rows]] = True
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    inputs = ids.clone()
    r = torch.rand(ids.shape, generator=generator)
    inputs[chosen & (r < 0.8)] = vocab.special["mask"]
    gene_ids = torch.as_tensor(vocab.gene_ids())
    rand = gene_ids[torch.randint(len(gene_ids), ids.shape, generator=generator)]
    swap = chosen & (r >= 0.8) & (r < 0.9)
    inputs[swap] = rand[swap]
    return inputs, labels


def _lightning_module(model: nn.Module, spec: ModelSpec, vocab: GeneVocab) -> Any:
    """Masked-gene loss on padded batches (AdamW, linear warmup then cosine decay to 10%)."""
    gen = torch.Generator().manual_seed(spec.seed + 1)

    def masked_gene_loss(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        ids, att = batch["input_ids"], batch["attention_mask"]
        inputs, labels = mask_genes(ids, vocab, prob=spec.mask_prob, generator=gen)
        return model(input_ids=inputs, attention_mask=att, labels=labels).loss

    return loss_module(model, masked_gene_loss, lr=spec.lr, steps=spec.steps, warmup=spec.warmup, floor=0.1,
                       betas=(0.9, 0.98))


class _CellBatches:
    """Seeded shuffled batches of cells, grouped by length (less padding), one epoch per pass."""

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int) -> None:
        self.lengths = np.asarray(lengths)
        self.batch_size = max(1, min(int(batch_size), len(self.lengths)))
        self.seed, self.epoch = seed, 0

    def __len__(self) -> int:
        return max(1, len(self.lengths) // self.batch_size)

    def __iter__(self):  # noqa: ANN204
        rng = np.random.default_rng([self.seed, self.epoch])
        self.epoch += 1
        order = rng.permutation(len(self.lengths))
        order = order[np.argsort(self.lengths[order], kind="stable")]
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        batches = [b for b in batches if len(b) == self.batch_size] or batches
        for k in rng.permutation(len(batches))[: len(self)]:
            yield batches[k].tolist()


def train_model(spec: ModelSpec, vocab: GeneVocab, seqs: Sequence[Sequence[int]], *, progress: bool = False,
                trainer_options: dict[str, Any] | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Train a fresh masked-gene ``BertForMaskedLM`` on token sequences for ``spec.steps`` optimiser steps.

    The loader cycles over the cells until ``steps``. Returns the model and what training produced
    (steps, seconds, steps_per_second, final_loss, n_train, history; written as ``training.json``).
    """
    from torch.utils.data import DataLoader

    seqs = [list(s) for s in seqs if len(s) > (2 if vocab.use_cls else 0)]
    if not seqs:
        raise ConfigError("immunology: no training cell has a gene known to the vocabulary")
    model = build_model(spec, vocab)
    module = _lightning_module(model, spec, vocab)
    loader = DataLoader(seqs, batch_sampler=_CellBatches([len(s) for s in seqs], spec.batch_size, spec.seed),
                        collate_fn=lambda b: collate(b, vocab))
    seconds = fit_lightning(module, loader, max_steps=spec.steps, progress=progress, trainer_options=trainer_options)
    model.eval()
    hist = module.history
    final = float(np.mean([h["loss"] for h in hist[-4:]])) if hist else float("nan")
    return model, {"steps": spec.steps, "seconds": round(seconds, 2), "final_loss": final, "n_train": len(seqs),
                   "steps_per_second": round(spec.steps / max(seconds, 1e-9), 2), "history": hist}


def save_trained(directory: str | Path, model: nn.Module, vocab: GeneVocab, info: dict[str, Any]) -> Path:
    """Write a Hugging Face directory + vocabulary + ``training.json`` (``ctx.cached`` makes it atomic)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    vocab.save(directory)
    (directory / "training.json").write_text(json.dumps(info, indent=1, default=str))
    return directory


def load_checkpoint(directory: str | Path) -> tuple[nn.Module, GeneVocab, dict[str, Any]]:
    """A masked-gene model directory (sciscope-trained or Geneformer-style; masked-LM checkpoints keep
    their head) with its vocabulary and ``training.json``, via :func:`sciscope.core.loading.load_checkpoint`.

    Raises
    ------
    ConfigError
        Not a model directory, unreadable config/weights, or no gene vocabulary.
    """
    from sciscope.core.loading import load_checkpoint as load_hf

    d = Path(str(directory)).expanduser()
    vocab = GeneVocab.load(d)
    try:
        model = load_hf(d)
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"immunology: cannot load the model in {d}: {e}") from None
    info = json.loads((d / "training.json").read_text()) if (d / "training.json").is_file() else {}
    if vocab.vocab_size > model.config.vocab_size:
        raise ConfigError(f"immunology: the vocabulary of {d} has {vocab.vocab_size} tokens, the model "
                          f"only {model.config.vocab_size} embeddings")
    return model, vocab, info


@torch.no_grad()
def masked_gene_accuracy(
    model: nn.Module, vocab: GeneVocab, seqs: Sequence[Sequence[int]], train_seqs: Sequence[Sequence[int]],
    *, prob: float = 0.15, seed: int = 0, batch_size: int = 64,
) -> dict[str, float]:
    """Held-out masked-gene top-1 accuracy (``prob`` of each cell's gene tokens replaced by ``<mask>``,
    seeded) beside the gene most often seen at each rank position in ``train_seqs``: what knowing
    "which genes tend to rank high" gives without reading the cell."""
    head = getattr(model, "get_output_embeddings", lambda: None)()
    if head is None:  # an encoder without a masked-gene head predicts nothing
        return {}
    gen = torch.Generator().manual_seed(seed + 7)
    gene_ids = torch.as_tensor(vocab.gene_ids())
    # most frequent gene per position in the training cells
    n_pos = max(len(s) for s in list(seqs) + list(train_seqs))
    counts: dict[int, Counter] = defaultdict(Counter)
    for s in train_seqs:
        for p, t in enumerate(s):
            counts[p][t] += 1
    baseline = torch.full((n_pos,), -1, dtype=torch.long)
    for p, c in counts.items():
        baseline[p] = max(c.items(), key=lambda kv: (kv[1], -kv[0]))[0]
    hits = base_hits = total = 0
    was = model.training
    model.eval()
    try:
        for i in range(0, len(seqs), batch_size):
            b = collate(seqs[i:i + batch_size], vocab)
            ids, real = b["input_ids"], b["position_mask"]
            chosen = (torch.rand(ids.shape, generator=gen) < prob) & real
            inputs = ids.masked_fill(chosen, vocab.special["mask"])
            logits = model(input_ids=inputs, attention_mask=b["attention_mask"]).logits  # (B, P, V)
            pred = gene_ids[logits[..., gene_ids].argmax(-1)]  # restricted to gene tokens
            hits += int((pred[chosen] == ids[chosen]).sum())
            pos = torch.arange(ids.shape[1]).expand_as(ids)
            base_hits += int((baseline[pos[chosen]] == ids[chosen]).sum())
            total += int(chosen.sum())
    finally:
        model.train(was)
    return {"masked_gene_accuracy": hits / max(total, 1), "position_frequency_accuracy": base_hits / max(total, 1),
            "n_masked": total, "chance": 1.0 / len(gene_ids)}
