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
             temperature: float = 1.0, seed: int = 0, batch_size: int = 128,
             copies: int | None = None) -> list[str] | list[list[str]]:
    """Sample ``n`` molecules from a causal LM, decoded to SMILES (``""`` when empty).

    Sampling starts at ``<bos>`` and stops at ``<eos>`` or ``max_length`` tokens; the first
    token is always an atom (``<eos>``, bonds, branches and ring tokens are masked there, as
    nothing can start a molecule with them). SMILES outputs are returned as sampled (they may be
    invalid); SELFIES outputs are decoded, which always gives a molecule.

    Each batch of ``batch_size`` sequences has its own generator, seeded by ``seed`` and the batch's
    offset, which draws one uniform per sequence per step, whether or not the sequence has ended;
    the token is the one whose cumulative probability first exceeds it (inverse-CDF sampling). The
    same seed therefore gives the same molecules, also under a steering hook (which then changes
    only what the hook changes), and two models that share a seed share their uniforms.

    Parameters
    ----------
    model, tokenizer
        A causal LM and this package's tokenizer.
    n
        Molecules to sample.
    max_length
        Token limit including ``<bos>`` (the tokenizer's by default, at most the model's positions).
    temperature
        Softmax temperature; ``<= 0`` takes the most likely token (no randomness).
    seed
        Seeds the sampling.
    batch_size
        Distinct sequences sampled per forward pass (with ``copies``, each forward carries
        ``copies * batch_size`` rows).
    copies
        For batched steering (:func:`~sciscope.core.interventions.apply_copies`): every forward
        carries ``copies`` stacked copies of the batch (copy-major), which share the uniforms;
        returns one list of molecules per copy, each what ``generate`` without ``copies`` returns
        under that copy's intervention alone. ``None``: one list.

    Notes
    -----
    Earlier versions sampled with ``torch.multinomial``: the same seed now draws other molecules
    (from the same distribution). Inverse-CDF sampling was chosen because its randomness (one
    uniform per sequence and step) does not depend on the probabilities, so copies under different
    interventions can share it.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    limit = min(max_length or tokenizer.max_length, getattr(model.config, "n_positions", 10**9))
    first_banned = tokenizer.non_atom_ids
    # transformers 5 renamed the key/value cache argument ``past_key_values`` -> ``cache``
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    k = 1 if copies is None else int(copies)
    if k < 1:
        raise ValueError(f"generate: copies must be at least 1, got {copies}")
    out: list[list[str]] = [[] for _ in range(k)]
    try:
        for b0 in range(0, n, batch_size):
            bs = min(batch_size, n - b0)
            rows = k * bs
            g = torch.Generator().manual_seed(seed * 100_003 + b0)
            ids = torch.full((rows, 1), BOS, dtype=torch.long, device=device)
            done = torch.zeros(rows, dtype=torch.bool)
            past, step_in = None, ids
            for t in range(limit - 1):
                att = torch.ones(rows, ids.shape[1], dtype=torch.long, device=device)  # no padding while sampling
                res = model(input_ids=step_in, attention_mask=att, use_cache=True, **{cache_arg: past})
                past = res.get("cache", None) or res.get("past_key_values", None)
                logits = res.logits[:, -1, :].float().cpu()
                logits[:, [PAD, BOS, MASK]] = -torch.inf  # never sample these inside a molecule
                if t == 0:
                    logits[:, [EOS, *first_banned]] = -torch.inf  # a molecule starts with an atom
                if temperature <= 0:
                    nxt = logits.argmax(-1)
                else:
                    # drawn every step, also once all sequences of this call have ended: a batched call
                    # (copies) runs on while any copy samples, and its draws must line up with these
                    u = torch.rand(bs, generator=g, dtype=torch.float64).repeat(k)
                    nxt = _inverse_cdf(torch.softmax(logits / temperature, dim=-1), u)
                nxt = torch.where(done, torch.full_like(nxt, PAD), nxt)  # an ended sequence stays ended
                ids = torch.cat([ids, nxt[:, None].to(device)], dim=1)
                done |= nxt == EOS
                if bool(done.all()):
                    break
                step_in = nxt[:, None].to(device)
            for i in range(k):
                out[i].extend(tokenizer.decode(row.tolist()) for row in ids[i * bs:(i + 1) * bs].cpu())
    finally:
        model.train(was_training)
    return out[0] if copies is None else out


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per row, the first token whose cumulative probability exceeds ``u * total`` (``u`` in [0, 1)).

    The cumulative sum is taken in float64 and ``u`` scaled by the row's own total (the softmax
    need not sum to exactly 1); ``right=True`` skips zero-probability tokens (their bins are
    empty), so a masked token is never drawn, also at ``u = 0``. Should ``u * total`` round up to the
    total, no bin exceeds it: the last token of positive probability is taken.
    """
    cdf = torch.cumsum(probs.double(), dim=-1)
    idx = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).reshape(-1)
    vocab = probs.shape[-1]
    last = vocab - 1 - (probs > 0).flip(-1).int().argmax(-1)  # last token of positive probability
    return torch.where(idx >= vocab, last, idx)
