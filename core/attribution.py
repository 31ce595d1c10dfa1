"""Feature attribution: which SAE / transcoder features carry a model's headline output, and how they
connect (attribution graphs, as in the transcoder circuits of Dunefsky et al. 2024 and Anthropic's
circuit tracing).

A *feature dictionary* (an SAE, or a transcoder standing in for an MLP) is spliced into the model
**with its error term kept**::

    write = decode(encode(x_read)) + (y - decode(encode(x_read)))      # == y, the true activation

so the forward pass is the model's own, to the bit, and the features' codes are the nodes of the
graph. An SAE reads and writes one site (its reconstruction replaces the site's activation); a
transcoder reads the MLP's input and writes the MLP's output.

On the clean inputs of the adapter's :class:`~sciscope.core.tracing.CounterfactualPairs`,
:func:`attribute` measures

* **attribution** of every feature: activation x gradient of the pairs' score, ``a * dS/da``,
  summed over (valid) positions and averaged over pairs, with the *model's own* gradient at the
  write site read through the decoder (``dS/da = W_dec dS/dy``) -- the first-order prediction of
  what zeroing the feature does in the real model, through every path;
* **edges** in the local replacement model (every error term frozen, as in circuit tracing):
  feature -> feature between an upstream and a downstream dictionary, ``a_up * d a_down / d a_up``
  with every other dictionary's codes frozen too (direct edges), and feature -> output, ``a *
  dS/da`` along the direct paths only. Each feature edge also gets its *effect* on the score in
  score units (``a_up * d a_down / d a_up * dS/d a_down``, the target's total gradient weighed
  in), so edges into different targets compare; the strongest of each kind are kept and drawn;
* **the check**: the top-k features by ``|attribution|`` are really ablated (codes set to 0, the
  rest of the activation -- the error term -- kept, so the model computes on) and the true score
  change is set beside the prediction (minus the sum of their attributions) and beside the
  ablation of ``k`` random *live* features (seeded draws: the control). Single features are
  ablated one at a time too, to read how well activation x gradient predicts each.

The score is the pairs' own (``pairs.score``) or, by default, each pair's readout projected on its
clean-minus-corrupted readout (1 = clean, 0 = corrupted), with both readouts computed first in the
unspliced model.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from .capture import _batch_size, _forward, _to_device
from .errors import SciscopeError, ShapeError
from .hooks import HookSet
from .sites import Aliases, Site, expand_alias, resolve_site, to_canonical
from .tracing import PairScore

if TYPE_CHECKING:
    from .context import RunContext
    from .experiment import Analysis
    from .tracing import CounterfactualPairs

#: Splice modes: the graph the codes sit in.
#: ``"total"``: the model's own gradients; each dictionary's codes are a leaf whose gradient is
#: the decoder's read of the model's gradient at the write site (total effects, as the real model
#: computes them); ``"direct"``: the error terms frozen and every dictionary decoding a leaf copy
#: of its codes, so a gradient stops at the first dictionary it reaches (direct edges of the local
#: replacement model); ``"ablate"``: chosen codes set to zero, no gradient.
MODES = ("total", "direct", "ablate")


@dataclass
class FeatureDictionary:
    """A sparse dictionary spliced into the model: its codes are the attribution graph's nodes.

    Attributes
    ----------
    name
        Its name in the tables (``"sae"``, ``"transcoder"``, ``"sae_layer3"``); unique per call.
    module
        Anything with ``encode(x) -> codes`` of shape ``(N, D_in) -> (N, F)`` and a linear (affine)
        ``decode(codes) -> (N, D_out)``: a :class:`~sciscope.core.sae.SparseAutoencoder`, a transcoder.
    read_site
        Where the codes are read (a module path, ``Site`` or alias): the SAE's site, the MLP's input.
    write_site
        Where the decoded codes are written: None (an SAE: the read site), or the MLP's output.
    positions
        The positions whose codes are nodes (``steer``'s positions spec: a list, a slice, a ``(B, P)``
        bool tensor; None: all). Elsewhere the site is left alone -- e.g. an attention sink whose
        vector the SAE never saw in training.
    """

    name: str
    module: nn.Module
    read_site: "str | Site"
    write_site: "str | Site | None" = None
    positions: Any = None

    @property
    def is_transcoder(self) -> bool:
        """True when the codes are written at another site than they are read (a transcoder)."""
        return self.write_site is not None and str(self.write_site) != str(self.read_site)


@dataclass
class _Pass:
    """What the splice saw of one dictionary in the forward pass in progress.

    ``codes`` (B, P, F): computed from the live read-site input (in direct mode connected to the
    upstream dictionaries' leaves: the targets of edges); ``source`` (B, P, F): the leaf that was
    decoded, whose gradient is the dictionary's total (total mode) or direct (direct mode) effect; ``nodes`` (B, P, 1): the
    positions whose codes are nodes (the dictionary's positions x the valid, non-padding ones);
    ``order``: when its read ran in the forward pass.
    """

    codes: torch.Tensor
    source: torch.Tensor
    nodes: torch.Tensor
    order: int
    written: bool = False


@dataclass
class SpliceRecord:
    """The codes of every dictionary in the latest forward pass inside :func:`splice_dictionaries`.

    Attributes
    ----------
    passes
        ``{dictionary name: _Pass}`` of the latest forward pass (reset when the model's forward starts).
    """

    passes: dict[str, _Pass] = field(default_factory=dict)

    def order(self) -> list[str]:
        """Dictionary names in the order their codes were read in the forward pass."""
        return sorted(self.passes, key=lambda n: self.passes[n].order)


def _module_device(module: nn.Module) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _encode(module: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """Codes of canonical activations ``h`` (B, P, D_in) -> (B, P, F), in float32 on ``h``'s device."""
    b, p, d = h.shape
    flat = h.reshape(b * p, d).float().to(_module_device(module))
    return module.encode(flat).float().reshape(b, p, -1).to(h.device)


def _decode(module: nn.Module, c: torch.Tensor) -> torch.Tensor:
    """Decoded codes ``c`` (B, P, F) -> (B, P, D_out), float32 on ``c``'s device."""
    b, p, f = c.shape
    flat = c.reshape(b * p, f).to(_module_device(module))
    return module.decode(flat).float().reshape(b, p, -1).to(c.device)


@contextlib.contextmanager
def splice_dictionaries(model: nn.Module, dictionaries: Sequence[FeatureDictionary], *, mode: str = "total",
                        ablate: Mapping[str, Sequence[int] | torch.Tensor] | None = None,
                        aliases: Aliases | None = None) -> Iterator[SpliceRecord]:
    """Splice every dictionary into ``model`` with its error term kept, for the forward passes inside.

    The forward value at every write site is the model's own activation ``y``, bit for bit: in the
    gradient modes it is ``y + (r - r.detach())`` (total) or ``y.detach() + (r - r.detach())``
    (direct) with ``r = decode(codes)``, and ``r - r.detach()`` is exactly zero. In total mode the
    model's gradient flows as without the splice and the codes receive ``dS/dy`` read through the
    decoder; in direct mode it flows only through the codes (the error term ``y - r`` is frozen).
    Padding positions
    (zeros of an ``attention_mask`` keyword of the site's ``(B, P)`` shape) and positions outside a
    dictionary's ``positions`` are left alone.

    Parameters
    ----------
    model
        The model (never changed; every hook is removed when the block ends, error or not).
    dictionaries
        What to splice; names must be unique.
    mode
        ``"total"`` (the model's own gradients, the codes leaves beside them: total effects),
        ``"direct"`` (error terms frozen and each dictionary decoding a detached leaf copy of its
        codes: a gradient stops at the first dictionary it reaches; the direct edges), or
        ``"ablate"`` (no gradient: the codes
        listed in ``ablate`` are zeroed at the node positions, i.e. their decoded contribution
        ``decode(c) - decode(c with them zeroed)`` is subtracted from the true activation).
    ablate
        ``{dictionary name: feature ids}`` zeroed in ``"ablate"`` mode.
    aliases
        Site aliases of the model.

    Yields
    ------
    SpliceRecord
        The codes of the latest forward pass.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    names = [d.name for d in dictionaries]
    if len(set(names)) != len(names):
        raise ValueError(f"dictionary names must be unique, got {names}")
    from .steer import _position_mask

    record = SpliceRecord()
    counter = [0]
    # the attention_mask of the forward pass in progress: a site's hook cannot see the inputs
    current: list[torch.Tensor | None] = [None]

    def start(mod: nn.Module, args: tuple, kwargs: dict) -> None:
        record.passes.clear()
        counter[0] = 0
        m = kwargs.get("attention_mask")
        current[0] = m if isinstance(m, torch.Tensor) else None
        return None

    start._sciscope_hook = True  # type: ignore[attr-defined]  # count_hooks sees it while it lives

    def node_mask(d: FeatureDictionary, h: torch.Tensor) -> torch.Tensor:
        """(B, P, 1) float: the dictionary's positions x the valid (non-padding) ones."""
        mask = _position_mask(d.positions, h)
        valid = current[0]
        if valid is not None and tuple(valid.shape) == tuple(h.shape[:2]):
            v = valid.to(h.device).ne(0).to(torch.float32).unsqueeze(-1)  # (B, P, 1)
            mask = v if mask is None else mask.float() * v
        return torch.ones(*h.shape[:2], 1, device=h.device) if mask is None else mask.float()

    def read(d: FeatureDictionary, h: torch.Tensor) -> _Pass:
        if d.name in record.passes:
            raise SciscopeError(f"attribution: the read site {str(d.read_site)!r} of dictionary {d.name!r} ran twice "
                                "in one forward pass (a shared module); splice it at a site that runs once")
        if mode == "total":
            # the codes are a side branch: nothing upstream is differentiated through them
            with torch.no_grad():
                codes = _encode(d.module, h.detach())  # (B, P, F)
            codes = source = codes.requires_grad_(torch.is_grad_enabled())
        elif mode == "direct":
            codes = _encode(d.module, h)  # (B, P, F), connected to upstream leaves: an edge target
            # a leaf: the gradient from downstream stops here
            source = codes.detach().requires_grad_(torch.is_grad_enabled())
        else:
            codes = source = _encode(d.module, h)
        rec = _Pass(codes, source, node_mask(d, h), counter[0])
        counter[0] += 1
        record.passes[d.name] = rec
        return rec

    def write(d: FeatureDictionary, rec: _Pass, y: torch.Tensor) -> torch.Tensor:
        """The new canonical write-site activation (B, P, D_out) from the true one ``y``."""
        if mode == "ablate":
            ids = (ablate or {}).get(d.name)
            if ids is None or len(ids) == 0:
                return y
            keep = torch.ones(rec.codes.shape[-1], device=rec.codes.device)
            keep[torch.as_tensor(ids, dtype=torch.long, device=keep.device)] = 0.0
            # zeroed only at the node positions; elsewhere the codes are what they were
            ablated = rec.codes * (1.0 - rec.nodes * (1.0 - keep))  # (B, P, F)
            # the dictionary's decoder is affine: the difference is the zeroed features' rows, the
            # bias cancels, and the error term (everything the codes do not explain) stays in y
            removed = _decode(d.module, rec.codes) - _decode(d.module, ablated)  # (B, P, D_out)
            return y - removed.to(y.dtype)
        r = _decode(d.module, rec.source)  # (B, P, D_out)
        if r.shape != y.shape:
            raise ShapeError(f"attribution: dictionary {d.name!r} decodes to width {r.shape[-1]}, its write site "
                             f"{str(d.write_site or d.read_site)!r} has {tuple(y.shape)} (batch, positions, width)")
        # value: exactly y (r - r.detach() is exactly zero); gradient: the model's own plus the
        # codes' (total), or through the codes only, the error term frozen (direct)
        spliced = (y if mode == "total" else y.detach()) + (r - r.detach()).to(y.dtype)
        nodes = rec.nodes.to(y.dtype)
        return spliced * nodes + y * (1 - nodes) if bool((rec.nodes < 1).any()) else spliced

    def read_hook(d: FeatureDictionary, parsed: Site, also_write: bool) -> Callable[[torch.Tensor], torch.Tensor | None]:
        def fn(t: torch.Tensor) -> torch.Tensor | None:
            h, back = to_canonical(t, parsed)  # (B, P, D_in)
            rec = read(d, h)
            if not also_write:
                return None
            rec.written = True
            return back(write(d, rec, h))
        return fn

    def write_hook(d: FeatureDictionary, parsed: Site) -> Callable[[torch.Tensor], torch.Tensor | None]:
        def fn(t: torch.Tensor) -> torch.Tensor | None:
            rec = record.passes.get(d.name)
            if rec is None or rec.written:
                raise SciscopeError(f"attribution: the write site {str(d.write_site)!r} of dictionary {d.name!r} ran "
                                    f"without a fresh read at {str(d.read_site)!r} before it in the same forward pass")
            y, back = to_canonical(t, parsed)  # (B, P, D_out)
            rec.written = True
            return back(write(d, rec, y))
        return fn

    handle = model.register_forward_pre_hook(start, with_kwargs=True)
    try:
        with HookSet() as hooks:
            for d in dictionaries:
                parsed, module = resolve_site(model, d.read_site, aliases)
                same = not d.is_transcoder
                hooks.edit(module, parsed, read_hook(d, parsed, same))
                if not same:
                    wparsed, wmodule = resolve_site(model, d.write_site, aliases)  # type: ignore[arg-type]
                    hooks.edit(wmodule, wparsed, write_hook(d, wparsed))
            yield record
    finally:
        handle.remove()


# ------------------------------------------------------------------------------------------ scoring


def _slice_inputs(inputs: Any, index: torch.Tensor, n: int) -> Any:
    """The pairs ``index`` of a batch of ``n`` (tensors whose first axis is ``n`` are sliced)."""
    if isinstance(inputs, torch.Tensor):
        return inputs[index] if inputs.ndim and inputs.shape[0] == n else inputs
    if isinstance(inputs, Mapping):
        return {k: _slice_inputs(v, index, n) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(_slice_inputs(v, index, n) for v in inputs)
    return inputs


class _Scorer:
    """``score(model output, pair index) -> (b,)`` for the pairs: tracing's :class:`PairScore` (the pairs'
    own score, or the projection on each pair's clean-minus-corrupted readout over one common scale),
    with the clean and corrupted readouts computed once in the unspliced model."""

    def __init__(self, model: nn.Module, pairs: "CounterfactualPairs", chunks: list[torch.Tensor], n: int,
                 device: torch.device) -> None:
        self.pairs = pairs
        clean, corrupted = [], []
        with torch.no_grad():
            for idx in chunks:
                clean.append(pairs.readout(_forward(model, _to_device(_slice_inputs(pairs.clean, idx, n), device))).float())
                corrupted.append(pairs.readout(_forward(model, _to_device(_slice_inputs(pairs.corrupted, idx, n), device))).float())
        r_clean, r_corrupted = torch.cat(clean), torch.cat(corrupted)  # (N, ...) in the readout's own shape
        self.pair_score = PairScore(pairs, r_clean, r_corrupted)
        norm2 = self.pair_score.diff.pow(2).sum(-1)  # (N,)
        # pairs whose clean and corrupted readouts (nearly) agree, for the record: with the default
        # projection they weigh ~0 through the common scale, with an adapter's score they count as any pair
        self.n_degenerate = (int((norm2 <= 1e-12 * float(norm2.max())).sum()) if float(norm2.max()) > 0 else n) \
            if pairs.score is None else 0
        self.clean = torch.cat([self.pair_score.per_pair(r_clean[i], i) for i in chunks]).detach()  # (N,)
        self.corrupted = torch.cat([self.pair_score.per_pair(r_corrupted[i], i) for i in chunks]).detach()  # (N,)

    def __call__(self, output: Any, idx: torch.Tensor) -> torch.Tensor:
        return self.pair_score.per_pair(self.pairs.readout(output), idx)


# --------------------------------------------------------------------------------------- the result


@dataclass
class AttributionResult:
    """Feature attribution of a pairs' score, its edges, and the ablation check.

    Attributes
    ----------
    features
        One row per live feature (non-zero at a node position of some clean input): ``dictionary``,
        ``feature``, ``order`` (the dictionary's place in the forward pass), ``activation`` (code summed
        over node positions, mean over pairs), ``frequency`` (fraction of node positions where it
        fires), ``attribution`` (activation x gradient of the score, through every path),
        ``direct`` (its direct effect on the score: other dictionaries' codes frozen), ``rank`` (by
        ``|attribution|``, 1 = strongest), ``predicted`` (the score change zeroing it alone predicts,
        ``-attribution``), ``true`` (the score change zeroing it alone causes; NaN where not
        ablated) and ``ablated_as`` (``"top"``, ``"random"`` or ``""``).
    edges
        The strongest edges: ``source``, ``target`` (``"dict#feature"`` or ``"output"``),
        ``source_dictionary``, ``source_feature``, ``target_dictionary``, ``target_feature`` (-1 for
        the output), ``kind`` (``"feature"`` or ``"output"``), ``weight`` (``a_up * d a_down / d a_up``
        in the target's units, or ``a * dS/da`` for the output) and ``effect`` (its share of the
        score: the target's gradient weighed in; equals ``weight`` for output edges).
    ablation
        One row per ablation: ``k``, ``condition`` (``"top"`` or ``"random"``), ``draw``,
        ``features``, ``predicted`` (minus the sum of their attributions), ``true`` (the score change),
        ``fraction`` (``|true|`` over ``|clean - corrupted|``).
    params
        Parameters and the scores: ``score_clean``, ``score_corrupted`` (means over pairs),
        ``splice_max_error`` (largest |score| difference the exact splice made: 0 in exact
        arithmetic), ``n_degenerate_pairs`` (pairs whose clean and corrupted readouts agree, for the
        record: every mean is over all ``n_pairs``; with the default score such a pair scores ~0
        clean and corrupted, so it weighs ~0 through the common scale, while an adapter's own score
        counts it as any pair), ``dictionaries`` and their order, ``n_pairs``,
        ``top_k``, ``top_k_used``, ``n_random``, ``seed``.
    """

    features: pd.DataFrame
    edges: pd.DataFrame
    ablation: pd.DataFrame
    params: dict[str, Any]

    @property
    def effect(self) -> float:
        """Mean clean score minus mean corrupted score (what ablations are measured against)."""
        return float(self.params["score_clean"] - self.params["score_corrupted"])

    def top_vs_random(self, k: int | None = None) -> dict[str, float]:
        """At ``k`` (default: ``top_k``): the top-k ablation's true and predicted score change and
        |fraction| of the effect, beside the random draws' mean |fraction|, their largest, and the
        fraction of draws the top-k ablation moves the score more than."""
        k = int(self.params["top_k_used"] if k is None else k)
        t = self.ablation[self.ablation.k == k]
        top = t[t.condition == "top"].iloc[0]
        rnd = t[t.condition == "random"]
        return {"k": k, "true": float(top.true), "predicted": float(top.predicted), "fraction": float(top.fraction),
                "random_fraction": float(rnd.fraction.mean()) if len(rnd) else math.nan,
                "random_max_fraction": float(rnd.fraction.max()) if len(rnd) else math.nan,
                "random_true_mean": float(rnd.true.mean()) if len(rnd) else math.nan,
                "beats": float((rnd.true.abs() < abs(top.true)).mean()) if len(rnd) else math.nan,
                "n_random": int(len(rnd))}

    def agreement(self) -> dict[str, float]:
        """How well activation x gradient predicts single-feature ablations: Pearson r of predicted vs
        true (signed), the least-squares slope of true on predicted, and the Spearman rank
        correlation of |attribution| with |true| beside that of the activation alone (no gradient)."""
        t = self.features[np.isfinite(self.features.true)]
        out = {"n": int(len(t)), "pearson": math.nan, "slope": math.nan, "spearman": math.nan,
               "spearman_activation": math.nan}
        if len(t) < 3:
            return out
        pred, true = t.predicted.to_numpy(float), t.true.to_numpy(float)
        out["pearson"] = _corr(pred, true)
        den = float((pred * pred).sum())
        out["slope"] = float((pred * true).sum() / den) if den > 0 else math.nan
        rank_true = _ranks(np.abs(true))
        out["spearman"] = _corr(_ranks(np.abs(pred)), rank_true)
        out["spearman_activation"] = _corr(_ranks(t.activation.abs().to_numpy(float)), rank_true)
        return out

    def plot_graph(self, ax: Any = None, *, n_nodes: int = 6, n_edges: int = 12) -> Any:
        """The small attribution graph: dictionaries as columns in forward order and the output last;
        each column's ``n_nodes`` strongest features (by ``|attribution|``, node size ~ it); the
        ``n_edges`` strongest feature -> feature and as many feature -> output edges among them by
        ``|effect|`` (width ~ it, colour by sign)."""
        from .plotting import get_ax

        order = list(self.params["order"])
        ax = get_ax(ax, figsize=(2.2 * (len(order) + 1) + 1.5, 4.5))
        f = self.features
        pos: dict[str, tuple[float, float]] = {}
        sizes: dict[str, float] = {}
        top_attr = float(f.attribution.abs().max()) if len(f) else 1.0
        for col, name in enumerate(order):
            sub = f[f.dictionary == name].sort_values("rank").head(n_nodes)
            for row, (_, r) in enumerate(sub.iterrows()):
                node = f"{name}#{int(r.feature)}"
                pos[node] = (float(col), float(len(sub) - 1) / 2 - row)
                sizes[node] = float(abs(r.attribution)) / top_attr if top_attr > 0 else 0.0
        pos["output"] = (float(len(order)), 0.0)
        e = self.edges[self.edges.source.isin(list(pos)) & self.edges.target.isin(list(pos))]
        e = e.reindex(e.effect.abs().sort_values(ascending=False, kind="stable").index)
        e = e.groupby("kind", sort=False).head(n_edges)
        widest = float(e.effect.abs().max()) if len(e) else 0.0
        e = e[e.effect.abs() > 1e-3 * widest]  # an edge with no effect on the score is not drawn
        for _, r in e.iterrows():
            (x0, y0), (x1, y1) = pos[r.source], pos[r.target]
            colour = "C0" if r.effect >= 0 else "C1"
            ax.annotate("", xy=(x1, y1), xytext=(x0, y0), zorder=1,
                        arrowprops={"arrowstyle": "-|>", "color": colour, "alpha": 0.8, "shrinkA": 8, "shrinkB": 8,
                                    "linewidth": 0.5 + 5.5 * abs(r.effect) / widest if widest > 0 else 1.0})
        for node, (x, y) in pos.items():
            if node == "output":
                ax.scatter([x], [y], s=400, marker="s", color="0.2", zorder=2)
                ax.text(x, y - 0.35, f"output\n(score {self.params['score_clean']:.3g})", ha="center", va="top", fontsize=8)
                continue
            attr = float(f.loc[(f.dictionary + "#" + f.feature.astype(str)) == node, "attribution"].iloc[0])
            ax.scatter([x], [y], s=60 + 340 * sizes[node], color="C0" if attr >= 0 else "C1",
                       edgecolor="k", linewidth=0.5, zorder=2)
            ax.text(x + 0.12, y + 0.12, f"#{node.split('#')[1]}\n{attr:+.2g}", fontsize=7, va="bottom")
        # each column named with the site its codes are written to
        sites = [self.params["dictionaries"].get(k, {}).get("write_site", "") for k in order]
        ax.set_xticks(range(len(order) + 1), [*(f"{k}\n{s}" for k, s in zip(order, sites)), "output"], fontsize=8)
        ax.set_yticks([])
        ax.set_xlim(-0.5, len(order) + 0.6)
        lows = [y for _, y in pos.values()]
        ax.set_ylim(min(lows) - 0.9, max(lows) + 0.7)
        for side in ("left", "right", "top"):
            ax.spines[side].set_visible(False)
        from matplotlib.lines import Line2D

        ax.legend([Line2D([], [], color="C0", lw=3), Line2D([], [], color="C1", lw=3)],
                  ["raises the score", "lowers the score"], loc="upper left", fontsize=8, frameon=False,
                  bbox_to_anchor=(0, -0.14), ncol=2)
        ax.set_title(f"attribution graph, {self.params['n_pairs']} pairs\nnode: a feature (its activation x gradient); "
                     f"edge width ~ |effect on the score|", fontsize=8, color="0.1")
        return ax


def _ranks(x: np.ndarray) -> np.ndarray:
    return pd.Series(x).rank().to_numpy(float)


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 2 or np.std(a) == 0 or np.std(b) == 0:
        return math.nan
    return float(np.corrcoef(a, b)[0, 1])


# ---------------------------------------------------------------------------------------- attribute


def attribute(
    model: nn.Module,
    pairs: "CounterfactualPairs",
    dictionaries: Sequence[FeatureDictionary],
    *,
    top_k: int = 10,
    ks: Sequence[int] = (1, 3, 10, 30),
    n_random: int = 8,
    n_single: int = 16,
    n_targets: int = 10,
    n_edges: int = 40,
    batch_size: int = 64,
    seed: int = 0,
    aliases: Aliases | None = None,
) -> AttributionResult:
    """Attribute the pairs' score on their clean inputs to every feature of every dictionary.

    Parameters
    ----------
    model
        The model (eval mode during the call; its parameters are never changed).
    pairs
        Clean / corrupted inputs, the readout and (optionally) the score; only the clean inputs are
        attributed, the corrupted readouts anchor the default score.
    dictionaries
        The SAEs and transcoders to splice (each with its error term kept).
    top_k
        The ablation the headline reads: the top ``top_k`` features by ``|attribution|`` (capped at a
        quarter of the live features, so that ``k`` random live features are a different set).
        Their predicted change (the sum of their attributions) counts a path twice where two of
        them lie on it (A -> B: A's attribution already includes B's share).
    ks
        Further set sizes ablated (top and random), capped at half the live features.
    n_random
        Random draws of ``k`` live features per ``k`` (the control; seeded by ``seed``).
    n_single
        Features ablated one at a time: the ``n_single`` strongest and as many random live ones.
    n_targets
        Downstream features (the strongest by ``|attribution|`` per dictionary) whose incoming
        feature -> feature edges are computed (one backward pass each, twice).
    n_edges
        Edges kept of each kind, feature -> feature and feature -> output (the strongest by ``|effect|``).
    batch_size
        Pairs per forward pass (all at once where a dictionary's positions are a per-pair ``(B, P)`` mask).
    seed
        Seed of the random draws.
    aliases
        Site aliases of the model.

    Returns
    -------
    AttributionResult
    """
    if not dictionaries:
        raise ValueError("attribute: no dictionary to attribute to")
    for d in dictionaries:
        if "#" in d.name or d.name == "output":
            raise ValueError(f"attribute: dictionary name {d.name!r} may not contain '#' or be 'output'")
    n = int(_batch_size(pairs.clean))
    if int(_batch_size(pairs.corrupted)) != n:
        raise ShapeError(f"attribute: {n} clean inputs but {int(_batch_size(pairs.corrupted))} corrupted ones")
    device = _module_device(model)
    chunks = list(torch.arange(n).split(max(1, int(batch_size))))
    if any(isinstance(d.positions, torch.Tensor) and d.positions.ndim == 2 for d in dictionaries):
        chunks = [torch.arange(n)]  # per-pair positions (B, P) are given for the whole batch
    # every submodule's own flag, restored one by one (a submodule may be frozen in eval on purpose)
    training = {m: m.training for root in (model, *(d.module for d in dictionaries)) for m in root.modules()}
    model.eval()
    for d in dictionaries:
        d.module.eval()
    try:
        return _attribute(model, pairs, list(dictionaries), n, chunks, device, top_k=top_k, ks=ks, n_random=n_random,
                          n_single=n_single, n_targets=n_targets, n_edges=n_edges, seed=seed, aliases=aliases)
    finally:
        for m, was in training.items():
            m.training = was


def _attribute(model: nn.Module, pairs: "CounterfactualPairs", dicts: list[FeatureDictionary], n: int,
               chunks: list[torch.Tensor], device: torch.device, *, top_k: int, ks: Sequence[int], n_random: int,
               n_single: int, n_targets: int, n_edges: int, seed: int, aliases: Aliases | None) -> AttributionResult:
    scorer = _Scorer(model, pairs, chunks, n, device)
    names = [d.name for d in dicts]
    # means over every pair, as causal tracing takes them (with the default projection score a pair
    # whose clean and corrupted readouts agree weighs ~0 through the common scale)
    clean_mean = float(scorer.clean.sum()) / n

    def inputs(idx: torch.Tensor) -> Any:
        return _to_device(_slice_inputs(pairs.clean, idx, n), device)

    # ---- total attribution: a * dS/da per feature with the model's own gradient dS/dy read
    # through the decoder (what zeroing the feature does to first order), summed over node positions
    attr = {k: None for k in names}  # name -> (F,) float64 sums over pairs
    act: dict[str, Any] = {}
    fires: dict[str, Any] = {}
    n_nodes: dict[str, float] = dict.fromkeys(names, 0.0)
    order: list[str] = []
    err = 0.0
    grads_total: list[dict[str, torch.Tensor]] = []  # per chunk: name -> (b, P, F) dS/dcodes (detached)
    with torch.enable_grad(), splice_dictionaries(model, dicts, mode="total", aliases=aliases) as rec:
        for idx in chunks:
            s = scorer(_forward(model, inputs(idx)), idx)  # (b,)
            err = max(err, float((s.detach() - scorer.clean[idx]).abs().max()))
            missing = [k for k in names if k not in rec.passes]
            if missing:
                raise SciscopeError(f"attribute: the forward pass never reached the site of dictionary(ies) {missing}")
            order = order or rec.order()
            codes = [rec.passes[k].codes for k in names]
            grads = torch.autograd.grad(s.sum(), codes, allow_unused=True)
            chunk_grads = {}
            for k, c, g in zip(names, codes, grads):
                nodes = rec.passes[k].nodes  # (b, P, 1)
                c = c.detach()
                g = torch.zeros_like(c) if g is None else g.detach()
                chunk_grads[k] = g
                a = (c * g * nodes).sum(1).sum(0).double()  # (F,)
                attr[k] = a if attr[k] is None else attr[k] + a
                act[k] = (c * nodes).sum(1).sum(0).double() + (act[k] if k in act else 0)
                f = ((c != 0) & (nodes > 0)).sum(1).sum(0).double()  # (F,) node positions where it fires
                fires[k] = f + (fires[k] if k in fires else 0)
                n_nodes[k] += float(nodes.sum())
            grads_total.append(chunk_grads)
    attr = {k: (v / n).cpu() for k, v in attr.items()}
    act = {k: (v / n).cpu() for k, v in act.items()}
    freq = {k: (fires[k] / max(n_nodes[k], 1.0)).cpu() for k in names}
    live = {k: torch.nonzero(fires[k] > 0).reshape(-1).cpu() for k in names}

    # ---- direct effects and edges (direct splice: each dictionary decodes a frozen leaf copy)
    targets = {k: [int(i) for i in live[k][attr[k][live[k]].abs().argsort(descending=True)][:n_targets]] for k in names}
    direct = {k: torch.zeros_like(attr[k]) for k in names}
    weights: dict[tuple[str, str], torch.Tensor] = {}  # (up, down) -> (F_up, n_targets[down]) weight
    effects: dict[tuple[str, str], torch.Tensor] = {}
    with torch.enable_grad(), splice_dictionaries(model, dicts, mode="direct", aliases=aliases) as rec:
        for ci, idx in enumerate(chunks):
            s = scorer(_forward(model, inputs(idx)), idx)  # (b,)
            sources = [rec.passes[k].source for k in names]
            gs = torch.autograd.grad(s.sum(), sources, allow_unused=True, retain_graph=True)
            for k, src, g in zip(names, sources, gs):
                if g is not None:
                    direct[k] += (src.detach() * g * rec.passes[k].nodes).sum(1).sum(0).double().cpu()
            for down in names:
                if not targets[down]:
                    continue
                ups = [k for k in names if k != down]
                p_down = rec.passes[down]
                if not p_down.codes.requires_grad or not ups:
                    continue  # nothing upstream reaches it
                for j, g_id in enumerate(targets[down]):
                    a_down = p_down.codes[..., g_id] * p_down.nodes[..., 0]  # (b, P)
                    g_down = grads_total[ci][down][..., g_id]  # (b, P) dS/d a_down, all paths
                    for what, out in (("weight", a_down.sum()), ("effect", (a_down * g_down).sum())):
                        gu = torch.autograd.grad(out, [rec.passes[k].source for k in ups], allow_unused=True,
                                                 retain_graph=True)
                        table = weights if what == "weight" else effects
                        for up, g in zip(ups, gu):
                            if g is None:
                                continue
                            src, nodes = rec.passes[up].source.detach(), rec.passes[up].nodes
                            w = (src * g * nodes).sum(1).sum(0).double().cpu()  # (F_up,)
                            key = (up, down)
                            if key not in table:
                                table[key] = torch.zeros(len(w), len(targets[down]), dtype=torch.float64)
                            table[key][:, j] += w
    direct = {k: v / n for k, v in direct.items()}
    edges = _edge_table(names, targets, weights, effects, direct, live, n, n_edges)

    # ---- the check: real ablations (codes set to 0 at the node positions, the error term kept)
    flat = [(k, int(i), float(attr[k][i])) for k in names for i in live[k].tolist()]
    flat.sort(key=lambda t: -abs(t[2]))
    n_live = len(flat)
    rng = np.random.default_rng(seed)

    def ablate(feats: Sequence[tuple[str, int, float]]) -> float:
        by: dict[str, list[int]] = {}
        for k, i, _ in feats:
            by.setdefault(k, []).append(i)
        total = 0.0
        with torch.no_grad(), splice_dictionaries(model, dicts, mode="ablate", ablate=by, aliases=aliases):
            for idx in chunks:
                total += float(scorer(_forward(model, inputs(idx)), idx).sum())
        return total / n - clean_mean

    effect = clean_mean - float(scorer.corrupted.sum()) / n
    # at most a quarter of the live features: random draws of as many must be a control, not
    # nearly the same set
    top_used = min(int(top_k), max(1, n_live // 4), n_live)
    rows = []
    # the further sizes stay at most half the live features (random sets of more are nearly the top set)
    for k in sorted({min(int(k), max(1, n_live // 2)) for k in ks if k > 0} | {top_used}):
        if k <= 0 or n_live == 0:
            continue
        draws = [("top", 0, flat[:k])] + [("random", r + 1, [flat[i] for i in rng.choice(n_live, k, replace=False)])
                                          for r in range(n_random)]
        for cond, draw, feats in draws:
            true = ablate(feats)
            rows.append({"k": k, "condition": cond, "draw": draw,
                         "features": " ".join(f"{a}#{i}" for a, i, _ in feats),
                         "predicted": 0.0 - sum(v for _, _, v in feats), "true": true,
                         "fraction": abs(true) / abs(effect) if effect != 0 else math.nan})
    ablation = pd.DataFrame(rows, columns=["k", "condition", "draw", "features", "predicted", "true", "fraction"])

    singles: dict[tuple[str, int], tuple[float, str]] = {}
    for feat in flat[:n_single]:
        singles[(feat[0], feat[1])] = (ablate([feat]), "top")
    rest = flat[n_single:]
    for i in (rng.choice(len(rest), min(n_single, len(rest)), replace=False) if rest else []):
        singles[(rest[i][0], rest[i][1])] = (ablate([rest[i]]), "random")

    frows = []
    for pos_k, k in enumerate(names):
        for i in live[k].tolist():
            true, how = singles.get((k, i), (math.nan, ""))
            frows.append({"dictionary": k, "feature": i, "order": order.index(k) if k in order else pos_k,
                          "activation": float(act[k][i]), "frequency": float(freq[k][i]),
                          "attribution": float(attr[k][i]), "direct": float(direct[k][i]),
                          "predicted": 0.0 - float(attr[k][i]), "true": true, "ablated_as": how})
    features = pd.DataFrame(frows, columns=["dictionary", "feature", "order", "activation", "frequency", "attribution",
                                            "direct", "predicted", "true", "ablated_as"])
    features.insert(5, "rank", features.attribution.abs().rank(ascending=False, method="first").astype(int))
    features = features.sort_values("rank").reset_index(drop=True)
    params = {"n_pairs": n, "dictionaries": {d.name: {"read_site": str(d.read_site),
                                                      "write_site": str(d.write_site or d.read_site),
                                                      "transcoder": d.is_transcoder, "n_live": int(len(live[d.name])),
                                                      "sum_attribution": float(attr[d.name].sum())} for d in dicts},
              "order": order or names, "score_clean": clean_mean,
              "score_corrupted": float(scorer.corrupted.sum()) / n, "splice_max_error": err,
              "n_degenerate_pairs": scorer.n_degenerate,
              "score": pairs.score_name, "concept": pairs.concept, "top_k": int(top_k), "top_k_used": top_used,
              "ks": sorted(set(int(k) for k in ablation.k)), "n_random": int(n_random), "n_single": int(n_single),
              "n_targets": int(n_targets), "n_live": n_live, "seed": int(seed)}
    return AttributionResult(features, edges, ablation, params)


def _edge_table(names: list[str], targets: dict[str, list[int]], weights: dict[tuple[str, str], torch.Tensor],
                effects: dict[tuple[str, str], torch.Tensor], direct: dict[str, torch.Tensor],
                live: dict[str, torch.Tensor], n: int, n_edges: int) -> pd.DataFrame:
    """Feature -> feature and feature -> output edges, the ``n_edges`` strongest of each kind by |effect|
    (output edges are usually the larger: a feature's own direct effect against one of its paths).

    Weights and effects are means over all ``n`` pairs (with the default score a pair whose clean and
    corrupted readouts agree adds ~0 to an effect: the common scale weighs it so, it is not left out).
    """
    rows = []
    for (up, down), w in weights.items():
        e = effects.get((up, down), torch.zeros_like(w))
        for f in live[up].tolist():
            for j, g in enumerate(targets[down]):
                if w[f, j] == 0 and e[f, j] == 0:
                    continue
                rows.append({"source": f"{up}#{f}", "target": f"{down}#{g}", "source_dictionary": up,
                             "source_feature": f, "target_dictionary": down, "target_feature": g, "kind": "feature",
                             "weight": float(w[f, j]) / n, "effect": float(e[f, j]) / n})
    for k in names:
        for f in live[k].tolist():
            v = float(direct[k][f])
            if v != 0:
                rows.append({"source": f"{k}#{f}", "target": "output", "source_dictionary": k, "source_feature": f,
                             "target_dictionary": "output", "target_feature": -1, "kind": "output",
                             "weight": v, "effect": v})
    cols = ["source", "target", "source_dictionary", "source_feature", "target_dictionary", "target_feature", "kind",
            "weight", "effect"]
    table = pd.DataFrame(rows, columns=cols)
    if len(table):
        table = table.reindex(table.effect.abs().sort_values(ascending=False, kind="stable").index)
        table = table.groupby("kind", sort=False).head(n_edges)  # keeps the order by |effect|
    return table.reset_index(drop=True)


# ------------------------------------------------------------------------------------- the analysis


def attribution_analysis() -> "Analysis":
    """The core's feature attribution, run after the sae stage for every adapter with counterfactual
    pairs (:meth:`~sciscope.core.adapter.DomainAdapter.tracing_pairs`) and an SAE (plus the run's
    transcoder where it has one).

    Writes ``attribution_features.csv``, ``attribution_edges.csv``, ``attribution_ablation.csv`` and
    ``attribution_graph.png``; headline: how far ablating the top-k attributed features moves the
    score beside k random live features, and how well activation x gradient ranks single-feature
    ablations beside the activation alone.
    """
    from .experiment import Analysis

    return Analysis("attribution", "sae", _compute_attribution, _attribution_rows)


def _run_transcoder(ctx: "RunContext") -> FeatureDictionary | None:
    """The run's transcoder as a dictionary (its MLP's input -> the MLP's output), or None.

    The transcoder analysis leaves ``(transcoder, layer, mlp_in, mlp_out)`` in ``ctx.live`` (and on
    disk); :func:`sciscope.core.sae.transcoder.load_run_transcoder` returns it from either.
    """
    from .sae.transcoder import load_run_transcoder

    found = load_run_transcoder(ctx)
    if found is None:
        return None
    module, layer, mlp_in, mlp_out = found
    # trained on the rows of the same positions as the SAE (the adapter's fidelity positions)
    return FeatureDictionary("transcoder", module, mlp_in, mlp_out, positions=ctx.adapter.fidelity_positions)


def _compute_attribution(ctx: "RunContext") -> dict[str, Any] | None:
    adapter = ctx.adapter
    pairs = adapter.tracing_pairs(ctx)
    if pairs is None:
        return None
    if "sae" in ctx.live:
        sae = ctx.live["sae"]
    elif (ctx._root() / "sae" / "model").exists():  # the artifact ctx.sae() loads
        sae = ctx.sae()  # a corrupt SAE file raises
    else:
        return None  # the run has no SAE
    site = expand_alias(adapter.sae_site, adapter.aliases)
    dicts = [FeatureDictionary("sae", sae, site, positions=adapter.fidelity_positions)]
    tc = _run_transcoder(ctx)
    if tc is not None:
        dicts.append(tc)
    result = attribute(ctx.model(), pairs, dicts, seed=ctx.seed, aliases=adapter.aliases)
    sources = {"features": ctx.write_table("attribution_features.csv", result.features),
               "edges": ctx.write_table("attribution_edges.csv", result.edges),
               "ablation": ctx.write_table("attribution_ablation.csv", result.ablation)}
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2.2 * (len(dicts) + 1) + 1.5, 4.8))
    result.plot_graph(ax)
    sources["graph"] = ctx.save_figure("attribution_graph.png", fig)
    ctx.live["attribution"] = result
    return {"result": result, "sources": sources}


def _attribution_rows(out: dict[str, Any] | None) -> list[dict[str, Any]]:
    if out is None:
        return []
    res: AttributionResult = out["result"]
    src = out["sources"]
    if res.params["n_live"] == 0:
        return []
    p = res.params
    tv = res.top_vs_random()
    ag = res.agreement()
    dicts = " and ".join(f"{k} ({v['n_live']} live features)" for k, v in p["dictionaries"].items())
    top_edges = res.edges.head(3)
    edge_note = ", ".join(f"{r.source}->{r.target} {r.effect:+.3g}" for _, r in top_edges.iterrows())
    rows = [{
        "name": f"score moved by ablating the top-{tv['k']} attributed features (fraction of clean - corrupted)",
        "value": tv["fraction"], "control": tv["random_fraction"],
        "control_label": f"{tv['k']} random live features ablated (mean of {tv['n_random']} seeded draws)",
        "note": (f"{p['score']} on {p['n_pairs']} pairs ({p['concept'] or 'clean vs corrupted'}): clean {p['score_clean']:.4g}, "
                 f"corrupted {p['score_corrupted']:.4g}; top-{tv['k']} ablation changes it by {tv['true']:+.4g} "
                 f"(activation x gradient predicted {tv['predicted']:+.4g}); random draws {tv['random_true_mean']:+.4g} on "
                 f"average, the largest {tv['random_max_fraction']:.3g} of the effect; the top-k moves it more than "
                 f"{tv['beats']:.0%} of the draws. Features of {dicts}, error terms kept (splice error "
                 f"{p['splice_max_error']:.2g}); strongest edges: {edge_note or 'none'}"),
        "unit": "fraction of |clean - corrupted|", "source": src["ablation"], "figure": src["graph"]}]
    if ag["n"] >= 3:
        rows.append({
            "name": "rank agreement of |activation x gradient| with |single-feature ablation| (Spearman)",
            "value": ag["spearman"], "control": None, "control_label": "",
            "baseline": ag["spearman_activation"], "baseline_label": "ranking by activation alone (no gradient)",
            "note": (f"{ag['n']} features ablated one at a time (up to {p['n_single']} strongest by |attribution| and as "
                     f"many random live ones): "
                     f"predicted vs true score change Pearson r {ag['pearson']:.3f}, slope of true on predicted "
                     f"{ag['slope']:.3f} (1 = activation x gradient is exact)"),
            "source": src["features"]})
    return rows


__all__ = ["AttributionResult", "FeatureDictionary", "SpliceRecord", "attribute", "attribution_analysis",
           "splice_dictionaries"]
