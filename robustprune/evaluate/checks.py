"""Gradient-masking checks (Carlini et al. 2019, "On evaluating adversarial robustness", §5): on the
same images, an iterative attack is at least as strong as FGSM, more steps at least as strong as
fewer, a larger eps at least as strong as a smaller one, and a white-box attack at least as strong
as a transfer attack. A stronger attack that leaves more images correct means the gradients
mislead the attack, and the robust accuracy it reports is too high."""
from __future__ import annotations

from robustprune.evaluate import names


def _steps(entry, label: str) -> int | None:
    return getattr(entry.build(label, entry.eps[0]), "steps", None)


def pairs(attacks: dict, transfer_metrics: list[str], regime_transfer: dict[str, tuple[str, float]]):
    """(kind, stronger metric, weaker metric) for every check the evaluated metrics allow.

    attacks: the study's evaluation.attacks; transfer_metrics: acc_transfer:... names evaluated;
    regime_transfer: {metric of a regime test set: (attack name, eps)} crafted on another model."""
    out = []
    fgsm = [lab for lab, e in attacks.items() if e.name(lab) == "fgsm"]
    for lab, e in attacks.items():
        if e.name(lab) == "fgsm":
            continue
        for f in fgsm:
            for eps in e.eps:
                if eps in attacks[f].eps:
                    out.append(("iterative_vs_fgsm", names.adv(lab, eps), names.adv(f, eps)))
    labels = list(attacks)
    for a in labels:
        for b in labels:
            ea, eb = attacks[a], attacks[b]
            if a == b or ea.name(a) != eb.name(b):
                continue
            pa = {k: v for k, v in ea.params.items() if k != "steps"}
            pb = {k: v for k, v in eb.params.items() if k != "steps"}
            sa, sb = _steps(ea, a), _steps(eb, b)
            if pa != pb or sa is None or sb is None or not sa > sb:
                continue
            for eps in ea.eps:
                if eps in eb.eps:
                    out.append(("steps", names.adv(a, eps), names.adv(b, eps)))
    for lab, e in attacks.items():
        eps = sorted(e.eps)
        for small, large in zip(eps, eps[1:]):
            out.append(("eps", names.adv(lab, large), names.adv(lab, small)))
    for m in transfer_metrics:
        p = names.parse(m)
        out.append(("transfer", f"acc_adv:{p.name}@{p.strength}", m))
    for test, (attack, eps) in regime_transfer.items():
        for lab, e in attacks.items():
            if e.name(lab) == attack and eps in e.eps:
                out.append(("transfer", names.adv(lab, eps), test))
    return out


def violated(gap: float, tolerance: float) -> bool:
    """A gap counts only beyond the tolerance; the slack absorbs float error, so a gap of exactly one
    image at a tolerance of one image (0.665 - 0.66 = 0.0050000000000000044) is not a violation."""
    return gap > tolerance + 1e-9


def masking_checks(metrics: dict[str, float], check_pairs, tolerance: float) -> dict[str, float]:
    """check:... = acc(stronger) - acc(weaker) for each pair whose metrics exist, and the number of
    gaps above `tolerance` as masking_violations."""
    out = {}
    for kind, stronger, weaker in check_pairs:
        if stronger in metrics and weaker in metrics:
            out[names.check(kind, stronger, weaker)] = metrics[stronger] - metrics[weaker]
    out["masking_violations"] = float(sum(violated(gap, tolerance) for gap in out.values()))
    return out
