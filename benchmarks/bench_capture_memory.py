"""Peak memory of capture: 10,000 vs 100,000 examples streamed to disk with sciscope.collect.

Each measurement runs in a **fresh Python process** (this script re-invoked with ``--child``), which
imports torch, builds the model, captures ``n`` examples and prints its own peak resident set size
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``); nothing carries over between measurements.

The model is a small random-init BERT (``--layers`` x ``--width``, the ``transformers`` class) read at
every layer's output with ``pooling="mean"``; its inputs are random token ids of 8-``--seq-len``
tokens, generated batch by batch (so the inputs themselves take no memory that grows with ``n``);
``obs`` holds one float column per example (a label), as a real capture would.  Three kinds of child:

* ``setup``: imports and model only, no capture (the fixed part of every figure);
* ``collect``: :func:`sciscope.core.collect` of ``n`` examples to an on-disk store;
* ``plain``: the in-memory alternative -- ``output_hidden_states=True`` + masked mean, pooled
  arrays kept in a list and concatenated at the end (the control: its memory must grow).

Growth is reported both on the whole process (``peak(100k) / peak(10k) - 1``; target < 20 %) and on
what capture adds above ``setup``.

Usage::

    python benchmarks/bench_capture_memory.py [--small 10000 --large 100000 --layers 2 --width 128]

Writes ``benchmarks/results/capture_memory.json``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _common


def batches(n: int, batch_size: int, seq_len: int, vocab: int):  # noqa: ANN201
    """Random token batches, made one at a time (nothing of size n is held)."""
    import torch

    g = torch.Generator().manual_seed(0)
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        ids = torch.randint(1000, vocab, (b, seq_len), generator=g)
        lengths = torch.randint(8, seq_len + 1, (b,), generator=g)
        yield {"input_ids": ids, "attention_mask": (torch.arange(seq_len)[None] < lengths[:, None]).long()}


def child(args: argparse.Namespace) -> None:
    """One measurement: print {"peak_rss_mib": ..., "seconds": ...} as JSON."""
    import numpy as np
    import pandas as pd
    import torch
    from transformers import BertConfig, BertModel

    from sciscope.core import collect

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=args.width, num_hidden_layers=args.layers,
                     num_attention_heads=max(1, args.width // 64), intermediate_size=4 * args.width)
    model = BertModel(cfg).eval()
    sites = [f"encoder.layer.{i}" for i in range(args.layers)]
    n, mode = args.n, args.mode
    t0 = time.perf_counter()
    rows = 0
    if mode == "collect":
        obs = pd.DataFrame({"label": np.random.default_rng(0).normal(size=n)})
        with tempfile.TemporaryDirectory() as tmp:
            store = collect(model, batches(n, args.batch_size, args.seq_len, cfg.vocab_size), sites,
                            out=Path(tmp) / "store", obs=obs, pooling="mean", progress=False,
                            total=-(-n // args.batch_size))
            rows = store.n_obs
    elif mode == "plain":
        pooled: list[list[np.ndarray]] = [[] for _ in sites]
        with torch.inference_mode():
            for batch in batches(n, args.batch_size, args.seq_len, cfg.vocab_size):
                hs = model(**batch, output_hidden_states=True).hidden_states[1:]
                m = batch["attention_mask"].unsqueeze(-1).float()
                for i, h in enumerate(hs):
                    pooled[i].append(((h * m).sum(1) / m.sum(1)).numpy())
        arrays = [np.concatenate(p) for p in pooled]
        rows = arrays[0].shape[0]
    seconds = time.perf_counter() - t0
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(json.dumps({"mode": mode, "n": n, "rows": rows, "peak_rss_mib": peak_kib / 1024, "seconds": seconds}))


def measure(args: argparse.Namespace, mode: str, n: int) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--mode", mode, "--n", str(n),
           "--layers", str(args.layers), "--width", str(args.width), "--seq-len", str(args.seq_len),
           "--batch-size", str(args.batch_size)] + (["--threads", str(args.threads)] if args.threads else [])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", type=int, default=10_000)
    ap.add_argument("--large", type=int, default=100_000)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-plain", action="store_true", help="skip the in-memory control")
    ap.add_argument("--out", type=Path, default=None)
    # internal: one measurement in this process
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="collect", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args)
        return {}

    load_start = _common.load_average()
    info = _common.machine_info()
    print(f"command: {_common.command_line()}")
    print(f"machine: {info['platform']}, {info['cpu_count']} CPUs, load {load_start}")
    print(f"model: random-init BertModel {args.layers} layers x {args.width}, {args.seq_len} tokens max, "
          f"batch {args.batch_size}; every layer mean-pooled")
    runs: dict[str, dict[str, Any]] = {"setup": measure(args, "setup", 0)}
    print(f"setup (imports + model, no capture): peak RSS {runs['setup']['peak_rss_mib']:.1f} MiB")
    modes = ["collect"] + ([] if args.no_plain else ["plain"])
    for mode in modes:
        for n in (args.small, args.large):
            r = measure(args, mode, n)
            runs[f"{mode}_{n}"] = r
            print(f"{mode:>7} {n:>7} examples: peak RSS {r['peak_rss_mib']:7.1f} MiB "
                  f"({r['peak_rss_mib'] - runs['setup']['peak_rss_mib']:+.1f} over setup), {r['seconds']:.1f} s")
    base = runs["setup"]["peak_rss_mib"]
    summary: dict[str, Any] = {}
    for mode in modes:
        small, large = runs[f"{mode}_{args.small}"]["peak_rss_mib"], runs[f"{mode}_{args.large}"]["peak_rss_mib"]
        summary[mode] = {
            "peak_growth": large / small - 1,
            "growth_above_setup_mib": (large - base) - (small - base),
            "above_setup_mib": {str(args.small): small - base, str(args.large): large - base},
        }
        print(f"{mode}: peak RSS grows {100 * summary[mode]['peak_growth']:+.1f}% from {args.small} to {args.large} "
              f"examples ({summary[mode]['growth_above_setup_mib']:+.1f} MiB)")
    result = {
        "machine": info,
        "model": f"random-init BertModel({args.layers} layers x {args.width}), seq_len <= {args.seq_len}, "
                 f"batch {args.batch_size}, {args.layers} sites mean-pooled, obs with one float column",
        "measure": "ru_maxrss (RUSAGE_SELF) printed by a fresh child process per measurement",
        "runs": runs,
        "summary": summary,
    }
    _common.write_result("capture_memory", result, load_at_start=load_start, out=args.out)
    return result


if __name__ == "__main__":
    main()
