"""Marker recovery read two ways and against a baseline: the curated list and data-driven markers.

The curated panel (:data:`.markers.CANONICAL_MARKERS`) is one lab's list; a Wilcoxon rank-sum test
on the same cells (:meth:`ImmunologyAdapter.type_markers`) says what marks each type *in this data*.
Both lists are scored by the same rule -- a marker is recovered when a feature specific to its type
has it among its top ``top_genes`` driver genes -- beside random genes in the markers' place (chance)
and beside the same rule on the token-frequency list of the feature's cells
(:func:`.confounds.token_frequency_scores`), the baseline that could explain a recovery.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .confounds import OTHER, driver_ranks, paired_count_verdict, recovery, token_frequency_scores

if TYPE_CHECKING:
    from sciscope.core.context import RunContext

    from .adapter import ImmunologyAdapter

__all__ = ["MarkerRecovery", "data_markers", "recovery_summary"]


@dataclass
class MarkerRecovery:
    """The data-driven marker table and the headline fields of both lists.

    ``curated`` / ``data``: ``value`` (recovered), ``control`` (data only; the curated chance level
    comes from :func:`.features.marker_recovery`), ``baseline`` (row fields: ``baseline``,
    ``baseline_label``, ``verdict``) and ``note``.
    """

    table: pd.DataFrame
    curated: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)


def recovery_summary(ours: np.ndarray, theirs: np.ndarray, genes: list[str], label: str) -> dict[str, Any]:
    """Headline fields of a recovered-marker count against the baseline's on the same markers."""
    verdict, margin = paired_count_verdict(ours, theirs)
    got = [g for g, h in zip(genes, ours) if h]
    return {"value": int(np.sum(ours)),
            "baseline": {"baseline": int(np.sum(theirs)), "baseline_label": label, "verdict": verdict},
            "note": f"of {len(genes)}: {', '.join(got) or 'none'}; the token-frequency list recovers "
                    f"{', '.join(g for g, h in zip(genes, theirs) if h) or 'none'}; verdict margin {margin:.1f} "
                    "(2 sqrt of the markers only one list recovers)"}


def data_markers(adapter: "ImmunologyAdapter", ctx: "RunContext", latents: np.ndarray, drivers: pd.DataFrame,
                 ct: pd.DataFrame, curated: pd.DataFrame) -> MarkerRecovery:
    """Recovery of the curated and the data-driven (Wilcoxon) markers, each against the baseline.

    Parameters
    ----------
    adapter, ctx
        The run's adapter and context (cells, Wilcoxon markers, config).
    latents
        ``(n_cells, d_sae)`` SAE activations of the store's cells (the examples' order).
    drivers
        Gene x feature driver scores (:func:`.features.gene_drivers`).
    ct
        :func:`.features.cell_type_feature_table`.
    curated
        :func:`.features.marker_recovery`'s table; gains ``recovered_by_token_frequency``.

    Returns
    -------
    :class:`MarkerRecovery`; its table has one row per (type, Wilcoxon marker): ``cell_type``,
    ``gene``, ``wilcoxon_rank``, ``recovered`` (driver genes), ``recovered_by_token_frequency``.
    The merged ``"other"`` label gets no data-driven markers (a mix of types has none of its own).
    """
    c = adapter.config
    k, m, seed = int(c["top_genes"]), int(c["n_data_markers"]), int(c["seed"])
    genes = [str(g) for g in drivers.index]
    inputs = ctx.examples().inputs
    if len(inputs) != latents.shape[0]:
        raise ValueError(f"immunology: {len(inputs)} cells but {latents.shape[0]} latent rows")
    spec = ct[ct["specific"].fillna(False).astype(bool)]
    features_of = {str(t): g["feature"].to_numpy(dtype=np.int64) for t, g in spec.groupby("cell_type")}
    ranks = {"driver": driver_ranks(drivers), "frequency": driver_ranks(token_frequency_scores(inputs, latents, genes))}
    label = f"top-{k} most frequent tokens of the feature's cells"

    testable = curated["testable"].astype(bool).to_numpy()
    pairs = [(r.gene, r.cell_types.split("; ")) for r in curated[testable].itertuples()]
    freq_hit, _ = recovery(pairs, genes, features_of, ranks["frequency"], k, n_random=0)
    ours = curated.loc[testable, "recovered"].astype(bool).to_numpy()
    curated["recovered_by_token_frequency"] = None
    curated.loc[testable, "recovered_by_token_frequency"] = freq_hit
    out = MarkerRecovery(table=pd.DataFrame(), curated=recovery_summary(ours, freq_hit, [g for g, _ in pairs], label))

    wil = adapter.type_markers(max(50, int(c["n_markers"]), m))
    rows = [{"cell_type": t, "gene": g, "wilcoxon_rank": i + 1} for t, gs in wil.items() if t != OTHER
            for i, g in enumerate(gs[:m])]
    table = pd.DataFrame(rows, columns=["cell_type", "gene", "wilcoxon_rank"])
    dpairs = [(r.gene, [r.cell_type]) for r in table.itertuples()]
    hit, control = recovery(dpairs, genes, features_of, ranks["driver"], k, seed=seed)
    fhit, _ = recovery(dpairs, genes, features_of, ranks["frequency"], k, n_random=0)
    table["n_specific_features"] = [int(len(features_of.get(t, []))) for t in table["cell_type"]]
    table["recovered"], table["recovered_by_token_frequency"] = hit, fhit
    out.table = table
    names = [f"{g} ({t})" for g, t in zip(table["gene"], table["cell_type"])]
    out.data = {**recovery_summary(hit, fhit, names, label), "control": control}
    top = ", ".join(f"{t}: {'/'.join(gs[:m])}" for t, gs in wil.items() if t != OTHER)
    out.data["note"] += f"; Wilcoxon on the same cells: {top}; types without a specific feature cannot recover theirs"
    return out
