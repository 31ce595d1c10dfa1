"""The robotics adapter's analyses (one ``Analysis.compute`` per stage): tables, figures and headline rows,
every number beside its control. The clamped clusters themselves are steering plans the core runs."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from sciscope.core.plotting import save_training_history

from . import env as _env
from .claims import direction_vs_controls, lens_claim, rollout_scores, speed_vs_prompt
from .lens import CATEGORIES, CLUSTER_METRIC, cluster_clamp
from .plots import plot_layer_lens, plot_trajectories

if TYPE_CHECKING:  # pragma: no cover
    from sciscope.core.context import RunContext

__all__ = ["claim_rows", "cluster_rows", "examples_rows", "feature_rows", "model_rows"]

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
    ] + [_lens_row(name, col, note, last, layers, lens_src) for name, col, note in (
        (f"last-layer FFN neurons whose top-{ad.rule.k} tokens are mostly action tokens", "share_neurons_mostly_action",
         f"{{}}; vocabulary action share {float(last['vocabulary_action_share']):.2f}"),
        ("last-layer FFN neurons with one coherent action meaning", "share_neurons_coherent",
         f">= {ad.rule.min_share:.0%} of the top-{ad.rule.k} tokens in one of {list(CATEGORIES)}, "
         f">= {ad.rule.direction_share:.0%} in one direction; {{}}"))]


def _lens_row(name: str, col: str, note: str, last: pd.Series, layers: pd.DataFrame, source: str) -> dict[str, Any]:
    """A last-layer lens share beside the untrained lens (control) and, as its baseline, the stronger of the
    vocabulary-matched null and the untrained lens (:func:`.claims.lens_claim`)."""
    null = last.get(f"{col}_null")
    base = lens_claim(float(last[col]), int(last["neurons"]), null=None if null is None else float(null),
                      untrained=float(last.get(f"{col}_untrained", np.nan)),
                      null_se=float(last.get(f"{col}_null_se", 0.0)))
    tail = base.pop("note", "")
    return {"name": name, "value": float(last[col]), "control": float(last.get(f"{col}_untrained", np.nan)),
            "control_label": "same lens on untrained weights", "source": source, **base,
            "note": note.format("per layer: " + ", ".join(f"{v:.2f}" for v in layers[col])) + tail}


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
    note = (f"{empty}: no neuron has >= {ad.rule.min_share:.0%} of its top-{ad.rule.k} tokens there with "
            f">= {ad.rule.direction_share:.0%} in one direction")
    row = {"name": "clusters left empty by the rule", "value": len(empty), "source": source, "note": note}
    return ([row] if empty else []) + claim_rows(ctx)


#: The speed clusters and the prompt word each is compared with ("faster" for fast).
SPEED_PROMPTS: dict[str, tuple[str, bool]] = {"fast": ("quickly", True), "slow": ("slowly", False)}


def claim_rows(ctx: "RunContext") -> Rows:
    """Each clamped cluster's claim against its strongest baseline, with a verdict (:mod:`.claims`).

    Speed clusters: speed gained (lost, for slow) at matched success against the prompt word on the
    same scenes (``speed_vs_prompt.csv``). Direction clusters: displacement in the direction they
    name gained at the largest safe alpha against the strongest of their random-neuron clamps
    (``direction_vs_controls.csv``). Reads the sweeps the steering stage just ran (``ctx.live``).
    """
    ad, policy = ctx.adapter, ctx.model()
    rows: Rows = []
    speed, direction = [], []
    scenes = None
    for name in CATEGORIES:
        sweep = ctx.live.get(f"steering:clamp_{name}")
        if sweep is None:
            continue
        metric = CLUSTER_METRIC[name]
        src = f"steering/clamp_{name}/summary.json"
        if name in SPEED_PROMPTS:
            word, faster = SPEED_PROMPTS[name]
            scenes = ad.eval_scenes() if scenes is None else scenes
            prompted = rollout_scores(ad.rollout(policy, ad.manner_scenes(scenes, word)).episodes)
            alphas = [a for a in sweep.params["alphas"] if a > 0 and ("steer", a, metric) in sweep.samples]
            r = speed_vs_prompt({a: (sweep.samples[("steer", a, metric)], sweep.samples[("steer", a, "success_rate")])
                                 for a in alphas}, sweep.samples[("steer", 0.0, metric)],
                                (prompted[metric], prompted["success_rate"]), faster=faster)
            speed.append({"cluster": name, "prompt": word, "alpha": r["alpha"], "gain": r["value"], "success": r["success"],
                          "prompt_gain": r["baseline"], "prompt_success": r["prompt_success"],
                          "margin": r["tolerance"], "verdict": r["verdict"],
                          **{f"gain[{a:g}]": g for a, g in r["gain_by_alpha"].items()},
                          **{f"success[{a:g}]": v for a, v in r["success_by_alpha"].items()}})
            what = "speed gained" if faster else "speed lost"
            rows.append({"name": f"clamp_{name}: {what} at matched success (vs '{word}')", "value": r["value"],
                         "control": None, "baseline": r["baseline"], "verdict": r["verdict"], "unit": "x max step",
                         "baseline_label": f"prompt '{word}' on the same scenes",
                         "note": (f"alpha {r['alpha']:g}, success {r['success']:.2f} (prompt {r['prompt_success']:.2f}); "
                                  if r["alpha"] is not None else
                                  f"no clamp strength keeps the prompt's success rate {r['prompt_success']:.2f}; ")
                         + "per alpha gain/success: " + ", ".join(
                             f"{a:g}: {r['gain_by_alpha'][a]:+.3f}/{r['success_by_alpha'][a]:.2f}" for a in sorted(r["gain_by_alpha"]))
                         + f"; per-step displacement, {'higher' if faster else 'lower'} than the unclamped policy; "
                           f"matched: the best alpha whose success is at least the prompt's; margin {r['tolerance']:.3g} "
                           "(2 standard errors of the per-episode difference)",
                         "source": "steering/speed_vs_prompt.csv"})
            continue
        s = sweep.summary(metric)
        a = s["alpha_plus"]
        if not np.isfinite(a):
            continue
        ctrl = [float(sweep.curve(metric, c).get(a, np.nan) - sweep.curve(metric, c).get(0.0, np.nan)) for c in sweep.controls]
        r = direction_vs_controls(s["effect_plus"], s["effect_plus_ci"], ctrl)
        if not r:
            continue
        succ = sweep.curve("success_rate")
        direction.append({"cluster": name, "score": metric, "alpha": a, "effect": s["effect_plus"],
                          "strongest_control": r["baseline"], "controls_mean": float(np.nanmean(ctrl)),
                          "margin": r["tolerance"], "verdict": r["verdict"], "success": float(succ.get(a, np.nan)),
                          "success_unclamped": float(succ.get(0.0, np.nan))})
        rows.append({"name": f"clamp_{name}: {metric} displacement gained at alpha {a:g}", "value": s["effect_plus"],
                     "control": float(np.nanmean(ctrl)), "control_label": f"{len(ctrl)} random-neuron clamps, mean",
                     "baseline": r["baseline"], "baseline_label": f"strongest of {len(ctrl)} random-neuron clamps",
                     "verdict": r["verdict"], "unit": "x max step",
                     "note": f"displacement in the direction the cluster names ('{name}'); success "
                             f"{float(succ.get(0.0, np.nan)):.2f} -> {float(succ.get(a, np.nan)):.2f}; margin "
                             f"{r['tolerance']:.3g} (2 bootstrap standard errors of the effect)",
                     "source": "steering/direction_vs_controls.csv"})
    if speed:
        ctx.write_table("speed_vs_prompt.csv", pd.DataFrame(speed))
    if direction:
        ctx.write_table("direction_vs_controls.csv", pd.DataFrame(direction))
    return rows
