"""Augmentation on whole batches of NCHW tensors, vectorised (no per-image Python loop) and seeded by
a torch.Generator, so the same seed gives the same images on CPU and GPU.

- `random_crop`, `random_flip`, `crop_flip`: the standard CIFAR augmentation (pad with zeros,
  crop back to the original size at a random offset; mirror half of the images). uint8 or float.
- `BATCH_TRANSFORMS`: batch-level training defences (the data-augmentation rows of Jordão &
  Pedrini 2021, Table 5): `mixup` (Zhang et al. 2018), `cutout` (DeVries & Taylor 2017),
  `cutmix` (Yun et al. 2019). Each is one function
  `f(x, y, generator, *, alpha, size, ...) -> (x, y_a, y_b, lam)` on float images in [0, 1]; the
  loss is `lam * CE(logits, y_a) + (1 - lam) * CE(logits, y_b)`. A transform takes the options it
  needs by keyword and ignores the others, so adding one is one registered function (plus its name
  in `TrainConfig.mix`).

Randomness is drawn on the CPU generator and moved to the batch's device."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from robustprune.registry import Registry

BATCH_TRANSFORMS: Registry = Registry("batch transform")


def _beta(alpha: float, generator: torch.Generator) -> float:
    """One draw from Beta(alpha, alpha), as the ratio of two Gamma(alpha) draws taken from `generator`."""
    g = torch._standard_gamma(torch.full((2,), float(alpha), dtype=torch.float64), generator=generator)
    total = float(g.sum())
    return float(g[0]) / total if total > 0 else float(torch.rand((), generator=generator, dtype=torch.float64) < 0.5)


def random_crop(x: torch.Tensor, generator: torch.Generator, padding: int = 4) -> torch.Tensor:
    """Pad every image with `padding` zeros on each side and cut back an H x W window at a random
    offset (one per image, uniform in 0..2*padding on each axis). Returns a new tensor."""
    if padding == 0 or len(x) == 0:
        return x.clone()
    n, c, h, w = x.shape
    k = 2 * padding + 1
    offsets = torch.randint(0, k, (2, n), generator=generator).to(x.device)
    padded = F.pad(x, (padding, padding, padding, padding))
    s = padded.stride()
    # every window of every image as a view (n, c, k, k, h, w); one gather picks each image's window
    windows = padded.as_strided((n, c, k, k, h, w), (s[0], s[1], s[2], s[3], s[2], s[3]))
    return windows[torch.arange(n, device=x.device), :, offsets[0], offsets[1]]


def _flip_(x: torch.Tensor, generator: torch.Generator, p: float) -> torch.Tensor:
    chosen = (torch.rand(len(x), generator=generator) < p).nonzero().squeeze(1).to(x.device)
    return x.index_copy_(0, chosen, x.index_select(0, chosen).flip(-1))


def random_flip(x: torch.Tensor, generator: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """Mirror each image left-right with probability p. Returns a new tensor."""
    return _flip_(x.clone(), generator, p)


def crop_flip(x: torch.Tensor, generator: torch.Generator, padding: int = 4) -> torch.Tensor:
    """The standard CIFAR augmentation: random crop with zero padding, then random horizontal flip.
    The same generator state gives the same result as random_flip(random_crop(x, g, padding), g)."""
    return _flip_(random_crop(x, generator, padding), generator, 0.5)


@BATCH_TRANSFORMS.register("mixup")
def mixup(x: torch.Tensor, y: torch.Tensor, generator: torch.Generator, *, alpha: float = 1.0, **_):
    """MixUp: lam * x + (1 - lam) * x[perm], lam ~ Beta(alpha, alpha), one lam per batch."""
    lam = _beta(alpha, generator)
    perm = torch.randperm(len(x), generator=generator).to(x.device)
    return x * lam + x[perm] * (1.0 - lam), y, y[perm], lam


@BATCH_TRANSFORMS.register("cutout")
def cutout(x: torch.Tensor, y: torch.Tensor, generator: torch.Generator, *, size: int = 16, **_):
    """Cutout: zero a size x size square per image, centred at a uniform pixel (clipped at the borders)."""
    n, _, h, w = x.shape
    cy = torch.randint(0, h, (n, 1), generator=generator).to(x.device)
    cx = torch.randint(0, w, (n, 1), generator=generator).to(x.device)
    top, left = cy - size // 2, cx - size // 2
    r = torch.arange(h, device=x.device)
    c = torch.arange(w, device=x.device)
    in_rows = (r >= top) & (r < top + size)  # (n, h)
    in_cols = (c >= left) & (c < left + size)  # (n, w)
    hole = in_rows[:, None, :, None] & in_cols[:, None, None, :]
    return x.masked_fill(hole, 0), y, y, 1.0


@BATCH_TRANSFORMS.register("cutmix")
def cutmix(x: torch.Tensor, y: torch.Tensor, generator: torch.Generator, *, alpha: float = 1.0, **_):
    """CutMix: paste one box of x[perm] into every image; the box covers about 1 - lam of the image,
    lam ~ Beta(alpha, alpha), centred at a uniform pixel and clipped; lam is then set to the exact
    share of pixels kept from the image itself."""
    n, _, h, w = x.shape
    lam = _beta(alpha, generator)
    perm = torch.randperm(n, generator=generator).to(x.device)
    ratio = (1.0 - lam) ** 0.5
    bh, bw = int(h * ratio), int(w * ratio)
    cy, cx = divmod(int(torch.randint(0, h * w, (), generator=generator)), w)  # a uniform pixel
    y0, y1 = max(cy - bh // 2, 0), min(cy - bh // 2 + bh, h)
    x0, x1 = max(cx - bw // 2, 0), min(cx - bw // 2 + bw, w)
    out = x.clone()
    out[:, :, y0:y1, x0:x1] = x[perm, :, y0:y1, x0:x1]
    return out, y, y[perm], 1.0 - (y1 - y0) * (x1 - x0) / (h * w)
