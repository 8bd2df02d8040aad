"""The report's comparisons of a pruned setting with the dense model of the same architecture,
regime and seeds, and the marks they give a table (the statistics are in robustprune.stats).

- With two or more seeds both have: a paired t-test over seeds of the per-seed values the table
  shows. The cell waits as a `Compared` until the whole table is built; `finish` then marks it ' *'
  when its p-value, Holm-corrected across all of that table's tests, is below ALPHA.
- With one seed: the 95 % interval over that seed's test images (from the stored per-image
  results), shown beside the number and never marked: it leaves out training noise."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from robustprune.stats import Interval, holm, paired_images, paired_seeds

SIGNIFICANT = " *"
ALPHA = 0.05


def per_image(cell: dict, metrics: list[str]) -> np.ndarray | None:
    """Each image's share of `metrics` that the model got right (0 or 1 for one metric): a column
    that averages metrics on the same images averages them per image. None when one is missing or
    they cover different numbers of images."""
    stored = cell.get("per_image") or {}
    if not metrics or any(m not in stored for m in metrics):
        return None
    arrays = [np.asarray(stored[m], dtype=float) for m in metrics]
    if len({a.shape for a in arrays}) != 1:
        return None
    return np.mean(arrays, axis=0)


def _finite(v) -> bool:
    return v is not None and not math.isnan(v)


def compare(
    pruned: list[dict], dense_by_seed: dict, value: Callable[[dict], float | None], metrics: list[str]
) -> Interval | None:
    """pruned - dense over the seeds both have a value for: `paired_seeds` of `value` (the per-seed
    number the table shows) with two or more, else `paired_images` of the one seed's per-image
    results of `metrics`; None when there is nothing to compare."""
    pairs = []
    for c in pruned:
        base = dense_by_seed.get(c["axes"]["seed"])
        if base is not None and _finite(value(c)) and _finite(value(base)):
            pairs.append((c, base))
    if len(pairs) >= 2:
        return paired_seeds([value(c) for c, _ in pairs], [value(b) for _, b in pairs])
    if pairs:
        a, b = per_image(pairs[0][0], metrics), per_image(pairs[0][1], metrics)
        if a is not None and b is not None and a.shape == b.shape:
            return paired_images(a, b)
    return None


def interval_text(diff: Interval) -> str:
    """'[+0.2, +1.4]': the interval of the difference in p.p."""
    return f"[{100 * diff.low:+.1f}, {100 * diff.high:+.1f}]"


class Compared(str):
    """A table cell compared with the dense model. Its text is final except for the mark, which
    `finish` adds once every test of the table is known (Holm needs them all). `suffix` goes after
    the mark (Table 1's round)."""

    diff: Interval
    text: str
    suffix: str

    def __new__(cls, text: str, diff: Interval, suffix: str = ""):
        shown = f"{text} {interval_text(diff)}" if diff.unit == "images" else text
        obj = super().__new__(cls, shown + suffix)
        obj.diff, obj.text, obj.suffix = diff, shown, suffix
        return obj


def compared(text: str, diff: Interval | None, suffix: str = "") -> str:
    """The cell text for a comparison: a `Compared` awaiting its mark, or plain text when nothing
    was compared."""
    if diff is None or text == "—":
        return text + suffix
    return Compared(text, diff, suffix)


@dataclass
class Family:
    """What one table compared: the seed counts of its t-tests (Holm's m = len(seeds)), the marks
    they earned, and whether it shows one-seed intervals over images."""

    seeds: list[int]
    marks: int
    images: bool

    @property
    def tests(self) -> int:
        return len(self.seeds)


def finish(rows: list[list[str]]) -> tuple[list[list[str]], Family]:
    """Plain-text rows with ' *' on every comparison over seeds whose Holm-adjusted p-value across
    the whole table is below ALPHA; and what the table compared."""
    tested = [(i, j, v) for i, r in enumerate(rows) for j, v in enumerate(r) if isinstance(v, Compared)]
    over_seeds = [(i, j, v) for i, j, v in tested if v.diff.unit == "seeds"]
    adjusted = holm([v.diff.p for _, _, v in over_seeds])
    out = [[str.__str__(v) for v in r] for r in rows]
    marks = 0
    for (i, j, v), p in zip(over_seeds, adjusted):
        significant = p < ALPHA
        marks += significant
        out[i][j] = v.text + (SIGNIFICANT if significant else "") + v.suffix
    family = Family([v.diff.n for _, _, v in over_seeds], marks, any(v.diff.unit == "images" for _, _, v in tested))
    return out, family


def family_notes(family: Family) -> list[str]:
    """The table notes that state the rule behind its marks and intervals."""
    out = []
    if family.tests:
        lo, hi = min(family.seeds), max(family.seeds)
        seeds = f"{lo}" if lo == hi else f"{lo}–{hi}"
        out.append(
            f"* = the difference from the dense model of the same architecture and seeds is significant: paired "
            f"t-test over {seeds} seeds, Holm-corrected across this table's {family.tests} "
            f"comparison{'s' if family.tests > 1 else ''}, adjusted p < {ALPHA:g}."
        )
    if family.images:
        out.append(
            "[low, high] = with one seed, the 95 % interval (p.p.) of the difference from the dense model of the "
            "same seed over the test images only: training noise is not included, and no significance is claimed."
        )
    return out
