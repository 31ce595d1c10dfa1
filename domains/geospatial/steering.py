"""North-south steering of the geospatial adapter: the latitude read-out and the steering scorer.

The steering stage injects the north-minus-south difference of means at the adapter's
``steer_site``; what moves is read by ridge probes of latitude and longitude at a later layer
(``readout_site``), fitted on unsteered training places, applied to held-out places.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import numpy as np
from torch import nn

from sciscope.core.capture import pooled_activations
from sciscope.core.experiment import Scorer

from .task import tokenise

if TYPE_CHECKING:
    from sciscope.core.context import RunContext

    from .adapter import GeospatialAdapter

__all__ = ["north_south_scorer", "readout"]


def _layer(site: str) -> int:
    return int(site.split(".")[1])


def readout(adapter: "GeospatialAdapter", ctx: "RunContext") -> dict[str, Any]:
    """Ridge probes of lat and lon on the store's activations at :attr:`~.GeospatialAdapter.readout_site`.

    Fitted on the train-split places (unsteered; spatial-block CV picks the ridge penalty).
    Returns ``{"lat": probe, "lon": probe, "test": rows, "reference": {...}}``: ``test`` the
    held-out (test-split) rows the scorer reads (a seeded subset of ``steer_max_eval``), and
    the plan's reference: the unsteered read-out of the northern and southern ones among them
    (how far north a real northern place reads, against which the steered shift is measured).
    """
    from sciscope.core.probe import fit_probe

    def build() -> dict[str, Any]:
        store = ctx.store()
        obs, X = store.obs, np.asarray(store.array(adapter.readout_site), dtype=np.float64)
        train, test = (np.flatnonzero((obs["split"] == s).to_numpy()) for s in ("train", "test"))
        cap = adapter.config["steer_max_eval"]
        if test.size > cap:  # a seeded, spread-out subset keeps each evaluation cheap
            test = np.sort(np.random.default_rng([adapter.config["seed"], 0x57E]).choice(test, cap, replace=False))
        blocks = obs["block"].to_numpy()[train]
        n_groups = np.unique(blocks).size
        kw = dict(cv=min(5, n_groups), split="group", groups=blocks) if n_groups >= 2 else dict(cv=2, split="kfold")
        probes = {t: fit_probe(X[train], obs[t].to_numpy(dtype=np.float64)[train], kind="ridge", control=False,
                               fit_direction=True, seed=adapter.config["seed"], name=t, **kw) for t in ("lat", "lon")}
        groups = {f"held-out {side}ern places": obs[side].to_numpy()[test] for side in ("north", "south")}
        reference = {label: {f"predicted_{t}": float(p.predict(X[test[rows]]).mean()) for t, p in probes.items()}
                     for label, rows in groups.items() if rows.any()}
        return {"test": test, "reference": reference, **probes}

    return ctx.cached("geospatial-readout", [adapter.readout_site, adapter.config, str(ctx.store().path)], build)

def north_south_scorer(adapter: "GeospatialAdapter", ctx: "RunContext") -> Scorer:
    """Probe-predicted latitude (target) and longitude (off target) of held-out places.

    The scorer runs the model on the held-out places of :func:`readout` -- under whatever
    steering the steering stage applies around it -- pools :attr:`~.GeospatialAdapter.readout_site` as the store
    does, and returns per-place arrays: ``predicted_lat`` and ``predicted_lat_south`` (the
    southern third among them) to move, ``predicted_lon`` to leave alone. Reading a later layer
    checks that downstream computation picks up the injected direction.
    """
    readout, aliases = adapter.readout_site, adapter.aliases
    if _layer(adapter.steer_site) > _layer(readout):
        warnings.warn(f"geospatial: steering site {adapter.steer_site!r} is after the read-out layer {readout!r}; "
                      "the injected vector cannot reach the probe", stacklevel=2)
    probes = adapter.readout(ctx)
    obs = ctx.store().obs.iloc[probes["test"]]
    batches = list(tokenise(adapter._tokenizer(), obs["prompt"].tolist(), 64, adapter.config["max_length"]))
    south = obs["south"].to_numpy(dtype=bool)
    pooling = adapter.pooling

    def read(X: np.ndarray) -> dict[str, np.ndarray]:
        lat = probes["lat"].predict(X)
        return {"predicted_lat": lat, **({"predicted_lat_south": lat[south]} if south.any() else {}),
                "predicted_lon": probes["lon"].predict(X)}

    def score(model: nn.Module) -> dict[str, np.ndarray]:
        return read(pooled_activations(model, batches, readout, aliases=aliases, pooling=pooling))

    def score_copies(model: nn.Module, n: int) -> list[dict[str, np.ndarray]]:
        return [read(X) for X in pooled_activations(model, batches, readout, aliases=aliases, pooling=pooling, copies=n)]

    targets = ["predicted_lat", "predicted_lat_south"] if south.any() else ["predicted_lat"]
    return Scorer(score, target=targets, off_target=["predicted_lon"], batched=score_copies)
