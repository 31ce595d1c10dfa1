"""What every locally trained default model shares: a Lightning fit and a warmup-cosine schedule.

Domain adapters train their small default models (molecule LMs, masked-gene BERTs, space-time
predictors, VLA policies) with the same recipe; keeping it here means one place decides the
Lightning options (CPU by default, or the run's ``accelerator``/``devices``/``strategy``), the
gradient clipping and the quieting of the warnings that are deliberate in this setting.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from .threads import threads_per_device

__all__ = ["fit_lightning", "loss_module", "warmup_cosine"]


def warmup_cosine(
    optimizer: torch.optim.Optimizer, *, warmup: int, total: int, floor: float = 0.1
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over ``min(warmup, total // 5)`` steps, then cosine decay to ``floor`` x lr.

    Parameters
    ----------
    optimizer
        The optimiser whose learning rate is scheduled (per step, not per epoch).
    warmup, total
        Warmup steps and total optimiser steps.
    floor
        Final learning rate as a fraction of the peak.
    """
    warm = max(1, min(int(warmup), int(total) // 5))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        frac = (step - warm) / max(1, int(total) - warm)
        return floor + (1.0 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def fit_lightning(
    module: Any,
    loader: Iterable[Any],
    *,
    max_steps: int,
    progress: bool = False,
    trainer_options: Mapping[str, Any] | None = None,
    gradient_clip_val: float | None = 1.0,
) -> float:
    """Fit a ``LightningModule`` for ``max_steps`` optimiser steps; return the wall seconds.

    Parameters
    ----------
    module, loader
        What ``lightning.Trainer.fit`` takes (the loader cycles until ``max_steps``).
    progress
        Lightning's progress bar.
    trainer_options
        ``accelerator``, ``devices``, ``strategy``, ``num_nodes`` ... passed to the ``Trainer``
        (default: one CPU device). A pipeline run sets them from its config.
    gradient_clip_val
        Gradient-norm clipping (None = off).

    Notes
    -----
    No logger, checkpoints, model summary or sanity validation; Lightning's notices about the
    CPU-only run, few loader workers and the missing validation loop are silenced, and so is the
    per-model chatter of transformers, which are deliberate here.
    """
    import lightning as L

    verbosity = None
    try:
        import transformers

        verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()
    except ImportError:  # pragma: no cover - transformers is a core dependency
        transformers = None  # type: ignore[assignment]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for name in ("lightning.pytorch", "lightning.fabric"):
                logging.getLogger(name).setLevel(logging.ERROR)
            options = {"accelerator": "cpu", "devices": 1, **dict(trainer_options or {})}
            with threads_per_device(options["devices"]):
                trainer = L.Trainer(
                    max_steps=int(max_steps), logger=False, enable_checkpointing=False, enable_progress_bar=progress,
                    enable_model_summary=False, num_sanity_val_steps=0, gradient_clip_val=gradient_clip_val,
                    **options,
                )
                t0 = time.time()
                trainer.fit(module, loader)
                return time.time() - t0
    finally:
        if transformers is not None and verbosity is not None:
            transformers.logging.set_verbosity(verbosity)


def loss_module(
    model: torch.nn.Module,
    loss_fn: Callable[[Any], torch.Tensor | tuple[torch.Tensor, Mapping[str, Any]]],
    *,
    lr: float,
    steps: int,
    warmup: int,
    floor: float = 0.1,
    weight_decay: float = 0.01,
    betas: tuple[float, float] = (0.9, 0.999),
    log_every: int = 25,
) -> Any:
    """A ``LightningModule`` minimising ``loss_fn(batch)`` with AdamW and :func:`warmup_cosine`.

    Every domain's default model trains this way; only the loss differs.

    Parameters
    ----------
    model
        The module whose parameters are optimised (registered as ``.model``).
    loss_fn
        ``batch -> loss`` or ``batch -> (loss, {name: scalar})``; the extras are logged beside
        the loss (e.g. a behaviour-cloning accuracy).
    lr, steps, warmup, floor
        Peak learning rate, total optimiser steps, warmup steps and final fraction of the peak.
    weight_decay, betas
        AdamW's.
    log_every
        Steps between rows of ``.history`` (``{"step", "loss", ...}``); the last step is logged too.
    """
    import lightning as L

    class LossModule(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = model
            self.history: list[dict[str, float]] = []

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            out = loss_fn(batch)
            loss, extras = (out, {}) if isinstance(out, torch.Tensor) else out
            step = int(self.global_step)
            if step % log_every == 0 or step == steps - 1:
                self.history.append({"step": step, "loss": float(loss.detach()),
                                     **{k: float(v) for k, v in extras.items()}})
            return loss

        def configure_optimizers(self) -> Any:
            opt = torch.optim.AdamW(self.model.parameters(), lr=lr, weight_decay=weight_decay, betas=betas)
            sched = warmup_cosine(opt, warmup=warmup, total=steps, floor=floor)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    return LossModule()
