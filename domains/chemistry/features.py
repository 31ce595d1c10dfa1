"""Sparse-autoencoder features vs functional groups (after the features stage)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from sciscope.core.context import RunContext

    from .adapter import ChemistryAdapter

__all__ = ["draw_top_molecules", "functional_groups", "group_auroc_table"]


def group_auroc_table(adapter: "ChemistryAdapter", analysis: Any) -> pd.DataFrame:
    """Per functional group present on both sides: its best SAE feature by AUROC for "has the group", beside
    the best AUROC any feature reaches on shuffled labels (the core's control associations)."""
    obs = adapter.molecules
    smarts = adapter.groups.set_index("name")["smarts"]
    a = analysis.associations
    a = a[(a["stat"] == "auroc") & a["concept"].isin(adapter.group_names)]
    ctrl = analysis.control_associations
    rows = []
    for g in adapter.group_names:
        t = a[a["concept"] == g]
        t = t[np.isfinite(t["statistic"].to_numpy(dtype=np.float64))]
        if t.empty:
            continue
        best = t.loc[t["statistic"].idxmax()]
        row = {"group": g, "smarts": smarts[g], "prevalence": float(obs[g].mean()),
               "best_feature": int(best["feature"]), "auroc": float(best["statistic"]), "q": float(best["q"]),
               "significant": bool(best["significant"]), "n_features_significant": int(t["significant"].sum())}
        if ctrl is not None:
            c = ctrl[(ctrl["stat"] == "auroc") & (ctrl["concept"] == g)]
            row["auroc_shuffled"] = float(np.nanmax(c["statistic"].to_numpy(dtype=np.float64))) if len(c) else np.nan
        rows.append(row)
    table = pd.DataFrame(rows)
    return table.sort_values("auroc", ascending=False, kind="stable").reset_index(drop=True) if rows else table


def functional_groups(ctx: "RunContext") -> list[dict[str, Any]]:
    """``functional_groups.csv`` and its headline rows; ``top_molecules_<group>.png`` for the
    ``n_draw_groups`` best-matched groups."""
    ad = ctx.adapter
    table = group_auroc_table(ad, ctx.features())
    source = ctx.write_table("functional_groups.csv", table)
    latents = ctx.latents()
    draw_top_molecules(ctx, table.head(ad.config["n_draw_groups"]), latents.array("latents"), latents.obs)
    return [{"name": f"best feature AUROC: {r.group}", "value": r.auroc, "control": getattr(r, "auroc_shuffled", None),
             "control_label": "best AUROC on shuffled labels",
             "note": f"feature {r.best_feature}; prevalence {r.prevalence:.1%}; q = {r.q:.2g}", "source": source}
            for r in table.itertuples()]


def draw_top_molecules(ctx: "RunContext", table: pd.DataFrame, acts: np.ndarray, obs: pd.DataFrame) -> None:
    """RDKit drawings (``top_molecules_<group>.png``) of the top ``n_draw_molecules`` molecules of each
    row's best feature; matches of the group's SMARTS are highlighted, legends give the activation and
    whether the molecule has the group."""
    from rdkit import Chem
    from rdkit.Chem import Draw

    from sciscope.core.io import atomic_path

    for r in table.itertuples():
        f, patt = int(r.best_feature), Chem.MolFromSmarts(r.smarts)
        mols, legends, highlights = [], [], []
        for i in np.argsort(-acts[:, f], kind="stable")[: ctx.adapter.config["n_draw_molecules"]]:
            m = Chem.MolFromSmiles(str(obs["smiles"].iloc[i]))
            if m is None:
                continue
            match = m.GetSubstructMatches(patt)
            mols.append(m)
            highlights.append(sorted({a for hit in match for a in hit}))
            legends.append(f"feature {f}: {acts[i, f]:.2f} ({'has' if match else 'no'} {r.group}, AUROC {r.auroc:.2f})")
        if mols:
            img = Draw.MolsToGridImage(mols, molsPerRow=4, subImgSize=(260, 200), legends=legends, highlightAtomLists=highlights)
            with atomic_path(ctx.output(f"top_molecules_{r.group}.png")) as tmp:
                img.save(str(tmp), format="PNG")
