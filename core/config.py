"""The config-key table: one declaration per key, from which everything about it derives.

A :class:`Key` gives a key's default (hence its type), its range or choices, and the first
pipeline stage a change reruns. Validation (:func:`check_keys`), the CLI's ``--set`` parsing
(values coerced to the default's type by :func:`sciscope.core.adapter.merge_config`) and
Snakemake's rerun triggers (each rule's params carry the keys of its stage) all read this table,
so a key is declared once::

    class MyAdapter(DomainAdapter):
        config_keys = {
            "n_cells": Key(700, min=10, help="cells after subsampling"),
            "n_layers": Key(4, stage="model", min=1),
            "encoding": Key("selfies", choices=("selfies", "smiles")),
        }
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError

#: The entry-point group domain adapters register under (here, where reading it imports nothing heavy).
ENTRY_POINT_GROUP = "sciscope.domains"

STAGE_ORDER: tuple[str, ...] = ("examples", "model", "activations", "probes", "sae", "features", "steering", "report")


@dataclass(frozen=True)
class Key:
    """One configuration key.

    Attributes
    ----------
    default
        The default value; its type is the key's type (``None``: optional number or string).
    stage
        The first stage a change affects (it and everything downstream rerun).
    min, max
        Inclusive bounds for numbers (every element of a list of numbers).
    choices
        Allowed values (every element of a list).
    help
        One line for documentation and error messages.
    """

    default: Any
    stage: str = "examples"
    min: float | None = None
    max: float | None = None
    choices: Sequence[Any] | None = None
    help: str = ""

    def __post_init__(self) -> None:
        if self.stage not in STAGE_ORDER:
            raise ValueError(f"Key stage {self.stage!r} is not a stage; stages are {STAGE_ORDER}")

    def check(self, source: str, name: str, value: Any) -> None:
        """Raise :class:`ConfigError` naming ``name`` when ``value`` is out of range or not a choice."""
        if value is None:
            return
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        for v in items:
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"{source}: config key {name!r} must be a finite number, got {v!r}")
            if self.choices is not None and v not in self.choices:
                raise ConfigError(f"{source}: config key {name!r} must be one of {list(self.choices)}, got {v!r}")
            if (self.min is not None or self.max is not None) and not isinstance(v, (int, float)):
                raise ConfigError(f"{source}: config key {name!r} expects numbers, got {v!r}")
            if self.min is not None and v < self.min:
                raise ConfigError(f"{source}: config key {name!r} must be >= {self.min:g}, got {v!r}")
            if self.max is not None and v > self.max:
                raise ConfigError(f"{source}: config key {name!r} must be <= {self.max:g}, got {v!r}")


def check_keys(source: str, keys: Mapping[str, Key], config: Mapping[str, Any]) -> None:
    """Check every declared key's range and choices in a merged config."""
    for name, key in keys.items():
        if name in config:
            key.check(source, name, config[name])


#: The pipeline's own keys (every run has them beside the adapter's).
PIPELINE_KEYS: dict[str, Key] = {
    "seed": Key(0, "examples", help="seeds every stochastic step"),
    "batch_size": Key(64, "activations", min=1),
    "capture_shards": Key(1, "activations", min=1, help="capture split over this many jobs, then merged"),
    # Lightning options for every training in the run (the adapter's model, the SAE)
    "accelerator": Key("cpu", "model"),
    "devices": Key(1, "model", min=1),
    "num_nodes": Key(1, "model", min=1),
    "strategy": Key("auto", "model"),
    "probe_cv": Key(5, "probes", min=2),
    "sae_architecture": Key("topk", "sae"),
    "sae_expansion": Key(8, "sae", min=1),
    "sae_k": Key(32, "sae", min=1),
    "sae_steps": Key(2000, "sae", min=1),
    "sae_batch_size": Key(512, "sae", min=1),
    "sae_lr": Key(1e-3, "sae", min=0),
    "sae_rows": Key("auto", "activations", choices=("auto", "positions", "pooled"),
                    help="what the SAE learns from: one row per position (token, atom, gene, patch) or the pooled "
                         "rows; auto: positions when the adapter mean-pools, else its pooled position"),
    "outlier_norm": Key(10.0, "activations", min=0, help="leave positions whose norm exceeds this many times the median "
                                                        "out of mean pooling and of the SAE's rows (massive activations; 0: keep all)"),
    "sae_max_rows": Key(200_000, "sae", min=2, help="per-position rows: train on at most this many (whole examples)"),
    "sae_max_epochs": Key(50.0, "sae", min=0, help="cap the steps at this many passes over the training rows (0: no cap)"),
    "sae_patience": Key(4, "sae", min=0, help="stop after this many checks without a gain in validation "
                                              "explained variance (0: train every step)"),
    "sae_precision": Key("32-true", "sae", choices=("32-true", "bf16-mixed"),
                         help="SAE training precision: bf16-mixed autocasts the step's matmuls to bf16 (about 1.6x "
                              "faster on CPUs with AMX, held-out explained variance within 0.005; slower without)"),
    "sae_stability": Key(True, "sae", help="train the SAE once more from another seed: the quality table's stability"),
    "sae_transcoder": Key(True, "sae", help="also train a transcoder of the SAE layer's MLP (its input -> its output) "
                                            "and attribute the tracing score to its features (about as long as the SAE)"),
    "feature_top_k": Key(10, "features", min=1),
    "card_top": Key(12, "report", min=0, help="feature cards for the top features by the domain's measure of interest"),
    "card_controls": Key(6, "report", min=0, help="feature cards for random live features (the control)"),
    "steer_alphas": Key([-2.0, -1.0, -0.5, 0.5, 1.0, 2.0], "steering"),
    "steer_scale": Key("absolute", "steering", choices=("absolute", "relative")),
    "steer_n_random": Key(10, "steering", min=0, help="random controls per steering plan"),
    # 1 by default: 16 copies measured 0.85-0.91x of one job at a time on this CPU, at the quick
    # profiles and at the tests' tiny sizes alike (benchmarks/bench_steering_batched.py)
    "steer_copies": Key(1, "steering", min=1, help="(condition, alpha) jobs of a plan evaluated as copies of one batch "
                                                  "when its scorer allows (same numbers as 1); meant for devices where "
                                                  "one large forward beats many small ones"),
}


def pipeline_defaults() -> dict[str, Any]:
    """``{key: default}`` of the pipeline keys."""
    return {k: key.default for k, key in PIPELINE_KEYS.items()}
