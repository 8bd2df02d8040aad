"""measure_latency: positive figures, eval mode restored, and a 4x-FLOPs model measured slower."""

from __future__ import annotations

import pytest
import torch

from robustprune.metrics.latency import measure_latency
from robustprune.models import build_model


def resnet20(width):
    torch.manual_seed(0)
    model = build_model(
        "resnet20", num_classes=10, image_shape=(3, 32, 32), mean=(0.5,) * 3, std=(0.25,) * 3, width=width
    )
    return model.to(memory_format=torch.channels_last)


def test_returns_positive_ordered_figures_and_restores_mode():
    model = resnet20(8).train()
    x = torch.rand(2, 3, 32, 32)
    r = measure_latency(model, x, warmup=1, repeats=5, threads=1)
    assert set(r) == {"median_ms", "p10_ms", "p90_ms"}
    assert 0 < r["p10_ms"] <= r["median_ms"] <= r["p90_ms"]
    assert model.training
    with pytest.raises(ValueError):
        measure_latency(model, x, repeats=0)


def test_twice_as_wide_is_slower():
    """ResNet-20 at width 32 has 4x the FLOPs of width 16 (about 2.7x the time here)."""
    x = torch.rand(16, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    narrow = measure_latency(resnet20(16), x, repeats=7, threads=1)
    wide = measure_latency(resnet20(32), x, repeats=7, threads=1)
    assert wide["median_ms"] > 1.3 * narrow["median_ms"]
