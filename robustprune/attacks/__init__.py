"""Attacks share one call shape, attack(model, x, y) -> x_adv, inputs in [0, 1] (as torchattacks).
Importing a module registers its attacks in ATTACKS (registry.py, which the attack modules import
instead of this package); the order below is the registry's dependency order."""

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
from robustprune.attacks.base import adversarial_accuracy  # noqa: F401  (public here)
from robustprune.attacks.registry import ATTACKS  # noqa: F401  (public here)
from robustprune.attacks.shifts import SHIFTS  # noqa: F401  (distribution shifts: shift(x) -> x)
