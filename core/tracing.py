"""Causal tracing across layers, components and positions (FCCT-style), with its controls.

An adapter supplies :class:`CounterfactualPairs`: clean and corrupted inputs that differ in one
concept (a molecule with and without a functional group, a northern and a southern place, a
monocyte and a B cell), aligned position by position, and a readout of the model's output. For
every layer x component (residual stream, attention output, MLP output) x position group,
:func:`trace` measures

* **restore**: the clean activation patched into the corrupted run, as a fraction of the total
  effect ``(score(patched) - score(corrupted)) / (score(clean) - score(corrupted))``;
* **knockouts**: the component zeroed, or set to its mean over the pairs, in the clean run, as the
  fraction of the total effect it removes ``(score(clean) - score(ablated)) / (score(clean) -
  score(corrupted))``;
* **control**: the activation of a *random other* clean example patched in (a derangement of the
  pairs), normalised the same way; a cell means something only where restore beats its control,
  and the largest restore is compared with the largest control over as many cells.

Scores are means over pairs before they are normalised (per-pair ratios explode where a pair's
clean and corrupted outputs nearly agree).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

#: ``readout(model_output) -> (B, ...)`` tensor the score is computed from (logits at the scored
#: position, the predicted field, a pooled embedding).
Readout = Callable[[Any], torch.Tensor]


@dataclass
class CounterfactualPairs:
    """Clean / corrupted inputs that differ in one concept, and how to score the model's output.

    Attributes
    ----------
    clean, corrupted
        Model inputs for ``B`` pairs (a dict of keyword arguments, a tuple or a tensor), the same
        structure and shapes; position ``p`` of pair ``i`` is the same slot in both (swap a token for
        one of the same length, an atom for an atom, a word for a word).
    readout
        ``readout(model_output) -> (B, ...)``: the differentiable part of the output that matters
        (the logits at the action-emitting position, the predicted next frame, ...).
    score
        Optional ``score(readout) -> (B,)``, larger for clean-like outputs (a logit difference, a probe
        read). None: each pair's readout projected on its own clean-minus-corrupted readout,
        ``<r - r_corrupted, r_clean - r_corrupted> / |r_clean - r_corrupted|^2`` (1 = clean, 0 = corrupted).
    position_groups
        ``{name: positions}`` on the residual stream's position axis (canonical ``P``): a list of
        ints, a slice, or a ``(B, P)`` boolean tensor for positions that differ per pair (the atoms
        of the functional group). ``"all"`` is always traced as well.
    concept
        What the pairs differ in (one line for the report).
    score_name
        What the score is.
    """

    clean: Any
    corrupted: Any
    readout: Readout
    score: Callable[[torch.Tensor], torch.Tensor] | None = None
    position_groups: Mapping[str, Any] = field(default_factory=dict)
    concept: str = ""
    score_name: str = "projection on the clean-minus-corrupted output"
