"""Tests of sciscope.core.sae: registry, architectures, training, folding, metrics, save/load, errors."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sciscope.core.errors import ConfigError, NonFiniteError, ShapeError
from sciscope.core.sae import (
    SAE_REGISTRY,
    BatchTopKConfig,
    BatchTopKSAE,
    JumpReLUConfig,
    ReLUConfig,
    SAEConfig,
    SparseAutoencoder,
    TopKConfig,
    TopKSAE,
    available_saes,
    create_sae,
    evaluate_sae,
    load_sae,
    register_sae,
    sae_config,
    train_sae,
)

ARCHITECTURES = ["relu", "topk", "batchtopk", "jumprelu"]


# ------------------------------------------------------------------------------------- helpers


def make_dictionary_data(
    *, n: int, d_in: int = 32, n_atoms: int = 64, per_sample: int = 3, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples that are each a positive combination of exactly ``per_sample`` unit-norm atoms."""
    g = torch.Generator().manual_seed(seed)
    atoms = torch.randn(n_atoms, d_in, generator=torch.Generator().manual_seed(1234))
    atoms = atoms / atoms.norm(dim=1, keepdim=True)  # (n_atoms, d_in)
    chosen = torch.rand(n, n_atoms, generator=g).argsort(dim=1)[:, :per_sample]  # (n, per_sample)
    codes = torch.zeros(n, n_atoms).scatter_(1, chosen, 0.5 + torch.rand(n, per_sample, generator=g))
    return atoms, codes @ atoms  # (n_atoms, d_in), (n, d_in)


def batches_of(x: torch.Tensor, batch_size: int, seed: int = 0) -> Callable[[], Iterator[torch.Tensor]]:
    """Zero-arg callable giving a fresh shuffled pass over ``x`` each time (same order each pass)."""

    def passes() -> Iterator[torch.Tensor]:
        perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
        return (x[perm[i : i + batch_size]] for i in range(0, x.shape[0], batch_size))

    return passes


def best_cosines(atoms: torch.Tensor, sae: SparseAutoencoder) -> torch.Tensor:
    """For every true atom, the best cosine similarity with a decoder row: (n_atoms,)."""
    w = sae.W_dec.detach()
    w = w / w.norm(dim=1, keepdim=True)
    return (atoms @ w.T).max(dim=1).values


def small_cfg(arch: str, **overrides: object) -> SAEConfig:
    fields: dict[str, object] = {"d_in": 16, "d_sae": 48, "dead_after": 64}
    if arch in ("topk", "batchtopk"):
        fields["k"] = 4
    fields.update(overrides)
    return sae_config(arch, **fields)


def quick_train(cfg: SAEConfig, *, steps: int = 20, seed: int = 0, n: int = 512) -> SparseAutoencoder:
    x = torch.randn(n, cfg.d_in, generator=torch.Generator().manual_seed(7)) * 2 + 1
    return train_sae(cfg, batches_of(x, 64), max_steps=steps, lr=1e-2, seed=seed, progress=False).sae


def randomize_(sae: SparseAutoencoder, seed: int = 0) -> SparseAutoencoder:
    """Give every parameter non-trivial values (biases are zero at init)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            if name.startswith("b_"):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return sae


# ------------------------------------------------------------------------- dictionary recovery

# Overrides that make each architecture find ~3 active atoms per sample within 600 steps (ReLU's
# literature default l1_coeff=5 over-shrinks on 32-d toy data; JumpReLU's default thresholds are
# sized for wide LM activations and need more steps to climb).  With d_sae = 2 x the atoms, every
# case reached mean best cosine >= 0.98 and explained variance >= 0.92 over training seeds 0-3.
RECOVERY_CASES: dict[str, dict[str, object]] = {
    "topk": {"k": 3},
    "topk-standardize": {"k": 3, "normalize": "standardize"},
    "batchtopk": {"k": 3},
    "relu": {"l1_coeff": 0.5},
    "jumprelu": {"threshold_init": 0.5, "bandwidth": 0.1},
}


@pytest.mark.parametrize("case", list(RECOVERY_CASES))
def test_recovers_known_sparse_dictionary(case: str) -> None:
    arch = case.split("-")[0]
    atoms, x = make_dictionary_data(n=2**14, seed=0)  # 64 atoms in 32 dimensions
    _, x_test = make_dictionary_data(n=4096, seed=1)
    # An offset and a scale far from the data's own: the SAE must work on these raw numbers after
    # the normalisation is folded into its weights.
    offset, gain = 5.0 + torch.arange(32) / 8, 3.0
    cfg = sae_config(arch, d_in=32, d_sae=128, dead_after=2000, **RECOVERY_CASES[case])
    result = train_sae(cfg, batches_of(offset + gain * x, 256), max_steps=600, lr=1e-2, progress=False)

    metrics = evaluate_sae(result.sae, offset + gain * x_test)
    cosines = best_cosines(atoms, result.sae)
    assert cosines.mean() > 0.9, f"{case}: mean best cosine {cosines.mean():.3f}"
    assert metrics["explained_variance"] > 0.9, f"{case}: {metrics}"
    max_l0 = 20.0 if arch == "relu" else 4.5  # an L1 penalty trades sparsity for shrinkage
    assert 2.0 <= metrics["l0"] <= max_l0, f"{case}: {metrics}"
    assert result.steps == 600 and list(result.history["step"]) == list(range(600))
    assert result.history["mse"].iloc[-20:].mean() < 0.5 * result.history["mse"].iloc[:20].mean()


# ---------------------------------------------------------------------------------- save / load


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_save_load_gives_same_class_cfg_and_outputs(arch: str, tmp_path: Path) -> None:
    sae = quick_train(small_cfg(arch, normalize="standardize"))
    sae.save(tmp_path / "sae")
    assert sorted(p.name for p in (tmp_path / "sae").iterdir()) == ["cfg.json", "sae.safetensors"]

    loaded = load_sae(tmp_path / "sae")
    assert type(loaded) is type(sae) is SAE_REGISTRY[arch]
    assert loaded.cfg == sae.cfg
    saved_cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert saved_cfg["architecture"] == arch
    assert set(saved_cfg) == {"architecture"} | {f.name for f in dataclasses.fields(sae.cfg)}

    x = torch.randn(33, 16, generator=torch.Generator().manual_seed(3)) * 2 + 1
    x_hat, f = sae(x)
    x_hat2, f2 = loaded(x)
    assert torch.equal(x_hat, x_hat2) and torch.equal(f, f2)
    for name, tensor in sae.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name


def test_learned_thresholds_are_in_the_safetensors(tmp_path: Path) -> None:
    btk = quick_train(small_cfg("batchtopk"))
    assert float(btk.threshold) > 0  # estimated during training
    btk.save(tmp_path / "btk")
    assert torch.equal(load_file(tmp_path / "btk" / "sae.safetensors")["threshold"], btk.threshold)

    jr = quick_train(small_cfg("jumprelu"))
    jr.save(tmp_path / "jr")
    stored = load_file(tmp_path / "jr" / "sae.safetensors")["log_threshold"]
    assert torch.equal(stored, jr.log_threshold.detach())
    assert not torch.allclose(stored, torch.full_like(stored, np.log(0.05)))  # it learned


def test_save_overwrites_atomically(tmp_path: Path) -> None:
    a = create_sae(small_cfg("topk"), seed=0)
    b = create_sae(small_cfg("topk"), seed=1)
    a.save(tmp_path / "sae")
    b.save(tmp_path / "sae")
    assert torch.equal(load_sae(tmp_path / "sae").W_dec, b.W_dec)
    assert [p.name for p in tmp_path.iterdir()] == ["sae"]  # no temporary left behind


# --------------------------------------------------------------------- normalisation folding


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("method", ["scalar", "standardize"])
def test_folding_normalization_keeps_raw_space_outputs(arch: str, method: str) -> None:
    g = torch.Generator().manual_seed(0)
    sae = randomize_(create_sae(small_cfg(arch), seed=0)).eval()
    if isinstance(sae, BatchTopKSAE):
        sae.threshold.fill_(0.2)
    mean = 3 * torch.randn(16, generator=g)
    scale = torch.tensor(2.5) if method == "scalar" else 0.5 + 3 * torch.rand(16, generator=g)
    x = mean + scale * torch.randn(64, 16, generator=g)  # raw activations

    with torch.no_grad():
        x_hat_n, f_before = sae((x - mean) / scale)  # trained in normalised space
        x_hat_before = x_hat_n * scale + mean  # mapped back to raw space
        sae.fold_normalization(mean, scale)
        x_hat_after, f_after = sae(x)  # folded: reads and writes raw space

    torch.testing.assert_close(x_hat_after, x_hat_before, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(f_after, f_before, rtol=1e-5, atol=1e-5)
    assert (f_before != 0).any()


# ---------------------------------------------------------------------------- architectures


def test_topk_sparse_decode_equals_dense_decode() -> None:
    cfg = TopKConfig(d_in=24, d_sae=512, k=8)
    sae = randomize_(create_sae(cfg, seed=0))
    dense = create_sae(dataclasses.replace(cfg, sparse_decode=False), seed=0)
    dense.load_state_dict(sae.state_dict())
    x = torch.randn(100, 24, generator=torch.Generator().manual_seed(1))

    x_hat_sparse, f = sae(x)
    assert ((f != 0).sum(dim=1) <= 8).all()
    torch.testing.assert_close(x_hat_sparse, sae.decode(f), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_hat_sparse, dense(x)[0], rtol=1e-5, atol=1e-5)

    # Same gradients through both training paths.
    for model in (sae, dense):
        model.zero_grad()
        model.loss(x)["loss"].backward()
    for (name, p), q in zip(sae.named_parameters(), dense.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_training_pre_activations_match_the_centred_form_values_and_gradients() -> None:
    """Training folds b_dec into the encoder bias (no input gradient of the big matmul): the
    pre-activations and every parameter gradient equal those of (x - b_dec) @ W_enc + b_enc."""
    sae = randomize_(create_sae(TopKConfig(d_in=24, d_sae=96, k=6), seed=0))
    x = torch.randn(50, 24, generator=torch.Generator().manual_seed(2))
    g = torch.randn(50, 96, generator=torch.Generator().manual_seed(3))
    fast = sae.pre_acts(x)  # grad enabled, x is data: the folded-bias path
    (fast * g).sum().backward()
    grads = {n: p.grad.clone() for n, p in sae.named_parameters() if p.grad is not None}
    sae.zero_grad()
    reference = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    (reference * g).sum().backward()
    torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-5)
    assert {"W_enc", "b_enc", "b_dec"} <= set(grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, dict(sae.named_parameters())[name].grad, rtol=1e-4, atol=1e-5, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(sae.pre_acts(x), reference.detach(), rtol=1e-5, atol=1e-5)


# The sparse encoder backward of TopK, BatchTopK and Matryoshka: test_sae_architectures.py.


def test_batchtopk_training_keeps_k_times_batch_and_inference_is_per_sample() -> None:
    cfg = BatchTopKConfig(d_in=16, d_sae=64, k=4)
    sae = randomize_(create_sae(cfg, seed=0))
    x = torch.randn(50, 16, generator=torch.Generator().manual_seed(2))

    sae.train()
    f_train = sae.encode(x)
    assert int((f_train != 0).sum()) <= 4 * 50
    assert (f_train != 0).sum(dim=1).float().std() > 0  # per-sample counts vary

    sae.eval()
    sae.threshold.fill_(0.4)
    f = sae.encode(x)
    pre = torch.relu(sae.pre_acts(x))
    torch.testing.assert_close(f, pre * (pre > 0.4))
    # Batch-independent: the same latents fire whatever the batch; values agree up to the float
    # rounding of a 1-row versus a 50-row matmul.
    one_by_one = torch.cat([sae.encode(x[i : i + 1]) for i in range(50)])
    assert torch.equal(f != 0, one_by_one != 0)
    torch.testing.assert_close(f, one_by_one)
    assert torch.equal(sae.encode(x[:7]) != 0, f[:7] != 0)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_inputs_with_leading_dimensions(arch: str) -> None:
    sae = randomize_(create_sae(small_cfg(arch), seed=0)).eval()
    x = torch.randn(3, 5, 16)  # e.g. (examples, positions, d_in)
    x_hat, f = sae(x)
    assert x_hat.shape == (3, 5, 16) and f.shape == (3, 5, 48)
    torch.testing.assert_close(x_hat[1], sae(x[1])[0])
    torch.testing.assert_close(sae.encode(x), f)


def test_batchtopk_threshold_gives_about_k_at_inference() -> None:
    _, x = make_dictionary_data(n=4096, seed=0)
    cfg = BatchTopKConfig(d_in=32, d_sae=64, k=3, dead_after=2000)
    result = train_sae(cfg, batches_of(x, 256), max_steps=200, lr=3e-3, progress=False)
    l0 = evaluate_sae(result.sae, x)["l0"]
    assert 1.5 <= l0 <= 4.5, l0


def test_topk_loss_sparse_path_skips_dense_codes_but_counts_l0() -> None:
    sae = create_sae(TopKConfig(d_in=8, d_sae=32, k=3), seed=0)
    out = sae.loss(torch.randn(10, 8))
    assert set(out) >= {"loss", "mse", "recon", "sparsity", "aux", "l0", "dead_fraction"}
    assert float(out["l0"]) <= 3 and float(out["sparsity"]) == 0
    torch.testing.assert_close(out["mse"], out["recon"] / 8)


def test_jumprelu_threshold_gets_straight_through_gradient() -> None:
    cfg = JumpReLUConfig(d_in=8, d_sae=16, bandwidth=10.0, threshold_init=0.1)  # wide kernel
    sae = create_sae(cfg, seed=0)
    sae.loss(torch.randn(32, 8))["loss"].backward()
    assert sae.log_threshold.grad is not None and sae.log_threshold.grad.abs().sum() > 0


def test_relu_penalty_is_l1_weighted_by_decoder_norms() -> None:
    cfg = ReLUConfig(d_in=8, d_sae=16, l1_coeff=2.0, aux_coeff=0.0)
    sae = randomize_(create_sae(cfg, seed=0))
    x = torch.randn(5, 8)
    f = sae.encode(x)
    expected = 2.0 * (f * sae.W_dec.norm(dim=1)).sum(dim=1).mean()
    torch.testing.assert_close(sae.loss(x)["sparsity"], expected.detach())


# ------------------------------------------------------------------------------ dead latents


def test_dead_latent_counters_and_auxk_train_only_dead_latents() -> None:
    cfg = TopKConfig(d_in=8, d_sae=32, k=2, dead_after=20, aux_k=4, aux_coeff=1.0)
    sae = create_sae(cfg, seed=0)
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    out = sae.loss(x, update_stats=True)
    fired = torch.zeros(32, dtype=torch.bool)
    fired[sae.encode_sparse(x)[1].flatten()] = True
    assert torch.equal(sae.samples_since_fired, torch.where(fired, 0, 16))
    assert float(out["aux"]) == 0  # nobody was dead before this batch

    sae.loss(x, update_stats=True)  # 32 samples without firing >= dead_after
    dead = sae.dead_mask()
    assert torch.equal(dead, ~fired) and float(sae.loss(x)["dead_fraction"]) == pytest.approx(
        float(dead.float().mean())
    )

    sae.zero_grad()
    x_hat, _ = sae(x)
    aux = sae.aux_loss(x, (x - x_hat).detach(), dead)
    assert 0 < aux.item()
    aux.backward()
    dec_grad = sae.W_dec.grad.abs().sum(dim=1)  # (d_sae,)
    enc_grad = sae.W_enc.grad.abs().sum(dim=0)
    assert (dec_grad[~dead] == 0).all() and (enc_grad[~dead] == 0).all()
    assert dec_grad[dead].sum() > 0
    assert sae.b_dec.grad is None or (sae.b_dec.grad == 0).all()


def test_training_history_tracks_dead_fraction() -> None:
    _, x = make_dictionary_data(n=2048, seed=0)
    # Far more latents than atoms: most must die, and the history must show it.
    cfg = TopKConfig(d_in=32, d_sae=256, k=3, dead_after=512)
    result = train_sae(cfg, batches_of(x, 128), max_steps=100, lr=1e-2, progress=False)
    assert result.history["dead_fraction"].iloc[0] == 0
    assert result.history["dead_fraction"].iloc[-1] > 0.3
    assert result.history["aux"].iloc[-1] > 0


# -------------------------------------------------------------------------------------- metrics


def _identity_relu_sae() -> SparseAutoencoder:
    """x = ReLU(x) - ReLU(-x): latents 0-3 carry the positive parts, 4-7 the negative ones."""
    sae = create_sae(ReLUConfig(d_in=4, d_sae=8, normalize="none"), seed=0)
    eye = torch.eye(4)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))  # (4, 8)
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))  # (8, 4)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def test_metrics_of_a_perfect_reconstruction() -> None:
    sae = _identity_relu_sae()
    x = torch.tensor([[1.0, 2.0, 0.0, 3.0], [0.5, 0.0, 0.0, 1.0], [2.0, 1.0, 4.0, 0.0]])  # >= 0
    m = evaluate_sae(sae, [x[:2], x[2:]])
    assert m["mse"] == 0 and m["explained_variance"] == 1
    assert m["l0"] == pytest.approx((3 + 2 + 3) / 3)
    assert m["dead_fraction"] == 0.5  # the negative-part latents never fire on x >= 0
    assert m["n_samples"] == 3


def test_metrics_of_predicting_the_mean() -> None:
    sae = create_sae(ReLUConfig(d_in=3, d_sae=4, normalize="none"), seed=0)
    x = torch.tensor([[1.0, 0.0, 2.0], [3.0, 2.0, 2.0], [2.0, 4.0, 5.0], [2.0, 2.0, 3.0]])
    with torch.no_grad():
        sae.W_dec.zero_()
        sae.b_dec.copy_(x.mean(dim=0))
    m = evaluate_sae(sae, x)
    assert m["explained_variance"] == pytest.approx(0.0, abs=1e-12)
    assert m["mse"] == pytest.approx(float(((x - x.mean(dim=0)) ** 2).mean()), rel=1e-6)


# --------------------------------------------------------------------------------- determinism


def test_seeded_training_is_deterministic() -> None:
    cfg = TopKConfig(d_in=16, d_sae=64, k=4, dead_after=64)
    a, b, c = (quick_train(cfg, steps=30, seed=s) for s in (0, 0, 1))
    for name, tensor in a.state_dict().items():
        assert torch.equal(tensor, b.state_dict()[name]), name
    assert not torch.equal(a.W_dec, c.W_dec)


# ------------------------------------------------------------------------------ data handling


def test_one_shot_iterable_stops_when_exhausted_and_callable_repeats() -> None:
    cfg = TopKConfig(d_in=8, d_sae=16, k=2)
    arrays = [np.random.default_rng(i).normal(size=(10, 8)).astype("float32") for i in range(5)]
    with pytest.warns(UserWarning, match="ran out after 5 steps"):
        once = train_sae(cfg, iter(arrays), max_steps=12, progress=False)
    assert once.steps == 5
    repeated = train_sae(cfg, lambda: iter(arrays), max_steps=12, progress=False)
    assert repeated.steps == 12


def test_result_save_writes_sae_history_and_provenance(tmp_path: Path) -> None:
    cfg = TopKConfig(d_in=8, d_sae=16, k=2)
    x = torch.randn(64, 8)
    result = train_sae(cfg, batches_of(x, 16), max_steps=6, seed=3, progress=False)
    result.save(tmp_path / "run")
    assert isinstance(load_sae(tmp_path / "run"), TopKSAE)
    info = json.loads((tmp_path / "run" / "train.json").read_text())
    assert info["params"]["seed"] == 3 and info["steps"] == 6
    assert info["normalization"]["method"] == "scalar"
    assert (tmp_path / "run" / "history.csv").read_text().startswith("step,loss")


# ------------------------------------------------------------------------------------ registry


def test_registry_lists_architectures_and_accepts_new_ones() -> None:
    assert set(ARCHITECTURES) <= set(available_saes())

    @dataclasses.dataclass(kw_only=True)
    class AbsConfig(SAEConfig):
        pass

    @register_sae("test-abs")
    class AbsSAE(SparseAutoencoder):
        config_class = AbsConfig

        def _encode(self, x: torch.Tensor) -> torch.Tensor:
            return self.pre_acts(x).abs()

    try:
        sae = create_sae({"architecture": "test-abs", "d_in": 4, "d_sae": 8})
        assert isinstance(sae, AbsSAE) and sae.cfg.architecture == "test-abs"
        assert sae(torch.randn(2, 4))[1].shape == (2, 8)
    finally:
        del SAE_REGISTRY["test-abs"]


# -------------------------------------------------------------------------------------- errors


def test_wrong_feature_dimension_is_named() -> None:
    cfg = TopKConfig(d_in=32, d_sae=64, k=4)
    with pytest.raises(ShapeError, match=r"d_in=32, got 31"):
        train_sae(cfg, [torch.randn(8, 31)], max_steps=2, progress=False)
    with pytest.raises(ShapeError, match=r"d_in=32.*\(5, 30\)"):
        create_sae(cfg)(torch.randn(5, 30))


def test_nan_in_a_batch_names_the_batch_index() -> None:
    cfg = TopKConfig(d_in=8, d_sae=16, k=2)
    batches = [torch.randn(4, 8) for _ in range(6)]
    batches[4][2, 1] = float("nan")  # after the batches peeked for normalisation: fails mid-training
    with pytest.raises(NonFiniteError, match=r"batch 4 .*1 NaN"):
        train_sae(cfg, batches, max_steps=10, norm_batches=2, progress=False)
    batches[1][0, 0] = float("inf")  # inside the peeked batches
    with pytest.raises(NonFiniteError, match=r"batch 1 "):
        train_sae(cfg, batches, max_steps=10, norm_batches=2, progress=False)


def test_unknown_architecture_lists_registered_ones() -> None:
    with pytest.raises(ConfigError, match=r"'topkk'.*did you mean 'topk'.*batchtopk, jumprelu, matryoshka, relu, topk"):
        sae_config("topkk", d_in=4, d_sae=8)
    with pytest.raises(ConfigError, match="registered"):
        create_sae({"architecture": "transcoder", "d_in": 4, "d_sae": 8})


@pytest.mark.parametrize(
    ("arch", "fields", "named"),
    [
        ("topk", {"k": 0}, "TopKConfig.k"),
        ("topk", {"k": 100}, "TopKConfig.k"),
        ("batchtopk", {"k": 2.5}, "BatchTopKConfig.k"),
        ("relu", {"l1_coeff": -1.0}, "ReLUConfig.l1_coeff"),
        ("jumprelu", {"bandwidth": 0.0}, "JumpReLUConfig.bandwidth"),
        ("relu", {"normalize": "zscore"}, "ReLUConfig.normalize"),
        ("topk", {"d_in": 0}, "TopKConfig.d_in"),
        ("topk", {"dead_after": -5}, "TopKConfig.dead_after"),
        ("topk", {"colour": "red"}, "colour"),
    ],
)
def test_invalid_config_value_names_the_field(arch: str, fields: dict[str, object], named: str) -> None:
    base: dict[str, object] = {"d_in": 8, "d_sae": 16}
    with pytest.raises(ConfigError, match=named):
        sae_config(arch, **{**base, **fields})


def test_invalid_training_argument_names_it() -> None:
    cfg = TopKConfig(d_in=8, d_sae=16, k=2)
    with pytest.raises(ConfigError, match="max_steps"):
        train_sae(cfg, [torch.randn(4, 8)], max_steps=0, progress=False)
    with pytest.raises(ConfigError, match="lr"):
        train_sae(cfg, [torch.randn(4, 8)], max_steps=1, lr=-1.0, progress=False)
