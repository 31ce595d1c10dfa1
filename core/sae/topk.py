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

Under autocast the step takes two further shortcuts that apply to low-precision codes only, so
an fp32 step stays bit-identical to what it was: the per-sample top k is searched among the k
strided groups with the largest maxima (:func:`topk_pruned`, exact in its values), and the
encoder's weight gradient is one MKL sparse-dense product (:func:`_latent_major_grad`) instead of
embedding_bag's backward.  benchmarks/bench_sae_bf16.py measures the bf16-mixed step against fp32.
"""

from __future__ import annotations

import warnings
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


def bag_samples(offsets: Tensor, n: int) -> Tensor:
    """Sample index of every entry of a flat code of ``n`` entries with bag ``offsets`` (B,): (n,)."""
    counts = torch.diff(offsets, append=offsets.new_tensor([n]))  # (B,) entries per sample
    return torch.repeat_interleave(torch.arange(offsets.numel(), device=offsets.device), counts)


# Strided groups per candidate in :func:`topk_pruned`: 8 leaves k * 8 candidates (256 of 4096 at
# k 32) behind a max over 8 rows of d_sae / 8, the fastest of 4, 8, 16, 32 on bf16 codes
# (2048 x 4096, one thread).
_TOPK_GROUP = 8


def topk_pruned(pre: Tensor, k: int, group: int = _TOPK_GROUP) -> tuple[Tensor, Tensor]:
    """The k largest entries of each row of ``pre`` (B, n), searched among few candidates.

    Column j belongs to the strided group ``{j, j + m, j + 2m, ...}`` with ``m = n // group``.
    Every entry of the top k lies in one of the k groups with the largest maxima (a group outside
    them has k groups above it, each holding an entry at least as large), so the top k of those
    groups' ``k * group`` entries has exactly the values of ``pre.topk(k)``; among tied values the
    chosen columns may differ.  ``torch.topk`` on CPU costs about as much per entry as the bf16
    encoder matmul costs per row; here it reads n entries once (a max over ``group`` contiguous
    (B, m) slices) and sorts ``m + k * group`` per row.

    Parameters
    ----------
    pre
        (B, n) scores, n divisible by ``group`` and ``n // group >= k``.
    k
        Entries kept per row.
    group
        Entries per strided group.

    Returns
    -------
    (Tensor, Tensor)
        Values and column indices, both (B, k), in no particular order.
    """
    rows, n = pre.shape
    m = n // group
    maxima = pre.view(rows, group, m).amax(dim=1)  # (B, m): max of each strided group
    _, best = maxima.topk(k, dim=-1, sorted=False)  # (B, k) groups
    cols = (best.unsqueeze(-1) + m * torch.arange(group, device=pre.device)).view(rows, k * group)  # (B, k*group)
    vals, j = pre.gather(1, cols).topk(k, dim=-1, sorted=False)  # (B, k)
    return vals, cols.gather(1, j)


def _pruned_topk_applies(pre: Tensor, k: int, group: int = _TOPK_GROUP) -> bool:
    """:func:`topk_pruned` is taken for low-precision codes where it prunes at least half a row."""
    n = pre.shape[-1]
    return pre.dtype in (torch.bfloat16, torch.float16) and pre.ndim == 2 and n % group == 0 and n // group >= 2 * k


def _latent_major_grad(g: Tensor, idx: Tensor, samples: Tensor, inputs: Tensor, n_latents: int) -> Tensor:
    """``grad[l] = sum over entries e with idx[e] == l of g[e] * inputs[samples[e]]``: (n_latents, d).

    The weight gradient of a sparse code, as a (n_latents, B) CSR matrix (one row per latent, the
    entries sorted by latent) times the dense (B, d) inputs: one MKL sparse-dense product.

    Parameters
    ----------
    g, idx, samples
        (n,) values, latent and sample of each entry of the code.
    inputs
        (B, d) fp32 rows.
    n_latents
        Rows of the result (d_sae).
    """
    order = idx.argsort()  # (n,) entries grouped by latent
    crow = idx.new_zeros(n_latents + 1)
    torch.cumsum(torch.bincount(idx, minlength=n_latents), 0, out=crow[1:])  # (n_latents + 1,)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ss]parse.*")  # beta-state and invariant-check notices
        G = torch.sparse_csr_tensor(crow, samples[order], g[order], size=(n_latents, inputs.shape[0]))
        return G @ inputs  # (n_latents, d)


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
    backward runs in the weights' dtype from the saved full-precision inputs and weights.  With
    low-precision codes (autocast) the weight gradient is :func:`_latent_major_grad` (MKL's CSR
    product, ~2.5x faster than embedding_bag's backward on one CPU thread); fp32 codes keep the
    embedding_bag backward, so an fp32 step is unchanged to the bit.
    """

    @staticmethod
    def forward(  # noqa: ANN001
        ctx, inputs: Tensor, W: Tensor, bias: Tensor, select: Callable[[Tensor], SparseCode]
    ) -> SparseCode:
        pre = torch.addmm(bias, inputs, W)  # (B, d_sae)
        vals, idx, offsets = select(pre)
        ctx.save_for_backward(inputs, W, idx, offsets)
        ctx.bias_dtype = bias.dtype
        ctx.low_precision = vals.dtype != W.dtype  # bf16 codes from an autocast matmul
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
        if ctx.needs_input_grad[1] and ctx.low_precision:
            flat = idx.reshape(-1)  # (n,)
            if offsets is None:  # (B, k) code: entry n belongs to sample n // k
                samples = torch.arange(idx.shape[0], device=idx.device).repeat_interleave(idx.shape[1])
            else:
                samples = bag_samples(offsets, flat.numel())
            with torch.autocast(inputs.device.type, enabled=False):  # the CSR product has no bf16 kernel
                grad_table = _latent_major_grad(g.reshape(-1), flat, samples, inputs.to(W.dtype), W.shape[1])
            grad_W = grad_table.t()  # (d_in, d_sae)
        elif ctx.needs_input_grad[1]:
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
        if _pruned_topk_applies(pre, self.cfg.k):  # bf16 codes (autocast); fp32 keeps torch.topk
            vals, idx = topk_pruned(pre, self.cfg.k)
        else:
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
