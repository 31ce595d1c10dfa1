"""RunContext (the one door into a run), the config-key table and the shared model plumbing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from torch import nn

from sciscope.core import context as context_mod
from sciscope.core.adapter import DomainAdapter
from sciscope.core.config import Key
from sciscope.core.context import RunContext
from sciscope.core.errors import AdapterError, ConfigError, SciscopeError
from sciscope.core.loading import (
    auto_model_class,
    checkpoint_layer_stack,
    find_layer_stack,
    layer_index,
    load_factory_model,
)
from tests.domains.experiment_adapter import PlantedAdapter
from tests.domains.toy_adapter import ToyAdapter


class KeyedAdapter(ToyAdapter):
    name = "keyed"
    config_keys = {
        "n_examples": Key(32, min=4, help="points"),
        "noise": Key(0.5, min=0.0),
        "seed": Key(0),
        "kind": Key("mlp", stage="model", choices=("mlp", "linear")),
        "width": Key(16, stage="model", min=2),
    }

    @classmethod
    def check_config(cls, config: dict) -> None:
        if config["kind"] == "linear" and config["width"] != 2:
            raise ConfigError("keyed: config 'width' must be 2 for kind 'linear'")


def test_config_keys_derive_defaults_stages_and_checks():
    assert KeyedAdapter.default_config["width"] == 16
    assert KeyedAdapter.config_stages["kind"] == "model" and KeyedAdapter.config_stages["noise"] == "examples"
    assert KeyedAdapter({"width": "8"}).config["width"] == 8  # --set strings coerced to the default's type
    assert PlantedAdapter({"clamp_alphas": "2,3.5"}).config["clamp_alphas"] == [2.0, 3.5]  # list elements too
    with pytest.raises(ConfigError, match="'n_examples' must be >= 4"):
        KeyedAdapter({"n_examples": 2})
    with pytest.raises(ConfigError, match="'kind' must be one of"):
        KeyedAdapter({"kind": "cnn"})
    with pytest.raises(ConfigError, match="'width' must be 2"):
        KeyedAdapter({"kind": "linear"})
    with pytest.raises(ConfigError, match="widht"):
        KeyedAdapter({"widht": 3})
    with pytest.raises(ValueError, match="not a stage"):
        Key(1, stage="nowhere")


def test_in_memory_context_caches_and_writes_to_a_temporary_folder():
    ad = ToyAdapter()
    ctx = ad.ctx
    assert ctx.adapter is ad and not ctx.in_run and ctx.config["steer_n_random"] == 10  # pipeline defaults included
    calls = []
    build = lambda: calls.append(1) or {"x": len(calls)}  # noqa: E731
    assert ctx.cached("thing", {"a": 1}, build) == {"x": 1}
    assert ctx.cached("thing", {"a": 1}, build) == {"x": 1} and len(calls) == 1
    assert ctx.cached("thing", {"a": 2}, build) == {"x": 2}  # a changed key builds anew
    ctx.stage = "probes"
    src = ctx.write_table("t.csv", pd.DataFrame({"a": [1]}))
    assert src == "probes/t.csv" and ctx.output("t.csv").is_file()
    with pytest.raises(ValueError, match="relative"):
        ctx.output("../escape.csv")
    with pytest.raises(SciscopeError, match="activations/store"):
        ctx.store()
    with pytest.raises(SciscopeError, match="stage='probes'"):
        ctx.probes()
    assert isinstance(ctx.model(), nn.Module) and ctx.model() is ctx.model()
    with pytest.raises(SciscopeError, match="no model variant"):
        ctx.model("other")


def test_run_context_keeps_cached_objects_on_disk_for_the_next_stage_process(tmp_path: Path):
    ad = ToyAdapter()
    ctx = RunContext(ad, run_dir=tmp_path)
    calls = []

    def build() -> dict:
        calls.append(1)
        return {"weights": [1, 2, 3]}

    def save(obj: dict, folder: Path) -> None:
        (folder / "w.txt").write_text(",".join(map(str, obj["weights"])))

    def load(folder: Path) -> dict:
        return {"weights": [int(v) for v in (folder / "w.txt").read_text().split(",")]}

    assert ctx.cached("model", {"n": 3}, build, save=save, load=load)["weights"] == [1, 2, 3]
    context_mod._MEMORY.clear()  # a new stage process
    ctx2 = RunContext(ToyAdapter(), run_dir=tmp_path)
    assert ctx2.cached("model", {"n": 3}, build, save=save, load=load)["weights"] == [1, 2, 3]
    assert len(calls) == 1
    folders = list((tmp_path / "cache").iterdir())
    assert len(folders) == 1 and folders[0].name.startswith("model-") and (folders[0] / ".complete").is_file()


def test_layer_stack_and_auto_class_for_causal_masked_and_pretraining_checkpoints(tmp_path: Path):
    from transformers import BertConfig, BertForPreTraining, GPT2Config, GPT2LMHeadModel

    gpt = GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=16, n_head=2, vocab_size=50, n_positions=32))
    assert find_layer_stack(gpt) == ("transformer.h", 3)
    bert_cfg = BertConfig(num_hidden_layers=2, hidden_size=16, num_attention_heads=2, intermediate_size=32, vocab_size=40)
    BertForPreTraining(bert_cfg).save_pretrained(tmp_path / "geneformer_like")
    from transformers import AutoConfig, AutoModelForMaskedLM

    cfg = AutoConfig.from_pretrained(tmp_path / "geneformer_like")
    assert auto_model_class(cfg) is AutoModelForMaskedLM
    assert checkpoint_layer_stack(tmp_path / "geneformer_like") == ("bert.encoder.layer", 2)
    with pytest.raises(ConfigError, match="no config.json"):
        checkpoint_layer_stack(tmp_path / "missing")
    with pytest.raises(AdapterError, match="blocks"):
        find_layer_stack(nn.Linear(2, 2))
    assert layer_index("layer.-1", 4, "sae_layer") == 3
    with pytest.raises(ConfigError, match="'sae_layer'"):
        layer_index(7, 4, "sae_layer")


def test_user_factory_is_loaded_from_a_file_and_checked(tmp_path: Path):
    f = tmp_path / "mine.py"
    f.write_text("import torch\ndef make():\n    return torch.nn.Linear(3, 1)\ndef bad():\n    return 3\n")
    assert isinstance(load_factory_model(f"{f}:make"), nn.Linear)
    with pytest.raises(ConfigError, match="not an nn.Module"):
        load_factory_model(f"{f}:bad")
    with pytest.raises(ConfigError, match="does not exist"):
        load_factory_model(f"{tmp_path / 'nope.py'}:make")
    with pytest.raises(ConfigError, match="has no 'missing'"):
        load_factory_model(f"{f}:missing")


def test_base_class_declares_no_legacy_hooks():
    for legacy in ("headline_rows", "steering_evaluator", "feature_plots"):
        assert not hasattr(DomainAdapter, legacy)


def test_pooled_activations_match_the_store_of_a_capture(tmp_path: Path, bert, token_batches):
    from sciscope.core import collect
    from sciscope.core.capture import pooled_activations

    store = collect(bert, token_batches, ["encoder.layer.1"], out=tmp_path / "s", pooling="mean", progress=False)
    mem = pooled_activations(bert, token_batches, "encoder.layer.1", pooling="mean")
    assert mem.shape == (8, 32)
    np.testing.assert_allclose(mem, store.array("encoder.layer.1"), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="one row per example"):
        pooled_activations(bert, token_batches, "encoder.layer.1", pooling="none")


def test_tokenizer_without_pad_token_pads_with_eos(tmp_path: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from sciscope.core.loading import load_tokenizer

    raw = Tokenizer(models.WordLevel({"<eos>": 0, "a": 1, "b": 2, "[UNK]": 3}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<eos>", unk_token="[UNK]").save_pretrained(tmp_path / "tok")
    tok = load_tokenizer(tmp_path / "tok")
    assert tok.pad_token == "<eos>" and tok.padding_side == "right"
    enc = tok(["a b a", "b"], padding=True)
    assert enc["input_ids"][1] == [2, 0, 0] and enc["attention_mask"][1] == [1, 0, 0]
    with pytest.raises(ConfigError, match="cannot load a tokenizer"):
        load_tokenizer(tmp_path / "none")
