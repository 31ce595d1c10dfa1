"""Steering: delta vectors from contrasts, injected back into the model; neuron clamping.

* :func:`contrast_vector` builds a :class:`SteeringVector` from two groups of a store's ``obs``
  (difference of means; PCA and probe direction as options).
* :func:`steer` adds ``alpha * v`` (absolute) or ``alpha * v * |h| / |v|`` (relative to the
  activation norm, per position or per example as in Physics Steering) at chosen positions.
* :func:`clamp` sets chosen units to a value (the VLA paper's intervention on FFN neurons).
* :func:`alpha_sweep` scores a sweep of alphas with a caller's metric, beside a random direction
  of equal norm and alpha = 0.

Both interventions are context managers: nothing stays registered after the block.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import pandas as pd
import torch
from torch import nn

from .errors import ContrastError, NonFiniteError, ShapeError
from .hooks import HookSet
from .io import atomic_path
from .sites import Aliases, Site, resolve_site, to_canonical
from .store import ActivationStore

GroupSpec = "str | np.ndarray | pd.Series | Mapping[str, Any]"
Positions = "None | int | slice | Sequence[int] | torch.Tensor | Callable[[torch.Tensor], torch.Tensor]"


@dataclass
class SteeringVector:
    """A direction in a site's activation space, with where it came from.

    Attributes
    ----------
    vector : Tensor
        ``(d,)`` float32.
    site : str
        The site it was read from (and is meant to be injected at), as text (``"path"`` or
        ``"path:input"``, or an alias).  A :class:`Site` given here is split into this text and
        the two fields below.
    method : str
        ``"mean_diff"``, ``"pca"``, ``"probe"``, ``"random"`` or ``"custom"``.
    meta : dict
        Group definitions and sizes, seed, source store.
    layout : str or None
        The site's axis names (``"b c h w"``) when its tensor is not ``(batch, [positions,]
        features)``; :func:`steer` applies it, so the vector is placed without repeating the site.
    index : int
        Which element of a tuple output (or input) the site names.
    """

    vector: torch.Tensor
    site: "str | Site"
    method: str = "custom"
    meta: dict[str, Any] = field(default_factory=dict)
    layout: str | None = None
    index: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.site, Site):
            # Kept as text + fields so the site stays a plain string wherever it is reported (JSON).
            self.layout = self.site.layout if self.layout is None else self.layout
            self.index = self.site.index if self.index == 0 else self.index
            self.site = str(self.site)
        self.vector = torch.as_tensor(self.vector, dtype=torch.float32).detach().reshape(-1)
        if not torch.isfinite(self.vector).all():
            raise NonFiniteError(f"steering vector for site {self.site!r} holds NaN or inf")

    @property
    def norm(self) -> float:
        return float(self.vector.norm())

    @property
    def dim(self) -> int:
        return int(self.vector.numel())

    def cosine(self, other: "SteeringVector | torch.Tensor") -> float:
        """Cosine similarity with another vector."""
        o = other.vector if isinstance(other, SteeringVector) else torch.as_tensor(other).reshape(-1)
        return float(torch.nn.functional.cosine_similarity(self.vector, o.float(), dim=0))

    def random_like(self, seed: int = 0) -> "SteeringVector":
        """A random direction of the same norm (the control for every steering claim)."""
        g = torch.Generator().manual_seed(seed)
        r = torch.randn(self.dim, generator=g)
        return SteeringVector(r * (self.norm / float(r.norm())), self.site, "random", {"seed": seed, "like": self.method},
                              layout=self.layout, index=self.index)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write as safetensors; site (with layout and index), method and meta go into the metadata."""
        from safetensors.torch import save_file

        meta = {"site": self.site, "method": self.method, "meta": json.dumps(self.meta, default=str)}
        if self.layout is not None:
            meta["layout"] = self.layout
        if self.index:
            meta["index"] = str(self.index)
        with atomic_path(path) as tmp:
            save_file({"vector": self.vector.contiguous()}, str(tmp), metadata=meta)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "SteeringVector":
        """Read a vector written by :meth:`save`."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            vec = f.get_tensor("vector")
        return cls(vec, meta.get("site", ""), meta.get("method", "custom"), json.loads(meta.get("meta", "{}")),
                   layout=meta.get("layout"), index=int(meta.get("index", 0)))

    def placed(self, model: nn.Module, site: "str | Site | None" = None,
               aliases: Aliases | None = None) -> tuple[Site, nn.Module]:
        """The :class:`Site` to inject at and its module: ``site`` if given, else the vector's own.

        A text ``site`` equal to the vector's takes the vector's layout and index.
        """
        site = self.site if site is None else site
        parsed, module = resolve_site(model, site, aliases)
        if isinstance(site, str) and site == self.site:
            parsed = dataclasses.replace(parsed, layout=self.layout, index=self.index)
        return parsed, module


def _group_mask(store: ActivationStore, spec: Any, label: str) -> np.ndarray:
    """Boolean row mask from a query string, a mask, or ``{column: value(s)}``."""
    obs = store.obs
    if isinstance(spec, str):
        try:
            mask = obs.eval(spec)
        except Exception as e:  # pandas raises many kinds here
            raise ContrastError(f"group {label} query {spec!r} failed on obs columns {list(obs.columns)}: {e}") from None
        mask = np.asarray(mask, dtype=bool)
    elif isinstance(spec, Mapping):
        mask = np.ones(len(obs), dtype=bool)
        for col, val in spec.items():
            if col not in obs.columns:
                raise ContrastError(f"group {label}: no obs column {col!r}; columns are {list(obs.columns)}")
            vals = val if isinstance(val, (list, tuple, set)) else [val]
            mask &= obs[col].isin(list(vals)).to_numpy()
    else:
        mask = np.asarray(spec, dtype=bool)
        if mask.shape != (len(obs),):
            raise ShapeError(f"group {label}: mask has shape {mask.shape}, store has {len(obs)} rows")
    if not mask.any():
        raise ContrastError(f"group {label} ({spec!r}) selects no rows of the store ({len(obs)} rows)")
    return mask


def contrast_vector(
    store: ActivationStore,
    site: "str | Site",
    *,
    a: Any,
    b: Any,
    method: Literal["mean_diff", "pca", "probe"] = "mean_diff",
    seed: int = 0,
) -> SteeringVector:
    """A steering vector pointing from group ``b`` to group ``a`` at ``site``.

    Parameters
    ----------
    store
        Activations with obs.
    site
        Which site's activations (the store's name for it).  The returned vector carries the
        site's layout and index as captured (from a :class:`Site`, or the store's manifest), so
        :func:`steer` places it without being told again.
    a, b
        The two groups: a pandas query on obs (``"lat > 50"``), a boolean mask, or
        ``{column: value or list of values}``.
    method
        ``"mean_diff"``: mean(a) - mean(b) (exactly; no normalisation).
        ``"pca"``: the first principal component of the pooled two groups, signed toward ``a`` and
        scaled to the mean difference's projection on it.
        ``"probe"``: the weight vector of a logistic probe separating a from b (in raw activation
        coordinates), signed and scaled the same way.
    seed
        For the probe's solver.
    """
    if isinstance(site, Site):
        layout, index, site = site.layout, site.index, str(site)  # capture names a Site by str(site)
    else:  # the store's manifest remembers how each site was captured
        captured = store.manifest.get("sites_requested", {}).get(site, {})
        layout, index = captured.get("layout"), captured.get("index", 0)
    mask_a = _group_mask(store, a, "a")
    mask_b = _group_mask(store, b, "b")
    overlap = int((mask_a & mask_b).sum())
    if overlap:
        raise ContrastError(f"groups a ({a!r}) and b ({b!r}) share {overlap} rows; a contrast needs disjoint groups")
    X = store.array(site)
    xa = np.asarray(X[np.flatnonzero(mask_a)], dtype=np.float64)
    xb = np.asarray(X[np.flatnonzero(mask_b)], dtype=np.float64)
    if not (np.isfinite(xa).all() and np.isfinite(xb).all()):
        raise NonFiniteError(f"site {site!r}: NaN or inf activations in the contrast groups")
    diff = xa.mean(0) - xb.mean(0)
    meta = {"a": str(a), "b": str(b), "n_a": int(mask_a.sum()), "n_b": int(mask_b.sum()), "store": str(store.path)}
    where = {"layout": layout, "index": int(index or 0)}
    if method == "mean_diff":
        return SteeringVector(torch.from_numpy(diff), site, method, meta, **where)
    if method == "pca":
        pooled = np.concatenate([xa, xb])
        pooled -= pooled.mean(0)
        _, _, vt = np.linalg.svd(pooled, full_matrices=False)
        direction = vt[0]
    elif method == "probe":
        from sklearn.linear_model import LogisticRegression

        Xab = np.concatenate([xa, xb])
        y = np.r_[np.ones(len(xa)), np.zeros(len(xb))]
        mu, sd = Xab.mean(0), Xab.std(0) + 1e-8
        clf = LogisticRegression(max_iter=2000, random_state=seed).fit((Xab - mu) / sd, y)
        direction = clf.coef_[0] / sd  # back to raw coordinates
        meta["probe_train_accuracy"] = float(clf.score((Xab - mu) / sd, y))
    else:
        raise ValueError(f"unknown method {method!r}; choose mean_diff, pca or probe")
    direction = direction / np.linalg.norm(direction)
    proj = float(diff @ direction)
    if proj < 0:
        direction, proj = -direction, -proj
    meta["cosine_with_mean_diff"] = float(proj / (np.linalg.norm(diff) + 1e-12))
    return SteeringVector(torch.from_numpy(direction * proj), site, method, meta, **where)


def _position_mask(positions: Any, h: torch.Tensor) -> torch.Tensor | None:
    """``(B, P, 1)`` float mask from a positions spec, for canonical ``h`` of shape ``(B, P, D)``."""
    if positions is None:
        return None
    b, p, _ = h.shape
    if callable(positions) and not isinstance(positions, torch.Tensor):
        m = positions(h)
    elif isinstance(positions, torch.Tensor) and positions.dtype == torch.bool:
        m = positions
    else:
        m = torch.zeros(p, dtype=torch.bool)
        idx = positions if isinstance(positions, slice) else torch.as_tensor(positions, dtype=torch.long).reshape(-1)
        m[idx] = True
    m = m.to(h.device)
    if m.ndim == 1:
        m = m.unsqueeze(0).expand(b, p)
    if tuple(m.shape) != (b, p):
        raise ShapeError(f"positions mask has shape {tuple(m.shape)}, activations have (batch, positions) = {(b, p)}")
    return m.unsqueeze(-1).to(h.dtype)


class Edit(NamedTuple):
    """One activation edit: ``fn`` maps the canonical ``(B, P, D)`` tensor at ``site`` of ``module``
    to its replacement. Interventions describe themselves as edits so that one hook can apply a
    different edit to each copy of a batch (:func:`sciscope.core.interventions.apply_copies`)."""

    site: Site
    module: nn.Module
    fn: Callable[[torch.Tensor], torch.Tensor]


@contextlib.contextmanager
def apply_edits(edits: Sequence[Edit]) -> Iterator[None]:
    """Apply every edit to each forward pass inside the block (nothing stays registered after it)."""
    with HookSet() as hooks:
        for site, module, fn in edits:
            hooks.edit(module, site, _on_canonical(site, fn))
        yield


def _on_canonical(site: Site, fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """Wrap a ``(B, P, D) -> (B, P, D)`` edit into one on the site's own layout."""

    def edit(t: torch.Tensor) -> torch.Tensor:
        h, back = to_canonical(t, site)
        return back(fn(h))

    return edit


def steer_edit(
    model: nn.Module,
    vector: "SteeringVector | torch.Tensor",
    alpha: float,
    *,
    site: "str | Site | None" = None,
    scale: Literal["absolute", "relative"] = "absolute",
    relative_to: Literal["position", "example"] = "position",
    positions: Any = None,
    aliases: Aliases | None = None,
) -> Edit:
    """The :class:`Edit` that :func:`steer` applies (same parameters)."""
    if isinstance(vector, SteeringVector):
        parsed, module = vector.placed(model, site, aliases)
        v = vector.vector
    else:
        if site is None:
            raise ShapeError("steer() needs a site (give one, or a SteeringVector that names one)")
        parsed, module = resolve_site(model, site, aliases)
        v = torch.as_tensor(vector, dtype=torch.float32).reshape(-1)
    v_norm = float(v.norm())
    if scale == "relative" and v_norm == 0:
        raise ShapeError("relative steering with a zero vector is undefined")

    def add(h: torch.Tensor) -> torch.Tensor:  # (B, P, D)
        if h.shape[-1] != v.numel():
            raise ShapeError(f"site {str(parsed)!r} has width {h.shape[-1]}, steering vector has {v.numel()}")
        vv = v.to(device=h.device, dtype=h.dtype)
        if scale == "absolute":
            delta = alpha * vv.expand_as(h)
        else:
            norms = h.norm(dim=-1, keepdim=True)  # (B, P, 1)
            if relative_to == "example":
                norms = norms.pow(2).mean(1, keepdim=True).sqrt().expand_as(norms)
            delta = alpha * (vv / v_norm) * norms
        mask = _position_mask(positions, h)
        if mask is not None:
            delta = delta * mask
        return h + delta

    return Edit(parsed, module, add)


@contextlib.contextmanager
def steer(
    model: nn.Module,
    vector: "SteeringVector | torch.Tensor",
    alpha: float,
    *,
    site: "str | Site | None" = None,
    scale: Literal["absolute", "relative"] = "absolute",
    relative_to: Literal["position", "example"] = "position",
    positions: Any = None,
    aliases: Aliases | None = None,
) -> Iterator[None]:
    """Add a steering vector at a site for every forward pass inside the block.

    ``h' = h + alpha * v`` (``scale="absolute"``) or ``h' = h + alpha * v * |h| / |v|``
    (``scale="relative"``): with ``relative_to="position"`` the norm is each position's; with
    ``"example"`` it is the root-mean-square position norm of the example, i.e. the Physics
    Steering recipe of a mean vector broadcast over space and scaled by the whole field's norm.

    Parameters
    ----------
    model
        The model to steer.
    vector
        A :class:`SteeringVector` (its site, with layout and index, is used unless ``site`` is
        given) or a ``(d,)`` tensor.
    alpha
        Strength; negative values steer the other way; 0 leaves outputs bit-identical.
    site
        Where to inject.
    positions
        Which positions to change: None (all), an index, a slice or list of indices, a boolean
        ``(P,)`` or ``(B, P)`` tensor, or ``callable(h_bpd) -> bool (B, P)``.
    """
    with apply_edits([steer_edit(model, vector, alpha, site=site, scale=scale, relative_to=relative_to,
                                 positions=positions, aliases=aliases)]):
        yield


def clamp_edit(
    model: nn.Module,
    site: "str | Site",
    units: Sequence[int] | torch.Tensor,
    value: float | torch.Tensor,
    *,
    positions: Any = None,
    aliases: Aliases | None = None,
) -> Edit:
    """The :class:`Edit` that :func:`clamp` applies (same parameters)."""
    parsed, module = resolve_site(model, site, aliases)
    idx = torch.as_tensor(units, dtype=torch.long).reshape(-1)

    def set_units(h: torch.Tensor) -> torch.Tensor:  # (B, P, D)
        if idx.numel() and (int(idx.max()) >= h.shape[-1] or int(idx.min()) < -h.shape[-1]):
            raise ShapeError(f"site {str(parsed)!r} has {h.shape[-1]} units; unit index {int(idx.max())} is out of range")
        h = h.clone()
        val = torch.as_tensor(value, dtype=h.dtype, device=h.device)
        mask = _position_mask(positions, h)
        if mask is None:
            h[..., idx] = val.expand(h.shape[0], h.shape[1], idx.numel()) if val.ndim else val
        else:
            sel = mask.bool().squeeze(-1)  # (B, P)
            current = h[..., idx]
            h[..., idx] = torch.where(sel.unsqueeze(-1), val.expand_as(current), current)
        return h

    return Edit(parsed, module, set_units)


@contextlib.contextmanager
def clamp(
    model: nn.Module,
    site: "str | Site",
    units: Sequence[int] | torch.Tensor,
    value: float | torch.Tensor,
    *,
    positions: Any = None,
    aliases: Aliases | None = None,
) -> Iterator[None]:
    """Set chosen units (feature channels) of a site to ``value`` inside the block.

    For FFN neurons use the input side of the down-projection
    (``"model.layers.3.mlp.down_proj:input"``): the projection then runs on the clamped neurons.

    Parameters
    ----------
    units
        Indices along the feature axis.
    value
        A scalar or one value per unit.
    positions
        As in :func:`steer` (None = every position).
    """
    with apply_edits([clamp_edit(model, site, units, value, positions=positions, aliases=aliases)]):
        yield


@dataclass
class SteeringSweep:
    """An alpha sweep: the metric per alpha for the steering vector and its controls.

    Attributes
    ----------
    table : DataFrame
        Tidy: ``alpha``, ``condition`` (``"steer"`` or ``"random-<seed>"``), ``metric``, ``value``.
    params : dict
        Site, scale, alphas, seeds, vector provenance.
    """

    table: pd.DataFrame
    params: dict[str, Any]

    def effect(self, metric: str | None = None) -> pd.DataFrame:
        """Metric per alpha minus its value at alpha = 0, steering vs mean of random controls."""
        t = self.table if metric is None else self.table[self.table.metric == metric]
        t = t.assign(kind=np.where(t.condition == "steer", "steer", "random"))
        wide = t.groupby(["metric", "alpha", "kind"]).value.mean().unstack("kind")
        base = wide.xs(0.0, level="alpha") if 0.0 in wide.index.get_level_values("alpha") else None
        if base is not None:
            wide = wide.sub(base, level="metric")
        return wide.reset_index()

    def slope(self, metric: str, condition: str = "steer") -> float:
        """Least-squares slope of the metric against alpha for one condition."""
        t = self.table[(self.table.metric == metric) & (self.table.condition.str.startswith(condition))]
        t = t[np.isfinite(t.value)]
        return float(np.polyfit(t.alpha, t.value, 1)[0]) if len(t) > 1 else float("nan")

    def plot(self, metric: str | None = None, *, ax: Any = None, legend: bool = True) -> Any:
        """Metric vs alpha: the steering vector solid, each random direction a thin grey line inside
        their grey min-max envelope ("random directions (N)"), alpha = 0 a hollow black circle.

        Parameters
        ----------
        metric
            Metric to draw (default: the first in the table).
        ax
            Axes to draw into (a new figure when None).
        legend
            Draw the legend (below the axes, so it never hides a curve).

        Returns
        -------
        matplotlib.axes.Axes
        """
        from .plotting import draw_alpha_sweep, get_ax

        metric = metric or self.table.metric.iloc[0]
        ax = get_ax(ax, figsize=(5.0, 3.8))
        t = self.table[self.table.metric == metric]
        curves = {str(c): g.groupby("alpha").value.mean().sort_index() for c, g in t.groupby("condition", sort=False)}
        steered = curves.pop("steer", pd.Series(dtype=float))
        draw_alpha_sweep(ax, steered, curves, label="steering vector", legend=legend)
        ax.set_xlabel("alpha" + (" (relative to |h|)" if self.params.get("scale") == "relative" else ""))
        ax.set_ylabel(metric)
        ax.set_title(f"steering at {self.params.get('site')}", fontsize=9)
        return ax

    def save(self, directory: str | os.PathLike[str]) -> None:
        """Write ``sweep.csv`` and ``params.json`` (atomically)."""
        from .io import write_json, write_table

        directory = Path(directory)
        write_table(directory / "sweep.csv", self.table)
        write_json(directory / "params.json", self.params)


def alpha_sweep(
    model: nn.Module,
    vector: SteeringVector,
    alphas: Sequence[float],
    evaluate: Callable[[nn.Module], "float | Mapping[str, float]"],
    *,
    site: str | None = None,
    scale: Literal["absolute", "relative"] = "absolute",
    relative_to: Literal["position", "example"] = "position",
    positions: Any = None,
    n_random: int = 1,
    seed: int = 0,
    aliases: Aliases | None = None,
    progress: bool = True,
) -> SteeringSweep:
    """Score ``evaluate(model)`` under steering for every alpha, with random-direction controls.

    Alpha = 0 is always included (the unsteered baseline). ``evaluate`` returns a number or a
    dict of named numbers (e.g. validity, group frequency, probe-predicted latitude); a NaN from
    a diverged rollout is kept as NaN and the sweep goes on.

    Parameters
    ----------
    n_random
        How many random directions of equal norm to run as controls (seeds ``seed``,
        ``seed + 1``, ...).
    """
    from tqdm.auto import tqdm

    alphas = sorted(set(float(a) for a in alphas) | {0.0})
    vectors = [("steer", vector)] + [(f"random-{i}", vector.random_like(seed + i)) for i in range(n_random)]
    rows = []
    jobs = [(c, v, a) for c, v in vectors for a in alphas]
    for cond, vec, alpha in tqdm(jobs, desc="alpha sweep", disable=not progress):
        with steer(model, vec, alpha, site=site, scale=scale, relative_to=relative_to, positions=positions, aliases=aliases):
            result = evaluate(model)
        if not isinstance(result, Mapping):
            result = {"metric": result}
        for metric, value in result.items():
            rows.append({"alpha": alpha, "condition": cond, "metric": metric, "value": float(value)})
    params = {
        "site": str(site or vector.site),
        "layout": site.layout if isinstance(site, Site) else vector.layout if site in (None, vector.site) else None,
        "scale": scale,
        "relative_to": relative_to,
        "alphas": alphas,
        "n_random": n_random,
        "seed": seed,
        "vector_method": vector.method,
        "vector_norm": vector.norm,
        "vector_meta": vector.meta,
    }
    return SteeringSweep(pd.DataFrame(rows), params)
