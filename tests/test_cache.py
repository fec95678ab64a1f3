"""Cache keys (sfm_lib.cache): every input a result depends on changes the key; equal inputs share it."""

import pytest
import torch

from sfm_lib import backbones, cache, data, experiments, features
from sfm_lib.stats import ClassStats

pytestmark = pytest.mark.usefixtures("single_thread")

RES = 32


def _tiny(name: str = "rand4", seed: int = 0) -> data.TensorImageDataset:
    g = torch.Generator().manual_seed(seed)
    ds = data.TensorImageDataset(torch.randint(0, 256, (4, 16, 16, 3), generator=g, dtype=torch.uint8),
                                 [0, 1, 0, 1], ["a", "b"], name)
    ds.split = "train"
    return ds


# ------------------------------------------------------------------------------------------------ tensors
def test_tensors_are_keyed_by_their_bytes_not_their_printed_form():
    a = torch.rand(3, 40, 40, generator=torch.Generator().manual_seed(1))
    b = a.clone()
    b[1, 20, 20] += 1e-3  # one pixel, in the middle: str() of both elides it
    assert str(a) == str(b)
    assert cache.key("distilled", init=a) != cache.key("distilled", init=b)
    assert cache.key("distilled", init=a) == cache.key("distilled", init=a.clone())
    # layout does not matter, dtype and shape do
    assert cache.tensor_identity(a.transpose(1, 2).contiguous().transpose(1, 2)) == cache.tensor_identity(a)
    assert cache.tensor_identity(torch.zeros(4)) != cache.tensor_identity(torch.zeros(2, dtype=torch.float64))
    assert cache.tensor_identity(torch.zeros(4)) != cache.tensor_identity(torch.zeros(2, 2))
    assert cache.tensor_identity(torch.zeros(2, dtype=torch.bfloat16))["dtype"] == "bfloat16"


def test_start_images_differing_in_one_pixel_get_different_distilled_entries(lite0, fresh_cache):
    C = 2
    st = ClassStats(torch.randn(C, lite0.feature_dim, dtype=torch.float64, generator=torch.Generator().manual_seed(2)),
                    torch.ones(C, dtype=torch.long), ["a", "b"], {"backbone": lite0.name, "resolution": RES})
    ctx = experiments.Context(_tiny(), _tiny(), lite0, st, RES)
    start = torch.full((C, 3, RES, RES), 0.5)
    other = start.clone()
    other[1, 0, 7, 9] = 0.9
    first = experiments.distilled(ctx, init=start, steps=0)
    second = experiments.distilled(ctx, init=other, steps=0)
    assert len(list((fresh_cache / "distilled").iterdir())) == 2
    assert second.images[1, 0, 7, 9] > first.images[1, 0, 7, 9] + 0.3
    assert first.meta["init"] == "images"
    # the same call is served from its file
    again = experiments.distilled(ctx, init=other.clone(), steps=0)
    assert torch.equal(again.images, second.images) and len(list((fresh_cache / "distilled").iterdir())) == 2


# ------------------------------------------------------------------------------------------------ backbone
def test_random_weights_never_read_a_pretrained_entry(lite0, fresh_cache):
    ds = _tiny()
    pre, _ = features.compute(lite0, ds, RES, progress=False)
    torch.manual_seed(3)
    rand = backbones.load("effnet_lite0", pretrained=False)
    assert rand.name == lite0.name and not rand.pretrained
    assert features.cache_path(rand, ds, RES) != features.cache_path(lite0, ds, RES)
    feats, _ = features.compute(rand, ds, RES, progress=False)
    assert not torch.allclose(feats, pre)
    assert len(list((fresh_cache / "features").iterdir())) == 2
    # two random initialisations are two different backbones
    torch.manual_seed(4)
    rand2 = backbones.load("effnet_lite0", pretrained=False)
    assert features.cache_path(rand2, ds, RES) != features.cache_path(rand, ds, RES)


def test_precision_and_version_enter_the_key(lite0, monkeypatch):
    ds = _tiny()
    cpu = features.cache_path(lite0, ds, RES)
    assert cpu == features.cache_path(lite0, ds, RES)
    assert cache.backbone_identity(lite0)["precision"] == "fp32"
    monkeypatch.setattr(backbones.Backbone, "precision", property(lambda self: "bf16"))
    assert features.cache_path(lite0, ds, RES) != cpu
    monkeypatch.undo()
    monkeypatch.setitem(cache.VERSIONS, "features", cache.VERSIONS["features"] + 1)
    assert features.cache_path(lite0, ds, RES) != cpu


# ------------------------------------------------------------------------------------------------ datasets
def test_tensor_datasets_and_subsets_are_keyed_by_content(lite0):
    a, b = _tiny(seed=0), _tiny(seed=1)  # same name, split and size, other pixels
    assert features.cache_path(lite0, a, RES) != features.cache_path(lite0, b, RES)
    assert features.cache_path(lite0, a, RES) == features.cache_path(lite0, _tiny(seed=0), RES)
    assert cache.describe(data.subset(a, [0, 1])) != cache.describe(data.subset(a, [0, 2]))
    assert cache.describe(data.subset(a, [0, 1])) != cache.describe(data.subset(b, [0, 1]))


def _write_png(path, side: int, value: int) -> None:
    import numpy as np
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(path)


def test_image_folder_key_follows_its_file_list(lite0, tmp_path):
    root = tmp_path / "folder"
    for cls in ("cat", "dog"):
        for i in range(2):
            _write_png(root / "train" / cls / f"{i}.png", 12, i)
    (root / "test").mkdir()

    def path():
        return features.cache_path(lite0, data.load(f"imagefolder:{root}", "train"), RES)

    first = path()
    assert first == path()  # stable while nothing changes
    _write_png(root / "train" / "dog" / "2.png", 12, 5)
    added = path()
    assert added != first
    _write_png(root / "train" / "cat" / "0.png", 20, 7)  # same name, other image (other size)
    changed = path()
    assert changed not in (first, added)
    (root / "train" / "dog" / "2.png").unlink()
    assert path() not in (first, added, changed)


def test_values_without_a_faithful_description_are_refused():
    with pytest.raises(TypeError, match="cannot make a cache key from a function"):
        cache.key("stats", settings={"hook": lambda x: x})
    with pytest.raises(ValueError, match="unknown cache kind"):
        cache.key("nope")
