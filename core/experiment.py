"""Experiments an adapter declares and the core runs: steering plans, analyses, extra probe sets.

An adapter never writes an experiment loop. It returns

* :class:`SteeringPlan` s from ``steering_plans(ctx)``: an :class:`~.interventions.Intervention`,
  a :class:`Scorer`, alphas, how many random controls, optional reference conditions;
  :func:`run_plan` runs alpha = 0 once, every alpha, every control, counts broken runs and
  returns a :class:`PlanSweep` whose :meth:`PlanSweep.summary` gives what the steering papers
  report (slope, effect at the largest safe alpha of each sign, monotonicity, sign symmetry,
  breakdown alpha), each beside the same quantity for the controls, with bootstrap intervals over
  examples when the scorer returns per-example values;
* :class:`Analysis` es from ``analyses()``: a name, the stage after which it runs, ``compute(ctx)``
  and ``headline(result) -> rows``; the stage runner runs, times and records each;
* :class:`ProbeSet` s from ``probe_sets(ctx)``: probe targets on a subset of rows (or on a model
  variant's activations) that the probe stage fits beside the default targets.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from torch import nn

from .interventions import Intervention, apply_copies
from .sites import Aliases
from .verdict import ABOVE, BELOW, NO_BETTER

if TYPE_CHECKING:
    from .context import RunContext

Rows = list[dict[str, Any]]


@dataclass
class Scorer:
    """Scores a model under an intervention: ``fn(model) -> {score: value}``.

    A value is a number or a 1-D array of per-example values (its NaN-ignoring mean is the score;
    the examples are then resampled for bootstrap intervals, so an array must hold the same
    examples in the same order under every alpha -- NaN marks one that could not be scored, e.g. an
    invalid molecule). The names say what each score is:

    Attributes
    ----------
    target
        Scores the intervention is meant to move (the first is the headline unless the plan says).
    off_target
        Scores it should leave alone (longitude when steering latitude; the source's markers).
    damage
        Scores that measure harm (validity, task success, broken rollouts).
    broken
        A score giving the fraction of broken runs in one evaluation (e.g. ``"broken_fraction"``).
        A NaN in any target score also counts as a broken run.
    decrease
        Target scores the intervention is meant to lower as alpha grows (every other target is
        meant to rise): a target moved the other way reads "below baseline" in the headline.
    batched
        Optional ``batched(model, n) -> [scores] * n``: the same scores for ``n`` interventions at
        once. It stacks ``n`` copies of every batch it feeds the model
        (:func:`~sciscope.core.interventions.tile_copies`, copy-major) and returns the scores of
        each copy, which must equal what ``fn`` returns under that copy's intervention alone
        (same examples, same seeds: anything sampled is drawn once and shared by the copies).
        :func:`run_plan` then evaluates a plan's alphas and controls in a few batched forwards.
    """

    fn: Callable[[nn.Module], Mapping[str, Any]]
    target: Sequence[str] = ()
    off_target: Sequence[str] = ()
    damage: Sequence[str] = ()
    broken: str | None = None
    decrease: Sequence[str] = ()
    batched: Callable[[nn.Module, int], Sequence[Mapping[str, Any]]] | None = None

    def __post_init__(self) -> None:
        stray = [s for s in self.decrease if s not in self.target]
        if stray:
            raise ValueError(f"Scorer: decrease names scores that are not targets: {stray} (targets: {list(self.target)})")

    def __call__(self, model: nn.Module) -> Mapping[str, Any]:
        return self.fn(model)


@dataclass
class SteeringPlan:
    """One steering experiment the steering stage runs.

    Attributes
    ----------
    name
        Folder name under ``steering/`` and prefix of its headline rows.
    intervention
        An :class:`Intervention`, or ``build(ctx) -> Intervention`` (e.g. a vector from the store).
    scorer
        A :class:`Scorer` or a plain ``fn(model) -> {score: value}`` (every score a target).
    alphas
        Strengths to sweep (alpha = 0, the unmodified model, is added and run once).
    n_controls
        Matched random controls (at least 10 by default: three cannot show that one vector beats
        chance).
    headline
        The score the headline rows report (default: the scorer's first target score).
    reference
        Conditions to compare against, ``{condition: {score: value}}`` or ``build(ctx)`` of it
        (real target cells, a prompt): "beats prompting" becomes a number.
    seed
        Seeds the controls and the bootstrap.
    """

    name: str
    intervention: Intervention | Callable[["RunContext"], Intervention]
    scorer: Scorer | Callable[[nn.Module], Mapping[str, Any]]
    alphas: Sequence[float]
    n_controls: int = 10
    headline: str | None = None
    reference: Mapping[str, Mapping[str, float]] | Callable[["RunContext"], Mapping[str, Mapping[str, float]]] | None = None
    seed: int = 0
    description: str = ""

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ValueError(f"steering plan name {self.name!r} must be a plain folder name")
        if self.n_controls < 0:
            raise ValueError(f"steering plan {self.name!r}: n_controls must be >= 0, got {self.n_controls}")
        self.alphas = [float(a) for a in self.alphas]
        if not isinstance(self.scorer, Scorer):
            self.scorer = Scorer(self.scorer)


@dataclass
class Analysis:
    """A declared analysis: runs after ``stage``; ``compute(ctx) -> result``; ``headline(result) -> rows``.

    ``headline`` None means ``compute`` returns the headline rows itself. Outputs go through the
    context (``ctx.write_table``, ``ctx.save_figure``), into the stage's folder.
    """

    name: str
    stage: str
    compute: Callable[["RunContext"], Any]
    headline: Callable[[Any], Rows] | None = None

    def run(self, ctx: "RunContext") -> tuple[Rows, float]:
        """Compute and turn into rows; returns ``(rows, seconds)``."""
        t0 = time.perf_counter()
        result = self.compute(ctx)
        rows = self.headline(result) if self.headline is not None else (result or [])
        return list(rows), time.perf_counter() - t0


def core_analyses() -> list[Analysis]:
    """The analyses the core runs for every adapter (each skips itself where the adapter supplies
    nothing it needs): fidelity of the SAE spliced into the model (:mod:`sciscope.core.fidelity`),
    then the SAE's quality table against PCA, raw units and random directions (:mod:`sciscope.core.sae.quality`),
    and, after the features stage, every maximum and count over the SAE's units beside the same over
    control units (:mod:`sciscope.core.unit_controls`). Where the model computes it: after the probes
    stage, causal tracing over every layer x component x position group (:mod:`sciscope.core.tracing`);
    after the sae stage, a transcoder of the SAE layer's MLP (:mod:`sciscope.core.sae.transcoder`) and
    the attribution of the tracing score to SAE and transcoder features (:mod:`sciscope.core.attribution`);
    after the steering stage, the subspace-illusion check of every added vector (:mod:`sciscope.core.subspace`)."""
    from .attribution import attribution_analysis
    from .fidelity import fidelity_analysis
    from .sae.quality import quality_analysis
    from .sae.transcoder import transcoder_analysis
    from .subspace import subspace_analysis
    from .tracing import tracing_analysis
    from .unit_controls import unit_controls_analysis

    return [tracing_analysis(), fidelity_analysis(), quality_analysis(), transcoder_analysis(), attribution_analysis(),
            unit_controls_analysis(), subspace_analysis()]


@dataclass
class ProbeSet:
    """Extra probes the probe stage fits: ``targets`` on the rows selected by ``query``.

    ``variant`` probes a model variant's activations (``ctx.store(variant)``) instead of the main
    model's; ``cv`` None takes the run's ``probe_cv`` (capped at the number of groups).
    """

    name: str
    targets: Sequence[str]
    query: str | None = None
    groups: str | None = None
    cv: int | None = None
    variant: str | None = None
    baseline: bool = False
    #: False when an analysis of the adapter reports this set's rows itself (no duplicate rows)
    headline: bool = True


# ------------------------------------------------------------------------------------------------
# running a plan
# ------------------------------------------------------------------------------------------------


@dataclass
class PlanSweep:
    """Scores of a steering plan per condition and alpha, and what the papers read from them.

    Attributes
    ----------
    table
        Tidy: ``condition`` (``"steer"``, ``"random-<i>"``), ``alpha``, ``metric`` (a score name,
        or ``"__broken__"``: the fraction of broken runs), ``value``; alpha = 0 was run once and
        stands for every condition.
    samples
        ``{(condition, alpha, score): per-example values}`` where the scorer returned arrays.
    roles
        ``{score: "target" | "off_target" | "damage" | "other"}``.
    params
        Plan name, intervention description, alphas, controls, seed, references.
    """

    table: pd.DataFrame
    samples: dict[tuple[str, float, str], np.ndarray]
    roles: dict[str, str]
    params: dict[str, Any]
    reference: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def conditions(self) -> list[str]:
        return list(dict.fromkeys(self.table.condition))

    @property
    def controls(self) -> list[str]:
        return [c for c in self.conditions if c != "steer"]

    @property
    def headline(self) -> str:
        return self.params["headline"]

    def curve(self, score: str, condition: str = "steer") -> pd.Series:
        """Value per alpha (sorted) of one score and condition."""
        t = self.table[(self.table.metric == score) & (self.table.condition == condition)]
        return t.set_index("alpha")["value"].sort_index()

    def broken(self, condition: str = "steer") -> pd.Series:
        """Fraction of broken runs per alpha of one condition."""
        return self.curve("__broken__", condition)

    def summary(self, score: str | None = None, *, n_boot: int = 1000) -> dict[str, Any]:
        """Slope, effects at the largest safe alpha of each sign, monotonicity, symmetry, breakdown.

        Safe alphas are those where the steered model had no broken run; the slope (least squares
        over safe alphas) and the effects (value minus the alpha = 0 value) are read there, and
        the same quantities for every control at the same alphas. ``p_effect_plus`` is the share
        of controls whose |effect at +alpha*| reaches the vector's ((1 + count) / (1 + n)).
        ``*_ci`` are 95 % bootstrap intervals over examples (NaN without per-example scores).
        """
        score = score or self.headline
        steer = self.curve(score)
        broken = self.broken()
        safe = [a for a in steer.index if broken.get(a, 0.0) == 0 and np.isfinite(steer[a])]
        pos, neg = [a for a in safe if a > 0], [a for a in safe if a < 0]
        a_plus, a_minus = (max(pos) if pos else math.nan), (min(neg) if neg else math.nan)
        out: dict[str, Any] = {"score": score, "role": self.roles.get(score, "other"), "alpha_plus": a_plus,
                               "alpha_minus": a_minus, "at_zero": float(steer.get(0.0, np.nan))}
        stats = _curve_stats(steer, safe, a_plus, a_minus)
        out.update(stats)
        out["breakdown_alpha"] = _breakdown(broken)
        out["broken_at_max_alpha"] = float(broken[broken.index.map(abs) == broken.index.map(abs).max()].max()) if len(broken) else 0.0
        # the controls, read at the same alphas
        ctrl = [_curve_stats(self.curve(score, c), safe, a_plus, a_minus) for c in self.controls]
        n = len(ctrl)
        out["n_controls"] = n
        for key in ("slope", "effect_plus", "effect_minus"):
            vals = np.array([c[key] for c in ctrl], dtype=np.float64)
            fin = vals[np.isfinite(vals)]
            out[f"control_{key}_mean"] = float(fin.mean()) if fin.size else math.nan
            out[f"control_{key}_mean_abs"] = float(np.abs(fin).mean()) if fin.size else math.nan
            out[f"control_{key}_max_abs"] = float(np.abs(fin).max()) if fin.size else math.nan
            if key != "effect_minus":
                v = abs(out[key]) if np.isfinite(out[key]) else math.nan
                out[f"p_{key}"] = float((1 + np.sum(np.abs(fin) >= v)) / (1 + fin.size)) if fin.size and np.isfinite(v) else math.nan
        out["control_symmetry_mean"] = float(np.nanmean([c["symmetry"] for c in ctrl])) if n and np.isfinite([c["symmetry"] for c in ctrl]).any() else math.nan
        out["control_monotonic_share"] = float(np.mean([c["monotonic"] for c in ctrl])) if n else math.nan
        bd = [_breakdown(self.broken(c)) for c in self.controls]
        fin_bd = [b for b in bd if np.isfinite(b)]
        out["control_breakdown_alpha"] = float(min(fin_bd)) if fin_bd else math.nan
        out["control_broken_share"] = float(np.mean([self.broken(c).sum() > 0 for c in self.controls])) if n else math.nan
        out.update(self._bootstrap(score, safe, a_plus, a_minus, n_boot=n_boot))
        for cond, scores in self.reference.items():
            if score in scores:
                out[f"reference[{cond}]"] = float(scores[score])
        return out

    def _bootstrap(self, score: str, safe: list[float], a_plus: float, a_minus: float, *, n_boot: int) -> dict[str, Any]:
        keys = [("steer", a, score) for a in safe]
        if n_boot <= 0 or not safe or not all(k in self.samples for k in keys):
            return {"slope_ci": [math.nan, math.nan], "effect_plus_ci": [math.nan, math.nan],
                    "effect_minus_ci": [math.nan, math.nan], "n_examples": None}
        arrays = np.stack([self.samples[k] for k in keys])  # (n_alpha, n_examples), same examples
        n_ex = arrays.shape[1]
        rng = np.random.default_rng([int(self.params.get("seed", 0)), 0xB007])
        idx = rng.integers(0, n_ex, size=(n_boot, n_ex))
        means = np.stack([np.nanmean(arrays[:, i], axis=1) for i in idx])  # (n_boot, n_alpha)
        alphas = np.asarray(safe, dtype=np.float64)
        ac = alphas - alphas.mean()
        slopes = (means - means.mean(1, keepdims=True)) @ ac / max(float(ac @ ac), 1e-12)
        zero = safe.index(0.0) if 0.0 in safe else None

        def effect(a: float) -> list[float]:
            if zero is None or not np.isfinite(a):
                return [math.nan, math.nan]
            e = means[:, safe.index(a)] - means[:, zero]
            return [float(np.nanpercentile(e, 2.5)), float(np.nanpercentile(e, 97.5))]

        return {"slope_ci": [float(np.nanpercentile(slopes, 2.5)), float(np.nanpercentile(slopes, 97.5))],
                "effect_plus_ci": effect(a_plus), "effect_minus_ci": effect(a_minus), "n_examples": int(n_ex)}

    def summaries(self) -> pd.DataFrame:
        """:meth:`summary` of every target, off-target and damage score, one row each."""
        scores = [s for s in dict.fromkeys(self.table.metric) if s != "__broken__"]
        rows = [self.summary(s) for s in scores]
        return pd.DataFrame([{k: (str(v) if isinstance(v, list) else v) for k, v in r.items()} for r in rows])

    def interval(self, score: str | None = None, condition: str = "steer", *, level: float = 0.95) -> pd.DataFrame:
        """Per-alpha confidence interval of a score's mean over examples (normal approximation).

        Read from the per-example values the scorer returned (:attr:`samples`): mean +/- z * SE,
        with NaN examples left out. Alphas without per-example values get NaN bounds.

        Returns
        -------
        DataFrame
            Indexed by alpha: ``value`` (the curve), ``low``, ``high``, ``n`` (examples scored).
        """
        from statistics import NormalDist

        score = score or self.headline
        curve = self.curve(score, condition)
        z = NormalDist().inv_cdf(0.5 + level / 2)
        rows = []
        for a, v in curve.items():
            arr = self.samples.get((condition, float(a), score))
            arr = np.asarray(arr, dtype=np.float64) if arr is not None else np.array([])
            fin = arr[np.isfinite(arr)]
            half = z * float(fin.std(ddof=1)) / math.sqrt(fin.size) if fin.size > 1 else math.nan
            rows.append({"alpha": float(a), "value": float(v), "low": v - half, "high": v + half, "n": int(fin.size)})
        return pd.DataFrame(rows, columns=["alpha", "value", "low", "high", "n"]).set_index("alpha")

    def plot(self, score: str | None = None, *, ax: Any = None, band: bool = True, legend: bool = True) -> Any:
        """Score vs alpha, drawn so that it can be read without a caption.

        The intervention's curve is solid with a shaded 95 % band over examples (when the scorer
        returned per-example values); the random controls are thin grey lines inside their grey
        min-max envelope ("random directions (N)"); alpha = 0, the unmodified model, is a hollow
        black circle; broken runs are red crosses; each reference condition is a horizontal line
        in its own colour, named in the legend.

        Parameters
        ----------
        score
            Score to draw (default: the plan's headline score).
        ax
            Axes to draw into (a new figure when None).
        band
            Shade the per-alpha 95 % interval of :meth:`interval`.
        legend
            Draw the legend (below the axes, so it never hides a curve).

        Returns
        -------
        matplotlib.axes.Axes
        """
        from .plotting import draw_alpha_sweep, get_ax

        score = score or self.headline
        ax = get_ax(ax, figsize=(5.0, 3.8))
        s = self.curve(score)
        ci = self.interval(score) if band else None
        n_ex = int(ci["n"].max()) if ci is not None and len(ci) else 0
        ok = ci is not None and bool(np.isfinite(ci["low"].to_numpy()).any())
        br = self.broken()
        draw_alpha_sweep(
            ax, s, {c: self.curve(score, c) for c in self.controls},
            label=str(self.params.get("name") or "intervention"),
            band=(ci["low"].to_numpy(), ci["high"].to_numpy()) if ok else None,  # type: ignore[index]
            band_label=f"95% CI ({n_ex} examples)",
            broken=[a for a in s.index if br.get(a, 0) > 0],
            references={cond: v[score] for cond, v in self.reference.items() if score in v},
            legend=legend,
        )
        role = self.roles.get(score, "other")
        what = {"target": "target, meant to " + ("fall" if score in self.params.get("decrease", ()) else "rise"),
                "off_target": "off-target, meant to stay", "damage": "damage"}.get(role)
        ax.set_ylabel(score)
        ax.set_title(f"{self.params.get('name')}: {score}" + (f" ({what})" if what else ""), fontsize=9)
        return ax

    @classmethod
    def load(cls, directory: str | Path) -> "PlanSweep":
        """Read a sweep written by :meth:`save`: ``sweep.csv``, ``summary.json`` and, where
        present, ``samples.npz`` (the steered model's per-example values; without it the plot
        draws no band and the summary no bootstrap interval)."""
        import json

        directory = Path(directory)
        table = pd.read_csv(directory / "sweep.csv")
        table["alpha"] = table["alpha"].astype(float)
        meta = json.loads((directory / "summary.json").read_text()) if (directory / "summary.json").is_file() else {}
        params = dict(meta.get("plan", {}))
        params.setdefault("name", directory.name)
        scores = [m for m in dict.fromkeys(table.metric) if m != "__broken__"]
        params.setdefault("headline", scores[0] if scores else "")
        targets = params.get("targets") or scores[:1]
        roles = {m: ("target" if m in targets else "off_target" if m in params.get("off_target", ()) else
                     "damage" if m in params.get("damage", ()) or m == params.get("broken_score") else "other")
                 for m in scores}
        samples: dict[tuple[str, float, str], np.ndarray] = {}
        if (directory / "samples.npz").is_file():
            with np.load(directory / "samples.npz", allow_pickle=False) as z:
                for key in z.files:
                    cond, alpha, score = key.split("|", 2)
                    samples[(cond, float(alpha), score)] = z[key]
        return cls(table, samples, roles, params, {k: dict(v) for k, v in (meta.get("reference") or {}).items()})

    def save(self, directory: str | Path) -> None:
        """``sweep.csv``, ``summary.csv`` (every score), ``summary.json`` (headline score + params)
        and, when the scorer returned per-example values, ``samples.npz`` (the steered model's, which
        the plot's band and the bootstrap read; keys ``condition|alpha|score``)."""
        from .io import atomic_path, write_json, write_table

        directory = Path(directory)
        write_table(directory / "sweep.csv", self.table)
        steer = {f"{c}|{a!r}|{s}": np.asarray(v, dtype=np.float64) for (c, a, s), v in self.samples.items() if c == "steer"}
        if steer:
            with atomic_path(directory / "samples.npz") as tmp:
                with open(tmp, "wb") as fh:  # a file handle: np.savez would append ".npz" to the temp name
                    np.savez_compressed(fh, **steer)
        write_table(directory / "summary.csv", self.summaries())
        write_json(directory / "summary.json", {"plan": self.params, "headline": self.summary(),
                                                "reference": self.reference})


def _curve_stats(curve: pd.Series, safe: list[float], a_plus: float, a_minus: float) -> dict[str, Any]:
    """Slope over the safe alphas, effects at +/- alpha*, monotonicity and sign symmetry of one curve."""
    c = curve.reindex(safe)
    c = c[np.isfinite(c.to_numpy(dtype=np.float64))]
    slope = float(np.polyfit(c.index.to_numpy(dtype=float), c.to_numpy(dtype=float), 1)[0]) if len(c) > 1 else math.nan
    base = float(curve.get(0.0, np.nan))
    eff = lambda a: float(curve.get(a, np.nan)) - base if np.isfinite(a) else math.nan  # noqa: E731
    d = np.diff(c.to_numpy(dtype=float))
    pairs = [a for a in c.index if a > 0 and -a in c.index]
    num = sum((c[a] - base) * -(c[-a] - base) for a in pairs)
    den = sum(0.5 * ((c[a] - base) ** 2 + (c[-a] - base) ** 2) for a in pairs)
    return {"slope": slope, "effect_plus": eff(a_plus), "effect_minus": eff(a_minus),
            "monotonic": bool(len(d) > 0 and (np.all(d >= 0) or np.all(d <= 0))),
            # 1: odd around alpha = 0; 0: one sign does nothing; < 0: both signs push the same way
            "symmetry": float(num / den) if den > 0 else math.nan}


def _breakdown(broken: pd.Series) -> float:
    """Smallest |alpha| with a broken run (NaN when none)."""
    bad = broken[broken > 0]
    return float(np.min(np.abs(bad.index.to_numpy(dtype=float)))) if len(bad) else math.nan


def run_plan(model: nn.Module, plan: SteeringPlan, intervention: Intervention, *, aliases: Aliases | None = None,
             reference: Mapping[str, Mapping[str, float]] | None = None, progress: bool = False,
             max_copies: int = 1) -> PlanSweep:
    """Run a steering plan: alpha = 0 once, every alpha with the intervention and each control.

    When the scorer has a ``batched`` form, every intervention describes its edits and
    ``max_copies > 1``, the (condition, alpha) jobs run ``max_copies`` at a time, as copies of one
    batch (:func:`~sciscope.core.interventions.apply_copies`); the numbers are those of one job at
    a time (``max_copies=1``, the default), which the tests check. On a 2-core CPU it did not
    beat one job at a time (benchmarks/README.md); it is meant for devices where one large forward
    costs less than many small ones. A run whose scorer raises a floating-point
    error, returns NaN in a target score, or flags broken runs through ``scorer.broken`` counts
    as broken; the sweep goes on.
    """
    from tqdm.auto import tqdm

    scorer = plan.scorer
    assert isinstance(scorer, Scorer)
    alphas = sorted(set(plan.alphas) - {0.0})
    controls = intervention.controls(model, plan.n_controls, seed=plan.seed, aliases=aliases) if plan.n_controls else []
    conditions = [("steer", intervention)] + [(f"random-{i}", c) for i, c in enumerate(controls)]
    rows: list[dict[str, Any]] = []
    samples: dict[tuple[str, float, str], np.ndarray] = {}
    names: list[str] = []

    def record(cond: str, alpha: float, result: Mapping[str, Any]) -> None:
        targets = list(scorer.target) or [k for k in result if k != scorer.broken]
        broken = 0.0
        for key, value in result.items():
            arr = np.asarray(value, dtype=np.float64)
            v = float(np.nanmean(arr)) if arr.ndim and arr.size and np.isfinite(arr).any() else (float(arr) if not arr.ndim else math.nan)
            if arr.ndim:
                samples[(cond, alpha, key)] = arr
            if key == scorer.broken:
                broken = max(broken, v if np.isfinite(v) else 1.0)
            if key in targets and not np.isfinite(v):
                broken = max(broken, 1.0)
            rows.append({"condition": cond, "alpha": alpha, "metric": key, "value": v})
            if key not in names:
                names.append(key)
        rows.append({"condition": cond, "alpha": alpha, "metric": "__broken__", "value": broken})

    def evaluate(group: list[tuple[str, Intervention, float]]) -> list[Mapping[str, Any]]:
        """Scores of each (condition, intervention, alpha) job: one batched call when the scorer and
        the interventions allow it, else (or when the batch hits a floating-point error, so that
        only the job that broke counts as broken) one call per job."""
        if len(group) > 1:
            try:
                with apply_copies(model, [(iv, a) for _, iv, a in group], aliases=aliases):
                    results = list(scorer.batched(model, len(group)))  # type: ignore[misc]
                if len(results) != len(group):
                    raise ValueError(f"steering plan {plan.name!r}: the scorer's batched() returned {len(results)} "
                                     f"results for {len(group)} copies")
                return results
            except FloatingPointError:
                pass
        results = []
        for _, iv, alpha in group:
            with iv.apply(model, alpha, aliases=aliases):
                try:
                    results.append(scorer(model))
                except FloatingPointError:
                    results.append({k: math.nan for k in names})
        return results

    base = scorer(model)
    names.extend(base)  # a job that breaks before any is recorded still gets every score, as NaN
    jobs = [(c, iv, a) for c, iv in conditions for a in alphas]
    batched = scorer.batched is not None and max_copies > 1 and all(iv.batchable for _, iv in conditions)
    size = max_copies if batched else 1
    with tqdm(total=len(jobs), desc=f"steering {plan.name}", disable=not progress) as bar:
        for start in range(0, len(jobs), size):
            group = jobs[start:start + size]
            for (cond, _, alpha), result in zip(group, evaluate(group)):
                record(cond, alpha, result)
            bar.update(len(group))
    for cond, _ in conditions:  # alpha = 0 is the unmodified model, shared by every condition
        record(cond, 0.0, base)
    table = pd.DataFrame(rows).sort_values(["condition", "metric", "alpha"], kind="stable").reset_index(drop=True)
    targets = list(scorer.target) or [n for n in names if n != scorer.broken]
    roles = {n: ("target" if n in targets else "off_target" if n in scorer.off_target else
                 "damage" if n in scorer.damage or n == scorer.broken else "other") for n in names}
    headline = plan.headline or targets[0]
    if headline not in names:
        raise KeyError(f"steering plan {plan.name!r}: headline score {headline!r} is not among the scores {names}")
    params = {"name": plan.name, "description": plan.description, "intervention": intervention.describe(),
              "alphas": [0.0, *alphas], "n_controls": len(controls), "seed": plan.seed, "headline": headline,
              "targets": targets, "decrease": list(scorer.decrease), "off_target": list(scorer.off_target),
              "damage": list(scorer.damage),
              "broken_score": scorer.broken}
    return PlanSweep(table, samples, roles, params, {k: dict(v) for k, v in (reference or {}).items()})


def check_batched_scorer(model: nn.Module, plan: SteeringPlan, intervention: Intervention, *,
                         aliases: Aliases | None = None, max_copies: int = 16) -> PlanSweep:
    """Run ``plan`` batched and one job at a time; raise ``AssertionError`` unless every number agrees
    (up to :data:`SWEEP_RTOL`).

    For adapter tests: a scorer's ``batched`` form must return exactly what its plain form
    returns under each copy's intervention (same examples, same samples). Returns the batched sweep.
    """
    scorer = plan.scorer
    assert isinstance(scorer, Scorer)
    if scorer.batched is None or not intervention.batchable:
        raise AssertionError(f"steering plan {plan.name!r}: the scorer has no batched form or the intervention no edits")
    batched = run_plan(model, plan, intervention, aliases=aliases, max_copies=max_copies)
    alone = run_plan(model, plan, intervention, aliases=aliases, max_copies=1)
    if not sweeps_equal(batched, alone):
        a, b = batched.table["value"].to_numpy(), alone.table["value"].to_numpy()
        diff = np.nanmax(np.abs(a - b)) if len(a) == len(b) else math.nan
        raise AssertionError(f"steering plan {plan.name!r}: batched scores differ from one job at a time "
                             f"(largest difference in the table {diff:.3g}, or in the per-example scores)")
    return batched


#: How far a batched sweep's numbers may lie from one job at a time's: float32 rounding. Numerical
#: libraries pick their kernels by batch size (oneDNN's convolutions, numpy's FFT over stacked
#: fields), so the same example in a larger batch can differ in its last bits (physics' rollout
#: scores by 5e-8 with numpy 2.4).
SWEEP_RTOL = 1e-6


def sweeps_equal(a: PlanSweep, b: PlanSweep, *, rtol: float = SWEEP_RTOL) -> bool:
    """Whether two sweeps hold the same numbers: the same (condition, alpha, score) rows with values
    equal up to ``rtol`` (NaN equal to NaN; 0 asks for bit-identical) and the same per-example scores."""
    def close(x: np.ndarray, y: np.ndarray) -> bool:
        x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
        if x.shape != y.shape:
            return False
        finite = np.abs(np.concatenate([x.ravel(), y.ravel()]))
        finite = finite[np.isfinite(finite)]
        scale = float(finite.max()) if finite.size else 0.0  # rounding is relative to the magnitudes computed
        return bool(np.allclose(x, y, rtol=rtol, atol=rtol * scale, equal_nan=True))

    same_rows = a.table[["condition", "alpha", "metric"]].equals(b.table[["condition", "alpha", "metric"]])
    return (same_rows and close(a.table["value"].to_numpy(), b.table["value"].to_numpy())
            and a.samples.keys() == b.samples.keys() and all(close(a.samples[k], b.samples[k]) for k in a.samples))


def plan_headline_rows(sweep: PlanSweep, *, source: str) -> Rows:
    """Headline rows of one plan: the headline score's effect at +alpha* (with everything the
    summary knows in the note) and the slope of every target and off-target score."""
    s = sweep.summary()
    name = sweep.params["name"]
    decrease = set(sweep.params.get("decrease", ()))
    fmt = lambda v: "n/a" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:.4g}"  # noqa: E731
    ci = s["effect_plus_ci"]
    refs = "; ".join(f"{k[len('reference['):-1]} {fmt(v)}" for k, v in s.items() if k.startswith("reference["))
    damage = []
    for d in sweep.params["damage"] + ([sweep.params["broken_score"]] if sweep.params["broken_score"] else []):
        c = sweep.curve(d)
        if len(c) and np.isfinite(s["alpha_plus"]):
            damage.append(f"{d} {fmt(c.get(0.0))} -> {fmt(c.get(s['alpha_plus']))}")
    note = (f"alpha 0: {fmt(s['at_zero'])}; slope {fmt(s['slope'])} (controls mean |slope| {fmt(s['control_slope_mean_abs'])}, "
            f"p = {fmt(s['p_slope'])}); {'monotonic' if s['monotonic'] else 'not monotonic'}; sign symmetry {fmt(s['symmetry'])} "
            f"(controls {fmt(s['control_symmetry_mean'])}); effect at {fmt(s['alpha_minus'])}: {fmt(s['effect_minus'])}; "
            f"breakdown alpha {fmt(s['breakdown_alpha'])} (controls {fmt(s['control_breakdown_alpha'])})"
            + (f"; 95% CI [{fmt(ci[0])}, {fmt(ci[1])}] over {s['n_examples']} examples" if s["n_examples"] else "")
            + (f"; damage: {', '.join(damage)}" if damage else "") + (f"; reference: {refs}" if refs else ""))
    rows: Rows = [{"stage": "steering", "name": f"{name}: change in {s['score']} at alpha {fmt(s['alpha_plus'])}",
                   "value": s["effect_plus"], "control": s["control_effect_plus_mean"],
                   "control_label": f"{s['n_controls']} random controls, mean (p = {fmt(s['p_effect_plus'])})",
                   **_largest_control(s["effect_plus"], s["control_effect_plus_max_abs"], "change", s["n_controls"],
                                      role=s["role"], decrease=s["score"] in decrease),
                   "note": note, "source": source}]
    for score, role in sweep.roles.items():
        if role not in ("target", "off_target"):
            continue
        t = sweep.summary(score, n_boot=0) if score != s["score"] else s
        rows.append({"stage": "steering", "name": f"{name}: slope of {score} per unit alpha", "value": t["slope"],
                     "control": t["control_slope_mean_abs"],
                     "control_label": f"mean |slope| of {t['n_controls']} random controls",
                     **_largest_control(t["slope"], t["control_slope_max_abs"], "slope", t["n_controls"],
                                        role=role, decrease=score in decrease),
                     "note": f"{role}; {'monotonic' if t['monotonic'] else 'not monotonic'} over safe alphas; p = {fmt(t['p_slope'])}",
                     "source": source})
    return rows


def _largest_control(value: float, control_max_abs: float, what: str, n_controls: int, *, role: str = "target",
                     decrease: bool = False) -> dict[str, Any]:
    """The baseline of one steering number: the largest |value| over its random controls.

    One direction is read against the maximum over as many random directions as were run, so a
    vector that does no more than the luckiest random one reads "no better than baseline".

    - A target is read with its sign (meant to rise with alpha, or to fall when the scorer lists
      it in ``decrease``): beyond every control the intended way is "above baseline", beyond every
      control the other way "below baseline", anything within the controls "no better".
    - An off-target score is the other way round: moving it more than every random direction does
      is a side effect, "below baseline"; otherwise "no better than baseline" (as specific as a
      random direction, no more).
    - Any other score (damage, other) by magnitude: "above" or "no better".

    Empty without controls or when either number is not finite.
    """
    if not n_controls or not (np.isfinite(value) and np.isfinite(control_max_abs)):
        return {}
    value, bar = float(value), float(control_max_abs)
    if role == "target":
        signed = -value if decrease else value
        v = ABOVE if signed > bar else BELOW if signed < -bar else NO_BETTER
    elif role == "off_target":
        v = BELOW if abs(value) > bar else NO_BETTER
    else:
        v = ABOVE if abs(value) > bar else NO_BETTER
    label = f"largest |{what}| of {n_controls} random controls"
    if role == "target":
        label += " (read with the intended sign: " + ("down" if decrease else "up") + ")"
    return {"baseline": bar, "baseline_label": label, "verdict": v}


def resolve_reference(plan: SteeringPlan, ctx: "RunContext") -> dict[str, dict[str, float]]:
    """The plan's reference conditions (built from the context when given as a function)."""
    ref = plan.reference(ctx) if callable(plan.reference) else plan.reference
    return {str(k): {s: float(v) for s, v in scores.items()} for k, scores in (ref or {}).items()}


def resolve_intervention(plan: SteeringPlan, ctx: "RunContext") -> Intervention:
    """The plan's intervention (built from the context when given as a function)."""
    iv = plan.intervention if isinstance(plan.intervention, Intervention) else plan.intervention(ctx)
    if not isinstance(iv, Intervention):
        raise TypeError(f"steering plan {plan.name!r}: intervention builder returned {type(iv).__name__}, not an Intervention")
    return iv


def contrast_plan(ctx: "RunContext", name: str, a: Any, b: Any, scorer: Scorer | Callable[[nn.Module], Mapping[str, Any]], *,
                  site: str, method: str = "mean_diff", scale: str | None = None, relative_to: str = "position",
                  positions: Any = None, **plan_fields: Any) -> SteeringPlan:
    """A delta-vector plan: ``mean(a) - mean(b)`` of the run's store at ``site``, injected there.

    Alphas, scale and the number of controls default to the run's ``steer_alphas``,
    ``steer_scale`` and ``steer_n_random``; ``plan_fields`` set any other :class:`SteeringPlan` field.
    """
    from .interventions import AddVector
    from .steer import contrast_vector

    c = ctx.config

    def build(run: "RunContext") -> Intervention:
        vec = contrast_vector(run.store(), site, a=a, b=b, method=method, seed=run.seed)  # type: ignore[arg-type]
        return AddVector(vec, site, scale=scale or c.get("steer_scale", "absolute"), relative_to=relative_to,  # type: ignore[arg-type]
                         positions=positions)

    fields = {"alphas": c.get("steer_alphas", [-1.0, 1.0]), "n_controls": int(c.get("steer_n_random", 10)), "seed": ctx.seed,
              "description": f"difference of means {a!r} - {b!r} at {site}", **plan_fields}
    return SteeringPlan(name, build, scorer, **fields)
