"""Domain adapters: the base class every domain implements, and their registry.

An adapter supplies what is domain-specific — examples and their concepts, a model, default
sites, contrasts for steering, domain metrics — and the core does the rest. Built-in adapters and
third-party ones are found the same way, through the entry-point group ``sciscope.domains``::

    [project.entry-points."sciscope.domains"]
    mydomain = "mypackage.adapter:MyAdapter"

Discovery is cached; a plugin that fails to import warns and is skipped, it never breaks import.
"""

from __future__ import annotations

import functools
import importlib.metadata
import math
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import pandas as pd
from torch import nn

from .config import ENTRY_POINT_GROUP, Key, check_keys
from .errors import AdapterError, ConfigError, UnknownDomainError, close_matches
from .experiment import Analysis, ProbeSet, Scorer, SteeringPlan, contrast_plan

if TYPE_CHECKING:
    from .context import RunContext
    from .fidelity import TaskLoss
    from .tracing import CounterfactualPairs



@dataclass
class Examples:
    """A split of a domain's examples: model inputs plus one obs row per example.

    Attributes
    ----------
    obs : DataFrame
        One row per example: metadata and concept columns (and ``split``/group columns).
    inputs : Any
        Whatever the adapter's :meth:`DomainAdapter.batches` turns into model inputs (strings,
        token lists, SMILES, cells, trajectories ...), row-aligned with ``obs``.
    concepts : list[str]
        The obs columns that are domain concepts (probe targets, feature associations).
    """

    obs: pd.DataFrame
    inputs: Any
    concepts: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if hasattr(self.inputs, "__len__") and len(self.inputs) != len(self.obs):
            raise AdapterError(f"examples: {len(self.inputs)} inputs but {len(self.obs)} obs rows")
        missing = [c for c in self.concepts if c not in self.obs.columns]
        if missing:
            raise AdapterError(f"examples: concept columns {missing} are not in obs {list(self.obs.columns)}")

    def __len__(self) -> int:
        return len(self.obs)

    @classmethod
    def of_split(cls, obs: pd.DataFrame, split: str, *, inputs: str, concepts: list[str], domain: str = "") -> "Examples":
        """The rows of one split of ``obs`` (``"all"`` keeps every row), inputs read from a column.

        ``obs`` needs a ``split`` column; an unknown split is a :class:`ConfigError` naming it.
        """
        splits = ["all", *sorted(obs["split"].astype(str).unique())]
        if split not in splits:
            raise ConfigError(f"{domain or 'examples'}: unknown split {split!r}; choose one of {splits}")
        rows = obs if split == "all" else obs[obs["split"] == split]
        rows = rows.reset_index(drop=True)
        return cls(obs=rows, inputs=rows[inputs].tolist(), concepts=concepts)


class DomainAdapter(ABC):
    """Base class of a domain adapter.

    Subclasses set the class attributes and implement :meth:`examples`, :meth:`model` and
    :meth:`batches`; the rest have working defaults. An adapter *declares* its experiments --
    :meth:`steering_plans`, :meth:`analyses`, :meth:`probe_sets`, model :attr:`variants` -- and the
    core's stages run them with their controls; it never loops over alphas, captures by hand or
    builds a path into a run folder (outputs go through its :class:`~sciscope.core.context.RunContext`).

    Class attributes
    ----------------
    name : str
        Registry name (``sciscope run NAME``).
    description : str
        One line for ``sciscope domains``.
    config_keys : dict[str, Key]
        Every configuration key: default, range/choices and the first stage a change reruns
        (:class:`sciscope.core.config.Key`). ``default_config`` and ``config_stages`` derive from it.
    default_config : dict
        ``{key: default}`` (set directly by adapters that declare no ``config_keys``).
    profiles : dict
        ``{"quick": {...}, "full": {...}}`` overrides for ``sciscope run --profile``.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    config_keys: ClassVar[dict[str, Key]] = {}
    default_config: ClassVar[dict[str, Any]] = {}
    config_stages: ClassVar[dict[str, str]] = {}
    profiles: ClassVar[dict[str, dict[str, Any]]] = {}
    #: True when a steering plan reads the SAE or its feature analysis (``SteerFeature``,
    #: ``AblateFeatures``): the steering stage then waits for the features stage.
    steering_uses_features: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "config_keys" in cls.__dict__:
            cls.default_config = {k: key.default for k, key in cls.config_keys.items()}
            cls.config_stages = {k: key.stage for k, key in cls.config_keys.items()}

    def __init__(self, config: Mapping[str, Any] | None = None) -> None:
        self.config = self.validate_config(config or {})
        #: Lightning ``Trainer`` options for models the adapter trains (``accelerator``, ``devices``,
        #: ``num_nodes``, ``strategy``); the run's context sets them from its config, so one key
        #: moves every training in a run to GPUs, DDP or several nodes.
        self.trainer_options: dict[str, Any] = {"accelerator": "cpu", "devices": 1}
        self._ctx: RunContext | None = None

    # -- the run this adapter works in ---------------------------------------------------------------
    @property
    def ctx(self) -> "RunContext":
        """The run context (a pipeline run's, or an in-memory one for notebooks and tests)."""
        if getattr(self, "_ctx", None) is None:
            from .context import RunContext

            RunContext(self)  # binds itself
        return self._ctx  # type: ignore[return-value]

    @ctx.setter
    def ctx(self, value: "RunContext") -> None:
        self._ctx = value

    # -- configuration ----------------------------------------------------------------------------
    @classmethod
    def validate_config(cls, overrides: Mapping[str, Any]) -> dict[str, Any]:
        """Merge ``overrides`` into the defaults; reject unknown keys, ill-typed and out-of-range values."""
        source = cls.name or cls.__name__
        config = merge_config(source, dict(cls.default_config), overrides)
        check_keys(source, cls.config_keys, config)
        cls.check_config(config)
        return config

    @classmethod
    def check_config(cls, config: dict[str, Any]) -> None:
        """Checks across keys (a patch size that divides the grid ...); raise ConfigError naming the key."""

    # -- what every adapter supplies --------------------------------------------------------------
    @abstractmethod
    def examples(self, split: str = "train") -> Examples:
        """The examples of one split (``"train"``, ``"test"`` or ``"all"``)."""

    @abstractmethod
    def model(self, spec: str | None = None) -> nn.Module:
        """The default model (trained locally if needed) or a user checkpoint named by ``spec``."""

    @abstractmethod
    def batches(self, examples: Examples, model: nn.Module, *, batch_size: int = 32) -> Iterator[Any]:
        """Model inputs for ``examples``, in obs order (dicts of keyword arguments, tuples or tensors)."""

    @property
    def sites(self) -> list[str]:
        """Default sites to capture (e.g. every layer's output)."""
        return []

    @property
    def aliases(self) -> dict[str, str]:
        """Readable site names for this domain's models."""
        return {}

    @property
    def pooling(self) -> str:
        """Default pooling over positions."""
        return "mean"

    @property
    def concepts(self) -> list[str]:
        """Obs columns that are domain concepts."""
        return []

    @property
    def contrasts(self) -> dict[str, tuple[Any, Any]]:
        """Named pairs of example groups for steering: ``{name: (group_a, group_b)}`` as obs queries."""
        return {}

    @property
    def metrics(self) -> dict[str, Callable[..., Any]]:
        """Domain scores, e.g. validity of generated molecules or Moran's I."""
        return {}

    @property
    def feature_statistics(self) -> dict[str, Callable[..., pd.DataFrame]]:
        """Extra per-feature statistics for :func:`sciscope.core.features.analyze_features`.

        ``{name: fn}`` with ``fn(acts_chunk (n_obs, f) ndarray, obs) -> one row per feature``
        (e.g. Moran's I of each feature over the places' coordinates).
        """
        return {}

    # -- model variants (a companion model the stages capture and probe like the main one) ---------
    @property
    def variants(self) -> list[str]:
        """Names of model variants (e.g. chemistry's model of the other molecule encoding)."""
        return []

    def variant_model(self, name: str) -> nn.Module:
        """The model of variant ``name`` (trained or loaded like the main one)."""
        raise AdapterError(f"{self.name}: no model variant {name!r}")

    def variant_sites(self, name: str) -> list[str]:
        """Sites captured for variant ``name`` (default: the main model's)."""
        return self.sites

    def variant_aliases(self, name: str) -> dict[str, str]:
        """Aliases of variant ``name`` (default: the main model's)."""
        return self.aliases

    # -- what the stages run (all optional) ----------------------------------------------------------
    @property
    def probe_targets(self) -> list[str]:
        """Obs columns the probe stage fits (default: every concept)."""
        return list(self.concepts)

    @property
    def probe_groups(self) -> str | None:
        """Obs column for group-aware cross-validation (scaffold, donor, spatial block ...)."""
        return None

    def probe_sets(self, ctx: "RunContext") -> list[ProbeSet]:
        """Extra probes: targets on a subset of rows or on a model variant (:class:`ProbeSet`)."""
        return []

    def baseline_features(self, examples: Examples) -> dict[str, Any]:
        """Simple non-model features per example, probed beside the model (fingerprints, bag of tokens)."""
        return {}

    @property
    def sae_site(self) -> str:
        """The site the SAE stage trains on (default: the middle default site)."""
        return self.sites[len(self.sites) // 2]

    @property
    def steer_site(self) -> str:
        """The site the default steering plans build and inject their delta vectors at."""
        return self.sae_site

    def steering_scorer(self, ctx: "RunContext", contrast: str) -> "Scorer | Callable[[nn.Module], Mapping[str, Any]] | None":
        """How to score steering along ``contrast`` (a :class:`Scorer`); None: do not steer it.

        Used by the default :meth:`steering_plans`: one difference-of-means :class:`AddVector` per
        contrast at :attr:`steer_site`, swept over the run's ``steer_alphas``.
        """
        return None

    def steering_plans(self, ctx: "RunContext") -> list[SteeringPlan]:
        """The steering experiments of a run (default: one delta-vector plan per scored contrast)."""
        plans = []
        for name, (a, b) in self.contrasts.items():
            scorer = self.steering_scorer(ctx, name)
            if scorer is not None:
                plans.append(contrast_plan(ctx, name, a, b, scorer, site=self.steer_site))
        return plans

    def analyses(self) -> list[Analysis]:
        """Domain analyses the stages run after their own work (:class:`Analysis`)."""
        return []

    def task_loss(self, ctx: "RunContext") -> "TaskLoss | None":
        """The model's own task on held-out examples (:class:`~sciscope.core.fidelity.TaskLoss`).

        With it, the core's fidelity analysis splices the SAE's reconstruction (and PCA at equal
        L0) into the model at :attr:`sae_site` and reports the loss recovered. None: no fidelity.
        """
        return None

    # -- where the model computes it (all optional) --------------------------------------------------
    def tracing_pairs(self, ctx: "RunContext") -> "CounterfactualPairs | None":
        """Clean / corrupted inputs that differ in one concept, and the output readout
        (:class:`~sciscope.core.tracing.CounterfactualPairs`). With them the core traces every layer x
        component x position group, and attributes the score to SAE and transcoder features.
        None: no tracing."""
        return None

    @property
    def component_templates(self) -> dict[str, str] | None:
        """``{component: "path.{i}..."}`` for blocks whose attention / MLP outputs discovery does not
        know (see :func:`sciscope.core.components.block_components`); None: discover them."""
        return None

    @property
    def unit_rules(self) -> dict[str, Any]:
        """How the core's unit controls read each feature statistic (``{statistic: UnitRule}``, see
        :class:`sciscope.core.unit_controls.UnitRule`): the threshold a unit must reach and the
        p-value it must beat. Default: none declared (Moran's I gets the paper's rule, any other
        statistic is read by its maximum only)."""
        return {}

    @property
    def association_groups(self) -> str | None:
        """The obs column whose groups are the independent units of the concept associations
        (windows of one trajectory, states of one episode, cells of one donor): activations are
        averaged within a group and tested across groups. None: every example is independent."""
        return None

    @property
    def fidelity_positions(self) -> Any:
        """The positions the SAE is about: the fidelity splice replaces them, the SAE's per-position
        rows and mean pooling keep only them (None: all; a slice or list of positions, see
        :func:`sciscope.core.steer.steer`). Leave out positions that are the same constant vector in
        every example -- a causal LM's first position (the attention sink), a ``<cls>`` the pooled
        rows never include. Pooling and per-position rows need non-negative positions."""
        return None

    # -- feature cards (all optional) -----------------------------------------------------------------
    @property
    def card_ranking(self) -> str | None:
        """The column of the feature table (:attr:`FeatureAnalysis.features`) whose |value| ranks
        features for cards (e.g. ``"morans_i_I"``). None: the |effect| of each feature's strongest
        significant concept association."""
        return None

    @property
    def card_columns(self) -> list[str] | None:
        """Obs columns a card's example table shows (None: a label column or two and the concepts)."""
        return None

    def lens_basis(self, ctx: "RunContext") -> "tuple[Any, list[str]] | None":
        """An ``(V, d)`` (un)embedding matrix at the SAE site's width and the ``V`` token names, and
        optionally a third item naming the basis ("the LM head", "the input embedding"), for reading a
        feature's decoder direction as tokens on its card. None: no lens."""
        return None

    def render_examples(self, ctx: "RunContext", feature: int, examples: pd.DataFrame) -> list[Any]:
        """Pictures of a feature's examples for its card (:class:`sciscope.core.cards.Panel` list).

        ``examples`` has one row per example shown: ``band`` ("top", or "q75"/"q50"/"q25" for the
        lower quantiles of its non-zero activations), ``rank``, ``activation``, ``row`` (the
        example's row) and the example's obs columns. Per-position activations of an example come
        from :func:`sciscope.core.cards.position_activations`. Default: no pictures (the card
        still shows the table).
        """
        return []

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}: {self.description}>"


def merge_config(source: str, defaults: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``defaults`` updated by ``overrides``, each value coerced to its default's type.

    An unknown key is a :class:`ConfigError` naming it and the close known keys (``source`` says
    where it came from: a domain, a profile, ``--set``).
    """
    config = dict(defaults)
    for key, value in overrides.items():
        if key not in defaults:
            hint = close_matches(key, defaults)
            raise ConfigError(
                f"{source}: unknown config key {key!r}"
                + (f"; did you mean {hint}?" if hint else f"; known keys: {sorted(defaults)}")
            )
        config[key] = _coerce(source, key, value, defaults[key])
        _check_finite(source, key, config[key])
    return config


def _check_finite(source: str, key: str, value: Any) -> None:
    """NaN and inf are no configuration: NaN fails every range check silently (``nan < 0`` is False)."""
    items = value if isinstance(value, (list, tuple)) else [value]
    for v in items:
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"{source}: config key {key!r} must be a finite number, got {v!r}")


def _coerce(domain: str, key: str, value: Any, default: Any) -> Any:
    """Coerce CLI strings (``--set key=value``) to the default's type; reject what does not fit."""
    if value is None:
        return value
    if default is None:
        # An optional key: read CLI strings as None, an int or a float where they look like one.
        if isinstance(value, str):
            if value.lower() in ("", "none", "null"):
                return None
            for parse in (int, float):
                try:
                    return parse(value)
                except ValueError:
                    pass
        return value
    target = type(default)
    if isinstance(value, target) and not (target is int and isinstance(value, bool)):
        return value
    if isinstance(value, str):
        try:
            if target is bool:
                low = value.lower()
                if low in ("1", "true", "yes", "on"):
                    return True
                if low in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            if target in (list, tuple):
                items = [v.strip() for v in value.split(",") if v.strip()]
                # elements take the type of the default's elements ("1,2.5" -> [1.0, 2.5] for floats)
                elem = type(default[0]) if len(default) and isinstance(default[0], (int, float)) else None
                if elem is not None and not isinstance(default[0], bool):
                    items = [float(v) if elem is float else int(v) for v in items]
                return target(items)
            return target(value)
        except ValueError:
            pass
    elif target is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    raise ConfigError(
        f"{domain or 'config'}: key {key!r} expects {target.__name__} (default {default!r}), got {value!r}"
    )


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------

_RUNTIME_REGISTRY: dict[str, type[DomainAdapter]] = {}


@functools.cache
def _entry_point_domains(only: str | None = None) -> dict[str, type[DomainAdapter]]:
    """Adapters registered as entry points (``only``: just that name's, so that looking one up does
    not import every other domain's dependencies)."""
    found: dict[str, type[DomainAdapter]] = {}
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if only is not None and ep.name != only:
            continue
        try:
            cls = ep.load()
        except Exception as e:  # a broken plugin must not break sciscope
            warnings.warn(f"sciscope: domain plugin {ep.name!r} ({ep.value}) failed to load: {e}", stacklevel=2)
            continue
        if not (isinstance(cls, type) and issubclass(cls, DomainAdapter)):
            warnings.warn(f"sciscope: domain plugin {ep.name!r} is not a DomainAdapter subclass; skipped", stacklevel=2)
            continue
        found[ep.name] = cls
    return found


def register_domain(cls: type[DomainAdapter], name: str | None = None) -> type[DomainAdapter]:
    """Register an adapter class at run time (notebooks, tests); usable as a decorator."""
    if not (isinstance(cls, type) and issubclass(cls, DomainAdapter)):
        raise AdapterError(f"{cls!r} is not a DomainAdapter subclass")
    key = name or cls.name
    if not key:
        raise AdapterError(f"{cls.__name__} has no name")
    _RUNTIME_REGISTRY[key] = cls
    return cls


def unregister_domain(name: str) -> None:
    """Remove a run-time registration (entry-point adapters stay)."""
    _RUNTIME_REGISTRY.pop(name, None)


def available_domains() -> dict[str, type[DomainAdapter]]:
    """Every registered adapter class by name: entry points first, then run-time registrations."""
    return {**_entry_point_domains(), **_RUNTIME_REGISTRY}


def find_domain(name: str) -> type[DomainAdapter] | None:
    """The adapter class registered as ``name`` (run-time registrations first), importing only its module."""
    return _RUNTIME_REGISTRY.get(name) or _entry_point_domains(only=name).get(name)


def get_domain(name: str, config: Mapping[str, Any] | None = None) -> DomainAdapter:
    """Instantiate the adapter registered as ``name`` with a validated ``config``."""
    cls = find_domain(name)
    if cls is not None:
        return cls(config)
    domains = available_domains()
    if name not in domains:
        hint = close_matches(name, domains)
        raise UnknownDomainError(
            f"unknown domain {name!r}"
            + (f"; did you mean {hint}?" if hint else f"; registered: {sorted(domains) or 'none'}")
        )
    return domains[name](config)
