"""A model's AutoAttack result as a RobustBench model-info JSON file (the files of
github.com/RobustBench/robustbench, model_info/<dataset>/<threat model>/<model name>.json, from which
the leaderboard is built).

Fields and formats as RobustBench writes them (robustbench/utils.py, ModelInfo and update_json):
    link, name, authors, additional_data, number_forward_passes, dataset, venue, architecture,
    eps             a string: "8/255" for an L-inf radius that is a whole number of 255ths, else the
                    number ("0.5", "0.3")
    clean_acc       percent as a string, str(round(100 * acc, 2)): "89.69", "58.0", "0.0"
    reported        the accuracy the paper reports, same format; "" when none
    autoattack_acc  percent as clean_acc
    footnote, unreliable
RobustBench keeps the threat model in the folder name and always evaluates its 10 000 test points;
this file adds both, as "threat_model" ("Linf" / "L2") and "n_examples" (the name of RobustBench's
own benchmark() argument), so that an entry evaluated on fewer points says so. The leaderboard
tools read only the fields they know, so the two extra keys do no harm."""

from __future__ import annotations

import json
import numbers
import os
from pathlib import Path

from robustprune.attacks.norms import check_norm, check_radius
from robustprune.errors import UserError
from robustprune.files import STORE_UNCHANGED, atomic_write

# the fields measured here: extra may not overwrite them
MEASURED = ("dataset", "eps", "clean_acc", "autoattack_acc", "threat_model", "n_examples")


def percent(acc: float, what: str = "accuracy") -> str:
    """An accuracy in [0, 1] as RobustBench stores it: percent, rounded to 2 decimals, str()."""
    if isinstance(acc, bool) or not isinstance(acc, numbers.Real) or not 0 <= acc <= 1:
        raise UserError(f"{what} must be a fraction in [0, 1], got {acc!r}; e.g. 0.5953 for 59.53 %")
    return str(round(float(acc) * 100, 2))


def eps_string(eps: float, norm: str) -> str:
    """'8/255' for an L-inf radius that is a whole number of 255ths (as every RobustBench L-inf file
    writes it), else the number itself ('0.5', '0.3')."""
    eps = check_radius("RobustBench entry", eps, norm)
    k = round(eps * 255)
    if norm == "Linf" and k >= 1 and abs(eps * 255 - k) < 1e-6:
        return f"{k}/255"
    return repr(round(eps, 6))


def robustbench_entry(
    clean_acc: float,
    autoattack_acc: float,
    eps: float,
    norm: str,
    n_points: int,
    dataset: str,
    model_name: str,
    extra: dict | None = None,
) -> dict:
    """A RobustBench model-info entry. Accuracies are fractions in [0, 1]; model_name fills "name"
    (RobustBench's paper title field; extra can set it, and link, authors, venue, architecture,
    additional_data, number_forward_passes, reported, footnote, unreliable or any further key)."""
    norm = check_norm("RobustBench entry", norm)
    if isinstance(n_points, bool) or not isinstance(n_points, int) or n_points < 1:
        raise UserError(f"n_points must be the number of evaluated points (an integer >= 1), got {n_points!r}")
    for what, value in (("dataset", dataset), ("model_name", model_name)):
        if not isinstance(value, str) or not value.strip():
            raise UserError(f"RobustBench entry {what} must be a non-empty string, got {value!r}")
    clean, robust = percent(clean_acc, "clean_acc"), percent(autoattack_acc, "autoattack_acc")
    if autoattack_acc > clean_acc:
        raise UserError(
            f"autoattack_acc ({autoattack_acc!r}) cannot exceed clean_acc ({clean_acc!r}): "
            f"a point the attack leaves correct is correct clean"
        )
    extra = dict(extra or {})
    clash = sorted(set(extra) & set(MEASURED))
    if clash:
        raise UserError(f"extra cannot set the measured field(s) {', '.join(clash)}; pass them as arguments")
    entry = {
        "link": "",
        "name": model_name,
        "authors": "",
        "additional_data": False,
        "number_forward_passes": 1,
        "dataset": dataset.lower(),
        "venue": "",
        "architecture": "",
        "eps": eps_string(eps, norm),
        "clean_acc": clean,
        "reported": "",
        "autoattack_acc": robust,
        "footnote": "",
        "unreliable": False,
        "threat_model": norm,
        "n_examples": n_points,
    }
    if "reported" in extra and isinstance(extra["reported"], float):
        extra["reported"] = percent(extra["reported"], "reported")
    entry.update(extra)
    return entry


def write_robustbench_json(entry: dict, path) -> None:
    """Write `entry` as indented JSON (as RobustBench's update_json does), to a temporary file in
    the same folder renamed over `path`: never a half-written file."""
    if not isinstance(entry, dict) or not entry:
        raise UserError("a RobustBench entry must be a non-empty dict (see robustbench_entry)")
    try:
        text = json.dumps(entry, indent=2, allow_nan=False) + "\n"
    except (TypeError, ValueError) as e:
        raise UserError(f"the RobustBench entry is not plain JSON ({e}); use strings, numbers and booleans") from None

    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    atomic_write(path, write, "--robustbench", STORE_UNCHANGED)
