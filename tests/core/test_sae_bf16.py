"""bf16-mixed SAE training: it learns what fp32 learns, its shortcuts are exact where they claim to be,
its custom backward has the gradients of the plain formula, and fp32 training is left as it was."""

from __future__ import annotations

import inspect
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F

import sciscope.core.sae.topk as topk_module
from sciscope.core.sae import create_sae, evaluate_sae, sae_config, train_sae
from sciscope.core.sae.topk import sparse_affine, topk_pruned
from tests.core.test_sae import batches_of, make_dictionary_data, randomize_

# d_sae 256 = 32 strided groups of 8 >= 2k: the pruned top k applies to bf16 codes.
D_IN, D_SAE, K = 32, 256, 4


def planted(n: int, seed: int) -> torch.Tensor:
    """Positive combinations of 3 of 64 unit atoms in 32 dims, plus small noise: (n, 32)."""
    _, x = make_dictionary_data(n=n, d_in=D_IN, n_atoms=64, seed=seed)
    return x + 0.01 * torch.randn(x.shape, generator=torch.Generator().manual_seed(100 + seed))


class Calls:
    """Wraps a function and counts its calls."""

    def __init__(self, fn: Any) -> None:
        self.fn, self.n = fn, 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.n += 1
        return self.fn(*args, **kwargs)


@pytest.fixture
def spies(monkeypatch: pytest.MonkeyPatch) -> dict[str, Calls]:
    """Count the bf16-only shortcuts of core/sae/topk.py and the gradient clipping."""
    out = {
        "topk_pruned": Calls(topk_module.topk_pruned),
        "csr_grad": Calls(topk_module._latent_major_grad),
        "clip": Calls(torch.nn.utils.clip_grad_norm_),
    }
    monkeypatch.setattr(topk_module, "topk_pruned", out["topk_pruned"])
    monkeypatch.setattr(topk_module, "_latent_major_grad", out["csr_grad"])
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", out["clip"])
    return out


class OptimizerSpy(L.Callback):
    """Records whether the trainer's Adam is the fused kernel."""

    fused: Any = "unset"

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.fused = trainer.optimizers[0].defaults.get("fused")


# ------------------------------------------------------------------------------------ training


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_bf16_mixed_learns_the_planted_dictionary_as_fp32_does(arch: str, spies: dict[str, Calls]) -> None:
    """Same data, seed and steps: held-out explained variance of bf16-mixed within 0.01 of fp32's
    (fp32 above 0.75: measured 0.82 for BatchTopK, with bf16 at 0.819; an untrained SAE is far
    below); the weights stay fp32; the bf16 run went through the low-precision shortcuts, fused Adam and the gradient clipping on every step, and
    the fp32 run through none of the shortcuts."""
    x, x_test = planted(8192, seed=0), planted(2048, seed=1)
    cfg = sae_config(arch, d_in=D_IN, d_sae=D_SAE, k=K, dead_after=4096)
    ev, used = {}, {}
    for precision in ("32-true", "bf16-mixed"):
        for s in spies.values():
            s.n = 0
        opt = OptimizerSpy()
        result = train_sae(cfg, batches_of(x, 256), max_steps=200, lr=3e-3, seed=0, precision=precision,
                           progress=False, trainer_kwargs={"callbacks": [opt]})
        assert result.steps == 200
        assert all(p.dtype == torch.float32 for p in result.sae.parameters()), precision
        ev[precision] = evaluate_sae(result.sae, x_test)["explained_variance"]
        used[precision] = {name: s.n for name, s in spies.items()} | {"fused_adam": opt.fused}
    untrained = evaluate_sae(create_sae(cfg, seed=0), x_test)["explained_variance"]
    assert ev["32-true"] > 0.75 and untrained < 0.5, (ev, untrained)
    assert abs(ev["bf16-mixed"] - ev["32-true"]) < 0.01, ev
    bf, fp = used["bf16-mixed"], used["32-true"]
    assert bf["csr_grad"] == 200 and bf["clip"] == 200 and bf["fused_adam"] is True, bf
    assert bf["topk_pruned"] >= (200 if arch == "topk" else 0), bf  # BatchTopK selects over the batch
    assert fp["csr_grad"] == 0 and fp["topk_pruned"] == 0 and not fp["fused_adam"], fp


def test_bf16_mixed_respects_the_gradient_clip() -> None:
    """Fused Adam under bf16-mixed still clips (Lightning refuses to for fused optimisers, so the
    module clips itself): with a tiny clip the weights move about lr per step at most, as Adam's
    step size is bounded by lr either way, but the first moment is built from clipped gradients,
    so compare against a run without clipping to see that the clip changed the trajectory."""
    x = planted(2048, seed=0)
    cfg = sae_config("topk", d_in=D_IN, d_sae=D_SAE, k=K)
    weights = {}
    for clip in (None, 1e-6):
        result = train_sae(cfg, batches_of(x, 256), max_steps=5, lr=1e-2, seed=0, precision="bf16-mixed",
                           grad_clip=clip, progress=False)
        weights[clip] = result.sae.W_enc.detach().clone()
    assert not torch.equal(weights[None], weights[1e-6])


# ------------------------------------------------------------------------------ pruned top k


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("ties", [False, True])
def test_topk_pruned_has_the_values_of_torch_topk(dtype: torch.dtype, ties: bool) -> None:
    """Sorted values equal torch.topk's exactly, every index points at its value, no index twice;
    with heavy ties (values on a grid of 9) and with top entries crowded into one strided group."""
    g = torch.Generator().manual_seed(0)
    pre = torch.randn(300, 512, generator=g)
    if ties:
        pre = (pre * 2).round() / 2  # (300, 512) on {-2, -1.5, ..., 2}: many equal maxima
    pre[0, ::64] = 10 + torch.arange(8.0)  # row 0: its top 8 all in strided group 0 (m = 64)
    pre = pre.to(dtype)
    vals, idx = topk_pruned(pre, 12)
    ref = pre.topk(12, dim=-1).values
    assert torch.equal(vals.sort(dim=-1, descending=True).values, ref)
    assert torch.equal(pre.gather(1, idx), vals)
    assert (idx.sort(dim=-1).values.diff(dim=-1) > 0).all()


def test_topk_selection_is_torch_topk_for_fp32_and_pruned_for_bf16() -> None:
    """fp32 codes keep torch.topk (bit-for-bit the same output as before); bf16 codes take the pruned search."""
    sae = create_sae(sae_config("topk", d_in=D_IN, d_sae=D_SAE, k=K), seed=0)
    pre = torch.randn(64, D_SAE, generator=torch.Generator().manual_seed(3))
    vals, idx, _ = sae._select(pre)
    ref_vals, ref_idx = pre.topk(K, dim=-1, sorted=False)
    assert torch.equal(vals, ref_vals) and torch.equal(idx, ref_idx)
    vals16, idx16, _ = sae._select(pre.bfloat16())
    assert torch.equal(vals16.sort(dim=-1).values, pre.bfloat16().topk(K, dim=-1).values.sort(dim=-1).values)


# -------------------------------------------------------------------------- custom backward


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
@pytest.mark.parametrize("input_needs_grad", [False, True])
def test_sparse_backward_under_bf16_autocast_matches_autograd(arch: str, input_needs_grad: bool) -> None:
    """Under bf16 autocast the sparse encoder's gradients (weights, bias, inputs) are fp32 and equal
    plain autograd of the same formula -- the bf16 ``addmm`` with the kept entries gathered -- within
    bf16 tolerance (1 %).  Autograd runs the weight gradient as a dense bf16 matmul, the sparse
    backward as an fp32 CSR product: only rounding separates them."""
    sae = randomize_(create_sae(sae_config(arch, d_in=D_IN, d_sae=D_SAE, k=K), seed=0))
    select = sae._select if arch == "topk" else sae._batch_topk
    g = torch.Generator().manual_seed(5)
    inputs = torch.randn(96, D_IN, generator=g).requires_grad_(input_needs_grad)
    W = sae.W_enc.detach().clone().requires_grad_()  # (d_in, d_sae) fp32 master weights
    bias = sae.b_enc.detach().clone().requires_grad_()
    weights = torch.randn(96 * K, generator=g)  # what the loss multiplies each kept entry by

    def loss_of(vals: torch.Tensor) -> torch.Tensor:
        return (vals.float().reshape(-1) * weights).sum() + vals.float().pow(2).sum()

    with torch.autocast("cpu", dtype=torch.bfloat16):
        vals, idx, offsets = sparse_affine(inputs, W, bias, select)
        assert vals.dtype == torch.bfloat16
        loss_of(vals).backward()
        ours = {"W": W.grad.clone(), "bias": bias.grad.clone()}
        if input_needs_grad:
            ours["inputs"] = inputs.grad.clone()
        W.grad = bias.grad = inputs.grad = None
        pre = torch.addmm(bias, inputs, W)  # (B, d_sae), bf16
        if offsets is None:
            ref_vals = pre.gather(1, idx)  # (B, k)
        else:
            rows = topk_module.bag_samples(offsets, idx.numel())
            ref_vals = pre[rows, idx]  # (n,)
        assert torch.equal(ref_vals, vals)  # the same entries, the same bf16 values
        loss_of(ref_vals).backward()
    ref = {"W": W.grad, "bias": bias.grad} | ({"inputs": inputs.grad} if input_needs_grad else {})
    for name, grad in ours.items():
        assert grad.dtype == torch.float32, name
        assert (grad != 0).any(), name
        err = (grad - ref[name]).norm() / ref[name].norm()
        assert err < 1e-2, (name, float(err))


# ------------------------------------------------------------------------------ fp32 default


def test_fp32_stays_the_default_and_unchanged() -> None:
    """``train_sae``'s default precision is fp32; the default run and an explicit ``"32-true"`` run
    give identical weights; and the fp32 encoder weight gradient is, to the bit, embedding_bag's
    backward (the formula fp32 training used before bf16 had its own path)."""
    assert inspect.signature(train_sae).parameters["precision"].default == "32-true"
    x = planted(1024, seed=0)
    cfg = sae_config("topk", d_in=D_IN, d_sae=D_SAE, k=K, dead_after=512)
    a = train_sae(cfg, batches_of(x, 256), max_steps=12, lr=3e-3, seed=0, progress=False)
    b = train_sae(cfg, batches_of(x, 256), max_steps=12, lr=3e-3, seed=0, precision="32-true", progress=False)
    for (name, p), q in zip(a.sae.state_dict().items(), b.sae.state_dict().values(), strict=True):
        assert torch.equal(p, q), name

    sae = randomize_(create_sae(cfg, seed=0))
    inputs = torch.randn(64, D_IN, generator=torch.Generator().manual_seed(2))
    W = sae.W_enc.detach().clone().requires_grad_()
    vals, idx, _ = sparse_affine(inputs, W, sae.b_enc.detach(), sae._select)
    grad_vals = torch.randn(vals.shape, generator=torch.Generator().manual_seed(4))
    vals.backward(grad_vals)
    table = torch.zeros(D_SAE, D_IN, requires_grad=True)
    F.embedding_bag(idx, table, per_sample_weights=grad_vals, mode="sum").backward(inputs)
    assert torch.equal(W.grad, table.grad.t())
