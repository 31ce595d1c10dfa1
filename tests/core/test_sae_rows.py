"""The SAE's rows: per-position activations, special and outlier positions set aside, steps that
follow the data, and examples' codes pooled back from their positions."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from sciscope.core import DomainAdapter, Examples
from sciscope.core.context import RunContext
from sciscope.core.errors import ConfigError
from sciscope.core.sae import TopKConfig, evaluate_sae, train_sae
from sciscope.core.sae.rows import EXAMPLE_ROW, keep_positions, outlier_rows, pooled_codes, subsample_rows
from sciscope.core.store import ActivationStore


def test_position_rules_keep_what_they_name_and_refuse_counting_from_the_end():
    pos = np.array([0, 1, 2, 3, 0, 1])
    assert keep_positions(pos, None).all()
    assert keep_positions(pos, slice(1, None)).tolist() == [False, True, True, True, False, True]
    assert keep_positions(pos, slice(0, 3, 2)).tolist() == [True, False, True, False, True, False]
    assert keep_positions(pos, [0, 3]).tolist() == [True, False, False, True, True, False]
    with pytest.raises(ConfigError, match="sae_rows='pooled'"):
        keep_positions(pos, [-2, -1])
    with pytest.raises(ConfigError, match="non-negative"):
        keep_positions(pos, slice(-1, None))


def test_outliers_are_judged_against_the_median_of_the_rule_s_rows():
    norms = np.array([1.0, 1.1, 0.9, 50.0, 1.0, 12.0])
    mask, thr = outlier_rows(norms, 10.0)
    assert mask.tolist() == [False, False, False, True, False, True] and thr == pytest.approx(10.5)
    assert not outlier_rows(norms, 0.0)[0].any()  # 0 turns the rule off


def test_a_row_budget_keeps_whole_examples():
    obs = pd.DataFrame({EXAMPLE_ROW: np.repeat(np.arange(50), 4)})
    rows = np.arange(200)
    sub = subsample_rows(obs, rows, 41, seed=3)
    assert len(sub) == 40  # ten whole examples: the eleventh would overrun the budget
    assert (pd.Series(obs[EXAMPLE_ROW].to_numpy()[sub]).value_counts() == 4).all()
    assert subsample_rows(obs, rows, 500).tolist() == rows.tolist()


def test_pooled_codes_are_the_mean_code_of_each_example_s_rows():
    sae = train_sae(TopKConfig(d_in=4, d_sae=8, k=2), [torch.randn(64, 4)], max_steps=1, progress=False).sae
    x = np.random.default_rng(0).standard_normal((7, 4)).astype(np.float32)
    obs = pd.DataFrame({EXAMPLE_ROW: [0, 0, 2, 2, 2, 0, 1], "position": [0, 1, 0, 1, 2, 2, 0]})
    store = ActivationStore.from_arrays(obs, {"s": x})
    rows = np.array([0, 1, 2, 3, 4, 6])  # row 5 (example 0, position 2) was left out
    got = pooled_codes(sae, store, "s", rows, n_examples=4, chunk=2)
    codes = sae.encode(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(got[0], codes[[0, 1]].mean(0), atol=1e-6)
    np.testing.assert_allclose(got[2], codes[[2, 3, 4]].mean(0), atol=1e-6)
    np.testing.assert_allclose(got[1], codes[6], atol=1e-6)
    assert not got[3].any()  # an example without a kept position


def test_early_stopping_ends_training_when_validation_stops_improving():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=g)
    cfg = TopKConfig(d_in=8, d_sae=16, k=4)
    val = torch.randn(64, 8, generator=g)
    res = train_sae(cfg, lambda: [x[i:i + 32] for i in range(0, 256, 32)], max_steps=3000, lr=1e-2,
                    val_data=val, val_every=10, patience=3, progress=False)
    assert res.stopped_early and res.steps < 3000
    v = res.validation
    assert len(v) >= 4 and (v.step % 10 == 0).all()
    best = v.explained_variance.cummax()
    assert (best.iloc[-3:] <= best.iloc[-4] + 1e-4).all()  # the last three checks gained nothing
    with pytest.raises(ConfigError, match="val_data"):
        train_sae(cfg, [x], max_steps=2, val_data=torch.randn(5, 3), progress=False)


# -- a causal LM whose first position carries a massive activation (an attention sink) -------------

class _SinkLM(nn.Module):
    """A tiny random-init GPT-2 whose block-0 output gets a planted vector of norm ~200x the
    others' at position 0 -- what trained causal LMs do to their first token."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import GPT2Config, GPT2Model

        torch.manual_seed(0)
        self.gpt = GPT2Model(GPT2Config(vocab_size=50, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                                         bos_token_id=0, eos_token_id=0))
        sink = torch.zeros(32)
        sink[3] = 300.0

        def plant(_m: nn.Module, _inp: tuple, out: tuple) -> tuple:
            h = out[0] if isinstance(out, tuple) else out
            h = h.clone()
            h[:, 0] += sink
            return (h, *out[1:]) if isinstance(out, tuple) else h

        self.gpt.h[0].register_forward_hook(plant)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.gpt(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


class _SinkAdapter(DomainAdapter):
    name = "sink"
    description = "random token strings read by a tiny causal LM with a planted attention sink"
    sites = ["gpt.h.1"]
    concepts = ["long"]

    def examples(self, split: str = "train") -> Examples:
        rng = np.random.default_rng(0)
        n = 240
        lengths = rng.integers(4, 13, n)
        ids = [rng.integers(1, 50, k) for k in lengths]
        obs = pd.DataFrame({"length": lengths, "long": lengths > 8,
                            "split": np.where(np.arange(n) % 5 == 0, "test", "train")})
        return Examples(obs, ids, ["long"])

    def model(self, spec: str | None = None) -> nn.Module:
        return _SinkLM().eval()

    def batches(self, examples: Examples, model: nn.Module, *, batch_size: int = 32) -> Iterator[dict]:
        for i in range(0, len(examples), batch_size):
            chunk = examples.inputs[i:i + batch_size]
            width = max(len(c) for c in chunk)
            ids = torch.zeros(len(chunk), width, dtype=torch.long)
            mask = torch.zeros(len(chunk), width, dtype=torch.long)
            for j, c in enumerate(chunk):
                ids[j, :len(c)], mask[j, :len(c)] = torch.as_tensor(c), 1
            yield {"input_ids": ids, "attention_mask": mask}

    @property
    def sae_site(self) -> str:
        return "gpt.h.1"

    @property
    def fidelity_positions(self) -> None:
        return None  # no position rule: the norm rule alone must find the sink


def _live_fraction(ctx: RunContext) -> tuple[float, dict]:
    res = ctx.train_sae()
    rows, report = ctx.sae_row_selection()
    dead = evaluate_sae(res.sae, rows.iter_batches(ctx.adapter.sae_site, 4096))["dead_fraction"]
    return 1.0 - dead, report


@pytest.fixture(scope="module")
def sink_config() -> dict:
    return {"sae_expansion": 8, "sae_k": 4, "sae_steps": 600, "sae_batch_size": 64, "sae_lr": 3e-3,
            "sae_patience": 0, "batch_size": 64}


def test_sae_on_a_causal_lm_with_a_planted_sink_keeps_its_latents_alive_and_reports_the_sink(sink_config):
    ctx = RunContext(_SinkAdapter(), sink_config)
    assert ctx.sae_row_mode == "positions"
    live, report = _live_fraction(ctx)
    n_examples = len(ctx.examples())
    assert report["excluded_outlier_norm"] == n_examples  # every example's first position, and nothing else
    assert report["excluded_positions"] == {0: n_examples}
    assert report["kept"] == report["positions"] - n_examples
    assert live > 0.5, live
    # the control: the same SAE recipe on mean-pooled rows, where the sink is 1/length of every row
    pooled_ctx = RunContext(_SinkAdapter(), {**sink_config, "sae_rows": "pooled"})
    pooled_ctx._dir = ctx._root()  # the same run folder: the pooled store is captured next to the positions
    from sciscope.core.capture import collect

    ad, ex = pooled_ctx.adapter, pooled_ctx.examples()
    collect(pooled_ctx.model(), ad.batches(ex, pooled_ctx.model()), ad.sites, out=ctx._root() / "activations" / "store",
            obs=ex.obs, pooling="mean", progress=False)
    live_pooled, pooled_report = _live_fraction(pooled_ctx)
    assert pooled_report == {"rows": "pooled", "pooling": "mean"}
    print(f"live latents: {live:.3f} on positions, {live_pooled:.3f} on mean-pooled rows; left out {report['excluded_positions']}")
    assert live_pooled < live, (live_pooled, live)


def test_the_norm_rule_can_be_turned_off_and_then_keeps_the_sink(sink_config):
    ctx = RunContext(_SinkAdapter(), {**sink_config, "outlier_norm": 0.0})
    _, report = ctx.sae_row_selection()
    assert report["excluded_outlier_norm"] == 0 and report["kept"] == report["positions"]


def test_the_run_config_chooses_the_sae_training_precision(sink_config, monkeypatch):
    import sciscope.core.sae as sae_module
    from sciscope.core.config import PIPELINE_KEYS, check_keys
    from sciscope.core.errors import ConfigError

    seen = []
    monkeypatch.setattr(sae_module, "train_sae", lambda cfg, data, **kw: seen.append(kw["precision"]) or "trained")
    for value in ("32-true", "bf16-mixed"):
        assert RunContext(_SinkAdapter(), {**sink_config, "sae_precision": value}).train_sae() == "trained"
    assert seen == ["32-true", "bf16-mixed"]
    assert PIPELINE_KEYS["sae_precision"].default == "32-true"  # bf16 is opted into: it is slower without AMX
    with pytest.raises(ConfigError, match="sae_precision"):
        check_keys("pipeline", PIPELINE_KEYS, {"sae_precision": "16-mixed"})
