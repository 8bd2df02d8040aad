"""Evaluate one model as the study's `evaluation` section says: white-box attacks at every eps,
transfer attacks from other models, centre occlusion, common corruptions, and the gradient-masking
checks. Attacks use the first `attack_subset` test images, shifts the first `shift_subset`."""
from __future__ import annotations

import statistics
from typing import Callable

import torch
from torch import nn

from robustprune.attacks import adversarial_accuracy
from robustprune.attacks.occlusion import occlude
from robustprune.evaluate import names
from robustprune.evaluate.checks import masking_checks, pairs
from robustprune.train import accuracy

# corrupted(type) -> (images uint8 (severities, n, C, H, W), labels (severities, n)), severities as listed
CorruptedSets = Callable[[str], tuple[torch.Tensor, torch.Tensor]]


def first(x: torch.Tensor, n: int | None) -> torch.Tensor:
    return x if n is None else x[:n]


def attack_metrics(model: nn.Module, x: torch.Tensor, y: torch.Tensor, ev, progress,
                   record: dict | None = None) -> dict[str, float]:
    out = {}
    for label, entry in ev.attacks.items():
        for eps in entry.eps:
            progress.advance(0, f"{label} eps={eps:g} on {len(x)} images")
            name = names.adv(label, eps)
            out[name] = adversarial_accuracy(model, entry.build(label, eps), x, y, ev.batch_size, record, name)
    return out


def corruption_metrics(model: nn.Module, ev, corrupted: CorruptedSets, progress,
                       record: dict | None = None) -> dict[str, float]:
    out = {}
    severities = ev.corruptions.severities
    for kind in ev.corruption_types():
        progress.advance(0, f"corruption {kind}")
        xs, ys = corrupted(kind)
        for i, sev in enumerate(severities):
            name = names.corruption(kind, sev)
            out[name] = accuracy(model, xs[i], ys[i], ev.batch_size, record, name)
        out[names.corruption(kind)] = statistics.fmean(out[names.corruption(kind, s)] for s in severities)
    kinds = ev.corruption_types()
    for sev in severities:
        out[names.corruption(None, sev)] = statistics.fmean(out[names.corruption(k, sev)] for k in kinds)
    out[names.corruption()] = statistics.fmean(out[names.corruption(k)] for k in kinds)
    return out


def evaluate_robustness(model: nn.Module, x_test: torch.Tensor, y_test: torch.Tensor, ev, progress,
                        corrupted: CorruptedSets | None = None,
                        transfer_sets: dict[str, torch.Tensor] | None = None,
                        regime_tests: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
                        regime_transfer: dict[str, tuple[str, float]] | None = None,
                        record: dict | None = None) -> dict[str, float]:
    """All robustness metrics of one model (see names.py for what each is called). With `record`,
    record[metric] keeps the per-image result of every accuracy over a set of images.

    transfer_sets: {source model name: adversarial versions of the attacked images, crafted on it};
    regime_tests / regime_transfer: the regime's extra test sets and which of them are transfer
    attacks, so white-box results can be checked against them on the same images."""
    xa, ya = first(x_test, ev.attack_subset), first(y_test, ev.attack_subset)
    out: dict[str, float] = {"images:attacks": float(len(xa))}
    out.update(attack_metrics(model, xa, ya, ev, progress, record))
    transfer_names = []
    if transfer_sets:
        eps = ev.transfer_eps()
        for source, x_adv in transfer_sets.items():
            name = names.transfer(ev.transfer.attack, eps, source)
            out[name] = accuracy(model, x_adv, ya, ev.batch_size, record, name)
            transfer_names.append(name)
    xs, ys = first(x_test, ev.shift_subset), first(y_test, ev.shift_subset)
    if ev.occlusion or ev.corruptions:
        out["images:shifts"] = float(len(xs))
    for size in ev.occlusion:
        out[names.occlusion(size)] = accuracy(model, occlude(xs, size), ys, ev.batch_size, record,
                                              names.occlusion(size))
    if ev.corruptions:
        out.update(corruption_metrics(model, ev, corrupted, progress, record))
    # regime test sets crafted on another model are compared on the attacked images only
    on_subset = {f"acc_{t}": accuracy(model, first(regime_tests[t][0], ev.attack_subset),
                                      first(regime_tests[t][1], ev.attack_subset), ev.batch_size)
                 for t in (regime_transfer or {}) if t in (regime_tests or {})}
    check_pairs = pairs(ev.attacks, transfer_names, {f"acc_{t}": v for t, v in (regime_transfer or {}).items()})
    out.update(masking_checks(out | on_subset, check_pairs, ev.masking_tolerance))
    return out
