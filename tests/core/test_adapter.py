"""Adapter base class, config validation and the entry-point registry."""

from __future__ import annotations

import importlib.metadata
import warnings

import pytest

from sciscope.core import AdapterError, ConfigError, available_domains, get_domain, register_domain
from sciscope.core import adapter as adapter_mod
from tests.domains.toy_adapter import ToyAdapter


def test_config_validation_names_the_key():
    a = ToyAdapter({"n_examples": "12", "noise": 1})
    assert a.config["n_examples"] == 12 and a.config["noise"] == 1.0
    with pytest.raises(ConfigError, match="n_exampels.*n_examples"):
        ToyAdapter({"n_exampels": 3})
    with pytest.raises(ConfigError, match="'n_examples' expects int"):
        ToyAdapter({"n_examples": "many"})


def test_runtime_registration_and_lookup():
    register_domain(ToyAdapter)
    try:
        assert "toy" in available_domains()
        assert isinstance(get_domain("toy", {"n_examples": 8}), ToyAdapter)
        with pytest.raises(AdapterError, match="did you mean.*toy"):
            get_domain("tyo")
    finally:
        adapter_mod.unregister_domain("toy")


def test_broken_plugin_warns_instead_of_breaking(monkeypatch):
    class BrokenEP:
        name, value = "broken", "nowhere.module:Adapter"

        def load(self):
            raise ImportError("No module named 'nowhere'")

    real = importlib.metadata.entry_points

    def fake_entry_points(group=None, **kw):
        if group == adapter_mod.ENTRY_POINT_GROUP:
            return [BrokenEP()]
        return real(group=group, **kw)

    monkeypatch.setattr(importlib.metadata, "entry_points", fake_entry_points)
    adapter_mod._entry_point_domains.cache_clear()
    try:
        with pytest.warns(UserWarning, match="broken"):
            found = available_domains()
        assert "broken" not in found
    finally:
        adapter_mod._entry_point_domains.cache_clear()


def test_optional_keys_parse_cli_strings():
    from sciscope.core.adapter import merge_config

    cfg = merge_config("test", {"layer": None, "frac": None, "name": None}, {"layer": "3", "frac": "0.5", "name": "none"})
    assert cfg == {"layer": 3, "frac": 0.5, "name": None}
    with pytest.raises(ConfigError, match="test: unknown config key 'lyer'"):
        merge_config("test", {"layer": None}, {"lyer": 1})


def test_examples_of_split():
    import pandas as pd

    from sciscope.core import Examples

    obs = pd.DataFrame({"text": list("abcd"), "split": ["train", "test", "train", "test"], "y": [1, 2, 3, 4]})
    test = Examples.of_split(obs, "test", inputs="text", concepts=["y"])
    assert test.inputs == ["b", "d"] and test.obs.y.tolist() == [2, 4] and list(test.obs.index) == [0, 1]
    assert len(Examples.of_split(obs, "all", inputs="text", concepts=["y"])) == 4
    with pytest.raises(ConfigError, match="dom: unknown split 'val'"):
        Examples.of_split(obs, "val", inputs="text", concepts=["y"], domain="dom")


def test_check_adapter_checks_the_spec_model_everywhere(tmp_path):
    """``check_adapter(spec=...)`` builds the task loss (and runs the analyses) around the model it
    was asked to check, not the context's default, and never builds the default at all."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    from sciscope.core import Analysis
    from sciscope.core.fidelity import TaskLoss
    from sciscope.core.testing import check_adapter

    class Checkpoints(ToyAdapter):
        """Two 'checkpoints' of different widths; records which it built and which the hooks saw."""

        def __init__(self, config=None) -> None:
            super().__init__(config)
            self.built: list = []
            self.seen: list[nn.Module] = []

        def model(self, spec=None) -> nn.Module:
            self.built.append(spec)
            width = 24 if spec == "wide" else 16
            torch.manual_seed(0)
            return nn.Sequential(nn.Linear(8, width), nn.ReLU(), nn.Linear(width, 2))

        def analyses(self) -> list:
            def run(ctx):
                self.seen.append(ctx.model())
                return []
            return [Analysis("reads_the_model", "examples", run, lambda result: [])]

        def task_loss(self, ctx) -> TaskLoss:
            built_on = ctx.model()
            self.seen.append(built_on)
            x = torch.from_numpy(self.examples("test").inputs)
            y = torch.zeros(len(x), dtype=torch.long)

            def fn(model: nn.Module) -> float:
                # adapters fit the evaluation set to the model the task is built on (its vocabulary,
                # its action codec), so scoring another model with it is wrong
                assert model is built_on, "the task scored another model than the one it was built on"
                return float(F.cross_entropy(model(x), y))

            return TaskLoss(fn, "cross-entropy")

    ad = Checkpoints(ToyAdapter.default_config)
    before = ad.ctx
    out = check_adapter(ad, tmp_path, spec="wide")
    assert out["task_loss"] == "cross-entropy"
    assert ad.built == ["wide"], f"models built: {ad.built}"  # the default was never built
    assert len(ad.seen) == 2 and all(m is ad.seen[0] for m in ad.seen) and ad.seen[0][0].out_features == 24
    assert ad.ctx is before  # the adapter keeps its own context
