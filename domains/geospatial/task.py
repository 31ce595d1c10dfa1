"""The model's own task on place names, for the core's fidelity analysis (splice a reconstruction in).

A sentence encoder (the default all-MiniLM-L6-v2) has no output head: its task is the embedding,
and what the embedding is used for here is *where is the place*. :func:`probe_task` fixes a ridge
read-out from the clean model's pooled sentence embeddings (mean over tokens of the last layer, as
sentence-transformers pools) to the place's position on the unit sphere (x, y, z), fitted on
training places; the task loss is that fixed ridge's squared error on held-out places, with the
embeddings computed by the (possibly spliced) model. A causal LM has a task of its own:
:meth:`sciscope.core.fidelity.TokenPredictionTask.next_token`, next-token cross-entropy on the prompts, with its output distribution.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from sciscope.core.capture import pooled_activations

__all__ = ["probe_task", "tokenise", "unit_sphere"]


def unit_sphere(lat: Any, lon: Any) -> np.ndarray:
    """``(n, 3)`` positions on the unit sphere of latitudes/longitudes in degrees (no seam at +-180)."""
    la, lo = np.radians(np.asarray(lat, dtype=np.float64)), np.radians(np.asarray(lon, dtype=np.float64))
    return np.stack([np.cos(la) * np.cos(lo), np.cos(la) * np.sin(lo), np.sin(la)], axis=1)


def probe_task(
    model: nn.Module, train_batches: Sequence[Any], train_obs: pd.DataFrame, eval_batches: Sequence[Any],
    eval_obs: pd.DataFrame, site: str, *, aliases: dict[str, str] | None = None,
) -> tuple[Callable[[nn.Module], float], dict[str, Any]]:
    """``(loss(model), info)``: the squared chord error of a ridge read-out fixed on the clean model.

    The ridge (penalty by leave-one-out over ``10^-4 .. 10^4``) maps ``site``'s mean-pooled
    activations of the training places to their unit-sphere position; ``loss(model)`` is the mean
    over the held-out places of ``|pred - true|^2`` (squared chord length on the unit sphere: 0 is
    exact, 2 is a right angle, the spread of the places around their centroid is the no-skill
    level). ``info``: the clean loss, the no-skill loss, the chosen penalty.
    """
    from sklearn.linear_model import RidgeCV

    X = pooled_activations(model, train_batches, site, aliases=aliases)
    y = unit_sphere(train_obs["lat"], train_obs["lon"])
    ridge = RidgeCV(alphas=np.logspace(-4, 4, 17)).fit(X, y)
    truth = unit_sphere(eval_obs["lat"], eval_obs["lon"])

    def loss(m: nn.Module) -> float:
        was = m.training
        m.eval()
        try:
            pred = ridge.predict(pooled_activations(m, eval_batches, site, aliases=aliases))
        finally:
            m.train(was)
        return float(((pred - truth) ** 2).sum(1).mean())

    no_skill = float(((y.mean(0) - truth) ** 2).sum(1).mean())
    return loss, {"alpha": float(ridge.alpha_), "no_skill": no_skill, "n_train": len(X), "n_eval": len(truth)}


def tokenise(tok: Any, prompts: list[str], batch_size: int, max_length: int) -> Iterator[dict[str, torch.Tensor]]:
    """``prompts`` tokenised in batches, padded per batch: ``input_ids``, ``attention_mask`` (+ ``token_type_ids``)."""
    for i in range(0, len(prompts), batch_size):
        enc = tok(prompts[i : i + batch_size], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        yield {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
