"""Linear-probe evaluation: the training loop against hand-written Adam, reproducibility, baselines' picks."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from sfm_lib import features
from sfm_lib.backbones import Backbone
from sfm_lib.data import TensorImageDataset
from sfm_lib.distill import DistilledSet
from sfm_lib.evaluate import (
    BASELINES,
    PAPER_PROBE_SEEDS,
    ProbeResult,
    _train_probes,
    accuracy,
    baseline,
    centroid_subset,
    cosine_lr,
    cross_backbone,
    gain_over_random,
    linear_probe,
    neighbor_subset,
    random_subset,
    results_table,
    train_probe,
    view_features,
)
from sfm_lib.stats import ClassStats
from toydata import toy_dataset

C, PER_CLASS, SIDE, RES = 4, 5, 16, 32
TINY = dict(epochs=20, views=3)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class _TinyNet(torch.nn.Module):
    """A random two-layer CNN (32 features): a stand-in backbone that runs in milliseconds."""

    num_features = 32

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, stride=2), torch.nn.ReLU(),
                                        torch.nn.Conv2d(16, 16, 3, stride=2), torch.nn.ReLU())

    def forward(self, x):
        h = self.body(x)
        return torch.cat([h.mean((2, 3)), h.amax((2, 3))], 1)


@pytest.fixture(scope="module")
def backbone():
    return Backbone(_TinyNet(), "tiny_cnn", (0.5,) * 3, (0.5,) * 3, torch.device("cpu"))


def _dataset(split: str, per_class: int = PER_CLASS, seed: int = 0) -> TensorImageDataset:
    return toy_dataset(split, per_class, seed, classes=C, side=SIDE)


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SFM_CACHE", str(tmp_path))
    return tmp_path


@pytest.fixture()
def splits(cache):
    return _dataset("train", seed=0), _dataset("test", per_class=8, seed=1)


# ----------------------------------------------------------------------------------- training loop
def test_cosine_lr_formula_and_final_zero():
    base, T = 0.3, 7
    for t in (0, 1, 3, 6):
        assert cosine_lr(t, T, base) == pytest.approx(base * (1 + math.cos(math.pi * t / T)) / 2, rel=1e-12)
    assert cosine_lr(0, T, base) == base
    assert cosine_lr(T, T, base) == pytest.approx(0.0, abs=1e-15)


def _hand_adam(X, y, W, b, lrs, betas=(0.9, 0.999), eps=1e-8):
    """Full-batch softmax cross-entropy + Adam written out in float64 (W [C,D], b [C])."""
    m = [torch.zeros_like(W), torch.zeros_like(b)]
    v = [torch.zeros_like(W), torch.zeros_like(b)]
    onehot = F.one_hot(y, W.shape[0]).double()
    for t, lr in enumerate(lrs, start=1):
        p = torch.softmax(X @ W.T + b, 1)
        g = (p - onehot) / len(y)               # ∂ mean CE / ∂ logits
        grads = [g.T @ X, g.sum(0)]
        params = [W, b]
        for k in range(2):
            m[k] = betas[0] * m[k] + (1 - betas[0]) * grads[k]
            v[k] = betas[1] * v[k] + (1 - betas[1]) * grads[k] ** 2
            m_hat, v_hat = m[k] / (1 - betas[0] ** t), v[k] / (1 - betas[1] ** t)
            params[k] = params[k] - lr * m_hat / (v_hat.sqrt() + eps)
        W, b = params
    return W, b


def test_train_probe_equals_hand_written_adam_with_cosine_lr():
    g = _gen(1)
    N, D, Cn, epochs, lr = 6, 4, 3, 3, 0.05
    X = torch.randn(N, D, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    W0 = 0.3 * torch.randn(Cn, D, generator=g, dtype=torch.float64)
    b0 = 0.1 * torch.randn(Cn, generator=g, dtype=torch.float64)
    # batch = N: one step per epoch, T = 3 steps at lr·(1 + cos(πt/3))/2, t = 0, 1, 2
    W, b = train_probe(X, y, Cn, epochs=epochs, batch_size=N, lr=lr, seed=0, init=(W0, b0))
    lrs = [lr * (1 + math.cos(math.pi * t / epochs)) / 2 for t in range(epochs)]
    W_ref, b_ref = _hand_adam(X, y, W0.clone(), b0.clone(), lrs)
    assert W.dtype == torch.float64
    torch.testing.assert_close(W, W_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(b, b_ref, rtol=1e-10, atol=1e-12)


def test_default_init_is_the_released_head_normal_001_zero_bias():
    X, y = torch.randn(5, 6), torch.tensor([0, 1, 0, 1, 0])
    W, b = train_probe(X, y, 2, epochs=1, lr=0.0, seed=7)  # lr 0: the init comes back unchanged
    expected = 0.01 * torch.randn(2, 6, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    torch.testing.assert_close(W, expected.float())
    assert torch.equal(b, torch.zeros(2))
    W8, _ = train_probe(X, y, 2, epochs=1, lr=0.0, seed=8)
    assert not torch.equal(W8, W), "each seed draws its own head"
    big = train_probe(torch.randn(5, 4000), y, 2, epochs=1, lr=0.0, seed=1)[0]
    assert float(big.std()) == pytest.approx(0.01, rel=0.05)


def test_separable_features_reach_full_accuracy():
    g = _gen(2)
    D, K, n = 16, 3, 10
    centres = 4.0 * torch.randn(C, D, generator=g)
    y = torch.arange(C).repeat_interleave(n)
    X = centres[y][:, None, :] + 0.3 * torch.randn(len(y), K, D, generator=g)  # K noisy "views" per point
    W, b = train_probe(X, y, C, epochs=50, batch_size=8, lr=0.05, seed=0)
    test_y = torch.arange(C).repeat(50)
    test_x = centres[test_y] + 0.3 * torch.randn(len(test_y), D, generator=g)
    assert accuracy(W, b, test_x, test_y) == 100.0
    assert accuracy(W, b, X[:, 0], y) == 100.0


def test_batched_seeds_equal_separate_runs():
    g = _gen(3)
    feats = torch.randn(2, 12, 4, 8, generator=g)
    labels = torch.randint(3, (2, 12), generator=g)
    W, b = _train_probes(feats, labels, 3, epochs=5, batch_size=5, lr=0.01, seeds=[4, 9])
    for s, seed in enumerate([4, 9]):
        Ws, bs = train_probe(feats[s], labels[s], 3, epochs=5, batch_size=5, lr=0.01, seed=seed)
        torch.testing.assert_close(W[s], Ws, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b[s], bs, rtol=1e-5, atol=1e-6)


def test_train_probe_rejects_bad_input():
    with pytest.raises(ValueError, match="labels"):
        train_probe(torch.randn(4, 3), torch.tensor([0, 1]), 2, epochs=1)
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        train_probe(torch.randn(2, 3), torch.tensor([0, 5]), 2, epochs=1)
    with pytest.raises(ValueError, match="epochs"):
        train_probe(torch.randn(2, 3), torch.tensor([0, 1]), 2, epochs=0)


# ----------------------------------------------------------------------------------------- results
def test_probe_result_sample_std_and_json():
    r = ProbeResult([50.0, 52.0, 54.0], [0, 1, 2], {"kind": "real"})
    assert r.top1_mean == pytest.approx(52.0) and r.top1_std == pytest.approx(2.0)  # ddof = 1
    assert ProbeResult([40.0], [0]).top1_std == 0.0
    d = json.loads(json.dumps(r.to_dict()))
    assert ProbeResult.from_dict(d) == r and d["top1_std"] == pytest.approx(2.0)


def test_population_std_is_numpys_default_and_the_paper_seeds():
    import numpy as np

    top1 = [61.2, 63.9, 60.4, 62.0, 64.5]
    r = ProbeResult(top1, list(PAPER_PROBE_SEEDS))
    assert PAPER_PROBE_SEEDS == (3407, 3408, 3409, 3410, 3411)
    assert r.top1_pstd == pytest.approx(float(np.std(top1)), rel=1e-12)            # ddof = 0
    assert r.top1_std == pytest.approx(float(np.std(top1, ddof=1)), rel=1e-12)
    assert r.std(0) == r.top1_pstd and r.to_dict()["top1_pstd"] == r.top1_pstd
    assert ProbeResult([40.0], [0]).top1_pstd == 0.0
    with pytest.raises(ValueError, match="ddof must be 1"):
        r.std(2)


def test_linear_probe_reproducible_and_seed_statistics(backbone, splits):
    train, test = splits
    a = linear_probe(backbone, train, test, RES, seeds=(0, 1), **TINY)
    b = linear_probe(backbone, train, test, RES, seeds=(0, 1), **TINY)
    one = linear_probe(backbone, train, test, RES, seeds=(1,), **TINY)
    assert a.top1 == b.top1 and len(a.top1) == 2
    assert all(0.0 <= t <= 100.0 for t in a.top1)
    assert a.top1_std == pytest.approx(abs(a.top1[0] - a.top1[1]) / math.sqrt(2))
    assert one.top1_std == 0.0
    torch.testing.assert_close(one.weights[0][0], a.weights[0][1], rtol=1e-4, atol=1e-5)  # batched = alone
    assert a.weights[0].shape == (2, C, backbone.feature_dim)
    assert a.meta["kind"] == "real" and a.meta["n_train"] == C * PER_CLASS and a.meta["views"] == 3
    assert a.meta["batch_size"] == 20 and a.meta["lr"] == pytest.approx(1e-3 * 20 / 256)
    json.dumps(a.to_dict())
    # the test features went to the on-disk cache
    assert features.cache_path(backbone, test, RES).is_file()


def test_linear_probe_on_distilled_set_and_class_mismatch(backbone, splits):
    train, test = splits
    images, labels = train.batch(torch.arange(0, len(train), PER_CLASS))
    ds = DistilledSet(images, labels, train.classes, {"backbone": "effnet_lite0", "method": "sfm", "ipc": 1})
    r = linear_probe(backbone, ds, test, RES, seeds=(0,), epochs=5, views=2)
    assert r.meta["kind"] == "distilled" and r.meta["distill_backbone"] == "effnet_lite0"
    assert r.meta["n_train"] == C and r.meta["batch_size"] == C
    wrong = DistilledSet(images, labels, ["a", "b"], {})
    with pytest.raises(ValueError, match="classes"):
        linear_probe(backbone, wrong, test, RES, seeds=(0,), epochs=5, views=2)
    with pytest.raises(ValueError, match="views"):
        linear_probe(backbone, ds, test, RES, seeds=(0,), epochs=5, views=0)
    with pytest.raises(ValueError, match="seeds"):
        linear_probe(backbone, ds, test, RES, seeds=(), epochs=5, views=2)
    with pytest.raises(ValueError, match="one per seed"):
        linear_probe(backbone, [ds, ds], test, RES, seeds=(0,), epochs=5, views=2)


def test_view_features_view0_is_test_preprocessing(backbone, splits):
    train, _ = splits
    images, _ = train.batch(torch.arange(6))
    v = view_features(backbone, images, RES, views=4, seed=0)
    assert v.shape == (6, 4, backbone.feature_dim)
    with torch.inference_mode():
        plain = backbone.features(images, RES)
    torch.testing.assert_close(v[:, 0], plain)
    assert not torch.allclose(v[:, 1], v[:, 0])  # augmented views differ from the plain one
    torch.testing.assert_close(view_features(backbone, images, RES, views=4, seed=0), v, rtol=0, atol=0)
    assert not torch.allclose(view_features(backbone, images, RES, views=4, seed=1)[:, 1:], v[:, 1:])
    assert view_features(backbone, images, RES, views=1, seed=0).shape == (6, 1, backbone.feature_dim)


# ---------------------------------------------------------------------------------------- baselines
def test_random_subset_ipc_per_class_and_seeds_differ(splits):
    train, _ = splits
    a, b = random_subset(train, 2, seed=0), random_subset(train, 2, seed=1)
    assert torch.bincount(a.targets, minlength=C).tolist() == [2] * C
    assert a.indices != b.indices
    assert random_subset(train, 2, seed=0).indices == a.indices
    assert all(int(train.targets[i]) == int(t) for i, t in zip(a.indices, a.targets))
    with pytest.raises(ValueError, match="ipc"):
        random_subset(train, PER_CLASS + 1, seed=0)


def _naive_nearest(x, y, c, target, k):
    dists = [(float(((x[i].double() - target) ** 2).sum()), i) for i in range(len(y)) if int(y[i]) == c]
    return [i for _, i in sorted(dists)[:k]]


@pytest.mark.parametrize("ipc", [1, 2])
def test_centroid_subset_matches_naive_loop(backbone, splits, ipc):
    train, _ = splits
    x, y = features.compute(backbone, train, RES, progress=False)
    sub = centroid_subset(backbone, train, RES, ipc=ipc)
    expected = []
    for c in range(C):
        rows = [x[i].double() for i in range(len(y)) if int(y[i]) == c]
        expected += _naive_nearest(x, y, c, sum(rows) / len(rows), ipc)
    assert sub.indices == expected
    assert sub.targets.tolist() == [c for c in range(C) for _ in range(ipc)]


def test_centroid_subset_uses_given_stats(backbone, splits):
    train, _ = splits
    x, y = features.compute(backbone, train, RES, progress=False)
    # "means" set to the feature of the last image of each class: that image must be picked
    last = [max(i for i in range(len(y)) if int(y[i]) == c) for c in range(C)]
    stats = ClassStats(x[last].double(), torch.full((C,), PER_CLASS), train.classes, {"backbone": backbone.name})
    assert centroid_subset(backbone, train, RES, stats=stats).indices == last
    bad = ClassStats(x[last].double(), torch.full((C,), PER_CLASS), train.classes, {"backbone": "other"})
    with pytest.raises(ValueError, match="backbone"):
        centroid_subset(backbone, train, RES, stats=bad)


def test_neighbor_subset_recovers_copied_real_images(backbone, splits):
    train, _ = splits
    picks = torch.tensor([3, 17, 6, 12, 9, 0])  # classes 0, 3, 1, 2, 1, 0; not class-sorted
    images, labels = train.batch(picks)
    ds = DistilledSet(images, labels, train.classes, {"backbone": backbone.name})
    sub = neighbor_subset(backbone, train, ds, RES)
    assert sub.indices == picks.tolist()
    assert torch.equal(sub.targets, labels)


def test_neighbors_are_the_same_class_image_of_highest_cosine(backbone, splits):
    """Against a direct computation: cosine of the float16-rounded features, one pair at a time."""
    train, _ = splits
    g = _gen(5)
    labels = torch.tensor([0, 2, 1, 3, 2, 0, 1])
    images = torch.rand(len(labels), 3, SIDE, SIDE, generator=g)
    ds = DistilledSet(images, labels, train.classes, {"backbone": backbone.name})
    x, y = features.compute(backbone, train, RES, progress=False)
    with torch.no_grad():
        q = backbone.features(images, RES).half().double()
    want, by_l2 = [], []
    for i, c in enumerate(labels.tolist()):
        pool = [j for j in range(len(y)) if int(y[j]) == c]
        cos = [float((q[i] * x[j].double()).sum() / (q[i].norm() * x[j].double().norm())) for j in pool]
        want.append(pool[max(range(len(pool)), key=lambda k: (cos[k], -k))])
        by_l2.append(pool[min(range(len(pool)), key=lambda k: float((q[i] - x[pool[k]].double()).norm()))])
    assert want != by_l2  # the data tell cosine from L2 apart, so the check below can fail
    sub = neighbor_subset(backbone, train, ds, RES)
    assert sub.indices == want and torch.equal(sub.targets, labels)


def test_gain_over_random_is_the_paired_difference_under_the_same_probe(backbone, splits):
    import numpy as np

    train, test = splits
    seeds = (0, 1)
    rand = baseline("random", backbone, train, test, RES, ipc=1, seeds=seeds, **TINY)
    images, labels = train.batch(torch.tensor([1, 6, 11, 16]))
    ds = DistilledSet(images, labels, train.classes, {"backbone": backbone.name, "method": "sfm", "ipc": 1})
    dist = linear_probe(backbone, ds, test, RES, seeds=seeds, **TINY)
    want = float(np.mean(np.array(dist.top1) - np.array(rand.top1)))
    assert gain_over_random(dist, rand) == pytest.approx(want, abs=1e-12)
    cent = baseline("centroids", backbone, train, test, RES, ipc=2, seeds=seeds, **TINY)
    full = baseline("full", backbone, train, test, RES, seeds=seeds, epochs=3)
    table = results_table([dist, rand, cent, full], gain=True, ddof=0)
    assert table["gain_over_random"].iloc[0] == pytest.approx(want, abs=1e-12)
    assert table["gain_over_random"].iloc[1] == 0.0
    assert table["gain_over_random"].iloc[2:].isna().all()  # IPC 2 and the full split have no random row
    assert table["top1_std"].tolist() == pytest.approx([dist.top1_pstd, rand.top1_pstd, cent.top1_pstd,
                                                        full.top1_pstd])
    assert "population std" in table.attrs["metric"] and "gain over random" in table.attrs["metric"]
    assert "sample std" in results_table([dist]).attrs["metric"]
    # not the same probe, IPC or seeds: refused, naming the difference
    with pytest.raises(ValueError, match="n_train 8 vs 4"):
        gain_over_random(cent, rand)
    with pytest.raises(ValueError, match="seeds differ"):
        gain_over_random(linear_probe(backbone, ds, test, RES, seeds=(0,), **TINY), rand)
    with pytest.raises(ValueError, match="epochs 5 vs 20"):
        gain_over_random(linear_probe(backbone, ds, test, RES, seeds=seeds, epochs=5, views=3), rand)
    with pytest.raises(ValueError, match="random real-image baseline"):
        gain_over_random(dist, cent)
    with pytest.raises(ValueError, match="two random rows"):
        results_table([rand, rand], gain=True)


def test_baseline_dispatch_errors(backbone, splits):
    train, test = splits
    with pytest.raises(ValueError, match="random, centroids, neighbors, full"):
        baseline("centroid", backbone, train, test, RES)
    with pytest.raises(ValueError, match="distilled="):
        baseline("neighbors", backbone, train, test, RES)
    assert BASELINES == ("random", "centroids", "neighbors", "full")


def test_baselines_run_and_label_their_kind(backbone, splits):
    train, test = splits
    rand = baseline("random", backbone, train, test, RES, ipc=1, seeds=(0, 1), **TINY)
    assert rand.meta["kind"] == "random" and rand.meta["n_train"] == C and rand.meta["ipc"] == 1
    cent = baseline("centroids", backbone, train, test, RES, ipc=2, seeds=(0,), **TINY)
    assert cent.meta["kind"] == "centroids" and cent.meta["n_train"] == 2 * C
    images, labels = train.batch(torch.tensor([0, 5, 10, 15]))
    ds = DistilledSet(images, labels, train.classes, {"backbone": backbone.name})
    nb = baseline("neighbors", backbone, train, test, RES, seeds=(0,), distilled=ds, **TINY)
    assert nb.meta["kind"] == "neighbors" and nb.meta["n_train"] == C
    full = baseline("full", backbone, train, test, RES, seeds=(0, 1), epochs=3, views=40)
    assert full.meta["kind"] == "full" and full.meta["n_train"] == len(train) and full.meta["batch_size"] == 20
    table = results_table([rand, cent, nb.to_dict(), full, {"kind": "sfm", "top1_mean": 1.0}])
    assert table["kind"].tolist() == ["random", "centroids", "neighbors", "full", "sfm"]
    assert {"top1_mean", "top1_std", "backbone", "resolution"} <= set(table.columns)
    long = results_table([rand, full], per_seed=True)
    assert len(long) == 4 and long["top1"].tolist() == rand.top1 + full.top1


def test_cross_backbone_table(backbone, splits):
    train, test = splits
    images, labels = train.batch(torch.tensor([0, 5, 10, 15]))
    ds = DistilledSet(images, labels, train.classes, {"backbone": "effnet_lite0"})
    df = cross_backbone(ds, [backbone], test, RES, seeds=(0,), epochs=5, views=2)
    assert list(df.columns) == ["eval_backbone", "distill_backbone", "top1_mean", "top1_std"]
    assert df.iloc[0].to_dict()["eval_backbone"] == "tiny_cnn" and df.iloc[0]["distill_backbone"] == "effnet_lite0"
