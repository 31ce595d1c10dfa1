"""The robotics claims read against the baseline that could explain them, each with a verdict.

Three claims of the Haon et al. (2025) setting, each beside the strongest simple explanation:

- **the lens** ("last-layer neurons mostly write action tokens"): against a *vocabulary-matched
  null*, the share expected if each neuron's top-``k`` tokens were ``k`` distinct tokens drawn
  uniformly from the vocabulary (:func:`vocabulary_null`; with 2 x 256 action bins and 22 words,
  96% of the vocabulary is action tokens, so "mostly action tokens" is what chance gives), and
  against the same lens on untrained weights; the stronger of the two is the baseline
  (:func:`lens_claim`);
- **speed clusters** ("clamping the fast neurons makes the robot faster"): against *prompting*,
  adding "quickly" ("slowly") to the instruction, at matched success (:func:`speed_vs_prompt`);
- **direction clusters** ("the left neurons move the robot left"): scored on displacement in the
  direction the cluster names, against the strongest of its random-neuron clamp controls
  (:func:`direction_vs_controls`).

Everything here is numpy on numbers the stages computed, so each verdict can be checked on a
constructed case (``tests/domains/test_robotics.py``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from sciscope.core.verdict import BELOW, verdict

from .lens import CATEGORIES, ClusterRule

__all__ = ["DIRECTED", "ROLLOUT_SCORES", "direction_vs_controls", "rollout_scores", "lens_claim", "speed_vs_prompt", "vocabulary_null"]

#: The rollout scores of every steering plan (per-episode arrays); the four directed ones are
#: displacement in the direction each direction cluster names (``leftward = -dx``, ...).
ROLLOUT_SCORES: tuple[str, ...] = ("displacement", "dx", "dy", "success_rate", "alignment", "rightward", "leftward",
                                   "upward", "downward")
#: The directed scores: (source score, sign), and the other axis (a direction cluster's off-target score).
DIRECTED: dict[str, tuple[str, float, str]] = {"rightward": ("dx", 1.0, "dy"), "leftward": ("dx", -1.0, "dy"),
                                               "upward": ("dy", 1.0, "dx"), "downward": ("dy", -1.0, "dx")}
#: Draws per chunk of the null's Monte Carlo (a (chunk, vocabulary) random matrix each).
_CHUNK = 1000


def rollout_scores(episodes: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The :data:`ROLLOUT_SCORES` of per-episode rollout metrics, the directed ones derived from ``dx``/``dy``."""
    out = {k: episodes[k] for k in ROLLOUT_SCORES if k in episodes}
    for name, (src, sign, _) in DIRECTED.items():
        out[name] = sign * np.asarray(episodes[src], dtype=np.float64)
    return out


def vocabulary_null(token_info: pd.DataFrame, rule: ClusterRule, *, n_draws: int = 4000, seed: int = 0) -> dict[str, float]:
    """The lens statistics of a neuron whose top-``k`` tokens are drawn at the vocabulary's base rates.

    Each draw takes ``k`` distinct tokens uniformly from the vocabulary (seeded Monte Carlo) and
    applies the same rule as :func:`.lens.neuron_categories` / :func:`.lens.layer_summary`.

    Parameters
    ----------
    token_info
        The vocabulary (:meth:`.model.VLAVocab.token_info`): ``token_id``, ``kind``, ``dim``, ``value``.
    rule
        The cluster rule (its ``k``, thresholds, ``min_share`` and ``direction_share``).
    n_draws
        Simulated neurons.
    seed
        Seeds the draws.

    Returns
    -------
    dict
        ``share_neurons_mostly_action`` and ``share_neurons_coherent`` (expected shares of
        neurons), their Monte Carlo standard errors (``*_se``), ``vocabulary_action_share`` and
        ``n_draws``.
    """
    if n_draws < 1:
        raise ValueError(f"n_draws must be >= 1, got {n_draws}")
    cats = rule.token_categories(token_info)
    V = len(cats)
    k = min(int(rule.k), V)
    act = cats["action"].to_numpy(dtype=bool)
    member = cats[list(CATEGORIES)].to_numpy(dtype=bool)  # (V, C)
    names = sorted(d for d in set(cats["direction"].astype(str)) if d)  # sorted: ties go to the first, as the lens does
    code = np.array([names.index(d) if d else -1 for d in cats["direction"].astype(str)])
    onehot = np.zeros((V, max(len(names), 1)), dtype=np.int64)
    onehot[code >= 0, code[code >= 0]] = 1
    rng = np.random.default_rng([int(seed), 0x1E45])
    mostly, coherent = [], []
    for start in range(0, n_draws, _CHUNK):
        n = min(_CHUNK, n_draws - start)
        idx = np.argsort(rng.random((n, V)), axis=1)[:, :k]  # (n, k) distinct token rows
        share_action = act[idx].sum(1) / k
        shares = member[idx].sum(1) / k  # (n, C)
        dcount = onehot[idx].sum(1)  # (n, D)
        frame = pd.DataFrame({f"share_{c}": shares[:, j] for j, c in enumerate(CATEGORIES)})
        frame["share_direction"] = dcount.max(1) / k
        frame["direction"] = np.where(dcount.max(1) > 0, np.asarray(names or [""])[dcount.argmax(1)], "")
        mostly.append(share_action >= rule.min_share)
        coherent.append(np.any([rule.eligible(frame, c) for c in CATEGORIES], axis=0))
    m, c = np.concatenate(mostly), np.concatenate(coherent)
    return {"share_neurons_mostly_action": float(m.mean()), "share_neurons_mostly_action_se": float(m.std() / math.sqrt(m.size)),
            "share_neurons_coherent": float(c.mean()), "share_neurons_coherent_se": float(c.std() / math.sqrt(c.size)),
            "vocabulary_action_share": float(act.mean()), "n_draws": int(n_draws)}


def lens_claim(value: float, n_neurons: int, *, null: float | None, untrained: float | None,
               null_se: float = 0.0) -> dict[str, Any]:
    """A lens share (of ``n_neurons`` neurons) against the stronger of the vocabulary null and the untrained lens.

    The margin is two binomial standard errors of the observed share at the baseline's rate,
    ``2 sqrt(b (1 - b) / n_neurons)``, plus two of the null's Monte Carlo error.

    Returns
    -------
    dict
        Headline fields ``baseline``, ``baseline_label``, ``verdict`` and a ``note`` tail.
    """
    cands = [(float(b), label) for b, label in ((null, "top-k tokens drawn at the vocabulary's base rates"),
                                                (untrained, "same lens on untrained weights"))
             if b is not None and np.isfinite(b)]
    if not cands:
        return {}
    base, label = max(cands, key=lambda t: t[0])
    tol = 2.0 * math.sqrt(max(base * (1.0 - base), 0.0) / max(int(n_neurons), 1)) + 2.0 * float(null_se)
    return {"baseline": base, "baseline_label": label, "verdict": verdict(value, base, tolerance=tol),
            "note": "; baselines " + ", ".join(f"{lab} {b:.3f}" for b, lab in cands)
                    + f"; verdict margin {tol:.3f} (2 binomial standard errors over {n_neurons} neurons)"}


def _nanmean(a: np.ndarray) -> float:
    a = np.asarray(a, dtype=np.float64)
    return float(np.nanmean(a)) if np.isfinite(a).any() else math.nan


def speed_vs_prompt(clamped: Mapping[float, tuple[np.ndarray, np.ndarray]], unclamped: np.ndarray,
                    prompted: tuple[np.ndarray, np.ndarray], *, faster: bool = True) -> dict[str, Any]:
    """Speed gained by clamping a speed cluster against speed gained by a prompt word, at matched success.

    All arrays are per episode, on the same scenes: per-step displacement, and success (0/1).

    Parameters
    ----------
    clamped
        ``{alpha: (displacement, success)}`` of the clamped policy (alpha > 0).
    unclamped
        Displacement of the unclamped policy with the neutral instruction (alpha = 0).
    prompted
        ``(displacement, success)`` of the unclamped policy with the prompt word in the instruction.
    faster
        True for "fast" vs "quickly" (gain = more displacement), False for "slow" vs "slowly"
        (gain = less displacement).

    Returns
    -------
    dict
        ``value`` (the clamp's gain at the matched alpha; None when no alpha keeps the prompt's
        success rate), ``baseline`` (the prompt's gain), ``verdict``, ``alpha``, ``success``,
        ``prompt_success``, ``tolerance`` (2 standard errors of the per-episode paired
        difference clamp - prompt) and ``matched`` (the alphas that keep the success rate).

    Notes
    -----
    Matched success: among the alphas whose success rate is at least the prompt's, the one with
    the largest gain (the clamp's best case). With none, the clamp cannot buy speed at the
    prompt's success rate, and the verdict is "below baseline".
    """
    sign = 1.0 if faster else -1.0
    zero = _nanmean(unclamped)
    p_disp, p_succ = (np.asarray(a, dtype=np.float64) for a in prompted)
    prompt_gain = sign * (_nanmean(p_disp) - zero)
    prompt_success = _nanmean(p_succ)
    gains = {float(a): sign * (_nanmean(d) - zero) for a, (d, _) in clamped.items() if float(a) > 0}
    success = {float(a): _nanmean(s) for a, (_, s) in clamped.items() if float(a) > 0}
    matched = sorted(a for a in gains if np.isfinite(gains[a]) and success[a] >= prompt_success - 1e-12)
    out: dict[str, Any] = {"baseline": prompt_gain, "prompt_success": prompt_success, "matched": matched,
                           "success_by_alpha": success, "gain_by_alpha": gains}
    if not matched:
        return {**out, "value": None, "alpha": None, "success": None, "tolerance": math.nan, "verdict": BELOW}
    best = max(matched, key=lambda a: (gains[a], -a))
    diff = sign * (np.asarray(clamped[best][0], dtype=np.float64) - p_disp)
    diff = diff[np.isfinite(diff)]
    tol = 2.0 * float(diff.std(ddof=1)) / math.sqrt(diff.size) if diff.size > 1 else 0.0
    return {**out, "value": gains[best], "alpha": best, "success": success[best], "tolerance": tol,
            "verdict": verdict(gains[best], prompt_gain, tolerance=tol)}


def direction_vs_controls(effect: float, effect_ci: Sequence[float], control_effects: Sequence[float]) -> dict[str, Any]:
    """A direction cluster's effect (displacement in the direction it names) against its random controls.

    The baseline is the strongest control: the largest effect, in the same direction, among the
    clamps of as many random neurons per layer. The margin is two standard errors of the
    cluster's effect, read from its 95% bootstrap interval (``(hi - lo) / 3.92``; 0 when unknown).

    Returns
    -------
    dict
        ``baseline``, ``verdict`` and ``tolerance`` (``{}`` without finite controls).
    """
    ctrl = np.asarray(control_effects, dtype=np.float64)
    ctrl = ctrl[np.isfinite(ctrl)]
    if not ctrl.size:
        return {}
    lo, hi = (float(x) for x in effect_ci) if len(effect_ci) == 2 else (math.nan, math.nan)
    tol = 2.0 * (hi - lo) / 3.92 if np.isfinite(lo) and np.isfinite(hi) else 0.0
    base = float(ctrl.max())
    return {"baseline": base, "verdict": verdict(effect, base, tolerance=tol), "tolerance": tol}
