"""A minimal adapter used to exercise the adapter contract before real domains exist."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pandas as pd
import torch
from torch import nn

from sciscope.core import DomainAdapter, Examples


class ToyAdapter(DomainAdapter):
    name = "toy"
    description = "Gaussian points with a planted class direction, read by a tiny MLP"
    default_config = {"n_examples": 32, "noise": 0.5, "seed": 0}

    def examples(self, split: str = "train") -> Examples:
        rng = np.random.default_rng(self.config["seed"] + (split == "test"))
        n = self.config["n_examples"]
        label = rng.integers(0, 2, n)
        x = rng.normal(scale=self.config["noise"], size=(n, 8)) + label[:, None]
        obs = pd.DataFrame({"label": label.astype(bool), "value": x[:, 0]})
        return Examples(obs=obs, inputs=x.astype(np.float32), concepts=["label", "value"])

    def model(self, spec: str | None = None) -> nn.Module:
        torch.manual_seed(self.config["seed"])
        return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))

    def batches(self, examples: Examples, model: nn.Module, *, batch_size: int = 32) -> Iterator[torch.Tensor]:
        x = torch.from_numpy(np.asarray(examples.inputs))
        for i in range(0, len(x), batch_size):
            yield x[i : i + batch_size]

    @property
    def sites(self) -> list[str]:
        return ["0", "hidden"]

    @property
    def aliases(self) -> dict[str, str]:
        return {"hidden": "1"}

    @property
    def concepts(self) -> list[str]:
        return ["label", "value"]

    @property
    def contrasts(self) -> dict[str, tuple[str, str]]:
        return {"label": ("label", "~label")}
