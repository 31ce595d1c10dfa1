"""Transcoders: a sparse code of an MLP's input trained to predict its output, spliced in place of the MLP.

The model is a tiny random-init GPT-2 whose weights are drawn at std 0.3 instead of 0.02, so that its
MLPs are nonlinear (pre-activations of unit scale) and matter to its outputs; its task is to predict
its own clean argmax tokens (cross-entropy), so that the clean model scores best and ablating an MLP
costs loss. No download, no training of the model.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sciscope.core import DomainAdapter, Examples, count_hooks
from sciscope.core.capture import capture
from sciscope.core.context import RunContext
from sciscope.core.errors import ConfigError, IntegrityError, ShapeError
from sciscope.core.fidelity import FromSite, TaskLoss, fidelity, sae_reconstruction, splice_from
from sciscope.core.sae import (
    SAETrainResult,
    TopKTranscoder,
    create_sae,
    evaluate_sae,
    load_sae,
    sae_config,
    train_sae,
)
from sciscope.core.sae.metrics import predictor_explained_variance
from sciscope.core.sae.transcoder import (
    fit_ridge,
    linear_map,
    load_run_transcoder,
    splice_transcoder,
    transcoder_analysis,
    transcoder_block,
)

VOCAB, WIDTH, SEQ = 24, 32, 16
MLP_IN, MLP_OUT = "transformer.h.0.mlp:input", "transformer.h.0.mlp"


def tiny_gpt2(seed: int = 0) -> nn.Module:
    """2 blocks of width 32, weights at std 0.3: MLP pre-activations of unit scale, so GELU bends."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=WIDTH, n_layer=2, n_head=2, n_positions=SEQ, initializer_range=0.3,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval().requires_grad_(False)


def self_prediction_task(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor | None = None) -> TaskLoss:
    """Cross-entropy of the model's logits against its own clean argmax tokens at the real positions."""
    mask = torch.ones_like(ids) if mask is None else mask
    real = mask.bool()
    with torch.no_grad():
        labels = model(input_ids=ids, attention_mask=mask).logits.argmax(-1)[real]  # (n,)

    def logits(m: nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return m(input_ids=ids, attention_mask=mask).logits[real]  # (n, V)

    return TaskLoss(lambda m: float(F.cross_entropy(logits(m), labels)), "self-prediction cross-entropy",
                    log_probs=lambda m: F.log_softmax(logits(m), -1))


@functools.cache
def gpt2_rows() -> tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The model, 256 training sequences' MLP input / output rows (4096 x 32 each) and 64 held-out sequences."""
    model = tiny_gpt2()
    gen = torch.Generator().manual_seed(1)
    ids, held = torch.randint(0, VOCAB, (256, SEQ), generator=gen), torch.randint(0, VOCAB, (64, SEQ), generator=gen)
    with torch.no_grad(), capture(model, [MLP_IN, MLP_OUT]) as cap:
        model(ids)
    return model, cap[MLP_IN].flatten(0, 1), cap[MLP_OUT].flatten(0, 1), ids, held  # (4096, 32) x 2


def pair_batches(x: torch.Tensor, y: torch.Tensor, size: int = 256):
    """A zero-arg callable giving one pass of aligned (input, target) batches."""
    return lambda: ((x[i:i + size], y[i:i + size]) for i in range(0, len(x), size))


def held_rows() -> tuple[torch.Tensor, torch.Tensor]:
    """MLP input / output rows of the 64 held-out sequences: (1024, 32) each."""
    model, _, _, _, held = gpt2_rows()
    with torch.no_grad(), capture(model, [MLP_IN, MLP_OUT]) as cap:
        model(held)
    return cap[MLP_IN].flatten(0, 1), cap[MLP_OUT].flatten(0, 1)


@functools.cache
def trained_gpt2_transcoder() -> SAETrainResult:
    """200 steps on the training rows, the held-out rows checked every 50 steps (validation pairs)."""
    _, x, y, _, _ = gpt2_rows()
    cfg = sae_config("topk_transcoder", d_in=WIDTH, d_sae=8 * WIDTH, k=16, dead_after=2000)
    return train_sae(cfg, pair_batches(x, y), max_steps=200, lr=5e-3, seed=0, progress=False,
                     val_data=held_rows(), val_every=50)


# ----------------------------------------------------------------------------- the module and its file


def test_trains_saves_and_reloads_bit_equal(tmp_path: Path) -> None:
    result = trained_gpt2_transcoder()
    tc = result.sae
    assert isinstance(tc, TopKTranscoder) and tc.cfg.architecture == "topk_transcoder"
    assert "target_mean" in result.normalization and result.steps == 200
    loaded = load_sae(result.save(tmp_path / "tc"))
    assert type(loaded) is TopKTranscoder and loaded.cfg == tc.cfg
    mine, theirs = tc.state_dict(), loaded.state_dict()
    assert set(mine) == set(theirs) and "b_in" in mine
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    _, x, _, _, _ = gpt2_rows()
    with torch.no_grad():
        assert torch.equal(tc.decode(tc.encode(x[:64])), loaded.decode(loaded.encode(x[:64])))
    assert json.loads((tmp_path / "tc" / "train.json").read_text())["normalization"]["method"] == "scalar"


def test_export_to_saelens_refuses_it_rather_than_writing_a_plain_sae(tmp_path: Path) -> None:
    """Its encoder subtracts b_in, not b_dec: a SAELens TopK SAE file would encode otherwise."""
    from sciscope.core.sae.formats import export_saelens

    with pytest.raises(ConfigError, match="topk_transcoder"):
        export_saelens(create_sae(sae_config("topk_transcoder", d_in=8, d_sae=16, k=2)), tmp_path / "x")


def test_the_normalisation_is_folded_in_so_it_reads_raw_inputs_and_writes_raw_outputs() -> None:
    """Held-out explained variance of raw MLP outputs from raw MLP inputs: far above the untrained
    transcoder (the control) and above a dense ridge map of the input (the no-sparsity baseline)."""
    _, x, y, _, _ = gpt2_rows()
    xt, yt = held_rows()
    result = trained_gpt2_transcoder()
    tc = result.sae
    ev = evaluate_sae(tc, (xt, yt))["explained_variance"]
    untrained = evaluate_sae(create_sae(tc.cfg, seed=1), (xt, yt))["explained_variance"]
    w, b = fit_ridge(x.numpy(), y.numpy())
    pred = linear_map(w, b)(xt)
    ridge = 1 - float((pred - yt).pow(2).sum() / (yt - yt.mean(0)).pow(2).sum())
    assert ev > 0.83, ev
    assert untrained < 0.2, untrained
    assert ev > ridge + 0.05, (ev, ridge)
    # the validation checks read the same pairs in the normalised space it trains in: the same number
    v = result.validation
    assert list(v.step) == [50, 100, 150, 200] and v.explained_variance.iloc[-1] > v.explained_variance.iloc[0]
    assert v.explained_variance.iloc[-1] == pytest.approx(
        evaluate_sae(tc, (xt, yt))["explained_variance"], abs=1e-3)  # the last check is the final weights


def test_pairs_need_a_transcoder_and_a_stream_does_not_mix_pairs_with_plain_batches() -> None:
    _, x, y, _, _ = gpt2_rows()
    with pytest.raises(ConfigError, match="autoencoder"):
        train_sae(sae_config("topk", d_in=WIDTH, d_sae=64, k=4), pair_batches(x, y), max_steps=2, progress=False)
    mixed = [(x[:64], y[:64]), x[64:128]]
    with pytest.raises(ShapeError, match="batch 1"):
        train_sae(sae_config("topk_transcoder", d_in=WIDTH, d_sae=64, k=4), mixed, max_steps=2, progress=False)
    with pytest.raises(ShapeError, match="target rows"):
        train_sae(sae_config("topk_transcoder", d_in=WIDTH, d_sae=64, k=4), [(x[:64], y[:32])], max_steps=1,
                  progress=False)


# ----------------------------------------------------------------------------- spliced in place of the MLP


def test_spliced_in_place_of_the_mlp_it_recovers_the_loss_and_an_untrained_one_does_not() -> None:
    model, _, _, _, held = gpt2_rows()
    task = self_prediction_task(model, held)
    tc = trained_gpt2_transcoder().sae
    table = fidelity(model, MLP_OUT, task, {
        "transcoder": FromSite(MLP_IN, sae_reconstruction(tc)),
        "untrained": FromSite(MLP_IN, sae_reconstruction(create_sae(tc.cfg, seed=1))),
    }).set_index("condition")
    assert table.loss["zero_ablation"] > table.loss["clean"] + 0.5  # the MLP matters to the task
    assert table.loss_recovered["transcoder"] > 0.8, table
    assert table.loss_recovered["untrained"] < 0.2, table
    assert table.kl["transcoder"] < 0.5 * table.kl["mean_ablation"], table
    # the context manager splices exactly what fidelity measured
    with splice_transcoder(model, tc, MLP_IN, MLP_OUT):
        assert count_hooks(model) == 2  # a read of the input, an edit of the output
        inside = task.fn(model)
    assert inside == pytest.approx(table.loss["transcoder"], rel=1e-6)
    assert count_hooks(model) == 0 and task.fn(model) == pytest.approx(table.loss["clean"], rel=1e-6)


def test_the_splice_replaces_the_mlp_output_by_decode_of_encode_of_its_input() -> None:
    model, _, _, _, held = gpt2_rows()
    tc = trained_gpt2_transcoder().sae
    ids = held[:4]
    with torch.no_grad(), capture(model, [MLP_IN, MLP_OUT]) as clean:
        model(ids)
    with torch.no_grad(), splice_transcoder(model, tc, MLP_IN, MLP_OUT), capture(model, [MLP_OUT]) as cap:
        model(ids)
    expected = tc.decode(tc.encode(clean[MLP_IN]))  # (4, 16, 32): block 0's input does not depend on the splice
    assert torch.allclose(cap[MLP_OUT], expected, atol=1e-5)
    # positions: only those are replaced, the others keep the MLP's own output
    with torch.no_grad(), splice_transcoder(model, tc, MLP_IN, MLP_OUT, positions=[0, 1]), \
            capture(model, [MLP_OUT]) as part:
        model(ids)
    assert torch.allclose(part[MLP_OUT][:, :2], expected[:, :2], atol=1e-5)
    assert torch.allclose(part[MLP_OUT][:, 2:], clean[MLP_OUT][:, 2:], atol=1e-6)


def test_the_splice_leaves_no_hook_behind_on_an_error_and_refuses_a_source_after_its_site() -> None:
    model, _, _, _, held = gpt2_rows()
    tc = trained_gpt2_transcoder().sae
    with pytest.raises(RuntimeError, match="inside"):
        with splice_transcoder(model, tc, MLP_IN, MLP_OUT):
            raise RuntimeError("inside")
    assert count_hooks(model) == 0
    # block 1's input is computed after block 0's MLP: reading it there is a mistake, said so
    with pytest.raises(ShapeError, match="ran before its source"):
        with splice_from(model, "transformer.h.1.mlp:input", MLP_OUT, lambda h: h):
            model(held[:2])
    assert count_hooks(model) == 0
    # a replacement of the wrong width is refused
    with pytest.raises(ShapeError, match="replacement has shape"):
        with splice_from(model, MLP_IN, MLP_OUT, lambda h: h[:, :4]):
            model(held[:2])
    assert count_hooks(model) == 0


# ----------------------------------------------------------------------------- a planted sparse MLP


class SparseMLP(nn.Module):
    """An MLP that is exactly a sparse function of its input: y = 3 ReLU(x W_e - 1.5) W_d + 0.5,
    32 unit-norm atoms in 16 dimensions, about 6 firing per row."""

    def __init__(self, d: int = 16, n_atoms: int = 32, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        w_e = torch.randn(d, n_atoms, generator=g)
        w_d = torch.randn(n_atoms, d, generator=g)
        self.register_buffer("w_e", w_e / w_e.norm(dim=0))  # (d, n_atoms) unit columns
        self.register_buffer("w_d", w_d / w_d.norm(dim=1, keepdim=True))  # (n_atoms, d) unit rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 3 * torch.relu(x @ self.w_e - 1.5) @ self.w_d + 0.5


def test_a_planted_sparse_mlp_is_recovered() -> None:
    """Held-out explained variance > 0.95 and the planted output atoms found among the decoder rows,
    where the dense ridge map of the input explains < 0.8 and an untrained transcoder nothing."""
    mlp = SparseMLP()

    def rows(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(n, 16, generator=torch.Generator().manual_seed(seed)) + 1.0
        return x, mlp(x)

    (x, y), (xt, yt) = rows(8192, 1), rows(2048, 2)
    cfg = sae_config("topk_transcoder", d_in=16, d_sae=64, k=8, dead_after=2000)
    tc = train_sae(cfg, pair_batches(x, y), max_steps=300, lr=1e-2, seed=0, progress=False).sae
    ev = evaluate_sae(tc, (xt, yt))["explained_variance"]
    w, b = fit_ridge(x.numpy(), y.numpy())
    ridge = 1 - float((linear_map(w, b)(xt) - yt).pow(2).sum() / (yt - yt.mean(0)).pow(2).sum())
    # the baseline is scored by the accumulator evaluate_sae scores the transcoder with, batch by batch
    assert predictor_explained_variance(linear_map(w, b), pair_batches(xt, yt, 300)) == pytest.approx(ridge, abs=1e-6)
    assert predictor_explained_variance(lambda h: tc(h)[0], pair_batches(xt, yt, 300)) == pytest.approx(ev, abs=1e-12)
    untrained = evaluate_sae(create_sae(cfg, seed=1), (xt, yt))["explained_variance"]
    assert ev > 0.95 and ridge < 0.8 and untrained < 0.0, (ev, ridge, untrained)
    dec = tc.W_dec.detach() / tc.W_dec.detach().norm(dim=1, keepdim=True)  # (64, 16)
    best = (mlp.w_d @ dec.T).max(dim=1).values  # (32,) best cosine of each planted atom
    assert float(best.mean()) > 0.9, best


# ----------------------------------------------------------------------------- the analysis


class TinyLMAdapter(DomainAdapter):
    """Random token sequences of varying length (right padding), read by the std-0.3 tiny GPT-2."""

    name = "tiny_lm_transcoder"
    default_config = {"n_examples": 160, "seed": 0}

    def examples(self, split: str = "train") -> Examples:
        n = self.config["n_examples"]
        rng = np.random.default_rng(self.config["seed"])
        lengths = rng.integers(6, SEQ + 1, n)
        ids = rng.integers(1, VOCAB, (n, SEQ))
        obs = pd.DataFrame({"row": np.arange(n), "length": lengths, "first": ids[:, 0] % 2 == 0,
                            "split": np.where(np.arange(n) % 4 == 0, "test", "train")})
        ex = Examples.of_split(obs, split, inputs="row", concepts=["first"], domain=self.name)
        return Examples(ex.obs, [ids[r, :lengths[r]] for r in ex.inputs], ex.concepts)

    def model(self, spec: str | None = None) -> nn.Module:
        return tiny_gpt2()

    def batches(self, examples: Examples, model: nn.Module, *, batch_size: int = 32) -> Iterator[dict[str, torch.Tensor]]:
        for start in range(0, len(examples), batch_size):
            seqs = examples.inputs[start:start + batch_size]
            ids = torch.zeros(len(seqs), SEQ, dtype=torch.long)
            mask = torch.zeros(len(seqs), SEQ, dtype=torch.long)
            for i, s in enumerate(seqs):
                ids[i, :len(s)], mask[i, :len(s)] = torch.as_tensor(s), 1
            yield {"input_ids": ids, "attention_mask": mask}

    @property
    def sites(self) -> list[str]:
        return ["layer.0", "layer.1"]

    @property
    def aliases(self) -> dict[str, str]:
        return {"layer.{i}": "transformer.h.{i}"}

    @property
    def sae_site(self) -> str:
        return "layer.0"

    @property
    def fidelity_positions(self) -> slice:
        return slice(1, None)  # the first position is left out, as a causal LM's attention sink is

    def task_loss(self, ctx: RunContext) -> TaskLoss:
        held = self.examples("test")
        batch = next(self.batches(held, ctx.model(), batch_size=len(held)))
        return self_prediction_task(ctx.model(), batch["input_ids"], batch["attention_mask"])


RECIPE = {"sae_steps": 400, "sae_expansion": 8, "sae_k": 16, "sae_batch_size": 256, "sae_lr": 3e-3,
          "sae_patience": 0, "batch_size": 64}


def test_the_analysis_trains_scores_saves_and_hands_on_the_transcoder(tmp_path: Path) -> None:
    adapter = TinyLMAdapter()
    ctx = RunContext(adapter, RECIPE, run_dir=tmp_path, stage="sae")
    analysis = transcoder_analysis()
    assert (analysis.name, analysis.stage) == ("transcoder", "sae")
    rows, _ = analysis.run(ctx)
    # the layer: the block whose residual output is the SAE site, through the alias
    tc, layer, mlp_in, mlp_out = ctx.live["transcoder"]
    assert (layer, mlp_in, mlp_out) == (0, MLP_IN, MLP_OUT)
    assert isinstance(tc, TopKTranscoder) and tc.cfg.d_sae == 8 * WIDTH and tc.cfg.k == 16
    # the rows: every real position but the first of each example, padding never
    ex = adapter.examples("all")
    q = pd.read_csv(tmp_path / "sae" / "transcoder_quality.csv").set_index("metric")
    fid = pd.read_csv(tmp_path / "sae" / "transcoder_fidelity.csv").set_index("condition")
    ev = q.loc["explained variance of the MLP output (held-out)"]
    lr = q.loc["loss recovered"]
    assert ev.transcoder > 0.8 and ev.transcoder > ev.untrained_transcoder + 0.3 and ev.transcoder > ev.ridge, ev
    assert lr.transcoder > 0.7 and lr.transcoder > lr.untrained_transcoder + 0.3, lr
    assert lr.transcoder > fid.loss_recovered["mean_ablation"], (lr, fid)
    assert q.loc["L0 (active units per row)", "transcoder"] <= 16 + 1e-9
    assert q.loc["L0 (active units per row)", "pca_at_l0"] == round(q.loc["L0 (active units per row)", "transcoder"])
    assert 0 <= q.loc["dead fraction (held-out)", "transcoder"] < 0.5
    held_rows = int(sum(ex.obs.length[ex.obs.split == "test"] - 1))
    assert f"{held_rows} held-out rows" in ev.note
    # the headline rows: fidelity's format, each beside a control and a baseline
    assert [r["name"] for r in rows] == ["loss recovered (transcoder in place of the MLP)",
                                         "transcoder explained variance of the MLP output (held-out)"]
    for r in rows:
        assert {"value", "control", "control_label", "baseline", "baseline_label", "note", "source"} <= set(r)
        assert r["source"] == "sae/transcoder_quality.csv" and np.isfinite(r["value"])
    assert rows[0]["value"] == pytest.approx(lr.transcoder) and rows[1]["baseline"] == pytest.approx(ev.ridge)
    # saved under the sae stage; the captured rows are gone
    assert (tmp_path / "sae" / "transcoder" / "cfg.json").is_file()
    assert not (tmp_path / "sae" / "transcoder_rows").exists()
    # a later process (a fresh context on the same run) loads the same transcoder
    later = load_run_transcoder(RunContext(TinyLMAdapter(), RECIPE, run_dir=tmp_path, stage="features"))
    assert later is not None and later[1:] == (0, MLP_IN, MLP_OUT)
    assert all(torch.equal(a, b) for a, b in zip(later[0].state_dict().values(), tc.state_dict().values(), strict=True))


def test_the_layer_is_the_sae_sites_block_else_the_middle_and_no_task_loss_means_no_analysis() -> None:
    model = tiny_gpt2()

    class Middle(TinyLMAdapter):
        @property
        def sae_site(self) -> str:
            return "transformer.ln_f"  # not a block's output

        def task_loss(self, ctx: RunContext) -> None:
            return None

    class Second(TinyLMAdapter):
        @property
        def sae_site(self) -> str:
            return "layer.1"

    assert transcoder_block(model, Middle()).layer == 1  # 2 blocks: the middle is index 1
    assert transcoder_block(model, Second()).mlp_in == "transformer.h.1.mlp:input"
    ctx = RunContext(Middle(), RECIPE, stage="sae")
    assert transcoder_analysis().run(ctx)[0] == []
    assert load_run_transcoder(ctx) is None


def test_loss_recovered_is_not_measured_where_removing_the_mlp_costs_the_task_nothing() -> None:
    """Measured on MiniLM's layer-3 MLP under the geospatial read-out task: zero ablation *lowered* the
    loss (0.586 < 0.596), and the ratio came out at 0.73 for the transcoder and 4.4 for an untrained
    one. A ratio over a gap <= 0 is noise: the headline says so and gives no number."""
    from sciscope.core.sae.transcoder import transcoder_rows

    conditions = ["clean", "transcoder", "untrained_transcoder", "pca_at_l0", "ridge", "zero_ablation", "mean_ablation"]
    losses = [0.5957, 0.5932, 0.6272, 0.5915, 0.5966, 0.5864, 0.5996]
    fid = pd.DataFrame({"condition": conditions, "loss": losses, "kl": np.nan})
    fid["loss_recovered"] = (0.5864 - fid.loss) / (0.5864 - 0.5957)
    fid["loss_recovered_vs_mean"] = (0.5996 - fid.loss) / (0.5996 - 0.5957)
    t = fid.set_index("condition")
    metrics = ["explained variance of the MLP output (held-out)", "L0 (active units per row)",
               "dead fraction (held-out)", "loss recovered"]
    quality = pd.DataFrame({"metric": metrics, "transcoder": [0.99, 32, 0.4, t.loss_recovered["transcoder"]],
                            "untrained_transcoder": [0.02, 32, 0.2, t.loss_recovered["untrained_transcoder"]],
                            "pca_at_l0": [0.98, 32, np.nan, t.loss_recovered["pca_at_l0"]],
                            "ridge": [0.99, 384, np.nan, t.loss_recovered["ridge"]]})
    result = {"quality": quality, "fidelity": fid, "task": "chord error", "k": 32, "layer": 3, "mlp_in": "a:input",
              "mlp_out": "b", "steps": 10, "n_train": 10, "n_test": 5, "source": "sae/transcoder_quality.csv"}
    loss_row, ev_row = transcoder_rows(result)
    assert np.isnan(loss_row["value"]) and np.isnan(loss_row["control"]) and np.isnan(loss_row["baseline"])
    assert loss_row["note"].startswith("NOT MEASURED: zero-ablating the MLP does not raise the task loss")
    assert ev_row["value"] == 0.99 and ev_row["baseline"] == 0.99  # the explained variance still stands


@pytest.mark.parametrize("sites,match", [
    ({"layer": 0, "mlp_in": MLP_IN}, "has no key 'mlp_out'"),
    ({"layer": "0", "mlp_in": MLP_IN, "mlp_out": MLP_OUT}, "key 'layer' is '0', not an integer"),
    ([0, MLP_IN, MLP_OUT], "not a JSON object"),
    (None, "is missing"),
])
def test_a_saved_transcoder_whose_sites_file_is_not_what_the_analysis_wrote_is_refused(tmp_path: Path, sites,
                                                                                        match) -> None:
    folder = tmp_path / "sae" / "transcoder"
    create_sae(sae_config("topk_transcoder", d_in=8, d_sae=16, k=2)).save(folder)
    if sites is not None:
        (folder / "sites.json").write_text(json.dumps(sites))
    ctx = RunContext(TinyLMAdapter(), RECIPE, run_dir=tmp_path, stage="features")
    with pytest.raises(IntegrityError, match=match) as err:
        load_run_transcoder(ctx)
    assert str(folder / "sites.json") in str(err.value)  # names the file
    assert "transcoder" not in ctx.live


def test_rows_of_an_adapter_whose_positions_count_from_the_end_are_every_valid_position() -> None:
    """Robotics' SAE positions are the action tokens, ``[-2, -1]``: per-position rows cannot be chosen
    from the end (a stored row knows its position from the start), so the transcoder learns from
    every valid position -- the MLP is the same map at each -- instead of failing the stage."""
    from sciscope.core.sae.transcoder import _row_rule

    assert _row_rule([-2, -1]) is None and _row_rule(slice(-3, None)) is None
    assert _row_rule([0, 3]) == [0, 3] and _row_rule(slice(1, None)) == slice(1, None) and _row_rule(None) is None


def test_a_run_can_leave_the_transcoder_out(tmp_path: Path) -> None:
    ctx = RunContext(TinyLMAdapter(), {**RECIPE, "sae_transcoder": False}, run_dir=tmp_path, stage="sae")
    assert transcoder_analysis().run(ctx)[0] == []
    assert "transcoder" not in ctx.live and not (tmp_path / "sae" / "transcoder").exists()
