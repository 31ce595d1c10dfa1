"""Causal tracing across layers x components x positions, and the block components it patches."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from torch import nn

from sciscope.core import DomainAdapter, Examples
from sciscope.core.components import block_components
from sciscope.core.errors import NonFiniteError, ShapeError, SiteError
from sciscope.core.hooks import count_hooks
from sciscope.core.context import RunContext
from sciscope.core.experiment import core_analyses
from sciscope.core.tracing import MEASURES, CounterfactualPairs, trace
from tests.domains.toy_adapter import ToyAdapter

D, P, SIGNAL, OUT, SIGNAL_POS = 8, 5, 0, 1, 2


class ToyMLP(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.c_fc, self.c_proj = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(torch.tanh(self.c_fc(x)))


class ToyAttn(nn.Module):
    """Mixes positions (a mean over them) through one linear map."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(0.5 * x + 0.5 * x.mean(1, keepdim=True))


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.attn, self.mlp = ToyAttn(d), ToyMLP(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(x)
        return x + self.mlp(x)


class Planted(nn.Module):
    """Three residual blocks (GPT-2 module names) over ``(B, P, D)`` inputs. Only the MLP of block
    ``path_layer`` reads the signal channel and only it writes the output channel: it alone
    carries the signal from the input to the output."""

    def __init__(self, path_layer: int = 1, n_layers: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.h = nn.ModuleList(Block(D) for _ in range(n_layers))
        with torch.no_grad():
            for i, block in enumerate(self.h):
                for lin in (block.attn.proj, block.mlp.c_fc, block.mlp.c_proj):
                    lin.weight.mul_(0.5)
                    lin.weight[OUT, :] = 0  # nothing writes the output channel ...
                    lin.bias[OUT] = 0
                for lin in (block.attn.proj, block.mlp.c_fc):
                    lin.weight[:, SIGNAL] = 0  # ... nor reads the signal
                if i == path_layer:  # ... except the planted MLP
                    block.mlp.c_fc.weight[:4, SIGNAL] = 2.0
                    block.mlp.c_proj.weight[OUT, :4] = 1.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.h:
            x = block(x)
        return x


def planted_pairs(n: int = 16) -> CounterfactualPairs:
    g = torch.Generator().manual_seed(1)
    clean = torch.randn(n, P, D, generator=g)
    clean[:, :, SIGNAL] = 0
    corrupted = clean.clone()
    clean[:, SIGNAL_POS, SIGNAL] = 1.0  # the concept: the signal at one position
    return CounterfactualPairs(clean, corrupted, readout=lambda out: out[:, :, OUT].sum(1),
                               score=lambda r: r, position_groups={"signal": [SIGNAL_POS], "rest": [0, 1, 3, 4]},
                               concept="signal on / off", score_name="output channel")


def test_tracing_finds_the_planted_mlp():
    model = Planted(path_layer=1).train()
    model.h[0].mlp.eval()  # a submodule frozen in eval mode stays so
    res = trace(model, planted_pairs(), block_components(model), progress=False)
    assert model.training and model.h[1].mlp.training and not model.h[0].mlp.training
    t = res.table.set_index(["layer", "component", "group"])
    assert res.total_effect > 0.5
    # the residual stream at every position restores everything: the normalisation's check
    assert t.loc[(slice(None), "resid", "all"), "restore"].tolist() == pytest.approx([1, 1, 1], abs=1e-5)
    parts = res.table[res.table.component != "resid"]
    best = parts.loc[parts.restore.idxmax()]
    assert (best.layer, best.component, best.group) == (1, "mlp", "all")
    assert t.loc[(1, "mlp", "all"), "restore"] == pytest.approx(1.0, abs=1e-5)
    assert t.loc[(1, "mlp", "all"), "zero_ablation"] > 0.5  # knocking it out removes the effect
    for layer in (0, 2):
        assert abs(t.loc[(layer, "mlp", "all"), "restore"]) < 1e-5
    assert parts[parts.component == "attn"].restore.abs().max() < 1e-5
    # the signal's position carries it, the other positions do not
    assert t.loc[(1, "mlp", "signal"), "restore"] == pytest.approx(1.0, abs=1e-5)
    assert abs(t.loc[(1, "mlp", "rest"), "restore"]) < 1e-5
    assert t.loc[(0, "resid", "signal"), "restore"] == pytest.approx(1.0, abs=1e-5)
    # another corrupted example's activation moves the output a little (the planted MLP also reads
    # the other channels), far less than the clean one: the largest control over as many cells
    assert res.control_max() < 0.5 < t.loc[(1, "mlp", "all"), "restore"]
    top = res.top(3)
    assert not top.trivial.any() and len(top) == 3
    assert count_hooks(model) == 0


def test_tracing_moves_with_the_planted_layer():
    model = Planted(path_layer=2)
    res = trace(model, planted_pairs(), block_components(model), progress=False)
    parts = res.table[res.table.component == "mlp"].set_index(["layer", "group"])
    assert parts.loc[(2, "all"), "restore"] == pytest.approx(1, abs=1e-5)
    assert parts.loc[(2, "signal"), "restore"] == pytest.approx(1, abs=1e-5)
    assert abs(parts.loc[(1, "all"), "restore"]) < 1e-5 and abs(parts.loc[(0, "all"), "restore"]) < 1e-5


def test_tracing_default_projection_and_random_example_control(gpt2):
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(1, 50, (8, 6), generator=g)
    corrupted = clean.clone()
    corrupted[:, 3] = (clean[:, 3] + 7) % 50
    pairs = CounterfactualPairs({"input_ids": clean}, {"input_ids": corrupted}, readout=lambda o: o.logits[:, -1],
                                position_groups={"prefix": [0, 1, 2], "suffix": [3, 4, 5], "last": [5]})
    res = trace(gpt2, pairs, block_components(gpt2), progress=False)
    assert res.clean_score == pytest.approx(1.0) and res.corrupted_score == pytest.approx(0.0)
    t = res.table.set_index(["layer", "component", "group"])
    # causal attention: the token and the positions after it differ, the ones before are the same
    assert t.loc[(0, "resid", "suffix"), "restore"] == pytest.approx(1.0, abs=1e-4)
    assert t.loc[(0, "resid", "prefix"), "restore"] == pytest.approx(0.0, abs=1e-6)
    assert t.loc[(1, "resid", "last"), "restore"] == pytest.approx(1.0, abs=1e-4)  # the last block's output at the read position
    # another example's activations are no restore: they carry other tokens
    assert t.loc[(0, "resid", "suffix"), "control"] < 0.5
    fig = res.plot()
    assert len(fig.axes) >= 3
    assert res.matrix().shape == (2, 12)  # 3 components x 4 groups


def test_tracing_rejects_pairs_without_effect_and_bad_groups(gpt2):
    ids = torch.randint(1, 50, (4, 6), generator=torch.Generator().manual_seed(0))
    same = CounterfactualPairs({"input_ids": ids}, {"input_ids": ids.clone()}, readout=lambda o: o.logits[:, -1],
                               score=lambda r: r[:, 0])
    with pytest.raises(NonFiniteError, match="score the same"):
        trace(gpt2, same, block_components(gpt2), progress=False)
    other = ids.clone()
    other[:, 0] += 1
    bad = CounterfactualPairs({"input_ids": ids}, {"input_ids": other}, readout=lambda o: o.logits[:, -1],
                              position_groups={"far": [9]})
    with pytest.raises(ShapeError, match="'far'"):
        trace(gpt2, bad, block_components(gpt2), progress=False)
    assert count_hooks(gpt2) == 0


class FoldedAttn(nn.Module):
    """Attention over frames with the positions folded into the batch: ``(B * P, 1, D)``, as TimeSformer's."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.dense = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, p, d = x.shape
        return self.dense(x.reshape(b * p, 1, d))


class FoldedBlock(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.temporal_dense, self.mlp = FoldedAttn(d), ToyMLP(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.temporal_dense(x).reshape(x.shape)
        return x + self.mlp(x)


def test_tracing_folded_component_is_traced_at_all_positions_only():
    torch.manual_seed(0)
    model = nn.Module()
    model.layers = nn.ModuleList(FoldedBlock(D) for _ in range(2))
    model.forward = lambda x: model.layers[1](model.layers[0](x))  # type: ignore[method-assign]
    comps = block_components(model, {"attn": "layers.{i}.temporal_dense"})
    assert comps[0].parts["attn"] == "layers.0.temporal_dense"
    res = trace(model, planted_pairs(), comps, progress=False)
    t = res.table.set_index(["layer", "component", "group"])
    assert t.loc[(0, "attn", "signal"), ["restore", "control"]].isna().all()
    assert res.table.loc[res.table.group == "all", MEASURES].notna().all().all()


def test_block_components_of_hf_families(gpt2, llama, bert):
    g = block_components(gpt2)[1]
    assert g.resid == "transformer.h.1" and g.parts == {"attn": "transformer.h.1.attn", "mlp": "transformer.h.1.mlp"}
    assert (g.mlp_in, g.mlp_hidden, g.mlp_reader) == ("transformer.h.1.mlp:input", "transformer.h.1.mlp.c_proj:input",
                                                      "transformer.h.1.mlp.c_proj")
    ll = block_components(llama)[0]
    assert ll.parts == {"attn": "model.layers.0.self_attn", "mlp": "model.layers.0.mlp"}
    assert ll.mlp_reader == "model.layers.0.mlp.down_proj"
    b = block_components(bert)[0]
    assert b.parts == {"attn": "encoder.layer.0.attention.output.dense", "mlp": "encoder.layer.0.output.dense"}
    assert (b.mlp_in, b.mlp_hidden) == ("encoder.layer.0.intermediate:input", "encoder.layer.0.output.dense:input")
    with pytest.raises(SiteError, match="nope"):
        block_components(bert, {"attn": "encoder.layer.{i}.nope"})


class PlantedAdapter(DomainAdapter):
    name = "planted"
    description = "three residual blocks; one MLP carries the signal"
    default_config = {"seed": 0}

    def examples(self, split: str = "train") -> Examples:
        return Examples(obs=pd.DataFrame({"i": range(4)}), inputs=list(range(4)))

    def model(self, spec: str | None = None) -> nn.Module:
        return Planted(path_layer=1)

    def batches(self, examples: Examples, model: nn.Module, *, batch_size: int = 32):
        yield torch.zeros(len(examples), P, D)

    def tracing_pairs(self, ctx: RunContext) -> CounterfactualPairs:
        return planted_pairs()


def test_tracing_analysis_writes_heatmap_and_headlines(tmp_path):
    ctx = RunContext(PlantedAdapter(), run_dir=tmp_path)
    ctx.stage = "probes"
    analysis = next(a for a in core_analyses() if a.name == "tracing")
    assert analysis.stage == "probes"
    rows, _ = analysis.run(ctx)
    assert len(rows) == 3
    # ties at a full restore go to the cells that patch the fewest positions, in layer order
    assert [r["name"] for r in rows] == [
        "tracing #1: resid of layer 0 at signal positions (restore)",
        "tracing #2: resid of layer 1 at signal positions (restore)",
        "tracing #3: mlp of layer 1 at signal positions (restore)"]
    assert all(r["value"] == pytest.approx(1.0, abs=1e-5) and r["baseline"] < 0.5 for r in rows)
    assert (tmp_path / "probes" / "tracing.png").is_file() and (tmp_path / "probes" / "tracing.csv").is_file()
    # an adapter without pairs gets no tracing
    assert analysis.run(RunContext(ToyAdapter(), run_dir=tmp_path / "toy"))[0] == []
