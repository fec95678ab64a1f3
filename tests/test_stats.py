"""Class statistics: means against a naive per-image loop, batch invariance, the file format and its
atomic save, compatibility checks, k-means, and the feature / statistics caches."""

import json

import numpy as np
import pytest
import safetensors.torch
import torch
from safetensors import safe_open

from sfm_lib import backbones, data, stats
from sfm_lib import features as features_mod
from sfm_lib.stats import ClassStats
from sfm_lib.utils import load_tensors

RES = 32


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def subset(fmnist_train):
    return data.subset_per_class(fmnist_train, 6, seed=0)


@pytest.fixture(scope="module")
def naive_features(lite0, subset):
    """Features image by image (one forward pass each), in float64, with their labels."""
    feats, labels = [], []
    with torch.no_grad():
        for j in range(len(subset)):
            img, label = subset[j]
            feats.append(lite0.features(img[None], RES)[0].double())
            labels.append(label)
    return torch.stack(feats), torch.tensor(labels)


@pytest.fixture(scope="module")
def subset_stats(lite0, subset):
    return stats.extract(lite0, subset, RES, batch_size=64, progress=False)


@pytest.fixture
def small_split(fmnist_test):
    """A whole (tiny) dataset split, so the caches (which skip subsets) apply: 3 images per class."""
    idx = torch.tensor(data.subset_per_class(fmnist_test, 3).indices)
    ds = data.TensorImageDataset(fmnist_test.images[idx], fmnist_test.targets[idx], fmnist_test.classes, "fm_tiny")
    ds.split = "test"
    return ds


# ------------------------------------------------------------------------------------------------ means
def test_means_match_naive_loop(subset_stats, naive_features, subset):
    feats, labels = naive_features
    assert subset_stats.means.shape == (10, 1280) and subset_stats.means.dtype == torch.float64
    ref = torch.stack([feats[labels == c].sum(0) / (labels == c).sum() for c in range(10)])
    # float32 features from batches of 64 vs one image at a time: equal up to float32 rounding.
    torch.testing.assert_close(subset_stats.means, ref, rtol=1e-5, atol=1e-5)
    assert subset_stats.counts.tolist() == [6] * 10
    assert subset_stats.classes == subset.classes
    assert subset_stats.num_classes == 10 and subset_stats.feature_dim == 1280
    assert subset_stats.centres is None
    # The classes really differ (the check above is not comparing ten copies of one vector).
    assert (subset_stats.means[0] - subset_stats.means[1]).abs().max() > 1e-2


def test_meta(subset_stats):
    meta = subset_stats.meta
    assert meta["backbone"] == "effnet_lite0"
    assert meta["feature_dim"] == 1280
    assert meta["resolution"] == RES
    assert meta["dataset"] == "fashion_mnist"
    assert meta["num_images"] == 60
    assert meta["kmeans_k"] == 0


def test_batch_size_invariance(lite0, subset, subset_stats):
    other = stats.extract(lite0, subset, RES, batch_size=7, progress=False)
    torch.testing.assert_close(other.means, subset_stats.means, rtol=1e-5, atol=1e-5)
    assert torch.equal(other.counts, subset_stats.counts)


class _PixelMean(torch.nn.Module):
    """A stand-in "backbone": the per-channel mean of the (normalised) input, 3 features."""

    num_features = 3

    def forward(self, x):
        return x.mean(dim=(2, 3))


def test_means_accumulate_in_float64():
    # 20,000 features per class: a float32 running sum would be off by ~1e-6 relative, float64 is exact
    # to ~1e-13. The reference sums the same float32 features in float64 with numpy.
    g = torch.Generator().manual_seed(5)
    images = torch.randint(0, 256, (40000, 2, 2), dtype=torch.uint8, generator=g)
    targets = torch.randint(0, 2, (40000,), generator=g)
    ds = data.TensorImageDataset(images, targets, ["a", "b"], "pixels")
    fake = backbones.Backbone(_PixelMean(), "pixel_mean", (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), torch.device("cpu"))
    st = stats.extract(fake, ds, 2, batch_size=40000, progress=False)
    feats32 = (images.float() / 255.0).mean(dim=(1, 2)).numpy()  # grey: all 3 channels alike
    y = targets.numpy()
    for c in range(2):
        ref = feats32[y == c].astype(np.float64).sum() / (y == c).sum()
        assert st.counts[c] == (y == c).sum()
        torch.testing.assert_close(st.means[c], torch.full((3,), ref, dtype=torch.float64), rtol=1e-12, atol=0)


def test_empty_class_raises(lite0, fmnist_test):
    keep = torch.nonzero(fmnist_test.targets[:16] != 3).flatten()
    ds = data.TensorImageDataset(fmnist_test.images[keep], fmnist_test.targets[keep], fmnist_test.classes, "no3")
    with pytest.raises(ValueError, match="Dress"):
        stats.extract(lite0, ds, RES, progress=False)


# --------------------------------------------------------------------------------------------- the file
def test_save_load_round_trip(tmp_path, subset_stats):
    centres = torch.randn(10, 2, 1280, generator=torch.Generator().manual_seed(0))
    original = ClassStats(subset_stats.means, subset_stats.counts, subset_stats.classes,
                          dict(subset_stats.meta), centres)
    path = tmp_path / "sub" / "stats.safetensors"
    original.save(path)
    back = ClassStats.load(path)
    assert torch.equal(back.means, original.means) and back.means.dtype == torch.float64
    assert torch.equal(back.counts, original.counts)
    assert torch.equal(back.centres, centres)
    assert back.classes == original.classes
    assert back.meta == original.meta
    # Independently: a plain safetensors file with the documented tensor names and shapes.
    with safe_open(str(path), framework="pt") as f:
        assert set(f.keys()) == {"means", "counts", "centres"}
        assert f.get_slice("means").get_shape() == [10, 1280]
        assert f.get_slice("counts").get_shape() == [10]
        assert torch.equal(f.get_tensor("means"), original.means)
        header = json.loads(f.metadata()["sfm_lib"])
    assert header["classes"] == original.classes and header["backbone"] == "effnet_lite0"


def test_save_without_centres(tmp_path, subset_stats):
    path = tmp_path / "s.safetensors"
    subset_stats.save(path)
    with safe_open(str(path), framework="pt") as f:
        assert set(f.keys()) == {"means", "counts"}
    assert ClassStats.load(path).centres is None


def test_save_is_atomic(tmp_path, subset_stats, monkeypatch):
    path = tmp_path / "stats.safetensors"
    subset_stats.save(path)
    before = path.read_bytes()

    def broken_save_file(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken_save_file)
    other = ClassStats(subset_stats.means * 2, subset_stats.counts, subset_stats.classes, dict(subset_stats.meta))
    with pytest.raises(OSError, match="disk full"):
        other.save(path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stats.safetensors"]
    monkeypatch.undo()
    assert torch.equal(ClassStats.load(path).means, subset_stats.means)


def test_load_rejects_other_files(tmp_path):
    plain = tmp_path / "plain.safetensors"
    safetensors.torch.save_file({"x": torch.zeros(3)}, str(plain))
    with pytest.raises(ValueError, match="class-statistics"):
        ClassStats.load(plain)
    feats = tmp_path / "features.safetensors"
    features_mod.store(feats, torch.zeros(4, 8), torch.zeros(4, dtype=torch.long), backbone="effnet_lite0")
    with pytest.raises(ValueError, match="class-statistics"):
        ClassStats.load(feats)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\xff\x00 this is not safetensors at all" * 10)
    with pytest.raises(ValueError, match="garbage.safetensors"):
        ClassStats.load(garbage)
    with pytest.raises(FileNotFoundError):
        ClassStats.load(tmp_path / "missing.safetensors")


# ------------------------------------------------------------------------------------------ compatibility
def test_check_compatible(subset_stats, lite0):
    subset_stats.check_compatible(lite0)  # same backbone: no error
    other = ClassStats(subset_stats.means, subset_stats.counts, subset_stats.classes,
                       {**subset_stats.meta, "backbone": "effnet_lite1"})
    with pytest.raises(ValueError) as info:
        other.check_compatible(lite0)
    assert "effnet_lite1" in str(info.value) and "effnet_lite0" in str(info.value)
    narrow = ClassStats(torch.zeros(10, 100, dtype=torch.float64), subset_stats.counts, subset_stats.classes,
                        {"backbone": "effnet_lite0"})
    with pytest.raises(ValueError, match="100"):
        narrow.check_compatible(lite0)
    nameless = ClassStats(torch.zeros(10, 100, dtype=torch.float64), subset_stats.counts, subset_stats.classes)
    with pytest.raises(ValueError, match="feature dim"):
        nameless.check_compatible(lite0)


# ------------------------------------------------------------------------------------------------ k-means
def test_kmeans_recovers_blobs_largest_first():
    g = torch.Generator().manual_seed(0)
    true = torch.tensor([[0.0, 0.0, 0.0, 0.0], [10.0, 0.0, -5.0, 2.0], [-8.0, 6.0, 3.0, -4.0]])
    sizes = [30, 100, 60]  # the largest blob is not listed first
    blobs = [true[i] + 0.2 * torch.randn(n, 4, generator=g) for i, n in enumerate(sizes)]
    x = torch.cat(blobs)[torch.randperm(sum(sizes), generator=g)]
    centres = stats.kmeans(x, 3, generator=torch.Generator().manual_seed(1))
    assert centres.shape == (3, 4)
    order = [1, 2, 0]  # by size, descending
    for got, i in zip(centres, order):
        assert (got - true[i]).norm() < 0.1
        torch.testing.assert_close(got, blobs[i].mean(0), rtol=0, atol=1e-4)  # exactly the blob's mean


def test_kmeans_needs_enough_points():
    with pytest.raises(ValueError, match="k=3"):
        stats.kmeans(torch.randn(2, 5), 3)
    assert stats.kmeans(torch.randn(3, 5), 3).shape == (3, 5)


def test_extract_with_kmeans(lite0, subset, naive_features):
    # 6 images per class and a sample of 2000: every feature is in the sample, so the centres must be a
    # fixed point of Lloyd's algorithm on the class's own features. Checked independently: the naive
    # per-image features in float64, nearest-centre cells by a loop, each centre the mean of its cell.
    st = stats.extract(lite0, subset, RES, batch_size=4, kmeans_k=2, progress=False)
    feats, labels = naive_features
    assert st.centres.shape == (10, 2, 1280) and st.meta["kmeans_k"] == 2
    for c in range(10):
        fc = feats[labels == c]
        centres = st.centres[c].double()
        cells = [[], []]
        for row in fc:
            d = [float(((row - z) ** 2).sum()) for z in centres]
            cells[d.index(min(d))].append(row)
        assert all(len(cell) > 0 for cell in cells), f"class {c}: an empty cluster"
        assert len(cells[0]) >= len(cells[1]), "largest cluster first"
        for z, cell in zip(centres, cells):
            torch.testing.assert_close(z, torch.stack(cell).mean(0), rtol=1e-4, atol=1e-4)
        # Two different centres (the class mean repeated would fail here and above), and a better fit
        # than the mean alone.
        assert (centres[0] - centres[1]).norm() > 1e-2 * fc.norm(dim=1).mean()
        sse_centres = sum(float(((torch.stack(cell) - z) ** 2).sum()) for z, cell in zip(centres, cells))
        sse_mean = float(((fc - fc.mean(0)) ** 2).sum())
        assert sse_centres < 0.95 * sse_mean


def test_reservoir_is_a_uniform_sample():
    # n = 12 rows of one class offered in batches of 5 (mixed with another class), sample size 4: every
    # row must be kept with probability 4/12. Chi-square over 3000 independent runs.
    n, size, runs = 12, 4, 3000
    g = torch.Generator().manual_seed(0)
    kept = torch.zeros(n)
    for _ in range(runs):
        res = stats.Reservoir(2, size, 1, g)
        rows = torch.arange(n, dtype=torch.float32)[:, None]
        for s in range(0, n, 5):
            batch = rows[s:s + 5]
            res.add(torch.cat([batch, -batch]), torch.cat([torch.zeros(len(batch)), torch.ones(len(batch))]).long())
        got = res.rows(0).flatten().long()
        assert len(got) == size and len(set(got.tolist())) == size
        kept[got] += 1
        assert len(res.rows(1)) == size  # the other class is sampled too
    expected = runs * size / n
    chi2 = float(((kept - expected) ** 2 / expected).sum())
    # 11 degrees of freedom: P(chi2 > 31.3) = 0.001. A sampler that keeps the first or last rows fails.
    assert chi2 < 31.3, (chi2, kept.tolist())
    # The pairs are uniform too (not only the margins): rows 0 and 1 together with probability
    # (4·3)/(12·11) = 1/11, within 4 standard errors over fresh runs.
    both = 0
    for _ in range(runs):
        res = stats.Reservoir(1, size, 1, g)
        for s in range(0, n, 5):
            res.add(torch.arange(s, min(s + 5, n), dtype=torch.float32)[:, None], torch.zeros(min(5, n - s)).long())
        got = set(res.rows(0).flatten().long().tolist())
        both += {0, 1} <= got
    p = 1 / 11
    assert abs(both / runs - p) < 4 * (p * (1 - p) / runs) ** 0.5


def test_reservoir_is_bounded_and_keeps_small_classes_whole():
    g = torch.Generator().manual_seed(1)
    res = stats.Reservoir(3, 50, 8, g)
    x = torch.randn(3, 8)
    res.add(x, torch.tensor([0, 1, 1]))
    assert torch.equal(res.rows(0), x[:1]) and torch.equal(res.rows(1), x[1:])
    assert res.rows(2).shape == (0, 8)
    shapes = (res.buf.shape, res.keys.shape)
    for _ in range(40):  # 10,000 rows of class 0
        res.add(torch.randn(250, 8, generator=g), torch.zeros(250, dtype=torch.long))
    assert (res.buf.shape, res.keys.shape) == shapes and res.rows(0).shape == (50, 8)
    assert res.rows(1).shape == (2, 8)


def test_kmeans_sample_is_smaller_than_the_class(lite0, subset):
    # Sample 3 of 6 rows per class: the centres are averages of the class's features, and the pass runs.
    st = stats.extract(lite0, subset, RES, batch_size=8, kmeans_k=2, kmeans_sample=3, progress=False)
    assert st.centres.shape == (10, 2, 1280) and torch.isfinite(st.centres).all()


# ------------------------------------------------------------------------------------ checkpoints, resume
class _Stop(Exception):
    pass


def _interrupted(monkeypatch, after: int):
    """Make the feature stream raise after ``after`` batches (a crash in the middle of the pass)."""
    real = features_mod.stream

    def stream(*args, **kwargs):
        for i, batch in enumerate(real(*args, **kwargs)):
            if i == after:
                raise _Stop
            yield batch

    monkeypatch.setattr(features_mod, "stream", stream)


@pytest.mark.parametrize("kmeans_k", [0, 2])
def test_resumed_pass_equals_an_uninterrupted_one(lite0, subset, tmp_path, monkeypatch, kmeans_k):
    kw = dict(batch_size=8, progress=False, kmeans_k=kmeans_k, kmeans_sample=4, checkpoint_every=2)
    full = stats.extract(lite0, subset, RES, checkpoint=tmp_path / "full.ckpt", **kw)
    ckpt = tmp_path / "part.ckpt"
    with monkeypatch.context() as m:
        _interrupted(m, after=5)  # checkpoints after batches 2 and 4; batch 5 is lost and recomputed
        with pytest.raises(_Stop):
            stats.extract(lite0, subset, RES, checkpoint=ckpt, **kw)
    _, saved = load_tensors(ckpt)
    assert saved["position"] == 32
    resumed = stats.extract(lite0, subset, RES, checkpoint=ckpt, resume=True, **kw)
    assert torch.equal(resumed.means, full.means) and torch.equal(resumed.counts, full.counts)
    if kmeans_k:
        assert torch.equal(resumed.centres, full.centres)
    assert resumed.meta == full.meta
    # A finished pass resumes to the same result; a fresh pass never overwrites the checkpoint.
    again = stats.extract(lite0, subset, RES, checkpoint=ckpt, resume=True, **kw)
    assert torch.equal(again.means, full.means)
    with pytest.raises(FileExistsError, match="resume"):
        stats.extract(lite0, subset, RES, checkpoint=ckpt, **kw)


def test_resume_refuses_another_pass(lite0, subset, fmnist_train, tmp_path, monkeypatch):
    ckpt = tmp_path / "c.ckpt"
    with monkeypatch.context() as m:
        _interrupted(m, after=3)
        with pytest.raises(_Stop):
            stats.extract(lite0, subset, RES, batch_size=8, progress=False, checkpoint=ckpt, checkpoint_every=1)
    kw = dict(progress=False, checkpoint=ckpt, resume=True)
    with pytest.raises(ValueError, match=r"resolution: 32 in the checkpoint, 48 now"):
        stats.extract(lite0, subset, 48, batch_size=8, **kw)
    with pytest.raises(ValueError, match=r"batch_size: 8 in the checkpoint, 16 now"):
        stats.extract(lite0, subset, RES, batch_size=16, **kw)
    lite1 = backbones.load("effnet_lite1", pretrained=False)
    with pytest.raises(ValueError, match=r"backbone: 'effnet_lite0' in the checkpoint, 'effnet_lite1' now"):
        stats.extract(lite1, subset, RES, batch_size=8, **kw)
    other = data.TensorImageDataset(fmnist_train.images[:60], fmnist_train.targets[:60], fmnist_train.classes,
                                     "other_set")
    with pytest.raises(ValueError, match=r"dataset: 'fashion_mnist' in the checkpoint, 'other_set' now"):
        stats.extract(lite0, other, RES, batch_size=8, **kw)
    shuffled = data.subset_per_class(fmnist_train, 6, seed=1)  # same name, other images before the position
    with pytest.raises(ValueError, match="first 24 items"):
        stats.extract(lite0, shuffled, RES, batch_size=8, **kw)
    with pytest.raises(ValueError, match="checkpoint path"):
        stats.extract(lite0, subset, RES, progress=False, resume=True)


# ------------------------------------------------------------------------------------------------- caches
def test_cache_features_then_compute_uses_cache(lite0, small_split, fresh_cache, monkeypatch):
    st = stats.extract(lite0, small_split, RES, batch_size=16, cache_features=True, progress=False)
    path = features_mod.cache_path(lite0, small_split, RES)
    assert path.is_file() and fresh_cache in path.parents

    def no_forward(self, x):
        raise AssertionError("the backbone ran although the features are cached")

    monkeypatch.setattr(backbones.Backbone, "__call__", no_forward)
    feats, labels = features_mod.compute(lite0, small_split, RES, progress=False)
    assert feats.shape == (30, 1280) and feats.dtype == torch.float32
    assert torch.equal(labels, small_split.targets)
    # Stored in float16: every value is representable in half precision.
    assert torch.equal(feats.half().float(), feats)
    per_class = torch.stack([feats[labels == c].double().mean(0) for c in range(10)])
    scale = st.means.abs().max()
    torch.testing.assert_close(per_class, st.means, rtol=1e-3, atol=float(scale) * 1e-3)
    # And the cache really is consulted: without it, the patched backbone is called.
    with pytest.raises(AssertionError, match="cached"):
        features_mod.compute(lite0, small_split, RES, cache=False, progress=False)


def test_cached_extract_reuses_file(lite0, small_split, fresh_cache, monkeypatch):
    first = stats.cached_extract(lite0, small_split, RES, progress=False)
    files = list((fresh_cache / "stats").iterdir())
    assert len(files) == 1 and files[0].name == "fm_tiny-test-30-effnet_lite0-32.safetensors"

    def no_extract(*args, **kwargs):
        raise AssertionError("extract ran again")

    monkeypatch.setattr(stats, "extract", no_extract)
    second = stats.cached_extract(lite0, small_split, RES, progress=False)
    assert torch.equal(second.means, first.means) and torch.equal(second.counts, first.counts)
    assert second.classes == first.classes and second.meta == first.meta
    # Another k-means setting, or a subset, is not served from that file.
    with pytest.raises(AssertionError, match="again"):
        stats.cached_extract(lite0, small_split, RES, kmeans_k=2, progress=False)
    with pytest.raises(AssertionError, match="again"):
        stats.cached_extract(lite0, data.subset_per_class(small_split, 2), RES, progress=False)


def test_saved_files_get_the_usual_permissions(tmp_path):
    import os

    from sfm_lib.utils import save_tensors

    old = os.umask(0o022)
    try:
        save_tensors(tmp_path / "p.safetensors", {"a": torch.zeros(2)}, {})
    finally:
        os.umask(old)
    assert (tmp_path / "p.safetensors").stat().st_mode & 0o777 == 0o644
