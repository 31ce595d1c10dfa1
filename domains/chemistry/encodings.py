"""SMILES and SELFIES side by side: the same model recipe trained on each encoding.

A run's main model reads one encoding (config ``encoding``). With ``compare_encodings`` on (and
no user checkpoint), the adapter declares a model *variant* of the same size, steps and training
molecules on the other encoding. The core captures it like the main model and fits the probe set
``encoding_comparison`` on it (same targets, folds over the same scaffold groups, shuffled
control); the analyses here set the two side by side: per-layer property probes (:func:`compare_probes`)
and unsteered generation (:func:`compare_generation`). SELFIES decodes every token string to a molecule;
SMILES does not, which is the point of SELFIES.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from sciscope.core.loading import is_causal
from sciscope.core.verdict import verdict_from_folds

if TYPE_CHECKING:
    from sciscope.core.context import RunContext

__all__ = ["OTHER_ENCODING", "compare_generation", "compare_probes"]

OTHER_ENCODING = {"selfies": "smiles", "smiles": "selfies"}
_COLOURS = {"selfies": "#1f77b4", "smiles": "#d62728"}


def _best_per_target(summary: pd.DataFrame) -> pd.DataFrame:
    t = summary[summary["site"].astype(str) != ""]
    return t.loc[t.groupby("target", sort=False)["score_mean"].idxmax()].set_index("target")


def compare_probes(ctx: "RunContext") -> list[dict[str, Any]]:
    """The variant's probes beside the main sweep: table, figure and headline rows (after the probes stage).

    Reads the main sweep (``ctx.probes()``) and the variant's (``ctx.live["probes:encoding_comparison"]``);
    writes ``encoding_<enc>/summary.csv`` (the variant's per-layer summary), ``encoding_comparison.csv``
    (one row per target and encoding) and ``encoding_comparison.png``. No rows without a variant.
    """
    ad = ctx.adapter
    other = ctx.live.get("probes:encoding_comparison")
    if not ad.variants or other is None:
        return []
    enc_main, enc_other = ad.config["encoding"], ad.variants[0]
    sweep = ctx.probes()
    main_sum, other_sum = sweep.summary(), other.summary()
    ctx.write_table(f"encoding_{enc_other}/summary.csv", other_sum)
    best = {enc_main: _best_per_target(main_sum), enc_other: _best_per_target(other_sum)}
    source = ctx.source("encoding_comparison.csv")
    rows, headline = [], []
    for target in sweep.targets:
        base = best[enc_main].loc[target]
        m, o = ({"target": target, "encoding": enc, "metric": b["metric"], "best_site": b["site"],
                 "best_score": float(b["score_mean"]), "score_std": float(b["score_std"]),
                 "control_at_best": float(b["control_mean"]), "baseline": base.get("baseline", ""),
                 "baseline_score": float(base.get("baseline_mean", np.nan))}
                for enc, b in ((e, best[e].loc[target]) for e in (enc_main, enc_other)))
        rows += [m, o]
        # the baseline (ECFP) was scored on the same molecules and scaffold folds in the main sweep
        judged = {}
        if m["baseline"] and np.isfinite(m["baseline_score"]):
            judged = {"baseline": m["baseline_score"], "baseline_label": m["baseline"],
                      "verdict": verdict_from_folds(o["best_score"], o["score_std"], m["baseline_score"],
                                                    float(base.get("baseline_std", np.nan)), int(ctx.config["probe_cv"]))}
        headline.append({
            "name": f"{target} ({o['metric']}), {enc_other} model", "value": o["best_score"],
            "control": o["control_at_best"], "control_label": "shuffled labels", **judged,
            "note": f"best site {o['best_site']}; the {enc_main} model {m['best_score']:.3f} at {m['best_site']}"
                    + (f"; {m['baseline']} {m['baseline_score']:.3f}" if m["baseline"] else ""),
            "source": source})
    ctx.write_table("encoding_comparison.csv", pd.DataFrame(rows))
    ctx.save_figure("encoding_comparison.png", _plot_probe_comparison(main_sum, other_sum, enc_main, enc_other))
    return headline


def _plot_probe_comparison(main: pd.DataFrame, other: pd.DataFrame, enc_main: str, enc_other: str) -> Any:
    """Score vs layer per target: both encodings, the ECFP baseline (dashed), shuffled (dotted)."""
    import matplotlib.pyplot as plt

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
    return fig


def compare_generation(ctx: "RunContext") -> list[dict[str, Any]]:
    """Unsteered (alpha = 0) samples of the main model and its encoding variant, scored alike by
    ``sample_scores`` (same count, temperature and seed) into ``generation_by_encoding.csv``, one row per
    encoding (after the steering stage). No rows without a variant or when the models do not generate (masked LMs).
    """
    ad = ctx.adapter
    if not ad.variants or not is_causal(ctx.model().config):
        return []
    rows = [{"encoding": m.tokenizer.encoding, "n_generated": ad.config["n_generate"], **ad.sample_scores(m)}
            for m in (ctx.model(), ctx.model(ad.variants[0]))]
    source = ctx.write_table("generation_by_encoding.csv", pd.DataFrame(rows))
    t = pd.DataFrame(rows).set_index("encoding")
    return [{"name": f"generation validity, {enc} model (alpha = 0)", "value": float(t.loc[enc, "validity"]),
             "control": float(t.loc[o, "validity"]), "control_label": f"{o} model (same size, steps, molecules)",
             "note": f"uniqueness {t.loc[enc, 'uniqueness']:.2f}, novelty {t.loc[enc, 'novelty']:.2f} "
                     f"of {int(t.loc[enc, 'n_generated'])} samples", "source": source}
            for enc, o in ((e, OTHER_ENCODING[e]) for e in t.index)]
