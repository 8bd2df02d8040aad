"""Argument checks shared by the structured-pruning functions (filters, blocks, both), in a module of
their own so that blocks.py and structured.py need not import each other for them."""

from __future__ import annotations

import math
from typing import Any

from robustprune.errors import UserError


def check_ratio(value: Any, what: str = "pruning ratio") -> float:
    """A share of structures to remove: a number in [0, 1). Returns it as a float."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not 0 <= value < 1:
        raise UserError(
            f"{what} must be a number in [0, 1), the share of structures removed, not {value!r}; use e.g. 0.3"
        )
    return float(value)


def check_choice(value: Any, choices: tuple[str, ...], what: str) -> str:
    if value not in choices:
        raise UserError(f"unknown {what} {value!r}; use one of {', '.join(choices)}")
    return value
