"""Matryoshka BatchTopK SAE (Bussmann, Nabeshima, Karvonen, Nanda 2025, "Learning Multi-Level
Features with Matryoshka Sparse Autoencoders"; Nabeshima 2024, "Matryoshka Sparse Autoencoders").

The dictionary is a ladder of nested prefixes ``m_1 < m_2 < ... < m_G = d_sae``, trained jointly so
that the first ``m_i`` latents alone already reconstruct well: early latents learn general
features, later ones refine them, which reduces feature absorption and splitting.  The code is
BatchTopK's over the whole dictionary; the loss sums the reconstruction error of every prefix::

    f       = BatchTopK_k(ReLU((x - b_dec) @ W_enc + b_enc))          # (B, d_sae)
    x_hat_i = f[:, :m_i] @ W_dec[:m_i] + b_dec                         # (B, d_in), one per prefix
    loss    = sum_i ||x - x_hat_i||^2 + aux_coeff * AuxK                # AuxK on the full residual

Inference is BatchTopK's: a per-sample threshold estimated during training, and the full
dictionary (``x_hat = x_hat_G``).  The reported ``recon`` / ``mse`` are the full dictionary's, so
they compare with the other architectures; ``loss`` also holds the prefixes' errors.

All prefix reconstructions come from one ``embedding_bag`` call: the kept entries are ordered by
sample and then by latent, so splitting each sample's bag at the prefix boundaries gives one bag
per (sample, group of latents between two boundaries); a cumulative sum over the groups turns the
groups' contributions into the prefixes' reconstructions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sciscope.core.errors import ConfigError
from sciscope.core.sae.base import TrainForward, register_sae
from sciscope.core.sae.batchtopk import BatchTopKConfig, BatchTopKSAE, bag_samples
from sciscope.core.sae.topk import weighted_rows


@dataclass(kw_only=True)
class MatryoshkaConfig(BatchTopKConfig):
    """Config of :class:`MatryoshkaSAE`; the fields of :class:`BatchTopKConfig` plus the ladder.

    Parameters
    ----------
    prefixes
        Sizes of the nested prefixes, as numbers of leading latents: strictly increasing integers
        that end at ``d_sae``, e.g. ``(512, 1024, 2048, 4096)``.  ``None`` (the default) halves
        from the full dictionary: ``d_sae/8, d_sae/4, d_sae/2, d_sae`` (see :attr:`prefix_sizes`).
        A list (as ``cfg.json`` gives it back) is stored as a tuple.
    """

    prefixes: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.prefixes, list):  # JSON has no tuples: the round trip must compare equal
            self.prefixes = tuple(self.prefixes)
        super().__post_init__()

    def validate(self) -> None:
        super().validate()
        if self.prefixes is None:
            return
        name = f"{type(self).__name__}.prefixes"
        sizes = self.prefixes
        if not isinstance(sizes, tuple) or not sizes:
            raise ConfigError(f"{name} must be a non-empty list of integers, got {sizes!r}")
        for m in sizes:
            if isinstance(m, bool) or not isinstance(m, int) or m < 1:
                raise ConfigError(f"{name}={list(sizes)}: every size must be an integer >= 1, got {m!r}")
        if any(b <= a for a, b in zip(sizes, sizes[1:], strict=False)):
            raise ConfigError(f"{name}={list(sizes)} must be strictly increasing")
        if sizes[-1] != self.d_sae:
            raise ConfigError(f"{name}={list(sizes)} must end at d_sae={self.d_sae} (the full dictionary)")

    @property
    def prefix_sizes(self) -> tuple[int, ...]:
        """The prefix sizes in use: ``prefixes``, or the default ladder for ``d_sae``."""
        if self.prefixes is not None:
            return self.prefixes
        d = self.d_sae
        return tuple(sorted({m for m in (d // 8, d // 4, d // 2, d) if m >= 1}))


@dataclass
class MatryoshkaForward(TrainForward):
    """:class:`TrainForward` plus the errors of the strict prefixes (the last prefix is ``x_hat``)."""

    # (G - 1,) squared error of x_hat_i, summed over features, mean over samples; with gradient
    prefix_recon: Tensor | None = None


@register_sae("matryoshka")
class MatryoshkaSAE(BatchTopKSAE):
    """BatchTopK SAE whose nested dictionary prefixes each learn to reconstruct on their own."""

    config_class = MatryoshkaConfig
    cfg: MatryoshkaConfig

    def prefix_reconstructions(self, vals: Tensor, cols: Tensor, offsets: Tensor) -> Tensor:
        """Reconstruction from each prefix of a batch code: (n,), (n,), (B,) -> (B, G, d_in).

        ``vals``, ``cols``, ``offsets`` are a flat code (values, latent indices ascending within
        each sample, where each sample begins), as :meth:`_train_codes` gives it.
        """
        n_samples, d_sae = offsets.numel(), self.cfg.d_sae
        sizes = self.cfg.prefix_sizes
        starts = torch.tensor((0, *sizes[:-1]), device=cols.device)  # (G,) first latent of each group
        # (n,) sorted: entries are ordered by sample, then latent
        key = bag_samples(offsets, cols.numel()) * d_sae + cols
        bounds = torch.arange(n_samples, device=cols.device)[:, None] * d_sae + starts  # (B, G)
        group_offsets = torch.searchsorted(key, bounds.flatten())  # (B * G,)
        parts = weighted_rows(self.W_dec, cols, vals, group_offsets)  # (B * G, d_in) per group
        return parts.view(n_samples, len(sizes), -1).cumsum(dim=1) + self.b_dec  # (B, G, d_in)

    def _train_forward(self, x: Tensor) -> TrainForward:
        vals, cols, offsets = self._train_codes(x)  # (n,), (n,), (B,); n = k * B
        x_hats = self.prefix_reconstructions(vals, cols, offsets)  # (B, G, d_in)
        # the strict prefixes' errors; the full dictionary's is the base loss's recon
        prefix_recon = (x[:, None, :] - x_hats[:, :-1]).pow(2).sum(dim=-1).mean(dim=0)  # (G - 1,)
        return MatryoshkaForward(
            x_hat=x_hats[:, -1], prefix_recon=prefix_recon, **self._code_fields(vals, cols, x.shape[0])
        )

    def _extra_loss(self, out: TrainForward) -> Tensor:
        """The strict prefixes' reconstruction errors, summed (the full one is the loss's recon)."""
        if not isinstance(out, MatryoshkaForward) or out.prefix_recon is None:
            # never silently train a plain BatchTopK SAE under the Matryoshka name
            raise TypeError("MatryoshkaSAE._train_forward must return a MatryoshkaForward with prefix_recon")
        return out.prefix_recon.sum()
