"""Small curated tables written for this project (``sciscope.data``), shipped inside the package.

Read them with :func:`table_path`, which works for editable installs and wheels alike.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

__all__ = ["table_path"]


def table_path(name: str) -> Path:
    """Path of a bundled table, e.g. ``table_path("functional_groups.csv")``.

    Raises
    ------
    FileNotFoundError
        When no such table ships with this install (the message lists the ones that do).
    """
    folder = resources.files(__name__)
    path = Path(str(folder / name))
    if not path.is_file():
        have = sorted(p.name for p in folder.iterdir() if p.name.endswith(".csv"))
        raise FileNotFoundError(f"sciscope.data has no table {name!r}; it ships {have}")
    return path
