"""Interventions: one protocol for everything a steering experiment does to a model.

Each intervention is applied at a strength ``alpha`` inside a ``with`` block (nothing stays
registered after it, also when it raises) and makes its own matched random controls:

=====================  ===========================================  ===============================
intervention           at strength alpha                            matched random control
=====================  ===========================================  ===============================
:class:`AddVector`     ``h + alpha * v`` (absolute) or scaled by    a random direction of the same
                       ``|h|`` per position / per example           norm, same injection
:class:`Clamp`         the chosen units of each site set to alpha   as many random units per site
:class:`SteerFeature`  ``h + alpha * sum_i W_dec[i]`` (SAE          random features of matched
                       decoder directions)                          firing density
:class:`AblateFeatures` ``h - alpha * sum_i f_i(h) W_dec[i]``        random features of matched
                       (alpha = 1 removes the features)             firing density
=====================  ===========================================  ===============================

The experiment runner (:func:`sciscope.core.experiment.run_plan`) never applies an intervention
at alpha = 0: that point is the unmodified model, run once (for :class:`Clamp` clamping to 0 is a
different, zero-ablation intervention).

Each built-in intervention describes itself as :class:`~sciscope.core.steer.Edit` s (what to do
to the canonical ``(B, P, D)`` tensor at a site), so :func:`apply_copies` can run many
(intervention, alpha) pairs in one forward: the scorer stacks ``n`` copies of its batch
(copy-major, :func:`tile_copies`) and copy ``i`` of every batch is edited by pair ``i``.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from .errors import ShapeError
from .sites import Aliases, Site, resolve_site
from .steer import Edit, SteeringVector, apply_edits, clamp_edit, steer_edit


class Intervention(ABC):
    """What a steering plan does to the model at strength ``alpha``.

    Subclasses implement :meth:`edits` (the activation edits at strength ``alpha``; then
    :meth:`apply` and batched sweeps come for free) or, for what edits cannot express, their own
    :meth:`apply` (a context manager; such a plan is swept one alpha at a time); and
    :meth:`controls` (matched random controls of the same kind) and :meth:`describe` (JSON-able
    parameters for the run's record).
    """

    kind: str = "intervention"

    def edits(self, model: nn.Module, alpha: float, *, aliases: Aliases | None = None) -> list[Edit]:
        """The activation edits at strength ``alpha`` (not implemented: :meth:`apply` is overridden)."""
        raise NotImplementedError(f"{type(self).__name__} describes no edits; it overrides apply()")

    @property
    def batchable(self) -> bool:
        """Whether :meth:`edits` is implemented (copies of a batch can then carry different strengths)."""
        return type(self).edits is not Intervention.edits

    def apply(self, model: nn.Module, alpha: float, *, aliases: Aliases | None = None) -> contextlib.AbstractContextManager[None]:
        """Context manager: the model runs intervened at strength ``alpha`` inside the block."""
        return apply_edits(self.edits(model, alpha, aliases=aliases))

    @abstractmethod
    def controls(self, model: nn.Module, n: int, *, seed: int = 0, aliases: Aliases | None = None) -> list["Intervention"]:
        """``n`` random interventions matched to this one (seeded: the same seed gives the same controls)."""

    def describe(self) -> dict[str, Any]:
        """Parameters of the intervention for ``summary.json``."""
        return {"kind": self.kind}


class AddVector(Intervention):
    """Add a steering vector at a site: ``h + alpha * v`` or ``h + alpha * v * |h| / |v|``.

    Parameters
    ----------
    vector
        A :class:`SteeringVector` (its site is used unless ``site`` is given) or a ``(d,)`` tensor.
    site
        Where to inject.
    scale
        ``"absolute"`` or ``"relative"`` (alpha in units of the activation norm).
    relative_to
        ``"position"`` (each position's norm) or ``"example"`` (the example's rms position norm:
        the Physics-Steering recipe of a mean vector broadcast over space).
    positions
        Which positions to change (see :func:`sciscope.core.steer.steer`); None = all.
    """

    kind = "add_vector"

    def __init__(self, vector: SteeringVector | torch.Tensor, site: str | None = None, *,
                 scale: Literal["absolute", "relative"] = "absolute",
                 relative_to: Literal["position", "example"] = "position", positions: Any = None) -> None:
        if not isinstance(vector, SteeringVector):
            if site is None:
                raise ShapeError("AddVector needs a site when the vector is a plain tensor")
            vector = SteeringVector(torch.as_tensor(vector), site)
        if scale not in ("absolute", "relative"):
            raise ValueError(f"AddVector: scale must be 'absolute' or 'relative', got {scale!r}")
        if relative_to not in ("position", "example"):
            raise ValueError(f"AddVector: relative_to must be 'position' or 'example', got {relative_to!r}")
        self.vector = vector
        self.site = site or vector.site
        self.scale, self.relative_to, self.positions = scale, relative_to, positions

    def edits(self, model: nn.Module, alpha: float, *, aliases: Aliases | None = None) -> list[Edit]:
        return [steer_edit(model, self.vector, alpha, site=self.site, scale=self.scale, relative_to=self.relative_to,
                           positions=self.positions, aliases=aliases)]

    def controls(self, model: nn.Module, n: int, *, seed: int = 0, aliases: Aliases | None = None) -> list[Intervention]:
        return [AddVector(self.vector.random_like(seed + i), self.site, scale=self.scale, relative_to=self.relative_to,
                          positions=self.positions) for i in range(n)]

    def describe(self) -> dict[str, Any]:
        site = self.site if isinstance(self.site, str) else f"{self.site.path}:{self.site.side}"  # a Site object
        layout = getattr(self.site, "layout", None) or self.vector.layout
        return {"kind": self.kind, "site": site, "layout": layout, "scale": self.scale, "relative_to": self.relative_to,
                "vector_norm": self.vector.norm, "vector_method": self.vector.method, "vector_meta": self.vector.meta,
                "positions": None if self.positions is None else repr(self.positions)}


def site_width(model: nn.Module, site: str, aliases: Aliases | None = None) -> int:
    """The feature width of a site, read from its module (``nn.Linear`` in/out features, embeddings,
    norms); raises :class:`ShapeError` when the module does not say."""
    parsed, module = resolve_site(model, site, aliases)
    if isinstance(module, nn.Linear):
        return int(module.in_features if parsed.side == "input" else module.out_features)
    if isinstance(module, nn.Embedding) and parsed.side == "output":
        return int(module.embedding_dim)
    if hasattr(module, "normalized_shape"):  # LayerNorm / RMSNorm: input and output have its width
        return int(np.prod(module.normalized_shape))
    raise ShapeError(f"cannot tell the width of site {site!r} ({type(module).__name__}); give Clamp(widths={{site: n}})")


class Clamp(Intervention):
    """Set chosen units of one or more sites to ``alpha`` (or ``alpha * value``) inside the block.

    For FFN neurons clamp the down-projection's input (``model.layers.3.mlp.down_proj:input``),
    as in the VLA-interpretability paper's speed/direction clusters.

    Parameters
    ----------
    units
        ``{site: unit indices}``.
    positions
        Which positions to clamp (None = every position).
    widths
        ``{site: number of units}`` for the random control, when the site's module does not
        say it (:func:`site_width`). The control draws as many units per site, other than the
        chosen ones.
    """

    kind = "clamp"

    def __init__(self, units: Mapping[str, Sequence[int]], *, positions: Any = None,
                 widths: Mapping[str, int] | None = None) -> None:
        self.units = {str(s): [int(u) for u in us] for s, us in units.items() if len(us)}
        if not self.units:
            raise ValueError("Clamp needs at least one unit")
        self.positions = positions
        self.widths = dict(widths or {})

    @property
    def n_units(self) -> int:
        return sum(len(u) for u in self.units.values())

    def edits(self, model: nn.Module, alpha: float, *, aliases: Aliases | None = None) -> list[Edit]:
        return [clamp_edit(model, site, units, float(alpha), positions=self.positions, aliases=aliases)
                for site, units in self.units.items()]

    def controls(self, model: nn.Module, n: int, *, seed: int = 0, aliases: Aliases | None = None) -> list[Intervention]:
        widths = {s: self.widths.get(s) or site_width(model, s, aliases) for s in self.units}
        out: list[Intervention] = []
        for i in range(n):
            rng = np.random.default_rng([seed, i, 0xC1A])
            units = {}
            for s, u in self.units.items():
                # random units other than the chosen ones (when the site has enough of them)
                pool = np.setdiff1d(np.arange(widths[s]), u) if widths[s] - len(u) >= len(u) else np.arange(widths[s])
                units[s] = sorted(rng.choice(pool, size=len(u), replace=False).tolist())
            out.append(Clamp(units, positions=self.positions, widths=widths))
        return out

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "units": self.units, "n_units": self.n_units,
                "positions": None if self.positions is None else repr(self.positions)}


def matched_density_features(density: np.ndarray, features: Sequence[int], *, seed: int, window: float = 0.05) -> list[int]:
    """Random features whose firing density is close to each chosen feature's (no repeats, none chosen).

    For each chosen feature, one feature drawn from the ``window`` fraction of features nearest
    to it in density rank (at least 5 candidates).
    """
    density = np.asarray(density, dtype=np.float64)
    order = np.argsort(density, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    taken = set(int(f) for f in features)
    half = max(3, int(window * len(density) / 2))
    rng = np.random.default_rng([seed, 0xFEA7])
    picks: list[int] = []
    for f in features:
        r = int(rank[int(f)])
        cand = [int(c) for c in order[max(0, r - half): r + half + 1] if int(c) not in taken]
        if not cand:
            cand = [int(c) for c in range(len(density)) if c not in taken]
        pick = int(rng.choice(cand))
        taken.add(pick)
        picks.append(pick)
    return picks


class _FeatureIntervention(Intervention):
    def __init__(self, sae: Any, features: Sequence[int], site: str, *, density: np.ndarray | None = None,
                 positions: Any = None) -> None:
        self.sae, self.site, self.positions = sae, site, positions
        self.features = [int(f) for f in features]
        d_sae = int(sae.cfg.d_sae)
        bad = [f for f in self.features if not 0 <= f < d_sae]
        if not self.features or bad:
            raise ValueError(f"{type(self).__name__}: features must be indices in [0, {d_sae}), got {features!r}")
        self.density = None if density is None else np.asarray(density, dtype=np.float64)
        if self.density is not None and self.density.shape != (d_sae,):
            raise ShapeError(f"density has shape {self.density.shape}, the SAE has {d_sae} features")

    def controls(self, model: nn.Module, n: int, *, seed: int = 0, aliases: Aliases | None = None) -> list[Intervention]:
        if self.density is None:
            raise ValueError(f"{type(self).__name__}: give density= (per-feature firing fraction) for matched controls")
        return [type(self)(self.sae, matched_density_features(self.density, self.features, seed=seed + i), self.site,
                           density=self.density, positions=self.positions) for i in range(n)]

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "site": self.site, "features": self.features, "d_sae": int(self.sae.cfg.d_sae),
                "density": None if self.density is None else [float(self.density[f]) for f in self.features]}

    def _edit(self, model: nn.Module, fn: Any, aliases: Aliases | None) -> list[Edit]:
        """One edit at the SAE's site adding ``fn(h)`` (masked to the positions)."""
        from .steer import _position_mask

        parsed, module = resolve_site(model, self.site, aliases)

        def edit(h: torch.Tensor) -> torch.Tensor:  # (B, P, D)
            delta = fn(h)
            mask = _position_mask(self.positions, h)
            if mask is not None:
                delta = delta * mask
            return h + delta

        return [Edit(parsed, module, edit)]


class SteerFeature(_FeatureIntervention):
    """Add SAE decoder directions: ``h + alpha * sum_i W_dec[i] / |W_dec[i]|`` at the SAE's site.

    The rows are unit-normalised, so alpha is in activation units whatever the SAE's scale.
    """

    kind = "steer_feature"

    def edits(self, model: nn.Module, alpha: float, *, aliases: Aliases | None = None) -> list[Edit]:
        rows = self.sae.W_dec.detach()[self.features].float()  # (k, d)
        direction = (rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)).sum(0)  # (d,)
        return self._edit(model, lambda h: float(alpha) * direction.to(h.dtype).expand_as(h), aliases)


class AblateFeatures(_FeatureIntervention):
    """Remove SAE features' contribution: ``h - alpha * sum_i f_i(h) W_dec[i]`` (alpha = 1 removes it)."""

    kind = "ablate_features"

    def edits(self, model: nn.Module, alpha: float, *, aliases: Aliases | None = None) -> list[Edit]:
        idx = torch.as_tensor(self.features, dtype=torch.long)
        w = self.sae.W_dec.detach()[idx].float()  # (k, d)

        def delta(h: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                f = self.sae.encode(h.float())[..., idx]  # (B, P, k)
            return (-float(alpha) * (f @ w)).to(h.dtype)

        return self._edit(model, delta, aliases)


def tile_copies(batch: Any, n: int) -> Any:
    """``n`` copies of a batch stacked along its first axis, copy-major (copy ``i`` = rows
    ``[i * B, (i + 1) * B)``): tensors and arrays, and dicts, lists and tuples of them; other
    values are passed through. The layout :func:`apply_copies` expects."""
    if isinstance(batch, torch.Tensor):
        return batch.repeat(n, *([1] * (batch.ndim - 1))) if batch.ndim else batch
    if isinstance(batch, np.ndarray):
        return np.concatenate([batch] * n) if batch.ndim else batch
    if isinstance(batch, Mapping):  # a tokenizer's BatchEncoding becomes a plain dict
        return {k: tile_copies(v, n) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(tile_copies(v, n) for v in batch)
    return batch


def split_copies(x: Any, n: int) -> list[Any]:
    """Inverse of :func:`tile_copies` for a result: the ``n`` copy blocks of its first axis."""
    if len(x) % n:
        raise ShapeError(f"a result of {len(x)} rows cannot be {n} equal copies")
    b = len(x) // n
    return [x[i * b:(i + 1) * b] for i in range(n)]


@contextlib.contextmanager
def apply_copies(model: nn.Module, items: Sequence[tuple[Intervention | None, float]], *,
                 aliases: Aliases | None = None) -> Iterator[None]:
    """Run ``len(items)`` interventions side by side: copy ``i`` of each batch under ``items[i]``.

    Inside the block every forward pass must carry ``n = len(items)`` equal copies of its batch,
    copy-major (:func:`tile_copies`); at each edited site one hook splits the ``(n * B, P, D)``
    tensor into its copies and edits copy ``i`` as ``items[i] = (intervention, alpha)`` would
    alone (``None``: left as it is). Every edit sees only its own copy (its own norms, masks and
    SAE codes), so each copy computes what a forward of that intervention alone computes.

    Raises
    ------
    ShapeError
        When a forward's batch is not ``n`` equal copies.
    """
    n = len(items)
    by_site: dict[tuple[int, str], tuple[Site, nn.Module, list[Any]]] = {}
    for i, (iv, alpha) in enumerate(items):
        if iv is None:
            continue
        for site, module, fn in iv.edits(model, alpha, aliases=aliases):
            by_site.setdefault((id(module), str(site)), (site, module, [None] * n))[2][i] = fn

    def per_copy(fns: list[Any]) -> Any:
        def edit(h: torch.Tensor) -> torch.Tensor:  # (n * B, P, D)
            if h.shape[0] % n:
                raise ShapeError(f"apply_copies: a batch of {h.shape[0]} rows is not {n} equal copies "
                                 "(stack the scorer's inputs with tile_copies)")
            return torch.cat([fn(part) if fn is not None else part for fn, part in zip(fns, h.chunk(n))])

        return edit

    with apply_edits([Edit(site, module, per_copy(fns)) for site, module, fns in by_site.values()]):
        yield
