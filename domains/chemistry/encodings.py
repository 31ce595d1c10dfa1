"""SMILES and SELFIES side by side: the same model recipe trained on each encoding.

A run's main model reads one encoding (config ``encoding``). With ``compare_encodings`` on (and
no user checkpoint), a *companion* model of the same size, steps and training molecules reads the
other one, so the report can set the two side by side on what differs between them:

* per-layer property probes (same targets, folds over the same scaffold groups, shuffled
  control), beside the ECFP4 baseline of the main sweep (:func:`compare_probes`);
* unsteered generation (alpha = 0) scored for validity, uniqueness, novelty against the training
  molecules and mean properties, with the same sampling seed (:func:`compare_generation`).
  SELFIES decodes every token string to a molecule; SMILES does not, which is the point of SELFIES.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from sciscope.core.io import write_table

if TYPE_CHECKING:
    from .adapter import ChemistryAdapter

__all__ = ["OTHER_ENCODING", "companion", "compare_generation", "compare_probes"]

OTHER_ENCODING = {"selfies": "smiles", "smiles": "selfies"}
_COLOURS = {"selfies": "#1f77b4", "smiles": "#d62728"}


def companion(adapter: ChemistryAdapter) -> ChemistryAdapter | None:
    """The same adapter reading the other encoding (None when off or for a user checkpoint).

    It shares the main adapter's molecules (same sample, splits, scaffolds) and run folder; its
    model is kept under ``<run>/model/checkpoint_<encoding>``.
    """
    c = adapter.config
    if not c.get("compare_encodings") or c.get("model"):
        return None
    other = type(adapter)({**c, "encoding": OTHER_ENCODING[c["encoding"]], "compare_encodings": False})
    other.run_dir = adapter.run_dir
    other.checkpoint_name = f"checkpoint_{other.config['encoding']}"
    other._obs = adapter.molecules
    other._invalid, other._data_notes = adapter._invalid, adapter._data_notes
    return other


def _best_per_target(summary: pd.DataFrame) -> pd.DataFrame:
    t = summary[summary["site"].astype(str) != ""].copy()
    idx = t.groupby("target", sort=False)["score_mean"].idxmax()
    return t.loc[idx].set_index("target")


def compare_probes(adapter: ChemistryAdapter, sweep: Any, out: Path, *, batch_size: int = 64) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
    """Probe the companion model's layers like the main sweep; table, figure and headline rows.

    Parameters
    ----------
    adapter
        The run's adapter (main encoding).
    sweep
        The main :class:`~sciscope.core.probe.ProbeSweepResult` (its targets, folds and seed are reused).
    out
        The probes stage folder: writes ``encoding_<enc>/`` (store + sweep),
        ``encoding_comparison.csv`` (one row per target and encoding) and ``encoding_comparison.png``.

    Returns
    -------
    (table, headline rows); both empty without a companion.
    """
    other = companion(adapter)
    if other is None:
        return pd.DataFrame(), []
    from sciscope.core import collect, probe_sweep

    enc_main, enc_other = adapter.config["encoding"], other.config["encoding"]
    model = other.model()
    ex = adapter.examples("all")
    folder = out / f"encoding_{enc_other}"
    store = collect(model, other.batches(ex, model, batch_size=batch_size), other.sites, out=folder / "store",
                    obs=ex.obs, pooling=other.pooling, aliases=other.aliases, seed=int(adapter.config["seed"]),
                    progress=False, extra_manifest={"domain": adapter.name, "encoding": enc_other})
    p = sweep.params
    res = probe_sweep(store, list(sweep.targets), cv=int(p["cv"]), groups=p.get("groups"), control=True,
                      seed=int(p["seed"]), progress=False)
    res.save(folder / "sweep")
    main_sum, other_sum = sweep.summary(), res.summary()
    write_table(folder / "summary.csv", other_sum)
    best = {enc_main: _best_per_target(main_sum), enc_other: _best_per_target(other_sum)}
    rows = []
    for target in sweep.targets:
        for enc in (enc_main, enc_other):
            b = best[enc].loc[target]
            rows.append({"target": target, "encoding": enc, "metric": b["metric"], "best_site": b["site"],
                         "best_score": float(b["score_mean"]), "score_std": float(b["score_std"]),
                         "control_at_best": float(b["control_mean"]),
                         "baseline": best[enc_main].loc[target].get("baseline", ""),
                         "baseline_score": float(best[enc_main].loc[target].get("baseline_mean", np.nan))})
    table = pd.DataFrame(rows)
    write_table(out / "encoding_comparison.csv", table)
    _plot_probe_comparison(main_sum, other_sum, enc_main, enc_other, out / "encoding_comparison.png")
    headline = []
    for target in sweep.targets:
        t = table[table["target"] == target].set_index("encoding")
        o, m = t.loc[enc_other], t.loc[enc_main]
        headline.append({
            "stage": "probes", "name": f"{target} ({o['metric']}), {enc_other} model", "value": o["best_score"],
            "control": o["control_at_best"], "control_label": "shuffled labels",
            "note": f"best site {o['best_site']}; the {enc_main} model {m['best_score']:.3f} at {m['best_site']}"
                    + (f"; {m['baseline']} {m['baseline_score']:.3f}" if m["baseline"] else ""),
            "source": "probes/encoding_comparison.csv"})
    return table, headline


def _plot_probe_comparison(main: pd.DataFrame, other: pd.DataFrame, enc_main: str, enc_other: str, path: Path) -> None:
    """Score vs layer per target: both encodings, the ECFP baseline (dashed), shuffled (dotted)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sciscope.core.plotting import save_figure

    targets = list(dict.fromkeys(main["target"]))
    fig, axes = plt.subplots(1, len(targets), figsize=(3.4 * len(targets), 3.2), squeeze=False, sharey=False)
    for ax, target in zip(axes[0], targets):
        for enc, s in ((enc_main, main), (enc_other, other)):
            t = s[(s["target"] == target) & (s["site"].astype(str) != "")].sort_values("layer")
            ax.errorbar(t["layer"], t["score_mean"], yerr=t["score_std"], marker="o", ms=3, lw=1.2, capsize=2,
                        color=_COLOURS.get(enc), label=f"{enc} model")
            ax.plot(t["layer"], t["control_mean"], ls=":", color=_COLOURS.get(enc), lw=1, label=f"{enc}: shuffled")
        t = main[(main["target"] == target) & (main["site"].astype(str) != "")]
        if "baseline_mean" in t and t["baseline_mean"].notna().any():
            ax.axhline(float(t["baseline_mean"].iloc[0]), color="0.3", ls="--", lw=1, label=str(t["baseline"].iloc[0]))
        ax.set_title(target, fontsize=10)
        ax.set_xlabel("layer")
        ax.set_ylabel(str(t["metric"].iloc[0]) if len(t) else "score")
    axes[0][0].legend(fontsize=7, loc="lower right")
    fig.suptitle("Property probes: SMILES vs SELFIES models (same size, steps, molecules)", fontsize=10)
    save_figure(fig, path)


def compare_generation(adapter: ChemistryAdapter, model: Any, out: Path) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
    """Unsteered samples of both causal LMs, scored alike (same count, temperature and seed).

    Writes ``generation_by_encoding.csv`` (one row per encoding). Returns (table, headline rows);
    empty when there is no companion or the models do not generate (masked LMs).
    """
    from .adapter import _is_causal, score_molecules
    from .model import generate

    other = companion(adapter)
    if other is None or not _is_causal(model):
        return pd.DataFrame(), []
    c = adapter.config
    obs = adapter.molecules
    train = set(obs.loc[obs["split"] == "train", "smiles"])
    rows = []
    for ad, m in ((adapter, model), (other, other.model())):
        mols = generate(m, ad.tokenizer, c["n_generate"], temperature=c["temperature"], seed=c["seed"])
        rows.append({"encoding": ad.config["encoding"], "n_generated": len(mols), **score_molecules(mols, train)})
    table = pd.DataFrame(rows)
    write_table(out / "generation_by_encoding.csv", table)
    t = table.set_index("encoding")
    headline = []
    for enc in t.index:
        o = OTHER_ENCODING[enc]
        headline.append({
            "stage": "steering", "name": f"generation validity, {enc} model (alpha = 0)", "value": float(t.loc[enc, "validity"]),
            "control": float(t.loc[o, "validity"]), "control_label": f"{o} model (same size, steps, molecules)",
            "note": f"uniqueness {t.loc[enc, 'uniqueness']:.2f}, novelty {t.loc[enc, 'novelty']:.2f} of {int(t.loc[enc, 'n_generated'])} samples",
            "source": "steering/generation_by_encoding.csv"})
    return table, headline
