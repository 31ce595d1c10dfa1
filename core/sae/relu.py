"""ReLU SAE with an L1 penalty weighted by decoder row norms (Anthropic, "April update", 2024).

    f    = ReLU((x - b_dec) @ W_enc + b_enc)                       # (B, d_sae)
    loss = ||x - x_hat||^2 + l1_coeff * sum_i f_i * ||W_dec[i]||   # mean over the batch

Weighting each latent's L1 by its decoder norm makes the penalty invariant to trading scale between
encoder and decoder, so the decoder needs no unit-norm constraint (``normalize_decoder=False``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from sciscope.core.sae.base import SAEConfig, SparseAutoencoder, _check_float, register_sae


@dataclass(kw_only=True)
class ReLUConfig(SAEConfig):
    """Config of :class:`ReLUSAE`.

    Parameters
    ----------
    l1_coeff
        Weight of the decoder-norm-weighted L1 penalty.  Anthropic used about 5 with inputs scaled
        to mean norm ``sqrt(d_in)`` (``normalize="scalar"``).
    """

    l1_coeff: float = 5.0
    normalize_decoder: bool = False

    def validate(self) -> None:
        super().validate()
        _check_float(self, "l1_coeff", minimum=0.0)


@register_sae("relu")
class ReLUSAE(SparseAutoencoder):
    """Sparse autoencoder with a ReLU and an L1 penalty on decoder-norm-weighted activations."""

    config_class = ReLUConfig
    cfg: ReLUConfig
    # Small decoder rows at init so the L1 term does not dominate the first steps.
    init_decoder_norm = 0.1

    def _encode(self, x: Tensor) -> Tensor:
        return F.relu(self.pre_acts(x))  # (B, d_sae)

    def _sparsity_penalty(self, f: Tensor) -> Tensor:
        # (B, d_sae) * (d_sae,) -> sum over latents, mean over samples
        return self.cfg.l1_coeff * (f * self.W_dec.norm(dim=1)).sum(dim=-1).mean()
