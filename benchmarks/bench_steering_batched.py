"""Batched steering sweeps against one (condition, alpha) job at a time, on real pipeline runs.

For each run folder given (a domain's quick profile run up to at least the stage before steering,
e.g. the folders ``bench_pipelines.py --keep DIR`` leaves), every steering plan the adapter
declares is run with :func:`~sciscope.core.experiment.run_plan` twice in the same process, turn
about: ``max_copies=16`` (the pipeline's ``steer_copies`` default: the alphas and random controls
as copies of one batch) and ``max_copies=1`` (the sweep as it ran before). The two sweeps must
agree number for number (the tables and every per-example score); the ratio of their times is
the figure. The model, store and plans are built once, before the timing.

Usage::

    python benchmarks/bench_steering_batched.py RUNS/geospatial/quick RUNS/physics/quick ...
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import load_average, machine_info, write_result  # noqa: E402


def bench_run(run_dir: Path, *, copies: int, repeats: int) -> dict:
    """Time every plan of one run, batched and one job at a time, alternating ``repeats`` times."""
    from sciscope.core.experiment import resolve_intervention, resolve_reference, run_plan, sweeps_equal
    from sciscope.pipelines.stages import Run

    run = Run(run_dir, progress=False)
    run.ctx.stage = "steering"
    model = run.model()
    plans = []
    for plan in run.adapter.steering_plans(run.ctx):
        run.ctx.subfolder = plan.name
        plans.append((plan, resolve_intervention(plan, run.ctx), resolve_reference(plan, run.ctx)))
    times: dict[str, list[float]] = {"batched": [], "one_at_a_time": []}
    per_plan = []
    for plan, intervention, reference in plans:
        t = {"batched": [], "one_at_a_time": []}
        sweeps = {}
        for _ in range(repeats):
            for label, n in (("batched", copies), ("one_at_a_time", 1)):
                t0 = time.perf_counter()
                sweeps[label] = run_plan(model, plan, intervention, aliases=run.adapter.aliases, reference=reference,
                                         max_copies=n)
                t[label].append(time.perf_counter() - t0)
        same = sweeps_equal(sweeps["batched"], sweeps["one_at_a_time"])
        jobs = len(plan.alphas) * (1 + plan.n_controls)
        per_plan.append({"plan": plan.name, "jobs": jobs, "batchable": bool(plan.scorer.batched is not None and
                                                                            intervention.batchable),
                         "batched_s": [round(x, 2) for x in t["batched"]],
                         "one_at_a_time_s": [round(x, 2) for x in t["one_at_a_time"]],
                         "identical": same})
        for label in times:
            times[label].append(float(np.median(t[label])))
        print(f"  {plan.name:<28} {jobs:3d} jobs  batched {np.median(t['batched']):7.1f} s   "
              f"one at a time {np.median(t['one_at_a_time']):7.1f} s   x{np.median(t['one_at_a_time']) / np.median(t['batched']):.2f}"
              f"   identical: {same}", flush=True)
    total_b, total_s = sum(times["batched"]), sum(times["one_at_a_time"])
    return {"run": str(run_dir), "domain": run.cls.name, "plans": per_plan, "batched_s": round(total_b, 2),
            "one_at_a_time_s": round(total_s, 2), "ratio": round(total_s / total_b, 2) if total_b else None,
            "all_identical": all(p["identical"] for p in per_plan)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="run folders (quick profile, run at least up to the features stage)")
    ap.add_argument("--copies", type=int, default=16, help="max_copies of the batched side (the pipeline default)")
    ap.add_argument("--repeats", type=int, default=1, help="turns of each side per plan (medians are reported)")
    ap.add_argument("--threads", type=int, default=None, help="cap torch and BLAS threads (both sides)")
    ap.add_argument("--out", type=Path, default=None, help="result JSON (default: results/steering_batched.json)")
    args = ap.parse_args()
    if args.threads:
        from sciscope.core.threads import use_threads

        use_threads(args.threads)
    start = load_average()
    results = []
    for run_dir in args.runs:
        print(f"{run_dir}:", flush=True)
        results.append(bench_run(Path(run_dir), copies=args.copies, repeats=args.repeats))
        r = results[-1]
        print(f"{r['domain']:<11} steering plans batched {r['batched_s']:.1f} s, one at a time {r['one_at_a_time_s']:.1f} s: "
              f"x{r['ratio']}; identical: {r['all_identical']}", flush=True)
    write_result("steering_batched", {"machine": machine_info(), "copies": args.copies, "repeats": args.repeats,
                                      "domains": results}, load_at_start=start, out=args.out)


if __name__ == "__main__":
    main()
