"""Differentiable augmentation: reproducibility, chunking, gradients, geometry and statistics."""

import math

import pytest
import torch
import torch.nn.functional as F

from sfm_lib.augment import Augment, AugmentParams


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
