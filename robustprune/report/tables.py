"""Tables from stored cells: the paper's Table 1 layout and the full sweeps, mean ± std over seeds.
A Table is plain data; renderers turn it into markdown, CSV or a rich table."""
from __future__ import annotations

import csv
import io
import math
import statistics
from dataclasses import dataclass, field

from robustprune.study.schema import StudyConfig

AXES = ["regime", "pruning", "method", "sparsity", "finetune_epochs", "round", "seed"]

METRIC_LABELS = {
    "acc_clean": "Clean acc.",
    "acc_patched": "Patched acc.",
    "acc_fgsm_data": "FGSM-data acc.",
    "sparsity": "Sparsity",
    "params_nonzero": "Non-zero params",
    "flops": "FLOPs",
    "flops_nonzero": "Non-zero FLOPs",
}
PERCENT_METRICS = ("acc_", "sparsity")


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
    scale, digits = (100.0, 2) if pct else (1.0, 0)
    mean = statistics.fmean(values) * scale
    text = f"{mean:.{digits}f}" if pct else f"{mean:,.0f}"
    if len(values) > 1 and max(values) != min(values):  # no "± 0" on counts that cannot vary
        sd = statistics.stdev(values) * scale
        text += f" ± {sd:.{digits}f}" if pct else f" ± {sd:,.0f}"
    return text


def group(cells: list[dict]) -> dict[tuple, list[dict]]:
    """Cells that differ only in seed, keyed by their other axes."""
    out: dict[tuple, list[dict]] = {}
    for c in cells:
        if c["status"] != "done":
            continue
        a = c["axes"]
        # An iterative method's round fixes its sparsity; keying by round alone keeps float noise out.
        sparsity = a["sparsity"] if a["round"] is None else None
        out.setdefault((a["regime"], a["pruning"], sparsity, a["finetune_epochs"], a["round"]), []).append(c)
    return out


def values(cells: list[dict], metric: str) -> list[float]:
    return [c["metrics"].get(metric) for c in cells if metric in c["metrics"]]


def n_seeds(cells: list[dict]) -> int:
    return len({c["axes"]["seed"] for c in cells if c["status"] == "done"})


def table1(study: StudyConfig, cells: list[dict]) -> Table | None:
    """Liang et al. (2025) Table 1: rows Baseline / method at one sparsity No FT, With FT / lottery
    ticket best round; one column per (regime, metric)."""
    spec = study.table1
    if not spec.columns:
        return None
    groups = group(cells)
    headers = ["Pruning method", "Fine-tune", *spec.columns]

    def row_values(regime_keys) -> list[str]:
        out = []
        for col, (regime, metric) in spec.columns.items():
            out.append(fmt(values(groups.get(regime_keys(regime), []), metric), metric))
        return out

    rows = [["Baseline (no pruning)", "—", *row_values(lambda r: (r, "dense", 0.0, 0, None))]]
    for row in spec.rows:
        p = study.pruning[row.pruning]
        if p.method == "lottery_ticket" or row.sparsity is None:
            cells_out = []
            for col, (regime, metric) in spec.columns.items():
                best, best_mean = None, -math.inf
                for key, cs in groups.items():
                    if key[0] == regime and key[1] == row.pruning and key[4] is not None:
                        vs = values(cs, metric)
                        if vs and statistics.fmean(vs) > best_mean:
                            best, best_mean = (key[4], vs), statistics.fmean(vs)
                cells_out.append(f"{fmt(best[1], metric)} (r{best[0]})" if best else "—")
            rows.append([row.label, "—", *cells_out])
            continue
        for ft in p.finetune_epochs:
            label = row.label if ft == p.finetune_epochs[0] else ""
            ft_label = "No FT" if ft == 0 else f"With FT ({ft} ep)"
            rows.append([label, ft_label, *row_values(lambda r: (r, row.pruning, row.sparsity, ft, None))])
    n = n_seeds(cells)
    caption = (f"Test accuracy (%) of each regime's model, mean ± std over {n} seed{'s' if n != 1 else ''}. "
               + "; ".join(f"{col}: {metric} of the '{regime}' model" for col, (regime, metric) in spec.columns.items())
               + ". Lottery ticket: best round per column (round in brackets).")
    return Table("Table 1: robustness under different pruning methods", headers, rows, caption)


def sweep_tables(study: StudyConfig, cells: list[dict]) -> list[Table]:
    """For each regime, every pruning setting (every sparsity, every lottery round) with every metric."""
    groups = group(cells)
    tables = []
    n = n_seeds(cells)
    for regime in study.regimes:
        keys = [k for k in groups if k[0] == regime]
        if not keys:
            continue
        metrics: list[str] = []
        for k in keys:
            for c in groups[k]:
                for m in c["metrics"]:
                    if m not in metrics:
                        metrics.append(m)
        order = {name: i for i, name in enumerate(["dense", *study.pruning])}
        keys.sort(key=lambda k: (order.get(k[1], 99), k[4] or 0, k[2] or 0.0, k[3]))
        shown = [m for m in metrics if m not in ("params", "flops")]
        rows = []
        for k in keys:
            _, pruning, s, ft, r = k
            if pruning == "dense":
                setting = "Dense"
            elif r is not None:
                setting = f"{pruning} round {r}"
            else:
                setting = f"{pruning} s={s:g}" + (f", FT {ft} ep" if ft else ", no FT")
            rows.append([setting, *[fmt(values(groups[k], m), m) for m in shown]])
        tables.append(Table(f"Sweep: regime '{regime}'", ["Setting", *map(metric_label, shown)], rows,
                            f"Accuracies and sparsity in %, mean ± std over {n} seed{'s' if n != 1 else ''}; "
                            "sparsity = share of the dense model's conv/linear weights removed."))
    return tables


def failed_cells_table(cells: list[dict]) -> Table | None:
    failed = [c for c in cells if c["status"] == "failed"]
    if not failed:
        return None
    rows = [[c["axes"]["regime"], c["axes"]["pruning"], str(c["axes"]["seed"]), c["error"] or ""] for c in failed]
    return Table("Failed cells", ["Regime", "Pruning", "Seed", "Reason"], rows)


def all_tables(study: StudyConfig, cells: list[dict]) -> list[Table]:
    tables = [t for t in [table1(study, cells)] if t] + sweep_tables(study, cells)
    failed = failed_cells_table(cells)
    return tables + ([failed] if failed else [])


def to_markdown(t: Table) -> str:
    lines = [f"### {t.title}", "", "| " + " | ".join(t.headers) + " |",
             "|" + "|".join(" --- " for _ in t.headers) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in t.rows]
    if t.caption:
        lines += ["", t.caption]
    return "\n".join(lines) + "\n"


def long_csv(cells: list[dict]) -> str:
    """One row per cell and metric: one column per config axis, then metric, value, hash."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow([*AXES, "metric", "value", "config_hash", "status"])
    for c in sorted(cells, key=lambda c: [str(c["axes"].get(a)) for a in AXES]):
        a = c["axes"]
        axes = ["" if a.get(k) is None else a.get(k) for k in AXES]
        if c["status"] != "done":
            w.writerow([*axes, "error", c["error"], c["hash"], c["status"]])
        for m, v in sorted(c["metrics"].items()):
            w.writerow([*axes, m, repr(v), c["hash"], c["status"]])
    return buf.getvalue()
