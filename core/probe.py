"""Linear probes with honest controls: ridge and logistic, per site, with shuffled-label controls.

A probe asks "is concept ``y`` linearly decodable from the activations at this site?". The answer
is only worth something beside two numbers that this module always computes through the *same*
cross-validation folds:

- a **control**: the same probe trained on shuffled labels (should score ~0 R^2 / chance), and
- an optional **baseline**: the same probe on simple non-model features (fingerprints, bag of
  tokens, PCA of the input), which the model's activations have to beat.

Ridge probes are solved in closed form. Per outer training fold we take one decomposition of the
standardised, centred activations (the SVD's ``V``, ``S`` and ``US``, via an eigendecomposition of
``X^T X`` when rows outnumber features; every fold's ``X^T X`` is downdated from one Gram matrix of
the whole site, so a fold pays only for its test rows) and read off, for every alpha of the grid and every target
at once, the efficient leave-one-out (GCV) error from the hat-matrix diagonal -- the same
computation as scikit-learn's ``RidgeCV(gcv_mode="svd")``, to ~1e-9. Shuffled-label controls reuse that SVD (the rows of
``X`` do not change), so a control costs almost nothing.

Logistic probes minimise the same objective as scikit-learn's ``LogisticRegression(C=C)`` (L2,
unpenalised intercept, sigmoid for two classes, multinomial softmax otherwise) on standardised
features, with full-batch L-BFGS in torch, run in whitened coordinates (same minimiser, about a
third of the iterations). All folds and the control are packed into one batched
problem (their parameters are independent, so minimising the sum minimises each), which turns
10 small fits into one.

Examples
--------
>>> res = fit_probe(X, y)                                   # doctest: +SKIP
>>> sweep = probe_sweep(store, ["logP", "ring_count"])      # doctest: +SKIP
>>> sweep.summary(); sweep.plot("logP"); sweep.save("runs/chem/probes")  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from .errors import NonFiniteError, ProbeError, ShapeError, close_matches
from .io import atomic_path, write_json, write_table
from .threads import limit_threads

__all__ = [
    "DEFAULT_ALPHAS",
    "ProbeResult",
    "ProbeSweepResult",
    "fit_probe",
    "infer_kind",
    "probe_sweep",
]

Kind = Literal["auto", "ridge", "logistic"]
Split = Literal["auto", "kfold", "stratified", "group"]

#: Ridge penalties searched by leave-one-out (standardised features): 1e-2 .. 1e6, half decades.
DEFAULT_ALPHAS: tuple[float, ...] = tuple(float(10.0**e) for e in np.arange(-2.0, 6.01, 0.5))

_PRIMARY = {"ridge": "r2", "logistic": "accuracy"}
_THREADED_WORK = 1e10  # n * d^2 of a site above which probes use the caller's thread settings
_TABLE_COLUMNS = ["site", "target", "kind", "metric", "condition", "baseline", "fold", "score", "alpha"]


class ProbeNonFiniteError(ProbeError, NonFiniteError):
    """NaN or inf in probe inputs (catchable as either :class:`ProbeError` or :class:`NonFiniteError`)."""


class ProbeShapeError(ProbeError, ShapeError):
    """Probe inputs whose row counts do not match (a :class:`ProbeError` and a :class:`ShapeError`)."""


# ------------------------------------------------------------------------------------------------
# Targets and splits
# ------------------------------------------------------------------------------------------------


def infer_kind(values: Any, *, max_classes: int = 10) -> Literal["ridge", "logistic"]:
    """Decide whether a target is regressed (``"ridge"``) or classified (``"logistic"``).

    Parameters
    ----------
    values
        The target column (pandas Series or array-like); missing values are ignored.
    max_classes
        Integer-valued numeric columns with at most this many distinct values are classes
        (ring counts, cluster ids, 0/1 labels); with more they are treated as quantities.

    Returns
    -------
    ``"logistic"`` for bool, categorical, string/object and few-valued integer columns;
    ``"ridge"`` for numeric columns with many distinct values.
    """
    s = values if isinstance(values, pd.Series) else pd.Series(np.asarray(values).ravel())
    if (
        pd.api.types.is_bool_dtype(s)
        or isinstance(s.dtype, pd.CategoricalDtype)
        or pd.api.types.is_object_dtype(s)
        or pd.api.types.is_string_dtype(s)
    ):
        return "logistic"
    if not pd.api.types.is_numeric_dtype(s):
        return "logistic"
    v = s.dropna().to_numpy(dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size and np.all(v == np.round(v)) and np.unique(v).size <= max_classes:
        return "logistic"
    return "ridge"


@dataclass
class _Target:
    """One probe target after validation: encoded labels on the rows kept."""

    name: str
    kind: Literal["ridge", "logistic"]
    y: np.ndarray  # float64 (ridge) or int64 codes into ``classes`` (logistic), on ``rows``
    rows: np.ndarray  # indices into the full row set
    classes: np.ndarray | None = None
    n_dropped: int = 0


def _prepare_target(
    values: Any, name: str, kind: str, *, dropna: bool, max_classes: int
) -> _Target:
    s = values if isinstance(values, pd.Series) else pd.Series(np.asarray(values).ravel())
    s = s.reset_index(drop=True)
    missing = s.isna().to_numpy()
    if missing.any() and not dropna:
        raise ProbeError(
            f"target {name!r} has {int(missing.sum())} missing values (NaN) in {len(s)} rows; "
            f"pass dropna=True to probe on the {int((~missing).sum())} labelled rows"
        )
    rows = np.flatnonzero(~missing)
    s = s.iloc[rows]
    if kind == "auto":
        kind = infer_kind(s, max_classes=max_classes)
    if kind not in ("ridge", "logistic"):
        raise ProbeError(f"target {name!r}: kind must be 'auto', 'ridge' or 'logistic', got {kind!r}")
    if kind == "ridge":
        if not pd.api.types.is_numeric_dtype(s) or pd.api.types.is_bool_dtype(s):
            raise ProbeError(
                f"target {name!r} is not numeric (dtype {s.dtype}); use kind='logistic' to classify it"
            )
        y = s.to_numpy(dtype=np.float64)
        if not np.isfinite(y).all():
            raise ProbeNonFiniteError(f"target {name!r} holds {int((~np.isfinite(y)).sum())} inf values")
        if y.size and np.ptp(y) == 0:
            raise ProbeError(f"target {name!r} is constant ({y[0]!r}); there is nothing to probe")
        return _Target(name, "ridge", y, rows, None, int(missing.sum()))
    codes, classes = pd.factorize(s, sort=True)
    if len(classes) < 2:
        only = classes[0] if len(classes) else None
        raise ProbeError(
            f"target {name!r} has a single class ({only!r}) in {len(s)} rows; "
            "a classifier needs at least two"
        )
    return _Target(name, "logistic", codes.astype(np.int64), rows, np.asarray(classes), int(missing.sum()))


def _make_folds(
    target: _Target,
    *,
    split: str,
    cv: int,
    groups: np.ndarray | None,
    groups_name: str,
    seed: int,
) -> tuple[list[tuple[np.ndarray, np.ndarray]], str]:
    """Folds as (train, test) indices into ``target.rows``; also returns the split actually used."""
    from sklearn.model_selection import GroupKFold, KFold, StratifiedKFold

    name, n = target.name, len(target.rows)
    if not isinstance(cv, (int, np.integer)) or cv < 2:
        raise ProbeError(f"cv must be an integer >= 2, got {cv!r}")
    if n < cv:
        raise ProbeError(f"target {name!r} has {n} rows, fewer than cv={cv} folds")
    if split == "auto":
        split = "group" if groups is not None else ("stratified" if target.kind == "logistic" else "kfold")
    if split == "stratified" and target.kind == "ridge":
        split = "kfold"  # stratification needs classes; a numeric target in a mixed sweep uses k-fold
    if split == "group":
        if groups is None:
            raise ProbeError(f"split='group' for target {name!r} needs groups (an obs column or an array)")
        g = groups[target.rows]
        n_groups = pd.unique(g).size
        if n_groups < cv:
            raise ProbeError(
                f"group split for target {name!r}: only {n_groups} distinct groups in {groups_name!r}, "
                f"fewer than cv={cv} folds"
            )
        splitter = GroupKFold(n_splits=cv, shuffle=True, random_state=seed)
        folds = list(splitter.split(np.zeros(n), groups=g))
    elif split == "stratified":
        assert target.classes is not None
        counts = np.bincount(target.y, minlength=len(target.classes))
        small = np.flatnonzero(counts < cv)
        if small.size:
            c = small[np.argmin(counts[small])]
            raise ProbeError(
                f"target {name!r}: class {target.classes[c]!r} has only {int(counts[c])} rows, fewer than "
                f"cv={cv} folds for a stratified split; lower cv, merge or drop rare classes"
            )
        folds = list(StratifiedKFold(n_splits=cv, shuffle=True, random_state=seed).split(np.zeros(n), target.y))
    elif split == "kfold":
        folds = list(KFold(n_splits=cv, shuffle=True, random_state=seed).split(np.zeros(n)))
    else:
        raise ProbeError(f"split must be 'auto', 'kfold', 'stratified' or 'group', got {split!r}")
    return folds, split


def _control_permutation(n: int, seed: int) -> np.ndarray:
    # A seed stream separate from the fold shuffling: the same seed always gives the same control.
    return np.random.default_rng([int(seed), 0x5C1]).permutation(n)


# ------------------------------------------------------------------------------------------------
# Numerics: standardisation, ridge (closed form), logistic (batched L-BFGS)
# ------------------------------------------------------------------------------------------------


def _scale(mu: np.ndarray, var: np.ndarray, n: int) -> np.ndarray:
    """StandardScaler's scale: the std, with 1 for (near-)constant columns, as sklearn does
    (dividing round-off noise by itself would blow it up)."""
    eps = np.finfo(np.float64).eps
    sd = np.sqrt(var)
    sd[(var <= n * eps * var + (n * mu * eps) ** 2) | (sd == 0)] = 1.0
    return sd


def _standardise(X: np.ndarray, standardize: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centre (and scale) ``X`` in place like sklearn's StandardScaler; returns (Xs, mean, scale)."""
    mu = X.mean(axis=0)
    X -= mu
    if not standardize:
        return X, mu, np.ones_like(mu)
    sd = _scale(mu, np.einsum("ij,ij->j", X, X) / X.shape[0], X.shape[0])
    X /= sd
    return X, mu, sd


def _ridge_loo(
    Xs: np.ndarray, Y: np.ndarray, alphas: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-target alpha by efficient leave-one-out, from one decomposition of the centred design.

    The quantities are those of the thin SVD ``Xs = U S V^T`` that ``RidgeCV(gcv_mode="svd")``
    uses. When ``n > d`` they are taken from the eigendecomposition ``Xs^T Xs = V S^2 V^T`` and
    ``P = Xs V = U S`` instead (about 3x faster than LAPACK's SVD at n=4000, d=384), written so
    nothing is divided by a singular value; if an alpha is so small against the largest
    eigenvalue that squaring could cost precision, the SVD is used.

    Parameters
    ----------
    Xs : (n, d) centred (standardised) design; Y : (n, t) targets; alphas : (A,)

    Returns
    -------
    coef : (d, t) coefficients in the space of ``Xs`` for the chosen alphas
    best : (t,) chosen alpha per target
    y_mean : (t,) intercept (the training mean of each target)
    """
    n, d = Xs.shape
    P = None
    if n > d:
        lam, V = np.linalg.eigh(Xs.T @ Xs)  # (d,), (d, d)
        lam = np.clip(lam, 0.0, None)
        if _eigh_is_accurate(lam, alphas):
            P = Xs @ V  # (n, d) = U S
    if P is None:
        U, s, Vt = np.linalg.svd(Xs, full_matrices=False)  # U (n, k), s (k,), Vt (k, d)
        P, lam, V = U * s, s**2, Vt.T
    return _loo_select(P, lam, V, Y, alphas)


def _eigh_is_accurate(lam: np.ndarray, alphas: np.ndarray) -> bool:
    """Whether eigenvalues of ``Xs^T Xs`` are precise enough for the smallest alpha (else use the SVD)."""
    return bool(lam.max() == 0 or alphas.min() >= 1e-9 * lam.max())


def _loo_select(
    P: np.ndarray, lam: np.ndarray, V: np.ndarray, Y: np.ndarray, alphas: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Efficient-LOO alpha choice and coefficients from ``P = U S`` (n, k), ``lam = S^2`` (k,), ``V`` (d, k).

    See :func:`_ridge_loo` for the returns.
    """
    n = P.shape[0]
    y_mean = Y.mean(axis=0)
    Yc = Y - y_mean  # (n, t)
    t, A = Yc.shape[1], alphas.size
    k = lam.size
    PTy = P.T @ Yc  # (k, t) = S U^T y
    inv = 1.0 / (lam[:, None] + alphas[None, :])  # (k, A): 1 / (s^2 + alpha)
    # Hat-matrix diagonal for every alpha, sum_j U_ij^2 s_j^2 / (s_j^2 + alpha); the "- 1/n" is
    # the unpenalised intercept (X is centred, so the ones vector is orthogonal to U) -- exactly
    # sklearn's correction with unit sample weights.
    denom = 1.0 - (P * P) @ inv - 1.0 / n  # (n, A)
    fitted = (P @ (inv[:, :, None] * PTy[:, None, :]).reshape(k, A * t)).reshape(n, A, t)
    looe = (Yc[:, None, :] - fitted) / denom[:, :, None]  # (n, A, t)
    mse = np.einsum("nat,nat->at", looe, looe) / n  # (A, t)
    best_idx = np.argmin(mse, axis=0)  # first minimum, as RidgeCV (strict ">" on the score)
    best = alphas[best_idx]
    coef = V @ (PTy * inv[:, best_idx])  # (d, t) = V diag(s / (s^2 + alpha)) U^T y
    return coef, best, y_mean


def _ridge_cv(
    X: np.ndarray,
    Y: np.ndarray,
    folds: Sequence[tuple[np.ndarray, np.ndarray]],
    alphas: np.ndarray,
    standardize: bool,
) -> dict[str, np.ndarray]:
    """Cross-validated ridge for all columns of ``Y`` at once: r2, pearson_r, alpha, each (t, F)."""
    t, F = Y.shape[1], len(folds)
    out = {m: np.full((t, F), np.nan) for m in ("r2", "pearson_r", "alpha")}
    n, d = X.shape
    # One Gram matrix of the (globally centred) design serves every fold: a training fold's
    # centred scatter is the total minus its test rows' part, corrected for the fold mean,
    #   C_f = Xc^T Xc - Xc_te^T Xc_te - n_f mu_f mu_f^T          (d, d)
    # so each fold costs a Gram of its test rows (n/cv) instead of its training rows
    # (n (cv-1)/cv). Centring globally first keeps the downdate free of cancellation.
    X64 = np.asarray(X, dtype=np.float64)
    g_mean = X64.mean(axis=0)  # (d,)
    Xc = X64 - g_mean  # (n, d), a copy: X itself is never modified
    gram = Xc.T @ Xc  # (d, d)
    col_sum = Xc.sum(axis=0)  # (d,), ~0
    for f, (tr, te) in enumerate(folds):
        n_tr = tr.size
        Xte = Xc[te]  # (n_te, d)
        done = False
        if n_tr > d and n_tr + Xte.shape[0] == n:  # the downdate needs train = all rows but the test rows
            mu_c = (col_sum - Xte.sum(axis=0)) / n_tr  # training mean, in centred coordinates
            C = gram - Xte.T @ Xte - n_tr * np.outer(mu_c, mu_c)  # (d, d) centred scatter
            var = np.clip(np.diag(C) / n_tr, 0.0, None)
            # the downdate's round-off is relative to the whole column's scatter, not to the fold's
            # mean: a column constant on the training rows (a one-hot country none of them has) keeps
            # a residue of ~n eps |gram_jj| that would otherwise be read as a tiny spread and blow up
            # the test rows that have the country
            var[var <= 4 * n * np.finfo(np.float64).eps * np.diag(gram) / n_tr] = 0.0
            sd = _scale(g_mean + mu_c, var, n_tr) if standardize else np.ones(d)
            lam, V = np.linalg.eigh(C / np.outer(sd, sd))  # eigen-decomposition of Xs^T Xs
            lam = np.clip(lam, 0.0, None)
            if _eigh_is_accurate(lam, alphas):
                Vs = V / sd[:, None]  # (d, d): standardisation folded into the projection
                P = Xc[tr] @ Vs - mu_c @ Vs  # (n_tr, d) = Xs V = U S
                coef, best, y_mean = _loo_select(P, lam, V, Y[tr], alphas)
                pred = ((Xte - mu_c) / sd) @ coef + y_mean  # (n_te, t)
                done = True
        if not done:  # few rows, or an alpha too small for the eigenvalues: the SVD of X itself
            Xtr, mu, sd = _standardise(np.array(X[tr], dtype=np.float64), standardize)
            coef, best, y_mean = _ridge_loo(Xtr, Y[tr], alphas)
            pred = ((X64[te] - mu) / sd) @ coef + y_mean  # (n_te, t)
        yt = Y[te]
        resid = ((yt - pred) ** 2).sum(0)
        tot = ((yt - yt.mean(0)) ** 2).sum(0)
        with np.errstate(divide="ignore", invalid="ignore"):
            out["r2"][:, f] = np.where(tot > 0, 1.0 - resid / tot, np.nan)
            pc, yc = pred - pred.mean(0), yt - yt.mean(0)
            out["pearson_r"][:, f] = (pc * yc).sum(0) / np.sqrt((pc * pc).sum(0) * (yc * yc).sum(0))
        out["alpha"][:, f] = best
    return out


def _ridge_full(
    X: np.ndarray, Y: np.ndarray, alphas: np.ndarray, standardize: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ridge on all rows (alpha by LOO); coefficients mapped back to raw feature space."""
    Xs, mu, sd = _standardise(np.array(X, dtype=np.float64), standardize)
    coef, best, y_mean = _ridge_loo(Xs, Y, alphas)
    raw = coef / sd[:, None]  # (d, t): w_raw = w_std / scale
    intercept = y_mean - mu @ raw
    return raw, intercept, best


def _fold_stats(Xg: np.ndarray, tr: np.ndarray, standardize: bool) -> tuple[np.ndarray, np.ndarray]:
    """Training-fold mean and StandardScaler scale of the (globally standardised) design."""
    Xtr = np.asarray(Xg[tr], dtype=np.float64)
    mu = Xtr.mean(axis=0)
    return mu, (_scale(mu, Xtr.var(axis=0), Xtr.shape[0]) if standardize else np.ones_like(mu))


def _logistic_fit(
    X: np.ndarray,
    Ys: np.ndarray,
    n_classes: int,
    folds: Sequence[tuple[np.ndarray, np.ndarray]],
    *,
    C: float,
    standardize: bool,
    full: bool,
    max_iter: int,
    tol: float,
) -> dict[str, Any]:
    """Logistic probes for every fold (and label row of ``Ys``) plus the all-rows fit, at once.

    Parameters
    ----------
    X : (n, d) activations; Ys : (T, n) label codes (row 0 the target, then e.g. its control)
    folds : (train, test) indices; ``full`` adds a last "fold" training on all rows (row 0 only)

    Returns
    -------
    dict with ``scores`` (metric -> (T, F)), and with ``full``: ``coef`` (K', d) and
    ``intercept`` (K',) in raw feature space (sklearn's layout; K' = 1 for two classes).

    Notes
    -----
    Every problem minimises sklearn's ``LogisticRegression(C)`` objective scaled by 1/n: mean
    log-loss + ||W||^2 / (2 C n), intercept unpenalised, on features standardised with its own
    training rows; two classes use the sigmoid (one weight vector), more the multinomial softmax.

    Why one pass: the folds' training sets overlap (each row sits in cv - 1 of them), so instead
    of one standardised copy of X per fold we keep X once and fold each fold's standardisation
    into its weights, ``((X - mu_f) / sd_f) W_f = X (W_f / sd_f) - (mu_f / sd_f) W_f``. One
    matmul ``X @ [all folds' weights]`` then gives every fold's logits (rows outside a fold's
    training set get zero weight), and one ``X.T @ G`` every gradient, so each L-BFGS step reads
    X twice instead of 2 x folds x labels times. All problems are independent (separate
    parameters), so one L-BFGS on their sum minimises each. Gradients are written out by hand.
    """
    import torch

    n, d = X.shape
    T, K = Ys.shape[0], n_classes
    binary = K == 2
    Kp = 1 if binary else K
    train_sets = [tr for tr, _ in folds] + ([np.arange(n)] if full else [])
    F = len(train_sets)
    # A global standardisation first keeps float32 products well conditioned (activations can
    # carry offsets much larger than their spread); fold statistics are then taken on top of it.
    X64 = np.asarray(X, dtype=np.float64)
    mu_all = X64.mean(axis=0)
    sd_all = X64.std(axis=0) if standardize else np.ones(d)
    sd_all[sd_all == 0] = 1.0
    Xg = (X64 - mu_all) / sd_all
    del X64
    stats = [_fold_stats(Xg, tr, standardize) for tr in train_sets]
    mu = torch.from_numpy(np.stack([m for m, _ in stats]))  # (F, d)
    sd = torch.from_numpy(np.stack([s for _, s in stats]))  # (F, d)

    dt = torch.float64
    wts = torch.zeros(n, F, T, dtype=dt)  # 1/n_f on a fold's training rows, else 0
    mask = torch.zeros(1, F, T, Kp, dtype=dt)  # -inf for classes a fold's training rows lack
    for f, tr in enumerate(train_sets):
        for t in range(T if not (full and f == F - 1) else 1):  # the all-rows fit: target only
            present = np.bincount(Ys[t, tr], minlength=K) > 0
            if binary and not present.all():
                continue  # one class: nothing to fit; the caller predicts that class
            wts[torch.from_numpy(tr), f, t] = 1.0 / tr.size
            if not binary:
                mask[0, f, t, torch.from_numpy(~present)] = -math.inf
    n_f = torch.tensor([tr.size for tr in train_sets], dtype=dt)
    lam = (1.0 / (C * n_f)).view(F, 1, 1)  # per-fold L2 strength in the 1/n-scaled objective

    # Preconditioning: L-BFGS runs on U with A = T U, where T (d, d) whitens the globally
    # standardised design (T^T Xg^T Xg T / n = I on its range). The objective -- and so its
    # minimiser A -- is unchanged; only the coordinates differ, and in whitened coordinates the
    # loss is far better conditioned (activations are strongly correlated), so L-BFGS needs about
    # a third of the iterations (e.g. 18 instead of 35-59 at n=5000, d=384). T costs one d x d
    # eigendecomposition and one (n, d) @ (d, d) product per call.
    # T only has to be invertible for the minimiser to stay the same, so it is computed in float32.
    Xg32 = Xg.astype(np.float32)
    ev, Q = np.linalg.eigh((Xg32.T @ Xg32).astype(np.float64) / n)  # (d,), (d, d)
    ev = np.maximum(ev, max(float(ev.max()), 1e-12) * 1e-6)  # rank-deficient directions: a floor
    Tm_np = Q / np.sqrt(ev)  # (d, d): A = Tm @ U
    Tm = torch.from_numpy(Tm_np)
    Xw32 = torch.from_numpy(Xg32 @ Tm_np.astype(np.float32))  # (n, d) whitened: matmuls in float32
    XwT32 = Xw32.T.contiguous()
    mu_w = mu @ Tm  # (F, d): fold means in whitened coordinates
    Y = torch.from_numpy(np.ascontiguousarray(Ys.T))  # (n, T)
    Yf = Y.to(dt).unsqueeze(1)  # (n, 1, T)
    Yi = Y.view(n, 1, T, 1).expand(n, F, T, 1)
    has_mask = bool(torch.isinf(mask).any())
    active = wts > 0
    minus_one = torch.full(Yi.shape, -1.0, dtype=dt)
    U = torch.zeros(F, d, T * Kp, dtype=dt, requires_grad=True)  # whitened weights (A = Tm U)
    # Start each intercept at its optimum for W = 0 (log class frequencies): fewer L-BFGS steps.
    b0 = np.zeros((F, T, Kp))
    for f, tr in enumerate(train_sets):
        for t in range(T):
            freq = np.bincount(Ys[t, tr], minlength=K) / tr.size
            if binary:
                if 0 < freq[1] < 1:
                    b0[f, t, 0] = np.log(freq[1] / freq[0])
            else:
                b0[f, t] = np.log(np.where(freq > 0, freq, 1.0))
                b0[f, t] -= b0[f, t][freq > 0].mean()
    b = torch.from_numpy(b0.reshape(F, 1, T * Kp)).requires_grad_(True)
    sd3 = sd.unsqueeze(-1)  # (F, d, 1)

    def effective() -> tuple[torch.Tensor, torch.Tensor]:
        A = torch.einsum("de,fek->fdk", Tm, U)  # (F, d, TK'): weights on the globally standardised X
        c = b[:, 0, :] - torch.einsum("fd,fdk->fk", mu, A)  # (F, TK')
        return A, c

    def closure() -> torch.Tensor:
        with torch.no_grad():
            Ucat = U.permute(1, 0, 2).reshape(d, F * T * Kp)
            c = b[:, 0, :] - torch.einsum("fd,fdk->fk", mu_w, U)  # (F, TK') = b - mu_f . A_f
            Z = (Xw32 @ Ucat.to(torch.float32)).to(dt).view(n, F, T * Kp) + c  # (n, F, TK')
            Z = Z.view(n, F, T, Kp)
            if binary:
                z = Z[..., 0]
                loss_rows = torch.nn.functional.softplus(z) - Yf * z
                G = ((torch.sigmoid(z) - Yf) * wts).unsqueeze(-1)  # (n, F, T, 1)
            else:
                if has_mask:
                    Z = Z + mask
                # softmax by hand: ~2.5x faster than torch.log_softmax for a handful of classes
                Z = Z - Z.amax(dim=-1, keepdim=True)
                E = Z.exp()
                S = E.sum(dim=-1, keepdim=True)
                loss_rows = (S.log() - Z.gather(-1, Yi))[..., 0]  # inf where a row's class is masked
                G = E.div_(S).scatter_add_(-1, Yi, minus_one)  # P - onehot
                G.mul_(wts.unsqueeze(-1))
            W = torch.einsum("de,fek->fdk", Tm, U) * sd3  # (F, d, TK'): weights on fold-standardised X
            loss = torch.where(active, loss_rows, 0.0).mul_(wts).sum() + 0.5 * (lam * W * W).sum()
            G = G.reshape(n, F * T * Kp)
            gsum = G.sum(0).view(F, T * Kp)
            XG = (XwT32 @ G.to(torch.float32)).to(dt).view(d, F, T * Kp).permute(1, 0, 2)  # (F, d, TK')
            # dL/dU = Tm^T dL/dA; the data term through Z = Xw U + b - mu_w U, the penalty
            # 0.5 lam ||sd * A||^2 through A = Tm U.
            penalty_grad = torch.einsum("de,fdk->fek", Tm, lam * W * sd3)
            U.grad = (XG - mu_w.unsqueeze(-1) * gsum.unsqueeze(1) + penalty_grad).contiguous()
            b.grad = gsum.unsqueeze(1).contiguous()
        return loss

    opt = torch.optim.LBFGS(
        [U, b],
        lr=1.0,
        max_iter=max_iter,
        max_eval=int(max_iter * 1.25),
        tolerance_grad=tol,
        tolerance_change=1e-14,
        history_size=20,
        line_search_fn="strong_wolfe",
    )
    opt.step(closure)

    with torch.no_grad():
        A, c = effective()
        Z = (torch.from_numpy(Xg) @ A.permute(1, 0, 2).reshape(d, F * T * Kp)).view(n, F, T, Kp) + c.view(1, F, T, Kp)
        if not binary:
            Z = Z + mask  # never predict a class a fold did not see
    logits = Z.numpy()
    metrics = ["accuracy", "f1_macro"] + (["auroc"] if binary else [])
    scores = {m: np.full((T, len(folds)), np.nan) for m in metrics}
    for f, (tr, te) in enumerate(folds):
        for t in range(T):
            seen = np.unique(Ys[t, tr])
            only = int(seen[0]) if binary and seen.size == 1 else None
            for m, v in _logistic_scores(logits[te, f, t], Ys[t, te], binary, only).items():
                scores[m][t, f] = v
    out: dict[str, Any] = {"scores": scores}
    if full:
        A_full = A[F - 1].numpy()[:, :Kp]  # (d, K') on the globally standardised X
        coef = A_full / sd_all[:, None]
        intercept = c[F - 1].numpy()[:Kp] - (mu_all / sd_all) @ A_full
        out["coef"], out["intercept"] = coef.T, intercept
    return out


def _logistic_scores(
    logits: np.ndarray, y: np.ndarray, binary: bool, only_class: int | None
) -> dict[str, float]:
    from sklearn.metrics import f1_score, roc_auc_score

    if only_class is not None:
        pred = np.full(y.shape, only_class)
        score = np.zeros(y.shape)
    elif binary:
        score = logits[:, 0]
        pred = (score > 0).astype(np.int64)
    else:
        pred = np.argmax(logits, axis=1)
        score = None
    out = {
        "accuracy": float(np.mean(pred == y)),
        "f1_macro": float(f1_score(y, pred, average="macro", zero_division=0.0)),
    }
    if binary:
        out["auroc"] = float(roc_auc_score(y, score)) if np.unique(y).size == 2 else float("nan")
    return out


@contextlib.contextmanager
def _threads_for(n: int, d: int) -> Iterator[None]:
    """Run one site's probes single-threaded unless the site is large (n * d^2 >= 1e10).

    Why: each fold is a few BLAS calls plus many small ops. With 2+ threads, numpy's OpenBLAS
    pool and torch's OpenMP pool take turns spinning on the same cores, and on a shared machine
    (a laptop, a CI runner, a neighbour's job) a threaded op stalls for a scheduler tick. On
    2 shared cores at n=5000, d=384 one thread was 8-50x faster for ridge and 3-4x for logistic;
    only much larger sites gain from threads, and those keep the caller's settings.
    """
    if n * d * d >= _THREADED_WORK:
        yield
        return
    with limit_threads(1):
        yield


def _check_finite(X: np.ndarray, what: str, *, chunk_rows: int = 65536) -> None:
    """Raise naming ``what`` when X holds NaN/inf; chunked so a memory map is never copied whole."""
    if X.dtype.kind not in "fc":
        return
    bad_rows: list[np.ndarray] = []
    for start in range(0, X.shape[0], chunk_rows):
        block = np.asarray(X[start : start + chunk_rows])
        bad = ~np.isfinite(block).all(axis=1)
        if bad.any():
            bad_rows.append(np.flatnonzero(bad) + start)
    if bad_rows:
        rows = np.concatenate(bad_rows)
        raise ProbeNonFiniteError(
            f"{what}: {rows.size} rows hold NaN or inf activations (first at row {int(rows[0])})"
        )


def _as_2d(X: Any, what: str) -> np.ndarray:
    if hasattr(X, "detach"):
        X = X.detach().cpu().numpy()
    if not isinstance(X, np.ndarray):
        X = np.asarray(X)
    if X.ndim == 1:
        X = X[:, None]
    if X.ndim != 2:
        raise ProbeShapeError(f"{what}: expected an (n, d) array, got shape {X.shape}")
    return X


def _normalise_baseline(baseline: Any, n: int) -> dict[str, np.ndarray]:
    if baseline is None:
        return {}
    items = baseline.items() if isinstance(baseline, Mapping) else [("baseline", baseline)]
    out: dict[str, np.ndarray] = {}
    for name, arr in items:
        arr = _as_2d(arr, f"baseline {name!r}")
        if arr.shape[0] != n:
            raise ProbeShapeError(f"baseline {name!r} has {arr.shape[0]} rows but the activations have {n}")
        _check_finite(arr, f"baseline {name!r}")
        out[str(name)] = arr
    return out


# ------------------------------------------------------------------------------------------------
# Results
# ------------------------------------------------------------------------------------------------


@dataclass
class ProbeResult:
    """A cross-validated probe of one target at one site, with its control and baselines.

    Attributes
    ----------
    target, site : str
        What was probed and where (``site`` is None for :func:`fit_probe` on a bare array).
    kind : {"ridge", "logistic"}
    metric : str
        The primary metric (``"r2"`` for ridge, ``"accuracy"`` for logistic) behind
        :attr:`mean`, :attr:`std`, :attr:`control_mean` and :attr:`baseline_mean`.
    scores : dict[str, ndarray]
        Per-fold probe scores for every metric (ridge: r2, pearson_r; logistic: accuracy,
        f1_macro, and auroc for two classes).
    control_scores : dict[str, ndarray] or None
        The same for the shuffled-label control (same folds).
    baseline_scores : dict[str, dict[str, ndarray]]
        Baseline name -> metric -> per-fold scores (same folds).
    alphas : ndarray or None
        Ridge penalty chosen by leave-one-out in each outer fold.
    coef, intercept
        The probe fitted on all rows, in raw activation space: ``X @ coef.T + intercept``
        (ridge and binary: ``coef`` is (d,); multiclass: (n_classes, d), sklearn's layout).
    classes : ndarray or None
        Class labels (logistic), in the order of ``coef`` rows / codes.
    folds : list of (train, test) index arrays into the rows of ``X``
    params : dict
        Everything needed to reproduce the numbers (kind, cv, split, groups, alphas, C, seed, ...).
    """

    target: str
    site: str | None
    kind: str
    metric: str
    scores: dict[str, np.ndarray]
    control_scores: dict[str, np.ndarray] | None
    baseline_scores: dict[str, dict[str, np.ndarray]]
    alphas: np.ndarray | None
    coef: np.ndarray | None
    intercept: Any
    classes: np.ndarray | None
    folds: list[tuple[np.ndarray, np.ndarray]] = field(repr=False)
    params: dict[str, Any] = field(default_factory=dict)
    alpha: float | None = None  # ridge alpha of the all-rows fit

    # -- the numbers a paper reports ------------------------------------------------------------
    @property
    def mean(self) -> float:
        """Mean over folds of the primary metric."""
        return float(np.nanmean(self.scores[self.metric]))

    @property
    def std(self) -> float:
        """Standard deviation over folds of the primary metric."""
        return float(np.nanstd(self.scores[self.metric]))

    @property
    def control_mean(self) -> float:
        """Mean primary metric of the shuffled-label control (NaN without a control)."""
        if not self.control_scores:
            return float("nan")
        return float(np.nanmean(self.control_scores[self.metric]))

    @property
    def baseline_mean(self) -> float:
        """Mean primary metric of the strongest baseline (NaN without baselines)."""
        means = [np.nanmean(s[self.metric]) for s in self.baseline_scores.values()]
        return float(max(means)) if means else float("nan")

    @property
    def direction(self) -> np.ndarray | None:
        """The probe weight vector(s) scaled to unit norm (rows for multiclass)."""
        if self.coef is None:
            return None
        norm = np.linalg.norm(self.coef, axis=-1, keepdims=True)
        return self.coef / np.where(norm > 0, norm, 1.0)

    def predict(self, X: Any) -> np.ndarray:
        """Apply the all-rows probe: values (ridge) or class labels (logistic)."""
        if self.coef is None:
            raise ProbeError(f"probe of {self.target!r} was fitted without fit_direction")
        X = _as_2d(X, "X")
        z = X @ np.atleast_2d(self.coef).T + self.intercept
        if self.kind == "ridge":
            return z[:, 0]
        assert self.classes is not None
        codes = (z[:, 0] > 0).astype(int) if z.shape[1] == 1 else np.argmax(z, axis=1)
        return self.classes[codes]

    @property
    def table(self) -> pd.DataFrame:
        """Tidy per-fold table: site, target, kind, metric, condition, baseline, fold, score, alpha."""
        return _result_rows(self, include_baselines=True)

    def __repr__(self) -> str:
        where = f" at {self.site!r}" if self.site else ""
        s = f"ProbeResult({self.kind} probe of {self.target!r}{where}: {self.metric} {self.mean:.3f} ± {self.std:.3f}"
        if self.control_scores:
            s += f", control {self.control_mean:.3f}"
        if self.baseline_scores:
            s += f", baseline {self.baseline_mean:.3f}"
        return s + ")"


def _result_rows(res: ProbeResult, *, include_baselines: bool) -> pd.DataFrame:
    rows: list[tuple[Any, ...]] = []
    F = len(next(iter(res.scores.values())))
    alphas = res.alphas if res.alphas is not None else np.full(F, np.nan)

    def add(condition: str, base: str, scores: dict[str, np.ndarray], site: Any, with_alpha: bool) -> None:
        for metric, vals in scores.items():
            for f, v in enumerate(vals):
                a = alphas[f] if with_alpha else np.nan
                rows.append((site, res.target, res.kind, metric, condition, base, f, float(v), float(a)))

    add("probe", "", res.scores, res.site, True)
    if res.control_scores:
        add("control", "", res.control_scores, res.site, True)
    if include_baselines:
        for name, sc in res.baseline_scores.items():
            add("baseline", name, sc, None, False)
    return pd.DataFrame(rows, columns=_TABLE_COLUMNS)


@dataclass
class ProbeSweepResult:
    """Probes of every target at every site, with controls and baselines; carries its params.

    Attributes
    ----------
    results : dict[(site, target), ProbeResult]
    sites, targets : list[str]
        In store order (which is layer order) and in the order asked.
    params : dict
    """

    results: dict[tuple[str, str], ProbeResult]
    sites: list[str]
    targets: list[str]
    params: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, key: tuple[str, str]) -> ProbeResult:
        return self.results[key]

    @property
    def table(self) -> pd.DataFrame:
        """Tidy per-fold scores: site, target, kind, metric, condition (probe / control /
        baseline), baseline (its name), fold, score, alpha. Baseline rows do not depend on the
        site and appear once per target with ``site`` empty."""
        parts = [_result_rows(self.results[(s, t)], include_baselines=False) for s in self.sites for t in self.targets]
        for t in self.targets:
            first = self.results[(self.sites[0], t)]
            if first.baseline_scores:
                rows = _result_rows(first, include_baselines=True)
                parts.append(rows[rows["condition"] == "baseline"])
        return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=_TABLE_COLUMNS)

    def _metric(self, target: str, metric: str | None) -> str:
        res = self.results[(self.sites[0], target)]
        metric = metric or res.metric
        if metric not in res.scores:
            raise ProbeError(f"metric {metric!r} is not available for target {target!r}; it has {list(res.scores)}")
        return metric

    def summary(self, metric: str | None = None) -> pd.DataFrame:
        """One row per site x target: score mean/std, control, baseline, chosen alpha.

        Parameters
        ----------
        metric
            Which metric to summarise (default: each target's primary metric, r2 or accuracy).
        """
        recs = []
        for layer, site in enumerate(self.sites):
            for target in self.targets:
                res = self.results[(site, target)]
                m = metric if metric is not None and metric in res.scores else res.metric
                rec: dict[str, Any] = {
                    "site": site,
                    "layer": layer,
                    "target": target,
                    "kind": res.kind,
                    "metric": m,
                    "score_mean": float(np.nanmean(res.scores[m])),
                    "score_std": float(np.nanstd(res.scores[m])),
                    "control_mean": float(np.nanmean(res.control_scores[m])) if res.control_scores else np.nan,
                    "control_std": float(np.nanstd(res.control_scores[m])) if res.control_scores else np.nan,
                }
                best_name, best_mean, best_std = "", np.nan, np.nan
                for name, sc in res.baseline_scores.items():
                    mm = float(np.nanmean(sc[m]))
                    if len(res.baseline_scores) > 1:
                        rec[f"baseline_mean[{name}]"] = mm
                    if not best_name or mm > best_mean:
                        best_name, best_mean, best_std = name, mm, float(np.nanstd(sc[m]))
                rec.update(baseline=best_name, baseline_mean=best_mean, baseline_std=best_std)
                rec["alpha"] = float(np.median(res.alphas)) if res.alphas is not None else np.nan
                rec["n_obs"] = int(res.params.get("n_obs", 0))
                rec["split"] = res.params.get("split")
                recs.append(rec)
        return pd.DataFrame.from_records(recs)

    def best(self, target: str, *, metric: str | None = None) -> ProbeResult:
        """The probe of ``target`` at the site with the highest mean score (first on ties)."""
        if target not in self.targets:
            hint = close_matches(target, self.targets)
            raise ProbeError(
                f"target {target!r} was not probed" + (f"; did you mean {hint}?" if hint else f"; targets: {self.targets}")
            )
        m = self._metric(target, metric)
        means = [np.nanmean(self.results[(s, target)].scores[m]) for s in self.sites]
        return self.results[(self.sites[int(np.nanargmax(means))], target)]

    def plot(self, target: str | Sequence[str] | None = None, *, ax: Any = None, metric: str | None = None,
             band: Literal["range", "se", "std"] = "range", legend: bool = True) -> Any:
        """Score vs site (layer): the probe's mean over folds with a band over folds, the
        shuffled-label control in grey, each baseline a horizontal line in its own colour.

        With one target every baseline gets a colour of its own (with a faint band over its folds);
        with several targets each target has a colour and its baselines differ by line style.
        Site labels are shortened and thinned (:func:`~sciscope.core.plotting.label_sites`), the
        cut prefix shown in the axis label.

        Parameters
        ----------
        target
            One target, several, or None for all.
        ax
            Axes to draw into (a new figure when None).
        metric
            Metric to plot (default: each target's primary metric).
        band
            What the shaded band spans: ``"range"`` the lowest to the highest fold score,
            ``"se"`` mean +/- the standard error over folds, ``"std"`` mean +/- their standard deviation.
        legend
            Draw the legend.

        Returns
        -------
        matplotlib.axes.Axes
        """
        from .plotting import (BASELINE_COLOURS, CONTROL_GREY, MAIN_COLOUR, get_ax, label_sites, legend_below,
                               site_axis_label)

        if band not in ("range", "se", "std"):
            raise ValueError(f"band must be 'range', 'se' or 'std', got {band!r}")
        targets = self.targets if target is None else ([target] if isinstance(target, str) else list(target))
        for t in targets:
            if t not in self.targets:
                self.best(t)  # raises the "did you mean" error
        ax = get_ax(ax)
        x = np.arange(len(self.sites))
        metrics_used = []
        single = len(targets) == 1
        n_folds = 0

        def spread(folds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            """(low, high) of each row of per-fold scores (sites x folds)."""
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows give NaN bounds
                mean = np.nanmean(folds, axis=1)
                if band == "range":
                    return np.nanmin(folds, axis=1), np.nanmax(folds, axis=1)
                sd = np.nanstd(folds, axis=1, ddof=1 if band == "se" else 0)
                if band == "se":
                    sd = sd / np.sqrt(np.maximum(np.sum(np.isfinite(folds), axis=1), 1))
                return mean - sd, mean + sd

        band_name = {"range": "fold range", "se": "± SE over folds", "std": "± SD over folds"}[band]
        shown: list[np.ndarray] = []  # what the y axis must hold: bands, curves, controls
        baselines: list[tuple[float, str, Any, str]] = []  # mean, colour, style, label
        for i, t in enumerate(targets):
            color = MAIN_COLOUR if single else f"C{i % 10}"
            m = metric if metric is not None else self.results[(self.sites[0], t)].metric
            m = self._metric(t, m)
            metrics_used.append(m)
            res = [self.results[(s, t)] for s in self.sites]
            folds = np.array([np.asarray(r.scores[m], dtype=float) for r in res])  # (sites, folds)
            n_folds = max(n_folds, folds.shape[1])
            mean = np.nanmean(folds, axis=1)
            lo, hi = spread(folds)
            name = "probe" if single else t
            ax.fill_between(x, lo, hi, color=color, alpha=0.2, linewidth=0, zorder=2)
            ax.plot(x, mean, "-o", color=color, label=f"{name} (band: {band_name})", markersize=4, zorder=3)
            if res[0].control_scores:
                ctrl = np.array([np.asarray(r.control_scores[m], dtype=float) for r in res])  # type: ignore[index]
                ccol = CONTROL_GREY if single else color
                clo, chi = spread(ctrl)
                if single:
                    ax.fill_between(x, clo, chi, color=ccol, alpha=0.15, linewidth=0, zorder=1)
                ax.plot(x, np.nanmean(ctrl, axis=1), "--", color=ccol, lw=1.2, zorder=2,
                        label="shuffled labels (control)" if single else f"{t}: shuffled labels")
                shown += [np.nanmean(ctrl, axis=1)] + ([clo, chi] if single else [])
            for j, (bname, sc) in enumerate(res[0].baseline_scores.items()):
                vals = np.asarray(sc[m], dtype=float)
                bcol = BASELINE_COLOURS[j % len(BASELINE_COLOURS)] if single else color
                style = "-." if single else ["-.", ":", (0, (5, 1))][j % 3]
                bmean = float(np.nanmean(vals))
                baselines.append((bmean, bcol, style, f"baseline: {bname}" if single else f"{t}: baseline {bname}"))
            shown += [lo, hi, mean]
        # A baseline far below (or above) everything else (r2 = -23 from failed folds) would squash
        # the curves into a line: the axis keeps to the curves, and such a baseline is named with
        # its value, "off scale", in the legend.
        fin = np.concatenate([np.ravel(v) for v in shown]) if shown else np.array([])
        fin = fin[np.isfinite(fin)]
        lo_c, hi_c = (float(fin.min()), float(fin.max())) if fin.size else (0.0, 1.0)
        reach = max(3 * (hi_c - lo_c), 1.0)  # scores are fractions: a baseline at 0.98 stays in view
        for bmean, bcol, style, blabel in baselines:
            off = bool(np.isfinite(bmean)) and not (lo_c - reach <= bmean <= hi_c + reach)
            if np.isfinite(bmean) and not off:
                lo_c, hi_c = min(lo_c, bmean), max(hi_c, bmean)
            ax.axhline(bmean, color=bcol, linestyle=style, lw=1.5, zorder=2.5,
                       label=f"{blabel} ({bmean:.3g}, off scale)" if off else blabel)
        pad = 0.06 * max(hi_c - lo_c, 1e-3)
        ax.set_ylim(lo_c - pad, hi_c + pad)
        template = label_sites(ax, self.sites)
        ax.set_xlabel(site_axis_label(template))
        ax.set_ylabel(" / ".join(dict.fromkeys(metrics_used)) + (f" ({n_folds} folds)" if n_folds else ""))
        ax.set_title(f"probe: {targets[0]}" if single else "probe score by site", fontsize=10)
        if legend:
            labels = ax.get_legend_handles_labels()[1]
            legend_below(ax, ncol=2 if single and max(map(len, labels), default=0) <= 28 else 1)
        return ax

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "ProbeSweepResult":
        """Read the per-fold scores a :meth:`save` wrote (``table.csv``, ``params.json``).

        Enough for :meth:`summary`, :meth:`best` and :meth:`plot`; the probes' weights are read
        back from ``directions.npz`` where saved, their folds are not (``folds`` is empty).
        """
        path = Path(path)
        table = pd.read_csv(path / "table.csv", keep_default_na=False, na_values={"score": ["", "nan", "NaN"],
                                                                                   "alpha": ["", "nan", "NaN"]})
        params = json.loads((path / "params.json").read_text()) if (path / "params.json").is_file() else {}
        arrays = dict(np.load(path / "directions.npz", allow_pickle=False)) if (path / "directions.npz").is_file() else {}

        def per_metric(rows: pd.DataFrame) -> dict[str, np.ndarray]:
            return {str(m): g.sort_values("fold")["score"].to_numpy(dtype=float) for m, g in rows.groupby("metric", sort=False)}

        probe_rows = table[table.condition != "baseline"]
        sites = [str(s) for s in dict.fromkeys(probe_rows.site)]
        targets = [str(t) for t in dict.fromkeys(table.target)]
        results: dict[tuple[str, str], ProbeResult] = {}
        for t in targets:
            tt = table[table.target == t]
            base = tt[tt.condition == "baseline"]
            baselines = {str(b): per_metric(g) for b, g in base.groupby("baseline", sort=False)}
            kind = str(tt.kind.iloc[0])
            for s in sites:
                here = tt[tt.site == s]
                probe, ctrl = here[here.condition == "probe"], here[here.condition == "control"]
                scores = per_metric(probe)
                primary = _PRIMARY.get(kind, next(iter(scores), ""))
                alphas = probe[probe.metric == primary].sort_values("fold")["alpha"].to_numpy(dtype=float)
                coef = arrays.get(f"{s}|{t}|coef")
                results[(s, t)] = ProbeResult(
                    target=t, site=s, kind=kind, metric=primary, scores=scores,
                    control_scores=per_metric(ctrl) if len(ctrl) else None, baseline_scores=baselines,
                    alphas=alphas if np.isfinite(alphas).any() else None, coef=coef,
                    intercept=arrays.get(f"{s}|{t}|intercept"), classes=None, folds=[], params={},
                )
        return cls(results, sites, targets, params)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write ``table.csv``, ``summary.csv``, ``params.json`` and ``directions.npz`` atomically.

        The folder appears complete or not at all.
        """
        path = Path(path)
        with atomic_path(path) as tmp:
            tmp.mkdir(parents=True)
            write_table(tmp / "table.csv", self.table)
            write_table(tmp / "summary.csv", self.summary())
            write_json(tmp / "params.json", _jsonable(self.params))
            arrays = {}
            for (s, t), r in self.results.items():
                if r.coef is not None:
                    arrays[f"{s}|{t}|coef"] = np.asarray(r.coef)
                    arrays[f"{s}|{t}|intercept"] = np.asarray(r.intercept)
            if arrays:
                np.savez(tmp / "directions.npz", **arrays)
        return path

    def __repr__(self) -> str:
        return f"ProbeSweepResult({len(self.sites)} sites x {len(self.targets)} targets: {self.targets})"


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return [_jsonable(v) for v in obj.tolist()]
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return str(obj)


# ------------------------------------------------------------------------------------------------
# The engine shared by fit_probe and probe_sweep
# ------------------------------------------------------------------------------------------------


@dataclass
class _Plan:
    """A target together with its folds and control labels (site independent)."""

    target: _Target
    folds: list[tuple[np.ndarray, np.ndarray]]
    split: str
    control_y: np.ndarray | None


def _plan_targets(
    columns: Mapping[str, Any],
    *,
    kinds: Mapping[str, str],
    split: str,
    cv: int,
    groups: np.ndarray | None,
    groups_name: str,
    control: bool,
    dropna: bool,
    max_classes: int,
    seed: int,
) -> list[_Plan]:
    plans = []
    for name, values in columns.items():
        t = _prepare_target(values, name, kinds[name], dropna=dropna, max_classes=max_classes)
        folds, used = _make_folds(t, split=split, cv=cv, groups=groups, groups_name=groups_name, seed=seed)
        ctrl = t.y[_control_permutation(len(t.y), seed)] if control else None
        plans.append(_Plan(t, folds, used, ctrl))
    return plans


def _run_site_inner(
    X: np.ndarray,
    plans: Sequence[_Plan],
    *,
    alphas: np.ndarray,
    C: float,
    standardize: bool,
    with_control: bool,
    fit_direction: bool,
    max_iter: int,
    tol: float,
) -> dict[str, dict[str, Any]]:
    """Score every planned target on one feature matrix (a site or a baseline)."""
    out: dict[str, dict[str, Any]] = {}
    # Ridge targets on the same rows with the same folds share one SVD per fold (and so do their
    # controls: shuffling y leaves X untouched).
    ridge_groups: dict[tuple[bytes, str], list[_Plan]] = {}
    for p in plans:
        if p.target.kind == "ridge":
            key = (p.target.rows.tobytes() + b"|" + b"".join(te.tobytes() for _, te in p.folds), p.split)
            ridge_groups.setdefault(key, []).append(p)
    full_rows = X.shape[0]
    for group in ridge_groups.values():
        rows = group[0].target.rows
        Xr = X if rows.size == full_rows else np.asarray(X[rows])
        cols = [p.target.y for p in group]
        if with_control:
            cols += [p.control_y for p in group]  # type: ignore[misc]
        Y = np.column_stack(cols)
        res = _ridge_cv(Xr, Y, group[0].folds, alphas, standardize)
        if fit_direction:
            coef, intercept, best = _ridge_full(Xr, Y[:, : len(group)], alphas, standardize)
        for i, p in enumerate(group):
            entry: dict[str, Any] = {
                "scores": {"r2": res["r2"][i], "pearson_r": res["pearson_r"][i]},
                "alphas": res["alpha"][i],
                "coef": coef[:, i] if fit_direction else None,
                "intercept": float(intercept[i]) if fit_direction else None,
                "alpha": float(best[i]) if fit_direction else None,
            }
            if with_control:
                j = len(group) + i
                entry["control"] = {"r2": res["r2"][j], "pearson_r": res["pearson_r"][j]}
            out[p.target.name] = entry
    for p in plans:
        if p.target.kind != "logistic":
            continue
        t = p.target
        assert t.classes is not None
        Xr = X if t.rows.size == full_rows else np.asarray(X[t.rows])
        Ys = np.stack([t.y, p.control_y]) if with_control else t.y[None, :]
        res = _logistic_fit(
            Xr, Ys, len(t.classes), p.folds, C=C, standardize=standardize, full=fit_direction,
            max_iter=max_iter, tol=tol,
        )
        entry = {"scores": {m: v[0] for m, v in res["scores"].items()}, "alphas": None, "alpha": None}
        if with_control:
            entry["control"] = {m: v[1] for m, v in res["scores"].items()}
        if fit_direction:
            w, b = res["coef"], res["intercept"]
            entry["coef"] = w[0] if w.shape[0] == 1 else w
            entry["intercept"] = float(b[0]) if b.shape[0] == 1 else b
        else:
            entry["coef"], entry["intercept"] = None, None
        out[t.name] = entry
    return out


def _run_site(X: np.ndarray, plans: Sequence[_Plan], **kw: Any) -> dict[str, dict[str, Any]]:
    """Score every planned target on one feature matrix (a site or a baseline)."""
    with _threads_for(X.shape[0], X.shape[1]):
        return _run_site_inner(X, plans, **kw)


def _build_result(
    plan: _Plan, site: str | None, site_out: dict[str, Any], baselines: dict[str, dict[str, Any]], params: dict[str, Any]
) -> ProbeResult:
    t = plan.target
    folds = [(t.rows[tr], t.rows[te]) for tr, te in plan.folds]  # back to indices of the full rows
    p = dict(params)
    p.update(
        target=t.name,
        site=site,
        kind=t.kind,
        split=plan.split,
        n_obs=int(t.rows.size),
        n_dropped=t.n_dropped,
        fold_sizes=[int(te.size) for _, te in plan.folds],
    )
    if t.classes is not None:
        p["classes"] = [_jsonable(c) for c in t.classes]
        p["chance_accuracy"] = float(np.bincount(t.y).max() / t.y.size)
    return ProbeResult(
        target=t.name,
        site=site,
        kind=t.kind,
        metric=_PRIMARY[t.kind],
        scores=site_out["scores"],
        control_scores=site_out.get("control"),
        baseline_scores={name: b[t.name]["scores"] for name, b in baselines.items()},
        alphas=site_out["alphas"],
        coef=site_out["coef"],
        intercept=site_out["intercept"],
        classes=t.classes,
        folds=folds,
        params=p,
        alpha=site_out["alpha"],
    )


# ------------------------------------------------------------------------------------------------
# Public API
# ------------------------------------------------------------------------------------------------


def fit_probe(
    X: Any,
    y: Any,
    *,
    kind: Kind = "auto",
    cv: int = 5,
    split: Split = "auto",
    groups: Any = None,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    C: float = 1.0,
    control: bool = True,
    baseline: Any = None,
    standardize: bool = True,
    dropna: bool = False,
    max_classes: int = 10,
    fit_direction: bool = True,
    max_iter: int = 1000,
    tol: float = 1e-5,
    seed: int = 0,
    name: str | None = None,
) -> ProbeResult:
    """Cross-validate a linear probe of ``y`` from ``X``, beside a shuffled control and baselines.

    Parameters
    ----------
    X
        Activations, shape ``(n, d)`` (numpy array, memory map or torch tensor).
    y
        Target, length ``n`` (array or pandas Series; a Series' name names the target).
    kind
        ``"ridge"`` (regression, R^2), ``"logistic"`` (classification, accuracy) or ``"auto"``
        (:func:`infer_kind`: numeric with many values -> ridge, else logistic).
    cv
        Number of folds.
    split
        ``"kfold"`` (shuffled, seeded), ``"stratified"`` (classification only; numeric targets
        fall back to k-fold), ``"group"`` (GroupKFold over ``groups``) or ``"auto"``: group when
        ``groups`` is given, stratified for classes, k-fold otherwise.
    groups
        Group label per row (scaffold, donor, region, episode); no group is ever on both sides.
    alphas
        Ridge penalties searched by efficient leave-one-out inside each training fold.
    C
        Inverse L2 strength of the logistic probe (sklearn's ``C``).
    control
        Also run a shuffled-label control through the same folds.
    baseline
        ``(n, b)`` array or ``{name: array}`` of baseline features run through the same folds.
    standardize
        Standardise features with training-fold statistics (as ``StandardScaler``).
    dropna
        Drop rows whose target is missing instead of raising.
    max_classes
        See :func:`infer_kind`.
    fit_direction
        Also fit the probe on all rows and keep its coefficients (raw feature space).
    max_iter, tol
        L-BFGS iteration cap and gradient tolerance of the logistic probe.
    seed
        Seeds the folds and the control permutation; the same seed gives identical numbers.
    name
        Name of the target (default: ``y.name`` or ``"y"``).

    Returns
    -------
    ProbeResult

    Raises
    ------
    ProbeError
        A single-class or constant target, NaN in the target (without ``dropna``), NaN/inf in
        ``X``, fewer rows than folds, a class smaller than ``cv`` in a stratified split, or fewer
        groups than folds.
    """
    X = _as_2d(X, "X")
    name = name or (str(y.name) if isinstance(y, pd.Series) and y.name is not None else "y")
    if isinstance(y, pd.Series):
        yv = y.reset_index(drop=True)
    elif isinstance(y, (list, tuple)):
        yv = pd.Series(list(y))
    else:
        yv = pd.Series((y.detach().cpu().numpy() if hasattr(y, "detach") else np.asarray(y)).ravel())
    if len(yv) != X.shape[0]:
        raise ProbeShapeError(f"target {name!r} has {len(yv)} rows but X has {X.shape[0]}")
    _check_finite(X, "X")
    g = None
    if groups is not None:
        g = np.asarray(groups)
        if g.shape[0] != X.shape[0]:
            raise ProbeShapeError(f"groups has {g.shape[0]} rows but X has {X.shape[0]}")
        if pd.isna(g).any():
            raise ProbeError(f"groups hold {int(pd.isna(g).sum())} missing values")
    base = _normalise_baseline(baseline, X.shape[0])
    alphas_arr = _check_alphas(alphas)
    plans = _plan_targets(
        {name: yv}, kinds={name: kind}, split=split, cv=cv, groups=g, groups_name="groups",
        control=control, dropna=dropna, max_classes=max_classes, seed=seed,
    )
    opts = dict(alphas=alphas_arr, C=C, standardize=standardize, max_iter=max_iter, tol=tol)
    site_out = _run_site(X, plans, with_control=control, fit_direction=fit_direction, **opts)  # type: ignore[arg-type]
    base_out = {
        bname: _run_site(B, plans, with_control=False, fit_direction=False, **opts)  # type: ignore[arg-type]
        for bname, B in base.items()
    }
    params = _params(
        kind=kind, cv=cv, split=split, groups=None if g is None else "array", alphas=alphas_arr, C=C,
        control=control, baselines=list(base), standardize=standardize, dropna=dropna,
        max_classes=max_classes, max_iter=max_iter, tol=tol, seed=seed, n_features=X.shape[1],
    )
    return _build_result(plans[0], None, site_out[name], base_out, params)


def probe_sweep(
    store: Any,
    targets: str | Sequence[str],
    *,
    sites: Sequence[str] | None = None,
    kind: Kind | Mapping[str, Kind] = "auto",
    cv: int = 5,
    split: Split = "auto",
    groups: str | None = None,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    C: float = 1.0,
    control: bool = True,
    baseline: Any = None,
    standardize: bool = True,
    dropna: bool = False,
    max_classes: int = 10,
    fit_direction: bool = True,
    max_iter: int = 1000,
    tol: float = 1e-5,
    seed: int = 0,
    progress: bool = True,
) -> ProbeSweepResult:
    """Probe every target column of ``store.obs`` at every site, with controls and baselines.

    Folds and control permutations depend only on the target (not on the site), so every site is
    scored on identical splits and the score-vs-layer curve compares like with like.

    Parameters
    ----------
    store
        An :class:`~sciscope.core.store.ActivationStore`.
    targets
        Column name(s) of ``store.obs``.
    sites
        Sites to probe, default all in store order (layer order).
    kind
        One kind for every target, or ``{target: kind}`` (missing targets use "auto").
    cv, split, alphas, C, control, standardize, dropna, max_classes, fit_direction, max_iter, tol, seed
        As in :func:`fit_probe`.
    groups
        An obs column whose values must not straddle folds (scaffold, donor, region, episode).
        When None and ``obs`` has an ``example`` column with several rows per example
        (positions not pooled), rows are grouped by ``example`` so that positions of one example
        never leak between training and test; ``params["split_note"]`` says so.
    baseline
        ``(n, b)`` array or ``{name: (n, b) array}`` of baseline features (fingerprints, bag of
        tokens), scored once per target through the same folds.
    progress
        Show a progress bar over sites.

    Returns
    -------
    ProbeSweepResult
    """
    obs: pd.DataFrame = store.obs
    target_list = [targets] if isinstance(targets, str) else list(targets)
    if not target_list:
        raise ProbeError("no targets given")
    for t in target_list:
        if t not in obs.columns:
            hint = close_matches(t, [str(c) for c in obs.columns])
            raise ProbeError(
                f"target column {t!r} is not in obs"
                + (f"; did you mean {hint}?" if hint else f"; obs has {list(obs.columns)}")
            )
    site_list = list(store.sites) if sites is None else list(sites)
    for s in site_list:
        store.dim(s)  # raises SiteError with close matches
    n = store.n_obs

    groups_arr, groups_name, note = None, "", None
    if groups is not None:
        if groups not in obs.columns:
            hint = close_matches(groups, [str(c) for c in obs.columns])
            raise ProbeError(
                f"groups column {groups!r} is not in obs" + (f"; did you mean {hint}?" if hint else "")
            )
        groups_arr, groups_name = obs[groups].to_numpy(), groups
    elif "example" in obs.columns and obs["example"].duplicated().any():
        if split in ("auto", "group"):
            groups_arr, groups_name = obs["example"].to_numpy(), "example"
            note = (
                "obs has several rows per 'example' (positions not pooled): folds are grouped by "
                "obs['example'] so positions of one example never sit on both sides of a split"
            )
        else:
            note = f"split={split!r} ignores obs['example'] although rows share examples: scores may leak"
            warnings.warn(note, stacklevel=2)
    if groups_arr is not None and pd.isna(groups_arr).any():
        raise ProbeError(f"groups column {groups_name!r} holds {int(pd.isna(groups_arr).sum())} missing values")

    kinds = {t: (kind.get(t, "auto") if isinstance(kind, Mapping) else kind) for t in target_list}
    base = _normalise_baseline(baseline, n)
    alphas_arr = _check_alphas(alphas)
    plans = _plan_targets(
        {t: obs[t] for t in target_list}, kinds=kinds, split=split, cv=cv, groups=groups_arr,
        groups_name=groups_name, control=control, dropna=dropna, max_classes=max_classes, seed=seed,
    )
    opts = dict(alphas=alphas_arr, C=C, standardize=standardize, max_iter=max_iter, tol=tol)
    base_out = {
        bname: _run_site(B, plans, with_control=False, fit_direction=False, **opts)  # type: ignore[arg-type]
        for bname, B in base.items()
    }
    params = _params(
        kind=dict(kinds), cv=cv, split=split, groups=groups_name or None, alphas=alphas_arr, C=C,
        control=control, baselines=list(base), standardize=standardize, dropna=dropna,
        max_classes=max_classes, max_iter=max_iter, tol=tol, seed=seed,
    )
    if note:
        params["split_note"] = note
    manifest = getattr(store, "manifest", {}) or {}
    params["store"] = {k: manifest[k] for k in ("model", "model_hash", "pooling", "path") if k in manifest}
    if getattr(store, "path", None):
        params["store"]["path"] = str(store.path)

    from tqdm.auto import tqdm

    results: dict[tuple[str, str], ProbeResult] = {}
    for site in tqdm(site_list, desc="probe sweep", disable=not progress, leave=False):
        X = store.array(site)
        _check_finite(X, f"site {site!r}")
        site_out = _run_site(X, plans, with_control=control, fit_direction=fit_direction, **opts)  # type: ignore[arg-type]
        for p in plans:
            r = _build_result(p, site, site_out[p.target.name], base_out, params)
            r.params["n_features"] = int(X.shape[1])
            results[(site, p.target.name)] = r
    sweep_params = dict(params, sites=site_list, targets=target_list)
    sweep_params["targets_info"] = {
        p.target.name: {"kind": p.target.kind, "split": p.split, "n_obs": int(p.target.rows.size), "n_dropped": p.target.n_dropped}
        for p in plans
    }
    return ProbeSweepResult(results, site_list, target_list, sweep_params)


def _check_alphas(alphas: Sequence[float]) -> np.ndarray:
    a = np.atleast_1d(np.asarray(alphas, dtype=np.float64))
    if a.size == 0 or not np.all(a > 0) or not np.isfinite(a).all():
        raise ProbeError(f"alphas must be positive finite numbers, got {list(a)}")
    return a


def _params(**kw: Any) -> dict[str, Any]:
    kw["alphas"] = [float(a) for a in kw["alphas"]]
    kw["method"] = "sciscope.core.probe (ridge: SVD + efficient LOO per fold; logistic: batched L-BFGS)"
    return kw
