"""Run configuration: pipeline keys + the adapter's keys, profiles, ``--set`` overrides, validation.

One flat mapping per run. Pipeline keys (below) control the analysis stages; the adapter's
``default_config`` keys control its data and model. Each key names the first stage it affects,
so a changed value reruns that stage and what depends on it, nothing upstream.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sciscope.core.adapter import DomainAdapter, available_domains, merge_config
from sciscope.core.errors import AdapterError, ConfigError, close_matches

#: key -> (default, first stage it affects)
PIPELINE_KEYS: dict[str, tuple[Any, str]] = {
    "seed": (0, "examples"),
    "batch_size": (64, "activations"),
    "capture_shards": (1, "activations"),  # capture split over this many jobs (cluster), then merged
    # Lightning options for every training in the run (the adapter's model, the SAE): e.g.
    # accelerator=gpu devices=4 strategy=ddp, or num_nodes=2 on a cluster
    "accelerator": ("cpu", "model"),
    "devices": (1, "model"),
    "num_nodes": (1, "model"),
    "strategy": ("auto", "model"),
    "probe_cv": (5, "probes"),
    "sae_architecture": ("topk", "sae"),
    "sae_expansion": (8, "sae"),
    "sae_k": (32, "sae"),
    "sae_steps": (2000, "sae"),
    "sae_batch_size": (512, "sae"),
    "sae_lr": (1e-3, "sae"),
    "feature_top_k": (10, "features"),
    "steer_alphas": ([-2.0, -1.0, -0.5, 0.5, 1.0, 2.0], "steering"),
    "steer_scale": ("absolute", "steering"),
    "steer_n_random": (3, "steering"),
}
PROFILES = ("quick", "full")


def resolve_adapter_spec(domain: str) -> str:
    """A spec that finds the same adapter from any working directory (files made absolute)."""
    from sciscope.pipelines.skeleton import local_domains

    if domain not in available_domains():
        domain = local_domains().get(domain, domain)
    if ":" in domain and domain.rpartition(":")[0].endswith(".py"):
        file, _, name = domain.rpartition(":")
        domain = f"{Path(file).resolve()}:{name}"
    return domain


def load_adapter_class(domain: str) -> type[DomainAdapter]:
    """A registered domain name, ``package.module:Class`` or ``path/to/file.py:Class``."""
    from sciscope.pipelines.skeleton import local_domains

    domains = available_domains()
    if domain in domains:
        return domains[domain]
    local = local_domains()
    if domain in local:
        domain = local[domain]
    if ":" not in domain:
        hint = close_matches(domain, domains)
        raise AdapterError(
            f"unknown domain {domain!r}"
            + (f"; did you mean {hint}?" if hint else f"; registered: {sorted(domains) or 'none'}")
            + " (or give module:Class / path/to/adapter.py:Class)"
        )
    target, _, cls_name = domain.rpartition(":")
    if target.endswith(".py"):
        path = Path(target).resolve()
        if not path.is_file():
            raise AdapterError(f"adapter file {path} does not exist")
        mod_name = f"sciscope_user_adapter_{abs(hash(str(path)))}"
        spec = importlib.util.spec_from_file_location(mod_name, path)
        assert spec and spec.loader
        module = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = module
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(target)
    cls = getattr(module, cls_name, None)
    if not (isinstance(cls, type) and issubclass(cls, DomainAdapter)):
        raise AdapterError(f"{domain!r} does not name a DomainAdapter subclass")
    return cls


def parse_sets(items: Sequence[str]) -> dict[str, str]:
    """``["key=value", ...]`` -> dict (values stay strings; types come from the defaults)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def resolve_config(
    cls: type[DomainAdapter], *, profile: str = "quick", overrides: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Defaults <- the adapter's profile <- overrides, validated; returns the flat run config."""
    if profile not in PROFILES:
        raise ConfigError(f"unknown profile {profile!r}; choose one of {PROFILES}")
    pipeline_defaults = {k: v for k, (v, _) in PIPELINE_KEYS.items()}
    profiles = getattr(cls, "profiles", {}) or {}
    merged = {**pipeline_defaults, **cls.default_config}
    merged = merge_config(f"profile {profile!r} of {cls.name}", merged, profiles.get(profile, {}))
    merged = merge_config("--set", merged, overrides or {})
    # the adapter validates its own keys (types, allowed values) once more
    cls.validate_config({k: merged[k] for k in cls.default_config})
    _check_pipeline_values(merged)
    merged["profile"] = profile
    return merged


def _check_pipeline_values(cfg: Mapping[str, Any]) -> None:
    from sciscope.core.sae import available_saes

    positive = ["batch_size", "capture_shards", "devices", "num_nodes", "probe_cv", "sae_expansion", "sae_k", "sae_steps", "sae_batch_size", "steer_n_random"]
    for key in positive:
        if cfg[key] <= 0 and not (key == "steer_n_random" and cfg[key] == 0):
            raise ConfigError(f"config key {key!r} must be positive, got {cfg[key]!r}")
    if cfg["probe_cv"] < 2:
        raise ConfigError(f"config key 'probe_cv' must be at least 2, got {cfg['probe_cv']}")
    if cfg["sae_architecture"] not in available_saes():
        raise ConfigError(f"config key 'sae_architecture': {cfg['sae_architecture']!r} is not one of {available_saes()}")
    if cfg["steer_scale"] not in ("absolute", "relative"):
        raise ConfigError(f"config key 'steer_scale' must be 'absolute' or 'relative', got {cfg['steer_scale']!r}")
    try:
        [float(a) for a in cfg["steer_alphas"]]
    except (TypeError, ValueError):
        raise ConfigError(f"config key 'steer_alphas' must be numbers, got {cfg['steer_alphas']!r}") from None


def stage_of_key(cls: type[DomainAdapter], key: str) -> str:
    """The first stage a config key affects."""
    if key in PIPELINE_KEYS:
        return PIPELINE_KEYS[key][1]
    return (getattr(cls, "config_stages", {}) or {}).get(key, "examples")


def adapter_config(cls: type[DomainAdapter], cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Only the adapter's own keys of a run config."""
    return {k: cfg[k] for k in cls.default_config if k in cfg}
