"""JumpReLU SAE (Rajamanoharan et al. 2024, "Jumping Ahead: ... JumpReLU Sparse Autoencoders").

Each latent has its own learned threshold theta_i > 0 (stored as ``log_threshold``)::

    pre   = (x - b_dec) @ W_enc + b_enc                 # (B, d_sae)
    f     = pre * H(pre - theta)                        # JumpReLU; H is the Heaviside step
    x_hat = f @ W_dec + b_dec
    loss  = ||x - x_hat||^2 + l0_coeff * sum_i H(pre_i - theta_i)     # mean over the batch

H has zero gradient almost everywhere, so theta learns through straight-through estimators with a
rectangle kernel K(u) = 1[|u| < 1/2] of width ``bandwidth`` (epsilon):

    d JumpReLU / d theta := -(theta / eps) K((pre - theta) / eps)
    d H(pre - theta) / d theta := -(1 / eps) K((pre - theta) / eps)

and gradients with respect to ``pre`` are the usual ones (the step's is zero).  Only samples with a
pre-activation within eps/2 of a threshold move it.  The paper's eps = theta_0 = 0.001 assume inputs
of unit mean squared norm; with ``normalize="scalar"`` (mean norm sqrt(d_in)) the defaults here
are scaled up accordingly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from sciscope.core.sae.base import (
    SAEConfig,
    SparseAutoencoder,
    TrainForward,
    _check_float,
    register_sae,
)


def _rectangle(pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    """K((pre - theta) / eps) / eps: (B, d_sae)."""
    return ((pre - threshold).abs() < bandwidth / 2).to(pre.dtype) / bandwidth


class _JumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold)  # (B, d_sae)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        pre, threshold = ctx.saved_tensors
        grad_pre = grad * (pre > threshold)
        grad_threshold = -(threshold * _rectangle(pre, threshold, ctx.bandwidth) * grad).sum(dim=0)
        return grad_pre, grad_threshold, None


class _Step(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)  # (B, d_sae)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        pre, threshold = ctx.saved_tensors
        grad_threshold = -(_rectangle(pre, threshold, ctx.bandwidth) * grad).sum(dim=0)
        return torch.zeros_like(pre), grad_threshold, None


@dataclass(kw_only=True)
class JumpReLUConfig(SAEConfig):
    """Config of :class:`JumpReLUSAE`.

    Parameters
    ----------
    l0_coeff
        Weight of the L0 penalty (lambda).
    bandwidth
        Width epsilon of the rectangle kernel of the straight-through estimators.
    threshold_init
        Initial threshold of every latent.
    """

    l0_coeff: float = 1.0
    bandwidth: float = 0.05
    threshold_init: float = 0.05

    def validate(self) -> None:
        super().validate()
        _check_float(self, "l0_coeff", minimum=0.0)
        _check_float(self, "bandwidth", minimum=0.0, strict=True)
        _check_float(self, "threshold_init", minimum=0.0, strict=True)


@register_sae("jumprelu")
class JumpReLUSAE(SparseAutoencoder):
    """Sparse autoencoder with a learned per-latent threshold and an L0 penalty."""

    config_class = JumpReLUConfig
    cfg: JumpReLUConfig

    def __init__(self, cfg: JumpReLUConfig, *, generator: torch.Generator | None = None) -> None:
        super().__init__(cfg, generator=generator)
        # log-parametrised so the threshold stays positive under any gradient step
        self.log_threshold = nn.Parameter(torch.full((cfg.d_sae,), math.log(cfg.threshold_init)))

    @property
    def threshold(self) -> Tensor:
        """(d_sae,) per-latent thresholds theta."""
        return self.log_threshold.exp()

    def _encode(self, x: Tensor) -> Tensor:
        return _JumpReLU.apply(self.pre_acts(x), self.threshold, self.cfg.bandwidth)  # (B, d_sae)

    def _train_forward(self, x: Tensor) -> TrainForward:
        pre = self.pre_acts(x)  # (B, d_sae)
        threshold = self.threshold  # (d_sae,)
        f = _JumpReLU.apply(pre, threshold, self.cfg.bandwidth)  # (B, d_sae)
        l0_per_sample = _Step.apply(pre, threshold, self.cfg.bandwidth).sum(dim=-1)  # (B,)
        active = f != 0
        return TrainForward(
            x_hat=self.decode(f),
            sparsity=self.cfg.l0_coeff * l0_per_sample.mean(),
            l0=active.sum(dim=-1).float().mean(),
            fired=active.any(dim=0),
        )
