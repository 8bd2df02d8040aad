"""Tables from stored cells: the paper's Table 1 layout and the per-regime sweeps, mean ± std over
seeds; the robustness tables are in robustness.py, and all_tables gathers every kind. A Table is
plain data (base.py); renderers turn it into markdown, CSV or a rich table."""

from __future__ import annotations

import csv
import io
import statistics

from robustprune.evaluation import names
from robustprune.report import robustness as rb
from robustprune.report import training
from robustprune.report.base import (
    MARK_NOTE,
    Setting,
    Table,
    finished,
    group,
    key_of,
    marked,
    metric_label,
    n_seeds,
    regime_keys,
    seeds_text,
    setting_label,
    show,
    values,
)
from robustprune.report.masking import masking_flags, study_flags
from robustprune.report.paper_tables import paper_tables
from robustprune.report.stats import compare, compared
from robustprune.study.schema import StudyConfig

AXES = ["regime", "pruning", "method", "sparsity", "finetune_epochs", "round", "seed"]
OPTIONAL_AXES = ["model", "adjust", "iteration"]  # present only in studies that use them (CSV columns likewise)

CORE_METRICS = (
    "sparsity",
    "params_nonzero",
    "flops_nonzero",
    "latency_ms",
)  # after acc_clean and the regime's test sets


def table1(study: StudyConfig, cells: list[dict], flags: set | None = None) -> Table | None:
    """Liang et al. (2025) Table 1: rows Baseline / method at one sparsity No FT, With FT / lottery
    ticket round chosen on validation accuracy; one column per (regime, metric). flags: see
    masking.masking_flags."""
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
    flags = masking_flags(study, cells)
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
