"""Figures from stored cells, written as PNG files. Each function returns the paths it wrote, and
writes nothing when the study has no results it applies to.

    mrs_figures   MRPF (Bai et al.): per architecture, the Module Robust Sensitivity of every group of
                  coupled filters (top) and the share of its filters each MRPF setting removed (bottom),
                  in network order, mean ± std over seeds.
"""
from __future__ import annotations

import statistics
from pathlib import Path

from robustprune.report.tables import group
from robustprune.study.schema import StudyConfig

DPI = 150


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed, and no GUI backend started in workers
    import matplotlib.pyplot as plt

    return plt


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
    return {(labels[0] if len(labels) == 1 else f"{labels[0]} and {len(labels) - 1} more alike"): pts
            for labels, pts in out.values()}


def mrs_figures(study: StudyConfig, cells: list[dict], folder: str | Path, regime: str = "clean") -> list[Path]:
    plt = _pyplot()
    groups_by_key = group([c for c in cells if c["axes"]["regime"] == regime])
    keys = [k for k, cs in groups_by_key.items() if any(m.startswith("mrs:") for c in cs for m in c["metrics"])]
    written = []
    for model in dict.fromkeys(k.model for k in keys):
        mine = sorted((k for k in keys if k.model == model), key=lambda k: (k.sparsity or 0.0, k.pruning))
        names = list(dict.fromkeys(m[4:] for k in mine for c in groups_by_key[k] for m in c["metrics"]
                                   if m.startswith("mrs:")))
        names = network_order(study, model, names)
        mrs, ratios, seeds = {}, {}, set()
        for k in mine:
            cs = groups_by_key[k]
            seeds |= {c["axes"]["seed"] for c in cs}
            label = f"{k.pruning} s={k.sparsity:g}"
            mrs[k.pruning] = [_mean_std([c["metrics"].get(f"mrs:{g}") for c in cs]) for g in names]
            ratios[label] = [_mean_std([c["metrics"].get(f"ratio:{g}") for c in cs]) for g in names]
        fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(7.0, 0.45 * len(names) + 2), 7.5), sharex=True)
        x = range(len(names))
        mrs = _distinct(mrs)
        width = 0.8 / len(mrs)
        for i, (label, pts) in enumerate(mrs.items()):
            top.bar([xi + (i - (len(mrs) - 1) / 2) * width for xi in x], [m for m, _ in pts], width,
                    yerr=[s for _, s in pts], capsize=2, label=label)
        top.set_ylabel("MRS (rise of the adversarial loss)")
        top.set_yscale("log")
        top.legend(fontsize=8)
        for label, pts in _distinct(ratios).items():
            line = bottom.errorbar(list(x), [m for m, _ in pts], yerr=[s for _, s in pts], marker="o", ms=4,
                                   capsize=2, label=label)
            target = float(label.split("s=")[1].split()[0])
            bottom.axhline(target, color=line[0].get_color(), ls=":", lw=1)
        bottom.set_ylabel("share of filters removed")
        bottom.set_ylim(0, 1)
        bottom.set_xticks(list(x), names, rotation=60, ha="right", fontsize=8)
        bottom.set_xlabel("group of coupled filters (first layer), input to output")
        bottom.legend(fontsize=8, title="dotted: the global ratio r_g", title_fontsize=8)
        n = len(seeds)
        fig.suptitle(f"MRPF: sensitivity and per-group pruning ratios ({model or study.name}, "
                     f"mean ± std over {n} seed{'s' if n != 1 else ''})", fontsize=10)
        fig.tight_layout()
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"mrs_ratios{'_' + model if model else ''}{'' if regime == 'clean' else '_' + regime}.png"
        fig.savefig(path, dpi=DPI)
        plt.close(fig)
        written.append(path)
    return written


FIGURES = [mrs_figures]


def all_figures(study: StudyConfig, cells: list[dict], folder: str | Path) -> list[Path]:
    return [p for make in FIGURES for regime in study.regimes for p in make(study, cells, folder, regime)]
