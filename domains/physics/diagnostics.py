"""Physical diagnostics of frames and trajectories, and a regime classifier fitted on them.

Diagnostics are computed from the fields alone (never from the model), so they can score a
model's rollouts the way they score simulations:

Gray–Scott (on the ``v`` concentration):
    ``wavelength`` (grid cells, from the power-weighted mean wavenumber), ``n_components`` (connected
    regions with ``v > 0.2`` per 1000 cells, periodic), ``compactness`` (area-weighted mean of
    ``4 pi A / P^2`` over regions: ~0.6 for round spots, low for stripes), ``v_mean``, ``v_contrast``.
Flow (on the velocity and its vorticity):
    ``energy`` ``<|u|^2>/2``, ``enstrophy`` ``<w^2>/2``, ``x_variation`` (energy fraction in modes with
    ``k_x != 0``: 0 for the laminar shear), ``high_k_fraction`` (energy fraction at ``|k| > k_f``).
Both systems:
    ``spectral_wavelength`` and ``spectral_high_k`` of the main scalar field (``v``, vorticity), which
    exist for any field and serve as shared probe targets.

A non-finite frame gives NaN diagnostics (a diverged rollout is counted, not scored).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from sciscope.core.errors import ConfigError

from .simulate import flow_wavenumbers, velocity_to_vorticity

__all__ = ["DIAGNOSTICS", "SHARED_DIAGNOSTICS", "RegimeClassifier", "diagnose", "flow_diagnostics",
           "gray_scott_diagnostics", "main_field", "radial_power", "spectral_diagnostics"]

#: Per-system diagnostic columns (the classifier's inputs).
DIAGNOSTICS: dict[str, tuple[str, ...]] = {
    "gray_scott": ("wavelength", "n_components", "compactness", "v_mean", "v_contrast"),
    "flow": ("energy", "enstrophy", "x_variation", "high_k_fraction"),
}
#: Diagnostics defined for every system (shared probe targets).
SHARED_DIAGNOSTICS = ("spectral_wavelength", "spectral_high_k")
#: Columns whose logarithm the classifier reads (heavy-tailed, positive).
_LOG_COLUMNS = {"energy", "enstrophy", "x_variation", "high_k_fraction", "n_components"}
_V_THRESHOLD = 0.2  # Gray–Scott v above this is "pattern" (v ~ 0.3-0.4 in spots and stripes, ~0 outside)


def _check_system(system: str) -> None:
    if system not in DIAGNOSTICS:
        raise ConfigError(f"physics: unknown system {system!r}; choose one of {list(DIAGNOSTICS)}")


def main_field(system: str, frames: np.ndarray) -> np.ndarray:
    """The scalar field shown in figures and used for shared diagnostics: ``v`` or vorticity.

    ``frames`` is ``(..., 2, n, n)``; returns ``(..., n, n)``.
    """
    _check_system(system)
    frames = np.asarray(frames, dtype=np.float64)
    if system == "gray_scott":
        return frames[..., 1, :, :]
    return velocity_to_vorticity(frames)


def _rfft_power(field: np.ndarray) -> np.ndarray:
    """One-sided power of real fields ``(..., n, n)`` with the ``k_x > 0`` columns counted twice."""
    n = field.shape[-1]
    p = np.abs(np.fft.rfft2(field)) ** 2
    w = np.full(n // 2 + 1, 2.0)
    w[0] = 1.0
    if n % 2 == 0:
        w[-1] = 1.0
    return p * w


def radial_power(frames: np.ndarray) -> np.ndarray:
    """Radial power spectrum of periodic fields ``(..., n, n)``: power summed over rings of integer
    ``|k|`` (``|k| > n/2`` into the last ring), ``(..., n // 2 + 1)``."""
    frames = np.asarray(frames, dtype=np.float64)
    n = frames.shape[-1]
    ky, kx = np.meshgrid(np.fft.fftfreq(n, 1 / n), np.fft.fftfreq(n, 1 / n), indexing="ij")
    kbin = np.minimum(np.sqrt(ky**2 + kx**2).round().astype(int), n // 2).ravel()
    power = (np.abs(np.fft.fft2(frames)) ** 2).reshape(-1, n * n)
    onehot = np.zeros((n * n, n // 2 + 1))
    onehot[np.arange(n * n), kbin] = 1.0
    return (power @ onehot).reshape(*frames.shape[:-2], n // 2 + 1)


def spectral_diagnostics(field: np.ndarray, k_cut: float) -> dict[str, np.ndarray]:
    """``spectral_wavelength`` (n / power-weighted mean |k|) and ``spectral_high_k`` (power fraction at |k| > k_cut).

    The mean is removed first, so a uniform field has no wavelength (NaN).
    """
    field = np.asarray(field, dtype=np.float64)
    n = field.shape[-1]
    f = field - field.mean(axis=(-1, -2), keepdims=True)
    p = _rfft_power(f)
    ky, kx = flow_wavenumbers(n)
    k = np.sqrt(ky**2 + kx**2)  # (n, n//2+1)
    total = p.sum(axis=(-1, -2))
    with np.errstate(invalid="ignore", divide="ignore"):
        kbar = (p * k).sum(axis=(-1, -2)) / total
        wl = np.where(total > 1e-12, n / kbar, np.nan)
        high = np.where(total > 1e-12, (p * (k > k_cut)).sum(axis=(-1, -2)) / total, np.nan)
    return {"spectral_wavelength": wl, "spectral_high_k": high}


def _periodic_regions(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Connected regions (4-neighbour) of a 2-D boolean mask on a torus: labels and count."""
    from scipy import ndimage

    labels, n = ndimage.label(mask)
    if n == 0:
        return labels, 0
    parent = np.arange(n + 1)

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    # regions touching across the periodic edges are one region
    for a_edge, b_edge in ((labels[0, :], labels[-1, :]), (labels[:, 0], labels[:, -1])):
        for a, b in zip(a_edge, b_edge):
            if a and b:
                ra, rb = find(int(a)), find(int(b))
                if ra != rb:
                    parent[max(ra, rb)] = min(ra, rb)
    roots = np.array([find(i) for i in range(n + 1)])
    _, merged = np.unique(roots, return_inverse=True)
    return merged[labels], int(merged.max())


def _region_shape(mask: np.ndarray) -> tuple[int, float]:
    """(number of regions, area-weighted mean compactness ``4 pi A / P^2``) of one periodic mask."""
    labels, n = _periodic_regions(mask)
    if n == 0:
        return 0, float("nan")
    area = np.bincount(labels.ravel(), minlength=n + 1)[1:].astype(np.float64)
    perim = np.zeros(n + 1)
    for axis in (0, 1):
        for shift in (1, -1):
            other = np.roll(labels, shift, axis=axis)
            edge = labels != other  # each boundary edge of a region is counted once from its side
            np.add.at(perim, labels[edge], 1.0)
    perim = perim[1:]
    ok = perim > 0  # a region with no boundary covers the whole torus: no shape to measure
    if not ok.any():
        return n, float("nan")
    compact = 4 * np.pi * area[ok] / perim[ok] ** 2
    return n, float((compact * area[ok]).sum() / area[ok].sum())


def gray_scott_diagnostics(frames: np.ndarray) -> pd.DataFrame:
    """Diagnostics of Gray–Scott frames ``(m, 2, n, n)`` (or ``(2, n, n)``): one row per frame."""
    frames = np.asarray(frames, dtype=np.float64).reshape(-1, *np.shape(frames)[-3:])
    n = frames.shape[-1]
    v = frames[:, 1]
    finite = np.isfinite(frames).reshape(len(frames), -1).all(1)
    out: dict[str, np.ndarray] = {k: np.full(len(frames), np.nan) for k in DIAGNOSTICS["gray_scott"]}
    spec = spectral_diagnostics(np.where(finite[:, None, None], v, 0.0), k_cut=n / 8)
    out["wavelength"] = spec["spectral_wavelength"]
    out["v_mean"] = v.mean(axis=(-1, -2))
    out["v_contrast"] = v.std(axis=(-1, -2))
    for i in np.flatnonzero(finite):
        count, comp = _region_shape(v[i] > _V_THRESHOLD)
        out["n_components"][i] = count * 1000.0 / (n * n)
        out["compactness"][i] = comp
    df = pd.DataFrame({**out, **spec})
    df.loc[~finite, :] = np.nan
    return df


def flow_diagnostics(frames: np.ndarray, *, k_forcing: int = 4) -> pd.DataFrame:
    """Diagnostics of flow frames ``(m, 2, n, n)`` velocity (or ``(2, n, n)``): one row per frame."""
    frames = np.asarray(frames, dtype=np.float64).reshape(-1, *np.shape(frames)[-3:])
    n = frames.shape[-1]
    finite = np.isfinite(frames).reshape(len(frames), -1).all(1)
    safe = np.where(finite[:, None, None, None], frames, 0.0)
    w = velocity_to_vorticity(safe)
    ky, kx = flow_wavenumbers(n)
    k = np.sqrt(ky**2 + kx**2)
    e_spec = _rfft_power(safe[:, 0]) + _rfft_power(safe[:, 1])  # (m, n, n//2+1)
    total = e_spec.sum(axis=(-1, -2))
    with np.errstate(invalid="ignore", divide="ignore"):
        x_var = np.where(total > 0, (e_spec * (kx > 0)).sum(axis=(-1, -2)) / total, np.nan)
        high = np.where(total > 0, (e_spec * (k > k_forcing + 0.5)).sum(axis=(-1, -2)) / total, np.nan)
    df = pd.DataFrame({
        "energy": 0.5 * (safe**2).sum(1).mean(axis=(-1, -2)),
        "enstrophy": 0.5 * (w**2).mean(axis=(-1, -2)),
        "x_variation": x_var,
        "high_k_fraction": high,
        **spectral_diagnostics(w, k_cut=k_forcing + 0.5),
    })
    df.loc[~finite, :] = np.nan
    return df


def diagnose(system: str, frames: np.ndarray, *, k_forcing: int = 4) -> pd.DataFrame:
    """The system's diagnostics (plus the shared spectral ones) of frames ``(..., 2, n, n)``, one row per frame.

    ``k_forcing`` is the flow's forcing wavenumber (ignored for Gray-Scott).
    """
    _check_system(system)
    if system == "gray_scott":
        return gray_scott_diagnostics(frames)
    return flow_diagnostics(frames, k_forcing=k_forcing)


def _features(df: pd.DataFrame, columns: Sequence[str]) -> np.ndarray:
    X = df[list(columns)].to_numpy(dtype=np.float64).copy()
    for j, c in enumerate(columns):
        if c in _LOG_COLUMNS:
            X[:, j] = np.log10(np.maximum(X[:, j], 1e-8))
    return X


@dataclass
class RegimeClassifier:
    """Logistic regression of the regime from one system's diagnostics (not from the model).

    Trained on simulated frames with their trajectory's regime; its grouped cross-validated
    accuracy and a shuffled-label control say how far to trust it as a rollout score.

    Attributes
    ----------
    system : str
        ``"gray_scott"`` or ``"flow"``.
    positive : str
        The regime whose probability :meth:`predict_proba` returns (``"stripes"``, ``"vortex"``).
    columns : tuple of str
        Diagnostic columns read.
    cv_accuracy, control_accuracy : float
        Accuracy over trajectory-grouped folds stratified by regime, and the same with regimes
        shuffled among trajectories (chance level, ~0.5), set by :meth:`fit`; NaN with fewer
        than two trajectories per regime.
    """

    system: str
    positive: str
    columns: tuple[str, ...] = ()
    cv_accuracy: float = float("nan")
    control_accuracy: float = float("nan")
    pipeline: Any = field(default=None, repr=False)

    def fit(self, diagnostics: pd.DataFrame, regime: Sequence[str], groups: Sequence[Any], *, seed: int = 0) -> "RegimeClassifier":
        """Fit on per-frame diagnostics with each frame's trajectory regime; ``groups`` are trajectory ids."""
        from sklearn.linear_model import LogisticRegression
        from sklearn.model_selection import StratifiedGroupKFold, cross_val_score
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        self.columns = self.columns or DIAGNOSTICS[self.system]
        X = _features(diagnostics, self.columns)
        y = (np.asarray(regime) == self.positive).astype(int)
        groups = np.asarray(groups)
        ok = np.isfinite(X).all(1)
        X, y, groups = X[ok], y[ok], groups[ok]
        if len(np.unique(y)) < 2:
            raise ConfigError(f"physics: the {self.system} regime classifier needs frames of both regimes")
        make = lambda: make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000))  # noqa: E731
        # folds stratified by regime: with unbalanced folds a shuffled control scores below chance
        per_class = min(len(np.unique(groups[y == k])) for k in (0, 1))
        folds = min(5, per_class)
        if folds >= 2:
            cv = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
            self.cv_accuracy = float(cross_val_score(make(), X, y, groups=groups, cv=cv).mean())
            # control: regimes shuffled among trajectories (keeps each trajectory's frames together)
            ug, first = np.unique(groups, return_index=True)
            y_sh = np.random.default_rng(seed).permutation(y[first])[np.searchsorted(ug, groups)]
            if len(np.unique(y_sh)) == 2:
                self.control_accuracy = float(cross_val_score(make(), X, y_sh, groups=groups, cv=cv).mean())
        self.pipeline = make().fit(X, y)
        return self

    def predict_proba(self, diagnostics: pd.DataFrame) -> np.ndarray:
        """P(positive regime) per row; NaN where a diagnostic is NaN (diverged frames)."""
        if self.pipeline is None:
            raise ConfigError("physics: RegimeClassifier.fit() must run before predict_proba()")
        X = _features(diagnostics, self.columns)
        ok = np.isfinite(X).all(1)
        p = np.full(len(X), np.nan)
        if ok.any():
            p[ok] = self.pipeline.predict_proba(X[ok])[:, 1]
        return p
