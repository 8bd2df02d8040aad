"""Attacks share one call shape, attack(model, x, y) -> x_adv, inputs in [0, 1] (as torchattacks)."""
from robustprune.attacks.base import ATTACKS, adversarial_accuracy  # noqa: F401
from robustprune.attacks import fgsm  # noqa: F401  (registers)
