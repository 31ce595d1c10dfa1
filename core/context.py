"""RunContext: the one door into a run, passed to every adapter hook that runs an experiment.

A context carries the whole run config (pipeline keys such as ``steer_alphas`` and ``probe_cv``
beside the adapter's own), the run's artifacts (:meth:`RunContext.store`, :meth:`~RunContext.sae`,
:meth:`~RunContext.latents`, :meth:`~RunContext.probes`, :meth:`~RunContext.features`), a cache
(:meth:`RunContext.cached` for models and other expensive objects, in memory and, in a run, on
disk) and the writers for the current stage's outputs (:meth:`~RunContext.write_table`,
:meth:`~RunContext.save_figure`, :meth:`~RunContext.output`). Adapters never build a path into a
run folder; outside a run (notebooks, tests) the same calls work on a temporary folder.

Layout it owns::

    <run>/<stage>/...                 stage outputs (tables, figures, headline.json)
    <run>/activations/store           the main model's activations
    <run>/activations/variants/<v>    a model variant's activations
    <run>/activations/positions       the SAE site, one row per position (when the SAE learns positions)
    <run>/probes/sweep                the probe sweep
    <run>/sae/model, <run>/sae/latents
    <run>/features/analysis
    <run>/cache/<name>                what ``cached(..., save=, load=)`` keeps between stage processes
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from .config import pipeline_defaults
from .errors import SciscopeError

if TYPE_CHECKING:
    from torch import nn

    from .adapter import DomainAdapter, Examples
    from .features import FeatureAnalysis
    from .probe import ProbeSweepResult
    from .store import ActivationStore

T = TypeVar("T")

#: Objects built by ``cached`` in this process, by key (models, simulations): a notebook that
#: makes two adapters with the same config trains once.
_MEMORY: dict[str, Any] = {}


def stable_key(*parts: Any) -> str:
    """A short stable hash of JSON-able parts (config values, names) for cache keys."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class RunContext:
    """The run an adapter hook works in.

    Parameters
    ----------
    adapter
        The run's adapter (the context binds itself to it: ``adapter.ctx``).
    config
        The whole run config (pipeline keys such as ``steer_alphas``); the adapter's own keys
        always come from its validated ``adapter.config`` (build the adapter with the values).
    run_dir
        The run folder, or None outside a pipeline (outputs then go to a temporary folder and
        ``cached`` keeps objects in memory only).
    stage
        The stage whose folder the writers write into (the runner sets it).
    """

    def __init__(self, adapter: "DomainAdapter", config: Mapping[str, Any] | None = None, *,
                 run_dir: str | os.PathLike[str] | None = None, stage: str = "examples", progress: bool = False,
                 trainer_options: Mapping[str, Any] | None = None) -> None:
        self.adapter = adapter
        # the adapter's validated values win over the raw run config for its own keys
        self.config: dict[str, Any] = {**pipeline_defaults(), **dict(config or {}), **adapter.config}
        self._dir = Path(run_dir) if run_dir is not None else None
        self._tmp: Path | None = None
        self.stage = stage
        self.subfolder = ""
        self.progress = progress
        c = self.config
        self.trainer_options: dict[str, Any] = dict(trainer_options or {
            "accelerator": c.get("accelerator", "cpu"), "devices": c.get("devices", 1),
            "num_nodes": c.get("num_nodes", 1), "strategy": c.get("strategy", "auto")})
        self._models: dict[str | None, Any] = {}
        #: results of the current stage process that analyses read in memory (``"probes"``,
        #: ``"features"``): the stage runner puts them here before running its analyses
        self.live: dict[str, Any] = {}
        self._examples: Any = None
        adapter.ctx = self
        adapter.trainer_options = self.trainer_options

    # -- identity ---------------------------------------------------------------------------------
    @property
    def seed(self) -> int:
        return int(self.config.get("seed", 0))

    @property
    def in_run(self) -> bool:
        """True inside a pipeline run (artifacts on disk), False in memory."""
        return self._dir is not None

    def _root(self) -> Path:
        if self._dir is not None:
            return self._dir
        if self._tmp is None:
            self._tmp = Path(tempfile.mkdtemp(prefix="sciscope-ctx-"))
        return self._tmp

    def _artifact(self, *parts: str) -> Path:
        path = self._root().joinpath(*parts)
        if not path.exists():
            raise SciscopeError(f"no {'/'.join(parts)} in this run yet: run the stage that makes it first "
                                f"({'sciscope run ... --until ' + parts[0] if self.in_run else 'not in a pipeline run'})")
        return path

    # -- data and models (memoised per context) ------------------------------------------------------
    def examples(self) -> "Examples":
        """Every example of the run (``adapter.examples("all")``)."""
        if self._examples is None:
            self._examples = self.adapter.examples("all")
        return self._examples

    def model(self, variant: str | None = None) -> "nn.Module":
        """The run's model, or one of the adapter's declared model variants."""
        if variant not in self._models:
            if variant is None:
                self._models[None] = self.adapter.model(self.config.get("model") or None)
            else:
                if variant not in self.adapter.variants:
                    raise SciscopeError(f"{self.adapter.name}: no model variant {variant!r}; variants: {self.adapter.variants}")
                self._models[variant] = self.adapter.variant_model(variant)
        return self._models[variant]

    # -- artifacts of earlier stages -----------------------------------------------------------------
    def store(self, variant: str | None = None) -> "ActivationStore":
        """Activations of the main model (or of a model variant), memory-mapped."""
        from .store import ActivationStore

        if variant is None:
            return ActivationStore.open(self._artifact("activations", "store"))
        path = self._root() / "activations" / "variants" / variant
        if not path.exists():
            self.capture_variant(variant, path)
        return ActivationStore.open(path)

    def capture_variant(self, variant: str, path: Path) -> "ActivationStore":
        """Capture a model variant's default sites over every example into ``path``."""
        from .capture import collect

        ad, ex, model = self.adapter, self.examples(), self.model(variant)
        bs = int(self.config.get("batch_size", 64))
        return collect(model, ad.batches(ex, model, batch_size=bs), ad.variant_sites(variant), out=path, obs=ex.obs,
                       pooling=ad.pooling, aliases=ad.variant_aliases(variant), seed=self.seed, progress=self.progress,
                       total=-(-len(ex) // bs), extra_manifest={"domain": ad.name, "variant": variant},
                       **self.pooling_excludes())

    def pooling_excludes(self) -> dict[str, Any]:
        """What mean pooling leaves out (``collect``'s ``positions`` and ``outlier_norm``): the
        adapter's position rule (``fidelity_positions``: a causal LM's first position, a ``<cls>``)
        and massive-norm positions (config ``outlier_norm``). Nothing for "first"/"last" pooling,
        which reads one named position."""
        if self.adapter.pooling not in ("mean", "masked"):
            return {}
        return {"positions": self.adapter.fidelity_positions, "outlier_norm": float(self.config.get("outlier_norm", 10.0))}

    # -- the SAE's rows and its training recipe -------------------------------------------------------
    @property
    def sae_row_mode(self) -> str:
        """``"positions"`` (one row per position of the SAE site) or ``"pooled"`` (the store's rows).

        Config ``sae_rows``; ``"auto"`` is positions when the adapter mean-pools over positions
        (the pooled row is then no vector the model ever computed) and its pooled rows otherwise
        (``"last"``/``"first"`` pooling already reads one position per example).
        """
        mode = str(self.config.get("sae_rows", "auto"))
        if mode == "auto":
            mode = "positions" if self.adapter.pooling in ("mean", "masked") else "pooled"
        return mode

    def position_store(self) -> "ActivationStore":
        """Per-position activations of the SAE site over every example (``<run>/activations/positions``),
        captured on first use: obs repeats each example's row for each valid position (its
        ``position_mask`` when batches carry one, else its ``attention_mask``) with ``position``
        and ``example_row`` columns."""
        from .store import ActivationStore

        path = self._root() / "activations" / "positions"
        if not path.exists():
            self.capture_positions(path)
        return ActivationStore.open(path)

    def capture_positions(self, path: Path) -> "ActivationStore":
        """Capture the SAE site, one row per valid position, into ``path`` (see :meth:`position_store`)."""
        from .capture import collect
        from .sae.rows import EXAMPLE_ROW

        ad, ex, model = self.adapter, self.examples(), self.model()
        bs = int(self.config.get("batch_size", 64))
        obs = ex.obs.reset_index(drop=True).assign(**{EXAMPLE_ROW: np.arange(len(ex))})
        return collect(model, ad.batches(ex, model, batch_size=bs), [ad.sae_site], out=path, obs=obs, pooling="none",
                       aliases=ad.aliases, seed=self.seed, progress=self.progress, total=-(-len(ex) // bs),
                       extra_manifest={"domain": ad.name, "rows": "positions of the SAE site"})

    def sae_row_selection(self) -> "tuple[ActivationStore, dict[str, Any]]":
        """The rows the SAE learns from and is read on, every example's, and what was left out.

        Pooled mode: the store and ``{"rows": "pooled"}``. Positions mode: the position store
        without the adapter's excluded positions (``fidelity_positions``: a causal LM's first
        position, a ``<cls>``) and without outlier-norm positions (config ``outlier_norm``),
        and the report of :func:`~sciscope.core.sae.rows.select_sae_rows`.
        """
        if "sae_row_selection" not in self.live:
            if self.sae_row_mode == "pooled":
                self.live["sae_row_selection"] = (self.store(), {"rows": "pooled", "pooling": self.adapter.pooling})
            else:
                from .sae.rows import select_sae_rows

                store = self.position_store()
                kept, report = select_sae_rows(store, self.adapter.sae_site, positions=self.adapter.fidelity_positions,
                                               outlier_factor=float(self.config.get("outlier_norm", 10.0)))
                self.live["sae_row_selection"] = (store.select(kept), {"rows": "positions", **report})
        return self.live["sae_row_selection"]

    def sae_rows(self) -> "tuple[ActivationStore, ActivationStore]":
        """``(train_rows, test_rows)`` for the SAE (see :meth:`sae_row_selection`): held-out rows are
        those of examples with ``split == 'test'`` (an SAE wider than the data can memorise it, so
        in-sample explained variance flatters it); without a split column both are every row.
        Training rows are capped at ``sae_max_rows`` (whole examples, seeded)."""
        rows, _ = self.sae_row_selection()
        return self.split_rows(rows)

    def split_rows(self, rows: "ActivationStore") -> "tuple[ActivationStore, ActivationStore]":
        """``(train_rows, test_rows)`` of any rows as :meth:`sae_rows` splits the SAE's: held out are
        the rows of examples with ``split == 'test'`` (without a split column both are every row);
        training rows capped at ``sae_max_rows`` (whole examples, seeded)."""
        from .sae.rows import subsample_rows

        obs = rows.obs
        train, test = rows, rows
        if "split" in obs.columns and (obs.split == "test").any() and (obs.split != "test").sum() >= 2:
            train, test = rows.select((obs.split != "test").to_numpy()), rows.select((obs.split == "test").to_numpy())
        cap = int(self.config.get("sae_max_rows", 200_000))
        if train.n_obs > cap:
            train = train.select(subsample_rows(train.obs, np.arange(train.n_obs), cap, seed=self.seed))
        return train, test

    def sae_pca(self) -> "tuple[np.ndarray, np.ndarray]":
        """Mean ``(D,)`` and principal axes ``(D, D)`` of the SAE's training rows: the PCA the SAE is
        read against (explained variance, fidelity, the quality table), fitted once per process."""
        if "sae_pca" not in self.live:
            from .sae.metrics import principal_components

            train, _ = self.sae_rows()
            self.live["sae_pca"] = principal_components(train.array(self.adapter.sae_site))
        return self.live["sae_pca"]

    def train_sae(self, *, seed: int | None = None, single_process: bool = False) -> Any:
        """Train the run's SAE (config keys ``sae_*``) on :meth:`sae_rows`' training rows at the
        adapter's ``sae_site``; returns the :class:`~sciscope.core.sae.SAETrainResult`.

        The steps follow the data: at most ``sae_steps``, at most ``sae_max_epochs`` passes over the
        training rows (in batches of ``sae_batch_size``, or a sixteenth of the rows when that is
        less), and (``sae_patience`` > 0) stopped when the explained variance of a validation tenth
        of the training examples, not trained on, stops improving.
        ``seed`` other than the run's trains the same recipe from another start (stability).
        ``single_process`` trains on one device whatever the run's strategy.
        """
        rows, _ = self.sae_rows()
        return self.train_on_rows(rows, self.adapter.sae_site, seed=seed, single_process=single_process)

    def train_on_rows(self, rows: "ActivationStore", site: str, *, target_site: str | None = None,
                      architecture: str | None = None, seed: int | None = None, single_process: bool = False) -> Any:
        """The run's SAE recipe (:meth:`train_sae`: config keys ``sae_*``) on any rows of a store.

        Parameters
        ----------
        rows
            Training rows (a validation tenth of their examples is set aside when ``sae_patience`` > 0).
        site
            The array the SAE reads.
        target_site
            The array it must predict (a transcoder: ``site`` an MLP's input, ``target_site`` its
            output); None: ``site`` itself (an autoencoder).
        architecture
            A registered architecture other than the run's ``sae_architecture``.
        seed, single_process
            As in :meth:`train_sae`.
        """
        from .sae import sae_config, sae_fields, train_sae
        from .sae.rows import EXAMPLE_ROW

        c = self.config
        arch = architecture or c["sae_architecture"]
        seed = self.seed if seed is None else int(seed)
        train_rows, val = rows, None
        if int(c.get("sae_patience", 0)) > 0 and rows.n_obs >= 20:
            # a seeded tenth of the training examples (whole examples: their positions are alike)
            group = rows.obs[EXAMPLE_ROW].to_numpy() if EXAMPLE_ROW in rows.obs.columns else np.arange(rows.n_obs)
            uniq = np.unique(group)
            held = np.random.default_rng([seed, 0x7A1]).permutation(uniq)[: max(1, len(uniq) // 10)]
            is_val = np.isin(group, held)
            train_rows, idx = rows.select(~is_val), np.flatnonzero(is_val)
            val = rows.array(site, idx) if target_site is None else (rows.array(site, idx), rows.array(target_site, idx))
        d_in = train_rows.dim(site)
        fields: dict[str, Any] = {"d_in": d_in, "d_sae": d_in * int(c["sae_expansion"])}
        if "k" in sae_fields(arch):  # a fixed number of active latents (TopK, BatchTopK ...)
            fields["k"] = min(int(c["sae_k"]), fields["d_sae"])
        cfg = sae_config(arch, **fields)
        # at least 16 batches a pass: a few hundred pooled rows in one batch would give one step an epoch
        bs = min(int(c["sae_batch_size"]), max(16, train_rows.n_obs // 16), train_rows.n_obs)
        steps = int(c["sae_steps"])
        max_epochs = float(c.get("sae_max_epochs", 0) or 0)
        if max_epochs > 0:
            steps = max(1, min(steps, int(max_epochs * train_rows.n_obs / bs)))
        epoch = iter(range(10**9))

        def data() -> Any:  # one shuffled pass; a transcoder's input and target rows in the same order
            s = seed + next(epoch)
            batches = train_rows.iter_batches(site, bs, shuffle=True, seed=s, drop_last=True)
            if target_site is None:
                return batches
            return zip(batches, train_rows.iter_batches(target_site, bs, shuffle=True, seed=s, drop_last=True))

        options = dict(self.trainer_options)
        if single_process:
            options.update(devices=1, num_nodes=1, strategy="auto")
        return train_sae(cfg, data, max_steps=steps, lr=float(c["sae_lr"]), seed=seed, progress=self.progress,
                         val_data=val, patience=int(c.get("sae_patience", 0)),
                         precision=str(c.get("sae_precision", "32-true")), **options)

    def example_latents(self, sae: Any) -> Any:
        """``(n_examples, d_sae)`` SAE codes, one row per example in the store's row order: the codes
        of the pooled rows, or (positions mode) the mean code of each example's kept positions."""
        import torch

        rows, _ = self.sae_row_selection()
        site = self.adapter.sae_site
        if self.sae_row_mode == "pooled":
            with torch.no_grad():
                return np.concatenate([sae.encode(b).numpy() for b in rows.iter_batches(site, 4096)])
        from .sae.rows import pooled_codes

        return pooled_codes(sae, rows, site, np.arange(rows.n_obs), len(self.examples()))

    def sae(self) -> Any:
        """The SAE the sae stage trained."""
        from .sae import load_sae

        return load_sae(self._artifact("sae", "model"))

    def latents(self) -> "ActivationStore":
        """SAE codes of every row (one site, ``"latents"``)."""
        from .store import ActivationStore

        return ActivationStore.open(self._artifact("sae", "latents"))

    def probes(self) -> "ProbeSweepResult":
        """The probe stage's sweep (to analyses that run after the probes stage)."""
        if "probes" not in self.live:
            raise SciscopeError("the probe sweep is available to analyses declared with stage='probes'")
        return self.live["probes"]

    def probe_summary(self) -> Any:
        """The probe stage's summary table (``probes/summary.csv``), from any later stage."""
        import pandas as pd

        return pd.read_csv(self._artifact("probes", "summary.csv"))

    def features(self) -> "FeatureAnalysis":
        """The features stage's analysis (associations, top examples, density)."""
        from .features import FeatureAnalysis

        if "features" in self.live:
            return self.live["features"]
        return FeatureAnalysis.load(self._artifact("features", "analysis"))

    def sae_metrics(self) -> dict[str, Any]:
        """The sae stage's metrics (explained variance, L0, site ...)."""
        return json.loads(self._artifact("sae", "metrics.json").read_text())

    # -- cache ------------------------------------------------------------------------------------------
    def cached(self, name: str, key: Any, build: Callable[[], T], *, save: Callable[[T, Path], None] | None = None,
               load: Callable[[Path], T] | None = None) -> T:
        """``build()`` once per ``(name, key)``; kept in memory and, in a run with ``save``/``load``,
        on disk under ``<run>/cache/<name>-<hash>`` so later stage processes load it.

        ``key`` is anything JSON-able that determines the object (the config values it depends
        on); a changed key builds anew.
        """
        tag = f"{name}-{stable_key(key)}"
        if tag in _MEMORY:
            return _MEMORY[tag]
        folder = self._dir / "cache" / tag if self._dir is not None and save is not None and load is not None else None
        if folder is not None and (folder / ".complete").is_file():
            obj = load(folder)  # type: ignore[misc]
        else:
            obj = build()
            if folder is not None:
                tmp = folder.with_name(f".{tag}.tmp-{os.getpid()}")
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
                save(obj, tmp)  # type: ignore[misc]
                (tmp / ".complete").write_text(json.dumps({"name": name, "key": key}, default=str))
                if folder.exists():
                    shutil.rmtree(folder)
                os.replace(tmp, folder)
        _MEMORY[tag] = obj
        return obj

    # -- outputs of the current stage --------------------------------------------------------------------
    def output(self, name: str) -> Path:
        """Where an output file ``name`` of the current stage (and plan/analysis subfolder) goes."""
        if os.path.isabs(name) or ".." in Path(name).parts:
            raise ValueError(f"output name {name!r} must be relative, inside the stage folder")
        path = self._root() / self.stage / self.subfolder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def source(self, name: str) -> str:
        """The run-relative name of an output (a headline row's ``source``)."""
        return "/".join(p for p in (self.stage, self.subfolder, name) if p)

    def write_table(self, name: str, table: Any) -> str:
        """Write a DataFrame (csv/parquet by suffix) atomically; returns its ``source``."""
        from .io import write_table

        write_table(self.output(name), table)
        return self.source(name)

    def write_json(self, name: str, obj: Any) -> str:
        """Write JSON atomically; returns its ``source``."""
        from .io import write_json

        write_json(self.output(name), obj)
        return self.source(name)

    def write_text(self, name: str, text: str) -> str:
        """Write text atomically; returns its ``source``."""
        from .io import write_text

        write_text(self.output(name), text)
        return self.source(name)

    def save_figure(self, name: str, fig: Any) -> str:
        """Save a matplotlib figure atomically (and close it); returns its ``source``."""
        from .plotting import save_figure

        save_figure(fig, self.output(name))
        return self.source(name)

    def __repr__(self) -> str:
        return f"<RunContext {self.adapter.name!r} {'run ' + str(self._dir) if self._dir else 'in memory'}, stage {self.stage}>"
