"""Tables from stored cells: the paper's Table 1 layout and the per-regime sweeps, mean ± std over
seeds; the robustness tables are in robustness.py. A Table is plain data; renderers turn it into
markdown, CSV or a rich table."""

from __future__ import annotations

import csv
import io
import math
import statistics
from dataclasses import dataclass, field
from typing import NamedTuple

from robustprune.evaluation import names
from robustprune.report.stats import compare, compared, family_notes, finish
from robustprune.study.schema import StudyConfig

AXES = ["regime", "pruning", "method", "sparsity", "finetune_epochs", "round", "seed"]
OPTIONAL_AXES = ["model", "adjust", "iteration"]  # present only in studies that use them (CSV columns likewise)

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
CORE_METRICS = (
    "sparsity",
    "params_nonzero",
    "flops_nonzero",
    "latency_ms",
)  # after acc_clean and the regime's test sets
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


def study_flags(study: StudyConfig, cells: list[dict], flags: set | None) -> set:
    """The given flags, or the study's own when None (see robustness.masking_flags)."""
    if flags is not None:
        return flags
    from robustprune.report.robustness import masking_flags  # robustness.py builds on this module

    return masking_flags(study, cells)


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


def table1(study: StudyConfig, cells: list[dict], flags: set | None = None) -> Table | None:
    """Liang et al. (2025) Table 1: rows Baseline / method at one sparsity No FT, With FT / lottery
    ticket round chosen on validation accuracy; one column per (regime, metric). flags: see
    robustness.masking_flags."""
    spec = study.table1
    if not spec.columns:
        return None
    flags = study_flags(study, cells, flags)
    groups = group(cells)
    headers = ["Pruning method", "Fine-tune", *spec.columns]

    def value(key: Setting | None, metric: str, suffix: str = "") -> str:
        if key is None:
            return "—"
        return against_dense(groups, key, metric, show(groups.get(key, []), metric, key, flags), suffix)

    rows = [
        ["Baseline (no pruning)", "—", *[value(Setting(r, "dense", 0.0, 0, None), m) for r, m in spec.columns.values()]]
    ]
    chosen_by: dict[str, str] = {}  # regime -> how its round was chosen
    for row in spec.rows:
        p = study.pruning[row.pruning]
        if p.method == "lottery_ticket" or row.sparsity is None:
            cells_out = []
            for regime, metric in spec.columns.values():
                key, how = chosen_round(groups, regime, row.pruning)
                if key is not None:
                    chosen_by[regime] = how
                cells_out.append(value(key, metric, f" (r{key.round})" if key else ""))
            rows.append([row.label, "—", *cells_out])
            continue
        for ft in p.finetune_epochs:
            label = row.label if ft == p.finetune_epochs[0] else ""
            ft_label = "No FT" if ft == 0 else f"With FT ({ft} ep)"
            rows.append(
                [
                    label,
                    ft_label,
                    *[value(Setting(r, row.pruning, row.sparsity, ft, None), m) for r, m in spec.columns.values()],
                ]
            )
    caption = (
        f"Test accuracy (%) of each regime's model, mean ± std over {seeds_text(n_seeds(cells))}. "
        + "; ".join(f"{col}: {metric} of the '{regime}' model" for col, (regime, metric) in spec.columns.items())
        + "."
        + rounds_text(chosen_by)
    )
    rows, notes = finished(rows)
    return Table("Table 1: robustness under different pruning methods", headers, rows, caption, notes)


def chosen_round(groups: dict, regime: str, pruning: str) -> tuple[Setting | None, str]:
    """The round an iterative method shows in Table 1, never chosen on a test metric: the one with
    the highest validation accuracy (mean over seeds) when every round has one stored, else the last."""
    rounds = sorted(
        (k for k in groups if k.regime == regime and k.pruning == pruning and k.round is not None),
        key=lambda k: k.round,
    )
    if not rounds:
        return None, ""
    val = {k: values(groups[k], names.VALIDATION) for k in rounds}
    if all(val.values()):
        return max(rounds, key=lambda k: statistics.fmean(val[k])), "validation"
    return rounds[-1], "last"


def rounds_text(chosen_by: dict[str, str]) -> str:
    """The caption's words on how each regime's lottery round was chosen."""
    if not chosen_by:
        return ""
    by_val = [r for r, how in chosen_by.items() if how == "validation"]
    last = [r for r, how in chosen_by.items() if how == "last"]
    text = " Lottery ticket: the round in brackets"
    parts = []
    if by_val:
        parts.append(
            "has the highest validation accuracy (mean over seeds, on a split held out from the training set; "
            "never chosen on test accuracy)" + (f" in {', '.join(map(repr, by_val))}" if last else "")
        )
    if last:
        parts.append(
            "is the last round"
            + (f" in {', '.join(map(repr, last))}" if by_val else "")
            + ", as no validation accuracy is stored"
        )
    return text + " " + "; it ".join(parts) + "."


def against_dense(groups: dict, key: Setting, metric: str, text: str, suffix: str = "") -> str:
    """text, compared with the dense model of its regime and architecture over the seeds both have
    (see report/stats.py); the mark or interval comes with `finished`."""
    if key.pruning == "dense" or text == "—" or not metric.startswith("acc_"):
        return text + suffix
    dense = groups.get(Setting(key.regime, "dense", 0.0, 0, None, key.model), [])
    diff = compare(
        groups.get(key, []), {c["axes"]["seed"]: c for c in dense}, lambda c: c["metrics"].get(metric), [metric]
    )
    return compared(text, diff, suffix)


def finished(rows: list[list[str]]) -> tuple[list[list[str]], list[str]]:
    """A table's rows with their significance marks (Holm across the whole table), and the notes
    that explain its marks and intervals."""
    rows, family = finish(rows)
    return rows, ([MARK_NOTE] if marked(rows) else []) + family_notes(family)


def core_metrics(cells: list[dict]) -> list[str]:
    """acc_clean, the regime's own test sets (acc_patched, ...), then sparsity and the non-zero counts;
    the robustness metrics have their own tables."""
    seen = list(dict.fromkeys(m for c in cells for m in c["metrics"]))
    tests = [m for m in seen if names.parse(m).family == "test"]
    return [m for m in ["acc_clean", *tests, *CORE_METRICS] if m in seen]


def sweep_table(study: StudyConfig, cells: list[dict], regime: str, flags: set | None = None) -> Table | None:
    """One regime, every pruning setting (every sparsity, every lottery round), core metrics only."""
    flags = study_flags(study, cells, flags)
    groups = group(cells)
    keys = regime_keys(study, groups, regime)
    if not keys:
        return None
    shown = core_metrics([c for k in keys for c in groups[k]])
    rows = [[setting_label(k), *[show(groups[k], m, k, flags) for m in shown]] for k in keys]
    headers = ["Setting", *map(metric_label, shown)]
    caption = (
        f"Accuracies and sparsity in %, mean ± std over {seeds_text(n_seeds([c for k in keys for c in groups[k]]))}; "
        "sparsity = share of the dense model's conv/linear weights removed."
    )
    if "latency_ms" in shown:  # the measured speed-up, per seed against that seed's dense model
        headers.append("Speed-up")
        for row, k in zip(rows, keys):
            row.append(speedup_text(groups, keys, k))
        caption += " Speed-up: the dense model's latency over this model's (same seed), mean over seeds."
    return Table(f"Sweep: regime '{regime}'", headers, rows, caption, [MARK_NOTE] if marked(rows) else [])


def speedup_text(groups: dict, keys: list, k) -> str:
    """Mean over seeds of dense latency / this setting's latency ('—' without both)."""
    dense = {
        (c["axes"].get("model"), c["axes"]["seed"]): c["metrics"].get("latency_ms")
        for d in keys
        if d.pruning == "dense"
        for c in groups[d]
    }
    ratios = [
        dense[key] / c["metrics"]["latency_ms"]
        for c in groups[k]
        if (key := (c["axes"].get("model"), c["axes"]["seed"])) in dense
        and dense[key]
        and c["metrics"].get("latency_ms")
    ]
    return f"{statistics.fmean(ratios):.2f}×" if ratios else "—"


def sweep_tables(study: StudyConfig, cells: list[dict], flags: set | None = None) -> list[Table]:
    """sweep_table for every regime that has results."""
    flags = study_flags(study, cells, flags)
    return [t for r in study.regimes if (t := sweep_table(study, cells, r, flags))]


def failed_cells_table(cells: list[dict]) -> Table | None:
    failed = [c for c in cells if c["status"] == "failed"]
    if not failed:
        return None
    rows = [[c["axes"]["regime"], setting_label(key_of(c)), str(c["axes"]["seed"]), c["error"] or ""] for c in failed]
    return Table(
        "Failed cells",
        ["Regime", "Setting", "Seed", "Reason"],
        rows,
        caption="Cells stored as failed (a diverging loss, or NaN/inf weights) with the reason; the "
        "study went on without them, and they are left out of every other table. A new setting "
        "(e.g. a lower learning rate) gives new cells.",
    )


def all_tables(study: StudyConfig, cells: list[dict]) -> list[Table]:
    """Table 1 and the study's paper-layout tables; per regime the robustness summary, the core sweep,
    the detailed robustness tables, the training dynamics and the per-layer widths; then the
    gradient-masking checks and the failed cells."""
    from robustprune.report import robustness as rb  # robustness.py builds on this module
    from robustprune.report import training
    from robustprune.report.paper_tables import paper_tables

    flags = rb.masking_flags(study, cells)
    tables = [table1(study, cells, flags), *paper_tables(study, cells, flags)]
    for regime in study.regimes:
        tables += [
            rb.summary_table(study, cells, regime, flags),
            rb.gains_table(study, cells, regime, flags),
            rb.correlation_table(study, cells, regime),
            rb.single_element_table(study, cells, regime),
            sweep_table(study, cells, regime, flags),
            *rb.detail_tables(study, cells, regime, flags),
            *training.dynamics_tables(study, cells, regime),
            *training.widths_tables(study, cells, regime),
            *training.plan_tables(study, cells, regime),
        ]
    tables += [rb.masking_table(study, cells), failed_cells_table(cells)]
    return [t for t in tables if t]


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|")  # transfer metric names hold '|'


def to_markdown(t: Table) -> str:
    lines = [
        f"### {t.title}",
        "",
        "| " + " | ".join(map(_md_cell, t.headers)) + " |",
        "|" + "|".join(" --- " for _ in t.headers) + "|",
    ]
    lines += ["| " + " | ".join(map(_md_cell, r)) + " |" for r in t.rows]
    if t.caption:
        lines += ["", t.caption]
    if t.notes:
        lines += ["", *t.notes]
    return "\n".join(lines) + "\n"


def long_csv(cells: list[dict]) -> str:
    """One row per cell and metric: one column per config axis, then metric, value, hash."""
    buf = io.StringIO()
    w = csv.writer(buf)
    columns = [a for a in OPTIONAL_AXES if any(a in c["axes"] for c in cells)] + AXES
    w.writerow([*columns, "metric", "value", "config_hash", "status"])
    for c in sorted(cells, key=lambda c: [str(c["axes"].get(a)) for a in columns]):
        a = c["axes"]
        axes = ["" if a.get(k) is None else a.get(k) for k in columns]
        if c["status"] != "done":
            w.writerow([*axes, "error", c["error"], c["hash"], c["status"]])
        for m, v in sorted(c["metrics"].items()):
            w.writerow([*axes, m, repr(v), c["hash"], c["status"]])
    return buf.getvalue()
