"""BatchTopK SAE (Bussmann, Leask, Nanda 2024, "BatchTopK Sparse Autoencoders").

Training keeps the k * B largest ReLU'd pre-activations of the whole batch, so samples share a
budget of k latents on average instead of exactly k each::

    pre   = ReLU((x - b_dec) @ W_enc + b_enc)      # (B, d_sae)
    f     = pre * [pre among the top k*B of the batch]
    x_hat = f @ W_dec + b_dec
    loss  = ||x - x_hat||^2 + aux_coeff * AuxK

That makes a sample's code depend on its batch-mates, so inference uses a single threshold
instead: ``f = pre * [pre > threshold]``, per sample.  The threshold is estimated during training
as a running (exponential) mean of the smallest kept activation of each batch, and is saved with
the weights (buffer ``threshold``; -1 until the first training batch).  Under DDP the k * B budget
is per rank's batch, and the threshold takes the smallest kept activation over all ranks.

Training never builds the dense (B, d_sae) code: the decode sums the kept decoder rows with
``embedding_bag``, and the encoder's backward touches only the kept entries (TopK's
:func:`~sciscope.core.sae.topk.sparse_affine`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from sciscope.core.sae.base import (
    SAEConfig,
    SparseAutoencoder,
    TrainForward,
    _check_float,
    _check_int,
    _distributed,
    register_sae,
)
from sciscope.core.sae.topk import SparseCode, bag_samples, sparse_affine, weighted_rows

# Stride of the deterministic subsample used to pre-select top-(k*B) candidates; prime, so it does
# not alias with d_sae.
_SAMPLE_STRIDE = 61


@dataclass(kw_only=True)
class BatchTopKConfig(SAEConfig):
    """Config of :class:`BatchTopKSAE`.

    Parameters
    ----------
    k
        Mean number of latents kept per sample (k * B per batch of B).
    threshold_lr
        Weight of each batch in the running mean of the inference threshold
        (``t <- (1 - lr) t + lr * min kept activation``).
    """

    k: int = 32
    aux_coeff: float = 1 / 32
    threshold_lr: float = 0.01

    def validate(self) -> None:
        super().validate()
        _check_int(self, "k", minimum=1, maximum=self.d_sae)
        _check_float(self, "threshold_lr", minimum=0.0, maximum=1.0, strict=True)


@register_sae("batchtopk")
class BatchTopKSAE(SparseAutoencoder):
    """Sparse autoencoder with a batch-level top-k in training and a learned threshold at inference."""

    config_class = BatchTopKConfig
    cfg: BatchTopKConfig

    def __init__(self, cfg: BatchTopKConfig, *, generator: torch.Generator | None = None) -> None:
        super().__init__(cfg, generator=generator)
        self.register_buffer("threshold", torch.tensor(-1.0))  # () ; -1: not estimated yet

    # ---- batch-level selection (training) ------------------------------------------------------

    def _batch_topk(self, pre: Tensor) -> SparseCode:
        """The k * B largest entries of ``pre`` (B, d_sae), as one embedding bag per sample.

        Returns values (n,), latent indices (n,) ascending within each sample, and offsets (B,)
        where each sample's entries begin.
        """
        flat = pre.flatten()  # (B * d_sae,)
        n_keep = min(self.cfg.k * pre.shape[0], flat.numel())
        # torch.topk with a large k over B * d_sae entries is slow on CPU (a partial sort).  Pick a
        # cut-off from a strided subsample so that more than n_keep entries exceed it, then take the
        # exact top n_keep among those candidates.  Exact whenever enough candidates survive
        # (checked); otherwise fall back to the full topk.
        sample = flat.detach()[::_SAMPLE_STRIDE]
        want = int(1.5 * n_keep / _SAMPLE_STRIDE) + 1  # ~1.5x the entries we need, in the sample
        positions = None
        if want < sample.numel():
            cut = sample.kthvalue(sample.numel() - want).values
            candidates = (flat.detach() > cut).nonzero().squeeze(1)  # (n_cand,)
            if candidates.numel() >= n_keep:
                _, j = flat[candidates].topk(n_keep, sorted=False)
                positions = candidates[j]
        if positions is None:
            _, positions = flat.detach().topk(n_keep, sorted=False)
        positions = positions.sort().values  # by sample, then by latent: embedding_bag's layout
        # (B,) the flat position where each row begins
        starts = torch.arange(pre.shape[0], device=pre.device) * pre.shape[1]
        return flat[positions], positions % pre.shape[1], torch.searchsorted(positions, starts)

    def _train_codes(self, x: Tensor) -> SparseCode:
        """ReLU'd batch-level code of ``x`` (B, d_in): values (n,), latents (n,), offsets (B,).

        With gradients on, the encoder's backward touches only the kept entries (as TopK's).
        """
        if torch.is_grad_enabled():
            inputs, bias = self._pre_act_operands(x)
            vals, cols, offsets = sparse_affine(inputs, self.W_enc, bias, self._batch_topk)
        else:
            vals, cols, offsets = self._batch_topk(self.pre_acts(x))
        # ReLU after the selection: a kept entry <= 0 (fewer than k * B positives) is an explicit zero
        return F.relu(vals), cols, offsets

    def _code_fields(self, vals: Tensor, cols: Tensor, n_samples: int) -> dict[str, Any]:
        """The bookkeeping fields of :class:`TrainForward` for a batch code (n,), (n,)."""
        active = vals > 0
        fired = torch.zeros(self.cfg.d_sae, dtype=torch.bool, device=cols.device)
        fired[cols[active]] = True
        # fp32 like the threshold (vals are bf16 under autocast): DDP ranks all-reduce it together
        min_kept = vals[active].min().detach().to(self.threshold.dtype) if bool(active.any()) else None
        stats = {} if min_kept is None else {"min_kept": min_kept}
        return {
            "sparsity": vals.new_zeros(()),
            "l0": active.sum().float() / n_samples,
            "fired": fired,
            "stats": stats,
        }

    def _train_forward(self, x: Tensor) -> TrainForward:
        vals, cols, offsets = self._train_codes(x)  # (n,), (n,), (B,); n = k * B
        x_hat = weighted_rows(self.W_dec, cols, vals, offsets) + self.b_dec  # (B, d_in)
        return TrainForward(x_hat=x_hat, **self._code_fields(vals, cols, x.shape[0]))

    @torch.no_grad()
    def update_stats(self, out: TrainForward, *, n_samples: int) -> None:
        """Dead-latent counters, plus the running mean of the smallest kept activation."""
        super().update_stats(out, n_samples=n_samples)
        inf = torch.tensor(float("inf"), device=self.threshold.device)
        value = out.stats.get("min_kept", inf).clone()  # ()
        if _distributed():
            torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MIN)
        if not torch.isfinite(value):
            return  # no latent fired anywhere: nothing to learn from this batch
        if self.threshold < 0:
            self.threshold.copy_(value)
        else:
            self.threshold.lerp_(value.to(self.threshold.dtype), self.cfg.threshold_lr)

    # ---- per-sample codes ----------------------------------------------------------------------

    def _encode(self, x: Tensor) -> Tensor:
        pre = F.relu(self.pre_acts(x))  # (B, d_sae)
        if self.training:
            vals, cols, offsets = self._batch_topk(pre)  # (n,), (n,), (B,)
            return torch.zeros_like(pre).index_put_((bag_samples(offsets, cols.numel()), cols), vals)
        # Inference: per sample, batch-independent.  Before any training the threshold is unset
        # (-1) and the SAE degenerates to a plain ReLU.
        return pre * (pre > self.threshold.clamp_min(0))
