"""The robotics adapter: a tiny vision-language-action policy reaching coloured blocks.

Reproduces the setting of Haon, Stocking, Chuang & Tomlin (2025), "Mechanistic interpretability
for steering vision-language-action models", at laptop scale:

* **environment** (:mod:`.env`): a seeded planar gripper that reaches the block an instruction
  names ("quickly reach the red block"), rendered to 32x32 RGB images by a camera that moves with
  the gripper; a scripted expert whose
  speed follows the manner word; success and trajectory metrics; out-of-range actions clipped and
  counted;
* **policy** (:mod:`.model`): OpenVLA-style, image patch embeddings (FiLM-conditioned on the
  instruction, as RT-1's) + instruction tokens into a small ``LlamaForCausalLM`` that emits ``dx``
  and ``dy`` as action tokens (``n_bins`` bins per dimension on the last vocabulary ids),
  behaviour-cloned with PyTorch Lightning, run closed loop; a user's policy directory of the same
  layout can be given instead (config ``model``);
* **analyses** (:mod:`.lens`): FFN value vectors read through the final norm and LM head (per
  layer: how many neurons' top tokens are action tokens and how many carry one coherent motion,
  beside the untrained weights); clusters of neurons by
  action semantics (fast / slow / right / left / up / down) chosen by a stated rule; clamping a
  cluster to alpha during closed-loop rollouts, scored by per-step end-effector displacement,
  direction and success rate, beside random clusters of the same size (same layers), the
  unclamped policy, and prompt modifiers ("quickly"/"slowly"); per-layer probes of the target
  block and the manner (episode-grouped folds, bag-of-words and pixel baselines); SAE features vs
  action semantics; and, through the generic steering stage, a "fast minus slow" delta vector
  injected into the residual stream, scored by the same rollouts, beside random directions.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch
from torch import nn

from sciscope.core.adapter import DomainAdapter, Examples
from sciscope.core.errors import AdapterError, ConfigError

from . import env as _env
from .lens import (
    CATEGORIES,
    CLAMP_POSITIONS,
    ClusterRule,
    action_lens,
    layer_summary,
    neuron_categories,
    select_clusters,
)
from .model import PolicySpec, Rollout, VLAPolicy, VLAVocab, build_policy, load_policy, rollout, save_policy, train_policy

__all__ = ["RoboticsAdapter"]

#: Evaluation scenes use episode ids from here on (demonstrations use 0 .. n_episodes - 1).
EVAL_OFFSET = 1_000_000
#: Trained default policies kept in memory when the adapter has no run folder (tests, notebooks).
_MEMORY_CACHE: dict[str, tuple[VLAPolicy, dict[str, Any]]] = {}


def _stable_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class RoboticsAdapter(DomainAdapter):
    """A tiny VLA reaching coloured blocks: action-token lens, neuron clusters, clamped rollouts.

    Examples
    --------
    >>> ad = RoboticsAdapter(RoboticsAdapter.test_config)           # doctest: +SKIP
    >>> policy = ad.model(); ad.evaluate(policy)["success_rate"]     # doctest: +SKIP
    """

    name = "robotics"
    description = ("A tiny vision-language-action policy reaching coloured blocks: action-token lens on FFN "
                   "neurons, clamped clusters steer closed-loop motion")
    default_config: ClassVar[dict[str, Any]] = {
        # environment and demonstrations
        "n_episodes": 4000,  # expert demonstrations (train + test episodes); images are rendered on the fly
        "n_example_episodes": 300,  # the first episodes' states are the examples (capture, probes, SAE)
        "test_fraction": 0.2,  # held-out episodes (the policy never trains on them)
        "seed": 0,
        "image_size": 32,
        "camera": "ego",  # ego: top-down camera moving with the gripper (wrist-style) | world: whole workspace
        "view_size": 1.6,  # ego camera field of view (workspace units; the workspace is 1 x 1)
        "n_blocks": 3,
        "max_steps": 50,
        "demo_noise": 0.3,  # std of the noise added to executed expert actions (DART); labels stay clean
        "templates": list(_env.DEFAULT_TEMPLATES),  # instruction templates with {color}; words must be known
        # policy
        "model": "",  # "" = train the default here; else a policy directory (Llama checkpoint + vision weights)
        "patch_size": 8,
        "n_bins": 256,  # action bins per dimension (tokens on the last vocabulary ids)
        "hidden": 64,
        "n_layers": 4,
        "n_heads": 4,
        "intermediate": 256,  # FFN neurons per layer
        "train_steps": 3000,  # colour grounding appears late (after ~2000 steps at batch 32): do not cut
        "train_batch_size": 32,
        "lr": 2e-3,
        "label_sigma": 0.04,  # Gaussian target width over the bins (action units); 0 = one-hot
        "torch_threads": 0,  # torch intra-op threads of this process (0 = the stage's share); see _apply_threads
        # evaluation rollouts
        "n_eval_episodes": 64,  # held-out scenes per closed-loop evaluation
        # lens and clusters (the stated rule, see sciscope.domains.robotics.lens)
        "lens_top_k": 10,
        "fast_threshold": 0.85,  # |bin value| of "fast" tokens (the expert's 'quickly' speed is 1.0, plain 0.7)
        "slow_threshold": 0.5,  # |bin value| of "slow" tokens ('slowly' is 0.4; stopping is 0)
        "direction_threshold": 0.3,
        "cluster_min_share": 0.6,
        "cluster_max_size": 32,
        "clusters": list(CATEGORIES),
        "clamp_alphas": [1.0, 2.0, 4.0, 8.0],
        "clamp_positions": "action",  # action: the position emitting each action token | all: every position
        "clamp_n_random": 2,
        "n_trajectory_plots": 6,
        # sites
        "sae_layer": None,  # None = the last layer (where actions are decided)
        "steer_layer": None,  # None = the middle layer (delta-vector steering stage)
    }
    #: Overrides for ``sciscope run robotics --profile NAME``.
    profiles: ClassVar[dict[str, dict[str, Any]]] = {
        "quick": {"sae_steps": 1000, "steer_n_random": 2, "steer_alphas": [-2.0, -1.0, 1.0, 2.0]},
        "full": {"n_episodes": 10000, "train_steps": 8000, "hidden": 128, "n_layers": 6, "intermediate": 512,
                 "n_example_episodes": 600, "n_eval_episodes": 200, "clamp_n_random": 5,
                 "clamp_alphas": [0.5, 1.0, 2.0, 4.0, 8.0]},
    }
    #: The first pipeline stage each key affects (unlisted keys: "examples").
    config_stages: ClassVar[dict[str, str]] = {
        **{k: "model" for k in ("model", "patch_size", "n_bins", "hidden", "n_layers", "n_heads", "intermediate",
                                "train_steps", "train_batch_size", "lr", "label_sigma", "torch_threads",
                                "lens_top_k", "fast_threshold", "slow_threshold", "direction_threshold",
                                "cluster_min_share")},
        "sae_layer": "sae",
        **{k: "steering" for k in ("cluster_max_size", "clusters", "clamp_alphas", "clamp_positions", "clamp_n_random",
                                   "n_trajectory_plots", "steer_layer")},
    }
    #: Tiny config for the conformance test and unit tests (trains in a few seconds).
    test_config: ClassVar[dict[str, Any]] = {
        "n_episodes": 40, "n_example_episodes": 12, "max_steps": 20, "image_size": 16, "patch_size": 8, "n_bins": 32, "hidden": 32,
        "n_layers": 2, "n_heads": 2, "intermediate": 64, "train_steps": 30, "train_batch_size": 32,
        "n_eval_episodes": 8, "clamp_alphas": [2.0], "clamp_n_random": 1, "cluster_min_share": 0.3,
    }

    def __init__(self, config: Mapping[str, Any] | None = None) -> None:
        super().__init__(config)
        self.run_dir: Path | None = None  # set by the pipeline: the default policy is kept under <run>/model
        self.training_info: dict[str, Any] = {}
        self._demos: tuple[pd.DataFrame, _env.Scenes, dict[str, Any]] | None = None
        self._policy: VLAPolicy | None = None
        self._policy_spec: str | None = None
        self._check_config()

    # -- configuration ----------------------------------------------------------------------------
    def _check_config(self) -> None:
        c = self.config
        for key, lo in (("n_episodes", 4), ("n_example_episodes", 2), ("image_size", 8), ("n_blocks", 1), ("max_steps", 1), ("patch_size", 1),
                        ("n_bins", 2), ("hidden", 4), ("n_layers", 1), ("n_heads", 1), ("intermediate", 2),
                        ("train_steps", 1), ("train_batch_size", 1), ("n_eval_episodes", 1), ("lens_top_k", 1),
                        ("cluster_max_size", 1), ("clamp_n_random", 0), ("n_trajectory_plots", 0),
                        ("torch_threads", 0)):
            if c[key] < lo:
                raise ConfigError(f"robotics: config {key!r} must be >= {lo}, got {c[key]!r}")
        if c["image_size"] % c["patch_size"]:
            raise ConfigError(f"robotics: config 'image_size' ({c['image_size']}) must be a multiple of "
                              f"'patch_size' ({c['patch_size']})")
        if c["hidden"] % c["n_heads"]:
            raise ConfigError(f"robotics: config 'hidden' ({c['hidden']}) must be a multiple of 'n_heads' ({c['n_heads']})")
        if c["n_example_episodes"] > c["n_episodes"]:
            raise ConfigError(f"robotics: config 'n_example_episodes' ({c['n_example_episodes']}) exceeds "
                              f"'n_episodes' ({c['n_episodes']})")
        if not 0.0 < c["test_fraction"] < 1.0:
            raise ConfigError(f"robotics: config 'test_fraction' must lie in (0, 1), got {c['test_fraction']!r}")
        if c["demo_noise"] < 0 or c["label_sigma"] < 0 or c["lr"] <= 0:
            raise ConfigError("robotics: config 'demo_noise' and 'label_sigma' must be >= 0 and 'lr' > 0")
        c["templates"] = _env.check_templates(c["templates"])
        if c["clamp_positions"] not in CLAMP_POSITIONS:
            raise ConfigError(f"robotics: config 'clamp_positions' must be one of {list(CLAMP_POSITIONS)}, "
                              f"got {c['clamp_positions']!r}")
        unknown = [k for k in c["clusters"] if k not in CATEGORIES]
        if unknown:
            raise ConfigError(f"robotics: config 'clusters' names unknown clusters {unknown}; choose from {list(CATEGORIES)}")
        try:
            c["clamp_alphas"] = [float(a) for a in c["clamp_alphas"]]
        except (TypeError, ValueError):
            raise ConfigError(f"robotics: config 'clamp_alphas' must be numbers, got {c['clamp_alphas']!r}") from None
        self.env_spec.validate()
        self.rule.validate()
        for key in ("sae_layer", "steer_layer"):
            if c[key] is not None:
                self._layer_index(c[key], key)
        if c["model"]:
            p = Path(str(c["model"])).expanduser()
            if not p.is_dir():
                raise ConfigError(f"robotics: model path {str(p)!r} does not exist or is not a directory (config 'model')")

    @property
    def env_spec(self) -> _env.EnvSpec:
        c = self.config
        return _env.EnvSpec(image_size=c["image_size"], n_blocks=c["n_blocks"], max_steps=c["max_steps"],
                            camera=c["camera"], view_size=c["view_size"])

    @property
    def rule(self) -> ClusterRule:
        """The cluster rule from the config (top-k, thresholds, minimum share, maximum size)."""
        c = self.config
        return ClusterRule(k=c["lens_top_k"], fast_threshold=c["fast_threshold"], slow_threshold=c["slow_threshold"],
                           direction_threshold=c["direction_threshold"], min_share=c["cluster_min_share"],
                           max_size=c["cluster_max_size"])

    def policy_spec(self) -> PolicySpec:
        c = self.config
        return PolicySpec(image_size=c["image_size"], patch_size=c["patch_size"], n_bins=c["n_bins"], hidden=c["hidden"],
                          n_layers=c["n_layers"], n_heads=c["n_heads"], intermediate=c["intermediate"],
                          steps=c["train_steps"], batch_size=c["train_batch_size"], lr=c["lr"],
                          label_sigma=c["label_sigma"], seed=c["seed"])

    # -- data ---------------------------------------------------------------------------------------
    def _data_key(self) -> str:
        """Hash of what the demonstrations (the policy's training data) depend on."""
        keys = ("n_episodes", "test_fraction", "seed", "image_size", "camera", "view_size", "n_blocks", "max_steps",
                "demo_noise", "templates")
        return _stable_hash([(k, self.config[k]) for k in keys])

    @property
    def demos(self) -> tuple[pd.DataFrame, _env.Scenes, dict[str, Any]]:
        """``(states, scenes, counts)`` of every expert demonstration, built once (deterministic).

        ``states`` has one row per visited state: ``scene, episode, step, split, instruction,
        target_color, manner, manner_word, gripper_x/y, target_x/y, target_dx/dy, action_x/y``
        (expert labels), ``action_speed``, ``action_direction`` (the dominant component's
        direction) and ``clipped`` (the executed, noisy action left the box and was clipped).
        Images are rendered on demand (:func:`.env.render_states`).
        """
        if self._demos is None:
            c, spec = self.config, self.env_spec
            scenes = _env.make_scenes(np.arange(c["n_episodes"]), seed=c["seed"], spec=spec, templates=c["templates"])
            states, counts = _env.simulate_demos(scenes, spec, noise=c["demo_noise"], seed=c["seed"])
            table = _env.scene_table(scenes)
            obs = states.merge(table, on="episode", how="left", validate="many_to_one")
            obs["target_dx"] = obs["target_x"] - obs["gripper_x"]
            obs["target_dy"] = obs["target_y"] - obs["gripper_y"]
            ax, ay = obs["action_x"].to_numpy(), obs["action_y"].to_numpy()
            obs["action_speed"] = np.hypot(ax, ay)
            horiz = np.abs(ax) >= np.abs(ay)
            obs["action_direction"] = np.where(horiz, np.where(ax >= 0, "right", "left"), np.where(ay >= 0, "up", "down"))
            # held-out episodes: a seeded share of every block of 100 episodes, so the example
            # subset (the first n_example_episodes) holds test episodes too
            rng = np.random.default_rng([c["seed"], 0x7E57])
            test = rng.random(c["n_episodes"]) < c["test_fraction"]
            obs["split"] = np.where(test[obs["scene"].to_numpy()], "test", "train")
            cols = ["scene", "episode", "step", "split", "instruction", "template", "target_color", "manner", "manner_word",
                    "gripper_x", "gripper_y", "target_x", "target_y", "target_dx", "target_dy", "action_x", "action_y",
                    "action_speed", "action_direction", "clipped"]
            obs = obs[cols]
            # the noise-free expert on the same scenes: what the task allows (no clipping there)
            _, clean = _env.simulate_demos(scenes, spec, noise=0.0, seed=c["seed"])
            counts = {**counts, "n_states": len(obs), "expert_success_noise_free": clean["n_success"] / len(scenes),
                      "expert_clipped_noise_free": clean["n_clipped"], "n_test_episodes": int(test.sum())}
            self._demos = (obs, scenes, counts)
        return self._demos

    def render(self, rows: np.ndarray) -> np.ndarray:
        """Images ``(n, H, W, 3)`` uint8 of rows of the demonstration states."""
        obs, scenes, _ = self.demos
        return _env.render_states(scenes, obs, self.env_spec, rows)

    def examples(self, split: str = "train") -> Examples:
        """States of the first ``n_example_episodes`` demonstrations, one split (whole episodes).

        ``all`` is both splits. Inputs are ``(image (H, W, 3) uint8, instruction)`` pairs,
        row-aligned with obs. The policy trains on every train episode of the ``n_episodes``;
        test episodes are never trained on.
        """
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
        """Held-out scenes for closed-loop evaluation (never demonstrated).

        ``manners=("",)`` gives neutral instructions (no manner word: the steering baseline);
        ``None`` draws manner words as the demonstrations do.
        """
        c = self.config
        n = c["n_eval_episodes"] if n is None else n
        kw = {} if manners is None else {"manners": tuple(manners)}
        return _env.make_scenes(EVAL_OFFSET + np.arange(n), seed=c["seed"], spec=self.env_spec,
                                templates=c["templates"], **kw)

    # -- model --------------------------------------------------------------------------------------
    def _model_key(self) -> str:
        return _stable_hash([asdict(self.policy_spec()), self._data_key()])

    def model(self, spec: str | None = None) -> nn.Module:
        """The default policy (trained here, or reloaded from the run folder) or a policy directory.

        Default: a :class:`.model.VLAPolicy` behaviour-cloned on the train episodes, saved under
        ``<run>/model/checkpoint`` (reused while the config is unchanged); without a run folder it
        is kept in memory. A directory (``spec`` or config ``model``) must hold a Llama checkpoint
        (``config.json`` + weights), ``vision.safetensors`` and ``sciscope_vla.json`` of the same
        shape (errors name what is missing or does not fit).
        """
        path = self.config["model"] if spec is None else spec
        key = str(path or "default")
        if self._policy is not None and self._policy_spec == key:
            return self._policy
        self._apply_threads()
        if path:
            policy, info = load_policy(path, image_size=self.config["image_size"], camera=self._camera_meta())
        else:
            policy, info = self._default_model()
        self.training_info = info
        self._policy, self._policy_spec = policy, key
        return policy

    def _default_model(self) -> tuple[VLAPolicy, dict[str, Any]]:
        key = self._model_key()
        folder = Path(self.run_dir) / "model" / "checkpoint" if self.run_dir is not None else None
        if folder is not None and (folder / "training.json").is_file():
            policy, info = load_policy(folder)
            if info.get("key") == key:
                return policy, info
        if folder is None and key in _MEMORY_CACHE:
            return _MEMORY_CACHE[key]
        obs, _, _ = self.demos
        train = np.flatnonzero(obs["split"].to_numpy() == "train")
        spec = self.policy_spec()
        vocab = VLAVocab(n_bins=spec.n_bins)
        policy, result = train_policy(spec, vocab, lambda rows: self.render(train[rows]),
                                      obs["instruction"].to_numpy()[train].tolist(),
                                      obs[["action_x", "action_y"]].to_numpy()[train],
                                      trainer_options=self.trainer_options)
        info = {"key": key, "spec": asdict(spec), **asdict(result)}
        if folder is not None:
            save_policy(folder, policy, extra=info, camera=self._camera_meta())
        else:
            _MEMORY_CACHE[key] = (policy, info)
        return policy, info

    def _camera_meta(self) -> dict[str, Any]:
        return {"camera": self.config["camera"], "view_size": float(self.config["view_size"])}

    def _apply_threads(self) -> None:
        """Set torch's intra-op threads to config ``torch_threads`` (process-wide; 0 = leave it).

        The default, 0, keeps the stage's share of the run's ``--cores``: on a quiet 2-core
        machine the model stage took 103.1 s on its 2 threads and 138.9 s on 1. The policy's
        matrices are tiny (64 x 256), so on a CPU busy with other work synchronising threads can
        cost more than the work: set 1 there. Capture and probes in the same process then run the
        same way.
        """
        n = int(self.config["torch_threads"])
        if n and torch.get_num_threads() != n:
            torch.set_num_threads(n)

    def batches(self, examples: Examples, model: nn.Module, *, batch_size: int = 32) -> Iterator[dict[str, torch.Tensor]]:
        """``pixel_values`` (B, 3, H, W) uint8, left-padded ``input_ids`` ending in ``<act>``, ``text_mask``.

        The text mask has its own name (not ``attention_mask``) because the model's sequence is
        patches + text: capture must not apply a text-only mask to it. "last" pooling reads the
        ``<act>`` position, the one that predicts ``dx``.
        """
        vocab = _vocab_of(model)
        inputs = list(examples.inputs)
        for i in range(0, len(inputs), batch_size):
            chunk = inputs[i: i + batch_size]
            pix = torch.from_numpy(np.stack([np.asarray(im, dtype=np.uint8) for im, _ in chunk])).permute(0, 3, 1, 2)
            ids, mask = vocab.prompt_ids([t for _, t in chunk])
            yield {"pixel_values": pix.contiguous(), "input_ids": ids, "text_mask": mask}

    # -- sites --------------------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        """Decoder layers of the configured policy (read from a user checkpoint's config.json)."""
        if self._policy is not None:
            return self._policy.n_layers
        if self.config["model"]:
            cfg = Path(str(self.config["model"])).expanduser() / "config.json"
            if cfg.is_file():
                return int(json.loads(cfg.read_text()).get("num_hidden_layers", self.config["n_layers"]))
        return int(self.config["n_layers"])

    def _layer_index(self, value: Any, key: str) -> int:
        n = self.n_layers
        try:
            i = int(str(value).removeprefix("layer."))
        except ValueError:
            raise ConfigError(f"robotics: config {key!r} expects a layer index or 'layer.N', got {value!r}") from None
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise ConfigError(f"robotics: config {key!r} = {value!r} is out of range: the policy has {n} layers")
        return i

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
        return f"layer.{self._layer_index(v, 'sae_layer') if v is not None else self.n_layers - 1}"

    @property
    def steer_site(self) -> str:
        v = self.config["steer_layer"]
        return f"layer.{self._layer_index(v, 'steer_layer') if v is not None else self.n_layers // 2}"

    # -- concepts, probes, baselines ------------------------------------------------------------------
    @property
    def concepts(self) -> list[str]:
        return ["target_color", "manner", "action_direction", "action_speed", "target_dx", "target_dy"]

    @property
    def probe_targets(self) -> list[str]:
        """The target block (its colour, and where it is relative to the gripper) and the manner."""
        return ["target_color", "manner", "target_dx", "target_dy"]

    @property
    def probe_groups(self) -> str:
        """Episodes: the states of one episode never sit on both sides of a fold."""
        return "episode"

    def baseline_features(self, examples: Examples) -> dict[str, np.ndarray]:
        """Bag of words of the instruction, and the image average-pooled to 8x8x3 pixels.

        Words alone give the colour and manner but not where the block is; pixels alone show the
        blocks but not which one is meant. The activations have to bind the two.
        """
        words = list(_env.VOCAB_WORDS)
        index = {w: i for i, w in enumerate(words)}
        bow = np.zeros((len(examples), len(words)), dtype=np.float32)
        pix = []
        for r, (im, text) in enumerate(examples.inputs):
            for w in _env.split_words(text):
                if w in index:
                    bow[r, index[w]] += 1
            a = np.asarray(im, dtype=np.float32) / 255.0
            s = a.shape[0] // 8 if a.shape[0] >= 8 else 1
            a = a[: s * (a.shape[0] // s), : s * (a.shape[1] // s)]
            pix.append(a.reshape(a.shape[0] // s, s, a.shape[1] // s, s, 3).mean((1, 3)).ravel())
        return {"bag_of_words": bow, "pixels_8x8": np.asarray(pix, dtype=np.float32)}

    @property
    def contrasts(self) -> dict[str, tuple[str, str]]:
        """States demonstrated with a fast manner word minus those with a slow one."""
        return {"fast_vs_slow": ("manner == 'fast'", "manner == 'slow'")}

    @property
    def metrics(self) -> dict[str, Callable[..., Any]]:
        """``rollout_metrics(displacements, live, to_target, success, steps, max_step)``."""
        return {"rollout_metrics": _env.rollout_metrics}

    # -- evaluation -----------------------------------------------------------------------------------
    def rollout(self, policy: nn.Module, scenes: _env.Scenes | None = None, *, instructions: Sequence[str] | str | None = None) -> Rollout:
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

    def evaluate(self, policy: nn.Module, scenes: _env.Scenes | None = None) -> dict[str, float]:
        """:meth:`rollout`'s metrics (success rate, displacement, dx, dy, alignment, clipped ...)."""
        return self.rollout(policy, scenes).metrics

    def expert_rollout(self, scenes: _env.Scenes) -> dict[str, float]:
        """The scripted expert (noise-free) closed loop on ``scenes``: the same metrics."""
        return _scripted(scenes, self.env_spec, "expert")

    def random_rollout(self, scenes: _env.Scenes) -> dict[str, float]:
        """Uniform random actions in [-1, 1]^2 on ``scenes`` (the chance level of success)."""
        return _scripted(scenes, self.env_spec, "random", seed=self.config["seed"])

    def manner_scenes(self, scenes: _env.Scenes, word: str) -> _env.Scenes:
        """The same scenes with ``word`` put before each instruction (a prompt modifier)."""
        return scenes.with_instructions([f"{word} {t}" if word else t for t in scenes.instruction])

    # -- lens and clusters ------------------------------------------------------------------------------
    def lens_tables(self, policy: nn.Module) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
        """``(top tokens per neuron, per-neuron categories, per-layer summary)``.

        The per-layer summary sits beside the same lens on untrained weights of the same shape
        (seeded initialisation) and the vocabulary's action share.
        """
        p = _as_policy(policy)
        rule = self.rule
        info = p.vocab.token_info()
        top = action_lens(p, k=rule.k)
        neurons = neuron_categories(top, rule, info)
        spec = PolicySpec(image_size=p.vision.image_size, patch_size=p.vision.patch_size, n_bins=p.vocab.n_bins,
                          hidden=int(p.config.hidden_size), n_layers=p.n_layers,
                          n_heads=int(p.config.num_attention_heads), intermediate=int(p.config.intermediate_size),
                          seed=self.config["seed"])
        init = build_policy(spec, VLAVocab(p.vocab.words, p.vocab.n_bins))
        init_neurons = neuron_categories(action_lens(init, k=rule.k), rule, info)
        share = float((info["kind"] == "action").mean())
        return top, neurons, layer_summary(neurons, init_neurons, rule, share)

    def clusters(self, policy: nn.Module) -> dict[str, pd.DataFrame]:
        """The configured clusters by the stated rule (see :mod:`.lens`)."""
        _, neurons, _ = self.lens_tables(policy)
        return select_clusters(neurons, self.rule, self.config["clusters"])

    # -- pipeline hooks ---------------------------------------------------------------------------------
    def headline_rows(self, stage: str, context: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Examples: expert success and clipped actions; model: policy success, displacement by
        manner, action-token lens; features: SAE features vs action semantics; steering: clamped
        clusters vs random clusters, baseline and prompt modifiers."""
        from . import report as _report

        out = Path(context["out"])
        if stage == "examples":
            return _report.examples_rows(self, out)
        if stage == "model":
            return _report.model_rows(self, context["model"], out)
        if stage == "features":
            return _report.feature_rows(self, context, out)
        if stage == "steering":
            return _report.steering_rows(self, out)
        return []

    def steering_evaluator(
        self, model: nn.Module, examples: Examples, contrast: str, site: str
    ) -> Callable[[nn.Module], dict[str, float]] | None:
        """Closed-loop rollouts on neutral held-out scenes under each alpha of the delta vector.

        Returns ``fn(model) -> {displacement, success_rate, alignment, dx, dy}``; the same scenes
        under every alpha and direction, so differences come from the intervention.
        """
        if contrast not in self.contrasts:
            return None
        scenes = self.eval_scenes()
        keep = ("displacement", "success_rate", "alignment")

        def evaluate(m: nn.Module) -> dict[str, float]:
            res = self.rollout(m, scenes).metrics
            return {k: res[k] for k in keep}

        return evaluate


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------


def _as_policy(model: nn.Module) -> VLAPolicy:
    if not isinstance(model, VLAPolicy):
        raise AdapterError(f"robotics: expected a VLAPolicy (from RoboticsAdapter.model()), got {type(model).__name__}")
    return model


def _vocab_of(model: nn.Module) -> VLAVocab:
    return _as_policy(model).vocab


def _scripted(scenes: _env.Scenes, spec: _env.EnvSpec, kind: str, seed: int = 0) -> dict[str, float]:
    """Closed-loop metrics of the noise-free expert or of uniform random actions."""
    env = _env.ReachEnv(scenes, spec)
    speed = np.array([_env.MANNER_SPEED[_env.MANNERS[m]] for m in scenes.manner])
    rng = np.random.default_rng([seed, 0xA11])
    T, n = spec.max_steps, len(scenes)
    disp, live_m, to_t = np.zeros((T, n, 2)), np.zeros((T, n), bool), np.zeros((T, n, 2))
    for t in range(T):
        if env.done.all():
            break
        if kind == "expert":
            a = _env.expert_action(env.position, env.target_pos, speed, spec.max_step)
        else:
            a = rng.uniform(-1, 1, size=(n, 2))
        live_m[t] = ~env.done
        to_t[t] = env.target_pos - env.position
        disp[t] = env.step(a)
    m = _env.rollout_metrics(disp, live_m, to_t, env.success, env.steps, spec.max_step)
    m.update({"n_clipped": float(env.n_clipped), "n_wall": float(env.n_wall)})
    return m
