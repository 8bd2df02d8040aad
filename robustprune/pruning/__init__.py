"""Pruning methods. A method is one registered class; the study runner only orchestrates."""

from robustprune.pruning.methods import PRUNING_METHODS  # noqa: F401
