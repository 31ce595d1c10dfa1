"""A small space-time transformer that predicts the next frame's change from a few past frames.

The backbone is Hugging Face's :class:`~transformers.TimesformerModel` (divided space-time
attention over patches, Bertasius et al. 2021), randomly initialised at laptop size: frames
``(B, T, C, H, W)`` are cut into ``p x p`` patches, each block attends over time at every patch,
then over space in every frame. A linear head reads the last frame's patch tokens and writes a
few channels per pixel of its patch; a periodic 3x3 convolution mixes them across patch edges
into the change of each field, so ``next = last + model(frames)`` (without it, independent
per-patch outputs leave block seams that grow over a rollout). The convolution starts at zero:
the untrained model is the persistence baseline, and training only has to learn the dynamics.
Block outputs are ``(B, 1 + P * T, D)`` tensors (a class token, then patch-major, frame-minor
tokens), i.e. the canonical ``(batch, positions, dim)`` layout every sciscope tool reads.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sciscope.core.errors import ConfigError
from sciscope.core.io import atomic_path, write_json
from sciscope.core.training import fit_lightning, loss_module

__all__ = ["ModelSpec", "PhysicsPredictor", "RolloutResult", "TrainResult", "WindowDataset", "build_predictor",
           "load_predictor", "rollout", "rollout_copies", "save_predictor", "train_predictor"]

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "predictor.json"


@dataclass
class ModelSpec:
    """Size and training recipe of the default predictor (every field is part of the cache key)."""

    grid: int = 32
    channels: int = 2
    context_frames: int = 3
    patch_size: int = 4
    hidden: int = 64
    n_layers: int = 4
    n_heads: int = 4
    steps: int = 1500
    batch_size: int = 32
    lr: float = 1e-3
    warmup: int = 100
    noise: float = 0.02  # std of the training noise on context frames (standardised units)
    decoder_channels: int = 8  # channels of the full-resolution map the head writes before its 3x3 conv
    seed: int = 0


@dataclass
class TrainResult:
    """What training produced (also written into ``predictor.json``)."""

    steps: int
    seconds: float
    steps_per_second: float
    final_loss: float
    n_windows: int
    history: list[dict[str, float]] = field(default_factory=list)


class PhysicsPredictor(nn.Module):
    """TimeSformer backbone + linear patch head: ``frames (B, T, C, H, W) -> change (B, C, H, W)``.

    Parameters
    ----------
    spec
        Sizes (grid, channels, context frames, patch size, width, depth, heads).
    """

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        from transformers import TimesformerConfig, TimesformerModel

        if spec.grid % spec.patch_size:
            raise ConfigError(f"physics: 'patch_size' {spec.patch_size} must divide the grid size {spec.grid}")
        if spec.hidden % spec.n_heads:
            raise ConfigError(f"physics: 'hidden' ({spec.hidden}) must be a multiple of 'n_heads' ({spec.n_heads})")
        self.spec = spec
        cfg = TimesformerConfig(
            image_size=spec.grid, patch_size=spec.patch_size, num_channels=spec.channels,
            num_frames=spec.context_frames, hidden_size=spec.hidden, num_hidden_layers=spec.n_layers,
            num_attention_heads=spec.n_heads, intermediate_size=2 * spec.hidden,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,  # tiny model, small data: no dropout
            attention_type="divided_space_time",
        )
        self.backbone = TimesformerModel(cfg)
        p, k = spec.patch_size, spec.decoder_channels
        self.head = nn.Linear(spec.hidden, k * p * p)
        self.act = nn.GELU()
        self.mix = nn.Conv2d(k, spec.channels, 3, padding=1, padding_mode="circular")  # fields are periodic
        nn.init.zeros_(self.mix.weight)  # start as persistence: zero change everywhere
        nn.init.zeros_(self.mix.bias)

    @property
    def config(self) -> Any:
        """The backbone's Hugging Face config (``model_identity`` reads its name from here)."""
        return self.backbone.config

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        b, t, c, h, w = frames.shape
        s = self.spec
        if (t, c, h, w) != (s.context_frames, s.channels, s.grid, s.grid):
            raise ConfigError(
                f"physics: the predictor reads frames of shape (T, C, H, W) = "
                f"{(s.context_frames, s.channels, s.grid, s.grid)}, got {(t, c, h, w)}"
            )
        hidden = self.backbone(pixel_values=frames).last_hidden_state  # (B, 1 + P*T, D)
        p = s.patch_size
        hp, wp = h // p, w // p
        tokens = hidden[:, 1:].reshape(b, hp * wp, t, -1)[:, :, -1]  # last frame's patch tokens (B, P, D)
        k = s.decoder_channels
        out = self.head(tokens)  # (B, P, k*p*p)
        out = out.reshape(b, hp, wp, k, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, k, h, w)  # (B, k, H, W)
        return self._periodic_mix(self.act(out))  # (B, C, H, W)

    def _periodic_mix(self, x: torch.Tensor) -> torch.Tensor:
        """``self.mix`` (the periodic 3x3 convolution) as circular pad + unfold + one matmul per example.

        The same numbers as ``self.mix(x)`` up to rounding, and the same parameters; computed this
        way because oneDNN's convolution picks its algorithm by batch size (a batch of one differs
        in the last bits from that example inside a larger batch), whereas here every example's
        output is the same product whatever the batch: ``n`` stacked copies of a batch (batched
        steering sweeps) then compute exactly what the batch alone computes. In training mode it is
        the convolution itself, which trains faster.
        """
        if self.training:  # training needs no batch-independence; the convolution is faster there
            return self.mix(x)
        b, _, h, w = x.shape
        cols = nn.functional.unfold(nn.functional.pad(x, (1, 1, 1, 1), mode="circular"), 3)  # (B, k*9, H*W)
        weight = self.mix.weight.reshape(self.mix.out_channels, -1)  # (C, k*9), unfold's (channel, ky, kx) order
        return (weight @ cols + self.mix.bias[:, None]).reshape(b, -1, h, w)


def build_predictor(spec: ModelSpec) -> PhysicsPredictor:
    """A randomly initialised :class:`PhysicsPredictor` (seeded)."""
    torch.manual_seed(spec.seed)
    return PhysicsPredictor(spec)


class WindowDataset(torch.utils.data.Dataset):
    """Windows of normalised trajectories: ``(context (T, C, n, n), change (C, n, n), weight)``.

    Parameters
    ----------
    frames
        ``(n_traj, n_frames, C, n, n)`` float32, already normalised per system and channel.
    windows
        ``(trajectory, t)`` pairs: context frames ``t - T + 1 .. t``, target ``frames[t + 1] - frames[t]``.
    weights
        One loss weight per trajectory (``1 / mean squared change`` of its system, so both systems count).
    shift
        Roll each window by a random number of cells along x (both systems are x-periodic and
        x-invariant), a free augmentation.
    noise
        Std of Gaussian noise added to the context frames; the target is the next frame minus the
        *noisy* last frame, so the model learns to pull a perturbed state back (rollout stability).
    """

    def __init__(self, frames: np.ndarray, windows: Sequence[tuple[int, int]], context: int,
                 weights: np.ndarray, *, shift: bool = True, noise: float = 0.0, seed: int = 0) -> None:
        self.frames = torch.from_numpy(np.ascontiguousarray(frames, dtype=np.float32))
        self.windows = [(int(i), int(t)) for i, t in windows]
        self.context = context
        self.weights = torch.as_tensor(weights, dtype=torch.float32)
        self.shift = shift
        self.noise = float(noise)
        self.gen = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        i, t = self.windows[idx]
        ctx = self.frames[i, t - self.context + 1: t + 1]  # (T, C, n, n)
        if self.noise > 0:
            ctx = ctx + self.noise * torch.randn(ctx.shape, generator=self.gen)
        target = self.frames[i, t + 1] - ctx[-1]  # (C, n, n)
        if self.shift:
            s = int(torch.randint(0, ctx.shape[-1], (1,), generator=self.gen))
            ctx, target = torch.roll(ctx, s, -1), torch.roll(target, s, -1)
        return ctx, target, self.weights[i]


def train_predictor(
    spec: ModelSpec, dataset: WindowDataset, *, progress: bool = False, trainer_options: dict[str, Any] | None = None
) -> tuple[PhysicsPredictor, TrainResult]:
    """Train a fresh predictor for ``spec.steps`` optimiser steps on ``dataset`` (CPU, Lightning).

    The loss is the per-example weighted MSE of the predicted change (AdamW, linear warmup, then
    cosine decay to 5%); the loader reshuffles (seeded) every epoch and cycles until ``steps``.
    """
    from torch.utils.data import DataLoader, RandomSampler

    if len(dataset) == 0:
        raise ConfigError("physics: no training windows (too few frames or trajectories in the train split)")
    model = build_predictor(spec)

    def next_frame_loss(batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        ctx, target, weight = batch
        return (((model(ctx) - target) ** 2).mean(dim=(1, 2, 3)) * weight).mean()

    module = loss_module(model, next_frame_loss, lr=spec.lr, steps=spec.steps, warmup=spec.warmup, floor=0.05)
    sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(spec.seed))
    loader = DataLoader(dataset, batch_size=min(spec.batch_size, len(dataset)), sampler=sampler, drop_last=True)
    seconds = fit_lightning(module, loader, max_steps=spec.steps, progress=progress, trainer_options=trainer_options)
    model.eval()
    hist = module.history
    final = float(np.mean([h["loss"] for h in hist[-4:]])) if hist else float("nan")
    return model, TrainResult(spec.steps, round(seconds, 2), round(spec.steps / max(seconds, 1e-9), 2), final,
                              len(dataset), hist)


def save_predictor(directory: str | Path, model: PhysicsPredictor, info: dict[str, Any]) -> Path:
    """Write ``model.safetensors`` + ``predictor.json`` (spec, normalisation, training info) atomically."""
    from safetensors.torch import save_file

    directory = Path(directory)
    with atomic_path(directory) as tmp:
        tmp.mkdir(parents=True)
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_FILE))
        write_json(tmp / CONFIG_FILE, {"spec": asdict(model.spec), **info})
    return directory


def load_predictor(directory: str | Path) -> tuple[PhysicsPredictor, dict[str, Any]]:
    """Reload a directory written by :func:`save_predictor` (safetensors: no pickle)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    cfg_file, weights = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    if not cfg_file.is_file() or not weights.is_file():
        raise ConfigError(f"physics: {str(directory)!r} is not a predictor directory (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
    info = json.loads(cfg_file.read_text())
    model = PhysicsPredictor(ModelSpec(**info["spec"]))
    missing, unexpected = model.load_state_dict(load_file(str(weights)), strict=False)
    if missing or unexpected:
        raise ConfigError(f"physics: weights in {str(weights)!r} do not fit the predictor: missing {missing[:5]}, "
                          f"unexpected {unexpected[:5]}")
    return model.eval(), info


@dataclass
class RolloutResult:
    """Autoregressive predictions.

    Attributes
    ----------
    frames : ndarray
        ``(B, n_steps, C, n, n)`` predicted frames (normalised units); NaN from the step a rollout
        diverged.
    diverged : ndarray
        ``(B,)`` bool: the rollout turned NaN/inf or exceeded the blow-up bound.
    diverged_at : ndarray
        ``(B,)`` int: first diverged step (``-1`` for finite rollouts).
    """

    frames: np.ndarray
    diverged: np.ndarray
    diverged_at: np.ndarray


def rollout(model: nn.Module, context: np.ndarray | torch.Tensor, n_steps: int, *, blowup: float = 50.0,
            batch_size: int = 64) -> RolloutResult:
    """Roll ``model`` forward ``n_steps`` frames from ``context`` ``(B, T, C, n, n)``.

    A rollout whose frame holds NaN/inf or exceeds ``blowup`` (normalised units; the data sit
    within a few units) is marked diverged from that step, its later frames are NaN, and its
    input is replaced by zeros so the others go on unchanged.
    """
    return rollout_copies(model, context, n_steps, 1, blowup=blowup, batch_size=batch_size)[0]


@torch.no_grad()
def rollout_copies(model: nn.Module, context: np.ndarray | torch.Tensor, n_steps: int, copies: int, *,
                   blowup: float = 50.0, batch_size: int = 64) -> list[RolloutResult]:
    """:func:`rollout` of ``copies`` stacked copies of ``context``: one :class:`RolloutResult` per copy.

    Each batch of ``batch_size`` contexts is tiled copy-major
    (:func:`~sciscope.core.interventions.tile_copies`) and rolled out as one, so every forward
    carries ``copies`` equal copy blocks of the batch :func:`rollout` would feed: under
    :func:`~sciscope.core.interventions.apply_copies` copy ``i`` evolves under its own
    intervention, and (every step being per-row) its result is that of :func:`rollout` under
    that intervention alone.
    """
    from sciscope.core.interventions import split_copies, tile_copies

    ctx_all = torch.as_tensor(np.asarray(context, dtype=np.float32))
    if ctx_all.ndim != 5:
        raise ConfigError(f"physics: rollout context must be (B, T, C, n, n), got shape {tuple(ctx_all.shape)}")
    if copies < 1:
        raise ValueError(f"physics: rollout copies must be >= 1, got {copies}")
    device = next(model.parameters(), torch.empty(0)).device
    was_training = model.training
    model.eval()
    parts: list[list[tuple[np.ndarray, ...]]] = [[] for _ in range(copies)]  # per copy: (frames, diverged, at) per batch
    try:
        for b0 in range(0, len(ctx_all), batch_size):
            # tile per batch (not the whole context): the batch boundaries, hence each forward's
            # rows per copy, stay those of one rollout alone
            ctx = tile_copies(ctx_all[b0: b0 + batch_size], copies).to(device)
            bsz = len(ctx)
            frames = torch.full((bsz, n_steps, *ctx.shape[2:]), float("nan"))
            bad = torch.zeros(bsz, dtype=torch.bool)
            at = torch.full((bsz,), -1, dtype=torch.long)
            for step in range(n_steps):
                safe = torch.where(bad.to(device)[:, None, None, None, None], torch.zeros_like(ctx), ctx)
                nxt = (safe[:, -1] + model(safe)).float().cpu()  # (B, C, n, n)
                now_bad = ~torch.isfinite(nxt).reshape(bsz, -1).all(1) | (nxt.abs().reshape(bsz, -1).amax(1) > blowup)
                newly = now_bad & ~bad
                at[newly] = step
                bad |= now_bad
                nxt[bad] = float("nan")
                frames[:, step] = nxt
                ctx = torch.cat([ctx[:, 1:], torch.nan_to_num(nxt, nan=0.0).to(device)[:, None]], dim=1)
            for i, part in enumerate(zip(*(split_copies(x.numpy(), copies) for x in (frames, bad, at)))):
                parts[i].append(part)
    finally:
        model.train(was_training)
    return [RolloutResult(*(np.concatenate(p) for p in zip(*per_copy))) for per_copy in parts]
