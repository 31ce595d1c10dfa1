"""Sites: readable names for the tensors inside any PyTorch model.

A :class:`Site` is a module path (the model's own attribute path, as ``model.named_modules()``
spells it) plus a side: the module's ``output`` (default) or its ``input``. In text a site is
``"encoder.layer.3"`` or ``"model.layers.5.mlp.down_proj:input"``.

Aliases give different architectures shared names. They are a plain mapping, optionally with an
``{i}`` placeholder (``{"layers.{i}.resid_post": "model.layers.{i}"}``), never code per model.

Positions (tokens, atoms, genes, image patches, time steps) are whatever axes of the tensor are
neither the batch axis nor the feature axis. A site's ``layout`` names the axes (``"b t d"``,
``"b c h w"``, ``"t b c h w"``); every tool works on the canonical ``(batch, positions, features)``
view and writes back into the original layout.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from .errors import ShapeError, SiteError, close_matches

Side = Literal["output", "input"]
Aliases = Mapping[str, str]


@dataclass(frozen=True)
class Site:
    """A named tensor inside a model: module path + side (+ optional tuple index and layout).

    Parameters
    ----------
    path
        Module path as in ``model.named_modules()`` (``""`` is the model itself).
    side
        ``"output"`` (what the module returns) or ``"input"`` (its first positional argument,
        e.g. the input of ``mlp.down_proj``, whose units are the FFN neurons).
    index
        Which element when the module returns (or takes) a tuple; 0 by default, which is the
        hidden state for Hugging Face layers.
    layout
        Axis names of the tensor, one letter per axis: ``b`` batch, ``d`` (or ``c``) features, any
        other letter a position axis. ``None`` means ``"b d"`` for 2-D and ``"b p d"`` for 3-D.
    """

    path: str
    side: Side = "output"
    index: int = 0
    layout: str | None = None

    @classmethod
    def parse(cls, spec: "str | Site", *, layout: str | None = None) -> "Site":
        """Parse ``"path"``, ``"path:output"`` or ``"path:input"`` (a Site passes through)."""
        if isinstance(spec, Site):
            return spec
        path, _, side = spec.partition(":")
        side = side or "output"
        if side not in ("output", "input"):
            raise SiteError(f"site {spec!r}: side must be 'output' or 'input', got {side!r}")
        return cls(path=path, side=side, layout=layout)  # type: ignore[arg-type]

    def __str__(self) -> str:
        return self.path if self.side == "output" else f"{self.path}:{self.side}"


def expand_alias(name: str, aliases: Aliases | None) -> str:
    """Translate an alias to a site string (exact names first, then ``{i}`` templates)."""
    if not aliases:
        return name
    if name in aliases:
        return aliases[name]
    for alias, target in aliases.items():
        if "{" not in alias:
            continue
        pattern = "^" + re.escape(alias).replace(r"\{i\}", r"(?P<i>\d+)") + "$"
        m = re.match(pattern, name)
        if m:
            return target.format(**m.groupdict())
    return name


def list_sites(model: nn.Module, *, leaves_only: bool = False) -> list[str]:
    """Every module path of ``model`` (each is a valid site), in registration order.

    Parameters
    ----------
    leaves_only
        Only modules without children (linear layers, norms, activations).
    """
    return [
        name
        for name, mod in model.named_modules()
        if name and (not leaves_only or next(mod.children(), None) is None)
    ]


def resolve_site(model: nn.Module, site: "str | Site", aliases: Aliases | None = None) -> tuple[Site, nn.Module]:
    """Return the parsed :class:`Site` and the module it names, or raise a helpful :class:`SiteError`."""
    if isinstance(site, str):
        site = Site.parse(expand_alias(site, aliases))
    modules = dict(model.named_modules())
    if site.path not in modules:
        hint = close_matches(site.path, [n for n in modules if n])
        alias_hint = f" Aliases: {sorted(aliases)}." if aliases else ""
        raise SiteError(
            f"unknown site {str(site)!r} in {type(model).__name__}"
            + (f"; close matches: {hint}." if hint else ".")
            + alias_hint
            + " sciscope.core.list_sites(model) lists them all."
        )
    return site, modules[site.path]


def resolve_sites(
    model: nn.Module, sites: "list[str | Site] | str | Site", aliases: Aliases | None = None
) -> list[tuple[str, Site, nn.Module]]:
    """Resolve several sites at once; returns ``(name as given, Site, module)`` triples."""
    if isinstance(sites, (str, Site)):
        sites = [sites]
    out = []
    for s in sites:
        parsed, module = resolve_site(model, s, aliases)
        out.append((s if isinstance(s, str) else str(s), parsed, module))
    names = [n for n, _, _ in out]
    if len(set(names)) != len(names):
        raise SiteError(f"the same site is requested twice: {names}")
    return out


# ---------------------------------------------------------------------------------------------
# Layouts: any tensor <-> canonical (batch, positions, features)
# ---------------------------------------------------------------------------------------------


def _layout_axes(layout: str | None, ndim: int, site: str) -> list[str]:
    if layout is None:
        if ndim == 2:
            return ["b", "d"]
        if ndim == 3:
            return ["b", "p", "d"]
        raise ShapeError(
            f"site {site!r} gives a {ndim}-D tensor; name its axes with a layout, "
            f"e.g. Site(path, layout='b c h w') for a convolutional feature map"
        )
    axes = layout.split() if " " in layout else list(layout)
    if len(axes) != ndim:
        raise ShapeError(f"site {site!r}: layout {layout!r} names {len(axes)} axes, tensor has {ndim}")
    if axes.count("b") != 1:
        raise ShapeError(f"site {site!r}: layout {layout!r} needs exactly one batch axis 'b'")
    feat = [a for a in axes if a in ("d", "c")]
    if len(feat) != 1:
        raise ShapeError(f"site {site!r}: layout {layout!r} needs exactly one feature axis 'd' or 'c'")
    return axes


def to_canonical(t: torch.Tensor, site: Site) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """View ``t`` as ``(B, P, D)`` and return it with the inverse map back to ``t``'s layout.

    ``P`` is the product of every position axis (1 when there is none).
    """
    axes = _layout_axes(site.layout, t.ndim, str(site))
    b = axes.index("b")
    f = next(i for i, a in enumerate(axes) if a in ("d", "c"))
    pos = [i for i in range(t.ndim) if i not in (b, f)]
    perm = [b, *pos, f]
    permuted = t.permute(perm)
    shape_after_perm = permuted.shape
    canon = permuted.reshape(t.shape[b], -1, t.shape[f])
    inverse_perm = [perm.index(i) for i in range(t.ndim)]

    def back(c: torch.Tensor) -> torch.Tensor:
        return c.reshape(shape_after_perm).permute(inverse_perm)

    return canon, back
