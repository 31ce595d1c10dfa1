"""Sparse-autoencoder features vs functional groups (after the features stage)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from sciscope.core.context import RunContext

    from .adapter import ChemistryAdapter

__all__ = ["GROUP_AUROC_MIN_FRACTION", "draw_top_molecules", "functional_groups", "group_atoms", "group_auroc_table",
           "group_auroc_statistic", "molecule_grid"]

#: A functional group counts for a feature's ``group_auroc`` (its card ranking) only when at least this
#: fraction of the molecules has it, and as many lack it. Rarer groups let a feature that fires on a
#: handful of molecules reach a high AUROC by chance: aldehyde (13 of 3,000 molecules in the quick run)
#: reaches 0.74 on shuffled labels.
GROUP_AUROC_MIN_FRACTION = 0.01


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


def group_auroc_statistic(adapter: "ChemistryAdapter") -> Any:
    """The ``group_auroc`` feature statistic: per feature, its largest AUROC for "the molecule has the
    group" over the functional groups carried by at least :data:`GROUP_AUROC_MIN_FRACTION` of the
    molecules (and lacking in as many).

    AUROC is rank-based (Mann-Whitney U over the rows; ties share their mean rank), so it is the same
    number the features stage's associations report for a group tested per molecule. It is the
    chemistry cards' ranking: the default ranking (the |effect| of the strongest significant association
    over every concept) puts rare property values first (7 or 8 rings: a dozen molecules).

    Returns
    -------
    callable
        ``fn(acts (n_rows, n_features), obs) -> DataFrame`` with one column ``group_auroc`` (NaN where
        no group qualifies).
    """
    from scipy.stats import rankdata

    def fn(acts: np.ndarray, obs: pd.DataFrame) -> pd.DataFrame:
        acts = np.asarray(acts, dtype=np.float64)
        n = acts.shape[0]
        k = max(int(adapter.config["min_group_count"]), int(np.ceil(GROUP_AUROC_MIN_FRACTION * n)))
        groups = [g for g in adapter.group_names if g in obs.columns]
        labels = obs[groups].to_numpy(dtype=bool) if groups else np.zeros((n, 0), dtype=bool)
        n_pos = labels.sum(axis=0)
        keep = (n_pos >= k) & (n - n_pos >= k)
        labels, n_pos = labels[:, keep], n_pos[keep].astype(np.float64)
        best = np.full(acts.shape[1], np.nan)
        if labels.shape[1] and n:
            ranks = rankdata(acts, axis=0)  # (n_rows, n_features)
            u = labels.T.astype(np.float64) @ ranks - (n_pos * (n_pos + 1) / 2)[:, None]  # (n_groups, n_features)
            best = (u / (n_pos * (n - n_pos))[:, None]).max(axis=0)
        return pd.DataFrame({"group_auroc": best})

    return fn


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


def group_atoms(mol: Any, smarts: str | None) -> list[int]:
    """Atom indices of ``mol`` in any match of ``smarts`` (sorted; empty without a pattern or a match)."""
    from rdkit import Chem

    patt = Chem.MolFromSmarts(smarts) if smarts else None
    if patt is None or mol is None:
        return []
    return sorted({a for hit in mol.GetSubstructMatches(patt) for a in hit})


def molecule_grid(mols: list[Any], legends: list[str], *, per_row: int = 4, size: tuple[int, int] = (260, 200),
                  atoms: list[list[int]] | None = None, atom_colours: list[dict[int, tuple[float, float, float]]] | None = None,
                  bonds: list[list[int]] | None = None, bond_colours: list[dict[int, tuple[float, float, float]]] | None = None,
                  legend_size: int = 16) -> bytes:
    """PNG bytes of an RDKit (Cairo) grid of molecules, with a legend under each and highlighted atoms.

    Parameters
    ----------
    mols, legends
        The molecules and one legend each.
    per_row, size
        Molecules per row and the pixel size of each cell.
    atoms, atom_colours
        Per molecule, the atoms to highlight and (optionally) their RGB colours in [0, 1] (RDKit's
        default highlight colour without).
    bonds, bond_colours
        The same for bonds.
    legend_size
        Legend font size in pixels.
    """
    from rdkit.Chem.Draw import rdMolDraw2D

    n = len(mols)
    rows = max(1, -(-n // per_row))
    cols = min(per_row, max(1, n))
    drawer = rdMolDraw2D.MolDraw2DCairo(cols * size[0], rows * size[1], size[0], size[1])
    opts = drawer.drawOptions()
    opts.legendFontSize = legend_size
    opts.legendFraction = 0.16
    opts.clearBackground = True
    opts.highlightRadius = 0.4  # RDKit's 0.3 hides the colour behind small atoms' labels
    kw: dict[str, Any] = {"legends": list(legends)}
    if atoms is not None:
        kw["highlightAtoms"] = [list(map(int, a)) for a in atoms]
    if atom_colours is not None:
        kw["highlightAtomColors"] = atom_colours
    if bonds is not None:
        kw["highlightBonds"] = [list(map(int, b)) for b in bonds]
    if bond_colours is not None:
        kw["highlightBondColors"] = bond_colours
    drawer.DrawMolecules(list(mols), **kw)
    drawer.FinishDrawing()
    return drawer.GetDrawingText()


def draw_top_molecules(ctx: "RunContext", table: pd.DataFrame, acts: np.ndarray, obs: pd.DataFrame) -> None:
    """RDKit drawings (``top_molecules_<group>.png``) of the top ``n_draw_molecules`` molecules of each
    row's best feature; matches of the group's SMARTS are highlighted, legends give the activation and
    whether the molecule has the group."""
    from rdkit import Chem

    from sciscope.core.io import atomic_path

    for r in table.itertuples():
        f = int(r.best_feature)
        mols, legends, highlights = [], [], []
        for i in np.argsort(-acts[:, f], kind="stable")[: ctx.adapter.config["n_draw_molecules"]]:
            m = Chem.MolFromSmiles(str(obs["smiles"].iloc[i]))
            if m is None:
                continue
            hit = group_atoms(m, r.smarts)
            mols.append(m)
            highlights.append(hit)
            legends.append(f"feature {f}: {acts[i, f]:.2f} ({'has' if hit else 'no'} {r.group}, AUROC {r.auroc:.2f})")
        if mols:
            png = molecule_grid(mols, legends, per_row=4, size=(260, 200), atoms=highlights, legend_size=13)
            with atomic_path(ctx.output(f"top_molecules_{r.group}.png")) as tmp:
                tmp.write_bytes(png)
