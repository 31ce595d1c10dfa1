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
