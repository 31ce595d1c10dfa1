"""The physics adapter: a small space-time transformer over simulated physical regimes.

Follows "Physics Steering" (Fear et al. 2025, on the Walrus model) at laptop scale. Two systems
are simulated here (numpy, seeded): Gray–Scott reaction–diffusion (spots vs stripes) and forced
2-D incompressible flow (laminar vs vortex-rich). A TimeSformer-style transformer over patches
(:mod:`.model`) is trained with PyTorch Lightning on both to predict the next frame's change from
a few past frames; a user's own ``nn.Module`` can stand in (config ``model``).

Examples are *windows* (trajectory, t): the context frames ending at ``t``. Every analysis
carries its control:

* **model**: one-step and rollout error beside the persistence baseline (next = last frame);
* **probes**: per-layer probes of the regime and of shared spectral diagnostics (the stage),
  plus per-system probes of the physical parameters (feed, kill, log viscosity, log Reynolds
  number), all cross-validated over whole trajectories, beside shuffled labels and a baseline of
  the input's radial power spectrum and PCA;
* **features**: SAE features correlated (Spearman) with the diagnostics, beside shuffled ones;
* **steering** (the Physics Steering recipe, :meth:`PhysicsAdapter.regime_vector`): block
  activations of every training window z-normalised over (positions, dim), averaged over
  positions, then over each trajectory's windows; delta = mean(regime A trajectories) -
  mean(regime B); injected as ``h + alpha * v * |h| / |v|`` with the mean vector broadcast over
  every position (``relative_to="example"``); alpha swept over both signs; rollouts scored by the
  diagnostics and a regime classifier fitted on diagnostics (not on the model); random directions
  of the same norm as the control; rollouts that turn NaN/inf are counted and the sweep goes on;
  the vector of one system applied to the other (cross-system transfer).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch
from torch import nn

from sciscope.core.adapter import DomainAdapter, Examples
from sciscope.core.errors import AdapterError, ConfigError

from . import data as _data
from .data import REGIMES, TrajectorySet
from .diagnostics import DIAGNOSTICS, SHARED_DIAGNOSTICS, RegimeClassifier, diagnose, main_field
from .model import (
    ModelSpec,
    RolloutResult,
    WindowDataset,
    load_predictor,
    load_user_predictor,
    rollout,
    save_predictor,
    train_predictor,
)

__all__ = ["PhysicsAdapter", "RolloutEvaluator", "find_block_stack"]

SYSTEMS = tuple(REGIMES)
#: Diagnostic each system's compact steering score reads (besides the classifier): it separates
#: the regimes most (spots ~0.55 vs stripes ~0.15; laminar ~0.05 vs vortex ~0.65).
KEY_DIAGNOSTIC = {"gray_scott": "compactness", "flow": "x_variation"}
#: Probe targets per system in the probes stage's headline (log scales for the flow's).
PARAMETER_TARGETS = {"gray_scott": ("feed", "kill"), "flow": ("log10_viscosity", "log10_reynolds")}
_MEMORY_CACHE: dict[str, tuple[nn.Module, dict[str, Any]]] = {}


def find_block_stack(model: nn.Module) -> tuple[str, int]:
    """Path and length of a model's list of blocks: the outermost ``nn.ModuleList`` of same-type
    modules (``backbone.encoder.layer`` for the default TimeSformer); longest first."""
    found: list[tuple[str, int]] = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0 or len({type(c) for c in mod}) != 1:
            continue
        if any(name.startswith(p + ".") for p, _ in found):
            continue
        found.append((name, len(mod)))
    if not found:
        raise AdapterError(f"physics: cannot find the blocks of {type(model).__name__} (no nn.ModuleList of "
                           "identical modules); a predictor needs its blocks in an nn.ModuleList")
    return max(found, key=lambda t: t[1])


def _floats(config: Mapping[str, Any], key: str) -> list[float]:
    try:
        return [float(a) for a in config[key]]
    except (TypeError, ValueError):
        raise ConfigError(f"physics: config {key!r} must be numbers, got {config[key]!r}") from None


class RolloutEvaluator:
    """Rollouts of one system's test trajectories, scored by diagnostics and the regime classifier.

    Calling it with a model (under whatever steering hook the caller installs) rolls out every
    start context (``n_rollouts`` test trajectories of each regime), counts rollouts that turn
    NaN/inf or blow up (*diverged*) and finite ones that leave the simulated data's range by half
    its width or whose rms exceeds twice the largest rms of any simulated frame (*unphysical*:
    e.g. a flow whose energy grew 4-fold), and returns mean diagnostics over the last
    ``score_frames`` frames of the remaining physical rollouts, per start regime.

    Metrics (``A``/``B`` are the system's regimes, e.g. vortex/laminar):
    ``p_<A>_from_<B>``, ``p_<A>_from_<A>`` (classifier probability of A), ``<diag>_from_<X>``
    (the key diagnostic, or every diagnostic with ``detail=True``) and ``broken_fraction``
    (diverged or unphysical, over all rollouts); with ``detail=True`` instead
    ``diverged_fraction``, ``unphysical_fraction``, ``n_diverged``, ``n_unphysical`` and
    ``rollout_mse_from_<X>`` against the simulation (finite rollouts).
    """

    def __init__(self, adapter: "PhysicsAdapter", system: str, *, detail: bool = False) -> None:
        c = adapter.config
        self.adapter, self.system, self.detail = adapter, system, detail
        self.regime_a, self.regime_b = REGIMES[system]
        ts = adapter.trajectories
        norm = adapter.normalised_frames
        self.starts: dict[str, np.ndarray] = {}
        self.contexts: dict[str, np.ndarray] = {}
        self.truth: dict[str, np.ndarray] = {}
        s0, T, n = c["rollout_start"], c["context_frames"], c["rollout_steps"]
        for regime in (self.regime_b, self.regime_a):
            rows = _data.sample_rows(ts.table, "test", system, regime, c["n_rollouts"])
            if rows.size == 0:
                rows = _data.sample_rows(ts.table, "train", system, regime, c["n_rollouts"])
            self.starts[regime] = rows
            self.contexts[regime] = _data.context_of(norm, rows, s0, T)
            self.truth[regime] = norm[rows, s0 + T: s0 + T + n]
        self.n_steps = n
        self.score_frames = min(c["score_frames"], n)
        self.classifier = adapter.classifier(system)
        sim = norm[ts.table["system"].to_numpy() == system]  # (n, T, C, g, g) every simulated frame
        lo, hi = float(sim.min()), float(sim.max())
        self.bounds = (lo - 0.5 * (hi - lo), hi + 0.5 * (hi - lo))
        self.rms_max = float(np.sqrt((sim.astype(np.float64) ** 2).mean(axis=(2, 3, 4))).max())
        self.last: dict[str, RolloutResult] = {}

    def __call__(self, model: nn.Module) -> dict[str, float]:
        with self.adapter.threads():
            return self._evaluate(model)

    def _evaluate(self, model: nn.Module) -> dict[str, float]:
        c = self.adapter.config
        out: dict[str, float] = {}
        n_div, n_unphys, n_all = 0, 0, 0
        for regime in (self.regime_b, self.regime_a):
            res = rollout(model, self.contexts[regime], self.n_steps, blowup=c["blowup"])
            self.last[regime] = res
            finite = ~res.diverged
            # a finite rollout that leaves the data's range by half its width is no physical state:
            # its regime is not read (the classifier would extrapolate), only counted
            fin = res.frames[finite].astype(np.float64)  # (k, n_steps, C, g, g), no NaN
            unphys = np.zeros_like(finite)
            if len(fin):
                rms = np.sqrt((fin**2).mean(axis=(2, 3, 4))).max(axis=1)  # largest frame rms per rollout
                unphys[finite] = ((fin.max(axis=(1, 2, 3, 4)) > self.bounds[1]) | (fin.min(axis=(1, 2, 3, 4)) < self.bounds[0])
                                  | (rms > 2.0 * self.rms_max))
            physical = finite & ~unphys
            n_div += int(res.diverged.sum())
            n_unphys += int(unphys.sum())
            n_all += len(finite)
            diag = self._diagnostics(res.frames[physical])
            tag = f"from_{regime}"
            p = self.classifier.predict_proba(diag) if len(diag) else np.array([])
            out[f"p_{self.regime_a}_{tag}"] = float(np.nanmean(p)) if np.isfinite(p).any() else float("nan")
            cols = DIAGNOSTICS[self.system] if self.detail else (KEY_DIAGNOSTIC[self.system],)
            for col in cols:
                v = diag[col].to_numpy(dtype=np.float64) if len(diag) else np.array([])
                out[f"{col}_{tag}"] = float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")
            if self.detail:
                err = (res.frames[finite] - self.truth[regime][finite]) ** 2 if finite.any() else np.array([np.nan])
                out[f"rollout_mse_{tag}"] = float(np.mean(err))
        if self.detail:
            out["diverged_fraction"] = n_div / max(n_all, 1)
            out["unphysical_fraction"] = n_unphys / max(n_all, 1)
            out["n_diverged"] = float(n_div)
            out["n_unphysical"] = float(n_unphys)
        else:
            out["broken_fraction"] = (n_div + n_unphys) / max(n_all, 1)
        return out

    def _diagnostics(self, frames: np.ndarray) -> pd.DataFrame:
        """Diagnostics of the last ``score_frames`` frames of finite rollouts (raw units)."""
        if not len(frames):
            return pd.DataFrame(columns=list(DIAGNOSTICS[self.system]))
        tail = frames[:, -self.score_frames:]
        raw = self.adapter.trajectories.denormalise(self.system, tail)
        return diagnose(self.system, raw, **self.adapter._diag_kw(self.system))


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
    default_config: ClassVar[dict[str, Any]] = {
        # data: which systems, how many trajectories, grid and frames
        "systems": ["gray_scott", "flow"],
        "n_per_regime": 24,  # trajectories per (system, regime)
        "grid": 32,
        "n_frames": 20,
        "test_fraction": 0.25,  # whole trajectories held out (rollouts and steering use them)
        "seed": 0,
        # Gray–Scott numerics (grid units) and regime ranges of feed F and kill k
        "gs_du": 0.1,
        "gs_dv": 0.05,
        "gs_dt": 1.0,
        "gs_burn_in": 200,
        "gs_frame_every": 100,
        "gs_feed_spots": [0.030, 0.042],
        "gs_kill_spots": [0.062, 0.066],
        "gs_feed_stripes": [0.050, 0.060],
        "gs_kill_stripes": [0.060, 0.063],
        # flow numerics and regime ranges (viscosity log-uniform; the forcing gives laminar speed U)
        "flow_dt": 0.02,
        "flow_drag": 0.1,
        "flow_k_forcing": 4,
        "flow_init_amplitude": 1.0,
        "flow_burn_in": 1.0,
        "flow_frame_every": 0.5,
        "flow_viscosity_laminar": [0.18, 0.3],
        "flow_viscosity_vortex": [0.015, 0.04],
        "flow_velocity": [0.8, 1.5],
        # model
        "model": "",  # "" = train the default here; a predictor directory; or "module:factory" / "file.py:factory"
        "context_frames": 3,
        "patch_size": 4,
        "hidden": 48,
        "n_layers": 4,
        "n_heads": 4,
        "train_steps": 1500,
        "train_batch_size": 16,
        "lr": 1e-3,
        "train_noise": 0.02,  # std of Gaussian noise on training context frames (standardised units)
        # Intra-op threads of torch during training, rollouts and steering (0 = the stage's share
        # of the run's --cores). On a quiet 2-core machine the model stage took 83.6 s with the
        # stage's 2 threads and 131.7 s with 1; on 2 cores busy with other work one thread trained
        # it 3.6x faster than two -- set 1 on a shared machine.
        "torch_threads": 0,
        # analyses
        "sae_layer": None,  # None = the middle block
        "steer_layer": None,  # None = the last block (Physics Steering hooks the last processor block)
        "rollout_start": 5,  # first context frame of a rollout (patterns have formed; flow transients remain)
        "rollout_steps": 12,
        "n_rollouts": 8,  # test trajectories per regime rolled out per steering evaluation
        "score_frames": 3,  # final rollout frames scored by the diagnostics
        "blowup": 50.0,  # |field| (standardised units) beyond which a rollout counts as diverged
        "strip_alpha": 0.6,  # alpha shown in the rollout image strips
        "transfer_alphas": [-0.4, -0.2, -0.1, 0.1, 0.2, 0.4],
    }
    #: Overrides for ``sciscope run physics --profile NAME``.
    profiles: ClassVar[dict[str, dict[str, Any]]] = {
        "quick": {"n_per_regime": 24, "train_steps": 1500, "sae_steps": 1000, "sae_expansion": 8, "sae_k": 16,
                  "steer_scale": "relative", "steer_n_random": 2,
                  "steer_alphas": [-1.0, -0.6, -0.3, -0.1, 0.1, 0.3, 0.6, 1.0]},
        "full": {"n_per_regime": 64, "n_frames": 30, "train_steps": 6000, "hidden": 64, "n_layers": 6,
                 "rollout_steps": 20, "n_rollouts": 16, "steer_scale": "relative", "steer_n_random": 4,
                 "steer_alphas": [-1.5, -1.0, -0.7, -0.4, -0.2, -0.1, 0.1, 0.2, 0.4, 0.7, 1.0, 1.5]},
    }
    #: The first pipeline stage each key affects (unlisted keys: "examples").
    config_stages: ClassVar[dict[str, str]] = {
        "model": "model", "context_frames": "model", "patch_size": "model", "hidden": "model", "n_layers": "model",
        "n_heads": "model", "train_steps": "model", "train_batch_size": "model", "lr": "model", "train_noise": "model", "torch_threads": "report",
        "sae_layer": "sae",
        "steer_layer": "steering", "rollout_start": "model", "rollout_steps": "model", "n_rollouts": "steering",
        "score_frames": "steering", "blowup": "model", "strip_alpha": "steering", "transfer_alphas": "steering",
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
        self.run_dir: Path | None = None  # set by the pipeline: trajectories and model are cached there
        self.training_info: dict[str, Any] = {}
        self._traj: TrajectorySet | None = None
        self._norm_frames: np.ndarray | None = None
        self._obs: pd.DataFrame | None = None
        self._stack: tuple[str, int] | None = None
        self._classifiers: dict[str, RegimeClassifier] = {}

    # -- configuration ----------------------------------------------------------------------------
    @classmethod
    def validate_config(cls, overrides: Mapping[str, Any]) -> dict[str, Any]:
        """Merge and type-check, then check ranges and the simulators' stability (CFL) up front."""
        config = super().validate_config(overrides)
        _check_config(config)
        return config

    def _run_config(self) -> dict[str, Any]:
        """The pipeline run's whole config (``steer_alphas``, ``probe_cv`` ...) from ``run.json``; {} outside a run.

        The adapter only receives its own keys; the steering recipe and the parameter probes
        follow the pipeline's alphas, random-direction count and folds.
        """
        if self.run_dir is None:
            return {}
        from sciscope.pipelines.layout import read_run_info

        return dict(read_run_info(self.run_dir).get("config", {}))

    def threads(self) -> Any:
        """Context manager capping torch's intra-op threads at config ``torch_threads`` (0 = unchanged)."""
        return _torch_threads(int(self.config["torch_threads"]))

    def _diag_kw(self, system: str) -> dict[str, Any]:
        return {"k_forcing": int(self.config["flow_k_forcing"])} if system == "flow" else {}

    # -- data ---------------------------------------------------------------------------------------
    def _data_key(self) -> str:
        c = self.config
        keys = ["systems", "n_per_regime", "grid", "n_frames", "test_fraction", "seed"]
        keys += [k for k in c if k.startswith(("gs_", "flow_"))]
        return _data.stable_hash([(k, c[k]) for k in sorted(keys)])

    @property
    def trajectories(self) -> TrajectorySet:
        """Every simulated trajectory (cached under ``<run>/examples/cache`` in a pipeline run)."""
        if self._traj is None:
            key = self._data_key()
            folder = Path(self.run_dir) / "examples" / "cache" if self.run_dir is not None else None
            ts = TrajectorySet.load(folder, key) if folder is not None else None
            if ts is None:
                ts = _data.simulate_trajectories(self.config)
                if folder is not None:
                    ts.save(folder, key)
            self._traj = ts
        return self._traj

    @property
    def normalised_frames(self) -> np.ndarray:
        """Every trajectory in the model's standardised units ``(N, T, 2, n, n)``."""
        if self._norm_frames is None:
            self._norm_frames = self.trajectories.normalised_frames()
        return self._norm_frames

    @property
    def windows(self) -> pd.DataFrame:
        """The obs table: one row per window (trajectory, t) with parameters and diagnostics."""
        if self._obs is None:
            obs = self.trajectories.windows(self.config["context_frames"])
            obs["log10_viscosity"] = np.log10(obs["viscosity"])
            obs["log10_reynolds"] = np.log10(obs["reynolds"])
            self._obs = obs
        return self._obs

    def examples(self, split: str = "train") -> Examples:
        """Windows of one split (``train``/``test`` hold whole trajectories; ``all`` is both).

        Inputs are ``(trajectory, t)`` pairs; :meth:`batches` turns them into context frames.
        """
        obs = self.windows
        splits = ["all", *sorted(obs["split"].unique())]
        if split not in splits:
            raise ConfigError(f"physics: unknown split {split!r}; choose one of {splits}")
        rows = obs if split == "all" else obs[obs["split"] == split]
        rows = rows.reset_index(drop=True)
        inputs = list(zip(rows["trajectory"].astype(int), rows["t"].astype(int)))
        return Examples(obs=rows, inputs=inputs, concepts=self.concepts)

    def classifier(self, system: str) -> RegimeClassifier:
        """The regime classifier of ``system``, fitted on diagnostics of the train trajectories' frames.

        Only frames from ``rollout_start + context_frames`` on are used: those are the times a
        rollout's frames stand for, and patterns change character while they form.
        """
        if system not in self._classifiers:
            ts = self.trajectories
            diag = ts.frame_diagnostics()
            table = ts.table.set_index("trajectory")
            # frames a rollout produces (after the context), where its regime is read
            first = self.config["rollout_start"] + self.config["context_frames"]
            keep = (diag["trajectory"].map(table["system"]).eq(system) & diag["trajectory"].map(table["split"]).eq("train")
                    & diag["t"].ge(min(first, ts.frames.shape[1] - 1)))
            d = diag[keep.to_numpy()]
            regimes = d["trajectory"].map(table["regime"]).to_numpy()
            self._classifiers[system] = RegimeClassifier(system, REGIMES[system][0]).fit(
                d, regimes, d["trajectory"].to_numpy(), seed=self.config["seed"])
        return self._classifiers[system]

    # -- model --------------------------------------------------------------------------------------
    def model_spec(self) -> ModelSpec:
        c = self.config
        return ModelSpec(grid=c["grid"], channels=2, context_frames=c["context_frames"], patch_size=c["patch_size"],
                         hidden=c["hidden"], n_layers=c["n_layers"], n_heads=c["n_heads"], steps=c["train_steps"],
                         batch_size=c["train_batch_size"], lr=c["lr"], noise=float(c["train_noise"]), seed=c["seed"])

    def model(self, spec: str | None = None) -> nn.Module:
        """The default predictor (trained here, or reloaded from the run folder) or a user model.

        ``spec`` (default: config ``model``): ``""`` trains/reuses the default TimeSformer
        predictor (kept under ``<run>/model/checkpoint`` in a pipeline run, in memory otherwise);
        a directory written by :func:`.model.save_predictor`; or ``"module:factory"`` /
        ``"file.py:factory"`` returning any ``nn.Module`` with the same call signature.
        """
        spec = self.config["model"] if spec is None else spec
        if not spec:
            model = self._default_model()
        elif Path(str(spec)).expanduser().is_dir():
            model, info = load_predictor(Path(str(spec)).expanduser())
            self.training_info = info
        else:
            model = load_user_predictor(str(spec))
        self._stack = find_block_stack(model)
        return model

    def _model_key(self) -> str:
        return _data.stable_hash([self._data_key(), sorted(asdict(self.model_spec()).items())])

    def _default_model(self) -> nn.Module:
        key = self._model_key()
        folder = Path(self.run_dir) / "model" / "checkpoint" if self.run_dir is not None else None
        if folder is not None and folder.is_dir():
            try:
                model, info = load_predictor(folder)
            except ConfigError:
                info = {}
            if info.get("key") == key:
                self.training_info = info
                return model
        if folder is None and key in _MEMORY_CACHE:
            model, self.training_info = _MEMORY_CACHE[key]
            return model
        spec = self.model_spec()
        ts = self.trajectories
        train = ts.table[ts.table["split"] == "train"]
        windows = [(i, t) for i in train["trajectory"] for t in range(spec.context_frames - 1, ts.frames.shape[1] - 1)]
        weights = np.array([1.0 / ts.norms[s]["change_ms"] for s in ts.table["system"]])
        dataset = WindowDataset(self.normalised_frames, windows, spec.context_frames, weights, noise=spec.noise,
                                seed=spec.seed)
        with self.threads():
            model, result = train_predictor(spec, dataset, trainer_options=self.trainer_options)
        info = {"key": key, "norms": ts.norms, **asdict(result)}
        if folder is not None:
            save_predictor(folder, model, info)
        else:
            _MEMORY_CACHE[key] = (model, info)
        self.training_info = info
        return model

    def batches(self, examples: Examples, model: nn.Module, *, batch_size: int = 32) -> Iterator[tuple[torch.Tensor]]:
        """Context frames ``(B, T, 2, n, n)`` (standardised) of each window, in obs order."""
        frames = self.normalised_frames
        T = self.config["context_frames"]
        pairs = list(examples.inputs)
        for i in range(0, len(pairs), batch_size):
            chunk = pairs[i: i + batch_size]
            x = np.stack([frames[tr, t - T + 1: t + 1] for tr, t in chunk])
            yield (torch.from_numpy(np.ascontiguousarray(x)),)

    # -- sites --------------------------------------------------------------------------------------
    def _structure(self) -> tuple[str, int]:
        if self._stack is None:
            if not self.config["model"]:
                self._stack = ("backbone.encoder.layer", self.config["n_layers"])
            else:
                self._stack = find_block_stack(self.model())
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
        n = self.n_layers
        if value is None:
            return f"block.{default}"
        try:
            i = int(str(value).removeprefix("block."))
        except ValueError:
            raise ConfigError(f"physics: config {key!r} expects a block index, got {value!r}") from None
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise ConfigError(f"physics: config {key!r} = {value!r} is out of range: the model has {n} blocks")
        return f"block.{i}"

    @property
    def sae_site(self) -> str:
        return self._layer("sae_layer", self.n_layers // 2)

    @property
    def steer_site(self) -> str:
        return self._layer("steer_layer", self.n_layers - 1)

    @property
    def pooling(self) -> str:
        """Mean over every token (space x time) of a window."""
        return "mean"

    # -- concepts, probes, baselines ------------------------------------------------------------------
    @property
    def concepts(self) -> list[str]:
        """Regime and system, the parameters and every diagnostic (per-system ones NaN elsewhere)."""
        cols = ["regime", "system"]
        for system in self.config["systems"]:
            cols += [p for p in PARAMETER_TARGETS[system]] + list(DIAGNOSTICS[system])
        return cols + list(SHARED_DIAGNOSTICS)

    @property
    def probe_targets(self) -> list[str]:
        """Targets defined on every window: the regime (4 classes) and the shared spectral diagnostics.

        The per-system physical parameters are probed per system in the probes stage's
        headline (:meth:`parameter_probes`), as they do not exist for the other system.
        """
        obs = self.windows
        # a uniform field has no wavelength (NaN): such a target is left out rather than half-probed
        return ["regime", *[d for d in SHARED_DIAGNOSTICS if obs[d].notna().all()]]

    @property
    def probe_groups(self) -> str:
        """Whole trajectories: windows of one trajectory never straddle folds."""
        return "trajectory"

    def baseline_features(self, examples: Examples) -> dict[str, np.ndarray]:
        """Non-model features of each window's last frame: radial power spectrum and PCA of the pixels."""
        frames = self.normalised_frames
        last = np.stack([frames[tr, t] for tr, t in examples.inputs]).astype(np.float64)  # (n, C, g, g)
        g = last.shape[-1]
        ky, kx = np.meshgrid(np.fft.fftfreq(g, 1 / g), np.fft.fftfreq(g, 1 / g), indexing="ij")
        kbin = np.minimum(np.sqrt(ky**2 + kx**2).round().astype(int), g // 2)
        power = np.abs(np.fft.fft2(last)) ** 2  # (n, C, g, g)
        spec = np.stack([np.bincount(kbin.ravel(), weights=p.ravel(), minlength=g // 2 + 1)
                         for p in power.reshape(-1, g, g)]).reshape(len(last), -1)
        flat = last.reshape(len(last), -1)
        flat = flat - flat.mean(0)
        _, _, vt = np.linalg.svd(flat, full_matrices=False)
        k = min(32, vt.shape[0])
        return {"radial_spectrum": np.log1p(spec).astype(np.float32), f"pixels_pca{k}": (flat @ vt[:k].T).astype(np.float32)}

    @property
    def contrasts(self) -> dict[str, tuple[str, str]]:
        """Per system: ``(regime A windows, regime B windows)`` (stripes vs spots, vortex vs laminar)."""
        return {s: (f"system == '{s}' and regime == '{REGIMES[s][0]}'", f"system == '{s}' and regime == '{REGIMES[s][1]}'")
                for s in self.config["systems"]}

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
        with self.threads():
            return self._prediction_errors(model)

    def _prediction_errors(self, model: nn.Module) -> tuple[pd.DataFrame, pd.DataFrame]:
        c = self.config
        ts, frames = self.trajectories, self.normalised_frames
        T, s0, n = c["context_frames"], c["rollout_start"], c["rollout_steps"]
        rows, hrows = [], []
        for system in c["systems"]:
            test = ts.table[(ts.table["split"] == "test") & (ts.table["system"] == system)]["trajectory"].to_numpy()
            pairs = [(i, t) for i in test for t in range(T - 1, frames.shape[1] - 1)]
            se_m, se_p = [], []
            with torch.no_grad():
                for b in range(0, len(pairs), 64):
                    chunk = pairs[b: b + 64]
                    x = torch.from_numpy(np.stack([frames[i, t - T + 1: t + 1] for i, t in chunk]))
                    y = np.stack([frames[i, t + 1] for i, t in chunk])
                    pred = (x[:, -1] + model(x)).numpy()
                    se_m.append(((pred - y) ** 2).mean((1, 2, 3)))
                    se_p.append(((x[:, -1].numpy() - y) ** 2).mean((1, 2, 3)))
            rows.append({"system": system, "n_windows": len(pairs), "mse_model": float(np.mean(np.concatenate(se_m))),
                         "mse_persistence": float(np.mean(np.concatenate(se_p)))})
            res = rollout(model, _data.context_of(frames, test, s0, T), n, blowup=c["blowup"])
            truth = frames[test, s0 + T: s0 + T + n]
            last = frames[test, s0 + T - 1]
            for h in range(n):
                ok = ~res.diverged
                hrows.append({"system": system, "horizon": h + 1,
                              "mse_model": float(((res.frames[ok, h] - truth[ok, h]) ** 2).mean()) if ok.any() else float("nan"),
                              "mse_persistence": float(((last - truth[:, h]) ** 2).mean()),
                              "n_diverged": int(res.diverged.sum()), "n_rollouts": len(test)})
        return pd.DataFrame(rows), pd.DataFrame(hrows)

    # -- steering: the Physics Steering recipe --------------------------------------------------------
    def regime_vector(self, model: nn.Module, system: str, site: str | None = None, *, split: str = "train") -> Any:
        """Delta vector regime A - regime B of ``system`` at ``site`` (Physics Steering recipe).

        Each window's block output ``(positions, D)`` is z-normalised over (positions, D), then
        averaged over positions; windows are averaged per trajectory; trajectories per regime;
        delta = mean(A) - mean(B). Returns a :class:`~sciscope.core.steer.SteeringVector` (method
        ``"regime_delta"``) whose meta records the groups and their sizes.
        """
        from sciscope.core import SteeringVector, capture

        site = site or self.steer_site
        if system not in self.config["systems"]:
            raise ConfigError(f"physics: system {system!r} is not simulated in this config ({self.config['systems']})")
        ts, frames = self.trajectories, self.normalised_frames
        T = self.config["context_frames"]
        tab = ts.table[(ts.table["system"] == system) & (ts.table["split"] == split)]
        pairs = [(int(i), t) for i in tab["trajectory"] for t in range(T - 1, frames.shape[1] - 1)]
        per_window = []
        was_training = model.training
        model.eval()
        try:
            with self.threads(), capture(model, [site], aliases=self.aliases) as cap, torch.no_grad():
                for b in range(0, len(pairs), 64):
                    chunk = pairs[b: b + 64]
                    cap.clear()
                    model(torch.from_numpy(np.stack([frames[i, t - T + 1: t + 1] for i, t in chunk])))
                    h = cap[site].double()  # (B, P, D)
                    mu = h.mean(dim=(1, 2), keepdim=True)
                    sd = h.std(dim=(1, 2), keepdim=True).clamp_min(1e-8)
                    per_window.append(((h - mu) / sd).mean(1).numpy())  # (B, D)
        finally:
            model.train(was_training)
        m = pd.DataFrame(np.concatenate(per_window)).groupby(np.array([i for i, _ in pairs])).mean()  # per trajectory
        regime = tab.set_index("trajectory").loc[m.index, "regime"].to_numpy()
        a, b = REGIMES[system]
        if not ((regime == a).any() and (regime == b).any()):
            raise ConfigError(f"physics: the {split} split of {system} lacks trajectories of both regimes {a}, {b}")
        delta = m[regime == a].mean(0).to_numpy() - m[regime == b].mean(0).to_numpy()
        return SteeringVector(torch.from_numpy(delta), site, "regime_delta",
                              {"system": system, "a": a, "b": b, "n_a": int((regime == a).sum()), "n_b": int((regime == b).sum()),
                               "split": split, "normalisation": "z over (positions, dim) per window; mean over windows per trajectory"})

    def steering_evaluator(
        self, model: nn.Module, examples: Examples, contrast: str, site: str
    ) -> Callable[[nn.Module], dict[str, float]] | None:
        """Rollouts of the contrast's system scored by the regime classifier and its key diagnostic.

        ``fn(model) -> {p_<A>_from_<B>, p_<A>_from_<A>, <diag>_from_<B>, <diag>_from_<A>,
        broken_fraction}`` (see :class:`RolloutEvaluator`).
        """
        if contrast not in self.config["systems"]:
            return None
        return RolloutEvaluator(self, contrast)

    def steering_experiment(self, model: nn.Module, out: str | Path, *, alphas: list[float], n_random: int,
                            site: str | None = None, progress: bool = False) -> list[dict[str, Any]]:
        """The full Physics Steering experiment; writes its tables and figures under ``out``.

        Per system: the recipe vector, an alpha sweep over both signs with per-example relative
        injection beside ``n_random`` random directions of equal norm (``recipe_<system>/``),
        diagnostic-vs-alpha curves and baseline-vs-steered image strips; then every system's vector
        applied to the other system's rollouts (``transfer.csv``). Returns headline rows.
        """
        with self.threads():
            return self._steering_experiment(model, Path(out), alphas=alphas, n_random=n_random, site=site,
                                             progress=progress)

    def _steering_experiment(self, model: nn.Module, out: Path, *, alphas: list[float], n_random: int,
                             site: str | None, progress: bool) -> list[dict[str, Any]]:
        from sciscope.core import alpha_sweep
        from sciscope.core.io import write_table

        from .plots import plot_diagnostics_vs_alpha

        site = site or self.steer_site
        systems = list(self.config["systems"])
        vectors = {s: self.regime_vector(model, s, site) for s in systems}
        evaluators = {s: RolloutEvaluator(self, s, detail=True) for s in systems}
        rows: list[dict[str, Any]] = []
        summary, counts = [], []
        for s in systems:
            a, b = REGIMES[s]
            folder = out / f"recipe_{s}"
            sweep = alpha_sweep(model, vectors[s], alphas, evaluators[s], site=site, scale="relative",
                                relative_to="example", n_random=n_random, seed=self.config["seed"],
                                aliases=self.aliases, progress=progress)
            sweep.save(folder)
            vectors[s].save(folder / "vector.safetensors")
            table = sweep.table
            metric_list = [f"p_{a}_from_{b}", f"p_{a}_from_{a}", *[f"{d}_from_{b}" for d in DIAGNOSTICS[s]],
                           "diverged_fraction", "unphysical_fraction", f"rollout_mse_from_{b}"]
            plot_diagnostics_vs_alpha(table, metric_list, folder / "diagnostics_vs_alpha.png",
                                      title=f"{s}: regime vector {a} - {b} at {site}, injected relative to |h| (per example)")
            self._strips(model, s, vectors[s], site, folder)
            broken = table.pivot_table(index=["condition", "alpha"], columns="metric", values="value")
            counts.append(pd.DataFrame({
                "system": s, "condition": broken.index.get_level_values(0), "alpha": broken.index.get_level_values(1),
                "n_rollouts": sum(len(v) for v in evaluators[s].starts.values()),
                "n_diverged": broken["n_diverged"].to_numpy().astype(int),
                "n_unphysical": broken["n_unphysical"].to_numpy().astype(int)}))
            star = _alpha_star(alphas, float(self.config["strip_alpha"]))
            info = _curve_summary(table, f"p_{a}_from_{b}", f"p_{a}_from_{a}", star)
            key = KEY_DIAGNOSTIC[s]
            dinfo = _curve_summary(table, f"{key}_from_{b}", f"{key}_from_{a}", star)
            summary.append({"system": s, "site": site, "vector_norm": vectors[s].norm, "alpha_star": star,
                            **{f"p_{k}": v for k, v in info.items()}, **{f"{key}_{k}": v for k, v in dinfo.items()}})
            brk = broken.reindex(columns=["n_diverged", "n_unphysical"]).fillna(0).sum(1) / max(
                1, sum(len(v) for v in evaluators[s].starts.values()))
            r_at = lambda al: float(brk[[c.startswith("random") and al == a_ for c, a_ in brk.index]].mean())  # noqa: E731
            broken_note = (f"broken rollouts at +{star:g}: {brk.get(('steer', star), np.nan):.0%} (random {r_at(star):.0%}), "
                           f"at -{star:g}: {brk.get(('steer', -star), np.nan):.0%} (random {r_at(-star):.0%}); "
                           "broken rollouts are counted, not scored")
            shape = (f"{'monotonic' if info['monotonic'] else 'not monotonic'} in alpha, sign symmetry {info['symmetry']:.2f} "
                     f"(1 = odd around alpha = 0); slope over |alpha| <= {star:g}: {info['slope']:+.3f} "
                     f"(random |slope| {info['random_slope']:.3f})")
            rows.append({"stage": "steering", "name": f"{s}: P({a}) of rollouts from {b}, alpha = +{star:g} (recipe)",
                         "value": info["plus"], "control": info["random_plus"],
                         "control_label": "random directions (same norm), same alpha",
                         "note": f"alpha = 0: {info['at_zero']:.3f}; {shape}; {key} {dinfo['at_zero']:.3g} -> {dinfo['plus']:.3g} "
                                 f"(random {dinfo['random_plus']:.3g}); {broken_note}",
                         "source": "steering/steering_summary.csv"})
            rows.append({"stage": "steering", "name": f"{s}: P({a}) of rollouts from {a}, alpha = -{star:g} (recipe)",
                         "value": info["minus_other"], "control": info["random_minus_other"],
                         "control_label": "random directions (same norm), same alpha",
                         "note": f"alpha = 0: {info['at_zero_other']:.3f}; {key} {dinfo['at_zero_other']:.3g} -> "
                                 f"{dinfo['minus_other']:.3g} (random {dinfo['random_minus_other']:.3g}); {broken_note}",
                         "source": "steering/steering_summary.csv"})
            bd, bdr = info["breakdown_alpha"], info["breakdown_alpha_random"]
            rows.append({"stage": "steering", "name": f"{s}: smallest |alpha| with broken rollouts (recipe)",
                         "value": None if not np.isfinite(bd) else bd,
                         "control": None if not np.isfinite(bdr) else bdr, "control_label": "random directions",
                         "note": "broken = NaN/inf, blow-up, out of the simulated range by half its width, or rms above "
                                 "twice the simulations' largest; "
                                 + ("none up to |alpha| = " + f"{max(abs(x) for x in alphas):g}" if not np.isfinite(bd) else
                                    f"{info['broken_at_max']:.0%} of rollouts broken at the largest |alpha|"),
                         "source": "steering/broken_rollouts.csv"})
        write_table(out / "steering_summary.csv", pd.DataFrame(summary))
        nan_table = pd.concat(counts, ignore_index=True)
        write_table(out / "broken_rollouts.csv", nan_table)
        steered = nan_table[nan_table.condition == "steer"]
        randoms = nan_table[nan_table.condition.str.startswith("random")]
        rows.append({"stage": "steering", "name": "diverged rollouts (NaN/inf or blow-up), regime vectors",
                     "value": int(steered.n_diverged.sum()), "control": int(randoms.n_diverged.sum()) if len(randoms) else None,
                     "control_label": "same count, random directions", "unit": "rollouts",
                     "note": f"of {int(steered.n_rollouts.sum())} steered rollouts ({int(steered.n_unphysical.sum())} more finite "
                             f"but unphysical; random: {int(randoms.n_unphysical.sum())}); counted per alpha in "
                             "broken_rollouts.csv, the sweep goes on",
                     "source": "steering/broken_rollouts.csv"})
        # cross-system transfer: the vector of one system injected into the other's rollouts
        if len(systems) > 1:
            talphas = _floats(self.config, "transfer_alphas")
            trows = []
            for src in systems:
                for dst in systems:
                    if src == dst:
                        continue
                    a, b = REGIMES[dst]
                    sw = alpha_sweep(model, vectors[src], talphas, RolloutEvaluator(self, dst), site=site,
                                     scale="relative", relative_to="example", n_random=n_random,
                                     seed=self.config["seed"] + 100, aliases=self.aliases, progress=progress)
                    sw.save(out / f"transfer_{src}_to_{dst}")
                    tstar = max(abs(x) for x in talphas)
                    info = _curve_summary(sw.table, f"p_{a}_from_{b}", f"p_{a}_from_{a}", tstar)
                    own = _curve_summary(sw.table, f"{KEY_DIAGNOSTIC[dst]}_from_{b}", f"{KEY_DIAGNOSTIC[dst]}_from_{a}", tstar)
                    trows.append({"source_system": src, "target_system": dst, "target_a": a, "target_b": b, "alpha": tstar,
                                  "cosine_source_target_vectors": vectors[src].cosine(vectors[dst]),
                                  "p_a_from_b_at_zero": info["at_zero"], "p_a_from_b_plus": info["plus"],
                                  "p_a_from_b_plus_random": info["random_plus"],
                                  "p_a_from_a_at_zero": info["at_zero_other"], "p_a_from_a_minus": info["minus_other"],
                                  "p_a_from_a_minus_random": info["random_minus_other"],
                                  "slope_p_a_from_b": info["slope"], "random_slope": info["random_slope"],
                                  "key_diagnostic": KEY_DIAGNOSTIC[dst], "key_from_b_at_zero": own["at_zero"],
                                  "key_from_b_plus": own["plus"], "key_from_b_plus_random": own["random_plus"],
                                  "breakdown_alpha": info["breakdown_alpha"]})
            transfer = pd.DataFrame(trows)
            write_table(out / "transfer.csv", transfer)
            for r in transfer.itertuples():
                rows.append({"stage": "steering",
                             "name": f"transfer {r.source_system} -> {r.target_system}: P({r.target_a}) from {r.target_b}, alpha = +{r.alpha:g}",
                             "value": float(r.p_a_from_b_plus), "control": float(r.p_a_from_b_plus_random),
                             "control_label": "random directions (same norm), same alpha",
                             "note": f"alpha = 0: {r.p_a_from_b_at_zero:.3f}; from {r.target_a} at -{r.alpha:g}: {r.p_a_from_a_minus:.3f} "
                                     f"(alpha = 0: {r.p_a_from_a_at_zero:.3f}, random {r.p_a_from_a_minus_random:.3f}); "
                                     f"cosine of the two systems' vectors {r.cosine_source_target_vectors:+.2f}",
                             "source": "steering/transfer.csv"})
        return rows

    def _strips(self, model: nn.Module, system: str, vector: Any, site: str, folder: Path) -> list[Path]:
        """Rollout image strips (truth, alpha = 0, +alpha, -alpha, random +alpha) from one start of each regime."""
        from sciscope.core import steer

        from .plots import plot_rollout_strips

        c = self.config
        alpha = float(c["strip_alpha"])
        ev = RolloutEvaluator(self, system)
        rand = vector.random_like(c["seed"])
        paths = []
        steps = sorted(set(np.linspace(0, ev.n_steps - 1, min(6, ev.n_steps)).round().astype(int).tolist()))
        for regime in (ev.regime_b, ev.regime_a):
            ctx = ev.contexts[regime][:1]
            rows: dict[str, np.ndarray] = {"simulation": ev.truth[regime][0]}
            for label, vec, al in (("alpha = 0", vector, 0.0), (f"+{alpha:g} regime vector", vector, alpha),
                                   (f"-{alpha:g} regime vector", vector, -alpha), (f"+{alpha:g} random", rand, alpha)):
                with steer(model, vec, al, site=site, scale="relative", relative_to="example", aliases=self.aliases):
                    rows[label] = rollout(model, ctx, ev.n_steps, blowup=c["blowup"]).frames[0]
            fields = {k: main_field(system, self.trajectories.denormalise(system, v)) for k, v in rows.items()}
            a, b = REGIMES[system]
            paths.append(plot_rollout_strips(
                system, fields, folder / f"rollout_strips_from_{regime}.png", steps=steps,
                title=f"{system}: rollout from a {regime} test trajectory; +alpha pushes toward {a}, -alpha toward {b}"))
        return paths

    # -- probes: per-system physical parameters ---------------------------------------------------------
    def parameter_probes(self, store: Any, *, progress: bool = False) -> pd.DataFrame:
        """Per-layer ridge probes of each system's parameters on that system's windows.

        Cross-validated over whole trajectories, beside the shuffled-label control; returns the
        sweep summaries with a ``system`` column.
        """
        from sciscope.core import probe_sweep

        parts = []
        for system in self.config["systems"]:
            sub = store.query(f"system == '{system}'")
            n_traj = sub.obs["trajectory"].nunique()
            cv = min(int(self._run_config().get("probe_cv", 5)), n_traj)
            if cv < 2:
                continue
            res = probe_sweep(sub, list(PARAMETER_TARGETS[system]), cv=cv, groups="trajectory", control=True,
                              seed=self.config["seed"], progress=progress)
            parts.append(res.summary().assign(system=system))
        return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()

    # -- headline rows per stage ---------------------------------------------------------------------
    def headline_rows(self, stage: str, context: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Physics headlines: classifier accuracy, prediction error vs persistence, parameter probes,
        SAE-diagnostic correlations and the steering recipe, each beside its control."""
        out = Path(context["out"])
        if stage == "examples":
            return self._examples_headline(out)
        if stage == "model":
            return self._model_headline(context["model"], out)
        if stage == "probes":
            return self._probes_headline(context["store"], out)
        if stage == "features":
            return self._features_headline(context["analysis"], out)
        if stage == "steering":
            model = context.get("model") or self.model()
            run = self._run_config()
            alphas = _floats(run, "steer_alphas") if "steer_alphas" in run else [-1.0, -0.5, 0.5, 1.0]
            rows = self.steering_experiment(model, out, alphas=alphas, n_random=int(run.get("steer_n_random", 2)))
            rows += self._generic_vs_recipe(context, out)
            return rows
        return []

    def _examples_headline(self, out: Path) -> list[dict[str, Any]]:
        from sciscope.core.io import write_table

        from .plots import plot_regime_examples

        ts = self.trajectories
        rows, table = [], []
        for system in self.config["systems"]:
            clf = self.classifier(system)
            table.append({"system": system, "positive": clf.positive, "columns": ",".join(clf.columns),
                          "cv_accuracy": clf.cv_accuracy, "shuffled_accuracy": clf.control_accuracy})
            rows.append({"stage": "examples", "name": f"{system}: regime classifier accuracy (diagnostics)",
                         "value": clf.cv_accuracy, "control": clf.control_accuracy,
                         "control_label": "regimes shuffled among trajectories",
                         "note": f"logistic regression on {', '.join(clf.columns)}; trajectory-grouped CV on train frames",
                         "source": "examples/regime_classifier.csv"})
        write_table(out / "regime_classifier.csv", pd.DataFrame(table))
        write_table(out / "trajectories.csv", ts.table)
        fields = {}
        for system in self.config["systems"]:
            for regime in REGIMES[system]:
                idx = ts.table[(ts.table.system == system) & (ts.table.regime == regime)]["trajectory"].to_numpy()[:6]
                fields[(system, regime)] = main_field(system, ts.frames[idx, -1])
        plot_regime_examples(fields, out / "regimes.png")
        counts = ts.table.groupby(["system", "regime", "split"]).size()
        rows.append({"stage": "examples", "name": "simulated trajectories", "value": len(ts.table), "unit": "trajectories",
                     "note": "; ".join(f"{s}/{r}/{sp}: {n}" for (s, r, sp), n in counts.items())
                             + f"; {ts.frames.shape[1]} frames of {ts.frames.shape[-1]}x{ts.frames.shape[-1]}",
                     "source": "examples/trajectories.csv"})
        return rows

    def _model_headline(self, model: nn.Module, out: Path) -> list[dict[str, Any]]:
        from sciscope.core.io import write_table

        from .plots import plot_rollout_errors, plot_training

        one, hor = self.prediction_errors(model)
        write_table(out / "one_step_error.csv", one)
        write_table(out / "rollout_error.csv", hor)
        plot_rollout_errors(hor, out / "rollout_error.png")
        if self.training_info.get("history"):
            plot_training(self.training_info["history"], out / "training_loss.png")
        rows = []
        for r in one.itertuples():
            rows.append({"stage": "model", "name": f"{r.system}: one-step MSE", "value": r.mse_model,
                         "control": r.mse_persistence, "control_label": "persistence (next = last frame)",
                         "note": f"{r.n_windows} test windows, standardised units; ratio {r.mse_model / r.mse_persistence:.3f}",
                         "source": "model/one_step_error.csv"})
        for system, t in hor.groupby("system", sort=False):
            last = t.sort_values("horizon").iloc[-1]
            rows.append({"stage": "model", "name": f"{system}: rollout MSE at step {int(last.horizon)}",
                         "value": float(last.mse_model), "control": float(last.mse_persistence),
                         "control_label": "persistence (last context frame repeated)",
                         "note": f"{int(last.n_rollouts)} test trajectories; {int(last.n_diverged)} diverged",
                         "source": "model/rollout_error.csv"})
        return rows

    def _probes_headline(self, store: Any, out: Path) -> list[dict[str, Any]]:
        from sciscope.core.io import write_table

        from .plots import plot_parameter_probes

        summary = self.parameter_probes(store)
        if summary.empty:
            return []
        write_table(out / "parameter_probes.csv", summary)
        plot_parameter_probes(summary, out / "parameter_probes_vs_layer.png")
        rows = []
        layers = summary[summary["site"].notna() & (summary["site"].astype(str) != "")]
        for (system, target), t in layers.groupby(["system", "target"], sort=False):
            best = t.loc[t["score_mean"].idxmax()]
            rows.append({"stage": "probes", "name": f"{system}: {target} ({best.metric})", "value": float(best.score_mean),
                         "control": float(best.control_mean), "control_label": "shuffled labels",
                         "note": f"best site {best.site}; per layer: " + ", ".join(f"{s} {v:.2f}" for s, v in zip(t.site, t.score_mean)),
                         "source": "probes/parameter_probes.csv"})
        return rows

    def diagnostic_correlations(self, analysis: Any) -> pd.DataFrame:
        """Per diagnostic: the SAE feature with the largest |Spearman rho| beside the shuffled best."""
        a = analysis.associations
        ctrl = analysis.control_associations
        diags = [d for s in self.config["systems"] for d in DIAGNOSTICS[s]] + list(SHARED_DIAGNOSTICS)
        rows = []
        for d in dict.fromkeys(diags):
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
        return pd.DataFrame(rows)

    def _features_headline(self, analysis: Any, out: Path) -> list[dict[str, Any]]:
        from sciscope.core.io import write_table

        table = self.diagnostic_correlations(analysis)
        if table.empty:
            return []
        write_table(out / "diagnostic_correlations.csv", table)
        return [{"stage": "features", "name": f"SAE feature vs {r.diagnostic} (|Spearman rho|)", "value": abs(r.rho),
                 "control": getattr(r, "max_abs_rho_shuffled", None), "control_label": "max |rho| on shuffled diagnostics",
                 "note": f"feature {r.feature} (rho {r.rho:+.2f}, q = {r.q:.2g}, n = {r.n}); {r.n_features_significant} features significant",
                 "source": "features/diagnostic_correlations.csv"} for r in table.itertuples()]

    def feature_plots(self, analysis: Any, acts: Any, obs: pd.DataFrame, out_dir: Any) -> list[Path]:
        """Scatter of the best feature against each diagnostic, coloured by regime."""
        from .plots import plot_feature_diagnostics

        table = self.diagnostic_correlations(analysis)
        if table.empty:
            return []
        A = np.asarray(acts.array(acts.sites[0]) if hasattr(acts, "array") else acts)
        pairs = [(r.diagnostic, int(r.feature), float(r.rho)) for r in table.itertuples()]
        return [plot_feature_diagnostics(A, obs.reset_index(drop=True), pairs, Path(out_dir) / "features_vs_diagnostics.png")]

    def _generic_vs_recipe(self, context: Mapping[str, Any], out: Path) -> list[dict[str, Any]]:
        """Cosine between the stage's plain mean-difference vector and the recipe vector, per system."""
        from sciscope.core import SteeringVector

        rows = []
        for s in context.get("sweeps", {}) or {}:
            plain, recipe = out / s / "vector.safetensors", out / f"recipe_{s}" / "vector.safetensors"
            if plain.is_file() and recipe.is_file():
                cos = SteeringVector.load(plain).cosine(SteeringVector.load(recipe))
                rows.append({"stage": "steering", "name": f"{s}: cosine(plain mean difference, recipe vector)", "value": cos,
                             "note": "plain: mean over windows of raw activations; recipe: z-normalised per window, "
                                     "averaged per trajectory", "source": f"steering/recipe_{s}/vector.safetensors"})
        return rows


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    old = torch.get_num_threads()
    if n > 0:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _alpha_star(alphas: list[float], target: float) -> float:
    """The positive alpha of a sweep closest to ``target`` (the one the headline and strips report)."""
    pos = [a for a in alphas if a > 0]
    return float(min(pos, key=lambda a: (abs(a - target), a))) if pos else float(max(abs(a) for a in alphas))


def _curve_summary(table: pd.DataFrame, metric: str, other: str, star: float) -> dict[str, Any]:
    """Read one metric's steering curve (``metric``: from regime B starts; ``other``: from A starts).

    ``plus`` / ``random_plus``: the metric at ``+star`` for the vector / mean of random directions;
    ``minus_other`` / ``random_minus_other``: ``other`` at ``-star``; ``slope``: least squares over
    ``|alpha| <= star`` (``random_slope``: mean |slope| of the random directions); ``monotonic``
    over the whole sweep; ``symmetry``: sum of (effect at +a) * -(effect at -a) over sum of their
    mean square (1 when the curve is odd around alpha = 0, 0 when one sign does nothing, negative
    when both signs push the same way); ``breakdown_alpha``: the smallest |alpha| with a diverged
    or unphysical rollout (NaN when none), also for the random directions.
    """
    t = table[table.metric == metric]
    steer = t[t.condition == "steer"].set_index("alpha")["value"].sort_index()
    rand = t[t.condition.str.startswith("random")]
    rmean = rand.groupby("alpha")["value"].mean()
    o = table[table.metric == other]
    o_steer = o[o.condition == "steer"].set_index("alpha")["value"]
    o_rand = o[o.condition.str.startswith("random")].groupby("alpha")["value"].mean()

    def fit(s: pd.Series) -> float:
        s = s[(np.abs(s.index) <= star + 1e-12) & np.isfinite(s.to_numpy())]
        return float(np.polyfit(s.index.to_numpy(dtype=float), s.to_numpy(), 1)[0]) if len(s) > 1 else float("nan")

    rslopes = [abs(fit(g.set_index("alpha")["value"].sort_index())) for _, g in rand.groupby("condition")]
    fin = steer[np.isfinite(steer.to_numpy())]
    d = np.diff(fin.to_numpy())
    base = float(steer.get(0.0, np.nan))
    pos = [a for a in steer.index if a > 0 and -a in steer.index and np.isfinite(steer[a]) and np.isfinite(steer[-a])]
    num = sum((steer[a] - base) * -(steer[-a] - base) for a in pos)
    den = sum(0.5 * ((steer[a] - base) ** 2 + (steer[-a] - base) ** 2) for a in pos)
    wide = table.pivot_table(index=["condition", "alpha"], columns="metric", values="value")
    bad = wide[[c for c in ("diverged_fraction", "unphysical_fraction", "broken_fraction") if c in wide]].fillna(0).sum(1)
    bad_steer = bad.xs("steer", level="condition")
    bad_rand = bad[[c.startswith("random") for c in bad.index.get_level_values(0)]]
    broke = bad_steer[bad_steer > 0]
    broke_r = bad_rand[bad_rand > 0]
    amax = max(abs(a) for a in bad_steer.index)
    return {
        "plus": float(steer.get(star, np.nan)),
        "random_plus": float(rmean.get(star, np.nan)),
        "minus_other": float(o_steer.get(-star, np.nan)),
        "random_minus_other": float(o_rand.get(-star, np.nan)),
        "at_zero": base,
        "at_zero_other": float(o_steer.get(0.0, np.nan)),
        "slope": fit(steer),
        "random_slope": float(np.nanmean(rslopes)) if rslopes else float("nan"),
        "monotonic": bool(len(d) > 0 and (np.all(d >= 0) or np.all(d <= 0))),
        "symmetry": float(num / den) if den > 0 else float("nan"),
        "breakdown_alpha": float(np.min(np.abs(broke.index.to_numpy(dtype=float)))) if len(broke) else float("nan"),
        "breakdown_alpha_random": float(np.min(np.abs(broke_r.index.get_level_values(1).to_numpy(dtype=float))))
        if len(broke_r) else float("nan"),
        "broken_at_max": float(bad_steer[[a for a in bad_steer.index if abs(a) == amax]].max()),
    }


def _check_config(c: Mapping[str, Any]) -> None:
    """Values, ranges and simulator stability of a merged config (ConfigError naming the key)."""
    systems = list(c["systems"])
    unknown = [s for s in systems if s not in SYSTEMS]
    if not systems or unknown or len(set(systems)) != len(systems):
        raise ConfigError(f"physics: config 'systems' must be distinct names from {list(SYSTEMS)}, got {systems!r}")
    for key, lo in (("n_per_regime", 2), ("grid", 8), ("n_frames", 3), ("context_frames", 1), ("patch_size", 1),
                    ("hidden", 4), ("n_layers", 1), ("n_heads", 1), ("train_steps", 1), ("train_batch_size", 1),
                    ("rollout_steps", 1), ("n_rollouts", 1), ("score_frames", 1), ("rollout_start", 0), ("torch_threads", 0)):
        if not isinstance(c[key], (int, np.integer)) or c[key] < lo:
            raise ConfigError(f"physics: config {key!r} must be an integer >= {lo}, got {c[key]!r}")
    if c["grid"] % c["patch_size"]:
        raise ConfigError(f"physics: config 'patch_size' ({c['patch_size']}) must divide 'grid' ({c['grid']})")
    if c["hidden"] % c["n_heads"]:
        raise ConfigError(f"physics: config 'hidden' ({c['hidden']}) must be a multiple of 'n_heads' ({c['n_heads']})")
    if not 0.0 < float(c["test_fraction"]) < 1.0:
        raise ConfigError(f"physics: config 'test_fraction' must lie in (0, 1), got {c['test_fraction']!r}")
    if c["rollout_start"] + c["context_frames"] + c["rollout_steps"] > c["n_frames"]:
        raise ConfigError(
            f"physics: config 'rollout_steps' = {c['rollout_steps']} runs past the simulated frames: rollout_start "
            f"({c['rollout_start']}) + context_frames ({c['context_frames']}) + rollout_steps must be <= n_frames ({c['n_frames']})")
    if not (float(c["lr"]) > 0 and float(c["blowup"]) > 0):
        raise ConfigError("physics: config 'lr' and 'blowup' must be > 0")
    _floats(c, "transfer_alphas")
    float(c["strip_alpha"])
    _data.check_config(c)  # ranges and the simulators' stability limits (CFL, explicit diffusion)
