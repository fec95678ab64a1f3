"""Differentiable augmentation: reproducibility, chunking, gradients, geometry and statistics."""

import math

import pytest
import torch
import torch.nn.functional as F

from torch.utils._python_dispatch import TorchDispatchMode

from sfm_lib.augment import Augment, AugmentParams, gaussian_noise, hash32


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _images(n: int = 8, side: int = 12, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    return torch.rand(n, 3, side, side, generator=_gen(seed), dtype=dtype)


def test_same_seed_same_output_and_different_seed_differs():
    x = _images()
    aug = Augment()
    a = aug(x, 10, _gen(1))
    b = aug(x, 10, _gen(1))
    c = aug(x, 10, _gen(2))
    assert a.shape == (8, 3, 10, 10)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_chunk_equals_rows_of_full_batch_including_noise():
    x = _images(n=10)
    aug = Augment()
    params = aug.sample(10, _gen(3))
    assert params.noise.any() and (~params.noise).any()
    full = aug.apply(x, params, 9)
    parts = torch.cat([aug.apply(x[a:b], params[a:b], 9) for a, b in [(0, 3), (3, 4), (4, 10)]])
    torch.testing.assert_close(parts, full, rtol=0, atol=1e-6)
    idx = torch.tensor([7, 1])
    torch.testing.assert_close(aug.apply(x[idx], params.select(idx), 9), full[idx], rtol=0, atol=1e-6)


def test_params_helpers():
    params = Augment().sample(5, _gen(4))
    assert len(params) == 5 and len(params[2]) == 1 and len(params[-1]) == 1
    assert torch.equal(params[-1].theta, params.theta[-1:])
    both = AugmentParams.cat([params[:2], params[2:]])
    assert torch.equal(both.theta, params.theta) and torch.equal(both.noise_seed, params.noise_seed)
    moved = params.to("cpu")
    assert moved.theta.dtype == torch.float32 and moved.noise.dtype == torch.bool
    assert moved.noise_seed.dtype == torch.int64
    with pytest.raises(ValueError):
        Augment().apply(_images(n=4), params, 6)


def test_gradcheck_wrt_images():
    x = _images(n=2, side=4, dtype=torch.float64).requires_grad_()
    aug = Augment(noise_p=1.0)
    params = aug.sample(2, _gen(5))
    assert torch.autograd.gradcheck(lambda img: aug.apply(img, params, 3), (x,))


def test_identity_preset_returns_image_and_resizes():
    x = _images(n=3, side=8)
    aug = Augment.none()
    params = aug.sample(3, _gen(6))
    torch.testing.assert_close(aug.apply(x, params, 8), x, rtol=0, atol=1e-5)
    for size in (12, 4):
        ref = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        torch.testing.assert_close(aug.apply(x, params, size), ref, rtol=0, atol=1e-5)


def test_flip_mirrors_and_probe_preset():
    ramp = torch.arange(6.0).view(1, 1, 1, 6).expand(1, 3, 5, 6).contiguous()
    theta = torch.tensor([[[-1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])
    params = AugmentParams(theta, torch.tensor([False]), torch.tensor([0]))
    out = Augment().apply(ramp[..., :5], params, 5)
    torch.testing.assert_close(out, ramp[..., :5].flip(-1), rtol=0, atol=1e-5)
    probe = Augment.probe()
    assert probe.flip and probe.noise_p == 0 and probe.scale == (0.08, 1.0)
    flips = probe.sample(2000, _gen(7)).theta[:, 0, 0] < 0
    assert not probe.sample(50, _gen(7)).noise.any()
    assert 0.45 < flips.float().mean() < 0.55
    assert not (Augment(flip=False).sample(200, _gen(7)).theta[:, 0, 0] < 0).any()


def _expected_area(scale, ratio, n=1000):
    """E[min(√(s r), 1)·min(√(s/r), 1)] by the midpoint rule on s ~ U(scale), log r ~ U(log ratio)."""
    s = scale[0] + (scale[1] - scale[0]) * (torch.arange(n, dtype=torch.float64) + 0.5) / n
    lr = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * (
        torch.arange(n, dtype=torch.float64) + 0.5) / n
    s, r = s[:, None], torch.exp(lr)[None, :]
    return ((s * r).sqrt().clamp(max=1) * (s / r).sqrt().clamp(max=1)).mean().item()


@pytest.mark.parametrize("scale", [(0.08, 1.0), (0.2, 0.5)])
def test_crop_area_statistics(scale):
    aug = Augment(scale=scale)
    theta = aug.sample(20000, _gen(8)).theta.double()
    w, h = theta[:, 0, 0].abs(), theta[:, 1, 1]
    tx, ty = theta[:, 0, 2], theta[:, 1, 2]
    area = w * h
    assert (w <= 1).all() and (h <= 1).all()
    assert (tx.abs() + w <= 1 + 1e-6).all() and (ty.abs() + h <= 1 + 1e-6).all()  # crop inside
    assert scale[0] - 1e-6 <= area.mean() <= scale[1]
    assert area.mean().item() == pytest.approx(_expected_area(scale, aug.ratio), abs=0.01)
    if scale[1] * aug.ratio[1] <= 1:  # no clamping: the area is exactly s ~ U(scale)
        assert area.min() >= scale[0] - 1e-6 and area.max() <= scale[1] + 1e-6
        assert area.mean().item() == pytest.approx(sum(scale) / 2, abs=0.01)


def test_noise_statistics_on_zero_image():
    aug = Augment(flip=False, scale=(1.0, 1.0), ratio=(1.0, 1.0), noise_p=1.0, noise_mean=0.5, noise_std=0.2)
    out = aug(torch.zeros(8, 3, 16, 16), 16, _gen(9))
    assert out.mean().item() == pytest.approx(0.5, abs=0.01)
    assert out.std().item() == pytest.approx(0.2, abs=0.01)
    assert not torch.allclose(out[0], out[1])  # independent noise per image
    p = Augment(noise_p=0.3).sample(5000, _gen(10)).noise.float().mean().item()
    assert p == pytest.approx(0.3, abs=0.03)


# ---------------------------------------------------------------------- counter-based, sync-free noise
def _lowbias32_reference(values):
    """lowbias32 in numpy uint32 arithmetic (wrapping multiply, logical shifts): the independent check."""
    import numpy as np

    v = np.asarray(values, dtype=np.uint64).astype(np.uint32)
    v ^= v >> np.uint32(16)
    v = (v * np.uint32(0x7FEB352D)).astype(np.uint32)
    v ^= v >> np.uint32(15)
    v = (v * np.uint32(0x846CA68B)).astype(np.uint32)
    v ^= v >> np.uint32(16)
    return v.astype(np.int64)


def test_hash32_equals_uint32_reference():
    import numpy as np

    x = torch.cat([torch.tensor([0, 1, 2, 2**31 - 1, 2**31, 2**32 - 1]),
                   torch.randint(0, 2**32, (50000,), generator=_gen(11))])
    got = hash32(x)
    assert got.dtype == torch.int64 and int(got.min()) >= 0 and int(got.max()) < 2**32
    assert np.array_equal(got.numpy(), _lowbias32_reference(x.numpy()))
    assert hash32(x[:7]).tolist() == got[:7].tolist()  # no hidden state


def test_noise_equals_independent_numpy_computation():
    """The module doc's recipe, in numpy uint32 / float64: keys, per-pair hash, 16-bit uniforms, Box–Muller."""
    import numpy as np

    seeds = torch.tensor([0, 1, 2**62 - 1, 123456789012345], dtype=torch.int64)
    shape = (3, 5, 3)  # 45 pixels: 23 pairs, the last one cut
    s = seeds.numpy().astype(np.uint64)
    keys = _lowbias32_reference(_lowbias32_reference(s & np.uint64(0xFFFFFFFF)) ^ (s >> np.uint64(32)).astype(np.int64))
    base = _lowbias32_reference(np.arange(23))
    h = _lowbias32_reference(base[None, :] ^ keys[:, None])
    u = ((h >> 16) + 0.5) / 65536.0
    v = ((h & 0xFFFF) + 0.5) / 65536.0
    r = np.sqrt(-2.0 * np.log(u))
    ref = np.stack([r * np.cos(2 * np.pi * v), r * np.sin(2 * np.pi * v)], -1).reshape(4, 46)[:, :45]
    got = gaussian_noise(seeds, shape)
    assert got.shape == (4, 3, 5, 3)
    np.testing.assert_allclose(got.reshape(4, 45).double().numpy(), ref, rtol=0, atol=2e-5)


def test_noise_rows_depend_only_on_their_seed():
    seeds = torch.randint(0, 2**62, (9,), generator=_gen(12))
    full = gaussian_noise(seeds, (3, 7, 5))  # odd pixel count: the last Box–Muller pair is cut
    assert full.shape == (9, 3, 7, 5) and full.dtype == torch.float32
    parts = torch.cat([gaussian_noise(seeds[a:b], (3, 7, 5)) for a, b in [(0, 1), (1, 5), (5, 9)]])
    assert torch.equal(parts, full)
    assert torch.equal(gaussian_noise(seeds[[6, 2, 6]], (3, 7, 5)), full[[6, 2, 6]])
    # blocks of rows (the memory bound) do not change the values
    import sfm_lib.augment as augment_mod

    old = augment_mod._NOISE_BLOCK
    try:
        augment_mod._NOISE_BLOCK = 200
        assert torch.equal(gaussian_noise(seeds, (3, 7, 5)), full)
    finally:
        augment_mod._NOISE_BLOCK = old
    # seeds that differ only in their high 32 bits give other noise
    other = gaussian_noise(seeds + 2**40, (3, 7, 5))
    assert not torch.isclose(other, full).any(dim=(1, 2, 3)).all()


def test_noise_is_standard_normal_and_independent():
    seeds = torch.randint(0, 2**62, (64,), generator=_gen(13))
    z = gaussian_noise(seeds, (3, 32, 32)).double()
    flat = z.flatten()  # 196,608 values
    assert flat.mean().item() == pytest.approx(0.0, abs=0.01)
    assert flat.std().item() == pytest.approx(1.0, abs=0.01)
    for k, p in ((1, 0.682689), (2, 0.954500), (3, 0.997300)):  # Gaussian mass within kσ
        assert (flat.abs() < k).double().mean().item() == pytest.approx(p, abs=0.004)
    assert (flat ** 4).mean().item() == pytest.approx(3.0, abs=0.08)  # kurtosis
    rows = z.flatten(1)

    def corr(a, b):
        return torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item()

    # neighbours in memory (a Box–Muller pair, then across pairs), across rows of an image, across views
    assert abs(corr(rows[:, 0::2], rows[:, 1::2])) < 0.01
    assert abs(corr(rows[:, 1:-1:2], rows[:, 2::2])) < 0.01
    assert abs(corr(z[:, :, :-1], z[:, :, 1:])) < 0.01
    assert abs(corr(rows[:-1], rows[1:])) < 0.01
    views = torch.corrcoef(rows) - torch.eye(64, dtype=torch.float64)
    assert views.abs().max().item() < 5 / math.sqrt(rows.shape[1])  # 5σ of a null correlation


def test_noise_path_applies_only_to_flagged_rows():
    aug = Augment(flip=False, scale=(1.0, 1.0), ratio=(1.0, 1.0), noise_p=0.5, noise_mean=0.5, noise_std=0.2)
    x = _images(n=12, side=8)
    params = aug.sample(12, _gen(14))
    out = aug.apply(x, params, 8)
    plain = Augment.none().apply(x, params, 8)
    eps = gaussian_noise(params.noise_seed, (3, 8, 8))
    on = params.noise
    assert on.any() and (~on).any()
    torch.testing.assert_close(out[~on], plain[~on], rtol=0, atol=0)
    torch.testing.assert_close(out[on], plain[on] + 0.5 + 0.2 * eps[on], rtol=0, atol=1e-6)
    # noise_p = 0: no noise at all, whatever the flags say
    flagged = AugmentParams(params.theta, torch.ones(12, dtype=torch.bool), params.noise_seed)
    assert torch.equal(Augment.probe().apply(x, flagged, 8), Augment.probe().apply(x, params, 8))


def test_chunked_apply_is_bitwise_equal():
    x = _images(n=10, side=16)
    aug = Augment(noise_p=0.7)
    params = aug.sample(10, _gen(15))
    full = aug.apply(x, params, 12)
    parts = torch.cat([aug.apply(x[a:b], params[a:b], 12) for a, b in [(0, 4), (4, 5), (5, 10)]])
    assert torch.equal(parts, full)


_SYNCING_OPS = ("_local_scalar_dense", "nonzero", "masked_select", "unique", "item")


class _OpRecorder(TorchDispatchMode):
    """Records the aten ops run; flags those that read device data back to the host on CUDA."""

    def __init__(self):
        super().__init__()
        self.syncing: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        bool_index = name.startswith("aten.index.") and any(
            isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in (args[1] if len(args) > 1 else ()) or ())
        if any(op in name for op in _SYNCING_OPS) or bool_index:
            self.syncing.append(name)
        return func(*args, **(kwargs or {}))


def test_sample_and_apply_never_read_device_values(monkeypatch):
    def refuse(self, *a, **k):
        raise AssertionError("tolist() in the augmentation")

    monkeypatch.setattr(torch.Tensor, "tolist", refuse)
    aug = Augment(noise_p=0.5)
    x = _images(n=6, side=10)
    with _OpRecorder() as rec:
        params = aug.sample(6, _gen(16))
        aug.apply(x, params, 8)
        aug.apply(x[2:4], params[2:4], 8)
    assert rec.syncing == []
    # the recorder does catch them
    with _OpRecorder() as rec:
        params.noise.nonzero()
        _ = params.noise_seed[0].item()
    assert len(rec.syncing) == 2
