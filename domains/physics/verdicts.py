"""Steering claims read against their strongest confound: random directions of the same norm.

After the steering stage, for every plan the physics adapter declared:

* ``P(<A> and physical)`` and ``P(<A>)`` (the regime classifier alone) from ``<B>`` starts at the
  alpha of the rollout strips, each beside alpha = 0 (control) and the random directions at the same
  alpha (baseline), with a verdict (margin: 2 standard errors of the difference over rollouts);
* the slope of every target and off-target score beside the random directions' slopes (baseline:
  their mean |slope|; margin: 2 standard deviations of the controls' |slopes|, since one vector is
  one draw, not a mean). A target's slope is signed (pushing the wrong way is below baseline); an
  off-target's is |slope| with lower better. This reading goes to ``slope_verdicts.csv`` only: the
  core's slope headline rows already carry the controls' largest |slope| and a verdict.

Tables ``steering/steering_verdicts.csv``, ``steering/slope_verdicts.csv`` and ``steering/physical_bands.csv``
(the band of every physicality diagnostic and its sources); per recipe plan a figure
``steering/recipe_<system>/changed_vs_physical.png``: the curves beside the rollout strips.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from sciscope.core.verdict import verdict

from .data import REGIMES
from .steering import RolloutScorer

if TYPE_CHECKING:
    from sciscope.core.experiment import PlanSweep

    from .adapter import PhysicsAdapter

__all__ = ["alpha_near", "changed_rows", "control_slopes", "slope_rows", "steering_verdicts"]

Rows = list[dict[str, Any]]


def alpha_near(sweep: "PlanSweep", alpha: float) -> float:
    """The swept nonzero alpha nearest to ``alpha`` (ties: the smaller)."""
    alphas = sorted(a for a in sweep.params["alphas"] if a != 0.0)
    if not alphas:
        raise ValueError(f"steering plan {sweep.params.get('name')!r} swept no nonzero alpha")
    return float(min(alphas, key=lambda a: (abs(a - alpha), a)))


def _values(sweep: "PlanSweep", score: str, alpha: float, controls: list[str]) -> np.ndarray:
    """Per-rollout values of ``score`` at ``alpha`` pooled over ``controls`` (NaN dropped)."""
    parts = [np.asarray(sweep.samples.get((c, alpha, score), []), dtype=np.float64) for c in controls]
    v = np.concatenate(parts) if parts else np.array([])
    return v[np.isfinite(v)]


def _se(v: np.ndarray) -> float:
    return float(v.std(ddof=1) / math.sqrt(v.size)) if v.size > 1 else 0.0


def share_at(sweep: "PlanSweep", score: str, alpha: float) -> dict[str, Any]:
    """``score`` at ``alpha`` for the vector, at alpha = 0, and pooled over the random directions, with a verdict.

    The margin is twice the standard error of the difference of the two means over rollouts.
    """
    steer, rand = _values(sweep, score, alpha, ["steer"]), _values(sweep, score, alpha, sweep.controls)
    s_mean = float(steer.mean()) if steer.size else math.nan
    r_mean = float(rand.mean()) if rand.size else math.nan
    tol = 2.0 * math.sqrt(_se(steer) ** 2 + _se(rand) ** 2)
    return {"value": s_mean, "zero": float(sweep.curve(score).get(0.0, np.nan)), "random": r_mean,
            "n_steer": int(steer.size), "n_random": int(rand.size), "margin": tol,
            "verdict": verdict(s_mean, r_mean, tolerance=tol) if sweep.controls else None}


def changed_rows(sweep: "PlanSweep", system: str, alpha: float, source: str) -> Rows:
    """Headline rows ``P(<A> and physical)`` and ``P(<A>)`` from ``<B>`` starts at the swept alpha nearest ``alpha``."""
    a, b = REGIMES[system]
    name, at = sweep.params["name"], alpha_near(sweep, alpha)
    minus = alpha_near(sweep, -alpha)
    k = len(sweep.controls)
    both, clf = share_at(sweep, f"p_{a}_physical_from_{b}", at), share_at(sweep, f"p_{a}_from_{b}", at)
    both_m, clf_m = share_at(sweep, f"p_{a}_physical_from_{b}", minus), share_at(sweep, f"p_{a}_from_{b}", minus)
    phys = share_at(sweep, f"physical_from_{b}", at)
    rows = []
    for label, got, other in ((f"P({a} and physical)", both, (both_m, clf)), (f"P({a}) by the regime classifier alone", clf, (clf_m, both))):
        rows.append({
            "stage": "steering", "name": f"{name}: {label} from {b} at alpha {at:g}", "value": got["value"],
            "control": got["zero"], "control_label": "alpha = 0 (unsteered rollouts)",
            "baseline": got["random"], "baseline_label": f"{k} random directions of equal norm at alpha {at:g} (pooled rollouts)",
            "verdict": got["verdict"],
            "note": f"{got['n_steer']} rollouts from {b} (random: {got['n_random']}); margin {got['margin']:.3g} (2 standard "
                    f"errors over rollouts); at alpha {minus:g}: {other[0]['value']:.3g} (random {other[0]['random']:.3g}); "
                    f"{'classifier alone' if label.startswith(f'P({a} and') else 'changed and physical'}: {other[1]['value']:.3g}; "
                    f"share physical (patch artefacts, boundedness, {'mass' if system == 'gray_scott' else 'divergence'} in the "
                    f"simulated and unsteered range): {phys['value']:.3g} (random {phys['random']:.3g}, alpha 0 {phys['zero']:.3g})",
            "source": source})
    return rows


def control_slopes(sweep: "PlanSweep", score: str) -> tuple[float, np.ndarray]:
    """The vector's slope of ``score`` over its safe alphas and each random direction's over the same alphas.

    Safe alphas are those where the steered model had no broken run and the score is finite (as in
    :meth:`PlanSweep.summary`).
    """
    steer, broken = sweep.curve(score), sweep.broken()
    safe = [a for a in steer.index if broken.get(a, 0.0) == 0 and np.isfinite(steer[a])]

    def slope(curve: pd.Series) -> float:
        c = curve.reindex(safe)
        c = c[np.isfinite(c.to_numpy(dtype=np.float64))]
        return float(np.polyfit(c.index.to_numpy(dtype=float), c.to_numpy(dtype=float), 1)[0]) if len(c) > 1 else math.nan

    return slope(steer), np.array([slope(sweep.curve(score, c)) for c in sweep.controls], dtype=np.float64)


def slope_rows(sweep: "PlanSweep", source: str) -> tuple[Rows, pd.DataFrame]:
    """One row per target / off-target score: the slope against the random directions' |slopes|, with a verdict."""
    name, rows, table = sweep.params["name"], [], []
    for score, role in sweep.roles.items():
        if role not in ("target", "off_target"):
            continue
        slope, ctrl = control_slopes(sweep, score)
        fin = np.abs(ctrl[np.isfinite(ctrl)])
        base = float(fin.mean()) if fin.size else math.nan
        tol = 2.0 * float(fin.std(ddof=1)) if fin.size > 1 else 0.0
        target = role == "target"
        value = slope if target else abs(slope)
        v = verdict(value, base, higher_is_better=target, tolerance=tol)
        p = float((1 + np.sum(fin >= abs(slope))) / (1 + fin.size)) if fin.size and np.isfinite(slope) else math.nan
        table.append({"plan": name, "score": score, "role": role, "slope": slope, "control_mean_abs_slope": base,
                      "control_sd_abs_slope": tol / 2, "n_controls": int(fin.size), "p": p, "verdict": v})
        rows.append({"stage": "steering", "name": f"{name}: slope of {score} against random directions", "value": value,
                     "baseline": base, "baseline_label": f"mean |slope| of {fin.size} random directions of equal norm",
                     "higher_is_better": target, "verdict": v,
                     "note": (f"{'target: signed slope (the wrong sign is below baseline)' if target else 'off-target: |slope|, lower is better'}"
                              f"; margin {tol:.3g} (2 standard deviations of the random directions' |slopes|: one vector is one "
                              f"draw); share of random directions with |slope| at least as large: p = {p:.3g}"),
                     "source": source})
    return rows, pd.DataFrame(table)


def _figure(ad: "PhysicsAdapter", ctx: Any, sweep: "PlanSweep", system: str) -> None:
    """Curves of P(A), P(A and physical) and the physical share (vector solid, random mean dashed) beside the strips."""
    import matplotlib.pyplot as plt

    from sciscope.core.plotting import save_figure

    a, b = REGIMES[system]
    strips = ctx.output(f"recipe_{system}/rollout_strips_from_{b}.png")
    fig = plt.figure(figsize=(17, 6.5))
    grid = fig.add_gridspec(1, 3, width_ratios=[1, 1, 2.4])
    scores = [(f"p_{a}_from_{b}", f"P({a})", "C0"), (f"p_{a}_physical_from_{b}", f"P({a} and physical)", "C3"),
              (f"physical_from_{b}", "share physical", "C2")]
    for i, group in enumerate((scores[:2], scores[2:])):
        ax = fig.add_subplot(grid[0, i])
        for score, label, colour in group:
            steer = sweep.curve(score)
            rand = pd.concat([sweep.curve(score, c) for c in sweep.controls], axis=1).mean(axis=1) if sweep.controls else None
            ax.plot(steer.index, steer.values, "o-", color=colour, label=f"{label}, regime vector")
            if rand is not None:
                ax.plot(rand.index, rand.values, "--", color=colour, alpha=0.6, label=f"{label}, random (mean)")
        ax.axvline(0, color="0.85", lw=1, zorder=0)
        ax.set_xlabel("alpha"), ax.set_ylim(-0.05, 1.05)
        ax.set_title(f"{system}: rollouts from {b}", fontsize=9)
        ax.legend(frameon=False, fontsize=7)
    ax = fig.add_subplot(grid[0, 2])
    ax.axis("off")
    if strips.is_file():
        ax.imshow(plt.imread(strips))
    save_figure(fig, ctx.output(f"recipe_{system}/changed_vs_physical.png"), dpi=100)


def steering_verdicts(ad: "PhysicsAdapter", ctx: Any) -> Rows:
    """The verdict rows of every steering plan that ran in this process (see the module docstring)."""
    rows, slopes, shares = [], [], []
    alpha = float(ad.config["strip_alpha"])
    systems = list(ad.config["systems"])
    for key, sweep in list(ctx.live.items()):
        if not str(key).startswith("steering:"):
            continue
        name = sweep.params["name"]
        source = f"steering/{name}/sweep.csv"
        if name.startswith("recipe_") and name[len("recipe_"):] in systems:
            system = name[len("recipe_"):]
            rows += changed_rows(sweep, system, alpha, "steering/steering_verdicts.csv")
            a, b = REGIMES[system]
            for at in sorted(x for x in sweep.params["alphas"] if x != 0.0):
                got = {lbl: share_at(sweep, s, at) for lbl, s in (("p_changed", f"p_{a}_from_{b}"),
                                                                   ("p_changed_and_physical", f"p_{a}_physical_from_{b}"),
                                                                   ("physical", f"physical_from_{b}"))}
                shares.append({"plan": name, "alpha": at, **{f"{k}_{w}": v[w] for k, v in got.items()
                                                            for w in ("value", "zero", "random")},
                               "verdict_changed_and_physical": got["p_changed_and_physical"]["verdict"]})
            _figure(ad, ctx, sweep, system)
        slopes.append(slope_rows(sweep, source)[1])  # the core's slope rows carry the controls' largest |slope|
    if shares:
        ctx.write_table("steering_verdicts.csv", pd.DataFrame(shares))
    if slopes:
        ctx.write_table("slope_verdicts.csv", pd.concat(slopes, ignore_index=True))
    scorers = [RolloutScorer(ad, s, ctx.model()) for s in systems]  # their bands are cached: no new rollouts
    ctx.write_table("physical_bands.csv", pd.concat([ev.bands.assign(system=ev.system) for ev in scorers], ignore_index=True))
    return rows
