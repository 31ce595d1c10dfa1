"""Activation patching (causal tracing): which sites (and positions) carry the difference.

Run the model on a clean and a corrupted input; then rerun the corrupted input with one site's
activation (or one position of it) replaced by the clean run's. A caller's metric scores each run;
the normalised effect ``(patched - corrupted) / (clean - corrupted)`` is 1 where the site alone
restores the clean behaviour and 0 where it carries nothing.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from .capture import _forward
from .errors import ShapeError
from .hooks import HookSet
from .sites import Aliases, Site, resolve_sites, to_canonical


@dataclass
class PatchResult:
    """Patching scores per site (and position).

    Attributes
    ----------
    table : DataFrame
        ``site``, ``position`` (-1 = all positions), ``score``, ``effect`` (normalised).
    clean_score, corrupted_score : float
        The metric on the unpatched runs (the two ends of the normalisation).
    """

    table: pd.DataFrame
    clean_score: float
    corrupted_score: float
    params: dict[str, Any]

    def matrix(self) -> pd.DataFrame:
        """Normalised effect as a site x position matrix."""
        return self.table.pivot(index="site", columns="position", values="effect").loc[
            list(dict.fromkeys(self.table.site))
        ]

    def plot(self, *, ax: Any = None, position_labels: Sequence[str] | None = None) -> Any:
        """Heatmap of the normalised effect (sites down, positions across)."""
        import matplotlib.pyplot as plt

        m = self.matrix()
        ax = ax or plt.subplots(figsize=(1.2 + 0.45 * m.shape[1], 1 + 0.35 * m.shape[0]))[1]
        im = ax.imshow(m.to_numpy(), cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto")
        ax.set_yticks(range(m.shape[0]), m.index, fontsize=7)
        labels = position_labels or ["all" if p == -1 else str(p) for p in m.columns]
        ax.set_xticks(range(m.shape[1]), labels, fontsize=7, rotation=90)
        ax.set_xlabel("position")
        ax.figure.colorbar(im, ax=ax, label="normalised effect")
        return ax

    def save(self, directory: str | os.PathLike[str]) -> None:
        """Write ``patching.csv`` and ``params.json``."""
        from .io import write_json, write_table

        write_table(Path(directory) / "patching.csv", self.table)
        write_json(Path(directory) / "params.json", {**self.params, "clean_score": self.clean_score, "corrupted_score": self.corrupted_score})


def activation_patching(
    model: nn.Module,
    clean: Any,
    corrupted: Any,
    sites: "Sequence[str | Site] | str | Site",
    metric: Callable[[Any], float],
    *,
    per_position: bool = False,
    aliases: Aliases | None = None,
    progress: bool = True,
) -> PatchResult:
    """Patch each site's clean activation into the corrupted run and score it.

    Parameters
    ----------
    model
        Any ``nn.Module``.
    clean, corrupted
        Model inputs of the same shape (dict of keyword arguments, tuple, or tensor).
    sites
        Sites to patch, one at a time.
    metric
        ``metric(model_output) -> float`` (e.g. the logit difference of two answers).
    per_position
        Also patch every position on its own (positions as the site's canonical ``P`` axis).
    """
    from tqdm.auto import tqdm

    resolved = resolve_sites(model, list(sites) if not isinstance(sites, (str, Site)) else sites, aliases)
    was_training = model.training
    model.eval()
    clean_acts: dict[str, torch.Tensor] = {}
    try:
        with torch.inference_mode():
            with HookSet() as hooks:
                for name, site, module in resolved:
                    hooks.read(module, site, lambda t, name=name: clean_acts.setdefault(name, t.detach().clone()))
                clean_score = float(metric(_forward(model, clean)))
            corrupted_score = float(metric(_forward(model, corrupted)))
            rows = []
            jobs: list[tuple[str, Site, nn.Module, int]] = []
            for name, site, module in resolved:
                jobs.append((name, site, module, -1))
                if per_position:
                    n_pos = to_canonical(clean_acts[name], site)[0].shape[1]
                    jobs.extend((name, site, module, p) for p in range(n_pos))
            for name, site, module, pos in tqdm(jobs, desc="patching", disable=not progress):
                source = clean_acts[name]

                def patch(t: torch.Tensor, source: torch.Tensor = source, site: Site = site, pos: int = pos, name: str = name) -> torch.Tensor:
                    if t.shape != source.shape:
                        raise ShapeError(f"site {name!r}: clean activation {tuple(source.shape)} vs corrupted {tuple(t.shape)}")
                    if pos == -1:
                        return source
                    h, back = to_canonical(t.clone(), site)
                    h[:, pos] = to_canonical(source, site)[0][:, pos]
                    return back(h)

                with HookSet() as hooks:
                    hooks.edit(module, site, patch)
                    score = float(metric(_forward(model, corrupted)))
                rows.append({"site": name, "position": pos, "score": score})
    finally:
        model.train(was_training)
    table = pd.DataFrame(rows)
    denom = clean_score - corrupted_score
    table["effect"] = (table.score - corrupted_score) / denom if denom != 0 else np.nan
    return PatchResult(table, clean_score, corrupted_score, {"sites": [n for n, _, _ in resolved], "per_position": per_position})
