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
from sciscope.core.verdict import verdict

from .data import REGIMES
from .diagnostics import DIAGNOSTICS, SHARED_DIAGNOSTICS, main_field
from .model import rollout
from .physicality import within_bands
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
    """The parameter probe sets in one figure: across regimes and within each regime, beside the shuffled
    control and the strongest non-model baseline (their tables and rows are the probe stage's)."""
    names = {f"parameters_{s}": s for s in ad.config["systems"]}
    names.update({f"parameters_{s}_{r}": f"{s} / {r}" for s in ad.config["systems"] for r in REGIMES[s]})
    parts = [ctx.live[f"probes:{n}"].summary().assign(system=label) for n, label in names.items() if f"probes:{n}" in ctx.live]
    if parts:  # each set's table is the probe stage's probes/<set>.csv
        plot_parameter_probes(pd.concat(parts, ignore_index=True), ctx.output("parameter_probes_vs_layer.png"))
    return []


def trajectory_spread(top: pd.DataFrame) -> pd.DataFrame:
    """Per feature, where its top windows come from: ``n_top`` (active top windows), ``n_trajectories``,
    ``top_trajectory`` and its share, and ``single_trajectory`` (at least 2 active top windows, all from
    one trajectory: a detector of one simulation, not of a concept)."""
    act = top[top["activation"] > 0]
    if act.empty:
        return pd.DataFrame(columns=["feature", "n_top", "n_trajectories", "top_trajectory", "top_share", "single_trajectory"])
    g = act.groupby("feature")["trajectory"]
    out = pd.DataFrame({"n_top": g.size(), "n_trajectories": g.nunique(),
                        "top_trajectory": g.agg(lambda v: v.value_counts().index[0]),
                        "top_share": g.agg(lambda v: v.value_counts().iloc[0] / len(v))}).reset_index()
    out["single_trajectory"] = (out["n_top"] >= 2) & (out["n_trajectories"] == 1)
    return out


def _baseline_rho(ad: "PhysicsAdapter", ctx: Any, obs: pd.DataFrame, diagnostics: list[str]) -> pd.DataFrame:
    """Per diagnostic the largest |Spearman rho| across trajectories of any non-model feature (radial
    spectrum bins, pixel PCA components of the window's last frame), as the features are tested; empty
    when the examples do not line up with the latents' rows."""
    from sciscope.core.features import concept_associations

    ex = ctx.examples()
    keys = ["trajectory", "t"]
    if len(ex.obs) != len(obs) or not (ex.obs[keys].to_numpy() == obs[keys].to_numpy()).all():
        return pd.DataFrame(columns=["diagnostic", "baseline_rho", "baseline_feature"])
    base = ad.baseline_features(ex)
    names = [f"{k}[{j}]" for k, v in base.items() for j in range(np.asarray(v).shape[1])]
    X = np.concatenate([np.asarray(v, dtype=np.float64) for v in base.values()], axis=1)
    a = concept_associations(X, obs.reset_index(drop=True), diagnostics, method="spearman", groups="trajectory")
    a = a[np.isfinite(a["statistic"].to_numpy(dtype=np.float64))]
    rows = []
    for d, t in a.groupby("concept", sort=False):
        best = t.loc[t["statistic"].abs().idxmax()]
        rows.append({"diagnostic": d, "baseline_rho": float(best["statistic"]), "baseline_feature": names[int(best["feature"])]})
    return pd.DataFrame(rows, columns=["diagnostic", "baseline_rho", "baseline_feature"])


def _rho_verdict(rho: float, base: float, n: int) -> str | None:
    """Verdict of |rho| against the baseline's |rho| on Fisher's z scale, margin 2 standard errors of the difference."""
    if not (np.isfinite(rho) and np.isfinite(base)) or n <= 3:
        return None
    z = lambda r: float(np.arctanh(min(abs(r), 1 - 1e-9)))  # noqa: E731
    return verdict(z(rho), z(base), tolerance=2.0 * float(np.sqrt(2.0 / (n - 3))))


def feature_diagnostics(ad: "PhysicsAdapter", ctx: Any) -> Rows:
    """Features read across trajectories, never windows (the windows of one trajectory are not independent).

    Writes ``feature_trajectories.csv`` (per feature: how many trajectories its top windows span) and
    ``diagnostic_correlations.csv``: per diagnostic the SAE feature with the largest |Spearman rho|
    across trajectories (activations and diagnostics averaged per trajectory, q-values over
    trajectories), leaving out features whose top windows all come from one trajectory, beside the
    best on shuffled diagnostics (control) and the best radial-spectrum / pixel-PCA component
    (baseline); and a scatter of each, coloured by regime.
    """
    features, rows = ctx.features(), []
    a, ctrl = features.associations, features.control_associations
    spread = trajectory_spread(features.top_examples)
    single = set(spread.loc[spread["single_trajectory"], "feature"].astype(int))
    src_spread = ctx.write_table("feature_trajectories.csv", spread)
    k = int(ctx.config.get("feature_top_k", 10))
    live = int((features.density["density"] > 0).sum()) if "density" in features.density else len(features.density)
    rows.append({"name": f"SAE features whose top-{k} windows all come from one trajectory", "value": len(single),
                 "unit": "features", "note": f"of {live} live features; flagged in feature_trajectories.csv and not counted as "
                 "concept features (a detector of one simulation)", "source": src_spread})
    sig = lambda t: set(t.loc[t["significant"].astype(bool), "feature"].astype(int)) - single  # noqa: E731
    rows.append({"name": "SAE features tied to a concept across trajectories (FDR 0.05, top windows from >= 2 trajectories)",
                 "value": len(sig(a)), "control": None if ctrl is None else len(sig(ctrl)),
                 "control_label": "the same on concepts shuffled among trajectories",
                 "note": f"tests and q-values across trajectories (n = {int(a['n'].max()) if len(a) else 0}); "
                         f"{len(set(a.loc[a['significant'].astype(bool), 'feature'].astype(int)) & single)} significant "
                         "single-trajectory features left out", "source": "features/analysis/associations.csv"})
    diags = list(dict.fromkeys([d for s in ad.config["systems"] for d in DIAGNOSTICS[s]] + list(SHARED_DIAGNOSTICS)))
    table_rows = []
    for d in diags:
        t = a[(a["concept"] == d) & a["stat"].astype(str).str.startswith("spearman") & ~a["feature"].isin(single)]
        t = t[np.isfinite(t["statistic"].to_numpy(dtype=np.float64))]
        if t.empty:
            continue
        best = t.loc[t["statistic"].abs().idxmax()]
        row = {"diagnostic": d, "feature": int(best["feature"]), "rho": float(best["statistic"]), "q": float(best["q"]),
               "n": int(best["n"]), "n_features_significant": int(t["significant"].sum())}
        if ctrl is not None:
            cc = ctrl[(ctrl["concept"] == d) & ctrl["stat"].astype(str).str.startswith("spearman")]["statistic"].to_numpy(dtype=np.float64)
            row["max_abs_rho_shuffled"] = float(np.nanmax(np.abs(cc))) if np.isfinite(cc).any() else float("nan")
        table_rows.append(row)
    table = pd.DataFrame(table_rows)
    if table.empty:
        return rows
    latents = ctx.latents()
    obs = latents.obs.reset_index(drop=True)
    table = table.merge(_baseline_rho(ad, ctx, obs, list(table["diagnostic"])), on="diagnostic", how="left")
    table = table.merge(spread[["feature", "n_trajectories"]].rename(columns={"n_trajectories": "top_trajectories"}),
                        on="feature", how="left")
    table["verdict"] = [_rho_verdict(r.rho, r.baseline_rho, r.n) for r in table.itertuples()]
    source = ctx.write_table("diagnostic_correlations.csv", table)
    pairs = [(r.diagnostic, int(r.feature), float(r.rho)) for r in table.itertuples()]
    plot_feature_diagnostics(latents.array("latents"), obs, pairs, ctx.output("features_vs_diagnostics.png"))
    for r in table.itertuples():
        has_base = isinstance(r.baseline_feature, str)
        rows.append({"name": f"SAE feature vs {r.diagnostic} (|Spearman rho| across trajectories)", "value": abs(r.rho),
                     "control": getattr(r, "max_abs_rho_shuffled", None), "control_label": "max |rho| on diagnostics shuffled among trajectories",
                     "baseline": abs(r.baseline_rho) if has_base else None,
                     "baseline_label": f"best radial-spectrum / pixel-PCA component ({r.baseline_feature})" if has_base else None,
                     "verdict": r.verdict if has_base else None,
                     "note": f"feature {r.feature} (rho {r.rho:+.2f}, q = {r.q:.2g} over n = {r.n} trajectories; top windows from "
                             f"{r.top_trajectories:.0f} trajectories); {r.n_features_significant} features significant; verdict on "
                             "Fisher's z, margin 2 standard errors", "source": source})
    return rows


def rollout_strips(ad: "PhysicsAdapter", ctx: Any) -> Rows:
    """Image strips per system and start regime (truth, alpha = 0, +-``strip_alpha``, a random
    direction at +``strip_alpha``) into ``steering/recipe_<system>/``; each row is labelled with its
    rollout's numbers: classifier P(A), physical or not (:mod:`.physicality`), sub-patch power share."""
    model, c, alpha = ctx.model(), ad.config, float(ad.config["strip_alpha"])
    for system in c["systems"]:
        vec = AddVector(ad.recipe_vector(ctx, system), ad.steer_site, scale="relative", relative_to="example")
        conditions = {"alpha = 0": (vec, 0.0), f"+{alpha:g} regime vector": (vec, alpha),
                      f"-{alpha:g} regime vector": (vec, -alpha), f"+{alpha:g} random": (vec.controls(model, 1, seed=c["seed"])[0], alpha)}
        ev = RolloutScorer(ad, system, model)
        steps = sorted(set(np.linspace(0, ev.n_steps - 1, min(6, ev.n_steps)).round().astype(int).tolist()))
        a, b = REGIMES[system]
        for regime in (b, a):
            fields = {"simulation": ev.truth[regime][0]}
            for label, (iv, al) in conditions.items():
                with ad.threads(), iv.apply(model, al, aliases=ad.aliases):
                    fields[label] = rollout(model, ev.contexts[regime][:1], ev.n_steps, blowup=c["blowup"]).frames[0]
            labelled = {_strip_label(ev, label, frames): main_field(system, ad.trajectories.denormalise(system, frames))
                        for label, frames in fields.items()}
            plot_rollout_strips(system, labelled, ctx.output(f"recipe_{system}/rollout_strips_from_{regime}.png"), steps=steps,
                                title=f"{system}: rollout from a {regime} test trajectory; +alpha pushes toward {a}, -alpha toward {b}")
    return []


def _strip_label(ev: RolloutScorer, label: str, frames: np.ndarray) -> str:
    """``label`` with the rollout's P(A) over its scored frames, physical or not, and its largest sub-patch power share."""
    last = frames[-ev.score_frames:]
    if not np.isfinite(last).all():
        return f"{label}\ndiverged"
    diag, p = ev._diagnostics(last[None])
    ok = bool(within_bands(diag, ev.bands).all())
    return (f"{label}\nP({ev.regime_a}) {np.nanmean(p):.2f}, {'physical' if ok else 'NOT physical'}"
            f"\nsub-patch power {diag['subpatch_power'].max():.3f}")


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
