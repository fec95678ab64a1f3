"""The test transform (issue 19 item 2): `data.EvalTransform` against the library's old square resize (bit for
bit), torchvision's tensor transforms (to float rounding) and timm's own `create_transform` on PIL images
(within a measured bound); each backbone's own transform from timm's config; the transform in the feature
pass, the probes' view 0 and every cache key."""
import math

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from sfm_lib import backbones, cache, data, evaluate, features, stats
from sfm_lib.data import PAPER, SQUARE, EvalTransform
from toydata import toy_dataset

# timm's PIL path rounds to 8 bits and PIL's cubic kernel runs in fixed point: measured on the images below,
# max |ours − timm| ≤ 0.016 (bicubic) and ≤ 1/255 (bilinear) in [0, 1], mean ≤ 0.0013 (the rounding).
# A one-pixel shift or the square transform instead of timm's crop exceeds these many times over.
PIL_MAX = {"bicubic": 0.02, "bilinear": 1.02 / 255}
PIL_MEAN = 0.002
SHAPES = [(256, 256), (375, 500), (500, 333), (97, 131), (60, 60)]


def _image(h: int, w: int, seed: int = 0) -> torch.Tensor:
    """A photo-like uint8 image [3, h, w]: smooth colour blobs plus fine noise."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, h // 8 + 2, w // 8 + 2, generator=g)
    x = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False)
    x = (x + 0.15 * torch.rand(1, 3, h, w, generator=g)).clamp(0, 1)
    return (x[0] * 255).round().to(torch.uint8)


def _pil(img: torch.Tensor) -> Image.Image:
    return Image.fromarray(img.permute(1, 2, 0).numpy())


def _old_square_resize(images: torch.Tensor, r: int) -> torch.Tensor:
    """The library's resize before transforms existed (commit f5e247d), written out again."""
    h, w = images.shape[-2:]
    s = min(h, w)
    images = images[..., (h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
    if s == r:
        return images
    return F.interpolate(images[None], size=(r, r), mode="bilinear", align_corners=False, antialias=s > r)[0]


def _torchvision(img: torch.Tensor, size: int, crop_pct: float, interpolation: str) -> torch.Tensor:
    """timm's eval pipeline (Resize(⌊size/crop_pct⌋) → CenterCrop(size)) with torchvision.transforms.v2 on a
    float tensor, clamped as PIL's 8-bit output is."""
    from torchvision.transforms import v2

    mode = getattr(v2.InterpolationMode, interpolation.upper())
    tf = v2.Compose([v2.Resize(math.floor(size / crop_pct), interpolation=mode, antialias=True), v2.CenterCrop(size)])
    return tf(img.float() / 255).clamp(0, 1)


@pytest.mark.parametrize("shape", SHAPES + [(28, 28), (40, 52), (3, 90, 120)])
@pytest.mark.parametrize("r", [24, 64, 224])
def test_square_default_is_the_old_square_resize_bit_for_bit(shape, r):
    img = _image(*shape[-2:]).float() / 255
    expected = _old_square_resize(img, r)
    assert torch.equal(SQUARE(img, r), expected)
    assert torch.equal(SQUARE(img[None], r)[0], expected)
    assert torch.equal(data.square_resize(img, r), expected)
    assert EvalTransform() == SQUARE and str(SQUARE) == "square"


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("crop_pct,interpolation,size", [(0.875, "bicubic", 224), (0.9, "bicubic", 224),
                                                         (1.0, "bicubic", 224), (0.875, "bilinear", 224),
                                                         (0.875, "bicubic", 64), (0.9, "bilinear", 70)])
def test_center_mode_is_torchvisions_resize_and_centre_crop(shape, crop_pct, interpolation, size):
    img = _image(*shape, seed=1)
    ours = EvalTransform(crop_pct, interpolation, "center")(img.float() / 255, size)
    assert ours.shape == (3, size, size)
    torch.testing.assert_close(ours, _torchvision(img, size, crop_pct, interpolation), rtol=0, atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("crop_pct,interpolation,size", [(0.875, "bicubic", 224), (0.9, "bicubic", 224),
                                                         (1.0, "bicubic", 224), (0.875, "bilinear", 224),
                                                         (0.875, "bicubic", 64)])
def test_center_mode_is_timms_pil_transform_within_the_measured_bound(shape, crop_pct, interpolation, size):
    from timm.data import create_transform

    img = _image(*shape, seed=2)
    timm_tf = create_transform(input_size=(3, size, size), crop_pct=crop_pct, interpolation=interpolation,
                               crop_mode="center", mean=(0, 0, 0), std=(1, 1, 1))
    ref = timm_tf(_pil(img))
    diff = (EvalTransform(crop_pct, interpolation, "center")(img.float() / 255, size) - ref).abs()
    assert diff.max() <= PIL_MAX[interpolation] and diff.mean() <= PIL_MEAN
    shifted = (torch.roll(ref, 1, dims=-1) - ref).abs()  # the bound tells a one-pixel shift apart
    assert shifted.mean() > 5 * PIL_MEAN


@pytest.mark.parametrize("name", ["dinov2_vitb14", "clip_vitb16", "eva02_vitb14"])
def test_each_vit_takes_timms_own_transform_and_normalisation(name):
    """`create_transform(**resolve_data_config({}, model=m))` on PIL images against the library's tensor path
    (eval_transform then Backbone.preprocess: mean and std), at the config's size and at 224."""
    from timm.data import create_transform, resolve_data_config

    bb = backbones.load(name, pretrained=False)
    t = backbones.eval_transform(bb)
    assert t is bb.eval_transform and t.crop_mode == "center"
    std = torch.tensor(bb.std).view(3, 1, 1)
    for size in sorted({resolve_data_config({}, model=bb.model)["input_size"][-1], 224}):
        cfg = resolve_data_config({"input_size": (3, size, size)}, model=bb.model)
        assert (t.crop_pct, t.interpolation) == (cfg["crop_pct"], cfg["interpolation"])
        timm_tf = create_transform(**cfg)
        for k, shape in enumerate([(375, 500), (500, 333), (256, 256)]):
            img = _image(*shape, seed=10 + k)
            ours = bb.preprocess(t(img.float() / 255, size)[None], size)[0]
            diff = ((ours - timm_tf(_pil(img))) * std).abs()  # back in [0, 1] units
            assert diff.max() <= PIL_MAX["bicubic"] and diff.mean() <= PIL_MEAN, (size, shape)
            if t.crop_pct < 1:  # the square transform would not pass: the test tells them apart
                wrong = ((bb.preprocess(SQUARE(img.float() / 255, size)[None], size)[0] - timm_tf(_pil(img))) * std)
                assert wrong.abs().mean() > 5 * PIL_MEAN


def test_transform_kinds_the_offline_backbones_and_the_papers():
    lite = backbones.load("effnet_lite0", pretrained=False)
    assert backbones.eval_transform(lite) == SQUARE == backbones.eval_transform(lite, "square")
    assert backbones.eval_transform(lite, "paper") == PAPER
    assert PAPER.scale_size(224) == 256  # Resize(256) → CenterCrop(224)
    dino = backbones.load("dinov2_vitb14", pretrained=False)  # timm: crop_pct 1.0 at 518 px, bicubic
    assert dino.eval_transform == EvalTransform(1.0, "bicubic", "center")
    with pytest.raises(ValueError, match="one of"):
        backbones.eval_transform(lite, "imagenet")
    for bad in ({"crop_pct": 0.0}, {"crop_pct": 1.5}, {"interpolation": "nearest"}, {"crop_mode": "squash"}):
        with pytest.raises(ValueError):
            EvalTransform(**bad)


def _folder(tmp_path, shapes=((90, 120), (101, 77), (64, 64), (131, 97))):
    for i, (h, w) in enumerate(shapes):
        d = tmp_path / "train" / f"c{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        _pil(_image(h, w, seed=20 + i)).save(d / f"{i}.png")
    ds = data.load(f"imagefolder:{tmp_path}", "trainval")
    return ds


def _tiny():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten())
    net.num_features = 8
    return backbones.Backbone(net, "tiny", (0.5,) * 3, (0.25,) * 3, torch.device("cpu"))


def test_real_images_and_the_feature_pass_use_the_transform(tmp_path):
    """Folder (workers on the CPU) and in-memory (on the device) passes: features of the transformed images,
    the transform computed image by image by torchvision; the default is the square path."""
    bb, r = _tiny(), 32
    folder = _folder(tmp_path)
    raw = [folder.read_uint8(i) for i in range(len(folder))]
    for t in (PAPER, EvalTransform(0.9, "bilinear", "center")):
        ref = torch.stack([_torchvision(img, r, t.crop_pct, t.interpolation) for img in raw])
        torch.testing.assert_close(data.real_images(folder, range(len(folder)), r, t), ref, rtol=0, atol=1e-6)
        feats = torch.cat([f for f, _ in features.iterate(bb, folder, r, 3, 0, False, transform=t)])
        torch.testing.assert_close(feats, bb.features(ref, r), rtol=0, atol=1e-5)
    assert torch.equal(data.real_images(folder, [0, 2], r), data.real_images(folder, [0, 2], r, SQUARE))
    toy = toy_dataset("train", 3, 0, side=40)
    imgs = toy.batch(torch.arange(len(toy)))[0]
    feats = torch.cat([f for f, _ in features.iterate(bb, toy, r, 5, progress=False, transform=PAPER)])
    torch.testing.assert_close(feats, bb.features(PAPER(imgs, r), r), rtol=0, atol=1e-6)
    square = torch.cat([f for f, _ in features.iterate(bb, toy, r, 5, progress=False)])
    assert torch.equal(square, bb.features(imgs, r))
    assert not torch.allclose(square, feats, atol=1e-3)


def test_view0_of_real_training_images_is_the_test_input(tmp_path):
    """A probe's view 0 of real images equals the test pass's features of the same images, with a
    transform, for in-memory data and image folders; distilled images stay as they are."""
    bb, r = _tiny(), 32
    toy = toy_dataset("train", 2, 0, side=40)
    for ds in (toy, _folder(tmp_path)):
        test = torch.cat([f for f, _ in features.iterate(bb, ds, r, 4, 0, False, transform=PAPER)])
        (v,), _ = evaluate.probe_features(bb, [ds], r, views=3, seeds=[0], transform=PAPER)
        torch.testing.assert_close(v[:, 0], test, rtol=0, atol=1e-6)
        (plain,), _ = evaluate.probe_features(bb, [ds], r, views=1, seeds=[0])
        assert not torch.allclose(plain[:, 0], test, atol=1e-3)
    syn = data.DistilledSet(torch.rand(4, 3, r, r), torch.tensor([0, 1, 2, 3]), toy.classes, {})
    (v,), _ = evaluate.probe_features(bb, [syn], r, views=1, seeds=[0], transform=PAPER)
    torch.testing.assert_close(v[:, 0], bb.features(syn.images, r), rtol=0, atol=0)


def test_the_transform_is_in_every_cache_key(fresh_cache):
    bb, r = _tiny(), 32
    toy = toy_dataset("train", 3, 0, side=40)
    square = features.cache_path(bb, toy, r)
    assert square == features.cache_path(bb, toy, r, SQUARE)  # None and SQUARE: one computation, one key
    paths = {features.cache_path(bb, toy, r, t) for t in (SQUARE, PAPER, EvalTransform(0.9, "bicubic", "center"),
                                                          EvalTransform(0.875, "bicubic", "square"),
                                                          EvalTransform(0.875, "bilinear", "center"))}
    assert len(paths) == 5
    assert features.loader_key(None) == features.LOADER  # the square path keeps the keys it had
    assert cache.key("distilled", transform=PAPER) != cache.key("distilled", transform=SQUARE)  # describable
    s_sq = stats.cached_extract(bb, toy, r, progress=False)
    s_pa = stats.cached_extract(bb, toy, r, progress=False, transform=PAPER)
    assert not torch.allclose(s_sq.means, s_pa.means)
    assert len(list((fresh_cache / "stats").glob("*.safetensors"))) == 2
    again = stats.cached_extract(bb, toy, r, progress=False, transform=PAPER)
    assert torch.equal(again.means, s_pa.means)
    direct = stats.extract(bb, toy, r, progress=False, transform=PAPER)
    torch.testing.assert_close(direct.means, s_pa.means, rtol=0, atol=0)


def test_a_statistics_checkpoint_refuses_another_transform(tmp_path):
    bb, r = _tiny(), 32
    toy = toy_dataset("train", 3, 0, side=40)
    ckpt = tmp_path / "ckpt.safetensors"
    stats.extract(bb, toy, r, batch_size=4, progress=False, checkpoint=ckpt, checkpoint_every=1, transform=PAPER)
    with pytest.raises(ValueError, match="loader"):
        stats.extract(bb, toy, r, batch_size=4, progress=False, checkpoint=ckpt, resume=True)
    same = stats.extract(bb, toy, r, batch_size=4, progress=False, checkpoint=ckpt, resume=True, transform=PAPER)
    assert torch.equal(same.means, stats.extract(bb, toy, r, progress=False, transform=PAPER).means)


def test_probe_results_record_the_transform_and_score_on_refuses_another(fresh_cache):
    bb, r = _tiny(), 32
    train, test = toy_dataset("train", 3, 0, side=40), toy_dataset("test", 3, 1, side=40)
    res = evaluate.linear_probe(bb, train, test, r, epochs=2, seeds=[0], views=1, transform=PAPER)
    assert res.meta["transform"] == str(PAPER)
    rnd = evaluate.baseline("random", bb, train, test, r, ipc=3, seeds=[0], epochs=2, views=1)
    with pytest.raises(ValueError, match="transform"):
        evaluate.gain_over_random(res, rnd)
    with pytest.raises(ValueError, match="transform"):
        evaluate.score_on(res, bb, test, r)
    assert evaluate.score_on(res, bb, test, r, transform=PAPER).top1 == res.top1
