"""Feature cards of the robotics adapter: camera frames with the action taken, and the decoder lens.

A robotics example is one state of a demonstration: the camera frame the policy saw, the
instruction, and the expert's action label. For a feature's card (:mod:`sciscope.core.cards`)
this module draws

- :func:`plot_frames`: the top examples' camera frames, each with its instruction as the title,
  the feature's activation, the named block ringed, and two arrows from the gripper: the action
  the policy chose (greedy decoding, :meth:`.model.VLAPolicy.act`, recomputed here on the same
  frame and instruction) and the demonstration's (expert) action; a smaller row of frames from the
  lower quantiles of the feature's non-zero activations;
- :func:`plot_action_profile`: the feature's decoder direction read through the final norm's gain
  and the LM head, restricted to the action tokens: one curve per action dimension over its bin
  values, so a feature that writes "dx = +1" shows a peak at the right end of the dx curve.

:func:`lens_basis` gives the core card its token basis (the LM head with the final RMSNorm's gain
folded in, every token named, action tokens as ``<dx:+0.996>``), the same reading as the FFN
value-vector lens of :mod:`.lens`.

Frames are re-rendered from each row's stored state (gripper position, scene): a scene is a pure
function of ``(seed, episode)`` (:func:`.env.make_scenes`), so only the shown episodes are rebuilt.
"""

from __future__ import annotations

import textwrap
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from . import env as _env
from .model import DIMS, VLAPolicy
from .task import as_policy

if TYPE_CHECKING:
    from sciscope.core.cards import Panel
    from sciscope.core.context import RunContext

__all__ = ["ARROW_SCALE", "CARD_COLUMNS", "frames", "lens_basis", "plot_action_profile", "plot_frames", "policy_actions",
           "render_examples"]

#: The obs columns a card's example table shows (the expert's action label; the policy's own
#: action is drawn on the frames).
CARD_COLUMNS: list[str] = ["instruction", "target_color", "action_direction", "action_x", "action_y", "episode", "step"]
#: Arrow length per unit of action (workspace units): one step moves only ``max_step`` (0.05), a
#: pixel or so of the frame, so the arrows are drawn longer, as a direction and a relative speed.
ARROW_SCALE = 0.4
N_TOP_FRAMES = 6
POLICY_COLOR, DEMO_COLOR = "#ff2bd6", "#00e5ff"  # magenta and cyan: neither is a block colour


def frames(spec: _env.EnvSpec, rows: pd.DataFrame, *, seed: int,
           templates: list[str] | tuple[str, ...] = _env.DEFAULT_TEMPLATES) -> np.ndarray:
    """Camera frames ``(n, H, W, 3)`` uint8 of demonstration states (rows with ``episode``, ``gripper_x/y``).

    Rebuilds only the scenes of the rows' episodes (each is a pure function of ``(seed, episode)``),
    then renders every row at its stored gripper position: the frame the policy saw.
    """
    episodes = rows["episode"].to_numpy(dtype=np.int64)
    unique, index = np.unique(episodes, return_inverse=True)
    scenes = _env.make_scenes(unique, seed=seed, spec=spec, templates=templates)
    grip = rows[["gripper_x", "gripper_y"]].to_numpy(dtype=np.float64)
    return _env.render_scene(grip, scenes.blocks[index], scenes.colors[index], spec)


@torch.no_grad()
def policy_actions(policy: VLAPolicy, images: np.ndarray, instructions: list[str]) -> np.ndarray:
    """The policy's greedy actions ``(n, 2)`` in ``[-1, 1]`` (bin centres) on frames and instructions."""
    was_training = policy.training
    policy.eval()
    try:
        ids, mask = policy.vocab.prompt_ids(instructions)
        bins, _ = policy.act(np.ascontiguousarray(images), ids, mask)
    finally:
        policy.train(was_training)
    return policy.vocab.codec.decode(bins)


def _extent(spec: _env.EnvSpec, gx: float, gy: float) -> tuple[float, float, float, float]:
    """Workspace coordinates of a frame's edges (left, right, bottom, top): arrows and rings are drawn in them."""
    if spec.camera == "world":
        return 0.0, 1.0, 0.0, 1.0
    h = spec.view_size / 2
    return gx - h, gx + h, gy - h, gy + h


def _draw_frame(ax: Any, image: np.ndarray, row: pd.Series, spec: _env.EnvSpec, policy_action: np.ndarray | None,
                title: str, fontsize: float) -> None:
    from matplotlib.patches import Circle

    gx, gy = float(row["gripper_x"]), float(row["gripper_y"])
    ax.imshow(image, extent=_extent(spec, gx, gy), origin="upper", interpolation="nearest")
    # the named block, ringed: which of the blocks the instruction asks for
    ax.add_patch(Circle((float(row["target_x"]), float(row["target_y"])), spec.block_size * 0.85, fill=False, ls=":",
                        lw=1.2, color="white"))
    # the demonstration's arrow wide underneath, the policy's thin on top: both stay visible where they agree
    arrows = [(np.array([row["action_x"], row["action_y"]], dtype=np.float64), DEMO_COLOR, 0.045, 0.13, 3)]
    if policy_action is not None:
        arrows.append((np.asarray(policy_action, dtype=np.float64), POLICY_COLOR, 0.022, 0.075, 4))
    for a, color, width, head, z in arrows:
        d = np.clip(a, -1.0, 1.0) * ARROW_SCALE
        if np.hypot(*d) < 1e-6:  # no motion: a dot, not an invisible arrow
            ax.plot([gx], [gy], "o", ms=4, color=color, zorder=z)
            continue
        ax.arrow(gx, gy, d[0], d[1], width=width, head_width=head, head_length=head * 0.8, length_includes_head=True,
                 color=color, ec="black", lw=0.4, zorder=z)
    lo, hi, bo, to = _extent(spec, gx, gy)
    ax.set_xlim(lo, hi), ax.set_ylim(bo, to)
    ax.set_xticks([]), ax.set_yticks([])
    ax.set_title(title, fontsize=fontsize)


def _legend_handles(with_policy: bool) -> list[Any]:
    from matplotlib.lines import Line2D

    h = [Line2D([], [], color=DEMO_COLOR, lw=3, label="demonstration (expert label)")]
    if with_policy:
        h.append(Line2D([], [], color=POLICY_COLOR, lw=3, label="policy's greedy action"))
    h.append(Line2D([], [], color="0.3", ls=":", marker="o", mfc="none", lw=0, ms=8, label="the named block"))
    return h


def plot_frames(images: np.ndarray, examples: pd.DataFrame, spec: _env.EnvSpec, policy: np.ndarray | None, *,
                feature: int, max_activation: float, small: bool = False) -> Any:
    """A grid of camera frames with the instruction, activation and action arrows (returns the figure).

    Parameters
    ----------
    images
        ``(n, H, W, 3)`` uint8 frames, row-aligned with ``examples``.
    examples
        The card's example rows (``band``, ``activation``, ``instruction``, ``episode``, ``step``,
        ``gripper_x/y``, ``target_x/y``, ``action_x/y``).
    spec
        The environment (camera and field of view: the frame's extent in workspace units).
    policy
        ``(n, 2)`` the policy's actions on these frames, or None (only the demonstration's arrow).
    feature, max_activation
        The feature and its largest activation (lower bands say their share of it).
    small
        The lower-quantile row: one row of smaller frames, titled by band.
    """
    import matplotlib.pyplot as plt

    n = len(examples)
    # one row: a card shows a panel at most ~320 px high, so a single row keeps the frames large
    size = 1.55 if small else 1.9
    fig, axes = plt.subplots(1, max(n, 1), figsize=(size * max(n, 1), size + (1.05 if small else 0.85)),
                             squeeze=False)
    for i in range(max(n, 1)):
        ax = axes[0][i]
        if i >= n:
            ax.axis("off")
            continue
        r = examples.iloc[i]
        act = float(r["activation"])
        text = "\n".join(textwrap.wrap(str(r["instruction"]), 22 if small else 26)[:2])
        if small:
            title = (f"{text}\n{r['band']} · act {act:.2f} ({100 * act / max(max_activation, 1e-12):.0f}% of max)"
                     f"\nep {int(r['episode'])} t={int(r['step'])}")
        else:
            title = f"{text}\n#{int(r['rank'])} · act {act:.2f} · ep {int(r['episode'])} t={int(r['step'])}"
        _draw_frame(ax, images[i], r, spec, None if policy is None else policy[i], title, 6.5 if small else 7.5)
    fig.legend(handles=_legend_handles(policy is not None), loc="lower center", ncol=3, fontsize=7, frameon=False,
               bbox_to_anchor=(0.5, 0.0))
    what = "weaker activations (lower quantiles)" if small else "top activations"
    fig.suptitle(f"feature {feature}: {what}", fontsize=9)
    fig.tight_layout(rect=(0, 0.08, 1, 0.9 if small else 0.94))  # room for the suptitle above the frame titles
    return fig


def action_profile(direction: np.ndarray, matrix: np.ndarray, token_info: pd.DataFrame) -> pd.DataFrame:
    """Logit change per action token along a residual direction: ``dim``, ``value``, ``score``.

    ``matrix`` is the ``(V, d)`` basis of :func:`lens_basis` (LM head times the final norm's gain);
    ``token_info`` is :meth:`.model.VLAVocab.token_info` (its action rows give each token's bin value).
    """
    scores = np.asarray(matrix, dtype=np.float64) @ np.asarray(direction, dtype=np.float64)  # (V,)
    act = token_info[token_info["kind"] == "action"]
    return pd.DataFrame({"dim": act["dim"].to_numpy(), "value": act["value"].to_numpy(dtype=np.float64),
                         "score": scores[act["token_id"].to_numpy()]})


def plot_action_profile(profile: pd.DataFrame, feature: int) -> Any:
    """Two curves: the decoder direction's logit change over the ``dx`` and ``dy`` bins (returns the figure)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(3.4, 2.3))
    for dim, color in zip(DIMS, ("C0", "C3")):
        p = profile[profile["dim"] == dim].sort_values("value")
        ax.plot(p["value"], p["score"], color=color, lw=1.4, label=dim)
        top = p.loc[p["score"].idxmax()]
        ax.plot([top["value"]], [top["score"]], "o", color=color, ms=4)
    ax.axhline(0, color="0.6", lw=0.7)
    ax.set_xlabel("action bin value (-1 = left/down, +1 = right/up)", fontsize=7)
    ax.set_ylabel("logit change", fontsize=8)
    ax.set_xticks([-1, -0.5, 0, 0.5, 1])
    ax.tick_params(labelsize=7)
    ax.set_title(f"feature {feature}: decoder direction → action tokens", fontsize=8)
    ax.legend(fontsize=7, frameon=False)
    return fig


def lens_basis(ctx: "RunContext") -> tuple[np.ndarray, list[str], str] | None:
    """The policy's LM head with the final RMSNorm's gain folded in ``(V, d)``, and the ``V`` token names.

    ``W * g`` projects a residual direction ``v`` as the logit lens does, ``W (g * v)``, up to the
    norm's scalar division (which changes no ranking); action tokens are named by dimension and
    bin value (``<dx:+0.996>``). None when the SAE site's width is not the residual width (a
    user's SAE on FFN neurons, say) or the model has no LM head.
    """
    policy = as_policy(ctx.model())
    head = policy.get_output_embeddings()
    if head is None:
        return None
    W = head.weight.detach().float()
    gain = policy.llm.model.norm.weight.detach().float()
    d_in = int(ctx.sae().W_dec.shape[1])
    if W.shape[1] != d_in:
        return None
    return (W * gain[None, :]).numpy(), list(policy.vocab.tokens), "the LM head, final norm's gain folded in"


def _distinct_episodes(top: pd.DataFrame, n: int) -> pd.DataFrame:
    """Up to ``n`` of the top rows, one per episode first (in rank order), then the rest by rank.

    Neighbouring steps of one episode look alike; spreading the frames over episodes shows more of
    what the feature responds to. The card's table still lists every top example."""
    first = ~top["episode"].duplicated()
    return pd.concat([top[first], top[~first]]).head(n).sort_values("rank", kind="stable")


def render_examples(ctx: "RunContext", feature: int, examples: pd.DataFrame) -> list["Panel"]:
    """The card's pictures: top frames, lower-quantile frames, and the decoder direction over the action bins."""
    import matplotlib

    matplotlib.use("Agg")
    from sciscope.core.cards import Panel

    ad = ctx.adapter
    spec, seed = ad.env_spec, int(ad.config["seed"])
    col_max = float(examples["activation"].max()) if len(examples) else 0.0
    shown = pd.concat([_distinct_episodes(examples[examples["band"] == "top"], N_TOP_FRAMES),
                       examples[examples["band"] != "top"]])
    shown = shown.reset_index(drop=True)
    images = frames(spec, shown, seed=seed, templates=ad.config["templates"])
    try:
        policy: VLAPolicy | None = as_policy(ctx.model())
        chosen = policy_actions(policy, images, shown["instruction"].astype(str).tolist())
        note = ""
    except Exception as e:  # noqa: BLE001 - without the policy the frames still show the demonstration
        policy, chosen = None, None
        note = f" (the policy's own action is missing: {type(e).__name__}: {e})"
    top = shown["band"].to_numpy() == "top"
    arrows = ("arrows from the gripper (white square): cyan the demonstration's action, magenta the policy's greedy "
              f"action on the same frame and instruction, drawn {ARROW_SCALE} workspace units per unit of action "
              f"(a step moves {spec.max_step}); dotted ring: the named block")
    view = (f"ego camera, {spec.view_size} workspace units wide, centred on the gripper" if spec.camera == "ego"
            else "world camera, the whole workspace")
    panels = []
    if top.any():
        fig = plot_frames(images[top], shown[top], spec, None if chosen is None else chosen[top], feature=feature,
                          max_activation=col_max)
        agree = ""
        if chosen is not None:
            d = np.abs(chosen[top] - shown.loc[top, ["action_x", "action_y"]].to_numpy(dtype=np.float64)).max(1)
            agree = f"; the policy's action is within 0.2 of the demonstration's on {int((d <= 0.2).sum())} of {int(top.sum())}"
        panels.append(Panel.from_figure(fig, "top frames", f"the top examples, one per episode where the top "
                                                               f"{int((examples['band'] == 'top').sum())} allow; {view}; "
                                                               f"{arrows}{agree}{note}"))
    if (~top).any():
        fig = plot_frames(images[~top], shown[~top], spec, None if chosen is None else chosen[~top], feature=feature,
                          max_activation=col_max, small=True)
        panels.append(Panel.from_figure(fig, "weaker activations", "frames near the 75th, 50th and 25th percentiles "
                                                                     "of the feature's non-zero activations; same arrows"))
    if "robotics_card_basis" not in ctx.live:
        ctx.live["robotics_card_basis"] = lens_basis(ctx) if policy is not None else None
    basis = ctx.live["robotics_card_basis"]
    if basis is not None and policy is not None:
        w = ctx.sae().W_dec[int(feature)].detach().float().numpy()
        w = w / max(float(np.linalg.norm(w)), 1e-12)  # unit decoder direction, as the core lens reads it
        prof = action_profile(w, basis[0], policy.vocab.token_info())
        panels.append(Panel.from_figure(plot_action_profile(prof, feature), "decoder direction as actions",
                                        "logit change of each action token per unit along the feature's decoder "
                                        "direction (final norm's gain and LM head; dot: the most promoted bin)"))
    return panels
