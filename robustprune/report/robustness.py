"""Robustness tables, per regime, in the layouts of the papers the study follows: a summary (clean
accuracy, each attack at the report eps, occlusion, corruptions, masking checks), attack-strength and
occlusion sweeps, corruptions by type and by severity, and the transfer matrix (source x target);
then, for the whole study, the gradient-masking checks that failed. Numbers that a failed check puts
in doubt carry a ⚠ wherever they are shown (see masking.py). Metric names: evaluate/names.py."""

from __future__ import annotations

import math
import statistics
from collections import Counter
from dataclasses import dataclass
from typing import Callable

from robustprune.evaluation import names
from robustprune.metrics.correlation import pearson
from robustprune.report.base import (
    MARK_NOTE,
    Table,
    finished,
    fmt,
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
from robustprune.report.masking import (  # noqa: F401  (masking_flags: still importable from here)
    check_metrics,
    masking_flags,
    study_flags,
    violations,
)
from robustprune.report.stats import compare, compared
from robustprune.study.schema import StudyConfig

# Short column headers for the 16-column corruptions-by-type table.
CORRUPTION_ABBREV = {
    "gaussian_noise": "gauss",
    "shot_noise": "shot",
    "impulse_noise": "impulse",
    "defocus_blur": "defocus",
    "glass_blur": "glass",
    "motion_blur": "motion",
    "zoom_blur": "zoom",
    "brightness": "bright",
    "elastic_transform": "elastic",
    "pixelate": "pixel",
    "jpeg_compression": "jpeg",
}


# ---- gradient-masking checks (the flags: masking.py) -----------------------------------------------


def describe(metric: str) -> str:
    """A metric as a reader names it: 'PGD20 ε=0.1', 'PGD20 ε=0.1 from dense', 'FGSM-data acc.'."""
    p = names.parse(metric)
    if p.family == "curve":
        return f"FMN security curve ({p.name}) ε={names.eps_text(float(p.strength))}"
    if p.family in ("adv", "transfer"):
        text = f"{attack_title(p.name)} ε={names.eps_text(float(p.strength))}"
        return text + (f" from {p.source}" if p.source else "")
    return metric_label(metric)


def pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.2f}"


def masking_table(study: StudyConfig, cells: list[dict]) -> Table | None:
    """Every violated check (regime, setting, seed), or one row saying that all checks passed."""
    n_checks = sum(1 for _ in check_metrics(cells))
    if not n_checks:
        return None
    tol = study.evaluation.masking_tolerance
    found = violations(study, cells)
    title = "Gradient-masking checks"
    rule = (
        f"On the same images a stronger attack (iterative vs FGSM, more steps, larger ε, white-box vs "
        f"transfer, white-box vs black-box Square) must leave no more images correct than a weaker one "
        f"(Carlini et al. 2019); a check fails when acc(stronger) − acc(weaker) exceeds "
        f"evaluation.masking_tolerance = {100 * tol:g} p.p. An attack swept over ε on its survivors fails "
        f"its check when its accuracy does not fall at all from its smallest to its largest ε."
    )
    if not found:
        return Table(title, ["Result"], [[f"All {n_checks} checks passed in every regime, setting and seed."]], rule)
    rank = _setting_rank(study, cells)
    found.sort(key=lambda v: (rank[v.key], v.cell["axes"]["seed"], v.kind, v.stronger, v.weaker))
    rows = []
    for v in found:
        acc = v.cell["metrics"].get(v.stronger)
        rows.append(
            [
                v.key.regime,
                setting_label(v.key),
                str(v.cell["axes"]["seed"]),
                names.CHECK_KINDS[v.kind],
                describe(v.stronger),
                pct(acc),
                describe(v.weaker),
                pct(None if acc is None else acc - v.gap),
                f"{100 * v.gap:.2f}",
            ]
        )
    caption = (
        f"{len(found)} of {n_checks} checks failed. {rule} Accuracies in %; the weaker accuracy is the "
        "stronger one minus the gap (a regime's transfer test set is compared on the attacked images only, "
        "so it can differ from the sweep table)."
    )
    return Table(
        title, ["Regime", "Setting", "Seed", "Check", "Stronger", "Acc.", "Weaker", "Acc.", "Gap (p.p.)"], rows, caption
    )


def _setting_rank(study: StudyConfig, cells: list[dict]) -> dict[tuple, tuple[int, int]]:
    """Table order of every setting key: regimes as in the study, settings as in the sweep tables."""
    groups = group(cells)
    return {k: (i, j) for i, r in enumerate(study.regimes) for j, k in enumerate(regime_keys(study, groups, r))}


# ---- one regime's tables ----------------------------------------------------------------------------


@dataclass
class Regime:
    """One regime's finished cells by setting, in sweep-table order, and the masking flags."""

    study: StudyConfig
    name: str
    keys: list[tuple]
    groups: dict[tuple, list[dict]]
    flags: set

    @property
    def cells(self) -> list[dict]:
        return [c for k in self.keys for c in self.groups[k]]

    def has(self, metric: str) -> bool:
        return any(metric in c["metrics"] for c in self.cells)

    def seeds(self) -> str:
        return seeds_text(n_seeds(self.cells))

    def images(self, metric: str) -> str:
        """images:attacks / images:shifts as text ('200', or '200–500' when settings differ)."""
        counts = sorted({int(c["metrics"][metric]) for c in self.cells if metric in c["metrics"]})
        return "?" if not counts else str(counts[0]) if len(counts) == 1 else f"{counts[0]}–{counts[-1]}"


def regime_view(study: StudyConfig, cells: list[dict], regime: str, flags: set | None) -> Regime | None:
    groups = group(cells)
    keys = regime_keys(study, groups, regime)
    return Regime(study, regime, keys, groups, study_flags(study, cells, flags)) if keys else None


Column = Callable[[tuple], str]  # setting key -> the cell's text


def component_metrics(study: StudyConfig, metric: str) -> list[str]:
    """The per-image metrics behind a stored one: a corruption mean pools its types and severities."""
    p = names.parse(metric)
    if p.family == "corruption" and (p.name is None or p.strength is None):
        ev = study.evaluation
        types = [p.name] if p.name else ev.corruption_types()
        sevs = [int(p.strength)] if p.strength else ev.corruptions.severities
        return [names.corruption(t, s) for t in types for s in sevs]
    return [metric]


def against_dense(view: Regime, k: tuple, text: str, value: Callable[[dict], float | None], parts: list[str]) -> str:
    """A pruned setting's text compared with the dense model of the same architecture over the seeds
    both have (per seed `value`; one seed: the per-image results of `parts`); see report/stats.py."""
    if k.pruning == "dense" or text == "—":
        return text
    dense = {
        c["axes"]["seed"]: c for d in view.keys if d.pruning == "dense" and d.model == k.model for c in view.groups[d]
    }
    return compared(text, compare(view.groups[k], dense, value, parts))


def metric_column(view: Regime, metric: str) -> Column:
    """A metric's mean ± std per setting, compared with the dense model (accuracies only)."""
    parts = component_metrics(view.study, metric)

    def col(k: tuple) -> str:
        text = show(view.groups[k], metric, k, view.flags)
        if not metric.startswith("acc_"):
            return text
        return against_dense(view, k, text, lambda c: c["metrics"].get(metric), parts)

    return col


def mean_of(metrics: list[str]) -> Callable[[dict], float | None]:
    """A cell's mean over `metrics` (those it has), None when it has none."""
    return lambda c: statistics.fmean(vs) if (vs := [c["metrics"][m] for m in metrics if m in c["metrics"]]) else None


def mean_column(view: Regime, metrics: list[str], fmt_as: str) -> Column:
    """Per seed the mean of `metrics`, then mean ± std over seeds; accuracies compared with the dense
    model (a per-seed mean over metrics on the same images is the per-image average)."""
    value = mean_of(metrics)

    def col(k: tuple) -> str:
        text = fmt([v for c in view.groups[k] if (v := value(c)) is not None], fmt_as)
        return against_dense(view, k, text, value, metrics) if fmt_as.startswith("acc_") else text

    return col


def settings_table(view: Regime, title: str, columns: dict[str, Column], caption: str) -> Table | None:
    """Rows = the regime's settings (as in its sweep table), one column per entry of `columns`."""
    if not columns:
        return None
    rows, notes = finished([[setting_label(k), *[col(k) for col in columns.values()]] for k in view.keys])
    return Table(f"{title} (regime '{view.name}')", ["Setting", *columns], rows, caption, notes)


TITLES = {"autoattack": "AutoAttack", "white_box": "white-box stages", "worst": "Worst case"}


def attack_title(label: str) -> str:
    """'PGD20' for pgd20, 'AutoAttack' for autoattack, 'AutoAttack (white-box stages)' for a stage metric."""
    label, _, part = label.partition("/")
    title = TITLES.get(label, label.upper().replace("_", "-"))
    return f"{title} ({TITLES.get(part, part)})" if part else title


def summary_table(study: StudyConfig, cells: list[dict], regime: str, flags: set | None = None) -> Table | None:
    """Clean | each attack at the report eps | occlusion | corruption | masking checks."""
    view = regime_view(study, cells, regime, flags)
    if view is None:
        return None
    columns: dict[str, Column] = {}
    parts = [f"mean ± std over {view.seeds()}"]
    for add in (attack_columns, shift_columns, masking_columns):
        parts += add(view, columns)
    if not columns:
        return None
    columns = {"Clean": metric_column(view, "acc_clean"), **columns}
    return settings_table(view, "Robustness summary", columns, "Accuracy (%), " + "; ".join(parts) + ".")


def robustness_measures(view: Regime) -> dict[str, Callable[[dict], float | None]]:
    """Per cell: Semantic and Occlusion at the highest evaluated severity (Jordão & Pedrini's setting,
    section 4), each attack at its report eps, where the regime's cells have them."""
    return {name: mean_of(metrics) for name, metrics in measure_metrics(view).items() if name != "Clean"}


def _severity_metrics(view: Regime) -> tuple[dict[int, list[str]], list[str]]:
    """Corruption metrics by severity (those stored) and occlusion metrics by size, ascending."""
    ev = view.study.evaluation
    by_severity: dict[int, list[str]] = {}
    if view.has(names.corruption()):
        for sev in sorted(ev.corruptions.severities):
            by_severity[sev] = [names.corruption(t, sev) for t in ev.corruption_types()]
    sizes = [names.occlusion(s) for s in sorted(ev.occlusion) if view.has(names.occlusion(s))]
    return by_severity, sizes


def measure_metrics(view: Regime) -> dict[str, list[str]]:
    """The stored metrics behind each robustness measure (and Clean), at the paper's setting: the
    highest corruption severity and the largest occlusion. A measure's per-seed value is the mean
    over its metrics, which on the same images is the per-image average."""
    ev = view.study.evaluation
    out = {}
    by_severity, sizes = _severity_metrics(view)
    if by_severity:
        top = max(by_severity)
        out[f"Semantic (severity {top})" if len(by_severity) > 1 else "Semantic"] = by_severity[top]
    if sizes:
        out[f"Occlusion ({sizes[-1].split('@')[1]} px)" if len(sizes) > 1 else "Occlusion"] = sizes[-1:]
    for label in ev.attacks:
        eps = ev.shown_eps(label)
        if view.has(names.adv(label, eps)):
            out[f"{attack_title(label)} ε={names.eps_text(eps)}"] = [names.adv(label, eps)]
    out["Clean"] = ["acc_clean"]
    return out


def all_severity_metrics(view: Regime) -> dict[str, list[str]]:
    """The means over every evaluated severity and size (extra columns beside the paper's setting)."""
    by_severity, sizes = _severity_metrics(view)
    out = {}
    if len(by_severity) > 1:
        out["Semantic, all severities"] = [m for ms in by_severity.values() for m in ms]
    if len(sizes) > 1:
        out["Occlusion, all sizes"] = sizes
    return out


def gains_table(study: StudyConfig, cells: list[dict], regime: str, flags: set | None = None) -> Table | None:
    """Jordão & Pedrini (2021) Tables 1-3: per pruned setting, the difference in p.p. to the
    unpruned network of the same architecture, regime and seed on Semantic (the corruption mean),
    Occlusion (mean over sizes), each attack at the report eps and Clean, and their Average;
    '(+)' is a gain, '(-)' a loss; mean ± std over seeds."""
    view = regime_view(study, cells, regime, flags)
    if view is None:
        return None
    measures = robustness_measures(view)
    measures["Clean"] = lambda c: c["metrics"].get("acc_clean")
    dense = {(k.model, c["axes"]["seed"]): c for k in view.keys if k.pruning == "dense" for c in view.groups[k]}
    components = measure_metrics(view)
    extras = all_severity_metrics(view)  # beside the Average, not in it: the paper averages its setting
    components.update(extras)
    extra_measures = {name: mean_of(metrics) for name, metrics in extras.items()}

    def average(c: dict) -> float | None:
        vs = [m(c) for m in measures.values()]
        return None if any(v is None for v in vs) else statistics.fmean(vs)

    rows = []
    for k in view.keys:
        if k.pruning == "dense":
            continue
        per_column: dict[str, list[float]] = {name: [] for name in [*measures, "Average", *extra_measures]}
        for c in view.groups[k]:
            base = dense.get((k.model, c["axes"]["seed"]))
            if base is None:
                continue
            gains = {}
            for name, measure in measures.items():
                now, before = measure(c), measure(base)
                if now is not None and before is not None:
                    gains[name] = 100 * (now - before)
                    per_column[name].append(gains[name])
            if len(gains) == len(measures):
                per_column["Average"].append(statistics.fmean(gains.values()))
            for name, measure in extra_measures.items():
                now, before = measure(c), measure(base)
                if now is not None and before is not None:
                    per_column[name].append(100 * (now - before))
        dense_of_seed = {seed: c for (model, seed), c in dense.items() if model == k.model}
        texts = []
        for name, column_gains in per_column.items():
            # the Average's parts lie on different images, so one seed gives it no interval
            every = measures | extra_measures
            value, parts = (every[name], components.get(name, [])) if name in every else (average, [])
            texts.append(compared(signed(column_gains), compare(view.groups[k], dense_of_seed, value, parts)))
        rows.append([setting_label(k), *texts])
    if not rows or len(measures) < 2:
        return None
    caption = (
        "Difference in accuracy (p.p.) between each pruned network and the unpruned one of the same "
        "architecture, regime and seed (Jordão & Pedrini 2021, Tables 1-3); (+) = gain, (-) = loss; "
        "Semantic and Occlusion at the highest evaluated severity, the paper's setting; "
        "Average = mean of the columns before it, clean included"
        + (f"; {' and '.join(extra_measures)}: the mean over every evaluated level" if extra_measures else "")
        + f"; mean ± std over {view.seeds()}."
    )
    rows, notes = finished(rows)
    headers = ["Setting", *measures, "Average", *extra_measures]
    return Table(f"Gain over the unpruned network (regime '{regime}')", headers, rows, caption, notes)


def correlation_table(study: StudyConfig, cells: list[dict], regime: str) -> Table | None:
    """Jordão & Pedrini Fig. 4: Pearson r between generalization (clean accuracy) and each
    robustness measure over the regime's settings. A setting is one point, its mean over seeds: the
    seeds of a setting are not independent settings, and counting them as such would shrink p."""
    view = regime_view(study, cells, regime, set())
    if view is None or len(view.keys) < 3:
        return None

    def setting_mean(k, measure) -> float:
        vs = [v for c in view.groups[k] if (v := measure(c)) is not None]
        return statistics.fmean(vs) if vs else math.nan

    clean = [setting_mean(k, lambda c: c["metrics"].get("acc_clean")) for k in view.keys]
    rows = []
    for name, measure in robustness_measures(view).items():
        rob = [setting_mean(k, measure) for k in view.keys]
        r, p = pearson(clean, rob)
        n = sum(1 for x, y in zip(clean, rob) if not (math.isnan(x) or math.isnan(y)))
        rows.append([name, "—" if math.isnan(r) else f"{r:+.2f}", "—" if math.isnan(p) else f"{p:.3g}", str(n)])
    if not rows:
        return None
    caption = (
        f"Pearson correlation between clean accuracy and each robustness measure over the regime's {len(view.keys)} "
        "settings (dense, every pruning setting and round), as Jordão & Pedrini's Fig. 4. Each setting is one point, "
        "its mean over seeds; p (two-sided test of r = 0) treats the n settings with both numbers as the "
        "independent observations, never settings × seeds."
    )
    return Table(
        f"Generalization vs robustness (regime '{regime}')",
        ["Robustness measure", "Pearson r", "p", "n"],
        rows,
        caption,
    )


def single_element_table(study: StudyConfig, cells: list[dict], regime: str) -> Table | None:
    """Jordão & Pedrini Fig. 5 as a table: per dense model and attack, the share (%) of single
    filters (or blocks) whose removal alone raises robustness while clean accuracy drops by at most
    t p.p., one column per t."""
    se = study.evaluation.single_element
    view = regime_view(study, cells, regime, set())
    if se is None or view is None:
        return None
    rows = []
    for k in view.keys:
        if k.pruning != "dense":
            continue
        for label in study.evaluation.attacks:
            rob = names.adv(label, study.evaluation.shown_eps(label))
            metrics = [names.single(se.kind, rob, t) for t in se.tolerances]
            if view.has(metrics[0]):
                rows.append(
                    [
                        setting_label(k),
                        f"{attack_title(label)} ε={names.eps_text(study.evaluation.shown_eps(label))}",
                        *[fmt(values(view.groups[k], m), "acc_") for m in metrics],
                    ]
                )
    if not rows:
        return None
    count = view.groups[view.keys[0]][0]["metrics"].get(names.single(se.kind, "", None))
    caption = (
        f"Algorithm 2 (Jordão & Pedrini 2021, Fig. 5): share (%) of single {se.kind} whose removal, with no "
        f"adjustment, raises accuracy under the attack while clean accuracy falls by at most t p.p.; "
        f"{'%d' % count if count is not None else '?'} {se.kind} "
        f"({'a seeded sample' if se.max_elements else 'all'}) on the first {se.images} test images; "
        f"mean ± std over {view.seeds()}."
    )
    return Table(
        f"Single-element removal (regime '{regime}')",
        ["Model", "Attack", *[f"t={t:g}" for t in se.tolerances]],
        rows,
        caption,
    )


def signed(gains: list[float]) -> str:
    """'(+) 1.58', '(-) 0.60 ± 0.20' from gains in p.p. (one per seed)."""
    if not gains:
        return "—"
    mean = round(statistics.fmean(gains), 2)
    text = f"({'+' if mean > 0 else '-'}) {abs(mean):.2f}" if mean else "0.00"
    return text + (f" ± {statistics.stdev(gains):.2f}" if len(gains) > 1 else "")


def attack_columns(view: Regime, columns: dict[str, Column]) -> list[str]:
    """Adds one column per attack at its report eps; returns the caption's words on them."""
    subsets = []
    for label, entry in view.study.evaluation.attacks.items():
        eps = view.study.evaluation.shown_eps(label)
        if view.has(names.adv(label, eps)):
            norm = entry.params.get("norm", "Linf")
            on = f", {view.images(names.images(label))} img." if entry.subset is not None else ""  # a subset's size
            columns[f"{attack_title(label)} ε={names.eps_text(eps)}{'' if norm == 'Linf' else ' (L2)'}{on}"] = (
                metric_column(view, names.adv(label, eps))
            )
            if entry.subset is not None:
                subsets.append(f"{attack_title(label)} on the first {view.images(names.images(label))} of them")
    eps = view.study.evaluation.report_eps
    if eps is not None and view.has(names.adv(names.WORST, eps)):
        columns[f"Worst case ε={names.eps_text(eps)}"] = metric_column(view, names.adv(names.WORST, eps))
        subsets.append("worst case: per image, broken by any L∞ attack run on all of them")
    return (
        [
            f"white-box attacks (L∞ unless marked) at the ε in the header (pixel scale [0, 1]) on the first "
            f"{view.images('images:attacks')} test images" + (f" ({'; '.join(subsets)})" if subsets else "")
        ]
        if columns
        else []
    )


def shift_columns(view: Regime, columns: dict[str, Column]) -> list[str]:
    """Adds the occlusion mean (over sizes) and the corruption mean; returns the caption's words."""
    ev = view.study.evaluation
    parts = []
    sizes = [s for s in ev.occlusion if view.has(names.occlusion(s))]
    if sizes:
        columns["Occlusion"] = mean_column(view, [names.occlusion(s) for s in sizes], "acc_occlusion")
        parts.append(f"occlusion: mean over centre squares of {', '.join(map(str, sizes))} px")
    if view.has(names.corruption()):
        columns["Corruption"] = metric_column(view, names.corruption())
        n_sev = len(ev.corruptions.severities) if ev.corruptions else 0
        parts.append(f"corruption: mean over {len(ev.corruption_types())} types × {n_sev} severities")
    return parts + ([f"shifts on the first {view.images('images:shifts')} test images"] if parts else [])


def masking_columns(view: Regime, columns: dict[str, Column]) -> list[str]:
    """Adds the masking-check column when the cells hold checks; returns the caption's words."""
    if next(check_metrics(view.cells), None) is None:
        return []
    columns["Masking"] = masking_column(view)
    return ["masking: ✓ = every gradient-masking check passed in every seed, ⚠ n = n failed checks summed over seeds"]


def masking_column(view: Regime) -> Column:
    """✓, '⚠ n' (failed checks summed over seeds), or — for a setting without checks."""
    failed = Counter(v.key for v in violations(view.study, view.cells))
    checked = {key_of(c) for c, _, _ in check_metrics(view.cells)}
    return lambda k: "—" if k not in checked else f"⚠ {failed[k]}" if failed[k] else "✓"


def attack_sweep_tables(view: Regime) -> list[Table]:
    """The papers' accuracy-vs-eps figure as tables: per attack with at least two eps, one column per eps."""
    out = []
    for label, entry in view.study.evaluation.attacks.items():
        eps = [e for e in sorted(entry.eps) if view.has(names.adv(label, e))]
        if len(eps) < 2:
            continue
        params = ", ".join(f"{k}={v}" for k, v in entry.params.items())
        name = attack_title(entry.attack or label) + (f" ({params})" if params else "")
        columns = {f"ε={names.eps_text(e)}": metric_column(view, names.adv(label, e)) for e in eps}
        caption = (
            f"Accuracy (%) under white-box {name}, L∞ radius ε in pixel scale [0, 1], on the first "
            f"{view.images('images:attacks')} test images; mean ± std over {view.seeds()}."
        )
        out.append(settings_table(view, f"Attack strength: {attack_title(label)}", columns, caption))
    return out


def occlusion_table(view: Regime) -> Table | None:
    sizes = [s for s in sorted(view.study.evaluation.occlusion) if view.has(names.occlusion(s))]
    columns = {f"δ={s}": metric_column(view, names.occlusion(s)) for s in sizes}
    caption = (
        f"Accuracy (%) with a centre square of δ × δ pixels set to zero, on the first "
        f"{view.images('images:shifts')} test images; mean ± std over {view.seeds()}."
    )
    return settings_table(view, "Occlusion", columns, caption)


def corruption_tables(view: Regime) -> list[Table]:
    ev = view.study.evaluation
    if ev.corruptions is None or not view.has(names.corruption()):
        return []
    types = [t for t in ev.corruption_types() if view.has(names.corruption(t))]
    sevs = [s for s in ev.corruptions.severities if view.has(names.corruption(None, s))]
    where = (
        f"on the first {view.images('images:shifts')} test images ({ev.corruptions.source}); "
        f"mean ± std over {view.seeds()}."
    )
    by_type = {CORRUPTION_ABBREV.get(t, t): metric_column(view, names.corruption(t)) for t in types}
    abbrev = ", ".join(f"{CORRUPTION_ABBREV[t]} = {t}" for t in types if t in CORRUPTION_ABBREV)
    by_type_caption = (
        f"Accuracy (%) under each common corruption, mean over severities "
        f"{', '.join(map(str, sevs))}, {where}" + (f" Abbreviations: {abbrev}." if abbrev else "")
    )
    by_sev = {f"Sev. {s}": metric_column(view, names.corruption(None, s)) for s in sevs}
    by_sev_caption = f"Accuracy (%) at each corruption severity, mean over the {len(types)} types, {where}"
    mean = {"Mean": metric_column(view, names.corruption())}
    return [
        t
        for t in (
            settings_table(view, "Corruptions by type", by_type | mean, by_type_caption),
            settings_table(view, "Corruptions by severity", by_sev | mean, by_sev_caption),
        )
        if t
    ]


def transfer_table(view: Regime) -> Table | None:
    """The papers' transfer table: row = source model, column = target model; the diagonal is the
    target's own white-box accuracy under the same attack and eps."""
    tr = view.study.evaluation.transfer
    if tr is None:
        return None
    eps = view.study.evaluation.transfer_eps()
    by_name = {names.setting_key(view.groups[k][0]["axes"]): k for k in view.keys}
    models = [name for name, k in by_name.items() if any(m.matches(view.groups[k][0]["axes"]) for m in tr.models)]
    if not any(view.has(names.transfer(tr.attack, eps, s)) for s in models):
        return None
    rows = []
    for source in models:
        row = [source]
        for target in models:
            k = by_name.get(target)
            metric = names.adv(tr.attack, eps) if source == target else names.transfer(tr.attack, eps, source)
            row.append("—" if k is None else show(view.groups[k], metric, k, view.flags))
        rows.append(row)
    caption = (
        f"Accuracy (%) of the target model (column) on {attack_title(tr.attack)} ε={names.eps_text(eps)} "
        f"examples crafted on the source model (row), same regime and seed, on the first "
        f"{view.images('images:attacks')} test images; the diagonal is the target's white-box accuracy. "
        f"Mean ± std over {view.seeds()}."
    )
    return Table(
        f"Transfer attacks (regime '{view.name}')",
        ["Source ↓ / target →", *models],
        rows,
        caption,
        [MARK_NOTE] if marked(rows) else [],
    )


def detail_tables(study: StudyConfig, cells: list[dict], regime: str, flags: set | None = None) -> list[Table]:
    """Attack sweeps, occlusion, corruptions by type and by severity, transfer matrix: those with data."""
    view = regime_view(study, cells, regime, flags)
    if view is None:
        return []
    tables = [*attack_sweep_tables(view), occlusion_table(view), *corruption_tables(view), transfer_table(view)]
    return [t for t in tables if t]
