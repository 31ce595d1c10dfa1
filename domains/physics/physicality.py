"""Is a rollout still physical? Diagnostics the regime classifier never reads, and their bands.

A steered rollout that the regime classifier calls "stripes" may be a broken field that happens to
have stripe-like statistics: blobs merged across the model's 4x4 patches, concentrations outside
``[0, 1]``, a velocity field that is no longer divergence-free. These diagnostics read exactly
that, from the fields alone, and none of them is an input of :class:`~.diagnostics.RegimeClassifier`:

Both systems
    ``subpatch_power``: share of the (mean-removed) fields' power at wavelengths of one patch or
    less (``max(|k_x|, |k_y|) >= n / patch_size``), where a patch decoder's seams and checkerboards
    live: below 1% for the smooth simulations, ~2% for the unsteered model, 15-50% for rollouts
    broken into 4x4 blocks. ``patch_boundary_ratio``: mean squared difference between neighbouring
    cells that straddle a patch boundary over the same inside patches (~1 for a smooth field; a
    single frame's ratio is noisy, so it serves as a second, coarse reading).
Gray-Scott
    ``u_mean`` (the substrate's mass; the classifier reads ``v``'s) and ``bound_excess``: how far
    either concentration leaves ``[0, 1]`` (0 inside).
Flow
    ``divergence_fraction``: share of the velocity's energy in its divergent part (0 for an
    incompressible field) and ``max_speed`` (the classifier reads the mean energy, not its peak).

:func:`physical_bands` turns reference frames (simulations, and the unsteered model's own
rollouts) into a band per diagnostic; :func:`within_bands` tests frames against it.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from sciscope.core.errors import ConfigError

from .simulate import flow_wavenumbers

__all__ = ["PHYSICALITY", "patch_boundary_ratio", "subpatch_power", "physical_bands", "physicality", "within_bands"]

#: Per system: the physicality diagnostics (none of them a regime-classifier input).
PHYSICALITY: dict[str, tuple[str, ...]] = {
    "gray_scott": ("subpatch_power", "patch_boundary_ratio", "u_mean", "bound_excess"),
    "flow": ("subpatch_power", "patch_boundary_ratio", "divergence_fraction", "max_speed"),
}


def patch_boundary_ratio(frames: np.ndarray, patch_size: int) -> np.ndarray:
    """Squared neighbour differences across patch boundaries over those inside patches, per frame.

    Parameters
    ----------
    frames
        ``(m, C, n, n)`` fields on a periodic grid; ``patch_size`` must divide ``n``.
    patch_size
        Side of the model's square patches.

    Returns
    -------
    ndarray
        ``(m,)``; 1 where the field is uniform (no differences anywhere) and for ``patch_size`` 1
        (every neighbour pair straddles a boundary: nothing to compare), NaN for non-finite frames.
    """
    frames = np.asarray(frames, dtype=np.float64)
    n = frames.shape[-1]
    if patch_size < 1 or n % patch_size:
        raise ConfigError(f"physics: 'patch_size' ({patch_size}) must divide the grid ({n}) to read patch artefacts")
    if patch_size == 1:
        return np.where(np.isfinite(frames).reshape(len(frames), -1).all(1), 1.0, np.nan)
    boundary = (np.arange(n) + 1) % patch_size == 0  # difference between cell j and j + 1 (periodic)
    across = inside = 0.0
    for axis in (-1, -2):
        d2 = (np.roll(frames, -1, axis=axis) - frames) ** 2  # (m, C, n, n)
        d2 = np.moveaxis(d2, axis, -1).reshape(len(frames), -1, n)
        across = across + d2[..., boundary].mean(axis=(1, 2))
        inside = inside + d2[..., ~boundary].mean(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.where(inside > 1e-12, across / np.maximum(inside, 1e-300), np.where(across > 1e-12, np.inf, 1.0))
    ratio[~np.isfinite(frames).reshape(len(frames), -1).all(1)] = np.nan
    return ratio


def subpatch_power(frames: np.ndarray, patch_size: int) -> np.ndarray:
    """Share of the power of fields ``(m, C, n, n)`` (mean removed per channel) at ``max(|k_x|, |k_y|) >= n / patch_size``.

    0 for a uniform field and for ``patch_size`` 1 (no scale below a patch), NaN for non-finite frames.
    """
    frames = np.asarray(frames, dtype=np.float64)
    n = frames.shape[-1]
    if patch_size < 1 or n % patch_size:
        raise ConfigError(f"physics: 'patch_size' ({patch_size}) must divide the grid ({n}) to read patch artefacts")
    f = frames - frames.mean(axis=(-1, -2), keepdims=True)
    power = np.abs(np.fft.fft2(f)) ** 2
    k = np.abs(np.fft.fftfreq(n, 1.0 / n))
    fine = (np.maximum(k[:, None], k[None, :]) >= n / patch_size) if patch_size > 1 else np.zeros((n, n), dtype=bool)
    total = power.sum(axis=(-1, -2, -3))
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(total > 1e-12, (power * fine).sum(axis=(-1, -2, -3)) / np.maximum(total, 1e-300), 0.0)
    share[~np.isfinite(frames).reshape(len(frames), -1).all(1)] = np.nan
    return share


def _divergence_fraction(vel: np.ndarray) -> np.ndarray:
    """Energy share of the divergent (curl-free) part of periodic velocity fields ``(m, 2, n, n)``."""
    n = vel.shape[-1]
    ky, kx = flow_wavenumbers(n)
    ux, uy = np.fft.rfft2(vel[:, 0]), np.fft.rfft2(vel[:, 1])
    k2 = kx**2 + ky**2
    w = np.full(n // 2 + 1, 2.0)  # one-sided spectrum: k_x > 0 columns count twice
    w[0] = 1.0
    if n % 2 == 0:
        w[-1] = 1.0
    total = ((np.abs(ux) ** 2 + np.abs(uy) ** 2) * w).sum(axis=(-1, -2))
    with np.errstate(invalid="ignore", divide="ignore"):
        div = (np.abs(kx * ux + ky * uy) ** 2 / np.where(k2 > 0, k2, 1.0) * (k2 > 0) * w).sum(axis=(-1, -2))
        return np.where(total > 1e-12, div / total, 0.0)


def physicality(system: str, frames: np.ndarray, *, patch_size: int) -> pd.DataFrame:
    """The physicality diagnostics of raw-unit frames ``(..., 2, n, n)``, one row per frame (NaN if not finite)."""
    if system not in PHYSICALITY:
        raise ConfigError(f"physics: unknown system {system!r}; choose one of {list(PHYSICALITY)}")
    frames = np.asarray(frames, dtype=np.float64).reshape(-1, *np.shape(frames)[-3:])
    finite = np.isfinite(frames).reshape(len(frames), -1).all(1)
    safe = np.where(finite[:, None, None, None], frames, 0.0)
    out = {"subpatch_power": subpatch_power(safe, patch_size), "patch_boundary_ratio": patch_boundary_ratio(safe, patch_size)}
    if system == "gray_scott":
        out["u_mean"] = safe[:, 0].mean(axis=(-1, -2))
        out["bound_excess"] = np.maximum(0.0, np.maximum(-safe.min(axis=(1, 2, 3)), safe.max(axis=(1, 2, 3)) - 1.0))
    else:
        out["divergence_fraction"] = _divergence_fraction(safe)
        out["max_speed"] = np.sqrt((safe**2).sum(1)).max(axis=(-1, -2))
    df = pd.DataFrame(out)
    df.loc[~finite, :] = np.nan
    return df


def physical_bands(references: Mapping[str, pd.DataFrame], *, margin: float) -> pd.DataFrame:
    """The band of each physicality diagnostic that reference frames span, widened by ``margin`` x its width.

    Parameters
    ----------
    references
        ``{source: physicality table}`` (e.g. ``"simulation"``, ``"unsteered model"``); the band
        is the union of their ranges.
    margin
        Fraction of the band's width added on each side (at least 1e-6 in absolute terms, so a
        diagnostic that is constant in the references, such as ``bound_excess`` = 0, still admits
        rounding).

    Returns
    -------
    DataFrame
        One row per diagnostic: ``diagnostic``, ``low``, ``high`` and each source's
        ``<source>_min`` / ``<source>_max``.
    """
    if not (np.isfinite(margin) and margin >= 0):
        raise ConfigError(f"physics: config 'physical_margin' must be a finite number >= 0, got {margin!r}")
    columns = list(dict.fromkeys(c for t in references.values() for c in t.columns))
    rows = []
    for col in columns:
        row: dict[str, object] = {"diagnostic": col}
        los, his = [], []
        for source, table in references.items():
            v = table[col].to_numpy(dtype=np.float64) if col in table else np.array([])
            v = v[np.isfinite(v)]
            row[f"{source}_min"], row[f"{source}_max"] = (float(v.min()), float(v.max())) if v.size else (np.nan, np.nan)
            if v.size:
                los.append(v.min()), his.append(v.max())
        if not los:
            raise ConfigError(f"physics: no finite reference frames to bound {col!r}")
        lo, hi = float(min(los)), float(max(his))
        pad = max(margin * (hi - lo), 1e-6)
        row["low"], row["high"] = lo - pad, hi + pad
        rows.append(row)
    return pd.DataFrame(rows)


def within_bands(diagnostics: pd.DataFrame, bands: pd.DataFrame) -> np.ndarray:
    """Per row of ``diagnostics``: True where every banded diagnostic is finite and inside its band."""
    ok = np.ones(len(diagnostics), dtype=bool)
    for b in bands.itertuples():
        v = diagnostics[b.diagnostic].to_numpy(dtype=np.float64)
        ok &= np.isfinite(v) & (v >= b.low) & (v <= b.high)
    return ok
