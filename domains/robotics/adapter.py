"""The robotics adapter: a tiny vision-language-action policy reaching coloured blocks.

Reproduces the setting of Haon, Stocking, Chuang & Tomlin (2025), "Mechanistic interpretability
for steering vision-language-action models", at laptop scale: a seeded planar reaching task with
instructions ("quickly reach the red block") and a scripted expert (:mod:`.env`); an OpenVLA-style
policy, image patches + instruction into a small ``LlamaForCausalLM`` emitting ``dx``/``dy`` action
tokens, behaviour-cloned and run closed loop, or a user's policy directory (:mod:`.model`); FFN
value vectors read through the LM head, neuron clusters by action semantics chosen by a stated rule
(:mod:`.lens`). Declared experiments (:mod:`.report` holds the analyses): one core steering plan
per cluster clamps its neurons during closed-loop rollouts, scored per episode (displacement,
direction, success), beside as many random neurons per layer, the unclamped policy (alpha = 0)
and the prompt modifiers "quickly"/"slowly"; a "fast minus slow" delta vector in the residual
stream, scored the same way; per-layer probes of the target block and the manner
(episode-grouped folds, bag-of-words and pixel baselines); SAE features vs action semantics.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import pandas as pd
import torch
from torch import nn

from sciscope.core.adapter import DomainAdapter, Examples
from sciscope.core.config import Key
from sciscope.core.errors import ConfigError
from sciscope.core.experiment import Analysis, Scorer, SteeringPlan
from sciscope.core.fidelity import TaskLoss
from sciscope.core.loading import layer_index

from . import cards as _cards
from . import env as _env
from . import report as _report
from . import tracing as _tracing
from .claims import DIRECTED, rollout_scores, vocabulary_null
from .lens import CATEGORIES, CLAMP_POSITIONS, CLUSTER_METRIC, ClusterRule, action_lens, cluster_clamp, layer_summary, \
    neuron_categories, select_clusters
from .model import (PolicySpec, VLAPolicy, VLAVocab, build_policy, load_policy, rollout, rollout_copies, save_policy,
                    train_policy)
from .task import TASK_STATES, action_nll_task, held_out_rows
from .task import as_policy as _as_policy

if TYPE_CHECKING:
    from sciscope.core.context import RunContext
    from sciscope.core.tracing import CounterfactualPairs

__all__ = ["RoboticsAdapter"]

#: Evaluation scenes use episode ids from here on (demonstrations use 0 .. n_episodes - 1).
EVAL_OFFSET = 1_000_000
#: The config keys the demonstrations (the policy's training data) depend on.
DATA_KEYS = ("n_episodes", "test_fraction", "seed", "image_size", "camera", "view_size", "n_blocks", "max_steps",
             "demo_noise", "templates")
_MODEL, _STEER = "model", "steering"


class RoboticsAdapter(DomainAdapter):
    """A tiny VLA reaching coloured blocks: action-token lens, neuron clusters, clamped rollouts.

    Examples
    --------
    >>> ad = RoboticsAdapter(RoboticsAdapter.test_config)           # doctest: +SKIP
    >>> ad.rollout(ad.model()).metrics["success_rate"]              # doctest: +SKIP
    """

    name = "robotics"
    description = ("A tiny vision-language-action policy reaching coloured blocks: action-token lens on FFN "
                   "neurons, clamped clusters steer closed-loop motion")
    config_keys: ClassVar[dict[str, Key]] = {
        # environment and demonstrations
        "n_episodes": Key(4000, min=4, help="expert demonstrations (train + test episodes); images rendered on the fly"),
        "n_example_episodes": Key(300, min=2, help="the first episodes' states are the examples (capture, probes, SAE)"),
        "test_fraction": Key(0.2, min=1e-9, max=1 - 1e-9, help="held-out episodes (the policy never trains on them)"),
        "seed": Key(0),
        "image_size": Key(32, min=8, max=256),
        "camera": Key("ego", choices=("ego", "world"), help="ego: top-down camera moving with the gripper | world"),
        "view_size": Key(1.6, min=0.2, max=4.0, help="ego camera field of view (workspace units; workspace is 1 x 1)"),
        "n_blocks": Key(3, min=1, max=len(_env.COLORS)),
        "max_steps": Key(50, min=1),
        "demo_noise": Key(0.3, min=0, help="std of the noise added to executed expert actions (DART); labels stay clean"),
        "templates": Key(list(_env.DEFAULT_TEMPLATES), help="instruction templates with {color}; words must be known"),
        # policy
        "model": Key("", stage=_MODEL, help="'' = train the default here; else a policy directory (Llama + vision)"),
        "patch_size": Key(8, stage=_MODEL, min=1),
        "n_bins": Key(256, stage=_MODEL, min=2, help="action bins per dimension (tokens on the last vocabulary ids)"),
        "hidden": Key(64, stage=_MODEL, min=4),
        "n_layers": Key(4, stage=_MODEL, min=1),
        "n_heads": Key(4, stage=_MODEL, min=1),
        "intermediate": Key(256, stage=_MODEL, min=2, help="FFN neurons per layer"),
        "train_steps": Key(3000, stage=_MODEL, min=1, help="colour grounding appears late (~2000 steps): do not cut"),
        "train_batch_size": Key(32, stage=_MODEL, min=1),
        "lr": Key(2e-3, stage=_MODEL, min=1e-12),
        "label_sigma": Key(0.04, stage=_MODEL, min=0, help="Gaussian target width over the bins; 0 = one-hot"),
        "torch_threads": Key(0, stage=_MODEL, min=0, help="torch intra-op threads (0 = the stage's share)"),
        # evaluation rollouts
        "n_eval_episodes": Key(64, min=1, help="held-out scenes per closed-loop evaluation"),
        # lens and clusters (the stated rule, see sciscope.domains.robotics.lens)
        "lens_top_k": Key(10, stage=_MODEL, min=1),
        "fast_threshold": Key(0.85, stage=_MODEL, min=0, max=1, help="|bin value| of 'fast' tokens ('quickly' is 1.0)"),
        "slow_threshold": Key(0.5, stage=_MODEL, min=0, max=1, help="|bin value| of 'slow' tokens ('slowly' is 0.4)"),
        "direction_threshold": Key(0.3, stage=_MODEL, min=1e-9, max=1),
        "cluster_min_share": Key(0.6, stage=_MODEL, min=1e-9, max=1),
        "cluster_direction_share": Key(0.8, stage=_MODEL, min=0, max=1,
                                       help="a neuron joins a cluster only if this share of its top-k tokens point one way "
                                            "(one dimension and sign): no mixed-direction neurons"),
        "cluster_max_size": Key(32, stage=_STEER, min=1),
        "clusters": Key(list(CATEGORIES), stage=_STEER, choices=CATEGORIES),
        "clamp_alphas": Key([1.0, 2.0, 4.0, 8.0], stage=_STEER, help="clamp values (alpha = 0: the unclamped policy)"),
        "clamp_positions": Key("action", stage=_STEER, choices=tuple(CLAMP_POSITIONS),
                               help="action: the position emitting each action token | all: every position"),
        "clamp_n_random": Key(10, stage=_STEER, min=0, help="random controls per cluster plan (as many neurons per layer)"),
        "n_trajectory_plots": Key(6, stage=_STEER, min=0),
        # sites
        "sae_layer": Key(None, stage="sae", help="None = the last layer (where actions are decided)"),
        "steer_layer": Key(None, stage=_STEER, help="None = the middle layer (delta-vector steering plan)"),
        **_tracing.CONFIG_KEYS,  # trace_pairs
    }
    #: Overrides for ``sciscope run robotics --profile NAME``. Every plan has 10 random controls
    #: (``steer_n_random``, ``clamp_n_random``): each adds one 64-scene rollout per alpha.
    #: The SAE reads one 64-wide <act> vector per state (about 3,000 training rows): at the default
    #: k = 32 (half the width) PCA-32 explains 0.9998 and an 8x SAE keeps 65% of its latents; 4x with
    #: k = 12 reaches 0.996 against PCA-12's 0.994 with 56% alive (2,000 steps, 100 passes).
    profiles: ClassVar[dict[str, dict[str, Any]]] = {
        "quick": {"sae_steps": 2000, "sae_expansion": 4, "sae_k": 12, "sae_max_epochs": 100,
                  "steer_alphas": [-2.0, -1.0, 1.0, 2.0]},
        "full": {"n_episodes": 10000, "train_steps": 8000, "hidden": 128, "n_layers": 6, "intermediate": 512,
                 "n_example_episodes": 600, "n_eval_episodes": 200, "clamp_alphas": [0.5, 1.0, 2.0, 4.0, 8.0]},
    }
    #: Tiny config for the conformance test and unit tests (trains in a few seconds).
    test_config: ClassVar[dict[str, Any]] = {
        "n_episodes": 40, "n_example_episodes": 12, "max_steps": 20, "image_size": 16, "patch_size": 8, "n_bins": 32, "hidden": 32,
        "n_layers": 2, "n_heads": 2, "intermediate": 64, "train_steps": 30, "train_batch_size": 32,
        "n_eval_episodes": 8, "clamp_alphas": [2.0], "clamp_n_random": 1, "cluster_min_share": 0.3,
        "cluster_direction_share": 0.3,
    }

    def __init__(self, config: Any = None) -> None:
        super().__init__(config)
        self.training_info: dict[str, Any] = {}
        self._demos: tuple[pd.DataFrame, _env.Scenes, dict[str, Any]] | None = None
        self._policy: VLAPolicy | None = None
        self._policy_spec: str | None = None
        self._lens: tuple[Any, tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]] | None = None

    @classmethod
    def check_config(cls, c: dict[str, Any]) -> None:
        """Cross-key checks: multiples, examples within episodes, template words, thresholds, layers, model path."""
        if c["image_size"] % c["patch_size"]:
            raise ConfigError(f"robotics: config 'image_size' ({c['image_size']}) must be a multiple of "
                              f"'patch_size' ({c['patch_size']})")
        if c["hidden"] % c["n_heads"]:
            raise ConfigError(f"robotics: config 'hidden' ({c['hidden']}) must be a multiple of 'n_heads' ({c['n_heads']})")
        if c["n_example_episodes"] > c["n_episodes"]:
            raise ConfigError(f"robotics: config 'n_example_episodes' ({c['n_example_episodes']}) exceeds "
                              f"'n_episodes' ({c['n_episodes']})")
        c["templates"] = _env.check_templates(c["templates"])
        try:
            c["clamp_alphas"] = [float(a) for a in c["clamp_alphas"]]
        except (TypeError, ValueError):
            raise ConfigError(f"robotics: config 'clamp_alphas' must be numbers, got {c['clamp_alphas']!r}") from None
        _rule(c).validate()
        if c["model"] and not Path(str(c["model"])).expanduser().is_dir():
            raise ConfigError(f"robotics: model path {str(c['model'])!r} does not exist or is not a directory (config 'model')")
        for key in ("sae_layer", "steer_layer"):
            if c[key] is not None:
                layer_index(c[key], _config_layers(c), key)

    @property
    def env_spec(self) -> _env.EnvSpec:
        c = self.config
        return _env.EnvSpec(image_size=c["image_size"], n_blocks=c["n_blocks"], max_steps=c["max_steps"],
                            camera=c["camera"], view_size=c["view_size"])

    @property
    def rule(self) -> ClusterRule:
        """The cluster rule from the config (top-k, thresholds, minimum share, maximum size)."""
        return _rule(self.config)

    def policy_spec(self) -> PolicySpec:
        c = self.config
        return PolicySpec(image_size=c["image_size"], patch_size=c["patch_size"], n_bins=c["n_bins"], hidden=c["hidden"],
                          n_layers=c["n_layers"], n_heads=c["n_heads"], intermediate=c["intermediate"],
                          steps=c["train_steps"], batch_size=c["train_batch_size"], lr=c["lr"],
                          label_sigma=c["label_sigma"], seed=c["seed"])

    @property
    def demos(self) -> tuple[pd.DataFrame, _env.Scenes, dict[str, Any]]:
        """``(states, scenes, counts)`` of every expert demonstration (:func:`.env.demo_table`), built
        once; images are rendered on demand (:func:`.env.render_states`)."""
        if self._demos is None:
            c = self.config
            scenes = _env.make_scenes(np.arange(c["n_episodes"]), seed=c["seed"], spec=self.env_spec, templates=c["templates"])
            obs, counts = _env.demo_table(scenes, self.env_spec, noise=c["demo_noise"], seed=c["seed"],
                                          test_fraction=c["test_fraction"])
            self._demos = (obs, scenes, counts)
        return self._demos

    def render(self, rows: np.ndarray) -> np.ndarray:
        """Images ``(n, H, W, 3)`` uint8 of rows of the demonstration states."""
        obs, scenes, _ = self.demos
        return _env.render_states(scenes, obs, self.env_spec, rows)

    def examples(self, split: str = "train") -> Examples:
        """States of the first ``n_example_episodes`` demonstrations, one split (whole episodes; ``all``: both).

        Inputs are ``(image (H, W, 3) uint8, instruction)`` pairs, row-aligned with obs. The policy
        trains on every train episode of the ``n_episodes``, never on test episodes."""
        obs, _, _ = self.demos
        splits = ["all", "test", "train"]
        if split not in splits:
            raise ConfigError(f"robotics: unknown split {split!r}; choose one of {splits}")
        keep = obs["scene"].to_numpy() < self.config["n_example_episodes"]
        if split != "all":
            keep &= obs["split"].to_numpy() == split
        idx = np.flatnonzero(keep)
        rows = obs.iloc[idx].reset_index(drop=True)
        images = self.render(idx)
        inputs = list(zip(images, rows["instruction"]))
        return Examples(obs=rows, inputs=inputs, concepts=self.concepts)

    def eval_scenes(self, *, manners: Sequence[str] | None = ("",), n: int | None = None) -> _env.Scenes:
        """Held-out scenes for closed-loop evaluation (never demonstrated): ``manners=("",)`` gives neutral
        instructions (the steering baseline); ``None`` draws manner words as the demonstrations do."""
        c = self.config
        n = c["n_eval_episodes"] if n is None else n
        kw = {} if manners is None else {"manners": tuple(manners)}
        return _env.make_scenes(EVAL_OFFSET + np.arange(n), seed=c["seed"], spec=self.env_spec,
                                templates=c["templates"], **kw)

    def model(self, spec: str | None = None) -> nn.Module:
        """The default policy (trained here, or reloaded from the run's cache) or a policy directory.

        Default: a :class:`.model.VLAPolicy` behaviour-cloned on the train episodes, kept through
        ``ctx.cached`` (reused while the policy spec and the data keys are unchanged). A directory
        (``spec`` or config ``model``) loads with :func:`.model.load_policy`.
        """
        path = self.config["model"] if spec is None else spec
        key = str(path or "default")
        if self._policy is not None and self._policy_spec == key:
            return self._policy
        self._apply_threads()
        if path:
            policy, info = load_policy(path, image_size=self.config["image_size"], camera=self._camera_meta())
        else:
            policy, info = self.ctx.cached(
                "policy", [asdict(self.policy_spec()), [self.config[k] for k in DATA_KEYS]], self._train_policy,
                save=lambda obj, folder: save_policy(folder / "checkpoint", obj[0], extra=obj[1], camera=self._camera_meta()),
                load=lambda folder: load_policy(folder / "checkpoint"))
        self.training_info = info
        self._policy, self._policy_spec = policy, key
        return policy

    def _train_policy(self) -> tuple[VLAPolicy, dict[str, Any]]:
        obs, _, _ = self.demos
        train = np.flatnonzero(obs["split"].to_numpy() == "train")
        spec = self.policy_spec()
        policy, result = train_policy(spec, VLAVocab(n_bins=spec.n_bins), lambda rows: self.render(train[rows]),
                                      obs["instruction"].to_numpy()[train].tolist(),
                                      obs[["action_x", "action_y"]].to_numpy()[train], trainer_options=self.trainer_options)
        return policy, {"spec": asdict(spec), **result}

    def _camera_meta(self) -> dict[str, Any]:
        return {"camera": self.config["camera"], "view_size": float(self.config["view_size"])}

    def _apply_threads(self) -> None:
        """Set torch's intra-op threads to config ``torch_threads`` (process-wide; 0 = the stage's share).

        The matrices are tiny: on a busy CPU 1 thread can beat 2 (quiet 2-core machine: 103.1 s on 2, 138.9 s on 1)."""
        n = int(self.config["torch_threads"])
        if n and torch.get_num_threads() != n:
            torch.set_num_threads(n)

    def batches(self, examples: Examples, model: nn.Module, *, batch_size: int = 32) -> Iterator[dict[str, torch.Tensor]]:
        """``pixel_values`` (B, 3, H, W) uint8, left-padded ``input_ids`` ending in ``<act>``, ``text_mask``.

        The text mask has its own name (not ``attention_mask``) because the model's sequence is
        patches + text: capture must not apply a text-only mask to it. "last" pooling reads the
        ``<act>`` position, the one that predicts ``dx``.
        """
        vocab = _as_policy(model).vocab
        inputs = list(examples.inputs)
        for i in range(0, len(inputs), batch_size):
            chunk = inputs[i: i + batch_size]
            pix = torch.from_numpy(np.stack([np.asarray(im, dtype=np.uint8) for im, _ in chunk])).permute(0, 3, 1, 2)
            ids, mask = vocab.prompt_ids([t for _, t in chunk])
            yield {"pixel_values": pix.contiguous(), "input_ids": ids, "text_mask": mask}

    @property
    def n_layers(self) -> int:
        """Decoder layers of the configured policy (read from a user checkpoint's config.json)."""
        return self._policy.n_layers if self._policy is not None else _config_layers(self.config)

    @property
    def aliases(self) -> dict[str, str]:
        """``layer.{i}``: decoder block output; ``neurons.{i}``: FFN neurons (down_proj input)."""
        return {"layer.{i}": "llm.model.layers.{i}", "neurons.{i}": "llm.model.layers.{i}.mlp.down_proj:input"}

    @property
    def sites(self) -> list[str]:
        """Every decoder layer's output (residual stream)."""
        return [f"layer.{i}" for i in range(self.n_layers)]

    @property
    def pooling(self) -> str:
        """The ``<act>`` position (last), where the policy decides its first action token."""
        return "last"

    @property
    def sae_site(self) -> str:
        v = self.config["sae_layer"]
        return f"layer.{layer_index(v, self.n_layers, 'sae_layer') if v is not None else self.n_layers - 1}"

    @property
    def steer_site(self) -> str:
        v = self.config["steer_layer"]
        return f"layer.{layer_index(v, self.n_layers, 'steer_layer') if v is not None else self.n_layers // 2}"

    @property
    def concepts(self) -> list[str]:
        return ["target_color", "manner", "action_direction", "action_speed", "target_dx", "target_dy"]

    @property
    def probe_targets(self) -> list[str]:
        """The target block (its colour, and where it is relative to the gripper) and the manner."""
        return ["target_color", "manner", "target_dx", "target_dy"]

    @property
    def association_groups(self) -> str:
        """Features are tied to concepts across episodes, not states: the states of one episode
        share its scene and instruction."""
        return "episode"

    @property
    def probe_groups(self) -> str:
        """Episodes: the states of one episode never sit on both sides of a fold."""
        return "episode"

    def baseline_features(self, examples: Examples) -> dict[str, np.ndarray]:
        """Bag of words of the instruction, 8x8x3 pooled pixels (:func:`.env.baseline_features`) and both side
        by side (``words_and_pixels``): neither alone binds colour to place, and a linear probe of both can only
        add them. The probe headlines read each target against the strongest of the three."""
        base = _env.baseline_features(examples.inputs)
        base["words_and_pixels"] = np.hstack([base["bag_of_words"], base["pixels_8x8"]])
        return base

    @property
    def contrasts(self) -> dict[str, tuple[str, str]]:
        """States demonstrated with a fast manner word minus those with a slow one."""
        return {"fast_vs_slow": ("manner == 'fast'", "manner == 'slow'")}

    @property
    def metrics(self) -> dict[str, Callable[..., Any]]:
        """``rollout_metrics(displacements, live, to_target, success, steps, max_step)``."""
        return {"rollout_metrics": _env.rollout_metrics}

    def rollout(self, policy: nn.Module, scenes: _env.Scenes | None = None, *,
                instructions: Sequence[str] | str | None = None) -> _env.Rollout:
        """Closed-loop rollouts of ``policy`` on held-out scenes (neutral instructions by default).

        ``instructions``: one text for every scene (its colour must be in each scene) or one per
        scene; unknown words are a :class:`ConfigError` listing them.
        """
        scenes = self.eval_scenes() if scenes is None else scenes
        if instructions is not None:
            texts = [instructions] * len(scenes) if isinstance(instructions, str) else list(instructions)
            scenes = scenes.with_instructions(texts)
        self._apply_threads()
        return rollout(_as_policy(policy), scenes, self.env_spec)

    def rollout_copies(self, policy: nn.Module, n: int, scenes: _env.Scenes | None = None) -> list[_env.Rollout]:
        """:meth:`rollout` of ``n`` copies side by side (:func:`.model.rollout_copies`): every policy forward
        carries ``n`` copy blocks, so under :func:`~sciscope.core.interventions.apply_copies` copy ``i``'s
        rollout is :meth:`rollout`'s under its own intervention (held-out neutral scenes by default)."""
        scenes = self.eval_scenes() if scenes is None else scenes
        self._apply_threads()
        return rollout_copies(_as_policy(policy), scenes, self.env_spec, n)

    def scripted_rollout(self, scenes: _env.Scenes, kind: str = "expert") -> dict[str, float]:
        """Closed-loop metrics of the noise-free expert (``"expert"``) or of uniform random actions
        in [-1, 1]^2 (``"random"``, the chance level of success) on ``scenes``."""
        return _env.scripted_rollout(scenes, self.env_spec, kind, seed=self.config["seed"])

    def manner_scenes(self, scenes: _env.Scenes, word: str) -> _env.Scenes:
        """The same scenes with ``word`` put before each instruction (a prompt modifier)."""
        return scenes.with_instructions([f"{word} {t}" if word else t for t in scenes.instruction])

    def lens_tables(self, policy: nn.Module) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
        """``(top tokens per neuron, per-neuron categories, per-layer summary)`` (kept per policy); the summary
        sits beside the same lens on seeded untrained weights of the same shape and the vocabulary's action share."""
        p = _as_policy(policy)
        if self._lens is not None and self._lens[0] is p:
            return self._lens[1]
        rule, info = self.rule, p.vocab.token_info()
        top = action_lens(p, k=rule.k)
        neurons = neuron_categories(top, rule, info)
        spec = PolicySpec(image_size=p.vision.image_size, patch_size=p.vision.patch_size, n_bins=p.vocab.n_bins,
                          hidden=int(p.config.hidden_size), n_layers=p.n_layers,
                          n_heads=int(p.config.num_attention_heads), intermediate=int(p.config.intermediate_size),
                          seed=self.config["seed"])
        init = build_policy(spec, VLAVocab(p.vocab.words, p.vocab.n_bins))
        init_neurons = neuron_categories(action_lens(init, k=rule.k), rule, info)
        share = float((info["kind"] == "action").mean())
        layers = layer_summary(neurons, init_neurons, rule, share)
        for key, v in vocabulary_null(info, rule, seed=self.config["seed"]).items():  # the vocabulary-matched null
            if key.startswith("share_"):
                layers[f"{key}_null" if not key.endswith("_se") else f"{key[:-3]}_null_se"] = v
        self._lens = (p, (top, neurons, layers))
        return self._lens[1]

    def clusters(self, policy: nn.Module, names: Sequence[str] | None = None) -> dict[str, pd.DataFrame]:
        """The clusters ``names`` (default: config ``clusters``) by the stated rule (see :mod:`.lens`)."""
        _, neurons, _ = self.lens_tables(policy)
        return select_clusters(neurons, self.rule, self.config["clusters"] if names is None else names)

    def analyses(self) -> list[Analysis]:
        """One analysis per stage (see :mod:`.report`)."""
        return [Analysis("expert_and_demonstrations", "examples", _report.examples_rows),
                Analysis("policy_and_lens", "model", _report.model_rows),
                Analysis("action_semantics", "features", _report.feature_rows),
                Analysis("clusters", "steering", _report.cluster_rows)]

    # -- fidelity: the policy's own task -------------------------------------------------------------
    def task_loss(self, ctx: "RunContext") -> TaskLoss:
        """Action-token NLL on held-out demonstrations: ``-log p`` of the expert's ``dx`` and ``dy`` bins
        (clean labels), teacher-forced as in training (:func:`.model.action_logits`), softmax over the
        whole vocabulary (mass leaking to word tokens counts), mean over both tokens. ``log_probs``: the
        log-softmax over each dimension's bins at its action position (the distribution greedy decoding
        acts on), so the fidelity analysis reports the KL of the action distribution (:mod:`.task`).

        States: at most :data:`.task.TASK_STATES`, evenly spaced over every test episode's states (the
        policy never trains on them), rendered once; eval mode, no sampling.
        """
        obs, _, _ = self.demos
        rows = held_out_rows(obs["split"].to_numpy(), TASK_STATES)
        pixels = torch.from_numpy(self.render(rows)).permute(0, 3, 1, 2).contiguous()  # (N, 3, H, W) uint8
        return action_nll_task(pixels, obs["instruction"].to_numpy()[rows].tolist(),
                               obs[["action_x", "action_y"]].to_numpy()[rows], prepare=self._apply_threads)

    @property
    def fidelity_positions(self) -> list[int]:
        """The two action-emitting positions of the teacher-forced pass: ``<act>`` (-2, emits ``dx``) and the
        ``dx`` token (-1, emits ``dy``). The SAE is trained on the ``<act>`` position ("last" pooling), so
        image patches and words would be vectors it never saw; and at the default SAE site, the last
        layer, a position's output reaches only its own logits, so splicing anywhere else would not
        change the loss at all. The ``dx``-token position is kept because it is where ``dy`` is decided
        (the last position of the second decoding pass, as clamping's "action" positions)."""
        return [-2, -1]

    def rollout_scorer(self, target: Sequence[str], off_target: Sequence[str] = (), decrease: Sequence[str] = ()) -> Scorer:
        """Closed-loop rollouts on the same neutral held-out scenes under every alpha and control:
        per-episode :data:`.claims.ROLLOUT_SCORES`, success rate as the damage score (``decrease``:
        targets meant to fall, e.g. displacement under the slow cluster).

        Batched form: the jobs of a sweep roll out side by side (:meth:`rollout_copies`), each
        copy in its own environments, so each gets the episodes it would get alone."""
        scenes = self.eval_scenes()

        def score(model: nn.Module) -> dict[str, np.ndarray]:
            return rollout_scores(self.rollout(model, scenes).episodes)

        def score_copies(model: nn.Module, n: int) -> list[dict[str, np.ndarray]]:
            return [rollout_scores(r.episodes) for r in self.rollout_copies(model, n, scenes)]

        return Scorer(score, target=list(target), off_target=list(off_target), damage=["success_rate"],
                      decrease=list(decrease), batched=score_copies)

    def steering_scorer(self, ctx: "RunContext", contrast: str) -> Scorer | None:
        """The fast-minus-slow delta vector is scored by per-step displacement."""
        return self.rollout_scorer(["displacement"]) if contrast in self.contrasts else None

    def prompt_reference(self, ctx: "RunContext") -> dict[str, dict[str, float]]:
        """The unsteered policy on the same scenes with 'quickly' / 'slowly' in the instruction."""
        def build() -> dict[str, dict[str, float]]:
            policy, scenes = ctx.model(), self.eval_scenes()
            return {f"prompt: {w}": {k: float(np.nanmean(v)) for k, v in
                                     rollout_scores(self.rollout(policy, self.manner_scenes(scenes, w)).episodes).items()}
                    for w in ("quickly", "slowly")}

        return ctx.cached("prompt_reference", dict(ctx.config), build)

    def tracing_pairs(self, ctx: "RunContext") -> "CounterfactualPairs | None":
        """The same states with "quickly" and "slowly" in the instruction (:func:`.tracing.tracing_pairs`)."""
        return _tracing.tracing_pairs(self, ctx)

    # -- feature cards (:mod:`.cards`); ranked by the core's default: the concepts are the action meanings
    card_columns = list(_cards.CARD_COLUMNS)
    lens_basis = staticmethod(_cards.lens_basis)
    render_examples = staticmethod(_cards.render_examples)

    def steering_plans(self, ctx: "RunContext") -> list[SteeringPlan]:
        """The fast-minus-slow delta vector (the default contrast plan), then one plan per
        non-empty cluster: its neurons clamped to each of ``clamp_alphas`` (a core :class:`Clamp`,
        ``clamp_n_random`` controls of as many random neurons per layer), scored on the metric
        the cluster is named for (:data:`.lens.CLUSTER_METRIC`: a direction cluster on displacement
        in the direction it names, the other axis off target); every plan beside the prompt modifiers."""
        plans = super().steering_plans(ctx)
        for plan in plans:
            plan.reference = self.prompt_reference
        c = self.config  # validated (ctx.config holds the run's raw values)
        for name, cl in self.clusters(ctx.model(), c["clusters"]).items():
            if cl.empty:
                continue
            metric = CLUSTER_METRIC[name]
            plans.append(SteeringPlan(
                f"clamp_{name}", cluster_clamp(cl, positions=c["clamp_positions"]),
                self.rollout_scorer([metric], [DIRECTED[metric][2]] if metric in DIRECTED else [],
                                    decrease=[metric] if name == "slow" else []), alphas=c["clamp_alphas"],
                n_controls=int(c["clamp_n_random"]), reference=self.prompt_reference, seed=ctx.seed,
                description=f"{len(cl)} neurons of the {name} cluster clamped to alpha at {c['clamp_positions']} positions"))
        return plans


def _rule(c: dict[str, Any]) -> ClusterRule:
    return ClusterRule(k=c["lens_top_k"], fast_threshold=c["fast_threshold"], slow_threshold=c["slow_threshold"],
                       direction_threshold=c["direction_threshold"], min_share=c["cluster_min_share"],
                       max_size=c["cluster_max_size"], direction_share=c["cluster_direction_share"])


def _config_layers(c: dict[str, Any]) -> int:
    cfg = Path(str(c["model"])).expanduser() / "config.json"
    if c["model"] and cfg.is_file():
        return int(json.loads(cfg.read_text()).get("num_hidden_layers", c["n_layers"]))
    return int(c["n_layers"])
