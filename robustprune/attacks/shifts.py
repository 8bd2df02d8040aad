"""Distribution shifts: model-free transforms of the inputs, shift(x) -> x, images in [0, 1].

Unlike attacks they need neither the model nor the labels, so they live in their own registry."""

from __future__ import annotations

from robustprune.registry import Registry

SHIFTS: Registry = Registry("distribution shift")
