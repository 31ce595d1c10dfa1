"""``sciscope new-domain NAME``: write a working adapter skeleton, its test and its packaging.

The skeleton runs end to end at once (``sciscope run NAME`` from the same folder): its examples
are Gaussian points with a planted class direction and its model a small MLP trained in a second.
Replace the data and model with your science; keep the contract (see
:class:`sciscope.core.DomainAdapter`) and the conformance test passing.
"""

from __future__ import annotations

import json
import keyword
import os
import re
from pathlib import Path

from sciscope.core.errors import ConfigError
from sciscope.core.io import write_json, write_text

LOCAL_REGISTRY = "sciscope-domains.json"

ADAPTER_TEMPLATE = '''"""The {name} domain adapter (written by `sciscope new-domain {name}`; make it yours).

An adapter supplies data, a model, sites and concepts, and *declares* its experiments: steering
plans (an intervention + a scorer; the core runs every alpha and the random controls) and
analyses (run after a stage; outputs through the run context). It never loops over alphas or
builds paths into the run folder.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pandas as pd
import torch
from torch import nn

from sciscope.core import DomainAdapter, Examples
from sciscope.core.config import Key
from sciscope.core.context import RunContext
from sciscope.core.experiment import Analysis, Scorer, SteeringPlan
from sciscope.core.fidelity import TaskLoss
from sciscope.core.interventions import Clamp


class {cls}(DomainAdapter):
    name = "{name}"
    description = "{name}: replace with one line on your science (skeleton: planted 2-class points + MLP)"
    config_keys = {{
        "n_examples": Key(400, min=10, help="points to make"),
        "noise": Key(1.0, min=0.0),
        "seed": Key(0),
        "train_steps": Key(200, stage="model", min=1),
        "model": Key("", stage="model", help="unused by the skeleton: a user checkpoint would go here"),
    }}
    profiles = {{"quick": {{}}, "full": {{"n_examples": 4000}}}}
    test_config = {{"n_examples": 40}}

    # -- data ----------------------------------------------------------------------------------------
    def examples(self, split: str = "train") -> Examples:
        rng = np.random.default_rng(self.config["seed"])
        n = self.config["n_examples"]
        label = rng.integers(0, 2, n).astype(bool)
        x = rng.normal(scale=self.config["noise"], size=(n, 16)) + 1.5 * label[:, None] * np.linspace(1, 0, 16)
        obs = pd.DataFrame({{"label": label, "score": x[:, :4].sum(1),
                            "split": np.where(rng.random(n) < 0.75, "train", "test")}})
        keep = np.ones(n, dtype=bool) if split == "all" else (obs.split == split).to_numpy()
        return Examples(obs=obs[keep].reset_index(drop=True), inputs=x[keep].astype(np.float32), concepts=self.concepts)

    # -- model (trained once per config; the run context keeps it for later stages) ------------------
    def model(self, spec: str | None = None) -> nn.Module:
        key = {{k: self.config[k] for k in ("n_examples", "noise", "seed", "train_steps")}}
        return self.ctx.cached("mlp", key, self._train, save=lambda m, folder: torch.save(m.state_dict(), folder / "mlp.pt"),
                               load=self._load)

    def _net(self) -> nn.Module:
        return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 2))

    def _load(self, folder) -> nn.Module:
        net = self._net()
        net.load_state_dict(torch.load(folder / "mlp.pt", weights_only=True))
        return net.eval()

    def _train(self) -> nn.Module:
        torch.manual_seed(self.config["seed"])
        model = self._net()
        train = self.examples("train")
        x, y = torch.from_numpy(train.inputs), torch.from_numpy(train.obs.label.to_numpy()).long()
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(self.config["train_steps"]):
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return model.eval()

    def batches(self, examples: Examples, model: nn.Module, *, batch_size: int = 32) -> Iterator[torch.Tensor]:
        x = torch.from_numpy(np.asarray(examples.inputs))
        for i in range(0, len(x), batch_size):
            yield x[i : i + batch_size]

    # -- what to look at -----------------------------------------------------------------------------
    @property
    def sites(self) -> list[str]:
        return ["layer.0", "layer.1"]

    @property
    def aliases(self) -> dict[str, str]:
        # readable names for the MLP's module paths (the ReLU outputs of the hidden layers)
        return {{"layer.0": "1", "layer.1": "3"}}

    @property
    def concepts(self) -> list[str]:
        return ["label", "score"]

    @property
    def contrasts(self) -> dict[str, tuple[str, str]]:
        return {{"label": ("label", "~label")}}

    # -- experiments: declared here, run by the core with their controls ------------------------------
    def steering_scorer(self, ctx: RunContext, contrast: str) -> Scorer:
        """P(label) of each held-out point (per-point values: the core bootstraps intervals)."""
        test = self.examples("test")
        x = torch.from_numpy(np.asarray(test.inputs))

        def score(m: nn.Module) -> dict[str, np.ndarray]:
            with torch.no_grad():
                return {{"p(label)": torch.softmax(m(x), -1)[:, 1].numpy()}}

        return Scorer(score, target=["p(label)"])

    def steering_plans(self, ctx: RunContext) -> list[SteeringPlan]:
        plans = super().steering_plans(ctx)  # one delta-vector plan per scored contrast
        head = ctx.model()[4].weight.detach()  # the units of the last hidden layer that push "label" most
        units = (head[1] - head[0]).argsort(descending=True)[:4].tolist()
        plans.append(SteeringPlan("clamp_label_units", Clamp({{"4:input": units}}), self.steering_scorer(ctx, "label"),
                                  alphas=[1.0, 2.0, 4.0], n_controls=ctx.config["steer_n_random"], seed=ctx.seed))
        return plans

    def task_loss(self, ctx: RunContext) -> TaskLoss:
        """The model's own loss: the core splices the SAE back in and reports the loss recovered."""
        train = self.examples("train")
        x = torch.from_numpy(np.asarray(train.inputs))
        y = torch.as_tensor(train.obs.label.to_numpy(), dtype=torch.long)
        return TaskLoss(lambda m: float(nn.functional.cross_entropy(m(x), y)), "cross-entropy",
                        log_probs=lambda m: torch.log_softmax(m(x), -1))

    def analyses(self) -> list[Analysis]:
        return [Analysis("label_balance", "examples", self._label_balance)]

    def _label_balance(self, ctx: RunContext) -> list[dict]:
        obs = ctx.examples().obs
        table = obs.groupby("split").label.mean().rename("label_share").reset_index()
        source = ctx.write_table("label_balance.csv", table)
        return [{{"name": "share of label points", "value": float(obs.label.mean()), "source": source}}]
'''

TEST_TEMPLATE = '''"""Conformance test of the {name} adapter (written by `sciscope new-domain {name}`)."""

from sciscope.core.testing import check_adapter

from {package}.adapter import {cls}


def test_{name}_adapter_conforms(tmp_path):
    check_adapter({cls}({cls}.test_config), tmp_path)
'''

PYPROJECT_TEMPLATE = '''[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "{package}"
version = "0.1.0"
description = "sciscope domain adapter: {name}"
requires-python = ">=3.11"
dependencies = ["sciscope"]

[project.entry-points."sciscope.domains"]
{name} = "{package}.adapter:{cls}"

[tool.setuptools]
packages = ["{package}"]
'''


def write_skeleton(name: str, directory: str | os.PathLike[str] = ".") -> list[Path]:
    """Write ``<directory>/sciscope-<name>/`` (package, test, pyproject) and register it locally.

    The local registry ``sciscope-domains.json`` in the current folder lets ``sciscope run NAME``
    find the adapter at once; ``pip install -e <directory>/sciscope-<name>`` registers it for good
    through the ``sciscope.domains`` entry point.

    Returns
    -------
    list of Path
        The files written.
    """
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name) or keyword.iskeyword(name):
        raise ConfigError(f"domain name {name!r} must be a lowercase Python identifier (letters, digits, _)")
    package = f"sciscope_{name}"
    cls = "".join(part.capitalize() for part in name.split("_")) + "Adapter"
    root = Path(directory) / f"sciscope-{name}"
    if root.exists():
        raise ConfigError(f"{root} exists already; choose another name or --dir")
    fields = {"name": name, "package": package, "cls": cls}
    files = {
        root / package / "__init__.py": f'"""sciscope domain adapter: {name}."""\n',
        root / package / "adapter.py": ADAPTER_TEMPLATE.format(**fields),
        root / "tests" / f"test_{name}.py": TEST_TEMPLATE.format(**fields),
        root / "pyproject.toml": PYPROJECT_TEMPLATE.format(**fields),
    }
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text(path, text)
    registry = Path(LOCAL_REGISTRY)
    entries = json.loads(registry.read_text()) if registry.is_file() else {}
    entries[name] = f"{(root / package / 'adapter.py').resolve()}:{cls}"
    write_json(registry, entries)
    return [*files, registry]


def local_domains(folder: str | os.PathLike[str] = ".") -> dict[str, str]:
    """Adapters registered by ``new-domain`` in ``folder``'s ``sciscope-domains.json``: name -> path:Class."""
    registry = Path(folder) / LOCAL_REGISTRY
    return json.loads(registry.read_text()) if registry.is_file() else {}
