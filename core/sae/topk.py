"""TopK SAE (Gao et al. 2024, "Scaling and evaluating sparse autoencoders").

    pre   = (x - b_dec) @ W_enc + b_enc            # (B, d_sae)
    f     = ReLU(TopK_k(pre))                      # (B, d_sae), at most k non-zeros per row
    x_hat = f @ W_dec + b_dec                      # (B, d_in)
    loss  = ||x - x_hat||^2 + aux_coeff * AuxK     # no sparsity penalty: k fixes L0

Decoder rows are kept at unit norm.  With k << d_sae the decode reads only k rows per sample:
``embedding_bag`` sums them weighted by the kept values, instead of a dense (B, d_sae) @
(d_sae, d_in) matmul whose inputs are almost all zeros.  Forward and backward of that path cost
O(B k d_in) instead of O(B d_sae d_in).  At the benchmark's default sizes (d_in 384, d_sae 4096,
k 32, batch 4096) it about halves a CPU training step (see benchmarks/bench_sae_throughput.py).
The encoder's backward is sparse in the same way (``_TopKOfAffine``): only the k kept
pre-activations of a sample have a gradient, so the weight gradient is a scatter-add of k input
rows instead of a second dense matmul (benchmarks/bench_sae_vs_saelens.py: 211 -> 128 ms per
step at d_in 384, d_sae 4096, batch 2048 on one CPU thread).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from sciscope.core.sae.base import (
    SAEConfig,
    SparseAutoencoder,
    TrainForward,
    _check_bool,
    _check_int,
    register_sae,
)


@dataclass(kw_only=True)
class TopKConfig(SAEConfig):
    """Config of :class:`TopKSAE`.

    Parameters
    ----------
    k
        Number of latents kept per sample.
    sparse_decode
        Decode from the (values, indices) of the top k with ``embedding_bag`` instead of a dense
        matmul.  Same numbers up to float summation order.
    """

    k: int = 32
    aux_coeff: float = 1 / 32
    sparse_decode: bool = True

    def validate(self) -> None:
        super().validate()
        _check_int(self, "k", minimum=1, maximum=self.d_sae)
        _check_bool(self, "sparse_decode")


class _TopKOfAffine(torch.autograd.Function):
    """``topk(inputs @ W + bias, k)`` whose backward touches only the kept entries.

    Autograd's own backward of the encoder matmul builds the dense (B, d_sae) gradient, zero
    except k entries per row, and multiplies it by the inputs: a (d_in, B) @ (B, d_sae) matmul as
    large as the forward (about a third of a CPU training step). The weight gradient is really a
    scatter-add of k input rows per sample, ``grad_W[:, idx[b, j]] += g[b, j] * inputs[b]``: the
    weight gradient of an ``embedding_bag`` over the kept indices, B k d_in multiply-adds instead
    of B d_sae d_in. Same numbers up to float summation order; not twice differentiable.
    """

    @staticmethod
    def forward(ctx, inputs: Tensor, W: Tensor, bias: Tensor, k: int) -> tuple[Tensor, Tensor]:  # noqa: ANN001
        pre = torch.addmm(bias, inputs, W)  # (B, d_sae)
        vals, idx = pre.topk(k, dim=-1, sorted=False)  # (B, k), (B, k)
        ctx.save_for_backward(inputs, W, idx)
        ctx.mark_non_differentiable(idx)
        return vals, idx

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_vals: Tensor, _grad_idx: Tensor | None) -> tuple[Tensor | None, ...]:  # noqa: ANN001
        inputs, W, idx = ctx.saved_tensors
        g = grad_vals.contiguous()  # (B, k)
        grad_inputs = grad_W = grad_bias = None
        if ctx.needs_input_grad[0]:  # sum_j g[b, j] * W[:, idx[b, j]]
            grad_inputs = F.embedding_bag(idx, W.t().contiguous(), per_sample_weights=g, mode="sum")  # (B, d_in)
        if ctx.needs_input_grad[1]:
            with torch.enable_grad():
                # the table's values do not matter: its gradient is linear in grad_outputs
                table = inputs.new_zeros(W.shape[1], W.shape[0], requires_grad=True)  # (d_sae, d_in)
                rows = F.embedding_bag(idx, table, per_sample_weights=g, mode="sum")  # (B, d_in)
                (grad_table,) = torch.autograd.grad(rows, table, grad_outputs=inputs)
            grad_W = grad_table.t()  # (d_in, d_sae)
        if ctx.needs_input_grad[2]:
            grad_bias = g.new_zeros(W.shape[1]).index_add_(0, idx.reshape(-1), g.reshape(-1))  # (d_sae,)
        return grad_inputs, grad_W, grad_bias, None


@register_sae("topk")
class TopKSAE(SparseAutoencoder):
    """Sparse autoencoder that keeps the k largest pre-activations of each sample."""

    config_class = TopKConfig
    cfg: TopKConfig

    def encode_sparse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Values and latent indices of the top k: (B, d_in) -> (B, k), (B, k).

        Values are ReLU'd after the selection, so a kept but negative latent is an explicit zero.
        """
        if torch.is_grad_enabled() and not torch.is_autocast_enabled(x.device.type):
            x2 = self._check_input(x).reshape(-1, self.cfg.d_in)
            inputs, bias = self._pre_act_operands(x2)
            vals, idx = _TopKOfAffine.apply(inputs, self.W_enc, bias, self.cfg.k)  # (B, k), (B, k)
            return F.relu(vals).reshape(*x.shape[:-1], -1), idx.reshape(*x.shape[:-1], -1)
        pre = self.pre_acts(x)  # (B, d_sae)
        vals, idx = pre.topk(self.cfg.k, dim=-1, sorted=False)  # (B, k), (B, k)
        return F.relu(vals), idx

    def decode_sparse(self, vals: Tensor, idx: Tensor) -> Tensor:
        """``sum_j vals[:, j] * W_dec[idx[:, j]] + b_dec``: (B, k), (B, k) -> (B, d_in)."""
        return F.embedding_bag(idx, self.W_dec, per_sample_weights=vals, mode="sum") + self.b_dec

    def _encode(self, x: Tensor) -> Tensor:
        vals, idx = self.encode_sparse(x)
        f = torch.zeros(x.shape[0], self.cfg.d_sae, dtype=vals.dtype, device=vals.device)
        return f.scatter(1, idx, vals)  # (B, d_sae)

    def _decode_codes(self, vals: Tensor, idx: Tensor) -> Tensor:
        if self.cfg.sparse_decode:
            return self.decode_sparse(vals, idx)
        f = torch.zeros(vals.shape[0], self.cfg.d_sae, dtype=vals.dtype, device=vals.device)
        return self.decode(f.scatter(1, idx, vals))

    def _forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        vals, idx = self.encode_sparse(x)
        f = torch.zeros(x.shape[0], self.cfg.d_sae, dtype=vals.dtype, device=vals.device)
        return self._decode_codes(vals, idx), f.scatter(1, idx, vals)  # (B, d_in), (B, d_sae)

    def _train_forward(self, x: Tensor) -> TrainForward:
        # Never materialise the dense (B, d_sae) codes: they are only needed for bookkeeping.
        vals, idx = self.encode_sparse(x)  # (B, k), (B, k)
        active = vals > 0  # (B, k)
        fired = torch.zeros(self.cfg.d_sae, dtype=torch.bool, device=x.device)
        fired[idx[active]] = True
        return TrainForward(
            x_hat=self._decode_codes(vals, idx),
            sparsity=vals.new_zeros(()),
            l0=active.sum(dim=-1).float().mean(),
            fired=fired,
        )
