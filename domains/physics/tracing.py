"""Counterfactual pairs for causal tracing: a window of one regime and a window of the other, frame for frame.

Clean is a context window of the second regime of ``trace_system`` (spots for Gray-Scott, laminar
for the flow), corrupted a window of the first (stripes, vortex-rich) at the same time index ``t``,
so every frame slot and every patch is the same place in both. Windows come from pairs of
trajectories (held-out ones first) and, where the run has them, from times at or after
``rollout_start`` (patterns have formed by then). The readout is the model's output itself, the
predicted change of every pixel of the next frame ``(B, 2, n, n)`` (the next frame is the last
context frame plus it; the last frame is an input, which no activation patch could restore). No
domain score: the core projects the readout on the clean-minus-corrupted change.

Position groups follow the block outputs' layout ``(B, 1 + P * T, D)``: the class token, then
patch-major, frame-minor tokens (token ``1 + p * T + t`` is patch ``p`` of context frame ``t``).

The divided space-time blocks write into the residual stream in two other layouts
(:func:`to_canonical`, :func:`from_canonical`): the spatial attention's output
(``attention.output.dense``) is frame-major ``(B * T, 1 + P, D)`` with one class-token row per frame,
whose mean over the frames is what the block adds; the temporal attention's (``temporal_dense``) is
``(B, P * T, D)``, patches only (it adds nothing to the class token).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from sciscope.core.config import Key
from sciscope.core.errors import ConfigError, ShapeError

from .data import REGIMES

if TYPE_CHECKING:
    from sciscope.core.context import RunContext
    from sciscope.core.tracing import CounterfactualPairs

    from .adapter import PhysicsAdapter

__all__ = ["CONFIG_KEYS", "check_config", "component_layouts", "from_canonical", "position_groups", "to_canonical", "tracing_pairs",
           "window_pairs"]

#: Config keys of the tracing analysis (it runs after the probes stage).
CONFIG_KEYS: dict[str, Key] = {
    "trace_pairs": Key(32, "probes", min=1, help="clean/corrupted window pairs traced (fewer when fewer exist)"),
    "trace_system": Key("", "probes", choices=("", *REGIMES), help="system whose two regimes the pairs contrast "
                                                                   "('' = the first of 'systems')"),
}


def check_config(config: dict[str, Any]) -> None:
    """``trace_system`` is one of the run's ``systems``; a :class:`ConfigError` naming the key otherwise."""
    s = config["trace_system"]
    if s and s not in config["systems"]:
        raise ConfigError(f"physics: config 'trace_system' = {s!r} is not simulated in this run; 'systems' is "
                          f"{list(config['systems'])}")


def trace_system(config: dict[str, Any]) -> str:
    """The system the pairs contrast (``trace_system``, default the first of ``systems``)."""
    return config["trace_system"] or config["systems"][0]


def window_pairs(ad: "PhysicsAdapter", n: int) -> list[tuple[int, int, int]]:
    """Up to ``n`` ``(clean trajectory, corrupted trajectory, t)``: the k-th trajectory of the clean regime with
    the k-th of the corrupted one (each in a seeded order, test-split ones first), at shared window times."""
    c, obs = ad.config, ad.windows
    system = trace_system(c)
    corrupt_regime, clean_regime = REGIMES[system]
    rng = np.random.default_rng([c["seed"], 0x7ACE])
    table = obs.drop_duplicates("trajectory")

    def order(regime: str) -> np.ndarray:
        rows = table[(table["system"] == system) & (table["regime"] == regime)]
        rows = rows.iloc[rng.permutation(len(rows))]
        return rows.iloc[np.argsort(rows["split"].to_numpy() != "test", kind="stable")]["trajectory"].to_numpy()

    times = np.sort(obs["t"].unique())
    formed = times[times >= c["rollout_start"] + c["context_frames"] - 1]
    times = formed if len(formed) else times
    test = set(table.loc[table["split"] == "test", "trajectory"])
    candidates = [(int(a), int(b), int(t)) for a, b in zip(order(clean_regime), order(corrupt_regime)) for t in times]
    candidates = [candidates[i] for i in rng.permutation(len(candidates))]
    candidates.sort(key=lambda x: not (x[0] in test and x[1] in test))  # stable: held-out pairs first
    return candidates[:n]


def position_groups(n_patches: int, n_frames: int) -> dict[str, list[int]]:
    """Named positions of the ``(B, 1 + P * T, D)`` block outputs: the class token, the last frame's patches
    (what the head reads), the earlier frames' patches."""
    token = lambda p, t: 1 + p * n_frames + t  # noqa: E731  patch-major, frame-minor
    groups = {"class token": [0], "last frame's patches": [token(p, n_frames - 1) for p in range(n_patches)]}
    if n_frames > 1:
        groups["earlier frames' patches"] = [token(p, t) for p in range(n_patches) for t in range(n_frames - 1)]
    return groups


def tracing_pairs(ad: "PhysicsAdapter", ctx: "RunContext") -> "CounterfactualPairs | None":
    """Windows of the two regimes of ``trace_system`` at the same times (module docstring). None when the run
    has no trajectory of one of the regimes."""
    from sciscope.core.tracing import CounterfactualPairs

    pairs = window_pairs(ad, int(ad.config["trace_pairs"]))
    if not pairs:
        return None
    clean = torch.cat(list(ad._contexts([(a, t) for a, _, t in pairs], len(pairs))))
    corrupt = torch.cat(list(ad._contexts([(b, t) for _, b, t in pairs], len(pairs))))
    c = ad.config
    corrupt_regime, clean_regime = REGIMES[trace_system(c)]
    n_patches, T = (c["grid"] // c["patch_size"]) ** 2, c["context_frames"]
    return CounterfactualPairs(
        clean=(clean,), corrupted=(corrupt,), readout=lambda out: out, score=None,
        position_groups=position_groups(n_patches, T),
        concept=f"a {clean_regime} vs a {corrupt_regime} window of {trace_system(c)} at the same time "
                f"({len(pairs)} pairs, {T} context frames)",
        score_name="projection of the predicted change of the next frame on its clean-minus-corrupted difference",
        component_views=component_layouts(T))


def to_canonical(component: str, h: torch.Tensor, n_frames: int) -> torch.Tensor:
    """A component's output in the block outputs' layout ``(B, 1 + P * T, D)`` (what it adds to the stream).

    ``"attn"`` (spatial, ``(B * T, 1 + P, D)`` frame-major): the patches moved to patch-major order, the
    class token the mean of its per-frame rows; ``"attn_time"`` (``(B, P * T, D)``): a zero class token
    in front; any other component (``resid``, ``mlp``) is already in that layout.
    """
    if component == "attn":
        bt, p1, d = h.shape
        if bt % n_frames:
            raise ShapeError(f"physics: a spatial attention output of {bt} rows is not batch x {n_frames} frames")
        x = h.reshape(bt // n_frames, n_frames, p1, d)
        tokens = x[:, :, 1:].permute(0, 2, 1, 3).reshape(bt // n_frames, (p1 - 1) * n_frames, d)
        return torch.cat([x[:, :, :1].mean(1), tokens], 1)
    if component == "attn_time":
        return torch.cat([torch.zeros_like(h[:, :1]), h], 1)
    return h


def from_canonical(component: str, h: torch.Tensor, n_frames: int) -> torch.Tensor:
    """The inverse of :func:`to_canonical`: a canonical ``(B, 1 + P * T, D)`` tensor in the component's own
    layout (the spatial attention's class token copied to every frame, so its mean is the given one)."""
    if component == "attn":
        b, n, d = h.shape
        p = (n - 1) // n_frames
        tokens = h[:, 1:].reshape(b, p, n_frames, d).permute(0, 2, 1, 3)  # (B, T, P, D)
        cls = h[:, :1, None].expand(b, n_frames, 1, d)
        return torch.cat([cls, tokens], 2).reshape(b * n_frames, p + 1, d)
    if component == "attn_time":
        return h[:, 1:]
    return h


def component_layouts(n_frames: int) -> dict[str, tuple[Any, Any]]:
    """``{component: (to_canonical, from_canonical)}`` for the components whose outputs are not in the block
    outputs' layout (the spatial ``"attn"`` and temporal ``"attn_time"`` attention), each a function of the
    tensor alone (``n_frames`` bound): what a tracer needs to patch them at a position group."""
    from functools import partial

    return {name: (partial(to_canonical, name, n_frames=n_frames), partial(from_canonical, name, n_frames=n_frames))
            for name in ("attn", "attn_time")}
