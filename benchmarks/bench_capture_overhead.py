"""Capture overhead: sciscope.collect vs the plain forward a user writes with output_hidden_states.

One run measures, on the same model and inputs:

* ``plain``: ``model(**batch, output_hidden_states=True)`` + masked mean pooling of every layer,
  kept in memory (the baseline);
* ``collect``: :func:`sciscope.core.collect` of every layer's output, mean-pooled, streamed to an
  on-disk ActivationStore (hooks, pooling, finite checks and disk writes included);
* ``collect (1 early layer, stop_early)``: one layer, skipping the rest of the forward.

Usage::

    python benchmarks/bench_capture_overhead.py [--n 4000] [--batch-size 64] [--seq-len 16]

Writes ``benchmarks/results/capture_overhead.json``. The default model is all-MiniLM-L6-v2's
shape (6 layers, 384 wide) with random weights; pass ``--model DIR`` for a local HF checkpoint.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch


def build_model(path: str | None):
    from transformers import AutoModel, BertConfig, BertModel

    if path:
        return AutoModel.from_pretrained(path).eval()
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                     intermediate_size=1536, max_position_embeddings=512)
    return BertModel(cfg).eval()


def make_batches(n: int, batch_size: int, seq_len: int, vocab: int):
    g = torch.Generator().manual_seed(0)
    batches = []
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        ids = torch.randint(1000, vocab, (b, seq_len), generator=g)
        lengths = torch.randint(seq_len // 2, seq_len + 1, (b,), generator=g)
        mask = (torch.arange(seq_len)[None] < lengths[:, None]).long()
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def plain_forward(model, batches):
    pooled = []
    with torch.inference_mode():
        for batch in batches:
            hs = model(**batch, output_hidden_states=True).hidden_states[1:]
            m = batch["attention_mask"].unsqueeze(-1).float()
            pooled.append([((h * m).sum(1) / m.sum(1)).numpy() for h in hs])
    return pooled


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=4000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model", default=None)
    args = ap.parse_args()

    from sciscope.core import collect

    model = build_model(args.model)
    layers = [f"encoder.layer.{i}" for i in range(model.config.num_hidden_layers)]
    batches = make_batches(args.n, args.batch_size, args.seq_len, model.config.vocab_size)
    plain_forward(model, batches[:2])  # warm-up
    with tempfile.TemporaryDirectory() as tmp:
        t_plain = best_of(lambda: plain_forward(model, batches), args.repeats)
        t_collect = best_of(lambda: collect(model, batches, layers, out=Path(tmp) / "all", pooling="mean", progress=False), args.repeats)
        t_early = best_of(lambda: collect(model, batches, layers[:1], out=Path(tmp) / "one", pooling="mean", progress=False, stop_early=True), args.repeats)
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "torch": torch.__version__, "threads": torch.get_num_threads()},
        "n_examples": args.n, "batch_size": args.batch_size, "seq_len": args.seq_len, "layers": len(layers),
        "plain_forward_s": t_plain,
        "collect_all_layers_s": t_collect,
        "collect_first_layer_stop_early_s": t_early,
        "overhead_all_layers": t_collect / t_plain - 1,
        "ratio_first_layer_stop_early": t_early / t_plain,
    }
    out = Path(__file__).parent / "results" / "capture_overhead.json"
    out.parent.mkdir(exist_ok=True)
    from sciscope.core.io import write_json

    write_json(out, result)
    print(f"machine: {result['machine']}")
    print(f"plain forward + output_hidden_states ({args.n} examples): {t_plain:.3f} s")
    print(f"sciscope collect, {len(layers)} layers to disk:             {t_collect:.3f} s  (overhead {100 * result['overhead_all_layers']:+.1f}%)")
    print(f"sciscope collect, layer 0 only, stop_early:           {t_early:.3f} s  ({result['ratio_first_layer_stop_early']:.2f}x the plain forward)")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
