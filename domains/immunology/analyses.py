"""The immunology adapter's declared analyses and steering scores (the core's stages run them).

* :func:`data_notes` (examples): what was read, detected and dropped (``notes.md``, ``unknown_genes.csv``);
* :func:`masked_gene_rows` (model): held-out masked-gene accuracy beside a rank-position baseline;
* :func:`cell_type_f1` (probes): cell-type macro-F1 of the best layer against the stronger simple baseline;
* :func:`feature_rows` (features): cell-type features, technical features within type, marker recovery
  (curated and Wilcoxon lists), ``cells.h5ad``, UMAPs;
* :func:`steering`: masked-gene and read-out-probe scores of cells, for the steering plans.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from sciscope.core.experiment import Scorer

from .confounds import rare_types_note, within_type_technical_table
from .features import (TECHNICAL, cell_type_feature_table, gene_drivers, marker_recovery, results_anndata,
                       technical_feature_table, top_driver_genes, write_h5ad)
from .marker_rows import data_markers
from .markers import marker_table
from .model import masked_gene_accuracy
from .tokenize import collate

if TYPE_CHECKING:
    from sciscope.core.context import RunContext

    from .adapter import ImmunologyAdapter

Rows = list[dict[str, Any]]


def _renamed(n: int, examples: list[str], what: str) -> str:
    """``"N repeated <what> made unique ..."`` for notes.md, or ``"all <what> unique"``."""
    if not n:
        return f"all {what} unique"
    return (f"**{n} repeated {what} made unique** with -1, -2 suffixes, e.g. "
            + ", ".join(repr(_short(e)) for e in examples))


def _short(text: str, n: int = 40) -> str:
    return text if len(text) <= n else f"{text[:n]}… ({len(text)} chars)"


def data_notes(adapter: "ImmunologyAdapter", ctx: "RunContext") -> Rows:
    """``unknown_genes.csv`` and a ``notes.md`` saying what was read, detected and dropped."""
    n = adapter.data_notes
    genes = ctx.write_table("unknown_genes.csv", pd.DataFrame({"gene": n["unknown_genes"]})) if n["unknown_genes"] else None
    mt = marker_table(adapter.obs["cell_type"].cat.categories, adapter.readable_genes)
    absent, no_type = mt[~mt.gene_in_data].gene.tolist(), mt[mt.gene_in_data & ~mt.type_in_data].gene.tolist()
    lines = [
        "# Cells", "",
        f"- source: {n['source']}; matrix `{n['matrix']}`",
        f"- input detected as **{n['input_type']}**: {n['input_type_reason']}",
        f"- {n['n_cells_in_file']} cells in the file; {n['n_cells_low_genes']} with fewer than {n['min_genes']} "
        f"expressed genes and {n['n_cells_unlabelled']} without a label dropped; rare types dropped "
        f"(< {n['min_cells_per_type']} cells): {', '.join(n['rare_types_dropped']) or 'none'}; "
        f"{n['n_cells_no_known_gene']} cells without a known gene dropped"
        + (f"; stratified subsample of n_cells={n['n_cells_subsample']}" if n["n_cells_subsample"] else "")
        + f"; **{n['n_cells_final']} cells kept**",
        f"- cell types from obs[`{n['cell_type_column']}`]; library size from {n['library_size']}; "
        + _renamed(n["n_cell_ids_renamed"], n["repeated_cell_ids"], "cell ids"),
        f"- genes: {n['n_genes']} in the data ({_renamed(n['n_duplicate_genes'], n['repeated_genes'], 'gene ids')}), "
        f"**{n['n_genes_unknown']} unknown to the vocabulary** ({n['vocabulary']})"
        + (" (listed in `unknown_genes.csv`)" if genes else ""),
        f"- rank-value encoding: top {n['max_genes']} genes per cell, normalised by {n['median_source']}",
        f"- canonical markers absent from the data: {', '.join(absent) or 'none'}"
        + (f"; markers whose cell type is absent: {', '.join(no_type)}" if no_type else ""),
        "- splits are stratified by cell type; the model and the SAE train on `train` only",
        "- " + (rare_types_note(n) or f"every cell type has at least min_test_cells={n['min_test_cells']} test cells"),
    ]
    notes = ctx.write_text("notes.md", "\n".join(lines) + "\n")
    return [
        {"name": "genes unknown to the vocabulary", "value": n["n_genes_unknown"], "source": genes or notes,
         "note": f"of {n['n_genes']} genes in the data ({n['vocabulary']} vocabulary); input {n['input_type']} from {n['matrix']}"},
        {"name": "cells dropped by filters", "value": n["n_cells_filtered"], "source": notes,
         "note": f"{n['n_cells_final']} of {n['n_cells_in_file']} cells kept"
         + (f" (stratified subsample of {n['n_cells_subsample']})" if n["n_cells_subsample"] else "")
         + (f"; {rare_types_note(n)}" if rare_types_note(n) else "")},
    ]

def masked_gene_rows(adapter: "ImmunologyAdapter", ctx: "RunContext") -> Rows:
    """Held-out masked-gene top-1 accuracy beside the most frequent gene per rank position."""
    from sciscope.core.plotting import save_training_history

    model = ctx.model()
    if not hasattr(model, "cls"):
        return []
    save_training_history(adapter.training_info.get("history", []), ctx.output("training_loss.png"),
                          ylabel="masked-gene loss", title="masked-gene training (train cells)")
    train, test = adapter._train_seqs()
    acc = masked_gene_accuracy(model, adapter.vocabulary, test or train, train, seed=adapter.config["seed"])
    source = ctx.write_json("masked_gene_accuracy.json",
                            {**acc, "training": {k: v for k, v in adapter.training_info.items() if k != "history"}})
    return [{"name": "held-out masked-gene top-1 accuracy", "value": acc["masked_gene_accuracy"],
             "control": acc["chance"], "control_label": "chance (1 / genes in the vocabulary)",
             "baseline": acc["position_frequency_accuracy"], "baseline_label": "most frequent gene at each rank position",
             "note": f"{acc['n_masked']} masked genes of {len(test)} held-out cells", "source": source}]

def cell_type_f1(ctx: "RunContext") -> Rows:
    """Cell-type macro-F1 of the best layer beside shuffled labels, read against the stronger of the
    two simple baselines probed through the same folds -- PCA-50 + logistic and log-expression
    (2,000 genes) + logistic -- with a verdict (margin: 2 standard errors over the folds)."""
    from sciscope.core.verdict import verdict_from_folds

    sweep = ctx.probes()
    s = sweep.summary(metric="f1_macro")
    t = s[(s.target == "cell_type") & (s.site.astype(str) != "")]
    if t.empty:
        return []
    source = ctx.write_table("cell_type_f1.csv", t)
    best = t.loc[t.score_mean.idxmax()]
    res = sweep.results[(best.site, "cell_type")]
    each = {name: np.asarray(sc["f1_macro"], dtype=np.float64) for name, sc in res.baseline_scores.items()}
    simple = {k: v for k, v in each.items() if k in SIMPLE_BASELINES or k.startswith("pca")}
    n_folds = len(res.folds) or int(ctx.config.get("probe_cv", 5))
    row: dict[str, Any] = {"name": "cell_type macro-F1, best layer", "value": float(best.score_mean),
                           "control": float(best.control_mean), "control_label": "shuffled labels", "source": source}
    note = f"at {best.site} ({n_folds} folds)"
    if simple:
        name = max(simple, key=lambda k: float(np.nanmean(simple[k])))
        b = simple[name]
        row.update(baseline=float(np.nanmean(b)), baseline_label=baseline_label(name),
                   verdict=verdict_from_folds(float(best.score_mean), float(best.score_std), float(np.nanmean(b)),
                                              float(np.nanstd(b)), n_folds))
        note += ("; baselines, same folds: " + ", ".join(f"{baseline_label(k)} {np.nanmean(v):.3f}" for k, v in each.items())
                 + "; verdict margin 2 standard errors over the folds")
    few = rare_types_note(ctx.adapter.data_notes)
    return [{**row, "note": note + (f"; {few}" if few else "")}]


#: the simple baselines of the cell-type headline (besides every ``pca*`` one); the untrained model is listed, not chosen
SIMPLE_BASELINES = ("logexpr_genes",)


def baseline_label(name: str) -> str:
    """Readable name of a probe baseline of :meth:`ImmunologyAdapter.baseline_features`."""
    if name.startswith("pca"):
        return f"PCA-{name[3:].split('_')[0]} of log-expression + logistic"
    return {"logexpr_genes": "log-expression (2,000 variable genes) + logistic",
            "untrained_model": "untrained model, last layer"}.get(name, name)


def feature_rows(adapter: "ImmunologyAdapter", ctx: "RunContext") -> list[dict[str, Any]]:
    """The features-stage analysis: cell-type-specific features, technical features judged within
    cell type, marker recovery (curated and data-driven lists, each beside random genes and the
    token-frequency baseline), the results AnnData (``cells.h5ad``) and its UMAPs; headline rows."""
    from .plots import umap_figures

    c, analysis, store = adapter.config, ctx.features(), ctx.store()
    A = np.asarray(ctx.latents().array("latents"))
    drivers = gene_drivers(adapter, ctx.model(), ctx.sae(), adapter.sae_site)
    ct = cell_type_feature_table(analysis, c["specific_auroc"])
    spec = ct["specific"].fillna(False).astype(bool)
    covs = [t for t in TECHNICAL if t in adapter.concepts]
    raw = technical_feature_table(analysis, covs, c["technical_rho"], ct)
    tech = within_type_technical_table(A, store.obs, covs, c["technical_rho"], raw,
                                       set(ct.loc[spec, "feature"].astype(int)), seed=c["seed"])
    rec, control = marker_recovery(adapter, analysis, drivers, ct)
    markers = data_markers(adapter, ctx, A, drivers, ct, rec)
    top = top_driver_genes(drivers, c["top_genes"])
    adata = results_anndata(adapter, store, A, drivers, sae_features=analysis.features, cell_type_features=ct,
                            technical_features=raw, technical_features_within_type=tech, marker_recovery=rec,
                            data_marker_recovery=markers.table, gene_drivers_top=top)
    umap_figures(adata, A, ct, site=adapter.sae_site, n_features=c["n_umap_features"], seed=c["seed"], output=ctx.output)
    write_h5ad(adata, ctx.output("cells.h5ad"))
    src = {name: ctx.write_table(f"{name}.csv", t) for name, t in
           (("cell_type_features", ct), ("technical_features", raw), ("technical_features_within_type", tech),
            ("gene_drivers", top), ("marker_recovery", rec), ("data_marker_recovery", markers.table))}
    missing = rec[~rec["gene_in_data"].astype(bool)].gene.tolist()
    few = rare_types_note(adapter.data_notes)
    rows = [
        {"name": f"cell-type-specific features (AUROC >= {c['specific_auroc']}, q < 0.05)", "value": int(spec.sum()),
         "control": int(ct["specific_shuffled"].fillna(False).astype(bool).sum()), "control_label": "same rule on shuffled labels",
         "note": f"covering {ct.loc[spec, 'cell_type'].nunique()} of {adapter.obs['cell_type'].nunique()} cell types; "
                 f"{int((ct.density > 0).sum())} live features" + (f"; {few}" if few else ""), "source": src["cell_type_features"]},
        {"name": f"canonical markers recovered (curated list; top-{c['top_genes']} driver gene of a specific feature)",
         "value": markers.curated["value"], "control": control,
         "control_label": "random genes in the markers' place (mean of 50)", **markers.curated["baseline"],
         "note": markers.curated["note"] + f"; not in the data: {', '.join(missing) or 'none'}", "source": src["marker_recovery"]},
        {"name": f"data-driven markers recovered (Wilcoxon top-{c['n_data_markers']} per type; top-{c['top_genes']} "
                 "driver gene of a specific feature)", "value": markers.data["value"], "control": markers.data["control"],
         "control_label": "random genes in the markers' place (mean of 50)", **markers.data["baseline"],
         "note": markers.data["note"], "source": src["data_marker_recovery"]},
    ]
    rows += [{"name": f"features tracking {r.covariate} within cell type (partial |rho| >= {c['technical_rho']}, q < 0.05)",
              "value": int(r.n_features), "control": int(r.n_features_shuffled),
              "control_label": "covariate shuffled within cell type", "source": src["technical_features_within_type"],
              "note": f"{r.n_raw} features track it across cells (|rho| >= {c['technical_rho']}), {r.n_raw_cell_type_specific} "
                      f"of them cell-type-specific; {r.n_raw_survive} of those {r.n_raw} survive within type; max partial "
                      f"|rho| {r.max_abs_partial_rho:.2f} (shuffled {r.max_abs_partial_rho_shuffled:.2f}); "
                      f"{r.n_also_cell_type_specific} survivors also cell-type-specific"} for r in tech.itertuples()]
    rows.append({"name": "cells in the results AnnData", "value": int(adata.n_obs), "source": ctx.source("cells.h5ad"),
                 "note": f"obsm: {', '.join(adata.obsm.keys())}; varm: {', '.join(adata.varm.keys())}"})
    return rows


def pick_cells(adapter: "ImmunologyAdapter", ctx: "RunContext", cell_type: str) -> np.ndarray:
    """Held-out cells of a type (all of them when fewer than 8 are held out), at most ``steer_max_cells``."""
    obs, c = ctx.examples().obs, adapter.config
    is_t = obs["cell_type"].astype(str).to_numpy() == cell_type
    held = np.flatnonzero(is_t & (obs["split"].to_numpy() == "test"))
    cells = held if held.size >= 8 else np.flatnonzero(is_t)
    if cells.size > c["steer_max_cells"]:
        cells = np.sort(np.random.default_rng([c["seed"], 0x57E]).choice(cells, c["steer_max_cells"], replace=False))
    return cells


def steering(adapter: "ImmunologyAdapter", ctx: "RunContext", src: str, tgt: str) -> tuple[Scorer | None, Any]:
    """(:class:`Scorer` of the held-out ``src`` cells when steering ``src`` -> ``tgt``, ``reference(ctx)``:
    the same scores of real ``tgt`` cells, unsteered); ``(None, None)`` when the read-out probe never saw ``tgt``.

    Scores, one value per cell:

    * ``target_marker_prob`` / ``source_marker_prob`` (targets, meant to rise / to fall): at 15% masked gene
      positions (seeded: the same under every alpha and control, at least one per cell), the
      probability the masked-gene head puts on the target (source) type's top ``n_markers`` Wilcoxon
      markers (softmax over gene tokens; genes on both lists left out), averaged over the cell's masked positions;
    * ``masked_gene_accuracy`` (damage): the share of those positions whose gene it gets right;
    * ``p_target_type`` (target) / ``frac_classified_target``: a logistic probe of cell type on the
      read-out layer, fitted on the unsteered, pooled training cells of the run's store -- its
      probability of the target type and whether it assigns the cell to it.

    Checkpoints without a masked-gene head are scored by the probe only.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from sciscope.core.capture import pooled_activations
    from sciscope.core.interventions import split_copies, tile_copies

    if int(adapter.steer_site.split(".")[-1]) > int(adapter.readout_site.split(".")[-1]):
        warnings.warn(f"immunology: steering site {adapter.steer_site!r} is after the read-out layer "
                      f"{adapter.readout_site!r}; the probe cannot see the injected vector", stacklevel=2)
    vocab, c, readout, store = adapter.vocabulary, adapter.config, adapter.readout_site, ctx.store()
    train = store.obs["split"].to_numpy() == "train"
    train = np.flatnonzero(train) if train.sum() >= 10 else np.arange(store.n_obs)
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=1.0, random_state=c["seed"]))
    probe.fit(np.asarray(store.array(readout), dtype=np.float64)[train], store.obs["cell_type"].astype(str).to_numpy()[train])
    if tgt not in probe.classes_:
        return None, None
    t_idx = list(probe.classes_).index(tgt)
    markers = adapter.type_markers()
    tm, sm = set(markers.get(tgt, [])), set(markers.get(src, []))
    gene_ids = torch.as_tensor(vocab.gene_ids())
    col = torch.full((vocab.vocab_size,), -1, dtype=torch.long)
    col[gene_ids] = torch.arange(len(gene_ids))
    t_cols, s_cols = (col[torch.as_tensor([vocab.ids[g] for g in sorted(a - b) if g in vocab.ids], dtype=torch.long)]
                      for a, b in ((tm, sm), (sm, tm)))
    seqs = [vocab.encode(list(g)) for g in ctx.examples().inputs]
    head = int(hasattr(ctx.model(), "cls"))  # whether the model predicts masked genes

    def score(cells: np.ndarray) -> Callable[[nn.Module, int | None], list[dict[str, np.ndarray]]]:
        batches = [collate([seqs[i] for i in cells[j:j + 64]], vocab) for j in range(0, cells.size, 64)]
        gen, masks = torch.Generator().manual_seed(c["seed"] + 11), []
        for b in batches:
            real = b["position_mask"]
            chosen = (torch.rand(real.shape, generator=gen) < 0.15) & real
            none = ~chosen.any(1)
            chosen[none, real.float().argmax(1)[none]] = True
            masks.append(chosen)

        def evaluate(m: nn.Module, copies: int | None) -> list[dict[str, np.ndarray]]:
            """Scores of each of ``copies`` stacked copies of the cells (None: the cells once)."""
            k = copies or 1
            out: list[dict[str, list[torch.Tensor]]] = [{} for _ in range(k)]
            was = m.training
            m.eval()
            try:
                h = pooled_activations(m, batches, readout, pooling="masked", aliases=adapter.aliases, copies=copies)
                proba = [probe.predict_proba(x) for x in (h if copies else [h])]
                with torch.inference_mode():
                    for b, chosen in zip(batches if head else [], masks):
                        ids = b["input_ids"].masked_fill(chosen, vocab.special["mask"])
                        logits = m(input_ids=tile_copies(ids, k), attention_mask=tile_copies(b["attention_mask"], k)).logits
                        w = chosen.float() / chosen.sum(1, keepdim=True)  # mean over each cell's masked positions
                        for res, lg in zip(out, split_copies(logits, k)):
                            prob = torch.softmax(lg[..., gene_ids].float(), dim=-1)  # (B, P, G)
                            hit = (gene_ids[prob.argmax(-1)] == b["input_ids"]).float()
                            for key, v in (("target_marker_prob", prob[..., t_cols].sum(-1)),
                                           ("source_marker_prob", prob[..., s_cols].sum(-1)), ("masked_gene_accuracy", hit)):
                                res.setdefault(key, []).append((v * w).sum(1))
            finally:
                m.train(was)
            return [{**{key: torch.cat(v).numpy().astype(np.float64) for key, v in res.items()},
                     "p_target_type": p[:, t_idx], "frac_classified_target": (p.argmax(1) == t_idx).astype(float)}
                    for res, p in zip(out, proba)]

        return evaluate

    # the source's markers are meant to fall as the cells move to the target type: a target read
    # with that sign (as an off-target score, their intended fall read as a side effect)
    evaluate = score(pick_cells(adapter, ctx, src))
    scorer = Scorer(lambda m: evaluate(m, None)[0], batched=evaluate,
                    target=["target_marker_prob"] * head + ["p_target_type"] + ["source_marker_prob"] * head,
                    decrease=["source_marker_prob"] * head, damage=["masked_gene_accuracy"] * head)

    def reference(run: "RunContext") -> dict[str, dict[str, float]]:
        cells = pick_cells(adapter, run, tgt)
        scores = score(cells)(run.model(), None)[0] if cells.size else {}
        return {f"real {tgt} cells": {k: float(np.mean(v)) for k, v in scores.items()}} if scores else {}

    return scorer, reference
