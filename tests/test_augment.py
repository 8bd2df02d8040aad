"""Batch augmentation (crop, flip, MixUp, Cutout, CutMix) and its use in train()."""

from __future__ import annotations

import typing

import pytest
import torch
import torch.nn.functional as F

from robustprune.data.augment import BATCH_TRANSFORMS, crop_flip, cutmix, cutout, mixup, random_crop, random_flip
from robustprune.train import TrainConfig, train


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def distinct_images(n: int, c: int = 3, h: int = 8, w: int = 8, dtype=torch.uint8) -> torch.Tensor:
    """Random images with no zero pixel, so a window of the zero-padded image identifies its offset."""
    x = torch.randint(1, 256, (n, c, h, w), generator=gen(123))
    return x.to(dtype)


def offsets_of(out: torch.Tensor, x: torch.Tensor, pad: int) -> list[tuple[int, int]]:
    """For each image, the offsets (dy, dx) at which `out` equals a window of the padded image."""
    padded = F.pad(x, (pad, pad, pad, pad))
    h, w = x.shape[-2:]
    found = []
    for i in range(len(x)):
        hits = [
            (dy, dx)
            for dy in range(2 * pad + 1)
            for dx in range(2 * pad + 1)
            if torch.equal(out[i], padded[i, :, dy : dy + h, dx : dx + w])
        ]
        found.append(hits)
    return found


# ---- crop and flip -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_crop_is_a_window_of_the_padded_image(dtype):
    x = distinct_images(300, dtype=dtype)
    before = x.clone()
    out = random_crop(x, gen(), padding=3)
    assert out.shape == x.shape and out.dtype == dtype and out.is_contiguous()
    assert torch.equal(x, before)  # the input is left alone
    hits = offsets_of(out, x, 3)
    assert all(len(h) == 1 for h in hits)  # exactly one window matches: a shifted copy
    seen = {h[0] for h in hits}
    assert {dy for dy, _ in seen} == set(range(7)) and {dx for _, dx in seen} == set(range(7))
    assert (out == 0).any()  # zero padding shows at shifted borders


def test_crop_channels_last_and_no_padding():
    x = distinct_images(20).contiguous(memory_format=torch.channels_last)
    out = random_crop(x, gen(), padding=2)
    assert all(len(h) == 1 for h in offsets_of(out, x.contiguous(), 2))
    same = random_crop(x, gen(), padding=0)
    assert torch.equal(same, x) and same.data_ptr() != x.data_ptr()


def test_flip_flips_exactly_the_chosen_images():
    x = distinct_images(200)
    out = random_flip(x, gen(5))
    flipped = torch.tensor([torch.equal(o, xi.flip(-1)) for o, xi in zip(out, x)])
    kept = torch.tensor([torch.equal(o, xi) for o, xi in zip(out, x)])
    assert (flipped ^ kept).all()  # every image is either mirrored whole or untouched
    assert 60 < int(flipped.sum()) < 140
    chosen = torch.rand(200, generator=gen(5)) < 0.5  # the generator's first draw decides
    assert torch.equal(flipped, chosen)
    assert torch.equal(random_flip(x, gen(), p=1.0), x.flip(-1)) and torch.equal(random_flip(x, gen(), p=0.0), x)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_crop_flip_is_seeded(dtype):
    x = distinct_images(64, dtype=dtype)
    a, b, c = crop_flip(x, gen(1)), crop_flip(x, gen(1)), crop_flip(x, gen(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    g = gen(1)  # crop_flip = crop, then flip, drawing from one generator
    assert torch.equal(a, random_flip(random_crop(x, g, 4), g))
    assert a.dtype == dtype and a.shape == x.shape


def test_crop_flip_empty_batch():
    x = torch.zeros((0, 3, 8, 8), dtype=torch.uint8)
    assert crop_flip(x, gen()).shape == (0, 3, 8, 8)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_crop_flip_same_on_gpu():
    x = distinct_images(128)
    assert torch.equal(crop_flip(x.cuda(), gen(3)).cpu(), crop_flip(x, gen(3)))
    y = torch.arange(128)
    for name in BATCH_TRANSFORMS.names():
        cpu = BATCH_TRANSFORMS.get(name)(x.float() / 255, y, gen(4), alpha=1.0, size=4)
        gpu = BATCH_TRANSFORMS.get(name)(x.cuda().float() / 255, y.cuda(), gen(4), alpha=1.0, size=4)
        assert torch.allclose(cpu[0], gpu[0].cpu()) and torch.equal(cpu[2], gpu[2].cpu()) and cpu[3] == gpu[3]


# ---- MixUp, Cutout, CutMix -----------------------------------------------------------------------------


def test_registry_matches_the_config_choices():
    choices = typing.get_args(TrainConfig.model_fields["mix"].annotation)
    assert sorted(choices) == sorted(["none", *BATCH_TRANSFORMS.names()])


@pytest.mark.parametrize("alpha", [0.2, 1.0, 5.0])
def test_mixup(alpha):
    x = torch.rand(32, 3, 8, 8, generator=gen(9))
    y = torch.arange(32)  # labels name the images, so y_b tells which image was mixed in
    lams = []
    for seed in range(20):
        out, ya, yb, lam = mixup(x, y, gen(seed), alpha=alpha)
        assert 0.0 <= lam <= 1.0 and torch.equal(ya, y)
        assert sorted(yb.tolist()) == list(range(32))  # a permutation of the batch
        assert torch.allclose(out, lam * x + (1 - lam) * x[yb], atol=1e-6)
        lams.append(lam)
    assert len(set(lams)) == 20
    assert mixup(x, y, gen(3), alpha=alpha)[3] == mixup(x, y, gen(3), alpha=alpha)[3]
    if alpha == 0.2:  # Beta(0.2, 0.2) puts most mass near 0 and 1
        assert sum(min(v, 1 - v) < 0.1 for v in lams) >= 8


@pytest.mark.parametrize("size", [1, 4, 5, 16])
def test_cutout_zeros_a_clipped_square(size):
    x = torch.ones(400, 3, 10, 12)
    y = torch.arange(400)
    out, ya, yb, lam = cutout(x, y, gen(size), size=size)
    assert lam == 1.0 and torch.equal(ya, y) and torch.equal(yb, y) and torch.equal(x, torch.ones_like(x))
    full = 0
    for img in out:
        hole = img == 0
        assert torch.equal(hole[0], hole[1]) and torch.equal(hole[0], hole[2])  # same square on every channel
        rows = hole[0].any(1).nonzero().squeeze(1)
        cols = hole[0].any(0).nonzero().squeeze(1)
        assert len(rows) > 0  # the centre is inside the image, so some pixels are always cut
        assert torch.equal(rows, torch.arange(int(rows[0]), int(rows[-1]) + 1))  # contiguous
        assert int(hole[0].sum()) == len(rows) * len(cols)  # a rectangle ...
        assert len(rows) <= size and len(cols) <= size  # ... of at most size x size
        touches = rows[0] == 0 or rows[-1] == 9 or cols[0] == 0 or cols[-1] == 11
        if not touches:
            assert len(rows) == min(size, 10) and len(cols) == min(size, 12)  # clipped only at borders
            full += 1
    if size < 8:
        assert full > 0


def test_cutout_on_uint8_and_seed():
    x = torch.full((8, 3, 16, 16), 200, dtype=torch.uint8)
    a, b = cutout(x, torch.zeros(8), gen(1), size=6)[0], cutout(x, torch.zeros(8), gen(1), size=6)[0]
    assert a.dtype == torch.uint8 and torch.equal(a, b)


@pytest.mark.parametrize("alpha", [0.3, 1.0])
def test_cutmix_lambda_is_the_kept_area(alpha):
    n, h, w = 16, 12, 10
    x = (torch.arange(1, n + 1, dtype=torch.float32) / 100).view(n, 1, 1, 1).expand(n, 3, h, w).contiguous()
    y = torch.arange(n)
    for seed in range(30):
        out, ya, yb, lam = cutmix(x, y, gen(seed), alpha=alpha)
        assert torch.equal(ya, y) and sorted(yb.tolist()) == list(range(n)) and 0.0 <= lam <= 1.0
        boxes = set()
        for i in range(n):
            own = out[i] == x[i, 0, 0, 0]
            other = out[i] == x[int(yb[i]), 0, 0, 0]
            assert (own | other).all()  # every pixel comes from the image or its partner
            if int(yb[i]) != i:
                assert int(own[0].sum()) / (h * w) == pytest.approx(lam, abs=1e-12)  # exactly the kept share
                pasted = (~own[0]).nonzero()
                if len(pasted):
                    assert len(pasted) == (pasted[:, 0].max() - pasted[:, 0].min() + 1) * (
                        pasted[:, 1].max() - pasted[:, 1].min() + 1
                    )
                    boxes.add((*pasted.min(0).values.tolist(), *pasted.max(0).values.tolist()))
        assert len(boxes) <= 1  # one box, the same for the whole batch


def test_cutmix_loss_weights_sum_to_one():
    x = torch.rand(8, 3, 32, 32, generator=gen(0))
    y = torch.arange(8)
    out, ya, yb, lam = cutmix(x, y, gen(7), alpha=1.0)
    cut = (out != x).any(1)[0].sum().item()  # pixels of image 0 replaced (partner differs almost surely)
    if int(yb[0]) != 0:
        assert cut / (32 * 32) == pytest.approx(1 - lam)


# ---- train() ------------------------------------------------------------------------------------------


def tiny_data(n: int = 96):
    x = torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=gen(11))
    y = torch.randint(0, 10, (n,), generator=gen(12))
    return x, y


def weights(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.state_dict().values()]


def run(cfg: TrainConfig, seed: int = 0):
    from robustprune.models.mnist_cnn import MnistCNN

    torch.manual_seed(0)
    model = MnistCNN(conv1=4, conv2=6, fc=8, kernel_size=3, padding=1)
    x, y = tiny_data()
    hist = train(model, x, y, cfg, seed=seed)
    return weights(model), hist


def same(a, b) -> bool:
    return all(torch.equal(u, v) for u, v in zip(a, b))


def test_train_defaults_do_not_augment():
    cfg = TrainConfig(epochs=1, batch_size=32)
    assert cfg.augment == "none" and cfg.mix == "none" and cfg.crop_padding == 4
    assert cfg.mix_alpha == 1.0 and cfg.cutout_size == 16
    w1, h1 = run(cfg)
    w2, h2 = run(cfg)
    assert same(w1, w2) and h1 == h2
    # new settings left at their defaults do not appear in a config's non-default dump (cell hashes)
    assert cfg.model_dump(exclude_defaults=True) == {"epochs": 1, "batch_size": 32}
    w3, _ = run(TrainConfig(epochs=1, batch_size=32, augment="crop_flip", crop_padding=0))
    assert not same(w1, w3)  # flips alone change the training


@pytest.mark.parametrize(
    "augment, mix", [("crop_flip", "cutmix"), ("crop_flip", "mixup"), ("none", "cutout"), ("crop_flip", "none")]
)
def test_train_with_augmentation_is_deterministic(augment, mix):
    cfg = TrainConfig(epochs=2, batch_size=32, augment=augment, mix=mix, mix_alpha=0.5, cutout_size=8, crop_padding=2)
    w1, h1 = run(cfg)
    w2, h2 = run(cfg)
    assert same(w1, w2) and h1 == h2
    assert len(h1) == 2 and all(0 <= e["train_acc"] <= 1 and e["loss"] == e["loss"] for e in h1)
    w_default, _ = run(TrainConfig(epochs=2, batch_size=32))
    assert not same(w1, w_default)
    w3, _ = run(cfg, seed=1)
    assert not same(w1, w3)


def test_train_config_refuses_bad_values():
    from pydantic import ValidationError

    for bad in [
        dict(augment="rotate"),
        dict(mix="mixmax"),
        dict(mix_alpha=0),
        dict(cutout_size=0),
        dict(crop_padding=-1),
    ]:
        with pytest.raises(ValidationError):
            TrainConfig(**bad)
