"""Every registered SAE architecture holds up: a planted dictionary is recovered, bf16-mixed training
matches fp32, Matryoshka's nested prefixes work on their own, and the sparse training paths give the
gradients of the plain formulas."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sciscope.core.errors import ConfigError
from sciscope.core.sae import (
    BatchTopKSAE,
    MatryoshkaConfig,
    MatryoshkaSAE,
    SAEConfig,
    SAETrainResult,
    SparseAutoencoder,
    available_saes,
    create_sae,
    evaluate_sae,
    load_sae,
    sae_config,
    sae_fields,
    train_sae,
)
from tests.core.test_sae import batches_of, best_cosines, make_dictionary_data, randomize_

ARCHITECTURES = available_saes()  # every registered one, so a new architecture must earn its case

# Fields per architecture on toy data (32-d, ~3 active atoms per sample).  ReLU's literature
# l1_coeff over-shrinks here and JumpReLU's default thresholds are sized for wide LM activations
# (see test_sae.RECOVERY_CASES).  Matryoshka's innermost level holds half the dictionary: the
# planted atoms are all equally frequent, so there is no coarse level smaller than the dictionary
# for it to learn.  With the default ladder (16, 32, 64, 128) the first latents learn blends of
# atoms: mean best cosine 0.93-0.95 over training seeds 0-3, against 0.97-0.98 with (64, 128).
CASES: dict[str, dict[str, object]] = {
    "relu": {"l1_coeff": 0.5},
    "topk": {"k": 3},
    "batchtopk": {"k": 3},
    "jumprelu": {"threshold_init": 0.5, "bandwidth": 0.1},
    "matryoshka": {"k": 3, "prefixes": [64, 128]},
    # plain batches train a transcoder as an autoencoder: a TopK SAE with its own input bias
    "topk_transcoder": {"k": 3},
}
D_IN, D_SAE, N_ATOMS = 32, 128, 64


def config(arch: str) -> SAEConfig:
    """The test config of ``arch``: 32 -> 128 latents plus its fields from CASES."""
    if arch not in CASES:
        pytest.fail(f"architecture {arch!r} is registered but has no case in CASES: add one")
    return sae_config(arch, d_in=D_IN, d_sae=D_SAE, dead_after=2000, **CASES[arch])


def planted(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """64 unit-norm atoms in 32 dims; samples = positive combinations of 3 atoms + small noise."""
    atoms, x = make_dictionary_data(n=n, d_in=D_IN, n_atoms=N_ATOMS, seed=seed)
    noise = 0.01 * torch.randn(x.shape, generator=torch.Generator().manual_seed(100 + seed))
    return atoms, x + noise  # (64, 32), (n, 32)


@functools.cache
def planted_run(arch: str) -> SAETrainResult:
    """One fp32 training run per architecture on the planted data, shared by the tests below."""
    _, x = planted(8192, seed=0)
    return train_sae(config(arch), batches_of(x, 256), max_steps=300, lr=1e-2, seed=0, progress=False)


# ----------------------------------------------------------------------- planted dictionary


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_planted_dictionary_is_recovered_by_every_architecture(arch: str) -> None:
    """Each true atom has a decoder row pointing its way (mean best cosine > 0.9); an untrained SAE
    of the same size, the control, does not (random directions in 32 dims: ~0.44)."""
    atoms, _ = planted(1, seed=0)
    trained = best_cosines(atoms, planted_run(arch).sae).mean()
    untrained = best_cosines(atoms, create_sae(config(arch), seed=0)).mean()
    assert trained > 0.9, f"{arch}: trained mean best cosine {trained:.3f}"
    assert untrained < 0.6, f"{arch}: the random-init control already reaches {untrained:.3f}"
    assert trained - untrained > 0.3


def _prefix_explained_variance(sae: SparseAutoencoder, x: torch.Tensor, m: int) -> float:
    """Explained variance of ``x`` (n, d_in) reconstructed from the first ``m`` latents only."""
    with torch.no_grad():
        f = sae.encode(x)  # (n, d_sae), inference codes
        f[:, m:] = 0
        err = (x - sae.decode(f)).pow(2).sum()
    return float(1 - err / (x - x.mean(dim=0)).pow(2).sum())


def test_matryoshka_inner_prefix_works_on_its_own_where_batchtopk_does_not() -> None:
    """The nested loss makes the first 64 latents a dictionary by themselves: alone, they explain
    most of the variance.  BatchTopK, trained the same way, scatters the atoms over all 128
    latents, so its first 64 are about half a dictionary (measured over seeds 0-2: 0.76-0.78 versus
    0.47-0.55)."""
    _, x_test = planted(2048, seed=1)
    m = CASES["matryoshka"]["prefixes"][0]  # type: ignore[index]
    ev = {a: _prefix_explained_variance(planted_run(a).sae, x_test, m) for a in ("matryoshka", "batchtopk")}
    assert ev["matryoshka"] > 0.7 and ev["matryoshka"] - ev["batchtopk"] > 0.15, ev


# --------------------------------------------------------------------------------- bf16-mixed


def smooth_data(n: int, seed: int) -> torch.Tensor:
    """Gaussian data with a decaying spectrum (0.85^i), rotated and offset: (n, 32).

    Dense rather than planted: the comparison is about precision, and here the reachable
    explained variance changes smoothly with the learned directions, so two runs that part ways
    (bf16 rounding changes which latents die and revive) still land on equal figures.
    """
    rotation, _ = torch.linalg.qr(torch.randn(D_IN, D_IN, generator=torch.Generator().manual_seed(1234)))
    z = torch.randn(n, D_IN, generator=torch.Generator().manual_seed(seed))
    return (z * 0.85 ** torch.arange(D_IN)) @ rotation.T + 1.0


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_bf16_mixed_training_matches_fp32(arch: str) -> None:
    """Same data, seed and steps under ``precision="bf16-mixed"`` and fp32: explained variance
    within 0.01, and the weights stay fp32 (autocast computes in bf16, the master copy is fp32)."""
    x, x_test = smooth_data(8192, seed=0), smooth_data(2048, seed=1)
    ev = {}
    for precision in ("32-true", "bf16-mixed"):
        data = batches_of(x, 256)
        result = train_sae(config(arch), data, max_steps=200, lr=3e-3, seed=0, precision=precision, progress=False)
        assert all(p.dtype == torch.float32 for p in result.sae.parameters())
        ev[precision] = evaluate_sae(result.sae, x_test)["explained_variance"]
    assert ev["32-true"] > 0.6, ev  # it learned
    assert abs(ev["bf16-mixed"] - ev["32-true"]) < 0.01, ev


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "matryoshka"])
def test_sparse_paths_and_auxk_run_under_autocast(arch: str) -> None:
    """Under bf16 autocast the codes are bf16 and the weights fp32: the sparse decode, the sparse
    encoder backward and the AuxK loss cast to the weights' dtype; gradients come out fp32 and close
    to fp32's."""
    sae = randomize_(create_sae(sae_config(arch, d_in=16, d_sae=64, k=4, aux_k=8, aux_coeff=1.0), seed=0))
    sae.samples_since_fired[::2] = sae.cfg.dead_after  # half the latents dead: AuxK runs
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(1))
    grads = {}
    for bf16 in (False, True):
        sae.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = sae.loss(x)
        assert out["aux"] > 0
        out["loss"].backward()
        grads[bf16] = {n: p.grad.clone() for n, p in sae.named_parameters()}
    for name, grad in grads[True].items():
        assert grad.dtype == torch.float32, name
        reference = grads[False][name]
        # relative to the whole gradient: bf16 rounding may flip a near-tie selection or two
        assert (grad - reference).norm() < 0.1 * reference.norm(), name


# ------------------------------------------------------------------------- sparse backward


def _dense_reference_loss(sae: SparseAutoencoder, x: torch.Tensor) -> torch.Tensor:
    """The training loss in plain autograd: dense codes, one error term per prefix (Matryoshka)."""
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc  # (B, d_sae)
    if isinstance(sae, BatchTopKSAE):  # the k * B largest of the batch
        flat = pre.relu().flatten()
        kept = flat.topk(sae.cfg.k * x.shape[0]).indices
        f = torch.zeros_like(flat).index_put((kept,), flat[kept]).view_as(pre)
    else:  # the k largest of each sample
        vals, idx = pre.topk(sae.cfg.k, dim=-1)
        f = torch.zeros_like(pre).scatter(1, idx, vals.relu())
    sizes = sae.cfg.prefix_sizes if isinstance(sae, MatryoshkaSAE) else (sae.cfg.d_sae,)
    return sum((x - (f[:, :m] @ sae.W_dec[:m] + sae.b_dec)).pow(2).sum(-1).mean() for m in sizes)


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "matryoshka"])
@pytest.mark.parametrize("input_needs_grad", [False, True])
def test_sparse_encoder_backward_equals_plain_autograd(arch: str, input_needs_grad: bool) -> None:
    """TopK, BatchTopK and Matryoshka train through one sparse encoder backward (it scatters the
    kept entries' gradient; no dense (B, d_sae) matmul): loss, every parameter gradient and the
    input gradient equal plain autograd of the dense formula (for Matryoshka, the sum of the
    prefixes' errors)."""
    extra = {"prefixes": [8, 40, 96]} if arch == "matryoshka" else {}
    sae = randomize_(create_sae(sae_config(arch, d_in=24, d_sae=96, k=6, aux_coeff=0.0, **extra), seed=0))
    x = torch.randn(50, 24, generator=torch.Generator().manual_seed(2)).requires_grad_(input_needs_grad)
    loss = sae.loss(x)["loss"]
    loss.backward()
    grads = {n: p.grad.clone() for n, p in sae.named_parameters()}
    x_grad = x.grad.clone() if input_needs_grad else None
    sae.zero_grad()
    x.grad = None
    reference = _dense_reference_loss(sae, x)
    reference.backward()
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-5)
    assert (grads["W_enc"] != 0).any() and (grads["b_enc"] != 0).any()
    for name, p in sae.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-5, msg=name)
    if input_needs_grad:
        torch.testing.assert_close(x_grad, x.grad, rtol=1e-4, atol=1e-5)


# -------------------------------------------------------------------------------- Matryoshka


def test_matryoshka_prefix_reconstructions_are_masked_decodes() -> None:
    sae = randomize_(create_sae(MatryoshkaConfig(d_in=16, d_sae=48, k=5, prefixes=(6, 24, 48)), seed=0))
    x = torch.randn(20, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        vals, cols, offsets = sae._train_codes(x)
        x_hats = sae.prefix_reconstructions(vals, cols, offsets)  # (B, 3, d_in)
        sae.train()
        f = sae.encode(x)  # the same batch-level code, dense
    assert x_hats.shape == (20, 3, 16)
    for i, m in enumerate((6, 24, 48)):
        masked = torch.where(torch.arange(48) < m, f, 0)
        torch.testing.assert_close(x_hats[:, i], sae.decode(masked), rtol=1e-5, atol=1e-5)


def test_matryoshka_config_ladder_and_validation() -> None:
    assert MatryoshkaConfig(d_in=8, d_sae=4096).prefix_sizes == (512, 1024, 2048, 4096)
    assert MatryoshkaConfig(d_in=8, d_sae=4, k=2).prefix_sizes == (1, 2, 4)  # d_sae/8 rounds to 0: dropped
    cfg = sae_config("matryoshka", d_in=8, d_sae=64, prefixes=[16, 64])  # a list, as cfg.json gives it
    assert cfg.prefixes == (16, 64) == cfg.prefix_sizes
    assert "prefixes" in sae_fields("matryoshka") and "k" in sae_fields("matryoshka")
    for bad, says in [
        ([16, 32], "must end at d_sae=64"),
        ([32, 16, 64], "strictly increasing"),
        ([16, 16, 64], "strictly increasing"),
        ([0, 64], "integer >= 1"),
        ([8.5, 64], "integer >= 1"),
        ([True, 64], "integer >= 1"),
        ([], "non-empty"),
        ("16,64", "non-empty list"),
    ]:
        with pytest.raises(ConfigError, match=rf"MatryoshkaConfig\.prefixes.*{says}"):
            sae_config("matryoshka", d_in=8, d_sae=64, prefixes=bad)


@pytest.mark.parametrize("prefixes", [None, [4, 12, 48]])
def test_matryoshka_save_load_round_trip(prefixes: list[int] | None, tmp_path: Path) -> None:
    x = torch.randn(512, 16, generator=torch.Generator().manual_seed(7)) * 2 + 1
    cfg = sae_config("matryoshka", d_in=16, d_sae=48, k=4, dead_after=64, prefixes=prefixes)
    sae = train_sae(cfg, batches_of(x, 64), max_steps=20, lr=1e-2, progress=False).sae
    sae.save(tmp_path / "sae")
    saved = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert saved["architecture"] == "matryoshka" and saved["prefixes"] == prefixes
    loaded = load_sae(tmp_path / "sae")
    assert type(loaded) is type(sae) and loaded.cfg == sae.cfg
    assert float(sae.threshold) > 0
    assert torch.equal(load_file(tmp_path / "sae" / "sae.safetensors")["threshold"], sae.threshold)
    x_hat, f = sae(x[:33])
    x_hat2, f2 = loaded(x[:33])
    assert torch.equal(x_hat, x_hat2) and torch.equal(f, f2)
