"""Causal tracing across layers, components and positions (FCCT-style), with its controls.

An adapter supplies :class:`CounterfactualPairs`: clean and corrupted inputs that differ in one
concept (a molecule with and without a functional group, a northern and a southern place, a
monocyte and a B cell), aligned position by position, and a readout of the model's output. For
every layer x component (residual stream, attention output, MLP output) x position group,
:func:`trace` measures

* **restore**: the clean activation patched into the corrupted run, as a fraction of the total
  effect ``(score(patched) - score(corrupted)) / (score(clean) - score(corrupted))``;
* **knockouts**: the component zeroed, or set to its mean over the pairs, in the clean run, as the
  fraction of the total effect it removes ``(score(clean) - score(ablated)) / (score(clean) -
  score(corrupted))``;
* **control**: the activation of a *random other corrupted* example patched into the corrupted run (a
  derangement of the pairs: what patching an unrelated input does, without the concept), normalised
  the same way; a cell means something only where restore beats its control, and the largest
  restore is compared with the largest control over as many cells.

Scores are means over pairs before they are normalised (per-pair ratios explode where a pair's
clean and corrupted outputs nearly agree).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from .capture import _forward, _to_device
from .errors import NonFiniteError, ShapeError
from .hooks import HookSet
from .sites import Aliases, Site, resolve_site, to_canonical

if TYPE_CHECKING:
    from .components import BlockComponents
    from .context import RunContext
    from .experiment import Analysis

#: ``readout(model_output) -> (B, ...)`` tensor the score is computed from (logits at the scored
#: position, the predicted field, a pooled embedding).
Readout = Callable[[Any], torch.Tensor]


@dataclass
class CounterfactualPairs:
    """Clean / corrupted inputs that differ in one concept, and how to score the model's output.

    Attributes
    ----------
    clean, corrupted
        Model inputs for ``B`` pairs (a dict of keyword arguments, a tuple or a tensor), the same
        structure and shapes; position ``p`` of pair ``i`` is the same slot in both (swap a token for
        one of the same length, an atom for an atom, a word for a word).
    readout
        ``readout(model_output) -> (B, ...)``: the differentiable part of the output that matters
        (the logits at the action-emitting position, the predicted next frame, ...).
    score
        Optional ``score(readout) -> (B,)``, larger for clean-like outputs (a logit difference, a probe
        read). None: each pair's readout projected on its own clean-minus-corrupted readout,
        ``<r - r_corrupted, r_clean - r_corrupted>``, over the pairs' mean ``|r_clean - r_corrupted|^2``
        (mean 1 = clean, 0 = corrupted; :class:`PairScore`).
    position_groups
        ``{name: positions}`` on the residual stream's position axis (canonical ``P``): a list of
        ints, a slice, or a ``(B, P)`` boolean tensor for positions that differ per pair (the atoms
        of the functional group). ``"all"`` is always traced as well.
    concept
        What the pairs differ in (one line for the report).
    score_name
        What the score is.
    """

    clean: Any
    corrupted: Any
    readout: Readout
    score: Callable[[torch.Tensor], torch.Tensor] | None = None
    position_groups: Mapping[str, Any] = field(default_factory=dict)
    concept: str = ""
    score_name: str = "projection on the clean-minus-corrupted output"
    #: ``{component: (to_stream, from_stream)}`` for components whose tensor is not laid out like the
    #: residual stream (TimeSformer's frame-major spatial attention): ``to_stream(t) -> (B, P, D)`` in the
    #: stream's positions, ``from_stream`` its inverse. Without one such a component is traced at "all" only.
    component_views: Mapping[str, tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]] = \
        field(default_factory=dict)


#: What each cell measures (the columns of :attr:`TracingResult.table`).
MEASURES = ("restore", "control", "zero_ablation", "mean_ablation")


@dataclass
class TracingResult:
    """Normalised effects per layer x component x position group.

    Attributes
    ----------
    table : DataFrame
        One row per cell: ``layer``, ``component``, ``site``, ``group``, ``n_positions`` (positions
        patched per pair, mean), ``restore`` (clean activation into the corrupted run), ``control``
        (a random other corrupted example's activation into the corrupted run), ``zero_ablation`` and
        ``mean_ablation`` (fraction of the total effect removed from the clean run), each
        normalised to the total effect, and ``trivial`` (the residual stream at every position, which
        restores everything by construction: a check, not a finding).
    clean_score, corrupted_score : float
        Mean score of the clean and corrupted runs (the two ends of the normalisation).
    params : dict
        Pairs, groups, concept, score name, seed.
    """

    table: "pd.DataFrame"
    clean_score: float
    corrupted_score: float
    params: dict[str, Any]

    @property
    def total_effect(self) -> float:
        """``clean_score - corrupted_score``."""
        return self.clean_score - self.corrupted_score

    def top(self, n: int = 3, measure: str = "restore") -> "pd.DataFrame":
        """The ``n`` non-trivial cells with the largest ``measure``; among equal ones, the cell that
        patches fewer positions first (it says more about where)."""
        cells = self.table[~self.table.trivial].dropna(subset=[measure])
        order = cells.assign(_m=cells[measure].round(6)).sort_values(["_m", "n_positions"], ascending=[False, True], kind="stable")
        return order.drop(columns="_m").head(n)

    def control_max(self) -> float:
        """The largest control effect over every non-trivial cell (as many cells as the restores)."""
        return float(self.table.loc[~self.table.trivial, "control"].max())

    def matrix(self, measure: str = "restore") -> "pd.DataFrame":
        """``measure`` as a layer x (component, group) matrix."""
        t = self.table.assign(cell=self.table.component + " @ " + self.table.group)
        m = t.pivot(index="layer", columns="cell", values=measure)
        return m[list(dict.fromkeys(t.cell))]

    def plot(self, measures: tuple[str, ...] = ("restore", "control", "mean_ablation"), *,
             title: str | None = None) -> Any:
        """Heatmaps of ``measures`` side by side (layers down, component @ position group across)."""
        import matplotlib.pyplot as plt

        labels = {"restore": "restore clean -> corrupted", "control": "control: random other example",
                  "zero_ablation": "knock out: zero", "mean_ablation": "knock out: mean"}
        first = self.matrix(measures[0])
        # panels stacked: the columns (component @ group) are many, the layers few
        fig, axes = plt.subplots(len(measures), 1, figsize=(2.5 + 0.36 * first.shape[1], 1.6 + (0.5 + 0.3 * first.shape[0]) * len(measures)),
                                 squeeze=False, sharex=True, constrained_layout=True)
        for ax, measure in zip(axes[:, 0], measures):
            m = self.matrix(measure)
            im = ax.imshow(m.to_numpy(dtype=float), cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto")
            ax.set_yticks(range(m.shape[0]), [f"layer {i}" for i in m.index], fontsize=7)
            ax.set_title(labels.get(measure, measure), fontsize=8, loc="left")
        axes[-1, 0].set_xticks(range(first.shape[1]), first.columns, fontsize=7, rotation=90)
        fig.colorbar(im, ax=axes[:, 0].tolist(), label="fraction of the total effect", shrink=0.8)
        fig.suptitle(title or f"causal tracing: {self.params.get('concept', '')} "
                              f"(total effect {self.total_effect:.3g}, {self.params.get('n_pairs')} pairs)", fontsize=9)
        return fig


def _group_mask(positions: Any, batch: int, n_pos: int, name: str) -> torch.Tensor:
    """``(B, P)`` boolean mask of a position group."""
    if isinstance(positions, torch.Tensor) and positions.dtype == torch.bool:
        if tuple(positions.shape) != (batch, n_pos):
            raise ShapeError(f"tracing: position group {name!r} is a mask of shape {tuple(positions.shape)}, "
                             f"the residual stream has (pairs, positions) = {(batch, n_pos)}")
        return positions.clone()
    mask = torch.zeros(n_pos, dtype=torch.bool)
    try:
        mask[positions if isinstance(positions, slice) else torch.as_tensor(list(positions), dtype=torch.long)] = True
    except IndexError:
        raise ShapeError(f"tracing: position group {name!r} = {positions!r} is out of range for {n_pos} positions") from None
    return mask.expand(batch, n_pos).clone()


def _derangement(n: int, seed: int) -> torch.Tensor:
    """A seeded permutation of ``range(n)`` with no fixed point (every pair gets another's activation)."""
    if n < 2:
        raise ShapeError("tracing: the random-example control needs at least 2 pairs")
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=gen)
    return torch.roll(perm, 1)[torch.argsort(perm)]  # i -> the next element of a random cycle


def trace(
    model: nn.Module,
    pairs: CounterfactualPairs,
    components: "Sequence[BlockComponents]",
    *,
    aliases: Aliases | None = None,
    seed: int = 0,
    progress: bool = True,
) -> TracingResult:
    """Restore, knock out and control every layer x component x position group.

    Parameters
    ----------
    model
        The model (put in eval mode for the call).
    pairs
        The counterfactual pairs and their readout.
    components
        The blocks' components (:func:`sciscope.core.components.block_components`); every part and
        the residual stream of every block is traced.
    seed
        Seeds the random-example control.

    Notes
    -----
    Position groups apply where a component's tensor is ``(B, P, D)`` with the residual stream's
    ``P``, or has a view into it (``pairs.component_views``). A component whose tensor folds positions
    into the batch axis (TimeSformer's attention, ``(B * frames, patches, D)``) without a view is traced
    at every position only (its other groups are NaN); its control and mean read it example-major, as
    ``(B, -1)``.
    """
    from tqdm.auto import tqdm

    sites = [(blk.layer, comp, site) for blk in components for comp, site in blk.sites().items()]
    resolved = {site: resolve_site(model, site, aliases) for _, _, site in sites}
    device = next(model.parameters()).device
    pairs_clean, pairs_corrupted = _to_device(pairs.clean, device), _to_device(pairs.corrupted, device)
    modes = {m: m.training for m in model.modules()}  # restored one by one: a submodule may be frozen in eval
    model.eval()
    clean_acts: dict[str, torch.Tensor] = {}
    corrupted_acts: dict[str, torch.Tensor] = {}
    try:
        with torch.no_grad():
            with HookSet() as hooks:
                for site, (parsed, module) in resolved.items():
                    hooks.read(module, parsed, lambda t, site=site: clean_acts.setdefault(site, t.detach().clone()))
                r_clean = pairs.readout(_forward(model, pairs_clean)).float()
            with HookSet() as hooks:
                for site, (parsed, module) in resolved.items():
                    hooks.read(module, parsed, lambda t, site=site: corrupted_acts.setdefault(site, t.detach().clone()))
                r_corrupted = pairs.readout(_forward(model, pairs_corrupted)).float()
            missing = [s for s in resolved if s not in clean_acts]
            if missing:
                raise ShapeError(f"tracing: the forward pass never reached {missing}")
            batch = int(r_clean.shape[0])
            if tuple(r_clean.shape) != tuple(r_corrupted.shape):
                raise ShapeError(f"tracing: clean readout {tuple(r_clean.shape)} vs corrupted {tuple(r_corrupted.shape)}")
            score = PairScore(pairs, r_clean, r_corrupted).mean
            clean_score, corrupted_score = score(r_clean), score(r_corrupted)
            total = clean_score - corrupted_score
            if not math.isfinite(total) or abs(total) < 1e-8:
                raise NonFiniteError(f"tracing: the clean and corrupted runs score the same ({clean_score:.6g} vs "
                                     f"{corrupted_score:.6g}); the pairs carry no effect to trace")
            resid0 = components[0].resid
            n_pos = to_canonical(clean_acts[resid0], resolved[resid0][0])[0].shape[1]
            groups = {"all": torch.ones(batch, n_pos, dtype=torch.bool)}
            for name, positions in pairs.position_groups.items():
                groups[name] = _group_mask(positions, batch, n_pos, name)
                if not groups[name].any():
                    raise ShapeError(f"tracing: position group {name!r} selects no position")
            perm = _derangement(batch, seed)

            rows = []
            jobs = [(layer, comp, site, g) for layer, comp, site in sites for g in groups]
            for layer, comp, site, gname in tqdm(jobs, desc="tracing", disable=not progress):
                parsed, module = resolved[site]
                clean_t, corrupted_t = clean_acts[site], corrupted_acts[site]
                view = pairs.component_views.get(comp)
                shape = tuple(view[0](clean_t).shape[:2]) if view else _canonical_shape(clean_t, parsed)
                canon_ok = clean_t.ndim >= 2 and shape == (batch, n_pos)
                if gname != "all" and not canon_ok:
                    rows.append({"layer": layer, "component": comp, "site": site, "group": gname, "n_positions": np.nan,
                                 **{m: np.nan for m in MEASURES}})
                    continue
                mask = groups[gname]
                sources = {
                    "restore": (pairs_corrupted, clean_t),
                    "control": (pairs_corrupted, _example_major(corrupted_t, batch)[perm.to(clean_t.device)].reshape(corrupted_t.shape)),
                    "zero_ablation": (pairs_clean, torch.zeros_like(clean_t)),
                    "mean_ablation": (pairs_clean, _pair_mean(clean_t, corrupted_t, batch)),
                }
                row = {"layer": layer, "component": comp, "site": site, "group": gname,
                       "n_positions": float(mask.sum(1).float().mean())}
                for measure, (inputs, source) in sources.items():
                    edit = _patch(parsed, source, mask if canon_ok else None, site, view)
                    with HookSet() as hooks:
                        hooks.edit(module, parsed, edit)
                        s = score(pairs.readout(_forward(model, inputs)).float())
                    row[measure] = (s - corrupted_score) / total if measure in ("restore", "control") else (clean_score - s) / total
                rows.append(row)
    finally:
        for m, mode in modes.items():
            m.training = mode
    table = pd.DataFrame(rows)
    table["trivial"] = (table.component == "resid") & (table.group == "all")
    params = {"n_pairs": batch, "groups": list(groups), "concept": pairs.concept, "score": pairs.score_name,
              "seed": seed, "control": "a random other corrupted example's activation patched in (a derangement)",
              "sites": [s for _, _, s in sites]}
    return TracingResult(table, clean_score, corrupted_score, params)


def _canonical_shape(t: torch.Tensor, site: Site) -> tuple[int, int] | None:
    try:
        c = to_canonical(t, site)[0]
    except ShapeError:
        return None
    return int(c.shape[0]), int(c.shape[1])


def _example_major(t: torch.Tensor, batch: int) -> torch.Tensor:
    """``t`` as ``(B, -1)``: a tensor whose first axis is the batch, or batch x something folded in."""
    if t.shape[0] % batch:
        raise ShapeError(f"tracing: a tensor of shape {tuple(t.shape)} does not lead with the {batch} pairs")
    return t.reshape(batch, -1)


def _pair_mean(clean_t: torch.Tensor, corrupted_t: torch.Tensor, batch: int) -> torch.Tensor:
    """Mean over the ``2B`` runs (clean and corrupted) of each slot, broadcast back to ``t``'s shape."""
    both = torch.cat([_example_major(clean_t, batch), _example_major(corrupted_t, batch)])  # (2B, -1)
    return both.mean(0, keepdim=True).expand(batch, -1).reshape(clean_t.shape)


def _patch(site: Site, source: torch.Tensor, mask: torch.Tensor | None, name: str,
           view: tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]] | None = None,
           ) -> Callable[[torch.Tensor], torch.Tensor]:
    """An edit putting ``source`` in place of the site's tensor at the ``(B, P)`` ``mask`` (None: everywhere),
    the positions read through the component's ``view`` when it has one."""

    def edit(t: torch.Tensor) -> torch.Tensor:
        if t.shape != source.shape:
            raise ShapeError(f"tracing: site {name!r} gives {tuple(t.shape)} on this run, {tuple(source.shape)} on the "
                             "source run; clean and corrupted inputs must have the same shapes")
        if mask is None:
            return source.to(t.dtype)
        if view is not None:
            h, back, src = view[0](t.clone()), view[1], view[0](source)
        else:
            h, back = to_canonical(t.clone(), site)
            src = to_canonical(source, site)[0]
        m = mask.to(h.device)
        h[m] = src[m].to(h.dtype)
        return back(h)

    return edit


class PairScore:
    """The pairs' score of a readout, per pair: ``pairs.score`` where the adapter gives one, else the
    projection of each pair's readout on its clean-minus-corrupted readout, over one common scale.

    The common scale is ``1 / mean_i |d_i|^2`` (``d_i`` = clean minus corrupted readout of pair ``i``),
    so the mean score is ``sum_i <r_i - c_i, d_i> / sum_i |d_i|^2``: 1 for the clean runs, 0 for the
    corrupted ones. A per-pair denominator would let the pairs whose outputs barely differ dominate
    every mean (their ratios explode under any patch). Tracing and attribution read the same score.

    Parameters
    ----------
    pairs
        The pairs (their ``score``, if any).
    r_clean, r_corrupted
        ``(N, ...)`` readouts of the clean and corrupted runs.
    """

    def __init__(self, pairs: CounterfactualPairs, r_clean: torch.Tensor, r_corrupted: torch.Tensor) -> None:
        self.score = pairs.score
        self.r_corrupted = r_corrupted.detach().float().reshape(len(r_corrupted), -1)  # (N, R)
        self.diff = r_clean.detach().float().reshape(len(r_clean), -1) - self.r_corrupted  # (N, R)
        mean_sq = float(self.diff.pow(2).sum(-1).mean()) if len(self.diff) else 0.0
        self.scale = 1.0 / mean_sq if mean_sq > 0 else 0.0

    def per_pair(self, r: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        """``(b,)`` scores of the readouts ``r`` ``(b, ...)`` of pairs ``idx`` (None: all, in order)."""
        if self.score is not None:
            return self.score(r).float().reshape(-1)
        base, diff = (self.r_corrupted, self.diff) if idx is None else (self.r_corrupted[idx], self.diff[idx])
        d = r.float().reshape(len(r), -1) - base.to(r.device)  # (b, R)
        return (d * diff.to(r.device)).sum(-1) * self.scale

    def mean(self, r: torch.Tensor) -> float:
        """The mean score over all pairs of the readouts ``r`` ``(N, ...)``."""
        return float(self.per_pair(r).mean())


def tracing_analysis() -> "Analysis":
    """The core's causal tracing, run after the probes stage for every adapter with counterfactual
    pairs (:meth:`~sciscope.core.adapter.DomainAdapter.tracing_pairs`).

    Traces every block's components (:meth:`~sciscope.core.adapter.DomainAdapter.component_templates`
    where discovery needs help); writes ``probes/tracing.csv`` and the heatmaps ``tracing.png``;
    headline: the top three non-trivial cells, each beside its random-example control and the
    largest control over every cell.
    """
    from .experiment import Analysis

    return Analysis("tracing", "probes", _compute_tracing, _tracing_rows)


def _compute_tracing(ctx: "RunContext") -> dict[str, Any] | None:
    from .components import block_components

    adapter = ctx.adapter
    pairs = adapter.tracing_pairs(ctx)
    if pairs is None:
        return None
    model = ctx.model()
    result = trace(model, pairs, block_components(model, adapter.component_templates), aliases=adapter.aliases,
                   seed=ctx.seed, progress=ctx.progress)
    source = ctx.write_table("tracing.csv", result.table)
    figure = ctx.save_figure("tracing.png", result.plot(title=f"{adapter.name}: causal tracing of {pairs.concept} "
                                                              f"({result.params['n_pairs']} pairs, {pairs.score_name})"))
    ctx.write_json("tracing.json", {**result.params, "clean_score": result.clean_score,
                                    "corrupted_score": result.corrupted_score})
    return {"result": result, "source": source, "figure": figure}


def _tracing_rows(found: dict[str, Any] | None) -> list[dict[str, Any]]:
    from .verdict import FRACTION_MARGIN

    if found is None:
        return []
    res: TracingResult = found["result"]
    n_cells = int((~res.table.trivial).sum())
    control_max = res.control_max()
    rows = []
    top = res.top(3)
    cells = [(f"#{rank}", cell) for rank, (_, cell) in enumerate(top.iterrows(), 1)]
    if (top.component == "resid").all():  # the stream carries what the blocks wrote: name the strongest writer too
        parts = res.table[res.table.component != "resid"].dropna(subset=["restore"])
        if len(parts):
            cells.append(("strongest attention/MLP cell", parts.loc[parts.restore.idxmax()]))
    for rank, cell in cells:
        rows.append({
            "name": f"tracing {rank}: {cell.component} of layer {cell.layer} at {cell.group} positions (restore)",
            "value": float(cell.restore), "unit": "fraction of the total effect",
            "control": float(cell.control), "control_label": "a random other corrupted example's activation, same cell",
            "baseline": control_max, "baseline_label": f"largest random-example control over the {n_cells} cells",
            "tolerance": FRACTION_MARGIN,
            "note": (f"{res.params['concept']}: clean {res.clean_score:.4g}, corrupted {res.corrupted_score:.4g} "
                     f"({res.params['score']}, {res.params['n_pairs']} pairs); knocking the cell out of the clean run "
                     f"removes {cell.zero_ablation:.3f} (zero) / {cell.mean_ablation:.3f} (mean) of the effect; "
                     f"{cell.n_positions:.1f} positions per pair; site {cell.site}"),
            "source": found["source"], "figure": found["figure"],
        })
    return rows
