"""SAE interchange: SAELens, sparsify and dictionary_learning directories load with the same codes,
and sciscope SAEs export to SAELens and back.

Each foreign directory is written by hand here, with the key names, layouts and config fields the
library writes, and every encoding is checked against a reference computed in the test from that
library's own formula.  The tests marked ``sae_lens`` run against the real SAELens (``.venv-bench``;
skipped where it is not installed)::

    .venv-bench/bin/python -m pytest tests/core/test_sae_formats.py -s
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from sciscope.core.errors import ConfigError, IntegrityError, SciscopeError
from sciscope.core.sae import (
    SAE_REGISTRY,
    BatchTopKConfig,
    BatchTopKSAE,
    ReLUConfig,
    ReLUSAE,
    create_sae,
    load_sae,
    register_sae,
    sae_config,
)
from sciscope.core.sae.formats import (
    SAELENS_WEIGHTS_FILE,
    detect_format,
    export_saelens,
    load_saelens,
    to_saelens,
)

D_IN, D_SAE, K = 6, 12, 3
TOL = 1e-5


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _batch(seed: int = 1, n: int = 64) -> Tensor:
    return torch.randn(n, D_IN, generator=_gen(seed)) * 2 + 0.5


def _enc(sae, x: Tensor) -> Tensor:
    """sciscope's codes, in float64 to compare with the float64 references."""
    with torch.no_grad():
        return sae.encode(x).double()


def _f64(w: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.double() if v.is_floating_point() else v for k, v in w.items()}


def _topk_dense(acts: Tensor, k: int) -> Tensor:
    """Keep the k largest entries of each row (ReLU'd), zero the rest."""
    vals, idx = acts.topk(k, dim=-1, sorted=False)
    return torch.zeros_like(acts).scatter(-1, idx, vals.relu())


def _write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def _random_sae(architecture: str, seed: int = 0):
    """A sciscope SAE with every parameter non-trivial (biases, thresholds, decoder norms != 1)."""
    fields = {"d_in": D_IN, "d_sae": D_SAE}
    if architecture in ("topk", "batchtopk"):
        fields["k"] = K
    sae = create_sae(sae_config(architecture, **fields), seed=seed)
    g = _gen(seed + 100)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(D_IN, D_SAE, generator=g))
        sae.W_dec.copy_(torch.randn(D_SAE, D_IN, generator=g))
        sae.b_enc.copy_(torch.randn(D_SAE, generator=g))
        sae.b_dec.copy_(torch.randn(D_IN, generator=g) * 0.3)
        if architecture == "jumprelu":
            sae.log_threshold.copy_(torch.rand(D_SAE, generator=g).mul(2).add(0.1).log())
        if architecture == "batchtopk":
            sae.threshold.fill_(0.7)
    return sae.eval()


# ------------------------------------------------------------------------------------ SAELens


def _saelens_weights(seed: int = 0, *, threshold: bool = False) -> dict[str, Tensor]:
    g = _gen(seed)
    w = {
        "W_enc": torch.randn(D_IN, D_SAE, generator=g),
        "b_enc": torch.randn(D_SAE, generator=g) * 0.5,
        "W_dec": torch.randn(D_SAE, D_IN, generator=g),
        "b_dec": torch.randn(D_IN, generator=g) * 0.3,
    }
    if threshold:
        w["threshold"] = torch.rand(D_SAE, generator=g) * 1.5
    return w


def _saelens_cfg(architecture: str, **extra) -> dict:
    """A SAELens >= 6 inference cfg.json, as ``SAE.save_model`` writes it."""
    return {
        "architecture": architecture,
        "d_in": D_IN,
        "d_sae": D_SAE,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {"sae_lens_version": "6.54.12", "sae_lens_training_version": "6.54.12",
                     "model_name": "gpt2", "hook_name": "blocks.0.hook_resid_post"},
        **extra,
    }


def _write_saelens(path: Path, cfg: dict, weights: dict[str, Tensor]) -> Path:
    _write_json(path / "cfg.json", cfg)
    save_file(weights, path / SAELENS_WEIGHTS_FILE)
    return path


def _saelens_ref(cfg: dict, w: dict[str, Tensor], x: Tensor) -> Tensor:
    """SAELens' encode: process_sae_in, hidden_pre, then the architecture's activation."""
    sae_in = x - w["b_dec"] * cfg.get("apply_b_dec_to_input", True)
    hidden_pre = sae_in @ w["W_enc"] + w["b_enc"]
    arch = cfg["architecture"]
    if arch == "standard":
        return hidden_pre.relu()
    if arch in ("topk", "batchtopk") and cfg.get("rescale_acts_by_decoder_norm", False):
        hidden_pre = hidden_pre * w["W_dec"].norm(dim=-1)
    if arch == "topk":
        return _topk_dense(hidden_pre, cfg["k"])
    if arch == "batchtopk":  # its inference model: JumpReLU at the running threshold
        return hidden_pre.relu() * (hidden_pre > w["topk_threshold"])
    return hidden_pre.relu() * (hidden_pre > w["threshold"])


@pytest.mark.parametrize(
    ("architecture", "extra", "target"),
    [
        ("standard", {}, "relu"),
        ("standard", {"apply_b_dec_to_input": False}, "relu"),
        ("topk", {"k": K}, "topk"),
        ("topk", {"k": K, "rescale_acts_by_decoder_norm": True}, "topk"),
        ("topk", {"k": K, "apply_b_dec_to_input": False, "rescale_acts_by_decoder_norm": True}, "topk"),
        ("jumprelu", {}, "jumprelu"),
        ("jumprelu", {"apply_b_dec_to_input": False}, "jumprelu"),
    ],
)
def test_saelens_directory_loads_with_the_same_codes(tmp_path: Path, architecture, extra, target) -> None:
    cfg = _saelens_cfg(architecture, **extra)
    w = _saelens_weights(threshold=architecture == "jumprelu")
    path = _write_saelens(tmp_path / "sae", cfg, w)
    assert detect_format(path) == "saelens"
    sae = load_sae(path)
    assert sae.cfg.architecture == target and not sae.training
    x = _batch()
    ref = _saelens_ref(cfg, _f64(w), x.double())
    got = _enc(sae, x)
    assert (ref != 0).any() and (ref == 0).any()  # the test data exercises the sparsity
    assert (got - ref).abs().max() <= TOL
    assert torch.equal(got != 0, ref != 0)
    if target == "topk":
        assert sae.cfg.k == K


def test_saelens_jumprelu_negative_or_zero_threshold_is_plain_relu(tmp_path: Path) -> None:
    w = _saelens_weights(threshold=True)
    w["threshold"][:4] = torch.tensor([0.0, -0.5, -3.0, 0.0])
    cfg = _saelens_cfg("jumprelu")
    sae = load_sae(_write_saelens(tmp_path / "sae", cfg, w))
    x = _batch()
    assert (_enc(sae, x) - _saelens_ref(cfg, _f64(w), x.double())).abs().max() <= TOL
    assert torch.isfinite(sae.log_threshold).all()


def test_saelens_log_threshold_checkpoint(tmp_path: Path) -> None:
    # Older JumpReLU training checkpoints store log_threshold; SAELens exponentiates it on load.
    w = _saelens_weights(threshold=True)
    cfg = _saelens_cfg("jumprelu")
    stored = dict(w)
    stored["log_threshold"] = stored.pop("threshold").log()
    sae = load_sae(_write_saelens(tmp_path / "sae", cfg, stored))
    x = _batch()
    assert (_enc(sae, x) - _saelens_ref(cfg, _f64(w), x.double())).abs().max() <= TOL


def test_saelens_batchtopk_inference_file_loads_as_batchtopk(tmp_path: Path) -> None:
    # SAELens saves a trained BatchTopK SAE as JumpReLU with one threshold everywhere and says so
    # in the metadata (training_architecture, k as a float).
    w = _saelens_weights()
    w["threshold"] = torch.full((D_SAE,), 0.8)
    cfg = _saelens_cfg("jumprelu")
    cfg["metadata"].update(training_architecture="batchtopk",
                           training_architecture_details={"k": 3.0, "topk_threshold_lr": 0.01})
    sae = load_sae(_write_saelens(tmp_path / "sae", cfg, w))
    assert sae.cfg.architecture == "batchtopk" and sae.cfg.k == 3
    assert float(sae.threshold) == pytest.approx(0.8)
    x = _batch()
    assert (_enc(sae, x) - _saelens_ref(cfg, _f64(w), x.double())).abs().max() <= TOL


def test_saelens_batchtopk_training_checkpoint(tmp_path: Path) -> None:
    w = _saelens_weights()
    w["topk_threshold"] = torch.tensor(0.9, dtype=torch.float64)
    cfg = _saelens_cfg("batchtopk", k=4.0, rescale_acts_by_decoder_norm=True, topk_threshold_lr=0.01,
                       aux_loss_coefficient=1.0, decoder_init_norm=0.1)
    sae = load_sae(_write_saelens(tmp_path / "sae", cfg, w))
    assert sae.cfg.architecture == "batchtopk" and sae.cfg.k == 4
    x = _batch()
    ref = _saelens_ref(cfg, _f64(w), x.double())
    assert (_enc(sae, x) - ref).abs().max() <= TOL and (ref != 0).any()


def test_saelens_pre_6_layout(tmp_path: Path) -> None:
    # SAELens < 6: activation_fn_str / activation_fn_kwargs, boolean normalize_activations, no
    # version, a scaling_factor tensor of ones.
    w = _saelens_weights()
    cfg = {"d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "device": "cpu", "hook_point": "blocks.1.hook_resid_pre",
           "activation_fn_str": "topk", "activation_fn_kwargs": {"k": K}, "apply_b_dec_to_input": False,
           "normalize_activations": False, "finetuning_scaling_factor": False}
    stored = {**w, "scaling_factor": torch.ones(D_SAE)}
    sae = load_sae(_write_saelens(tmp_path / "sae", cfg, stored))
    assert sae.cfg.architecture == "topk" and sae.cfg.k == K
    x = _batch()
    ref = _saelens_ref({"architecture": "topk", "k": K, "apply_b_dec_to_input": False}, _f64(w), x.double())
    assert (_enc(sae, x) - ref).abs().max() <= TOL


def test_saelens_finetuning_scaling_factor_scales_the_decoder(tmp_path: Path) -> None:
    w = _saelens_weights()
    scale = torch.rand(D_SAE, generator=_gen(5)) + 0.5
    cfg = {"d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "activation_fn_str": "relu",
           "finetuning_scaling_factor": True}
    sae = load_sae(_write_saelens(tmp_path / "sae", cfg, {**w, "scaling_factor": scale}))
    x = _batch()
    f = _saelens_ref({"architecture": "standard"}, _f64(w), x.double())
    assert (_enc(sae, x) - f).abs().max() <= TOL
    with torch.no_grad():
        w64 = _f64(w)
        assert (sae.decode(f).double() - ((f * scale.double()) @ w64["W_dec"] + w64["b_dec"])).abs().max() <= 1e-4
    cfg["finetuning_scaling_factor"] = False
    _write_json(tmp_path / "sae" / "cfg.json", cfg)
    with pytest.raises(ConfigError, match=r"cfg\.json: finetuning_scaling_factor is false"):
        load_sae(tmp_path / "sae")


def test_saelens_norm_scaling_factor_is_folded(tmp_path: Path) -> None:
    # Trained on s * x: the folded SAE reads raw x, with the codes the SAE gives for s * x.
    w = _saelens_weights(threshold=True)
    cfg = _saelens_cfg("jumprelu", normalize_activations="expected_average_only_in")
    path = _write_saelens(tmp_path / "sae", cfg, w)
    with pytest.raises(ConfigError, match=r"cfg\.json: normalize_activations='expected_average_only_in'.*norm_scaling_factor"):
        load_sae(path)
    s = 0.37
    x = _batch()
    ref = _saelens_ref(cfg, _f64(w), s * x.double())
    sae = load_saelens(path, norm_scaling_factor=s)
    assert (_enc(sae, x) - ref).abs().max() <= TOL
    with torch.no_grad():  # and reconstructs raw x: x_hat = (f @ W_dec + b_dec) / s
        w64 = _f64(w)
        assert (sae.decode(ref).double() - (ref @ w64["W_dec"] + w64["b_dec"]) / s).abs().max() <= 1e-4
    _write_json(path / "activation_scaler.json", {"scaling_factor": s, "has_whitening": False})
    assert (_enc(load_sae(path), x) - ref).abs().max() <= TOL


@pytest.mark.parametrize(
    ("cfg_change", "message"),
    [
        ({"architecture": "gated"}, r"architecture='gated' has no sciscope equivalent"),
        ({"architecture": "jumprelu_transcoder"}, r"architecture='jumprelu_transcoder'"),
        ({"normalize_activations": "layer_norm"}, r"normalize_activations='layer_norm'.*per-sample"),
        ({"normalize_activations": "constant_norm_rescale"}, r"normalize_activations='constant_norm_rescale'"),
        ({"normalize_activations": "covariance_whitening"}, r"normalize_activations='covariance_whitening'"),
    ],
)
def test_saelens_unsupported_variants_are_refused(tmp_path: Path, cfg_change, message) -> None:
    path = _write_saelens(tmp_path / "sae", {**_saelens_cfg("standard"), **cfg_change}, _saelens_weights())
    with pytest.raises(ConfigError, match=r"sae[/\\]cfg\.json: " + message):
        load_sae(path)


def test_saelens_pre_6_other_activation_is_refused(tmp_path: Path) -> None:
    cfg = {"d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "activation_fn_str": "tanh-relu"}
    path = _write_saelens(tmp_path / "sae", cfg, _saelens_weights())
    with pytest.raises(ConfigError, match=r"cfg\.json: activation_fn_str='tanh-relu' has no sciscope equivalent"):
        load_sae(path)


def test_saelens_unexpected_or_missing_tensors_are_refused(tmp_path: Path) -> None:
    w = {**_saelens_weights(), "b_gate": torch.zeros(D_SAE)}
    path = _write_saelens(tmp_path / "a", _saelens_cfg("standard"), w)
    with pytest.raises(SciscopeError, match=r"sae_weights\.safetensors: tensors .* \(unexpected \[.b_gate.\]\)"):
        load_sae(path)
    path = _write_saelens(tmp_path / "b", _saelens_cfg("jumprelu"), _saelens_weights())
    with pytest.raises(SciscopeError, match=r"missing \['threshold'\]"):
        load_sae(path)


def test_saelens_cfg_without_weights_names_the_missing_file(tmp_path: Path) -> None:
    _write_json(tmp_path / "sae" / "cfg.json", _saelens_cfg("standard"))
    with pytest.raises(SciscopeError, match=r"sae_weights\.safetensors does not exist"):
        load_sae(tmp_path / "sae")


# ------------------------------------------------------------------------ sciscope -> SAELens


@pytest.mark.parametrize("architecture", ["relu", "topk", "jumprelu", "batchtopk"])
def test_export_saelens_round_trip(tmp_path: Path, architecture: str) -> None:
    """sciscope save -> load_sae -> SAELens directory -> load_sae: the same SAE, the same codes."""
    sae = load_sae(_random_sae(architecture).save(tmp_path / "ours"))
    out = export_saelens(sae, tmp_path / "saelens", metadata={"model_name": "tiny", "hook_name": "layers.1"})
    assert sorted(p.name for p in out.iterdir()) == ["cfg.json", SAELENS_WEIGHTS_FILE]
    cfg = json.loads((out / "cfg.json").read_text())
    expected_arch = {"relu": "standard", "batchtopk": "jumprelu"}.get(architecture, architecture)
    assert cfg["architecture"] == expected_arch and cfg["dtype"] == "float32"
    assert cfg["metadata"]["hook_name"] == "layers.1"
    with safe_open(str(out / SAELENS_WEIGHTS_FILE), framework="pt") as f:
        names = set(f.keys())
    assert names == {"W_enc", "b_enc", "W_dec", "b_dec"} | ({"threshold"} if expected_arch == "jumprelu" else set())

    back = load_sae(out)
    assert type(back) is type(sae) and back.cfg == sae.cfg
    x = _batch()
    a, b = _enc(sae, x), _enc(back, x)
    assert (a - b).abs().max() <= 1e-6 and torch.equal(a != 0, b != 0)
    # and the SAELens formula on the exported tensors gives the same codes
    with safe_open(str(out / SAELENS_WEIGHTS_FILE), framework="pt") as f:
        w = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    assert (_saelens_ref(cfg, _f64(w), x.double()) - a).abs().max() <= TOL


def test_export_saelens_keeps_an_unestimated_batchtopk_threshold(tmp_path: Path) -> None:
    sae = _random_sae("batchtopk")
    with torch.no_grad():
        sae.threshold.fill_(-1.0)  # before any training: plain ReLU
    back = load_sae(export_saelens(sae, tmp_path / "s"))
    assert float(back.threshold) == -1.0
    x = _batch()
    assert (_enc(back, x) - F.relu(_enc(sae, x))).abs().max() <= 1e-6


def test_export_saelens_checksums_catch_edits(tmp_path: Path) -> None:
    out = export_saelens(_random_sae("topk"), tmp_path / "s")
    cfg = json.loads((out / "cfg.json").read_text())
    cfg["k"] = 4  # every shape stays: only the recorded config hash can tell
    (out / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(IntegrityError, match=r"cfg\.json changed since it was written"):
        load_sae(out)


@pytest.fixture()
def registered():
    """Register SAE classes under test names, and remove them afterwards."""
    names: list[str] = []

    def register(name: str, cls):
        register_sae(name)(cls)
        names.append(name)
        return cls

    yield register
    for name in names:
        SAE_REGISTRY.pop(name, None)


def test_export_saelens_carries_a_subclass_that_encodes_like_its_base(tmp_path: Path, registered) -> None:
    # Like Matryoshka: BatchTopK at inference, its own training and config fields.
    @dataclasses.dataclass(kw_only=True)
    class LadderConfig(BatchTopKConfig):
        rungs: int = 2

    class LadderSAE(BatchTopKSAE):
        config_class = LadderConfig

    registered("test-ladder", LadderSAE)
    sae = create_sae(sae_config("test-ladder", d_in=D_IN, d_sae=D_SAE, k=K, rungs=3), seed=0).eval()
    with torch.no_grad():
        sae.b_enc.fill_(0.2)
        sae.threshold.fill_(0.3)
    cfg, _ = to_saelens(sae)
    assert cfg["architecture"] == "jumprelu"
    assert cfg["metadata"]["training_architecture"] == "test-ladder"
    back = load_sae(export_saelens(sae, tmp_path / "s"))
    assert type(back) is LadderSAE and back.cfg == sae.cfg
    x = _batch()
    assert (_enc(back, x) - _enc(sae, x)).abs().max() <= 1e-6


def test_export_saelens_refuses_an_sae_that_encodes_otherwise(tmp_path: Path, registered) -> None:
    @dataclasses.dataclass(kw_only=True)
    class SquaredConfig(ReLUConfig):  # its own config class: register_sae names it
        pass

    class SquaredSAE(ReLUSAE):
        config_class = SquaredConfig

        def _encode(self, x: Tensor) -> Tensor:
            return F.relu(self.pre_acts(x)) ** 2

    registered("test-squared", SquaredSAE)
    sae = create_sae(sae_config("test-squared", d_in=D_IN, d_sae=D_SAE), seed=0)
    with pytest.raises(ConfigError, match=r"export to SAELens supports the architectures .*this SAE is 'test-squared'"):
        export_saelens(sae, tmp_path / "s")
    assert not (tmp_path / "s").exists()
    # and a carried config of an SAE that encodes otherwise is not trusted on load
    out = export_saelens(_random_sae("relu"), tmp_path / "r")
    cfg = json.loads((out / "cfg.json").read_text())
    cfg["metadata"]["sciscope"]["config"]["architecture"] = "test-squared"
    (out / "cfg.json").write_text(json.dumps(cfg))
    with safe_open(str(out / SAELENS_WEIGHTS_FILE), framework="pt") as f:
        w = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    save_file(w, out / SAELENS_WEIGHTS_FILE)  # without the checksums: a file edited by hand
    assert type(load_sae(out)) is ReLUSAE


# ----------------------------------------------------------------------------------- sparsify


def _sparsify_dir(path: Path, cfg_change: dict | None = None, extra: dict | None = None):
    g = _gen(7)
    w = {
        "encoder.weight": torch.randn(D_SAE, D_IN, generator=g),  # nn.Linear: (out, in)
        "encoder.bias": torch.randn(D_SAE, generator=g) * 0.5,
        "W_dec": torch.randn(D_SAE, D_IN, generator=g),
        "b_dec": torch.randn(D_IN, generator=g) * 0.3,
        **(extra or {}),
    }
    # SparseCoder.save_to_disk: {**cfg.to_dict(), "d_in": d_in}
    cfg = {"activation": "topk", "expansion_factor": 2, "normalize_decoder": True, "num_latents": 0, "k": K,
           "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": D_IN, **(cfg_change or {})}
    _write_json(path / "cfg.json", cfg)
    save_file(w, path / "sae.safetensors", metadata={"format": "pt"})
    return path, w


def test_sparsify_directory_loads_with_the_same_codes(tmp_path: Path) -> None:
    path, w = _sparsify_dir(tmp_path / "layers.3")
    assert detect_format(path) == "sparsify"
    sae = load_sae(path)
    assert sae.cfg.architecture == "topk" and sae.cfg.k == K and sae.cfg.d_sae == D_SAE
    x = _batch()
    x64, w64 = x.double(), _f64(w)  # the reference in float64: the difference is ours
    # sparsify's fused_encoder: TopK_k(ReLU(F.linear(x - b_dec, encoder.weight, encoder.bias)))
    ref = _topk_dense(F.relu(F.linear(x64 - w64["b_dec"], w64["encoder.weight"], w64["encoder.bias"])), K)
    assert (_enc(sae, x) - ref).abs().max() <= TOL
    with torch.no_grad():  # decode: sum of the kept W_dec rows + b_dec
        assert (sae.decode(ref).double() - (ref @ w64["W_dec"] + w64["b_dec"])).abs().max() <= 1e-4


def test_sparsify_num_latents_wins_over_expansion_factor(tmp_path: Path) -> None:
    path, _ = _sparsify_dir(tmp_path / "s", {"num_latents": D_SAE, "expansion_factor": 32})
    assert load_sae(path).cfg.d_sae == D_SAE


@pytest.mark.parametrize(
    ("cfg_change", "extra", "message"),
    [
        ({"activation": "groupmax"}, None, r"activation='groupmax' has no sciscope equivalent"),
        ({"transcode": True}, None, r"transcode=true"),
        ({"skip_connection": True}, {"W_skip": torch.zeros(D_IN, D_IN)}, r"skip_connection=true"),
    ],
)
def test_sparsify_unsupported_variants_are_refused(tmp_path: Path, cfg_change, extra, message) -> None:
    path, _ = _sparsify_dir(tmp_path / "s", cfg_change, extra)
    with pytest.raises(ConfigError, match=r"s[/\\]cfg\.json: " + message):
        load_sae(path)


def test_a_release_folder_names_its_sae_folders(tmp_path: Path) -> None:
    _sparsify_dir(tmp_path / "release" / "layers.0")
    _sparsify_dir(tmp_path / "release" / "layers.1")
    with pytest.raises(SciscopeError, match=r"holds no SAE itself but 2 folders that do \(layers\.0, layers\.1\)"):
        load_sae(tmp_path / "release")


# ------------------------------------------------------------------------ dictionary_learning


def _dl_dir(path: Path, dict_class: str, tensors: dict[str, Tensor], **trainer) -> Path:
    """A converted dictionary_learning directory: its config.json + ae.pt's state dict as safetensors."""
    cfg = {"trainer": {"dict_class": dict_class, "trainer_class": "T", "activation_dim": D_IN,
                       "dict_size": D_SAE, "lm_name": "EleutherAI/pythia-70m-deduped", "layer": 3, **trainer},
           "buffer": {"d_submodule": D_IN, "ctx_len": 128}}
    _write_json(path / "config.json", cfg)
    save_file(tensors, path / "ae.safetensors")
    return path


def _linear_weights(seed: int = 3) -> dict[str, Tensor]:
    g = _gen(seed)
    return {
        "encoder.weight": torch.randn(D_SAE, D_IN, generator=g),
        "encoder.bias": torch.randn(D_SAE, generator=g) * 0.5,
        "decoder.weight": torch.randn(D_IN, D_SAE, generator=g),  # nn.Linear(dict_size, activation_dim)
    }


def _param_weights(seed: int = 4) -> dict[str, Tensor]:
    g = _gen(seed)
    return {
        "W_enc": torch.randn(D_IN, D_SAE, generator=g),
        "b_enc": torch.randn(D_SAE, generator=g) * 0.5,
        "W_dec": torch.randn(D_SAE, D_IN, generator=g),
        "b_dec": torch.randn(D_IN, generator=g) * 0.3,
    }


def test_dictionary_learning_autoencoder(tmp_path: Path) -> None:
    w = {**_linear_weights(), "bias": torch.randn(D_IN, generator=_gen(9)) * 0.3}
    path = _dl_dir(tmp_path / "trainer_0", "AutoEncoder", w)
    assert detect_format(path) == "dictionary_learning"
    sae = load_sae(path)
    assert sae.cfg.architecture == "relu"
    x = _batch()
    x64, w64 = x.double(), _f64(w)  # the reference in float64: the difference is ours
    # AutoEncoder.from_pretrained (normalize_decoder=True, what load_dictionary calls) folds the
    # decoder column norms into the encoder: codes = ReLU(encoder(x - bias)) * norms.
    norms = w64["decoder.weight"].norm(dim=0)
    ref = F.relu(F.linear(x64 - w64["bias"], w64["encoder.weight"], w64["encoder.bias"])) * norms
    assert (_enc(sae, x) - ref).abs().max() <= TOL
    with torch.no_grad():  # the reconstruction is the raw one: decoder(f_raw) + bias
        raw = F.relu(F.linear(x64 - w64["bias"], w64["encoder.weight"], w64["encoder.bias"]))
        assert (sae(x)[0].double() - (raw @ w64["decoder.weight"].T + w64["bias"])).abs().max() <= 1e-4


def test_dictionary_learning_autoencoder_new(tmp_path: Path) -> None:
    w = {**_linear_weights(), "decoder.bias": torch.randn(D_IN, generator=_gen(9))}
    sae = load_sae(_dl_dir(tmp_path / "d", "AutoEncoderNew", w))
    x = _batch()
    x64, w64 = x.double(), _f64(w)  # the reference in float64: the difference is ours
    ref = F.relu(F.linear(x64, w64["encoder.weight"], w64["encoder.bias"]))  # no input centring
    assert (_enc(sae, x) - ref).abs().max() <= TOL


@pytest.mark.parametrize("k_in_state", [True, False])
def test_dictionary_learning_topk(tmp_path: Path, k_in_state: bool) -> None:
    w = {**_linear_weights(), "b_dec": torch.randn(D_IN, generator=_gen(9)) * 0.3,
         "threshold": torch.tensor(0.4)}
    if k_in_state:
        w["k"] = torch.tensor(K, dtype=torch.int32)
    sae = load_sae(_dl_dir(tmp_path / "d", "AutoEncoderTopK", w, k=K))
    assert sae.cfg.architecture == "topk" and sae.cfg.k == K
    x = _batch()
    x64, w64 = x.double(), _f64(w)  # the reference in float64: the difference is ours
    # encode(use_threshold=False), the default: per-sample top k of ReLU(encoder(x - b_dec))
    ref = _topk_dense(F.relu(F.linear(x64 - w64["b_dec"], w64["encoder.weight"], w64["encoder.bias"])), K)
    assert (_enc(sae, x) - ref).abs().max() <= TOL


def test_dictionary_learning_batchtopk(tmp_path: Path) -> None:
    w = {**_linear_weights(), "b_dec": torch.randn(D_IN, generator=_gen(9)) * 0.3,
         "k": torch.tensor(K, dtype=torch.int32), "threshold": torch.tensor(0.6)}
    sae = load_sae(_dl_dir(tmp_path / "d", "BatchTopKSAE", w, k=K))
    assert sae.cfg.architecture == "batchtopk" and sae.cfg.k == K
    x = _batch()
    x64, w64 = x.double(), _f64(w)  # the reference in float64: the difference is ours
    post = F.relu(F.linear(x64 - w64["b_dec"], w64["encoder.weight"], w64["encoder.bias"]))
    ref = post * (post > w64["threshold"])  # encode(use_threshold=True), the default
    assert (_enc(sae, x) - ref).abs().max() <= TOL and (ref != 0).any()


def test_dictionary_learning_matryoshka_batchtopk(tmp_path: Path) -> None:
    w = {**_param_weights(), "k": torch.tensor(K, dtype=torch.int32), "threshold": torch.tensor(0.5),
         "group_sizes": torch.tensor([4, 8])}
    sae = load_sae(_dl_dir(tmp_path / "d", "MatryoshkaBatchTopKSAE", w, k=K, group_fractions=[1 / 3, 2 / 3]))
    assert sae.cfg.architecture == "batchtopk"
    x = _batch()
    x64, w64 = x.double(), _f64(w)  # the reference in float64: the difference is ours
    post = F.relu((x64 - w64["b_dec"]) @ w64["W_enc"] + w64["b_enc"])
    assert (_enc(sae, x) - post * (post > w["threshold"])).abs().max() <= TOL


def test_dictionary_learning_jumprelu(tmp_path: Path) -> None:
    w = {**_param_weights(), "threshold": torch.rand(D_SAE, generator=_gen(8)) * 1.5}
    w["threshold"][0] = -0.2
    sae = load_sae(_dl_dir(tmp_path / "d", "JumpReluAutoEncoder", w))
    assert sae.cfg.architecture == "jumprelu"
    x = _batch()
    x64, w64 = x.double(), _f64(w)  # the reference in float64: the difference is ours
    pre = x64 @ w64["W_enc"] + w64["b_enc"]  # apply_b_dec_to_input is False for saved files
    ref = F.relu(pre * (pre > w64["threshold"]))
    assert (_enc(sae, x) - ref).abs().max() <= TOL


def test_dictionary_learning_pickle_is_never_opened(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "trainer_0"
    _write_json(path / "config.json", {"trainer": {"dict_class": "AutoEncoder"}})
    (path / "ae.pt").write_bytes(b"\x80\x04not really a pickle")

    def refuse(*_args, **_kwargs):
        raise AssertionError("a pickle was opened")

    monkeypatch.setattr(torch, "load", refuse)
    import pickle

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    assert detect_format(path) == "dictionary_learning"
    with pytest.raises(SciscopeError, match=r"ae\.pt is a torch pickle, which sciscope never unpickles.*ae\.safetensors"):
        load_sae(path)


def test_dictionary_learning_gated_is_refused(tmp_path: Path) -> None:
    g = _gen(2)
    w = {"decoder_bias": torch.zeros(D_IN), "encoder.weight": torch.randn(D_SAE, D_IN, generator=g),
         "r_mag": torch.zeros(D_SAE), "gate_bias": torch.zeros(D_SAE), "mag_bias": torch.zeros(D_SAE),
         "decoder.weight": torch.randn(D_IN, D_SAE, generator=g)}
    path = _dl_dir(tmp_path / "d", "GatedAutoEncoder", w)
    with pytest.raises(ConfigError, match=r"config\.json: trainer\.dict_class='GatedAutoEncoder' has no sciscope equivalent"):
        load_sae(path)


def test_own_directories_still_load_the_old_way(tmp_path: Path) -> None:
    sae = _random_sae("topk")
    path = sae.save(tmp_path / "ours")
    assert detect_format(path) == "sciscope"
    x = _batch()
    assert torch.equal(_enc(load_sae(path), x), _enc(sae, x))
    with pytest.raises(SciscopeError, match=r"cfg\.json does not exist"):
        load_sae(tmp_path / "nothing")


# ------------------------------------------------------------------------- the real SAELens

SAELENS_ARCHS = ["relu", "topk", "jumprelu", "batchtopk"]


@pytest.mark.parametrize("architecture", SAELENS_ARCHS)
def test_real_saelens_loads_a_sciscope_sae_with_the_same_codes(tmp_path: Path, architecture: str) -> None:
    """Must-show: a sciscope SAE loaded by SAELens encodes a batch identically (within 1e-5)."""
    sae_lens = pytest.importorskip("sae_lens")
    sae = _random_sae(architecture)
    theirs = sae_lens.SAE.load_from_disk(str(export_saelens(sae, tmp_path / "s")))
    x = _batch(n=256)
    with torch.no_grad():
        ours, ref = sae.encode(x), theirs.encode(x)
    diff = float((ours - ref).abs().max())
    print(f"\n[sciscope -> SAELens {sae_lens.__version__}] {architecture}: max |encode difference| = {diff:.3g}")
    assert diff <= TOL and torch.equal(ours != 0, ref != 0) and (ours != 0).any()


def _real_saelens_sae(sae_lens, architecture: str, **cfg):
    """A SAELens SAE of ``architecture`` with random, non-trivial weights."""
    from sae_lens.registry import get_sae_class

    sae_cls, cfg_cls = get_sae_class(architecture)
    sae = sae_cls(cfg_cls(d_in=D_IN, d_sae=D_SAE, **cfg))
    g = _gen(11)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if name.startswith("b_") else 1.0))
        if hasattr(sae, "threshold"):
            sae.threshold.copy_(torch.rand(D_SAE, generator=g) * 1.5)
    return sae


@pytest.mark.parametrize(
    ("architecture", "cfg"),
    [
        ("standard", {}),
        ("standard", {"apply_b_dec_to_input": False}),
        ("topk", {"k": K}),
        ("topk", {"k": K, "rescale_acts_by_decoder_norm": True}),
        ("jumprelu", {}),
    ],
)
def test_real_saelens_sae_loads_in_sciscope(tmp_path: Path, architecture: str, cfg: dict) -> None:
    """Must-show: a SAELens-format SAE (written by SAELens itself) loads in sciscope, same codes."""
    sae_lens = pytest.importorskip("sae_lens")
    theirs = _real_saelens_sae(sae_lens, architecture, **cfg)
    theirs.save_model(tmp_path / "s")
    ours = load_sae(tmp_path / "s")
    x = _batch(n=256)
    with torch.no_grad():
        got, ref = ours.encode(x), theirs.encode(x)
    diff = float((got - ref).abs().max())
    print(f"\n[SAELens {sae_lens.__version__} -> sciscope] {architecture} {cfg}: max |encode difference| = {diff:.3g}")
    assert diff <= TOL and torch.equal(got != 0, ref != 0)


def test_real_saelens_batchtopk_inference_save_loads_as_batchtopk(tmp_path: Path) -> None:
    sae_lens = pytest.importorskip("sae_lens")
    from sae_lens import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig

    trainer = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K,
                                                              rescale_acts_by_decoder_norm=True))
    g = _gen(12)
    with torch.no_grad():
        for name, p in trainer.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if name.startswith("b_") else 1.0))
        trainer.topk_threshold = torch.tensor(0.9, dtype=torch.double)
    trainer.save_inference_model(tmp_path / "s")
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "s"))
    ours = load_sae(tmp_path / "s")
    assert ours.cfg.architecture == "batchtopk" and ours.cfg.k == K
    x = _batch(n=256)
    with torch.no_grad():
        got, ref = ours.encode(x), theirs.encode(x)
    diff = float((got - ref).abs().max())
    print(f"\n[SAELens {sae_lens.__version__} -> sciscope] batchtopk (saved as jumprelu): max |encode difference| = {diff:.3g}")
    assert diff <= TOL and torch.equal(got != 0, ref != 0) and (ref != 0).any()
    assert math.isclose(float(ours.threshold), 0.9, rel_tol=1e-6)
