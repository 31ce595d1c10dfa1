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
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from sciscope.core.capture import pooled_activations
from sciscope.core.fidelity import TaskLoss, TokenPredictionTask
from sciscope.core.loading import is_causal

if TYPE_CHECKING:
    from sciscope.core.context import RunContext

    from .adapter import GeospatialAdapter

__all__ = ["TASK_MAX_PROMPTS_CAUSAL", "probe_task", "task_loss", "tokenise", "unit_sphere"]

#: Prompts of a causal LM's next-token task, at most (its log-probabilities are prompts x tokens x vocabulary).
TASK_MAX_PROMPTS_CAUSAL = 128


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


def _task_places(adapter: "GeospatialAdapter", split: str, cap: int, salt: int) -> pd.DataFrame:
    """The places of ``split``, a seeded subset of at most ``cap`` (in obs order)."""
    obs = adapter.places[adapter.places["split"] == split]
    if len(obs) > cap:
        obs = obs.iloc[np.sort(np.random.default_rng([adapter.config["seed"], salt]).choice(len(obs), cap, replace=False))]
    return obs.reset_index(drop=True)

def task_loss(adapter: "GeospatialAdapter", ctx: "RunContext") -> TaskLoss:
    """The model's own task on held-out places (test-split spatial blocks, at most ``steer_max_eval``).

    Sentence encoder (the default): where is the place? A ridge fixed on the *clean* model's
    sentence embeddings (mean-pooled last layer) of training places (at most 2 x
    ``steer_max_eval``) maps them to unit-sphere x/y/z; the loss is its squared chord error on the
    held-out places, embedded by the (possibly spliced) model. No ``log_probs``: an encoder has no
    output distribution. Causal LM (config ``model``): next-token cross-entropy on the held-out
    prompts (at most ``TASK_MAX_PROMPTS_CAUSAL``), with ``log_probs`` over the vocabulary.
    Held out: the ridge is fitted here, and the pretrained models never saw these prompts.
    """
    model, c = ctx.model(), adapter.config
    tok, ml, cap = adapter._tokenizer(), c["max_length"], c["steer_max_eval"]
    if is_causal(model.config):
        obs = _task_places(adapter, "test", min(cap, TASK_MAX_PROMPTS_CAUSAL), 0x7A5)
        return TokenPredictionTask.next_token(tokenise(tok, obs["prompt"].tolist(), 32, ml),
                                              name=f"next-token cross-entropy of {len(obs)} held-out prompts").task_loss()
    site = f"layer.{adapter.n_layers - 1}"

    def build() -> tuple[Any, dict[str, Any]]:
        train, test = _task_places(adapter, "train", 2 * cap, 0x7A6), _task_places(adapter, "test", cap, 0x7A5)
        batches = [list(tokenise(tok, o["prompt"].tolist(), 64, ml)) for o in (train, test)]
        return probe_task(model, batches[0], train, batches[1], test, site, aliases=adapter.aliases)

    loss, info = ctx.cached("geospatial-task-probe", [c, site], build)
    return TaskLoss(loss, f"squared chord error (unit sphere) of a ridge read-out of the sentence embedding, "
                          f"{info['n_eval']} held-out places (fixed on {info['n_train']} training places; "
                          f"no-skill {info['no_skill']:.3g})")
