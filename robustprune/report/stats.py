"""Statistics behind the tables: a 95 % confidence interval over seeds, and a paired bootstrap over
seeds and images for the difference between two models evaluated on the same test images."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import numpy as np

RESAMPLES = 2000
LEVEL = 0.95


def ci95(values: list[float]) -> tuple[float, float] | None:
    """Student-t interval of the mean over seeds; None with fewer than two values."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    if len(values) < 2:
        return None
    from scipy.stats import t

    mean, sem = statistics.fmean(values), statistics.stdev(values) / math.sqrt(len(values))
    half = float(t.ppf(0.5 + LEVEL / 2, len(values) - 1)) * sem
    return mean - half, mean + half


@dataclass(frozen=True)
class Difference:
    """Mean accuracy difference a - b (a fraction), its bootstrap interval and two-sided p-value."""

    mean: float
    low: float
    high: float
    p: float
    seeds: int

    @property
    def significant(self) -> bool:
        return self.low > 0 or self.high < 0


def paired_bootstrap(
    pairs: list[tuple[np.ndarray, np.ndarray]], resamples: int = RESAMPLES, seed: int = 0
) -> Difference | None:
    """pairs: per seed, which images model a and model b got right (bool arrays over the same images).
    Each resample draws the seeds with replacement and, within each seed, the images with
    replacement (the same images for both models), and averages the per-seed differences.

    The per-image difference is -1, 0 or +1, so resampling n images is a multinomial draw of how
    many of each: exact, and O(resamples) instead of O(resamples x images)."""
    pairs = [(np.asarray(a, bool), np.asarray(b, bool)) for a, b in pairs if len(a) and len(a) == len(b)]
    if not pairs:
        return None
    rng = np.random.default_rng(seed)
    per_seed = np.empty((len(pairs), resamples))
    observed = []
    for s, (a, b) in enumerate(pairs):
        n = len(a)
        up, down = int((a & ~b).sum()), int((~a & b).sum())
        observed.append((up - down) / n)
        counts = rng.multinomial(n, [up / n, down / n, 1 - (up + down) / n], size=resamples)
        per_seed[s] = (counts[:, 0] - counts[:, 1]) / n
    picks = rng.integers(len(pairs), size=(resamples, len(pairs))) if len(pairs) > 1 else np.zeros((resamples, 1), int)
    boot = per_seed[picks, np.arange(resamples)[:, None]].mean(axis=1)
    low, high = np.quantile(boot, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
    p = min(1.0, 2 * min(float((boot <= 0).mean()), float((boot >= 0).mean())))
    return Difference(float(np.mean(observed)), float(low), float(high), p, len(pairs))


def pooled(cell: dict, metrics: list[str]) -> np.ndarray | None:
    """A cell's per-image results over several metrics, one after the other (a mean over those
    metrics' equally sized image sets is their pooled mean); None when one is missing."""
    stored = cell.get("per_image") or {}
    if not metrics or any(m not in stored for m in metrics):
        return None
    return np.concatenate([stored[m] for m in metrics])
