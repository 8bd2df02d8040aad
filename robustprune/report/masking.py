"""Which stored numbers a failed gradient-masking check puts in doubt: the checks that failed
(violations) and the (setting, metric) pairs every table marks with ⚠ (masking_flags). The tables of
robustness.py, tables.py and paper_tables.py all mark numbers, so the flags live below them."""

from __future__ import annotations

from dataclasses import dataclass

from robustprune.evaluation import checks, names
from robustprune.report.base import key_of
from robustprune.study.schema import StudyConfig


@dataclass(frozen=True)
class Violation:
    cell: dict
    kind: str
    stronger: str
    weaker: str
    gap: float  # acc(stronger) - acc(weaker), above the tolerance

    @property
    def key(self) -> tuple:
        return key_of(self.cell)


def check_metrics(cells: list[dict]):
    """(cell, parsed check name, gap) for every check stored in a finished cell."""
    for c in cells:
        if c["status"] != "done":
            continue
        for m, gap in c["metrics"].items():
            if m.startswith("check:"):
                yield c, names.parse(m), gap


def violations(study: StudyConfig, cells: list[dict]) -> list[Violation]:
    tol = study.evaluation.masking_tolerance
    return [
        Violation(c, p.name, p.stronger, p.weaker, gap)
        for c, p, gap in check_metrics(cells)
        if gap is not None and checks.violated(gap, tol, p.name, c["metrics"].get(p.weaker))
    ]


def masking_flags(study: StudyConfig, cells: list[dict]) -> set[tuple[tuple, str]]:
    """(setting key, metric) of every number a violated check puts in doubt, in any seed.

    The stronger side is the suspicious one: an attack that should be at least as strong left more
    images correct, so the model's gradients misled it and its number overstates robustness (for
    iterative_vs_fgsm, steps and eps the stronger attack; for 'transfer' the white-box attack).
    Transfer numbers crafted on another model (the transfer matrix) do not use the model's gradients
    and stay unmarked. The exception is a regime's own transfer test set (acc_fgsm_data), the weaker
    side of its 'transfer' check: it is the only adversarial number Table 1 shows for that regime, so
    it is marked too, or Table 1 would hide that the model masks gradients."""
    flags = set()
    for v in violations(study, cells):
        flags.add((v.key, v.stronger))
        if v.kind == "transfer" and names.parse(v.weaker).family == "test":
            flags.add((v.key, v.weaker))
    return flags


def study_flags(study: StudyConfig, cells: list[dict], flags: set | None) -> set:
    """The given flags, or the study's own when None (see masking_flags)."""
    if flags is not None:
        return flags
    return masking_flags(study, cells)
