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
from .model import RolloutResult, rollout, rollout_copies
from .physicality import PHYSICALITY, physical_bands, physicality, within_bands

if TYPE_CHECKING:
    from .adapter import PhysicsAdapter

__all__ = ["KEY_DIAGNOSTIC", "RolloutScorer", "reference_bands"]

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
    frames. Every score is a per-rollout array (NaN where a rollout is not scored). :meth:`copies`
    does the same for ``n`` interventions at once, each rollout batch stacked ``n`` times (the
    :class:`Scorer`'s batched form; the numbers are those of one call per intervention).

    A scored rollout is also read by diagnostics the classifier never sees (:mod:`.physicality`:
    patch-boundary artefacts, boundedness, mass or divergence); it is *physical* when every scored
    frame lies in the bands of :func:`reference_bands` (the simulations, and with ``model`` the
    unsteered model's own rollouts, widened by config ``physical_margin``).

    Scores (``A``/``B`` are the system's regimes, e.g. vortex/laminar; ``X`` a start regime):
    ``p_<A>_from_<X>`` (classifier probability of A; NaN for broken rollouts),
    ``p_<A>_physical_from_<X>`` (the same where the rollout is physical, 0 where it is broken or
    not physical: P(changed regime and physical)), ``physical_from_<X>`` (1 / 0),
    ``<diag>_from_<X>`` for every diagnostic and physicality diagnostic, ``rollout_mse_from_<X>``
    against the simulation (finite rollouts), and over all rollouts ``diverged_fraction``,
    ``unphysical_fraction``, ``broken_fraction`` (either) and ``artefact_fraction`` (not broken,
    yet outside the physical bands).
    """

    def __init__(self, adapter: "PhysicsAdapter", system: str, model: nn.Module | None = None) -> None:
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
        self.bands = reference_bands(adapter, system, model, contexts=self.contexts)

    @property
    def scorer(self) -> Scorer:
        """The :class:`Scorer`: targets ``p_<A>_physical_from_<B>`` (the headline: changed regime *and*
        physical) and ``p_<A>_from_<B>`` (changed regime by the classifier alone); off-target
        ``p_<A>_from_<A>``; damage the diverged/unphysical/artefact fractions and rollout errors. The key
        diagnostic (:data:`KEY_DIAGNOSTIC`) and the physicality diagnostics are recorded beside them."""
        a, b = self.regime_a, self.regime_b
        return Scorer(self, target=[f"p_{a}_physical_from_{b}", f"p_{a}_from_{b}"], off_target=[f"p_{a}_from_{a}"],
                      damage=["diverged_fraction", "unphysical_fraction", "artefact_fraction", f"rollout_mse_from_{b}",
                              f"rollout_mse_from_{a}"],
                      broken="broken_fraction", batched=self.copies)

    def __call__(self, model: nn.Module) -> dict[str, np.ndarray]:
        return self.copies(model, 1)[0]

    def copies(self, model: nn.Module, n: int) -> list[dict[str, np.ndarray]]:
        """The scores of ``n`` stacked copies of every rollout batch (the :class:`Scorer`'s batched form).

        Under :func:`~sciscope.core.interventions.apply_copies` copy ``i`` of each forward runs
        under its own intervention (:func:`~.model.rollout_copies`); each copy's rollouts are then
        scored alone (its own bounds checks, diagnostics and classifier call), so its scores are
        those of ``self(model)`` under that intervention alone.
        """
        runs: dict[str, list[RolloutResult]] = {}
        for regime in (self.regime_b, self.regime_a):
            with self.adapter.threads():
                runs[regime] = rollout_copies(model, self.contexts[regime], self.n_steps, n,
                                              blowup=self.adapter.config["blowup"])
        return [self._score({regime: res[i] for regime, res in runs.items()}) for i in range(n)]

    def _score(self, runs: dict[str, RolloutResult]) -> dict[str, np.ndarray]:
        """The scores of one set of rollouts (one per start context of each regime)."""
        out: dict[str, np.ndarray] = {}
        diverged, unphysical, artefact = [], [], []
        for regime in (self.regime_b, self.regime_a):
            res = runs[regime]
            finite = ~res.diverged
            # a finite rollout that leaves the data's range by half its width is no physical state:
            # its regime is not read (the classifier would extrapolate), only counted
            fin = res.frames[finite].astype(np.float64)  # (k, n_steps, C, g, g), no NaN
            unphys = np.zeros_like(finite)
            if len(fin):
                rms = np.sqrt((fin**2).mean(axis=(2, 3, 4))).max(axis=1)  # largest frame rms per rollout
                unphys[finite] = ((fin.max(axis=(1, 2, 3, 4)) > self.bounds[1]) | (fin.min(axis=(1, 2, 3, 4)) < self.bounds[0])
                                  | (rms > 2.0 * self.rms_max))
            scored = finite & ~unphys
            diverged.append(res.diverged)
            unphysical.append(unphys)
            tag = f"from_{regime}"
            diag, p = self._diagnostics(res.frames[scored])
            p_a = _per_rollout(p, scored, self.score_frames)
            out[f"p_{self.regime_a}_{tag}"] = p_a
            for col in DIAGNOSTICS[self.system]:
                out[f"{col}_{tag}"] = _per_rollout(diag[col].to_numpy(dtype=np.float64), scored, self.score_frames)
            # the diagnostics the classifier did not see: a regime change counts only on a physical field
            inside = within_bands(diag, self.bands) if len(diag) else np.zeros(0, dtype=bool)
            ok = np.zeros(len(finite), dtype=bool)
            if scored.any():
                ok[scored] = inside.reshape(int(scored.sum()), self.score_frames).all(axis=1)
            for col in PHYSICALITY[self.system]:
                out[f"{col}_{tag}"] = _per_rollout(diag[col].to_numpy(dtype=np.float64), scored, self.score_frames)
            out[f"physical_{tag}"] = ok.astype(float)
            out[f"p_{self.regime_a}_physical_{tag}"] = np.where(ok, np.nan_to_num(p_a, nan=0.0), 0.0)
            artefact.append(scored & ~ok)
            mse = np.full(len(finite), np.nan)
            if finite.any():
                mse[finite] = ((res.frames[finite] - self.truth[regime][finite]) ** 2).mean(axis=(1, 2, 3, 4))
            out[f"rollout_mse_{tag}"] = mse
        div, unp = np.concatenate(diverged), np.concatenate(unphysical)
        out["diverged_fraction"], out["unphysical_fraction"] = div.astype(float), unp.astype(float)
        out["broken_fraction"] = (div | unp).astype(float)
        out["artefact_fraction"] = np.concatenate(artefact).astype(float)
        return out

    def _diagnostics(self, frames: np.ndarray) -> tuple[pd.DataFrame, np.ndarray]:
        """Diagnostics and physicality diagnostics (raw units) and classifier probabilities of the last
        ``score_frames`` frames, one row per frame (the classifier reads only its own columns)."""
        if not len(frames):
            return pd.DataFrame(columns=[*DIAGNOSTICS[self.system], *PHYSICALITY[self.system]]), np.array([])
        raw = self.adapter.trajectories.denormalise(self.system, frames[:, -self.score_frames:])
        diag = diagnose(self.system, raw, k_forcing=int(self.adapter.config["flow_k_forcing"]))
        phys = physicality(self.system, raw, patch_size=int(self.adapter.config["patch_size"]))
        return pd.concat([diag, phys], axis=1), self.classifier.predict_proba(diag)


def reference_bands(adapter: "PhysicsAdapter", system: str, model: nn.Module | None = None, *,
                    contexts: dict[str, np.ndarray] | None = None) -> pd.DataFrame:
    """The physical band of each :data:`~.physicality.PHYSICALITY` diagnostic of ``system`` (cached per adapter).

    References: the train trajectories' simulated frames from ``rollout_start + context_frames`` on
    (the times a rollout's frames stand for) and, when ``model`` is given, the last ``score_frames``
    frames of its *unsteered* rollouts from ``contexts`` (finite ones): an artefact the model
    already makes unsteered is not blamed on the steering. Each band is widened by config
    ``physical_margin`` x its width (:func:`~.physicality.physical_bands`).
    """
    cache = adapter.__dict__.setdefault("_physical_bands", {})
    key = (system, id(model) if model is not None else None)
    if key in cache:
        return cache[key]
    c, ts = adapter.config, adapter.trajectories
    first = min(c["rollout_start"] + c["context_frames"], ts.frames.shape[1] - 1)
    sim = ts.frames[ts.ids(split="train", system=system), first:]
    refs = {"simulation": physicality(system, sim, patch_size=int(c["patch_size"]))}
    if model is not None and contexts:
        was_training = model.training
        model.eval()
        try:
            with adapter.threads():
                runs = [rollout(model, ctx, c["rollout_steps"], blowup=c["blowup"]) for ctx in contexts.values()]
        finally:
            model.train(was_training)
        k = min(c["score_frames"], c["rollout_steps"])
        frames = np.concatenate([r.frames[~r.diverged, -k:] for r in runs])
        if len(frames):
            refs["unsteered_model"] = physicality(system, adapter.trajectories.denormalise(system, frames),
                                                  patch_size=int(c["patch_size"]))
    cache[key] = physical_bands(refs, margin=float(c["physical_margin"]))
    return cache[key]


def _per_rollout(values: np.ndarray, scored: np.ndarray, frames: int) -> np.ndarray:
    """Mean over each scored rollout's frames, NaN for rollouts not scored; ``(n_rollouts,)``."""
    out = np.full(len(scored), np.nan)
    if scored.any():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a rollout whose frames are all NaN stays NaN
            out[scored] = np.nanmean(np.asarray(values, dtype=np.float64).reshape(int(scored.sum()), frames), axis=1)
    return out

