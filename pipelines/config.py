"""Run configuration: pipeline keys + the adapter's keys, profiles, ``--set`` overrides, validation.

One flat mapping per run. Pipeline keys (below) control the analysis stages; the adapter's
``default_config`` keys control its data and model. Each key names the first stage it affects,
so a changed value reruns that stage and what depends on it, nothing upstream.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sciscope.core.adapter import DomainAdapter, available_domains, find_domain, merge_config
from sciscope.core.config import PIPELINE_KEYS as CORE_PIPELINE_KEYS
from sciscope.core.config import check_keys, pipeline_defaults
from sciscope.core.errors import AdapterError, ConfigError, UnknownDomainError, close_matches

#: The pipeline's keys (default, range, first stage it affects) live in the core's key table.
PIPELINE_KEYS = CORE_PIPELINE_KEYS
PROFILES = ("quick", "full")


def resolve_adapter_spec(domain: str) -> str:
    """A spec that finds the same adapter from any working directory (files made absolute)."""
    from sciscope.pipelines.skeleton import local_domains

    if find_domain(domain) is None:
        domain = local_domains().get(domain, domain)
    if ":" in domain and domain.rpartition(":")[0].endswith(".py"):
        file, _, name = domain.rpartition(":")
        domain = f"{Path(file).resolve()}:{name}"
    return domain


def load_adapter_class(domain: str) -> type[DomainAdapter]:
    """A registered domain name, ``package.module:Class`` or ``path/to/file.py:Class``."""
    from sciscope.pipelines.skeleton import local_domains

    found = find_domain(domain)
    if found is not None:
        return found
    local = local_domains()
    if domain in local:
        domain = local[domain]
    if ":" not in domain:
        domains = available_domains()
        hint = close_matches(domain, domains)
        raise UnknownDomainError(
            f"unknown domain {domain!r}"
            + (f"; did you mean {hint}?" if hint else f"; registered: {sorted(domains) or 'none'}")
            + " (or give module:Class / path/to/adapter.py:Class)"
        )
    from sciscope.core.loading import load_object

    try:
        cls = load_object(domain, what="Class", key="domain")
    except ConfigError as e:
        raise AdapterError(str(e)) from None
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
    profiles = getattr(cls, "profiles", {}) or {}
    merged = {**pipeline_defaults(), **cls.default_config}
    merged = merge_config(f"profile {profile!r} of {cls.name}", merged, profiles.get(profile, {}))
    merged = merge_config("--set", merged, overrides or {})
    # the adapter validates its own keys (types, allowed values) once more
    cls.validate_config({k: merged[k] for k in cls.default_config})
    _check_pipeline_values(merged)
    merged["profile"] = profile
    return merged


def _check_pipeline_values(cfg: Mapping[str, Any]) -> None:
    from sciscope.core.sae import available_saes

    check_keys("pipeline", PIPELINE_KEYS, cfg)
    if cfg["sae_architecture"] not in available_saes():
        raise ConfigError(f"config key 'sae_architecture': {cfg['sae_architecture']!r} is not one of {available_saes()}")
    try:
        [float(a) for a in cfg["steer_alphas"]]
    except (TypeError, ValueError):
        raise ConfigError(f"config key 'steer_alphas' must be numbers, got {cfg['steer_alphas']!r}") from None


def stage_of_key(cls: type[DomainAdapter], key: str) -> str:
    """The first stage a config key affects."""
    if key in PIPELINE_KEYS:
        return PIPELINE_KEYS[key].stage
    return (getattr(cls, "config_stages", {}) or {}).get(key, "examples")


def adapter_config(cls: type[DomainAdapter], cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Only the adapter's own keys of a run config."""
    return {k: cfg[k] for k in cls.default_config if k in cfg}
