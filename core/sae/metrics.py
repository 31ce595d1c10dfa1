"""Evaluation metrics of a trained SAE, named as the field names them (SAELens, Gao et al.)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch
from torch import Tensor

from sciscope.core.errors import SciscopeError
from sciscope.core.sae.base import SparseAutoencoder, as_batch

Batches = Iterable[Tensor] | Callable[[], Iterator[Tensor]] | Tensor


@torch.no_grad()
def evaluate_sae(sae: SparseAutoencoder, batches: Batches) -> dict[str, float]:
    """Reconstruction and sparsity metrics of ``sae`` over ``batches`` of raw activations.

    The SAE runs in eval mode (BatchTopK uses its inference threshold); its mode is restored.

    Parameters
    ----------
    sae
        A trained SAE (its weights take raw activations: normalisation is folded in).
    batches
        Tensors of shape (batch, d_in), an iterable of them, or a zero-arg callable returning an
        iterator of them.

    Returns
    -------
    dict
        ``mse``: mean squared error over all elements; ``explained_variance``:
        ``1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2`` over the evaluated data (NaN when the
        data has no variance); ``l0``: mean number of active latents per sample;
        ``dead_fraction``: fraction of latents that never fired on the data; ``n_samples``.
    """
    if isinstance(batches, Tensor):
        batches = [batches]
    elif callable(batches):
        batches = batches()
    d_in, d_sae = sae.cfg.d_in, sae.cfg.d_sae
    device = sae.W_enc.device
    # float64 accumulators: sums over millions of samples lose digits in float32.
    n = 0
    sq_err = torch.zeros((), dtype=torch.float64, device=device)
    sum_x = torch.zeros(d_in, dtype=torch.float64, device=device)
    sum_sq = torch.zeros((), dtype=torch.float64, device=device)
    n_active = torch.zeros((), dtype=torch.float64, device=device)
    fired = torch.zeros(d_sae, dtype=torch.bool, device=device)
    was_training = sae.training
    sae.eval()
    try:
        for i, batch in enumerate(batches):
            x = as_batch(batch, i, d_in).to(device=device, dtype=sae.W_enc.dtype)  # (B, d_in)
            x_hat, f = sae(x)  # (B, d_in), (B, d_sae)
            x64 = x.double()
            sq_err += (x64 - x_hat.double()).pow(2).sum()
            sum_x += x64.sum(dim=0)
            sum_sq += x64.pow(2).sum()
            active = f != 0
            n_active += active.sum()
            fired |= active.any(dim=0)
            n += x.shape[0]
    finally:
        sae.train(was_training)
    if n == 0:
        raise SciscopeError("evaluate_sae got no batches")
    # sum ||x - mean||^2 = sum ||x||^2 - n ||mean||^2
    total_var = sum_sq - sum_x.pow(2).sum() / n
    explained = 1.0 - sq_err / total_var if float(total_var) > 0 else torch.tensor(float("nan"))
    return {
        "mse": float(sq_err) / (n * d_in),
        "explained_variance": float(explained),
        "l0": float(n_active) / n,
        "dead_fraction": float((~fired).sum()) / d_sae,
        "n_samples": n,
    }


