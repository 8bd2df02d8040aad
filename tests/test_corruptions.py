"""Distribution shifts: centre occlusion, the 15 common corruptions, the CIFAR-10-C loader."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from robustprune.attacks import SHIFTS
from robustprune.attacks import corruptions as C
from robustprune.attacks.cifar10c import load_cifar10c
from robustprune.attacks.occlusion import occlude
from robustprune.errors import UserError

NAMES = list(C.CORRUPTIONS)
# corruptions that draw random numbers (the others are fixed functions of the image)
RANDOM = {
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "glass_blur",
    "motion_blur",
    "snow",
    "frost",
    "fog",
    "elastic_transform",
}


def natural(n: int, c: int, h: int, w: int, seed: int) -> torch.Tensor:
    """Natural-looking images: random octaves with a 1/f amplitude spectrum, mean 0.45."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, c, h, w)
    for cells, amp in ((2, 1.0), (4, 0.5), (8, 0.25), (16, 0.125), (32, 0.0625)):
        noise = torch.randn(n, c, cells, cells, generator=g)
        x += amp * F.interpolate(noise, size=(h, w), mode="bicubic", align_corners=False)
    x = x / x.flatten(1).std(1).view(-1, 1, 1, 1) * 0.22 + 0.45
    return x.clamp(0, 1)


BATCHES = {
    "rgb32": natural(8, 3, 32, 32, 0),
    "grey28": natural(8, 1, 28, 28, 1),
    "grey20x36": natural(3, 1, 20, 36, 2),  # any H, W
}


@pytest.mark.parametrize("name", NAMES)
def test_corruption_shape_range_determinism(name):
    for key, x in BATCHES.items():
        for severity in C.SEVERITIES:
            y = C.corrupt(x, name, severity, seed=3)
            assert y.shape == x.shape and y.dtype == torch.float32, (key, severity)
            assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0, (key, severity)
            assert not torch.equal(y, x), (key, severity)
            assert torch.equal(y, C.corrupt(x, name, severity, seed=3)), (key, severity)
            other = C.corrupt(x, name, severity, seed=4)
            if name in RANDOM:
                assert not torch.equal(y, other), (key, severity)
            else:
                assert torch.equal(y, other), (key, severity)


def _monotone(x: torch.Tensor, name: str) -> list[float]:
    dist = [float((C.corrupt(x, name, s, seed=0) - x).abs().mean()) for s in C.SEVERITIES]
    assert all(b >= a - 1e-4 for a, b in zip(dist, dist[1:])), (name, [round(d, 5) for d in dist])
    return dist


@pytest.mark.parametrize("name", NAMES)
def test_severity_is_monotone_on_natural_images(name):
    for x in (natural(48, 3, 32, 32, 10), natural(48, 1, 28, 28, 11)):
        dist = _monotone(x, name)
        assert dist[-1] > dist[0] + 1e-3, (name, dist)


@pytest.mark.slow
def test_severity_is_monotone_on_mnist(data_dir):
    from robustprune.data import load_dataset

    x = load_dataset("mnist", data_dir, download=False).x_test[:64].float() / 255
    for name in NAMES:
        _monotone(x, name)


def test_uint8_input_and_registered_shift():
    x = natural(4, 3, 32, 32, 5)
    x_u8 = (x * 255).round().to(torch.uint8)
    assert torch.equal(C.corrupt(x_u8, "fog", 2, seed=1), C.corrupt(x_u8.float() / 255, "fog", 2, seed=1))
    shift = SHIFTS.get("corruption")("contrast", 4, seed=0)
    assert torch.equal(shift(x), C.corrupt(x, "contrast", 4))
    assert C.corrupt(x[:0], "snow", 1).shape == (0, 3, 32, 32)


@pytest.mark.parametrize("bad", ["fogg", "speckle_noise", ""])
def test_unknown_corruption_names_the_known_ones(bad):
    with pytest.raises(UserError, match="gaussian_noise.*zoom_blur|did you mean 'fog'"):
        C.corrupt(BATCHES["rgb32"], bad, 1)
    with pytest.raises(UserError):
        SHIFTS.get("corruption")(bad, 1)


@pytest.mark.parametrize("severity", [0, 6, -1, 2.5, True])
def test_bad_severity(severity):
    with pytest.raises(UserError, match="1, 2, 3, 4, 5"):
        C.corrupt(BATCHES["rgb32"], "fog", severity)
    with pytest.raises(UserError, match="1, 2, 3, 4, 5"):
        SHIFTS.get("corruption")("fog", severity)


def test_bad_image_shapes():
    with pytest.raises(UserError, match="C = 1 or 3"):
        C.corrupt(torch.rand(2, 2, 16, 16), "fog", 1)
    with pytest.raises(UserError, match="C = 1 or 3"):
        C.corrupt(torch.rand(3, 16, 16), "fog", 1)


def _sequential_swaps(n, h, w, d, iterations, seed):
    """The original's glass-blur loop, image by image, on pixel indices."""
    g = torch.Generator().manual_seed(seed)
    hs, ws = list(range(h - d, d, -1)), list(range(w - d, d, -1))
    codes = [C._swap_codes(n, len(hs) * len(ws), d, g, "cpu").tolist() for _ in range(iterations)]
    out = []
    for b in range(n):
        p = list(range(h * w))
        for it in range(iterations):
            k = 0
            for hh in hs:
                for ww in ws:
                    dy, dx = codes[it][b][k] // (2 * d) - d, codes[it][b][k] % (2 * d) - d
                    k += 1
                    a, c = hh * w + ww, (hh + dy) * w + ww + dx
                    p[a], p[c] = p[c], p[a]
        out.append(p)
    return torch.tensor(out)


@pytest.mark.parametrize(
    "n,h,w,d,iterations", [(4, 12, 12, 1, 1), (3, 9, 13, 1, 3), (2, 16, 14, 2, 2), (2, 11, 10, 3, 1)]
)
def test_glass_swaps_equal_the_sequential_loop(n, h, w, d, iterations):
    got = C._local_shuffle(n, h, w, d, iterations, torch.Generator().manual_seed(7), "cpu")
    assert torch.equal(got, _sequential_swaps(n, h, w, d, iterations, 7))


def test_glass_swaps_rows_and_wavefronts_agree():
    n, h, w = 20, 32, 32
    code = C._swap_codes(n, (h - 2) * (w - 2), 1, torch.Generator().manual_seed(1), "cpu")
    hh, ww = torch.meshgrid(torch.arange(h - 1, 1, -1), torch.arange(w - 1, 1, -1), indexing="ij")
    waves = torch.arange(h * w).repeat(n, 1)
    C._swap_waves(waves, hh.reshape(-1), ww.reshape(-1), code.long(), 1, h, w)
    rows = C._swap_rows(torch.arange(h * w).repeat(n, 1).view(n, h, w), code.view(n, h - 2, w - 2))
    assert torch.equal(rows.view(n, -1), waves)


def test_zoom_blur_matrices_equal_interpolated_zooms():
    for x in (BATCHES["rgb32"], BATCHES["grey20x36"]):
        for severity in C.SEVERITIES:
            zooms = C._ZOOMS[severity - 1]
            ref = x + sum(C._clipped_zoom(x, z) for z in zooms)
            ref = (ref / (len(zooms) + 1)).clamp(0, 1)
            assert torch.allclose(C.zoom_blur(x, severity, None), ref, atol=1e-5)


def test_benchmark_runs_on_any_size():
    r = C.corruption_benchmark(n=3, size=16, channels=1, seed=0)
    assert set(r["per_corruption_seconds"]) == set(NAMES)
    assert r["total_seconds"] == pytest.approx(sum(r["per_corruption_seconds"].values()))


# ---------------------------------------------------------------------------------------------
# occlusion


@pytest.mark.parametrize(
    "shape,size", [((2, 3, 32, 32), 8), ((2, 1, 28, 28), 5), ((1, 1, 9, 12), 9), ((1, 3, 6, 6), 6)]
)
def test_occlusion_zero_square_at_centre(shape, size):
    x = torch.rand(shape) * 0.9 + 0.1  # no zeros of its own
    y = occlude(x, size)
    h, w = shape[-2:]
    top, left = (h - size) // 2, (w - size) // 2
    mask = torch.zeros(h, w, dtype=torch.bool)
    mask[top : top + size, left : left + size] = True
    assert (y[..., mask] == 0).all()
    assert torch.equal(y[..., ~mask], x[..., ~mask])
    assert int((y == 0).sum()) == shape[0] * shape[1] * size * size
    assert not torch.equal(x, y) and float(x.min()) > 0  # input untouched


def test_occlusion_size_zero_and_registry():
    x = torch.rand(2, 1, 28, 28)
    assert torch.equal(occlude(x, 0), x)
    assert torch.equal(SHIFTS.get("occlusion")(10)(x), occlude(x, 10))


@pytest.mark.parametrize("size", [-1, 29, 100, 2.5, "4"])
def test_occlusion_bad_sizes(size):
    with pytest.raises(UserError):
        occlude(torch.rand(1, 1, 28, 28), size)


def test_occlusion_constructor_checks_size():
    with pytest.raises(UserError):
        SHIFTS.get("occlusion")(-3)
    with pytest.raises(UserError, match="larger than the 28x28 image"):
        SHIFTS.get("occlusion")(30)(torch.rand(1, 1, 28, 28))


# ---------------------------------------------------------------------------------------------
# CIFAR-10-C loader (small synthetic files; the real set is not here)


def _write_cifar10c(folder, name="fog", per=4):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5 * per, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, size=5 * per).astype(np.uint8)
    np.save(folder / f"{name}.npy", images)
    np.save(folder / "labels.npy", labels)
    return images, labels


def test_cifar10c_loads_the_severity_block(tmp_path):
    images, labels = _write_cifar10c(tmp_path, per=4)
    for severity in C.SEVERITIES:
        x, y = load_cifar10c(tmp_path, "fog", severity)
        block = slice(4 * (severity - 1), 4 * severity)
        assert x.dtype == torch.uint8 and x.shape == (4, 3, 32, 32) and x.is_contiguous()
        assert y.dtype == torch.int64 and y.shape == (4,)
        assert torch.equal(x, torch.from_numpy(images[block]).permute(0, 3, 1, 2))
        assert torch.equal(y, torch.from_numpy(labels[block].astype(np.int64)))


def test_cifar10c_missing_folder_and_files(tmp_path):
    with pytest.raises(UserError, match="folder .* not found; download CIFAR-10-C"):
        load_cifar10c(tmp_path / "nowhere", "fog", 1)
    with pytest.raises(UserError, match="fog.npy not found; download CIFAR-10-C"):
        load_cifar10c(tmp_path, "fog", 1)
    _write_cifar10c(tmp_path, name="snow")
    (tmp_path / "labels.npy").unlink()
    with pytest.raises(UserError, match="labels.npy not found"):
        load_cifar10c(tmp_path, "snow", 1)


def test_cifar10c_wrong_shapes(tmp_path):
    np.save(tmp_path / "fog.npy", np.zeros((10, 3, 32, 32), dtype=np.uint8))  # channels first
    np.save(tmp_path / "labels.npy", np.zeros(10, dtype=np.uint8))
    with pytest.raises(UserError, match=r"fog.npy holds uint8 of shape \(10, 3, 32, 32\)"):
        load_cifar10c(tmp_path, "fog", 1)
    np.save(tmp_path / "fog.npy", np.zeros((10, 32, 32, 3), dtype=np.uint8))
    np.save(tmp_path / "labels.npy", np.zeros(7, dtype=np.uint8))
    with pytest.raises(UserError, match=r"labels.npy has shape \(7,\)"):
        load_cifar10c(tmp_path, "fog", 1)
    (tmp_path / "fog.npy").write_bytes(b"not an npy file")
    with pytest.raises(UserError, match="not a readable .npy file"):
        load_cifar10c(tmp_path, "fog", 1)


def test_cifar10c_bad_name_and_severity(tmp_path):
    _write_cifar10c(tmp_path)
    with pytest.raises(UserError, match="did you mean 'fog'"):
        load_cifar10c(tmp_path, "fogg", 1)
    with pytest.raises(UserError, match="1, 2, 3, 4, 5"):
        load_cifar10c(tmp_path, "fog", 6)
