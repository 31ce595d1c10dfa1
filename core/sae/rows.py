"""The rows an SAE learns from: one per position (token, atom, gene, patch, time step), with the
special and outlier positions set aside, and the example-level codes pooled back from them.

The field trains SAEs on per-position activations and splices them back per position, and that is
what the fidelity analysis does too. An SAE trained on mean-pooled rows sees one vector per
example -- a few hundred rows it memorises in a few hundred epochs -- and is then spliced into
positions it never saw. Worse, a trained causal LM's first position (the attention sink) has a norm
tens of times that of any other; in mean-pooled rows it carries one direction that explains almost
all the variance, and most latents die. So:

- :func:`keep_positions` applies the adapter's position rule (a causal LM's first position, a
  ``<cls>``: the same constant vector in every example, see ``DomainAdapter.fidelity_positions``);
- :func:`outlier_rows` finds positions whose norm is more than ``factor`` times the median norm
  (massive activations of whatever token carries them);
- :func:`select_sae_rows` applies both and reports what it left out; :func:`subsample_rows` keeps
  a row budget;
- :func:`pooled_codes` gives each example the mean of its kept positions' SAE codes, the
  example-level features that concepts are tested against.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..capture import keep_positions
from ..errors import ConfigError

if TYPE_CHECKING:
    from ..store import ActivationStore

#: the obs column that ties a position row to its example (row index of the examples' obs)
EXAMPLE_ROW = "example_row"


def row_norms(store: "ActivationStore", site: str, *, chunk: int = 65536) -> np.ndarray:
    """``(N,)`` L2 norm of every row of ``site``, read in chunks (the store may be memory-mapped)."""
    out = np.empty(store.n_obs, dtype=np.float64)
    for start in range(0, store.n_obs, chunk):
        block = np.asarray(store.array(site, slice(start, start + chunk)), dtype=np.float64)
        out[start:start + len(block)] = np.linalg.norm(block, axis=1)
    return out


def outlier_rows(norms: np.ndarray, factor: float, candidates: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """Rows whose norm exceeds ``factor`` times the median norm of ``candidates`` (default all).

    Returns ``(mask, threshold)``; ``factor`` 0 marks none (threshold inf).
    """
    if factor <= 0 or norms.size == 0:
        return np.zeros(norms.shape, bool), float("inf")
    base = norms if candidates is None or not candidates.any() else norms[candidates]
    threshold = float(factor * np.median(base))
    return norms > threshold, threshold


def select_sae_rows(store: "ActivationStore", site: str, *, positions: Any = None,
                    outlier_factor: float = 10.0) -> tuple[np.ndarray, dict[str, Any]]:
    """The rows of a per-position store an SAE trains and is evaluated on, and what was left out.

    Parameters
    ----------
    store
        Per-position rows (``pooling="none"``): obs has a ``position`` column.
    site
        The SAE's site.
    positions
        The adapter's position rule (see :func:`keep_positions`).
    outlier_factor
        Rows with a norm above this many times the median norm of the rule's rows are left out
        (0: none).

    Returns
    -------
    (numpy.ndarray, dict)
        The kept row indices (sorted) and a report: ``positions`` (rows offered), ``kept``,
        ``excluded_by_position_rule``, ``excluded_outlier_norm``, ``outlier_threshold``,
        ``median_norm``, ``excluded_positions`` (position -> rows left out, most frequent first).
    """
    obs = store.obs
    if "position" not in obs.columns:
        raise ConfigError("per-position SAE rows need a store captured with pooling='none' (a 'position' column)")
    position = obs["position"].to_numpy()
    by_rule = keep_positions(position, positions)
    norms = row_norms(store, site)
    outlier, threshold = outlier_rows(norms, outlier_factor, by_rule)
    keep = by_rule & ~outlier
    left_out = position[~keep]
    values, counts = np.unique(left_out, return_counts=True)
    order = np.argsort(-counts, kind="stable")[:20]
    report: dict[str, Any] = {
        "positions": int(len(position)), "excluded_by_position_rule": int((~by_rule).sum()),
        "excluded_outlier_norm": int((outlier & by_rule).sum()), "outlier_factor": float(outlier_factor),
        "outlier_threshold": threshold, "median_norm": float(np.median(norms[by_rule])) if by_rule.any() else float("nan"),
        "max_norm_excluded": float(norms[~keep].max()) if (~keep).any() else None,
        "excluded_positions": {int(values[i]): int(counts[i]) for i in order},
    }
    kept = np.flatnonzero(keep)
    report["kept"] = int(len(kept))
    return kept, report


def subsample_rows(obs: "Any", rows: np.ndarray, max_rows: int | None, *, seed: int = 0) -> np.ndarray:
    """At most ``max_rows`` of ``rows`` (sorted): whole examples in a seeded order while an
    ``example_row`` column exists (held-out examples stay whole), else a seeded subset of rows."""
    if max_rows is None or len(rows) <= max_rows:
        return rows
    rng = np.random.default_rng([int(seed), 0x5AE])
    if EXAMPLE_ROW not in obs.columns:
        return np.sort(rng.choice(rows, size=max_rows, replace=False))
    ex = obs[EXAMPLE_ROW].to_numpy()[rows]
    order = rng.permutation(np.unique(ex))
    sizes = np.bincount(ex, minlength=int(ex.max()) + 1)[order]
    chosen = order[: max(1, int(np.searchsorted(np.cumsum(sizes), max_rows, side="right")))]
    return rows[np.isin(ex, chosen)]


@torch.no_grad()
def pooled_codes(sae: Any, store: "ActivationStore", site: str, rows: np.ndarray, n_examples: int, *,
                 chunk: int = 8192) -> np.ndarray:
    """``(n_examples, d_sae)`` mean SAE code of each example's kept position rows.

    Parameters
    ----------
    sae
        Any SAE with ``encode``.
    store
        Per-position rows with an ``example_row`` obs column.
    rows
        The row indices to pool (the kept positions of every example, not a training subset).
    n_examples
        Examples in the run; an example with no kept position gets a zero row.
    """
    ex = store.obs[EXAMPLE_ROW].to_numpy()
    total = np.zeros((n_examples, int(sae.cfg.d_sae)), dtype=np.float64)
    count = np.bincount(ex[rows], minlength=n_examples).astype(np.float64)
    for start in range(0, len(rows), chunk):
        idx = rows[start:start + chunk]
        codes = sae.encode(torch.as_tensor(np.asarray(store.array(site, idx)), dtype=torch.float32)).double().numpy()
        np.add.at(total, ex[idx], codes)
    return (total / np.maximum(count, 1.0)[:, None]).astype(np.float32)


__all__ = ["EXAMPLE_ROW", "keep_positions", "outlier_rows", "pooled_codes", "row_norms", "select_sae_rows", "subsample_rows"]
