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

**Cluster rule** (stated, not hand-picked): a neuron joins cluster C when at least
``min_share`` of its top-``k`` tokens fall in C; members are ranked by that share, then by their
mean lens score over C's tokens, and at most ``max_size`` are kept. Clusters span all layers.

**Controls**: random clusters with the same number of neurons in each layer (drawn from the
neurons outside the cluster, seeded), the unclamped policy (baseline), and prompt modifiers
(the same scenes with "quickly"/"slowly" in the instruction). The per-layer action-token share
is read beside the same lens on the untrained (initial) weights and beside the vocabulary share.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from sciscope.core.errors import ConfigError
from sciscope.core.lens import ffn_value_vectors, lens
from sciscope.core.steer import clamp

from .model import VLAPolicy

__all__ = [
    "CATEGORIES",
    "CLAMP_POSITIONS",
    "ClusterRule",
    "action_lens",
    "clamp_cluster",
    "clamp_sweep",
    "layer_summary",
    "neuron_categories",
    "random_cluster",
    "select_clusters",
]

CATEGORIES: tuple[str, ...] = ("fast", "slow", "right", "left", "up", "down")


def down_proj_path(layer: int) -> str:
    return f"llm.model.layers.{layer}.mlp.down_proj"


def neuron_site(layer: int) -> str:
    """The FFN neurons of a layer: the input of its down-projection."""
    return f"{down_proj_path(layer)}:input"


@dataclass(frozen=True)
class ClusterRule:
    """The stated rule that turns lens tables into clusters (see the module docstring)."""

    k: int = 10
    fast_threshold: float = 0.85
    slow_threshold: float = 0.5
    direction_threshold: float = 0.3
    min_share: float = 0.6
    max_size: int = 32

    def validate(self) -> None:
        if self.k < 1 or self.max_size < 1:
            raise ConfigError(f"robotics: lens_top_k and cluster_max_size must be >= 1, got {self.k}, {self.max_size}")
        if not 0 < self.min_share <= 1:
            raise ConfigError(f"robotics: cluster_min_share must lie in (0, 1], got {self.min_share}")
        if not 0 <= self.slow_threshold < self.fast_threshold <= 1:
            raise ConfigError(f"robotics: need 0 <= slow_threshold < fast_threshold <= 1, got "
                              f"{self.slow_threshold}, {self.fast_threshold}")
        if not 0 < self.direction_threshold <= 1:
            raise ConfigError(f"robotics: direction_threshold must lie in (0, 1], got {self.direction_threshold}")

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
        return pd.DataFrame({"token_id": token_info["token_id"], "action": act, **cats})


def action_lens(policy: VLAPolicy, *, k: int = 10, layers: Sequence[int] | None = None, final_norm: bool = True) -> pd.DataFrame:
    """Top-``k`` tokens of every FFN value vector of every layer.

    Returns the tidy table of :func:`sciscope.core.lens.lens` with ``layer`` and ``neuron``
    columns and each token's ``kind``, ``dim`` and ``value`` (action bins).
    """
    info = policy.vocab.token_info()
    W = policy.get_output_embeddings().weight.detach()  # (V, d)
    norm = policy.llm.model.norm if final_norm else None
    frames = []
    for layer in (range(policy.n_layers) if layers is None else layers):
        values = ffn_value_vectors(policy, down_proj_path(layer))  # (d_ff, d)
        t = lens(values, W, tokens=policy.vocab, k=k, norm=norm)
        t.insert(0, "layer", int(layer))
        t = t.rename(columns={"vector": "neuron"})
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
    # the direction its action tokens point: the most common (dimension, sign) among them
    ds = acts.assign(ds=acts["dim"].astype(str) + np.where(acts["value"] >= 0, "+", "-"))
    mode = ds.groupby(["layer", "neuron"])["ds"].agg(lambda s: s.value_counts().index[0])
    out["direction"] = mode.reindex(out.index).fillna("")
    out["top_tokens"] = g["token"].apply(lambda s: " ".join(s.iloc[:5]))
    return out.reset_index()


def select_clusters(neurons: pd.DataFrame, rule: ClusterRule, categories: Sequence[str] = CATEGORIES) -> dict[str, pd.DataFrame]:
    """Clusters by the stated rule.

    A neuron qualifies for category C when at least ``min_share`` of its top-k tokens are in C.
    Qualifying neurons are ranked by that share, then by their mean lens score over C's tokens.
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
        m = neurons[neurons[f"share_{c}"] >= rule.min_share]
        m = m.sort_values([f"share_{c}", f"score_{c}", "layer", "neuron"], ascending=[False, False, True, True],
                          kind="stable")
        if c in ("fast", "slow") and len(m):
            m = m.assign(_turn=m.groupby("direction", sort=False).cumcount())
            m = m.sort_values("_turn", kind="stable")  # stable: rank order within each turn
        cols = ["layer", "neuron", f"share_{c}", f"score_{c}", "direction", "top_tokens"]
        out[c] = m.head(rule.max_size)[cols].reset_index(drop=True)
    return out


def random_cluster(cluster: pd.DataFrame, n_neurons: Mapping[int, int], seed: int) -> pd.DataFrame:
    """Random neurons with the cluster's per-layer counts, none of them in the cluster (seeded)."""
    rng = np.random.default_rng([seed, 0xC1A5])
    rows = []
    for layer, grp in cluster.groupby("layer", sort=True):
        taken = set(grp["neuron"].astype(int))
        pool = np.array([j for j in range(n_neurons[int(layer)]) if j not in taken])
        pick = rng.choice(pool, size=min(len(grp), pool.size), replace=False)
        rows += [(int(layer), int(j)) for j in sorted(pick)]
    return pd.DataFrame(rows, columns=["layer", "neuron"])


def layer_summary(neurons: pd.DataFrame, init_neurons: pd.DataFrame | None, rule: ClusterRule, vocab_share: float) -> pd.DataFrame:
    """Per layer: share of neurons whose top tokens are mostly (>= ``min_share``) action tokens,
    mean action share of the top tokens, share of *coherent* neurons (meeting the cluster rule for
    at least one category: their top tokens mean one kind of motion) and the categories' counts;
    beside the same numbers on the untrained weights and the vocabulary's action share (what
    chance gives; with few words and many bins nearly every token is an action token, so the
    coherent share is the informative number)."""
    def per_layer(n: pd.DataFrame) -> pd.DataFrame:
        n = n.assign(coherent=(n[[f"share_{c}" for c in CATEGORIES]] >= rule.min_share).any(axis=1))
        g = n.groupby("layer")
        d = pd.DataFrame({
            "neurons": g.size(),
            "share_neurons_mostly_action": g["share_action"].apply(lambda s: float((s >= rule.min_share).mean())),
            "mean_action_share_top_k": g["share_action"].mean(),
            "share_neurons_coherent": g["coherent"].mean(),
        })
        for c in CATEGORIES:
            d[f"n_{c}"] = g[f"share_{c}"].apply(lambda s: int((s >= rule.min_share).sum()))
        return d

    out = per_layer(neurons)
    if init_neurons is not None:
        init = per_layer(init_neurons)
        out["share_neurons_mostly_action_untrained"] = init["share_neurons_mostly_action"]
        out["mean_action_share_top_k_untrained"] = init["mean_action_share_top_k"]
        out["share_neurons_coherent_untrained"] = init["share_neurons_coherent"]
        for c in CATEGORIES:
            out[f"n_{c}_untrained"] = init[f"n_{c}"]
    out["vocabulary_action_share"] = vocab_share
    return out.reset_index()


#: Where clamping acts: every position (the paper's setting) or only the position that emits the
#: next action token (the last one of each forward pass during decoding).
CLAMP_POSITIONS: dict[str, Any] = {"all": None, "action": -1}


@contextlib.contextmanager
def clamp_cluster(policy: VLAPolicy, cluster: pd.DataFrame, value: float, *, positions: str = "all") -> Iterator[None]:
    """Set every neuron of ``cluster`` (``layer``, ``neuron`` rows) to ``value``.

    ``positions``: ``"all"`` (every image patch and token, as Haon et al.) or ``"action"`` (the
    last position of each forward pass: the one whose logits give the next action token). One
    :func:`sciscope.core.clamp` hook per layer on the down-projection's input; all are gone when
    the block ends.
    """
    if positions not in CLAMP_POSITIONS:
        raise ConfigError(f"robotics: clamp positions must be one of {list(CLAMP_POSITIONS)}, got {positions!r}")
    pos = CLAMP_POSITIONS[positions]
    with contextlib.ExitStack() as stack:
        for layer, grp in cluster.groupby("layer", sort=True):
            stack.enter_context(clamp(policy, neuron_site(int(layer)), grp["neuron"].astype(int).tolist(), float(value),
                                      positions=pos))
        yield


def clamp_sweep(
    policy: VLAPolicy,
    clusters: Mapping[str, pd.DataFrame],
    alphas: Sequence[float],
    evaluate: Callable[[VLAPolicy], Mapping[str, float]],
    *,
    n_random: int = 2,
    seed: int = 0,
    positions: str = "all",
    progress: bool | None = True,
) -> pd.DataFrame:
    """Score ``evaluate(policy)`` with each cluster clamped to each alpha, beside random clusters.

    Returns a tidy table: ``cluster``, ``condition`` (``"cluster"`` or ``"random-<i>"``),
    ``alpha``, ``n_neurons``, ``metric``, ``value``. Empty clusters are skipped. The caller
    scores the unclamped baseline and prompt modifiers itself (no hooks there). ``positions`` as
    in :func:`clamp_cluster`.
    """
    from tqdm.auto import tqdm

    n_neurons = {i: int(policy.llm.model.layers[i].mlp.down_proj.in_features) for i in range(policy.n_layers)}
    jobs = []
    for name, cl in clusters.items():
        if cl.empty:
            continue
        conds = [("cluster", cl)] + [(f"random-{r}", random_cluster(cl, n_neurons, seed + 1000 * r + hash_name(name)))
                                     for r in range(n_random)]
        jobs += [(name, cond, c, float(a)) for cond, c in conds for a in alphas]
    rows = []
    for name, cond, cl, a in tqdm(jobs, desc="clamp sweep", disable=not progress):
        with clamp_cluster(policy, cl, a, positions=positions):
            res = evaluate(policy)
        for metric, value in res.items():
            rows.append({"cluster": name, "condition": cond, "alpha": a, "n_neurons": len(cl), "metric": metric,
                         "value": float(value)})
    return pd.DataFrame(rows, columns=["cluster", "condition", "alpha", "n_neurons", "metric", "value"])


def hash_name(name: str) -> int:
    """A stable small integer per cluster name (Python's ``hash`` is salted per process)."""
    return sum((i + 1) * ord(ch) for i, ch in enumerate(name)) % 997
