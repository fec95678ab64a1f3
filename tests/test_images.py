"""Synthetic-image parameterisations: range, pyramid growth, init from real images, checkpoints."""

import io

import pytest
import torch
import torch.nn.functional as F

from sfm_lib.images import (
    COLOR_CORRELATION,
    PixelImages,
    PyramidImages,
    SyntheticImages,
    color_matrix,
    make_images,
    pyramid_sizes,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _real(n: int, side: int, seed: int = 0) -> torch.Tensor:
    return 0.01 + 0.98 * torch.rand(n, 3, side, side, generator=_gen(seed))


def _roundtrip(sd: dict) -> dict:
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_pyramid_sizes():
    assert pyramid_sizes(1) == [1]
    assert pyramid_sizes(16) == [1, 2, 4, 8, 16]
    assert pyramid_sizes(48) == [1, 2, 4, 8, 16, 32, 48]


@pytest.mark.parametrize("kind", ["pixels", "pyramid"])
def test_decode_shape_and_range(kind):
    imgs = make_images(kind, 3, 8, generator=_gen(1))
    assert isinstance(imgs, SyntheticImages)
    assert (imgs.num_images, imgs.resolution) == (3, 8)
    with torch.no_grad():
        for p in imgs.parameters():
            p.mul_(50)
    x = imgs.decode()
    assert x.shape == (3, 3, 8, 8)
    assert x.min() >= 0 and x.max() <= 1
    assert torch.equal(imgs(), x)


def test_make_images_rejects_unknown_kind():
    with pytest.raises(ValueError, match="pixels.*pyramid"):
        make_images("gan", 1, 8)


def test_pyramid_growth_schedule():
    imgs = PyramidImages(2, 16, grow_every=200, generator=_gen(2))
    assert imgs.num_levels == 1 and imgs.levels[0].shape == (2, 3, 1, 1)
    changed = []
    for step in range(0, 1401):
        before = [p.detach().clone() for p in imgs.levels]
        n_params = sum(p.numel() for p in imgs.parameters())
        state = imgs.generator.get_state()
        grew = imgs.grow(step)
        assert grew == (sum(p.numel() for p in imgs.parameters()) != n_params)
        if grew:
            changed.append(step)
            k = len(before)
            assert imgs.num_levels == k + 1
            for old, new in zip(before, imgs.levels):
                torch.testing.assert_close(new.detach(), old * k / (k + 1))
            s = pyramid_sizes(16)[k]
            expect = torch.randn(2, 3, s, s, generator=torch.Generator().set_state(state)) / (k + 1)
            torch.testing.assert_close(imgs.levels[k].detach(), expect)
    assert changed == [200, 400, 600, 800]
    assert imgs.num_levels == 5 and imgs.levels[-1].shape == (2, 3, 16, 16)


def test_pyramid_gradients_reach_every_level():
    imgs = PyramidImages(2, 8, grow_every=1, generator=_gen(3))
    for step in range(1, 5):
        imgs.grow(step)
    imgs.decode().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in imgs.levels)


def test_color_matrix_normalised_and_applied_as_out_c_sum_j():
    m = color_matrix(torch.float64)
    assert m.norm(dim=0).max().item() == pytest.approx(1.0, abs=1e-12)
    raw = torch.tensor(COLOR_CORRELATION, dtype=torch.float64)
    torch.testing.assert_close(m * raw.norm(dim=0).max(), raw)
    imgs = PyramidImages(1, 4, generator=_gen(4))
    v = torch.tensor([0.3, -0.7, 1.1])
    with torch.no_grad():
        imgs.levels[0].copy_(v.view(1, 3, 1, 1))
    expect = torch.sigmoid(2 * (m.float() @ v))  # out_c = Σ_j M[c, j] v_j
    torch.testing.assert_close(imgs.decode()[0, :, 2, 1], expect)
    plain = PyramidImages(1, 4, generator=_gen(4), decorrelate=False)
    with torch.no_grad():
        plain.levels[0].copy_(v.view(1, 3, 1, 1))
    torch.testing.assert_close(plain.decode()[0, :, 0, 0], torch.sigmoid(2 * v))


@pytest.mark.parametrize("side", [16, 12])
def test_init_from_real_reproduces_images(side):
    x = _real(2, side)
    pix = PixelImages(2, side, init=x)
    torch.testing.assert_close(pix.decode().detach(), x, rtol=0, atol=1e-3)
    pyr = PyramidImages(2, side, init=x)
    assert pyr.num_levels == len(pyramid_sizes(side))
    assert not pyr.grow(pyr.grow_every)  # already complete
    torch.testing.assert_close(pyr.decode().detach(), x, rtol=0, atol=1e-3)
    # the coarsest level carries the global mean of the pre-activation
    assert pyr.levels[0].shape == (2, 3, 1, 1)


def test_init_resizes_to_resolution():
    x = _real(2, 8)
    ref = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
    torch.testing.assert_close(PixelImages(2, 16, init=x).decode().detach(), ref, rtol=0, atol=1e-3)
    torch.testing.assert_close(PyramidImages(2, 16, init=x).decode().detach(), ref, rtol=0, atol=1e-3)
    with pytest.raises(ValueError):
        PixelImages(3, 16, init=x)


def test_pixels_random_init_std():
    p = PixelImages(4, 16, generator=_gen(5), init_std=0.5).pixels
    assert p.std().item() == pytest.approx(0.5, abs=0.05)


@pytest.mark.parametrize("target_levels", [1, 5])
def test_pyramid_state_dict_roundtrip(target_levels):
    src = PyramidImages(2, 16, grow_every=1, generator=_gen(6))
    for step in range(1, 4):
        src.grow(step)
    assert src.num_levels == 4
    sd = _roundtrip(src.state_dict())
    dst = PyramidImages(2, 16, grow_every=1, generator=_gen(7))
    for step in range(1, target_levels):
        dst.grow(step)
    dst.load_state_dict(sd)
    assert dst.num_levels == 4
    assert torch.equal(dst.decode(), src.decode())
    assert dst.grow(4) and dst.num_levels == 5  # growth resumes from the restored level count


def test_pixels_state_dict_roundtrip_and_mismatch():
    src = PixelImages(2, 8, generator=_gen(8))
    dst = PixelImages(2, 8, generator=_gen(9))
    dst.load_state_dict(_roundtrip(src.state_dict()))
    assert torch.equal(dst.decode(), src.decode())
    with pytest.raises((ValueError, RuntimeError)):
        PixelImages(3, 8).load_state_dict(src.state_dict())
