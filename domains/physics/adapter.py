"""The physics adapter: a small space-time transformer over simulated physical regimes.

Follows "Physics Steering" (Fear et al. 2025, on the Walrus model) at laptop scale. Two systems
are simulated here (numpy, seeded): Gray–Scott reaction–diffusion (spots vs stripes) and forced
2-D incompressible flow (laminar vs vortex-rich). A TimeSformer-style transformer over patches
(:mod:`.model`) is trained with PyTorch Lightning on both to predict the next frame's change from
a few past frames; a user's own ``nn.Module`` can stand in (config ``model``).

Examples are *windows* (trajectory, t): the context frames ending at ``t``. Every analysis
carries its control and its strongest simple baseline: prediction errors beside persistence;
probes (over whole trajectories; parameters also within each regime) beside shuffled labels and
the radial spectrum / pixel PCA; SAE features read across trajectories beside shuffled diagnostics
and the best spectrum component; steered rollouts (:mod:`.steering`) count as a regime change only
when physical (:mod:`.physicality`), beside random directions of the same norm (:mod:`.verdicts`).
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import pandas as pd
import torch
from torch import nn

from sciscope.core.adapter import DomainAdapter, Examples
from sciscope.core.config import Key
from sciscope.core.errors import ConfigError
from sciscope.core.experiment import Analysis, ProbeSet, SteeringPlan
from sciscope.core.fidelity import TaskLoss
from sciscope.core.interventions import AddVector
from sciscope.core.loading import find_layer_stack, layer_index, load_factory_model

from . import data as _data
from . import tracing as _tracing
from .data import REGIMES, TrajectorySet
from .diagnostics import DIAGNOSTICS, SHARED_DIAGNOSTICS, RegimeClassifier, diagnose, radial_power
from .model import ModelSpec, WindowDataset, load_predictor, rollout, save_predictor, train_predictor
from .steering import RolloutScorer

if TYPE_CHECKING:
    from sciscope.core.context import RunContext
    from sciscope.core.tracing import CounterfactualPairs

__all__ = ["PARAMETER_TARGETS", "PhysicsAdapter"]

SYSTEMS = tuple(REGIMES)
#: Held-out windows the task loss reads (evenly spaced over the test windows): the fidelity
#: analysis runs the task 6-11 times, so it stays a few forward passes.
TASK_WINDOWS = 512
#: Probe targets of each system's probe set (log scales for the flow's).
PARAMETER_TARGETS = {"gray_scott": ("feed", "kill"), "flow": ("log10_viscosity", "log10_reynolds")}


class PhysicsAdapter(DomainAdapter):
    """Simulated physics read by a space-time transformer: regime probes, delta-vector steering.

    Examples
    --------
    >>> ad = PhysicsAdapter(PhysicsAdapter.test_config)       # doctest: +SKIP
    >>> ex = ad.examples("all"); model = ad.model()          # doctest: +SKIP
    >>> vec = ad.regime_vector(model, "flow")                 # doctest: +SKIP
    """

    name = "physics"
    description = "Simulated physics (Gray-Scott, 2-D flow) read by a space-time transformer: regime probes, steered rollouts"
    config_keys: ClassVar[dict[str, Key]] = {
        # data: which systems, how many trajectories, grid and frames
        "systems": Key(["gray_scott", "flow"], choices=SYSTEMS, help="simulated systems (distinct)"),
        "n_per_regime": Key(24, min=2, help="trajectories per (system, regime)"),
        "grid": Key(32, min=8),
        "n_frames": Key(20, min=3),
        "test_fraction": Key(0.25, help="whole trajectories held out (rollouts and steering use them), in (0, 1)"),
        "seed": Key(0),
        # Gray–Scott numerics (grid units) and regime ranges of feed F and kill k
        "gs_du": Key(0.1), "gs_dv": Key(0.05), "gs_dt": Key(1.0), "gs_burn_in": Key(200), "gs_frame_every": Key(100),
        "gs_feed_spots": Key([0.030, 0.042]), "gs_kill_spots": Key([0.062, 0.066]),
        "gs_feed_stripes": Key([0.050, 0.060]), "gs_kill_stripes": Key([0.060, 0.063]),
        # flow numerics and regime ranges (viscosity log-uniform; the forcing gives laminar speed U)
        "flow_dt": Key(0.02), "flow_drag": Key(0.1), "flow_k_forcing": Key(4), "flow_init_amplitude": Key(1.0),
        "flow_burn_in": Key(1.0), "flow_frame_every": Key(0.5),
        "flow_viscosity_laminar": Key([0.18, 0.3]), "flow_viscosity_vortex": Key([0.015, 0.04]),
        "flow_velocity": Key([0.8, 1.5]),
        # model
        "model": Key("", "model", help='"" = train the default here; a predictor directory; or "module:factory" / "file.py:factory"'),
        "context_frames": Key(3, "model", min=1),
        "patch_size": Key(4, "model", min=1),
        "hidden": Key(48, "model", min=4),
        "n_layers": Key(4, "model", min=1),
        "n_heads": Key(4, "model", min=1),
        "train_steps": Key(1500, "model", min=1),
        "train_batch_size": Key(16, "model", min=1),
        "lr": Key(1e-3, "model", help="> 0"),
        "train_noise": Key(0.02, "model", min=0, help="std of Gaussian noise on training context frames (standardised units)"),
        # Intra-op threads of torch during training, rollouts and steering (0 = the stage's share
        # of the run's --cores). On a quiet 2-core machine the model stage took 83.6 s with the
        # stage's 2 threads and 131.7 s with 1; on 2 cores busy with other work one thread trained
        # it 3.6x faster than two -- set 1 on a shared machine.
        "torch_threads": Key(0, "report", min=0),
        # analyses
        "sae_layer": Key(None, "sae", help="None = the middle block"),
        "steer_layer": Key(None, "steering", help="None = the last block (Physics Steering hooks the last processor block)"),
        "rollout_start": Key(5, "model", min=0, help="first context frame of a rollout (patterns have formed)"),
        "rollout_steps": Key(12, "model", min=1),
        "n_rollouts": Key(8, "steering", min=1, help="test trajectories per regime rolled out per steering evaluation"),
        "score_frames": Key(3, "steering", min=1, help="final rollout frames scored by the diagnostics"),
        "blowup": Key(50.0, "model", help="|field| (standardised units) beyond which a rollout counts as diverged; > 0"),
        "strip_alpha": Key(0.6, "steering", help="alpha shown in the rollout image strips"),
        "transfer_alphas": Key([-0.4, -0.2, -0.1, 0.1, 0.2, 0.4], "steering", help="alphas of the cross-system plans"),
        "physical_margin": Key(0.25, "steering", help="a steered rollout is physical when its patch-artefact, boundedness and "
                               "mass/divergence diagnostics lie in the simulations' and unsteered rollouts' range widened by "
                               "this fraction of its width (>= 0)"),
        **_tracing.CONFIG_KEYS,  # trace_pairs, trace_system
    }
    #: Overrides for ``sciscope run physics --profile NAME``.
    profiles: ClassVar[dict[str, dict[str, Any]]] = {
        "quick": {"n_per_regime": 24, "train_steps": 1500, "sae_steps": 1000, "sae_expansion": 8, "sae_k": 16,
                  "steer_scale": "relative", "steer_n_random": 10,
                  "steer_alphas": [-1.0, -0.6, -0.3, -0.1, 0.1, 0.3, 0.6, 1.0]},
        "full": {"n_per_regime": 64, "n_frames": 30, "train_steps": 6000, "hidden": 64, "n_layers": 6,
                 "rollout_steps": 20, "n_rollouts": 16, "steer_scale": "relative", "steer_n_random": 10,
                 "steer_alphas": [-1.5, -1.0, -0.7, -0.4, -0.2, -0.1, 0.1, 0.2, 0.4, 0.7, 1.0, 1.5]},
    }
    #: Tiny config for the conformance test and unit tests (simulates and trains in seconds).
    test_config: ClassVar[dict[str, Any]] = {
        "n_per_regime": 3, "grid": 16, "n_frames": 8, "gs_burn_in": 100, "gs_frame_every": 50, "flow_burn_in": 0.5,
        "flow_k_forcing": 2, "patch_size": 4, "hidden": 16, "n_layers": 2, "n_heads": 2, "train_steps": 20,
        "train_batch_size": 8, "rollout_start": 0, "rollout_steps": 4, "n_rollouts": 2, "score_frames": 2,
        "test_fraction": 0.34,
    }

    def __init__(self, config: Mapping[str, Any] | None = None) -> None:
        super().__init__(config)
        self.training_info: dict[str, Any] = {}
        self._stack: tuple[str, int] | None = None
        self._classifiers: dict[str, RegimeClassifier] = {}

    @classmethod
    def check_config(cls, c: dict[str, Any]) -> None:
        """Cross-key checks and the simulators' stability (CFL) up front; ConfigError naming the key."""
        systems = list(c["systems"])
        if not systems or len(set(systems)) != len(systems):
            raise ConfigError(f"physics: config 'systems' must be distinct names from {list(SYSTEMS)}, got {systems!r}")
        if c["grid"] % c["patch_size"]:
            raise ConfigError(f"physics: config 'patch_size' ({c['patch_size']}) must divide 'grid' ({c['grid']})")
        if c["hidden"] % c["n_heads"]:
            raise ConfigError(f"physics: config 'hidden' ({c['hidden']}) must be a multiple of 'n_heads' ({c['n_heads']})")
        if not 0.0 < float(c["test_fraction"]) < 1.0:  # NaN fails too
            raise ConfigError(f"physics: config 'test_fraction' must lie in (0, 1), got {c['test_fraction']!r}")
        if c["rollout_start"] + c["context_frames"] + c["rollout_steps"] > c["n_frames"]:
            raise ConfigError(
                f"physics: config 'rollout_steps' = {c['rollout_steps']} runs past the simulated frames: rollout_start "
                f"({c['rollout_start']}) + context_frames ({c['context_frames']}) + rollout_steps must be <= n_frames ({c['n_frames']})")
        for key in ("lr", "blowup"):
            if not (math.isfinite(float(c[key])) and float(c[key]) > 0):
                raise ConfigError(f"physics: config {key!r} must be a finite number > 0, got {c[key]!r}")
        margin = c["physical_margin"]
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not (math.isfinite(margin) and margin >= 0):
            raise ConfigError(f"physics: config 'physical_margin' must be a finite number >= 0, got {margin!r}")
        for key in ("transfer_alphas", "strip_alpha"):
            try:
                finite = np.isfinite(np.asarray(c[key], dtype=np.float64)).all()
            except (TypeError, ValueError):
                finite = False
            if not finite:
                raise ConfigError(f"physics: config {key!r} must be finite numbers, got {c[key]!r}")
        _data.check_config(c)  # ranges and the simulators' stability limits (CFL, explicit diffusion)
        _tracing.check_config(c)

    def threads(self) -> contextlib.AbstractContextManager[None]:
        """Context manager capping torch's (and BLAS') threads at config ``torch_threads`` (0 = unchanged)."""
        from sciscope.core.threads import limit_threads

        n = int(self.config["torch_threads"])
        return limit_threads(n) if n > 0 else contextlib.nullcontext()

    # -- data ---------------------------------------------------------------------------------------
    def _data_key(self) -> list[Any]:
        c = self.config
        keys = ["systems", "n_per_regime", "grid", "n_frames", "test_fraction", "seed"]
        return [(k, c[k]) for k in sorted(keys + [k for k in c if k.startswith(("gs_", "flow_"))])]

    @property
    def trajectories(self) -> TrajectorySet:
        """Every simulated trajectory (kept by the run's cache: simulated once per run)."""
        key = self._data_key()
        return self.ctx.cached("physics-trajectories", key, lambda: _data.simulate_trajectories(self.config),
                               save=TrajectorySet.save, load=TrajectorySet.load)

    @cached_property
    def normalised_frames(self) -> np.ndarray:
        """Every trajectory in the model's standardised units ``(N, T, 2, n, n)``."""
        return self.trajectories.normalised_frames()

    @cached_property
    def windows(self) -> pd.DataFrame:
        """The obs table: one row per window (trajectory, t) with parameters and diagnostics."""
        obs = self.trajectories.windows(self.config["context_frames"])
        return obs.assign(log10_viscosity=np.log10(obs["viscosity"]), log10_reynolds=np.log10(obs["reynolds"]))

    def examples(self, split: str = "train") -> Examples:
        """Windows of one split (``train``/``test`` hold whole trajectories; ``all`` is both), inputs ``(trajectory, t)``."""
        ex = Examples.of_split(self.windows, split, inputs="trajectory", concepts=self.concepts, domain="physics")
        ex.inputs = list(zip(ex.obs["trajectory"].astype(int), ex.obs["t"].astype(int)))
        return ex

    def classifier(self, system: str) -> RegimeClassifier:
        """The regime classifier of ``system``, fitted on diagnostics of the train trajectories' frames.

        Only frames from ``rollout_start + context_frames`` on are used: those are the times a
        rollout's frames stand for, and patterns change character while they form.
        """
        if system not in self._classifiers:
            ts, first = self.trajectories, self.config["rollout_start"] + self.config["context_frames"]
            d = ts.frame_diagnostics().merge(ts.table[["trajectory", "system", "split", "regime"]], on="trajectory")
            d = d[(d["system"] == system) & (d["split"] == "train") & (d["t"] >= min(first, ts.frames.shape[1] - 1))]
            self._classifiers[system] = RegimeClassifier(system, REGIMES[system][0]).fit(
                d, d["regime"].to_numpy(), d["trajectory"].to_numpy(), seed=self.config["seed"])
        return self._classifiers[system]

    # -- model --------------------------------------------------------------------------------------
    def model_spec(self) -> ModelSpec:
        """The default predictor's architecture and training settings from the config."""
        c = self.config
        return ModelSpec(grid=c["grid"], channels=2, context_frames=c["context_frames"], patch_size=c["patch_size"],
                         hidden=c["hidden"], n_layers=c["n_layers"], n_heads=c["n_heads"], steps=c["train_steps"],
                         batch_size=c["train_batch_size"], lr=c["lr"], noise=float(c["train_noise"]), seed=c["seed"])

    def model(self, spec: str | None = None) -> nn.Module:
        """``spec`` (default: config ``model``): ``""`` = the default predictor, trained once per run (run cache);
        a :func:`.model.save_predictor` directory; or ``"module:factory"`` / ``"file.py:factory"`` (same call signature)."""
        spec = self.config["model"] if spec is None else spec
        if not spec:
            model, self.training_info = self.ctx.cached(
                "physics-model", self.model_key(), self._train,
                save=lambda m, folder: save_predictor(folder / "predictor", *m), load=lambda folder: load_predictor(folder / "predictor"))
        elif Path(str(spec)).expanduser().is_dir():
            model, self.training_info = load_predictor(Path(str(spec)).expanduser())
        else:
            model = load_factory_model(str(spec))
        self._stack = find_layer_stack(model)
        return model

    def model_key(self) -> list[Any]:
        """What determines the model (cache key): the data config, the spec and ``model``."""
        return [self._data_key(), sorted(asdict(self.model_spec()).items()), str(self.config["model"])]

    def _train(self) -> tuple[nn.Module, dict[str, Any]]:
        spec, ts = self.model_spec(), self.trajectories
        weights = np.array([1.0 / ts.norms[s]["change_ms"] for s in ts.table["system"]])
        dataset = WindowDataset(self.normalised_frames, self.examples("train").inputs, spec.context_frames, weights,
                                noise=spec.noise, seed=spec.seed)
        with self.threads():
            model, result = train_predictor(spec, dataset, trainer_options=self.trainer_options)
        return model, {"norms": ts.norms, **asdict(result)}

    def batches(self, examples: Examples, model: nn.Module, *, batch_size: int = 32) -> Iterator[tuple[torch.Tensor]]:
        """Context frames ``(B, T, 2, n, n)`` (standardised) of each window, in obs order."""
        return ((x,) for x in self._contexts(list(examples.inputs), batch_size))

    def _contexts(self, pairs: list[tuple[int, int]], batch_size: int = 64) -> Iterator[torch.Tensor]:
        """Context frames of ``(trajectory, t)`` windows, ``batch_size`` at a time."""
        frames, T = self.normalised_frames, self.config["context_frames"]
        for i in range(0, len(pairs), batch_size):
            yield torch.from_numpy(np.stack([frames[tr, t - T + 1: t + 1] for tr, t in pairs[i: i + batch_size]]))

    # -- sites --------------------------------------------------------------------------------------
    def _structure(self) -> tuple[str, int]:
        if self._stack is None:
            self._stack = ("backbone.encoder.layer", self.config["n_layers"]) if not self.config["model"] else find_layer_stack(self.model())
        return self._stack

    @property
    def n_layers(self) -> int:
        return self._structure()[1]

    @property
    def aliases(self) -> dict[str, str]:
        """``{"block.{i}": "<block list>.{i}"}`` (``backbone.encoder.layer`` for the default model)."""
        return {"block.{i}": f"{self._structure()[0]}.{{i}}"}

    @property
    def sites(self) -> list[str]:
        """Every block's output: ``(B, 1 + patches x frames, D)``."""
        return [f"block.{i}" for i in range(self.n_layers)]

    def _layer(self, key: str, default: int) -> str:
        value = self.config[key]
        return f"block.{default if value is None else layer_index(value, self.n_layers, key, prefix='block')}"

    @property
    def sae_site(self) -> str:
        return self._layer("sae_layer", self.n_layers // 2)

    @property
    def steer_site(self) -> str:
        return self._layer("steer_layer", self.n_layers - 1)

    # -- concepts, probes, baselines ------------------------------------------------------------------
    @property
    def concepts(self) -> list[str]:
        """Regime and system, the parameters and every diagnostic (per-system ones NaN elsewhere)."""
        cols = ["regime", "system"]
        for system in self.config["systems"]:
            cols += [*PARAMETER_TARGETS[system], *DIAGNOSTICS[system]]
        return cols + list(SHARED_DIAGNOSTICS)

    @property
    def probe_targets(self) -> list[str]:
        """The regime (4 classes) and the shared spectral diagnostics defined on every window (a uniform
        field has no wavelength: NaN); the physical parameters are probed per system (:meth:`probe_sets`)."""
        return ["regime", *[d for d in SHARED_DIAGNOSTICS if self.windows[d].notna().all()]]

    @property
    def association_groups(self) -> str:
        """Features are tied to concepts across trajectories, not windows: the windows of one
        trajectory share its regime and parameters."""
        return "trajectory"

    @property
    def probe_groups(self) -> str:
        """Whole trajectories: windows of one trajectory never straddle folds."""
        return "trajectory"

    def probe_sets(self, ctx: Any) -> list[ProbeSet]:
        """Per system its physical parameters on its own windows (``parameters_<system>``), and inside
        each regime (``parameters_<system>_<regime>``): the regimes' parameter ranges do not overlap, so
        across regimes a probe can score by decoding the regime; within a regime it cannot. Folds hold
        whole trajectories; the radial spectrum and pixel PCA of the frame are fitted beside."""
        sets = []
        for s in self.config["systems"]:
            targets = list(PARAMETER_TARGETS[s])
            sets.append(ProbeSet(f"parameters_{s}", targets, query=f"system == '{s}'", groups="trajectory", baseline=True))
            sets += [ProbeSet(f"parameters_{s}_{r}", targets, query=f"system == '{s}' and regime == '{r}'", groups="trajectory",
                              baseline=True) for r in REGIMES[s]]
        return sets

    def baseline_features(self, examples: Examples) -> dict[str, np.ndarray]:
        """Non-model features of each window's last frame: its radial power spectrum per channel, as
        ``log(1 + power)`` (``radial_spectrum``) and as each bin's share of the power beside the log total
        (``radial_spectrum_shape``: bounded, so a probe does not extrapolate on a field whose pattern
        died), and PCA of the pixels. The probe stages take the strongest per target."""
        last = self.normalised_frames[tuple(np.array(examples.inputs).T)].astype(np.float64)  # (n, C, g, g)
        spec = radial_power(last)  # (n, C, g//2 + 1)
        total = spec.sum(-1, keepdims=True)
        shape = np.concatenate([(spec / np.maximum(total, 1e-12)).reshape(len(last), -1), np.log10(total[..., 0] + 1e-6)], axis=1)
        flat = last.reshape(len(last), -1)
        flat = flat - flat.mean(0)
        _, _, vt = np.linalg.svd(flat, full_matrices=False)
        k = min(32, vt.shape[0])
        return {"radial_spectrum": np.log1p(spec.reshape(len(last), -1)).astype(np.float32),
                "radial_spectrum_shape": shape.astype(np.float32), f"pixels_pca{k}": (flat @ vt[:k].T).astype(np.float32)}

    @property
    def contrasts(self) -> dict[str, tuple[str, str]]:
        """Per system: ``(regime A windows, regime B windows)`` (stripes vs spots, vortex vs laminar)."""
        return {s: (f"system == '{s}' and regime == '{REGIMES[s][0]}'", f"system == '{s}' and regime == '{REGIMES[s][1]}'")
                for s in self.config["systems"]}

    def tracing_pairs(self, ctx: "RunContext") -> "CounterfactualPairs | None":
        """Windows of two regimes at the same time, frame for frame (:func:`.tracing.tracing_pairs`)."""
        return _tracing.tracing_pairs(self, ctx)

    @property
    def metrics(self) -> dict[str, Callable[..., Any]]:
        """``diagnose(system, frames)`` and ``rollout(model, context, n_steps)``."""
        return {"diagnose": diagnose, "rollout": rollout}

    # -- model errors -----------------------------------------------------------------------------------
    def prediction_errors(self, model: nn.Module) -> tuple[pd.DataFrame, pd.DataFrame]:
        """One-step and rollout MSE of ``model`` beside persistence, on the test trajectories.

        Returns
        -------
        one_step : DataFrame
            Per system: ``mse_model``, ``mse_persistence`` over every test window (standardised units).
        by_horizon : DataFrame
            Per system and rollout step: ``mse_model`` (autoregressive, from ``rollout_start``),
            ``mse_persistence`` (the last context frame repeated), ``n_diverged``.
        """
        c, ts, frames = self.config, self.trajectories, self.normalised_frames
        T, s0, n = c["context_frames"], c["rollout_start"], c["rollout_steps"]
        rows, hrows = [], []
        with self.threads(), torch.no_grad():
            for system in c["systems"]:
                test = ts.ids(split="test", system=system)
                pairs = [(i, t) for i in test for t in range(T - 1, frames.shape[1] - 1)]
                pred = np.concatenate([(x[:, -1] + model(x)).numpy() for x in self._contexts(pairs)])
                tr, t = np.array(pairs).T
                se_m, se_p = (((a - frames[tr, t + 1]) ** 2).mean((1, 2, 3)) for a in (pred, frames[tr, t]))
                rows.append({"system": system, "n_windows": len(pairs), "mse_model": float(np.mean(se_m)),
                             "mse_persistence": float(np.mean(se_p))})
                res = rollout(model, frames[test, s0:s0 + T], n, blowup=c["blowup"])
                truth, last, ok = frames[test, s0 + T: s0 + T + n], frames[test, s0 + T - 1], ~res.diverged
                for h in range(n):
                    hrows.append({"system": system, "horizon": h + 1,
                                  "mse_model": float(((res.frames[ok, h] - truth[ok, h]) ** 2).mean()) if ok.any() else float("nan"),
                                  "mse_persistence": float(((last - truth[:, h]) ** 2).mean()),
                                  "n_diverged": int(res.diverged.sum()), "n_rollouts": len(test)})
        return pd.DataFrame(rows), pd.DataFrame(hrows)

    # -- fidelity: the model's own task ------------------------------------------------------------------
    def task_loss(self, ctx: Any) -> TaskLoss:
        """Next-frame MSE on held-out windows, as the model is trained: the squared error of the predicted
        change ``frames[t+1] - frames[t]`` in standardised units, each window divided by its system's mean
        squared change over the train frames (the training loss's weights, so both systems count). No
        training noise, no shift; at most :data:`TASK_WINDOWS` test windows, evenly spaced (deterministic).

        Rollout error is left out: one scalar per condition is all a :class:`TaskLoss` carries, and a
        spliced rollout that diverges is NaN, which the fidelity analysis refuses.
        """
        ts, frames = self.trajectories, self.normalised_frames
        pairs = list(self.examples("test").inputs)
        if not pairs:
            raise ConfigError("physics: no test windows for the task loss (too few trajectories held out)")
        pairs = [pairs[i] for i in np.unique(np.linspace(0, len(pairs) - 1, min(TASK_WINDOWS, len(pairs))).round().astype(int))]
        tr, t = np.array(pairs).T
        x = torch.cat(list(self._contexts(pairs)))  # (N, T, 2, n, n)
        target = torch.from_numpy(frames[tr, t + 1] - frames[tr, t])  # the change after the last context frame
        weight = torch.tensor([1.0 / ts.norms[s]["change_ms"] for s in ts.table["system"].to_numpy()[tr]],
                              dtype=torch.float64)

        def loss(model: nn.Module) -> float:
            was_training = model.training
            model.eval()
            try:
                with self.threads(), torch.no_grad():
                    se = torch.cat([((model(x[i:i + 64]) - target[i:i + 64]) ** 2).double().mean((1, 2, 3))
                                    for i in range(0, len(x), 64)])
            finally:
                model.train(was_training)
            return float((se * weight).mean())

        return TaskLoss(loss, "next-frame MSE / mean squared change (held-out windows)")

    @property
    def fidelity_positions(self) -> None:
        """Every position: a middle block's tokens (class token, every patch of every context frame) all
        feed the later blocks through attention, so none can be left clean. (The SAE is trained on the
        store's rows, which are block outputs averaged over positions.)"""
        return None

    # -- steering: the Physics Steering recipe --------------------------------------------------------
    def regime_vector(self, model: nn.Module, system: str, site: str | None = None, *, split: str = "train") -> Any:
        """Delta vector regime A - regime B of ``system`` at ``site`` (Physics Steering recipe).

        Each window's block output ``(positions, D)`` is z-normalised over (positions, D), then
        averaged over positions; windows are averaged per trajectory; trajectories per regime;
        delta = mean(A) - mean(B). The run's activation store cannot give this: it keeps the mean
        over positions, not the per-window spread over (positions, D) the normalisation divides by,
        so the windows are captured here.

        Returns
        -------
        SteeringVector
            Method ``"regime_delta"``; its meta records the groups and their sizes.
        """
        from sciscope.core import SteeringVector, capture

        if system not in self.config["systems"]:
            raise ConfigError(f"physics: system {system!r} is not simulated in this config ({self.config['systems']})")
        site, ex = site or self.steer_site, self.examples(split)
        pairs = [p for p, s in zip(ex.inputs, ex.obs["system"]) if s == system]
        per_window, was_training = [], model.training
        model.eval()
        try:
            with self.threads(), capture(model, [site], aliases=self.aliases) as cap, torch.no_grad():
                for x in self._contexts(pairs):
                    cap.clear()
                    model(x)
                    h = cap[site].double()  # (B, P, D)
                    mu, sd = h.mean(dim=(1, 2), keepdim=True), h.std(dim=(1, 2), keepdim=True).clamp_min(1e-8)
                    per_window.append(((h - mu) / sd).mean(1).numpy())  # (B, D)
        finally:
            model.train(was_training)
        m = pd.DataFrame(np.concatenate(per_window)).groupby(np.array([i for i, _ in pairs])).mean()  # per trajectory
        regime = self.trajectories.table.set_index("trajectory").loc[m.index, "regime"].to_numpy()
        a, b = REGIMES[system]
        if not ((regime == a).any() and (regime == b).any()):
            raise ConfigError(f"physics: the {split} split of {system} lacks trajectories of both regimes {a}, {b}")
        delta = m[regime == a].mean(0).to_numpy() - m[regime == b].mean(0).to_numpy()
        return SteeringVector(torch.from_numpy(delta), site, "regime_delta",
                              {"system": system, "a": a, "b": b, "n_a": int((regime == a).sum()), "n_b": int((regime == b).sum()),
                               "split": split, "normalisation": "z over (positions, dim) per window; mean over windows per trajectory"})

    def recipe_vector(self, ctx: Any, system: str) -> Any:
        """:meth:`regime_vector` of the run's model at :attr:`steer_site`, built once per run process."""
        key = [self.model_key(), system, self.steer_site]
        return ctx.cached("physics-regime-vector", key, lambda: self.regime_vector(ctx.model(), system))

    def steering_plans(self, ctx: Any) -> list[SteeringPlan]:
        """Per system ``recipe_<system>`` (its regime vector in its rollouts, ``steer_alphas``) and per
        ordered pair ``transfer_<src>_to_<dst>`` (``src``'s vector in ``dst``'s rollouts, ``transfer_alphas``)."""
        c, systems = ctx.config, list(self.config["systems"])

        model = ctx.model()  # unsteered: its rollouts set the physical bands beside the simulations'

        def plan(name: str, src: str, dst: str, alphas: Any, seed: int, description: str) -> SteeringPlan:
            vector = lambda run: AddVector(self.recipe_vector(run, src), self.steer_site, scale="relative",  # noqa: E731
                                           relative_to="example")
            return SteeringPlan(name, vector, RolloutScorer(self, dst, model).scorer, [float(x) for x in alphas],
                                n_controls=int(c["steer_n_random"]), seed=seed, description=description)

        recipes = [plan(f"recipe_{s}", s, s, c["steer_alphas"], c["seed"], f"{s}: regime vector {REGIMES[s][0]} - "
                        f"{REGIMES[s][1]} at {self.steer_site}, injected relative to |h| per example") for s in systems]
        return recipes + [plan(f"transfer_{src}_to_{dst}", src, dst, self.config["transfer_alphas"], c["seed"] + 100,
                               f"the {src} regime vector injected into {dst} rollouts (cross-system transfer)")
                          for src, dst in itertools.permutations(systems, 2)]

    # -- feature cards (:mod:`.cards`); no lens: the predictor has no vocabulary to read a direction as
    @property
    def feature_statistics(self) -> dict[str, Callable[..., pd.DataFrame]]:
        """``within_regime``: each feature's strongest within-regime Spearman correlation with a physical
        parameter over trajectories (:func:`.cards.within_regime_association`), the cards' ranking."""
        from .cards import within_regime_association

        return {"within_regime": within_regime_association}

    card_ranking = "within_regime_rho"  # cards.CARD_RANKING; not the default: many features only tell regimes apart
    card_columns = ["system", "regime", "trajectory", "t", "feed", "kill", "viscosity", "reynolds"]

    def render_examples(self, ctx: Any, feature: int, examples: pd.DataFrame) -> list[Any]:
        """The fields of the feature's strongest windows and a q50 window (:func:`.cards.render_field_windows`)."""
        from .cards import render_field_windows

        return render_field_windows(self, ctx, feature, examples)

    # -- analyses -----------------------------------------------------------------------------------
    def analyses(self) -> list[Analysis]:
        """Classifier and data (examples), prediction errors (model), parameter-probe figure (probes),
        diagnostic correlations and single-trajectory features (features), rollout strips, vector cosines
        and the steering verdicts (changed regime and physical, slopes against random directions)."""
        from . import analyses as a
        from .verdicts import steering_verdicts

        return [Analysis("regime_classifier", "examples", lambda ctx: a.examples_summary(self, ctx)),
                Analysis("prediction_errors", "model", lambda ctx: a.model_errors(self, ctx)),
                Analysis("parameter_probes", "probes", lambda ctx: a.parameter_probes(self, ctx)),
                Analysis("diagnostic_correlations", "features", lambda ctx: a.feature_diagnostics(self, ctx)),
                Analysis("rollout_strips", "steering", lambda ctx: a.rollout_strips(self, ctx)),
                Analysis("vector_cosines", "steering", lambda ctx: a.vector_cosines(self, ctx)),
                Analysis("steering_verdicts", "steering", lambda ctx: steering_verdicts(self, ctx))]
