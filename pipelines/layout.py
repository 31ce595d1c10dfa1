"""Where a run keeps its outputs: the contract between pipeline stages and the report.

::

    runs/<domain>/<run>/
      run.json                 # domain, run name, resolved config, model identity, data description
      logs/<stage>.log
      <stage>/                 # examples, model, activations, probes, sae, features, steering, report
        headline.json          # the stage's headline numbers, each beside its control
        *.csv | *.parquet      # tables (the report links every one)
        *.png                  # figures (the report embeds every one)
        done.json              # written last: the stage finished (Snakemake's output marker)

A headline row is ``{"stage", "name", "value", "control", "control_label", "baseline",
"baseline_label", "verdict", "unit", "note", "source", "figure"}``: ``source`` names the table
(relative to the run) the value was read from, so a test can check that the report's numbers agree
with the run's tables; ``figure`` (optional) the PNG that shows it, which the report's findings link.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from sciscope.core.io import write_json

STAGES: tuple[str, ...] = ("examples", "model", "activations", "probes", "sae", "features", "steering", "report")
#: The stages each stage reads (the Snakefile's rule inputs; steering also reads features when the
#: adapter's plans steer with SAE features).
STAGE_INPUTS: dict[str, tuple[str, ...]] = {
    "examples": (), "model": ("examples",), "activations": ("model",), "probes": ("activations",),
    "sae": ("activations",), "features": ("sae",), "steering": ("activations",),
    "report": ("probes", "features", "steering"),
}
RUN_FILE = "run.json"
HEADLINE_FILE = "headline.json"
DONE_FILE = "done.json"
#: The report stage's feature cards (JSON, pictures inside) and their browser page.
CARDS_FILE = "cards.json"
FEATURES_PAGE = "features.html"


def stage_dir(run_dir: str | os.PathLike[str], stage: str) -> Path:
    """The folder of one stage inside a run."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages are {STAGES}")
    return Path(run_dir) / stage


def upstream(stage: str, *, steering_uses_features: bool = False) -> set[str]:
    """``stage`` and every stage it needs, directly or not."""
    inputs = dict(STAGE_INPUTS, steering=("activations", "features") if steering_uses_features else ("activations",))
    seen, todo = set(), [stage]
    while todo:
        s = todo.pop()
        if s not in seen:
            seen.add(s)
            todo.extend(inputs[s])
    return seen


#: the fields of a headline row (``higher_is_better`` is read, not written: it sets the verdict's sense)
HEADLINE_KEYS = ("stage", "name", "value", "control", "control_label", "baseline", "baseline_label", "verdict",
                 "unit", "note", "source", "figure")


def write_headline(directory: str | os.PathLike[str], rows: Iterable[Mapping[str, Any]]) -> None:
    """Write a stage's headline numbers (atomically).

    A row with a ``baseline`` (the strongest simple baseline of that number) and no ``verdict``
    gets one from the numbers (:func:`sciscope.core.verdict.verdict`; ``higher_is_better`` in
    the row, default True, sets its sense, and ``tolerance``, default 0, the margin within which
    the two are "no better than baseline": rows without a spread state theirs).
    """
    from sciscope.core.verdict import verdict

    clean = []
    for r in rows:
        row = {k: r.get(k) for k in HEADLINE_KEYS}
        if row["baseline"] is not None and row["verdict"] is None:
            row["verdict"] = verdict(row["value"], row["baseline"], higher_is_better=bool(r.get("higher_is_better", True)),
                                     tolerance=float(r.get("tolerance", 0.0)))
        clean.append(row)
    write_json(Path(directory) / HEADLINE_FILE, clean)


def read_headlines(run_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every stage's headline rows, in stage order."""
    rows: list[dict[str, Any]] = []
    for stage in STAGES:
        f = Path(run_dir) / stage / HEADLINE_FILE
        if f.is_file():
            rows.extend(json.loads(f.read_text()))
    return rows


def read_run_info(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The run's ``run.json`` (empty dict when missing)."""
    f = Path(run_dir) / RUN_FILE
    return json.loads(f.read_text()) if f.is_file() else {}
