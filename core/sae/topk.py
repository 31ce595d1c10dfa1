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
The encoder's backward is sparse in the same way (:func:`sparse_affine`, shared with BatchTopK):
only the k kept pre-activations of a sample have a gradient, so the weight gradient is a
scatter-add of k input rows instead of a second dense matmul (benchmarks/bench_sae_vs_saelens.py:
211 -> 128 ms per step at d_in 384, d_sae 4096, batch 2048 on one CPU thread).  Both sparse
paths also run under autocast (``precision="bf16-mixed"``): the codes are bf16, the weights fp32.
"""

from __future__ import annotations

from collections.abc import Callable
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


# A sparse code as embedding_bag reads it: ``(values, latent indices, offsets)``.  Either values
# and indices are (B, k) and offsets is None (TopK), or values and indices are flat (n,), grouped
# by sample, and offsets (B,) says where each sample's entries begin (BatchTopK).
SparseCode = tuple[Tensor, Tensor, Tensor | None]


def weighted_rows(table: Tensor, idx: Tensor, weights: Tensor, offsets: Tensor | None = None) -> Tensor:
    """Per sample, the sum of the ``table`` rows ``idx`` weighted by ``weights``: -> (B, d).

    ``embedding_bag`` insists that weights and table share a dtype.  Under autocast the codes come
    out of a bf16 matmul while the table (the decoder, or the transposed encoder) stays fp32, so
    the weights are cast to the table's dtype: the master weights and the sum keep full precision.

    Parameters
    ----------
    table
        (n_rows, d) matrix whose rows are summed.
    idx, weights, offsets
        A sparse code (see ``SparseCode``): (B, k), (B, k), None; or (n,), (n,), (B,).
    """
    return F.embedding_bag(idx, table, offsets, per_sample_weights=weights.to(table.dtype), mode="sum")


class _SparseAffine(torch.autograd.Function):
    """Selected entries of ``inputs @ W + bias`` whose backward touches only those entries.

    ``select`` maps the dense pre-activations (B, d_sae) to a ``SparseCode`` (TopK: the k largest
    of each row; BatchTopK: the k * B largest of the batch).  Autograd's own backward of the
    encoder matmul builds the dense (B, d_sae) gradient, zero except at the kept entries, and
    multiplies it by the inputs: a (d_in, B) @ (B, d_sae) matmul as large as the forward (about a
    third of a CPU training step).  The weight gradient is really a scatter-add of one input row
    per kept entry, ``grad_W[:, idx[n]] += g[n] * inputs[sample(n)]``: the weight gradient of an
    ``embedding_bag`` over the kept indices, n d_in multiply-adds instead of B d_sae d_in.  Same
    numbers up to float summation order; not twice differentiable.

    Under autocast the forward matmul runs in the autocast dtype (as a plain ``addmm`` would); the
    backward runs in the weights' dtype from the saved full-precision inputs and weights.
    """

    @staticmethod
    def forward(  # noqa: ANN001
        ctx, inputs: Tensor, W: Tensor, bias: Tensor, select: Callable[[Tensor], SparseCode]
    ) -> SparseCode:
        pre = torch.addmm(bias, inputs, W)  # (B, d_sae)
        vals, idx, offsets = select(pre)
        ctx.save_for_backward(inputs, W, idx, offsets)
        ctx.bias_dtype = bias.dtype
        ctx.mark_non_differentiable(*(t for t in (idx, offsets) if t is not None))
        return vals, idx, offsets

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_vals: Tensor, *_grad_idx: Tensor | None) -> tuple[Tensor | None, ...]:  # noqa: ANN001
        inputs, W, idx, offsets = ctx.saved_tensors
        g = grad_vals.to(W.dtype).contiguous()  # shaped like vals; bf16 under autocast
        grad_inputs = grad_W = grad_bias = None
        if ctx.needs_input_grad[0]:  # sum_j g[b, j] * W[:, idx[b, j]]
            grad_inputs = weighted_rows(W.t().contiguous(), idx, g, offsets).to(inputs.dtype)  # (B, d_in)
        if ctx.needs_input_grad[1]:
            with torch.enable_grad():
                # the table's values do not matter: its gradient is linear in grad_outputs
                table = W.new_zeros(W.shape[1], W.shape[0], requires_grad=True)  # (d_sae, d_in)
                rows = weighted_rows(table, idx, g, offsets)  # (B, d_in)
                (grad_table,) = torch.autograd.grad(rows, table, grad_outputs=inputs.to(W.dtype))
            grad_W = grad_table.t()  # (d_in, d_sae)
        if ctx.needs_input_grad[2]:
            grad_bias = g.new_zeros(W.shape[1]).index_add_(0, idx.reshape(-1), g.reshape(-1))  # (d_sae,)
            grad_bias = grad_bias.to(ctx.bias_dtype)
        return grad_inputs, grad_W, grad_bias, None


def sparse_affine(
    inputs: Tensor, W: Tensor, bias: Tensor, select: Callable[[Tensor], SparseCode]
) -> SparseCode:
    """``select(inputs @ W + bias)`` with a backward that touches only the selected entries.

    Parameters
    ----------
    inputs
        (B, d_in) encoder inputs.
    W, bias
        (d_in, d_sae) encoder weights and (d_sae,) bias.
    select
        Picks the kept entries of the dense pre-activations (B, d_sae); runs without gradient.

    Returns
    -------
    SparseCode
        The kept pre-activations (differentiable), their latent indices and the bag offsets.
    """
    return _SparseAffine.apply(inputs, W, bias, select)


@register_sae("topk")
class TopKSAE(SparseAutoencoder):
    """Sparse autoencoder that keeps the k largest pre-activations of each sample."""

    config_class = TopKConfig
    cfg: TopKConfig

    def encode_sparse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Values and latent indices of the top k: (B, d_in) -> (B, k), (B, k).

        Values are ReLU'd after the selection, so a kept but negative latent is an explicit zero.
        """
        if torch.is_grad_enabled():
            x2 = self._check_input(x).reshape(-1, self.cfg.d_in)
            inputs, bias = self._pre_act_operands(x2)
            vals, idx, _ = sparse_affine(inputs, self.W_enc, bias, self._select)  # (B, k), (B, k)
            return F.relu(vals).reshape(*x.shape[:-1], -1), idx.reshape(*x.shape[:-1], -1)
        vals, idx, _ = self._select(self.pre_acts(x))  # (B, k), (B, k)
        return F.relu(vals), idx

    def _select(self, pre: Tensor) -> SparseCode:
        """The k largest entries of each row of ``pre`` (B, d_sae): (B, k), (B, k), None."""
        vals, idx = pre.topk(self.cfg.k, dim=-1, sorted=False)
        return vals, idx, None

    def decode_sparse(self, vals: Tensor, idx: Tensor) -> Tensor:
        """``sum_j vals[:, j] * W_dec[idx[:, j]] + b_dec``: (B, k), (B, k) -> (B, d_in)."""
        return weighted_rows(self.W_dec, idx, vals) + self.b_dec

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
