"""Statistics for comparing models, with the seed as the unit of replication.

A difference between two settings is only claimed over seeds: each seed trains its own models,
so the spread of the per-seed differences holds the training noise that a difference must beat.
One seed gives an interval over test images only (test-set noise, not training noise), which a
table may show but never mark as significant. Many comparisons in one table are corrected with
Holm's step-down method."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import special

LEVEL = 0.95
# Per-seed differences of accuracies stored as floats can differ in the 17th digit; a spread below
# this is no spread (accuracies move in steps of 1/images, far above it).
ZERO = 1e-12


@dataclass(frozen=True)
class Interval:
    """The mean paired difference a - b (fractions: 0.012 = 1.2 p.p.), its interval and p-value."""

    mean: float
    low: float
    high: float
    p: float  # two-sided p-value of "no difference"
    n: int  # seeds (unit "seeds") or images (unit "images")
    unit: str  # "seeds" or "images"

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def _interval(diff: np.ndarray, level: float, unit: str, t_test: bool) -> Interval:
    n, mean = len(diff), float(diff.mean())
    sd = float(diff.std(ddof=1))
    if sd < ZERO * max(1.0, abs(mean)):
        return Interval(mean, mean, mean, 0.0 if abs(mean) > ZERO else 1.0, n, unit)
    se = sd / math.sqrt(n)
    # scipy.special's t and normal distribution functions: the same numbers as scipy.stats.t / norm,
    # without their per-call overhead (a simulation calls this thousands of times)
    if t_test:
        quantile, p = special.stdtrit(n - 1, 0.5 + level / 2), 2 * special.stdtr(n - 1, -abs(mean) / se)
    else:
        quantile, p = special.ndtri(0.5 + level / 2), 2 * special.ndtr(-abs(mean) / se)
    half = float(quantile) * se
    return Interval(mean, mean - half, mean + half, min(float(p), 1.0), n, unit)


def paired_seeds(a: Sequence[float], b: Sequence[float], level: float = LEVEL) -> Interval | None:
    """a_i - b_i over seeds i (a seed missing or NaN on either side drops its pair): Student-t
    interval with n - 1 degrees of freedom and the one-sample t-test of mean 0. None with fewer than
    two pairs. With no spread the interval is the mean, and p is 0 (or 1 when the mean is 0)."""
    x = np.array([math.nan if v is None else v for v in a], dtype=float)
    y = np.array([math.nan if v is None else v for v in b], dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"paired_seeds needs two equally long sequences, got {x.shape} and {y.shape}")
    keep = np.isfinite(x) & np.isfinite(y)
    if keep.sum() < 2:
        return None
    return _interval(x[keep] - y[keep], level, "seeds", t_test=True)


def paired_images(a: np.ndarray, b: np.ndarray, level: float = LEVEL) -> Interval | None:
    """One seed: per-image scores in [0, 1] of two models on the same images (for a column that
    averages several metrics, each image's mean over them). Normal interval of the mean per-image
    difference, sd / sqrt(n). It holds test-set noise only, never training noise: something to
    show beside a number, not grounds for a significance mark. None with fewer than two images."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"paired_images needs two per-image arrays of one shape, got {x.shape} and {y.shape}")
    if len(x) < 2:
        return None
    return _interval(x - y, level, "images", t_test=False)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values in the input order: the k-th smallest of m is multiplied
    by m - k + 1, made monotone and capped at 1. NaN stays NaN and does not count in m."""
    p = np.array(pvalues, dtype=float)
    out = np.full(p.shape, math.nan)
    finite = np.flatnonzero(~np.isnan(p))
    m = len(finite)
    if m:
        order = finite[np.argsort(p[finite], kind="stable")]
        scaled = p[order] * (m - np.arange(m))
        out[order] = np.minimum(np.maximum.accumulate(scaled), 1.0)
    return out.tolist()


def ci95(values) -> tuple[float, float] | None:
    """Student-t 95 % interval of a mean over seeds; None/NaN are left out; None with fewer than two."""
    x = np.array([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    if len(x) < 2:
        return None
    mean, se = float(x.mean()), float(x.std(ddof=1)) / math.sqrt(len(x))
    half = float(special.stdtrit(len(x) - 1, 0.975)) * se
    return mean - half, mean + half
