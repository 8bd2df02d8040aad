"""Figures from stored cells, written as PNG files. Each function takes (study, cells, folder,
regime), returns the paths it wrote, and writes nothing when the study has no results it applies to.
Error bars are the standard deviation over seeds.

    sparsity_figures     robustness vs sparsity: one panel per measure (clean, each attack at the
                         report eps, occlusion, corruptions), one line per pruning entry
    strength_figures     accuracy vs attack strength (Jordão & Pedrini Fig. 3), one panel per attack
    correlation_figures  generalization (clean accuracy) vs each robustness measure over the settings,
                         with Pearson r (Jordão & Pedrini Fig. 4)
    dynamics_figures     training dynamics per epoch (Jordão & Pedrini Fig. 2)
    weight_figures       distribution of the conv/linear weights per setting, as box plots of the
                         stored quantiles (reverse-pruning paper, Table 1)
    security_figures     robust accuracy vs eps from FMN's minimum norms (Pintor et al. 2021), one line per
                         setting, each with its AutoAttack point at the study's eps
    mrs_figures          MRPF (Bai et al.): per architecture, the Module Robust Sensitivity of every
                         group of coupled filters (top) and the share of its filters each MRPF setting
                         removed (bottom), in network order
"""

from __future__ import annotations

import statistics
from pathlib import Path

from robustprune.files import STORE_UNCHANGED, atomic_write
from robustprune.report.base import group, network_order, setting_label
from robustprune.study.schema import StudyConfig

DPI = 150
FOLDER_OPTIONS = "--figures, --out"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed, and no GUI backend started in workers
    import matplotlib.pyplot as plt

    return plt


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None]
    if not values:
        return float("nan"), 0.0
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _distinct(series: dict[str, list[tuple[float, float]]]) -> dict[str, list[tuple[float, float]]]:
    """Settings with the same curve (e.g. every MRPF entry of one dense model has the same MRS) are
    drawn once, their labels joined."""
    out: dict[tuple, tuple[list[str], list]] = {}
    for label, points in series.items():
        key = tuple(round(m, 9) for m, _ in points)
        out.setdefault(key, ([], points))[0].append(label)
    return {
        (labels[0] if len(labels) == 1 else f"{labels[0]} and {len(labels) - 1} more alike"): pts
        for labels, pts in out.values()
    }


def mrs_figures(study: StudyConfig, cells: list[dict], folder: str | Path, regime: str = "clean") -> list[Path]:
    plt = _pyplot()
    groups_by_key = group([c for c in cells if c["axes"]["regime"] == regime])
    keys = [k for k, cs in groups_by_key.items() if any(m.startswith("mrs:") for c in cs for m in c["metrics"])]
    written = []
    for model in dict.fromkeys(k.model for k in keys):
        mine = sorted((k for k in keys if k.model == model), key=lambda k: (k.sparsity or 0.0, k.pruning))
        names = list(
            dict.fromkeys(m[4:] for k in mine for c in groups_by_key[k] for m in c["metrics"] if m.startswith("mrs:"))
        )
        names = network_order(study, model, names)
        mrs, ratios, targets, seeds = {}, {}, {}, set()
        for k in mine:
            cs = groups_by_key[k]
            seeds |= {c["axes"]["seed"] for c in cs}
            label = f"{k.pruning} s={k.sparsity:g}"
            mrs[k.pruning] = [_mean_std([c["metrics"].get(f"mrs:{g}") for c in cs]) for g in names]
            ratios[label] = [_mean_std([c["metrics"].get(f"ratio:{g}") for c in cs]) for g in names]
            # with match_flops the global ratio is searched for, and `sparsity` names the uniform baseline's
            chosen = [c["metrics"]["mrpf:global_ratio"] for c in cs if "mrpf:global_ratio" in c["metrics"]]
            targets[label] = statistics.fmean(chosen) if chosen else k.sparsity
        fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(7.0, 0.45 * len(names) + 2), 7.5), sharex=True)
        x = range(len(names))
        mrs = _distinct(mrs)
        width = 0.8 / len(mrs)
        for i, (label, pts) in enumerate(mrs.items()):
            top.bar(
                [xi + (i - (len(mrs) - 1) / 2) * width for xi in x],
                [m for m, _ in pts],
                width,
                yerr=[s for _, s in pts],
                capsize=2,
                label=label,
            )
        top.set_ylabel("MRS (rise of the adversarial loss)")
        top.set_yscale("log")
        top.legend(fontsize=8)
        for label, pts in _distinct(ratios).items():
            line = bottom.errorbar(
                list(x), [m for m, _ in pts], yerr=[s for _, s in pts], marker="o", ms=4, capsize=2, label=label
            )
            first = label.split(" and ")[0]  # _distinct joins alike settings' labels
            bottom.axhline(targets[first], color=line[0].get_color(), ls=":", lw=1)
        bottom.set_ylabel("share of filters removed")
        bottom.set_ylim(0, 1)
        bottom.set_xticks(list(x), names, rotation=60, ha="right", fontsize=8)
        bottom.set_xlabel("group of coupled filters (first layer), input to output")
        bottom.legend(fontsize=8, title="dotted: the global ratio r_g", title_fontsize=8)
        n = len(seeds)
        fig.suptitle(
            f"MRPF: sensitivity and per-group pruning ratios ({model or study.name}, "
            f"mean ± std over {n} seed{'s' if n != 1 else ''})",
            fontsize=10,
        )
        fig.tight_layout()
        path = Path(folder) / f"mrs_ratios{'_' + model if model else ''}{'' if regime == 'clean' else '_' + regime}.png"
        written.append(write_png(fig, path))
    return written


MAX_LINES = 10  # settings per panel before the legend stops being readable


def write_png(fig, path: Path, **savefig) -> Path:
    """Save and close a figure; the PNG is written whole or not at all (a full disk is one sentence)."""
    try:
        return atomic_write(
            path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI, **savefig), FOLDER_OPTIONS, STORE_UNCHANGED
        )
    finally:
        _pyplot().close(fig)


def _save(fig, folder: str | Path, name: str) -> Path:
    fig.tight_layout(rect=(0, 0, 1, 0.96))  # panel titles clear of the x labels above; room for the suptitle
    return write_png(fig, Path(folder) / name, bbox_inches="tight")


def _suffix(model: str | None, regime: str) -> str:
    return ("_" + model if model else "") + ("" if regime == "clean" else "_" + regime)


def _panels(n: int, width: float = 4.2, height: float = 3.4):
    plt = _pyplot()
    cols = min(n, 3)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def _decorate(ax, title: str, xlabel: str, ylabel: str) -> None:
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)


def _view(study: StudyConfig, cells: list[dict], regime: str):
    from robustprune.report.robustness import regime_view

    return regime_view(study, cells, regime, flags=set())


def _cell_measure(c: dict, metrics: list[str]) -> float | None:
    vs = [c["metrics"][m] for m in metrics if m in c["metrics"]]
    return statistics.fmean(vs) if len(vs) == len(metrics) else None


def _pct(cells: list[dict], metrics: list[str]) -> tuple[float, float]:
    m, s = _mean_std([_cell_measure(c, metrics) for c in cells])
    return 100 * m, 100 * s


def _models(view) -> list:
    return list(dict.fromkeys(k.model for k in view.keys))


def _seeds_title(view) -> str:
    return f"mean ± std over {view.seeds()}"


def _series_label(k) -> str:
    label = (
        k.pruning + (f" {k.adjust}" if k.adjust else "") + (f" FT {k.finetune_epochs} ep" if k.finetune_epochs else "")
    )
    return label + (f" it{k.iteration}" if k.iteration else "")


def sparsity_figures(study: StudyConfig, cells: list[dict], folder, regime: str = "clean") -> list[Path]:
    from robustprune.report.robustness import measure_metrics

    view = _view(study, cells, regime)
    if view is None:
        return []
    measures = measure_metrics(view)
    measures = {"Clean": measures.pop("Clean"), **measures}
    written = []
    for model in _models(view):
        keys = [k for k in view.keys if k.model == model]
        dense = [k for k in keys if k.pruning == "dense"]
        series: dict[str, list] = {}
        for k in keys:
            if k.pruning != "dense":
                series.setdefault(_series_label(k), []).append(k)
        if not series:
            continue
        fig, axes = _panels(len(measures))
        for ax, (name, metrics) in zip(axes, measures.items()):
            if dense:
                m, sd = _pct(view.groups[dense[0]], metrics)
                ax.axhline(m, color="black", ls="--", lw=1, label="dense")
                ax.axhspan(m - sd, m + sd, color="black", alpha=0.08)
            for label, ks in list(series.items())[:MAX_LINES]:
                pts = sorted(
                    (
                        100 * _mean_std([c["metrics"].get("sparsity") for c in view.groups[k]])[0],
                        *_pct(view.groups[k], metrics),
                    )
                    for k in ks
                )
                ax.errorbar(
                    [p[0] for p in pts],
                    [p[1] for p in pts],
                    yerr=[p[2] for p in pts],
                    marker="o",
                    ms=4,
                    capsize=2,
                    label=label,
                )
            _decorate(ax, name, "weights removed (%)", "accuracy (%)")
        axes[0].legend(fontsize=7)
        fig.suptitle(
            f"Robustness vs sparsity ({model or study.name}, regime '{regime}', {_seeds_title(view)})", fontsize=10
        )
        written.append(_save(fig, folder, f"robustness_vs_sparsity{_suffix(model, regime)}.png"))
    return written


def strength_figures(study: StudyConfig, cells: list[dict], folder, regime: str = "clean") -> list[Path]:
    from robustprune.evaluation import names
    from robustprune.report.robustness import attack_title

    view = _view(study, cells, regime)
    if view is None:
        return []
    attacks = {
        label: eps
        for label, e in study.evaluation.attacks.items()
        if len(eps := [x for x in e.eps if view.has(names.adv(label, x))]) > 1
    }
    if not attacks:
        return []
    written = []
    for model in _models(view):
        keys = [k for k in view.keys if k.model == model][:MAX_LINES]
        fig, axes = _panels(len(attacks))
        for ax, (label, eps) in zip(axes, attacks.items()):
            per255 = all(names.eps_text(e).endswith("/255") for e in eps)  # CIFAR-style k/255, else as given
            scale = 255 if per255 else 1
            for k in keys:
                pts = [(e * scale, *_pct(view.groups[k], [names.adv(label, e)])) for e in eps]
                pts = [p for p in pts if p[1] == p[1]]  # settings without this attack are skipped
                if pts:
                    ax.errorbar(
                        [p[0] for p in pts],
                        [p[1] for p in pts],
                        yerr=[p[2] for p in pts],
                        marker="o",
                        ms=3,
                        capsize=2,
                        label=setting_label(k),
                        **({"color": "black", "ls": "--"} if k.pruning == "dense" else {}),
                    )
            _decorate(
                ax, attack_title(label), "L∞ ε (× 1/255)" if per255 else "L∞ ε (pixel scale [0, 1])", "accuracy (%)"
            )
        axes[0].legend(fontsize=7)
        fig.suptitle(
            f"Accuracy vs attack strength ({model or study.name}, regime '{regime}', {_seeds_title(view)})", fontsize=10
        )
        written.append(_save(fig, folder, f"robustness_vs_strength{_suffix(model, regime)}.png"))
    return written


def correlation_figures(study: StudyConfig, cells: list[dict], folder, regime: str = "clean") -> list[Path]:
    from robustprune.metrics.correlation import pearson
    from robustprune.report.robustness import measure_metrics

    view = _view(study, cells, regime)
    if view is None or len(view.keys) < 3:
        return []
    measures = measure_metrics(view)
    measures.pop("Clean")
    if not measures:
        return []
    clean = [_pct(view.groups[k], ["acc_clean"])[0] for k in view.keys]
    fig, axes = _panels(len(measures), 4.0, 3.6)
    for ax, (name, metrics) in zip(axes, measures.items()):
        rob = [_pct(view.groups[k], metrics)[0] for k in view.keys]
        pts = [(x, y) for x, y in zip(clean, rob) if x == x and y == y]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=18)
        r, pval = pearson([p[0] for p in pts], [p[1] for p in pts])
        # one point per setting (its mean over seeds): p counts settings, never settings x seeds
        ax.set_title(f"{name}\nPearson r = {r:.2f}, p = {pval:.2g} over {len(pts)} settings", fontsize=9)
        ax.set_xlabel("clean accuracy (%)")
        ax.set_ylabel(f"{name} accuracy (%)")
        ax.grid(alpha=0.3)
    fig.suptitle(
        f"Generalization vs robustness (regime '{regime}', each point a setting's mean over seeds)", fontsize=10
    )
    return [_save(fig, folder, f"generalization_vs_robustness{_suffix(None, regime)}.png")]


def dynamics_figures(study: StudyConfig, cells: list[dict], folder, regime: str = "clean") -> list[Path]:
    from robustprune.report.training import DYNAMICS

    view = _view(study, cells, regime)
    if view is None:
        return []
    shown = [
        m
        for m in ("grad_confusion", "layer_rotation", "loss")
        if any(c.get("history") and any("grad_confusion" in e for e in c["history"]) for c in view.cells)
    ]
    if not shown:
        return []
    fig, axes = _panels(len(shown))
    for ax, metric in zip(axes, shown):
        for k in view.keys[:MAX_LINES]:
            hs = [c["history"] for c in view.groups[k] if c.get("history") and any(metric in e for e in c["history"])]
            if not hs:
                continue
            n = max(len(h) for h in hs)
            pts = [_mean_std([h[e].get(metric) for h in hs if len(h) > e]) for e in range(n)]
            ax.errorbar(
                range(1, n + 1),
                [p[0] for p in pts],
                yerr=[p[1] for p in pts],
                marker="o",
                ms=3,
                capsize=2,
                label="dense" if k.pruning == "dense" else f"{k.pruning} s={k.sparsity:g}",
            )
        _decorate(ax, DYNAMICS[metric][0], "epoch of that model's training", DYNAMICS[metric][0].lower())
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Training dynamics (regime '{regime}', {_seeds_title(view)})", fontsize=10)
    return [_save(fig, folder, f"training_dynamics{_suffix(None, regime)}.png")]


def weight_figures(study: StudyConfig, cells: list[dict], folder, regime: str = "clean") -> list[Path]:

    view = _view(study, cells, regime)
    if view is None:
        return []
    keys = [k for k in view.keys if any("weights:q0" in c["metrics"] for c in view.groups[k])][: 2 * MAX_LINES]
    if not keys:
        return []
    plt = _pyplot()
    stats = []
    for k in keys:
        q = {p: _mean_std([c["metrics"].get(f"weights:q{p}") for c in view.groups[k]])[0] for p in (0, 25, 50, 75, 100)}
        stats.append(
            {
                "label": setting_label(k),
                "whislo": q[0],
                "q1": q[25],
                "med": q[50],
                "q3": q[75],
                "whishi": q[100],
                "fliers": [],
            }
        )
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(keys) + 2), 4.5))
    ax.bxp(stats, showfliers=False)
    ax.set_ylabel("weight value")
    ax.axhline(0, color="grey", lw=0.5)
    ax.tick_params(axis="x", labelrotation=60, labelsize=7)
    for tick in ax.get_xticklabels():
        tick.set_ha("right")
    ax.set_title(
        f"Conv and linear weights: whiskers at min / max, box at the quartiles, line at the median "
        f"(regime '{regime}', mean over seeds)",
        fontsize=9,
    )
    return [_save(fig, folder, f"weights{_suffix(None, regime)}.png")]


def security_figures(study: StudyConfig, cells: list[dict], folder, regime: str = "clean") -> list[Path]:
    """Robust accuracy against eps from the security curve (FMN minimum norms), one line per setting
    (mean over seeds), and each setting's AutoAttack result at the study's eps as a star: the point
    of the curve that the strongest attack checked."""
    from robustprune.evaluation import names
    from robustprune.evaluation.security import plot_security_curves

    sec = study.evaluation.security
    view = _view(study, cells, regime)
    if sec is None or view is None:
        return []
    grid = [e for e in sec.eps if view.has(names.curve(sec.norm, e))]
    checks = [
        (label, e)
        for label, entry in study.evaluation.attacks.items()
        if entry.name(label) == "autoattack"
        and entry.params.get("norm", "Linf") == sec.norm
        and entry.subset == sec.subset
        for e in entry.eps
    ]
    written = []
    for model in _models(view):
        keys = [k for k in view.keys if k.model == model][:MAX_LINES]
        curves, checked = {}, {}
        for k in keys:
            pts = [
                (e, _mean_std([c["metrics"].get(names.curve(sec.norm, e)) for c in view.groups[k]])[0]) for e in grid
            ]
            pts = [p for p in pts if p[1] == p[1]]
            if not pts:
                continue
            label = setting_label(k)
            curves[label] = {"eps": [p[0] for p in pts], "robust_accuracy": [p[1] for p in pts]}
            for attack, e in checks:  # the study's AutoAttack eps (the report eps when it has several)
                acc = _mean_std([c["metrics"].get(names.adv(attack, e)) for c in view.groups[k]])[0]
                if acc == acc and (label not in checked or e == study.evaluation.shown_eps(attack)):
                    checked[label] = (e, acc)
        if not curves:
            continue
        path = Path(folder) / f"security_curves{_suffix(model, regime)}.png"
        title = f"Security curves, FMN {sec.norm}\n{model or study.name}, regime '{regime}', {_seeds_title(view)}"
        written.append(plot_security_curves(curves, path, sec.norm, checked, title=title))
    return written


FIGURES = [
    sparsity_figures,
    strength_figures,
    correlation_figures,
    dynamics_figures,
    weight_figures,
    mrs_figures,
    security_figures,
]


def all_figures(study: StudyConfig, cells: list[dict], folder: str | Path) -> list[Path]:
    return [p for make in FIGURES for regime in study.regimes for p in make(study, cells, folder, regime)]
