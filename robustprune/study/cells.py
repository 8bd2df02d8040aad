"""A study expands into cells: one (regime, pruning setting, seed) each. A cell's config holds
everything needed to reproduce it; a hash of its non-default settings names its rows and
checkpoints (as open_lth does), so adding a new setting later does not invalidate old results."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from pydantic import BaseModel

from robustprune.data import REGIMES
from robustprune.pruning import PRUNING_METHODS
from robustprune.study.schema import ModelConfig, StudyConfig


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def dump(model: BaseModel, full: bool) -> dict:
    return model.model_dump(mode="json", exclude_defaults=not full)


@dataclass(frozen=True)
class Cell:
    study: str
    axes: dict[str, Any]  # what tables group by: [model,] regime, pruning, sparsity, finetune_epochs, round,
    # seed [, adjust] [, iteration]
    config: dict[str, Any]  # every setting, defaults included (stored with each row)
    hash: str  # hash of the non-default settings
    dense_key: dict[str, Any] = field(repr=False)  # what the dense model depends on

    @property
    def label(self) -> str:
        a = self.axes
        if a["pruning"] == "dense":
            what = "dense"
        elif a["round"] is not None:
            what = f"{a['pruning']} round {a['round']}"
        elif a.get("adjust"):
            what = f"{a['pruning']} s={a['sparsity']:g} {a['adjust']}"
        else:
            what = f"{a['pruning']} s={a['sparsity']:g} ft={a['finetune_epochs']}"
            if a.get("iteration"):
                what += f" it={a['iteration']}"
        model = f"{a['model']} / " if a.get("model") else ""
        return f"{model}{a['regime']} / {what} / seed {a['seed']}"


def _regime(name: str, params: dict, full: bool) -> dict:
    p = REGIMES.get(name).Params(**(params or {}))
    return {"name": name, "params": dump(p, full)}


@lru_cache(maxsize=None)
def _file_sha256(path: str, mtime_ns: int, size: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def model_key(model: ModelConfig) -> dict:
    """The architecture, and for a loaded dense model its file with the file's SHA-256 (a changed
    file gives new cells, and every stored number names the exact weights it came from)."""
    out = dump(model, True)
    for k in ("train", "seeds"):  # in the study's own settings (dense_key) and in the grid (expand)
        out.pop(k, None)
    if out.pop("weights", None) is not None:
        st = os.stat(model.weights)
        out |= {"weights": model.weights, "weights_sha256": _file_sha256(model.weights, st.st_mtime_ns, st.st_size)}
    return out


def dense_key(study: StudyConfig, regime: str, seed: int, full: bool = False, model: ModelConfig | None = None) -> dict:
    return {
        "dataset": study.dataset,
        "data": dump(study.data, full),
        "model": model_key(model or study.model),
        "train": dump(study.model_train(model or study.model), full),
        "regime": _regime(regime, study.regimes[regime], full),
        "seed": seed,
    }


def expand(study: StudyConfig) -> list[Cell]:
    """All cells, grouped by seed, regime and model so a dense model and its data are reused back
    to back. A study with several architectures (`models:`) adds the 'model' axis (its label)."""
    cells = []
    for seed in study.seeds:
        for regime in study.regimes:
            for model_label, model in study.model_items():
                if model.seeds is None or seed in model.seeds:
                    cells += _setting_cells(study, seed, regime, model_label, model)
    return cells


def count_cells(study: StudyConfig) -> int:
    """len(expand(study)), counted without building any cell."""
    total = 0
    for model_label, model in study.model_items():
        seeds = len(study.seeds) if model.seeds is None else len(set(model.seeds) & set(study.seeds))
        settings = 1  # the dense model
        for p in study.pruning.values():
            if p.models is not None and model_label not in p.models:
                continue
            method = PRUNING_METHODS.get(p.method)
            params = method.Params(**p.params)
            if method.iterative:
                settings += params.rounds
                continue
            schemes = sum(1 for scheme in p.adjust if scheme != "finetune")
            finetunes = len(p.finetune_epochs) if "finetune" in p.adjust else 0
            settings += len(p.sparsities) * (schemes + finetunes * getattr(params, "rounds", 1))
        total += seeds * len(study.regimes) * settings
    return total


def _setting_cells(
    study: StudyConfig, seed: int, regime: str, model_label: str | None, model: ModelConfig
) -> list[Cell]:
    cells = []
    # one (seed, regime, model): the dense model and every pruning setting of it
    base_full = dense_key(study, regime, seed, True, model) | {"evaluation": dump(study.evaluation, True)}
    base_key = dense_key(study, regime, seed, False, model) | {"evaluation": dump(study.evaluation, False)}
    axes0 = {
        "regime": regime,
        "pruning": "dense",
        "method": None,
        "sparsity": 0.0,
        "finetune_epochs": 0,
        "round": None,
        "seed": seed,
    }
    if model_label is not None:
        axes0 = {"model": model_label} | axes0
    settings = [(axes0, None, None)]
    for label, p in study.pruning.items():
        if p.models is not None and model_label not in p.models:
            continue
        method = PRUNING_METHODS.get(p.method)
        params = method.Params(**p.params)
        if method.iterative:
            for r in range(1, params.rounds + 1):
                axes = axes0 | {
                    "pruning": label,
                    "method": p.method,
                    "sparsity": round(1 - (1 - params.rate) ** r, 6),
                    "round": r,
                }
                pr = {"method": p.method, "round": r}
                settings.append((axes, pr | {"params": dump(params, True)}, pr | {"params": dump(params, False)}))
            continue
        for s in p.sparsities:
            for scheme in p.adjust:
                if scheme == "finetune":
                    continue
                axes = axes0 | {"pruning": label, "method": p.method, "sparsity": s, "adjust": scheme}
                pr = {"method": p.method, "sparsity": s, "finetune": None, "adjust": scheme}
                if scheme == "winning_ticket":  # the epoch itself: a fraction that resolves to it is the same cell
                    pr["rewind_epoch"] = p.rewind_at(study.model_train(model).epochs)
                elif scheme == "scratch_b":
                    pr["scratch_b"] = p.scratch_b
                settings.append((axes, pr | {"params": dump(params, True)}, pr | {"params": dump(params, False)}))
            rounds = getattr(params, "rounds", 1)  # Algorithm 1: every iteration's model is a cell
            for ft in p.finetune_epochs if "finetune" in p.adjust else []:
                entry_ft = study.entry_finetune(label).model_copy(update={"epochs": ft})
                ft_full = dump(entry_ft, True) if ft else None
                ft_key = dump(entry_ft, False) if ft else None
                for it in range(1, rounds + 1) if rounds > 1 else [None]:
                    axes = axes0 | {"pruning": label, "method": p.method, "sparsity": s, "finetune_epochs": ft}
                    pr = {"method": p.method, "sparsity": s}
                    if it is not None:
                        axes, pr = axes | {"iteration": it}, pr | {"iteration": it}
                    settings.append(
                        (
                            axes,
                            pr | {"params": dump(params, True), "finetune": ft_full},
                            pr | {"params": dump(params, False), "finetune": ft_key},
                        )
                    )
    for axes, pr_full, pr_key in settings:
        config = base_full | {"pruning": pr_full}
        key = base_key | {"pruning": pr_key}
        cells.append(Cell(study.name, axes, config, config_hash(key), dense_key(study, regime, seed, False, model)))
    return cells


def training_epochs(cell: Cell) -> float:
    """Roughly how many epochs a cell trains: the dense training, its fine-tuning, or for Scratch-E/B
    and winning tickets a retraining as long as the dense model's (Scratch-B twice as long, or for
    the same FLOPs about 1 / (1 - sparsity) as long)."""
    pr = cell.config["pruning"]
    if pr is None:
        return cell.config["train"]["epochs"]
    if pr.get("adjust"):
        epochs = cell.config["train"]["epochs"]
        if pr["adjust"] == "winning_ticket":
            return max(0, epochs - pr.get("rewind_epoch", 0))
        if pr["adjust"] == "scratch_b":
            return epochs * (2.0 if pr.get("scratch_b") == "epochs" else 1.0 / max(1.0 - pr["sparsity"], 0.1))
        return epochs
    return (pr.get("finetune") or {}).get("epochs", 0) or 0


def estimated_cost(cell: Cell) -> float:
    """A cell's work in dense-epoch units, for time-left estimates: its training (a pruned model
    trains faster, about in proportion to what is left) plus half an epoch for pruning and evaluation."""
    pr = cell.config["pruning"]
    shrink = 1.0 if pr is None or pr.get("adjust") else 1.0 - 0.5 * (pr.get("sparsity") or 0.0)
    return training_epochs(cell) * shrink + 0.5
