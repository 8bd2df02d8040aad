"""Comparison tables in a paper's layout, as a study's `tables:` section asks for them (Bai et al.
Tables 1-5): accuracy columns next to each model's FLOPs reduction P' = 1 - FLOPs(pruned) /
FLOPs(dense), mean ± std over seeds. Two layouts:

    methods   one row per (entry, sparsity) with its own FLOPs reduction (Tables 2-5)
    flops     one row per sparsity, one group of columns per entry (Table 1: Magnitude-Step | ...)
"""

from __future__ import annotations

import statistics

from robustprune.evaluation import names
from robustprune.report.base import (
    Setting,
    Table,
    finished,
    fmt,
    group,
    n_seeds,
    seeds_text,
    show,
)
from robustprune.report.masking import study_flags
from robustprune.report.stats import compare, compared
from robustprune.study.schema import PaperTable, StudyConfig

FLOPS_AGREE = 0.005  # entries whose mean FLOPs reductions differ by less share one FLOPs column (flops layout)


def column_metric(study: StudyConfig, source: str) -> str:
    """'clean', an attack label (at the eps the study reports it at), 'label@eps' or 'metric:<name>'
    -> the stored metric."""
    if source == "clean":
        return "acc_clean"
    if source.startswith("metric:"):
        return source[len("metric:") :]
    attack, _, at = source.partition("@")
    return names.adv(attack, float(at) if at else study.evaluation.shown_eps(attack))


def flops_reductions(cells: list[dict], dense_by_seed: dict) -> list[float]:
    """1 - FLOPs(pruned) / FLOPs(dense) per seed, each cell against the dense model of its seed."""
    out = []
    for c in cells:
        dense = dense_by_seed.get(c["axes"]["seed"])
        if dense and "flops_nonzero" in c["metrics"] and dense["metrics"].get("flops_nonzero"):
            out.append(1.0 - c["metrics"]["flops_nonzero"] / dense["metrics"]["flops_nonzero"])
    return out


def _percent(values: list[float]) -> str:
    return fmt(values, "acc_flops")  # fmt writes acc_* metrics as percentages with ± std


class _Context:
    """What every row of one architecture's block needs: its cells grouped by setting and its
    dense models by seed."""

    def __init__(self, study: StudyConfig, spec: PaperTable, cells: list[dict], model: str | None, flags: set):
        self.study, self.spec, self.model, self.flags = study, spec, model, flags
        self.groups = group(cells)
        self.dense_key = Setting(spec.regime, "dense", 0.0, 0, None, model)
        self.dense_by_seed = {c["axes"]["seed"]: c for c in self.groups.get(self.dense_key, [])}
        self.metrics = [column_metric(study, src) for src in spec.columns.values()]

    def keys(self, ref: str) -> list[Setting]:
        """The settings of 'entry' or 'entry@sparsity' that have results, by sparsity then fine-tuning epochs."""
        entry, _, at = ref.partition("@")
        if entry == "dense":
            return [self.dense_key] if self.dense_key in self.groups else []
        wanted = [float(at)] if at else self.spec.sparsities
        found = [
            k
            for k in self.groups
            if k.regime == self.spec.regime
            and k.pruning == entry
            and k.model == self.model
            and k.round is None
            and k.adjust is None
            and k.iteration is None
            and (wanted is None or any(abs(k.sparsity - s) < 1e-9 for s in wanted))
        ]
        return sorted(found, key=lambda k: (k.sparsity or 0.0, k.finetune_epochs))

    def accuracies(self, key: Setting) -> list[str]:
        """Each column's mean ± std; accuracies of a pruned setting compared with the dense model of
        the same seeds (marked once the whole table is built, see report/stats.py)."""
        out = []
        for m in self.metrics:
            text = show(self.groups[key], m, key, self.flags)
            if key.pruning != "dense" and m.startswith("acc_"):
                text = compared(
                    text, compare(self.groups[key], self.dense_by_seed, lambda c, m=m: c["metrics"].get(m), [m])
                )
            out.append(text)
        return out

    def flops(self, key: Setting) -> list[float]:
        return (
            [0.0] * len(self.groups[key])
            if key.pruning == "dense"
            else flops_reductions(self.groups[key], self.dense_by_seed)
        )


def _models(study: StudyConfig, spec: PaperTable, cells: list[dict]) -> list[str | None]:
    present = {c["axes"].get("model") for c in cells}
    order = spec.models or list(study.models) or [None]
    return [m for m in order if m in present]


def methods_rows(ctx: _Context, first_column: bool) -> list[list[str]]:
    rows = []
    entries = ({"Dense": "dense"} if ctx.spec.dense else {}) | ctx.spec.rows
    for label, entry in entries.items():
        keys = ctx.keys(entry)
        several_ft = len({k.finetune_epochs for k in keys}) > 1
        for k in keys:
            text = label + (f" (FT {k.finetune_epochs} ep)" if several_ft else "")
            lead = [(ctx.model or "") if not rows else ""] if first_column else []
            flops = [_percent(ctx.flops(k))] if ctx.spec.show_flops else []
            rows.append([*lead, text, *flops, *ctx.accuracies(k)])
    return rows


def transposed(rows: list[list[str]], headers: list[str], first_column: bool) -> tuple[list[str], list[list[str]]]:
    """One architecture's methods rows turned into columns: a row per metric, a column per method."""
    lead = 1 if first_column else 0
    methods = [r[lead] for r in rows]
    out = []
    for j, name in enumerate(headers[lead + 1 :], start=lead + 1):
        model = rows[0][0] if first_column and not out else ""
        out.append([*([model] if first_column else []), name, *[r[j] for r in rows]])
    return [*headers[:lead], headers[lead], *methods], out


def flops_rows(ctx: _Context, first_column: bool) -> tuple[list[str], list[list[str]]]:
    """Headers after the leading ones, and the rows: one per sparsity (dense first)."""
    entries = list(ctx.spec.rows.items())
    by_entry = {entry: {k.sparsity: k for k in ctx.keys(entry)} for _, entry in entries}
    sparsities = sorted({s for ks in by_entry.values() for s in ks})
    mean_flops = {
        (e, s): statistics.fmean(v) for e, ks in by_entry.items() for s, k in ks.items() if (v := ctx.flops(k))
    }
    shared = all(
        max(vs) - min(vs) < FLOPS_AGREE
        for s in sparsities
        if (vs := [f for (e, s2), f in mean_flops.items() if s2 == s])
    )
    headers = ["Pruning ratio", *(["FLOPs↓ (%)"] if shared else [])]
    for label, _ in entries:
        headers += ([] if shared else [f"{label} FLOPs↓ (%)"]) + [f"{label} {c}" for c in ctx.spec.columns]
    rows = []
    levels = ([None] if ctx.spec.dense and ctx.dense_key in ctx.groups else []) + sparsities
    for s in levels:
        lead = [(ctx.model or "") if not rows else ""] if first_column else []
        row = [*lead, "0 (dense)" if s is None else f"{s:g}"]
        if shared:
            first = next((by_entry[e][s] for _, e in entries if s in by_entry[e]), None) if s is not None else None
            row.append(_percent([0.0]) if s is None else _percent(ctx.flops(first)) if first else "—")
        for _, entry in entries:
            k = ctx.dense_key if s is None else by_entry[entry].get(s)
            if not shared:
                row.append(_percent(ctx.flops(k)) if k else "—")
            row += ctx.accuracies(k) if k else ["—"] * len(ctx.metrics)
        rows.append(row)
    return headers, rows


def paper_table(study: StudyConfig, cells: list[dict], name: str, flags: set | None = None) -> Table | None:
    spec = study.tables[name]
    flags = study_flags(study, cells, flags)
    cells = [c for c in cells if c["axes"]["regime"] == spec.regime]
    models = _models(study, spec, cells)
    first_column = bool(study.models)
    headers: list[str] = []
    rows: list[list[str]] = []
    for model in models:
        ctx = _Context(study, spec, [c for c in cells if c["axes"].get("model") == model], model, flags)
        if spec.layout == "methods":
            heads = ["Architecture"] * first_column + [
                spec.row_header,
                *["FLOPs↓ (%)"] * spec.show_flops,
                *spec.columns,
            ]
            block = methods_rows(ctx, first_column)
            if spec.transpose and block:
                heads, block = transposed(block, heads, first_column)
                if headers and heads != headers:  # another architecture ran other methods: its own header row
                    rows.append(heads)
            headers = headers or heads
            rows += block
        else:
            more, block = flops_rows(ctx, first_column)
            if headers and more != headers[first_column:]:  # another model's FLOPs columns differ: new header
                rows.append(["", *more])
            headers = headers or ["Architecture"] * first_column + more
            rows += block
    if not rows:
        return None
    n = n_seeds([c for c in cells if c["axes"].get("model") in models])
    rows, notes = finished(rows)
    return Table(spec.title, headers, rows, caption(study, spec, n), notes)


def caption(study: StudyConfig, spec: PaperTable, n: int) -> str:
    ev = study.evaluation
    parts = []
    for label, src in spec.columns.items():
        if src == "clean":
            parts.append(f"{label} = clean accuracy on all test images")
        elif src.startswith("metric:"):
            parts.append(f"{label} = {src[len('metric:') :]}")
        else:
            src, _, at = src.partition("@")
            entry = ev.attacks[src]
            steps = entry.params.get("steps")
            attack = (entry.attack or src) + (f"-{steps}" if steps else "")
            images = f"the first {ev.attack_subset}" if ev.attack_subset else "all"
            eps = float(at) if at else ev.shown_eps(src)
            parts.append(
                f"{label} = accuracy under white-box {attack} at ε = {names.eps_text(eps)} on {images} test images"
            )
    flops = (
        "FLOPs↓ = 1 − FLOPs(pruned) / FLOPs(dense) of the same seed, counting non-zero weights. "
        if spec.show_flops or spec.layout == "flops"
        else ""
    )
    accuracies = any(not src.startswith("metric:") for src in spec.columns.values())
    return (
        f"{'Accuracy in %, m' if accuracies else 'M'}ean ± std over {seeds_text(n)}. {flops}" + "; ".join(parts) + "."
    )


def paper_tables(study: StudyConfig, cells: list[dict], flags: set | None = None) -> list[Table]:
    flags = study_flags(study, cells, flags)
    return [t for name in study.tables if (t := paper_table(study, cells, name, flags))]
