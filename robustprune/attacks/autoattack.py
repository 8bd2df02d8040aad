"""AutoAttack (Croce & Hein 2020, "Reliable evaluation of adversarial robustness with an ensemble of
diverse parameter-free attacks"): a cascade of complementary attacks in which only the points every
earlier attack failed on go on to the next one. The versions and their parameters are the original's
(`set_version` of the authors' code):

    standard  APGD-CE, APGD-T (9 targets), FAB-T (9 targets), Square (5000 queries); one restart each
    plus      APGD-CE, APGD-DLR (5 restarts each), FAB (5 restarts), Square (5000 queries), APGD-T, FAB-T
    rand      APGD-CE, APGD-DLR with 20 EOT passes per gradient, for randomised defences

All steps counts are 100. Square is a black-box attack: a point that only Square breaks is a point
whose gradients misled every white-box attack before it, the symptom of gradient masking that the
report flags."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from robustprune.attacks.base import check_image_range, check_precision, frozen_eval
from robustprune.attacks.norms import check_norm, check_radius, verified
from robustprune.attacks.pgd import check_seed
from robustprune.attacks.registry import ATTACKS
from robustprune.errors import UserError

# (registered attack, its parameters) in cascade order; eps, norm and seed come from AutoAttack
VERSIONS: dict[str, list[tuple[str, dict]]] = {
    "standard": [
        ("apgd_ce", {"steps": 100, "restarts": 1}),
        ("apgd_t", {"steps": 100, "restarts": 1, "n_target_classes": 9}),
        ("fab_t", {"steps": 100, "restarts": 1, "n_target_classes": 9}),
        ("square", {"n_queries": 5000, "p_init": 0.8, "restarts": 1}),
    ],
    "plus": [
        ("apgd_ce", {"steps": 100, "restarts": 5}),
        ("apgd_dlr", {"steps": 100, "restarts": 5}),
        ("fab", {"steps": 100, "restarts": 5}),
        ("square", {"n_queries": 5000, "p_init": 0.8, "restarts": 1}),
        ("apgd_t", {"steps": 100, "restarts": 1, "n_target_classes": 9}),
        ("fab_t", {"steps": 100, "restarts": 1, "n_target_classes": 9}),
    ],
    "rand": [
        ("apgd_ce", {"steps": 100, "restarts": 1, "eot_iter": 20}),
        ("apgd_dlr", {"steps": 100, "restarts": 1, "eot_iter": 20}),
    ],
}
BLACK_BOX = frozenset({"square"})


@dataclass
class CascadeResult:
    """What one AutoAttack run found, per point and per stage of the cascade."""

    x_adv: torch.Tensor  # the breaking example, or the input where none broke it
    broken_by: list[str]  # per point: 'clean' (misclassified as given), an attack, or ''
    robust_after: dict[str, float] = field(default_factory=dict)  # robust accuracy after each stage
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def robust(self) -> torch.Tensor:
        return torch.tensor([b == "" for b in self.broken_by])

    def robust_accuracy(self) -> float:
        return float(self.robust.float().mean()) if self.broken_by else float("nan")

    def white_box_accuracy(self) -> float:
        """Robust accuracy counting only the white-box stages (points Square alone broke count as robust)."""
        if not self.broken_by:
            return float("nan")
        return sum(b == "" or b in BLACK_BOX for b in self.broken_by) / len(self.broken_by)


@ATTACKS.register("autoattack")
class AutoAttack:
    """AutoAttack (Croce & Hein 2020): APGD-CE, APGD-T, FAB-T and Square as a cascade (version standard)."""

    searches_ball = True  # robust accuracy at eps is a search of the whole ball (see evaluate/suite.py)

    def __init__(
        self,
        eps: float,
        norm: str = "Linf",
        version: str = "standard",
        seed: int = 0,
        attacks: list[str] | None = None,
        precision: str = "fp32",
    ):
        self.norm = check_norm("AutoAttack", norm)
        self.precision = check_precision("AutoAttack", precision)
        self.eps = check_radius("AutoAttack", eps, self.norm)
        self.seed = check_seed("AutoAttack", seed)
        if version not in VERSIONS:
            raise UserError(f"AutoAttack version must be one of {', '.join(VERSIONS)}, got {version!r}")
        self.version = version
        plan = VERSIONS[version]
        if attacks is not None:  # a subset of the version's cascade, in the version's order
            known = [name for name, _ in plan]
            if not isinstance(attacks, list) or not attacks or any(a not in known for a in attacks):
                raise UserError(
                    f"AutoAttack attacks must be a non-empty list drawn from the {version} version's "
                    f"{', '.join(known)}, got {attacks!r}"
                )
            plan = [(name, p) for name, p in plan if name in attacks]
        # precision: the autocast of every stage's iterations; their candidates are checked in fp32
        self.stages = [
            (name, ATTACKS.get(name)(eps=self.eps, norm=self.norm, seed=self.seed, precision=precision, **params))
            for name, params in plan
        ]

    def run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> CascadeResult:
        """The cascade on one batch, with what broke each point and the robust accuracy after each stage."""
        check_image_range(x)
        x = x.detach()
        out = x.clone()
        with frozen_eval(model), torch.no_grad():
            robust = model(x).argmax(1) == y
        broken_by = ["" if r else "clean" for r in robust.tolist()]
        result = CascadeResult(out, broken_by)
        result.robust_after["clean"] = float(robust.float().mean()) if len(x) else float("nan")
        for name, attack in self.stages:
            left = robust.nonzero().squeeze(1)
            t0 = time.perf_counter()
            if len(left):
                x_a = attack(model, x[left], y[left])
                with frozen_eval(model), torch.no_grad():
                    fooled = model(x_a).argmax(1) != y[left]
                out[left[fooled]] = x_a[fooled]
                robust[left[fooled]] = False
                for i in left[fooled].tolist():
                    broken_by[i] = name
            result.seconds[name] = time.perf_counter() - t0
            result.robust_after[name] = float(robust.float().mean()) if len(x) else float("nan")
        # every stage verifies its own output; this is the cascade's own fp32 check of the whole batch
        result.x_adv = verified(model, x, out, y, self.eps, self.norm)
        unverified = (result.x_adv == x).flatten(1).all(1) & ~robust
        for i in unverified.nonzero().squeeze(1).tolist():
            if broken_by[i] != "clean":  # cannot happen when every stage verifies; never count it as broken
                broken_by[i] = ""
        return result

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.run(model, x, y).x_adv
