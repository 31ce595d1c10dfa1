"""The policy's own task, for the core's fidelity analysis: teacher-forced action-token NLL.

The expert's ``dx`` and ``dy`` bins (clean labels) of held-out demonstration states are scored as
in training (:func:`.model.action_logits`): ``-log p`` with the softmax over the whole vocabulary
(mass leaking to word tokens counts), mean over both tokens. ``log_probs`` is the log-softmax over
each dimension's bins at its action position, the distribution greedy decoding acts on, so the
fidelity analysis reports the KL of the action distribution.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from sciscope.core.errors import AdapterError, ConfigError
from sciscope.core.fidelity import TaskLoss

from .model import DIMS, VLAPolicy, VLAVocab, action_logits

__all__ = ["TASK_STATES", "action_nll_task", "as_policy", "held_out_rows"]

#: Held-out demonstration states the task loss reads (evenly spaced over the test episodes' states):
#: the fidelity analysis runs the task 6-11 times, so it stays a few forward passes.
TASK_STATES = 512
#: States per forward pass of the task.
_BATCH = 128


def as_policy(model: nn.Module) -> VLAPolicy:
    """``model`` as a :class:`.model.VLAPolicy`; an :class:`AdapterError` naming its type otherwise."""
    if not isinstance(model, VLAPolicy):
        raise AdapterError(f"robotics: expected a VLAPolicy (from RoboticsAdapter.model()), got {type(model).__name__}")
    return model


def held_out_rows(split: np.ndarray, n: int = TASK_STATES) -> np.ndarray:
    """Indices of at most ``n`` states with ``split == "test"``, evenly spaced over them (in order).

    Raises
    ------
    ConfigError
        No state is held out (``test_fraction``).
    """
    test = np.flatnonzero(np.asarray(split) == "test")
    if not test.size:
        raise ConfigError("robotics: no held-out demonstration states for the task loss (test_fraction)")
    return test[np.unique(np.linspace(0, test.size - 1, min(n, test.size)).round().astype(int))]


def action_nll_task(pixels: torch.Tensor, instructions: Sequence[str], actions: np.ndarray, *,
                    prepare: Callable[[], None] | None = None) -> TaskLoss:
    """The action-token NLL of a policy on a fixed evaluation set (eval mode, no sampling).

    Parameters
    ----------
    pixels
        ``(N, 3, H, W)`` uint8 images of the states, rendered once.
    instructions
        The ``N`` instructions.
    actions
        ``(N, 2)`` expert actions (clean labels), binned by each scored policy's own codec.
    prepare
        Called before each scoring pass (the adapter sets torch's thread count there).

    Returns
    -------
    TaskLoss
        ``fn``: mean NLL of the ``dx`` and ``dy`` tokens; ``log_probs``: ``(2 N, n_bins)``, the ``dx``
        rows then the ``dy`` rows, each over its dimension's bins.
    """
    instructions = list(instructions)

    def logits(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor, VLAVocab]:
        policy = as_policy(model)
        vocab = policy.vocab  # tokens and bins are the scored policy's (a user checkpoint may differ)
        ids, mask = vocab.prompt_ids(instructions)
        bins = torch.as_tensor(vocab.codec.encode(actions))  # (N, 2)
        was_training = policy.training
        policy.eval()
        if prepare is not None:
            prepare()
        try:
            with torch.no_grad():
                out = torch.cat([action_logits(policy, pixels[i:i + _BATCH], ids[i:i + _BATCH], mask[i:i + _BATCH],
                                               bins[i:i + _BATCH])
                                 for i in range(0, len(bins), _BATCH)])  # (N, 2, V)
        finally:
            policy.train(was_training)
        return out, bins, vocab

    def nll(model: nn.Module) -> float:
        out, bins, vocab = logits(model)
        logp = torch.log_softmax(out.double(), dim=-1)
        targets = torch.stack([vocab.action_id(d, bins[:, d]) for d in range(len(DIMS))], 1)  # (N, 2)
        return float(-logp.gather(-1, targets[..., None]).mean())

    def log_probs(model: nn.Module) -> torch.Tensor:
        out, _, vocab = logits(model)
        return torch.cat([torch.log_softmax(out[:, d, vocab.dim_slice(d)], dim=-1) for d in range(len(DIMS))])

    return TaskLoss(nll, "action-token NLL (held-out demonstrations)", log_probs=log_probs)
