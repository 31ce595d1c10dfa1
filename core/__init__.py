"""sciscope.core — the domain-agnostic toolkit.

capture -> ActivationStore -> probe / steer / sae / features / patch / lens.
"""

from .adapter import DomainAdapter, Examples, available_domains, get_domain, register_domain
from .capture import capture, collect, model_identity, pool
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
from .threads import limit_threads, threads_per_device, use_threads

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
    "value_vector_lens",
]
