"""Feature attribution on a planted circuit: a 2-block residual toy whose SAE feature A (block 0)
writes the direction that transcoder feature B (block 1's MLP) reads, and B alone drives the
output; distractors fire strongly and do nothing (D -> C), or act weakly (E, F -> G)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from sciscope.core import count_hooks
from sciscope.core.attribution import (
    FeatureDictionary,
    attribute,
    attribution_analysis,
    splice_dictionaries,
)
from sciscope.core.sae import create_sae, sae_config
from sciscope.core.tracing import CounterfactualPairs

D_MODEL, P, B = 8, 3, 6
e = torch.eye(D_MODEL)
# SAE at blocks.0 (the residual after block 0): feature id -> the direction it reads and writes
SAE_A, SAE_D, SAE_E, SAE_F, SAE_H, SAE_DEAD = 2, 0, 3, 1, 4, 5
# transcoder of block 1's MLP
TC_C, TC_B, TC_G, TC_DEAD = 0, 1, 2, 3


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(D_MODEL, 4), nn.ReLU(), nn.Linear(4, D_MODEL))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(x)


class Toy(nn.Module):
    """(B, P, 8) -> (B, 1): two residual blocks, a linear head summed over the valid positions."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(D_MODEL, 1, bias=False)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        out = self.head(x)  # (B, P, 1)
        if attention_mask is not None:
            out = out * attention_mask.unsqueeze(-1)
        return out.sum(1)  # (B, 1)


def _toy(b_reads: int = 0) -> Toy:
    """The planted model. Block 0's MLP is off; block 1's hidden units: e0 -> 2 e5 (what B does),
    e2 -> e6 (C), e3 -> 0.1 e7 (G), e7 -> 0.5 e1 (no transcoder feature: its error term). The head
    reads e5 (1), e7 (0.3), e1 (0.2). ``b_reads``: the direction the e5-writing unit reads."""
    model = Toy()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        mlp = model.blocks[1].mlp
        for unit, (src, dst, w) in enumerate([(b_reads, 5, 2.0), (2, 6, 1.0), (3, 7, 0.1), (7, 1, 0.5)]):
            mlp[0].weight[unit, src] = 1.0
            mlp[2].weight[dst, unit] = w
        model.head.weight[0, 5], model.head.weight[0, 7], model.head.weight[0, 1] = 1.0, 0.3, 0.2
    return model.eval().requires_grad_(False)


def _sae() -> nn.Module:
    """A ReLU SAE (the project's own class) with planted unit features; no feature for e7, so its
    error term is not zero."""
    sae = create_sae(sae_config("relu", d_in=D_MODEL, d_sae=6, normalize="none"))
    with torch.no_grad():
        sae.W_enc.zero_(), sae.b_enc.zero_(), sae.W_dec.zero_(), sae.b_dec.zero_()
        for fid, direction in [(SAE_D, 2), (SAE_F, 3), (SAE_A, 0), (SAE_E, 1), (SAE_H, 4)]:
            sae.W_enc[direction, fid] = 1.0
            sae.W_dec[fid, direction] = 1.0
        sae.W_enc[0, SAE_DEAD] = -1.0  # never fires on the non-negative e0 inputs
    return sae.eval().requires_grad_(False)


class Transcoder(nn.Module):
    """A plain transcoder (encode / decode only): the protocol any dictionary meets."""

    def __init__(self, b_reads: int = 0) -> None:
        super().__init__()
        self.W_enc = nn.Parameter(torch.zeros(D_MODEL, 4))
        self.W_dec = nn.Parameter(torch.zeros(4, D_MODEL))
        with torch.no_grad():
            for fid, (src, dst, w) in {TC_C: (2, 6, 1.0), TC_B: (b_reads, 5, 2.0), TC_G: (3, 7, 0.1)}.items():
                self.W_enc[src, fid] = 1.0
                self.W_dec[fid, dst] = w
            self.W_enc[5, TC_DEAD] = 1.0  # e5 is zero at the MLP's input
        self.requires_grad_(False)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x @ self.W_enc)  # (N, 8) -> (N, 4)

    def decode(self, c: torch.Tensor) -> torch.Tensor:
        return c @ self.W_dec  # (N, 4) -> (N, 8)


def _dicts(b_reads: int = 0, sae: nn.Module | None = None) -> list[FeatureDictionary]:
    return [FeatureDictionary("sae", sae if sae is not None else _sae(), "blocks.0"),
            FeatureDictionary("transcoder", Transcoder(b_reads), "blocks.1.mlp:input", "blocks.1.mlp")]


def _pairs(*, mask: bool = False, corrupt: int = 0) -> CounterfactualPairs:
    """Clean inputs carry e0 (A's direction); the corrupted ones do not. Distractors everywhere:
    strong e2 (D), e1 (E), e3 (F), e4 (H), e7 (nobody's feature)."""
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(B, P, D_MODEL)
    x[..., 0] = 0.5 + torch.rand(B, P, generator=g)
    x[..., 2] = 2.0 + torch.rand(B, P, generator=g)
    x[..., 1] = 0.5 * torch.rand(B, P, generator=g)
    x[..., 3] = torch.rand(B, P, generator=g)
    x[..., 4] = torch.rand(B, P, generator=g)
    x[..., 7] = torch.rand(B, P, generator=g)
    corrupted = x.clone()
    corrupted[..., corrupt] = 0.0
    if not mask:
        return CounterfactualPairs(x, corrupted, readout=lambda out: out, concept="e0 present")
    m = torch.ones(B, P, dtype=torch.long)
    m[:, -1] = 0  # the last position is padding, and e4 (feature H) appears only there
    x[:, :-1, 4] = 0.0
    corrupted[:, :-1, 4] = 0.0
    return CounterfactualPairs({"x": x, "attention_mask": m}, {"x": corrupted, "attention_mask": m},
                               readout=lambda out: out, concept="e0 present")


def _edge(res, source: str, target: str) -> pd.Series:
    e = res.edges
    row = e[(e.source == source) & (e.target == target)]
    assert len(row) == 1, f"edge {source} -> {target} missing from\n{e}"
    return row.iloc[0]


def test_the_spliced_model_with_error_terms_reproduces_the_model_exactly_and_leaves_no_hooks():
    model, pairs = _toy(), _pairs()
    before = model(pairs.clean)
    # both error terms are really there: the SAE has no e7 feature, the transcoder misses the e7 unit
    with torch.no_grad():
        h0 = pairs.clean.reshape(-1, D_MODEL)
        sae = _dicts()[0].module
        assert (h0 - sae.decode(sae.encode(h0))).abs().max() > 0.1
    for mode in ("total", "direct", "ablate"):
        with torch.enable_grad(), splice_dictionaries(model, _dicts(), mode=mode) as rec:
            assert count_hooks(model) == 4  # model pre-hook + SAE edit + transcoder read and write
            out = model(pairs.clean)
            assert torch.equal(out, before), mode
            assert rec.order() == ["sae", "transcoder"]
        assert count_hooks(model) == 0
    with pytest.raises(RuntimeError), splice_dictionaries(model, _dicts()):
        raise RuntimeError("boom")
    assert count_hooks(model) == 0 and torch.equal(model(pairs.clean), before)


def test_total_mode_keeps_the_models_gradient_and_direct_mode_freezes_the_error_terms():
    model, pairs = _toy(), _pairs()
    x = pairs.clean.clone().requires_grad_(True)
    model(x).sum().backward()
    true_grad, x.grad = x.grad.clone(), None
    assert true_grad[..., 7].abs().min() > 0.1  # the model reads e7 (head, and block 1's e7 unit)
    sae = _dicts()[0].module
    # total: the model's own gradient, and each code's is the decoder's read of the gradient at its site
    with splice_dictionaries(model, _dicts(), mode="total") as rec:
        model(x).sum().backward()
        code_grad = rec.passes["sae"].source.grad  # (B, P, 6)
    assert torch.equal(x.grad, true_grad)  # resid0 = x: dS/d resid0 is dS/dx
    torch.testing.assert_close(code_grad, true_grad @ sae.W_dec.T)
    assert count_hooks(model) == 0
    # direct: the gradient stops at the first dictionary it reaches; nothing flows past the SAE's
    # codes into x, and the SAE's codes see only the paths that avoid the transcoder's codes
    x.grad = None
    with splice_dictionaries(model, _dicts(), mode="direct") as rec:
        model(x).sum().backward()
        direct = rec.passes["sae"].source.grad  # (B, P, 6)
        tc_direct = rec.passes["transcoder"].source.grad  # (B, P, 4)
    assert x.grad is None
    assert torch.equal(direct[..., SAE_A], torch.zeros(B, P))  # A acts only through B
    assert torch.equal(direct[..., SAE_E], torch.full((B, P), 0.2))  # E: the head reads e1 directly
    assert torch.equal(tc_direct[..., TC_B], torch.full((B, P), 2.0))  # B writes 2 e5, the head reads e5


def test_attribution_of_a_planted_circuit_recovers_its_edges():
    model = _toy()
    res = attribute(model, _pairs(), _dicts(), top_k=2, ks=(1, 2), n_random=8, seed=0)
    assert count_hooks(model) == 0
    f = res.features.set_index(["dictionary", "feature"])
    # the default score: 1 on clean, 0 on corrupted; A and B each carry all of it
    assert res.params["score_clean"] == pytest.approx(1.0) and res.params["score_corrupted"] == pytest.approx(0.0)
    assert res.params["splice_max_error"] == 0.0
    assert f.attribution[("sae", SAE_A)] == pytest.approx(1.0, abs=1e-5)
    assert f.attribution[("transcoder", TC_B)] == pytest.approx(1.0, abs=1e-5)
    assert set(res.features.head(2).feature) == {SAE_A, TC_B}
    # the two strongest edges by effect on the score are A -> B and B -> output
    top2 = set(zip(res.edges.source.head(2), res.edges.target.head(2)))
    assert top2 == {(f"sae#{SAE_A}", f"transcoder#{TC_B}"), (f"transcoder#{TC_B}", "output")}, res.edges
    ab = _edge(res, f"sae#{SAE_A}", f"transcoder#{TC_B}")
    assert ab.effect == pytest.approx(1.0, abs=1e-5)
    assert ab.weight == pytest.approx(float(_pairs().clean[..., 0].sum((1,)).mean()), rel=1e-5)  # a_B = a_A
    assert _edge(res, f"transcoder#{TC_B}", "output").effect == pytest.approx(1.0, abs=1e-5)
    # the distractor edge D -> C is the largest in C's units but has no effect on the score
    dc = _edge(res, f"sae#{SAE_D}", f"transcoder#{TC_C}")
    assert dc.weight > 2 * ab.weight and abs(dc.effect) < 1e-6
    # A acts only through B: its direct edge to the output is nil (the transcoder replaces the MLP)
    assert f.direct[("sae", SAE_A)] == pytest.approx(0.0, abs=1e-6)
    # the weak secondary circuit F -> G -> output and E -> output are found, ranked below
    fg = _edge(res, f"sae#{SAE_F}", f"transcoder#{TC_G}").effect
    eo = _edge(res, f"sae#{SAE_E}", "output").effect
    assert 0 < fg < 0.1 and 0 < eo < 0.2
    # dead features are no nodes
    assert ("sae", SAE_DEAD) not in f.index and ("transcoder", TC_DEAD) not in f.index


def test_the_edges_follow_the_wiring_not_the_feature_ids():
    """Rewire block 1 so the e5-writer reads e2 (D's direction), and corrupt e2: the circuit is now
    D -> B (beside D -> C, which does nothing)."""
    res = attribute(_toy(b_reads=2), _pairs(corrupt=2), _dicts(b_reads=2), ks=(1,), n_random=2, n_single=0)
    assert res.params["n_degenerate_pairs"] == 0
    top = (res.edges.source.iloc[0], res.edges.target.iloc[0])
    assert f"sae#{SAE_A}" not in set(res.edges.source[res.edges.effect.abs() > 1e-6])
    assert {top, (res.edges.source.iloc[1], res.edges.target.iloc[1])} == {
        (f"sae#{SAE_D}", f"transcoder#{TC_B}"), (f"transcoder#{TC_B}", "output")}


def test_activation_x_gradient_agrees_with_true_single_ablations_in_the_linear_case():
    res = attribute(_toy(), _pairs(), _dicts(), ks=(1,), n_random=1, n_single=20)
    t = res.features
    assert t.true.notna().all() and len(t) == 8  # every live feature ablated alone
    np.testing.assert_allclose(t.true, t.predicted, atol=1e-5)
    ag = res.agreement()
    assert ag["pearson"] == pytest.approx(1.0, abs=1e-6) and ag["slope"] == pytest.approx(1.0, abs=1e-5)
    # ranking by activation alone puts the strong distractors (D, C) first: worse than a x g
    assert ag["spearman"] > ag["spearman_activation"] + 0.2


def test_top_k_ablation_moves_the_score_more_than_random_live_features():
    res = attribute(_toy(), _pairs(), _dicts(), top_k=2, ks=(1, 2), n_random=8, seed=3)
    tv = res.top_vs_random()
    assert tv["k"] == 2 and tv["true"] == pytest.approx(-1.0, abs=1e-5) and tv["fraction"] == pytest.approx(1.0, abs=1e-5)
    # A and B lie on one path: the sum of their attributions counts it twice
    assert tv["predicted"] == pytest.approx(-2.0, abs=1e-5)
    assert tv["random_fraction"] < 0.75 * tv["fraction"]
    rnd = res.ablation[(res.ablation.condition == "random") & (res.ablation.k == 2)]
    assert len(rnd) == 8 and rnd.draw.tolist() == list(range(1, 9))
    # seeded: the same draws again
    again = attribute(_toy(), _pairs(), _dicts(), top_k=2, ks=(1, 2), n_random=8, seed=3)
    pd.testing.assert_frame_equal(res.ablation, again.ablation)


def test_padding_positions_are_no_nodes():
    res = attribute(_toy(), _pairs(mask=True), _dicts(), ks=(1,), n_random=1, n_single=0)
    f = res.features.set_index(["dictionary", "feature"])
    # H (e4) fires only at the padding: no node, so no feature; D fires at every real position
    assert ("sae", SAE_H) not in f.index
    assert f.frequency[("sae", SAE_D)] == pytest.approx(1.0)
    assert f.attribution[("sae", SAE_A)] == pytest.approx(1.0, abs=1e-5)
    pairs = _pairs(mask=True)
    valid_e2 = float((pairs.clean["x"][..., 2] * pairs.clean["attention_mask"]).sum(1).mean())
    assert f.activation[("sae", SAE_D)] == pytest.approx(valid_e2, rel=1e-5)


def test_a_topk_sae_of_the_project_attributes_through_its_sparse_encoder():
    """TopK's custom sparse autograd must pass the gradient to its input (for the edges)."""
    base = _sae()
    sae = create_sae(sae_config("topk", d_in=D_MODEL, d_sae=6, k=5, normalize="none"))
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            getattr(sae, name).copy_(getattr(base, name))
    sae.eval().requires_grad_(False)
    # the transcoder first, the SAE after it (at the last residual): an edge into the TopK SAE
    dicts = [FeatureDictionary("transcoder", Transcoder(), "blocks.1.mlp:input", "blocks.1.mlp"),
             FeatureDictionary("sae", sae, "blocks.1")]
    model = _toy()
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.weight[0, 5] = 1.0
    sae.W_enc.data[5, SAE_H] = 1.0  # feature H now also reads e5, what B writes
    res = attribute(model, _pairs(), dicts, ks=(1,), n_random=1, n_single=4)
    w = _edge(res, f"transcoder#{TC_B}", f"sae#{SAE_H}").weight
    expected = float((2 * _pairs().clean[..., 0]).sum(1).mean())  # a_B * d a_H / d a_B, a_H = x4 + 2 a_B
    assert w == pytest.approx(expected, rel=1e-5)


class _Ctx:
    """The few RunContext doors the analysis uses."""

    def __init__(self, tmp_path, pairs, transcoder=None) -> None:
        self.adapter = SimpleNamespace(tracing_pairs=lambda ctx: pairs, sae_site="blocks.0", aliases={},
                                       fidelity_positions=None)
        self.live = {"sae": _sae()}
        if transcoder is not None:
            self.live["transcoder"] = transcoder
        self.seed, self.dir, self.written = 0, tmp_path, {}

    def model(self):
        return _toy()

    def _root(self):  # the run's folder: sae/model is the SAE ctx.sae() loads
        return self.dir

    def sae(self):
        from sciscope.core.sae import load_sae

        return load_sae(self._artifact("sae", "model"))

    def _artifact(self, *parts):  # as RunContext: a missing artifact raises SciscopeError
        from sciscope.core.errors import SciscopeError

        path = self.dir.joinpath(*parts)
        if not path.exists():
            raise SciscopeError(f"no {'/'.join(parts)} in this run")
        return path

    def write_table(self, name, table):
        table.to_csv(self.dir / name, index=False)
        self.written[name] = table
        return f"sae/{name}"

    def save_figure(self, name, fig):
        import matplotlib.pyplot as plt

        fig.savefig(self.dir / name)
        plt.close(fig)
        self.written[name] = fig
        return f"sae/{name}"


def test_the_analysis_writes_its_tables_and_figure_and_headline_rows(tmp_path):
    analysis = attribution_analysis()
    assert (analysis.name, analysis.stage) == ("attribution", "sae")
    # as the transcoder analysis leaves it in ctx.live: (transcoder, layer, mlp_in, mlp_out)
    tc = Transcoder()
    ctx = _Ctx(tmp_path, _pairs(), (tc, 1, "blocks.1.mlp:input", "blocks.1.mlp"))
    rows, _ = analysis.run(ctx)
    assert not (tmp_path / "sae").exists()  # the transcoder came from ctx.live, not from disk
    assert set(ctx.written) == {"attribution_features.csv", "attribution_edges.csv", "attribution_ablation.csv",
                                "attribution_graph.png"}
    assert (tmp_path / "attribution_graph.png").stat().st_size > 1000
    assert [r["source"] for r in rows] == ["sae/attribution_ablation.csv", "sae/attribution_features.csv"]
    head = rows[0]
    assert {"name", "value", "control", "control_label", "note", "source"} <= set(head)
    assert head["value"] > head["control"]
    dictionaries = ctx.live["attribution"].params["dictionaries"]
    assert list(dictionaries) == ["sae", "transcoder"]
    assert dictionaries["transcoder"]["read_site"] == "blocks.1.mlp:input"
    assert dictionaries["transcoder"]["write_site"] == "blocks.1.mlp" and dictionaries["transcoder"]["transcoder"]
    assert ctx.live["transcoder"][0] is tc
    f = ctx.live["attribution"].features.set_index(["dictionary", "feature"])
    assert f.attribution[("transcoder", TC_B)] == pytest.approx(1.0, abs=1e-5)
    edges = pd.read_csv(tmp_path / "attribution_edges.csv")
    assert (edges.source.iloc[0], edges.target.iloc[0]) in {(f"sae#{SAE_A}", f"transcoder#{TC_B}"),
                                                            (f"transcoder#{TC_B}", "output")}


def test_the_analysis_skips_itself_without_pairs_or_sae_and_runs_without_a_transcoder(tmp_path):
    analysis = attribution_analysis()
    assert analysis.run(_Ctx(tmp_path, None))[0] == []
    ctx = _Ctx(tmp_path, _pairs())  # an SAE, no transcoder
    rows, _ = analysis.run(ctx)
    assert list(ctx.live["attribution"].params["dictionaries"]) == ["sae"] and rows
    ctx = _Ctx(tmp_path, _pairs())
    del ctx.live["sae"]  # and no sae/model on disk: the run has no SAE
    assert analysis.run(ctx)[0] == [] and "attribution" not in ctx.live


def test_the_analysis_loads_the_runs_sae_and_lets_a_corrupt_one_raise(tmp_path):
    from sciscope.core.errors import SciscopeError

    analysis = attribution_analysis()
    _sae().save(tmp_path / "sae" / "model")
    ctx = _Ctx(tmp_path, _pairs())
    del ctx.live["sae"]
    rows, _ = analysis.run(ctx)  # the SAE read back from sae/model
    assert rows and list(ctx.live["attribution"].params["dictionaries"]) == ["sae"]
    (tmp_path / "sae" / "model" / "cfg.json").write_text("{not json")  # a corrupt SAE file: no silent skip
    ctx = _Ctx(tmp_path, _pairs())
    del ctx.live["sae"]
    with pytest.raises(SciscopeError, match="cfg.json"):
        analysis.run(ctx)


def test_pairs_whose_readouts_agree_score_zero_instead_of_dividing_by_noise():
    """Rewired so nothing reads e0, the corruption (e0 removed) changes nothing: every pair is degenerate."""
    res = attribute(_toy(b_reads=2), _pairs(), _dicts(b_reads=2), ks=(1,), n_random=1, n_single=0)
    assert res.params["n_degenerate_pairs"] == B
    assert res.params["score_clean"] == 0.0 and (res.features.attribution == 0).all()


def test_pairs_whose_readouts_agree_weigh_nothing_through_the_common_scale():
    """Every mean is over all pairs; two pairs whose clean input is their corrupted one score 0 clean
    and corrupted (their projection is 0), so the common scale alone makes them weigh ~0: the result
    is that of the four other pairs, though n_pairs counts six."""
    from sciscope.core.attribution import _Scorer

    pairs = _pairs()
    pairs.clean[:2, :, 0] = 0.0  # two pairs whose clean input is their corrupted one
    res = attribute(_toy(), pairs, _dicts(), ks=(1,), n_random=1, n_single=2)
    assert res.params["n_degenerate_pairs"] == 2 and res.params["n_pairs"] == B
    scorer = _Scorer(_toy(), pairs, [torch.arange(B)], B, torch.device("cpu"))
    assert torch.equal(scorer.clean[:2], torch.zeros(2)) and torch.equal(scorer.corrupted[:2], torch.zeros(2))
    assert float(scorer.clean.sum()) / B == pytest.approx(1.0)  # the mean over all six is still 1
    assert res.params["score_clean"] == pytest.approx(1.0) and res.params["score_corrupted"] == pytest.approx(0.0)
    f = res.features.set_index(["dictionary", "feature"])
    assert f.attribution[("sae", SAE_A)] == pytest.approx(1.0, abs=1e-5)
    assert f.true[("sae", SAE_A)] == pytest.approx(-1.0, abs=1e-5)
    # the same as the four non-degenerate pairs alone
    kept = CounterfactualPairs(pairs.clean[2:], pairs.corrupted[2:], readout=lambda out: out)
    alone = attribute(_toy(), kept, _dicts(), ks=(1,), n_random=1, n_single=2)
    assert alone.params["n_degenerate_pairs"] == 0 and alone.params["n_pairs"] == B - 2
    g = alone.features.set_index(["dictionary", "feature"])
    for key in (("sae", SAE_A), ("transcoder", TC_B)):
        assert f.attribution[key] == pytest.approx(g.attribution[key], abs=1e-5)
        assert f.direct[key] == pytest.approx(g.direct[key], abs=1e-5)
    ab = (f"sae#{SAE_A}", f"transcoder#{TC_B}")
    assert _edge(res, *ab).effect == pytest.approx(_edge(alone, *ab).effect, abs=1e-5)
    # a weight is in the target's units, not the score's: the two silent pairs add 0 but count in the mean
    assert _edge(res, *ab).weight == pytest.approx(_edge(alone, *ab).weight * (B - 2) / B, rel=1e-5)


def test_every_submodules_train_eval_mode_is_restored():
    model, dicts = _toy(), _dicts()
    model.train()
    model.blocks[1].mlp.eval()  # frozen in eval on purpose inside a model in training mode
    dicts[1].module.train()
    dicts[0].module.train()
    before = {m: m.training for root in (model, *(d.module for d in dicts)) for m in root.modules()}
    seen = []
    model.blocks[0].register_forward_pre_hook(lambda mod, args: seen.append((model.training, mod.training)))
    attribute(model, _pairs(), dicts, ks=(1,), n_random=1, n_single=0)
    assert seen and all(not a and not b for a, b in seen)  # eval mode during the call
    after = {m: m.training for root in (model, *(d.module for d in dicts)) for m in root.modules()}
    assert after == before
    assert model.training and not model.blocks[1].mlp.training and model.blocks[1].training


def test_attribution_is_the_real_models_even_where_a_later_dictionary_misses_the_path():
    """A third dictionary, an SAE of the last residual with no e5 feature, would put B's output in its
    frozen error term: a replacement-model gradient gives A and B nothing. The attribution reads the
    model's own gradient, so it still predicts the true ablations."""
    late = create_sae(sae_config("relu", d_in=D_MODEL, d_sae=2, normalize="none"))
    with torch.no_grad():
        late.W_enc.zero_(), late.b_enc.zero_(), late.W_dec.zero_(), late.b_dec.zero_()
        late.W_enc[0, 0] = late.W_dec[0, 0] = 1.0  # e0
        late.W_enc[2, 1] = late.W_dec[1, 2] = 1.0  # e2
    dicts = [*_dicts(), FeatureDictionary("late", late.eval(), "blocks.1")]
    res = attribute(_toy(), _pairs(), dicts, ks=(1,), n_random=1, n_single=20)
    f = res.features.set_index(["dictionary", "feature"])
    for key in (("sae", SAE_A), ("transcoder", TC_B)):
        assert f.attribution[key] == pytest.approx(1.0, abs=1e-5)
        assert f.true[key] == pytest.approx(-1.0, abs=1e-5)
    # in the local replacement model B's direct path to the output runs into the late SAE's error
    assert f.direct[("transcoder", TC_B)] == 0.0
    assert _edge(res, f"sae#{SAE_A}", f"transcoder#{TC_B}").effect == pytest.approx(1.0, abs=1e-5)
