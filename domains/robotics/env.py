"""A small, fast, seeded planar reaching task with language instructions and a scripted expert.

The scene is the unit square seen from above: a gripper (end effector, a white square) and
``n_blocks`` blocks of distinct colours. An instruction names one block and, optionally, a manner
("reach the red block", "quickly go to the blue cube"); the episode succeeds when the gripper
comes within ``success_radius`` of the named block. Actions are planar displacements
``(dx, dy)`` in ``[-1, 1]^2``, scaled by ``max_step`` per step; an action outside the box is
clipped and *counted* (so a report can say how often it happened).

Everything is vectorised over a batch of environments in numpy (no Python loop over steps of a
single environment), so hundreds of rollouts cost well under a second per step on a CPU, and
every scene is a pure function of ``(seed, episode id)``: the same id gives the same scene in
every process, which lets each pipeline stage rebuild the demonstrations instead of shipping them.

Coordinates: ``x`` to the right, ``y`` up, both in ``[0, 1]``; the image puts ``y = 1`` on row 0.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any
import numpy as np
import pandas as pd

from sciscope.core.errors import ConfigError, NonFiniteError, ShapeError

__all__ = [
    "COLORS", "MANNERS", "MANNER_SPEED", "VOCAB_WORDS", "DEFAULT_TEMPLATES", "EnvSpec", "ReachEnv", "Rollout", "Scenes",
    "baseline_features", "check_instruction", "closed_loop", "closed_loops", "demo_table", "episode_metrics",
    "expert_action", "make_scenes", "parse_instruction", "render", "render_scene", "render_states", "rollout_metrics",
    "scripted_rollout", "simulate_demos", "split_words",
]

#: Block colours (RGB, uint8). Blocks of one scene always have distinct colours.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 215, 40),
}
#: Manner words and the speed class they ask for ("" = no manner word).
MANNERS: dict[str, str] = {"": "normal", "slowly": "slow", "carefully": "slow", "quickly": "fast", "rapidly": "fast"}
#: Expert speed per axis (largest |action component|, in units of ``max_step``) per speed class.
MANNER_SPEED: dict[str, float] = {"slow": 0.4, "normal": 0.7, "fast": 1.0}
#: Instruction templates; ``{color}`` names the target block. Manner words are put before or after.
DEFAULT_TEMPLATES: tuple[str, ...] = (
    "reach the {color} block",
    "go to the {color} block",
    "move to the {color} cube",
    "touch the {color} cube",
)
#: Every word an instruction may use (the policy's text vocabulary).
VOCAB_WORDS: tuple[str, ...] = (
    "reach", "go", "move", "touch", "to", "the", "a", "block", "cube", "please", "now",
    *COLORS, *[m for m in MANNERS if m],
)

_WORD_RE = re.compile(r"[a-z]+|[^a-z\s]+")


def split_words(text: str) -> list[str]:
    """Lower-case words of an instruction; ``.``, ``,`` and ``!`` are dropped, other symbols kept
    (so that they are reported as unknown words, not silently removed)."""
    words = _WORD_RE.findall(str(text).lower())
    return [w for w in words if w not in (".", ",", "!", "!.", "..")]


def check_instruction(text: str, vocab: Sequence[str] = VOCAB_WORDS) -> list[str]:
    """The words of ``text``; a :class:`ConfigError` listing every unknown word (in order, once)."""
    words = split_words(text)
    known = set(vocab)
    unknown = list(dict.fromkeys(w for w in words if w not in known))
    if unknown:
        raise ConfigError(
            f"robotics: instruction {text!r} has unknown word{'s' if len(unknown) > 1 else ''} {unknown}; "
            f"the policy's vocabulary is {sorted(known)}"
        )
    if not words:
        raise ConfigError(f"robotics: instruction {text!r} is empty")
    return words


def parse_instruction(text: str, vocab: Sequence[str] = VOCAB_WORDS) -> tuple[str, str]:
    """``(target colour, manner word)`` of an instruction (manner ``""`` when none).

    Raises
    ------
    ConfigError
        Unknown words (listed), no colour word, two different colours, or two manner words.
    """
    words = check_instruction(text, vocab)
    colors = list(dict.fromkeys(w for w in words if w in COLORS))
    manners = list(dict.fromkeys(w for w in words if w in MANNERS))
    if len(colors) != 1:
        raise ConfigError(
            f"robotics: instruction {text!r} must name exactly one block colour out of {list(COLORS)}, found {colors}"
        )
    if len(manners) > 1:
        raise ConfigError(f"robotics: instruction {text!r} has more than one manner word: {manners}")
    return colors[0], (manners[0] if manners else "")


def check_templates(templates: Sequence[str]) -> list[str]:
    """Validate instruction templates: each has ``{color}``, no other field, only known words."""
    out = []
    for t in templates:
        t = str(t)
        fields = re.findall(r"{([^}]*)}", t)
        if fields != ["color"]:
            raise ConfigError(f"robotics: template {t!r} must contain '{{color}}' exactly once and no other field")
        check_instruction(t.replace("{color}", "red"))
        out.append(t)
    if not out:
        raise ConfigError("robotics: config 'templates' is empty")
    return out


@dataclass(frozen=True)
class EnvSpec:
    """Geometry and dynamics of the reaching task."""

    image_size: int = 32  # pixels per side of the rendered RGB image
    n_blocks: int = 3  # blocks per scene (distinct colours)
    max_step: float = 0.05  # workspace units moved by an action of norm 1 (per axis: |a_i| <= 1)
    success_radius: float = 0.06  # the gripper within this distance of the target block's centre (over it)
    max_steps: int = 50  # episode length limit
    block_size: float = 0.11  # side of a block (workspace units)
    min_separation: float = 0.22  # between block centres
    min_start_distance: float = 0.2  # gripper start to any block
    max_start_offset: float = 0.7  # gripper start to the target block, per axis (stays in an ego view)
    camera: str = "ego"  # ego: top-down camera moving with the gripper (wrist-style); world: the whole workspace
    view_size: float = 1.6  # side of the ego camera's field of view (workspace units)
    gripper_size: float = 0.05  # side of the gripper's white square


@dataclass
class Scenes:
    """A batch of initial scenes (one per episode), all arrays row-aligned.

    Attributes
    ----------
    episode : (N,) int64 episode ids (with the seed, they determine the scene)
    gripper : (N, 2) start position
    blocks : (N, K, 2) block centres
    colors : (N, K) colour indices into ``list(COLORS)``
    target : (N,) index of the named block in ``blocks``
    instruction : list of N strings
    manner : list of N manner words ("" = none)
    """

    episode: np.ndarray
    gripper: np.ndarray
    blocks: np.ndarray
    colors: np.ndarray
    target: np.ndarray
    instruction: list[str]
    manner: list[str]
    template: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.episode)

    @property
    def target_pos(self) -> np.ndarray:
        """(N, 2) centre of each scene's named block."""
        return self.blocks[np.arange(len(self)), self.target]

    @property
    def target_color(self) -> list[str]:
        names = list(COLORS)
        return [names[int(c)] for c in self.colors[np.arange(len(self)), self.target]]

    def with_instructions(self, instructions: Sequence[str]) -> "Scenes":
        """The same scenes with other instructions; the target follows each instruction's colour
        (a colour that is not in a scene is a :class:`ConfigError` naming the episode)."""
        if len(instructions) != len(self):
            raise ShapeError(f"robotics: {len(instructions)} instructions for {len(self)} scenes")
        names = list(COLORS)
        target = self.target.copy()
        manners = []
        for i, text in enumerate(instructions):
            color, manner = parse_instruction(text)
            hits = np.flatnonzero(self.colors[i] == names.index(color))
            if hits.size == 0:
                present = [names[int(c)] for c in self.colors[i]]
                raise ConfigError(f"robotics: episode {int(self.episode[i])} has no {color} block (it has {present})")
            target[i] = int(hits[0])
            manners.append(manner)
        return replace(self, target=target, instruction=list(instructions), manner=manners)


def make_scenes(episodes: Sequence[int] | np.ndarray, *, seed: int, spec: EnvSpec,
                templates: Sequence[str] = DEFAULT_TEMPLATES, manners: Sequence[str] = tuple(MANNERS)) -> Scenes:
    """Seeded initial scenes: block positions and colours, gripper start, instruction.

    Each scene draws from its own generator ``default_rng([seed, episode])``, so a scene does not
    depend on which other episodes are generated with it. Blocks keep ``min_separation`` between
    centres and lie in ``[0.1, 0.9]^2``; the gripper starts at least ``min_start_distance`` away
    from every block (rejection sampling; the constants leave plenty of room for 4 blocks).
    """
    episodes = np.asarray(episodes, dtype=np.int64)
    n, k = len(episodes), spec.n_blocks
    gripper = np.zeros((n, 2))
    blocks = np.zeros((n, k, 2))
    colors = np.zeros((n, k), dtype=np.int64)
    target = np.zeros(n, dtype=np.int64)
    texts, mans, temps = [], [], []
    names = list(COLORS)
    for i, ep in enumerate(episodes):
        rng = np.random.default_rng([int(seed), int(ep), 0x5EED])
        colors[i] = rng.choice(len(names), size=k, replace=False)
        placed: list[np.ndarray] = []
        while len(placed) < k:
            p = rng.uniform(0.1, 0.9, size=2)
            if all(np.linalg.norm(p - q) >= spec.min_separation for q in placed):
                placed.append(p)
        blocks[i] = np.stack(placed)
        target[i] = int(rng.integers(k))
        while True:
            g = rng.uniform(0.05, 0.95, size=2)
            if (np.min(np.linalg.norm(blocks[i] - g, axis=1)) >= spec.min_start_distance
                    and np.abs(blocks[i, target[i]] - g).max() <= spec.max_start_offset):
                break
        gripper[i] = g
        template = templates[int(rng.integers(len(templates)))]
        manner = manners[int(rng.integers(len(manners)))]
        before = bool(rng.integers(2))
        text = template.format(color=names[colors[i, target[i]]])
        if manner:  # the manner word first or last
            text = f"{manner} {text}" if before else f"{text} {manner}"
        texts.append(text)
        mans.append(manner)
        temps.append(template)
    return Scenes(episodes, gripper, blocks, colors, target, texts, mans, temps)


def _coverage(lo: np.ndarray, hi: np.ndarray, p0: np.ndarray, p1: np.ndarray, width: float) -> np.ndarray:
    """Fraction of each pixel interval ``[p0, p1]`` (``(n, P)``) covered by ``[lo, hi]`` (``(n,)``)."""
    return np.clip(np.minimum(hi[:, None], p1) - np.maximum(lo[:, None], p0), 0.0, None) / width


def render(
    gripper: np.ndarray, blocks: np.ndarray, colors: np.ndarray, size: int, block_size: float = 0.11, *,
    camera: str = "ego", view_size: float = 1.6, gripper_size: float = 0.05,
) -> np.ndarray:
    """RGB images of a batch of scenes: ``(N, size, size, 3)`` uint8, anti-aliased.

    ``camera="world"`` shows the whole workspace; ``"ego"`` a ``view_size`` window centred on
    the gripper (a top-down camera that moves with it, as a wrist camera does), where the
    workspace floor is lighter than the outside. Blocks are squares of their colour, the gripper a
    white square on top. Every shape is drawn with its exact pixel coverage, so sub-pixel
    positions show as intensities (a 32-pixel image then locates a block far better than 1/32).
    """
    n = gripper.shape[0]
    if camera == "world":
        lo, span = np.zeros((n, 2)), 1.0
    else:
        lo, span = gripper - view_size / 2, float(view_size)
    w = span / size  # workspace units per pixel
    edges = np.arange(size) * w
    px0 = lo[:, :1] + edges  # (N, W) left edge of each pixel column
    px1 = px0 + w
    py1 = lo[:, 1:] + span - edges  # (N, H) top edge of each pixel row (row 0 at the top: y up)
    py0 = py1 - w

    def alpha(cx: np.ndarray, cy: np.ndarray, half: float) -> np.ndarray:  # (N, H, W, 1)
        ax = _coverage(cx - half, cx + half, px0, px1, w)  # (N, W)
        ay = _coverage(cy - half, cy + half, py0, py1, w)  # (N, H)
        return (ay[:, :, None] * ax[:, None, :])[..., None]

    zeros, ones = np.zeros(n), np.ones(n)
    floor = (_coverage(zeros, ones, py0, py1, w)[:, :, None] * _coverage(zeros, ones, px0, px1, w)[:, None, :])[..., None]
    img = 15.0 + 45.0 * floor * np.ones(3)  # (N, H, W, 3): floor 60, outside the workspace 15
    palette = np.array(list(COLORS.values()), dtype=np.float64)
    for j in range(blocks.shape[1]):
        a = alpha(blocks[:, j, 0], blocks[:, j, 1], block_size / 2)
        img = img * (1 - a) + a * palette[colors[:, j]][:, None, None, :]
    a = alpha(gripper[:, 0], gripper[:, 1], gripper_size / 2)
    img = img * (1 - a) + a * 255.0
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def expert_action(gripper: np.ndarray, target: np.ndarray, speed: np.ndarray, max_step: float) -> np.ndarray:
    """The scripted expert: each axis moves toward the target at ``speed``, landing exactly on it.

    ``a_i = clip((target_i - gripper_i) / max_step, -speed, speed)`` per axis (far away the expert
    moves at its manner's speed on each axis, diagonally when both are far; at the last step it
    stops on the target). Each action dimension depends on its own axis only. ``(N, 2)``.
    """
    a = (target - gripper) / max_step
    s = np.asarray(speed, dtype=np.float64).reshape(-1, 1)
    return np.clip(a, -s, s)


class ReachEnv:
    """A batch of reaching episodes (one per scene) stepped together.

    Attributes
    ----------
    position : (N, 2) current gripper positions
    done, success : (N,) bool
    steps : (N,) steps taken by each environment
    n_clipped : int, action components outside [-1, 1] that were clipped
    n_wall : int, steps where the gripper hit the workspace boundary (position clipped)
    """

    def __init__(self, scenes: Scenes, spec: EnvSpec) -> None:
        self.scenes, self.spec = scenes, spec
        self.position = scenes.gripper.astype(np.float64).copy()
        n = len(scenes)
        self.done, self.success = np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
        self.steps = np.zeros(n, dtype=np.int64)
        self.n_clipped = self.n_wall = 0
        self.target_pos = scenes.target_pos
        self._check_success()

    def _check_success(self) -> None:
        hit = np.linalg.norm(self.position - self.target_pos, axis=1) < self.spec.success_radius
        self.success |= hit
        self.done |= hit

    def observe(self) -> np.ndarray:
        """``(N, H, W, 3)`` uint8 images of the current state."""
        return render_scene(self.position, self.scenes.blocks, self.scenes.colors, self.spec)

    def step(self, action: np.ndarray) -> np.ndarray:
        """Apply ``(N, 2)`` actions to the running environments; returns the ``(N, 2)`` displacement.

        Finished environments ignore their action (displacement 0). Components outside
        ``[-1, 1]`` are clipped and counted in :attr:`n_clipped`; a non-finite action is an error.
        """
        a = np.asarray(action, dtype=np.float64)
        if a.shape != self.position.shape:
            raise ShapeError(f"robotics: actions have shape {a.shape}, the batch needs {self.position.shape}")
        live = ~self.done
        if not np.isfinite(a[live]).all():
            bad = np.flatnonzero(live & ~np.isfinite(a).all(1))
            raise NonFiniteError(f"robotics: non-finite action for environments {bad[:10].tolist()}")
        out = (np.abs(a) > 1.0) & live[:, None]
        self.n_clipped += int(out.sum())
        a = np.clip(np.where(live[:, None], a, 0.0), -1.0, 1.0)
        new = self.position + a * self.spec.max_step
        wall = ((new < 0.0) | (new > 1.0)).any(1) & live
        self.n_wall += int(wall.sum())
        new = np.clip(new, 0.0, 1.0)
        disp = new - self.position
        self.position = new
        self.steps += live
        self._check_success()
        self.done |= self.steps >= self.spec.max_steps
        return disp


@dataclass
class Rollout:
    """Closed-loop rollouts of a batch of scenes (:func:`closed_loop`).

    Attributes
    ----------
    metrics : dict
        :func:`rollout_metrics` plus ``n_clipped`` (action components clipped by the environment)
        and ``n_wall``; a policy's :func:`~.model.rollout` adds ``non_action_rate``.
    paths : (T + 1, N, 2) gripper positions (NaN after an episode ended)
    success : (N,) bool
    episodes : dict
        :func:`episode_metrics`: the same quantities per episode, ``(N,)`` arrays.
    """

    metrics: dict[str, float]
    paths: np.ndarray
    success: np.ndarray
    episodes: dict[str, np.ndarray]


def closed_loop(scenes: Scenes, spec: EnvSpec, act: Callable[[ReachEnv, np.ndarray], np.ndarray]) -> Rollout:
    """Step ``scenes`` with ``act(env, running rows) -> (N, 2) actions`` until every episode succeeds or times out."""
    return closed_loops(scenes, spec, 1, lambda envs, lives: [act(envs[0], lives[0])])[0]


def closed_loops(scenes: Scenes, spec: EnvSpec, n: int,
                 act: Callable[[list[ReachEnv], list[np.ndarray]], Sequence[np.ndarray | None]]) -> list[Rollout]:
    """``n`` independent copies of :func:`closed_loop` on the same scenes, stepped in lock-step.

    ``act(envs, lives)`` gets the ``n`` environments and each one's running rows and returns one
    ``(N, 2)`` action array per copy (ignored, and may be None, for a copy with no running rows).
    A copy whose episodes have all ended is no longer stepped, as :func:`closed_loop` stops, so
    copy ``i``'s rollout is the one :func:`closed_loop` gives with copy ``i``'s actions: a policy
    can decide the actions of all copies in one batch (copies under different steering, see
    :func:`~.model.rollout_copies`) and still get each copy's own numbers.
    """
    if n < 1:
        raise ValueError(f"robotics: closed_loops needs n >= 1 copies, got {n}")
    envs = [ReachEnv(scenes, spec) for _ in range(n)]
    T, N = spec.max_steps, len(scenes)
    # copy on the leading axis: each copy's block is a contiguous (T, N, ...) array, as closed_loop's
    disp, live_m, to_t = np.zeros((n, T, N, 2)), np.zeros((n, T, N), dtype=bool), np.zeros((n, T, N, 2))
    paths = np.full((n, T + 1, N, 2), np.nan)
    for c, env in enumerate(envs):
        paths[c, 0] = env.position
    for t in range(T):
        lives = [np.flatnonzero(~env.done) for env in envs]
        if all(live.size == 0 for live in lives):
            break
        actions = act(envs, lives)
        if len(actions) != n:
            raise ShapeError(f"robotics: act returned {len(actions)} action arrays for {n} copies")
        for c, (env, live, a) in enumerate(zip(envs, lives, actions)):
            if live.size == 0:
                continue
            live_m[c, t, live] = True
            to_t[c, t] = env.target_pos - env.position
            disp[c, t] = env.step(a)
            paths[c, t + 1, live] = env.position[live]
    out = []
    for c, env in enumerate(envs):
        metrics = rollout_metrics(disp[c], live_m[c], to_t[c], env.success, env.steps, spec.max_step)
        metrics.update({"n_clipped": float(env.n_clipped), "n_wall": float(env.n_wall)})
        out.append(Rollout(metrics, paths[c], env.success.copy(),
                           episode_metrics(disp[c], live_m[c], to_t[c], env.success, spec.max_step)))
    return out


def simulate_demos(scenes: Scenes, spec: EnvSpec, *, noise: float = 0.0,
                   seed: int = 0) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Roll the expert out on ``scenes``: one row per visited state with the expert's label.

    With ``noise > 0`` the *executed* action is the expert's plus Gaussian noise (DART-style
    noise injection widens the states a behaviour-cloned policy learns from); the label stays the
    clean expert action of the visited state. Executed actions outside ``[-1, 1]`` are clipped and
    counted. Images are not kept (thousands of episodes would cost hundreds of MB): render any
    rows with :func:`render_states`.

    Returns
    -------
    states : DataFrame
        ``scene`` (row of ``scenes``), ``episode, step, gripper_x/y, action_x/y`` (expert labels)
        and ``clipped`` (the executed action was clipped), in episode then step order.
    counts : dict
        ``n_episodes``, ``n_success``, ``n_clipped`` (action components), ``n_wall``, and per
        scene ``success`` (bool) and ``steps`` arrays.
    """
    rng = np.random.default_rng([seed, 0xDE40])
    speed = np.array([MANNER_SPEED[MANNERS[m]] for m in scenes.manner])
    chunks = []

    def act(env: ReachEnv, live: np.ndarray) -> np.ndarray:
        a = expert_action(env.position, env.target_pos, speed, spec.max_step)
        executed = a + noise * rng.standard_normal(a.shape) if noise > 0 else a
        chunks.append(pd.DataFrame({
            "scene": live, "episode": scenes.episode[live], "step": env.steps[live],
            "gripper_x": env.position[live, 0], "gripper_y": env.position[live, 1],
            "action_x": a[live, 0], "action_y": a[live, 1], "clipped": (np.abs(executed[live]) > 1.0).any(1),
        }))
        return executed

    r = closed_loop(scenes, spec, act)
    cols = ["scene", "episode", "step", "gripper_x", "gripper_y", "action_x", "action_y", "clipped"]
    states = pd.concat(chunks, ignore_index=True) if chunks else pd.DataFrame(columns=cols)
    # rows were made step-major; order them episode-major (stable: steps stay in order)
    states = states.sort_values(["scene", "step"], kind="stable").reset_index(drop=True)
    counts = {"n_episodes": len(scenes), "n_success": int(r.success.sum()), "n_clipped": int(r.metrics["n_clipped"]),
              "n_wall": int(r.metrics["n_wall"]), "success": r.success, "steps": r.episodes["steps"].astype(np.int64)}
    return states, counts


def render_states(scenes: Scenes, states: pd.DataFrame, spec: EnvSpec, rows: np.ndarray | None = None) -> np.ndarray:
    """Images ``(n, H, W, 3)`` uint8 of the given rows of a :func:`simulate_demos` table."""
    t = states if rows is None else states.iloc[np.asarray(rows)]
    scene = t["scene"].to_numpy(dtype=np.int64)
    grip = t[["gripper_x", "gripper_y"]].to_numpy(dtype=np.float64)
    return render_scene(grip, scenes.blocks[scene], scenes.colors[scene], spec)


def render_scene(gripper: np.ndarray, blocks: np.ndarray, colors: np.ndarray, spec: EnvSpec) -> np.ndarray:
    """:func:`render` with the geometry and camera of ``spec``."""
    return render(gripper, blocks, colors, spec.image_size, spec.block_size, camera=spec.camera,
                  view_size=spec.view_size, gripper_size=spec.gripper_size)


def _step_terms(displacements: np.ndarray, live: np.ndarray, to_target: np.ndarray, max_step: float) -> tuple:
    """Steps in units of ``max_step``, their norms, cosines to the target, running and moving masks."""
    d = displacements / max_step
    mag = np.linalg.norm(d, axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = (d * to_target).sum(-1) / np.maximum(mag * np.linalg.norm(to_target, axis=-1), 1e-12)
    m = live.astype(bool)
    return d, mag, cos, m, m & (mag > 1e-9)


def rollout_metrics(
    displacements: np.ndarray, live: np.ndarray, to_target: np.ndarray, success: np.ndarray, steps: np.ndarray,
    max_step: float,
) -> dict[str, float]:
    """Trajectory metrics of a batch of closed-loop rollouts.

    Parameters
    ----------
    displacements : (T, N, 2) per-step gripper displacement (workspace units)
    live : (T, N) bool, the environment was running at that step
    to_target : (T, N, 2) vector from the gripper to the target before the step
    success : (N,) bool
    steps : (N,) steps taken

    Returns
    -------
    dict
        ``success_rate``; ``displacement`` (mean per-step |displacement| over running steps, in
        units of ``max_step``: 1 = an axis-saturating action); ``dx``, ``dy`` (mean signed
        per-step displacement, same units); ``alignment`` (mean cosine between step and
        direction to the target); ``steps_to_success`` (mean over successes; NaN without any).
    """
    d, mag, cos, m, moving = _step_terms(displacements, live, to_target, max_step)
    n_live = max(int(m.sum()), 1)
    return {
        "success_rate": float(np.mean(success)),
        "displacement": float(mag[m].sum() / n_live),
        "dx": float(d[..., 0][m].sum() / n_live),
        "dy": float(d[..., 1][m].sum() / n_live),
        "alignment": float(cos[moving].mean()) if moving.any() else float("nan"),
        "steps_to_success": float(steps[success].mean()) if success.any() else float("nan"),
    }


def episode_metrics(displacements: np.ndarray, live: np.ndarray, to_target: np.ndarray, success: np.ndarray,
                    max_step: float) -> dict[str, np.ndarray]:
    """Per-episode trajectory metrics: ``(N,)`` arrays of the :func:`rollout_metrics` quantities.

    ``displacement``, ``dx``, ``dy`` and ``alignment`` are each episode's mean over its running
    steps (NaN for an episode with none); ``success_rate`` is 0/1 per episode. Their means weigh
    every episode alike (:func:`rollout_metrics` pools the steps of every episode instead).
    """
    d, mag, cos, m, moving = _step_terms(displacements, live, to_target, max_step)
    with np.errstate(invalid="ignore", divide="ignore"):
        per = lambda x, mask: np.where(mask.any(0), (x * mask).sum(0) / mask.sum(0), np.nan)  # noqa: E731
        return {"success_rate": np.asarray(success, dtype=np.float64), "displacement": per(mag, m),
                "dx": per(d[..., 0], m), "dy": per(d[..., 1], m), "alignment": per(cos, moving),
                "steps": m.sum(0).astype(np.float64)}


def scripted_rollout(scenes: Scenes, spec: EnvSpec, kind: str, seed: int = 0) -> dict[str, float]:
    """:func:`closed_loop` metrics of the noise-free expert (``kind="expert"``) or of uniform
    random actions in [-1, 1]^2 (``"random"``, the chance level)."""
    speed = np.array([MANNER_SPEED[MANNERS[m]] for m in scenes.manner])
    rng = np.random.default_rng([seed, 0xA11])

    def act(env: ReachEnv, _: np.ndarray) -> np.ndarray:
        if kind == "expert":
            return expert_action(env.position, env.target_pos, speed, spec.max_step)
        return rng.uniform(-1, 1, size=(len(scenes), 2))

    return closed_loop(scenes, spec, act).metrics


def demo_table(scenes: Scenes, spec: EnvSpec, *, noise: float, seed: int,
               test_fraction: float) -> tuple[pd.DataFrame, dict[str, Any]]:
    """``(states, counts)`` of the expert demonstrations of ``scenes`` (deterministic).

    ``states`` has one row per visited state: ``scene, episode, step, split, instruction,
    target_color, manner, manner_word, gripper_x/y, target_x/y, target_dx/dy, action_x/y``
    (expert labels), ``action_speed``, ``action_direction`` (the dominant component's direction)
    and ``clipped`` (the executed, noisy action left the box and was clipped). Held-out episodes
    are a seeded ``test_fraction`` of every block of episodes (so the first episodes hold test
    episodes too); ``counts`` add the noise-free expert's success and clipping on the same scenes.
    """
    states, counts = simulate_demos(scenes, spec, noise=noise, seed=seed)
    per_scene = pd.DataFrame({
        "episode": scenes.episode, "instruction": scenes.instruction, "template": scenes.template or [""] * len(scenes),
        "target_color": scenes.target_color, "manner_word": [m or "none" for m in scenes.manner],
        "manner": [MANNERS[m] for m in scenes.manner], "target_x": scenes.target_pos[:, 0],
        "target_y": scenes.target_pos[:, 1],
    })
    obs = states.merge(per_scene, on="episode", how="left", validate="many_to_one")
    obs["target_dx"] = obs["target_x"] - obs["gripper_x"]
    obs["target_dy"] = obs["target_y"] - obs["gripper_y"]
    ax, ay = obs["action_x"].to_numpy(), obs["action_y"].to_numpy()
    obs["action_speed"] = np.hypot(ax, ay)
    horiz = np.abs(ax) >= np.abs(ay)
    obs["action_direction"] = np.where(horiz, np.where(ax >= 0, "right", "left"), np.where(ay >= 0, "up", "down"))
    test = np.random.default_rng([seed, 0x7E57]).random(len(scenes)) < test_fraction
    obs["split"] = np.where(test[obs["scene"].to_numpy()], "test", "train")
    cols = ["scene", "episode", "step", "split", "instruction", "template", "target_color", "manner", "manner_word",
            "gripper_x", "gripper_y", "target_x", "target_y", "target_dx", "target_dy", "action_x", "action_y",
            "action_speed", "action_direction", "clipped"]
    _, clean = simulate_demos(scenes, spec, noise=0.0, seed=seed)  # what the task allows (no clipping there)
    return obs[cols], {**counts, "n_states": len(obs), "expert_success_noise_free": clean["n_success"] / len(scenes),
                       "expert_clipped_noise_free": clean["n_clipped"], "n_test_episodes": int(test.sum())}


def baseline_features(inputs: Sequence[tuple[np.ndarray, str]]) -> dict[str, np.ndarray]:
    """Bag of words of each instruction, and each image average-pooled to 8x8x3 pixels.

    Words alone give the colour and manner but not where the block is; pixels alone show the
    blocks but not which one is meant. The activations have to bind the two.
    """
    words = list(VOCAB_WORDS)
    index = {w: i for i, w in enumerate(words)}
    bow = np.zeros((len(inputs), len(words)), dtype=np.float32)
    pix = []
    for r, (im, text) in enumerate(inputs):
        for w in split_words(text):
            if w in index:
                bow[r, index[w]] += 1
        a = np.asarray(im, dtype=np.float32) / 255.0
        s = a.shape[0] // 8 if a.shape[0] >= 8 else 1
        a = a[: s * (a.shape[0] // s), : s * (a.shape[1] // s)]
        pix.append(a.reshape(a.shape[0] // s, s, a.shape[1] // s, s, 3).mean((1, 3)).ravel())
    return {"bag_of_words": bow, "pixels_8x8": np.asarray(pix, dtype=np.float32)}
