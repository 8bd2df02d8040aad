"""Evaluate one model as the study's `evaluation` section says: white-box attacks at every eps,
transfer attacks from other models, centre occlusion, common corruptions, and the gradient-masking
checks. Attacks use the first `attack_subset` test images, shifts the first `shift_subset`."""

from __future__ import annotations

import statistics
from typing import Callable

import torch
from torch import nn

from robustprune.attacks.autoattack import BLACK_BOX, AutoAttack
from robustprune.attacks.base import frozen_eval
from robustprune.attacks.occlusion import occlude
from robustprune.evaluation import names
from robustprune.evaluation.checks import masking_checks, pairs
from robustprune.tensors import to_float
from robustprune.train import accuracy

# corrupted(type) -> (images uint8 (severities, n, C, H, W), labels (severities, n)), severities as listed
CorruptedSets = Callable[[str], tuple[torch.Tensor, torch.Tensor]]


def first(x: torch.Tensor, n: int | None) -> torch.Tensor:
    return x if n is None else x[:n]


def attack_hits(
    model: nn.Module, attack, x: torch.Tensor, y: torch.Tensor, batch_size: int, alive: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per image whether it stayed correct under the attack, batch by batch; only the images marked
    `alive` are attacked (the others count as broken). For a cascade also the mask after its
    white-box stages alone (Square's breaks undone), for the black-box masking check."""
    device = next(model.parameters()).device
    idx = torch.arange(len(x)) if alive is None else alive.nonzero().squeeze(1)
    hits = torch.zeros(len(x), dtype=torch.bool)
    white = torch.zeros(len(x), dtype=torch.bool) if isinstance(attack, AutoAttack) else None
    for i in range(0, len(idx), batch_size):
        rows = idx[i : i + batch_size]
        xb, yb = to_float(x[rows].to(device)), y[rows].to(device)
        if white is not None:
            result = attack.run(model, xb, yb)
            hits[rows] = result.robust
            white[rows] = torch.tensor([b == "" or b in BLACK_BOX for b in result.broken_by], dtype=torch.bool)
            continue
        x_adv = attack(model, xb, yb)
        with torch.inference_mode(), frozen_eval(model):
            hits[rows] = (model(x_adv).argmax(1) == yb).cpu()
    return hits, white


def attack_metrics(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, ev, progress, record: dict | None = None
) -> dict[str, float]:
    """acc_adv:<label>@<eps> for every entry and eps. An attack that searches the whole eps-ball
    (searches_ball) sweeps its eps upwards on the survivors: a point broken inside a smaller ball
    is broken inside every larger one, so only the points that survived are attacked again."""
    out = {}
    same_images: dict[tuple, list[torch.Tensor]] = {}  # (eps, subset, norm) -> per-image hits of each entry
    for label, entry in ev.attacks.items():
        xe, ye = first(x, entry.subset), first(y, entry.subset)
        if entry.subset is not None:
            out[names.images(label)] = float(len(xe))
        alive = None
        for eps in sorted(entry.eps):
            attack = entry.build(label, eps)
            if isinstance(attack, AutoAttack) and alive is None:  # robust accuracy at eps 0: clean, same images
                out[names.adv(label, 0.0)] = accuracy(model, xe, ye, ev.batch_size) if len(xe) else float("nan")
            sweep = getattr(attack, "searches_ball", False)
            n = len(xe) if alive is None or not sweep else int(alive.sum())
            progress.advance(0, f"{label} eps={eps:g} on {n} images")
            name = names.adv(label, eps)
            hits, white = attack_hits(model, attack, xe, ye, ev.batch_size, alive if sweep else None)
            alive = hits if sweep else None
            out[name] = int(hits.sum()) / len(xe) if len(xe) else float("nan")
            if record is not None:
                record[name] = hits
            same_images.setdefault((eps, entry.subset, entry.params.get("norm", "Linf")), []).append(hits)
            if white is not None:
                out[names.stage(label, eps, "white_box")] = int(white.sum()) / len(xe) if len(xe) else float("nan")
    # per image the worst case over every attack run on the same images at the same eps and norm
    for (eps, subset, norm), runs in same_images.items():
        if len(runs) > 1 and subset is None and norm == "Linf" and len(runs[0]):
            worst = torch.stack(runs).all(0)
            out[names.adv(names.WORST, eps)] = int(worst.sum()) / len(worst)
            if record is not None:
                record[names.adv(names.WORST, eps)] = worst
    return out


def curve_metrics(model: nn.Module, x: torch.Tensor, y: torch.Tensor, ev, progress) -> dict[str, float]:
    """acc_curve:<norm>@<eps> at every eps of the grid from one FMN run, and the median minimum norm."""
    from robustprune.evaluation.security import security_curve

    sec = ev.security
    xc, yc = first(x, sec.subset), first(y, sec.subset)
    progress.advance(0, f"security curve (FMN {sec.norm}) on {len(xc)} images")
    curve = security_curve(model, xc, yc, sec.norm, sec.eps, sec.steps, sec.seed, ev.batch_size)
    out = {names.curve(sec.norm, e): a for e, a in zip(curve["eps"], curve["robust_accuracy"])}
    out[names.median_norm(sec.norm)] = curve["median_norm"]
    out["images:curve"] = float(len(xc))
    return out


def corruption_metrics(
    model: nn.Module, ev, corrupted: CorruptedSets, progress, record: dict | None = None
) -> dict[str, float]:
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


def evaluate_robustness(
    model: nn.Module,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    ev,
    progress,
    corrupted: CorruptedSets | None = None,
    transfer_sets: dict[str, torch.Tensor] | None = None,
    regime_tests: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    regime_transfer: dict[str, tuple[str, float]] | None = None,
    record: dict | None = None,
) -> dict[str, float]:
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
    if ev.security:
        out.update(curve_metrics(model, xa, ya, ev, progress))
    xs, ys = first(x_test, ev.shift_subset), first(y_test, ev.shift_subset)
    if ev.occlusion or ev.corruptions:
        out["images:shifts"] = float(len(xs))
    for size in ev.occlusion:
        out[names.occlusion(size)] = accuracy(
            model, occlude(xs, size), ys, ev.batch_size, record, names.occlusion(size)
        )
    if ev.corruptions:
        out.update(corruption_metrics(model, ev, corrupted, progress, record))
    # regime test sets crafted on another model are compared on the attacked images only
    on_subset = {
        f"acc_{t}": accuracy(
            model,
            first(regime_tests[t][0], ev.attack_subset),
            first(regime_tests[t][1], ev.attack_subset),
            ev.batch_size,
        )
        for t in (regime_transfer or {})
        if t in (regime_tests or {})
    }
    check_pairs = pairs(
        ev.attacks, transfer_names, {f"acc_{t}": v for t, v in (regime_transfer or {}).items()}, ev.security
    )
    out.update(masking_checks(out | on_subset, check_pairs, ev.masking_tolerance))
    return out
