"""A headline number read against the strongest simple baseline, in words.

A shuffled-label control only shows that a number is not chance. The question a sceptical reviewer
asks first is whether something simpler explains it -- a one-hot of the country named in the
prompt, a bag of words of the instruction, PCA of the expression matrix, a fingerprint. Every
headline that has such a baseline carries it beside the shuffled control, and a verdict that
follows from the numbers alone:

- ``"above baseline"``: better than the baseline by more than the margin;
- ``"no better than baseline"``: within the margin;
- ``"below baseline"``: worse by more than the margin.

The margin is the uncertainty of the difference where the spread of both scores over the same
folds is known (:func:`verdict_from_folds`: twice the standard error of the difference), else a
tolerance the caller states (0 by default: any difference counts).
"""

from __future__ import annotations

import math

ABOVE, NO_BETTER, BELOW = "above baseline", "no better than baseline", "below baseline"
#: The margin of a fraction in [0, 1] read once, without a spread (explained variance, loss
#: recovered, balanced accuracy, F1, a unit statistic's maximum against PCA or the raw units):
#: a difference this small is "no better than baseline", not a win or a loss.
FRACTION_MARGIN = 0.005
#: the three verdicts, best first
VERDICTS: tuple[str, ...] = (ABOVE, NO_BETTER, BELOW)


def verdict(value: float | None, baseline: float | None, *, higher_is_better: bool = True,
            tolerance: float = 0.0) -> str | None:
    """The verdict of ``value`` against ``baseline`` (None when either is missing or not finite).

    Parameters
    ----------
    value, baseline
        The headline number and the baseline's, on the same scale and data.
    higher_is_better
        False for errors and losses.
    tolerance
        A difference of at most this much (in the metric's units) is "no better than baseline".
    """
    if value is None or baseline is None:
        return None
    value, baseline = float(value), float(baseline)
    if not (math.isfinite(value) and math.isfinite(baseline)):
        return None
    if tolerance < 0 or not math.isfinite(tolerance):
        raise ValueError(f"tolerance must be a finite number >= 0, got {tolerance}")
    gain = (value - baseline) if higher_is_better else (baseline - value)
    if gain > tolerance:
        return ABOVE
    if gain < -tolerance:
        return BELOW
    return NO_BETTER


def verdict_from_folds(mean: float, std: float, baseline_mean: float, baseline_std: float, n_folds: int, *,
                       higher_is_better: bool = True, z: float = 2.0) -> str | None:
    """The verdict of a cross-validated score against a baseline scored on the same folds.

    The margin is ``z`` standard errors of the difference of the two fold means,
    ``sqrt((std^2 + baseline_std^2) / n_folds)`` (the folds treated as independent draws, which
    they are not quite: the margin is a floor, not a test).
    """
    if n_folds < 1:
        raise ValueError(f"n_folds must be >= 1, got {n_folds}")
    spread = math.sqrt((float(std) ** 2 + float(baseline_std) ** 2) / n_folds)
    return verdict(mean, baseline_mean, higher_is_better=higher_is_better,
                   tolerance=z * spread if math.isfinite(spread) else 0.0)


__all__ = ["ABOVE", "BELOW", "FRACTION_MARGIN", "NO_BETTER", "VERDICTS", "verdict", "verdict_from_folds"]
