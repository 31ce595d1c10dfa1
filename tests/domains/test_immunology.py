"""Tests of the immunology adapter: data checks, rank-value tokens, the masked-gene model, SAE
driver genes, steering, the results AnnData, and every bad-input case of the issue."""

from __future__ import annotations

import dataclasses

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

pytest.importorskip("scanpy")
anndata = pytest.importorskip("anndata")

from sciscope.core import ConfigError, collect  # noqa: E402
from sciscope.core.context import RunContext  # noqa: E402
from sciscope.core.experiment import check_batched_scorer, resolve_intervention, resolve_reference, run_plan  # noqa: E402
from sciscope.core.sae import create_sae, sae_config  # noqa: E402
from sciscope.core.testing import check_adapter  # noqa: E402
from sciscope.domains.immunology import (  # noqa: E402
    GeneVocab,
    ImmunologyAdapter,
    collate,
    detect_input_type,
    gene_drivers,
    load_cells,
    marker_table,
    rank_value_encode,
    read_h5ad,
    results_anndata,
    token_shares,
    write_h5ad,
)
from sciscope.domains.immunology.features import top_driver_genes  # noqa: E402
from sciscope.domains.immunology.model import mask_genes, save_trained  # noqa: E402

TINY = ImmunologyAdapter.test_config


# ------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models, one thread per pool: on a shared 2-core machine two spinning torch threads made a
    training step of the test model 30x slower (3 s instead of 0.1 s); the numbers do not change."""
    from sciscope.core.threads import limit_threads

    with limit_threads(1):
        yield


@pytest.fixture(scope="module")
def tiny() -> tuple[ImmunologyAdapter, torch.nn.Module]:
    """The tiny default masked-gene model, trained once for the module (a few seconds)."""
    ad = ImmunologyAdapter(TINY)
    return ad, ad.model()


@pytest.fixture(scope="module")
def tiny_store(tiny, tmp_path_factory):
    """The tiny model's pooled activations, in a run folder's layout (``ctx.store()`` reads it)."""
    ad, model = tiny
    ex = ad.examples("all")
    run = tmp_path_factory.mktemp("imm")
    store = collect(model, ad.batches(ex, model, batch_size=64), ad.sites, out=run / "activations" / "store",
                    obs=ex.obs, pooling=ad.pooling, aliases=ad.aliases, progress=False)
    return ex, store, run


def _write_h5ad(path: Path, X: np.ndarray, genes: list[str], labels: list[str], **obs_cols) -> Path:
    obs = pd.DataFrame({"cell_type": labels, **obs_cols}, index=[f"cell{i}" for i in range(len(labels))])
    a = anndata.AnnData(X=sp.csr_matrix(X.astype(np.float32)), obs=obs, var=pd.DataFrame(index=genes))
    a.write_h5ad(path)
    return path


def _counts(n_cells: int = 60, n_genes: int = 40, seed: int = 0) -> tuple[np.ndarray, list[str], list[str]]:
    """Poisson counts of two cell types: a quarter of the cells (type A) up-regulate genes 0-4."""
    rng = np.random.default_rng(seed)
    rate = np.full((n_cells, n_genes), 3.0)
    labels = ["A" if i % 4 == 0 else "B" for i in range(n_cells)]
    rate[::4, :5] = 40.0
    return rng.poisson(rate).astype(np.float32), [f"G{j}" for j in range(n_genes)], labels


# ----------------------------------------------------------------------------------- conformance


def test_conformance(tmp_path: Path) -> None:
    check_adapter(ImmunologyAdapter(TINY), tmp_path)


def test_task_loss_fidelity() -> None:
    """Masked-gene CE of held-out cells: identity splice recovers all of it, zero ablation none, and
    zeroing the SAE site hurts. The 30-step test model has learnt nothing to lose yet (its loss is
    ln(vocabulary) with or without the site), so this one trains a little longer (~1 min on 2 cores)."""
    from sciscope.core.fidelity import fidelity

    ad = ImmunologyAdapter({**TINY, "train_steps": 60, "train_batch_size": 64, "lr": 0.01})
    model = ad.model()
    task = ad.task_loss(ad.ctx)
    assert task.name.startswith("masked-gene cross-entropy of") and "held-out" in task.name and task.log_probs is not None
    assert ad.fidelity_positions == slice(1, None)  # <cls> is not a gene token: the SAE never saw it
    t = fidelity(model, ad.sae_site, task, {"identity": lambda h: h}, positions=ad.fidelity_positions,
                 aliases=ad.aliases).set_index("condition")
    assert np.isfinite(t.loss).all()
    assert t.loss_recovered["identity"] == pytest.approx(1.0, abs=1e-6) and t.kl["identity"] == pytest.approx(0.0, abs=1e-6)
    assert t.loss_recovered["zero_ablation"] == 0.0
    assert t.loss["zero_ablation"] > t.loss["clean"] + 0.05 and t.kl["zero_ablation"] > 0
    assert task.fn(model) == t.loss["clean"]  # the same masked genes every call


# ------------------------------------------------------------------------------------------ data


def test_bundled_pbmc_is_log_normalised_raw() -> None:
    cd = load_cells()
    assert cd.notes["matrix"] == ".raw.X" and cd.input_type == "lognorm"
    assert cd.X.shape == (700, 765) and cd.X.min() >= 0
    assert cd.obs["cell_type"].nunique() == 10
    # library size comes from obs['n_counts'] and matches the log-normalisation's scale factors
    lib = 10 ** cd.obs["log10_library_size"].to_numpy()
    row = cd.X[0].toarray().ravel()
    smallest = np.expm1(row[row > 0].astype(np.float64)).min()  # one count
    assert 1e4 / smallest == pytest.approx(lib[0], rel=0.01)


def test_detect_input_type() -> None:
    counts = sp.csr_matrix(np.array([[0, 3, 1], [2, 0, 7]], dtype=np.float32))
    assert detect_input_type(counts)[0] == "counts"
    log = counts.copy()
    log.data = np.log1p(log.data)
    assert detect_input_type(log)[0] == "lognorm"
    lin = counts.copy()
    lin.data = lin.data * 1234.5
    assert detect_input_type(lin)[0] == "normalized"
    with pytest.raises(ConfigError, match="non-integer"):
        detect_input_type(log, "counts")
    with pytest.raises(ConfigError, match="input_type"):
        detect_input_type(log, "zscored")


def test_user_counts_file_detected_and_library_size_computed(tmp_path: Path) -> None:
    X, genes, labels = _counts()
    path = _write_h5ad(tmp_path / "counts.h5ad", X, genes, labels)
    ad = ImmunologyAdapter({"source": str(path), "max_genes": 16, "min_test_cells": 0})  # type A: 3 test cells
    n = ad.data_notes
    assert n["input_type"] == "counts" and n["matrix"] == ".X" and n["n_genes_unknown"] == 0
    assert np.allclose(ad.obs["log10_library_size"], np.log10(X.sum(1)), rtol=1e-6)
    # type A's up-regulated genes sit far above their (type-B dominated) medians: they rank first
    ex = ad.examples("all")
    firsts = [g[0] for g, t in zip(ex.inputs, ex.obs["cell_type"]) if t == "A"]
    assert np.mean([f in genes[:5] for f in firsts]) > 0.9


@pytest.mark.filterwarnings("ignore:.*names are not unique:UserWarning")  # anndata's, on writing and reading the file
def test_repeated_cell_and_gene_ids_are_made_unique_and_noted(tmp_path: Path) -> None:
    # as scanpy's krumsiek11 (160 ids for 640 cells): 60 cells under 15 ids; two genes share a name.
    # Before: the repeats reached the model; ``log_expression`` (probes, markers) then returned the
    # wrong number of rows, and the second "G1" column was dropped.
    X, genes, labels = _counts()
    genes[7] = "G1"
    a = anndata.AnnData(X=sp.csr_matrix(X), obs=pd.DataFrame({"cell_type": labels}, index=[f"c{i % 15}" for i in range(60)]),
                        var=pd.DataFrame(index=genes))
    a.write_h5ad(tmp_path / "repeats.h5ad")
    ad = ImmunologyAdapter({"source": str(tmp_path / "repeats.h5ad"), "max_genes": 16, "min_test_cells": 0})
    n = ad.data_notes
    assert n["n_cell_ids_renamed"] == 45 and n["n_duplicate_genes"] == 1 and n["n_genes"] == 40
    assert ad.obs["cell_id"].is_unique and len(ad.obs) == 60
    assert ad.log_expression(ad.obs).shape[0] == len(ad.obs)
    assert ad.cells.genes.count("G1") == 1 and len(set(ad.cells.genes)) == 40
    # the renamed gene keeps its own column
    j = next(k for k, g in enumerate(ad.cells.genes) if g.startswith("G1-"))
    assert np.array_equal(ad.cells.X[:, j].toarray().ravel(), X[:, 7])
    ctx = RunContext(ad, run_dir=tmp_path / "run", stage="examples")
    next(x for x in ad.analyses() if x.name == "data notes").run(ctx)
    notes = (tmp_path / "run" / "examples" / "notes.md").read_text()
    assert "45 repeated cell ids made unique" in notes and "'c0'" in notes and "'G1'" in notes


def test_rank_value_encoding_divides_by_gene_median() -> None:
    # gene H is high everywhere (housekeeping); gene S is lower but far above its own median
    X = sp.csr_matrix(np.array([[100.0, 10.0, 1.0], [100.0, 1.0, 1.0], [100.0, 1.0, 0.0]]))
    genes = ["H", "S", "L"]
    med = np.array([100.0, 1.0, 1.0])
    ranked = rank_value_encode(X, genes, med, max_genes=3)
    assert ranked[0] == ["S", "H", "L"]  # 10/1 > 100/100 = 1/1 (tie broken by column order)
    assert ranked[2] == ["H", "S"]  # unexpressed genes are not tokens
    assert rank_value_encode(X, genes, np.array([100.0, np.nan, 1.0]), max_genes=2)[0] == ["H", "L"]


def test_vocab_round_trip_and_geneformer_dictionary(tmp_path: Path) -> None:
    vocab = GeneVocab.build(["A", "B", "C"], [1.0, 2.0, np.nan], max_genes=8)
    assert vocab.tokens[:4] == ["<pad>", "<mask>", "<cls>", "<eos>"] and vocab.genes == ["A", "B"]
    vocab.save(tmp_path)
    back = GeneVocab.load(tmp_path)
    assert back.ids == vocab.ids and back.medians == vocab.medians and back.max_genes == 8
    assert back.encode(["B", "A"]) == [2, vocab.ids["B"], vocab.ids["A"], 3]
    gf = tmp_path / "gf"
    gf.mkdir()
    (gf / "token_dictionary.json").write_text(json.dumps({"<pad>": 0, "<mask>": 1, "ENSG1": 2, "ENSG2": 3}))
    (gf / "config.json").write_text(json.dumps({"max_position_embeddings": 2048}))
    g = GeneVocab.load(gf)
    assert g.source == "geneformer" and not g.use_cls and g.max_genes == 2048 and g.encode(["ENSG2"]) == [3]


def test_pickled_token_dictionary_is_refused(tmp_path: Path) -> None:
    (tmp_path / "token_dictionary.pkl").write_bytes(b"\x80\x04not really")
    with pytest.raises(ConfigError, match=r"does not unpickle.*token_dictionary\.pkl|token_dictionary\.pkl.*unpickle"):
        GeneVocab.load(tmp_path)


# ------------------------------------------------------------------------------ bad input (issue)


def test_file_that_is_not_h5ad(tmp_path: Path) -> None:
    csv = tmp_path / "cells.h5ad"
    csv.write_text("cell,CD3E\nc1,3\n")
    with pytest.raises(ConfigError, match="not an h5ad file"):
        ImmunologyAdapter({"source": str(csv)}).examples("all")
    with pytest.raises(ConfigError, match="does not exist"):
        read_h5ad(tmp_path / "missing.h5ad")


@pytest.mark.parametrize("bad, word", [(np.nan, "NaN"), (-1.5, "negative")])
def test_nan_or_negative_values(tmp_path: Path, bad: float, word: str) -> None:
    X, genes, labels = _counts()
    X[3, 7] = bad
    path = _write_h5ad(tmp_path / "bad.h5ad", X, genes, labels)
    with pytest.raises(ConfigError, match=rf"{word}.*cell3.*G7"):
        ImmunologyAdapter({"source": str(path)}).examples("all")


def test_no_cells_left_after_filtering(tmp_path: Path) -> None:
    X, genes, labels = _counts()
    path = _write_h5ad(tmp_path / "ok.h5ad", X, genes, labels)
    with pytest.raises(ConfigError, match="no cells left after filtering.*min_genes=1000"):
        ImmunologyAdapter({"source": str(path), "min_genes": 1000}).examples("all")
    with pytest.raises(ConfigError, match="no cells left.*min_cells_per_type=100"):
        ImmunologyAdapter({"source": str(path), "min_cells_per_type": 100}).examples("all")


def test_missing_cell_type_column(tmp_path: Path) -> None:
    X, genes, labels = _counts()
    path = _write_h5ad(tmp_path / "ok.h5ad", X, genes, labels)
    with pytest.raises(ConfigError, match="'celltype_fine' is not an obs column"):
        ImmunologyAdapter({"source": str(path), "cell_type_column": "celltype_fine"}).examples("all")


def test_genes_unknown_to_the_vocabulary_are_counted(tiny, tmp_path: Path) -> None:
    """A user file read by a saved model: genes the vocabulary lacks are dropped, counted, listed."""
    ad, model = tiny
    ckpt = save_trained(tmp_path / "ckpt", model, ad.vocabulary, {"key": "test"})
    cd = ad.cells
    keep = cd.genes[:300]
    X = cd.X[:, :300].toarray()
    renamed = [f"NOTAGENE{i}" for i in range(25)]
    genes = renamed + keep[25:]
    path = _write_h5ad(tmp_path / "user.h5ad", X, genes, cd.obs["cell_type"].astype(str).tolist())
    user = ImmunologyAdapter({"source": str(path), "model": str(ckpt), "input_type": "lognorm"})
    n = user.data_notes
    # the 25 renamed genes, plus any gene the 200 training cells never expressed (no median, no token)
    expected = set(renamed) | {g for g in keep[25:] if g not in ad.vocabulary.ids}
    assert n["n_genes_unknown"] == len(expected) >= 25 and set(n["unknown_genes"]) == expected
    assert n["vocabulary"] == "sciscope"
    ex = user.examples("all")
    assert not any(g in renamed for cell in ex.inputs for g in cell)
    m = user.model()
    store = collect(m, user.batches(ex, m, batch_size=64), user.sites, out=tmp_path / "s", obs=ex.obs,
                    pooling=user.pooling, aliases=user.aliases, progress=False)
    assert np.isfinite(store.array("layer.1")).all()
    # nothing known at all: a clear error naming the problem
    path2 = _write_h5ad(tmp_path / "alien.h5ad", X[:, :30], [f"X{i}" for i in range(30)],
                        cd.obs["cell_type"].astype(str).tolist())
    with pytest.raises(ConfigError, match="none of the 30 genes.*vocabulary"):
        ImmunologyAdapter({"source": str(path2), "model": str(ckpt)}).examples("all")


def test_geneformer_style_checkpoint(tmp_path: Path) -> None:
    """A BERT masked-LM directory with a JSON token dictionary (<pad>, <mask>, no <cls>) loads and runs."""
    from transformers import BertConfig, BertForMaskedLM

    genes = load_cells(n_cells=60).genes[:400]
    ids = {"<pad>": 0, "<mask>": 1, **{g: i + 2 for i, g in enumerate(genes)}}
    cfg = BertConfig(vocab_size=len(ids), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=40, architectures=["BertForMaskedLM"])
    BertForMaskedLM(cfg).save_pretrained(tmp_path)
    (tmp_path / "token_dictionary.json").write_text(json.dumps(ids))
    ad = ImmunologyAdapter({"model": str(tmp_path), "n_cells": 60, "min_cells_per_type": 2, "min_test_cells": 0})
    assert ad.data_notes["n_genes_unknown"] == 765 - 400 and ad.data_notes["max_genes"] == 40
    assert "no gene_median_dictionary.json" in ad.data_notes["median_source"]
    ex = ad.examples("all")
    model = ad.model()
    b = next(ad.batches(ex, model, batch_size=8))
    assert b["position_mask"].sum() == b["attention_mask"].sum()  # no <cls>/<eos> in a V1-style dictionary
    store = collect(model, ad.batches(ex, model), ad.sites, out=tmp_path / "s", obs=ex.obs, pooling=ad.pooling,
                    aliases=ad.aliases, progress=False)
    assert store.n_obs == len(ex) and np.isfinite(store.array("layer.1")).all()


def test_config_errors() -> None:
    with pytest.raises(ConfigError, match="steer_pairs"):
        ImmunologyAdapter({"steer_pairs": ["CD14+ Monocyte"]})
    with pytest.raises(ConfigError, match="'NK cells', not in the data"):
        ImmunologyAdapter({**TINY, "steer_pairs": ["CD14+ Monocyte>NK cells"]}).contrasts
    with pytest.raises(ConfigError, match="unknown split"):
        ImmunologyAdapter(TINY).examples("validation")
    with pytest.raises(ConfigError, match="does not exist"):
        ImmunologyAdapter({"model": "/no/such/model"})
    with pytest.raises(ConfigError, match="sae_layer"):
        _ = ImmunologyAdapter({**TINY, "sae_layer": 7}).sae_site
    with pytest.raises(ConfigError, match="test_fraction"):
        ImmunologyAdapter({"test_fraction": 1.0})
    with pytest.raises(ConfigError, match="input_type"):
        ImmunologyAdapter({"input_type": "zscored"})
    with pytest.raises(ConfigError, match="n_heads"):
        ImmunologyAdapter({"hidden": 30, "n_heads": 4})
    assert ImmunologyAdapter.config_stages["steer_pairs"] == "steering" and ImmunologyAdapter.default_config["n_markers"] == 10


# ------------------------------------------------------------------------------------ model


def test_masking_touches_gene_tokens_only(tiny) -> None:
    ad, _ = tiny
    vocab = ad.vocabulary
    b = collate([vocab.encode(g) for g in ad.examples("all").inputs[:16]], vocab)
    inputs, labels = mask_genes(b["input_ids"], vocab, prob=0.3, generator=torch.Generator().manual_seed(0))
    target = labels != -100
    assert target.any(1).all()  # every cell has a target
    assert not (target & ~b["position_mask"]).any()  # never <cls>, <eos> or padding
    assert torch.equal(labels[target], b["input_ids"][target])
    assert torch.equal(inputs[~target], b["input_ids"][~target])
    assert (inputs[target] == vocab.special["mask"]).float().mean() > 0.6


def test_model_learns_something(tiny) -> None:
    """The trained model's loss fell during training (30 steps: a sanity check, not a benchmark)."""
    ad, model = tiny
    h = ad.training_info["history"]
    assert h[-1]["loss"] < h[0]["loss"]
    assert type(model).__name__ == "BertForMaskedLM"


# ------------------------------------------------------------------------------- features


def test_token_shares_add_up_to_the_cell_pre_activation(tiny_store) -> None:
    ex, store, _ = tiny_store
    sae = create_sae(sae_config("topk", d_in=store.dim("layer.1"), d_sae=64, k=8), seed=0)
    h = torch.randn(5, 12, store.dim("layer.1"))
    pm = torch.rand(5, 12) > 0.3
    pm[:, 0] = True
    shares, pooled = token_shares(sae, h, pm)
    assert torch.allclose(shares.sum(1), sae.pre_acts(pooled), atol=1e-4)
    assert (shares[~pm] == 0).all()
    # an SAE that learnt gene tokens: the shares add up to the mean code of the cell's gene tokens
    shares, _ = token_shares(sae, h, pm, per_position=True)
    codes = sae.encode(h).detach()
    mean_code = (codes * pm[..., None]).sum(1) / pm.sum(1, keepdim=True)
    assert torch.allclose(shares.sum(1), mean_code, atol=1e-5) and (shares[~pm] == 0).all()


def test_gene_drivers_and_marker_table(tiny, tiny_store) -> None:
    ad, model = tiny
    ex, store, _ = tiny_store
    sae = create_sae(sae_config("topk", d_in=store.dim(ad.sae_site), d_sae=32, k=4), seed=0)
    drivers = gene_drivers(ad, model, sae)
    assert drivers.shape == (len(ad.vocabulary.genes), 32)
    assert np.isfinite(drivers.to_numpy()).all()
    top = top_driver_genes(drivers, 5)
    assert set(top.groupby("feature").size()) == {5}
    mt = marker_table(ex.obs["cell_type"].cat.categories, ad.readable_genes)
    row = mt.set_index("gene")
    # pbmc68k_reduced lacks CD14, CD34 and PPBP, and has no platelet type
    assert not row.loc["CD14", "gene_in_data"] and not row.loc["CD34", "gene_in_data"] and not row.loc["PPBP", "testable"]
    assert row.loc["MS4A1", "testable"] and row.loc["MS4A1", "cell_types"] == "CD19+ B"
    # CD45RA is not CD4: the naive cytotoxic (CD8+/CD45RA+) cells are no CD4 T cells
    assert marker_table(["CD8+/CD45RA+ Naive Cytotoxic", "CD4+/CD25 T Reg"], ["IL7R"]).set_index("gene").loc[
        "IL7R", "cell_types"] == "CD4+/CD25 T Reg"


def test_results_anndata_round_trip(tiny, tiny_store, tmp_path: Path) -> None:
    import scanpy as sc

    ad, _ = tiny
    ex, store, _ = tiny_store
    lat = np.abs(np.random.default_rng(0).normal(size=(store.n_obs, 16))).astype(np.float32)
    adata = results_anndata(ad, store, lat)
    path = write_h5ad(adata, tmp_path / "cells.h5ad")
    back = anndata.read_h5ad(path)
    assert back.n_obs == store.n_obs and {f"X_{s}" for s in store.sites} | {"X_sae", "X_pca"} <= set(back.obsm)
    assert np.allclose(back.obsm["X_layer.1"], store.array("layer.1"))
    assert list(back.obs["cell_type"].astype(str)) == list(ex.obs["cell_type"].astype(str))
    # scanpy reads the stored embeddings (gauss kernel: no numba compilation in a unit test)
    sc.pp.neighbors(back, use_rep="X_layer.1", n_neighbors=10, method="gauss")
    assert back.obsp["connectivities"].shape == (store.n_obs, store.n_obs)
    assert not list(tmp_path.glob(".*tmp"))  # no temporary file left behind


def test_data_notes_analysis_writes_notes_and_unknown_genes(tiny, tmp_path: Path) -> None:
    ad, _ = tiny
    ctx = RunContext(ad, run_dir=tmp_path, stage="examples")
    analyses = {a.name: a for a in ad.analyses()}
    assert {a.stage for a in analyses.values()} == {"examples", "model", "probes", "features"}
    rows, _ = analyses["data notes"].run(ctx)
    by_name = {r["name"]: r for r in rows}
    assert by_name["cells dropped by filters"]["value"] == ad.data_notes["n_cells_filtered"]
    unknown = ad.data_notes["unknown_genes"]  # genes no kept cell expresses have no median, so no token
    assert by_name["genes unknown to the vocabulary"]["value"] == len(unknown) > 0
    assert by_name["genes unknown to the vocabulary"]["source"] == "examples/unknown_genes.csv"
    assert pd.read_csv(tmp_path / "examples" / "unknown_genes.csv").gene.tolist() == unknown
    assert "cells kept" in (tmp_path / "examples" / "notes.md").read_text()
    rows, _ = analyses["masked-gene accuracy"].run(ctx)
    assert 0 <= rows[0]["value"] <= 1 and rows[0]["control"] is not None and (tmp_path / "examples" / "masked_gene_accuracy.json").is_file()


# ------------------------------------------------------------------------------- steering


def test_steering_plan_moves_the_readout_toward_the_target(tiny, tiny_store) -> None:
    """The plan's scorer is deterministic and per cell; its vector pushes source cells toward the
    target type beyond random controls; the real target cells are the reference."""
    ad, model = tiny
    ex, store, run = tiny_store
    ctx = RunContext(ad, {"steer_n_random": 3, "steer_alphas": [1.0, 2.0]}, run_dir=run)
    plans = ad.steering_plans(ctx)
    assert [p.name for p in plans] == list(ad.contrasts) and plans[0].n_controls == 3
    plan = plans[0]
    scorer = plan.scorer
    assert scorer.target == ["target_marker_prob", "p_target_type", "source_marker_prob"] and not scorer.off_target
    assert scorer.decrease == ["source_marker_prob"]  # the source's markers are meant to fall
    base = scorer(model)
    assert {"target_marker_prob", "source_marker_prob", "p_target_type", "frac_classified_target",
            "masked_gene_accuracy"} <= set(base)
    assert base["p_target_type"].ndim == 1 and base["p_target_type"].size == base["target_marker_prob"].size > 1
    again = scorer(model)  # deterministic: same masked positions, same cells
    assert all(np.array_equal(base[k], again[k]) for k in base)
    intervention = resolve_intervention(plan, ctx)
    with intervention.apply(model, 2.0, aliases=ad.aliases):
        pushed = scorer(model)
    assert pushed["p_target_type"].mean() > base["p_target_type"].mean() + 0.2
    ref = resolve_reference(plan, ctx)["real CD19+ B cells"]
    assert ref["p_target_type"] > base["p_target_type"].mean() + 0.2
    sweep = run_plan(model, plan, intervention, aliases=ad.aliases, reference={"real CD19+ B cells": ref})
    s = sweep.summary()
    assert s["score"] == "p_target_type" and s["effect_plus"] > s["control_effect_plus_max_abs"]
    assert s["n_examples"] == base["p_target_type"].size and s["effect_plus_ci"][0] > 0
    assert s["reference[real CD19+ B cells]"] == pytest.approx(ref["p_target_type"])
    # the alphas and controls run as copies of one batch give the numbers of one job at a time
    check_batched_scorer(model, dataclasses.replace(plan, alphas=[-1.0, 2.0], n_controls=2), intervention, aliases=ad.aliases)


# ------------------------------------------------------------------- confounds (issue 15)


def _obs(counts: dict[str, tuple[int, int]]) -> pd.DataFrame:
    """obs with ``cell_type`` and ``split`` from ``{type: (n_train, n_test)}``."""
    rows = [(t, s) for t, (a, b) in counts.items() for s in ["train"] * a + ["test"] * b]
    return pd.DataFrame({"cell_type": pd.Categorical([t for t, _ in rows]), "split": [s for _, s in rows]})


def test_rare_types_merged_into_other_or_dropped() -> None:
    from sciscope.domains.immunology.confounds import OTHER, merge_rare_types, rare_types_note

    obs = _obs({"A": (40, 10), "B": (30, 8), "C": (9, 2), "D": (12, 3)})
    merged, notes = merge_rare_types(obs, 5, "other")
    assert notes["few_test_types"] == {"C": 2, "D": 3} and notes["n_cells_rare_dropped"] == 0
    assert merged["cell_type"].value_counts().to_dict() == {"A": 50, "B": 38, OTHER: 26}
    assert (merged["cell_type_original"] == obs["cell_type"].astype(str)).all()
    assert "merged into 'other': C (2), D (3)" in rare_types_note(notes)
    dropped, notes = merge_rare_types(obs, 5, "drop")
    assert set(dropped["cell_type"].cat.categories) == {"A", "B"} and notes["n_cells_rare_dropped"] == 26
    assert list(dropped.index) == list(range(88))  # the index is kept: callers align per-cell data by it
    # the merged group itself too small: dropped as well, and said so
    small, notes = merge_rare_types(_obs({"A": (40, 10), "B": (30, 8), "C": (5, 1), "D": (5, 1)}), 5, "other")
    assert notes["other_dropped"] and OTHER not in small["cell_type"].cat.categories and "dropped (12 cells)" in rare_types_note(notes)
    assert merge_rare_types(obs, 0, "other")[1]["few_test_types"] == {}  # 0: off
    with pytest.raises(ConfigError, match="'min_test_cells' = 9 leaves fewer than 2 cell types"):
        merge_rare_types(obs, 9, "drop")
    with pytest.raises(ConfigError, match="rare_test_types"):
        ImmunologyAdapter({"rare_test_types": "merge"})
    with pytest.raises(ConfigError, match="min_test_cells"):
        ImmunologyAdapter({"min_test_cells": -1})


def test_bundled_rare_types_are_stated() -> None:
    """pbmc68k_reduced: the three types with 2-4 test cells become 'other'; notes.md says so."""
    ad = ImmunologyAdapter({})
    n = ad.data_notes
    assert n["few_test_types"] == {"CD34+": 3, "CD4+/CD45RA+/CD25- Naive T": 2, "CD4+/CD45RO+ Memory": 4}
    test = ad.obs.loc[ad.obs.split == "test", "cell_type"].value_counts()
    assert test.min() >= 5 and "other" in test.index and len(ad.obs) == 700
    assert len(ad.examples("all").inputs) == 700


def test_library_size_feature_that_is_a_cell_type_feature_is_not_technical() -> None:
    """Planted: monocytes have smaller libraries; feature 0 is the monocyte indicator (its across-cell
    Spearman with library size is strong), feature 1 tracks library size inside every type."""
    from sciscope.domains.immunology.confounds import within_type_spearman, within_type_technical_table

    rng = np.random.default_rng(0)
    n = 400
    mono = rng.random(n) < 0.4
    lib = np.where(mono, 3.0, 3.6) + rng.normal(0, 0.1, n)
    A = np.zeros((n, 4))
    A[:, 0] = mono * (1.0 + 0.1 * rng.random(n))  # the monocyte feature
    A[:, 1] = np.maximum(0.0, lib - np.where(mono, 3.0, 3.6) + 0.3)  # library size within type
    A[:, 2] = rng.random(n) * (rng.random(n) < 0.5)  # noise
    obs = pd.DataFrame({"cell_type": np.where(mono, "Mono", "B"), "log10_library_size": lib})
    raw_rho = pd.Series(A[:, 0]).corr(pd.Series(lib), method="spearman")
    assert raw_rho < -0.6  # across cells, the monocyte feature "tracks library size"
    rho, p = within_type_spearman(A, lib, obs["cell_type"].to_numpy())
    assert abs(rho[0]) < 0.15 and rho[1] > 0.9 and p[1] < 1e-10 and np.isnan(rho[3])  # feature 3: never fires
    raw = pd.DataFrame([{"covariate": "log10_library_size", "n_features": 2, "features": "0 1"}])
    t = within_type_technical_table(A, obs, ["log10_library_size"], 0.3, raw, specific={0}, seed=0).iloc[0]
    assert t.n_features == 1 and t.features == "1" and t.n_raw == 2 and t.n_raw_survive == 1
    assert t.n_raw_cell_type_specific == 1 and t.n_also_cell_type_specific == 0 and t.n_features_shuffled == 0


def test_marker_recovery_against_token_frequency_baseline() -> None:
    """Recovery by driver ranks vs by the token-frequency list; the chance control; the paired verdict."""
    from sciscope.core.verdict import ABOVE, NO_BETTER
    from sciscope.domains.immunology.confounds import (driver_ranks, paired_count_verdict, recovery,
                                                        token_frequency_scores)

    genes = ["CD79A", "MS4A1", "LYZ", "ACTB", "G5", "G6"]
    inputs = [["CD79A", "MS4A1", "ACTB"]] * 5 + [["LYZ", "ACTB"]] * 5
    A = np.zeros((10, 2))
    A[:5, 0], A[5:, 1] = 1.0, 2.0  # feature 0 fires on the B cells, 1 on the monocytes
    freq = token_frequency_scores(inputs, A, genes)
    assert freq.loc["CD79A", 0] == 1.0 and freq.loc["LYZ", 0] == 0.0 and freq.loc["ACTB", 1] == 1.0
    assert list(freq.attrs["n_active"]) == [5, 5]
    drivers = pd.DataFrame({0: [0.9, 0.1, 0.0, 0.5, 0.0, 0.0], 1: [0.0, 0.0, 0.1, 0.9, 0.0, 0.0]}, index=genes)
    ranks = driver_ranks(drivers)
    assert ranks[:, 0].tolist() == [1, 3, 4, 2, 5, 6]
    pairs = [("CD79A", ["B"]), ("MS4A1", ["B"]), ("LYZ", ["Mono"]), ("CD3E", ["T"])]
    feats = {"B": np.array([0]), "Mono": np.array([1])}
    hit, control = recovery(pairs, genes, feats, ranks, k=2, n_random=200, seed=0)
    assert hit.tolist() == [True, False, True, False]  # MS4A1 ranks 3rd in feature 0; CD3E: no T feature
    fhit, _ = recovery(pairs, genes, feats, driver_ranks(freq), k=2, n_random=0)
    assert fhit.tolist() == [True, True, True, False]  # every B cell carries MS4A1: the frequency list has it
    assert 0.5 < control < 1.5  # three markers with a feature, each a random gene in its top 2 with p = 1/3
    # the baseline wins by one marker: within the margin 2 sqrt(markers only one list recovers) = 2
    v, margin = paired_count_verdict(hit, fhit)
    assert v == NO_BETTER and margin == 2.0
    assert paired_count_verdict(np.zeros(9, bool), np.ones(9, bool))[0] == "below baseline"
    assert paired_count_verdict(np.ones(9, bool), np.zeros(9, bool))[0] == ABOVE  # 9 vs 0: margin 6
    assert paired_count_verdict(np.zeros(3, bool), np.zeros(3, bool))[0] == NO_BETTER


def test_cell_type_f1_headline_reads_the_strongest_simple_baseline(tmp_path: Path) -> None:
    """The macro-F1 headline carries the stronger of PCA and log-expression (never the untrained
    model), on the same folds, and a verdict: a model that matches the baseline reads 'no better
    than baseline', one far below reads 'below baseline'."""
    from sciscope.core import ActivationStore, probe_sweep
    from sciscope.domains.immunology.analyses import cell_type_f1

    X, genes, labels = _counts(n_cells=100)  # 25 cells of type A, 5 of them held out: min_test_cells keeps it
    ad = ImmunologyAdapter({"source": str(_write_h5ad(tmp_path / "c.h5ad", X, genes, labels)), "max_genes": 16})
    y = np.array(labels)
    rng = np.random.default_rng(0)
    good = np.c_[(y == "A") + rng.normal(0, 0.3, y.size), rng.normal(size=(y.size, 3))]
    noise = rng.normal(size=(y.size, 4))
    store = ActivationStore.from_arrays(pd.DataFrame({"cell_type": y}), {"layer.0": noise, "layer.1": good})
    for model_site, expected in (("layer.1", "no better than baseline"), ("layer.0", "below baseline")):
        sites = [model_site]
        base = {"pca50_logexpr": good, "logexpr_genes": noise[:, :2], "untrained_model": np.c_[y == "A", y == "A"] * 1.0}
        ctx = RunContext(ad, run_dir=tmp_path / model_site, stage="probes")
        ctx.live["probes"] = probe_sweep(store, ["cell_type"], sites=sites, cv=4, baseline=base, seed=0, progress=False)
        row = cell_type_f1(ctx)[0]
        assert row["baseline_label"] == "PCA-50 of log-expression + logistic", row
        assert row["verdict"] == expected, row
        assert "untrained model, last layer 1.000" in row["note"] and "4 folds" in row["note"]
        t = pd.read_csv(tmp_path / model_site / "probes" / "cell_type_f1.csv")
        assert row["value"] == pytest.approx(t.score_mean.max()) and row["baseline"] == pytest.approx(t["baseline_mean[pca50_logexpr]"].max())


# ------------------------------------------------------------------------------------ feature cards


def test_card_gene_table_pools_token_activations_over_the_top_cells() -> None:
    """Each gene's activation at its token, averaged over the top cells with a cell lacking the gene
    counted as 0 (a gene of one cell cannot top the list), beside how many cells hold it and fire."""
    from sciscope.domains.immunology.cards import gene_activation_table

    tokens = {3: ["<cls>", "CD79A", "MS4A1", "LYZ", "<eos>"], 8: ["<cls>", "MS4A1", "CD79A", "<eos>"]}
    frames = {3: pd.DataFrame({"position": [1, 2, 3], "activation": [2.0, 1.0, 9.0]}),
              8: pd.DataFrame({"position": [1, 2], "activation": [3.0, 0.0]})}
    t = gene_activation_table(frames, tokens).set_index("gene")
    assert list(t.index) == ["LYZ", "MS4A1", "CD79A"]  # 9/2 > (1+3)/2 > (2+0)/2
    assert t.loc["LYZ", "mean_activation"] == pytest.approx(4.5) and t.loc["LYZ", "mean_where_present"] == pytest.approx(9.0)
    assert (t.loc["LYZ", "n_cells"], t.loc["CD79A", "n_cells"], t.loc["CD79A", "n_firing"]) == (1, 2, 1)
    assert set(t["n_total"]) == {2}


def test_card_positions_are_the_tokens_the_model_read(tiny, tmp_path: Path) -> None:
    """The position store's ``position`` p of a cell is the gene :func:`position_genes` names there:
    the captured input embedding at p is LayerNorm(gene embedding + position-p embedding)."""
    from sciscope.domains.immunology.cards import position_genes

    ad, model = tiny
    ex = ad.examples("test")
    store = collect(model, ad.batches(ex, model, batch_size=64), ["embeddings"], out=tmp_path / "pos", pooling="none",
                    obs=ex.obs.assign(example_row=np.arange(len(ex))), aliases=ad.aliases, progress=False)
    emb, obs = model.bert.embeddings, store.obs
    for r in (0, len(ex) - 1):
        idx = np.flatnonzero(obs["example_row"].to_numpy() == r)
        toks = position_genes(ad, ex.inputs[r])
        pos = obs["position"].to_numpy()[idx]
        assert [toks[p] for p in pos] == list(ex.inputs[r])[: len(pos)] and toks[0] == "<cls>"
        ids = torch.as_tensor([ad.vocabulary.ids[toks[p]] for p in pos])
        with torch.no_grad():
            expected = emb.LayerNorm(emb.word_embeddings.weight[ids] + emb.position_embeddings.weight[torch.as_tensor(pos)]
                                     + emb.token_type_embeddings.weight[0])
        assert np.allclose(np.asarray(store.array("embeddings", idx)), expected.numpy(), atol=1e-5)


def test_card_lens_basis_is_the_head_output_embedding_of_genes(tiny) -> None:
    from types import SimpleNamespace

    ad, model = tiny
    hidden = int(model.config.hidden_size)
    ctx = SimpleNamespace(model=lambda: model, sae=lambda: SimpleNamespace(cfg=SimpleNamespace(d_in=hidden)))
    W, names, _ = ad.lens_basis(ctx)
    assert W.shape == (len(ad.vocabulary.genes), hidden) and sorted(names) == sorted(ad.vocabulary.genes)
    g = names[5]
    assert np.allclose(W[5], model.get_output_embeddings().weight[ad.vocabulary.ids[g]].detach().numpy())
    wrong = SimpleNamespace(model=lambda: model, sae=lambda: SimpleNamespace(cfg=SimpleNamespace(d_in=hidden + 1)))
    assert ad.lens_basis(wrong) is None  # an SAE at another width: no lens
    assert "cell_type" in ad.card_columns and set(ad.card_columns) <= set(ad.obs.columns)


def test_card_pictures_draw_every_cell_outline_the_top_and_name_markers() -> None:
    from sciscope.core.cards import Panel
    from sciscope.domains.immunology.cards import _MARKER_OTHER, _MARKER_OWN, gene_figure, marker_labels, umap_figure

    rng = np.random.default_rng(0)
    xy = rng.normal(size=(40, 2))
    act = np.where(np.arange(40) % 3 == 0, 0.0, rng.uniform(0.1, 1.0, 40))
    top = [int(i) for i in np.argsort(-act)[:5]]
    fig = umap_figure(xy, act, top, ["CD19+ B"] * 20 + ["CD14+ Monocyte"] * 20, feature=7)
    cols = fig.axes[0].collections
    drawn = np.concatenate([c.get_offsets() for c in cols[:2]])
    assert len(drawn) == 40 and np.allclose(np.sort(drawn, axis=0), np.sort(xy, axis=0))  # every cell, once
    assert np.allclose(cols[2].get_offsets(), xy[top])  # the outlines sit on the top cells
    assert len(fig.axes) == 2  # the colour bar
    png = Panel.from_figure(fig, "cells").png
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000

    markers = marker_labels(["CD19+ B", "CD14+ Monocyte"], {"CD14+ Monocyte": ["S100A9"]})
    assert markers["MS4A1"] == ["CD19+ B"] and markers["S100A9"] == ["CD14+ Monocyte"] and "CD3E" not in markers
    table = pd.DataFrame({"gene": ["MS4A1", "GENE1", "S100A9"], "mean_activation": [3.0, 2.0, 1.0], "n_cells": [5, 5, 4],
                          "n_firing": [5, 4, 4], "n_total": 5})
    fig = gene_figure(table, markers, own_type="CD19+ B", feature=7)
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_yticklabels()][::-1]  # strongest at the top
    colours = [_hex(p.get_facecolor()) for p in ax.patches][::-1]
    assert labels[0].startswith("MS4A1") and "CD19+ B" in labels[0] and labels[1] == "GENE1"
    assert colours[0] == _MARKER_OWN and colours[2] == _MARKER_OTHER and colours[1] not in (_MARKER_OWN, _MARKER_OTHER)
    import matplotlib.pyplot as plt

    plt.close(fig)


def _hex(rgba) -> str:
    from matplotlib.colors import to_hex

    return to_hex(rgba)


# ------------------------------------------------------------------------------------------- tracing


def test_tracing_pairs_align_rank_slots_of_two_cell_types(tiny) -> None:
    from .tracing_checks import check_pairs, differing_positions

    ad, model = tiny
    pairs = ad.tracing_pairs(RunContext(ad))
    assert pairs is not None and "CD14+ Monocyte" in pairs.concept and "CD19+ B" in pairs.concept
    ids, bad = pairs.clean["input_ids"], pairs.corrupted["input_ids"]
    # the tiny model (30 steps) barely reads the context: its total effect is tiny but not zero
    m = check_pairs(model, pairs, n_positions=ids.shape[1])
    assert m["B"] >= 5
    g, mask = pairs.position_groups, ad.vocabulary.special["mask"]
    assert g["<cls>"] == [0] and g["masked slot"] == [1]  # rank 1 (after <cls>) is masked in both cells
    assert (ids[:, 1] == mask).all() and (bad[:, 1] == mask).all()
    # the cells differ only at gene slots (not <cls>, <eos>, the masked slot or padding)
    genes = g["top-ranked genes (ranks <= 5)"] | g["lower-ranked genes"]
    differ = ids != bad
    assert not (differ & ~genes).any() and (differing_positions(pairs) >= genes.sum(1) // 2).all()
    assert torch.equal(g["<eos>"].float().argmax(1), pairs.clean["attention_mask"].sum(1) - 1)
    assert (g["marker genes (either cell)"] <= genes).all()
    with pytest.raises(ConfigError, match="trace_mask_rank"):
        ImmunologyAdapter({**TINY, "trace_mask_rank": 0})


@pytest.mark.slow
def test_tracing_total_effect_of_a_trained_model() -> None:
    """Trained ten times longer than the tiny model, the head puts more of the monocyte markers' mass at the
    masked top rank of a monocyte than of a B cell (0.16 nats when measured)."""
    ad = ImmunologyAdapter({**TINY, "train_steps": 300})
    from .tracing_checks import check_pairs

    pairs = ad.tracing_pairs(RunContext(ad))
    m = check_pairs(ad.ctx.model(), pairs, n_positions=pairs.clean["input_ids"].shape[1])
    assert float(m["score_clean"].mean() - m["score_corrupted"].mean()) > 0.05
