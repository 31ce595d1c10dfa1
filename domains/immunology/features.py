"""What the immunology adapter reads off SAE features: cell types and technical covariates (each
beside the same rule on shuffled labels), the gene tokens a feature reads, canonical markers among
them, and the results AnnData."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from sciscope.core.errors import ShapeError
from sciscope.core.io import atomic_path

from .markers import marker_table

if TYPE_CHECKING:
    from .adapter import ImmunologyAdapter

__all__ = ["cell_type_feature_table", "gene_drivers", "marker_recovery", "results_anndata",
           "technical_feature_table", "token_shares", "top_driver_genes", "write_h5ad"]

TECHNICAL = ("log10_library_size", "n_genes_detected", "percent_mito")


def cell_type_feature_table(analysis: Any, threshold: float) -> pd.DataFrame:
    """Per feature: its best cell type by one-vs-rest AUROC, q, and whether it is specific.

    A feature is *specific* when that AUROC >= ``threshold`` and q < 0.05; the same rule on the
    shuffled-label associations gives ``specific_shuffled`` (the control).
    """
    cols = ["feature", "cell_type", "auroc", "q", "significant"]

    def best(assoc: pd.DataFrame | None, suffix: str = "") -> pd.DataFrame:
        a = pd.DataFrame(columns=cols) if assoc is None or assoc.empty else assoc
        if len(a):
            a = a[(a["concept"] == "cell_type") & (a["stat"] == "auroc")]
            a = a[np.isfinite(a["statistic"].to_numpy(dtype=np.float64))]
            a = a.sort_values(["feature", "statistic"], ascending=[True, False], kind="stable").drop_duplicates("feature")
            a = a.rename(columns={"value": "cell_type", "statistic": "auroc"})[cols]
        a = a.assign(specific=a["significant"].astype(bool) & (a["auroc"] >= threshold))
        return a.rename(columns={c: c + suffix for c in [*cols[1:], "specific"]})

    out = best(analysis.associations).merge(best(analysis.control_associations, "_shuffled"), on="feature", how="left")
    return analysis.density[["feature", "density"]].merge(out, on="feature", how="left").reset_index(drop=True)


def technical_feature_table(analysis: Any, covariates: list[str], threshold: float, ct: pd.DataFrame) -> pd.DataFrame:
    """Per technical covariate: features with |Spearman rho| >= ``threshold`` and q < 0.05, beside
    the count on shuffled labels and the features that are also cell-type-specific (``ct``)."""
    specific = set(ct.loc[ct["specific"].fillna(False).astype(bool), "feature"])
    rows = []
    for cov in covariates:
        hits, rho = [], []  # observed, shuffled
        for a in (analysis.associations, analysis.control_associations):
            empty = a is None or a.empty
            a = pd.DataFrame(columns=["feature", "effect", "significant"]) if empty else a[a["concept"] == cov]
            e = a["effect"].abs().to_numpy(dtype=np.float64)
            hits.append(set(a.loc[a["significant"].astype(bool).to_numpy() & (e >= threshold), "feature"].astype(int)))
            rho.append(float(e[np.isfinite(e)].max()) if np.isfinite(e).any() else float("nan"))
        found = hits[0]
        rows.append({"covariate": cov, "n_features": len(found), "n_features_shuffled": len(hits[1]), "max_abs_rho": rho[0],
                     "max_abs_rho_shuffled": rho[1], "n_also_cell_type_specific": len(found & specific),
                     "features": " ".join(str(f) for f in sorted(found)[:50])})
    return pd.DataFrame(rows)


def token_shares(sae: Any, h: torch.Tensor, position_mask: torch.Tensor, *,
                 per_position: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Each gene token's exact share of its cell's SAE feature.

    An SAE that learnt gene tokens (``per_position``; the pipeline's default) gives a cell the mean
    code of its gene tokens, so the shares ``m_p code(h_p) / P`` (``m`` the gene-token mask,
    ``P = sum_p m_p``) add up to the cell's latents. An SAE that learnt pooled cell embeddings
    ``x = sum_p m_p h_p / P`` has the affine pre-activation ``pre(x) = (x - b_dec) W_enc + b_enc =
    sum_p m_p pre(h_p) / P``: the shares ``m_p pre(h_p) / P`` add up to the cell's pre-activation.

    Parameters
    ----------
    sae
        A :class:`~sciscope.core.sae.SparseAutoencoder` (``pre_acts``).
    h
        ``(B, P, D)`` activations of every position at the SAE's site.
    position_mask
        ``(B, P)`` bool, the gene tokens.

    Returns
    -------
    (shares ``(B, P, F)``, pooled cell embeddings ``(B, D)``)
    """
    m = position_mask.to(h.dtype)
    n_pos = m.sum(1).clamp_min(1.0)
    pooled = (h * m[..., None]).sum(1) / n_pos[:, None]
    per_token = sae.encode(h) if per_position else sae.pre_acts(h)  # (B, P, F)
    return per_token * (m / n_pos[:, None])[..., None], pooled


def gene_drivers(adapter: "ImmunologyAdapter", model: nn.Module, sae: Any, site: str | None = None, *,
                 per_position: bool | None = None) -> pd.DataFrame:
    """Gene x feature driver scores: gene ``g``'s share of feature ``f`` (:func:`token_shares`)
    summed over the cells where ``f`` fires, divided by how many cells that is.

    ``per_position`` (default: whether the run's SAE learnt positions, ``ctx.sae_row_mode``) reads
    the SAE as it was trained: codes of gene tokens, or the pre-activation of pooled embeddings.

    It says which gene tokens the feature reads at its layer (not which input genes cause it through
    earlier layers). The store holds pooled embeddings only, so this runs the model once more.

    Returns
    -------
    DataFrame ``(n_genes, d_sae)``, index = vocabulary genes, plus ``attrs["n_active"]``.
    """
    from sciscope.core.capture import capture

    site, vocab = site or adapter.sae_site, adapter.vocabulary
    if per_position is None:
        per_position = adapter.ctx.sae_row_mode == "positions"
    G = torch.zeros(vocab.vocab_size, int(sae.cfg.d_sae), dtype=torch.float64)
    n_active = torch.zeros(int(sae.cfg.d_sae), dtype=torch.float64)
    was = model.training
    model.eval()
    try:
        with capture(model, [site], aliases=adapter.aliases) as cap, torch.inference_mode():
            for b in adapter.batches(adapter.examples("all"), model, batch_size=64):
                cap.clear()
                model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
                pm = b["position_mask"]
                share, pooled = token_shares(sae, cap.records[site][0], pm, per_position=per_position)  # (B, P, F), (B, D)
                active = share.sum(1) > 0 if per_position else sae.encode(pooled) > 0
                G.index_add_(0, b["input_ids"][pm], (share * active[:, None, :])[pm].double())
                n_active += active.sum(0).double()
    finally:
        model.train(was)
    ids = vocab.gene_ids()
    name = {i: g for g, i in vocab.ids.items()}
    df = pd.DataFrame((G[ids] / n_active.clamp_min(1)).numpy().astype(np.float32), index=[name[int(i)] for i in ids])
    df.attrs["n_active"] = n_active.numpy()
    return df


def top_driver_genes(drivers: pd.DataFrame, k: int) -> pd.DataFrame:
    """Long table: the ``k`` genes with the largest driver score per live feature."""
    n_active, D, genes = drivers.attrs.get("n_active"), drivers.to_numpy(), drivers.index.to_numpy()
    rows = [{"feature": f, "rank": r + 1, "gene": genes[g], "driver_score": float(D[g, f])}
            for f in range(D.shape[1]) if n_active is None or n_active[f] > 0
            for r, g in enumerate(np.argsort(-D[:, f], kind="stable")[:k])]
    return pd.DataFrame(rows, columns=["feature", "rank", "gene", "driver_score"])


def marker_recovery(adapter: "ImmunologyAdapter", analysis: Any, drivers: pd.DataFrame, ct: pd.DataFrame, *,
                    n_random: int = 50) -> tuple[pd.DataFrame, float]:
    """Canonical markers recovered by the driver genes of a cell-type-specific feature.

    A testable marker (gene in the vocabulary, cell type in the data) is *recovered* when a feature
    specific to one of its cell types (``ct``) has it among its top ``top_genes`` driver genes. Also
    listed: the best feature for its types, its driver rank there, and its Wilcoxon rank in the type.

    Returns
    -------
    (table, control): ``control`` is the mean number recovered when each testable marker is
    replaced by a random vocabulary gene (``n_random`` seeded draws): the chance level.
    """
    k = adapter.config["top_genes"]
    mt = marker_table(adapter.obs["cell_type"].cat.categories, [g for g in adapter.readable_genes if g in set(drivers.index)])
    a = analysis.associations
    a = a[(a["concept"] == "cell_type") & (a["stat"] == "auroc") & np.isfinite(a["statistic"].to_numpy(dtype=np.float64))]
    D = drivers.to_numpy()
    gene_pos = {str(g).upper(): i for i, g in enumerate(drivers.index)}
    ranks = np.empty_like(D, dtype=np.int64)  # rank of every gene within every feature's driver scores (1 = top)
    np.put_along_axis(ranks, np.argsort(-D, axis=0, kind="stable"), np.arange(1, D.shape[0] + 1)[:, None].repeat(D.shape[1], 1), 0)
    wil = adapter.type_markers(max(50, adapter.config["n_markers"]))
    spec = ct[ct["specific"].fillna(False).astype(bool)]
    feats_of = {r.gene: spec.loc[spec["cell_type"].isin(r.cell_types.split("; ")), "feature"].to_numpy(dtype=np.int64)
                for r in mt.itertuples() if r.testable}
    rows = []
    for r in mt.itertuples():
        row = {"gene": r.gene, "marks": r.marks, "cell_types": r.cell_types, "gene_in_data": r.gene_in_data,
               "type_in_data": r.type_in_data, "testable": r.testable, "recovered": None}
        if r.testable:
            expected, g, feats = r.cell_types.split("; "), gene_pos[r.gene.upper()], feats_of[r.gene]
            best_rank = int(ranks[g, feats].min()) if feats.size else None
            t = a[a["value"].isin(expected)]
            bf = t.loc[t["statistic"].idxmax()] if len(t) else None
            de = [wil.get(e, []).index(r.gene) + 1 for e in expected if r.gene in wil.get(e, [])]
            row.update({
                "n_specific_features": int(feats.size), "best_driver_rank_in_specific": best_rank,
                "recovered": bool(best_rank is not None and best_rank <= k),
                "best_feature": None if bf is None else int(bf["feature"]),
                "best_feature_type": None if bf is None else str(bf["value"]),
                "best_feature_auroc": None if bf is None else float(bf["statistic"]),
                "driver_rank_in_best_feature": None if bf is None else int(ranks[g, int(bf["feature"])]),
                "wilcoxon_rank_in_type": min(de) if de else None,
            })
        rows.append(row)
    rng = np.random.default_rng([adapter.config["seed"], 0x3A4])
    counts = [sum(int(f.size > 0 and ranks[int(rng.integers(D.shape[0])), f].min() <= k) for f in feats_of.values())
              for _ in range(n_random if feats_of else 0)]
    return pd.DataFrame(rows), float(np.mean(counts)) if counts else float("nan")


def results_anndata(adapter: "ImmunologyAdapter", store: Any, latents: np.ndarray, drivers: pd.DataFrame | None = None,
                    **tables: pd.DataFrame) -> Any:
    """An AnnData of the kept cells with the run's results attached.

    ``X``: log-normalised expression (``var['in_vocabulary']``, ``var['median']``); ``obs``: the
    store's obs; ``obsm``: ``X_<site>`` embeddings of every captured site, ``X_sae``, ``X_pca``;
    ``varm['sae_driver']``: gene x feature driver scores (0 off the vocabulary); ``uns``: ``tables``.
    """
    import anndata as ad

    obs = store.obs.copy().reset_index(drop=True)
    obs.index = obs["cell_id"].astype(str).to_numpy() if "cell_id" in obs else obs.index.astype(str)
    for col in obs.columns[obs.dtypes == object]:  # h5ad wants plain column types
        obs[col] = obs[col].astype(str)
    cd, vocab = adapter.cells, adapter.vocabulary
    var = pd.DataFrame({"in_vocabulary": [g in vocab.ids for g in cd.genes],
                        "median": [vocab.medians.get(g, np.nan) for g in cd.genes]}, index=pd.Index([str(g) for g in cd.genes]))
    adata = ad.AnnData(X=adapter.log_expression(obs), obs=obs, var=var)
    for site in store.sites:
        adata.obsm[f"X_{site}"] = np.asarray(store.array(site), dtype=np.float32)
    lat = np.asarray(latents, dtype=np.float32)
    if lat.shape[0] != adata.n_obs:
        raise ShapeError(f"immunology: latents have {lat.shape[0]} rows, the store {adata.n_obs}")
    adata.obsm["X_sae"] = lat
    adata.obsm["X_pca"] = adapter.expression_views(obs)[1]
    if drivers is not None:
        adata.varm["sae_driver"] = drivers.reindex(adata.var_names).fillna(0.0).to_numpy(dtype=np.float32)
    n = adapter.data_notes
    adata.uns["sciscope"] = {"domain": adapter.name, "sae_site": adapter.sae_site, "sites": list(store.sites),
                             "pooling": adapter.pooling, **{k: n[k] for k in ("input_type", "input_type_reason", "matrix",
                                                                               "source", "n_genes_unknown", "max_genes")}}
    adata.uns.update({name: plain_frame(t) for name, t in tables.items()})
    return adata


def plain_frame(df: pd.DataFrame) -> pd.DataFrame:
    """A copy h5ad can store: object columns as strings (None -> ""), bools and numbers kept."""
    out = df.copy().reset_index(drop=True)
    for col in out.columns:
        if out[col].dtype == object or isinstance(out[col].dtype, pd.CategoricalDtype):
            out[col] = out[col].map(lambda v: "" if v is None or (isinstance(v, float) and np.isnan(v)) else str(v)).astype(str)
    out.columns = [str(c) for c in out.columns]
    return out


def write_h5ad(adata: Any, path: str | Path) -> Path:
    """Write an AnnData atomically: to a temporary name in the same folder, then rename."""
    with atomic_path(Path(path)) as tmp:
        adata.write_h5ad(tmp)
    return Path(path)
