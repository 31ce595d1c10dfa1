"""The subspace-illusion check: which part of a steered direction the next layer actually reads.

Makelov et al. ("Is This the Subspace You Are Looking For?", 2023) show that patching or steering
along a direction ``v`` can move a model's output while ``v`` says nothing about how the model
computes: ``v`` is the sum of a part in the *null space* of the weights that read the site
(disconnected: the data varies along it, the concept separates along it, but no weight reads it)
and a small part in their *row space* along which the data never varies (dormant: a pathway the
model has but does not use). The effect is then carried by the dormant part alone, and the
"concept direction" is an illusion.

The check, for one added vector at one site:

1. :func:`reading_subspace` finds the weights that read the site's tensor, generically: during one
   forward pass, every ``nn.Linear``, ``transformers`` ``Conv1D`` (weight ``(in, out)``),
   ``nn.ConvNd`` or ``F.linear``/``matmul`` with a model parameter whose input *is* the site's
   tensor (object identity, through views, reshapes, dtype casts and dropout); a LayerNorm /
   RMSNorm in between is followed to the linears reading its output, with its centring (LayerNorm
   removes the all-ones direction) and gain folded in. Anything else that consumes the tensor (an
   addition into a residual stream, a nonlinearity, attention scores) is named in the result, and
   the check then says "not applicable": a residual stream is read by everything downstream, so a
   split by the next layer's weights means nothing there.
2. :func:`split_direction` splits ``v = v_row + v_null`` exactly (orthogonal projection).
3. :func:`illusion_check` scores the model with the whole vector, with ``v_row`` alone and with
   ``v_null`` alone (the two parts add up to the injected vector, also for relative scaling), and
   measures how dormant ``v_row`` is on the site's own activations.
4. :func:`subspace_analysis` runs it after the steering stage on every plan that adds a vector,
   at the plan's largest alpha that did not break the model; :func:`check_direction` runs it on
   any direction (a DAS or probe direction) outside the pipeline.

For an MLP's hidden units (``block_components(...)[i].mlp_hidden``, read only by ``mlp_reader``)
the null space is real: ``d_ff > d_model`` leaves ``d_ff - d_model`` unread dimensions.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .capture import _forward  # a batch as keyword args (dict), positional args (tuple/list) or one tensor
from .errors import ShapeError, SiteError
from .hooks import HookSet
from .interventions import AddVector
from .sites import Aliases, Site, _layout_axes, resolve_site, to_canonical
from .steer import SteeringVector, _position_mask

if TYPE_CHECKING:
    from .context import RunContext
    from .experiment import Analysis, Scorer

log = logging.getLogger("sciscope.core.subspace")

# ------------------------------------------------------------------------------------------------
# thresholds (named, with why)
# ------------------------------------------------------------------------------------------------

#: A part "carries" the effect when, injected alone, it reproduces at least this fraction of the
#: whole vector's effect with the same sign. Past a linear reader the two parts' effects add up to
#: the whole, so at most one part can pass without the other being of the opposite sign: this is
#: the majority of the effect.
CARRIED_FRACTION = 0.5
#: ``v_row`` is "a small part of v" when its share of ``|v|^2`` is below this fraction of the
#: share a random direction has (``rank / d``: 0.25 for an MLP with ``d_ff = 4 d_model``). Below
#: half of chance the direction points into the unread space more than a random one does, i.e.
#: what makes it the concept direction (its largest part) is not what the model reads.
ROW_SHARE_VS_CHANCE = 0.5
#: ``v_row`` is "dormant" when the data's standard deviation along it is below this fraction of
#: the median standard deviation along random unit directions of the read subspace: an order of
#: magnitude quieter than a typical read direction, a pathway the weights have and the data does
#: not use (Makelov et al.'s dormant direction has none at all).
DORMANT_RATIO = 0.1
#: An effect of at most this much (times ``max(1, |score at alpha 0|)``) is no effect to split:
#: the fractions would be ratios of rounding errors.
NO_EFFECT_RTOL = 1e-6
#: Random unit directions of the read subspace the dormancy measure compares with.
N_RANDOM_DIRECTIONS = 64
#: Rows of the site's activations kept for the dormancy measure (the first ones the scorer makes).
MAX_ROWS = 4096

CARRIED_ROW, ILLUSION, CARRIED_NULL, MIXED, NOT_APPLICABLE, NO_EFFECT = (
    "carried by the read subspace", "dormant-direction illusion", "carried by the unread part",
    "neither part alone carries it", "not applicable", "no effect to split")
#: Verdicts that flag the steering claim (the report should not read the effect as the concept's).
FLAGGED = (ILLUSION, CARRIED_NULL, MIXED)

# ops that pass the tensor on unchanged in value (a view, a cast, a copy, eval-mode dropout): what
# reads their result reads the site; the feature axis is followed through shape changes
_ALIAS_OPS = {"view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "contiguous", "to", "float", "half",
              "bfloat16", "double", "type", "type_as", "clone", "detach", "dropout", "alpha_dropout", "feature_dropout",
              "__getitem__", "unsqueeze", "squeeze", "expand", "expand_as", "permute", "transpose", "movedim",
              "requires_grad_", "cpu", "cuda", "identity"}
# ops that read only the tensor's shape, dtype and device
_SHAPE_ONLY = {"zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like", "randint_like",
               "new_zeros", "new_ones", "new_empty", "new_full", "new_tensor"}
# ops that take the values out of the tensor without returning a tensor (or write them into another)
_VALUE_READS = {"__setitem__", "numpy", "tolist", "item", "__array__", "copy_", "index_put_", "scatter_"}
# ops that read the tensor's last axis with a 2-D weight: (name, index of the activation, index of
# the weight, whether the weight is stored (out, in) as F.linear's is, else (in, out))
_MATMUL_OPS = {"linear": (0, 1, True), "addmm": (1, 2, False), "matmul": (0, 1, False), "mm": (0, 1, False),
               "__matmul__": (0, 1, False)}


# ------------------------------------------------------------------------------------------------
# the reading subspace
# ------------------------------------------------------------------------------------------------


@dataclass
class ReadingSubspace:
    """The row space of the weights that read a site's tensor.

    Attributes
    ----------
    site
        The site, as text.
    dim
        The site's feature width ``D``.
    basis
        ``(k, D)`` orthonormal rows spanning the read subspace (``k = rank``).
    singular_values
        ``(min(R, D),)`` singular values of the stacked reading rows (``R`` rows), largest first.
    rtol
        Relative tolerance of the rank: singular values at most ``rtol * s_max`` count as zero.
    readers
        The reading weights: ``{"name", "kind", "via", "rows"}`` per reader (``via``: the norms
        the tensor went through on the way, outermost last; ``rows``: how many rows it adds).
    other_uses
        What else consumed the tensor (``"add"``, ``"gelu"``, ``"h.0.attn (reads axis 1)"``):
        non-empty means the split by the readers' weights does not describe every path.
    through_norm
        Norms on the way to a reader: the null space is then the first-order one (a part the
        norm's linear map removes can still change its scale).
    explicit
        The readers were given by the caller (not discovered).
    """

    site: str
    dim: int
    basis: np.ndarray
    singular_values: np.ndarray
    rtol: float
    readers: list[dict[str, Any]] = field(default_factory=list)
    other_uses: list[str] = field(default_factory=list)
    through_norm: list[str] = field(default_factory=list)
    explicit: bool = False

    @property
    def rank(self) -> int:
        """Dimension of the read subspace."""
        return int(self.basis.shape[0])

    @property
    def null_dim(self) -> int:
        """Dimension of its orthogonal complement (what no reader sees)."""
        return self.dim - self.rank

    @property
    def applicable(self) -> bool:
        """Whether the split is informative: readers were found and nothing else uses the tensor."""
        return bool(self.readers) and not self.other_uses

    @property
    def reason(self) -> str:
        """Why the split is or is not informative, in words."""
        if not self.readers and not self.other_uses:
            return "nothing read the site's tensor in the forward pass"
        if self.other_uses:
            uses = ", ".join(sorted(set(self.other_uses))[:6])
            return (f"the tensor also reaches {uses} (not a linear reader: a residual path or a nonlinearity), "
                    "so it is read beyond the found weights and the split is uninformative")
        if not self.readers:
            return "no linear reader found"
        names = ", ".join(r["name"] for r in self.readers)
        return (f"read only by {names}" + (" (given by the caller)" if self.explicit else "")
                + (f" through {', '.join(self.through_norm)}" if self.through_norm else "")
                + f": rank {self.rank} of {self.dim}, null space of dimension {self.null_dim}")

    def split(self, v: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """:func:`split_direction` of ``v`` on this basis."""
        return split_direction(v, self.basis)

    def describe(self) -> dict[str, Any]:
        """JSON-able summary (no basis)."""
        return {"site": self.site, "dim": self.dim, "rank": self.rank, "null_dim": self.null_dim, "rtol": self.rtol,
                "readers": [r["name"] for r in self.readers], "other_uses": sorted(set(self.other_uses)),
                "through_norm": list(self.through_norm), "explicit": self.explicit, "applicable": self.applicable,
                "reason": self.reason}


def split_direction(v: np.ndarray | torch.Tensor, basis: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Split ``v`` into its part in the span of ``basis`` and the rest: ``v = v_row + v_null``.

    Parameters
    ----------
    v
        ``(D,)`` or ``(n, D)`` directions.
    basis
        ``(k, D)`` orthonormal rows (:attr:`ReadingSubspace.basis`); ``k = 0`` puts all of ``v``
        in the null part.

    Returns
    -------
    (v_row, v_null)
        float64 arrays of ``v``'s shape; ``v_row = v B^T B`` is the orthogonal projection and
        ``v_null = v - v_row``, so the two add up to ``v`` (to float64 rounding) and are orthogonal.
    """
    vv = np.asarray(v.detach().cpu() if isinstance(v, torch.Tensor) else v, dtype=np.float64)
    b = np.asarray(basis.detach().cpu() if isinstance(basis, torch.Tensor) else basis, dtype=np.float64)
    if b.ndim != 2 or b.shape[1] != vv.shape[-1]:
        raise ShapeError(f"split_direction: basis of shape {b.shape} does not fit a direction of width {vv.shape[-1]}")
    row = (vv @ b.T) @ b  # (..., k) -> (..., D)
    return row, vv - row


@dataclass
class _Norm:
    """A norm on the way from the site to a reader: a module (gain probed after the pass) or the
    arguments of a functional ``layer_norm`` / ``rms_norm``."""

    name: str
    module: nn.Module | None = None
    gain: np.ndarray | None = None
    centred: bool | None = None


@dataclass
class _Tracked:
    tensor: torch.Tensor  # kept alive so that its id is not reused during the pass
    axis: int  # the feature axis (non-negative)
    chain: tuple[_Norm, ...]  # norms between the site and this tensor


def _is_hf_conv1d(m: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2): a linear layer whose weight is stored ``(in, out)``."""
    return type(m).__name__ == "Conv1D" and isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.ndim == 2


def _is_norm(m: nn.Module) -> bool:
    """A per-vector norm over the last axis (LayerNorm, RMSNorm and their Hugging Face copies)."""
    if isinstance(m, (nn.LayerNorm, getattr(nn, "RMSNorm", nn.LayerNorm))):
        return True
    name = type(m).__name__
    return "Norm" in name and not any(k in name for k in ("Batch", "Group", "Instance")) and next(m.children(), None) is None


def _linear_rows(m: nn.Module) -> tuple[str, torch.Tensor, int] | None:
    """``(kind, rows (out, in), axis it reads: -1 last, 1 channels)`` of a linear-type module, or None."""
    if isinstance(m, nn.Linear):
        return "linear", m.weight, -1
    if _is_hf_conv1d(m):
        return "conv1d (transformers)", m.weight.T, -1
    if isinstance(m, nn.modules.conv._ConvNd) and not m.transposed and m.groups == 1:
        w = m.weight  # (out, in, *kernel): every (output channel, kernel offset) is one row over the input channels
        return type(m).__name__.lower(), w.movedim(1, -1).reshape(-1, w.shape[1]), 1
    return None


def _new_axis(axis: int, before: tuple[int, ...], after: tuple[int, ...], func: Any, args: tuple) -> int | None:
    """Where the feature axis is in an alias op's result, or None when it cannot be told (or the
    op cut it)."""
    name = getattr(func, "__name__", "")
    nd = len(before)
    if name == "permute":
        rest = args[1:]
        dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (tuple, list, torch.Size)) else rest
        dims = [int(d) % nd for d in dims]
        return dims.index(axis) if len(dims) == nd else None
    if name == "transpose" and len(args) >= 3:
        d0, d1 = int(args[1]) % nd, int(args[2]) % nd
        return d1 if axis == d0 else d0 if axis == d1 else axis
    if name in ("permute", "transpose", "movedim"):
        return None
    # shape-only ops: the axis survives when everything up to it (or from it on) is unchanged
    if tuple(after[:axis + 1]) == tuple(before[:axis + 1]):
        return axis
    tail = nd - axis
    if len(after) >= tail and tuple(after[len(after) - tail:]) == tuple(before[axis:]):
        return len(after) - tail
    return None


class _Tracer(TorchFunctionMode):
    """Follows the site's tensor through one forward pass: who reads it, who else uses it.

    Modules are seen by hooks (a linear-type module or a norm whose input is a tracked tensor is a
    reader; the ops inside it are its own business); torch functions are seen by this mode (an
    alias op tracks its result; ``F.linear``/``addmm``/``matmul`` with a model parameter is a
    reader; ``layer_norm``/``rms_norm`` is a norm to follow; anything else returning a tensor is an
    "other use").
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.tracked: dict[int, _Tracked] = {}
        self.readers: list[tuple[str, str, torch.Tensor, tuple[_Norm, ...]]] = []  # (name, kind, rows (out, d_t), chain)
        self.other: list[str] = []
        self.inside = 0  # depth of reader modules running on a tracked tensor (their ops are theirs)
        self.entered: dict[int, list[bool]] = {}  # per module: whether each open call read a tracked tensor
        self.params = {id(p): n for n, p in model.named_parameters()}
        self.names = {id(m): n for n, m in model.named_modules()}
        self.seen_site = 0

    def track(self, t: torch.Tensor, axis: int, chain: tuple[_Norm, ...] = ()) -> None:
        self.tracked[id(t)] = _Tracked(t, axis % t.ndim, chain)

    def lookup(self, x: Any) -> _Tracked | None:
        e = self.tracked.get(id(x)) if isinstance(x, torch.Tensor) else None
        return e if e is not None and e.tensor is x else None

    # -- module hooks ----------------------------------------------------------------------------------
    def pre_hook(self, m: nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)
        e = self.lookup(x)
        self.entered.setdefault(id(m), []).append(e is not None)  # popped by post_hook (re-entrant calls nest)
        if e is None:
            return None
        self.inside += 1
        name = self.names.get(id(m), type(m).__name__)
        lin = _linear_rows(m)
        if lin is not None:
            kind, rows, reads = lin
            if reads % x.ndim != e.axis:
                self.other.append(f"{name} (reads axis {reads % x.ndim}, the features are on axis {e.axis})")
            else:
                self.readers.append((name, kind, rows.detach(), e.chain))
        elif _is_norm(m):
            if e.axis != x.ndim - 1:
                self.other.append(f"{name} (a norm over the last axis; the features are on axis {e.axis})")
        return None

    def post_hook(self, m: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        stack = self.entered.get(id(m))
        if not stack or not stack.pop():
            return None
        self.inside -= 1
        x = args[0] if args else next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)
        e = self.lookup(x)
        if e is not None and _is_norm(m) and e.axis == x.ndim - 1 and isinstance(out, torch.Tensor):
            self.track(out, out.ndim - 1, (*e.chain, _Norm(self.names.get(id(m), type(m).__name__), module=m)))
        return None

    # -- torch functions ------------------------------------------------------------------------------
    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.inside or not self.tracked:
            return out
        hits = [(i, e) for i, a in enumerate(args) if (e := self.lookup(a)) is not None]
        hits += [(k, e) for k, a in kwargs.items() if (e := self.lookup(a)) is not None]
        # a tracked tensor inside a container (torch.cat([h, ...]), torch.stack, list-form einsum,
        # an index tuple): the op mixes its values with others', which no reader's rows describe
        nested = any(self.lookup(t) is not None for a in (*args, *kwargs.values()) if not isinstance(a, torch.Tensor)
                     for t in _tensors(a))
        if not hits and not nested:
            return out
        name = getattr(func, "__name__", str(func))
        if nested and _contains_tensor(out) and name not in _SHAPE_ONLY:
            self.other.append(name)  # (an alias op counts too: __getitem__ reads a tensor in its index as indices)
            return out
        if not hits:
            return out  # read no values (a shape-only op, or no tensor back)
        if name in _VALUE_READS or (name.endswith("_") and not name.startswith("_") and name != "requires_grad_"):
            self.other.append(name)  # values written elsewhere, read as numbers, or edited in place
            return out
        if not _contains_tensor(out) or name in _SHAPE_ONLY:
            return out  # .size(), .shape, .dtype, zeros_like: read no values
        pos, e = hits[0]
        x = args[pos] if isinstance(pos, int) else kwargs[pos]
        if name in _ALIAS_OPS and isinstance(out, torch.Tensor) and len(hits) == 1:
            axis = _new_axis(e.axis, tuple(x.shape), tuple(out.shape), func, args)
            if axis is not None and out.shape[axis] == x.shape[e.axis]:
                self.track(out, axis, e.chain)
                return out
        if name in _MATMUL_OPS and len(hits) == 1:
            xi, wi, out_in = _MATMUL_OPS[name]
            w = args[wi] if len(args) > wi else kwargs.get("weight")
            if pos == xi and isinstance(w, torch.Tensor) and w.ndim == 2 and id(w) in self.params:
                if e.axis == x.ndim - 1:
                    rows = w if out_in else w.T
                    self.readers.append((f"{self.params[id(w)]} ({name})", name, rows.detach(), e.chain))
                    return out
        if name in ("layer_norm", "rms_norm") and pos == 0 and e.axis == x.ndim - 1 and isinstance(out, torch.Tensor):
            w = args[2] if len(args) > 2 else kwargs.get("weight")
            gain = (w.detach().float().cpu().numpy().astype(np.float64) if isinstance(w, torch.Tensor)
                    else np.ones(x.shape[-1]))
            self.track(out, out.ndim - 1, (*e.chain, _Norm(name, gain=gain, centred=name == "layer_norm")))
            return out
        self.other.append(name)
        return out


def _tensors(obj: Any, depth: int = 0) -> Iterator[torch.Tensor]:
    """Every tensor in what a forward returned (tensors, tuples, lists, dicts and ModelOutputs)."""
    if depth > 4:
        return
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for o in obj:
            yield from _tensors(o, depth + 1)
    elif isinstance(obj, Mapping):
        for o in obj.values():
            yield from _tensors(o, depth + 1)


def _contains_tensor(obj: Any) -> bool:
    if isinstance(obj, torch.Tensor):
        return True
    if isinstance(obj, (tuple, list)):
        return any(_contains_tensor(o) for o in obj)
    return False


def _norm_map(step: _Norm, d: int) -> np.ndarray:
    """``(d, d)`` linear part of a norm, up to its input-dependent scale: ``diag(g) P`` where ``P``
    removes the all-ones direction for a centring norm (LayerNorm) and is ``I`` otherwise (RMSNorm).

    A module's gain and centring are probed on two inputs rather than read off its class, so
    variants (``1 + weight`` gains, no affine weight) come out right: ``norm(x) - norm(-x) =
    2 g * P x / s(x)`` for ``x`` alternating +-1, and centring shows as ``norm(x + 3) = norm(x)``.
    """
    if step.module is not None:
        m = step.module
        p = next(m.parameters(), None)
        dtype, device = (p.dtype, p.device) if p is not None else (torch.float32, torch.device("cpu"))
        x = torch.ones(1, d, dtype=torch.float64)
        x[0, 1::2] = -1.0
        tol = max(1e-4, 20 * float(torch.finfo(dtype).eps))
        with torch.no_grad():
            run = lambda t: m(t.to(device=device, dtype=dtype)).double().cpu()  # noqa: E731
            y, y_shift, y_neg, y_big = run(x), run(x + 3.0), run(-x), run(2.0 * x)
        scale = float(y.norm()) + 1e-12
        if float((y_big - y).norm()) > tol * scale * 10:
            raise _NotANorm(step.name)
        centred = float((y_shift - y).norm()) <= tol * scale * 10
        px = (x - x.mean()) if centred else x
        gain = ((y - y_neg) / (2.0 * px))[0].numpy()
    else:
        gain, centred = np.asarray(step.gain, dtype=np.float64), bool(step.centred)
    proj = np.eye(d) - (np.full((d, d), 1.0 / d) if centred else 0.0)
    return gain[:, None] * proj


class _NotANorm(Exception):
    pass


@contextlib.contextmanager
def _tracing(model: nn.Module, site: Site, module: nn.Module) -> Iterator[_Tracer]:
    """Inside the block, forward passes of ``model`` are traced from ``site`` on (hooks removed on exit)."""
    tracer = _Tracer(model)

    def start(t: torch.Tensor) -> torch.Tensor:
        # a fresh tensor, as a steering edit makes one: only what consumes the edited tensor counts
        axes = _layout_axes(site.layout, t.ndim, str(site))
        axis = next(i for i, a in enumerate(axes) if a in ("d", "c"))
        new = t.view_as(t)
        tracer.track(new, axis)
        tracer.seen_site += 1
        return new

    handles = []
    with HookSet() as hooks:
        hooks.edit(module, site, start)  # registered first: it runs before the reader hooks below
        try:
            for m in model.modules():
                if _linear_rows(m) is not None or _is_norm(m):
                    handles.append(m.register_forward_pre_hook(tracer.pre_hook, with_kwargs=True))
                    handles.append(m.register_forward_hook(tracer.post_hook, with_kwargs=True))
            with tracer:
                yield tracer
        finally:
            for h in handles:
                h.remove()


def _default_rtol(shape: tuple[int, int]) -> float:
    """numpy's ``matrix_rank`` rule at the precision weights are stored in: ``max(R, D) * eps(float32)``."""
    return float(max(shape) * np.finfo(np.float32).eps)


def _basis(rows: np.ndarray, rtol: float | None) -> tuple[np.ndarray, np.ndarray, float]:
    """Orthonormal basis ``(k, D)`` of the row space of ``rows`` ``(R, D)``, its singular values, the rtol."""
    r, d = rows.shape
    if r == 0:
        return np.zeros((0, d)), np.zeros(0), float(rtol or 0.0)
    rtol = _default_rtol(rows.shape) if rtol is None else float(rtol)
    if r > 2 * d:  # many rows (a residual read by q, k, v, gate, up): the D x D Gram matrix is cheaper
        evals, evecs = np.linalg.eigh(rows.T @ rows)
        order = np.argsort(evals)[::-1]
        s = np.sqrt(np.clip(evals[order], 0.0, None))
        vt = evecs[:, order].T
    else:
        _, s, vt = np.linalg.svd(rows, full_matrices=False)
    keep = s > rtol * (s[0] if s.size else 0.0)
    return vt[: len(s)][keep], s, rtol


def reading_subspace(
    model: nn.Module,
    site: "str | Site",
    inputs: Any = None,
    *,
    forward: Callable[[nn.Module], Any] | None = None,
    readers: Sequence[str] | None = None,
    aliases: Aliases | None = None,
    rtol: float | None = None,
) -> ReadingSubspace:
    """The row space of the weights that read ``site``'s tensor, found in one forward pass.

    Parameters
    ----------
    model
        The model (unchanged; hooks live only during the pass).
    site
        The site (text, alias or :class:`Site`; its layout says which axis holds the features).
    inputs
        One batch for ``model``: a dict of keyword arguments, a tuple of positional ones, or a
        tensor. Its values do not matter, only the path the tensor takes.
    forward
        Instead of ``inputs``: ``forward(model)`` runs the pass (e.g. a scorer).
    readers
        Module paths of the reading layers, given instead of discovered (linear-type modules:
        ``nn.Linear``, ``Conv1D``, ``nn.ConvNd``); no forward pass is run and the result trusts
        that nothing else reads the site.
    aliases
        Site aliases of the model.
    rtol
        Relative tolerance of the rank (default ``max(R, D) * eps(float32)``, numpy's rule at
        float32, the precision weights are kept in).

    Returns
    -------
    ReadingSubspace
        Basis, readers, and whatever else uses the tensor (then :attr:`~ReadingSubspace.applicable`
        is False): an op that is not a linear read (a residual addition, a nonlinearity, a copy of
        its values), or the model's return value (what the caller does with it is not seen).

    Raises
    ------
    SiteError
        When the forward pass never reaches the site, or a given reader is not a linear-type module.
    """
    parsed, module = resolve_site(model, site, aliases)
    modules = dict(model.named_modules())
    if readers is not None:
        found: list[tuple[str, str, torch.Tensor, tuple[_Norm, ...]]] = []
        for path in readers:
            if path not in modules:
                raise SiteError(f"reading_subspace: no module {path!r} in {type(model).__name__}")
            lin = _linear_rows(modules[path])
            if lin is None:
                raise SiteError(f"reading_subspace: reader {path!r} ({type(modules[path]).__name__}) is not a linear-type "
                                "module (nn.Linear, Conv1D, nn.ConvNd); give the linears after a norm instead")
            found.append((path, lin[0], lin[1].detach(), ()))
        other: list[str] = []
        width = int(found[0][2].shape[1]) if found else 0
        explicit = True
    else:
        if (inputs is None) == (forward is None):
            raise ValueError("reading_subspace: give exactly one of inputs (a batch) or forward (a callable), or readers=")
        with torch.no_grad(), _tracing(model, parsed, module) as tracer:
            returned = forward(model) if forward is not None else _forward(model, inputs)
            # a tensor the pass hands back (last_hidden_state, hidden_states) is read outside the
            # model (a scorer's probe, a pooling): by weights no hook can see
            escaped = any(tracer.lookup(t) is not None for t in _tensors(returned))
        if not tracer.seen_site:
            raise SiteError(f"reading_subspace: the forward pass never reached site {str(parsed)!r}")
        found, other, explicit = tracer.readers, list(tracer.other), False
        if escaped:
            other.append("the model's output (returned, read outside the model)")
        first = next(iter(tracer.tracked.values()))
        width = int(first.tensor.shape[first.axis])
    blocks, described, norms = [], [], []
    for name, kind, rows, chain in found:
        r = rows.detach().float().cpu().numpy().astype(np.float64)  # (out, d_t)
        try:
            for step in reversed(chain):  # back from the reader's input to the site: rows @ T_k ... T_1
                r = r @ _norm_map(step, r.shape[1])
        except _NotANorm as bad:
            other.append(f"{bad.args[0]} (not a scale-invariant norm)")
            continue
        if r.shape[1] != width:
            other.append(f"{name} (reads width {r.shape[1]}, the site has {width})")
            continue
        blocks.append(r)
        via = [s.name for s in chain]
        norms += [n for n in via if n not in norms]
        described.append({"name": name, "kind": kind, "via": via, "rows": int(r.shape[0])})
    stacked = np.concatenate(blocks) if blocks else np.zeros((0, width))
    basis, s, rtol_used = _basis(stacked, rtol)
    return ReadingSubspace(str(parsed), width, basis, s, rtol_used, described, other, norms, explicit)


# ------------------------------------------------------------------------------------------------
# the check
# ------------------------------------------------------------------------------------------------


@dataclass
class IllusionCheck:
    """Which part of an added vector carries its effect on the headline score.

    Attributes
    ----------
    site, alpha, score, scale
        Where, at which strength, which score, absolute or relative injection.
    score_zero, score_full, score_row, score_null
        The score at alpha 0, with the whole vector, with ``v_row`` alone, with ``v_null`` alone.
    effect_full, effect_row, effect_null
        Each minus ``score_zero``.
    row_fraction, null_fraction
        ``effect_row / effect_full`` and ``effect_null / effect_full``.
    row_share
        ``|v_row|^2 / |v|^2``; ``chance_share`` is a random direction's (``rank / D``).
    dormancy
        Std of the site's activations along ``v_row / |v_row|`` over the median std along
        :data:`N_RANDOM_DIRECTIONS` random unit directions of the read subspace (1: as lively as a
        typical read direction; near 0: dormant).
    row_variance_share
        Of the data's variance along ``v`` (without the cross term), the share along ``v_row``:
        how much of what the direction measures in the data the model can read.
    n_rows
        Activation rows the dormancy was measured on.
    verdict, reason
        One of :data:`CARRIED_ROW`, :data:`ILLUSION`, :data:`CARRIED_NULL`, :data:`MIXED`,
        :data:`NOT_APPLICABLE`, :data:`NO_EFFECT`, and why.
    subspace
        The :class:`ReadingSubspace` used.
    """

    site: str
    alpha: float
    score: str
    scale: str
    score_zero: float
    score_full: float
    score_row: float
    score_null: float
    row_share: float
    chance_share: float
    dormancy: float
    row_variance_share: float
    n_rows: int
    verdict: str
    reason: str
    subspace: ReadingSubspace

    @property
    def effect_full(self) -> float:
        return self.score_full - self.score_zero

    @property
    def effect_row(self) -> float:
        return self.score_row - self.score_zero

    @property
    def effect_null(self) -> float:
        return self.score_null - self.score_zero

    @property
    def row_fraction(self) -> float:
        return _ratio(self.effect_row, self.effect_full)

    @property
    def null_fraction(self) -> float:
        return _ratio(self.effect_null, self.effect_full)

    @property
    def flagged(self) -> bool:
        """Whether the verdict flags the steering claim."""
        return self.verdict in FLAGGED

    def to_row(self) -> dict[str, Any]:
        """One flat row for ``subspace_check.csv``."""
        return {"site": self.site, "alpha": self.alpha, "score": self.score, "scale": self.scale, "verdict": self.verdict,
                "flagged": self.flagged, "score_zero": self.score_zero, "effect_full": self.effect_full,
                "effect_row": self.effect_row, "effect_null": self.effect_null, "row_fraction": self.row_fraction,
                "null_fraction": self.null_fraction, "row_share": self.row_share, "chance_share": self.chance_share,
                "dormancy": self.dormancy, "row_variance_share": self.row_variance_share, "n_rows": self.n_rows,
                "rank": self.subspace.rank, "dim": self.subspace.dim,
                "readers": "; ".join(r["name"] + (f" via {'/'.join(r['via'])}" if r["via"] else "") for r in self.subspace.readers),
                "other_uses": "; ".join(sorted(set(self.subspace.other_uses))), "reason": self.reason}


def _ratio(a: float, b: float) -> float:
    return float(a / b) if np.isfinite(a) and np.isfinite(b) and b != 0 else math.nan


def _value(result: Mapping[str, Any], score: str) -> float:
    """The score's number: a scalar, or the NaN-ignoring mean of per-example values (as run_plan reads it)."""
    if score not in result:
        raise KeyError(f"illusion_check: the scorer returned no score {score!r} (it returned {list(result)})")
    arr = np.asarray(result[score].detach().cpu() if isinstance(result[score], torch.Tensor) else result[score], dtype=np.float64)
    if arr.ndim == 0:
        return float(arr)
    return float(np.nanmean(arr)) if arr.size and np.isfinite(arr).any() else math.nan


def split_intervention(intervention: AddVector, alpha: float, basis: np.ndarray) -> list[tuple[AddVector | None, float]]:
    """The row-space part and the null-space part of an :class:`AddVector` at strength ``alpha``.

    Returns ``[(row_part, alpha_row), (null_part, alpha_null)]`` whose edits add up to the whole
    intervention's edit at ``alpha`` on every position: for ``scale="absolute"`` each part is
    injected at ``alpha``; for ``scale="relative"`` (``delta = alpha * v / |v| * |h|``) each part
    ``p`` is injected at ``alpha * |p| / |v|``, since the edit divides by the injected vector's
    own norm. A zero part is ``(None, 0.0)``.
    """
    v = intervention.vector.vector  # (D,) float32
    v_row, v_null = split_direction(v, basis)
    v_norm = float(np.linalg.norm(v.double().numpy()))
    out: list[tuple[AddVector | None, float]] = []
    for part in (v_row, v_null):
        p_norm = float(np.linalg.norm(part))
        if p_norm == 0.0 or p_norm <= 1e-12 * max(v_norm, 1e-30):
            out.append((None, 0.0))
            continue
        vec = dataclasses.replace(intervention.vector, vector=torch.as_tensor(part, dtype=torch.float32),
                                  meta={**intervention.vector.meta, "part_of": intervention.vector.method})
        iv = AddVector(vec, intervention.site, scale=intervention.scale, relative_to=intervention.relative_to,  # type: ignore[arg-type]
                       positions=intervention.positions)
        out.append((iv, float(alpha) * (p_norm / v_norm if intervention.scale == "relative" else 1.0)))
    return out


@contextlib.contextmanager
def _record(model: nn.Module, site: Site, module: nn.Module, positions: Any, max_rows: int) -> Iterator[dict[str, Any]]:
    """While the scorer runs at alpha 0: the site's activation rows (those the intervention edits,
    at most ``max_rows``) and the first call into the model or an ancestor of the site (replayed
    once for the reader discovery)."""
    state: dict[str, Any] = {"rows": [], "n": 0, "call": None}

    def rows(t: torch.Tensor) -> None:
        if state["n"] >= max_rows:
            return None
        h, _ = to_canonical(t.detach(), site)  # (B, P, D)
        mask = _position_mask(positions, h)
        flat = h.reshape(-1, h.shape[-1])
        if mask is not None:
            flat = flat[mask.reshape(-1) > 0]
        flat = flat[: max_rows - state["n"]].double().cpu().numpy()
        state["rows"].append(flat)
        state["n"] += len(flat)
        return None

    def first_call(m: nn.Module, args: tuple, kwargs: dict) -> None:
        if state["call"] is None:
            try:  # a copy: a cache object the model fills in place must be replayed empty
                state["call"] = (m, copy.deepcopy(args), copy.deepcopy(kwargs))
            except Exception:  # noqa: BLE001 - an argument that cannot be copied is replayed as it is
                state["call"] = (m, args, kwargs)
        return None

    path = site.path
    ancestors = [""] + [".".join(path.split(".")[: i + 1]) for i in range(len(path.split(".")) if path else 0)]
    modules = dict(model.named_modules())
    handles = [modules[a].register_forward_pre_hook(first_call, with_kwargs=True) for a in ancestors if a in modules]
    try:
        with HookSet() as hooks:
            hooks.read(module, site, rows)
            yield state
    finally:
        for h in handles:
            h.remove()


def illusion_check(
    model: nn.Module,
    intervention: AddVector,
    scorer: "Scorer | Callable[[nn.Module], Mapping[str, Any]]",
    alpha: float,
    *,
    score: str | None = None,
    inputs: Any = None,
    readers: Sequence[str] | None = None,
    rows: np.ndarray | None = None,
    aliases: Aliases | None = None,
    rtol: float | None = None,
    n_random: int = N_RANDOM_DIRECTIONS,
    max_rows: int = MAX_ROWS,
    seed: int = 0,
) -> IllusionCheck:
    """Split an added vector into the part the next layer reads and the rest; say which carries the effect.

    Runs the scorer four times: at alpha 0, with the whole vector at ``alpha``, with ``v_row`` alone
    and with ``v_null`` alone (the parts' injections add up to the whole one,
    :func:`split_intervention`). The read subspace comes from one replayed forward pass (the first
    the scorer made at alpha 0, or ``inputs``), or from ``readers``.

    Parameters
    ----------
    model
        The model.
    intervention
        The added vector (its site, scale, relative_to and positions are used as they are).
    scorer
        A :class:`~sciscope.core.experiment.Scorer` or ``fn(model) -> {score: value}``.
    alpha
        The strength (e.g. the largest alpha of a sweep that did not break the model).
    score
        The score read (default: the scorer's first target, else its first score).
    inputs
        A batch to discover the readers on (default: a replay of the scorer's first forward).
    readers
        Reader module paths, given instead of discovered (see :func:`reading_subspace`).
    rows
        ``(N, D)`` activations of the site for the dormancy measure (default: the rows the scorer
        produced at alpha 0, at the intervention's positions, the first ``max_rows``).
    rtol
        Rank tolerance (see :func:`reading_subspace`).
    n_random
        Random unit directions of the read subspace for the dormancy measure.
    seed
        Seeds those directions.

    Returns
    -------
    IllusionCheck
    """
    from .experiment import Scorer

    fn = scorer if isinstance(scorer, Scorer) else Scorer(scorer)
    parsed, module = intervention.vector.placed(model, intervention.site, aliases)
    with _record(model, parsed, module, intervention.positions, max_rows) as state:
        base = fn(model)  # as run_plan runs it (the scorer decides about gradients)
    name = score or (list(fn.target)[0] if fn.target else next(k for k in base if k != fn.broken))
    score_zero = _value(base, name)
    if readers is not None:
        sub = reading_subspace(model, parsed, readers=readers, aliases=aliases, rtol=rtol)
    elif inputs is not None:
        sub = reading_subspace(model, parsed, inputs, aliases=aliases, rtol=rtol)
    else:
        if state["call"] is None:
            raise SiteError(f"illusion_check: the scorer ran no forward pass through site {str(parsed)!r}; give inputs=")
        m, args, kwargs = state["call"]
        sub = reading_subspace(model, parsed, forward=lambda _: m(*args, **kwargs), aliases=aliases, rtol=rtol)
    if sub.dim != intervention.vector.dim:
        raise ShapeError(f"illusion_check: site {sub.site!r} has width {sub.dim}, the vector {intervention.vector.dim}")

    def run(iv: AddVector | None, a: float) -> float:
        if iv is None:
            return score_zero  # a zero part changes nothing (the model at alpha 0)
        with iv.apply(model, a, aliases=aliases):
            return _value(fn(model), name)

    score_full = run(intervention, float(alpha))
    data = np.asarray(rows, dtype=np.float64) if rows is not None else (
        np.concatenate(state["rows"]) if state["rows"] else np.zeros((0, sub.dim)))
    common = dict(site=sub.site, alpha=float(alpha), score=name, scale=intervention.scale, score_zero=score_zero,
                  score_full=score_full, n_rows=int(len(data)), subspace=sub)
    if not sub.applicable:  # numbers about an uninformative split would only be misread: none are computed
        return IllusionCheck(score_row=math.nan, score_null=math.nan, row_share=math.nan, chance_share=math.nan,
                             dormancy=math.nan, row_variance_share=math.nan, verdict=NOT_APPLICABLE, reason=sub.reason,
                             **common)
    v = intervention.vector.vector.double().numpy()
    v_row, v_null = sub.split(v)
    v2 = float(v @ v)
    row_share = float(v_row @ v_row) / v2 if v2 > 0 else math.nan
    chance = sub.rank / sub.dim if sub.dim else math.nan
    dormancy, var_share = _dormancy(data, sub.basis, v_row, v_null, n_random=n_random, seed=seed)
    common.update(row_share=row_share, chance_share=chance, dormancy=dormancy, row_variance_share=var_share)
    (row_iv, a_row), (null_iv, a_null) = split_intervention(intervention, alpha, sub.basis)
    check = IllusionCheck(score_row=run(row_iv, a_row), score_null=run(null_iv, a_null), verdict="", reason="", **common)
    check.verdict, check.reason = _verdict(check)
    return check


def _dormancy(data: np.ndarray, basis: np.ndarray, v_row: np.ndarray, v_null: np.ndarray, *, n_random: int,
              seed: int) -> tuple[float, float]:
    """(std along ``v_row`` / median std along random unit directions of the read subspace,
    share of the data's variance along ``v`` that lies along ``v_row``), NaN where undefined."""
    if len(data) < 2:
        return math.nan, math.nan
    var_row, var_null = float(np.var(data @ v_row)), float(np.var(data @ v_null))
    share = var_row / (var_row + var_null) if var_row + var_null > 0 else math.nan
    n_row = float(np.linalg.norm(v_row))
    if basis.shape[0] == 0 or n_row == 0:
        return math.nan, share
    rng = np.random.default_rng([int(seed), 0x5B5])
    u = rng.standard_normal((n_random, basis.shape[0])) @ basis  # (n_random, D), inside the read subspace
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    typical = float(np.median(np.std(data @ u.T, axis=0)))
    along = float(np.std(data @ (v_row / n_row)))
    return (along / typical if typical > 0 else math.nan), share


def _verdict(c: IllusionCheck) -> tuple[str, str]:
    """The verdict from the numbers, with the thresholds named."""
    fmt = lambda x: "n/a" if not np.isfinite(x) else f"{x:.3g}"  # noqa: E731
    if not np.isfinite(c.effect_full) or abs(c.effect_full) <= NO_EFFECT_RTOL * max(1.0, abs(c.score_zero)):
        return NO_EFFECT, f"the whole vector moves {c.score} by {fmt(c.effect_full)}: nothing to split"
    parts = (f"row part alone {fmt(c.row_fraction)} of the effect, unread part alone {fmt(c.null_fraction)}; "
             f"|v_row|^2/|v|^2 = {fmt(c.row_share)} (a random direction: {fmt(c.chance_share)}); "
             f"dormancy {fmt(c.dormancy)} (std along v_row over a typical read direction's)")
    if c.null_fraction >= CARRIED_FRACTION:
        return CARRIED_NULL, (f"{parts}. The part no found reader reads moves the score: the site is read by something "
                              "not found (a reader missed, or a nonlinear path)")
    if c.row_fraction >= CARRIED_FRACTION:
        small = np.isfinite(c.row_share) and c.row_share < ROW_SHARE_VS_CHANCE * c.chance_share
        dormant = np.isfinite(c.dormancy) and c.dormancy < DORMANT_RATIO
        if small or dormant:
            why = " and ".join(w for w, on in (("v_row is a small part of v (the direction lives mostly in the "
                                                 "unread space)", small),
                                                ("the data barely varies along v_row (a dormant direction)", dormant)) if on)
            return ILLUSION, f"{parts}. The effect is carried by the read part, but {why}"
        return CARRIED_ROW, f"{parts}. The read part carries the effect and the data varies along it"
    return MIXED, f"{parts}. Neither part alone reproduces half of the effect: the parts interact (a norm, a nonlinearity)"


def as_added_vector(intervention: Any, model: nn.Module | None = None, *, aliases: Aliases | None = None) -> AddVector | None:
    """The intervention as an :class:`AddVector` when it adds one fixed vector, else None.

    An :class:`AddVector` is returned as it is; a
    :class:`~sciscope.core.interventions.SteerFeature` (``h + alpha * sum_i W_dec[i] / |W_dec[i]|``,
    at its positions) is exactly the absolute :class:`AddVector` of that sum. Clamping and feature
    ablation edit the activation in a data-dependent way and have no fixed vector to split.
    """
    from .interventions import SteerFeature

    if isinstance(intervention, AddVector):
        return intervention
    if isinstance(intervention, SteerFeature):
        rows = intervention.sae.W_dec.detach()[intervention.features].float().cpu()  # (k, d)
        direction = (rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)).sum(0)  # (d,), as SteerFeature.edits
        vec = SteeringVector(direction, intervention.site, "sae_features", {"features": intervention.features})
        return AddVector(vec, intervention.site, scale="absolute", positions=intervention.positions)
    return None


def check_direction(
    model: nn.Module,
    direction: "SteeringVector | torch.Tensor | np.ndarray",
    site: "str | Site | None",
    scorer: "Scorer | Callable[[nn.Module], Mapping[str, Any]]",
    alpha: float,
    *,
    scale: Literal["absolute", "relative"] = "absolute",
    relative_to: Literal["position", "example"] = "position",
    positions: Any = None,
    **kwargs: Any,
) -> IllusionCheck:
    """:func:`illusion_check` for any direction (a DAS or probe direction, an SAE decoder row), no pipeline.

    ``direction`` is added as ``h + alpha * direction`` (or relative to ``|h|``) at ``site``;
    ``kwargs`` go to :func:`illusion_check` (``score``, ``inputs``, ``readers``, ``rows``, ``aliases`` ...).
    """
    vec = direction if isinstance(direction, SteeringVector) else torch.as_tensor(np.asarray(direction), dtype=torch.float32)
    iv = AddVector(vec, site if site is not None else None, scale=scale, relative_to=relative_to, positions=positions)
    return illusion_check(model, iv, scorer, alpha, **kwargs)


# ------------------------------------------------------------------------------------------------
# the core analysis
# ------------------------------------------------------------------------------------------------


def subspace_analysis() -> "Analysis":
    """The subspace-illusion check after the steering stage, for every plan that adds a vector.

    For each plan whose intervention adds a fixed vector (:class:`AddVector`, or a
    :class:`~sciscope.core.interventions.SteerFeature`, see :func:`as_added_vector`), at its largest alpha that did not
    break the model (``alpha_plus`` of the saved sweep's summary, else ``alpha_minus``), runs
    :func:`illusion_check` on the plan's headline score; writes ``steering/subspace_check.csv``;
    headline: the fraction of the effect the read part carries, beside the unread part's.
    """
    from .experiment import Analysis

    return Analysis("subspace_check", "steering", _compute_subspace, _subspace_rows)


def _plan_sweep(ctx: "RunContext", name: str) -> Any:
    """The steering stage's sweep of a plan: in memory in the stage process, else from ``steering/<plan>/``."""
    from .experiment import PlanSweep

    if f"steering:{name}" in ctx.live:
        return ctx.live[f"steering:{name}"]
    folder = ctx.output(f"{name}/sweep.csv").parent  # the stage folder; ctx.stage is "steering" here
    return PlanSweep.load(folder) if (folder / "sweep.csv").is_file() else None


def _compute_subspace(ctx: "RunContext") -> dict[str, Any] | None:
    plans = ctx.adapter.steering_plans(ctx)
    model = ctx.model()
    out: list[dict[str, Any]] = []
    for plan in plans:
        known: dict[str, Any] = {"plan": plan.name}  # filled in by the check as it goes, for a "failed" row
        try:
            out.append(_check_plan(ctx, plan, model, known))
        except (TypeError, AttributeError, NameError):
            raise  # a programming error (in sciscope or the adapter) is a bug to see, not a failed check
        except Exception as err:  # noqa: BLE001 - one plan's failed check is reported, not fatal to the stage
            log.warning("subspace check of plan %s failed: %s", plan.name, err)
            out.append({**known, "verdict": "failed", "reason": f"{type(err).__name__}: {err}"})
    if not out:
        return None
    table = pd.DataFrame([{k: v for k, v in r.items() if k != "readers_detail"} for r in out])
    source = ctx.write_table("subspace_check.csv", table)
    return {"rows": out, "source": source}


def _check_plan(ctx: "RunContext", plan: Any, model: nn.Module, known: dict[str, Any]) -> dict[str, Any]:
    """One plan's row of ``subspace_check.csv``; ``known`` gets the plan's ``kind`` and ``alpha`` as
    they are found (what a "failed" row can say when a later step raises)."""
    from .experiment import resolve_intervention

    stage, sub = ctx.stage, ctx.subfolder
    ctx.stage, ctx.subfolder = "steering", plan.name  # as the stage builds it (a builder may write)
    try:
        iv = resolve_intervention(plan, ctx)
    finally:
        ctx.stage, ctx.subfolder = stage, sub
    known["kind"] = iv.kind
    base = {"plan": plan.name, "kind": iv.kind}
    added = as_added_vector(iv)
    if added is None:
        return {**base, "verdict": "skipped", "reason": f"{iv.kind} adds no fixed vector"}
    sweep = _plan_sweep(ctx, plan.name)
    if sweep is None:
        return {**base, "verdict": "skipped", "reason": "no saved sweep of this plan"}
    s = sweep.summary(n_boot=0)
    alpha = s["alpha_plus"] if np.isfinite(s["alpha_plus"]) else s["alpha_minus"]
    if not np.isfinite(alpha):
        return {**base, "verdict": "skipped", "reason": "every nonzero alpha broke the model"}
    known["alpha"] = float(alpha)
    check = illusion_check(model, added, plan.scorer, float(alpha), score=sweep.headline, aliases=ctx.adapter.aliases,
                           seed=int(plan.seed))
    # whether the sweep's effect at this alpha beats its random controls: a split of an effect
    # no larger than a random direction's is read as such
    plus = np.isfinite(s["alpha_plus"])
    ctrl = {"sweep_effect": s["effect_plus"] if plus else s["effect_minus"],
            "controls_max_abs_effect": s["control_effect_plus_max_abs"] if plus else s["control_effect_minus_max_abs"],
            "n_controls": s["n_controls"]}
    return {**base, **check.to_row(), **ctrl, "readers_detail": check.subspace.describe()}


def _subspace_rows(result: dict[str, Any] | None) -> list[dict[str, Any]]:
    if result is None:
        return []
    fmt = lambda x: "n/a" if x is None or not np.isfinite(x) else f"{x:.3g}"  # noqa: E731
    rows = []
    for r in result["rows"]:
        if r.get("verdict") == "skipped":
            continue
        if r.get("verdict") == "failed":
            rows.append({"name": f"{r['plan']}: subspace-illusion check", "value": None, "control": None,
                         "control_label": "the unread (null-space) part of the vector alone",
                         "note": ("the check failed" + (f" at alpha {fmt(r['alpha'])}" if r.get("alpha") is not None else "")
                                  + f": {r['reason']}"), "source": result["source"]})
            continue
        name = f"{r['plan']}: share of the change in {r['score']} carried by the read subspace (alpha {fmt(r['alpha'])})"
        note = (f"{r['verdict']}{' (FLAGGED)' if r['flagged'] else ''} at {r['site']}: {r['reason']}; whole effect "
                f"{fmt(r['effect_full'])}, read part alone {fmt(r['effect_row'])}, unread part alone {fmt(r['effect_null'])}")
        if r["readers"]:
            note += f"; readers: {r['readers']}"
        if r.get("n_controls"):
            beats = abs(r["sweep_effect"]) > r["controls_max_abs_effect"]
            note += (f"; the sweep's effect here {fmt(r['sweep_effect'])} {'beats' if beats else 'does not beat'} the largest "
                     f"|effect| of its {r['n_controls']} random controls ({fmt(r['controls_max_abs_effect'])})")
        finite = lambda x: float(x) if x is not None and np.isfinite(x) else None  # noqa: E731  # JSON has no NaN
        rows.append({"name": name, "value": finite(r["row_fraction"]), "control": finite(r["null_fraction"]),
                     "control_label": "the unread (null-space) part of the vector alone",
                     "unit": "fraction of the effect", "note": note, "source": result["source"]})
    return rows


__all__ = ["CARRIED_FRACTION", "DORMANT_RATIO", "FLAGGED", "IllusionCheck", "MAX_ROWS", "N_RANDOM_DIRECTIONS",
           "NO_EFFECT_RTOL", "ROW_SHARE_VS_CHANCE", "ReadingSubspace", "as_added_vector", "check_direction", "illusion_check",
           "reading_subspace", "split_direction", "split_intervention", "subspace_analysis"]
