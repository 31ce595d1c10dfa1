"""Steering rollouts with regime delta vectors (the Physics Steering recipe) as core steering plans.

The vector (:meth:`~.adapter.PhysicsAdapter.regime_vector`) is injected as ``h + alpha * v * |h| / |v|``
over every position; :class:`RolloutScorer` scores the steered rollouts by physical diagnostics and a
regime classifier fitted on them (never on the model).
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from torch import nn

from sciscope.core.experiment import Scorer

from .data import REGIMES
from .diagnostics import DIAGNOSTICS, diagnose
from .model import rollout

if TYPE_CHECKING:
    from .adapter import PhysicsAdapter

__all__ = ["KEY_DIAGNOSTIC", "RolloutScorer"]

#: Diagnostic each system's steering scores read besides the classifier: it separates the regimes
#: most (spots ~0.55 vs stripes ~0.15; laminar ~0.05 vs vortex ~0.65).
KEY_DIAGNOSTIC = {"gray_scott": "compactness", "flow": "x_variation"}


class RolloutScorer:
    """Rollouts of one system's test trajectories, scored per rollout by diagnostics and the classifier.

    Calling it with a model (under whatever intervention the caller applies) rolls out every
    start context (``n_rollouts`` test trajectories of each regime), flags rollouts that turn
    NaN/inf or blow up (*diverged*) and finite ones that leave the simulated data's range by half
    its width or whose rms exceeds twice the largest rms of any simulated frame (*unphysical*:
    e.g. a flow whose energy grew 4-fold), and scores the others over their last ``score_frames``
    frames. Every score is a per-rollout array (NaN where a rollout is not scored).

    Scores (``A``/``B`` are the system's regimes, e.g. vortex/laminar; ``X`` a start regime):
    ``p_<A>_from_<X>`` (classifier probability of A), ``<diag>_from_<X>`` for every diagnostic,
    ``rollout_mse_from_<X>`` against the simulation (finite rollouts), and over all rollouts
    ``diverged_fraction``, ``unphysical_fraction`` and ``broken_fraction`` (either).
    """

    def __init__(self, adapter: "PhysicsAdapter", system: str) -> None:
        c = adapter.config
        self.adapter, self.system = adapter, system
        self.regime_a, self.regime_b = REGIMES[system]
        ts, norm = adapter.trajectories, adapter.normalised_frames
        s0, T, n = c["rollout_start"], c["context_frames"], c["rollout_steps"]
        self.starts: dict[str, np.ndarray] = {}  # trajectory ids, context frames and simulated continuation per regime
        self.contexts: dict[str, np.ndarray] = {}
        self.truth: dict[str, np.ndarray] = {}
        for regime in (self.regime_b, self.regime_a):
            rows = ts.ids(split="test", system=system, regime=regime)[:c["n_rollouts"]]
            if rows.size == 0:
                rows = ts.ids(split="train", system=system, regime=regime)[:c["n_rollouts"]]
            self.starts[regime], self.contexts[regime] = rows, norm[rows, s0:s0 + T]
            self.truth[regime] = norm[rows, s0 + T: s0 + T + n]
        self.n_steps, self.score_frames = n, min(c["score_frames"], n)
        self.classifier = adapter.classifier(system)
        sim = norm[ts.table["system"].to_numpy() == system]  # (n, T, C, g, g) every simulated frame
        lo, hi = float(sim.min()), float(sim.max())
        self.bounds = (lo - 0.5 * (hi - lo), hi + 0.5 * (hi - lo))
        self.rms_max = float(np.sqrt((sim.astype(np.float64) ** 2).mean(axis=(2, 3, 4))).max())

    @property
    def scorer(self) -> Scorer:
        """The :class:`Scorer`: target ``p_<A>_from_<B>`` and the key diagnostic from B; off-target
        the same from A starts; damage the diverged/unphysical fractions and rollout errors."""
        a, b, key = self.regime_a, self.regime_b, KEY_DIAGNOSTIC[self.system]
        return Scorer(self, target=[f"p_{a}_from_{b}", f"{key}_from_{b}"], off_target=[f"p_{a}_from_{a}", f"{key}_from_{a}"],
                      damage=["diverged_fraction", "unphysical_fraction", f"rollout_mse_from_{b}", f"rollout_mse_from_{a}"],
                      broken="broken_fraction")

    def __call__(self, model: nn.Module) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        diverged, unphysical = [], []
        for regime in (self.regime_b, self.regime_a):
            with self.adapter.threads():
                res = rollout(model, self.contexts[regime], self.n_steps, blowup=self.adapter.config["blowup"])
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
            diverged.append(res.diverged)
            unphysical.append(unphys)
            tag = f"from_{regime}"
            diag, p = self._diagnostics(res.frames[physical])
            out[f"p_{self.regime_a}_{tag}"] = _per_rollout(p, physical, self.score_frames)
            for col in DIAGNOSTICS[self.system]:
                out[f"{col}_{tag}"] = _per_rollout(diag[col].to_numpy(dtype=np.float64), physical, self.score_frames)
            mse = np.full(len(finite), np.nan)
            if finite.any():
                mse[finite] = ((res.frames[finite] - self.truth[regime][finite]) ** 2).mean(axis=(1, 2, 3, 4))
            out[f"rollout_mse_{tag}"] = mse
        div, unp = np.concatenate(diverged), np.concatenate(unphysical)
        out["diverged_fraction"], out["unphysical_fraction"] = div.astype(float), unp.astype(float)
        out["broken_fraction"] = (div | unp).astype(float)
        return out

    def _diagnostics(self, frames: np.ndarray) -> tuple[pd.DataFrame, np.ndarray]:
        """Diagnostics (raw units) and classifier probabilities of the last ``score_frames`` frames, one row per frame."""
        if not len(frames):
            return pd.DataFrame(columns=list(DIAGNOSTICS[self.system])), np.array([])
        raw = self.adapter.trajectories.denormalise(self.system, frames[:, -self.score_frames:])
        diag = diagnose(self.system, raw, k_forcing=int(self.adapter.config["flow_k_forcing"]))
        return diag, self.classifier.predict_proba(diag)


def _per_rollout(values: np.ndarray, scored: np.ndarray, frames: int) -> np.ndarray:
    """Mean over each scored rollout's frames, NaN for rollouts not scored; ``(n_rollouts,)``."""
    out = np.full(len(scored), np.nan)
    if scored.any():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a rollout whose frames are all NaN stays NaN
            out[scored] = np.nanmean(np.asarray(values, dtype=np.float64).reshape(int(scored.sum()), frames), axis=1)
    return out

