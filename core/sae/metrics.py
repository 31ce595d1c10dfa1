"""Evaluation metrics of a trained SAE, named as the field names them (SAELens, Gao et al.)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch
from torch import Tensor

from sciscope.core.errors import SciscopeError
from sciscope.core.sae.base import SparseAutoencoder

Batches = Iterable[Tensor] | Callable[[], Iterator[Tensor]] | Tensor


class ExplainedVariance:
    """Running ``1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2`` over batches of ``(x_hat, x)``.

    float64 accumulators (sums over millions of samples lose digits in float32); the total variance
    is ``sum ||x||^2 - n ||mean||^2``, so one pass suffices.
    """

    def __init__(self, d: int, device: torch.device | str | None = None) -> None:
        self.n = 0
        self.sq_err = torch.zeros((), dtype=torch.float64, device=device)
        self.sum_x = torch.zeros(d, dtype=torch.float64, device=device)
        self.sum_sq = torch.zeros((), dtype=torch.float64, device=device)

    def add(self, x_hat: Tensor, x: Tensor) -> None:
        """Add a batch: ``x_hat`` the prediction of ``x``, both (B, d)."""
        x64 = x.double()
        self.sq_err += (x64 - x_hat.double()).pow(2).sum()
        self.sum_x += x64.sum(dim=0)
        self.sum_sq += x64.pow(2).sum()
        self.n += x.shape[0]

    def value(self) -> float:
        """The explained variance (NaN when the data has no variance or none was added)."""
        total_var = self.sum_sq - self.sum_x.pow(2).sum() / max(self.n, 1)
        return float(1.0 - self.sq_err / total_var) if self.n and float(total_var) > 0 else float("nan")


@torch.no_grad()
def predictor_explained_variance(predict: Callable[[Tensor], Tensor],
                                 pairs: Iterable[tuple[Tensor, Tensor]] | Callable[[], Iterator[tuple[Tensor, Tensor]]]
                                 ) -> float:
    """Explained variance of the targets by ``predict(inputs)`` over ``(input, target)`` batches (or a
    zero-arg callable returning an iterator of them): a dense baseline (a ridge map) scored as
    :func:`evaluate_sae` scores a transcoder."""
    acc: ExplainedVariance | None = None
    for x, y in (pairs() if callable(pairs) else pairs):
        acc = acc or ExplainedVariance(y.shape[-1], y.device)
        acc.add(predict(x), y)
    if acc is None:
        raise SciscopeError("predictor_explained_variance got no batches")
    return acc.value()


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
        iterator of them.  For a transcoder, ``(input, target)`` tuples of them (one tuple, or an
        iterable of tuples): the output is scored against the target (an MLP's output).

    Returns
    -------
    dict
        ``mse``: mean squared error over all elements; ``explained_variance``:
        ``1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2`` over the evaluated data, ``x`` the
        target when there is one (NaN when the data has no variance); ``l0``: mean number of active latents per sample;
        ``dead_fraction``: fraction of latents that never fired on the data; ``n_samples``.
    """
    from sciscope.core.sae.base import check_batch, is_pair

    if isinstance(batches, Tensor) or is_pair(batches):
        batches = [batches]
    elif callable(batches):
        batches = batches()
    d_in, d_sae = sae.cfg.d_in, sae.cfg.d_sae
    device = sae.W_enc.device
    ev = ExplainedVariance(d_in, device)
    n_active = torch.zeros((), dtype=torch.float64, device=device)
    fired = torch.zeros(d_sae, dtype=torch.bool, device=device)
    was_training = sae.training
    sae.eval()
    try:
        for i, batch in enumerate(batches):
            checked = check_batch(batch, i, d_in)
            inputs, x = checked if isinstance(checked, tuple) else (checked, checked)  # x: what x_hat should match
            inputs = inputs.to(device=device, dtype=sae.W_enc.dtype)  # (B, d_in)
            x = x.to(device=device, dtype=sae.W_enc.dtype)  # (B, d_in)
            x_hat, f = sae(inputs)  # (B, d_in), (B, d_sae)
            ev.add(x_hat, x)
            active = f != 0
            n_active += active.sum()
            fired |= active.any(dim=0)
    finally:
        sae.train(was_training)
    n = ev.n
    if n == 0:
        raise SciscopeError("evaluate_sae got no batches")
    return {
        "mse": float(ev.sq_err) / (n * d_in),
        "explained_variance": ev.value(),
        "l0": float(n_active) / n,
        "dead_fraction": float((~fired).sum()) / d_sae,
        "n_samples": n,
    }


def random_directions(n: int, d: int, seed: int) -> "np.ndarray":
    """``(n, d)`` seeded unit-norm random directions: the control basis for any maximum or count over
    ``n`` units (the best of many units is high by chance alone). One stream per seed, so the
    quality table and the unit controls read the same directions."""
    dirs = np.random.default_rng([int(seed), 0xD1]).standard_normal((int(n), int(d)))
    return dirs / np.linalg.norm(dirs, axis=1, keepdims=True)


def principal_components(rows: "np.ndarray", *, chunk: int = 65536) -> tuple["np.ndarray", "np.ndarray"]:
    """Mean ``(D,)`` and principal axes ``(D, D)`` (rows, by decreasing variance) of ``rows`` ``(N, D)``.

    From the ``(D, D)`` covariance accumulated in float64 over row chunks, so a few hundred
    thousand position rows of a wide model (a memory map) never need an ``(N, D)`` float64 copy.
    The dense baseline an SAE is read against: PCA with as many components as the SAE's L0.
    """
    n, d = rows.shape
    total, gram = np.zeros(d), np.zeros((d, d))
    for start in range(0, n, chunk):
        block = np.asarray(rows[start:start + chunk], dtype=np.float64)
        total += block.sum(0)
        gram += block.T @ block
    mean = total / max(n, 1)
    cov = gram / max(n, 1) - np.outer(mean, mean)
    values, vectors = np.linalg.eigh((cov + cov.T) / 2)
    return mean, vectors[:, np.argsort(-values, kind="stable")].T


def pca_explained_variance(train: "np.ndarray", test: "np.ndarray", k: int, *, chunk: int = 65536,
                           components: tuple["np.ndarray", "np.ndarray"] | None = None) -> float:
    """Explained variance on ``test`` of the top-``k`` principal components of ``train`` (both ``(N, D)``;
    ``components``: ``principal_components(train)`` already computed)."""
    mean, axes = components if components is not None else principal_components(train, chunk=chunk)
    basis = axes[: max(1, min(k, axes.shape[0]))]  # (k, D)
    err = tot = 0.0
    test_mean = np.zeros(test.shape[1])
    for start in range(0, len(test), chunk):
        test_mean += np.asarray(test[start:start + chunk], dtype=np.float64).sum(0)
    test_mean /= max(len(test), 1)
    for start in range(0, len(test), chunk):
        block = np.asarray(test[start:start + chunk], dtype=np.float64)
        centred = block - mean
        err += float(((centred - centred @ basis.T @ basis) ** 2).sum())
        tot += float(((block - test_mean) ** 2).sum())
    return 1.0 - err / tot if tot > 0 else float("nan")
