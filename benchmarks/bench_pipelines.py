"""End-to-end wall time of every domain's quick profile, and of a rerun with nothing changed.

Each domain runs ``sciscope run DOMAIN --profile quick`` in a fresh runs folder (the cold run
trains the domain's model), then the same command again (Snakemake finds nothing to do). Runs
are sequential; the machine's load average is recorded beside each, because other processes on
a shared machine lengthen every figure.

Usage::

    python benchmarks/bench_pipelines.py                      # every registered built-in domain
    python benchmarks/bench_pipelines.py chemistry physics    # some of them
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import load_average, machine_info, write_result  # noqa: E402

DOMAINS = ("geospatial", "chemistry", "immunology", "physics", "robotics")


def timed_run(domain: str, runs: Path) -> tuple[float, int, str]:
    """Seconds, exit status and the tail of the output of one quick-profile run."""
    cmd = [sys.executable, "-m", "sciscope.pipelines.cli", "run", domain, "--profile", "quick", "--quiet",
           "--out", str(runs)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return time.perf_counter() - t0, proc.returncode, (proc.stdout + proc.stderr)[-600:]


def stage_seconds(run_dir: Path) -> dict[str, float | None]:
    """Each stage's own wall seconds, as its ``done.json`` records them (process start-up excluded)."""
    import json

    from sciscope.pipelines.layout import DONE_FILE, STAGES

    return {s: json.loads((run_dir / s / DONE_FILE).read_text()).get("seconds")
            for s in STAGES if (run_dir / s / DONE_FILE).is_file()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("domains", nargs="*", default=list(DOMAINS))
    ap.add_argument("--keep", default="", help="keep the runs in this folder (default: a temporary one)")
    args = ap.parse_args()
    start_load = load_average()
    rows = []
    with tempfile.TemporaryDirectory(prefix="sciscope-bench-") as tmp:
        root = Path(args.keep) if args.keep else Path(tmp)
        for domain in args.domains:
            load = load_average()
            cold, rc, tail = timed_run(domain, root)
            rerun, rc2, _ = timed_run(domain, root) if rc == 0 else (float("nan"), rc, "")
            row = {"domain": domain, "quick_s": round(cold, 1), "noop_rerun_s": round(rerun, 1),
                   "exit": rc, "rerun_exit": rc2, "load_at_start": load, "load_at_end": load_average(),
                   "stage_s": stage_seconds(root / domain / "quick")}
            if rc != 0:
                row["output_tail"] = tail
            rows.append(row)
            print(f"{domain:<11} quick {cold:7.1f} s   no-op rerun {rerun:5.1f} s   "
                  f"(exit {rc}/{rc2}; load {load[0]:.1f} -> {row['load_at_end'][0]:.1f})   stages: {row['stage_s']}", flush=True)
    write_result("pipelines", {"machine": machine_info(), "runs": rows,
                               "note": "wall seconds of `sciscope run DOMAIN --profile quick`, cold then again"},
                 load_at_start=start_load)


if __name__ == "__main__":
    main()
