"""Errors raised by sciscope.

Every error names the offending item (the site, the column, the file, the key) so a user can fix
the input without reading a traceback.  All of them derive from :class:`SciscopeError`, which the
CLI turns into a one-line message and a non-zero exit code.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class SciscopeError(Exception):
    """Base class of every error sciscope raises on purpose."""


class SiteError(SciscopeError, KeyError):
    """A site (module path + side) that the model does not have."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class ShapeError(SciscopeError, ValueError):
    """Arrays or vectors whose shapes do not fit together."""


class NonFiniteError(SciscopeError, ValueError):
    """NaN or inf where finite numbers are required."""


class ContrastError(SciscopeError, ValueError):
    """A steering contrast whose groups are empty or ill-defined."""


class ProbeError(SciscopeError, ValueError):
    """A probe target that cannot be fitted (one class, NaN, too few rows)."""


class ConfigError(SciscopeError, ValueError):
    """A configuration key or value that is unknown or invalid."""


class AdapterError(SciscopeError, RuntimeError):
    """A domain adapter that is missing, broken or does not follow the contract."""


class IntegrityError(SciscopeError):
    """A file that is truncated or changed since sciscope wrote it (a store array, an SAE's weights
    or config): its checksum or size no longer matches the one recorded at write time."""


class UnknownDomainError(AdapterError, ConfigError):
    """A domain name that no adapter is registered under (a usage error: the CLI exits 2)."""


def close_matches(name: str, candidates: Iterable[str], n: int = 5) -> list[str]:
    """Return up to ``n`` candidates that look like ``name`` (for "did you mean" messages)."""
    candidates = list(candidates)
    matches = difflib.get_close_matches(name, candidates, n=n, cutoff=0.5)
    if not matches:
        # Fall back to substring matches: "layer.3" should find "encoder.layer.3.output".
        matches = [c for c in candidates if name in c or c in name][:n]
    return matches
