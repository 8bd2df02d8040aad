"""Training regimes: spurious patches, symmetric label noise, the FGSM data set."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from robustprune.data import REGIMES, ImageDataset
from robustprune.data.regimes import (
    FgsmData,
    FgsmDataParams,
    NoisyLabels,
    NoisyParams,
    Spurious,
    add_class_patches,
    symmetric_label_noise,
)

# class -> (row slice, col slice) of its white 5x5 patch
EXPECTED_PATCH = {
    0: (slice(0, 5), slice(0, 5)),
    1: (slice(0, 5), slice(23, 28)),
    2: (slice(23, 28), slice(0, 5)),
    3: (slice(23, 28), slice(23, 28)),
}
EXPECTED_PATCH.update({c: (slice(12, 17), slice(12, 17)) for c in range(4, 10)})


def tiny_data(n_train=40, n_test=20, seed=0) -> ImageDataset:
    g = torch.Generator().manual_seed(seed)
    return ImageDataset(
        name="tiny",
        x_train=torch.randint(52, 204, (n_train, 1, 28, 28), generator=g, dtype=torch.uint8),
        y_train=torch.arange(n_train) % 10,
        x_test=torch.randint(52, 204, (n_test, 1, 28, 28), generator=g, dtype=torch.uint8),
        y_test=(torch.arange(n_test) * 3) % 10,
        num_classes=10,
        mean=(0.1307,),
        std=(0.3081,),
    )


def test_registered_regimes():
    assert REGIMES.names() == ["clean", "fgsm_data", "noisy_labels", "spurious"]


def test_add_class_patches_exact_positions():
    y = torch.arange(10).repeat(2)  # every class twice
    x = torch.zeros(20, 1, 28, 28, dtype=torch.uint8)
    out = add_class_patches(x, y)
    assert out.dtype == torch.uint8 and out.shape == x.shape
    assert int(x.sum()) == 0  # the input is not modified
    for i, c in enumerate(y.tolist()):
        expected = torch.zeros(1, 28, 28, dtype=torch.uint8)
        rows, cols = EXPECTED_PATCH[c]
        expected[:, rows, cols] = 255
        assert torch.equal(out[i], expected), f"class {c}"
        assert int((out[i] == 255).sum()) == 25


def test_add_class_patches_float_images_use_one():
    out = add_class_patches(torch.zeros(2, 1, 28, 28), torch.tensor([3, 7]))
    assert out[0, 0, 23:28, 23:28].eq(1.0).all() and float(out[0].sum()) == 25.0
    assert out[1, 0, 12:17, 12:17].eq(1.0).all() and float(out[1].sum()) == 25.0


def test_add_class_patches_keeps_other_pixels():
    data = tiny_data()
    out = add_class_patches(data.x_train, data.y_train)
    for i, c in enumerate(data.y_train.tolist()):
        rows, cols = EXPECTED_PATCH[c]
        outside = torch.ones(1, 28, 28, dtype=torch.bool)
        outside[:, rows, cols] = False
        assert torch.equal(out[i][outside], data.x_train[i][outside])


def test_spurious_regime():
    data = tiny_data()
    data.extra_tests["other"] = (data.x_test[:2], data.y_test[:2])
    x_test, y_test = data.x_test.clone(), data.y_test.clone()
    out = Spurious().apply(data, Spurious.Params(), seed=0, source_model=None)
    assert torch.equal(out.x_test, x_test) and torch.equal(out.y_test, y_test)
    assert torch.equal(out.y_train, data.y_train)
    assert torch.equal(out.x_train, add_class_patches(data.x_train, data.y_train))
    assert set(out.extra_tests) == {"other", "patched"}
    px, py = out.extra_tests["patched"]
    assert torch.equal(px, add_class_patches(x_test, y_test)) and torch.equal(py, y_test)
    assert set(data.extra_tests) == {"other"}  # the input data set is not modified


def test_label_noise_rates():
    n = 100_000
    # Labels outside the class range reveal exactly which ones were redrawn.
    marked = symmetric_label_noise(torch.full((n,), -1), 0.4, 10, seed=0)
    redrawn = marked != -1
    assert abs(float(redrawn.float().mean()) - 0.4) < 0.01
    assert marked[redrawn].min() == 0 and marked[redrawn].max() == 9
    y = torch.randint(0, 10, (n,), generator=torch.Generator().manual_seed(5))
    noisy = symmetric_label_noise(y, 0.4, 10, seed=0)
    assert noisy.dtype == y.dtype and noisy.shape == y.shape
    assert abs(float((noisy != y).float().mean()) - 0.36) < 0.01
    # a redrawn label is uniform over all classes, so the true one is kept 1 time in 10
    assert torch.equal(noisy[~redrawn], y[~redrawn])


def test_label_noise_deterministic_by_seed():
    y = torch.arange(1000) % 10
    a = symmetric_label_noise(y, 0.4, 10, seed=3)
    assert torch.equal(a, symmetric_label_noise(y, 0.4, 10, seed=3))
    assert not torch.equal(a, symmetric_label_noise(y, 0.4, 10, seed=4))


def test_label_noise_extremes():
    y = torch.arange(500) % 10
    assert torch.equal(symmetric_label_noise(y, 0.0, 10, seed=0), y)
    assert (symmetric_label_noise(torch.full((500,), -1), 1.0, 10, seed=0) >= 0).all()


def test_noisy_labels_regime_touches_training_labels_only():
    data = tiny_data(n_train=2000)
    y_test = data.y_test.clone()
    out = NoisyLabels().apply(data, NoisyParams(rate=0.4), seed=7, source_model=None)
    assert torch.equal(out.y_test, y_test) and torch.equal(out.x_test, data.x_test)
    assert torch.equal(out.x_train, data.x_train)
    assert torch.equal(out.y_train, symmetric_label_noise(data.y_train, 0.4, 10, 7))
    changed = float((out.y_train != data.y_train).float().mean())
    assert 0.30 < changed < 0.42


def test_noisy_params_validated():
    with pytest.raises(ValidationError):
        NoisyParams(rate=1.5)
    with pytest.raises(ValidationError):
        NoisyParams(rte=0.1)
    assert NoisyParams().rate == 0.4


def linear_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 10)).eval()


@pytest.mark.parametrize("mode", ["mixed", "adversarial_only"])
def test_fgsm_data_regime(mode):
    data = tiny_data(n_train=1000, n_test=50)
    x_train, x_test, y_test = data.x_train.clone(), data.x_test.clone(), data.y_test.clone()
    model = linear_model()
    seeds = []

    def source(seed):
        seeds.append(seed)
        return model

    params = FgsmDataParams(eps=0.2, mode=mode, adv_fraction=0.5)
    out = FgsmData().apply(data, params, seed=3, source_model=source)
    assert seeds == [1003]  # trained with seed + source_seed_offset
    assert out.x_train.dtype == torch.uint8 and out.x_train.shape == x_train.shape
    assert torch.equal(out.y_train, data.y_train)
    assert torch.equal(out.x_test, x_test) and torch.equal(out.y_test, y_test)  # clean test set kept
    assert torch.equal(data.x_train, x_train) and data.extra_tests == {}  # input not modified
    adv_x, adv_y = out.extra_tests["fgsm_data"]
    assert torch.equal(adv_y, y_test) and adv_x.dtype == torch.uint8 and adv_x.shape == x_test.shape
    # pixels in [52, 203] +- 0.2*255 = 51 never clip: every pixel moves by the (rounded) step
    # (x/255 + 0.2) * 255 rounds to x + 51 exactly: a pixel moves by 51 or (zero gradient) not at all
    for adv, clean in ((out.x_train, x_train), (adv_x, x_test)):
        diff = (adv.int() - clean.int()).abs()
        assert set(diff.unique().tolist()) <= {0, 51}
    test_diff = (adv_x.int() - x_test.int()).abs()
    assert (test_diff == 51).float().mean() > 0.99  # (nearly) every pixel stepped by eps
    per_image_changed = (out.x_train != x_train).flatten(1).any(1)
    per_image_all_moved = ((out.x_train.int() - x_train.int()).abs() >= 50).flatten(1).float().mean(1) > 0.99
    if mode == "adversarial_only":
        assert per_image_all_moved.all()
    else:
        frac = float(per_image_changed.float().mean())
        assert abs(frac - 0.5) < 0.06
        # an image is either the clean one or the fully adversarial one, never a mix
        assert torch.equal(per_image_changed, per_image_all_moved)


def test_fgsm_data_mixed_fraction_zero_keeps_clean_images():
    data = tiny_data(n_train=200, n_test=10)
    out = FgsmData().apply(data, FgsmDataParams(adv_fraction=0.0), seed=0, source_model=lambda s: linear_model())
    assert torch.equal(out.x_train, data.x_train)
    assert "fgsm_data" in out.extra_tests


def test_clean_regime_is_identity():
    data = tiny_data()
    assert REGIMES.get("clean")().apply(data, None, 0, None) is data
