"""TopK SAE training throughput against the machine's own fp32 matmul throughput.

Measures, in one run:

(a) ``torch.mm`` of a (batch, d_in) by (d_in, d_sae) matrix — the size of the SAE's encoder matmul —
    in FLOP/s;
(b) TopK SAE training: samples/s and an *achieved* FLOP/s that counts the dense-equivalent
    matmuls of one step (forward: encoder + decoder; backward: grad W_enc, grad W_dec, grad f;
    no gradient for the input), i.e. ``10 * batch * d_in * d_sae`` FLOPs per step.  Sparse decode
    does far fewer real FLOPs, so its ratio can exceed 1: that is the point of it.

Training is timed three ways: through ``train_sae`` (Lightning, the real path, timed per step by a
callback after warm-up), and a bare PyTorch loop (``sae.loss`` + backward + Adam) with sparse and
with dense decode, to separate the trainer's overhead from the decode's gain.

Usage::

    python benchmarks/bench_sae_throughput.py [--d-in 384 --d-sae 4096 --k 32 --batch-size 4096 --steps 20]

Writes ``benchmarks/results/sae_throughput.json`` (atomically).
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch

from sciscope.core.io import write_json
from sciscope.core.sae import TopKConfig, create_sae, train_sae

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "sae_throughput.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-in", type=int, default=384, help="activation width (default 384)")
    p.add_argument("--d-sae", type=int, default=4096, help="number of latents (default 4096)")
    p.add_argument("--k", type=int, default=32, help="TopK k (default 32)")
    p.add_argument("--batch-size", type=int, default=4096, help="samples per step (default 4096)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per measurement (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before each (default 3)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON output (default {DEFAULT_OUT})")
    return p.parse_args(argv)


def machine_info() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": L.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        # Other processes on a 2-core machine distort every figure (OpenMP threads wait on each
        # other); the load average says how quiet the machine was.
        "load_average_1min_at_start": os.getloadavg()[0],
    }


def time_matmul(batch: int, d_in: int, d_sae: int, steps: int, warmup: int,
                dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """Seconds per (batch, d_in) @ (d_in, d_sae) matmul in ``dtype`` (in and out) and the FLOP/s it reaches."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(batch, d_in, generator=g).to(dtype), torch.randn(d_in, d_sae, generator=g).to(dtype)
    out = torch.empty(batch, d_sae, dtype=dtype)
    for _ in range(warmup):
        torch.mm(a, b, out=out)
    t0 = time.perf_counter()
    for _ in range(steps):
        torch.mm(a, b, out=out)
    sec = (time.perf_counter() - t0) / steps
    return {"seconds": sec, "flop_per_s": 2 * batch * d_in * d_sae / sec}


def synthetic_batches(batch: int, d_in: int, n: int = 4) -> Callable[[], Iterator[torch.Tensor]]:
    """A few fixed random batches, cycled: generating data must not be what we time."""
    g = torch.Generator().manual_seed(1)
    pool = [torch.randn(batch, d_in, generator=g) for _ in range(n)]
    return lambda: iter(pool)


class StepTimer(L.Callback):
    """Wall time of each training step (batch start to batch end, optimiser step included)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._t0 = 0.0

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: Any, i: int) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, out: Any, batch: Any, i: int) -> None:
        self.times.append(time.perf_counter() - self._t0)


def time_lightning(cfg: TopKConfig, batch: int, steps: int, warmup: int) -> float:
    timer = StepTimer()
    train_sae(
        cfg,
        synthetic_batches(batch, cfg.d_in),
        max_steps=warmup + steps,
        lr=1e-4,
        norm_batches=1,
        progress=False,
        trainer_kwargs={"callbacks": [timer]},
    )
    return sum(timer.times[warmup:]) / steps


def time_bare_loop(cfg: TopKConfig, batch: int, steps: int, warmup: int) -> float:
    sae = create_sae(cfg, seed=0).train()
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4)
    data = synthetic_batches(batch, cfg.d_in)()
    pool = list(data)

    def step(x: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        sae.loss(x, update_stats=True)["loss"].backward()
        sae.remove_parallel_decoder_grad()
        opt.step()
        sae.normalize_decoder_rows()

    for i in range(warmup):
        step(pool[i % len(pool)])
    t0 = time.perf_counter()
    for i in range(steps):
        step(pool[i % len(pool)])
    return (time.perf_counter() - t0) / steps


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    command = " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])
    info = machine_info()
    print(f"command: {command}")
    print("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()))

    B, d_in, d_sae, k = args.batch_size, args.d_in, args.d_sae, args.k
    step_flops = 10 * B * d_in * d_sae  # dense-equivalent: 2 forward + 3 backward matmuls
    mm = time_matmul(B, d_in, d_sae, args.steps, args.warmup)
    print(f"matmul ({B}x{d_in}) @ ({d_in}x{d_sae}): {mm['seconds'] * 1e3:.1f} ms, {mm['flop_per_s'] / 1e9:.1f} GFLOP/s")

    cfg = TopKConfig(d_in=d_in, d_sae=d_sae, k=k, dead_after=10**9, normalize="scalar")
    runs = {
        "lightning_sparse_decode": lambda: time_lightning(cfg, B, args.steps, args.warmup),
        "bare_loop_sparse_decode": lambda: time_bare_loop(cfg, B, args.steps, args.warmup),
        "bare_loop_dense_decode": lambda: time_bare_loop(
            TopKConfig(**{**cfg.__dict__, "sparse_decode": False}), B, args.steps, args.warmup
        ),
    }
    results: dict[str, Any] = {}
    for name, run in runs.items():
        sec = run()
        achieved = step_flops / sec
        results[name] = {
            "seconds_per_step": sec,
            "samples_per_s": B / sec,
            "achieved_flop_per_s": achieved,
            "ratio_to_matmul": achieved / mm["flop_per_s"],
        }
        print(
            f"{name:>26}: {sec * 1e3:7.1f} ms/step, {B / sec:9.0f} samples/s, "
            f"{achieved / 1e9:6.1f} GFLOP/s achieved, ratio to matmul {achieved / mm['flop_per_s']:.2f}"
        )

    report = {
        "command": command,
        "machine": info,
        "sizes": {"d_in": d_in, "d_sae": d_sae, "k": k, "batch_size": B, "steps": args.steps, "warmup": args.warmup},
        "flop_count": "10 * batch * d_in * d_sae per training step (dense-equivalent forward + backward)",
        "matmul": mm,
        "training": results,
        "load_average_1min_at_end": os.getloadavg()[0],
    }
    print(f"load average (1 min): {info['load_average_1min_at_start']:.2f} at start, "
          f"{report['load_average_1min_at_end']:.2f} at end")
    write_json(args.out, report)
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
