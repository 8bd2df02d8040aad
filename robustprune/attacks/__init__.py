"""Attacks share one call shape, attack(model, x, y) -> x_adv, inputs in [0, 1] (as torchattacks)."""
from robustprune.attacks.base import ATTACKS, adversarial_accuracy  # noqa: F401
from robustprune.attacks import fgsm  # noqa: F401  (registers)
from robustprune.attacks import pgd  # noqa: F401  (registers)
from robustprune.attacks import apgd  # noqa: F401  (registers)
from robustprune.attacks import nifgsm  # noqa: F401  (registers)
from robustprune.attacks import vmifgsm  # noqa: F401  (registers)
from robustprune.attacks.shifts import SHIFTS  # noqa: F401  (distribution shifts: shift(x) -> x)
from robustprune.attacks import occlusion  # noqa: F401  (registers)
from robustprune.attacks import corruptions  # noqa: F401  (registers)
