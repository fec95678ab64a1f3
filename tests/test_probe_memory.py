"""Memory of the probes on whole training splits: no float64 copy of every feature (at ImageNet-1k scale,
1.28 M × 768 features are 3.9 GB in float32, 7.9 GB in float64), and features.compute keeps only one
float16 and the float32 result at full size. Checked by recording every tensor the ops create."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sfm_lib import data, evaluate, features
from sfm_lib.backbones import Backbone
from sfm_lib.distill import DistilledSet

pytestmark = pytest.mark.usefixtures("single_thread")

N, SIDE, RES = 300, 8, 8


class _TinyNet(torch.nn.Module):
    num_features = 24

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 12, 3, stride=2)

    def forward(self, x):
        h = self.conv(x).relu()
        return torch.cat([h.mean((2, 3)), h.amax((2, 3))], 1)


class _Allocations(TorchDispatchMode):
    """(op, dtype) of every new floating-point tensor of ≥ n rows of ``dim`` features (outputs that share
    an input's storage, i.e. views and detached aliases, left out)."""

    def __init__(self, n: int, dim: int):
        super().__init__()
        self.n, self.dim, self.big = n, dim, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
        for o in out if isinstance(out, (tuple, list)) else [out]:
            if (isinstance(o, torch.Tensor) and o.is_floating_point() and o.ndim >= 2 and o.shape[-1] == self.dim
                    and o.numel() >= self.n * self.dim and o.untyped_storage().data_ptr() not in inputs):
                self.big.append((str(func), o.dtype))
        return out


@pytest.fixture(scope="module")
def setup():
    bb = Backbone(_TinyNet(), "tiny_probe_memory", (0.5,) * 3, (0.5,) * 3, torch.device("cpu"))
    g = torch.Generator().manual_seed(1)

    def split(n, name):
        labels = torch.arange(n) % 3
        images = (torch.rand(n, SIDE, SIDE, 3, generator=g) * 60 + 60 * labels[:, None, None, None]).to(torch.uint8)
        ds = data.TensorImageDataset(images, labels, ["a", "b", "c"], name)
        ds.split = "train"
        return ds

    return bb, split(N, "mem_train"), split(30, "mem_test")


def test_compute_rounds_batch_by_batch_to_the_same_numbers(setup, fresh_cache):
    bb, train, _ = setup
    with _Allocations(N, bb.feature_dim) as rec:
        x, y = features.compute(bb, train, RES, batch_size=64, progress=False)
    with torch.no_grad():  # the former way: all float32 features, then through float16
        ref = torch.cat([bb.features(train.batch(torch.arange(s, min(s + 64, N)))[0], RES)
                         for s in range(0, N, 64)]).half().float()
    assert torch.equal(x, ref) and torch.equal(y, train.targets)
    assert sorted(str(d) for _, d in rec.big) == ["torch.float16", "torch.float32"], rec.big
    cached, _ = features.compute(bb, train, RES, progress=False)  # from the file: the same numbers
    assert torch.equal(cached, x)


def test_probes_make_no_float64_copy_of_the_features(setup, fresh_cache, monkeypatch):
    bb, train, test = setup
    monkeypatch.setattr(evaluate, "_ROWS", 100)  # float64 class sums in blocks smaller than the split
    features.compute(bb, train, RES, progress=False)  # cached: the probes below read it
    with _Allocations(N, bb.feature_dim) as rec:
        full = evaluate.full_data_probe(bb, train, test, RES, epochs=2, seeds=(0, 1), batch_size=50)
        cent = evaluate.centroid_subset(bb, train, RES, ipc=2)
        distilled = DistilledSet(torch.rand(3, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(2)),
                                 torch.arange(3), ["a", "b", "c"], {"method": "sfm"})
        near = evaluate.neighbor_subset(bb, train, distilled, RES)
    assert not [r for r in rec.big if r[1] == torch.float64], rec.big
    assert len(full.top1) == 2 and len(cent) == 6 and len(near) == 3


def test_centroids_and_neighbours_match_float64_reference(setup, fresh_cache):
    bb, train, _ = setup
    x, y = features.compute(bb, train, RES, progress=False)
    x64 = x.double()
    means = torch.stack([x64[y == c].mean(0) for c in range(3)])
    cent = evaluate.centroid_subset(bb, train, RES, ipc=2)
    for c in range(3):
        idx = torch.nonzero(y == c).flatten()
        best = idx[((x64[idx] - means[c]) ** 2).sum(1).argsort()[:2]]
        assert cent.indices[2 * c:2 * c + 2] == best.tolist()
    distilled = DistilledSet(train.batch(torch.tensor([5, 7, 9]))[0], train.targets[[5, 7, 9]], ["a", "b", "c"], {})
    near = evaluate.neighbor_subset(bb, train, distilled, RES)
    assert near.indices == [5, 7, 9]  # a real image is its own nearest neighbour


def test_augmented_full_data_probe_trains_on_the_cached_views(setup, fresh_cache):
    """views=K: the training features are view_features of the whole split (view 0 the test pass, the rest
    flip + crop with seed 0), stored once as float16 and read back identical; the probe trained on them is
    _train_probes on those [N, K, D] rows, and K = 1 is the un-augmented feature cache."""
    bb, train, test = setup
    images, labels = train.batch(torch.arange(N))
    want = evaluate.view_features(bb, images, RES, 3, 0).half().float()
    got, y = evaluate.full_view_features(bb, train, RES, 3)
    assert torch.equal(got, want) and torch.equal(y, labels) and not torch.equal(got[:, 1], got[:, 0])
    again, _ = evaluate.full_view_features(bb, train, RES, 3)  # the cache file: the same numbers
    assert torch.equal(again, got)
    plain, _ = features.compute(bb, train, RES, progress=False)
    assert torch.equal(evaluate.full_view_features(bb, train, RES, 1)[0][:, 0], plain)
    r = evaluate.full_data_probe(bb, train, test, RES, epochs=2, seeds=(0, 1), batch_size=50, views=3)
    W, b = evaluate._train_probes(got[None].expand(2, -1, -1, -1), y[None].expand(2, -1), 3, epochs=2,
                                  batch_size=50, lr=1e-3 * 50 / 256, seeds=(0, 1))
    tx, ty = features.compute(bb, test, RES, progress=False)
    assert r.top1 == evaluate.accuracies(W, b, tx, ty)
    assert r.meta["views"] == 3 and r.meta["augmented"] is True
    with pytest.raises(ValueError, match="views must be"):
        evaluate.full_data_probe(bb, train, test, RES, epochs=1, seeds=(0,), views=0)
