"""The 15 common corruptions of Hendrycks & Dietterich (ICLR 2019), 5 severities each, in torch.

Parameters follow the CIFAR-10-C generator of the paper's code (make_cifar_c.py); the operations
are re-implemented on batches of float tensors N x C x H x W in [0, 1], vectorised over the batch
and seeded by a torch.Generator. Where the original calls an external asset or library
(ImageMagick motion blur, PIL JPEG/resize, skimage, cv2, the frost photographs) a tensor version
stands in; each function says how it differs.

Sizes: CIFAR-10-C parameters are for 32 x 32 images. Parameters measured in pixels (blur radii
and sigmas, swap distances, displacements, motion-blur lengths) are multiplied by
s = max(1, sqrt(H * W) / 32), so a corruption covers the same fraction of a 64 x 64 or 224 x 224
image. They are not shrunk below their CIFAR values for smaller images such as MNIST's 28 x 28:
at a pixel or two they sit on the pixel lattice, and shrinking them by 12 % would only flip
discrete choices (the defocus disk of radius 1 would lose its four neighbours and become the
identity). Relative parameters (zoom factors, pixelate factors, JPEG quality, noise levels, the
elastic and frost parameters given as fractions of the side) are used as they are.

Grey images (C = 1) go through the same operations on their single channel; for the HSV
brightness change the single channel is the value channel, JPEG uses the luminance table only.

Changes for monotone severity (the mean absolute change from the clean image must not shrink
from one severity to the next, checked on natural-looking images in tests/test_corruptions.py;
with the original parameters it shrinks for these three):
  - glass_blur: the original's (sigma, iterations) are (.05, 1), (.25, 1), (.4, 1), (.25, 2),
    (.4, 2). The swaps dominate the change and blurring before them makes them change less, so
    the change falls from severity 1 to 3 and from 4 to 5. We let the blur grow to the original's
    0.4 and stay there, and add one swap pass per severity (see _GLASS);
  - frost: the original's (image, frost) weights (.9, .4) -> (.85, .4) -> (.75, .45) at
    severities 3-5 lower the image weight while the frost weight hardly grows, so the change
    shrinks; we raise the frost weight at severities 4 and 5 (see _FROST);
  - elastic_transform: the original's random affine jitter shrinks with severity (0.08 -> 0.03 of
    the side) while the elastic field grows, and the jitter dominates, so the change falls from
    severity 1 to 5; we use the same five jitters in increasing order (see _ELASTIC).
motion_blur's severities 3 and 4 are (radius, sigma) (6, 2) and (8, 2): the radius only lengthens
a tail of the Gaussian below 1e-8, so in the original too they are the same blur.
"""

from __future__ import annotations

import functools
import math
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch
import torch.nn.functional as F

from robustprune.attacks.shifts import SHIFTS
from robustprune.errors import UserError, closest

SEVERITIES = (1, 2, 3, 4, 5)


# ---------------------------------------------------------------------------------------------
# helpers


def _scale(x: torch.Tensor) -> float:
    """Pixel-size parameters are given for 32 x 32 images: scale them by sqrt(H * W) / 32, but not
    below 1 (they are a few pixels, at the pixel lattice: shrinking them for a 28 x 28 image would
    only flip discrete choices, e.g. drop the defocus disk's neighbours at radius 1)."""
    return max(1.0, math.sqrt(x.shape[-2] * x.shape[-1]) / 32.0)


def _rand(shape, g: torch.Generator, device) -> torch.Tensor:
    return torch.rand(shape, generator=g, device=device)


def _uniform(shape, lo, hi, g, device) -> torch.Tensor:
    return lo + (hi - lo) * _rand(shape, g, device)


def _border_index(n: int, before: int, after: int, mode: str, device) -> torch.Tensor:
    """Source index of every padded position, for any pad width (also wider than the image).

    replicate: a a | a b c | c c;  reflect101 (cv2 default): c b | a b c | b a;
    symmetric (scipy/skimage 'reflect'): b a | a b c | c b."""
    i = torch.arange(-before, n + after, device=device)
    if mode == "replicate" or n == 1:
        return i.clamp(0, n - 1)
    if mode == "reflect101":
        period = 2 * (n - 1)
        i = i.abs() % period
        return torch.where(i >= n, period - i, i)
    if mode == "symmetric":
        period = 2 * n
        i = i % period
        return torch.where(i >= n, period - 1 - i, i)
    raise ValueError(mode)


def _pad(x: torch.Tensor, ph: int, pw: int, mode: str) -> torch.Tensor:
    h, w = x.shape[-2:]
    if mode == "replicate" or (mode == "reflect101" and ph < h and pw < w):
        return F.pad(x, (pw, pw, ph, ph), mode="replicate" if mode == "replicate" else "reflect")
    if ph:
        x = x.index_select(-2, _border_index(h, ph, ph, mode, x.device))
    if pw:
        x = x.index_select(-1, _border_index(w, pw, pw, mode, x.device))
    return x


def _depthwise(xp: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Correlate every plane of the padded batch xp with the same 2-D kernel (valid part).

    The layout matters on CPU: a batch of single-channel planes is slow; RGB runs fastest as a
    channels-last depthwise convolution, grey as one image with a channel per plane."""
    n, c, hp, wp = xp.shape
    kh, kw = kernel.shape
    k = kernel.to(xp)[None, None]
    if c == 1:
        y = F.conv2d(xp.reshape(1, n, hp, wp), k.expand(n, 1, kh, kw), groups=n)
        return y.reshape(n, 1, hp - kh + 1, wp - kw + 1)
    y = F.conv2d(xp.contiguous(memory_format=torch.channels_last), k.expand(c, 1, kh, kw).contiguous(), groups=c)
    return y.contiguous()


def _filter2d(x: torch.Tensor, kernel: torch.Tensor, mode: str) -> torch.Tensor:
    """Correlate every channel of x with the 2-D kernel (odd sides), borders by `mode`."""
    kh, kw = kernel.shape
    return _depthwise(_pad(x, kh // 2, kw // 2, mode), kernel)


def _gauss1d(sigma: float, truncate: float) -> torch.Tensor:
    """scipy.ndimage's sampled Gaussian: radius int(truncate * sigma + 0.5), normalised."""
    r = int(truncate * sigma + 0.5)
    if sigma <= 0 or r == 0:
        return torch.ones(1, dtype=torch.float64)
    t = torch.arange(-r, r + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


@functools.lru_cache(maxsize=64)
def _filter_matrix(n: int, sigma: float, truncate: float, mode: str) -> torch.Tensor:
    """1-D Gaussian filtering of a length-n signal, borders included, as an n x n matrix."""
    k = _gauss1d(sigma, truncate)
    r = len(k) // 2
    src = _border_index(n, r, r, mode, "cpu")
    m = torch.zeros(n, n, dtype=torch.float64)
    rows = torch.arange(n).repeat_interleave(len(k))
    cols = src.unfold(0, len(k), 1).reshape(-1)
    m.index_put_((rows, cols), k.repeat(n), accumulate=True)
    return m.float()


def _gaussian_blur(x: torch.Tensor, sigma: float, mode: str = "replicate", truncate: float = 4.0) -> torch.Tensor:
    """skimage.filters.gaussian per channel (its defaults: mode 'nearest' = replicate, truncate 4).

    Separable, and the images are small: two products with H x H and W x W matrices that hold
    the kernel and the border rule are faster on CPU than convolutions, for any kernel width."""
    if int(truncate * sigma + 0.5) == 0 or sigma <= 0:
        return x
    h, w = x.shape[-2:]
    mh = _filter_matrix(h, float(sigma), truncate, mode).to(x)
    mw = _filter_matrix(w, float(sigma), truncate, mode).to(x)
    return torch.matmul(torch.matmul(mh, x), mw.T)


def _clipped_zoom(x: torch.Tensor, z: float) -> torch.Tensor:
    """The original's clipped_zoom: crop the centre 1/z, zoom it by z (scipy order 1, which maps
    corner to corner: bilinear with align_corners=True), trim to the input size."""
    if z == 1:
        return x
    h, w = x.shape[-2:]
    ch, cw = math.ceil(h / z), math.ceil(w / z)
    top, left = (h - ch) // 2, (w - cw) // 2
    oh, ow = int(round(ch * z)), int(round(cw * z))
    y = F.interpolate(x[..., top : top + ch, left : left + cw], size=(oh, ow), mode="bilinear", align_corners=True)
    th, tw = (oh - h) // 2, (ow - w) // 2
    return y[..., th : th + h, tw : tw + w]


def _motion_blur(x: torch.Tensor, radius: float, sigma: float, angle_deg: torch.Tensor) -> torch.Tensor:
    """ImageMagick's MotionBlurImage, one angle per image: a one-sided Gaussian line kernel of
    width 2 * ceil(radius) + 1, taps at the rounded points i * (cos a, sin a), edges replicated.

    Taps past the point where the remaining kernel weight is below 1e-3 (a quarter grey level)
    are dropped. The batch is sorted by angle so that each tap's integer offset is constant over
    runs of images, and each run is a shifted slice of the padded batch instead of a gather."""
    n, c, h, w = x.shape
    width = 2 * math.ceil(radius) + 1
    i = torch.arange(width, dtype=torch.float64)
    k = torch.exp(-i * i / (2.0 * sigma * sigma))
    k = k / k.sum()
    tail = k.flip(0).cumsum(0).flip(0)  # weight of tap i and all after it
    taps = int((tail >= 1e-3).sum())
    k = (k[:taps] / k[:taps].sum()).tolist()
    if taps == 1 or n == 0:
        return x
    order = torch.argsort(angle_deg)
    a = torch.deg2rad(angle_deg[order].double()).cpu()
    xs = x[order]
    p = taps - 1
    xp = F.pad(xs, (p, p, p, p), mode="replicate")
    out = xs * k[0]
    for t in range(1, taps):
        dx = torch.ceil(t * torch.cos(a) - 0.5).long()
        dy = torch.ceil(t * torch.sin(a) - 0.5).long()
        key = dy * (4 * width) + dx
        starts = torch.cat([torch.tensor([0]), torch.nonzero(key[1:] != key[:-1]).flatten() + 1]).tolist()
        ends = starts[1:] + [n]
        for s, e in zip(starts, ends):
            oy, ox = p + int(dy[s]), p + int(dx[s])
            out[s:e].add_(xp[s:e, :, oy : oy + h, ox : ox + w], alpha=k[t])
    result = torch.empty_like(out)
    result[order] = out
    return result


def _grey(x: torch.Tensor) -> torch.Tensor:
    """cv2 RGB2GRAY luma, or the single channel of a grey image; shape N x 1 x H x W."""
    if x.shape[1] == 1:
        return x
    return 0.299 * x[:, :1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]


# ---------------------------------------------------------------------------------------------
# noise


def gaussian_noise(x, severity, g):
    """Additive Gaussian noise, std 0.04-0.10 (exact)."""
    c = [0.04, 0.06, 0.08, 0.09, 0.10][severity - 1]
    return (x + c * torch.randn(x.shape, generator=g, device=x.device)).clamp_(0, 1)


_POISSON_PARTS = 4  # fixed, so that the output does not depend on the number of threads


def _poisson(lam: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """torch.poisson, in _POISSON_PARTS slices with seeds drawn from g, run on a thread pool:
    torch.poisson runs on one core on CPU (and releases the GIL), so this is ~2x faster on 2."""
    seeds = torch.randint(0, 2**62, (_POISSON_PARTS,), generator=g, device=g.device).tolist()
    flat = lam.reshape(-1)
    parts = flat.chunk(_POISSON_PARTS)

    def sample(i):
        gi = torch.Generator(device=lam.device)
        gi.manual_seed(seeds[i])
        return torch.poisson(parts[i], generator=gi)

    workers = max(1, min(_POISSON_PARTS, torch.get_num_threads())) if lam.device.type == "cpu" else 1
    with ThreadPoolExecutor(workers) as pool:
        return torch.cat(list(pool.map(sample, range(len(parts))))).view_as(lam)


def shot_noise(x, severity, g):
    """Poisson noise, Poisson(x * c) / c with c = 500-50 photons (exact sampling)."""
    c = [500, 250, 100, 75, 50][severity - 1]
    return (_poisson(x * c, g) / c).clamp_(0, 1)


def impulse_noise(x, severity, g):
    """Salt and pepper on a fraction 0.01-0.07 of the values, half each (skimage 's&p', exact)."""
    c = [0.01, 0.02, 0.03, 0.05, 0.07][severity - 1]
    u = _rand(x.shape, g, x.device)
    return x.masked_fill(u < c, 0.0).masked_fill_((u >= c / 2) & (u < c), 1.0)


# ---------------------------------------------------------------------------------------------
# blur


def _disk_kernel(radius: float, alias_blur: float) -> torch.Tensor:
    """The original's anti-aliased disk: pixels within `radius`, normalised, smoothed by cv2's
    3 x 3 (5 x 5 beyond radius 8) Gaussian; the zero margin lets a plain convolution stand in."""
    ks = 3 if radius <= 8 else 5
    m = ks // 2
    r = math.ceil(radius) + m
    t = torch.arange(-r, r + 1, dtype=torch.float64)
    yy, xx = torch.meshgrid(t, t, indexing="ij")
    disk = (xx**2 + yy**2 <= radius**2).double()
    disk /= disk.sum()
    g = torch.exp(-((torch.arange(ks, dtype=torch.float64) - m) ** 2) / (2 * alias_blur**2))
    g /= g.sum()
    k = F.conv2d(disk[None, None], torch.outer(g, g)[None, None], padding=m)[0, 0]
    # weights below 1e-9 are noise (and as float32 denormals they make the convolution ~10x slower)
    k = torch.where(k < 1e-9, torch.zeros_like(k), k)
    keep = torch.nonzero(k.sum(0) > 0).flatten()
    r = int(max(keep.max() - len(t) // 2, len(t) // 2 - keep.min()))
    c = len(t) // 2
    k = k[c - r : c + r + 1, c - r : c + r + 1]
    return (k / k.sum()).float()


def defocus_blur(x, severity, g):
    """Convolution with an anti-aliased disk, radius 0.3-1.5 px (exact up to float rounding)."""
    radius, alias = [(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)][severity - 1]
    s = _scale(x)
    return _filter2d(x, _disk_kernel(radius * s, alias * s), "reflect101").clamp_(0, 1)


def _local_shuffle(n, h, w, d, iterations, g, device) -> torch.Tensor:
    """The original's local pixel swaps as one index map per image (N x HW), for a single gather.

    The original visits (h, w) from the bottom-right corner, row by row, right to left, and swaps
    pixel (h, w) with (h + dy, w + dx), dy and dx uniform in [-d, d - 1]. A pixel can be carried
    on by later swaps, so the order matters; both versions below give exactly the sequential result
    (tests/test_corruptions.py checks them against a plain loop)."""
    hh, ww = torch.meshgrid(
        torch.arange(h - d, d, -1, device=device), torch.arange(w - d, d, -1, device=device), indexing="ij"
    )
    perm = torch.arange(h * w, device=device).repeat(n, 1)
    for _ in range(iterations):
        code = _swap_codes(n, hh.numel(), d, g, device)
        if d == 1:
            perm = _swap_rows(perm.view(n, h, w), code.view(n, h - 2, w - 2)).view(n, h * w)
        else:
            _swap_waves(perm, hh.reshape(-1), ww.reshape(-1), code.long(), d, h, w)
    return perm


def _swap_codes(n: int, count: int, d: int, g, device) -> torch.Tensor:
    """One uniform code per visited position, in the original's visiting order: (dy, dx) =
    (code // 2d - d, code % 2d - d). For d = 1 four 2-bit codes come from each random byte."""
    if d > 1:
        return torch.randint(0, 4 * d * d, (n, count), generator=g, device=device)
    b = torch.randint(0, 256, (n, (count + 3) // 4), generator=g, device=device, dtype=torch.uint8)
    parts = [(b >> s) & 3 for s in (0, 2, 4, 6)]
    return torch.stack(parts, 2).reshape(n, -1)[:, :count].to(torch.int16)


def _swap_rows(perm: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """max_delta = 1 (all CIFAR severities): one pass of the swaps, a row at a time.

    Scanning row r right to left, the swap at (r, w) exchanges it with its left, upper or
    upper-left neighbour (or nothing), and (r, w) is never touched again in this pass. Before its
    swap, (r, w) holds the value that a run of 'left' swaps carried in from the right. So every
    final value of rows r and r - 1 is an entry of [row r, row r - 1] as they were before row r's
    swaps, at an index that depends on the codes only: all indices first, then one gather a row.
    (Selections are 0/1 arithmetic in 16 bits: torch.where and cummin are ~10x slower on CPU.)"""
    n, h, w = perm.shape
    dev = perm.device
    cols = torch.arange(w, device=dev, dtype=torch.int16)
    # code bits: bit 0 = dx + 1, bit 1 = dy + 1; columns ascending (the original goes right to left)
    c = torch.full((n, h - 2, w), 3, dtype=torch.int16, device=dev)  # 3 = (0, 0): no swap
    c[..., 2:] = code.to(torch.int16).flip(2)
    b0, b1 = c & 1, c >> 1
    b0n, b1n = torch.ones_like(b0), torch.ones_like(b1)  # the swap just before, at the right
    b0n[..., :-1], b1n[..., :-1] = b0[..., 1:], b1[..., 1:]
    # start[w]: (r, w) holds row r's entry where its run of 'left' swaps (dy = 0, dx = -1) began
    left_next = b1n * (1 - b0n)
    start = cols + left_next * (w - cols)
    for i in range(w - 2, -1, -1):
        torch.minimum(start[..., i], start[..., i + 1], out=start[..., i])
    start_next = torch.cat([start[..., 1:], start[..., -1:]], 2)
    # (r - 1, w) as the swap at w sees it: moved there by an up-left swap just before, or untouched
    up_now = cols + w + (1 - b0n) * (1 - b1n) * (start_next - cols - w)
    # where (r, w)'s final value comes from: dx = 0 -> itself (dy = 0) or (r - 1, w);
    # dx = -1 -> (r, w - 1) or (r - 1, w - 1), untouched so far; indices into [row r, row r - 1]
    stay_or_up = up_now + b1 * (start - up_now)
    left_or_upleft = cols - 1 + (1 - b1) * w
    idx = torch.cat(
        [left_or_upleft + b0 * (stay_or_up - left_or_upleft), up_now + b0 * (1 - b1) * (start - up_now)], 2
    ).long()  # [row r, row r - 1] after
    out = perm.clone()
    row = perm[:, h - 1]
    for k, r in enumerate(range(h - 1, 1, -1)):
        both = torch.cat([row, perm[:, r - 1]], 1).gather(1, idx[:, k])
        out[:, r] = both[:, :w]
        row = both[:, w:]
    out[:, 1] = row
    return out


def _swap_waves(perm, hh, ww, code, d, h, w) -> None:
    """Any max_delta, in place: swaps whose 2d x 2d neighbourhoods do not overlap commute, so run
    them in wavefronts t = 2d * (H - h) + (W - w); every pair of overlapping swaps keeps its
    original order and each wavefront is one gather and one scatter."""
    n = perm.shape[0]
    src = hh * w + ww
    wave = 2 * d * (h - hh) + (w - ww)
    dst = (hh + code // (2 * d) - d) * w + (ww + code % (2 * d) - d)
    for t in torch.unique(wave).tolist():
        sel = torch.nonzero(wave == t).flatten()
        # positions (a, b) receive the values of (b, a); where b == a both writes agree
        ab = torch.cat([src[sel].expand(n, -1), dst.index_select(1, sel)], 1)
        perm.scatter_(1, ab, perm.gather(1, ab).roll(len(sel), 1))


# (sigma, max_delta, iterations). The original's are (.05, 1, 1), (.25, 1, 1), (.4, 1, 1), (.25, 1, 2),
# (.4, 1, 2): its mean change falls from severity 1 to 3 and from 4 to 5, because blurring before
# the swaps makes them change less, and the swaps dominate (sigma <= 0.25 hardly blurs at all).
# We let the blur grow to the original's 0.4 and stay there, and add one swap pass per severity.
# Severity 1 is the original's.
_GLASS = [(0.05, 1, 1), (0.25, 1, 2), (0.4, 1, 3), (0.4, 1, 4), (0.4, 1, 5)]


def glass_blur(x, severity, g):
    """Gaussian blur, passes of local pixel swaps, blur again (parameters: _GLASS).

    As the original: the first blur is truncated to 8 bits, and the swaps are exactly the
    original's sequential ones, vectorised over the batch (see _local_shuffle)."""
    sigma, delta, iterations = _GLASS[severity - 1]
    n, c, h, w = x.shape
    s = _scale(x)
    y = torch.floor(_gaussian_blur(x, sigma * s) * 255) / 255
    perm = _local_shuffle(n, h, w, max(1, round(delta * s)), iterations, g, x.device)
    y = y.reshape(n, c, h * w).gather(2, perm[:, None, :].expand(n, c, h * w)).reshape(n, c, h, w)
    return _gaussian_blur(y, sigma * s).clamp_(0, 1)


def motion_blur(x, severity, g):
    """ImageMagick motion blur (radius, sigma) = (6, 1)-(9, 2.5) at an angle uniform in
    [-45, 45] degrees, one per image, as a line kernel of shifted copies (see _motion_blur)."""
    radius, sigma = [(6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)][severity - 1]
    s = _scale(x)
    angle = _uniform((x.shape[0],), -45.0, 45.0, g, x.device)
    return _motion_blur(x, radius * s, sigma * s, angle).clamp_(0, 1)


# np.arange(1, 1.06, 0.01) etc. in the original; float rounding gives it 7, 12, 16, 21, 26 factors.
_ZOOMS = [[1 + 0.01 * i for i in range(k)] for k in (7, 12, 16, 21, 26)]


def _clipped_zoom_1d(n: int, z: float) -> torch.Tensor:
    """_clipped_zoom along one axis as an n x n matrix A (zoomed signal = A @ signal)."""
    eye = torch.eye(n, dtype=torch.float64)
    ch = math.ceil(n / z)
    top = (n - ch) // 2
    oh = int(round(ch * z))
    th = (oh - n) // 2
    zoomed = F.interpolate(eye[:, top : top + ch][None], size=oh, mode="linear", align_corners=True)[0]
    return zoomed[:, th : th + n].T  # row j of `zoomed` is the zoom of the unit signal e_j


@functools.lru_cache(maxsize=32)
def _zoom_operators(h: int, w: int, severity: int) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """(count, rows matrix, columns matrix) per distinct clipped zoom of the severity. A zoom
    depends on z only through its crop and output sizes (order-1 zoom maps corner to corner),
    so the original's 7-26 zooms are only 4-13 distinct operators."""
    groups: dict[tuple[int, ...], list] = {}
    for z in _ZOOMS[severity - 1]:
        key = tuple(v for n in (h, w) for v in (math.ceil(n / z), int(round(math.ceil(n / z) * z))))
        groups.setdefault(key, [0, z])[0] += 1
    return [(c, _clipped_zoom_1d(h, z).float(), _clipped_zoom_1d(w, z).float()) for c, z in groups.values()]


def zoom_blur(x, severity, g):
    """Mean of the image and its centre zooms by 1, 1.01, ... (up to 1.06-1.25), as the original;
    each distinct bilinear zoom is a product with a rows and a columns matrix (exact)."""
    h, w = x.shape[-2:]
    out = x.clone()
    for count, a, b in _zoom_operators(h, w, severity):
        out.add_(torch.matmul(torch.matmul(a.to(x), x), b.to(x).T), alpha=count)
    return (out / (len(_ZOOMS[severity - 1]) + 1)).clamp_(0, 1)


# ---------------------------------------------------------------------------------------------
# weather


def snow(x, severity, g):
    """A seeded snow layer: Gaussian noise, centre zoom, threshold, ImageMagick motion blur at an
    angle uniform in [-135, -45] degrees; the image is greyed towards white and the layer and its
    180-degree rotation are added. As the original, with the tensor motion blur of motion_blur."""
    loc, scale, zoom, thresh, radius, sigma, blend = [
        (0.1, 0.2, 1, 0.6, 8, 3, 0.95),
        (0.1, 0.2, 1, 0.5, 10, 4, 0.9),
        (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
        (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
        (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8),
    ][severity - 1]
    n, c, h, w = x.shape
    s = _scale(x)
    layer = loc + scale * torch.randn((n, 1, h, w), generator=g, device=x.device)
    layer = _clipped_zoom(layer, zoom)
    layer = torch.where(layer < thresh, torch.zeros_like(layer), layer)
    layer = torch.floor(layer.clamp(0, 1) * 255) / 255  # the original blurs an 8-bit PNG
    angle = _uniform((n,), -135.0, -45.0, g, x.device)
    layer = _motion_blur(layer, radius * s, sigma * s, angle)
    x = blend * x + (1 - blend) * torch.maximum(x, _grey(x) * 1.5 + 0.5)
    return (x + layer + layer.flip(-2, -1)).clamp_(0, 1)


def _frost_texture(n, h, w, channels, g, device) -> torch.Tensor:
    """Procedural stand-in for the original's frost photographs: a ridged multi-octave noise
    (thin bright lines along the zero crossings of smooth random fields, like ice-crystal edges)
    over a bright haze, tinted light blue. Range [0, 1], mean about 0.5, like the photographs'
    crops; the octaves are fractions of the image side, so the texture scales with the image."""
    tex = torch.zeros((n, 1, h, w), device=device)
    side = math.sqrt(h * w)
    for frac, amp in ((1 / 8, 0.45), (1 / 4, 0.35), (1 / 2, 0.2)):
        cells = max(2, round(side * frac))
        field = torch.randn((n, 1, cells, cells), generator=g, device=device)
        field = F.interpolate(field, size=(h, w), mode="bicubic", align_corners=False)
        tex += amp * (1 - field.abs().clamp(max=1)) ** 3
    haze = F.interpolate(_rand((n, 1, 3, 3), g, device), size=(h, w), mode="bilinear", align_corners=False)
    tex = (0.25 + 0.2 * haze + 0.9 * tex).clamp(0, 1)
    tint = torch.tensor([0.85, 0.93, 1.0], device=device)
    if channels == 3:
        return tex * tint.view(1, 3, 1, 1)
    return tex * float(0.299 * tint[0] + 0.587 * tint[1] + 0.114 * tint[2])


# (image weight, frost weight); the original's are (1, .2), (1, .3), (.9, .4), (.85, .4), (.75, .45).
# Severities 4 and 5 get a larger frost weight so that the change grows with severity (see top).
_FROST = [(1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.45), (0.75, 0.55)]


def frost(x, severity, g):
    """a * image + b * frost texture (procedural, see _frost_texture), clipped."""
    a, b = _FROST[severity - 1]
    n, c, h, w = x.shape
    return (a * x + b * _frost_texture(n, h, w, c, g, x.device)).clamp_(0, 1)


def _plasma_fractal(n: int, size: int, decay: float, g, device) -> torch.Tensor:
    """The original's diamond-square height map (its wibble scale included), n at once, in [0, 1]."""
    m = torch.zeros((n, size, size), device=device, dtype=torch.float64)
    step, wibble = size, 100.0

    def wibbled_mean(total):
        noise = _uniform(total.shape, -wibble, wibble, g, device).double()
        return total / 4 + wibble * noise

    while step >= 2:
        half = step // 2
        corners = m[:, 0::step, 0::step]
        squares = corners + corners.roll(-1, 1)
        squares = squares + squares.roll(-1, 2)
        m[:, half::step, half::step] = wibbled_mean(squares)
        centres = m[:, half::step, half::step]
        corners = m[:, 0::step, 0::step]
        m[:, 0::step, half::step] = wibbled_mean(centres + centres.roll(1, 1) + corners + corners.roll(-1, 2))
        m[:, half::step, 0::step] = wibbled_mean(centres + centres.roll(1, 2) + corners + corners.roll(-1, 1))
        step //= 2
        wibble /= decay
    m -= m.amin(dim=(1, 2), keepdim=True)
    return (m / m.amax(dim=(1, 2), keepdim=True)).float()


def fog(x, severity, g):
    """x + c * plasma fractal (diamond-square, the original's decay), rescaled by max / (max + c)."""
    c, decay = [(0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)][severity - 1]
    n, _, h, w = x.shape
    size = 1 << max(1, (max(h, w) - 1).bit_length())  # the map side is a power of two
    plasma = _plasma_fractal(n, size, decay, g, x.device)[:, None, :h, :w]
    top = x.amax(dim=(1, 2, 3), keepdim=True)
    return ((x + c * plasma) * top / (top + c)).clamp_(0, 1)


# ---------------------------------------------------------------------------------------------
# digital


def brightness(x, severity, g):
    """+c on the HSV value channel. With hue and saturation fixed, RGB scales with the value,
    so no HSV round trip is needed: rgb * v' / v, and grey v' where v = 0 (exact)."""
    c = [0.05, 0.1, 0.15, 0.2, 0.3][severity - 1]
    v = x.amax(dim=1, keepdim=True)
    v2 = (v + c).clamp(max=1)
    return torch.where(v > 0, x * (v2 / v.clamp(min=1e-12)), v2.expand_as(x)).clamp_(0, 1)


def contrast(x, severity, g):
    """Pull every channel towards its spatial mean by the factor 0.75-0.15 (exact)."""
    c = [0.75, 0.5, 0.4, 0.3, 0.15][severity - 1]
    m = x.mean(dim=(2, 3), keepdim=True)
    return ((x - m) * c + m).clamp_(0, 1)


# (alpha, sigma, affine) as fractions of the side. The original's affine jitter is 0.08, 0.07,
# 0.06, 0.05, 0.03; we use it in increasing order (see the module docstring).
_ELASTIC = [(0, 0, 0.03), (0.05, 0.2, 0.05), (0.08, 0.06, 0.06), (0.1, 0.04, 0.07), (0.1, 0.03, 0.08)]


def elastic_transform(x, severity, g):
    """A random affine warp (three points moved by up to `affine` * side, cv2 warpAffine with
    reflect-101 borders) then a smooth random displacement field (uniform noise blurred by
    sigma * side, scaled by alpha * side, scipy map_coordinates with 'reflect' borders), both
    bilinear; the two cv2/scipy resamplings become two grid_samples."""
    alpha, sigma, affine = _ELASTIC[severity - 1]
    n, c, h, w = x.shape
    side = math.sqrt(h * w)
    alpha, sigma, affine = alpha * side, sigma * side, affine * side
    dev = x.device
    # the three anchor points of the original, (x, y)
    cx, cy, sq = w // 2, h // 2, min(h, w) // 3
    pts1 = torch.tensor([[cx + sq, cy + sq], [cx + sq, cy - sq], [cx - sq, cy - sq]], dtype=torch.float64, device=dev)
    pts2 = pts1 + _uniform((n, 3, 2), -affine, affine, g, dev).double()
    # warpAffine samples the source at M^-1 p, the affine map sending pts2 back to pts1
    ones = torch.ones((n, 3, 1), dtype=torch.float64, device=dev)
    inv = torch.linalg.solve(torch.cat([pts2, ones], 2), pts1.expand(n, 3, 2))  # (n, 3, 2)
    ys, xs = torch.meshgrid(
        torch.arange(h, dtype=torch.float64, device=dev),
        torch.arange(w, dtype=torch.float64, device=dev),
        indexing="ij",
    )
    grid_pts = torch.stack([xs, ys, torch.ones_like(xs)], -1).reshape(-1, 3)  # (hw, 3)
    src = (grid_pts @ inv).reshape(n, h, w, 2)
    # align_corners=True: -1 and 1 are the centres of the border pixels, reflection is reflect-101
    norm = torch.tensor([2.0 / max(w - 1, 1), 2.0 / max(h - 1, 1)], dtype=torch.float64, device=dev)
    grid = (src * norm - 1).to(x.dtype)
    y = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=True)
    if alpha == 0:
        return y.clamp_(0, 1)
    field = _uniform((n, 2, h, w), -1.0, 1.0, g, dev)
    field = _gaussian_blur(field, sigma, mode="symmetric", truncate=3.0) * alpha
    # align_corners=False: reflection about the pixel edges, scipy's 'reflect'
    gx = (2 * (xs.to(x.dtype) + field[:, 0]) + 1) / w - 1
    gy = (2 * (ys.to(x.dtype) + field[:, 1]) + 1) / h - 1
    y = F.grid_sample(y, torch.stack([gx, gy], -1), mode="bilinear", padding_mode="reflection", align_corners=False)
    return y.clamp_(0, 1)


def _pil_box_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """PIL's BOX resampling along one axis as an n_out x n_in matrix: output pixel i averages the
    input pixels whose centres fall in its footprint (Pillow's precompute_coeffs)."""
    scale = n_in / n_out
    filterscale = max(scale, 1.0)
    support = 0.5 * filterscale
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_out):
        centre = (i + 0.5) * scale
        lo = max(int(centre - support + 0.5), 0)
        hi = min(int(centre + support + 0.5), n_in)
        for j in range(lo, hi):
            t = (j - centre + 0.5) / filterscale
            if -0.5 < t <= 0.5:
                m[i, j] = 1.0
        m[i] /= m[i].sum()
    return m


def pixelate(x, severity, g):
    """PIL BOX downscale to int(c * side) (c = 0.95-0.65) and BOX upscale back, as two small
    matrices per axis (PIL's coefficients; the original's 8-bit rounding in between is skipped)."""
    c = [0.95, 0.9, 0.85, 0.75, 0.65][severity - 1]
    h, w = x.shape[-2:]
    mh = (_pil_box_matrix(int(h * c), h) @ _pil_box_matrix(h, int(h * c))).to(x)
    mw = (_pil_box_matrix(int(w * c), w) @ _pil_box_matrix(w, int(w * c))).to(x)
    return torch.matmul(torch.matmul(mh, x), mw.T).clamp_(0, 1)


# The JPEG standard's (Annex K) luminance and chrominance quantisation tables, quality 50.
_LUMA_Q = [
    16,
    11,
    10,
    16,
    24,
    40,
    51,
    61,
    12,
    12,
    14,
    19,
    26,
    58,
    60,
    55,
    14,
    13,
    16,
    24,
    40,
    57,
    69,
    56,
    14,
    17,
    22,
    29,
    51,
    87,
    80,
    62,
    18,
    22,
    37,
    56,
    68,
    109,
    103,
    77,
    24,
    35,
    55,
    64,
    81,
    104,
    113,
    92,
    49,
    64,
    78,
    87,
    103,
    121,
    120,
    101,
    72,
    92,
    95,
    98,
    112,
    100,
    103,
    99,
]
_CHROMA_Q = [
    17,
    18,
    24,
    47,
    99,
    99,
    99,
    99,
    18,
    21,
    26,
    66,
    99,
    99,
    99,
    99,
    24,
    26,
    56,
    99,
    99,
    99,
    99,
    99,
    47,
    66,
    99,
    99,
    99,
    99,
    99,
    99,
] + [99] * 32


def _quant_table(base, quality: int) -> torch.Tensor:
    """libjpeg's quality scaling with baseline clamping to [1, 255]."""
    scale = 5000 // quality if quality < 50 else 200 - 2 * quality
    return torch.tensor([min(max((q * scale + 50) // 100, 1), 255) for q in base], dtype=torch.float32)


def _dct_basis() -> torch.Tensor:
    """The 64 x 64 matrix of the orthonormal 8 x 8 DCT-II (which is JPEG's DCT scaling)."""
    k = torch.arange(8, dtype=torch.float64)
    d = torch.cos((2 * k[None, :] + 1) * k[:, None] * math.pi / 16) * math.sqrt(2 / 8)
    d[0] /= math.sqrt(2)
    return torch.kron(d, d).float()


def _jpeg_plane(p: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Level shift, 8 x 8 block DCT, quantise (round), dequantise, inverse DCT, 8-bit samples.
    p: N x C x H x W in 0..255 with H, W multiples of 8."""
    n, c, h, w = p.shape
    basis = _dct_basis().to(p)
    blocks = (p - 128).reshape(n, c, h // 8, 8, w // 8, 8).permute(0, 1, 2, 4, 3, 5).reshape(-1, 64)
    table = table.to(p)
    coef = torch.round(blocks @ basis.T / table) * table
    blocks = (coef @ basis).reshape(n, c, h // 8, w // 8, 8, 8).permute(0, 1, 2, 4, 3, 5)
    return (blocks.reshape(n, c, h, w) + 128).round_().clamp_(0, 255)


def jpeg_compression(x, severity, g):
    """JPEG at quality 80-40 as libjpeg (PIL) does it: 8-bit RGB -> YCbCr (JFIF), chroma
    subsampled 2 x 2, 8 x 8 block DCT, the standard tables scaled by the quality, rounding;
    decoding upsamples chroma with libjpeg's 'fancy' triangle filter (= bilinear). Grey images
    use the luminance table only. libjpeg's integer DCT is replaced by the exact float DCT."""
    quality = [80, 65, 58, 50, 40][severity - 1]
    n, c, h, w = x.shape
    v = torch.round(x * 255)
    mcu = 16 if c == 3 else 8
    ph, pw = -h % mcu, -w % mcu
    if ph or pw:  # libjpeg fills partial blocks by repeating the last row and column
        v = F.pad(v, (0, pw, 0, ph), mode="replicate")
    luma_q, chroma_q = _quant_table(_LUMA_Q, quality), _quant_table(_CHROMA_Q, quality)
    if c == 1:
        out = _jpeg_plane(v, luma_q)
    else:
        r, gr, b = v[:, 0:1], v[:, 1:2], v[:, 2:3]
        y = (0.299 * r + 0.587 * gr + 0.114 * b).round()
        cb = (-0.168736 * r - 0.331264 * gr + 0.5 * b + 128).round()
        cr = (0.5 * r - 0.418688 * gr - 0.081312 * b + 128).round()
        y = _jpeg_plane(y, luma_q)
        chroma = _jpeg_plane(F.avg_pool2d(torch.cat([cb, cr], 1), 2), chroma_q)
        chroma = F.interpolate(chroma, scale_factor=2, mode="bilinear", align_corners=False).round_() - 128
        cb, cr = chroma[:, :1], chroma[:, 1:]
        out = torch.cat([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb], 1).round_()
    return (out[..., :h, :w] / 255).clamp_(0, 1)


# ---------------------------------------------------------------------------------------------
# API

CORRUPTIONS: dict[str, Callable[[torch.Tensor, int, torch.Generator], torch.Tensor]] = {
    "gaussian_noise": gaussian_noise,
    "shot_noise": shot_noise,
    "impulse_noise": impulse_noise,
    "defocus_blur": defocus_blur,
    "glass_blur": glass_blur,
    "motion_blur": motion_blur,
    "zoom_blur": zoom_blur,
    "snow": snow,
    "frost": frost,
    "fog": fog,
    "brightness": brightness,
    "contrast": contrast,
    "elastic_transform": elastic_transform,
    "pixelate": pixelate,
    "jpeg_compression": jpeg_compression,
}

# Batches are corrupted in chunks of this many images, to bound memory (a chunk of 3 x 32 x 32
# images takes 60 MB per float copy). Large chunks amortise the per-operation overhead of the
# loops over taps, runs and wavefronts.
CHUNK = 2000


def _check(name: str, severity) -> None:
    if name not in CORRUPTIONS:
        raise UserError(f"unknown corruption '{name}'; {closest(name, CORRUPTIONS)}")
    if isinstance(severity, bool) or not isinstance(severity, int) or severity not in SEVERITIES:
        raise UserError(f"corruption severity must be one of 1, 2, 3, 4, 5, got {severity!r}")


def corrupt(x: torch.Tensor, name: str, severity: int, seed: int = 0) -> torch.Tensor:
    """Corruption `name` at `severity` (1-5) of the images x (N x C x H x W, C = 1 or 3, float in
    [0, 1] or uint8); float output in [0, 1] of the same shape. The same seed gives the same output."""
    _check(name, severity)
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise UserError(
            f"corruptions expect grey or RGB images of shape N x C x H x W with C = 1 or 3, got shape {tuple(x.shape)}"
        )
    x = x.float().div(255) if x.dtype == torch.uint8 else x
    if not x.is_floating_point():
        raise UserError(f"corruptions expect float images in [0, 1] or uint8 images, got {x.dtype}")
    dtype = x.dtype
    g = torch.Generator(device=x.device)
    g.manual_seed(seed)
    fn = CORRUPTIONS[name]
    with torch.no_grad():
        parts = [fn(x[i : i + CHUNK].float().contiguous(), severity, g) for i in range(0, len(x), CHUNK)]
    return torch.cat(parts).to(dtype) if parts else x.clone()


@SHIFTS.register("corruption")
class Corruption:
    """A common corruption of Hendrycks & Dietterich (2019) at severity 1-5 (CIFAR-10-C parameters)."""

    def __init__(self, name: str, severity: int, seed: int = 0):
        _check(name, severity)
        self.name, self.severity, self.seed = name, severity, seed

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return corrupt(x, self.name, self.severity, self.seed)


def corruption_benchmark(n: int = 10000, size: int = 32, channels: int = 3, seed: int = 0) -> dict:
    """Time the 15 x 5 suite on n random size x size images: total and per-corruption seconds."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((n, channels, size, size), generator=g)
    per = {}
    for name in CORRUPTIONS:
        start = time.perf_counter()
        for severity in SEVERITIES:
            corrupt(x, name, severity, seed)
        per[name] = time.perf_counter() - start
    return {
        "n": n,
        "size": size,
        "channels": channels,
        "threads": torch.get_num_threads(),
        "total_seconds": sum(per.values()),
        "per_corruption_seconds": per,
    }
