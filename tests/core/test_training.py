"""The shared Lightning fit and learning-rate schedule of the domains' default models."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from sciscope.core.training import fit_lightning, loss_module, warmup_cosine


def test_warmup_then_cosine_to_the_floor() -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = warmup_cosine(opt, warmup=10, total=100, floor=0.1)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)  # linear warmup over 10 steps
    assert all(a >= b - 1e-12 for a, b in zip(lrs[10:], lrs[11:]))  # then never rises
    assert lrs[-1] == pytest.approx(0.1, abs=0.01)
    short = warmup_cosine(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), warmup=100, total=20)
    assert short.lr_lambdas[0](3) == pytest.approx(1.0)  # warmup capped at total // 5 = 4 steps


def test_fit_lightning_runs_max_steps_and_learns() -> None:
    torch.manual_seed(0)
    X = torch.randn(256, 4)
    y = X @ torch.tensor([1.0, -2.0, 0.5, 3.0])

    class Regression(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(4, 1)
            self.steps = 0

        def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
            self.steps += 1
            xb, yb = batch
            return torch.nn.functional.mse_loss(self.lin(xb).squeeze(-1), yb)

        def configure_optimizers(self):  # noqa: ANN201
            opt = torch.optim.Adam(self.parameters(), lr=0.05)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": warmup_cosine(opt, warmup=5, total=150), "interval": "step"}}

    module = Regression()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=32, shuffle=True)
    seconds = fit_lightning(module, loader, max_steps=150)
    assert module.steps == 150 and seconds > 0
    with torch.no_grad():
        assert torch.nn.functional.mse_loss(module.lin(X).squeeze(-1), y) < 0.05


def test_loss_module_learns_and_logs_the_loss_with_extras() -> None:
    torch.manual_seed(0)
    X = torch.randn(256, 4)
    y = X @ torch.tensor([1.0, -2.0, 0.5, 3.0])
    lin = torch.nn.Linear(4, 1)

    def loss_fn(batch):  # noqa: ANN001, ANN202
        xb, yb = batch
        err = lin(xb).squeeze(-1) - yb
        return err.pow(2).mean(), {"mae": err.abs().mean()}

    module = loss_module(lin, loss_fn, lr=0.05, steps=120, warmup=5, weight_decay=0.0)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=32, shuffle=True)
    fit_lightning(module, loader, max_steps=120)
    assert [row["step"] for row in module.history] == [0, 25, 50, 75, 100, 119]
    assert set(module.history[0]) == {"step", "loss", "mae"}
    assert module.history[-1]["loss"] < 0.05 * module.history[0]["loss"]
    with torch.no_grad():
        assert torch.nn.functional.mse_loss(lin(X).squeeze(-1), y) < 0.05
