"""Pearson correlation between generalization and robustness over a study's settings (Jordão &
Pedrini, Fig. 4: r between clean accuracy and accuracy under an attack of the pruned models)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple

import numpy as np
from scipy import stats


class Correlation(NamedTuple):
    r: float
    p: float  # two-sided p-value of r = 0
    n: int  # number of (x, y) pairs used


def _clean_pairs(xs: Sequence[float], ys: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(list(xs), dtype=float)
    y = np.asarray(list(ys), dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"pearson needs two equally long sequences of numbers, got {x.shape} and {y.shape}")
    keep = np.isfinite(x) & np.isfinite(y)
    return x[keep], y[keep]


def pearson(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """(r, p) of scipy.stats.pearsonr over the pairs where both values are finite (a failed or
    missing measurement, NaN, drops its pair).

    Returns (nan, nan) instead of a number when r says nothing: fewer than 3 pairs (with 2 points r
    is always +-1 and p is 1) or a constant sequence (r is 0/0; scipy would warn and return nan)."""
    x, y = _clean_pairs(xs, ys)
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan, math.nan
    res = stats.pearsonr(x, y)
    return float(res.statistic), float(res.pvalue)


def generalization_vs_robustness(
    rows: Iterable[Mapping[str, float]], gen_metric: str = "acc_clean", rob_metric: str = "acc_adv:fgsm@0.1"
) -> Correlation:
    """Pearson r between `gen_metric` and `rob_metric` over rows of metrics (one dict per pruned
    model or setting, e.g. rows of the result store or of single_element_study). Rows missing either
    metric, or holding NaN, are left out; n counts the rows used. r and p are NaN as in `pearson`."""
    pairs = [(row[gen_metric], row[rob_metric]) for row in rows if gen_metric in row and rob_metric in row]
    x, y = _clean_pairs([a for a, _ in pairs], [b for _, b in pairs])
    r, p = pearson(x, y)
    return Correlation(r, p, len(x))
