"""Feature cards from a finished run, for notebooks: ``feature_card(run_dir, 12)`` shows inline.

The cards themselves are :mod:`sciscope.core.cards`; this module opens a run folder (its
``run.json``, adapter and :class:`~sciscope.core.context.RunContext`) so a notebook needs only the
run's path.

Examples
--------
>>> from sciscope.pipelines.cards import feature_card, feature_cards   # doctest: +SKIP
>>> cards = feature_cards("runs/chemistry/quick")       # the report's cards (top and control)
>>> feature_card("runs/chemistry/quick", cards[0].feature)  # any feature, built now; Jupyter draws it
"""

from __future__ import annotations

import os
from pathlib import Path

from sciscope.core.cards import FeatureCard, build_card, read_cards
from sciscope.core.errors import SciscopeError
from sciscope.pipelines.layout import CARDS_FILE, DONE_FILE

__all__ = ["feature_card", "feature_cards"]

_RUNS: dict[Path, object] = {}  # one Run per folder and process: its context memoises the SAE and latents


def _run(run_dir: str | os.PathLike[str]):
    from sciscope.pipelines.stages import Run

    path = Path(run_dir).resolve()
    if not (path / "features" / DONE_FILE).is_file():
        raise SciscopeError(f"{run_dir} has no finished features stage: run `sciscope run DOMAIN --until features` first")
    if path not in _RUNS:
        _RUNS[path] = Run(path, progress=False)
    return _RUNS[path]


def feature_card(run_dir: str | os.PathLike[str], feature: int) -> FeatureCard:
    """The card of any feature of a finished run, built now (Jupyter renders it inline).

    Parameters
    ----------
    run_dir
        A run folder whose features stage finished.
    feature
        The SAE latent's index.

    Returns
    -------
    FeatureCard
        With the adapter's pictures of its examples.
    """
    run = _run(run_dir)
    run.ctx.stage, run.ctx.subfolder = "report", ""
    if "features" not in run.ctx.live:  # read the features stage's tables once per run, not once per card
        run.ctx.live["features"] = run.ctx.features()
    return build_card(run.ctx, int(feature), selection="chosen", reason=f"feature {int(feature)}, asked for by name")


def feature_cards(run_dir: str | os.PathLike[str]) -> list[FeatureCard]:
    """The cards the report stage wrote (``report/cards.json``): top features, then the controls."""
    path = Path(run_dir) / "report" / CARDS_FILE
    if not path.is_file():
        raise SciscopeError(f"{run_dir} has no {path.relative_to(run_dir)}: run the report stage first")
    return read_cards(path)
