"""Checks every domain's counterfactual pairs must pass (shared by the domain test files)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from sciscope.core.interventions import tile_copies
from sciscope.core.tracing import CounterfactualPairs


def _tensors(x: Any) -> dict[str, torch.Tensor]:
    """The tensors of a model input (a dict of keyword arguments, a tuple or one tensor), by name."""
    if isinstance(x, torch.Tensor):
        return {"": x}
    if isinstance(x, Mapping):
        return {str(k): v for k, v in x.items() if isinstance(v, torch.Tensor)}
    return {str(i): v for i, v in enumerate(x) if isinstance(v, torch.Tensor)}


def _run(model: torch.nn.Module, inputs: Any) -> Any:
    with torch.no_grad():
        if isinstance(inputs, Mapping):
            return model(**inputs)
        return model(*inputs) if isinstance(inputs, (tuple, list)) else model(inputs)


def check_pairs(model: torch.nn.Module, pairs: CounterfactualPairs, n_positions: int) -> dict[str, Any]:
    """Assert the pairs are well formed and the model tells clean from corrupted; returns what it measured.

    * clean and corrupted have the same keys and shapes (and the same batch size ``B``);
    * every position group is non-empty and inside ``n_positions`` (the residual stream's length);
    * the readout has ``B`` rows and reads copy-major stacks of the batch (``tile_copies``) as the batch;
    * the total effect is not zero: the domain score (or, without one, the readout) differs between
      clean and corrupted on average.

    Returns ``{"B", "readout_clean", "readout_corrupted", "score_clean", "score_corrupted"}`` (scores
    None without a domain score).
    """
    a, b = _tensors(pairs.clean), _tensors(pairs.corrupted)
    assert a.keys() == b.keys() and a, (a.keys(), b.keys())
    for k in a:
        assert a[k].shape == b[k].shape and a[k].dtype == b[k].dtype, (k, a[k].shape, b[k].shape)
    B = len(next(iter(a.values())))
    assert all(len(v) == B for v in a.values())
    assert pairs.concept and pairs.score_name
    for name, g in pairs.position_groups.items():
        if isinstance(g, torch.Tensor):
            assert g.dtype == torch.bool and tuple(g.shape) == (B, n_positions) and g.any(), (name, g.shape)
        elif isinstance(g, slice):
            assert len(range(n_positions)[g]) > 0, name
        else:
            g = list(g)
            assert g and all(-n_positions <= int(p) < n_positions for p in g), (name, g)
    model.eval()
    ra, rb = pairs.readout(_run(model, pairs.clean)), pairs.readout(_run(model, pairs.corrupted))
    assert ra.shape == rb.shape and ra.shape[0] == B, (ra.shape, rb.shape)
    assert torch.isfinite(ra).all() and torch.isfinite(rb).all()
    stacked = pairs.readout(_run(model, tile_copies(pairs.clean, 2)))
    torch.testing.assert_close(stacked, torch.cat([ra, ra]), atol=1e-4, rtol=1e-4)
    sa = sb = None
    if pairs.score is not None:
        sa, sb = pairs.score(ra), pairs.score(rb)
        assert sa.shape == sb.shape == (B,)
        assert abs(float(sa.mean() - sb.mean())) > 1e-6, (sa.mean(), sb.mean())
    else:
        assert float((ra - rb).flatten(1).norm(dim=1).mean()) > 1e-6
    return {"B": B, "readout_clean": ra, "readout_corrupted": rb, "score_clean": sa, "score_corrupted": sb}


def differing_positions(pairs: CounterfactualPairs, key: str = "input_ids") -> torch.Tensor:
    """``(B,)`` count of the positions where the clean and corrupted ``key`` ``(B, P)`` differ, per pair."""
    return (_tensors(pairs.clean)[key] != _tensors(pairs.corrupted)[key]).sum(1)
