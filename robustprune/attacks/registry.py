"""The attack registry, in a module of its own: the attack modules register into it and the training
loop and config validators build from it, without importing each other or the package __init__.

Importing this module runs robustprune/attacks/__init__.py first, which imports every attack module,
so ATTACKS is complete whenever it is used from outside the package."""

from __future__ import annotations

from robustprune.errors import UserError
from robustprune.registry import Registry

ATTACKS: Registry = Registry("attack")


def build_attack(name: str, eps: float, params: dict | None = None, what: str | None = None):
    """ATTACKS[name](eps=eps, **params), for config validators: an unknown name, a missing or unknown
    argument or a bad value (steps 0, ...) becomes one ValueError naming `what` (default: the name)."""
    params = params or {}
    attack = ATTACKS.get(name)  # an unknown name raises its own error, with the known names
    try:
        return attack(eps=eps, **params)
    except TypeError as e:
        raise ValueError(f"attack '{what or name}' does not accept params {params} ({e})") from None
    except UserError as e:
        raise ValueError(f"attack '{what or name}': {e}") from None
