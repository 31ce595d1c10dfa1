"""What the robotics adapter adds to each pipeline stage: tables, figures and headline rows.

Each function writes the tables its headline numbers are read from (``source`` of every row), so
a test can check that the report agrees with them; every number sits beside its control.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from sciscope.core.io import write_table, write_text

from . import env as _env
from .lens import CATEGORIES, clamp_sweep, select_clusters
from .plots import CLUSTER_METRIC, plot_alpha_curves, plot_layer_lens, plot_trajectories, plot_training

if TYPE_CHECKING:  # pragma: no cover
    from .adapter import RoboticsAdapter

__all__ = ["examples_rows", "feature_rows", "model_rows", "steering_rows", "clamp_summary"]


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


# ------------------------------------------------------------------------------------------------
# examples
# ------------------------------------------------------------------------------------------------


def examples_rows(ad: "RoboticsAdapter", out: Path) -> list[dict[str, Any]]:
    """Expert success (noise-free, held-out scenes) vs random actions; clipped demo actions."""
    obs, _, counts = ad.demos
    c, spec = ad.config, ad.env_spec
    per_ep = obs.groupby("episode").agg(split=("split", "first"), instruction=("instruction", "first"),
                                        manner=("manner", "first"), target_color=("target_color", "first"),
                                        n_states=("step", "size"), n_clipped_steps=("clipped", "sum")).reset_index()
    per_ep["success"] = counts["success"][per_ep["episode"].to_numpy()]
    write_table(out / "episodes.csv", per_ep)
    scenes = ad.eval_scenes(manners=None)
    expert, rand = ad.expert_rollout(scenes), ad.random_rollout(scenes)
    table = pd.DataFrame([{"agent": "expert (noise-free)", **expert}, {"agent": "random actions", **rand}])
    table.insert(1, "scenes", f"{len(scenes)} held-out scenes, mixed manners")
    write_table(out / "expert_vs_random.csv", table)
    n_steps = len(obs)
    lines = [
        "# Reaching task and expert demonstrations", "",
        f"- planar gripper, {spec.n_blocks} blocks of distinct colours ({', '.join(_env.COLORS)}), "
        f"{spec.image_size}x{spec.image_size} RGB images; an action (dx, dy) in [-1, 1]^2 moves the gripper by "
        f"action x {spec.max_step} (workspace [0, 1]^2); success = within {spec.success_radius} of the named block "
        f"within {spec.max_steps} steps",
        f"- instructions from {len(c['templates'])} templates, manner words {[m for m in _env.MANNERS if m]} "
        f"(expert speed slow {_env.MANNER_SPEED['slow']}, none {_env.MANNER_SPEED['normal']}, fast "
        f"{_env.MANNER_SPEED['fast']} x max step)",
        f"- {counts['n_episodes']} demonstration episodes, {n_steps} states; executed actions = expert + "
        f"N(0, {c['demo_noise']}^2) noise (DART), labels = clean expert actions; "
        f"{counts['n_success']} episodes succeeded with the noise",
        f"- **{counts['n_clipped']} executed action components fell outside [-1, 1] and were clipped** "
        f"({int(obs['clipped'].sum())} of {n_steps} steps); the noise-free expert needs no clipping "
        f"({counts['expert_clipped_noise_free']} clipped)",
        f"- splits hold whole episodes ({int((per_ep.split == 'test').sum())} test episodes); the policy trains on "
        "`train`; probes cross-validate over episode groups",
    ]
    write_text(out / "notes.md", "\n".join(lines) + "\n")
    return [
        {"stage": "examples", "name": "expert success rate (closed loop)", "value": expert["success_rate"],
         "control": rand["success_rate"], "control_label": "uniform random actions, same scenes",
         "note": f"{len(scenes)} held-out scenes; noise-free expert on the demonstration scenes: "
                 f"{_pct(counts['expert_success_noise_free'])}", "source": "examples/expert_vs_random.csv"},
        {"stage": "examples", "name": "demonstration actions clipped to [-1, 1]", "value": int(counts["n_clipped"]),
         "unit": "action components",
         "note": f"{int(obs['clipped'].sum())} of {n_steps} executed steps (noise std {c['demo_noise']}); "
                 f"noise-free expert: {counts['expert_clipped_noise_free']}", "source": "examples/episodes.csv"},
    ]


# ------------------------------------------------------------------------------------------------
# model
# ------------------------------------------------------------------------------------------------


def model_rows(ad: "RoboticsAdapter", model: Any, out: Path) -> list[dict[str, Any]]:
    """Closed-loop success and displacement by manner (policy vs expert), and the lens per layer."""
    info = ad.training_info
    if info.get("history"):
        write_table(out / "training_history.csv", pd.DataFrame(info["history"]))
        plot_training(info["history"], out / "training.png")
    scenes = ad.eval_scenes(manners=None)
    pol = ad.rollout(model, scenes).metrics
    expert, rand = ad.expert_rollout(scenes), ad.random_rollout(scenes)
    closed = pd.DataFrame([{"agent": "policy", **pol}, {"agent": "expert (noise-free)", **expert},
                           {"agent": "random actions", **rand}])
    write_table(out / "closed_loop.csv", closed)
    # displacement by manner: the same neutral scenes with a manner word put in front
    neutral = ad.eval_scenes()
    rows = []
    for word in ("slowly", "", "quickly"):
        sc = ad.manner_scenes(neutral, word)
        p, e = ad.rollout(model, sc).metrics, ad.expert_rollout(sc)
        rows.append({"manner_word": word or "none", "policy_displacement": p["displacement"],
                     "expert_displacement": e["displacement"], "policy_success": p["success_rate"],
                     "expert_success": e["success_rate"]})
    by_manner = pd.DataFrame(rows)
    write_table(out / "displacement_by_manner.csv", by_manner)
    # the lens: FFN value vectors through the final norm and LM head
    top, neurons, layers = ad.lens_tables(model)
    write_table(out / "ffn_lens_top_tokens.parquet", top)
    write_table(out / "ffn_neurons.csv", neurons)
    write_table(out / "lens_by_layer.csv", layers)
    plot_layer_lens(layers, out / "lens_by_layer.png")
    last = layers.iloc[-1]
    bm = by_manner.set_index("manner_word")
    return [
        {"stage": "model", "name": "policy success rate (closed loop)", "value": pol["success_rate"],
         "control": rand["success_rate"], "control_label": "uniform random actions, same scenes",
         "note": f"{len(scenes)} held-out scenes, mixed manners; expert {_pct(expert['success_rate'])}; "
                 f"teacher-forced exact-bin accuracy {info.get('final_bin_accuracy', float('nan')):.3f}",
         "source": "model/closed_loop.csv"},
        {"stage": "model", "name": "policy per-step displacement with 'quickly'", "value": float(bm.loc["quickly", "policy_displacement"]),
         "control": float(bm.loc["none", "policy_displacement"]), "control_label": "same scenes, no manner word",
         "unit": "x max step",
         "note": f"'slowly': {bm.loc['slowly', 'policy_displacement']:.3f}; expert slowly/none/quickly "
                 f"{bm.loc['slowly', 'expert_displacement']:.3f}/{bm.loc['none', 'expert_displacement']:.3f}/"
                 f"{bm.loc['quickly', 'expert_displacement']:.3f}", "source": "model/displacement_by_manner.csv"},
        {"stage": "model", "name": "policy actions clipped to [-1, 1]", "value": int(pol["n_clipped"]),
         "unit": "action components",
         "note": f"action tokens decode to bin centres inside [-1, 1]; wall contacts {int(pol['n_wall'])}; "
                 f"unrestricted argmax outside the action bins in {_pct(pol['non_action_rate'])} of decodes",
         "source": "model/closed_loop.csv"},
        {"stage": "model", "name": f"last-layer FFN neurons whose top-{ad.rule.k} tokens are mostly action tokens",
         "value": float(last["share_neurons_mostly_action"]),
         "control": float(last.get("share_neurons_mostly_action_untrained", np.nan)),
         "control_label": "same lens on untrained weights",
         "note": "per layer: " + ", ".join(f"{v:.2f}" for v in layers["share_neurons_mostly_action"])
                 + f"; vocabulary action share {float(last['vocabulary_action_share']):.2f}",
         "source": "model/lens_by_layer.csv"},
        {"stage": "model", "name": "last-layer FFN neurons with one coherent action meaning",
         "value": float(last["share_neurons_coherent"]),
         "control": float(last.get("share_neurons_coherent_untrained", np.nan)),
         "control_label": "same lens on untrained weights",
         "note": f">= {ad.rule.min_share:.0%} of the top-{ad.rule.k} tokens in one of {list(CATEGORIES)}; per layer: "
                 + ", ".join(f"{v:.2f}" for v in layers["share_neurons_coherent"]),
         "source": "model/lens_by_layer.csv"},
    ]


# ------------------------------------------------------------------------------------------------
# features
# ------------------------------------------------------------------------------------------------


def feature_rows(ad: "RoboticsAdapter", context: Any, out: Path) -> list[dict[str, Any]]:
    """Best SAE feature per action direction / manner / target colour (AUROC) vs shuffled, plus
    whether that feature's decoder direction, read through the LM head, writes the matching
    action tokens (only meaningful when the SAE sits on the last layer)."""
    analysis = context["analysis"]
    a = analysis.associations
    ctrl = analysis.control_associations
    rows = []
    decoder_share = _decoder_lens_share(ad, context)
    for concept in ("action_direction", "manner", "target_color"):
        t = a[(a["concept"] == concept) & (a["stat"] == "auroc")]
        for value, g in t.groupby("value", sort=True):
            g = g[np.isfinite(g["statistic"].to_numpy(dtype=np.float64))]
            if g.empty:
                continue
            best = g.loc[g["statistic"].idxmax()]
            row = {"concept": concept, "value": str(value), "best_feature": int(best["feature"]),
                   "auroc": float(best["statistic"]), "q": float(best["q"]), "significant": bool(best["significant"])}
            if ctrl is not None:
                cc = ctrl[(ctrl["concept"] == concept) & (ctrl["stat"] == "auroc") & (ctrl["value"].astype(str) == str(value))]
                row["auroc_shuffled"] = float(np.nanmax(cc["statistic"].to_numpy(dtype=np.float64))) if len(cc) else np.nan
            if decoder_share is not None and concept == "action_direction" and value in CATEGORIES:
                shares, mean_share = decoder_share
                row["decoder_top_share_in_direction"] = float(shares.loc[int(best["feature"]), value])
                row["decoder_top_share_all_features"] = float(mean_share[value])
            rows.append(row)
    table = pd.DataFrame(rows)
    write_table(out / "action_semantics.csv", table)
    heads = []
    for r in table.itertuples():
        if r.concept != "action_direction":
            continue
        note = f"feature {r.best_feature}, q = {r.q:.2g}"
        if hasattr(r, "decoder_top_share_in_direction") and np.isfinite(getattr(r, "decoder_top_share_in_direction", np.nan)):
            note += (f"; its decoder row's top-{ad.rule.k} lens tokens: {r.decoder_top_share_in_direction:.0%} '{r.value}' "
                     f"tokens (all features: {r.decoder_top_share_all_features:.0%})")
        heads.append({"stage": "features", "name": f"best SAE feature for action '{r.value}' (AUROC)",
                      "value": r.auroc, "control": getattr(r, "auroc_shuffled", None),
                      "control_label": "best AUROC on shuffled labels", "note": note,
                      "source": "features/action_semantics.csv"})
    return heads


def _decoder_lens_share(ad: "RoboticsAdapter", context: Any) -> tuple[pd.DataFrame, pd.Series] | None:
    """Per SAE feature: share of its decoder row's top-k lens tokens in each action category."""
    run_dir = ad.run_dir
    site = str(context.get("site", ""))
    if run_dir is None or site != f"layer.{ad.n_layers - 1}":
        return None
    sae_dir = Path(run_dir) / "sae" / "model"
    if not sae_dir.is_dir():
        return None
    from sciscope.core.lens import lens
    from sciscope.core.sae import load_sae

    sae = load_sae(sae_dir)
    W_dec = sae.W_dec.detach()  # (d_sae, d): each feature's direction in the residual stream
    policy = ad.model()
    if W_dec.shape[-1] != policy.config.hidden_size:
        return None
    info = policy.vocab.token_info()
    cats = ad.rule.token_categories(info).set_index("token_id")
    t = lens(W_dec.float(), policy.get_output_embeddings().weight.detach(), k=ad.rule.k, norm=policy.llm.model.norm)
    t = t.join(cats, on="token_id")
    shares = t.groupby("vector")[list(CATEGORIES)].mean()
    return shares, shares.mean()


# ------------------------------------------------------------------------------------------------
# steering: clamped clusters
# ------------------------------------------------------------------------------------------------


def clamp_summary(sweep: pd.DataFrame, reference: pd.DataFrame) -> pd.DataFrame:
    """Per cluster and alpha: its metric, the random clusters' mean/min/max, baseline and prompts.

    ``beyond_baseline`` / ``beyond_all_random``: the cluster moved its metric the way its name
    says (up for fast/right/up, down for slow/left/down) past the unclamped policy / past every
    random cluster of the same size and layers.
    """
    ref = reference.set_index(["condition", "metric"])["value"]
    rows = []
    for (cl, a), g in sweep.groupby(["cluster", "alpha"], sort=True):
        m = CLUSTER_METRIC.get(cl, "displacement")
        gm = g[g["metric"] == m]
        val = float(gm[gm["condition"] == "cluster"]["value"].iloc[0])
        rnd = gm[gm["condition"] != "cluster"]["value"].to_numpy(dtype=np.float64)
        succ = g[(g["metric"] == "success_rate") & (g["condition"] == "cluster")]["value"]
        base = float(ref.get(("baseline", m), np.nan))
        rows.append({
            "cluster": cl, "alpha": float(a), "n_neurons": int(g["n_neurons"].iloc[0]), "metric": m, "value": val,
            "random_mean": float(rnd.mean()) if rnd.size else np.nan, "random_min": float(rnd.min()) if rnd.size else np.nan,
            "random_max": float(rnd.max()) if rnd.size else np.nan,
            "baseline": base, "prompt_quickly": float(ref.get(("prompt: quickly", m), np.nan)),
            "prompt_slowly": float(ref.get(("prompt: slowly", m), np.nan)),
            "success_rate": float(succ.iloc[0]) if len(succ) else np.nan,
        })
    t = pd.DataFrame(rows)
    if len(t):
        sign = np.where(t["cluster"].isin(["slow", "left", "down"]), -1.0, 1.0)  # the way each cluster should move
        t["beyond_baseline"] = sign * (t["value"] - t["baseline"]) > 0
        t["beyond_all_random"] = sign * (t["value"] - np.where(sign > 0, t["random_max"], t["random_min"])) > 0
    return t


def steering_rows(ad: "RoboticsAdapter", out: Path) -> list[dict[str, Any]]:
    """Cluster clamping during closed-loop rollouts, beside random clusters, baseline and prompts."""
    policy = ad.model()
    c = ad.config
    scenes = ad.eval_scenes()
    keep = ("displacement", "dx", "dy", "success_rate", "alignment")

    def evaluate(p: Any) -> dict[str, float]:
        m = ad.rollout(p, scenes).metrics
        return {k: m[k] for k in keep}

    reference = []
    base_roll = ad.rollout(policy, scenes)
    prompts = {"baseline": base_roll.metrics, "prompt: quickly": ad.rollout(policy, ad.manner_scenes(scenes, "quickly")).metrics,
               "prompt: slowly": ad.rollout(policy, ad.manner_scenes(scenes, "slowly")).metrics}
    for cond, m in prompts.items():
        reference += [{"condition": cond, "metric": k, "value": float(m[k])} for k in keep]
    reference_t = pd.DataFrame(reference)
    write_table(out / "clamp_reference.csv", reference_t)
    _, neurons, _ = ad.lens_tables(policy)
    clusters = select_clusters(neurons, ad.rule, c["clusters"])
    members = pd.concat([cl.assign(cluster=name)[["cluster", "layer", "neuron", "top_tokens"]] for name, cl in clusters.items()],
                        ignore_index=True) if clusters else pd.DataFrame(columns=["cluster", "layer", "neuron", "top_tokens"])
    write_table(out / "clusters.csv", members)
    sweep = clamp_sweep(policy, clusters, c["clamp_alphas"], evaluate, n_random=c["clamp_n_random"], seed=c["seed"],
                        positions=c["clamp_positions"], progress=None)
    write_table(out / "clamp_sweep.csv", sweep)
    summary = clamp_summary(sweep, reference_t)
    write_table(out / "clamp_summary.csv", summary)
    plot_alpha_curves(sweep, reference_t, out / "clamp_metric_vs_alpha.png")
    # trajectories: baseline vs the fast (or first non-empty) cluster and a random cluster at the largest alpha
    from .lens import clamp_cluster, random_cluster

    a_max = max(c["clamp_alphas"]) if c["clamp_alphas"] else 0.0
    n_neurons = {i: int(policy.llm.model.layers[i].mlp.down_proj.in_features) for i in range(policy.n_layers)}
    for name in ("fast", "right", "up"):
        cl = clusters.get(name)
        if cl is None or cl.empty or c["n_trajectory_plots"] == 0:
            continue
        with clamp_cluster(policy, cl, a_max, positions=c["clamp_positions"]):
            steered = ad.rollout(policy, scenes)
        with clamp_cluster(policy, random_cluster(cl, n_neurons, c["seed"]), a_max, positions=c["clamp_positions"]):
            rand = ad.rollout(policy, scenes)
        paths = {"baseline": base_roll.paths, f"{name} cluster, alpha={a_max:g}": steered.paths,
                 f"random cluster ({len(cl)}), alpha={a_max:g}": rand.paths}
        if name == "fast":
            paths["prompt: quickly"] = ad.rollout(policy, ad.manner_scenes(scenes, "quickly")).paths
        plot_trajectories(scenes, paths, out / f"trajectories_{name}.png", n=c["n_trajectory_plots"],
                          title=f"baseline vs {name} cluster clamped to {a_max:g}",
                          success_radius=ad.env_spec.success_radius)
    rows = []
    sizes = {k: len(v) for k, v in clusters.items()}
    empty = [k for k, v in sizes.items() if v == 0]
    top = summary[summary["alpha"] == a_max] if len(summary) else summary
    for r in top.itertuples():
        rows.append({
            "stage": "steering", "name": f"clamp {r.cluster} cluster to {r.alpha:g}: {r.metric}", "value": r.value,
            "control": r.random_mean, "control_label": f"random clusters, same size and layers (n={c['clamp_n_random']})",
            "unit": "x max step",
            "note": f"{r.n_neurons} neurons at {c['clamp_positions']} positions; unclamped {r.baseline:.3f}; prompt 'quickly' {r.prompt_quickly:.3f}, "
                    f"'slowly' {r.prompt_slowly:.3f}; success {r.success_rate:.2f} (unclamped "
                    f"{prompts['baseline']['success_rate']:.2f})", "source": "steering/clamp_summary.csv"})
    if empty:
        rows.append({"stage": "steering", "name": "clusters left empty by the rule", "value": len(empty),
                     "note": f"{empty}: no neuron has >= {ad.rule.min_share:.0%} of its top-{ad.rule.k} tokens there",
                     "source": "steering/clusters.csv"})
    return rows
