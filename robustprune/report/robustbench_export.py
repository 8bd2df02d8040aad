"""`robustprune report DIR --robustbench FOLDER`: every stored AutoAttack result as a RobustBench
model-info JSON file, so a pruned model's numbers can be set beside the leaderboard's. One file per
cell (regime, setting, seed) and AutoAttack eps; clean accuracy is on the same images as AutoAttack
(the stored robust accuracy at eps 0)."""

from __future__ import annotations

import re
from pathlib import Path

from robustprune.errors import UserError
from robustprune.evaluation import names
from robustprune.evaluation.robustbench import robustbench_entry, write_robustbench_json
from robustprune.report.base import key_of, setting_label
from robustprune.study.schema import StudyConfig


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=-]+", "_", text).strip("_")


def robustbench_entries(study: StudyConfig, cells: list[dict]) -> list[tuple[str, dict]]:
    """(file name, entry) for every finished cell and every eps of every AutoAttack entry it holds."""
    ev = study.evaluation
    out = []
    for label, entry in ev.attacks.items():
        if entry.name(label) != "autoattack":
            continue
        norm = entry.params.get("norm", "Linf")
        for c in cells:
            m = c["metrics"]
            if c["status"] != "done" or names.adv(label, 0.0) not in m:
                continue
            n = int(m.get(names.images(label), m.get("images:attacks", 0)))
            a = c["axes"]
            setting = f"{a['regime']} {setting_label(key_of(c))} seed {a['seed']}"
            for eps in entry.eps:
                if names.adv(label, eps) not in m:
                    continue
                e = robustbench_entry(
                    m[names.adv(label, 0.0)],
                    m[names.adv(label, eps)],
                    eps,
                    norm,
                    n,
                    study.dataset,
                    f"{study.name}: {setting}",
                    {
                        "architecture": a.get("model") or study.model.name,
                        "footnote": f"robustprune AutoAttack ({entry.params.get('version', 'standard')})"
                        f" on the first {n} test images; cell {c['hash'][:12]}",
                    },
                )
                out.append((f"{_slug(setting)}_{_slug(label)}_eps={names.strength(eps)}.json", e))
    return out


def export_robustbench(study: StudyConfig, cells: list[dict], folder: str | Path) -> list[Path]:
    entries = robustbench_entries(study, cells)
    if not entries:
        raise UserError(
            "the study stores no AutoAttack result to export; add an autoattack entry to "
            "evaluation.attacks (e.g. autoattack: {eps: [0.0313725], subset: 1000})"
        )
    paths = []
    for name, entry in entries:
        path = Path(folder) / name
        write_robustbench_json(entry, path)  # a full disk or read-only folder: one sentence, no partial file
        paths.append(path)
    return paths
