"""Attacks share one call shape, attack(model, x, y) -> x_adv, inputs in [0, 1] (as torchattacks).
Importing a module registers its attacks; the order below is the registry's dependency order."""

from robustprune.attacks import (  # noqa: F401  (registers)
    apgd,
    autoattack,
    corruptions,
    fab,
    fgsm,
    fmn,
    nifgsm,
    occlusion,
    pgd,
    square,
    vmifgsm,
)
from robustprune.attacks.base import ATTACKS, adversarial_accuracy  # noqa: F401
from robustprune.attacks.shifts import SHIFTS  # noqa: F401  (distribution shifts: shift(x) -> x)
