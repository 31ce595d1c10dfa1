"""sciscope.core — the domain-agnostic toolkit.

capture -> ActivationStore -> probe / steer / sae / features / patch / lens.

Names are imported on first use (PEP 562): ``import sciscope.core`` and the command line that only
reads a config stay light, and a stage that needs no model does not pay for torch's submodules it
never touches.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

_LAZY = {
    **dict.fromkeys(['DomainAdapter', 'Examples', 'available_domains', 'get_domain', 'register_domain'], "adapter"),
    **dict.fromkeys(['AttributionResult', 'FeatureDictionary', 'attribute'], "attribution"),
    **dict.fromkeys(['capture', 'collect', 'model_identity', 'pool'], "capture"),
    **dict.fromkeys(['BlockComponents', 'block_components'], "components"),
    **dict.fromkeys(['Key'], "config"),
    **dict.fromkeys(['RunContext'], "context"),
    **dict.fromkeys(['AdapterError', 'ConfigError', 'ContrastError', 'IntegrityError', 'NonFiniteError', 'ProbeError', 'SciscopeError', 'ShapeError', 'SiteError'], "errors"),
    **dict.fromkeys(['Analysis', 'PlanSweep', 'ProbeSet', 'Scorer', 'SteeringPlan', 'contrast_plan', 'run_plan'], "experiment"),
    **dict.fromkeys(['FeatureAnalysis', 'analyze_features', 'concept_associations', 'feature_density', 'top_examples'], "features"),
    **dict.fromkeys(['HookSet', 'count_hooks'], "hooks"),
    **dict.fromkeys(['AblateFeatures', 'AddVector', 'Clamp', 'Intervention', 'SteerFeature'], "interventions"),
    **dict.fromkeys(['embedding_matrix', 'ffn_value_vectors', 'lens', 'unembedding_matrix', 'value_vector_lens'], "lens"),
    **dict.fromkeys(['PatchResult', 'activation_patching'], "patch"),
    **dict.fromkeys(['ProbeResult', 'ProbeSweepResult', 'fit_probe', 'probe_sweep'], "probe"),
    **dict.fromkeys(['Site', 'list_sites', 'resolve_site'], "sites"),
    **dict.fromkeys(['IllusionCheck', 'check_direction', 'illusion_check', 'reading_subspace', 'split_direction'], "subspace"),
    **dict.fromkeys(['SteeringSweep', 'SteeringVector', 'alpha_sweep', 'clamp', 'contrast_vector', 'steer'], "steer"),
    **dict.fromkeys(['ActivationStore', 'StoreWriter', 'merge_shards'], "store"),
    **dict.fromkeys(['limit_threads', 'threads_per_device', 'use_threads'], "threads"),
    **dict.fromkeys(['CounterfactualPairs', 'TracingResult', 'trace'], "tracing"),
}


class _Package(types.ModuleType):
    """The import system binds each submodule to its package's attribute once it is imported; where a
    function shares its module's name (``capture``, ``lens``, ``steer``), the function stays the
    package's attribute, as when this package imported every name eagerly."""

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and _LAZY.get(name) == name:
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


if TYPE_CHECKING:  # what type checkers and editors see
    from .adapter import DomainAdapter, Examples, available_domains, get_domain, register_domain
    from .attribution import AttributionResult, FeatureDictionary, attribute
    from .capture import capture, collect, model_identity, pool
    from .components import BlockComponents, block_components
    from .config import Key
    from .context import RunContext
    from .errors import (
        AdapterError,
        ConfigError,
        ContrastError,
        IntegrityError,
        NonFiniteError,
        ProbeError,
        SciscopeError,
        ShapeError,
        SiteError,
    )
    from .experiment import Analysis, PlanSweep, ProbeSet, Scorer, SteeringPlan, contrast_plan, run_plan
    from .features import FeatureAnalysis, analyze_features, concept_associations, feature_density, top_examples
    from .hooks import HookSet, count_hooks
    from .interventions import AblateFeatures, AddVector, Clamp, Intervention, SteerFeature
    from .lens import embedding_matrix, ffn_value_vectors, lens, unembedding_matrix, value_vector_lens
    from .patch import PatchResult, activation_patching
    from .probe import ProbeResult, ProbeSweepResult, fit_probe, probe_sweep
    from .sites import Site, list_sites, resolve_site
    from .steer import SteeringSweep, SteeringVector, alpha_sweep, clamp, contrast_vector, steer
    from .store import ActivationStore, StoreWriter, merge_shards
    from .subspace import IllusionCheck, check_direction, illusion_check, reading_subspace, split_direction
    from .threads import limit_threads, threads_per_device, use_threads
    from .tracing import CounterfactualPairs, TracingResult, trace

__all__ = [
    "AblateFeatures", "AddVector", "Analysis", "Clamp", "Intervention", "Key", "PlanSweep", "ProbeSet", "RunContext",
    "Scorer", "SteerFeature", "SteeringPlan", "contrast_plan", "run_plan",
    "ActivationStore", "AdapterError", "FeatureAnalysis", "ProbeResult", "ProbeSweepResult",
    "analyze_features", "concept_associations", "feature_density", "fit_probe", "probe_sweep", "top_examples", "ConfigError", "ContrastError", "DomainAdapter", "Examples",
    "HookSet", "IntegrityError", "NonFiniteError", "PatchResult", "ProbeError", "SciscopeError", "ShapeError", "Site",
    "SiteError", "SteeringSweep", "SteeringVector", "StoreWriter", "activation_patching", "merge_shards",
    "alpha_sweep", "available_domains", "capture", "clamp", "collect", "contrast_vector",
    "count_hooks", "embedding_matrix", "ffn_value_vectors", "get_domain", "lens", "list_sites",
    "limit_threads", "model_identity", "pool", "register_domain", "resolve_site", "steer", "unembedding_matrix", "threads_per_device", "use_threads",
    "value_vector_lens", "BlockComponents", "block_components", "CounterfactualPairs", "TracingResult", "trace",
    "AttributionResult", "FeatureDictionary", "attribute",
    "IllusionCheck", "check_direction", "illusion_check", "reading_subspace", "split_direction",
]
