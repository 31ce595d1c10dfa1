"""Fidelity of a reconstruction to the model: splice it in at its site and measure the model's own task.

An SAE can explain 99% of a site's variance and still break the model, because the residual it
drops may be what the next layers read. The field's measure ("loss recovered", SAELens' CE loss
score) splices the reconstruction back in and compares the task loss with the clean model and with
the site zero-ablated::

    loss recovered = (L_zero - L_spliced) / (L_zero - L_clean)

1 is a reconstruction the model cannot tell from its own activations, 0 is no better than zeroing
the site. Mean ablation (every position replaced by the mean activation over the valid, non-padding
positions) is the gentler floor.
Where the model has a distribution over outputs, the KL divergence from the clean outputs is
reported beside it. The same splice applied to the top principal components (as many as the
SAE's L0) is the baseline a sparse dictionary must beat.

The task is the adapter's (:meth:`~sciscope.core.adapter.DomainAdapter.task_loss`): next-token or
masked-token cross-entropy, masked-gene cross-entropy, next-frame MSE, action-token NLL ...
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from .errors import NonFiniteError, ShapeError
from .hooks import HookSet
from .sites import Aliases, Site, resolve_site, to_canonical
from .verdict import FRACTION_MARGIN

if TYPE_CHECKING:
    from .context import RunContext
    from .experiment import Analysis

#: ``(N, D) -> (N, D)``: what replaces the site's activation vectors.
Reconstruction = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class TaskLoss:
    """The model's own task, as the adapter measures it on held-out examples.

    Parameters
    ----------
    fn
        ``fn(model) -> float``: the mean task loss over a fixed evaluation set (lower is better),
        run once per condition under ``torch.no_grad``.
    name
        What the loss is (``"masked-token cross-entropy"``, ``"next-frame MSE"``).
    log_probs
        Optional ``log_probs(model) -> (N, C)`` log-probabilities over the model's outputs on the
        same evaluation set; the KL divergence of each condition from the clean model is reported.
    """

    fn: Callable[[nn.Module], float]
    name: str = "task loss"
    log_probs: Callable[[nn.Module], torch.Tensor] | None = None


class TokenPredictionTask:
    """Cross-entropy of a model's predictions at chosen positions: masked tokens, masked genes, the
    next token. One fixed evaluation set, so every call scores the same inputs.

    Parameters
    ----------
    batches
        ``[(inputs, targets, labels)]``: ``inputs`` the keyword arguments of the model (a Hugging Face
        model returning ``.logits`` of shape ``(B, P, V)``), ``targets`` a ``(B, P)`` boolean mask of
        the scored positions, ``labels`` the ``(n,)`` token ids there, in row-major order.
    causal
        The logits at position ``p`` predict position ``p + 1`` (next-token prediction): ``targets``
        and ``labels`` then refer to the predicted positions ``1..P-1`` (``targets`` of shape
        ``(B, P - 1)``).
    name
        What the loss is.
    """

    def __init__(self, batches: Sequence[tuple[Mapping[str, torch.Tensor], torch.Tensor, torch.Tensor]], *,
                 causal: bool = False, name: str = "token cross-entropy") -> None:
        self.batches, self.causal, self.name = list(batches), causal, name

    @classmethod
    def next_token(cls, batches: Iterable[Mapping[str, torch.Tensor]], *, name: str = "next-token cross-entropy",
                   input_keys: Sequence[str] = ("input_ids", "attention_mask")) -> "TokenPredictionTask":
        """Every real next token of right-padded batches (``input_ids``, ``attention_mask``); padding is never a target."""
        out = []
        for b in batches:
            targets = b["attention_mask"][:, 1:].bool()
            out.append(({k: b[k] for k in input_keys}, targets, b["input_ids"][:, 1:][targets]))
        return cls(out, causal=True, name=name)

    @classmethod
    def masked(cls, batches: Iterable[Mapping[str, torch.Tensor]], *, maskable: Callable[[Mapping[str, torch.Tensor]], torch.Tensor],
               mask_id: int, prob: float = 0.15, seed: int = 0, name: str = "masked-token cross-entropy",
               input_keys: Sequence[str] = ("input_ids", "attention_mask")) -> "TokenPredictionTask":
        """A seeded ``prob`` of each sequence's maskable tokens (at least one) replaced by ``mask_id``.

        All chosen tokens are masked (not BERT's 80/10/10), so every call scores the same inputs.
        ``maskable(batch)`` gives the ``(B, P)`` positions that may be masked (real, non-special tokens).
        """
        gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + 17)
        out = []
        for b in batches:
            ids, real = b["input_ids"], maskable(b).bool()
            chosen = (torch.rand(ids.shape, generator=gen) < prob) & real
            none = (chosen.sum(1) == 0) & real.any(1)
            if none.any():  # every sequence has a target
                pick = (torch.rand(ids.shape, generator=gen) * real).argmax(1)
                rows = torch.nonzero(none).reshape(-1)
                chosen[rows, pick[rows]] = True
            inputs = {k: b[k] for k in input_keys}
            inputs["input_ids"] = ids.masked_fill(chosen, mask_id)
            out.append((inputs, chosen, ids[chosen]))
        return cls(out, causal=False, name=name)

    @property
    def n_targets(self) -> int:
        """Scored positions in the evaluation set."""
        return int(sum(int(t.sum()) for _, t, _ in self.batches))

    def _logits(self, model: nn.Module) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``((n, V) logits at the targets, (n,) labels)`` per batch, in eval mode."""
        device = next(model.parameters()).device
        was = model.training
        model.eval()
        try:
            for inputs, targets, labels in self.batches:
                logits = model(**{k: v.to(device) for k, v in inputs.items()}).logits
                if self.causal:
                    logits = logits[:, :-1]
                yield logits[targets.to(device)].float(), labels.to(device)
        finally:
            model.train(was)

    @torch.no_grad()
    def loss(self, model: nn.Module) -> float:
        """Mean cross-entropy per scored position (nats)."""
        total, n = 0.0, 0
        for logits, labels in self._logits(model):
            total += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
            n += len(labels)
        return total / max(n, 1)

    @torch.no_grad()
    def log_probs(self, model: nn.Module) -> torch.Tensor:
        """``(n, V)`` log-softmax over the vocabulary at every scored position (CPU)."""
        return torch.cat([torch.log_softmax(logits, -1).cpu() for logits, _ in self._logits(model)])

    def task_loss(self) -> TaskLoss:
        """This task as the :class:`TaskLoss` an adapter returns (with log-probabilities for the KL)."""
        return TaskLoss(self.loss, f"{self.name} ({self.n_targets} positions)", log_probs=self.log_probs)


@contextlib.contextmanager
def splice(model: nn.Module, site: "str | Site", replace: Reconstruction, *, positions: Any = None,
           aliases: Aliases | None = None) -> Iterator[None]:
    """Replace the activation at ``site`` by ``replace(h)`` for every forward pass inside the block.

    Parameters
    ----------
    model
        The model.
    site
        Where (a module path, ``Site`` or alias); its layout says which axis is the feature axis.
    replace
        ``(N, D) -> (N, D)``, applied to every position's vector (in float32).
    positions
        Which positions to replace (see :func:`sciscope.core.steer.steer`); None = all.
    aliases
        Site aliases of the model.
    """
    parsed, module = resolve_site(model, site, aliases)

    def swap(t: torch.Tensor) -> torch.Tensor:
        h, back = to_canonical(t, parsed)  # (B, P, D)
        return back(_put(h, replace(h.reshape(-1, h.shape[-1]).float()), positions, f"splice at {str(parsed)!r}: the reconstruction"))

    with HookSet() as hooks:
        hooks.edit(module, parsed, swap)
        yield


@dataclass(frozen=True)
class FromSite:
    """A replacement computed from *another* site's vectors: what a transcoder (or a dense map of an
    MLP's input to its output) puts in place of the MLP's output. As a value of :func:`fidelity`'s
    ``reconstructions``, the spliced site's vectors become ``fn(source's vectors)``.

    Parameters
    ----------
    source
        The site read (e.g. the MLP's input), reached in the same forward pass before the spliced one.
    fn
        ``(N, D_source) -> (N, D)``, per position.
    """

    source: "str | Site"
    fn: Reconstruction


@contextlib.contextmanager
def splice_from(model: nn.Module, source: "str | Site", site: "str | Site", fn: Reconstruction, *,
                positions: Any = None, aliases: Aliases | None = None) -> Iterator[None]:
    """Replace the activation at ``site`` by ``fn(activation at source)`` for every forward pass
    inside the block: a transcoder spliced in place of an MLP reads the MLP's input (``source``,
    e.g. BERT's ``intermediate:input``) and writes the MLP's output (``site``, ``output.dense``).

    Parameters
    ----------
    model
        The model.
    source, site
        Where to read and where to write (module paths, ``Site`` objects or aliases); they may be
        different modules, or the two sides of one (GPT-2's ``mlp:input`` and ``mlp``). Both must
        have the same ``(batch, positions)`` axes.
    fn
        ``(N, D_source) -> (N, D_site)``, applied to every position's vector (in float32).
    positions
        Which positions of ``site`` to replace (see :func:`sciscope.core.steer.steer`); the others
        keep the model's own values. None = all.
    aliases
        Site aliases of the model.

    Raises
    ------
    ShapeError
        ``site`` ran before ``source`` in a forward pass, or the two disagree in their batch and
        position axes, or ``fn`` returns another shape than the site's.
    """
    src, src_module = resolve_site(model, source, aliases)
    parsed, module = resolve_site(model, site, aliases)
    seen: list[torch.Tensor] = []  # the source's (B, P, D_source) of the forward pass in progress

    def read(t: torch.Tensor) -> None:
        seen[:] = [to_canonical(t, src)[0]]

    def swap(t: torch.Tensor) -> torch.Tensor:
        if not seen:
            raise ShapeError(f"splice_from: {str(parsed)!r} ran before its source {str(src)!r} in a forward pass")
        x = seen.pop()  # (B, P, D_source); used once, so a stale one never feeds a later pass
        h, back = to_canonical(t, parsed)  # (B, P, D)
        if x.shape[:2] != h.shape[:2]:
            raise ShapeError(f"splice_from: source {str(src)!r} has (batch, positions) {tuple(x.shape[:2])}, "
                             f"{str(parsed)!r} has {tuple(h.shape[:2])}")
        new = fn(x.reshape(-1, x.shape[-1]).float())  # (B * P, D)
        return back(_put(h, new, positions, f"splice_from {str(src)!r} -> {str(parsed)!r}: the replacement"))

    with HookSet() as hooks:
        hooks.read(src_module, src, read)
        hooks.edit(module, parsed, swap)
        yield


def _put(h: torch.Tensor, new: torch.Tensor, positions: Any, what: str) -> torch.Tensor:
    """``h`` ``(B, P, D)`` with the ``(B * P, D)`` vectors ``new`` put in at ``positions`` (None: all)."""
    from .steer import _position_mask

    if tuple(new.shape) != (h.shape[0] * h.shape[1], h.shape[-1]):
        raise ShapeError(f"{what} has shape {tuple(new.shape)}, the site gives {h.shape[0] * h.shape[1]} vectors "
                         f"of width {h.shape[-1]}")
    new = new.to(h.dtype).reshape(h.shape)
    mask = _position_mask(positions, h)
    return new if mask is None else h + (new - h) * mask


@contextlib.contextmanager
def _site_mean(model: nn.Module, site: "str | Site", aliases: Aliases | None,
               positions: Any = None) -> Iterator[list[torch.Tensor]]:
    """Collect the mean activation vector of the site over the positions (all, or ``positions``)
    seen inside the block: mean ablation puts back what those positions usually hold.

    Only valid positions count, as in capture (:func:`sciscope.core.capture.pool`): where the
    model's forward gets an ``attention_mask`` of the site's ``(batch, positions)`` shape, its
    zeros (padding) are left out. A mask of another shape (image patches + text tokens) does not
    apply to the site and is ignored.
    """
    from .steer import _position_mask

    parsed, module = resolve_site(model, site, aliases)
    sums: list[torch.Tensor] = []
    # the attention_mask of the forward pass in progress: the site's hook cannot see the inputs
    current: list[torch.Tensor | None] = [None]

    def note_mask(mod: nn.Module, args: tuple, kwargs: dict) -> None:
        m = kwargs.get("attention_mask")
        current[0] = m if isinstance(m, torch.Tensor) else None
        return None

    note_mask._sciscope_hook = True  # type: ignore[attr-defined]  # count_hooks sees it while it lives

    def record(t: torch.Tensor) -> None:
        h, _ = to_canonical(t.detach(), parsed)  # (B, P, D)
        mask = _position_mask(positions, h)
        valid = current[0]
        if valid is not None and tuple(valid.shape) == tuple(h.shape[:2]):
            v = valid.to(device=h.device, dtype=h.dtype).ne(0).to(h.dtype).unsqueeze(-1)  # (B, P, 1)
            mask = v if mask is None else mask * v
        flat = h.reshape(-1, h.shape[-1]).double()
        if mask is not None:
            flat = flat[mask.reshape(-1) > 0]
        if sums:
            sums[0] += torch.cat([flat.sum(0), flat.new_tensor([len(flat)])])
        else:
            sums.append(torch.cat([flat.sum(0), flat.new_tensor([len(flat)])]))
        return None

    out: list[torch.Tensor] = []
    handle = model.register_forward_pre_hook(note_mask, with_kwargs=True)
    try:
        with HookSet() as hooks:
            hooks.edit(module, parsed, record)
            yield out
    finally:
        handle.remove()
    if sums:
        out.append((sums[0][:-1] / sums[0][-1]).float())


def sae_reconstruction(sae: nn.Module) -> Reconstruction:
    """``h -> decode(encode(h))`` of an SAE."""
    def reconstruct(h: torch.Tensor) -> torch.Tensor:
        return sae.decode(sae.encode(h.to(next(sae.parameters()).device))).to(h.device)

    return reconstruct


def pca_reconstruction(rows: np.ndarray, k: int, *,
                       components: tuple[np.ndarray, np.ndarray] | None = None) -> Reconstruction:
    """``h -> mean + (h - mean) V_k V_k^T`` with the top ``k`` principal components of ``rows`` ``(N, D)``
    (``components``: their ``principal_components(rows)``, when already computed)."""
    from .sae.metrics import principal_components

    mean_np, axes = components if components is not None else principal_components(rows)  # (D,), (D, D)
    k = int(max(0, min(k, rows.shape[1], rows.shape[0])))
    basis = torch.as_tensor(axes[:k], dtype=torch.float32)  # (k, D)
    mean = torch.as_tensor(mean_np, dtype=torch.float32)

    def reconstruct(h: torch.Tensor) -> torch.Tensor:
        b = basis.to(h.device)
        centred = h - mean.to(h.device)
        return mean.to(h.device) + centred @ b.T @ b

    return reconstruct


def fidelity(
    model: nn.Module,
    site: "str | Site",
    task: TaskLoss,
    reconstructions: "Mapping[str, Reconstruction | FromSite]",
    *,
    positions: Any = None,
    aliases: Aliases | None = None,
) -> pd.DataFrame:
    """The task loss with each reconstruction spliced in, beside clean, zero- and mean-ablated.

    Parameters
    ----------
    model
        The model (its parameters are not changed).
    site
        The site the reconstructions are of.
    task
        The model's task loss (and optionally its output log-probabilities).
    reconstructions
        ``{name: (N, D) -> (N, D)}``, e.g. ``{"sae": sae_reconstruction(sae), "pca": ...}``; a
        :class:`FromSite` value computes the site's vectors from another site's (a transcoder in
        place of an MLP, :func:`splice_from`).
    positions
        Splice only these positions (None: all).

    Returns
    -------
    pandas.DataFrame
        One row per condition (``clean``, each reconstruction, ``zero_ablation``,
        ``mean_ablation``): ``loss``, ``loss_recovered`` = (L_zero - L) / (L_zero - L_clean),
        ``loss_recovered_vs_mean`` = (L_mean - L) / (L_mean - L_clean),
        ``kl`` (mean KL divergence from the clean outputs, NaN without ``log_probs``).
    """
    with torch.no_grad():
        with _site_mean(model, site, aliases, positions) as mean:
            clean = float(task.fn(model))
        clean_lp = task.log_probs(model) if task.log_probs is not None else None
        if not mean:
            raise ShapeError(f"fidelity: the task's forward passes never reached site {str(site)!r}")
        site_mean = mean[0]
        conditions: dict[str, Reconstruction] = {
            **reconstructions,
            "zero_ablation": torch.zeros_like,
            "mean_ablation": lambda h: site_mean.to(h.device).expand_as(h),
        }
        rows = [{"condition": "clean", "loss": clean, "kl": 0.0 if clean_lp is not None else np.nan}]
        for name, fn in conditions.items():
            spliced = (splice_from(model, fn.source, site, fn.fn, positions=positions, aliases=aliases)
                       if isinstance(fn, FromSite) else splice(model, site, fn, positions=positions, aliases=aliases))
            with spliced:
                loss = float(task.fn(model))
                kl = np.nan
                if clean_lp is not None:
                    lp = task.log_probs(model)
                    kl = float((clean_lp.exp() * (clean_lp - lp)).sum(-1).mean())
            rows.append({"condition": name, "loss": loss, "kl": kl})
    table = pd.DataFrame(rows)
    if not np.isfinite(table.loss).all():
        bad = table.condition[~np.isfinite(table.loss)].tolist()
        raise NonFiniteError(f"fidelity: the task loss is NaN/inf under {bad}")
    zero = float(table.loc[table.condition == "zero_ablation", "loss"].iloc[0])
    gap = zero - clean
    table["loss_recovered"] = (zero - table.loss) / gap if gap != 0 else np.nan
    # the same read against mean ablation, the stricter floor where zeroing a site is far off its
    # distribution (a residual stream's mean is large): 0 = no better than the site's mean
    mean_loss = float(table.loc[table.condition == "mean_ablation", "loss"].iloc[0])
    table["loss_recovered_vs_mean"] = (mean_loss - table.loss) / (mean_loss - clean) if mean_loss != clean else np.nan
    return table


def fidelity_analysis() -> "Analysis":
    """The core's fidelity analysis, run after the sae stage for every adapter with a task loss.

    Splices the run's SAE and PCA with as many components as the SAE's L0 (fitted on the same
    training rows) at the SAE's site; writes ``sae/fidelity.csv``; headline: the SAE's loss
    recovered beside PCA's.
    """
    from .experiment import Analysis

    return Analysis("fidelity", "sae", _compute_fidelity, _fidelity_rows)


def _compute_fidelity(ctx: "RunContext") -> dict[str, Any] | None:
    adapter = ctx.adapter
    task = adapter.task_loss(ctx)
    if task is None:
        return None
    site = adapter.sae_site
    sae = ctx.live["sae"] if "sae" in ctx.live else ctx.sae()
    metrics = ctx.sae_metrics()
    rows, _ = ctx.sae_rows()  # the SAE's own training rows (positions, or pooled rows)
    k = int(round(metrics["l0"]))
    table = fidelity(ctx.model(), site, task,
                     {"sae": sae_reconstruction(sae), "pca_at_l0": pca_reconstruction(rows.array(site), k, components=ctx.sae_pca())},
                     positions=adapter.fidelity_positions, aliases=adapter.aliases)
    table.insert(1, "task", task.name)
    ctx.write_table("fidelity.csv", table)
    ctx.live["fidelity"] = table  # the quality table reads it next, in the same stage process
    return {"table": table, "task": task.name, "k": k, "site": site}


def _fidelity_rows(result: dict[str, Any] | None) -> list[dict[str, Any]]:
    if result is None:
        return []
    t = result["table"].set_index("condition")
    note = (f"{result['task']} with the reconstruction spliced in at {result['site']}: clean {t.loss['clean']:.4g}, "
            f"SAE {t.loss['sae']:.4g}, PCA-{result['k']} {t.loss['pca_at_l0']:.4g}, mean-ablated "
            f"{t.loss['mean_ablation']:.4g}, zero-ablated {t.loss['zero_ablation']:.4g}")
    if np.isfinite(t.loss_recovered_vs_mean["sae"]):
        note += (f"; loss recovered against mean ablation: SAE {t.loss_recovered_vs_mean['sae']:.3f}, "
                 f"PCA {t.loss_recovered_vs_mean['pca_at_l0']:.3f}")
    if np.isfinite(t.kl["sae"]):
        note += f"; KL from clean outputs: SAE {t.kl['sae']:.3g}, PCA {t.kl['pca_at_l0']:.3g}"
    return [{"name": "loss recovered (SAE spliced in)", "value": float(t.loss_recovered["sae"]),
             "control": float(t.loss_recovered["mean_ablation"]), "control_label": "mean ablation (the site's mean spliced in)",
             "baseline": float(t.loss_recovered["pca_at_l0"]), "baseline_label": "PCA with as many components as the SAE's L0",
             "tolerance": FRACTION_MARGIN,
             "note": note, "source": "sae/fidelity.csv"}]
