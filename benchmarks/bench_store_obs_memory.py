"""Peak memory of writing a store's obs table: 100,000 vs 1,000,000 per-position rows.

A per-position capture writes one obs row per (example, position), so a rich obs table -- not the
arrays -- is what grows with the rows when the writer keeps it in memory until ``close``. This
benchmark writes stores with :class:`sciscope.core.StoreWriter` the way ``collect`` does (one
``append`` per batch), with a 20-column obs of mixed dtypes and one narrow site, and reports the
peak resident set size.

Each measurement runs in a **fresh Python process** (this script re-invoked with ``--child``);
nothing carries over between measurements. Importing sciscope (torch) peaks higher than writing a
small store ever does, so once its imports are done a child resets the kernel's peak-RSS mark
(``/proc/self/clear_refs``, Linux >= 4.0) and reports the peak *above the RSS at that moment*
(``VmHWM`` minus ``VmRSS`` from ``/proc/self/status``): what writing the store costs, free of the
import peak. Where the mark cannot be reset (``"reset": false``) the figure is the whole-process
peak. Kinds of child:

* ``setup``: imports and one generated chunk (its ``peak_rss_mib_imports`` is the import peak);
* ``write``: ``n`` rows appended in chunks of ``--chunk-rows``; the peak is read twice, once after
  the last ``append`` (what the writer holds while capturing) and once after ``close`` (which also
  reopens the store, and so reads the whole obs table into pandas);
* ``open``: :meth:`ActivationStore.open` of the store the ``write`` child left behind: the cost of
  holding the obs table in pandas, which ``close``'s return value pays in any case.

``close - open`` is what finishing the obs file costs on top of reading it back.

The obs chunk is generated batch by batch (nothing of size ``n`` is held by the generator):
5 integer columns (``example``, ``position``, ``token_id`` int64, ``seq_len`` int32,
``donor`` int16), 5 float columns (4 float64, 1 float32 with NaN), 4 string columns
(``token`` from a 5,000-word vocabulary, a unique ``sequence_id`` per example, ``motif`` with None,
``note`` from 30 phrases), 3 categoricals with fixed categories (``split``, ``region``,
``cell_type``: as ``obs.iloc[...]`` of a whole-dataset table gives them) and 3 bools.
The site is ``--width`` float32 columns stored as float16, so the arrays stay small.

Usage::

    python benchmarks/bench_store_obs_memory.py [--small 100000 --large 1000000 --chunk-rows 2048]

Writes ``benchmarks/results/store_obs_memory.json``. ``--baseline FILE`` embeds an earlier result
(e.g. this script run against the code before a change, with ``--out`` elsewhere) under
``"baseline"``, so one file holds the before and after figures.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import _common

SPLITS = ["train", "val", "test"]


def _vocab(n: int, prefix: str) -> list[str]:
    return [f"{prefix}{i:05d}" for i in range(n)]


def obs_chunks(n: int, chunk_rows: int, positions: int) -> Iterator[Any]:
    """Obs chunks of a per-position capture: ``chunk_rows // positions`` examples x ``positions``."""
    import numpy as np
    import pandas as pd

    vocab = np.array(_vocab(5000, "tok"), dtype=object)
    phrases = np.array([f"phrase number {i}" for i in range(30)], dtype=object)
    motifs = np.array(["GATA", "TATA", "CAAT", None], dtype=object)
    split_t = pd.CategoricalDtype(SPLITS)
    region_t = pd.CategoricalDtype([f"region_{i}" for i in range(20)])
    cell_t = pd.CategoricalDtype([f"cell_type_{i}" for i in range(50)])
    rng = np.random.default_rng(0)
    written = 0
    while written < n:
        rows = min(chunk_rows, n - written)
        row = np.arange(written, written + rows)
        example, position = row // positions, row % positions
        yield pd.DataFrame({
            "example": example,
            "position": position,
            "token_id": rng.integers(0, 5000, rows),
            "seq_len": np.full(rows, positions, dtype=np.int32),
            "donor": (example % 97).astype(np.int16),
            "x": rng.normal(size=rows),
            "y": rng.normal(size=rows),
            "attention_entropy": rng.random(rows),
            "norm": rng.gamma(2.0, size=rows),
            "score": np.where(rng.random(rows) < 0.1, np.nan, rng.normal(size=rows)).astype(np.float32),
            "token": vocab[rng.integers(0, len(vocab), rows)],
            "sequence_id": [f"seq_{e:07d}" for e in example],
            "motif": motifs[rng.integers(0, len(motifs), rows)],
            "note": phrases[rng.integers(0, len(phrases), rows)],
            "split": pd.Categorical.from_codes(example % 3, dtype=split_t),
            "region": pd.Categorical.from_codes(rng.integers(0, 20, rows), dtype=region_t),
            "cell_type": pd.Categorical.from_codes(rng.integers(0, 50, rows), dtype=cell_t),
            "is_special": position == 0,
            "is_masked": rng.random(rows) < 0.15,
            "in_motif": rng.random(rows) < 0.3,
        })
        written += rows


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Set this process's peak-RSS mark (VmHWM, and so ru_maxrss) to its current RSS."""
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return False
    return _status_kib("VmHWM") is not None


def _peak_mib() -> float:
    """Peak RSS of this process since the last reset, MiB."""
    hwm = _status_kib("VmHWM")
    return (hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024  # KiB


def child(args: argparse.Namespace) -> None:
    """One measurement: print a JSON line with the peak figures (MiB above the RSS after imports)."""
    import numpy as np
    import pyarrow.parquet as pq

    from sciscope.core import ActivationStore, StoreWriter
    from sciscope.core import store as store_module

    out: dict[str, Any] = {"mode": args.mode, "n": args.n, "store_module": store_module.__file__}
    chunks = obs_chunks(max(args.n, args.chunk_rows), args.chunk_rows, args.positions)
    first = next(chunks)  # the generator's vocabularies exist before the mark is reset
    out["peak_rss_mib_imports"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["reset"] = _reset_peak()
    start = (_status_kib("VmRSS") or 0) / 1024 if out["reset"] else 0.0
    out["rss_mib_at_start"] = start
    t0 = time.perf_counter()
    if args.mode == "write":
        rng = np.random.default_rng(1)
        w = StoreWriter(args.path, ["layer"], dtype=np.float16)
        for obs in itertools.chain([first], chunks):
            w.append({"layer": rng.normal(size=(len(obs), args.width)).astype(np.float32)}, obs)
        del first, obs  # the writer, not this loop, decides what stays in memory
        out["peak_mib_appended"] = _peak_mib() - start
        out["seconds_appended"] = time.perf_counter() - t0
        store = w.close()
        out["peak_mib"] = _peak_mib() - start
        out["seconds"] = time.perf_counter() - t0
        out["rows"] = store.n_obs
        out["obs_columns"] = len(store.obs.columns)
        out["obs_bytes_in_pandas_mib"] = float(store.obs.memory_usage(deep=True).sum()) / 2**20
        out["obs_parquet_mib"] = (Path(args.path) / "obs.parquet").stat().st_size / 2**20
        out["obs_row_groups"] = pq.ParquetFile(Path(args.path) / "obs.parquet").metadata.num_row_groups
    elif args.mode == "open":
        del first
        store = ActivationStore.open(args.path)
        out["rows"] = store.n_obs
    if args.mode != "write":
        out["peak_mib"] = _peak_mib() - start
        out["seconds"] = time.perf_counter() - t0
    print(json.dumps(out))


def measure(args: argparse.Namespace, mode: str, n: int, path: Path | None = None) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--mode", mode, "--n", str(n),
           "--chunk-rows", str(args.chunk_rows), "--positions", str(args.positions), "--width", str(args.width)]
    if path is not None:
        cmd += ["--path", str(path)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"child {mode} {n} failed:\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _code_revision() -> dict[str, Any]:
    """Which sciscope was measured: the store module's file, its git commit and whether it is edited."""
    from sciscope.core import store as store_module

    root = Path(store_module.__file__).resolve().parents[1]

    def git(*a: str) -> str:
        return subprocess.run(["git", "-C", str(root), *a], capture_output=True, text=True).stdout.strip()

    return {"store_module": str(Path(store_module.__file__).resolve()), "commit": git("rev-parse", "HEAD"),
            "store_py_modified": bool(git("status", "--porcelain", "core/store.py"))}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", type=int, default=100_000)
    ap.add_argument("--large", type=int, default=1_000_000)
    ap.add_argument("--chunk-rows", type=int, default=2048, help="rows per append (examples x positions)")
    ap.add_argument("--positions", type=int, default=64, help="positions per example")
    ap.add_argument("--width", type=int, default=16, help="site width (float32 in, float16 on disk)")
    ap.add_argument("--baseline", type=Path, default=None, help="an earlier result JSON to embed")
    ap.add_argument("--out", type=Path, default=None)
    # internal: one measurement in this process
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="write", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--path", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args)
        # The figures are printed; skip interpreter teardown, where torch's and pyarrow's native
        # thread pools now and then abort ("terminate called without an active exception") on
        # this loaded machine after the measurement is done.
        sys.stdout.flush()
        os._exit(0)

    load_start = _common.load_average()
    info = _common.machine_info(["pandas", "pyarrow"])
    code = _code_revision()
    print(f"command: {_common.command_line()}")
    print(f"machine: {info['platform']}, {info['cpu_count']} CPUs, load {load_start}")
    print(f"code: {code}")
    print(f"obs: 20 columns (5 int, 5 float, 4 string, 3 categorical, 3 bool); site: {args.width} float16 "
          f"columns; {args.chunk_rows} rows per append ({args.positions} positions per example)")
    runs: dict[str, dict[str, Any]] = {"setup": measure(args, "setup", 0)}
    print(f"imports peak at {runs['setup']['peak_rss_mib_imports']:.1f} MiB RSS; figures below are peaks above "
          f"the RSS after imports ({runs['setup']['rss_mib_at_start']:.1f} MiB; reset: {runs['setup']['reset']})")
    with tempfile.TemporaryDirectory(prefix="bench_store_obs_") as tmp:
        for n in (args.small, args.large):
            path = Path(tmp) / f"store_{n}"
            w = measure(args, "write", n, path)
            o = measure(args, "open", n, path)
            runs[f"write_{n}"], runs[f"open_{n}"] = w, o
            print(f"{n:>8} rows: peak after appends {w['peak_mib_appended']:+7.1f} MiB, after close "
                  f"{w['peak_mib']:+7.1f} MiB ({w['seconds_appended']:.1f} s appending, {w['seconds']:.1f} s in all); "
                  f"reopening alone {o['peak_mib']:+7.1f} MiB; obs {w['obs_bytes_in_pandas_mib']:.0f} MiB in "
                  f"pandas, {w['obs_parquet_mib']:.1f} MiB parquet in {w['obs_row_groups']} row groups")
    summary: dict[str, Any] = {}
    for key, label in (("peak_mib_appended", "after appends"), ("peak_mib", "after close")):
        small, large = runs[f"write_{args.small}"][key], runs[f"write_{args.large}"][key]
        summary[key] = {str(args.small): small, str(args.large): large, "growth_mib": large - small}
        print(f"peak {label}: {small:+.1f} -> {large:+.1f} MiB "
              f"({large - small:+.1f} MiB for {args.large // args.small}x the rows)")
    close_cost = {str(n): runs[f"write_{n}"]["peak_mib"] - runs[f"open_{n}"]["peak_mib"]
                  for n in (args.small, args.large)}
    summary["close_above_reopen_mib"] = close_cost
    print(f"close's peak above reopening the same store: {close_cost} MiB")
    result: dict[str, Any] = {
        "machine": info,
        "code": code,
        "workload": f"StoreWriter, one site of {args.width} float32 -> float16 columns, obs of 20 columns "
                    f"(5 int, 5 float, 4 string, 3 categorical, 3 bool), {args.chunk_rows} rows per append, "
                    f"{args.positions} positions per example",
        "measure": "a fresh child process per measurement; peak RSS (VmHWM) in MiB above the RSS after imports, "
                   "the peak mark reset there (/proc/self/clear_refs); write children read it after the last "
                   "append (peak_mib_appended) and after close (peak_mib; close reopens the store)",
        "runs": runs,
        "summary": summary,
    }
    if args.baseline is not None:
        result["baseline"] = json.loads(args.baseline.read_text())
    _common.write_result("store_obs_memory", result, load_at_start=load_start, out=args.out)
    return result


if __name__ == "__main__":
    main()
