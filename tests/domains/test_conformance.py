"""The conformance suite, run over every registered adapter (and the toy one)."""

from __future__ import annotations

import pytest

from sciscope.core import available_domains
from sciscope.core.testing import check_adapter
from tests.domains.toy_adapter import ToyAdapter

ADAPTERS = {"toy": ToyAdapter, **available_domains()}


@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_adapter_conformance(name, tmp_path):
    cls = ADAPTERS[name]
    quick = getattr(cls, "test_config", {})
    report = check_adapter(cls(quick), tmp_path)
    assert report["store_rows"] > 0


def test_conformance_catches_a_broken_adapter(tmp_path):
    class NoConcepts(ToyAdapter):
        name = "broken-toy"

        @property
        def concepts(self):
            return ["label", "not_a_column"]

    with pytest.raises(AssertionError, match="not_a_column"):
        check_adapter(NoConcepts(), tmp_path)
