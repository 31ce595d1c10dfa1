"""The physics data set: simulated trajectories of every system and regime, their windows and norms."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sciscope.core.errors import ConfigError

from .diagnostics import DIAGNOSTICS, SHARED_DIAGNOSTICS, diagnose
from .simulate import FlowSpec, GrayScottSpec, check_flow, check_gray_scott, simulate_flow, simulate_gray_scott

__all__ = ["REGIMES", "PARAMETERS", "TrajectorySet", "simulate_trajectories"]

#: (regime A, regime B) per system: contrasts point from B to A.
REGIMES: dict[str, tuple[str, str]] = {"gray_scott": ("stripes", "spots"), "flow": ("vortex", "laminar")}
#: Physical parameters per system (columns of the trajectory table; NaN for the other system).
PARAMETERS: dict[str, tuple[str, ...]] = {"gray_scott": ("feed", "kill"), "flow": ("viscosity", "forcing", "reynolds")}
#: Every diagnostic column (each system's own, NaN for the other system, then the shared ones).
_DIAGNOSTIC_COLUMNS = [*dict.fromkeys(c for cols in DIAGNOSTICS.values() for c in cols), *SHARED_DIAGNOSTICS]


def _range(config: Mapping[str, Any], key: str, low: float = -np.inf, high: float = np.inf) -> tuple[float, float]:
    """A ``[lo, hi]`` config range as finite floats with ``low < lo <= hi <= high``; a ConfigError naming the key otherwise."""
    value = config[key]
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"physics: config {key!r} must be two numbers [low, high], got {value!r}") from None
    if not (np.isfinite(lo) and np.isfinite(hi) and lo <= hi):
        raise ConfigError(f"physics: config {key!r} must be a finite range with low <= high, got {value!r}")
    if not (low < lo and hi <= high):
        bounds = f"> {low:g}" if high == np.inf else f"in ({low:g}, {high:g}]"
        raise ConfigError(f"physics: config {key!r} must lie {bounds}, got {value!r}")
    return lo, hi


def system_spec(system: str, config: Mapping[str, Any]) -> Any:
    """The simulator numerics of a config: ``grid``, ``n_frames`` and the ``gs_*`` (or ``flow_*``) keys of its spec."""
    cls, prefix = (GrayScottSpec, "gs_") if system == "gray_scott" else (FlowSpec, "flow_")
    kw = {}
    for f in fields(cls):
        key = {"n": "grid", "n_frames": "n_frames"}.get(f.name, prefix + f.name)
        try:
            kw[f.name] = type(f.default)(config[key])
        except (TypeError, ValueError, OverflowError):  # e.g. int(nan), int("x")
            raise ConfigError(f"physics: config {key!r} must be a number ({type(f.default).__name__}), "
                              f"got {config[key]!r}") from None
    return cls(**kw)


def _parameters(config: Mapping[str, Any], system: str, regime: str, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Seeded uniform draws of a regime's parameters (and the derived ones)."""
    if system == "gray_scott":
        f = rng.uniform(*_range(config, f"gs_feed_{regime}"), n)
        k = rng.uniform(*_range(config, f"gs_kill_{regime}"), n)
        return {"feed": f, "kill": k}
    nu = np.exp(rng.uniform(*np.log(_range(config, f"flow_viscosity_{regime}")), n))  # log-uniform
    u = rng.uniform(*_range(config, "flow_velocity"), n)
    kf, mu = int(config["flow_k_forcing"]), float(config["flow_drag"])
    forcing = u * (nu * kf**2 + mu)  # the forcing that gives laminar amplitude u
    return {"viscosity": nu, "forcing": forcing, "reynolds": u / (nu * kf)}


def check_config(config: Mapping[str, Any]) -> None:
    """Every stability check of the simulators on the extreme corners of the parameter ranges.

    Runs before any simulation, so a bad ``gs_dt`` or ``flow_dt`` fails at once, naming the key.
    Each range is checked here first, so that its message names its own key; every comparison
    is written so that NaN fails it.
    """
    systems = list(config["systems"])
    if "gray_scott" in systems:
        spec = system_spec("gray_scott", config)
        for regime in REGIMES["gray_scott"]:
            f = _range(config, f"gs_feed_{regime}", low=0.0, high=0.2)
            k = _range(config, f"gs_kill_{regime}", low=0.0, high=0.2)
            check_gray_scott(spec, np.array([f[0], f[1], f[0], f[1]]), np.array([k[0], k[0], k[1], k[1]]))
    if "flow" in systems:
        spec = system_spec("flow", config)
        u = _range(config, "flow_velocity")
        for regime in REGIMES["flow"]:
            nus = np.array(_range(config, f"flow_viscosity_{regime}", low=0.0))
            nu, uu = np.meshgrid(nus, np.array(u))
            forcing = uu * (nu * spec.k_forcing**2 + spec.drag)
            check_flow(spec, nu.ravel(), forcing.ravel())


@dataclass
class TrajectorySet:
    """Simulated trajectories of every system and regime.

    Attributes
    ----------
    frames : ndarray
        ``(N, T, 2, n, n)`` float32 raw fields (Gray–Scott ``u, v``; flow velocity ``u_x, u_y``).
    table : DataFrame
        One row per trajectory: ``trajectory``, ``system``, ``regime``, ``split``, the parameters.
    norms : dict
        ``{system: {"mean": [c0, c1], "std": [c0, c1], "change_ms": float}}`` from the train split:
        fields are standardised per system and channel; ``change_ms`` is the mean squared
        frame-to-frame change in those units (the training loss divides by it).
    """

    frames: np.ndarray
    table: pd.DataFrame
    norms: dict[str, dict[str, Any]]

    def ids(self, **match: str) -> np.ndarray:
        """Trajectory ids whose table columns equal ``match`` (e.g. ``split="test", system="flow"``), in id order."""
        keep = np.ones(len(self.table), dtype=bool)
        for column, value in match.items():
            keep &= (self.table[column] == value).to_numpy()
        return self.table.loc[keep, "trajectory"].to_numpy()

    def denormalise(self, system: str, frames: np.ndarray) -> np.ndarray:
        """Standardised fields ``(..., 2, n, n)`` of ``system`` back to raw units."""
        m = np.asarray(self.norms[system]["mean"], dtype=np.float64)[:, None, None]
        s = np.asarray(self.norms[system]["std"], dtype=np.float64)[:, None, None]
        return np.asarray(frames, dtype=np.float64) * s + m

    def normalised_frames(self) -> np.ndarray:
        """Every trajectory in model units (standardised per system and channel), ``(N, T, 2, n, n)`` float32."""
        out = np.empty_like(self.frames)
        for system, rows in self.table.groupby("system").groups.items():
            idx = np.asarray(rows)
            m = np.asarray(self.norms[str(system)]["mean"], dtype=np.float32)[:, None, None]
            s = np.asarray(self.norms[str(system)]["std"], dtype=np.float32)[:, None, None]
            out[idx] = ((self.frames[idx].astype(np.float32) - m) / s).astype(np.float32)
        return out

    # -- windows ------------------------------------------------------------------------------------
    def windows(self, context: int) -> pd.DataFrame:
        """One row per model example ``(trajectory, t)``: context ``t-context+1..t``, target ``t+1``.

        Columns: the trajectory's row (system, regime, split, parameters), ``t`` and the
        diagnostics of frame ``t`` (the system's own, NaN for the other system, plus the shared
        spectral ones).
        """
        n_traj, n_frames = self.frames.shape[:2]
        if n_frames < context + 1:
            raise ConfigError(f"physics: 'n_frames' = {n_frames} leaves no window for 'context_frames' = {context} "
                              f"(needs at least context_frames + 1 frames)")
        ts = np.arange(context - 1, n_frames - 1)
        rows = self.table.loc[self.table.index.repeat(len(ts))].reset_index(drop=True)
        rows.insert(3, "t", np.tile(ts, n_traj))
        return rows.merge(self.frame_diagnostics(), on=["trajectory", "t"], how="left")

    def frame_diagnostics(self) -> pd.DataFrame:
        """Diagnostics of every frame: ``trajectory``, ``t`` and every diagnostic column (cached)."""
        if getattr(self, "_diag", None) is None:
            parts = []
            for system, rows in self.table.groupby("system").groups.items():
                idx = np.asarray(rows)
                d = diagnose(str(system), self.frames[idx], k_forcing=int(self.table.attrs.get("k_forcing", 4)))
                d.insert(0, "t", np.tile(np.arange(self.frames.shape[1]), len(idx)))
                d.insert(0, "trajectory", np.repeat(self.table.loc[idx, "trajectory"].to_numpy(), self.frames.shape[1]))
                parts.append(d)
            diag = pd.concat(parts, ignore_index=True).reindex(columns=["trajectory", "t", *_DIAGNOSTIC_COLUMNS])
            self._diag = diag.sort_values(["trajectory", "t"]).reset_index(drop=True)
        return self._diag

    # -- persistence ----------------------------------------------------------------------------------
    def save(self, folder: str | Path) -> None:
        """Write ``trajectories.npz`` (frames), ``trajectories.parquet`` and ``trajectories.json`` atomically."""
        from sciscope.core.io import atomic_path, write_json, write_table

        folder = Path(folder)
        with atomic_path(folder / "trajectories.npz") as tmp, open(tmp, "wb") as fh:
            np.savez(fh, frames=self.frames)
        write_table(folder / "trajectories.parquet", self.table)
        write_json(folder / "trajectories.json", {"norms": self.norms, "attrs": self.table.attrs})

    @classmethod
    def load(cls, folder: str | Path) -> "TrajectorySet":
        """Reload a set written by :meth:`save`."""
        folder = Path(folder)
        info = json.loads((folder / "trajectories.json").read_text())
        with np.load(folder / "trajectories.npz", allow_pickle=False) as z:
            frames = z["frames"]
        table = pd.read_parquet(folder / "trajectories.parquet")
        table.attrs.update(info.get("attrs", {}))
        return cls(frames, table, info["norms"])


def simulate_trajectories(config: Mapping[str, Any], *, progress: bool = False) -> TrajectorySet:
    """Simulate ``n_per_regime`` trajectories for every (system, regime) of the config.

    Parameters are drawn per trajectory (seeded by ``seed``); every stability check runs first.
    Whole trajectories go to the test split (``test_fraction`` of each system and regime, at
    least one), so no test frame was seen in training.
    """
    check_config(config)
    seed = int(config["seed"])
    n = int(config["n_per_regime"])
    if n < 2:
        raise ConfigError(f"physics: config 'n_per_regime' must be >= 2 (one train and one test trajectory), got {n}")
    rows, frames = [], []
    for s_idx, system in enumerate(config["systems"]):
        params = {r: _parameters(config, system, r, n, np.random.default_rng([seed, s_idx, i]))
                  for i, r in enumerate(REGIMES[system])}
        merged = {k: np.concatenate([params[r][k] for r in REGIMES[system]]) for k in params[REGIMES[system][0]]}
        regimes = np.repeat(REGIMES[system], n)
        simulate, args = ((simulate_gray_scott, ("feed", "kill")) if system == "gray_scott"
                          else (simulate_flow, ("viscosity", "forcing")))
        frames.append(simulate(*[merged[a] for a in args], spec=system_spec(system, config), seed=seed + 11 * s_idx,
                               progress=progress))
        table = pd.DataFrame({"system": system, "regime": regimes, **merged})
        # stratified split of whole trajectories
        split = np.full(len(table), "train", dtype=object)
        n_test = max(1, int(round(float(config["test_fraction"]) * n)))
        rng = np.random.default_rng([seed, s_idx, 0x5E])
        for r in REGIMES[system]:
            idx = np.flatnonzero(regimes == r)
            split[rng.choice(idx, n_test, replace=False)] = "test"
        table["split"] = split
        rows.append(table)
    table = pd.concat(rows, ignore_index=True)
    table.insert(0, "trajectory", np.arange(len(table)))
    table = table.reindex(columns=["trajectory", "system", "regime", "split", *[c for cs in PARAMETERS.values() for c in cs]])
    table.attrs["k_forcing"] = int(config["flow_k_forcing"])
    frames_all = np.concatenate(frames).astype(np.float32)
    norms = _norms(frames_all, table)
    return TrajectorySet(frames_all, table, norms)


def _norms(frames: np.ndarray, table: pd.DataFrame) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for system, rows in table[table["split"] == "train"].groupby("system").groups.items():
        x = frames[np.asarray(rows)].astype(np.float64)  # (n, T, C, H, W)
        mean = x.mean(axis=(0, 1, 3, 4))
        std = x.std(axis=(0, 1, 3, 4)) + 1e-8
        z = (x - mean[:, None, None]) / std[:, None, None]
        change_ms = float((np.diff(z, axis=1) ** 2).mean())
        out[str(system)] = {"mean": mean.tolist(), "std": std.tolist(), "change_ms": change_ms}
    return out
