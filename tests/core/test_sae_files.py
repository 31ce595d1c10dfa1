"""Saved SAE files: nothing lost, nothing silently wrong (non-finite weights, checksums, broken files)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sciscope.core.errors import ConfigError, IntegrityError, NonFiniteError, SciscopeError, ShapeError
from sciscope.core.sae import SAETrainResult, create_sae, load_sae, sae_config
from sciscope.core.sae.base import CONFIG_FILE, WEIGHTS_FILE


def tiny_sae(seed: int = 0):
    return create_sae(sae_config("topk", d_in=8, d_sae=16, k=2), seed=seed)


@pytest.fixture()
def saved(tmp_path: Path) -> Path:
    """A good saved SAE directory."""
    return tiny_sae().save(tmp_path / "sae")


def _poison(sae) -> None:
    with torch.no_grad():
        sae.W_enc[0, :12] = float("nan")


# ----------------------------------------------------------------------- (a) non-finite weights


def test_save_refuses_non_finite_weights(tmp_path: Path) -> None:
    sae = tiny_sae()
    _poison(sae)
    with pytest.raises(NonFiniteError, match=r"tensor 'W_enc' has 12 NaN/inf values"):
        sae.save(tmp_path / "sae")
    result = SAETrainResult(sae, sae.cfg, pd.DataFrame(), {}, {})
    with pytest.raises(NonFiniteError, match=r"run.*W_enc"):
        result.save(tmp_path / "run")
    assert list(tmp_path.iterdir()) == []  # nothing half-written left behind


def test_load_refuses_non_finite_weights(saved: Path) -> None:
    # An older file (no checksum) whose weights hold NaN: written by hand, save() would refuse.
    state = load_file(saved / WEIGHTS_FILE)
    state["W_enc"][0, :12] = float("nan")
    save_file(state, saved / WEIGHTS_FILE)
    with pytest.raises(NonFiniteError, match=r"sae\.safetensors: tensor 'W_enc' has 12 NaN/inf values"):
        load_sae(saved)


# ---------------------------------------------------------------------------------- (b) checksum


def test_checksum_is_recorded_and_a_changed_file_is_caught(saved: Path) -> None:
    with safe_open(str(saved / WEIGHTS_FILE), framework="pt") as f:
        digest = f.metadata()["sha256_tensors"]
    assert len(digest) == 64
    load_sae(saved)  # the untouched file verifies
    raw = bytearray((saved / WEIGHTS_FILE).read_bytes())
    raw[-12] ^= 0x01  # one low-order bit of the tensor data: still finite, still the right shape
    (saved / WEIGHTS_FILE).write_bytes(bytes(raw))
    with pytest.raises(IntegrityError, match=r"sae\.safetensors.*changed since it was written"):
        load_sae(saved)


def test_an_edited_config_that_keeps_the_shapes_is_caught(saved: Path) -> None:
    cfg = json.loads((saved / "cfg.json").read_text())
    key = "k" if "k" in cfg else "l1_coefficient"
    cfg[key] = cfg[key] + 1 if isinstance(cfg[key], int) else cfg[key] * 2
    (saved / "cfg.json").write_text(json.dumps(cfg, indent=4))  # formatting alone is not a change
    with pytest.raises(IntegrityError, match=r"cfg\.json changed since it was written"):
        load_sae(saved)


def test_checksum_does_not_depend_on_the_device_or_the_save(tmp_path: Path) -> None:
    a, b = tiny_sae().save(tmp_path / "a"), tiny_sae().save(tmp_path / "b")
    digests = []
    for d in (a, b):
        with safe_open(str(d / WEIGHTS_FILE), framework="pt") as f:
            digests.append(f.metadata()["sha256_tensors"])
    assert digests[0] == digests[1]


def test_file_without_checksum_still_loads(saved: Path) -> None:
    state = load_file(saved / WEIGHTS_FILE)
    save_file(state, saved / WEIGHTS_FILE, metadata={"architecture": "topk", "format_version": "1"})
    loaded = load_sae(saved)
    assert torch.equal(loaded.W_dec, tiny_sae().W_dec)


# ------------------------------------------------------------------ (c) unreadable / mismatched


@pytest.mark.parametrize("damage", ["random", "truncated", "empty"])
def test_unreadable_weights_file_names_the_file(saved: Path, damage: str) -> None:
    path = saved / WEIGHTS_FILE
    raw = path.read_bytes()
    garbled = {"random": bytes(range(256)) * 4, "truncated": raw[: len(raw) // 2], "empty": b""}[damage]
    path.write_bytes(garbled)
    with pytest.raises(SciscopeError, match=rf"{path}.*cannot be read"):
        load_sae(saved)


def test_config_disagreeing_with_tensor_shapes_is_a_shape_error(saved: Path) -> None:
    cfg = json.loads((saved / CONFIG_FILE).read_text())
    cfg["d_sae"] = 20
    (saved / CONFIG_FILE).write_text(json.dumps(cfg))
    with pytest.raises(ShapeError, match=r"sae\.safetensors: tensor 'W_enc' has shape \(8, 16\).*expects \(8, 20\)"):
        load_sae(saved)


def test_unreadable_config_names_the_file(saved: Path) -> None:
    (saved / CONFIG_FILE).write_text("{not json")
    with pytest.raises(SciscopeError, match=r"cfg\.json.*not valid JSON"):
        load_sae(saved)


@pytest.mark.parametrize("missing", [WEIGHTS_FILE, CONFIG_FILE])
def test_missing_file_is_named(saved: Path, missing: str) -> None:
    (saved / missing).unlink()
    with pytest.raises(SciscopeError, match=rf"{saved / missing}.*does not exist"):
        load_sae(saved)
    shutil.rmtree(saved)
    with pytest.raises(SciscopeError, match="does not exist"):
        load_sae(saved)


def test_invalid_config_value_names_the_file(saved: Path) -> None:
    cfg = json.loads((saved / CONFIG_FILE).read_text())
    cfg["d_sae"] = "wide"
    (saved / CONFIG_FILE).write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"cfg\.json: .*d_sae"):
        load_sae(saved)
