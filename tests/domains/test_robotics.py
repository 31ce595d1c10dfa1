"""Tests of the robotics adapter: environment, expert, VLA policy, action-token lens, clamping."""

from __future__ import annotations

import copy
import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
import torch

pytest.importorskip("lightning")
pytest.importorskip("transformers")

from sciscope.core import ConfigError, NonFiniteError, ShapeError, capture, count_hooks  # noqa: E402
from sciscope.core.testing import check_adapter  # noqa: E402
from sciscope.domains.robotics import (  # noqa: E402
    COLORS,
    ActionCodec,
    EnvSpec,
    ReachEnv,
    RoboticsAdapter,
    VLAVocab,
    action_lens,
    cluster_clamp,
    load_policy,
    make_scenes,
    neuron_categories,
    parse_instruction,
    render,
    save_policy,
    select_clusters,
    simulate_demos,
)
from sciscope.domains.robotics.claims import rollout_scores  # noqa: E402
from sciscope.domains.robotics.model import PolicySpec, bc_loss, soft_targets, train_policy  # noqa: E402

TINY = RoboticsAdapter.test_config


@pytest.fixture(scope="module")
def tiny() -> tuple[RoboticsAdapter, torch.nn.Module]:
    """The tiny adapter and its policy, trained once for the module (a few seconds)."""
    ad = RoboticsAdapter(TINY)
    return ad, ad.model()


def _planted(policy: torch.nn.Module, token_ids: list[int], layer: int, neuron: int, gain: float = 4.0,
             weaker: list[int] = ()) -> torch.nn.Module:
    """A copy of ``policy`` whose FFN neuron writes toward ``token_ids`` (and half as much toward ``weaker``).

    The value vector ``v`` is the least-squares fit of logits +1 on the tokens and 0 elsewhere
    through the final RMSNorm gain ``g`` and the LM head: ``W (g * v) ~ y``.
    """
    p = copy.deepcopy(policy)
    W = p.get_output_embeddings().weight.detach()  # (V, d)
    y = torch.zeros(W.shape[0], 1)
    y[list(weaker)] = 0.5
    y[token_ids] = 1.0
    u = torch.linalg.lstsq(W, y - y.mean()).solution[:, 0]  # (d,)
    direction = u / p.llm.model.norm.weight.detach()
    with torch.no_grad():
        col = p.llm.model.layers[layer].mlp.down_proj.weight  # (d, d_ff)
        col[:, neuron] = gain * direction / direction.norm()
    return p


# ------------------------------------------------------------------------------------ conformance


def test_conformance(tiny, tmp_path) -> None:
    ad, _ = tiny
    out = check_adapter(ad, tmp_path)
    assert out["sites"] == [f"layer.{i}" for i in range(TINY["n_layers"])]


def test_task_loss_is_action_token_nll_on_held_out_states_and_fidelity_brackets_it(tiny) -> None:
    """Hard-label behaviour-cloning loss on test states (bc_loss with sigma 0 gives the same number), KL over
    each dimension's bins; identity splice recovers all of it, zeroing the site none."""
    from sciscope.core.fidelity import fidelity

    ad, policy = tiny
    task = ad.task_loss(ad.ctx)
    clean = task.fn(policy)
    assert np.isfinite(clean) and task.fn(policy) == clean  # deterministic
    obs, _, _ = ad.demos
    test = np.flatnonzero(obs["split"].to_numpy() == "test")  # the tiny set has fewer than TASK_STATES
    ids, mask = policy.vocab.prompt_ids(obs["instruction"].to_numpy()[test].tolist())
    with torch.no_grad():
        hard, _ = bc_loss(policy, torch.from_numpy(ad.render(test)).permute(0, 3, 1, 2), ids, mask,
                          torch.as_tensor(obs[["action_x", "action_y"]].to_numpy()[test], dtype=torch.float32), 0.0)
    assert clean == pytest.approx(float(hard), rel=1e-5)
    lp = task.log_probs(policy)
    assert lp.shape == (2 * len(test), TINY["n_bins"])
    torch.testing.assert_close(lp.exp().sum(-1), torch.ones(len(lp)))

    table = fidelity(policy, ad.sae_site, task, {"identity": lambda h: h}, aliases=ad.aliases,
                     positions=ad.fidelity_positions).set_index("condition")
    assert table.loss_recovered["identity"] == pytest.approx(1.0, abs=1e-6)
    assert table.kl["identity"] == pytest.approx(0.0, abs=1e-6)
    assert table.loss_recovered["zero_ablation"] == 0.0
    assert table.loss["zero_ablation"] > table.loss["clean"] and table.kl["zero_ablation"] > 0



def test_task_states_are_evenly_spaced_held_out_rows_and_none_is_an_error() -> None:
    from sciscope.core.errors import AdapterError
    from sciscope.domains.robotics.task import as_policy, held_out_rows

    split = np.array(["train", "test"] * 10)  # test rows 1, 3, ..., 19
    assert held_out_rows(split, 100).tolist() == list(range(1, 20, 2))  # fewer than the cap: all of them
    assert held_out_rows(split, 3).tolist() == [1, 9, 19]  # first, middle, last
    with pytest.raises(ConfigError, match="no held-out demonstration states"):
        held_out_rows(np.array(["train"] * 4))
    with pytest.raises(AdapterError, match="expected a VLAPolicy.*Linear"):
        as_policy(torch.nn.Linear(2, 2))


# ------------------------------------------------------------------------------------ environment


def test_scenes_are_seeded_per_episode_and_respect_the_geometry() -> None:
    spec = EnvSpec()
    a = make_scenes(range(40), seed=3, spec=spec)
    one = make_scenes([7], seed=3, spec=spec)
    other = make_scenes(range(40), seed=4, spec=spec)
    assert np.array_equal(a.blocks[7], one.blocks[0]) and a.instruction[7] == one.instruction[0]
    assert not np.allclose(a.blocks, other.blocks)
    for i in range(len(a)):
        d = np.linalg.norm(a.blocks[i][:, None] - a.blocks[i][None], axis=-1)[np.triu_indices(spec.n_blocks, 1)]
        assert d.min() >= spec.min_separation
        assert np.abs(a.target_pos[i] - a.gripper[i]).max() <= spec.max_start_offset
        color, _ = parse_instruction(a.instruction[i])
        assert color == a.target_color[i]  # the instruction names the target block
    assert len(set(a.colors[0])) == spec.n_blocks


def test_render_puts_colours_where_they_are_and_y_up() -> None:
    grip = np.array([[0.75, 0.25]])
    blocks = np.array([[[0.25, 0.75]]])  # top-left in the workspace
    img = render(grip, blocks, np.array([[0]]), 32, camera="world")[0]
    red = np.array(COLORS["red"])
    assert np.array_equal(img[8, 8], red)  # row 8 = y 0.75 (rows count down from the top)
    assert np.abs(img[24, 8].astype(int) - red).sum() > 100  # bottom-left is floor, not red
    bright = np.unravel_index(img.sum(-1).argmax(), img.shape[:2])
    assert abs(bright[0] - 24) <= 1 and abs(bright[1] - 24) <= 1  # the white gripper at (0.75, 0.25)
    # anti-aliasing: a quarter-pixel shift changes the image
    shifted = render(grip, blocks + 0.25 / 32, np.array([[0]]), 32, camera="world")[0]
    assert not np.array_equal(img, shifted)
    # the ego camera centres the gripper and shows the block up-left of it
    ego = render(grip, blocks, np.array([[0]]), 32, camera="ego", view_size=1.6)[0]
    ys, xs = np.nonzero(np.all(ego == red, axis=-1))
    assert ys.size and ys.mean() < 16 and xs.mean() < 16


def test_expert_reaches_and_speed_follows_the_manner() -> None:
    ad = RoboticsAdapter({**TINY, "max_steps": 50, "n_eval_episodes": 40})
    base = ad.eval_scenes()
    res = {w: ad.scripted_rollout(ad.manner_scenes(base, w)) for w in ("slowly", "", "quickly")}
    for w, r in res.items():
        assert r["success_rate"] == 1.0, (w, r)
        assert r["alignment"] > 0.9 and r["n_clipped"] == 0
    assert res["slowly"]["displacement"] < res[""]["displacement"] < res["quickly"]["displacement"]
    assert ad.scripted_rollout(base, "random")["success_rate"] < 0.5  # the chance level is well below the expert


def test_env_clips_and_counts_out_of_range_actions() -> None:
    spec = EnvSpec()
    scenes = make_scenes(range(2), seed=0, spec=spec)
    env = ReachEnv(scenes, spec)
    start = env.position.copy()
    disp = env.step(np.array([[3.0, 0.0], [0.5, -2.0]]))
    assert env.n_clipped == 2
    np.testing.assert_allclose(disp[0], [spec.max_step, 0.0], atol=1e-12)
    np.testing.assert_allclose(env.position[1] - start[1], [0.5 * spec.max_step, -spec.max_step], atol=1e-12)
    with pytest.raises(NonFiniteError, match=r"\[0\]"):
        env.step(np.array([[np.nan, 0.0], [0.0, 0.0]]))
    with pytest.raises(ShapeError):
        env.step(np.zeros((3, 2)))
    # walls: pushing left forever keeps x at 0 and counts the contacts
    env = ReachEnv(scenes, spec)
    for _ in range(30):
        env.step(np.array([[-1.0, 0.0], [-1.0, 0.0]]))
    assert (env.position[~env.success, 0] >= 0).all() and env.n_wall > 0
    # demonstrations: noisy executed actions get clipped (and counted), noise-free ones never
    _, noisy = simulate_demos(make_scenes(range(30), seed=0, spec=spec), spec, noise=0.5)
    states, clean = simulate_demos(make_scenes(range(30), seed=0, spec=spec), spec, noise=0.0)
    assert noisy["n_clipped"] > 0 and clean["n_clipped"] == 0 and not states["clipped"].any()


def test_unknown_words_are_a_clear_error_listing_them(tiny) -> None:
    ad, policy = tiny
    vocab = policy.vocab
    with pytest.raises(ConfigError, match=r"unknown words \['grab', 'cylinder'\]"):
        vocab.encode_instruction("grab the red cylinder")
    with pytest.raises(ConfigError, match="exactly one block colour"):
        parse_instruction("reach the block")
    with pytest.raises(ConfigError, match=r"\['fetch'\]"):
        RoboticsAdapter({"templates": ["fetch the {color} block"]})
    with pytest.raises(ConfigError, match=r"\['purple'\]"):
        ad.rollout(policy, instructions="quickly reach the purple block")
    scenes = ad.eval_scenes()
    absent = [c for c in COLORS if c not in {list(COLORS)[int(k)] for k in scenes.colors[0]}][0]
    with pytest.raises(ConfigError, match=f"episode {int(scenes.episode[0])} has no {absent} block"):
        scenes.with_instructions([f"reach the {absent} block"] * len(scenes))


# ------------------------------------------------------------------------------------ policy


def test_action_codec_and_vocabulary_layout() -> None:
    codec = ActionCodec(8)
    np.testing.assert_array_equal(codec.encode(np.array([-1.0, -0.76, 0.0, 0.99, 1.0, 5.0])), [0, 0, 4, 7, 7, 7])
    x = np.linspace(-1, 1, 101)
    assert np.abs(codec.decode(codec.encode(x)) - x).max() <= 1 / 8 + 1e-12  # within half a bin
    vocab = VLAVocab(n_bins=8)
    info = vocab.token_info()
    assert (info.kind.iloc[-16:] == "action").all() and (info.kind.iloc[:-16] != "action").all()
    assert vocab.dim_slice(1) == slice(vocab.size - 8, vocab.size)
    assert vocab.convert_ids_to_tokens([vocab.size - 1]) == ["<dy:+0.875>"]
    ids, mask = vocab.prompt_ids(["reach the red block", "quickly reach the red block"])
    assert (ids[:, -1] == 2).all() and mask[0, 0] == 0 and mask[1].all()  # left-padded, <act> last


def test_soft_targets_peak_on_the_action_bin() -> None:
    codec = ActionCodec(32)
    a = torch.tensor([[0.51, -0.9]])
    t = soft_targets(a, codec, 0.05)
    torch.testing.assert_close(t.sum(-1), torch.ones(1, 2))
    assert t.argmax(-1).tolist() == [codec.encode(a.numpy())[0].tolist()]
    hard = soft_targets(a, codec, 0.0)
    assert hard.max() == 1.0 and hard.sum() == 2.0


def test_left_padding_does_not_change_the_action_logits(tiny) -> None:
    _, policy = tiny
    vocab = policy.vocab
    img = torch.from_numpy(np.random.default_rng(0).integers(0, 255, (1, 3, 16, 16), dtype=np.uint8))
    alone_ids, alone_mask = vocab.prompt_ids(["reach the red block"])
    batch_ids, batch_mask = vocab.prompt_ids(["reach the red block", "please quickly go to the red cube now"])
    with torch.no_grad():
        alone = policy(img, alone_ids, alone_mask).logits[0, -1]
        padded = policy(img.expand(2, -1, -1, -1), batch_ids, batch_mask).logits[0, -1]
    assert batch_mask[0].sum() < batch_mask.shape[1]  # the first prompt really is padded
    torch.testing.assert_close(alone, padded, atol=1e-5, rtol=1e-5)


def test_save_load_roundtrip_and_bad_checkpoints(tiny, tmp_path) -> None:
    ad, policy = tiny
    folder = save_policy(tmp_path / "vla", policy, camera={"camera": "ego", "view_size": 1.6})
    loaded, _ = load_policy(folder, image_size=16)
    batch = next(ad.batches(ad.examples("train"), policy, batch_size=4))
    with torch.no_grad():
        torch.testing.assert_close(policy(**batch).logits, loaded(**batch).logits)
    again = RoboticsAdapter(TINY).model(str(folder))  # a user checkpoint of the same shape
    assert again.n_layers == policy.n_layers
    with pytest.raises(ConfigError, match="image_size"):
        load_policy(folder, image_size=32)
    with pytest.raises(ConfigError, match="camera='ego'"):
        load_policy(folder, camera={"camera": "world"})
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "vocab_size": cfg["vocab_size"] + 1}))
    with pytest.raises(ConfigError, match="vocab_size"):
        load_policy(folder)
    (folder / "vision.safetensors").unlink()
    with pytest.raises(ConfigError, match=r"missing \['vision.safetensors'\]"):
        load_policy(folder)


def test_behaviour_cloning_learns_the_expert() -> None:
    spec = EnvSpec(image_size=16)
    scenes = make_scenes(range(24), seed=1, spec=spec)
    from sciscope.domains.robotics.env import render_states

    states, _ = simulate_demos(scenes, spec, noise=0.2, seed=1)
    states = states.iloc[:96]
    images = render_states(scenes, states, spec)
    instr = np.array(scenes.instruction)[states["scene"].to_numpy()].tolist()
    acts = states[["action_x", "action_y"]].to_numpy()
    ps = PolicySpec(image_size=16, patch_size=8, n_bins=32, hidden=32, n_layers=2, n_heads=2, intermediate=64,
                    steps=150, batch_size=32, lr=3e-3, seed=0)
    torch.set_num_threads(1)
    vocab = VLAVocab(n_bins=32)
    policy, result = train_policy(ps, vocab, images, instr, acts)
    ids, mask = vocab.prompt_ids(instr)
    from sciscope.domains.robotics.model import build_policy

    untrained = build_policy(ps, vocab)

    pred = vocab.codec.decode(policy.act(images, ids, mask)[0])
    fitted = [float(np.corrcoef(pred[:, d], acts[:, d])[0, 1]) for d in range(2)]
    assert min(fitted) > 0.7, fitted  # it fits its demonstrations
    assert result["history"][-1]["loss"] < result["history"][0]["loss"] - 1.0
    loss_untrained, _ = bc_loss(untrained, torch.from_numpy(images).permute(0, 3, 1, 2), ids, mask,
                                torch.as_tensor(acts, dtype=torch.float32), ps.label_sigma)
    loss_trained, _ = bc_loss(policy, torch.from_numpy(images).permute(0, 3, 1, 2), ids, mask,
                              torch.as_tensor(acts, dtype=torch.float32), ps.label_sigma)
    assert float(loss_trained.detach()) < float(loss_untrained.detach()) - 1.0


# ------------------------------------------------------------------------------------ lens and clamping


def test_action_lens_matches_a_manual_projection(tiny) -> None:
    _, policy = tiny
    table = action_lens(policy, k=5, layers=[1])
    v = policy.llm.model.layers[1].mlp.down_proj.weight[:, 3].detach()
    with torch.no_grad():
        scores = policy.get_output_embeddings().weight @ policy.llm.model.norm(v[None])[0]
    expected = scores.topk(5).indices.tolist()
    assert table[(table.layer == 1) & (table.neuron == 3)].token_id.tolist() == expected
    assert {"kind", "dim", "value"} <= set(table.columns)
    assert table[table.kind == "action"].value.abs().max() <= 1.0


def test_cluster_rule_finds_a_planted_neuron_and_random_controls_match(tiny) -> None:
    ad, policy = tiny
    info = policy.vocab.token_info()
    fast = info[(info.kind == "action") & (info.value.abs() >= ad.rule.fast_threshold)].token_id.tolist()
    planted = _planted(policy, fast, layer=1, neuron=5)
    # the planted neuron writes every fast token, of all four directions (the tiny vocabulary has two per
    # direction): ranking and round-robin are tested here without the direction requirement, which has
    # its own test (test_cluster_rule_needs_one_direction_mixed_direction_neurons_join_none)
    rule = dataclasses.replace(ad.rule, direction_share=0.0)
    neurons = neuron_categories(action_lens(planted, k=rule.k), rule, info)
    row = neurons[(neurons.layer == 1) & (neurons.neuron == 5)].iloc[0]
    n_fast = len(fast)  # 8 tokens in the tiny vocabulary: at most 8 of the top 10
    assert row.share_fast >= max(rule.min_share, 0.6) and row.share_fast <= n_fast / rule.k, row.top_tokens
    clusters = select_clusters(neurons, rule, ["fast"])
    assert ((clusters["fast"].layer == 1) & (clusters["fast"].neuron == 5)).any()
    cl = clusters["fast"]
    assert len(cl) <= rule.max_size and (cl["share_fast"] >= rule.min_share).all()
    # speed clusters take the four directions in turn, each in rank order
    for _, g in cl.groupby("direction"):
        assert g["share_fast"].is_monotonic_decreasing
    turns = cl.groupby("direction").cumcount()
    assert turns.is_monotonic_increasing  # round-robin: every direction's k-th before any (k+1)-th
    # the clamp's random controls: as many neurons per layer (site), seeded
    iv = cluster_clamp(cl)
    assert {s: len(u) for s, u in iv.units.items()} == {f"llm.model.layers.{k}.mlp.down_proj:input": v
                                                        for k, v in cl.groupby("layer").size().items()}
    ctrl = iv.controls(planted, 3, seed=0)
    assert all({s: len(u) for s, u in c.units.items()} == {s: len(u) for s, u in iv.units.items()} for c in ctrl)
    assert all(max(max(u) for u in c.units.values()) < 64 for c in ctrl)
    assert [c.units for c in ctrl] == [c.units for c in iv.controls(planted, 3, seed=0)]
    assert ctrl[0].units != ctrl[1].units


def test_clamp_cluster_sets_the_neurons_and_leaves_no_hook(tiny) -> None:
    ad, policy = tiny
    cluster = pd.DataFrame({"layer": [0, 1, 1], "neuron": [2, 7, 9]})
    batch = next(ad.batches(ad.examples("train"), policy, batch_size=3))
    sites = ["llm.model.layers.0.mlp.down_proj:input", "llm.model.layers.1.mlp.down_proj:input"]
    with cluster_clamp(cluster).apply(policy, 3.5), capture(policy, sites) as cap:
        policy(**batch)
    assert torch.all(cap[sites[0]][..., 2] == 3.5) and torch.all(cap[sites[1]][..., [7, 9]] == 3.5)
    assert not torch.all(cap[sites[1]][..., 8] == 3.5)
    assert count_hooks(policy) == 0
    with cluster_clamp(cluster, positions="action").apply(policy, 3.5), capture(policy, sites) as cap:
        policy(**batch)  # only the last position (the one emitting the action token)
    assert torch.all(cap[sites[0]][:, -1, 2] == 3.5) and not torch.all(cap[sites[0]][:, :-1, 2] == 3.5)
    assert count_hooks(policy) == 0


def test_clamping_a_planted_right_neuron_steers_the_rollouts_right(tiny) -> None:
    """Lens -> rule -> clamp -> closed loop: a neuron that writes 'dx = +1' moves the gripper right."""
    ad, policy = tiny
    info = policy.vocab.token_info()
    right = info[(info.kind == "action") & (info.dim == "dx") & (info.value >= 0.9)].token_id.tolist()
    rest = info[(info.kind == "action") & (info.dim == "dx") & (info.value >= 0.3) & (info.value < 0.9)].token_id.tolist()
    planted = _planted(policy, right, layer=1, neuron=11, gain=6.0, weaker=rest)  # every top token points right
    neurons = neuron_categories(action_lens(planted, k=ad.rule.k), ad.rule, info)
    cluster = select_clusters(neurons, ad.rule, ["right"])["right"]
    cluster = cluster[(cluster.layer == 1) & (cluster.neuron == 11)]
    assert len(cluster) == 1
    scenes = ad.eval_scenes()
    base = ad.rollout(planted, scenes)
    iv = cluster_clamp(cluster)
    with iv.apply(planted, 2.0):
        steered = ad.rollout(planted, scenes)
    controls = []
    for c in iv.controls(planted, 4, seed=0):  # random neurons of the same layer clamped to the same value
        with c.apply(planted, 2.0):
            controls.append(ad.rollout(planted, scenes).metrics["dx"])
    first_dx = (steered.paths[1, :, 0] - steered.paths[0, :, 0]) / ad.env_spec.max_step
    assert np.all(first_dx > 0.85), first_dx  # the first step is a full step right in every scene
    # over whole episodes (walls stop the gripper at x = 1): more rightward than both controls
    assert steered.metrics["dx"] > base.metrics["dx"] + 0.3
    assert steered.metrics["dx"] > np.mean(controls) + 0.2, controls
    assert steered.paths[-1, :, 0].mean() > base.paths[-1, :, 0].mean() + 0.1  # it ends further right
    assert steered.episodes["dx"].shape == (len(scenes),) and np.nanmean(steered.episodes["dx"]) > np.nanmean(base.episodes["dx"])


def test_steering_plans_clamp_each_cluster_beside_controls_and_prompts(tiny) -> None:
    """One clamp plan per non-empty cluster (after the fast-minus-slow vector), run by the core."""
    from sciscope.core.context import RunContext
    from sciscope.core.experiment import resolve_reference, run_plan
    from sciscope.core.interventions import AddVector, Clamp

    ad = RoboticsAdapter({**TINY, "clusters": ["right", "up"], "clamp_n_random": 2})
    ctx = RunContext(ad, {"steer_n_random": 3})
    policy = ad.model()  # the tiny policy again, from the context's cache
    assert policy is tiny[1]
    plans = {p.name: p for p in ad.steering_plans(ctx)}
    clusters = ad.clusters(policy)
    assert set(plans) == {"fast_vs_slow"} | {f"clamp_{k}" for k in ("right", "up") if not clusters[k].empty}
    assert plans["fast_vs_slow"].n_controls == 3 and plans["fast_vs_slow"].scorer.target == ["displacement"]
    name = next(n for n in plans if n.startswith("clamp_"))
    plan = plans[name]
    assert isinstance(plan.intervention, Clamp) and plan.intervention.positions == -1  # clamp_positions = action
    assert plan.n_controls == 2 and plan.alphas == TINY["clamp_alphas"] and plan.scorer.damage == ["success_rate"]
    assert plan.scorer.target == [{"clamp_right": "rightward", "clamp_up": "upward"}[name]]  # the direction it names
    assert plan.scorer.off_target == [{"clamp_right": "dy", "clamp_up": "dx"}[name]]
    assert plan.scorer.decrease == [] and plans["fast_vs_slow"].scorer.decrease == []  # meant to rise
    slow = {p.name: p for p in RoboticsAdapter({**TINY, "clusters": ["slow"]}).steering_plans(ctx)}.get("clamp_slow")
    assert slow is not None and slow.scorer.decrease == ["displacement"]  # the slow cluster is meant to lower displacement
    ref = resolve_reference(plan, ctx)
    assert set(ref) == {"prompt: quickly", "prompt: slowly"} and ref["prompt: quickly"]["displacement"] > 0
    sweep = run_plan(policy, plan, plan.intervention, aliases=ad.aliases, reference=ref)
    assert set(sweep.conditions) == {"steer", "random-0", "random-1"}
    assert sweep.samples[("steer", 2.0, "dx")].shape == (TINY["n_eval_episodes"],)  # per episode: bootstrap CIs
    s = sweep.summary()
    assert np.isfinite(s["effect_plus"]) and s["n_examples"] == TINY["n_eval_episodes"]
    assert s["at_zero"] == pytest.approx(np.nanmean(rollout_scores(ad.rollout(policy).episodes)[plan.scorer.target[0]]))
    assert not isinstance(plan.intervention, AddVector) and count_hooks(policy) == 0


def test_rollout_copies_and_batched_steering_equal_one_job_at_a_time(tiny) -> None:
    """Copies rolled out side by side, each under its own intervention (or none), give the rollouts of each
    alone, also when one copy's episodes end before the others'; the clamp plans' batched scorer equals
    one job at a time."""
    from sciscope.core.context import RunContext
    from sciscope.core.experiment import check_batched_scorer
    from sciscope.core.interventions import AddVector, Clamp, apply_copies
    from sciscope.domains.robotics.model import rollout, rollout_copies

    ad, policy = tiny
    info = policy.vocab.token_info()
    right = info[(info.kind == "action") & (info.dim == "dx") & (info.value >= 0.9)].token_id.tolist()
    planted = _planted(policy, right, layer=1, neuron=11, gain=6.0)  # clamping neuron 11 drives the gripper right
    # each target block right of the gripper, near: the copies' episodes end at different steps (the one
    # clamped right reaches some blocks sooner), so later forwards carry some copies' ended episodes too
    scenes = ad.eval_scenes()
    target = scenes.target_pos
    start = np.stack([np.clip(target[:, 0] - np.linspace(0.2, 0.45, len(scenes)), 0.0, None), target[:, 1]], 1)
    scenes = dataclasses.replace(scenes, gripper=start)
    spec = dataclasses.replace(ad.env_spec, success_radius=0.15)
    clamp = Clamp({"llm.model.layers.1.mlp.down_proj:input": [11]}, positions=-1)  # the action position, per copy
    add = AddVector(torch.randn(int(policy.config.hidden_size), generator=torch.Generator().manual_seed(0)),
                    ad.steer_site, scale="relative", positions=-1)
    items = [(clamp, 4.0), (None, 0.0), (add, 2.0), (clamp.controls(planted, 1, seed=0)[0], 4.0)]
    with apply_copies(planted, items, aliases=ad.aliases):
        together = rollout_copies(planted, scenes, spec, len(items), batch_size=5)  # 2 batches per step
    assert count_hooks(planted) == 0
    for (iv, alpha), got in zip(items, together):
        if iv is None:
            want = rollout(planted, scenes, spec, batch_size=5)
        else:
            with iv.apply(planted, alpha, aliases=ad.aliases):
                want = rollout(planted, scenes, spec, batch_size=5)
        assert list(got.metrics) == list(want.metrics)  # also n_clipped, n_wall and non_action_rate, per copy
        np.testing.assert_array_equal(list(got.metrics.values()), list(want.metrics.values()))  # NaN equals NaN
        np.testing.assert_array_equal(got.paths, want.paths)
        np.testing.assert_array_equal(got.success, want.success)
        assert set(got.episodes) == set(want.episodes)
        for k in want.episodes:
            np.testing.assert_array_equal(got.episodes[k], want.episodes[k])
    steps = np.stack([r.episodes["steps"] for r in together])
    assert (steps != steps[1]).any(axis=1).sum() >= 2, steps  # copies ended at other steps than the unsteered one

    # a clamp plan of the run, 2 alphas and 2 controls, batched, equals one job at a time
    ctx = RunContext(ad, {})
    plan = next(p for p in ad.steering_plans(ctx) if p.name.startswith("clamp_"))
    assert plan.intervention.positions == -1 and plan.scorer.batched is not None
    small = dataclasses.replace(plan, alphas=[1.0, 3.0], n_controls=2)
    sweep = check_batched_scorer(policy, small, plan.intervention, aliases=ad.aliases)
    assert set(sweep.conditions) == {"steer", "random-0", "random-1"} and count_hooks(policy) == 0


# ------------------------------------------------------------------------------------ adapter


def test_examples_split_by_episode_with_concepts_and_baselines(tiny) -> None:
    ad, _ = tiny
    tr, te, al = ad.examples("train"), ad.examples("test"), ad.examples("all")
    assert len(tr) + len(te) == len(al) and len(te) > 0
    assert set(tr.obs.episode).isdisjoint(te.obs.episode)
    assert al.obs.episode.max() < TINY["n_example_episodes"]
    for c in ad.concepts + ad.probe_targets:
        assert c in al.obs.columns
    assert set(al.obs.action_direction) <= {"up", "down", "left", "right"}
    base = ad.baseline_features(al)
    assert base["bag_of_words"].shape[0] == len(al) and base["pixels_8x8"].shape == (len(al), 8 * 8 * 3)
    counts = np.asarray(base["bag_of_words"]).sum(1)
    assert (counts == [len(t.split()) for _, t in al.inputs]).all()
    with pytest.raises(ConfigError, match="unknown split"):
        ad.examples("valid")


@pytest.mark.parametrize("bad, match", [
    ({"n_example_episodes": 500, "n_episodes": 100}, "n_example_episodes"),
    ({"clusters": ["fast", "sideways"]}, "sideways"),
    ({"image_size": 30, "patch_size": 8}, "multiple of 'patch_size'"),
    ({"camera": "fisheye"}, "camera"),
    ({"sae_layer": 9}, "out of range"),
    ({"n_bins": "many"}, "n_bins"),
])
def test_bad_config_is_a_clear_error(bad, match) -> None:
    with pytest.raises(ConfigError, match=match):
        RoboticsAdapter({**TINY, **bad})


# ------------------------------------------------------------------------------------ claims vs baselines (issue 15)
# Constructed cases, no model: each verdict must follow the numbers.


def _top_table(info: pd.DataFrame, neurons: dict[int, list[int]]) -> pd.DataFrame:
    """A lens table (as :func:`action_lens` returns) whose neuron ``n`` has the top tokens ``neurons[n]``."""
    rows = [{"layer": 0, "neuron": n, "rank": r, "token_id": t, "score": 10.0 - r}
            for n, ids in neurons.items() for r, t in enumerate(ids)]
    t = pd.DataFrame(rows).merge(info, on="token_id", how="left")
    return t.sort_values(["neuron", "rank"]).reset_index(drop=True)


def _ids(info: pd.DataFrame, dim: str, lo: float, hi: float, n: int) -> list[int]:
    sel = info[(info.kind == "action") & (info.dim == dim) & (info.value >= lo) & (info.value <= hi)].token_id.tolist()
    assert len(sel) >= n, (dim, lo, hi)
    return sel[:n]


def test_cluster_rule_needs_one_direction_mixed_direction_neurons_join_none() -> None:
    from dataclasses import replace

    from sciscope.domains.robotics.lens import ClusterRule, layer_summary

    info = VLAVocab(n_bins=256).token_info()
    rule = ClusterRule()  # k 10, min share 0.6, direction share 0.8
    planted = {
        0: _ids(info, "dx", 0.9, 1, 5) + _ids(info, "dx", -1, -0.9, 5),  # extreme bins of both signs: "fast", no direction
        1: _ids(info, "dx", 0.9, 1, 10),  # fast and right
        2: _ids(info, "dx", -0.8, -0.5, 6) + _ids(info, "dx", 0.5, 0.8, 4),  # 60% left, 40% right
        3: _ids(info, "dy", -0.2, 0.2, 10),  # near-zero dy of both signs: slow, "hold y" (dy0)
        4: _ids(info, "dy", -0.8, -0.5, 8) + [3, 4],  # 80% down, two word tokens
    }
    neurons = neuron_categories(_top_table(info, planted), rule, info).set_index("neuron")
    assert neurons.loc[0, "share_fast"] == 1.0 and neurons.loc[0, "share_direction"] == 0.5
    assert neurons.loc[3, "direction"] == "dy0" and neurons.loc[4, "direction"] == "dy-"
    clusters = select_clusters(neurons.reset_index(), rule)
    members = {c: set(cl.neuron) for c, cl in clusters.items()}
    assert members == {"fast": {1}, "slow": {3}, "right": {1}, "left": set(), "up": set(), "down": {4}}
    # without the direction requirement the old rule comes back: mixed neurons join
    loose = {c: set(cl.neuron) for c, cl in select_clusters(neurons.reset_index(), replace(rule, direction_share=0.0)).items()}
    assert 0 in loose["fast"] and 2 in loose["left"]
    summary = layer_summary(neurons.reset_index(), None, rule, 0.96).iloc[0]
    assert summary["share_neurons_coherent"] == pytest.approx(3 / 5) and summary["n_fast"] == 1 and summary["n_left"] == 0


def test_vocabulary_null_matches_the_hypergeometric_and_lens_verdicts_follow_the_numbers() -> None:
    from scipy.stats import hypergeom

    from sciscope.core.verdict import ABOVE, BELOW, NO_BETTER
    from sciscope.domains.robotics.claims import lens_claim, vocabulary_null
    from sciscope.domains.robotics.lens import ClusterRule

    info = VLAVocab(n_bins=8).token_info()  # 16 action tokens among ~38: "mostly action" is not a sure thing
    rule = ClusterRule(k=10, min_share=0.6, direction_share=0.3)
    null = vocabulary_null(info, rule, n_draws=3000, seed=0)
    n_act = int((info.kind == "action").sum())
    exact = hypergeom(len(info), n_act, 10).sf(5)  # P(at least 6 of 10 distinct draws are action tokens)
    assert null["vocabulary_action_share"] == pytest.approx(n_act / len(info))
    assert abs(null["share_neurons_mostly_action"] - exact) < 4 * null["share_neurons_mostly_action_se"] + 1e-3
    assert null == vocabulary_null(info, rule, n_draws=3000, seed=0)  # seeded
    # the robotics vocabulary: 96% action tokens, so "mostly action tokens" is what chance gives
    big = vocabulary_null(VLAVocab(n_bins=256).token_info(), ClusterRule(), n_draws=500)
    assert big["share_neurons_mostly_action"] > 0.99 and big["share_neurons_coherent"] < 0.01
    # the quick run's numbers: 0.74 of the last layer against a null of 1.00 reads "below baseline"
    row = lens_claim(0.74, 256, null=big["share_neurons_mostly_action"], untrained=0.98)
    assert row["verdict"] == BELOW and row["baseline"] == big["share_neurons_mostly_action"]
    assert "vocabulary" in row["baseline_label"] and "untrained weights 0.980" in row["note"]
    # the baseline wins by less than the margin (2 binomial standard errors over 256 neurons: 0.057)
    row = lens_claim(0.70, 256, null=0.71, untrained=0.2)
    assert row["verdict"] == NO_BETTER and row["baseline"] == 0.71 and "vocabulary" in row["baseline_label"]
    assert lens_claim(0.57, 256, null=0.0, untrained=0.01)["verdict"] == ABOVE
    assert lens_claim(0.5, 256, null=None, untrained=None) == {}


def test_clamping_vs_prompting_at_matched_success_verdicts() -> None:
    from sciscope.core.verdict import ABOVE, BELOW, NO_BETTER
    from sciscope.domains.robotics.claims import speed_vs_prompt

    rng = np.random.default_rng(0)
    n = 64
    noise = lambda s=0.05: rng.normal(0, s, n)  # noqa: E731
    ones, zeros = np.ones(n), np.zeros(n)
    unclamped = 0.8 + noise()
    quickly = (1.2 + noise(), ones)  # the prompt: +0.4, every episode succeeds
    # alpha 8 is faster still, but reaches the block in a third of the episodes: not matched
    clamped = {2.0: (1.0 + noise(), ones), 8.0: (1.6 + noise(), np.r_[ones[:20], zeros[20:]])}
    r = speed_vs_prompt(clamped, unclamped, quickly)
    assert r["matched"] == [2.0] and r["alpha"] == 2.0 and r["value"] == pytest.approx(0.2, abs=0.03)
    assert r["baseline"] == pytest.approx(0.4, abs=0.03) and r["verdict"] == BELOW
    # as fast as the prompt, within the noise: the baseline wins the tie
    tie = {2.0: (1.2 + noise(), ones)}
    assert speed_vs_prompt(tie, unclamped, quickly)["verdict"] == NO_BETTER
    assert speed_vs_prompt({2.0: (1.5 + noise(), ones)}, unclamped, quickly)["verdict"] == ABOVE
    # no clamp strength keeps the prompt's success rate: no value, below baseline
    none = speed_vs_prompt({8.0: clamped[8.0]}, unclamped, quickly)
    assert none["value"] is None and none["verdict"] == BELOW
    # slow vs 'slowly': the gain is the speed lost
    slow = speed_vs_prompt({4.0: (0.5 + noise(), ones)}, unclamped, (0.5 + noise(), ones), faster=False)
    assert slow["value"] == pytest.approx(0.3, abs=0.03) and slow["verdict"] == NO_BETTER


def test_direction_clusters_are_scored_on_the_direction_they_name() -> None:
    from sciscope.core.verdict import ABOVE, BELOW, NO_BETTER
    from sciscope.domains.robotics.claims import direction_vs_controls, rollout_scores
    from sciscope.domains.robotics.lens import CLUSTER_METRIC

    assert CLUSTER_METRIC["left"] == "leftward" and CLUSTER_METRIC["down"] == "downward"
    ep = {"displacement": np.ones(3), "dx": np.array([0.5, -0.2, 0.0]), "dy": np.array([0.1, 0.0, -0.3]),
          "success_rate": np.ones(3), "alignment": np.ones(3)}
    s = rollout_scores(ep)
    np.testing.assert_array_equal(s["leftward"], -ep["dx"])
    np.testing.assert_array_equal(s["upward"], ep["dy"])
    np.testing.assert_array_equal(s["downward"], -ep["dy"])
    # a "left" cluster that moves the robot right: below the random-neuron clamps
    assert direction_vs_controls(-0.1, [-0.15, -0.05], [0.0, 0.02, -0.01])["verdict"] == BELOW
    # one random clamp moves it as far: the strongest control is the baseline
    r = direction_vs_controls(0.25, [0.2, 0.3], [0.01, 0.05, 0.26])
    assert r["baseline"] == 0.26 and r["verdict"] == NO_BETTER
    assert direction_vs_controls(0.25, [0.2, 0.3], [0.01, 0.05])["verdict"] == ABOVE
    assert direction_vs_controls(0.25, [0.2, 0.3], []) == {}


def test_bad_cluster_direction_share_names_the_key() -> None:
    with pytest.raises(ConfigError, match="cluster_direction_share"):
        RoboticsAdapter({**TINY, "cluster_direction_share": 1.5})


# ------------------------------------------------------------------------------------ feature cards


def _card_ctx(ad: RoboticsAdapter, policy: torch.nn.Module, d_sae: int = 16):
    """The little of a run context the card hooks read: the adapter, the policy, an SAE's decoder, a live dict."""
    from types import SimpleNamespace

    hidden = int(policy.config.hidden_size)
    sae = SimpleNamespace(W_dec=torch.randn(d_sae, hidden, generator=torch.Generator().manual_seed(0)))
    return SimpleNamespace(adapter=ad, model=lambda: policy, sae=lambda: sae, live={})


def test_card_frames_are_the_policys_inputs_and_arrows_point_along_the_actions(tiny) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyArrow

    from sciscope.domains.robotics import cards

    ad, policy = tiny
    al = ad.examples("all")
    rows = np.array([0, 3, len(al) // 2, len(al) - 1])
    ex = al.obs.iloc[rows].reset_index(drop=True)
    # re-rendered from the stored state (only the shown episodes rebuilt): the very frames the policy saw
    im = cards.frames(ad.env_spec, ex, seed=ad.config["seed"], templates=ad.config["templates"])
    assert np.array_equal(im, np.stack([al.inputs[int(r)][0] for r in rows]))
    chosen = cards.policy_actions(policy, im, ex["instruction"].tolist())
    assert chosen.shape == (len(rows), 2) and (np.abs(chosen) <= 1).all()
    ex = ex.assign(band="top", rank=np.arange(1, len(rows) + 1), activation=[4.0, 3.0, 2.0, 1.0])
    fig = cards.plot_frames(im, ex, ad.env_spec, chosen, feature=7, max_activation=4.0)
    for i, ax in enumerate(fig.axes[: len(rows)]):
        origin = ex.loc[i, ["gripper_x", "gripper_y"]].to_numpy(dtype=float)
        tips = []
        for p in [p for p in ax.patches if isinstance(p, FancyArrow)]:
            xy = p.get_xy()
            tips.append(xy[np.argmax(np.linalg.norm(xy - origin, axis=1))] - origin)
        # demonstration first (wide), then the policy: each tip is the action times ARROW_SCALE from the gripper
        want = [ex.loc[i, ["action_x", "action_y"]].to_numpy(dtype=float), chosen[i]]
        want = [w for w in want if np.hypot(*w) > 1e-6]
        assert len(tips) == len(want)
        for tip, w in zip(tips, want):
            np.testing.assert_allclose(tip, np.clip(w, -1, 1) * cards.ARROW_SCALE, atol=1e-6)
        assert ex.loc[i, "instruction"].split()[0] in ax.get_title()
    plt.close(fig)


def test_card_lens_basis_reads_the_decoder_as_action_tokens_and_pictures_are_pngs(tiny) -> None:
    import io

    from PIL import Image

    from sciscope.core.lens import lens
    from sciscope.domains.robotics import cards

    ad, policy = tiny
    ctx = _card_ctx(ad, policy)
    matrix, tokens, _ = ad.lens_basis(ctx)
    W = policy.get_output_embeddings().weight.detach()
    g = policy.llm.model.norm.weight.detach()
    assert matrix.shape == tuple(W.shape) and tokens == policy.vocab.tokens
    v = ctx.sae().W_dec[3]
    # the basis reads a direction as the logit lens does: W (g * v)
    np.testing.assert_allclose(matrix @ v.numpy(), (W @ (g * v)).numpy(), rtol=1e-5, atol=1e-5)
    top = lens(v, torch.as_tensor(matrix), tokens=tokens, k=3)
    assert list(top["token"]) == [tokens[i] for i in np.argsort(-(W @ (g * v)).numpy())[:3]]
    # the action profile puts each bin's score on its own (dimension, value)
    prof = cards.action_profile(v.numpy(), matrix, policy.vocab.token_info())
    scores = matrix @ v.numpy()
    b = 5
    row = prof[(prof["dim"] == "dy") & np.isclose(prof["value"], policy.vocab.codec.centres[b])]
    assert len(row) == 1 and np.isclose(row["score"].iloc[0], scores[policy.vocab.action_id(1, b)])
    # a width that is not the residual's: no lens
    narrow = _card_ctx(ad, policy)
    narrow.sae = lambda: type("S", (), {"W_dec": torch.zeros(4, W.shape[1] + 1)})()
    assert cards.lens_basis(narrow) is None
    # the hook: top frames, weaker frames and the action profile, each a readable PNG
    obs = ad.examples("all").obs
    ex = pd.concat([obs.iloc[:3].assign(band="top", rank=[1, 2, 3], activation=[3.0, 2.5, 2.0]),
                    obs.iloc[5:7].assign(band="q50", rank=[1, 2], activation=[1.0, 1.0])], ignore_index=True)
    ex["row"] = [0, 1, 2, 5, 6]
    panels = ad.render_examples(ctx, 3, ex)
    assert [p.title for p in panels] == ["top frames", "weaker activations", "decoder direction as actions"]
    for p in panels:
        assert p.png[:8] == b"\x89PNG\r\n\x1a\n"
        w, h = Image.open(io.BytesIO(p.png)).size
        assert w > 100 and h > 100
    assert "policy's action is within 0.2" in panels[0].caption
    assert set(ad.card_columns) <= set(obs.columns) and ad.card_ranking is None


# ------------------------------------------------------------------------------------------- tracing


def test_tracing_pairs_differ_in_the_speed_word_only(tiny) -> None:
    from .tracing_checks import check_pairs, differing_positions

    ad, policy = tiny
    pairs = ad.tracing_pairs(ad.ctx)
    assert pairs is not None and "quickly" in pairs.concept
    ids, bad = pairs.clean["input_ids"], pairs.corrupted["input_ids"]
    n_patches = (TINY["image_size"] // TINY["patch_size"]) ** 2
    m = check_pairs(policy, pairs, n_positions=n_patches + ids.shape[1])
    assert m["B"] == 32
    # one token differs, "quickly" in clean and "slowly" in corrupted; the image is the same
    assert (differing_positions(pairs) == 1).all()
    assert torch.equal(pairs.clean["pixel_values"], pairs.corrupted["pixel_values"])
    vocab = policy.vocab
    assert {vocab.tokens[int(t)] for t in ids[ids != bad]} == {"quickly"}
    assert {vocab.tokens[int(t)] for t in bad[ids != bad]} == {"slowly"}
    g = pairs.position_groups
    assert g["image patches"] == list(range(n_patches)) and g["<act> (emits dx)"] == [n_patches + ids.shape[1] - 1]
    assert torch.equal(g["speed word"][:, n_patches:], ids != bad)
    assert not (g["instruction words"] & g["speed word"]).any() and (g["instruction words"].sum(1) >= 3).all()
    # even the 30-step policy puts more dx mass on fast bins after "quickly" than after "slowly"
    assert float(m["score_clean"].mean()) > float(m["score_corrupted"].mean())
    # the states are those whose first action carries the manner: far along x, farther than along y
    from sciscope.domains.robotics.tracing import speed_states

    obs, _, _ = ad.demos
    rows = speed_states(ad, 32)
    assert (obs["target_dx"].abs().to_numpy()[rows] >= ad.env_spec.max_step).all()
