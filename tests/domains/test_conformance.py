"""The conformance suite, run over every registered adapter (and the toy one)."""

from __future__ import annotations

import pytest

from sciscope.core import available_domains
from sciscope.core.testing import check_adapter
from tests.domains.experiment_adapter import PlantedAdapter
from tests.domains.toy_adapter import ToyAdapter

ADAPTERS = {"toy": ToyAdapter, "planted": PlantedAdapter, **available_domains()}


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


def test_conformance_catches_an_analysis_after_an_unknown_stage(tmp_path):
    from sciscope.core.experiment import Analysis

    class Misplaced(ToyAdapter):
        name = "misplaced-toy"

        def analyses(self):
            return [Analysis("early", "before_everything", lambda ctx: [])]

    with pytest.raises(AssertionError, match="unknown stage 'before_everything'"):
        check_adapter(Misplaced(), tmp_path)
