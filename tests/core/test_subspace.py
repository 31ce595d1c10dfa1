"""The subspace-illusion check (Makelov et al.): readers found generically, the exact split, the verdicts.

The planted model: an MLP whose hidden layer (16 units, the site ``down:input``) is read by
``down`` (4 rows: hidden units 0, 1, 2 and 8). The data varies along hidden units 0-3 only (unit 3
carries the class, ``x[3] > 0``, and no weight reads it); unit 8 is a constant 1 (a dormant
direction: read, never varying). A vector ``2 e3 + 0.2 e8`` separates the classes and moves the
output, but only through its small dormant part: the illusion.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from sciscope.core.adapter import DomainAdapter, Examples
from sciscope.core.components import block_components
from sciscope.core.context import RunContext
from sciscope.core.experiment import Scorer, SteeringPlan, run_plan
from sciscope.core.hooks import count_hooks
from sciscope.core.interventions import AddVector, Clamp
from sciscope.core.sites import Site
from sciscope.core.steer import SteeringVector, steer
from sciscope.core.subspace import (CARRIED_NULL, CARRIED_ROW, ILLUSION, NOT_APPLICABLE, as_added_vector, check_direction,
                                    illusion_check, reading_subspace, split_direction, split_intervention,
                                    subspace_analysis)

D_IN, D_FF = 4, 16
torch.manual_seed(0)
X = torch.randn(256, D_IN).clamp(-3, 3)
LABEL = X[:, 3] > 0


def e(i: int, scale: float = 1.0) -> torch.Tensor:
    v = torch.zeros(D_FF)
    v[i] = scale
    return v


class Planted(nn.Module):
    """``down(relu(up(x)))`` with the hidden layer built as the module docstring says; ``side``
    (when given) also reads hidden unit 3, so that a reader can be left out on purpose."""

    def __init__(self, side: bool = False) -> None:
        super().__init__()
        self.up, self.act, self.down = nn.Linear(D_IN, D_FF), nn.ReLU(), nn.Linear(D_FF, D_IN)
        with torch.no_grad():
            self.up.weight.zero_()
            self.up.bias.zero_()
            self.up.weight[:D_IN, :] = torch.eye(D_IN)
            self.up.bias[:D_IN] = 5.0  # units 0-3 = x + 5 > 0: the ReLU passes the data through
            self.up.bias[8] = 1.0  # unit 8: a constant, never varies with the data
            self.down.weight.zero_()
            self.down.bias.zero_()
            for row, unit in enumerate((0, 1, 2, 8)):
                self.down.weight[row, unit] = 1.0
        self.side = nn.Linear(D_FF, 1, bias=False) if side else None
        if self.side is not None:
            with torch.no_grad():
                self.side.weight.copy_(e(3)[None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.up(x))
        y = self.down(h).sum(-1)
        return y + self.side(h)[:, 0] if self.side is not None else y


def scorer() -> Scorer:
    return Scorer(lambda m: {"y": m(X).detach().numpy(), "other": 0.0}, target=["y"])


SITE = "down:input"


def test_split_is_exact_and_orthogonal():
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.standard_normal((D_FF, 5)))
    v = rng.standard_normal(D_FF)
    row, null = split_direction(v, q.T)
    assert np.allclose(row + null, v, atol=1e-12) and abs(row @ null) < 1e-10
    assert np.allclose(null @ q, 0.0, atol=1e-12)  # nothing of the null part is in the basis' span
    row0, null0 = split_direction(v, np.zeros((0, D_FF)))
    assert np.all(row0 == 0) and np.array_equal(null0, v)


def test_readers_of_the_planted_hidden_layer_are_down_only_with_rank_four():
    sub = reading_subspace(Planted(), SITE, X[:8])
    assert [r["name"] for r in sub.readers] == ["down"] and sub.applicable
    assert sub.rank == 4 and sub.null_dim == D_FF - 4
    row, null = sub.split(e(3).numpy())
    assert np.allclose(row, 0) and np.allclose(null, e(3).numpy())  # unit 3 is unread
    assert count_hooks(Planted()) == 0


def test_uses_other_than_a_linear_read_make_the_split_not_applicable():
    class Leaky(Planted):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.act(self.up(x))
            buf = torch.zeros_like(h)  # reads only h's shape
            buf[:] = h  # ... but this copies its values where no weight-hook sees them
            return self.down(h).sum(-1) + buf[:, 3]

    class Concat(Planted):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(D_FF + D_IN, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.act(self.up(x))
            return self.head(torch.cat([h, self.down(h)], dim=-1))[:, 0]  # head reads h itself, inside a list

    assert reading_subspace(Planted(), "act", X[:8]).applicable
    leaky = reading_subspace(Leaky(), "act", X[:8])
    assert not leaky.applicable and leaky.other_uses == ["__setitem__"]
    concat = reading_subspace(Concat(), "act", X[:8])
    assert [r["name"] for r in concat.readers] == ["down"]  # found beside it ...
    assert not concat.applicable and concat.other_uses == ["cat"]  # ... but the concatenation reads h too
    stacked = reading_subspace(_Wrapped(lambda h: torch.stack([h, h]).sum(0)), "act", X[:8])
    assert not stacked.applicable and stacked.other_uses == ["stack"]
    summed = reading_subspace(_Wrapped(lambda h: torch.einsum("bi,bi->bi", [h, h])), "act", X[:8])
    assert not summed.applicable and "einsum" in summed.other_uses
    returned = reading_subspace(nn.Sequential(nn.Linear(4, 16)), "0", X[:8])  # the site is the model's output
    assert not returned.applicable and not returned.readers
    check = illusion_check(Leaky(), AddVector(e(3), "act"), scorer(), 1.0)
    assert check.verdict == NOT_APPLICABLE and check.effect_full == pytest.approx(1.0, rel=1e-5)


class _Wrapped(Planted):
    """``down(fn(h))`` for a function ``fn`` of the hidden layer ``h``."""

    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.fn(self.act(self.up(x)))).sum(-1)


def test_a_split_that_is_not_applicable_computes_no_dormancy(monkeypatch):
    import sciscope.core.subspace as subspace

    def refuse(*args, **kwargs):
        raise AssertionError("dormancy measured for a split that is not applicable")

    monkeypatch.setattr(subspace, "_dormancy", refuse)
    check = illusion_check(nn.Sequential(nn.Linear(4, 16), nn.ReLU()), AddVector(e(3), "0"),
                           lambda m: {"y": float(m(X).detach().sum())}, 1.0)
    assert check.verdict == NOT_APPLICABLE and np.isnan(check.dormancy) and np.isnan(check.row_variance_share)
    assert check.n_rows == len(X)


def test_dormant_direction_is_flagged_and_its_null_part_does_nothing():
    model = Planted()
    v = e(3, 2.0) + e(8, 0.2)  # separates the classes (unit 3), moves the output only through unit 8
    h = torch.relu(model.up(X)).detach()
    assert (h @ v)[LABEL].mean() - (h @ v)[~LABEL].mean() > 2.0  # it is the "concept direction"
    check = illusion_check(model, AddVector(v, SITE), scorer(), 1.0)
    assert check.verdict == ILLUSION and check.flagged
    assert check.effect_full == pytest.approx(0.2, rel=1e-5)  # steering with v does move the output
    assert check.effect_row == pytest.approx(check.effect_full, rel=1e-6)
    assert abs(check.effect_null) < 1e-6  # (c) the part in W_out's null space alone does nothing
    assert check.row_share == pytest.approx(0.04 / 4.04, rel=1e-5) and check.chance_share == pytest.approx(4 / 16)
    assert check.dormancy < 1e-6  # the data never varies along unit 8
    assert check.row_variance_share < 1e-6  # all of what v measures in the data is unread
    # the null part alone leaves the model's outputs exactly as they were
    (_, _), (null_iv, a_null) = split_intervention(AddVector(v, SITE), 1.0, check.subspace.basis)
    with null_iv.apply(model, a_null):
        assert torch.allclose(model(X), Planted()(X), atol=1e-6)


def test_dormancy_alone_flags_even_when_the_row_part_is_half_of_v():
    # Makelov et al.'s construction: (disconnected + dormant) / sqrt(2)
    check = illusion_check(Planted(), AddVector(e(3) + e(8), SITE), scorer(), 1.0)
    assert check.row_share == pytest.approx(0.5, rel=1e-6)  # not a small part ...
    assert check.verdict == ILLUSION and check.dormancy < 1e-6  # ... but dormant


def test_a_read_direction_the_data_varies_along_passes():
    for v in (e(0), e(0) + e(3)):
        check = illusion_check(Planted(), AddVector(v, SITE), scorer(), 2.0)
        assert check.verdict == CARRIED_ROW and not check.flagged, check.reason
        assert check.effect_full == pytest.approx(2.0, rel=1e-5)
        assert 0.5 < check.dormancy < 3.0  # as lively as a typical read direction
        assert abs(check.effect_null) < 1e-6


def test_relative_scale_parts_add_up_to_the_injected_vector():
    model = Planted()
    v = e(0, 0.7) + e(3, 1.3) + e(8, 0.4)
    iv = AddVector(v, SITE, scale="relative")
    sub = reading_subspace(model, SITE, X[:8])
    h = torch.randn(3, 5, D_FF)
    whole = iv.edits(model, 0.3)[0].fn(h) - h
    parts = [p.edits(model, a)[0].fn(h) - h for p, a in split_intervention(iv, 0.3, sub.basis)]
    assert torch.allclose(parts[0] + parts[1], whole, atol=1e-6)
    check = illusion_check(model, iv, scorer(), 0.3)
    # the score is linear in the injection here: the parts' effects add up to the whole one
    assert check.effect_row + check.effect_null == pytest.approx(check.effect_full, rel=1e-5)
    assert abs(check.effect_null) < 1e-5 and check.effect_row == pytest.approx(check.effect_full, rel=1e-5)


def test_a_reader_left_out_shows_as_an_effect_of_the_unread_part():
    model = Planted(side=True)
    # an edit of down's input reaches down only; the ReLU's output is what both layers read
    assert [r["name"] for r in reading_subspace(model, SITE, X[:8]).readers] == ["down"]
    found = reading_subspace(model, "act", X[:8])
    assert sorted(r["name"] for r in found.readers) == ["down", "side"] and found.rank == 5
    assert illusion_check(model, AddVector(e(3), "act"), scorer(), 1.0).verdict == CARRIED_ROW
    missed = illusion_check(model, AddVector(e(3), "act"), scorer(), 1.0, readers=["down"])
    assert missed.verdict == CARRIED_NULL and missed.flagged
    assert missed.null_fraction == pytest.approx(1.0, rel=1e-5)


def test_check_direction_runs_on_a_plain_direction_and_leaves_no_hook():
    model = Planted()
    check = check_direction(model, (e(3, 2.0) + e(8, 0.2)).numpy(), SITE, scorer(), 1.0)
    assert check.verdict == ILLUSION
    assert count_hooks(model) == 0
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


def test_a_feature_map_read_by_a_convolution_splits_on_its_channels():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 2, 1))  # the 1x1 conv reads 8 channels with 2 rows
    site = Site("0", layout="b c h w")
    sub = reading_subspace(model, site, torch.randn(2, 3, 5, 5))
    assert [r["name"] for r in sub.readers] == ["1"] and sub.rank == 2 and sub.null_dim == 6 and sub.applicable
    _, null = sub.split(torch.randn(8))
    with steer(model, torch.as_tensor(null, dtype=torch.float32), 3.0, site=site):
        steered = model(torch.ones(1, 3, 5, 5))
    assert torch.allclose(steered, model(torch.ones(1, 3, 5, 5)), atol=1e-5)  # the unread channels change nothing


def test_an_sae_feature_steer_is_the_added_vector_of_its_decoder_rows():
    from types import SimpleNamespace

    from sciscope.core.interventions import SteerFeature

    model = Planted()
    torch.manual_seed(2)  # SteerFeature reads only the decoder rows (and the width): no SAE training stack needed
    sae = SimpleNamespace(cfg=SimpleNamespace(d_sae=32), W_dec=torch.randn(32, D_FF))
    feature = SteerFeature(sae, [3, 7], SITE)
    added = as_added_vector(feature)
    h = torch.randn(2, 3, D_FF)
    assert torch.allclose(added.edits(model, 0.8)[0].fn(h), feature.edits(model, 0.8)[0].fn(h), atol=1e-6)
    assert as_added_vector(Clamp({SITE: [0]})) is None
    # planted decoder rows: feature 3 writes the unread class unit, feature 7 the dormant one (each
    # row normalised: the added vector is e3 + e8, Makelov et al.'s construction); features 5 and 9
    # write read units the data varies along (e0 + e1)
    sae.W_dec[3], sae.W_dec[7], sae.W_dec[5], sae.W_dec[9] = e(3, 3.0), e(8, 0.5), e(0, 2.0), e(1, 0.1)
    illusory = illusion_check(model, as_added_vector(SteerFeature(sae, [3, 7], SITE)), scorer(), 1.0)
    assert illusory.verdict == ILLUSION and illusory.row_share == pytest.approx(0.5, rel=1e-6)
    genuine = illusion_check(model, as_added_vector(SteerFeature(sae, [5, 9], SITE)), scorer(), 1.0)
    assert genuine.verdict == CARRIED_ROW and genuine.effect_full == pytest.approx(2.0, rel=1e-5)


# -- real architectures, random init from a config (no download) ------------------------------------


def _tiny(family: str) -> nn.Module:
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    if family == "gpt2":
        cfg = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50, n_positions=16, bos_token_id=0,
                                      eos_token_id=0)
        return transformers.GPT2LMHeadModel(cfg).eval()
    if family == "llama":
        cfg = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=16, intermediate_size=40, num_attention_heads=2,
                                       num_key_value_heads=2, vocab_size=50, max_position_embeddings=16, bos_token_id=0,
                                       eos_token_id=0, pad_token_id=0)
        return transformers.LlamaForCausalLM(cfg).eval()
    cfg = transformers.BertConfig(num_hidden_layers=2, hidden_size=16, intermediate_size=64, num_attention_heads=2,
                                  vocab_size=50, max_position_embeddings=16, pad_token_id=0)
    return transformers.BertModel(cfg).eval()


@pytest.mark.parametrize("family,d_ff", [("gpt2", 64), ("llama", 40), ("bert", 64)])
def test_hf_mlp_hidden_is_read_by_its_output_projection_and_the_residual_is_not_applicable(family, d_ff):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = _tiny(family)
    ids = {"input_ids": torch.randint(1, 50, (2, 5))}
    block = block_components(model)[0]
    hidden = reading_subspace(model, block.mlp_hidden, ids)
    assert [r["name"] for r in hidden.readers] == [block.mlp_reader] and hidden.applicable
    assert hidden.dim == d_ff and hidden.rank == 16 and hidden.null_dim == d_ff - 16  # d_ff > d_model: a real null space
    resid = reading_subspace(model, block.resid, ids)
    assert not resid.applicable and "add" in resid.other_uses  # the residual stream is added onward
    assert resid.readers  # the next block's (norm and) projections were found beside it
    if family == "gpt2":  # LayerNorm's centring is folded in: the all-ones direction is unread
        assert resid.through_norm == ["transformer.h.1.ln_1"] and resid.rank == 15
        _, null = resid.split(np.ones(16))
        assert np.allclose(null, 1.0)
    # the last block's output: read by the LM head through the final norm, or handed back to the caller
    last = reading_subspace(model, block_components(model)[-1].resid, ids)
    if family == "bert":  # BertModel returns it (last_hidden_state): read outside the model, by weights no hook sees
        assert not last.applicable and any("output" in u for u in last.other_uses)
    else:
        head = "lm_head"
        assert [r["name"] for r in last.readers] == [head] and last.applicable
        assert last.rank == (15 if family == "gpt2" else 16)  # LayerNorm leaves the all-ones direction unread, RMSNorm nothing
    # the check says "not applicable" at the residual rather than splitting
    v = torch.randn(16)

    def score(m: nn.Module) -> dict:
        out = m(**ids)
        return {"h": float((out.logits if hasattr(out, "logits") else out.last_hidden_state).detach().mean())}

    check = illusion_check(model, AddVector(v, block.resid), score, 1.0)
    assert check.verdict == NOT_APPLICABLE and np.isnan(check.score_row)
    # and splits at the MLP's hidden units (a random direction there: the read part carries it)
    hid = illusion_check(model, AddVector(torch.randn(d_ff) * 5, block.mlp_hidden), score, 1.0)
    assert hid.verdict != NOT_APPLICABLE and abs(hid.effect_null) <= 1e-4 * abs(hid.effect_full) + 1e-7
    assert count_hooks(model) == 0


# -- the core analysis over a run's steering plans ------------------------------------------------


class _PlantedAdapter(DomainAdapter):
    name = "planted_subspace"
    description = "the planted MLP, steered along an illusory and a genuine direction"

    def examples(self, split: str = "train") -> Examples:
        obs = pd.DataFrame({"cls": LABEL.numpy()})
        return Examples(obs, list(X), ["cls"])

    def model(self, spec: str | None = None) -> nn.Module:
        return Planted()

    def batches(self, examples: Examples, model: nn.Module, *, batch_size: int = 32) -> Iterator[torch.Tensor]:
        yield X

    def steering_plans(self, ctx: RunContext) -> list[SteeringPlan]:
        return [SteeringPlan("illusory", AddVector(SteeringVector(e(3, 2.0) + e(8, 0.2), SITE), SITE), scorer(),
                             [-1.0, 1.0], n_controls=2),
                SteeringPlan("genuine", AddVector(SteeringVector(e(0), SITE), SITE), scorer(), [1.0, 2.0], n_controls=2)]


def test_subspace_analysis_reads_the_saved_sweeps_and_flags_the_illusory_plan():
    adapter = _PlantedAdapter()
    ctx = RunContext(adapter, stage="steering")
    model = ctx.model()
    for plan in adapter.steering_plans(ctx):  # what the steering stage does: run, save under steering/<plan>/
        sweep = run_plan(model, plan, plan.intervention)  # type: ignore[arg-type]
        sweep.save(ctx.output(f"{plan.name}/sweep.csv").parent)
    analysis = subspace_analysis()
    assert (analysis.name, analysis.stage) == ("subspace_check", "steering")
    rows, _ = analysis.run(ctx)
    table = pd.read_csv(ctx.output("subspace_check.csv")).set_index("plan")
    assert table.verdict["illusory"] == ILLUSION and bool(table.flagged["illusory"])
    assert table.verdict["genuine"] == CARRIED_ROW and not bool(table.flagged["genuine"])
    assert table.alpha["illusory"] == 1.0 and table.alpha["genuine"] == 2.0  # the largest unbroken alpha
    assert {r["source"] for r in rows} == {"steering/subspace_check.csv"} and len(rows) == 2
    assert all({"name", "value", "control", "control_label", "note", "source"} <= set(r) for r in rows)
    illusory = next(r for r in rows if r["name"].startswith("illusory"))
    assert ILLUSION in illusory["note"] and illusory["value"] == pytest.approx(1.0, rel=1e-5)
    # read beside the sweep's controls: random directions of |v| move the output more than v's dormant part does
    assert "does not beat the largest |effect| of its 2 random controls" in illusory["note"]
    assert table.sweep_effect["illusory"] == pytest.approx(table.effect_full["illusory"], rel=1e-5)


def test_one_bad_plan_is_a_failed_row_and_a_programming_error_is_raised():
    import dataclasses

    from sciscope.core.errors import ContrastError

    def empty_group(ctx: RunContext):
        raise ContrastError("steering contrast: group 'a' has no rows")

    def typo(m: nn.Module):
        return m.no_such_attribute  # a bug in the scorer: must not become a "failed" row

    class Broken(_PlantedAdapter):
        bug = False

        def steering_plans(self, ctx: RunContext) -> list[SteeringPlan]:
            genuine = super().steering_plans(ctx)[1]
            if self.bug:
                genuine = dataclasses.replace(genuine, scorer=Scorer(typo, target=["y"]))
            return [SteeringPlan("empty", empty_group, scorer(), [1.0]), genuine]

    adapter = Broken()
    ctx = RunContext(adapter, stage="steering")
    genuine = adapter.steering_plans(ctx)[1]
    run_plan(ctx.model(), genuine, genuine.intervention).save(ctx.output("genuine/sweep.csv").parent)  # type: ignore[arg-type]
    rows, _ = subspace_analysis().run(ctx)
    table = pd.read_csv(ctx.output("subspace_check.csv")).set_index("plan")
    assert table.verdict["empty"] == "failed" and table.reason["empty"].startswith("ContrastError: steering contrast")
    assert table.verdict["genuine"] == CARRIED_ROW  # the plan after the bad one is still checked
    failed = next(r for r in rows if r["name"].startswith("empty"))
    assert failed["note"] == "the check failed: ContrastError: steering contrast: group 'a' has no rows"
    adapter.bug = True
    with pytest.raises(AttributeError, match="no_such_attribute"):
        subspace_analysis().run(ctx)
