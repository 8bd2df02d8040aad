"""The base of every settings section a study file or rp.evaluate validates: unknown keys are
errors, every number is finite and fits in 64 bits, and the small checks the sections share. Kept
below the evaluation settings and the study schema, which both build on it."""

from __future__ import annotations

import math
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, model_validator

from robustprune.errors import excerpt

MAX_INT = 2**63  # integers must fit in 64 bits (torch, numpy and SQLite all need it)


def no_repeats(values: list) -> None:
    if len(set(values)) != len(values):
        raise ValueError(f"lists a value twice ({excerpt(values)})")


def numbers_in_range(value: Any, where: str) -> None:
    """Every float of a study is finite and every int fits in 64 bits, in typed fields and free-form
    ones (model args, params) alike: inf passes a `gt=0` check, and nan slips past most others."""
    stack = [(value, where)]
    while stack:
        v, at = stack.pop()
        if isinstance(v, dict):
            stack += [(x, f"{at}.{k}" if at else str(k)) for k, x in v.items()]
        elif isinstance(v, (list, tuple)):
            stack += [(x, f"{at}[{i}]") for i, x in enumerate(v)]
        elif isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"'{at}' is {v}, not a finite number (every number of a study must be finite)")
        elif isinstance(v, int) and not isinstance(v, bool) and not -MAX_INT <= v < MAX_INT:
            raise ValueError(f"'{at}' is {excerpt(v)}, outside the 64-bit integers a study can use")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _finite(cls, data):
        # Before the fields' own checks, so that nan and inf get this one sentence wherever they are.
        if isinstance(data, dict):
            numbers_in_range(data, "")
        return data


def check_seed(v: int) -> int:
    if not 0 <= v < 2**32:
        raise ValueError(f"seeds must be >= 0 and < 2**32 (torch and numpy take 32-bit seeds), got {excerpt(v)}")
    return v


Seed = Annotated[int, AfterValidator(check_seed)]
