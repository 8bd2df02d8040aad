"""Metric names: one place that builds and parses them, for the evaluator and for the reports.

    acc_clean                             clean test accuracy (all test images)
    acc_<test>                            a regime's extra test set, e.g. acc_patched, acc_fgsm_data
    acc_adv:<attack>@<eps>                white-box attack entry <attack> of the study at eps
    acc_adv:<attack>/white_box@<eps>      ... a cascade (AutoAttack) counting its white-box stages only
    acc_adv:worst@<eps>                   per image the worst case over every L-inf attack run on all the
                                          attacked images at eps: robust only if no attack broke it
    acc_curve:<norm>@<eps>                robust accuracy at eps from the security curve (FMN minimum norms)
    median_norm:<norm>                    the median of those minimum norms (inf: FMN broke under half)
    acc_occlusion@<size>                  centre square of zeros, side <size> pixels
    acc_corruption:<type>@<severity>      one common corruption at one severity
    acc_corruption:<type>                 ... mean over the evaluated severities
    acc_corruption@<severity>             ... mean over the evaluated types
    acc_corruption                        ... mean over all evaluated types and severities
    acc_transfer:<attack>@<eps>|<source>  examples crafted on model <source> (same regime, seed)
    check:<kind>:<stronger>|<weaker>      gradient-masking check: acc(stronger) - acc(weaker) on the
                                          same images; a value above the tolerance is a violation
    masking_violations                    number of checks above the tolerance
    images:attacks, images:shifts         how many test images the attacks / shifts used
    images:<attack>                       ... an attack entry with a subset of its own
    images:curve                          ... the security curve
    width:<layer>                         output channels (conv) or features (linear) of a layer
    weights:q0 ... weights:q100           quantiles of the conv/linear weights; weights:l1, l2, linf their
                                          norms; weights:log10_bound the Eq. 3 product (metrics/weights.py)
    mrs:<group>, ratio:<group>            MRPF: Module Robust Sensitivity of a group of coupled filters
                                          (named by its first layer) and the pruning ratio it was given
    mrpf:global_ratio                     MRPF with match_flops: the global ratio the bisection chose,
    mrpf:flops_reduction                  the FLOPs reduction it gave (share of the dense model's FLOPs)
    mrpf:baseline_flops_reduction         and that of uniform pruning at the entry's sparsity, matched

Strengths are written with Python's :g format (0.1, 0.03137, 8)."""

from __future__ import annotations

from dataclasses import dataclass

CHECK_KINDS = {
    "iterative_vs_fgsm": "iterative attack weaker than FGSM",
    "steps": "more steps weaker than fewer",
    "eps": "larger eps weaker than smaller",
    "transfer": "white-box weaker than transfer",
    "black_box": "black-box (Square) broke points white-box missed",
    "eps_flat": "robust accuracy does not fall as eps grows",
    "min_norm": "minimum-norm attack (FMN) broke points AutoAttack missed",
}


def strength(value: float) -> str:
    return f"{value:g}"


def single(kind: str, robustness_metric: str, tolerance: float | None = None) -> str:
    """Algorithm 2 (Jordão & Pedrini): the share of single filters / blocks whose removal raises
    `robustness_metric` at a clean-accuracy loss of at most `tolerance` p.p.; None: the count."""
    if tolerance is None:
        return f"single:{kind}:elements"
    return f"single:{kind}:{robustness_metric}|t={tolerance:g}"


def eps_text(value: float) -> str:
    """An eps as a reader writes it: '8/255' for 0.0313725 (CIFAR papers), '0.1' for 0.1 (MNIST)."""
    k = value * 255
    if len(f"{value:g}") > 5 and abs(k - round(k)) < 1e-3 and round(k) > 0:
        return f"{round(k)}/255"
    return strength(value)


def width(layer: str) -> str:
    return f"width:{layer}"


def plan_metric(kind: str, group: str) -> str:
    assert kind in ("mrs", "ratio", "mrpf"), kind
    return f"{kind}:{group}"


def adv(attack: str, eps: float) -> str:
    return f"acc_adv:{attack}@{strength(eps)}"


VALIDATION = "val_acc"  # accuracy on the validation split held out from training (model selection only)
WORST = "worst"  # the label of the per-image worst case over a cell's attacks (reserved)


def stage(attack: str, eps: float, part: str) -> str:
    """Robust accuracy after part of a cascade, e.g. AutoAttack's white-box stages before Square."""
    return f"acc_adv:{attack}/{part}@{strength(eps)}"


def curve(norm: str, eps: float) -> str:
    """Robust accuracy at eps read off the security curve (FMN's minimum norms)."""
    return f"acc_curve:{norm}@{strength(eps)}"


def median_norm(norm: str) -> str:
    return f"median_norm:{norm}"


def images(attack: str) -> str:
    """How many images an attack entry with its own subset used."""
    return f"images:{attack}"


def occlusion(size: int) -> str:
    return f"acc_occlusion@{size}"


def corruption(kind: str | None = None, severity: int | None = None) -> str:
    name = "acc_corruption" + (f":{kind}" if kind else "")
    return name + (f"@{severity}" if severity is not None else "")


def transfer(attack: str, eps: float, source: str) -> str:
    return f"acc_transfer:{attack}@{strength(eps)}|{source}"


def check(kind: str, stronger: str, weaker: str) -> str:
    assert kind in CHECK_KINDS, kind
    return f"check:{kind}:{stronger}|{weaker}"


@dataclass(frozen=True)
class Parsed:
    family: str  # clean, test, adv, curve, occlusion, corruption, transfer, check, other
    name: str | None = None  # attack label, corruption type, test name, check kind
    strength: str | None = None
    source: str | None = None
    stronger: str | None = None
    weaker: str | None = None


def parse(metric: str) -> Parsed:
    if metric.startswith("check:"):
        kind, rest = metric[len("check:") :].split(":", 1)
        stronger, weaker = rest.split("|", 1)
        return Parsed("check", kind, stronger=stronger, weaker=weaker)
    if not metric.startswith("acc_"):
        return Parsed("other", metric)
    body = metric[len("acc_") :]
    if body == "clean":
        return Parsed("clean")
    source = None
    if "|" in body:
        body, source = body.split("|", 1)
    at = None
    if "@" in body:
        body, at = body.rsplit("@", 1)
    family, _, name = body.partition(":")
    if family in ("adv", "transfer", "curve"):
        return Parsed(family, name, at, source)
    if family in ("occlusion", "corruption"):
        return Parsed(family, name or None, at)
    return Parsed("test", body)


def setting_key(axes: dict) -> str:
    """A model's short name within its (regime, seed): 'dense', 'magnitude s=0.5 ft=1', 'lottery r3';
    prefixed by the architecture's label in a study of several ('resnet56 dense')."""
    model = f"{axes['model']} " if axes.get("model") else ""
    if axes["pruning"] == "dense":
        return f"{model}dense"
    if axes.get("round") is not None:
        return f"{model}{axes['pruning']} r{axes['round']}"
    if axes.get("adjust"):
        return f"{model}{axes['pruning']} s={axes['sparsity']:g} {axes['adjust']}"
    it = f" it{axes['iteration']}" if axes.get("iteration") else ""
    return f"{model}{axes['pruning']} s={axes['sparsity']:g} ft={axes['finetune_epochs']}{it}"
