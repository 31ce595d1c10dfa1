"""A whole domain in about 150 lines: data, a locally trained model, two steering plans, an analysis.

Points in 8-D carry a planted class direction; a small MLP is trained here to classify them. The
adapter declares what to run -- a delta-vector plan (``AddVector``) and a neuron-clamping plan
(``Clamp`` on the hidden units that push class 1 most) scored by the class-1 logit margin, and an
analysis of the probes -- and its task loss, so the core splices the SAE back in (fidelity); the
core's stages run them with their controls.
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
from sciscope.core.experiment import Analysis, Scorer, SteeringPlan, contrast_plan
from sciscope.core.fidelity import TaskLoss
from sciscope.core.interventions import AblateFeatures, Clamp, SteerFeature


class PlantedAdapter(DomainAdapter):
    name = "planted"
    description = "Gaussian points with a planted class direction, read by a locally trained MLP"
    config_keys = {
        "n_examples": Key(400, min=20), "noise": Key(1.0, min=0.0), "seed": Key(0),
        "hidden": Key(128, stage="model", min=4), "train_steps": Key(300, stage="model", min=1),
        "n_clamped": Key(4, stage="steering", min=1), "clamp_alphas": Key([1.0, 2.0, 4.0], stage="steering"),
    }
    profiles = {"quick": {"sae_steps": 1000, "sae_expansion": 2, "sae_k": 4, "steer_alphas": [-2.0, -1.0, 1.0, 2.0]}}
    steering_uses_features = True  # the SAE-feature plans below wait for the features stage

    def examples(self, split: str = "train") -> Examples:
        rng = np.random.default_rng(self.config["seed"])
        n = self.config["n_examples"]
        label = rng.integers(0, 2, n).astype(bool)
        x = rng.normal(scale=self.config["noise"], size=(n, 8)) + np.outer(label, np.linspace(1, 0, 8))
        obs = pd.DataFrame({"row": np.arange(n), "label": label, "x0": x[:, 0],
                            "split": np.where(np.arange(n) % 4 == 0, "test", "train")})
        ex = Examples.of_split(obs, split, inputs="row", concepts=["label", "x0"], domain=self.name)
        return Examples(ex.obs, x.astype(np.float32)[ex.inputs], ex.concepts)

    def model(self, spec: str | None = None) -> nn.Module:
        c = self.config
        return self.ctx.cached("mlp", {k: c[k] for k in ("n_examples", "noise", "seed", "hidden", "train_steps")},
                               self._train, save=lambda m, d: torch.save(m.state_dict(), d / "mlp.pt"),
                               load=lambda d: self._load(d))

    def _net(self) -> nn.Module:
        h = self.config["hidden"]
        return nn.Sequential(nn.Linear(8, h), nn.ReLU(), nn.Linear(h, 2))

    def _load(self, folder) -> nn.Module:
        net = self._net()
        net.load_state_dict(torch.load(folder / "mlp.pt", weights_only=True))
        return net.eval()

    def _train(self) -> nn.Module:
        torch.manual_seed(self.config["seed"])
        ex = self.examples("train")
        x, y = torch.from_numpy(np.stack(ex.inputs)), torch.as_tensor(ex.obs.label.to_numpy(), dtype=torch.long)
        net = self._net()
        opt = torch.optim.Adam(net.parameters(), lr=1e-2)
        for _ in range(self.config["train_steps"]):
            opt.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
        return net.eval()

    def batches(self, examples: Examples, model: nn.Module, *, batch_size: int = 32) -> Iterator[torch.Tensor]:
        x = torch.from_numpy(np.stack(examples.inputs))
        for i in range(0, len(x), batch_size):
            yield x[i: i + batch_size]

    sites = ["input", "hidden"]
    aliases = {"input": "0", "hidden": "1"}
    concepts = ["label", "x0"]
    probe_groups = None
    contrasts = {"label": ("label", "~label")}

    @property
    def steer_site(self) -> str:
        return "hidden"

    def _margin_scorer(self, ctx: RunContext) -> Scorer:
        """Class-1 logit margin of the held-out class-0 points (one value per point)."""
        x = torch.from_numpy(np.stack(self.examples("test").inputs))

        def score(model: nn.Module) -> dict[str, np.ndarray]:
            with torch.no_grad():
                logits = model(x)
            margin = (logits[:, 1] - logits[:, 0]).numpy()
            return {"margin": margin, "p_class1": (margin > 0).astype(float)}

        return Scorer(score, target=["margin"], damage=["p_class1"])

    def steering_scorer(self, ctx: RunContext, contrast: str) -> Scorer:
        return self._margin_scorer(ctx)

    def steering_plans(self, ctx: RunContext) -> list[SteeringPlan]:
        plans = super().steering_plans(ctx)  # the delta-vector plan of the `label` contrast
        head = ctx.model()[2].weight.detach()
        push = (head[1] - head[0]).argsort(descending=True)[: self.config["n_clamped"]].tolist()
        plans.append(SteeringPlan("clamp_class1_units", Clamp({"2:input": push}), self._margin_scorer(ctx),
                                  alphas=self.config["clamp_alphas"], n_controls=ctx.config["steer_n_random"], seed=ctx.seed,
                                  reference={"class-1 points": {"margin": self._class1_margin(ctx)}}))
        plans.append(contrast_plan(ctx, "label_relative", "label", "~label", self._margin_scorer(ctx), site="hidden",
                                   scale="relative", alphas=[-0.5, 0.5, 1.0]))
        feats = ctx.features()
        auroc = feats.associations.query("concept == 'label' and stat == 'auroc'")
        auroc = auroc[auroc["value"].astype(str).isin(["True", "1", "1.0"])] if "value" in auroc else auroc
        best = int(auroc.loc[auroc.statistic.idxmax(), "feature"])  # the feature that fires most for class 1
        density = feats.density.sort_values("feature")["density"].to_numpy()
        for name, kind, alphas in (("steer_label_feature", SteerFeature, [1.0, 2.0, 4.0]),
                                   ("ablate_label_feature", AblateFeatures, [1.0])):
            intervention = kind(ctx.sae(), [best], self.sae_site, density=density)
            plans.append(SteeringPlan(name, intervention, self._margin_scorer(ctx), alphas=alphas,
                                      n_controls=ctx.config["steer_n_random"], seed=ctx.seed))
        return plans

    def _class1_margin(self, ctx: RunContext) -> float:
        ex = self.examples("test")
        x = torch.from_numpy(np.stack(ex.inputs))[torch.as_tensor(ex.obs.label.to_numpy())]
        with torch.no_grad():
            logits = ctx.model()(x)
        return float((logits[:, 1] - logits[:, 0]).mean())

    def task_loss(self, ctx: RunContext) -> TaskLoss:
        """Cross-entropy of the training points (the tiny MLP overfits: held-out, zeroing its hidden
        layer would beat it): what the core's fidelity analysis splices the SAE into."""
        ex = self.examples("train")
        x, y = torch.from_numpy(np.stack(ex.inputs)), torch.as_tensor(ex.obs.label.to_numpy(), dtype=torch.long)
        return TaskLoss(lambda m: float(nn.functional.cross_entropy(m(x), y)), "cross-entropy of the training points",
                        log_probs=lambda m: torch.log_softmax(m(x), -1))

    def analyses(self) -> list[Analysis]:
        return [Analysis("label_probe_gap", "probes", self._probe_gap, self._probe_gap_rows)]

    def _probe_gap(self, ctx: RunContext) -> dict:
        s = ctx.probes().summary()
        t = s[(s.target == "label") & (s.site.astype(str) != "")]
        table = pd.DataFrame({"site": t.site, "gap": t.score_mean - t.control_mean})
        return {"best_gap": float(table.gap.max()), "source": ctx.write_table("label_probe_gap.csv", table)}

    def _probe_gap_rows(self, result: dict) -> list[dict]:
        return [{"name": "label probe: best gap over shuffled labels", "value": result["best_gap"], "source": result["source"]}]
