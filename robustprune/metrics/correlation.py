"""Pearson correlation between generalization and robustness over a study's settings (Jordão &
Pedrini, Fig. 4: r between clean accuracy and accuracy under an attack of the pruned models). The
unit is the setting: its seeds are averaged into one point before r and its p-value."""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import NamedTuple

import numpy as np
from scipy import stats


class Correlation(NamedTuple):
    r: float
    p: float  # two-sided p-value of r = 0
    n: int  # number of (x, y) points used: settings, for generalization_vs_robustness


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
    rows: Iterable[Mapping],
    gen_metric: str = "acc_clean",
    rob_metric: str = "acc_adv:fgsm@0.1",
    setting: Callable[[Mapping], Hashable] | None = None,
) -> Correlation:
    """Pearson r between `gen_metric` and `rob_metric` over independent settings.

    rows: dicts of metrics, or cells of the result store ({"axes": ..., "metrics": ...}). Rows of
    one setting (by default, for cells, the same axes but the seed; else `setting(row)`) are first
    averaged into one point: the seeds of a setting are not independent settings, and counting them
    as such would shrink p. Without cells or `setting`, each row must be its own setting. Rows
    missing either metric, or holding NaN, are left out; n counts the points (settings) used. r and
    p are NaN as in `pearson`."""
    points: dict[Hashable, list[tuple[float, float]]] = {}
    for i, row in enumerate(rows):
        metrics = row["metrics"] if "metrics" in row and "axes" in row else row
        x, y = metrics.get(gen_metric), metrics.get(rob_metric)
        if x is None or y is None or not (math.isfinite(x) and math.isfinite(y)):
            continue
        key = setting(row) if setting else _setting_of(row) if "axes" in row else i
        points.setdefault(key, []).append((x, y))
    xs = [float(np.mean([x for x, _ in p])) for p in points.values()]
    ys = [float(np.mean([y for _, y in p])) for p in points.values()]
    r, p = pearson(xs, ys)
    return Correlation(r, p, len(xs))


def _setting_of(cell: Mapping) -> Hashable:
    """A stored cell's axes without its seed."""
    return tuple(sorted((k, repr(v)) for k, v in cell["axes"].items() if k != "seed"))
