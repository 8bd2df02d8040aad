"""Importance criteria for structured pruning; see base.py for the one signature they share."""

from robustprune.pruning.criteria import activation, gradient, magnitude  # noqa: E402,F401  (register)
from robustprune.pruning.criteria.base import CRITERIA, Criterion, block_criteria, build_criterion  # noqa: F401
