"""The quality table's measures on planted cases: each finds what was planted and not what was not."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from sciscope.core.sae.quality import (
    best_unit_f1,
    binary_targets,
    decoder_duplicates,
    k_sparse_probe,
    stability,
)

rng = np.random.default_rng(0)
N, U = 600, 50
Y = rng.random(N) < 0.3
UNITS = rng.standard_normal((N, U))
UNITS[:, 17] += 3.0 * Y  # one unit carries the concept


def test_binary_targets_take_booleans_two_valued_and_one_vs_rest_columns_only():
    obs = pd.DataFrame({"flag": Y, "kind": np.where(Y, "a", np.where(rng.random(N) < 0.5, "b", "c")),
                        "size": rng.random(N), "const": 1, "pair": np.where(Y, 5, 7)})
    t = binary_targets(obs, ["flag", "kind", "size", "const", "pair", "missing"])
    assert sorted(t) == ["flag", "kind=a", "kind=b", "kind=c", "pair"]
    assert t["flag"].dtype == bool and (t["kind=a"] == Y).all() and (t["pair"] == ~Y).all()  # 7 > 5 is "positive"


def test_k_sparse_probing_finds_the_planted_unit_and_random_units_do_not():
    train, test = slice(0, 400), slice(400, N)
    acc = k_sparse_probe(UNITS[train], Y[train], UNITS[test], Y[test], k=1)
    assert acc > 0.9
    without = np.delete(UNITS, 17, axis=1)
    assert k_sparse_probe(without[train], Y[train], without[test], Y[test], k=1) < 0.65
    assert k_sparse_probe(without[train], Y[train], without[test], Y[test], k=5) < 0.7


def test_best_unit_f1_picks_the_planted_unit_on_validation_and_scores_it_on_test():
    f1, unit, thr = best_unit_f1(UNITS[:300], Y[:300], UNITS[300:], Y[300:])
    assert unit == 17 and f1 > 0.8 and np.isfinite(thr)
    f1_none, _, _ = best_unit_f1(np.delete(UNITS, 17, 1)[:300], Y[:300], np.delete(UNITS, 17, 1)[300:], Y[300:])
    assert f1_none < 0.55  # the best of 49 noise units, chosen on validation, does not carry over to test


def test_duplicates_and_stability():
    w = rng.standard_normal((20, 8))
    dup = np.vstack([w, w[:3] * 2.0 + 0.01 * rng.standard_normal((3, 8))])  # three near-copies of live rows
    live = np.ones(len(dup), bool)
    assert decoder_duplicates(w, np.ones(20, bool)) == 0
    assert decoder_duplicates(dup, live) == 3
    live[-3:] = False
    assert decoder_duplicates(dup, live) == 0  # dead latents do not count
    assert stability(w, w[::-1], np.ones(20, bool)) == pytest.approx(1.0)
    assert stability(w, rng.standard_normal((20, 8)), np.ones(20, bool)) < 0.9


def test_targets_are_read_against_their_bars_and_a_miss_is_said_in_words():
    from sciscope.core.sae.quality import target_checks

    table = pd.DataFrame([
        {"metric": "explained variance (held-out)", "sae": 0.53, "pca": 0.58, "raw_units": 1.0, "random_directions": np.nan},
        {"metric": "loss recovered", "sae": 0.95, "pca": 0.97, "raw_units": 1.0, "random_directions": np.nan},
        {"metric": "live fraction (held-out)", "sae": 0.07, "pca": 1.0, "raw_units": 1.0, "random_directions": 1.0},
    ])
    t = target_checks(table).set_index("target")
    ev, lr, live, probe = t.index
    assert t.met[ev] is False and "MISSED: SAE 0.530 < PCA 0.580" in t.words[ev]
    assert t.met[lr] is True and t.bar[lr] == 0.9
    assert t.met[live] is False and "MISSED: SAE 0.070 < 0.500;" in t.words[live]
    assert t.met[probe] is None and t.words[probe] == "not measured in this run"


def test_the_headline_reads_each_measure_against_the_stronger_of_pca_and_raw_units(tmp_path):
    """Constructed tables: raw units ahead of the SAE must read "below baseline", the SAE a hair
    below PCA (within the stated margin) "no better than baseline", and ahead of both "above"."""
    import json

    from sciscope.core.sae.quality import quality_headline
    from sciscope.core.verdict import ABOVE, BELOW, NO_BETTER
    from sciscope.pipelines.layout import write_headline

    k1 = "k=1 sparse probing, mean balanced accuracy"
    for sae, pca, raw, expected, label in ((0.70, 0.60, 0.75, BELOW, "raw units"), (0.787, 0.79, 0.70, NO_BETTER, "PCA components"),
                                           (0.80, 0.79, 0.70, ABOVE, "PCA components")):
        table = pd.DataFrame([{"metric": k1, "sae": sae, "pca": pca, "raw_units": raw, "random_directions": 0.55}])
        write_headline(tmp_path, quality_headline(table))
        row = next(r for r in json.loads((tmp_path / "headline.json").read_text()) if r["name"] == f"SAE {k1}")
        assert row["control"] == 0.55 and row["baseline"] == max(pca, raw) and row["verdict"] == expected, row
        assert row["baseline_label"].startswith(label)
