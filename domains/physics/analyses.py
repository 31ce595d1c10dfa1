"""The physics adapter's declared analyses: each writes its tables and figures through the run
context and returns its headline rows (each beside its control)."""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from sciscope.core.interventions import AddVector
from sciscope.core.plotting import save_training_history
from sciscope.core.steer import contrast_vector

from .data import REGIMES
from .diagnostics import DIAGNOSTICS, SHARED_DIAGNOSTICS, main_field
from .model import rollout
from .plots import (plot_feature_diagnostics, plot_parameter_probes, plot_regime_examples, plot_rollout_errors,
                    plot_rollout_strips)
from .steering import RolloutScorer

if TYPE_CHECKING:
    from .adapter import PhysicsAdapter

Rows = list[dict[str, Any]]


def examples_summary(ad: "PhysicsAdapter", ctx: Any) -> Rows:
    """Regime classifier accuracy per system beside shuffled regimes; the trajectory table and a figure."""
    ts, clfs = ad.trajectories, {s: ad.classifier(s) for s in ad.config["systems"]}
    table = pd.DataFrame([{"system": s, "positive": c.positive, "columns": ",".join(c.columns), "cv_accuracy": c.cv_accuracy,
                           "shuffled_accuracy": c.control_accuracy} for s, c in clfs.items()])
    clf_source = ctx.write_table("regime_classifier.csv", table)
    rows = [{"name": f"{s}: regime classifier accuracy (diagnostics)", "value": c.cv_accuracy,
             "control": c.control_accuracy, "control_label": "regimes shuffled among trajectories",
             "note": f"logistic regression on {', '.join(c.columns)}; trajectory-grouped CV on train frames",
             "source": clf_source} for s, c in clfs.items()]
    source = ctx.write_table("trajectories.csv", ts.table)
    fields = {(s, r): main_field(s, ts.frames[ts.ids(system=s, regime=r)[:6], -1]) for s in clfs for r in REGIMES[s]}
    plot_regime_examples(fields, ctx.output("regimes.png"))
    counts = ts.table.groupby(["system", "regime", "split"]).size()
    rows.append({"name": "simulated trajectories", "value": len(ts.table), "unit": "trajectories", "source": source,
                 "note": "; ".join(f"{s}/{r}/{sp}: {n}" for (s, r, sp), n in counts.items())
                 + f"; {ts.frames.shape[1]} frames of {ts.frames.shape[-1]}x{ts.frames.shape[-1]}"})
    return rows


def model_errors(ad: "PhysicsAdapter", ctx: Any) -> Rows:
    """One-step and rollout MSE beside persistence (``one_step_error.csv``, ``rollout_error.csv``)."""
    one, hor = ad.prediction_errors(ctx.model())
    src_one, src_hor = ctx.write_table("one_step_error.csv", one), ctx.write_table("rollout_error.csv", hor)
    plot_rollout_errors(hor, ctx.output("rollout_error.png"))
    save_training_history(ad.training_info.get("history", []), ctx.output("training_loss.png"),
                          ylabel="loss / mean squared change", title="next-frame change, training loss")
    rows = [{"name": f"{r.system}: one-step MSE", "value": r.mse_model, "control": r.mse_persistence,
             "control_label": "persistence (next = last frame)", "source": src_one,
             "note": f"{r.n_windows} test windows, standardised units; ratio {r.mse_model / r.mse_persistence:.3f}"}
            for r in one.itertuples()]
    for system, t in hor.groupby("system", sort=False):
        last = t.sort_values("horizon").iloc[-1]
        rows.append({"name": f"{system}: rollout MSE at step {int(last.horizon)}", "value": float(last.mse_model),
                     "control": float(last.mse_persistence), "control_label": "persistence (last context frame repeated)",
                     "note": f"{int(last.n_rollouts)} test trajectories; {int(last.n_diverged)} diverged", "source": src_hor})
    return rows


def parameter_probes(ad: "PhysicsAdapter", ctx: Any) -> Rows:
    """The per-system parameter probe sets in one figure (their tables and rows are the probe stage's)."""
    parts = [ctx.live[f"probes:parameters_{s}"].summary().assign(system=s) for s in ad.config["systems"]
             if f"probes:parameters_{s}" in ctx.live]
    if parts:  # each set's table is the probe stage's probes/parameters_<system>.csv
        plot_parameter_probes(pd.concat(parts, ignore_index=True), ctx.output("parameter_probes_vs_layer.png"))
    return []


def feature_diagnostics(ad: "PhysicsAdapter", ctx: Any) -> Rows:
    """Per diagnostic the SAE feature with the largest |Spearman rho| beside the best on shuffled
    diagnostics (``diagnostic_correlations.csv``), and a scatter of each, coloured by regime."""
    features, rows = ctx.features(), []
    a, ctrl = features.associations, features.control_associations
    for d in dict.fromkeys([d for s in ad.config["systems"] for d in DIAGNOSTICS[s]] + list(SHARED_DIAGNOSTICS)):
        t = a[(a["concept"] == d) & a["stat"].astype(str).str.startswith("spearman")]
        t = t[np.isfinite(t["statistic"].to_numpy(dtype=np.float64))]
        if t.empty:
            continue
        best = t.loc[t["statistic"].abs().idxmax()]
        row = {"diagnostic": d, "feature": int(best["feature"]), "rho": float(best["statistic"]), "q": float(best["q"]),
               "n": int(best["n"]), "n_features_significant": int(t["significant"].sum())}
        if ctrl is not None:
            cc = ctrl[(ctrl["concept"] == d) & ctrl["stat"].astype(str).str.startswith("spearman")]["statistic"].to_numpy(dtype=np.float64)
            row["max_abs_rho_shuffled"] = float(np.nanmax(np.abs(cc))) if np.isfinite(cc).any() else float("nan")
        rows.append(row)
    table = pd.DataFrame(rows)
    if table.empty:
        return []
    source = ctx.write_table("diagnostic_correlations.csv", table)
    latents = ctx.latents()
    pairs = [(r.diagnostic, int(r.feature), float(r.rho)) for r in table.itertuples()]
    plot_feature_diagnostics(latents.array("latents"), latents.obs.reset_index(drop=True), pairs,
                             ctx.output("features_vs_diagnostics.png"))
    return [{"name": f"SAE feature vs {r.diagnostic} (|Spearman rho|)", "value": abs(r.rho),
             "control": getattr(r, "max_abs_rho_shuffled", None), "control_label": "max |rho| on shuffled diagnostics",
             "note": f"feature {r.feature} (rho {r.rho:+.2f}, q = {r.q:.2g}, n = {r.n}); {r.n_features_significant} features significant",
             "source": source} for r in table.itertuples()]


def rollout_strips(ad: "PhysicsAdapter", ctx: Any) -> Rows:
    """Image strips per system and start regime (truth, alpha = 0, +-``strip_alpha``, a random
    direction at +``strip_alpha``) into ``steering/recipe_<system>/``."""
    model, c, alpha = ctx.model(), ad.config, float(ad.config["strip_alpha"])
    for system in c["systems"]:
        vec = AddVector(ad.recipe_vector(ctx, system), ad.steer_site, scale="relative", relative_to="example")
        conditions = {"alpha = 0": (vec, 0.0), f"+{alpha:g} regime vector": (vec, alpha),
                      f"-{alpha:g} regime vector": (vec, -alpha), f"+{alpha:g} random": (vec.controls(model, 1, seed=c["seed"])[0], alpha)}
        ev = RolloutScorer(ad, system)
        steps = sorted(set(np.linspace(0, ev.n_steps - 1, min(6, ev.n_steps)).round().astype(int).tolist()))
        a, b = REGIMES[system]
        for regime in (b, a):
            fields = {"simulation": ev.truth[regime][0]}
            for label, (iv, al) in conditions.items():
                with ad.threads(), iv.apply(model, al, aliases=ad.aliases):
                    fields[label] = rollout(model, ev.contexts[regime][:1], ev.n_steps, blowup=c["blowup"]).frames[0]
            fields = {k: main_field(system, ad.trajectories.denormalise(system, v)) for k, v in fields.items()}
            plot_rollout_strips(system, fields, ctx.output(f"recipe_{system}/rollout_strips_from_{regime}.png"), steps=steps,
                                title=f"{system}: rollout from a {regime} test trajectory; +alpha pushes toward {a}, -alpha toward {b}")
    return []


def vector_cosines(ad: "PhysicsAdapter", ctx: Any) -> Rows:
    """Cosine of each recipe vector with the plain mean difference of the run's store, and between
    systems (``transfer.csv``: the vectors the transfer plans inject; their effects are those plans' rows)."""
    site, rows = ad.steer_site, []
    vecs = {s: ad.recipe_vector(ctx, s) for s in ad.config["systems"]}
    for s, (qa, qb) in ad.contrasts.items():
        plain = contrast_vector(ctx.store(), site, a=qa, b=qb)
        rows.append({"name": f"{s}: cosine(plain mean difference, recipe vector)", "value": plain.cosine(vecs[s]),
                     "note": "plain: mean over windows of raw activations; recipe: z-normalised per window, averaged per "
                             "trajectory", "source": f"steering/recipe_{s}/vector.safetensors"})
    table = pd.DataFrame([{"source_system": src, "target_system": dst, "plan": f"transfer_{src}_to_{dst}",
                           "cosine_source_target_vectors": vecs[src].cosine(vecs[dst]), "source_norm": vecs[src].norm,
                           "target_norm": vecs[dst].norm} for src, dst in itertools.permutations(vecs, 2)])
    if len(table):
        source = ctx.write_table("transfer.csv", table)
        for r in table.iloc[::2].itertuples():
            rows.append({"name": f"cosine({r.source_system} vector, {r.target_system} vector)", "value": r.cosine_source_target_vectors,
                         "note": f"effects of each vector in the other system's rollouts: steering/{r.plan}/ and its reverse",
                         "source": source})
    return rows
