"""What training and pruning did to a model, beyond its accuracy: the training dynamics per epoch
(Jordão & Pedrini Fig. 2: loss, gradient confusion, layer rotation) and the per-layer widths
that structured pruning left."""

from __future__ import annotations

import statistics

from robustprune.report.base import Table, network_order, setting_label
from robustprune.report.robustness import regime_view
from robustprune.study.schema import StudyConfig

DYNAMICS = {  # history key -> (title, what the caption says about it)
    "loss": ("Training loss", "mean cross-entropy over the epoch's batches (lower = faster convergence)"),
    "grad_confusion": (
        "Gradient confusion",
        "minimum over 8 fixed batch pairs of the cosine distance between "
        "their loss gradients (higher = better, as the paper reads it)",
    ),
    "layer_rotation": (
        "Layer rotation",
        "cosine distance of the last conv's weights from where this training "
        "started (higher = better, as the paper reads it)",
    ),
}
MAX_EPOCH_COLUMNS = 8
MAX_WIDTH_COLUMNS = 6  # pruned settings per widths table, so that a terminal shows every column


def shown_epochs(n: int) -> list[int]:
    """1-based epochs to show of a history of n: all up to MAX_EPOCH_COLUMNS, else evenly spaced,
    always the first and the last."""
    if n <= MAX_EPOCH_COLUMNS:
        return list(range(1, n + 1))
    step = (n - 1) / (MAX_EPOCH_COLUMNS - 1)
    return sorted({1 + round(i * step) for i in range(MAX_EPOCH_COLUMNS)})


def _mean_std(values: list[float], spec: str = ".4f") -> str:
    values = [v for v in values if v is not None and v == v]
    if not values:
        return "—"
    text = f"{statistics.fmean(values):{spec}}"
    varies = len(values) > 1 and max(values) != min(values)  # no "± 0" on values that cannot vary
    return text + (f" ± {statistics.stdev(values):{spec}}" if varies else "")


def dynamics_tables(study: StudyConfig, cells: list[dict], regime: str) -> list[Table]:
    """One table per dynamics metric: rows = the settings that trained (dense training, fine-tuning,
    Scratch-E/B, winning-ticket retraining), columns = epochs, mean ± std over seeds."""
    view = regime_view(study, cells, regime, flags=set())
    if view is None:
        return []
    tables = []
    for metric, (title, what) in DYNAMICS.items():
        histories = {
            k: [c["history"] for c in view.groups[k] if c.get("history") and any(metric in e for e in c["history"])]
            for k in view.keys
        }
        histories = {k: h for k, h in histories.items() if h}
        if not histories or (
            metric == "loss" and not any("grad_confusion" in e for hs in histories.values() for h in hs for e in h)
        ):
            continue  # the loss alone is shown only next to the dynamics a study asked for
        epochs = shown_epochs(max(len(h) for hs in histories.values() for h in hs))
        rows = [
            [setting_label(k), *[_mean_std([h[e - 1].get(metric) for h in hs if len(h) >= e]) for e in epochs]]
            for k, hs in histories.items()
        ]
        tables.append(
            Table(
                f"Training dynamics: {title} (regime '{view.name}')",
                ["Setting", *[f"Ep {e}" for e in epochs]],
                rows,
                f"{what}; per epoch of each model's own training (dense: training from scratch; "
                f"pruned: fine-tuning, rounds of iterative pruning in sequence; Scratch-E/B and "
                f"W-ticket: retraining), mean ± std over {view.seeds()} (Jordão & Pedrini Fig. 2).",
            )
        )
    return tables


def widths_tables(study: StudyConfig, cells: list[dict], regime: str) -> list[Table]:
    """Per architecture: rows = layers (in module order), columns = the dense model and every
    pruning setting that changed a width (fine-tuning and adjustment share their setting's column)."""
    view = regime_view(study, cells, regime, flags=set())
    if view is None:
        return []
    tables = []
    for model in dict.fromkeys(k.model for k in view.keys):
        keys = [k for k in view.keys if k.model == model]
        layers = list(
            dict.fromkeys(
                m[len("width:") :] for k in keys for c in view.groups[k] for m in c["metrics"] if m.startswith("width:")
            )
        )
        if not layers:
            continue
        columns: dict[str, list[str]] = {}
        dense_widths = None
        for k in keys:
            widths = [
                _mean_std([c["metrics"].get(f"width:{layer}") for c in view.groups[k]], ",.0f") for layer in layers
            ]
            label = "Dense" if k.pruning == "dense" else structure_label(k)
            if k.pruning == "dense":
                dense_widths = widths
            if label not in columns and (widths != dense_widths or k.pruning == "dense"):
                columns[label] = widths
        pruned = [label for label in columns if label != "Dense"]
        if not pruned:
            continue  # nothing was pruned structurally
        chunks = [pruned[i : i + MAX_WIDTH_COLUMNS] for i in range(0, len(pruned), MAX_WIDTH_COLUMNS)]
        for n, chunk in enumerate(chunks, start=1):
            shown = ["Dense", *chunk]
            rows = [[layer, *[columns[c][i] for c in shown]] for i, layer in enumerate(layers)]
            name = f"{model}, " if model else ""
            part = f", part {n} of {len(chunks)}" if len(chunks) > 1 else ""
            tables.append(
                Table(
                    f"Per-layer widths ({name}regime '{view.name}'{part})",
                    ["Layer", *shown],
                    rows,
                    f"Output channels (conv) or features (linear) of every layer; — = removed with its "
                    f"residual block; mean over {view.seeds()} where criteria differ by seed.",
                )
            )
    return tables


def structure_label(k) -> str:
    """What decides a pruned structure: the entry, its sparsity and the iteration (fine-tuning and
    Scratch/winning-ticket adjustment keep the structure, so they share a column)."""
    if k.round is not None:
        return f"{k.pruning} round {k.round}"
    return f"{k.pruning} s={k.sparsity:g}" + (f" it{k.iteration}" if k.iteration else "")


def plan_tables(study: StudyConfig, cells: list[dict], regime: str) -> list[Table]:
    """MRPF (Bai et al.): per architecture, rows = groups of coupled filters (named by their first
    layer), columns = the MRS and the pruning ratio each MRPF setting gave them, mean ± std over seeds."""
    view = regime_view(study, cells, regime, flags=set())
    if view is None:
        return []
    tables = []
    for model in dict.fromkeys(k.model for k in view.keys):
        keys = [
            k
            for k in view.keys
            if k.model == model and any(m.startswith("mrs:") for c in view.groups[k] for m in c["metrics"])
        ]
        columns: dict[str, list[str]] = {}
        groups = list(
            dict.fromkeys(
                m[len("mrs:") :] for k in keys for c in view.groups[k] for m in c["metrics"] if m.startswith("mrs:")
            )
        )
        groups = network_order(study, model, groups)
        merged: dict[tuple, tuple[str, list[str], list[str]]] = {}  # values -> (kind, labels, column)
        for k in keys:
            label = structure_label(k)
            for kind, spec, head in (("mrs", ".4f", "MRS"), ("ratio", ".3f", "ratio")):
                column = [_mean_std([c["metrics"].get(f"{kind}:{g}") for c in view.groups[k]], spec) for g in groups]
                # settings with equal values (every MRPF entry of one dense model has the same MRS) share a column
                labels = merged.setdefault((kind, *column), (head, [], column))[1]
                if label not in labels:
                    labels.append(label)
        single_mrs = sum(head == "MRS" for head, _, _ in merged.values()) == 1
        for head, labels, column in merged.values():
            if head == "MRS" and single_mrs:
                columns["MRS"] = column
                continue
            more = f" and {len(labels) - 1} more alike" if len(labels) > 1 else ""
            columns[f"{head} {labels[0]}{more}"] = column
        if not columns:
            continue
        rows = [[g, *[col[i] for col in columns.values()]] for i, g in enumerate(groups)]
        name = f"{model}, " if model else ""
        tables.append(
            Table(
                f"Module Robust Sensitivity and pruning ratios ({name}regime '{view.name}')",
                ["Group (first layer)", *columns],
                rows,
                f"MRS = adversarial loss after projected gradient ascent on the group's weights minus "
                f"before (Bai et al. Eq. 7); ratio = share of the group's filters removed (Appendix "
                f"B.4.2); mean ± std over {view.seeds()}.",
            )
        )
    return tables
