"""Action-token lens on FFN neurons, semantic clusters chosen by a rule, and clamping them.

Following Haon et al. (2025), each FFN neuron ``j`` of layer ``l`` is read through its *value
vector* (column ``j`` of ``down_proj``, what the neuron writes into the residual stream per unit
of activation) projected onto the token basis by the LM head. Here the final RMSNorm's gain is
applied first (the direct path from any layer's FFN to the logits runs through it; ranking is
unchanged by the norm's scalar division), and the top ``k = 10`` tokens are kept.

Every action token has a meaning (its dimension and bin value), so each neuron gets a share of
its top tokens per *action category*:

``fast``   action tokens of large displacement, ``|value| >= fast_threshold``
``slow``   action tokens of small displacement, ``|value| <= slow_threshold``
``right`` / ``left``   ``dx`` tokens with ``value >= +dir`` / ``<= -dir``
``up`` / ``down``      ``dy`` tokens with ``value >= +dir`` / ``<= -dir``

Each action token also has a *direction*: its dimension and the sign of its value, ``0`` when
``|value| < direction_threshold`` (``dx+``, ``dx0``, ``dx-``, ``dy+``, ``dy0``, ``dy-``). A
neuron's direction is the most common among its top-``k`` tokens and ``share_direction`` the
share of the top-``k`` in it.

**Cluster rule** (stated, not hand-picked): a neuron joins cluster C when at least
``min_share`` of its top-``k`` tokens fall in C *and* its promoted tokens agree in direction (at
least ``direction_share`` of the top-``k`` in one direction; for ``right``/``left``/``up``/``down``
that direction must be the one the cluster names). A neuron writing "dx = +1" on some tokens and
"dx = -1" on others is an extreme-bin neuron, not a speed or a direction neuron, and joins no
cluster. Members are ranked by their share of C, then by their mean lens score over C's tokens,
and at most ``max_size`` are kept. Clusters span all layers.

**Clamping** a cluster: :func:`cluster_clamp`. The per-layer action-token share is read beside the
same lens on the untrained (initial) weights and beside the vocabulary share.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from sciscope.core.errors import ConfigError
from sciscope.core.interventions import Clamp
from sciscope.core.lens import ffn_value_vectors, lens

from .model import VLAPolicy

__all__ = ["CATEGORIES", "CLAMP_POSITIONS", "ClusterRule", "CLUSTER_DIRECTION", "CLUSTER_METRIC", "action_lens", "cluster_clamp", "layer_summary",
           "neuron_categories", "select_clusters"]

CATEGORIES: tuple[str, ...] = ("fast", "slow", "right", "left", "up", "down")
#: The direction (dimension and sign) each direction cluster names.
CLUSTER_DIRECTION: dict[str, str] = {"right": "dx+", "left": "dx-", "up": "dy+", "down": "dy-"}
#: The rollout score each cluster is scored on: displacement for the speed clusters (up for fast,
#: down for slow), the displacement *in the direction the cluster names* for the others (so
#: "left" is scored on leftward motion, ``-dx``: a left cluster that moves the robot right scores
#: below zero).
CLUSTER_METRIC: dict[str, str] = {"fast": "displacement", "slow": "displacement", "right": "rightward", "left": "leftward",
                                  "up": "upward", "down": "downward"}


def down_proj_path(layer: int) -> str:
    return f"llm.model.layers.{layer}.mlp.down_proj"


@dataclass(frozen=True)
class ClusterRule:
    """The stated rule that turns lens tables into clusters (see the module docstring)."""

    k: int = 10
    fast_threshold: float = 0.85
    slow_threshold: float = 0.5
    direction_threshold: float = 0.3
    min_share: float = 0.6
    max_size: int = 32
    direction_share: float = 0.8

    def validate(self) -> None:
        """The checks across thresholds (each key's own range is in the adapter's config table)."""
        if not self.slow_threshold < self.fast_threshold:
            raise ConfigError(f"robotics: need slow_threshold < fast_threshold, got {self.slow_threshold}, {self.fast_threshold}")

    def token_categories(self, token_info: pd.DataFrame) -> pd.DataFrame:
        """Boolean column per category for every token (non-action tokens are in none)."""
        act = token_info["kind"].eq("action").to_numpy()
        v = token_info["value"].to_numpy(dtype=np.float64)
        dim = token_info["dim"].astype(str).to_numpy()
        with np.errstate(invalid="ignore"):
            cats = {
                "fast": act & (np.abs(v) >= self.fast_threshold),
                "slow": act & (np.abs(v) <= self.slow_threshold),
                "right": act & (dim == "dx") & (v >= self.direction_threshold),
                "left": act & (dim == "dx") & (v <= -self.direction_threshold),
                "up": act & (dim == "dy") & (v >= self.direction_threshold),
                "down": act & (dim == "dy") & (v <= -self.direction_threshold),
            }
        return pd.DataFrame({"token_id": token_info["token_id"], "action": act, **cats,
                             "direction": self.token_directions(token_info)})

    def token_directions(self, token_info: pd.DataFrame) -> np.ndarray:
        """Each token's direction: ``dx+``/``dx0``/``dx-``/``dy+``/... (``""`` for a non-action token)."""
        act = token_info["kind"].eq("action").to_numpy()
        v = np.nan_to_num(token_info["value"].to_numpy(dtype=np.float64))
        dim = token_info["dim"].astype(str).to_numpy()
        sign = np.where(v >= self.direction_threshold, "+", np.where(v <= -self.direction_threshold, "-", "0"))
        return np.where(act, np.char.add(dim.astype(str), sign.astype(str)), "")

    def eligible(self, neurons: pd.DataFrame, category: str) -> np.ndarray:
        """Boolean mask of the neurons that may join ``category`` by the rule (module docstring).

        ``neurons`` needs ``share_<category>``, ``share_direction`` and ``direction`` columns
        (:func:`neuron_categories`).
        """
        ok = (neurons[f"share_{category}"].to_numpy(dtype=np.float64) >= self.min_share) \
            & (neurons["share_direction"].to_numpy(dtype=np.float64) >= self.direction_share)
        if category in CLUSTER_DIRECTION:
            ok &= neurons["direction"].astype(str).to_numpy() == CLUSTER_DIRECTION[category]
        return ok


def action_lens(policy: VLAPolicy, *, k: int = 10, layers: Sequence[int] | None = None) -> pd.DataFrame:
    """Top-``k`` tokens of every FFN value vector of every layer, through the final norm and the LM head.

    Returns the tidy table of :func:`sciscope.core.lens.lens` with ``layer`` and ``neuron``
    columns and each token's ``kind``, ``dim`` and ``value`` (action bins).
    """
    info = policy.vocab.token_info()
    W = policy.get_output_embeddings().weight.detach()  # (V, d)
    frames = []
    for layer in (range(policy.n_layers) if layers is None else layers):
        values = ffn_value_vectors(policy, down_proj_path(layer))  # (d_ff, d)
        t = lens(values, W, tokens=policy.vocab, k=k, norm=policy.llm.model.norm).rename(columns={"vector": "neuron"})
        t.insert(0, "layer", int(layer))
        frames.append(t)
    out = pd.concat(frames, ignore_index=True)
    return out.merge(info[["token_id", "kind", "dim", "value"]], on="token_id", how="left")


def neuron_categories(table: pd.DataFrame, rule: ClusterRule, token_info: pd.DataFrame) -> pd.DataFrame:
    """One row per neuron: share of its top tokens that are action tokens and per category.

    Also ``mean_abs_value`` (mean |bin value| of its action tokens), ``top_tokens`` (the first 5)
    and ``score_<category>`` (mean lens score over its top tokens in that category).
    """
    cats = rule.token_categories(token_info)
    t = table.merge(cats, on="token_id", how="left")
    g = t.groupby(["layer", "neuron"], sort=True)
    k = g.size()
    out = pd.DataFrame({"n_top": k})
    out["share_action"] = g["action"].sum() / k
    for c in CATEGORIES:
        out[f"share_{c}"] = g[c].sum() / k
        sc = t[t[c]].groupby(["layer", "neuron"])["score"].mean()
        out[f"score_{c}"] = sc.reindex(out.index)
    acts = t[t["action"]]
    absval = acts.assign(av=lambda d: d["value"].abs()).groupby(["layer", "neuron"])["av"].mean()
    out["mean_abs_value"] = absval.reindex(out.index)
    # the direction its action tokens point: the most common (dimension, sign) among them, and
    # the share of the top-k tokens in it (ties: the first in sorted order, so it is deterministic)
    counts = acts.groupby(["layer", "neuron", "direction"]).size().rename("n").reset_index()
    counts = counts.sort_values(["layer", "neuron", "n", "direction"], ascending=[True, True, False, True], kind="stable")
    mode = counts.drop_duplicates(["layer", "neuron"]).set_index(["layer", "neuron"])
    out["direction"] = mode["direction"].reindex(out.index).fillna("")
    out["share_direction"] = (mode["n"].reindex(out.index).fillna(0) / k).astype(np.float64)
    out["top_tokens"] = g["token"].apply(lambda s: " ".join(s.iloc[:5]))
    return out.reset_index()


def select_clusters(neurons: pd.DataFrame, rule: ClusterRule, categories: Sequence[str] = CATEGORIES) -> dict[str, pd.DataFrame]:
    """Clusters by the stated rule (see the module docstring and :meth:`ClusterRule.eligible`).

    The speed clusters (``fast``, ``slow``) take them round-robin over the four directions
    (``dx+``, ``dx-``, ``dy+``, ``dy-``) their tokens point, so that the cluster says "faster",
    not "faster downward" (each neuron's top tokens are neighbouring bins of one dimension and
    sign); the policy's own preference then picks the sign. At most ``max_size`` neurons. Empty
    clusters are kept (as empty frames) so a report can say so.
    """
    out = {}
    for c in categories:
        if c not in CATEGORIES:
            raise ConfigError(f"robotics: unknown cluster {c!r}; choose from {list(CATEGORIES)}")
        m = neurons[rule.eligible(neurons, c)]
        m = m.sort_values([f"share_{c}", f"score_{c}", "layer", "neuron"], ascending=[False, False, True, True],
                          kind="stable")
        if c in ("fast", "slow") and len(m):
            m = m.assign(_turn=m.groupby("direction", sort=False).cumcount())
            m = m.sort_values("_turn", kind="stable")  # stable: rank order within each turn
        cols = ["layer", "neuron", f"share_{c}", f"score_{c}", "direction", "share_direction", "top_tokens"]
        out[c] = m.head(rule.max_size)[cols].reset_index(drop=True)
    return out


def layer_summary(neurons: pd.DataFrame, init_neurons: pd.DataFrame | None, rule: ClusterRule, vocab_share: float) -> pd.DataFrame:
    """Per layer: share of neurons whose top tokens are mostly (>= ``min_share``) action tokens,
    mean action share of the top tokens, share of *coherent* neurons (meeting the cluster rule for
    at least one category: their top tokens mean one kind of motion, in one direction) and the
    categories' counts (neurons the rule lets join each);
    beside the same numbers on the untrained weights and the vocabulary's action share (what
    chance gives; with few words and many bins nearly every token is an action token, so the
    coherent share is the informative number)."""
    def per_layer(n: pd.DataFrame) -> pd.DataFrame:
        elig = {c: rule.eligible(n, c) for c in CATEGORIES}
        n = n.assign(coherent=np.any(list(elig.values()), axis=0), **{f"_ok_{c}": v for c, v in elig.items()})
        g = n.groupby("layer")
        d = pd.DataFrame({
            "neurons": g.size(),
            "share_neurons_mostly_action": g["share_action"].apply(lambda s: float((s >= rule.min_share).mean())),
            "mean_action_share_top_k": g["share_action"].mean(),
            "share_neurons_coherent": g["coherent"].mean(),
        })
        for c in CATEGORIES:
            d[f"n_{c}"] = g[f"_ok_{c}"].sum().astype(int)
        return d

    out = per_layer(neurons)
    if init_neurons is not None:
        out = out.join(per_layer(init_neurons).drop(columns="neurons").add_suffix("_untrained"))
    out["vocabulary_action_share"] = vocab_share
    return out.reset_index()


#: Where clamping acts: every position (the paper's setting) or only the position that emits the
#: next action token (the last one of each forward pass during decoding).
CLAMP_POSITIONS: dict[str, int | None] = {"all": None, "action": -1}


def cluster_clamp(cluster: pd.DataFrame, *, positions: str = "all") -> Clamp:
    """A core :class:`Clamp` of a cluster's neurons (``layer``, ``neuron`` rows).

    One site per layer, the down-projection's input; ``positions``: ``"all"`` (every image patch
    and token, as Haon et al.) or ``"action"`` (the last position of each forward pass: the one
    whose logits give the next action token). Its random controls draw as many neurons per layer.
    """
    if positions not in CLAMP_POSITIONS:
        raise ConfigError(f"robotics: clamp positions must be one of {list(CLAMP_POSITIONS)}, got {positions!r}")
    units = {f"{down_proj_path(int(layer))}:input": g["neuron"].astype(int).tolist()
             for layer, g in cluster.groupby("layer", sort=True)}
    return Clamp(units, positions=CLAMP_POSITIONS[positions])
