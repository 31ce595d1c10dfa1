"""The pipeline's stages as plain Python functions (Snakemake rules only call these).

``python -m sciscope.pipelines.stages STAGE RUN_DIR`` runs one stage of a run whose ``run.json``
names the domain and config. Each stage reads what earlier stages wrote, writes its outputs
atomically, its headline numbers (each beside its control) and finally ``done.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from sciscope.core.experiment import core_analyses
from sciscope.core.io import write_json, write_table
from sciscope.core.plotting import save_figure
from sciscope.core.threads import use_threads
from sciscope.core.verdict import FRACTION_MARGIN
from sciscope.pipelines.config import adapter_config, load_adapter_class
from sciscope.pipelines.layout import CARDS_FILE, DONE_FILE, FEATURES_PAGE, STAGES, read_run_info, stage_dir, write_headline

log = logging.getLogger("sciscope.pipelines")


class Run:
    """A run folder, its adapter and its :class:`~sciscope.core.context.RunContext` (the adapter's
    only door into the folder); stages share this, not state."""

    def __init__(self, run_dir: str | Path, *, progress: bool = True) -> None:
        from sciscope.core.context import RunContext

        self.dir = Path(run_dir).resolve()  # rules pass "." (the run folder is their working directory)
        self.info = read_run_info(self.dir)
        if not self.info:
            from sciscope.core.errors import SciscopeError

            raise SciscopeError(f"{self.dir} has no run.json: start runs with `sciscope run DOMAIN`")
        self.config: dict[str, Any] = self.info["config"]
        self.cls = load_adapter_class(self.info["adapter"])
        self.adapter = self.cls(adapter_config(self.cls, self.config))
        self.progress = progress
        self.ctx = RunContext(self.adapter, self.config, run_dir=self.dir, progress=progress)

    def path(self, stage: str) -> Path:
        p = stage_dir(self.dir, stage)
        p.mkdir(parents=True, exist_ok=True)
        self.ctx.stage, self.ctx.subfolder = stage, ""
        return p

    @property
    def trainer_options(self) -> dict[str, Any]:
        """Lightning ``Trainer`` options of this run (config keys accelerator, devices, num_nodes, strategy)."""
        return self.ctx.trainer_options

    @property
    def seed(self) -> int:
        return self.ctx.seed

    def examples(self):
        return self.ctx.examples()

    def model(self, variant: str | None = None):
        return self.ctx.model(variant)

    def store(self):
        return self.ctx.store()

    def analyses(self, stage: str) -> list[dict[str, Any]]:
        """Run the adapter's analyses declared for ``stage`` (timed); their headline rows."""
        rows: list[dict[str, Any]] = []
        timings = {}
        for analysis in [*core_analyses(), *self.adapter.analyses()]:
            if analysis.stage != stage:
                continue
            self.ctx.stage, self.ctx.subfolder = stage, ""
            log.info("analysis %s (after %s)", analysis.name, stage)
            got, seconds = analysis.run(self.ctx)
            timings[analysis.name] = round(seconds, 2)
            rows += [{"stage": stage, **r} for r in got]
        if timings:
            write_json(stage_dir(self.dir, stage) / "analyses.json", timings)
        return rows


# ------------------------------------------------------------------------------------------------
# stages
# ------------------------------------------------------------------------------------------------


def stage_examples(run: Run) -> dict[str, Any]:
    """Build the examples; save their obs table."""
    out = run.path("examples")
    ex = run.examples()
    write_table(out / "obs.parquet", ex.obs)
    counts = {"n_examples": len(ex.obs), "concepts": list(run.adapter.concepts)}
    if "split" in ex.obs.columns:
        counts["splits"] = ex.obs["split"].value_counts().to_dict()
    write_json(out / "summary.json", counts)
    rows = [{"stage": "examples", "name": "examples", "value": len(ex.obs), "unit": "rows",
             "note": f"concepts: {', '.join(run.adapter.concepts)}", "source": "examples/obs.parquet"}]
    rows += run.analyses("examples")
    write_headline(out, rows)
    return counts


def stage_model(run: Run) -> dict[str, Any]:
    """Build (or train) the model and record its identity.

    The adapter's model variants (e.g. chemistry's other encoding) train meanwhile in their own
    processes on a share of the stage's threads: small models use a second thread poorly, so two
    one-thread trainings side by side finish well before two two-thread ones in a row.
    """
    from sciscope.core import model_identity
    from sciscope.core.sites import resolve_site

    out = run.path("model")
    with _variants_alongside(run):
        model = run.model()
    for site in run.adapter.sites:
        resolve_site(model, site, run.adapter.aliases)
    info = {"identity": model_identity(model), "sites": run.adapter.sites, "aliases": run.adapter.aliases,
            "spec": run.config.get("model") or "default"}
    write_json(out / "model.json", info)
    ident = info["identity"]
    rows = [{"stage": "model", "name": "parameters", "value": ident["n_params"],
             "note": f"{ident['name']} ({ident['class']}), sha256 {ident['hash'][:12]}", "source": "model/model.json"}]
    rows += run.analyses("model")
    write_headline(out, rows)
    return info


@contextlib.contextmanager
def _variants_alongside(run: Run) -> Iterator[None]:
    """Build each of the adapter's model variants in a child process (into the run's cache) while the
    block runs; wait for them at its end and fail with the child's last log lines if one failed."""
    import subprocess
    import torch

    from sciscope.core.errors import SciscopeError
    from sciscope.core.threads import use_threads

    threads = torch.get_num_threads()
    variants = list(run.adapter.variants) if not run.config.get("model") else []
    if not variants or threads < 2:  # one thread: the variants train later, in turn (ctx.model)
        yield
        return
    share = max(1, threads // (len(variants) + 1))
    use_threads(max(1, threads - share * len(variants)))
    logs = {v: run.path("model") / f"variant-{v}.log" for v in variants}
    procs = {v: subprocess.Popen([sys.executable, "-m", "sciscope.pipelines.stages", "model", str(run.dir), "--variant", v,
                                  "--threads", str(share), "--log", str(logs[v])] + ([] if run.progress else ["--no-progress"]),
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for v in variants}
    log.info("model variants %s train alongside (%d thread(s) each)", variants, share)
    try:
        yield
    except BaseException:
        for p in procs.values():  # the stage failed: its variants are not needed
            p.kill()
        raise
    finally:
        failed = [v for v, p in procs.items() if p.wait() != 0]
        use_threads(threads)
    if failed:
        tail = logs[failed[0]].read_text().strip().splitlines()[-1:] if logs[failed[0]].is_file() else []
        raise SciscopeError(f"model variant {failed[0]!r} failed to train ({logs[failed[0]]}): {' '.join(tail)}")


def stage_activations(run: Run) -> dict[str, Any]:
    """Capture every default site, pooled as the adapter says, into the run's store.

    With ``capture_shards`` > 1 the shard jobs (:func:`capture_shard`) have captured the store in
    parts; this stage merges them in batch order and removes the parts.
    """
    from sciscope.core import merge_shards

    out = run.path("activations")
    n_shards = int(run.config.get("capture_shards", 1))
    if n_shards > 1:
        parts = [out / "shards" / str(i) / "store" for i in range(n_shards)]
        store = merge_shards(parts, out / "store", remove=True)
    else:
        store = _capture(run, out / "store")
    note = f"{len(store.sites)} sites, pooling {run.adapter.pooling}" + (f", {n_shards} shards merged" if n_shards > 1 else "")
    rows = [{"stage": "activations", "name": "captured rows x sites", "value": store.n_obs,
             "note": note, "source": "activations/store/manifest.json"}]
    import shutil

    shutil.rmtree(out / "variants", ignore_errors=True)  # a rerun captures the variants afresh, as the main store
    for variant in run.adapter.variants:  # each model variant's store, probed like the main one
        vstore = run.ctx.store(variant)
        rows.append({"stage": "activations", "name": f"captured rows x sites ({variant})", "value": vstore.n_obs,
                     "note": f"model variant {variant!r}, {len(vstore.sites)} sites", "source": f"activations/variants/{variant}/manifest.json"})
    shutil.rmtree(out / "positions", ignore_errors=True)
    if run.ctx.sae_row_mode == "positions":  # the SAE site once more, one row per position: what the SAE learns from
        positions = run.ctx.position_store()
        rows.append({"stage": "activations", "name": "captured positions of the SAE site", "value": positions.n_obs,
                     "note": f"{run.adapter.sae_site}, one row per valid position (sae_rows={run.config.get('sae_rows', 'auto')})",
                     "source": "activations/positions/manifest.json"})
    rows += run.analyses("activations")
    write_headline(out, rows)
    return {"n_obs": store.n_obs, "sites": store.sites, "shards": n_shards}


def capture_shard(run: Run, index: int) -> dict[str, Any]:
    """One shard job of the activations stage: every ``capture_shards``-th batch from ``index``."""
    n_shards = int(run.config.get("capture_shards", 1))
    if not 0 <= index < n_shards:
        from sciscope.core.errors import ConfigError

        raise ConfigError(f"shard {index} does not exist: capture_shards is {n_shards}")
    store = _capture(run, run.path("activations") / "shards" / str(index) / "store", shard=(index, n_shards))
    return {"shard": index, "of": n_shards, "n_obs": store.n_obs}


def _capture(run: Run, path: Path, shard: tuple[int, int] | None = None) -> Any:
    from sciscope.core import collect

    ex, model = run.examples(), run.model()
    batches = run.adapter.batches(ex, model, batch_size=int(run.config["batch_size"]))
    n_batches = -(-len(ex) // int(run.config["batch_size"]))
    return collect(model, batches, run.adapter.sites, out=path, obs=ex.obs, pooling=run.adapter.pooling,
                   aliases=run.adapter.aliases, seed=run.seed, progress=run.progress, total=n_batches,
                   extra_manifest={"domain": run.cls.name}, shard=shard, **run.ctx.pooling_excludes())


def stage_probes(run: Run) -> dict[str, Any]:
    """Per-site probes for every target, with shuffled control and the adapter's baselines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sciscope.core import probe_sweep

    out = run.path("probes")
    store = run.store()
    targets = run.adapter.probe_targets
    baseline = run.adapter.baseline_features(run.examples()) or None
    res = probe_sweep(store, targets, cv=int(run.config["probe_cv"]), groups=run.adapter.probe_groups,
                      baseline=baseline, control=True, seed=run.seed, progress=run.progress)
    res.save(out / "sweep")
    summary = res.summary()
    write_table(out / "summary.csv", summary)
    n = len(targets)
    cols = min(n, 4)  # rows of at most four panels: seven targets in one row are too small to read
    rows_ = -(-n // cols)
    fig, axes = plt.subplots(rows_, cols, figsize=(4.4 * cols, 4.0 * rows_), squeeze=False)
    for ax, target in zip(axes.ravel(), targets):
        res.plot(target, ax=ax)
    for ax in axes.ravel()[n:]:
        ax.set_visible(False)
    save_figure(fig, out / "score_vs_layer.png")
    rows = []
    for target in targets:
        t = summary[(summary.target == target) & (summary.site.astype(str) != "")]
        best = t.loc[t.score_mean.idxmax()]
        note = f"best site {best.site}; metric {best.metric}"
        row = {"stage": "probes", "name": f"{target} ({best.metric})", "value": float(best.score_mean),
               "control": float(best.control_mean), "control_label": "shuffled labels", "source": "probes/summary.csv",
               "figure": "probes/score_vs_layer.png"}
        base = _strongest_baseline(best, int(run.config["probe_cv"]), t.site.nunique())
        base_note = base.pop("note", "")
        rows.append({**row, **base, "note": note + base_note})
    run.ctx.live["probes"] = res
    rows += _probe_sets(run)
    rows += run.analyses("probes")
    write_headline(out, rows)
    return {"targets": targets, "sites": store.sites}


def _strongest_baseline(best: Any, n_folds: int, n_sites: int) -> dict[str, Any]:
    """The headline fields of the strongest baseline of a probe summary row (the sweep puts the best
    baseline in ``baseline``/``baseline_mean``/``baseline_std`` and each in ``baseline_mean[NAME]``):
    ``baseline``, ``baseline_label``, ``verdict`` (the row against it, margin 2 standard errors
    over the folds) and a ``note`` tail; empty when the summary has no baseline."""
    from sciscope.core.verdict import verdict_from_folds

    if "baseline" not in best or not isinstance(best.baseline, str) or not best.baseline:
        return {}
    each = {c[len("baseline_mean["):-1]: best[c] for c in best.index if c.startswith("baseline_mean[")}
    return {"baseline": float(best.baseline_mean), "baseline_label": best.baseline,
            "verdict": verdict_from_folds(float(best.score_mean), float(best.score_std), float(best.baseline_mean),
                                          float(best.baseline_std), n_folds),
            "note": "; baselines " + ", ".join(f"{k} {float(v):.3f}" for k, v in (each or {best.baseline: best.baseline_mean}).items())
                    + f"; verdict: the best of {n_sites} sites against the strongest baseline, margin 2 standard "
                      "errors over the folds"}


def _probe_sets(run: Run) -> list[dict[str, Any]]:
    """Fit the adapter's extra probe sets (row subsets, model variants); one table each."""
    from sciscope.core import probe_sweep

    rows = []
    for ps in run.adapter.probe_sets(run.ctx):
        store = run.ctx.store(ps.variant)
        if ps.query:
            store = store.query(ps.query)
        cv = int(ps.cv or run.config["probe_cv"])
        groups = ps.groups if ps.groups is not None else run.adapter.probe_groups
        if groups is not None:
            cv = min(cv, int(store.obs[groups].nunique()))
        if cv < 2 or store.n_obs < 4:
            log.info("probe set %s skipped: %d rows, %d folds", ps.name, store.n_obs, cv)
            continue
        baseline = None
        if ps.baseline:
            sub = run.examples().obs
            keep = sub.eval(ps.query).to_numpy() if ps.query else slice(None)
            baseline = {k: np.asarray(v)[keep] for k, v in (run.adapter.baseline_features(run.examples()) or {}).items()} or None
        res = probe_sweep(store, list(ps.targets), cv=cv, groups=groups, baseline=baseline, control=True, seed=run.seed,
                          progress=run.progress)
        summary = res.summary()
        write_table(stage_dir(run.dir, "probes") / f"{ps.name}.csv", summary)
        run.ctx.live[f"probes:{ps.name}"] = res
        layers = summary[summary["site"].notna() & (summary["site"].astype(str) != "")]
        for target, t in layers.groupby("target", sort=False) if ps.headline else ():
            best = t.loc[t["score_mean"].idxmax()]
            base = _strongest_baseline(best, cv, t.site.nunique())
            base_note = base.pop("note", "")
            rows.append({"stage": "probes", "name": f"{ps.name}: {target} ({best.metric})", "value": float(best.score_mean),
                         "control": float(best.control_mean), "control_label": "shuffled labels", **base,
                         "note": f"best site {best.site}" + (f"; rows {ps.query} ({store.n_obs})" if ps.query else "")
                         + (f"; model variant {ps.variant}" if ps.variant else "") + "; per site: "
                         + ", ".join(f"{s} {v:.2f}" for s, v in zip(t.site, t.score_mean)) + base_note,
                         "source": f"probes/{ps.name}.csv"})
    return rows


def stage_sae(run: Run) -> dict[str, Any]:
    """Train an SAE on the adapter's chosen site; evaluate; encode every example into a latent store.

    The SAE learns from the run's SAE rows (:meth:`RunContext.sae_row_selection`): one row per
    position, without special and outlier-norm positions, or the pooled rows; ``metrics.json``
    says which and what was left out. An example's latents are its pooled row's codes, or the mean
    code of its kept positions.
    """
    from sciscope.core import StoreWriter
    from sciscope.core.sae import evaluate_sae
    from sciscope.core.sae.metrics import pca_explained_variance

    out = run.path("sae")
    store = run.store()
    site = run.adapter.sae_site
    arch = run.config["sae_architecture"]
    all_rows, row_report = run.ctx.sae_row_selection()
    train_rows, test_rows = run.ctx.sae_rows()
    trained = run.ctx.train_sae()
    d_in, d_sae = trained.sae.cfg.d_in, trained.sae.cfg.d_sae
    if _secondary_rank():
        return {"rank": "secondary"}  # under DDP only rank 0 evaluates and writes
    trained.save(out / "model")
    metrics: dict[str, Any] = {k: float(v) for k, v in evaluate_sae(trained.sae, test_rows.iter_batches(site, 4096)).items()}
    in_sample = evaluate_sae(trained.sae, train_rows.iter_batches(site, 4096))
    metrics["explained_variance_train"] = float(in_sample["explained_variance"])
    metrics["dead_fraction_all_rows"] = float(evaluate_sae(trained.sae, all_rows.iter_batches(site, 4096))["dead_fraction"])
    metrics["evaluated_on"] = "held-out rows (split == 'test')" if test_rows is not all_rows else "all rows (no split column)"
    metrics["pca_explained_variance"] = pca_explained_variance(train_rows.array(site), test_rows.array(site), round(metrics["l0"]),
                                                               components=run.ctx.sae_pca())
    metrics["site"] = site
    metrics["rows"] = row_report
    metrics["n_train_rows"], metrics["n_test_rows"] = int(train_rows.n_obs), int(test_rows.n_obs)
    metrics["steps"], metrics["stopped_early"] = int(trained.steps), bool(trained.stopped_early)
    write_json(out / "metrics.json", metrics)
    # latents of every example, as a store the features stage reads (memory-mapped)
    latents = run.ctx.example_latents(trained.sae)
    with StoreWriter(out / "latents", ["latents"], manifest={"sae_site": site, "architecture": arch,
                                                              "rows": row_report["rows"]}) as w:
        for start in range(0, len(latents), 4096):
            w.append({"latents": latents[start:start + 4096]}, store.obs.iloc[start:start + 4096])
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.3))
    h = trained.history
    axes[0].plot(h.step, h.mse, lw=1)
    axes[0].set_xlabel("step"), axes[0].set_ylabel("mse (normalised space)"), axes[0].set_yscale("log")
    axes[1].plot(h.step, h.dead_fraction, lw=1, color="C3")
    axes[1].set_xlabel("step"), axes[1].set_ylabel("dead fraction")
    v = trained.validation
    axes[2].plot(v.step, v.explained_variance, marker=".", lw=1, color="C2")
    axes[2].set_xlabel("step"), axes[2].set_ylabel("validation explained variance")
    if trained.stopped_early:
        axes[2].set_title("stopped early", fontsize=9)
    fig.suptitle(f"{arch} SAE on {site}: {d_in} -> {d_sae}")
    save_figure(fig, out / "training.png")
    run.ctx.live["sae"], run.ctx.live["latents"] = trained.sae, latents
    write_headline(out, [
        {"stage": "sae", "name": "explained variance", "value": metrics["explained_variance"],
         "baseline": metrics["pca_explained_variance"], "baseline_label": "PCA with as many components as the SAE's L0",
         "tolerance": FRACTION_MARGIN,
         "note": f"{arch} {d_in}->{d_sae} at {site}; on {metrics['evaluated_on']} (train rows: {metrics['explained_variance_train']:.3f}); "
                 f"{trained.steps} steps" + (" (stopped early: validation explained variance stopped improving)" if trained.stopped_early else ""),
         "source": "sae/metrics.json"},
        {"stage": "sae", "name": "L0 (active latents per row)", "value": metrics["l0"], "source": "sae/metrics.json"},
        {"stage": "sae", "name": "live latent fraction", "value": 1.0 - metrics["dead_fraction_all_rows"], "source": "sae/metrics.json",
         "note": "fraction of latents that fire on at least one row (all rows)"},
        {"stage": "sae", "name": "SAE rows", "value": metrics["n_train_rows"], "unit": "training rows",
         "note": _rows_note(row_report), "source": "sae/metrics.json"},
        *run.analyses("sae"),
    ])
    return {k: v for k, v in metrics.items() if k != "rows"}


def _rows_note(report: dict[str, Any]) -> str:
    """What the SAE learnt from, in words, with what was left out (the report says it)."""
    if report["rows"] == "pooled":
        return f"one pooled row per example ({report.get('pooling')} pooling)"
    out = (f"one row per position: {report['kept']} of {report['positions']} positions kept; "
           f"left out {report['excluded_by_position_rule']} by the adapter's position rule and "
           f"{report['excluded_outlier_norm']} with a norm over {report['outlier_factor']:g} x the median "
           f"({report['median_norm']:.3g})")
    if report["excluded_positions"]:
        out += "; most left-out positions: " + ", ".join(f"{p} ({n})" for p, n in list(report["excluded_positions"].items())[:5])
    return out


def stage_features(run: Run) -> dict[str, Any]:
    """Tie SAE latents to concepts (with a shuffled control) plus the adapter's own statistics."""
    from sciscope.core import ActivationStore, analyze_features

    out = run.path("features")
    latents = ActivationStore.open(run.dir / "sae" / "latents")
    acts = latents.array("latents")
    obs = latents.obs
    groups = run.adapter.association_groups
    analysis = analyze_features(acts, obs, concepts=list(run.adapter.concepts), statistics=run.adapter.feature_statistics,
                                k=int(run.config["feature_top_k"]), control=True, seed=run.seed, groups=groups)
    analysis.save(out / "analysis")
    write_table(out / "features.csv", analysis.features)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.3))
    analysis.plot_density(ax=ax)
    save_figure(fig, out / "density.png")
    n_sig = int(analysis.associations.significant.sum())
    n_ctrl = int(analysis.control_associations.significant.sum()) if analysis.control_associations is not None else None
    feats_sig = int(analysis.associations[analysis.associations.significant].feature.nunique())
    rows = [{"stage": "features", "name": "features tied to a concept (FDR 0.05)", "value": feats_sig,
             "control": None if n_ctrl is None else int(analysis.control_associations[analysis.control_associations.significant].feature.nunique()),
             "control_label": "shuffled concepts", "note": f"{n_sig} significant feature-concept pairs ({n_ctrl} on shuffled)"
             + (f"; tested across groups of {groups!r} (activations averaged within each)" if groups else ""),
             "source": "features/analysis/associations.csv"}]
    run.ctx.live["features"] = analysis
    rows += run.analyses("features")
    write_headline(out, rows)
    return {"n_significant": n_sig}


def stage_steering(run: Run) -> dict[str, Any]:
    """Run every steering plan the adapter declares: alpha = 0 once, each alpha, each matched
    random control; broken runs counted; ``steering/<plan>/`` gets sweep.csv, summary.csv,
    summary.json and a figure; the headline carries each plan's effect beside its controls."""
    from sciscope.core.experiment import plan_headline_rows, resolve_intervention, resolve_reference, run_plan
    from sciscope.core.interventions import AddVector

    out = run.path("steering")
    ctx = run.ctx
    model = run.model()
    rows, done = [], {}
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for plan in run.adapter.steering_plans(ctx):
        ctx.stage, ctx.subfolder = "steering", plan.name
        intervention = resolve_intervention(plan, ctx)
        reference = resolve_reference(plan, ctx)
        log.info("steering plan %s: %s, %d alphas x (1 + %d controls)", plan.name, intervention.kind, len(plan.alphas), plan.n_controls)
        sweep = run_plan(model, plan, intervention, aliases=run.adapter.aliases, reference=reference, progress=run.progress,
                         max_copies=int(run.config.get("steer_copies", 1)))
        pdir = out / plan.name
        sweep.save(pdir)
        ctx.live[f"steering:{plan.name}"] = sweep  # for the adapter's analyses after the steering stage
        if isinstance(intervention, AddVector):
            intervention.vector.save(pdir / "vector.safetensors")
        scores = [m for m, role in sweep.roles.items() if role in ("target", "off_target")][:4]
        scores = list(dict.fromkeys([sweep.headline, *scores]))
        fig, axes = plt.subplots(1, len(scores), figsize=(4.6 * len(scores), 3.4), squeeze=False)
        for ax, m in zip(axes[0], scores):
            sweep.plot(m, ax=ax)
        save_figure(fig, pdir / "alpha_sweep.png")
        rows += [{**r, "figure": f"steering/{plan.name}/alpha_sweep.png"}
                 for r in plan_headline_rows(sweep, source=f"steering/{plan.name}/summary.json")]
        s = sweep.summary()
        done[plan.name] = {"kind": intervention.kind, "headline": s["score"], "effect_plus": s["effect_plus"],
                           "breakdown_alpha": s["breakdown_alpha"]}
    ctx.subfolder = ""
    rows += run.analyses("steering")
    write_headline(out, rows)
    return done


def stage_report(run: Run) -> dict[str, Any]:
    """One self-contained HTML file for the run."""
    from sciscope.pipelines.layout import RUN_FILE
    from sciscope.pipelines.report import build_report

    # fold what earlier stages learnt (model identity, data size, stage timings) into run.json
    info = dict(run.info)
    model_file = run.dir / "model" / "model.json"
    if model_file.is_file():
        info["model"] = json.loads(model_file.read_text())["identity"]
    summary_file = run.dir / "examples" / "summary.json"
    if summary_file.is_file():
        s = json.loads(summary_file.read_text())
        info["data"] = f"{s['n_examples']} examples from the {run.cls.name} adapter ({run.cls.description}); concepts: {', '.join(s.get('concepts', []))}"
    info["stages"] = {
        st: json.loads((run.dir / st / DONE_FILE).read_text()).get("seconds")
        for st in STAGES if (run.dir / st / DONE_FILE).is_file()
    }
    write_json(run.dir / RUN_FILE, info)
    n_cards = _feature_cards(run)
    path = build_report(run.dir)
    return {"report": str(path), "feature_cards": n_cards}


def _feature_cards(run: Run) -> int:
    """Cards of the top and of random control features (``report/cards.json``) and the browser
    (``report/features.html``); nothing when the run has no features stage."""
    from sciscope.core.cards import build_cards, feature_browser_html, write_cards
    from sciscope.core.io import write_text

    if not (run.dir / "features" / DONE_FILE).is_file():
        return 0
    out = run.path("report")
    cards = build_cards(run.ctx, progress=run.progress)
    write_cards(cards, out / CARDS_FILE)
    title = f"sciscope features — {run.cls.name} / {run.dir.name}"
    write_text(out / FEATURES_PAGE, feature_browser_html(cards, title=title, report_href="report.html"))
    return len(cards)


STAGE_FUNCTIONS: dict[str, Callable[[Run], dict[str, Any]]] = {
    "examples": stage_examples,
    "model": stage_model,
    "activations": stage_activations,
    "probes": stage_probes,
    "sae": stage_sae,
    "features": stage_features,
    "steering": stage_steering,
    "report": stage_report,
}


def _secondary_rank() -> bool:
    """True in a DDP worker process other than rank 0."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_rank() != 0


def run_stage(stage: str, run_dir: str | Path, *, progress: bool = True, shard: int | None = None) -> dict[str, Any]:
    """Run one stage (or one capture shard of the activations stage); write ``done.json`` (with
    timing) only when it succeeds."""
    if stage not in STAGE_FUNCTIONS:
        raise ValueError(f"unknown stage {stage!r}; stages are {STAGES}")
    if shard is not None and stage != "activations":
        raise ValueError("--shard applies to the activations stage only")
    t0 = time.time()
    run = Run(run_dir, progress=progress)
    if shard is None:
        result = STAGE_FUNCTIONS[stage](run)
        done = stage_dir(run.dir, stage) / DONE_FILE
    else:
        result = capture_shard(run, shard)
        done = stage_dir(run.dir, stage) / "shards" / str(shard) / DONE_FILE
    seconds = round(time.time() - t0, 2)
    if _secondary_rank():
        return result  # a DDP worker process (Lightning re-ran this command): rank 0 marks the stage done
    write_json(done, {"stage": stage, "shard": shard, "seconds": seconds, "result": result})
    return result


def _innermost_frame(exc: BaseException) -> str:
    """``file.py:LINE in function`` where ``exc`` was raised: a one-line pointer for the summary."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return "unknown place"
    f = frames[-1]
    return f"{Path(f.filename).name}:{f.lineno} in {f.name}"


def main(argv: list[str] | None = None) -> int:
    from sciscope.core.errors import SciscopeError

    ap = argparse.ArgumentParser(prog="python -m sciscope.pipelines.stages")
    ap.add_argument("stage", choices=list(STAGES))
    ap.add_argument("run_dir")
    ap.add_argument("--log", default=None, help="also write the stage's log here")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--shard", type=int, default=None, help="activations only: capture this shard (see capture_shards)")
    ap.add_argument("--threads", type=int, default=None,
                    help="cap torch's and the BLAS thread pools at this many threads (the rule's share of the cores)")
    ap.add_argument("--variant", default=None, help="model only: build this model variant into the run's cache, nothing else")
    args = ap.parse_args(argv)
    if args.variant is not None and args.stage != "model":
        ap.error("--variant goes with the model stage")
    if args.threads is not None:
        if args.threads < 1:
            ap.error(f"--threads must be >= 1, got {args.threads}")
        use_threads(args.threads)
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if args.log:
        Path(args.log).parent.mkdir(parents=True, exist_ok=True)
        # rank 0 starts the log afresh; every process then appends (O_APPEND), so a DDP worker
        # (Lightning re-runs this command with LOCAL_RANK set) adds its lines without clobbering
        if os.environ.get("LOCAL_RANK", "0") == "0":
            open(args.log, "w").close()
        handlers.append(logging.FileHandler(args.log, mode="a"))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", handlers=handlers, force=True)
    log.info("stage %s of %s (threads: %s)", args.stage, args.run_dir, args.threads or "library defaults")
    try:
        if args.variant is not None:  # a model variant trained alongside the model stage (_variants_alongside)
            Run(args.run_dir, progress=not args.no_progress).model(args.variant)
            result: Any = {"variant": args.variant}
        else:
            result = run_stage(args.stage, args.run_dir, progress=not args.no_progress, shard=args.shard)
    except SciscopeError as e:  # a deliberate error names what to fix: one line is enough
        log.error("stage %s failed: %s", args.stage, e)
        print(f"sciscope: error in stage {args.stage}: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # a bug or an unforeseen input: the traceback goes into the log, then one line
        log.error("traceback of stage %s:\n%s", args.stage, traceback.format_exc().rstrip())
        summary = f"{type(e).__name__}: {e}".splitlines()[0][:300] + (f" (at {_innermost_frame(e)})")
        log.error("stage %s failed: %s", args.stage, summary)
        print(f"sciscope: error in stage {args.stage}: {summary}", file=sys.stderr)
        return 1
    log.info("stage %s done: %s", args.stage, json.dumps(result, default=str)[:500])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
