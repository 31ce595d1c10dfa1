"""Verdicts follow the numbers: a constructed case where the baseline wins reads so."""

from __future__ import annotations

import math

import pytest

from sciscope.core.verdict import ABOVE, BELOW, NO_BETTER, verdict, verdict_from_folds


def test_the_verdict_follows_the_numbers_in_both_senses():
    assert verdict(0.80, 0.60) == ABOVE
    assert verdict(0.60, 0.80) == BELOW
    assert verdict(0.70, 0.70) == NO_BETTER
    assert verdict(0.61, 0.60, tolerance=0.05) == NO_BETTER  # within the stated margin
    assert verdict(1.0, 2.0, higher_is_better=False) == ABOVE  # a lower error beats the baseline's
    assert verdict(None, 0.5) is None and verdict(0.5, math.nan) is None
    with pytest.raises(ValueError, match="tolerance"):
        verdict(1.0, 0.5, tolerance=-1)


def test_a_baseline_that_matches_the_model_within_fold_noise_reads_no_better():
    # geospatial latitude: model 0.618 +- 0.10 over 5 folds, country one-hot 0.666 +- 0.10
    assert verdict_from_folds(0.618, 0.10, 0.666, 0.10, 5) == NO_BETTER
    # the same gap with tight folds is a real loss ...
    assert verdict_from_folds(0.618, 0.01, 0.666, 0.01, 5) == BELOW
    # ... and a large gain is a real gain
    assert verdict_from_folds(0.757, 0.05, 0.581, 0.08, 5) == ABOVE
    with pytest.raises(ValueError, match="n_folds"):
        verdict_from_folds(0.5, 0.1, 0.4, 0.1, 0)
