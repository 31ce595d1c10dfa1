"""Small molecule language models: a RoBERTa masked LM (SELFormer-style) and a GPT-2 causal LM.

Both are Hugging Face models built from a config (random init) and trained here with PyTorch
Lightning on the training molecules, within minutes on a CPU; saved as Hugging Face directories
(:func:`save_trained`) that other tools can open with ``from_pretrained``.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sciscope.core.training import fit_lightning, loss_module

from .tokenize import BOS, EOS, MASK, PAD, SPECIAL_TOKENS, TOKENIZER_FILE, MoleculeTokenizer, pad_batch

__all__ = ["ModelSpec", "TrainResult", "generate", "load_trained", "save_trained", "train_model"]

ARCHITECTURES = ("roberta", "gpt")


@dataclass
class ModelSpec:
    """Size and training recipe of a default model (every field goes into the cache key)."""

    architecture: str = "roberta"  # roberta (masked LM) | gpt (causal LM)
    n_layers: int = 4
    hidden: int = 128
    n_heads: int = 4
    max_length: int = 128  # tokens incl. <bos>/<eos>
    steps: int = 1500
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 100
    mask_prob: float = 0.15  # masked LM only
    dropout: float = 0.0  # tiny models on small data: dropout mostly slows convergence
    seed: int = 0


@dataclass
class TrainResult:
    """What training produced (also written as ``training.json``)."""

    steps: int
    seconds: float
    steps_per_second: float
    final_loss: float
    n_train: int
    history: list[dict[str, float]]


def build_model(spec: ModelSpec, vocab_size: int) -> nn.Module:
    """A randomly initialised ``RobertaForMaskedLM`` or ``GPT2LMHeadModel`` of the spec's size."""
    torch.manual_seed(spec.seed)
    if spec.architecture == "roberta":
        from transformers import RobertaConfig, RobertaForMaskedLM

        cfg = RobertaConfig(
            vocab_size=vocab_size, hidden_size=spec.hidden, num_hidden_layers=spec.n_layers,
            num_attention_heads=spec.n_heads, intermediate_size=4 * spec.hidden,
            # RoBERTa numbers positions from pad_token_id + 1, so it needs two spare rows
            max_position_embeddings=spec.max_length + PAD + 2, type_vocab_size=1,
            pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS,
            hidden_dropout_prob=spec.dropout, attention_probs_dropout_prob=spec.dropout,
        )
        model = RobertaForMaskedLM(cfg)
    elif spec.architecture == "gpt":
        from transformers import GPT2Config, GPT2LMHeadModel

        cfg = GPT2Config(
            vocab_size=vocab_size, n_embd=spec.hidden, n_layer=spec.n_layers, n_head=spec.n_heads,
            n_positions=spec.max_length, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
            resid_pdrop=spec.dropout, embd_pdrop=spec.dropout, attn_pdrop=spec.dropout,
        )
        model = GPT2LMHeadModel(cfg)
    else:
        raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {spec.architecture!r}")
    cfg.architectures = [type(model).__name__]  # as save_pretrained writes it: causal or masked LM
    return model


def mask_tokens(ids: torch.Tensor, attention: torch.Tensor, *, prob: float, vocab_size: int,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: ``prob`` of the real (non-special) tokens are targets; of those 80% become
    ``<mask>``, 10% a random token, 10% stay. Returns (inputs, labels with -100 elsewhere)."""
    real = (attention.bool()) & (ids >= len(SPECIAL_TOKENS))
    chosen = (torch.rand(ids.shape, generator=generator) < prob) & real
    # every molecule gets at least one target, so no batch row is wasted
    none = chosen.sum(1) == 0
    if none.any():
        pick = (torch.rand(ids.shape, generator=generator) * real).argmax(1)
        rows = torch.nonzero(none & real.any(1)).reshape(-1)
        chosen[rows, pick[rows]] = True
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    inputs = ids.clone()
    r = torch.rand(ids.shape, generator=generator)
    inputs[chosen & (r < 0.8)] = MASK
    rand_tok = torch.randint(len(SPECIAL_TOKENS), vocab_size, ids.shape, generator=generator)
    swap = chosen & (r >= 0.8) & (r < 0.9)
    inputs[swap] = rand_tok[swap]
    return inputs, labels


class LengthGroupedBatches:
    """Batches of similar length (less padding, ~2x faster on CPU), in a seeded random order.

    Each epoch shuffles the molecules, sorts them by length within windows of 50 batches, cuts
    the windows into batches and shuffles the batches: the order stays random, padding small.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, window: int = 50) -> None:
        self.lengths = np.asarray(lengths)
        self.batch_size = max(1, min(int(batch_size), len(self.lengths)))
        self.seed, self.window, self.epoch = seed, window, 0

    def __len__(self) -> int:
        return max(1, len(self.lengths) // self.batch_size)

    def __iter__(self):  # noqa: ANN204
        rng = np.random.default_rng([self.seed, self.epoch])
        self.epoch += 1
        order = rng.permutation(len(self.lengths))
        span = self.batch_size * self.window
        batches = []
        for w0 in range(0, len(order), span):
            win = order[w0:w0 + span]
            win = win[np.argsort(self.lengths[win], kind="stable")]
            batches += [win[i:i + self.batch_size] for i in range(0, len(win), self.batch_size)]
        batches = [b for b in batches if len(b) == self.batch_size] or batches  # drop ragged tails
        for k in rng.permutation(len(batches))[: len(self)]:
            yield batches[k].tolist()


def train_model(spec: ModelSpec, tokenizer: MoleculeTokenizer, smiles: Sequence[str], *, progress: bool = False,
                trainer_options: dict[str, Any] | None = None) -> tuple[nn.Module, TrainResult]:
    """Train a fresh model of ``spec`` on ``smiles`` for ``spec.steps`` optimiser steps (CPU).

    The model carries its ``tokenizer`` and ``training_info`` (spec and :class:`TrainResult`), which
    :func:`save_trained` writes beside the weights.

    Batches are drawn by a seeded shuffle and padded to their longest molecule; one epoch is
    rarely enough for the tiny default set, so the data loader cycles until ``steps``.
    ``trainer_options`` go to ``lightning.Trainer`` (``accelerator``, ``devices``, ``strategy``,
    ``num_nodes``; CPU and one device by default).
    """
    from torch.utils.data import DataLoader

    seqs = []
    for s in smiles:
        try:
            seqs.append(tokenizer.encode(s))
        except ValueError:
            continue  # a molecule the tokenizer cannot split is skipped (counted by n_train)
    if not seqs:
        raise ValueError("no molecule could be tokenised for training")
    model = build_model(spec, tokenizer.vocab_size)
    gen = torch.Generator().manual_seed(spec.seed + 1)

    def lm_loss(batch: dict[str, torch.Tensor]) -> torch.Tensor:  # masked or causal LM loss on padded id batches
        ids, att = batch["input_ids"], batch["attention_mask"]
        if spec.architecture == "roberta":
            inputs, labels = mask_tokens(ids, att, prob=spec.mask_prob, vocab_size=tokenizer.vocab_size, generator=gen)
        else:
            inputs, labels = ids, ids.masked_fill(att == 0, -100)  # shifted inside the model
        return model(input_ids=inputs, attention_mask=att, labels=labels).loss

    # AdamW, warmup then cosine decay to 10%
    module = loss_module(model, lm_loss, lr=spec.lr, steps=spec.steps, warmup=spec.warmup, floor=0.1, betas=(0.9, 0.98))
    loader = DataLoader(seqs, batch_sampler=LengthGroupedBatches([len(s) for s in seqs], spec.batch_size, spec.seed),
                        collate_fn=pad_batch)
    seconds = fit_lightning(module, loader, max_steps=spec.steps, progress=progress, trainer_options=trainer_options)
    model.eval()
    hist = module.history
    final = float(np.mean([h["loss"] for h in hist[-4:]])) if hist else float("nan")
    result = TrainResult(spec.steps, round(seconds, 2), round(spec.steps / max(seconds, 1e-9), 2), final, len(seqs), hist)
    model.tokenizer, model.training_info = tokenizer, {"spec": asdict(spec), **asdict(result)}
    return model, result


def save_trained(model: nn.Module, directory: str | Path) -> None:
    """Write a model trained here (it carries ``tokenizer`` and ``training_info``) as a Hugging Face
    directory plus its tokenizer and training log (``training.json``)."""
    directory = Path(directory)
    model.save_pretrained(directory)
    model.tokenizer.save(directory)
    (directory / "training.json").write_text(json.dumps(model.training_info, indent=1))


def load_trained(directory: str | Path) -> nn.Module:
    """A local Hugging Face model directory (offline), with ``tokenizer`` and ``training_info``.

    The tokenizer is this package's (``sciscope_tokenizer.json``, as :func:`save_trained` writes
    it) or else the directory's Hugging Face tokenizer; ``training_info`` is ``{}`` without
    ``training.json``.
    """
    from sciscope.core.loading import load_checkpoint, load_tokenizer

    directory = Path(directory)
    model = load_checkpoint(directory)
    has_own = (directory / TOKENIZER_FILE).is_file()
    model.tokenizer = MoleculeTokenizer.load(directory) if has_own else load_tokenizer(directory)
    info = directory / "training.json"
    model.training_info = json.loads(info.read_text()) if info.is_file() else {}
    return model


@torch.no_grad()
def generate(model: nn.Module, tokenizer: MoleculeTokenizer, n: int, *, max_length: int | None = None,
             temperature: float = 1.0, seed: int = 0, batch_size: int = 128) -> list[str]:
    """Sample ``n`` molecules from a causal LM, decoded to SMILES (``""`` when empty).

    Sampling starts at ``<bos>`` and stops at ``<eos>`` or ``max_length`` tokens; the first
    token is always an atom (``<eos>``, bonds, branches and ring tokens are masked there, as
    nothing can start a molecule with them). Each batch uses its own seeded generator, so the same
    seed gives the same molecules, also under a steering hook (which then changes only what the hook
    changes). SMILES outputs are returned as sampled (they may be invalid); SELFIES outputs are
    decoded, which always gives a molecule.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    limit = min(max_length or tokenizer.max_length, getattr(model.config, "n_positions", 10**9))
    first_banned = tokenizer.non_atom_ids
    # transformers 5 renamed the key/value cache argument ``past_key_values`` -> ``cache``
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out: list[str] = []
    try:
        for b0 in range(0, n, batch_size):
            bs = min(batch_size, n - b0)
            g = torch.Generator().manual_seed(seed * 100_003 + b0)
            ids = torch.full((bs, 1), BOS, dtype=torch.long, device=device)
            done = torch.zeros(bs, dtype=torch.bool, device=device)
            past, step_in = None, ids
            for t in range(limit - 1):
                att = torch.ones(bs, ids.shape[1], dtype=torch.long, device=device)  # no padding while sampling
                res = model(input_ids=step_in, attention_mask=att, use_cache=True, **{cache_arg: past})
                past = res.get("cache", None) or res.get("past_key_values", None)
                logits = res.logits[:, -1, :].float().cpu()
                logits[:, [PAD, BOS, MASK]] = -torch.inf  # never sample these inside a molecule
                if t == 0:
                    logits[:, [EOS, *first_banned]] = -torch.inf  # a molecule starts with an atom
                if temperature <= 0:
                    nxt = logits.argmax(-1)
                else:
                    nxt = torch.multinomial(torch.softmax(logits / temperature, dim=-1), 1, generator=g).reshape(-1)
                nxt = torch.where(done.cpu(), torch.full_like(nxt, PAD), nxt).to(device)
                ids = torch.cat([ids, nxt[:, None]], dim=1)
                done |= nxt == EOS
                if bool(done.all()):
                    break
                step_in = nxt[:, None]
            out.extend(tokenizer.decode(row.tolist()) for row in ids)
    finally:
        model.train(was_training)
    return out
