"""The robotics adapter's analyses (one ``Analysis.compute`` per stage): tables, figures and headline rows,
every number beside its control. The clamped clusters themselves are steering plans the core runs."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from sciscope.core.plotting import save_training_history

from . import env as _env
from .lens import CATEGORIES, cluster_clamp
from .plots import plot_layer_lens, plot_trajectories

if TYPE_CHECKING:  # pragma: no cover
    from sciscope.core.context import RunContext

__all__ = ["cluster_rows", "examples_rows", "feature_rows", "model_rows"]

Rows = list[dict[str, Any]]


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def examples_rows(ctx: "RunContext") -> Rows:
    """Expert success (noise-free, held-out scenes) vs random actions; clipped demo actions; notes.md."""
    ad = ctx.adapter
    obs, _, counts = ad.demos
    c, spec = ad.config, ad.env_spec
    per_ep = obs.groupby("episode").agg(split=("split", "first"), instruction=("instruction", "first"),
                                        manner=("manner", "first"), target_color=("target_color", "first"),
                                        n_states=("step", "size"), n_clipped_steps=("clipped", "sum")).reset_index()
    per_ep["success"] = counts["success"][per_ep["episode"].to_numpy()]
    episodes = ctx.write_table("episodes.csv", per_ep)
    scenes = ad.eval_scenes(manners=None)
    expert, rand = ad.scripted_rollout(scenes), ad.scripted_rollout(scenes, "random")
    table = pd.DataFrame([{"agent": "expert (noise-free)", **expert}, {"agent": "random actions", **rand}])
    table.insert(1, "scenes", f"{len(scenes)} held-out scenes, mixed manners")
    source = ctx.write_table("expert_vs_random.csv", table)
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
    ctx.write_text("notes.md", "\n".join(lines) + "\n")
    return [
        {"name": "expert success rate (closed loop)", "value": expert["success_rate"],
         "control": rand["success_rate"], "control_label": "uniform random actions, same scenes",
         "note": f"{len(scenes)} held-out scenes; noise-free expert on the demonstration scenes: "
                 f"{_pct(counts['expert_success_noise_free'])}", "source": source},
        {"name": "demonstration actions clipped to [-1, 1]", "value": int(counts["n_clipped"]),
         "unit": "action components",
         "note": f"{int(obs['clipped'].sum())} of {n_steps} executed steps (noise std {c['demo_noise']}); "
                 f"noise-free expert: {counts['expert_clipped_noise_free']}", "source": episodes},
    ]


def model_rows(ctx: "RunContext") -> Rows:
    """Closed-loop success and displacement by manner (policy vs expert), and the lens per layer."""
    ad, model = ctx.adapter, ctx.model()
    info = ad.training_info
    save_training_history(info.get("history", []), ctx.output("training_history.png"), ylabel="BC loss (soft cross-entropy)",
                          title="behaviour cloning")  # and training_history.csv (with the bin accuracy)
    scenes = ad.eval_scenes(manners=None)
    pol = ad.rollout(model, scenes).metrics
    expert, rand = ad.scripted_rollout(scenes), ad.scripted_rollout(scenes, "random")
    closed = pd.DataFrame([{"agent": "policy", **pol}, {"agent": "expert (noise-free)", **expert},
                           {"agent": "random actions", **rand}])
    closed_src = ctx.write_table("closed_loop.csv", closed)
    # displacement by manner: the same neutral scenes with a manner word put in front
    neutral = ad.eval_scenes()
    rows = []
    for word in ("slowly", "", "quickly"):
        sc = ad.manner_scenes(neutral, word)
        p, e = ad.rollout(model, sc).metrics, ad.scripted_rollout(sc)
        rows.append({"manner_word": word or "none", "policy_displacement": p["displacement"],
                     "expert_displacement": e["displacement"], "policy_success": p["success_rate"],
                     "expert_success": e["success_rate"]})
    by_manner = pd.DataFrame(rows)
    manner_src = ctx.write_table("displacement_by_manner.csv", by_manner)
    # the lens: FFN value vectors through the final norm and LM head
    top, neurons, layers = ad.lens_tables(model)
    ctx.write_table("ffn_lens_top_tokens.parquet", top)
    ctx.write_table("ffn_neurons.csv", neurons)
    lens_src = ctx.write_table("lens_by_layer.csv", layers)
    ctx.save_figure("lens_by_layer.png", plot_layer_lens(layers))
    last = layers.iloc[-1]
    bm = by_manner.set_index("manner_word")
    return [
        {"name": "policy success rate (closed loop)", "value": pol["success_rate"],
         "control": rand["success_rate"], "control_label": "uniform random actions, same scenes",
         "note": f"{len(scenes)} held-out scenes, mixed manners; expert {_pct(expert['success_rate'])}; "
                 f"teacher-forced exact-bin accuracy {info.get('final_bin_accuracy', float('nan')):.3f}",
         "source": closed_src},
        {"name": "policy per-step displacement with 'quickly'", "value": float(bm.loc["quickly", "policy_displacement"]),
         "control": float(bm.loc["none", "policy_displacement"]), "control_label": "same scenes, no manner word",
         "unit": "x max step",
         "note": f"'slowly': {bm.loc['slowly', 'policy_displacement']:.3f}; expert slowly/none/quickly "
                 f"{bm.loc['slowly', 'expert_displacement']:.3f}/{bm.loc['none', 'expert_displacement']:.3f}/"
                 f"{bm.loc['quickly', 'expert_displacement']:.3f}", "source": manner_src},
        {"name": "policy actions clipped to [-1, 1]", "value": int(pol["n_clipped"]),
         "unit": "action components",
         "note": f"action tokens decode to bin centres inside [-1, 1]; wall contacts {int(pol['n_wall'])}; "
                 f"unrestricted argmax outside the action bins in {_pct(pol['non_action_rate'])} of decodes",
         "source": closed_src},
    ] + [{"name": name, "value": float(last[col]), "control": float(last.get(f"{col}_untrained", np.nan)),
          "control_label": "same lens on untrained weights", "source": lens_src,
          "note": note.format("per layer: " + ", ".join(f"{v:.2f}" for v in layers[col]))} for name, col, note in (
        (f"last-layer FFN neurons whose top-{ad.rule.k} tokens are mostly action tokens", "share_neurons_mostly_action",
         f"{{}}; vocabulary action share {float(last['vocabulary_action_share']):.2f}"),
        ("last-layer FFN neurons with one coherent action meaning", "share_neurons_coherent",
         f">= {ad.rule.min_share:.0%} of the top-{ad.rule.k} tokens in one of {list(CATEGORIES)}; {{}}"))]


def feature_rows(ctx: "RunContext") -> Rows:
    """Best SAE feature per action direction / manner / target colour (AUROC) vs shuffled, plus
    whether that feature's decoder direction, read through the LM head, writes the matching
    action tokens (only meaningful when the SAE sits on the last layer)."""
    ad, analysis = ctx.adapter, ctx.features()
    a, ctrl = analysis.associations, analysis.control_associations
    rows, heads, source = [], [], ctx.source("action_semantics.csv")
    decoder_share = _decoder_lens_share(ctx)
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
            rows.append(row)
            if concept != "action_direction":
                continue
            note = f"feature {row['best_feature']}, q = {row['q']:.2g}"
            if decoder_share is not None and value in CATEGORIES:
                shares, mean_share = decoder_share
                row["decoder_top_share_in_direction"] = float(shares.loc[int(best["feature"]), value])
                row["decoder_top_share_all_features"] = float(mean_share[value])
                note += (f"; its decoder row's top-{ad.rule.k} lens tokens: {row['decoder_top_share_in_direction']:.0%} "
                         f"'{value}' tokens (all features: {row['decoder_top_share_all_features']:.0%})")
            heads.append({"name": f"best SAE feature for action '{value}' (AUROC)", "value": row["auroc"],
                          "control": row.get("auroc_shuffled"), "control_label": "best AUROC on shuffled labels",
                          "note": note, "source": source})
    ctx.write_table("action_semantics.csv", pd.DataFrame(rows))
    return heads


def _decoder_lens_share(ctx: "RunContext") -> tuple[pd.DataFrame, pd.Series] | None:
    """Per SAE feature: share of its decoder row's top-k lens tokens in each action category
    (None unless the SAE sits on the last layer, whose output the LM head reads)."""
    from sciscope.core.lens import lens

    ad = ctx.adapter
    if str(ctx.sae_metrics().get("site", "")) != f"layer.{ad.n_layers - 1}":
        return None
    W_dec = ctx.sae().W_dec.detach()  # (d_sae, d): each feature's direction in the residual stream
    policy = ctx.model()
    if W_dec.shape[-1] != policy.config.hidden_size:
        return None
    cats = ad.rule.token_categories(policy.vocab.token_info()).set_index("token_id")
    t = lens(W_dec.float(), policy.get_output_embeddings().weight.detach(), k=ad.rule.k, norm=policy.llm.model.norm)
    shares = t.join(cats, on="token_id").groupby("vector")[list(CATEGORIES)].mean()
    return shares, shares.mean()


def cluster_rows(ctx: "RunContext") -> Rows:
    """``clusters.csv`` (members by the rule), trajectory figures (unclamped policy vs a cluster
    and one of its random controls clamped to the largest alpha, and the 'quickly' prompt), and a
    row naming the clusters the rule left empty."""
    ad, policy = ctx.adapter, ctx.model()
    c = ad.config  # validated (ctx.config holds the run's raw values)
    clusters = ad.clusters(policy, c["clusters"])
    cols = ["cluster", "layer", "neuron", "top_tokens"]
    members = pd.concat([cl.assign(cluster=name)[cols] for name, cl in clusters.items()], ignore_index=True) \
        if clusters else pd.DataFrame(columns=cols)
    source = ctx.write_table("clusters.csv", members)
    scenes = ad.eval_scenes()
    a_max = max(c["clamp_alphas"]) if c["clamp_alphas"] else 0.0
    for name in ("fast", "right", "up"):
        cl = clusters.get(name)
        if cl is None or cl.empty or c["n_trajectory_plots"] == 0:
            continue
        iv = cluster_clamp(cl, positions=c["clamp_positions"])
        paths = {"unclamped": ad.rollout(policy, scenes).paths}
        for label, clamp in ((f"{name} cluster, alpha={a_max:g}", iv),
                             (f"random neurons ({iv.n_units}), alpha={a_max:g}", iv.controls(policy, 1, seed=ctx.seed)[0])):
            with clamp.apply(policy, a_max):
                paths[label] = ad.rollout(policy, scenes).paths
        if name == "fast":
            paths["prompt: quickly"] = ad.rollout(policy, ad.manner_scenes(scenes, "quickly")).paths
        ctx.save_figure(f"trajectories_{name}.png", plot_trajectories(
            scenes, paths, n=c["n_trajectory_plots"], title=f"unclamped vs {name} cluster clamped to {a_max:g}",
            success_radius=ad.env_spec.success_radius))
    empty = [k for k, v in clusters.items() if v.empty]
    note = f"{empty}: no neuron has >= {ad.rule.min_share:.0%} of its top-{ad.rule.k} tokens there"
    row = {"name": "clusters left empty by the rule", "value": len(empty), "source": source, "note": note}
    return [row] if empty else []
