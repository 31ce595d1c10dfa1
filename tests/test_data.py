"""The curated tables of ``data/`` ship as ``sciscope.data`` and are found in any install."""

from __future__ import annotations

import pandas as pd
import pytest

from sciscope.data import table_path


def test_functional_group_table_ships_with_the_package() -> None:
    path = table_path("functional_groups.csv")
    table = pd.read_csv(path, comment="#")
    assert {"name", "smarts", "description"} <= set(table.columns) and len(table) >= 20


def test_missing_table_names_what_ships() -> None:
    with pytest.raises(FileNotFoundError, match="functional_groups.csv"):
        table_path("no_such_table.csv")
