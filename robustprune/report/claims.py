"""A paper's central claims, measured (`robustprune report DIR --claims`).

Each claim in a study file compares two arms (a model, or several averaged) on one metric. The
seed is the unit of replication: the difference a - b is paired per seed, its interval is a
Student-t interval over the seeds, and the p-values of one paper's claims are Holm-corrected
together. A verdict never reads a floor as a finding: a claim whose arms sit at the floor (robust
accuracy under 2 %) or far from the paper's clean accuracy is *not measurable*."""

from __future__ import annotations

import csv
import io
import math
import statistics
from dataclasses import dataclass

from robustprune.errors import UserError
from robustprune.evaluation import names
from robustprune.report.base import Table
from robustprune.report.paper_tables import column_metric
from robustprune.stats import Interval, holm, paired_seeds
from robustprune.study.schema import Arm, Claim, StudyConfig

ALPHA = 0.05
ROBUST_FLOOR = 0.02  # an arm's robust accuracy under this reads nothing but the floor
CLEAN_GAP = 10.0  # p.p.: an arm this far under the paper's clean accuracy is another experiment
NOT_ROBUST = ("acc_clean", names.VALIDATION)  # metrics that are not robust accuracies (no floor check)

HOLDS, CONTRADICTED, NO_EFFECT, INCONCLUSIVE, NOT_MEASURABLE, NOT_RUN = (
    "holds",
    "contradicted",
    "no effect",
    "inconclusive",
    "not measurable",
    "not run",
)


@dataclass
class Measured:
    """One claim as measured: each arm's per-seed value (fractions), the paired difference and the verdict."""

    claim: Claim
    a: dict[int, float]
    b: dict[int, float]
    diff: Interval | None
    p_holm: float
    verdict: str
    reason: str

    @property
    def seeds(self) -> int:
        return len(set(self.a) & set(self.b))


def metric_names(study: StudyConfig, claim: Claim) -> list[str]:
    """A claim's metrics as stored: metric names pass through, table column sources are resolved."""
    return [m if m.startswith("acc_") or m == names.VALIDATION else column_metric(study, m) for m in claim.metrics()]


def _default_regime(study: StudyConfig, arm: Arm) -> str:
    return arm.regime or next(iter(study.regimes))


def _candidates(arm: Arm) -> list[Arm]:
    """The single models an arm chooses among: one per pruning entry it lists."""
    return [arm.model_copy(update={"pruning": p}) for p in arm.prunings()]


def _is_candidate(arm: Arm, axes: dict) -> bool:
    if arm.round == "best":  # any lottery round of the entry
        return arm.pruning == axes["pruning"] and axes["round"] is not None and arm.model in (None, axes.get("model"))
    return arm.matches(axes)


def arm_cells(study: StudyConfig, cells: list[dict], arm: Arm) -> dict[int, dict]:
    """The cell of each seed this arm names. An arm that chooses (`round: best`, or a list of pruning
    entries such as one per penalty weight) takes, per seed, the candidate with the highest
    validation accuracy (val_acc); never a test metric, and no choice without a validation split."""
    regime = _default_regime(study, arm)
    mine = [c for c in cells if c["status"] == "done" and c["axes"]["regime"] == regime]
    per_seed: dict[int, list[dict]] = {}
    for one in _candidates(arm):
        for c in mine:
            if _is_candidate(one, c["axes"]):
                per_seed.setdefault(c["axes"]["seed"], []).append(c)
    out: dict[int, dict] = {}
    for seed, found in per_seed.items():
        if len(found) == 1:
            out[seed] = found[0]
        elif not arm.chooses():
            raise UserError(
                f"a claim's arm {arm.model_dump(exclude_defaults=True)} matches several models of seed {seed}; "
                "name its finetune_epochs (or sparsity, adjust) in the study file"
            )
        else:
            scored = [c for c in found if names.VALIDATION in c["metrics"]]
            if scored:  # without a validation split there is nothing to choose on
                out[seed] = max(scored, key=lambda c: c["metrics"][names.VALIDATION])
    return out


def chosen_note(study: StudyConfig, cells: list[dict], claim: Claim) -> str:
    """Which candidate each choosing arm took per seed (a choice must be traceable to the cells)."""
    parts = []
    for side in ("a", "b"):
        for arm in claim.arms(side):
            if not arm.chooses():
                continue
            picks = arm_cells(study, cells, arm)
            what = ", ".join(
                f"seed {s}: {c['axes']['pruning']}"
                + (f" round {c['axes']['round']}" if arm.round == "best" else "")
                + f" (val {100 * c['metrics'][names.VALIDATION]:.1f} %)"
                for s, c in sorted(picks.items())
            )
            parts.append(f"arm {side} chosen on val_acc: {what or 'nothing (no validation split)'}")
    return "; ".join(parts)


def arm_values(study: StudyConfig, cells: list[dict], arms: list[Arm], metrics: list[str]) -> dict[int, float]:
    """Per seed: the mean over the arm's models of the mean over the metrics (seeds where any is missing drop)."""
    per_arm = [arm_cells(study, cells, arm) for arm in arms]
    seeds = set.intersection(*(set(p) for p in per_arm)) if per_arm else set()
    out = {}
    for seed in sorted(seeds):
        values = [p[seed]["metrics"].get(m) for p in per_arm for m in metrics]
        if all(v is not None and not math.isnan(v) for v in values):
            out[seed] = statistics.fmean(values)
    return out


def floor_reason(study: StudyConfig, cells: list[dict], claim: Claim, metrics: list[str], values: dict) -> str:
    """Why a claim cannot be measured ('' when it can): an arm at the robust floor, or an arm whose
    clean accuracy is more than CLEAN_GAP points under the paper's."""
    for side in ("a", "b"):
        robust = [m for m in metrics if m not in NOT_ROBUST]
        if robust and values[side] and statistics.fmean(values[side].values()) < ROBUST_FLOOR:
            return f"arm {side} at the floor ({100 * statistics.fmean(values[side].values()):.2f} % < 2 %)"
        for arm in claim.arms(side):
            if arm.paper_clean is None:
                continue
            clean = arm_values(study, cells, [arm], ["acc_clean"])
            if clean and 100 * statistics.fmean(clean.values()) < arm.paper_clean - CLEAN_GAP:
                return (
                    f"arm {side} clean {100 * statistics.fmean(clean.values()):.1f} % is more than "
                    f"{CLEAN_GAP:g} points under the paper's {arm.paper_clean:g} %"
                )
    return ""


def decide(claim: Claim, diff: Interval | None, p_holm: float) -> tuple[str, str]:
    """The verdict of a measurable claim from its interval (fractions) and Holm-adjusted p-value."""
    if diff is None:
        return INCONCLUSIVE, "fewer than 2 seeds: no interval"
    paper = claim.paper / 100
    differs = p_holm < ALPHA
    if claim.paper == 0:  # the paper claims no difference: hold it to an equivalence margin
        if differs:
            return CONTRADICTED, f"differs from 0 (Holm p = {p_holm:.3g})"
        margin = claim.margin / 100
        if -margin < diff.low and diff.high < margin:
            return HOLDS, f"interval inside ±{claim.margin:g} p.p."
        return INCONCLUSIVE, f"interval wider than ±{claim.margin:g} p.p."
    if differs:
        same_sign = (diff.mean > 0) == (paper > 0)
        return (HOLDS, "the paper's sign") if same_sign else (CONTRADICTED, "the other sign")
    # not significant after Holm (the interval itself may still exclude 0: it is not corrected)
    if not diff.low <= paper <= diff.high:
        return NO_EFFECT, "not significant after Holm; the interval excludes the paper's value"
    return INCONCLUSIVE, "not significant after Holm; the interval includes the paper's value"


def measure(study: StudyConfig, cells: list[dict]) -> list[Measured]:
    """Every claim of the study, measured; p-values Holm-corrected across the study's claims."""
    rows = []
    for claim in study.claims:
        metrics = metric_names(study, claim)
        values = {side: arm_values(study, cells, claim.arms(side), metrics) for side in ("a", "b")}
        seeds = sorted(set(values["a"]) & set(values["b"]))
        diff = paired_seeds([values["a"][s] for s in seeds], [values["b"][s] for s in seeds]) if seeds else None
        reason = floor_reason(study, cells, claim, metrics, values) if seeds else ""
        rows.append([claim, values, diff, reason, seeds])
    testable = [i for i, r in enumerate(rows) if r[2] is not None and not r[3]]
    adjusted = dict(zip(testable, holm([rows[i][2].p for i in testable])))
    out = []
    for i, (claim, values, diff, reason, seeds) in enumerate(rows):
        p_holm = adjusted.get(i, math.nan)
        if not seeds:
            verdict, why = NOT_RUN, "no seed has both arms in this store"
        elif reason:
            verdict, why = NOT_MEASURABLE, reason
        else:
            verdict, why = decide(claim, diff, p_holm)
        out.append(Measured(claim, values["a"], values["b"], diff, p_holm, verdict, why))
    return out


def _pp(x: float) -> str:
    return f"{100 * x:+.2f}"


def _mean_pct(values: dict[int, float]) -> str:
    return f"{100 * statistics.fmean(values.values()):.2f}" if values else "—"


def claims_table(study: StudyConfig, cells: list[dict]) -> Table | None:
    """claim | paper | measured a - b (mean over seeds, 95 % CI) | verdict, with the arms' means."""
    if not study.claims:
        return None
    measured = measure(study, cells)
    rows = []
    for m in measured:
        c = m.claim
        name = c.name + (f" [{c.reading}]" if c.reading else "")
        measured_text = "—" if m.diff is None else f"{_pp(m.diff.mean)} [{_pp(m.diff.low)}, {_pp(m.diff.high)}]"
        p_text = "—" if math.isnan(m.p_holm) else f"{m.p_holm:.3g}"
        rows.append(
            [
                name,
                c.table or "—",
                f"{c.paper:+.2f}",
                measured_text,
                f"{_mean_pct(m.a)} / {_mean_pct(m.b)}",
                str(m.seeds),
                p_text,
                f"{m.verdict} ({m.reason})",
            ]
        )
    seeds = sorted({s for m in measured for s in m.a} & {s for m in measured for s in m.b})
    n_seeds = f"{len(seeds)} seed" + ("s" if len(seeds) != 1 else "")
    caption = (
        f"Each claim is arm a minus arm b in percentage points, paired per seed (the unit of replication; "
        f"{n_seeds} here). Measured: the mean difference and its 95 % Student-t interval over seeds. "
        f"Holm p: the paired t-test's p-value, Holm-corrected across this paper's {len(measured)} claims. "
        f"Verdicts: holds (Holm p < {ALPHA:g}, the paper's sign), contradicted (Holm p < {ALPHA:g}, the other "
        "sign), no effect (not significant, the interval excludes the paper's value), inconclusive (neither), "
        "not measurable (an arm's robust accuracy under 2 %, or its clean accuracy more than 10 points under "
        "the paper's). A claim of no difference (paper 0.00) holds when its interval lies inside the margin."
    )
    return Table(
        f"Claims of {study.name}: does each hold?",
        [
            "Claim",
            "Paper table",
            "Paper (p.p.)",
            "Measured a − b (p.p.) [95 % CI]",
            "a / b (%)",
            "Seeds",
            "Holm p",
            "Verdict",
        ],
        rows,
        caption,
        reading_notes(study, measured) + choice_notes(study, cells),
    )


def choice_notes(study: StudyConfig, cells: list[dict]) -> list[str]:
    """One note per distinct choice of a claim's arms on the validation split."""
    notes: list[str] = []
    for claim in study.claims:
        note = chosen_note(study, cells, claim)
        if note and f": {note}" not in "".join(notes):  # several claims share one choice
            notes.append(f"{claim.name}: {note}")
    return notes


def reading_notes(study: StudyConfig, measured: list[Measured]) -> list[str]:
    """For claims measured under several conventions (e.g. eps in pixel or normalised space): which
    reading puts arm b (the reference model) closest to the paper's figure for it."""
    by_reading: dict[str, list[float]] = {}
    for m in measured:
        c = m.claim
        if c.reading and c.paper_b is not None and m.b:
            by_reading.setdefault(c.reading, []).append(abs(100 * statistics.fmean(m.b.values()) - c.paper_b))
    if len(by_reading) < 2:
        return []
    gaps = {r: statistics.fmean(v) for r, v in by_reading.items()}
    best = min(gaps, key=gaps.get)
    listed = "; ".join(f"{r}: {g:.1f} p.p." for r, g in gaps.items())
    return [
        f"Readings: the mean distance of arm b from the paper's figure for it is {listed}; the {best} reading "
        "reproduces the paper's reference model."
    ]


def claims_csv(study: StudyConfig, cells: list[dict]) -> str:
    """One row per claim with the numbers behind the table (percentage points)."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["study", "claim", "reading", "table", "metric", "paper_pp", "mean_pp", "low_pp", "high_pp", "p",
                "p_holm", "seeds", "a_pct", "b_pct", "verdict", "reason"])  # fmt: skip
    for m in measure(study, cells):
        c, d = m.claim, m.diff
        nums = ["", "", "", ""] if d is None else [100 * d.mean, 100 * d.low, 100 * d.high, d.p]
        w.writerow(
            [study.name, c.name, c.reading or "", c.table, "+".join(metric_names(study, c)), c.paper, *nums,
             "" if math.isnan(m.p_holm) else m.p_holm, m.seeds, _mean_pct(m.a), _mean_pct(m.b), m.verdict, m.reason]
        )  # fmt: skip
    return buf.getvalue()
