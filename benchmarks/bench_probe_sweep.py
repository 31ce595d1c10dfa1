"""Probe sweep: sciscope.probe_sweep vs the scikit-learn loop users write, on the same folds.

One run builds synthetic activations for ``--layers`` sites (``--n`` rows x ``--d`` features; a
low-dimensional latent state mixed in with a strength that grows with depth, plus noise) and
three targets: two numeric (linear and non-linear in the latent state) and one categorical
(4 classes). Both sides do the same work -- per site x target x fold, a probe on the real labels
and one on shuffled labels (the control), standardised features:

* ``sciscope``: :func:`sciscope.core.probe_sweep` (ridge: one SVD per fold shared by all numeric
  targets and their controls, alpha by efficient LOO; logistic: folds + control in one batched
  L-BFGS), with ``fit_direction=False`` because the loop below fits no all-rows probe;
* ``sklearn``: the loop an informed scikit-learn user writes, on the folds and permutation
  sciscope used.  Numeric targets: per fold, one multi-target
  ``make_pipeline(StandardScaler(), RidgeCV(alphas, gcv_mode="svd", alpha_per_target=True))`` whose columns are
  every numeric target and its shuffled control (so one decomposition per fold serves them all,
  alpha chosen per column by the same efficient leave-one-out criterion).  Categorical target:
  ``make_pipeline(StandardScaler(), LogisticRegression(C=1, max_iter=1000))`` per fold, for the
  real and the shuffled labels (scikit-learn has no multi-target logistic fit).
  ``--also-per-target`` adds the naive ridge loop (one ``RidgeCV(gcv_mode="svd")`` per target,
  condition and fold) as a secondary figure.

The two sides alternate site by site (sciscope's sweep of one site, then the scikit-learn loop on
that site), so a change in the machine's load reaches both.

Precision: ridge is float64 on both sides.  Logistic: scikit-learn is float64 throughout;
sciscope keeps its parameters, loss and L-BFGS state in float64 but runs the two large products
per iteration (whitened design times weights, and its transpose times the residuals) in float32.
probe_sweep has no float64 switch for them, so the logistic figure is float32-products vs
float64, and the accuracy difference is reported beside it.

Usage::

    python benchmarks/bench_probe_sweep.py [--n 5000] [--d 384] [--layers 7] [--threads N] [--also-per-target]

Prints both times, the ratio and the largest per-fold score difference (R^2 / accuracy), and
writes ``benchmarks/results/probe_sweep.json`` (atomically).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd


def make_store(n: int, d: int, layers: int, seed: int = 0):
    from sciscope.core.store import ActivationStore

    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 8))  # the latent state the targets depend on
    obs = pd.DataFrame(
        {
            "linear": z @ rng.normal(size=8) + 0.5 * rng.normal(size=n),
            "nonlinear": np.tanh(2 * z[:, 0]) + 0.5 * z[:, 1] ** 2 + 0.3 * rng.normal(size=n),
            "category": np.array(["a", "b", "c", "d"])[np.argmax(z[:, :4] + 0.7 * rng.gumbel(size=(n, 4)), axis=1)],
        }
    )
    arrays = {}
    for layer in range(layers):
        strength = (layer + 1) / layers
        mix = rng.normal(size=(8, d)) / np.sqrt(8)
        h = strength * np.tanh(z @ mix * 1.5) + rng.normal(size=(n, d))
        arrays[f"layers.{layer}"] = h.astype(np.float32)
    return ActivationStore.from_arrays(obs, arrays)


def sklearn_loop(store, sweep, targets: list[str], *, per_target: bool = False) -> tuple[dict, dict[str, float]]:
    """The scikit-learn loop, on sciscope's folds and control permutation.

    Parameters
    ----------
    store, sweep
        The activations and sciscope's sweep (its folds, kinds and control seed are reused).
    targets
        Target columns; numeric ones go into one multi-target RidgeCV per fold.
    per_target
        Fit one ``RidgeCV(gcv_mode="svd")`` per target, condition and fold instead (the naive
        loop of the earlier baseline).

    Returns
    -------
    tuple
        Scores keyed by ``(site, target, condition, fold)`` and seconds per probe kind.
    """
    from sklearn.linear_model import LogisticRegression, RidgeCV
    from sklearn.metrics import accuracy_score, r2_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from sciscope.core.probe import DEFAULT_ALPHAS, _control_permutation

    scores = {}
    seconds = {"ridge": 0.0, "logistic": 0.0}
    seed = sweep.params["seed"]
    for site in sweep.sites:
        X = np.asarray(store.array(site))
        perm = _control_permutation(X.shape[0], seed)
        numeric = [t for t in targets if sweep[(site, t)].kind == "ridge"]
        if numeric:
            folds = sweep[(site, numeric[0])].folds
            # columns: every numeric target, then each one's shuffled control
            Y = np.column_stack([store.obs[t].to_numpy(dtype=np.float64) for t in numeric])
            Y = np.column_stack([Y, Y[perm]])
            cols = [(t, "probe") for t in numeric] + [(t, "control") for t in numeric]
            t0 = time.perf_counter()
            for f, (tr, te) in enumerate(folds):
                if per_target:
                    pred = np.column_stack([
                        make_pipeline(StandardScaler(), RidgeCV(alphas=DEFAULT_ALPHAS, gcv_mode="svd"))
                        .fit(X[tr], Y[tr, j]).predict(X[te]) for j in range(Y.shape[1])
                    ])
                else:
                    # gcv_mode="svd": one thin SVD of the design serves every alpha and column; on n > d
                    # it was the fastest mode here (1.3-1.7x "auto" and "eigen" at n 4,000, d 384)
                    model = make_pipeline(StandardScaler(), RidgeCV(alphas=DEFAULT_ALPHAS, gcv_mode="svd", alpha_per_target=True))
                    pred = model.fit(X[tr], Y[tr]).predict(X[te])
                for j, (t, condition) in enumerate(cols):
                    scores[(site, t, condition, f)] = r2_score(Y[te, j], pred[:, j])
            seconds["ridge"] += time.perf_counter() - t0
        for target in targets:
            res = sweep[(site, target)]
            if res.kind == "ridge":
                continue
            y = store.obs[target].to_numpy()
            y_ctrl = y[perm]
            t0 = time.perf_counter()
            for condition, labels in (("probe", y), ("control", y_ctrl)):
                for f, (tr, te) in enumerate(res.folds):
                    model = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=1000))
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        model.fit(X[tr], labels[tr])
                    scores[(site, target, condition, f)] = accuracy_score(labels[te], model.predict(X[te]))
            seconds[res.kind] += time.perf_counter() - t0
    return scores, seconds


def _versions() -> dict[str, str | None]:
    from _common import versions

    return versions(["sciscope", "torch", "numpy", "scikit-learn"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--d", type=int, default=384)
    ap.add_argument("--layers", type=int, default=7)
    ap.add_argument("--cv", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="cap BLAS/OpenMP/torch threads for both sides")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "probe_sweep.json")
    ap.add_argument("--tol", type=float, default=None,
                    help="sciscope's logistic L-BFGS gradient tolerance (default: probe_sweep's 1e-5, ten times "
                         "stricter than LogisticRegression's default tol=1e-4; pass 1e-4 to match it)")
    ap.add_argument("--also-per-target", action="store_true",
                    help="also time the naive ridge loop (one RidgeCV per target, condition and fold; about 50 s "
                         "on one thread) as a secondary figure")
    args = ap.parse_args()

    import sklearn.linear_model  # noqa: F401  (load every BLAS/OpenMP library before capping threads)
    import torch
    from threadpoolctl import threadpool_info, threadpool_limits

    from sciscope.core.io import write_json
    from sciscope.core.probe import ProbeSweepResult, probe_sweep

    if args.threads:
        torch.set_num_threads(args.threads)
        threadpool_limits(args.threads)

    store = make_store(args.n, args.d, args.layers)
    targets = ["linear", "nonlinear", "category"]
    probe_sweep(store.select(np.arange(300)), targets, sites=store.sites[:1], cv=args.cv, progress=False)  # warm-up

    load_before = os.getloadavg()
    # Numeric and categorical targets are timed as two sweeps so each probe kind gets its ratio.
    # The two sides alternate site by site (sciscope's sweep of one site, then scikit-learn's loop
    # on that site's folds), so load from other processes drifts into both alike.
    numeric, categorical = targets[:2], targets[2:]
    tol = {} if args.tol is None else {"tol": args.tol}
    t_ridge = t_logistic = 0.0
    sk_seconds = {"ridge": 0.0, "logistic": 0.0}
    sk_pt_ridge = 0.0
    ref: dict = {}
    ref_pt: dict = {}
    results: dict = {}
    params: dict = {}
    for site in store.sites:
        t0 = time.perf_counter()
        sweep_num = probe_sweep(store, numeric, sites=[site], cv=args.cv, control=True, fit_direction=False, progress=False)
        t_ridge += time.perf_counter() - t0
        t0 = time.perf_counter()
        sweep_cat = probe_sweep(store, categorical, sites=[site], cv=args.cv, control=True, fit_direction=False,
                                progress=False, **tol)
        t_logistic += time.perf_counter() - t0
        params = {"num": sweep_num.params, "cat": sweep_cat.params}
        site_sweep = ProbeSweepResult({**sweep_num.results, **sweep_cat.results}, [site], targets,
                                      dict(sweep_num.params, targets=targets))
        results.update(site_sweep.results)
        ref_site, sec = sklearn_loop(store, site_sweep, targets)
        ref.update(ref_site)
        for kind in sk_seconds:
            sk_seconds[kind] += sec[kind]
        if args.also_per_target:
            ref_site_pt, sec_pt = sklearn_loop(store, site_sweep, numeric, per_target=True)
            ref_pt.update(ref_site_pt)
            sk_pt_ridge += sec_pt["ridge"]
    t_sciscope = t_ridge + t_logistic
    t_sklearn = sk_seconds["ridge"] + sk_seconds["logistic"]
    sweep = ProbeSweepResult(results, list(store.sites), targets, dict(params["num"], targets=targets))
    per_target = None
    if args.also_per_target:
        per_target = {"sklearn_ridge_s": sk_pt_ridge, "speedup": sk_pt_ridge / t_ridge,
                      "max_abs_r2_diff_vs_multi_target": max(abs(v - ref[k]) for k, v in ref_pt.items())}
    load_after = os.getloadavg()

    diffs = {"ridge": 0.0, "logistic": 0.0}
    for (site, target, condition, f), s in ref.items():
        res = sweep[(site, target)]
        ours = (res.scores if condition == "probe" else res.control_scores)[res.metric][f]
        diffs[res.kind] = max(diffs[res.kind], abs(float(ours) - s))

    summary = sweep.summary()
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "versions": {k: v for k, v in _versions().items()},
            "blas": [{k: i.get(k) for k in ("internal_api", "num_threads", "version")} for i in threadpool_info()],
            "loadavg_before": load_before,
            "loadavg_after": load_after,
        },
        "n_obs": args.n,
        "d": args.d,
        "layers": args.layers,
        "cv": args.cv,
        "sciscope_logistic_tol": params["cat"]["tol"],
        "sklearn_logistic_tol": 1e-4,
        "targets": {t: sweep[(store.sites[0], t)].kind for t in targets},
        "fits_per_side": len(ref),
        "timing": "the two sides alternate site by site (sciscope's sweep of the site, then scikit-learn's loop on it)",
        "sciscope_s": t_sciscope,
        "sklearn_s": t_sklearn,
        "speedup": t_sklearn / t_sciscope,
        "by_kind": {
            "ridge": {"sciscope_s": t_ridge, "sklearn_s": sk_seconds["ridge"], "speedup": sk_seconds["ridge"] / t_ridge},
            "logistic": {"sciscope_s": t_logistic, "sklearn_s": sk_seconds["logistic"], "speedup": sk_seconds["logistic"] / t_logistic},
        },
        "sklearn_baseline": {
            "ridge": "per fold one make_pipeline(StandardScaler(), RidgeCV(DEFAULT_ALPHAS, alpha_per_target=True)) "
                     "on all numeric targets and their shuffled controls as columns (gcv_mode='svd')",
            "logistic": "per fold and condition make_pipeline(StandardScaler(), LogisticRegression(C=1, max_iter=1000))",
        },
        "precision": {
            "sciscope_ridge": "float64",
            "sklearn_ridge": "float64",
            "sciscope_logistic": "float64 parameters, loss and L-BFGS; float32 design products (no float64 switch)",
            "sklearn_logistic": "float64 (lbfgs)",
        },
        "ridge_per_target_loop": per_target,
        "max_abs_score_diff": diffs,
        "best_layer": {t: sweep.best(t).site for t in targets},
        "summary": summary[["site", "target", "metric", "score_mean", "control_mean"]].to_dict(orient="records"),
    }
    out = args.out
    write_json(out, result)
    print(f"command: {result['command']}")
    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, "
          f"BLAS {[(b['internal_api'], b['num_threads']) for b in result['machine']['blas']]}, "
          f"load {load_before[0]:.2f} -> {load_after[0]:.2f}")
    print(f"{args.layers} sites x {len(targets)} targets x {args.cv} folds x (probe + control), n={args.n}, d={args.d}")
    print(f"sciscope probe_sweep: {t_sciscope:8.2f} s")
    print(f"scikit-learn loop:    {t_sklearn:8.2f} s   ({result['speedup']:.1f}x slower; ridge multi-target)")
    for kind, b in result["by_kind"].items():
        print(f"  {kind:8s}: sciscope {b['sciscope_s']:7.2f} s, scikit-learn {b['sklearn_s']:7.2f} s ({b['speedup']:.1f}x)")
    if per_target:
        print(f"  ridge, naive per-target loop: scikit-learn {per_target['sklearn_ridge_s']:7.2f} s "
              f"({per_target['speedup']:.1f}x); max R^2 diff vs multi-target {per_target['max_abs_r2_diff_vs_multi_target']:.1e}")
    print("precision: ridge float64 both; logistic sciscope float32 products / float64 state, scikit-learn float64")
    print(f"max |score difference| per fold: ridge R^2 {diffs['ridge']:.2e}, logistic accuracy {diffs['logistic']:.4f}")
    print(summary.pivot(index="site", columns="target", values="score_mean").round(3).to_string())
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
