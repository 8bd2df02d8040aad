"""What every report table and figure builds on: the Table record, number formats and labels, and
the grouping of stored cells into settings (the seeds of one setting side by side). It imports no
other report module, so the table and figure modules can all import it without importing each other."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import NamedTuple

from robustprune.report.stats import family_notes, finish
from robustprune.study.schema import StudyConfig

METRIC_LABELS = {
    "acc_clean": "Clean acc.",
    "acc_patched": "Patched acc.",
    "acc_fgsm_data": "FGSM-data acc.",
    "sparsity": "Sparsity",
    "params_nonzero": "Non-zero params",
    "flops": "FLOPs",
    "flops_nonzero": "Non-zero FLOPs",
    "latency_ms": "Latency (ms)",
}
PERCENT_METRICS = ("acc_", "sparsity")
DECIMAL_METRICS = ("latency_ms",)
# number formats by metric (or by its family, the part before ':'); the rest are counts
SPECS = {"weights": ".3f", "weights:l1": ",.1f", "weights:l2": ",.2f", "weights:log10_bound": ".2f"}
ADJUST_LABELS = {"scratch_e": "Scratch-E", "scratch_b": "Scratch-B", "winning_ticket": "W-ticket"}
ADJUST_ORDER = {None: 0, "scratch_e": 1, "scratch_b": 2, "winning_ticket": 3}  # Jordão & Pedrini Table 3
MARK = " ⚠"
MARK_NOTE = "⚠ = gradient-masking check failed, see 'Gradient-masking checks'."


@dataclass
class Table:
    title: str
    headers: list[str]
    rows: list[list[str]]
    caption: str = ""
    notes: list[str] = field(default_factory=list)


def metric_label(m: str) -> str:
    if m.startswith("acc_fgsm_wb@"):
        return f"FGSM white-box ε={m.split('@')[1]}"
    return METRIC_LABELS.get(m, m)


def fmt(values: list[float], metric: str) -> str:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return "—"
    pct = metric.startswith(PERCENT_METRICS)
    scale, spec = (
        (100.0, ".2f")
        if pct
        else (1.0, ".2f")
        if metric in DECIMAL_METRICS
        else (1.0, SPECS.get(metric, SPECS.get(metric.split(":")[0], ",.0f")))
    )
    text = f"{statistics.fmean(values) * scale:{spec}}"
    if len(values) > 1 and max(values) != min(values):  # no "± 0" on counts that cannot vary
        text += f" ± {statistics.stdev(values) * scale:{spec}}"
    return text


class Setting(NamedTuple):
    """A cell's setting, seed left out: what tables group seeds by."""

    regime: str
    pruning: str
    sparsity: float | None
    finetune_epochs: int
    round: int | None
    model: str | None = None  # the architecture's label in a study of several
    adjust: str | None = None  # scratch_e, scratch_b, winning_ticket (None: fine-tuning as finetune_epochs says)
    iteration: int | None = None  # iterative structured pruning (Algorithm 1): the model after iteration k


def key_of(cell: dict) -> Setting:
    a = cell["axes"]
    # An iterative method's round fixes its sparsity; keying by round alone keeps float noise out.
    sparsity = a["sparsity"] if a["round"] is None else None
    return Setting(
        a["regime"],
        a["pruning"],
        sparsity,
        a["finetune_epochs"],
        a["round"],
        a.get("model"),
        a.get("adjust"),
        a.get("iteration"),
    )


def group(cells: list[dict]) -> dict[tuple, list[dict]]:
    """Cells that differ only in seed, keyed by their other axes."""
    out: dict[tuple, list[dict]] = {}
    for c in cells:
        if c["status"] == "done":
            out.setdefault(key_of(c), []).append(c)
    return out


def regime_keys(study: StudyConfig, groups: dict[tuple, list[dict]], regime: str) -> list[tuple]:
    """A regime's settings in table order: per architecture (as listed), dense, then the pruning
    entries as listed in the study."""
    order = {name: i for i, name in enumerate(["dense", *study.pruning])}
    models = {label: i for i, label in enumerate(study.models)}
    keys = [k for k in groups if k.regime == regime]
    return sorted(
        keys,
        key=lambda k: (
            models.get(k.model, -1),
            order.get(k.pruning, 99),
            k.round or 0,
            k.sparsity or 0.0,
            ADJUST_ORDER.get(k.adjust, 0),
            k.finetune_epochs,
            k.iteration or 0,
        ),
    )


def setting_label(key: Setting) -> str:
    model = f"{key.model}: " if key.model else ""
    if key.pruning == "dense":
        return f"{model}Dense"
    if key.round is not None:
        return f"{model}{key.pruning} round {key.round}"
    if key.adjust:
        return f"{model}{key.pruning} s={key.sparsity:g}, {ADJUST_LABELS.get(key.adjust, key.adjust)}"
    text = f"{model}{key.pruning} s={key.sparsity:g}" + (
        f", FT {key.finetune_epochs} ep" if key.finetune_epochs else ", no FT"
    )
    return text + (f", iteration {key.iteration}" if key.iteration else "")


def show(cells: list[dict], metric: str, key: tuple, flags: set) -> str:
    """fmt() of a setting's metric, marked when a gradient-masking check puts it in doubt."""
    text = fmt(values(cells, metric), metric)
    return text + MARK if (key, metric) in flags and text != "—" else text


def marked(rows: list[list[str]]) -> bool:
    return any(MARK in v for r in rows for v in r)


def seeds_text(n: int) -> str:
    """'3 seeds (95 % CI of a mean: ± 2.48 × std)': the interval follows from the std every table
    shows (Student t with n - 1 degrees of freedom), so the caption gives it once."""
    if n < 2:
        return f"{n} seed"
    from scipy.stats import t

    return f"{n} seeds (95 % CI of a mean: ± {t.ppf(0.975, n - 1) / math.sqrt(n):.2f} × std)"


def values(cells: list[dict], metric: str) -> list[float]:
    return [c["metrics"].get(metric) for c in cells if metric in c["metrics"]]


def n_seeds(cells: list[dict]) -> int:
    return len({c["axes"]["seed"] for c in cells if c["status"] == "done"})


def finished(rows: list[list[str]]) -> tuple[list[list[str]], list[str]]:
    """A table's rows with their significance marks (Holm across the whole table), and the notes
    that explain its marks and intervals."""
    rows, family = finish(rows)
    return rows, ([MARK_NOTE] if marked(rows) else []) + family_notes(family)


def network_order(study: StudyConfig, model: str | None, groups: list[str]) -> list[str]:
    """The groups sorted by where their first layer sits in the architecture (stored order is the
    dependency graph's)."""
    from robustprune.models import MODELS

    config = study.models[model] if model else study.model
    try:
        modules = [name for name, _ in MODELS.get(config.name)(**config.args).named_modules()]
    except Exception:  # an architecture that no longer builds: keep the stored order
        return groups
    where = {name: i for i, name in enumerate(modules)}
    return sorted(groups, key=lambda g: where.get(g, len(where)))
