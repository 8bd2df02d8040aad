"""Gradient-masking checks (Carlini et al. 2019, "On evaluating adversarial robustness", §5): on the
same images, an iterative attack is at least as strong as FGSM, more steps at least as strong as
fewer, a larger eps at least as strong as a smaller one, and a white-box attack at least as strong
as a transfer attack or as a black-box one (AutoAttack's Square stage). A stronger attack that leaves
more images correct means the gradients mislead the attack, and the robust accuracy it reports is
too high. An attack that searches the whole ball is swept over eps on the survivors, so its
accuracy cannot rise with eps; for it the check is that it falls at all (eps_flat)."""

from __future__ import annotations

from robustprune.attacks.norms import check_norm
from robustprune.evaluation import names


def comparable(a, b) -> bool:
    """Two attack entries can be checked against each other: same images, same norm."""
    return a.subset == b.subset and _norm(a) == _norm(b)


def _norm(entry) -> str:
    return check_norm("attack", entry.params.get("norm", "Linf"))


def _steps(entry, label: str) -> int | None:
    return getattr(entry.build(label, entry.eps[0]), "steps", None)


def pairs(attacks: dict, transfer_metrics: list[str], regime_transfer: dict[str, tuple[str, float]], security=None):
    """(kind, stronger metric, weaker metric) for every check the evaluated metrics allow.

    attacks: the study's evaluation.attacks; transfer_metrics: acc_transfer:... names evaluated;
    regime_transfer: {metric of a regime test set: (attack name, eps)} crafted on another model;
    security: the security-curve settings, whose points are checked against AutoAttack."""
    out = []
    fgsm = [lab for lab, e in attacks.items() if e.name(lab) == "fgsm"]
    for lab, e in attacks.items():
        if e.name(lab) == "fgsm":
            continue
        for f in fgsm:
            if not comparable(e, attacks[f]):
                continue
            for eps in e.eps:
                if eps in attacks[f].eps:
                    out.append(("iterative_vs_fgsm", names.adv(lab, eps), names.adv(f, eps)))
    labels = list(attacks)
    for a in labels:
        for b in labels:
            ea, eb = attacks[a], attacks[b]
            if a == b or ea.name(a) != eb.name(b) or not comparable(ea, eb):
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
        swept = getattr(e.build(lab, eps[0]), "searches_ball", False)
        if swept and len(eps) > 1:  # the whole sweep: flat from its smallest to its largest eps
            out.append(("eps_flat", names.adv(lab, eps[-1]), names.adv(lab, eps[0])))
        elif not swept:
            for small, large in zip(eps, eps[1:]):
                out.append(("eps", names.adv(lab, large), names.adv(lab, small)))
        if e.name(lab) == "autoattack" and "square" in [n for n, _ in _stages(e, lab)]:
            for x in eps:
                out.append(("black_box", names.stage(lab, x, "white_box"), names.adv(lab, x)))
    if security is not None:  # AutoAttack must break every point FMN broke inside the same ball
        for lab, e in attacks.items():
            if e.name(lab) == "autoattack" and e.subset == security.subset and _norm(e) == security.norm:
                for x in e.eps:
                    if x in security.eps:
                        out.append(("min_norm", names.adv(lab, x), names.curve(security.norm, x)))
    for m in transfer_metrics:
        p = names.parse(m)
        if p.name in attacks and attacks[p.name].subset is None:  # transfer sets cover all attacked images
            out.append(("transfer", f"acc_adv:{p.name}@{p.strength}", m))
    for test, (attack, eps) in regime_transfer.items():
        for lab, e in attacks.items():
            if e.name(lab) == attack and eps in e.eps and e.subset is None:
                out.append(("transfer", names.adv(lab, eps), test))
    return out


def _stages(entry, label: str) -> list:
    return getattr(entry.build(label, entry.eps[0]), "stages", [])


def violated(gap: float, tolerance: float, kind: str | None = None, weaker: float | None = None) -> bool:
    """A gap counts only beyond the tolerance; the slack absorbs float error, so a gap of exactly one
    image at a tolerance of one image (0.665 - 0.66 = 0.0050000000000000044) is not a violation.
    eps_flat is the other way round: a sweep whose accuracy did not fall at all, from a value (its
    smallest eps's, `weaker`) above the tolerance."""
    if kind == "eps_flat":
        return weaker is not None and gap > -1e-9 and weaker > tolerance + 1e-9
    return gap > tolerance + 1e-9


def masking_checks(metrics: dict[str, float], check_pairs, tolerance: float) -> dict[str, float]:
    """check:... = acc(stronger) - acc(weaker) for each pair whose metrics exist, and the number of
    gaps above `tolerance` as masking_violations."""
    out, bad = {}, 0
    for kind, stronger, weaker in check_pairs:
        if stronger in metrics and weaker in metrics:
            gap = metrics[stronger] - metrics[weaker]
            out[names.check(kind, stronger, weaker)] = gap
            bad += violated(gap, tolerance, kind, metrics[weaker])
    out["masking_violations"] = float(bad)
    return out
