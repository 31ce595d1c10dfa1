"""Splicing a reconstruction into the model: loss recovered, KL, the hook leaves nothing behind."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sciscope.core import count_hooks
from sciscope.core.fidelity import TaskLoss, fidelity, pca_reconstruction, sae_reconstruction, splice
from sciscope.core.sae import create_sae, sae_config
from sciscope.core.sites import Site

torch.manual_seed(0)
X = torch.randn(128, 4)
Y = (X[:, 0] > 0).long() + (X[:, 1] > 0).long()


def _model() -> nn.Module:
    """A small MLP trained for a moment on the task, so that its hidden layer matters to it."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(60):
        opt.zero_grad()
        F.cross_entropy(model(X), Y).backward()
        opt.step()
    return model.eval().requires_grad_(False)


TASK = TaskLoss(lambda m: float(F.cross_entropy(m(X), Y)), "cross-entropy",
                log_probs=lambda m: F.log_softmax(m(X), -1))


def test_the_splice_hook_changes_nothing_after_the_block_and_identity_changes_nothing_inside():
    model = _model()
    before = model(X).detach().clone()
    with splice(model, "1", lambda h: h):
        assert count_hooks(model) == 1
        assert torch.equal(model(X), before)
    with splice(model, "1", torch.zeros_like):
        assert not torch.equal(model(X), before)
    assert count_hooks(model) == 0 and torch.equal(model(X), before)


def test_loss_recovered_is_one_for_a_perfect_reconstruction_and_zero_for_the_zero_ablation():
    table = fidelity(_model(), "1", TASK, {"perfect": lambda h: h.clone(), "zeros": torch.zeros_like}).set_index("condition")
    assert table.loss_recovered["perfect"] == pytest.approx(1.0, abs=1e-9)
    assert table.loss_recovered["zeros"] == pytest.approx(0.0, abs=1e-9)
    assert table.loss_recovered["zero_ablation"] == pytest.approx(0.0, abs=1e-9)
    assert table.loss_recovered_vs_mean["perfect"] == pytest.approx(1.0, abs=1e-9)
    assert table.loss_recovered_vs_mean["mean_ablation"] == pytest.approx(0.0, abs=1e-9)
    assert table.kl["perfect"] == pytest.approx(0.0, abs=1e-7) and table.kl["zeros"] > 1e-3
    assert table.loss["zero_ablation"] > table.loss["clean"]  # the site matters to the task


def test_pca_ranks_between_the_ablations_and_full_rank_is_perfect():
    model = _model()
    rows = model[:2](X).detach().numpy()  # (128, 16) activations at the site
    recon = {f"pca{k}": pca_reconstruction(rows, k) for k in (0, 2, 16)}
    table = fidelity(model, "1", TASK, recon).set_index("condition")
    assert table.loss_recovered["pca16"] == pytest.approx(1.0, abs=1e-4)
    # zero components: every vector becomes the rows' mean, i.e. mean ablation
    assert table.loss["pca0"] == pytest.approx(table.loss["mean_ablation"], rel=1e-4)
    assert table.loss_recovered["pca0"] <= table.loss_recovered["pca2"] <= table.loss_recovered["pca16"] + 1e-6


def test_an_sae_reconstruction_is_spliced_as_decode_of_encode():
    model = _model()
    sae = create_sae(sae_config("topk", d_in=16, d_sae=32, k=4), seed=0)
    table = fidelity(model, "1", TASK, {"sae": sae_reconstruction(sae)}).set_index("condition")
    h = model[:2](X)
    with torch.no_grad():
        by_hand = float(F.cross_entropy(model[2](sae.decode(sae.encode(h))), Y))
    assert table.loss["sae"] == pytest.approx(by_hand, rel=1e-5)


def test_a_layout_site_and_a_positions_subset():
    class Conv(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(2, 3, 1)
            self.head = nn.Linear(3 * 4 * 4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.conv(x).flatten(1))

    torch.manual_seed(2)
    model, x = Conv().eval(), torch.randn(8, 2, 4, 4)
    task = TaskLoss(lambda m: float(m(x).pow(2).mean()), "mse")
    site = Site("conv", layout="b c h w")
    table = fidelity(model, site, task, {"identity": lambda h: h}).set_index("condition")
    assert table.loss["identity"] == pytest.approx(table.loss["clean"], rel=1e-6)
    # zeroing one of the 16 positions changes the output only through that position's head weights
    with splice(model, site, torch.zeros_like, positions=[0]):
        one = model(x)
    feats = model.conv(x).detach()
    feats[:, :, 0, 0] = 0
    assert torch.allclose(one, model.head(feats.flatten(1)), atol=1e-6)


def test_a_task_that_never_reaches_the_site_is_an_error():
    from sciscope.core.errors import ShapeError

    task = TaskLoss(lambda m: 0.0, "nothing")
    with pytest.raises(ShapeError, match="never reached"):
        fidelity(_model(), "1", task, {})


def test_mean_ablation_uses_the_mean_over_the_task_examples():
    model = _model()
    mean = model[:2](X).mean(0).detach()
    table = fidelity(model, "1", TASK, {"by_hand": lambda h: mean.expand_as(h)}).set_index("condition")
    assert table.loss["by_hand"] == pytest.approx(table.loss["mean_ablation"], rel=1e-5)
    assert np.isfinite(table.loss_recovered).all()


def test_token_prediction_task_scores_masked_and_next_token_positions():
    from transformers import GPT2Config, GPT2LMHeadModel

    from sciscope.core.fidelity import TokenPredictionTask

    torch.manual_seed(3)
    lm = GPT2LMHeadModel(GPT2Config(vocab_size=20, n_embd=16, n_layer=2, n_head=2, n_positions=16)).eval()
    ids = torch.randint(0, 20, (4, 6))
    attention = torch.ones_like(ids)
    attention[0, 4:] = 0  # a padded row: its last two positions are not scored
    targets = attention[:, 1:].bool()
    task = TokenPredictionTask([({"input_ids": ids, "attention_mask": attention}, targets, ids[:, 1:][targets])],
                               causal=True, name="next-token cross-entropy")
    with torch.no_grad():
        logits = lm(input_ids=ids, attention_mask=attention).logits[:, :-1]
    by_hand = float(F.cross_entropy(logits[targets], ids[:, 1:][targets]))
    assert task.n_targets == 4 * 5 - 2 and task.loss(lm) == pytest.approx(by_hand, rel=1e-5)
    assert task.log_probs(lm).shape == (18, 20)
    table = fidelity(lm, "transformer.h.0", task.task_loss(), {"identity": lambda h: h}).set_index("condition")
    assert table.loss_recovered["identity"] == pytest.approx(1.0, abs=1e-6) and table.kl["identity"] < 1e-6


def test_mean_ablation_of_some_positions_puts_back_their_own_mean():
    class Sum(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Identity()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.embed(x)[:, 0].sum(-1)  # only position 0 counts

    x = torch.randn(16, 3, 4)
    x[:, 0] += 5.0  # position 0 differs from the others
    task = TaskLoss(lambda m: float(m(x).mean()), "sum of position 0")
    table = fidelity(Sum(), "embed", task, {}, positions=[0]).set_index("condition")
    assert table.loss["mean_ablation"] == pytest.approx(float(x[:, 0].sum(-1).mean()), rel=1e-5)


def test_mean_ablation_averages_valid_positions_only_not_padding():
    """Padding (attention_mask 0) is no position the model reads: its vectors stay out of the site
    mean, as capture leaves them out of pooling. Here they are planted far away, so a mean that
    counts them would be off by hundreds."""
    class MaskedMean(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Identity()

        def forward(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            h = self.embed(x)
            w = attention_mask.unsqueeze(-1).to(h.dtype)
            return (h * w).sum(1) / w.sum(1)  # (B, D): mean over the real positions only

    torch.manual_seed(4)
    x = torch.randn(8, 5, 3)
    attention = torch.ones(8, 5, dtype=torch.long)
    attention[:4, 3:] = 0  # right padding in half of the rows
    attention[0, 1:] = 0
    x[attention == 0] = 1000.0
    task = TaskLoss(lambda m: float(m(x, attention_mask=attention).pow(2).sum(-1).mean()), "squared norm of the mean")
    model = MaskedMean()
    table = fidelity(model, "embed", task, {}).set_index("condition")
    valid_mean = x[attention.bool()].mean(0)  # every real position of every row
    assert table.loss["mean_ablation"] == pytest.approx(float(valid_mean.pow(2).sum()), rel=1e-5)
    assert table.loss["mean_ablation"] < 10.0  # the planted padding (1000s) is not in it
    assert count_hooks(model) == 0  # the hook reading the mask is gone too
