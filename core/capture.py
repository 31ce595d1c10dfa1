"""Capture activations at any site of any PyTorch model.

Two levels:

* :func:`capture` — a context manager that records, for every forward pass run inside it, the
  tensor at each site (as canonical ``(B, P, D)`` on the CPU). Hooks are gone when the block ends.
* :func:`collect` — runs a model over an iterable of batches and streams pooled activations into an
  :class:`~sciscope.core.store.ActivationStore` on disk, chunk by chunk, so memory stays flat.

Pooling over positions (tokens, atoms, genes, patches, time steps):

``"none"``   one row per (example, valid position): ``position_mask`` when a batch has one, else
             ``attention_mask``; obs gets ``example`` and ``position`` columns
``"mean"``   mean over valid positions (``attention_mask`` when the batch has one)
``"last"``   the last valid position (decoder models' summary token)
``"first"``  the first position (BERT's [CLS])
``"masked"`` mean over the positions a batch's ``position_mask`` selects (e.g. atoms, not padding)
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from torch import nn

from .errors import ConfigError, SciscopeError, ShapeError
from .hooks import HookSet
from .sites import Aliases, Site, resolve_sites, to_canonical
from .store import ActivationStore, StoreWriter, check_replaceable

Pooling = Literal["none", "mean", "last", "first", "masked"]
POOLINGS: tuple[str, ...] = ("none", "mean", "last", "first", "masked")
POSITION_MASK_KEY = "position_mask"


class _StopForward(Exception):
    """Raised inside a hook to skip the rest of a forward pass once every site is captured."""


@dataclass
class Capture:
    """What :func:`capture` records: per site, one ``(B, P, D)`` CPU tensor per forward call."""

    sites: list[str]
    records: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    _seen: set[str] = field(default_factory=set)
    _stop_early: bool = False

    def __getitem__(self, site: str) -> torch.Tensor:
        """All records of ``site`` concatenated over the batch axis: ``(sum B, P, D)``."""
        recs = self.records[site]
        if not recs:
            raise SciscopeError(f"site {site!r} was not reached by any forward pass in this block")
        return torch.cat(recs) if len(recs) > 1 else recs[0]

    def clear(self) -> None:
        """Forget what was recorded (between batches)."""
        for recs in self.records.values():
            recs.clear()
        self._seen.clear()


@contextlib.contextmanager
def capture(
    model: nn.Module,
    sites: "Sequence[str | Site] | str | Site",
    *,
    aliases: Aliases | None = None,
    to_cpu: bool = True,
    dtype: torch.dtype | None = torch.float32,
) -> Iterator[Capture]:
    """Record the tensors at ``sites`` for every forward pass run inside the block.

    Parameters
    ----------
    model
        Any ``nn.Module`` (Hugging Face encoder or decoder, or plain PyTorch).
    sites
        Site names (``"encoder.layer.3"``, ``"model.layers.1.mlp.down_proj:input"``), aliases, or
        :class:`Site` objects (which may carry a ``layout`` for 4-D/5-D tensors).
    to_cpu, dtype
        Where and as what the records are kept (detached).

    Yields
    ------
    Capture
        ``cap[site]`` is a ``(B, P, D)`` tensor (``P = 1`` for 2-D sites).

    Examples
    --------
    >>> with capture(model, ["encoder.layer.0", "encoder.layer.1"]) as cap:  # doctest: +SKIP
    ...     model(**batch)
    >>> cap["encoder.layer.1"].shape  # doctest: +SKIP
    torch.Size([8, 12, 32])
    """
    resolved = resolve_sites(model, list(sites) if not isinstance(sites, (str, Site)) else sites, aliases)
    cap = Capture(sites=[name for name, _, _ in resolved])
    cap.records = {name: [] for name in cap.sites}
    with HookSet() as hooks:
        for name, site, module in resolved:

            def record(t: torch.Tensor, name: str = name, site: Site = site) -> None:
                canon, _ = to_canonical(t.detach(), site)
                if to_cpu:
                    canon = canon.cpu()
                if dtype is not None:
                    canon = canon.to(dtype)
                cap.records[name].append(canon)
                cap._seen.add(name)
                if cap._stop_early and len(cap._seen) == len(cap.sites):
                    raise _StopForward

            hooks.read(module, site, record)
        yield cap


def keep_positions(position: np.ndarray, rule: Any) -> np.ndarray:
    """Which positions a position rule keeps.

    Parameters
    ----------
    position
        ``(N,)`` position indices (0 = a sequence's first position).
    rule
        None (every position), a ``slice`` with non-negative bounds (``slice(1, None)``: all but
        the first) or a sequence of non-negative positions. Negative positions count from a
        sequence's padded end, which differs from example to example: they are refused.

    Returns
    -------
    numpy.ndarray
        ``(N,)`` bool.
    """
    position = np.asarray(position, dtype=np.int64)
    if rule is None:
        return np.ones(position.shape, bool)
    if isinstance(rule, slice):
        start, stop, step = rule.start or 0, rule.stop, rule.step or 1
        if start < 0 or (stop is not None and stop < 0) or step < 1:
            raise ConfigError(f"position rule {rule!r}: pooling and per-position SAE rows need non-negative slice "
                              "bounds and step; count from the end with 'last' pooling and sae_rows='pooled' instead")
        keep = (position >= start) & ((position - start) % step == 0)
        return keep if stop is None else keep & (position < stop)
    wanted = np.asarray(list(rule) if isinstance(rule, Sequence) else rule, dtype=np.int64)
    if (wanted < 0).any():
        raise ConfigError(f"position rule {list(wanted)}: pooling and per-position SAE rows need non-negative "
                          "positions; count from the end with 'last' pooling and sae_rows='pooled' instead")
    return np.isin(position, wanted)


def _pooling_mask(acts: torch.Tensor, mask: torch.Tensor | None, positions: Any, outlier_norm: float) -> torch.Tensor | None:
    """``mask`` without the positions the rule leaves out and those whose norm exceeds
    ``outlier_norm`` times the median norm of the batch's kept positions; an example left with no
    position keeps its original mask (a one-token example is not zeroed)."""
    if positions is None and not outlier_norm:
        return mask
    b, p, _ = acts.shape
    base = mask.bool() if mask is not None else torch.ones(b, p, dtype=torch.bool)
    keep = base & torch.from_numpy(keep_positions(np.arange(p), positions))  # (B, P)
    if outlier_norm > 0 and keep.any():
        norms = acts.float().norm(dim=-1)  # (B, P)
        keep &= norms <= outlier_norm * norms[keep].median()
    empty = ~keep.any(1)
    keep[empty] = base[empty]
    return keep


def pool(
    acts: torch.Tensor,
    pooling: Pooling,
    *,
    attention_mask: torch.Tensor | None = None,
    position_mask: torch.Tensor | None = None,
    site: str = "",
    positions: Any = None,
    outlier_norm: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Pool ``(B, P, D)`` activations over positions.

    ``positions`` (a rule, see :func:`keep_positions`) and ``outlier_norm`` (leave out positions
    whose norm exceeds this many times the batch's median position norm; 0: none) narrow what
    ``"mean"`` and ``"masked"`` average over: a trained causal LM's first position (the attention
    sink) or a massive activation would otherwise dominate every pooled row.

    Returns
    -------
    pooled : Tensor
        ``(B, D)``, or ``(n_valid, D)`` for ``"none"``.
    kept : Tensor or None
        For ``"none"``: the ``(n_valid, 2)`` (example, position) index of each row.

    Raises
    ------
    ConfigError
        ``pooling`` is not one of :data:`POOLINGS` (the message lists them).
    ShapeError
        ``"masked"`` without a fitting ``position_mask``.
    """
    _check_pooling(pooling)
    b, p, d = acts.shape
    mask = attention_mask
    if mask is not None and tuple(mask.shape) != (b, p):
        mask = None  # e.g. image patches + text tokens: the token mask does not apply here
    if pooling == "none" and position_mask is not None and tuple(position_mask.shape) == (b, p):
        mask = position_mask  # one row per selected position (e.g. gene tokens, not <cls>/<eos>/padding)
    if pooling == "masked":
        if position_mask is None:
            raise ShapeError(f"site {site!r}: pooling='masked' needs a '{POSITION_MASK_KEY}' in each batch")
        if tuple(position_mask.shape) != (b, p):
            raise ShapeError(
                f"site {site!r}: {POSITION_MASK_KEY} has shape {tuple(position_mask.shape)}, "
                f"activations have (batch, positions) = {(b, p)}"
            )
        mask = position_mask
    if pooling == "first":
        return acts[:, 0], None
    if pooling == "last":
        if mask is None:
            return acts[:, -1], None
        last = mask.long().cumsum(1).argmax(1)  # index of the last True per row
        return acts[torch.arange(b), last], None
    if pooling in ("mean", "masked"):
        mask = _pooling_mask(acts, mask, positions, outlier_norm)
        if mask is None:
            return acts.mean(1), None
        w = mask.to(acts.dtype).unsqueeze(-1)  # (B, P, 1)
        return (acts * w).sum(1) / w.sum(1).clamp_min(1.0), None
    # "none" (the only pooling left after _check_pooling)
    if mask is None:
        mask = torch.ones(b, p, dtype=torch.bool)
    kept = mask.bool().nonzero()  # (n_valid, 2): example, position
    return acts[kept[:, 0], kept[:, 1]], kept


def _check_pooling(pooling: str) -> None:
    if pooling not in POOLINGS:
        raise ConfigError(f"unknown pooling {pooling!r}; choose one of {', '.join(map(repr, POOLINGS))}")


def model_identity(model: nn.Module, *, max_full_hash_params: int = 200_000_000) -> dict[str, Any]:
    """Name, class, parameter count and a content hash of ``model``'s weights.

    Models up to ``max_full_hash_params`` parameters are hashed in full; larger ones by a strided
    sample of every tensor (the manifest says which).
    """
    h = hashlib.sha256()
    n_params = sum(p.numel() for p in model.parameters())
    full = n_params <= max_full_hash_params
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        flat = t.reshape(-1)
        if not full and flat.numel() > 4096:
            flat = flat[:: max(1, flat.numel() // 4096)]
        h.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    config = getattr(model, "config", None)
    return {
        "class": type(model).__name__,
        "name": getattr(config, "_name_or_path", None) or type(model).__name__,
        "n_params": int(n_params),
        "hash": h.hexdigest(),
        "hash_method": "sha256-full" if full else "sha256-strided",
    }


def _forward(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def _batch_size(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    values = batch.values() if isinstance(batch, Mapping) else batch
    for v in values:
        if isinstance(v, torch.Tensor):
            return v.shape[0]
    raise ShapeError("cannot tell the batch size: the batch holds no tensor")


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def collect(
    model: nn.Module,
    batches: Iterable[Any],
    sites: "Sequence[str | Site] | str | Site",
    *,
    out: str | os.PathLike[str],
    obs: pd.DataFrame | None = None,
    pooling: Pooling = "mean",
    aliases: Aliases | None = None,
    dtype: Any = np.float32,
    seed: int | None = None,
    stop_early: bool = False,
    progress: bool = True,
    total: int | None = None,
    extra_manifest: Mapping[str, Any] | None = None,
    shard: tuple[int, int] | None = None,
    positions: Any = None,
    outlier_norm: float = 0.0,
) -> ActivationStore:
    """Run ``model`` over ``batches`` and stream pooled activations into a store at ``out``.

    Parameters
    ----------
    model
        Any ``nn.Module``; it is put in eval mode and run under ``torch.inference_mode``.
    batches
        Model inputs: dicts of keyword arguments (Hugging Face style), tuples of positional
        arguments, or tensors. A dict may carry ``attention_mask`` (used for pooling) and
        ``position_mask`` (``(B, P)`` bool, for ``pooling="masked"``; removed before the forward).
    sites
        Where to read (see :func:`capture`).
    out
        Store folder. It appears only when capture finishes; an earlier store there survives an
        error. An existing file or non-empty folder there that is not a store is refused
        (:class:`SciscopeError`) before anything runs.
    obs
        One row per example, in batch order (metadata and concept columns). With
        ``pooling="none"`` each row is repeated for every valid position and ``example`` /
        ``position`` columns are added.
    pooling
        ``"none"``, ``"mean"``, ``"last"``, ``"first"`` or ``"masked"``.
    seed
        Recorded in the manifest (for the examples' sampling upstream).
    stop_early
        Skip the rest of each forward pass once every site has been recorded (faster when the
        sites are early layers; only for models that call each site's module once per forward).
    progress
        Show a progress bar.
    positions, outlier_norm
        Positions ``"mean"``/``"masked"`` pooling leaves out: a position rule and a norm factor
        (see :func:`pool`); recorded in the manifest.
    shard
        ``(index, count)``: this worker runs only the batches ``b`` with ``b % count == index``
        (the others are counted, not run), so ``count`` workers -- processes, cluster jobs --
        capture one dataset together; :func:`sciscope.core.merge_shards` joins their stores in
        the original row order. ``obs`` is the whole dataset's table in every worker.

    Returns
    -------
    ActivationStore
        The store reopened from disk (memory-mapped).
    """
    from tqdm.auto import tqdm

    _check_pooling(pooling)
    check_replaceable(out)  # before any model hashing or forward pass: refuse early, lose nothing
    if shard is not None:
        shard_index, shard_count = (int(v) for v in shard)
        if shard_count < 1 or not 0 <= shard_index < shard_count:
            raise ConfigError(f"shard must be (index, count) with 0 <= index < count, got {shard!r}")
    resolved = resolve_sites(model, list(sites) if not isinstance(sites, (str, Site)) else sites, aliases)
    names = [n for n, _, _ in resolved]
    device = next(model.parameters(), torch.empty(0)).device
    manifest = {
        "model": model_identity(model),
        "sites_requested": {n: {"path": s.path, "side": s.side, "index": s.index, "layout": s.layout} for n, s, _ in resolved},
        "pooling": pooling,
        "pooling_excludes": {"positions": None if positions is None else repr(positions), "outlier_norm": outlier_norm},
        "seed": seed,
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **dict(extra_manifest or {}),
    }
    was_training = model.training
    model.eval()
    n_examples = 0
    if total is None and hasattr(batches, "__len__"):
        total = len(batches)  # type: ignore[arg-type]
    writer = StoreWriter(out, names, dtype=dtype, manifest=manifest)
    shard_batches: list[list[int]] = []  # [batch index, rows written] per batch this shard ran
    b = -1
    try:
        site_list = list(sites) if not isinstance(sites, (str, Site)) else [sites]
        with capture(model, site_list, aliases=aliases, to_cpu=True) as cap, torch.inference_mode():
            cap._stop_early = stop_early
            desc = "capture" if shard is None else f"capture shard {shard[0]}/{shard[1]}"
            for b, batch in enumerate(tqdm(batches, total=total, desc=desc, disable=not progress, unit="batch")):
                if shard is not None and b % shard_count != shard_index:
                    n_examples += _batch_size(batch)  # another worker's batch: keep the obs offset
                    continue
                position_mask = None
                if isinstance(batch, Mapping) and POSITION_MASK_KEY in batch:
                    batch = dict(batch)
                    position_mask = batch.pop(POSITION_MASK_KEY)
                attention_mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
                bsz = _batch_size(batch)
                cap.clear()
                try:
                    _forward(model, _to_device(batch, device))
                except _StopForward:
                    pass
                chunk: dict[str, np.ndarray] = {}
                kept_index = None
                for name in names:
                    recs = cap.records[name]
                    if not recs:
                        raise SciscopeError(f"site {name!r} was not reached by the forward pass")
                    acts = recs[0]  # first call of the module in this forward
                    if acts.shape[0] != bsz:
                        raise ShapeError(f"site {name!r}: batch axis has {acts.shape[0]} rows, batch has {bsz}")
                    pooled, kept = pool(
                        acts,
                        pooling,
                        attention_mask=None if attention_mask is None else attention_mask.cpu(),
                        position_mask=None if position_mask is None else position_mask.cpu(),
                        site=name,
                        positions=positions,
                        outlier_norm=outlier_norm,
                    )
                    if kept is not None:
                        if kept_index is not None and not torch.equal(kept, kept_index):
                            raise ShapeError(
                                f"site {name!r} has a different number of positions than the other sites; "
                                "capture sites with different position axes in separate stores"
                            )
                        kept_index = kept
                    chunk[name] = pooled.numpy()
                obs_chunk = _obs_chunk(obs, n_examples, bsz, kept_index)
                writer.append(chunk, obs_chunk)
                shard_batches.append([b, len(obs_chunk)])
                n_examples += bsz
        if obs is not None and n_examples != len(obs):
            raise ShapeError(f"obs has {len(obs)} rows but the batches held {n_examples} examples")
        if shard is not None:
            writer.manifest["shard"] = {"index": shard_index, "count": shard_count, "n_batches": b + 1,
                                        "batches": shard_batches}
        return writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        model.train(was_training)


def _obs_chunk(obs: pd.DataFrame | None, start: int, bsz: int, kept: torch.Tensor | None) -> pd.DataFrame:
    if obs is not None:
        if start + bsz > len(obs):
            raise ShapeError(f"the batches hold more examples than obs has rows ({len(obs)})")
        rows = obs.iloc[start : start + bsz].reset_index(drop=True)
    else:
        rows = pd.DataFrame(index=pd.RangeIndex(bsz))
    if "example" not in rows.columns:
        rows.insert(0, "example", np.arange(start, start + bsz))
    if kept is None:
        return rows
    expanded = rows.iloc[kept[:, 0].numpy()].reset_index(drop=True)
    expanded["position"] = kept[:, 1].numpy()
    return expanded


def pooled_activations(
    model: nn.Module,
    batches: Iterable[Any],
    site: str | Site,
    *,
    pooling: Pooling = "mean",
    aliases: Aliases | None = None,
    copies: int | None = None,
) -> np.ndarray:
    """``(n_examples, d)`` float64 activations of one site, pooled as :func:`collect` pools them.

    In memory, for scorers that read a layer of the (intervened) model under each alpha: batches
    are the adapter's (an ``attention_mask`` / ``position_mask`` in a dict batch is used for
    pooling, as in a capture). Pooling ``"none"`` is refused: it has no one row per example.
    With ``copies=n`` every batch runs as ``n`` stacked copies
    (:func:`~sciscope.core.interventions.tile_copies`, for
    :func:`~sciscope.core.interventions.apply_copies`) and the result is ``(n, n_examples, d)``.
    """
    from .interventions import tile_copies

    _check_pooling(pooling)
    if pooling == "none":
        raise ConfigError("pooled_activations needs a pooling that gives one row per example")
    device = next(model.parameters(), torch.empty(0)).device
    name = str(site)
    rows = []
    with capture(model, [site], aliases=aliases, to_cpu=True) as cap, torch.inference_mode():
        for batch in batches:
            position_mask = None
            if isinstance(batch, Mapping) and POSITION_MASK_KEY in batch:
                batch = dict(batch)
                position_mask = batch.pop(POSITION_MASK_KEY)
            if copies is not None:
                batch, position_mask = tile_copies(batch, copies), tile_copies(position_mask, copies)
            attention_mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
            cap.clear()
            _forward(model, _to_device(batch, device))
            recs = next(iter(cap.records.values()))
            if not recs:
                raise SciscopeError(f"site {name!r} was not reached by the forward pass")
            pooled, _ = pool(recs[0], pooling, site=name,
                             attention_mask=None if attention_mask is None else attention_mask.cpu(),
                             position_mask=None if position_mask is None else position_mask.cpu())
            pooled = pooled.numpy().astype(np.float64)
            rows.append(pooled if copies is None else pooled.reshape(copies, -1, pooled.shape[-1]))
    if copies is None:
        return np.concatenate(rows) if rows else np.zeros((0, 0))
    return np.concatenate(rows, axis=1) if rows else np.zeros((copies, 0, 0))
