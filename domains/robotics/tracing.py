"""Counterfactual pairs for causal tracing: "quickly" and "slowly" in the same scene and instruction.

Each pair is one demonstration state (its image, its target block) with the instruction's template
filled with the target's colour and a manner word put in front: ``"quickly reach the red block"``
(clean) and ``"slowly reach the red block"`` (corrupted). Both words are one token, so the prompts
align token for token and differ at one position. States are taken where the target is at least one
full step away along x, farther than along y (held-out episodes first): there the expert's ``dx`` is
its manner's speed (1.0 fast, 0.4 slow; :data:`.env.MANNER_SPEED`), so the first action token carries
the manner.

The readout is the logits at the ``<act>`` position (the last one), which emits ``dx``; the score is
the log-mass on fast ``dx`` bins minus that on slow ones, by the lens' stated rule
(``|value| >= fast_threshold`` vs ``|value| <= slow_threshold``), larger for clean ("quickly").

The residual stream is image patches then the left-padded prompt, ``(B, N + L, D)``. The patch
embeddings are FiLM-conditioned on the instruction's mean word embedding
(:class:`.model.PatchEmbed`), so the patch positions differ between clean and corrupted from the
first layer's input on, not only the speed word's position.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from sciscope.core.config import Key

from .model import BOS, DIMS, SPECIALS
from .task import as_policy

if TYPE_CHECKING:
    from sciscope.core.context import RunContext
    from sciscope.core.tracing import CounterfactualPairs

    from .adapter import RoboticsAdapter

__all__ = ["CONFIG_KEYS", "MANNER_WORDS", "speed_states", "tracing_pairs"]

#: Config keys of the tracing analysis (it runs after the probes stage).
CONFIG_KEYS: dict[str, Key] = {
    "trace_pairs": Key(32, "probes", min=1, help="'quickly'/'slowly' pairs of demonstration states traced"),
}
#: (clean, corrupted) manner words: one token each, so the prompts align.
MANNER_WORDS = ("quickly", "slowly")


def speed_states(ad: "RoboticsAdapter", n: int) -> np.ndarray:
    """Up to ``n`` rows of the demonstration states (example episodes) whose first action carries the manner:
    the target at least one full step away along x and farther along x than along y; a seeded order,
    held-out episodes first."""
    obs, _, _ = ad.demos
    dx, dy = obs["target_dx"].abs().to_numpy(), obs["target_dy"].abs().to_numpy()
    ok = (obs["scene"].to_numpy() < ad.config["n_example_episodes"]) & (dx >= ad.env_spec.max_step) & (dx > dy)
    rows = np.random.default_rng([ad.config["seed"], 0x7ACE]).permutation(np.flatnonzero(ok))
    rows = rows[np.argsort(obs["split"].to_numpy()[rows] != "test", kind="stable")]
    return rows[:n]


def tracing_pairs(ad: "RoboticsAdapter", ctx: "RunContext") -> "CounterfactualPairs | None":
    """The same states with "quickly" (clean) and "slowly" (corrupted) before the instruction (module
    docstring). None when no demonstration state qualifies."""
    from sciscope.core.tracing import CounterfactualPairs

    rows = speed_states(ad, int(ad.config["trace_pairs"]))
    if not len(rows):
        return None
    policy = as_policy(ctx.model())
    vocab = policy.vocab
    obs, _, _ = ad.demos
    base = [str(t).format(color=c) for t, c in zip(obs["template"].to_numpy()[rows], obs["target_color"].to_numpy()[rows])]
    pixels = torch.from_numpy(ad.render(rows)).permute(0, 3, 1, 2).contiguous()  # (B, 3, H, W) uint8
    inputs = []
    for word in MANNER_WORDS:
        ids, mask = vocab.prompt_ids([f"{word} {t}" for t in base])
        inputs.append({"pixel_values": pixels, "input_ids": ids, "text_mask": mask})
    ids, mask = inputs[0]["input_ids"], inputs[0]["text_mask"].bool()
    B, L = ids.shape
    n_patches = (policy.vision.image_size // policy.vision.patch_size) ** 2
    word = ids != inputs[1]["input_ids"]  # the manner word's position
    words = mask & (ids >= len(SPECIALS)) & (ids < vocab.action_offset) & ~word
    bos = mask & (ids == BOS)
    pad = lambda text: torch.cat([torch.zeros((B, n_patches), dtype=torch.bool), text], 1)  # noqa: E731  patches first

    values = torch.as_tensor(vocab.codec.centres, dtype=torch.float32).abs()
    dx = torch.arange(vocab.dim_slice(0).start, vocab.dim_slice(0).stop)
    fast, slow = dx[values >= ad.rule.fast_threshold], dx[values <= ad.rule.slow_threshold]

    def readout(output: Any) -> torch.Tensor:
        return output.logits[:, -1]  # (n * B, V): <act>, the position emitting dx, is last in every row

    def score(r: torch.Tensor) -> torch.Tensor:
        r = r.float()
        return torch.logsumexp(r[:, fast.to(r.device)], -1) - torch.logsumexp(r[:, slow.to(r.device)], -1)

    return CounterfactualPairs(
        clean=inputs[0], corrupted=inputs[1], readout=readout, score=score,
        position_groups={"image patches": list(range(n_patches)), "<bos>": pad(bos), "speed word": pad(word),
                         "instruction words": pad(words), "<act> (emits dx)": [n_patches + L - 1]},
        concept=f"'{MANNER_WORDS[0]}' vs '{MANNER_WORDS[1]}' before the same instruction in the same scene ({B} states "
                f"whose first action carries the speed)",
        score_name=f"log-mass on fast {DIMS[0]} bins (|value| >= {ad.rule.fast_threshold:g}) minus slow ones "
                   f"(<= {ad.rule.slow_threshold:g}) at <act>")
