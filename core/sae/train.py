"""Train any registered SAE with PyTorch Lightning from a plain iterator of activation batches.

The trainer knows nothing about models, tokenizers or stores: it reads tensors of shape
(batch, d_in).  Devices, strategy (DDP) and nodes come from Lightning and pass straight through.

Steps of :func:`train_sae`:

1. peek the first ``norm_batches`` batches, check them, fit the input normalisation on them and
   initialise ``b_dec`` to their (normalised) mean;
2. train in normalised space, one optimiser step per batch, for ``max_steps`` steps (or until a
   one-shot iterable runs out, or -- with ``val_data`` and ``patience`` -- until the explained
   variance of the validation rows stops improving);
3. fold the normalisation into the weights, so the returned SAE reads raw activations.

A transcoder (an architecture with ``transcodes``, :mod:`sciscope.core.sae.transcoder`) trains on
the same path from ``(input, target)`` batches: input and target each get their own normalisation
(an MLP's input and output differ in mean and scale), ``b_dec`` starts at the targets' mean, and
both are folded in at the end.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

from sciscope.core.errors import ConfigError, SciscopeError, ShapeError
from sciscope.core.io import atomic_path
from sciscope.core.sae.base import SAEConfig, SparseAutoencoder, check_batch, config_from_dict, create_sae, is_pair
from sciscope.core.threads import threads_per_device

Data = Iterable[Tensor] | Callable[[], Iterable[Tensor]]
#: what one checked batch is: (B, d_in) rows, or (input, target) rows of a transcoder
Batch = Tensor | tuple[Tensor, Tensor]

HISTORY_COLUMNS = ("loss", "recon", "mse", "sparsity", "aux", "l0", "dead_fraction", "lr")


# ------------------------------------------------------------------------------------- results


@dataclass
class SAETrainResult:
    """What :func:`train_sae` returns.

    Attributes
    ----------
    sae
        The trained SAE, in eval mode, on CPU, with the normalisation folded in (reads raw inputs).
    cfg
        Its config.
    history
        One row per optimiser step: ``step``, ``loss``, ``recon``, ``mse``, ``sparsity``, ``aux``,
        ``l0``, ``dead_fraction``, ``lr``.  Losses are in the normalised space the SAE trained in.
    normalization
        ``method``, ``mean`` and ``scale`` (lists) that were folded into the weights.
    params
        The training arguments (seed, lr, max_steps, ...), for provenance.
    validation
        ``step``, ``explained_variance`` of the validation rows at each check (empty without
        ``val_data``).
    stopped_early
        True when the validation checks ended the training before ``max_steps``.
    """

    sae: SparseAutoencoder
    cfg: SAEConfig
    history: pd.DataFrame
    normalization: dict[str, Any]
    params: dict[str, Any]
    validation: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=["step", "explained_variance"]))
    stopped_early: bool = False

    @property
    def steps(self) -> int:
        """Number of optimiser steps taken."""
        return len(self.history)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the SAE (``sae.safetensors``, ``cfg.json``), ``history.csv`` and ``train.json``."""
        path = Path(path)
        with atomic_path(path) as tmp:
            tmp.mkdir()
            self.sae.write_files(tmp, name=path)
            self.history.to_csv(tmp / "history.csv", index=False)
            if len(self.validation):
                self.validation.to_csv(tmp / "validation.csv", index=False)
            info = {"params": self.params, "normalization": self.normalization, "steps": self.steps,
                    "stopped_early": self.stopped_early}
            (tmp / "train.json").write_text(json.dumps(info, indent=2) + "\n")
        return path


# ---------------------------------------------------------------------------------------- data


class _BatchStream(IterableDataset):
    """Turns the user's iterable (or iterator factory) into checked float tensors.

    One Lightning epoch covers the whole run: with a zero-arg callable the stream starts a fresh
    pass whenever one ends (so ``max_steps`` alone decides the length); with a plain iterable it
    stops when the iterable does.  Under DDP each rank takes every world_size-th batch.
    """

    def __init__(self, data: Data, first_pass: Iterator[Any], d_in: int, paired: bool = False) -> None:
        super().__init__()
        self.data = data
        self.repeat = callable(data)
        self._first_pass: Iterator[Any] | None = first_pass
        self.d_in = d_in
        self.paired = paired

    def _passes(self) -> Iterator[Iterator[Any]]:
        first, self._first_pass = self._first_pass, None
        if first is not None:
            yield first
        elif not self.repeat:
            raise SciscopeError("the training data is a one-shot iterable and was already consumed")
        while self.repeat:
            yield iter(self.data())  # type: ignore[operator]

    def __iter__(self) -> Iterator[Batch]:
        rank, world = 0, 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        index = 0
        for it in self._passes():
            n_in_pass = 0
            for batch in it:
                if index % world == rank:
                    yield check_batch(batch, index, self.d_in, paired=self.paired)
                index += 1
                n_in_pass += 1
            if n_in_pass == 0:
                raise SciscopeError("the data callable returned an empty iterator")


def _peek(data: Data, n: int, d_in: int) -> tuple[list[Batch], Iterator[Any]]:
    """First ``n`` batches (checked) and an iterator over the whole first pass, peeked ones included."""
    source = data() if callable(data) else data
    try:
        it = iter(source)
    except TypeError:
        raise ConfigError(
            f"data must be an iterable of tensors or a zero-arg callable returning one, "
            f"got {type(source).__name__}"
        ) from None
    peeked = list(itertools.islice(it, n))
    if not peeked:
        raise SciscopeError("the training data yielded no batches")
    paired = is_pair(peeked[0])
    checked = [check_batch(b, i, d_in, paired=paired) for i, b in enumerate(peeked)]
    return checked, itertools.chain(checked, it)


@torch.no_grad()
def fit_normalization(batches: list[Tensor], method: str) -> tuple[Tensor, Tensor]:
    """Mean and scale of ``x_n = (x - mean) / scale`` from a few batches.

    ``"scalar"``: ``mean`` per dimension, one ``scale`` so that the mean norm of ``x - mean`` is
    ``sqrt(d_in)``.  ``"standardize"``: per-dimension mean and standard deviation (1 where a
    dimension is constant).  ``"none"``: 0 and 1.

    Returns
    -------
    (Tensor, Tensor)
        ``mean`` of shape (d_in,) and ``scale`` of shape () or (d_in,), float32.
    """
    d_in = batches[0].shape[1]
    if method == "none":
        return torch.zeros(d_in), torch.ones(())
    n = sum(b.shape[0] for b in batches)
    mean = sum(b.double().sum(dim=0) for b in batches) / n  # (d_in,)
    if method == "scalar":
        mean_norm = sum((b.double() - mean).norm(dim=1).sum() for b in batches) / n
        scale = (mean_norm / math.sqrt(d_in)).reshape(())
        if not float(scale) > 0:
            scale = torch.ones((), dtype=torch.float64)
    elif method == "standardize":
        var = sum((b.double() - mean).pow(2).sum(dim=0) for b in batches) / max(n - 1, 1)
        scale = var.sqrt()
        scale = torch.where(scale > 1e-8 * scale.max().clamp_min(1e-30), scale, torch.ones_like(scale))
    else:
        raise ConfigError(f"normalize={method!r} is not one of ('none', 'scalar', 'standardize')")
    return mean.float(), scale.float()


# ---------------------------------------------------------------------------------------- module


class SAELightningModule(L.LightningModule):
    """Lightning wrapper: normalises each batch, steps the SAE's own loss, keeps the history.

    Public so that callers can drive their own ``Trainer`` (callbacks, loggers, DDP plugins).
    """

    def __init__(
        self,
        sae: SparseAutoencoder,
        *,
        mean: Tensor,
        scale: Tensor,
        lr: float,
        adam_betas: tuple[float, float],
        max_steps: int,
        lr_warmup_steps: int = 0,
        lr_decay_steps: int = 0,
        sparsity_warmup_steps: int = 0,
        log_progress: bool = False,
        fused_adam: bool = False,
        target_mean: Tensor | None = None,
        target_scale: Tensor | None = None,
    ) -> None:
        super().__init__()
        self.sae = sae
        self.register_buffer("norm_mean", mean.clone())  # (d_in,)
        self.register_buffer("norm_scale", scale.clone())  # () or (d_in,)
        # a transcoder's targets (an MLP's output) have their own statistics; an SAE's are its inputs'
        self.register_buffer("target_mean", (mean if target_mean is None else target_mean).clone())  # (d_in,)
        self.register_buffer("target_scale", (scale if target_scale is None else target_scale).clone())  # () or (d_in,)
        self.lr, self.adam_betas, self.max_steps = lr, adam_betas, max_steps
        self.lr_warmup_steps, self.lr_decay_steps = lr_warmup_steps, lr_decay_steps
        self.sparsity_warmup_steps = sparsity_warmup_steps
        self.log_progress = log_progress
        # One fused kernel for Adam's element-wise update (fp32 state): 2.5 ms instead of ~16 ms
        # per step for the 3.1 M weights of a 384 x 4096 SAE on one CPU thread.  Off by default so
        # that an fp32 run keeps the numbers of the foreach Adam it has always used.
        self.fused_adam = fused_adam
        self._history: list[Tensor] = []  # one (len(HISTORY_COLUMNS),) row per step, detached

    def normalize(self, batch: Batch) -> tuple[Tensor, Tensor | None]:
        """``(x, target)`` in the normalised space the SAE trains in; target None for a plain batch."""
        if isinstance(batch, (tuple, list)):  # a transcoder's (input, target); the loader may make it a list
            x, y = batch
            return (x - self.norm_mean) / self.norm_scale, (y - self.target_mean) / self.target_scale
        return (batch - self.norm_mean) / self.norm_scale, None  # (B, d_in)

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        x, target = self.normalize(batch)  # (B, d_in) each, normalised space
        step = self.global_step
        scale = min(1.0, (step + 1) / self.sparsity_warmup_steps) if self.sparsity_warmup_steps else 1.0
        out = self.sae.loss(x, target=target, sparsity_scale=scale, update_stats=True)
        lr = self.trainer.optimizers[0].param_groups[0]["lr"]
        row = [out[k].detach().float() for k in HISTORY_COLUMNS[:-1]]
        # Kept as tensors (no .item() per step) so an accelerator never waits for the host.
        self._history.append(torch.stack([*row, torch.tensor(lr, device=row[0].device)]))
        if self.log_progress:
            self.log_dict(
                {"loss": out["loss"].detach(), "l0": out["l0"], "dead": out["dead_fraction"]},
                prog_bar=True,
                on_step=True,
                on_epoch=False,
                logger=False,
            )
        return out["loss"]

    def on_after_backward(self) -> None:
        # Gradients are already all-reduced under DDP here, so every rank projects the same thing.
        if self.sae.cfg.normalize_decoder:
            self.sae.remove_parallel_decoder_grad()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.sae.cfg.normalize_decoder:
            self.sae.normalize_decoder_rows()

    def configure_gradient_clipping(
        self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        if self.fused_adam and gradient_clip_val and (gradient_clip_algorithm or "norm") == "norm":
            # Lightning's mixed-precision plugin refuses to clip for a fused optimiser (it could
            # unscale gradients itself under fp16's GradScaler); bf16 has no scaler, so clip here,
            # as Lightning would: the global 2-norm of all gradients.
            torch.nn.utils.clip_grad_norm_(self.sae.parameters(), gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.Adam(
            self.sae.parameters(), lr=self.lr, betas=self.adam_betas, fused=True if self.fused_adam else None
        )
        warm, decay, total = self.lr_warmup_steps, self.lr_decay_steps, self.max_steps

        def factor(step: int) -> float:
            # linear warm-up over the first `warm` steps, linear decay to 0 over the last `decay`
            w = min(1.0, (step + 1) / warm) if warm else 1.0
            d = min(1.0, max(total - step, 0) / decay) if decay else 1.0
            return w * d

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def history_frame(self) -> pd.DataFrame:
        """The per-step history as a DataFrame (``step`` from 0)."""
        if not self._history:
            return pd.DataFrame(columns=["step", *HISTORY_COLUMNS])
        table = torch.stack(self._history).cpu().double().numpy()
        frame = pd.DataFrame(table, columns=list(HISTORY_COLUMNS))
        frame.insert(0, "step", range(len(frame)))
        return frame


class HeldOutEarlyStopping(L.Callback):
    """Every ``every`` steps, the explained variance of validation rows; stop after ``patience``
    checks without a gain of ``min_delta`` (``patience`` 0: only record).

    A wide SAE on a few thousand rows memorises them: its training loss keeps falling while what
    it explains of unseen rows stalls or drops. The rows are raw activations; they are normalised
    as the batches are. Every DDP rank evaluates the same rows with the same weights, and the stop
    is agreed across ranks.
    """

    def __init__(self, rows: Batch, *, every: int, patience: int, min_delta: float = 1e-4) -> None:
        super().__init__()
        self.rows, self.every, self.patience, self.min_delta = rows, max(1, int(every)), int(patience), float(min_delta)
        self.checks: list[tuple[int, float]] = []
        self.best, self.waited, self.stopped = -math.inf, 0, False

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if step % self.every:
            return
        from sciscope.core.sae.metrics import evaluate_sae

        module: SAELightningModule = pl_module  # type: ignore[assignment]
        with torch.no_grad():
            dev = module.norm_mean.device
            rows = tuple(r.to(dev) for r in self.rows) if isinstance(self.rows, tuple) else self.rows.to(dev)
            x, target = module.normalize(rows)  # (N, d_in) each, normalised
            ev = float(evaluate_sae(module.sae, x.float() if target is None else (x.float(), target.float()))["explained_variance"])
        self.checks.append((step, ev))
        if ev > self.best + self.min_delta:
            self.best, self.waited = ev, 0
        else:
            self.waited += 1
        stop = bool(self.patience) and self.waited >= self.patience
        stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if stop:
            self.stopped = True
            trainer.should_stop = True

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.checks, columns=["step", "explained_variance"])


# ------------------------------------------------------------------------------------- train_sae


def train_sae(
    cfg: SAEConfig | Mapping[str, Any],
    data: Data,
    *,
    max_steps: int,
    lr: float = 3e-4,
    adam_betas: tuple[float, float] = (0.9, 0.999),
    lr_warmup_steps: int = 0,
    lr_decay_steps: int = 0,
    sparsity_warmup_steps: int = 0,
    grad_clip: float | None = 1.0,
    norm_batches: int = 8,
    seed: int = 0,
    accelerator: str = "cpu",
    devices: int | str | list[int] = 1,
    strategy: Any = "auto",
    num_nodes: int = 1,
    precision: str | int = "32-true",
    progress: bool = True,
    val_data: Tensor | Any | None = None,
    val_every: int | None = None,
    patience: int = 0,
    trainer_kwargs: Mapping[str, Any] | None = None,
) -> SAETrainResult:
    """Train a sparse autoencoder on batches of activations.

    Parameters
    ----------
    cfg
        Config of a registered architecture (or a mapping with an ``architecture`` key).
    data
        An iterable of tensors of shape (batch, d_in) (one pass), or a zero-arg callable returning
        a fresh iterable (passes repeat until ``max_steps``).  Numpy arrays are accepted.  For a
        transcoder, ``(input, target)`` pairs of such tensors (an MLP's input and output rows).
    max_steps
        Optimiser steps (one per batch).
    lr, adam_betas
        Adam learning rate and betas.
    lr_warmup_steps, lr_decay_steps
        Linear learning-rate warm-up over the first steps / decay to 0 over the last steps.
    sparsity_warmup_steps
        Linear warm-up of the sparsity coefficient (ReLU L1, JumpReLU L0) from 0.
    grad_clip
        Clip the global gradient norm to this value (``None``: no clipping).
    norm_batches
        How many leading batches fit the input normalisation (``cfg.normalize``) and ``b_dec``.
    seed
        Seeds the weight initialisation (a local generator; the global RNG is left alone).  The
        same seed and data give identical weights.
    accelerator, devices, strategy, num_nodes, precision
        Passed to ``lightning.Trainer``.  For DDP use ``strategy="ddp"`` (each rank reads every
        world_size-th batch; dead-latent counters are synchronised); ``"ddp_spawn"`` cannot
        pickle a generator.  ``precision`` is ``"32-true"`` (default; also ``"32"`` or ``32``)
        or ``"bf16-mixed"``: the forward runs under ``torch.autocast`` in bf16 (on CPU too, where
        AMX or AVX512-BF16 make the encoder matmul ~7x faster than fp32), while the weights,
        their gradients and Adam's state stay fp32 (master weights; the sparse decodes of the
        TopK family sum in fp32).  Every registered architecture trains under it.  bf16-mixed
        also steps Adam with its fused kernel, and the TopK family then takes its low-precision
        shortcuts (``topk_pruned``, a CSR encoder gradient; see ``core/sae/topk.py``).  The
        held-out explained variance matches fp32 within ~0.005 (benchmarks/bench_sae_bf16.py).
    progress
        Show Lightning's progress bar and its start-up messages.
    val_data
        ``(N, d_in)`` raw validation rows, not trained on (a transcoder: an ``(inputs, targets)``
        pair): their explained variance is checked every ``val_every`` steps (default
        ``max(25, max_steps // 40)``) into ``.validation``.
    patience
        Stop after this many checks without a gain in that explained variance (0: never stop
        early). The steps then follow the data: a small dataset stops before it is memorised.
    trainer_kwargs
        Any further ``lightning.Trainer`` arguments (callbacks, ...); they override the above.

    Returns
    -------
    SAETrainResult
        ``.sae`` (reads raw activations, eval mode), ``.cfg``, ``.history``, ``.normalization``.

    Raises
    ------
    ConfigError
        Unknown architecture, invalid config field or training argument (the message names it).
    ShapeError
        A batch that is not (batch, d_in) (the message gives expected and actual d_in).
    NonFiniteError
        NaN or inf in a batch (the message gives the batch index).
    """
    if isinstance(cfg, Mapping):
        cfg = config_from_dict(cfg)
    params = {
        "max_steps": max_steps,
        "lr": lr,
        "adam_betas": list(adam_betas),
        "lr_warmup_steps": lr_warmup_steps,
        "lr_decay_steps": lr_decay_steps,
        "sparsity_warmup_steps": sparsity_warmup_steps,
        "grad_clip": grad_clip,
        "norm_batches": norm_batches,
        "seed": seed,
        "accelerator": accelerator,
        "devices": devices,
        "strategy": strategy if isinstance(strategy, str) else type(strategy).__name__,
        "num_nodes": num_nodes,
        "precision": precision,
        "patience": patience,
    }
    _check_train_args(params)
    sae = create_sae(cfg, seed=seed)  # raises ConfigError for an unknown architecture

    peeked, first_pass = _peek(data, norm_batches, cfg.d_in)
    paired = isinstance(peeked[0], tuple)
    if paired and not sae.transcodes:
        raise ConfigError(f"train_sae: the batches are (input, target) pairs, but {cfg.architecture!r} is an "
                          "autoencoder; train a transcoder (e.g. 'topk_transcoder') on pairs")
    # batches may arrive on an accelerator; inputs and targets are normalised each with their own statistics
    on_cpu = [(b[0] if paired else b).detach().cpu() for b in peeked]  # (B, d_in) inputs
    targets = [b[1].detach().cpu() for b in peeked] if paired else on_cpu  # (B, d_in) what the output matches
    mean, scale = fit_normalization(on_cpu, cfg.normalize)
    t_mean, t_scale = fit_normalization(targets, cfg.normalize) if paired else (mean, scale)
    with torch.no_grad():
        n = sum(b.shape[0] for b in targets)
        sae.b_dec.copy_(sum(((b - t_mean) / t_scale).sum(dim=0) for b in targets) / n)

    module = SAELightningModule(
        sae,
        mean=mean,
        scale=scale,
        lr=lr,
        adam_betas=tuple(adam_betas),  # type: ignore[arg-type]
        max_steps=max_steps,
        lr_warmup_steps=lr_warmup_steps,
        lr_decay_steps=lr_decay_steps,
        sparsity_warmup_steps=sparsity_warmup_steps,
        log_progress=progress,
        fused_adam=_low_precision(precision),
        target_mean=t_mean,
        target_scale=t_scale,
    )
    loader = DataLoader(_BatchStream(data, first_pass, cfg.d_in, paired), batch_size=None, num_workers=0)
    trainer_args: dict[str, Any] = {
        "max_steps": max_steps,
        "max_epochs": 1,  # the stream is one long epoch; max_steps (or the data) ends it
        "accelerator": accelerator,
        "devices": devices,
        "strategy": strategy,
        "num_nodes": num_nodes,
        "precision": precision,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": progress,
        "enable_model_summary": False,
        "gradient_clip_val": grad_clip,
        "num_sanity_val_steps": 0,
        "limit_val_batches": 0,
    }
    early = None
    if val_data is not None:
        if is_pair(val_data) != paired:
            raise ConfigError("train_sae: val_data must be " + ("an (inputs, targets) pair like the batches" if paired
                                                                 else "plain rows like the batches"))
        parts = [torch.as_tensor(v, dtype=torch.float32) for v in (val_data if paired else (val_data,))]
        for part in parts:
            if part.ndim != 2 or part.shape[1] != cfg.d_in or not len(part) or len(part) != len(parts[0]):
                raise ConfigError(f"train_sae: val_data must be (N > 0, d_in={cfg.d_in}) rows, got shape {tuple(part.shape)}")
        rows = (parts[0], parts[1]) if paired else parts[0]
        every = int(val_every) if val_every is not None else max(25, max_steps // 40)
        early = HeldOutEarlyStopping(rows, every=every, patience=patience)
        trainer_args["callbacks"] = [early]
        params["val_every"] = every
    trainer_args.update(trainer_kwargs or {})
    with _quiet_lightning(not progress):
        with threads_per_device(trainer_args["devices"]):
            trainer = L.Trainer(**trainer_args)
            trainer.fit(module, train_dataloaders=loader)

    history = module.history_frame()
    if len(history) < max_steps and not callable(data) and not (early is not None and early.stopped):
        warnings.warn(
            f"the data ran out after {len(history)} steps (max_steps={max_steps}); pass a zero-arg "
            "callable returning a fresh iterator to train for several passes",
            stacklevel=2,
        )
    sae = sae.cpu().eval()
    if cfg.normalize != "none" and sae.transcodes:
        sae.fold_normalization(mean, scale, target_mean=t_mean, target_scale=t_scale)
    elif cfg.normalize != "none":
        sae.fold_normalization(mean, scale)
    normalization = {"method": cfg.normalize, "mean": mean.tolist(), "scale": scale.tolist()}
    if paired:
        normalization.update(target_mean=t_mean.tolist(), target_scale=t_scale.tolist())
    result = SAETrainResult(sae=sae, cfg=cfg, history=history, normalization=normalization, params=params)
    if early is not None:
        result.validation, result.stopped_early = early.frame(), early.stopped
    return result


def _low_precision(precision: str | int) -> bool:
    """Whether a Lightning ``precision`` computes in a 16-bit format ("bf16-mixed", "16-mixed", ...)."""
    return str(precision).startswith(("bf16", "16"))


def _check_train_args(p: Mapping[str, Any]) -> None:
    def positive_int(name: str, minimum: int) -> None:
        v = p[name]
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            raise ConfigError(f"train_sae: {name}={v!r} must be an integer >= {minimum}")

    positive_int("max_steps", 1)
    positive_int("norm_batches", 1)
    positive_int("lr_warmup_steps", 0)
    positive_int("lr_decay_steps", 0)
    positive_int("sparsity_warmup_steps", 0)
    positive_int("num_nodes", 1)
    positive_int("patience", 0)
    if isinstance(p["seed"], bool) or not isinstance(p["seed"], int):
        raise ConfigError(f"train_sae: seed={p['seed']!r} must be an integer")
    lr = p["lr"]
    if isinstance(lr, bool) or not isinstance(lr, int | float) or not (math.isfinite(lr) and lr > 0):
        raise ConfigError(f"train_sae: lr={lr!r} must be a positive number")
    betas = p["adam_betas"]
    if len(betas) != 2 or not all(isinstance(b, int | float) and 0 <= b < 1 for b in betas):
        raise ConfigError(f"train_sae: adam_betas={betas!r} must be two numbers in [0, 1)")
    clip = p["grad_clip"]
    if clip is not None and (isinstance(clip, bool) or not isinstance(clip, int | float) or not clip > 0):
        raise ConfigError(f"train_sae: grad_clip={clip!r} must be a positive number or None")


@contextlib.contextmanager
def _quiet_lightning(quiet: bool) -> Iterator[None]:
    """Silence Lightning's start-up banners (when ``quiet``) and its data-loader advice."""
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [lg.level for lg in loggers]
    if quiet:
        for lg in loggers:
            lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            # One process streaming tensors from memory needs no DataLoader workers.
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            # lightning 2.6 on torch >= 2.10 builds pytree LeafSpecs, which torch now deprecates.
            warnings.filterwarnings("ignore", message=".*LeafSpec.*deprecated.*", category=FutureWarning)
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


__all__ = ["Batch", "Data", "HeldOutEarlyStopping", "check_batch", "is_pair", "SAELightningModule", "SAETrainResult", "fit_normalization", "train_sae"]
