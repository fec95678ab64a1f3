"""The papers' ViT-B backbones with random weights at 224 px on the CPU: names, the feature each paper
uses, any-resolution inputs, a statistics pass and one distillation step (issue 9, item 1).

Random weights cost the same as the real ones and need no network; a ViT-B forward is ~0.3 s per
224 px image on two cores, so every test uses 2–4 images and each model is built once per module."""

import pytest
import torch

from sfm_lib import backbones, distill, stats
from sfm_lib.data import TensorImageDataset

pytestmark = pytest.mark.usefixtures("single_thread")

EXPECTED = {  # short name → (timm name, feature dim)
    "dinov2_vitb14": ("vit_base_patch14_dinov2.lvd142m", 768),
    "clip_vitb16": ("vit_base_patch16_clip_quickgelu_224.openai", 512),
    "eva02_vitb14": ("eva02_base_patch14_224.mim_in22k", 768),
}


@pytest.fixture(scope="module")
def vits():
    """Each paper backbone, built on first use (random weights, CPU) and kept for the module."""
    built: dict[str, backbones.Backbone] = {}

    def get(name: str) -> backbones.Backbone:
        if name not in built:
            torch.manual_seed(0)  # timm initialises from the global generator
            built[name] = backbones.load(name, "cpu", pretrained=False)
        return built[name]

    return get


def _by_hand(bb: backbones.Backbone, x: torch.Tensor) -> torch.Tensor:
    """The paper's feature read off the token sequence, pooling done here: DINOv2 the (normed) class
    token, CLIP the class token times the projection, EVA-02 the mean patch token through fc_norm."""
    m = bb.model
    tokens = m.forward_features(x)
    if bb.name.startswith("vit_base_patch14_dinov2"):
        return tokens[:, 0]
    if "_clip_" in bb.name:
        return tokens[:, 0] @ m.head.weight.T + m.head.bias
    return m.fc_norm(tokens[:, m.num_prefix_tokens:].mean(1))


def test_names_resolve_to_timm_architecture_and_tag():
    for short, (full, _) in EXPECTED.items():
        assert backbones.PAPER_BACKBONES[short] == full
        assert backbones.resolve_name(short) == full == backbones.resolve_name(full)
    # a bare architecture gets timm's default tag: the weights that would load
    assert backbones.resolve_name("vit_base_patch14_dinov2") == "vit_base_patch14_dinov2.lvd142m"
    assert backbones.resolve_name("effnet_lite0") == "effnet_lite0"
    # the CLIP projection is kept for image towers, not for fine-tuned classifiers
    assert backbones._keeps_head("vit_base_patch16_clip_224.openai")
    assert not backbones._keeps_head(backbones.resolve_name("vit_base_patch16_clip_224"))  # …_ft_in12k_in1k
    assert not backbones._keeps_head("vit_base_patch14_dinov2.lvd142m")
    with pytest.raises(ValueError, match="tags of vit_base_patch14_dinov2: lvd142m"):
        backbones.resolve_name("vit_base_patch14_dinov2.no_such_tag")
    with pytest.raises(ValueError, match="dinov2_vitb14, clip_vitb16, eva02_vitb14"):
        backbones.resolve_name("not_a_backbone")


@pytest.mark.parametrize("short", list(EXPECTED))
def test_paper_feature_at_224(vits, short):
    bb = vits(short)
    full, dim = EXPECTED[short]
    assert bb.name == full and bb.feature_dim == dim
    assert not bb.pretrained and bb.precision == "fp32" and bb.img_size is None
    assert all(not p.requires_grad for p in bb.model.parameters()) and not bb.model.training
    x = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        feats = bb.features(x, 224)
        ref = _by_hand(bb, bb.preprocess(x, 224))
    assert feats.shape == (2, dim) and feats.dtype == torch.float32 and torch.isfinite(feats).all()
    torch.testing.assert_close(feats, ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(feats[0], feats[1])


def test_the_issue_case_and_other_resolutions(vits):
    """``load("vit_base_patch14_dinov2", pretrained=False)`` + a 224 px batch used to assert (built for 518)."""
    bb = vits("dinov2_vitb14")
    assert bb.patch_size == 14
    with torch.no_grad():
        small = bb.features(torch.rand(1, 3, 40, 40), 28)  # any multiple of 14
    assert small.shape == (1, 768)
    with pytest.raises(ValueError, match="multiple of 14.*56 or 70"):
        bb.features(torch.rand(1, 3, 64, 64), 64)


def test_fixed_img_size():
    torch.manual_seed(0)
    bb = backbones.load("vit_base_patch16_clip_224.openai", pretrained=False, img_size=32)
    assert bb.img_size == 32 and bb.feature_dim == 512
    with torch.no_grad():
        assert bb.features(torch.rand(1, 3, 40, 40), 32).shape == (1, 512)
    with pytest.raises(ValueError, match="built for 32 px"):
        bb.features(torch.rand(1, 3, 64, 64), 48)


@pytest.fixture(scope="module")
def tiny_set():
    """4 random 32×32 colour images, 2 classes."""
    g = torch.Generator().manual_seed(2)
    images = torch.randint(0, 256, (4, 32, 32, 3), generator=g, dtype=torch.uint8)
    ds = TensorImageDataset(images, [0, 1, 0, 1], ["a", "b"], "tiny")
    ds.split = "train"
    return ds


@pytest.fixture(scope="module")
def dinov2_stats(vits, tiny_set):
    return stats.extract(vits("dinov2_vitb14"), tiny_set, 224, batch_size=4, progress=False)


def test_statistics_pass(vits, tiny_set, dinov2_stats):
    bb = vits("dinov2_vitb14")
    assert dinov2_stats.means.shape == (2, 768) and dinov2_stats.counts.tolist() == [2, 2]
    assert dinov2_stats.meta["backbone"] == bb.name and dinov2_stats.meta["resolution"] == 224
    with torch.no_grad():  # one image at a time, means in float64
        feats = torch.cat([bb.features(tiny_set[i][0][None], 224) for i in range(4)]).double()
    ref = torch.stack([feats[[0, 2]].mean(0), feats[[1, 3]].mean(0)])
    torch.testing.assert_close(dinov2_stats.means, ref, rtol=1e-4, atol=1e-4)


def test_one_distillation_step(vits, dinov2_stats):
    bb = vits("dinov2_vitb14")
    start = distill.sfm(bb, dinov2_stats, ipc=1, steps=0, resolution=256, crop=224, progress=False)
    out = distill.sfm(bb, dinov2_stats, ipc=1, steps=1, resolution=256, crop=224, progress=False)
    assert out.images.shape == (2, 3, 256, 256) and out.labels.tolist() == [0, 1]
    assert torch.isfinite(out.images).all()
    hist = out.meta["loss_history"]
    assert len(hist) == 1 and 0.0 <= hist[0] <= 2.0
    assert out.meta["crop"] == 224 and out.meta["backbone"] == bb.name
    assert not torch.equal(out.images, start.images)  # the step moved the images


@pytest.mark.parametrize("short", list(EXPECTED))
def test_pretrained_checkpoints_fit_the_any_size_model(short):
    """The weights file loads unchanged: the any-size model has the tensors (names, shapes) of timm's
    default one, so pretrained=True loads exactly what it would load without dynamic_img_size."""
    import timm

    full = backbones.PAPER_BACKBONES[short]
    kw = {} if backbones._keeps_head(full) else {"num_classes": 0}
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        plain = timm.create_model(full, **kw).state_dict()
        dynamic = backbones._create(full, False, None).state_dict()
    assert {k: v.shape for k, v in plain.items()} == {k: v.shape for k, v in dynamic.items()}
