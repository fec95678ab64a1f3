"""Classifier inheritance: the ridge projector against an independent solve, identity on one backbone, the
same views in both backbones, the classifier's algebra, save/load, the storage report, the comparison table."""

import io
import math

import pytest
import torch

from sfm_lib import evaluate
from sfm_lib.backbones import Backbone
from sfm_lib.distill import DistilledSet
from sfm_lib.inherit import (
    ALPHA_GRID,
    IDENTITY,
    InheritedClassifier,
    comparison,
    compact,
    dataset_bytes,
    fit_projector,
    golden_classifier,
    inherit,
    paired_view_features,
    png_bytes,
    storage_report,
    summary,
)
from toydata import toy_dataset

C, SIDE, RES = 4, 16, 32


class _TinyNet(torch.nn.Module):
    """A random two-layer CNN (32 features), optionally followed by a fixed linear map (a second backbone
    whose features are an exact affine function of the first's)."""

    def __init__(self, mix: torch.Tensor | None = None, shift: torch.Tensor | None = None):
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, stride=2), torch.nn.Tanh(),
                                        torch.nn.Conv2d(16, 16, 3, stride=2), torch.nn.Tanh())
        self.mix, self.shift = mix, shift
        self.num_features = 32 if mix is None else mix.shape[0]

    def forward(self, x):
        h = self.body(x)
        z = torch.cat([h.mean((2, 3)), h.std((2, 3))], 1)
        return z if self.mix is None else z @ self.mix.T + self.shift


def _backbone(name="tiny", **kw) -> Backbone:
    return Backbone(_TinyNet(**kw), name, (0.5,) * 3, (0.5,) * 3, torch.device("cpu"))


@pytest.fixture(scope="module")
def tiny():
    return _backbone()


@pytest.fixture(scope="module")
def mixed():
    g = torch.Generator().manual_seed(5)
    return _backbone("tiny_mixed", mix=torch.randn(24, 32, generator=g), shift=torch.randn(24, generator=g))


def _dataset(split, per_class, seed):
    return toy_dataset(split, per_class, seed, classes=C, side=SIDE)


@pytest.fixture()
def splits(fresh_cache):
    return _dataset("train", 12, 0), _dataset("test", 8, 1)


def _distilled(train, per_class=1):
    idx = torch.cat([torch.nonzero(train.targets == c).flatten()[-per_class:] for c in range(C)])
    images, labels = train.batch(idx)
    return DistilledSet(images, labels, train.classes, {"backbone": "tiny", "method": "sfm", "ipc": per_class})


# ------------------------------------------------------------------------------------------- projector
def _independent_ridge(x, y, lam):
    """Ridge with an unpenalised bias as one least-squares problem on the augmented design matrix
    [[X, 1], [√λ I, 0]] against [[Y], [0]] (torch.linalg.lstsq, float64)."""
    M, D = x.shape
    design = torch.cat([torch.cat([x, torch.ones(M, 1, dtype=x.dtype)], 1),
                        torch.cat([math.sqrt(lam) * torch.eye(D, dtype=x.dtype), torch.zeros(D, 1, dtype=x.dtype)],
                                  1)])
    target = torch.cat([y, torch.zeros(D, y.shape[1], dtype=y.dtype)])
    sol = torch.linalg.lstsq(design, target, driver="gelsd").solution  # [D + 1, D_d]
    return sol[:D].T, sol[D]


@pytest.mark.parametrize("M,alpha", [(40, 0.05), (12, 0.3), (200, 1e-3)])
def test_ridge_projector_matches_an_independent_lstsq_solve(M, alpha):
    g = torch.Generator().manual_seed(M)
    x = torch.randn(M, 20, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3, 20, dtype=torch.float64)
    y = torch.randn(M, 7, generator=g, dtype=torch.float64) + 4.0
    A, c, lam = fit_projector(x.float(), y.float(), alpha)
    xc = x.float().double() - x.float().double().mean(0)
    assert lam == pytest.approx(alpha * float((xc ** 2).sum()) / 20, rel=1e-12)
    A_ref, c_ref = _independent_ridge(x.float().double(), y.float().double(), lam)
    torch.testing.assert_close(A, A_ref, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(c, c_ref, rtol=1e-9, atol=1e-10)


def test_least_squares_recovers_an_exact_affine_map_and_the_identity():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(60, 10, generator=g, dtype=torch.float64)
    A_true, c_true = torch.randn(6, 10, generator=g, dtype=torch.float64), torch.randn(6, generator=g,
                                                                                       dtype=torch.float64)
    A, c, _ = fit_projector(x, x @ A_true.T + c_true, alpha=0.0)
    torch.testing.assert_close(A, A_true, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(c, c_true, rtol=1e-10, atol=1e-10)
    A, c, _ = fit_projector(x, x, alpha=0.0)
    torch.testing.assert_close(A, torch.eye(10, dtype=torch.float64), rtol=0, atol=1e-12)
    assert float(c.abs().max()) < 1e-12
    # ridge shrinks towards 0 on directions of little variance, never past the identity
    A, _, _ = fit_projector(x, x, alpha=0.1)
    eig = torch.linalg.eigvalsh((A + A.T) / 2)
    assert float(eig.max()) < 1.0 and float(eig.min()) > 0.5


def test_projector_rejects_bad_input():
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="same M"):
        fit_projector(x, torch.randn(4, 3))
    with pytest.raises(ValueError, match="alpha"):
        fit_projector(x, x, alpha=-1.0)
    with pytest.raises(ValueError, match="singular"):
        fit_projector(x, x, alpha=0.0)  # 5 views for 8 dimensions


def test_same_view_goes_into_both_backbones(tiny, mixed, splits):
    """φ_d = affine(φ_e) exactly, so P recovers the map only if every row pairs features of one view."""
    train, _ = splits
    images, _ = train.batch(torch.arange(0, 48, 6))
    z_e, z_d = paired_view_features(mixed, tiny, images, RES, views=6, seed=3)
    assert z_e.shape == (48, 32) and z_d.shape == (48, 24)
    torch.testing.assert_close(z_e.view(8, 6, -1), evaluate.view_features(tiny, images, RES, 6, 3))
    A, c, _ = fit_projector(z_e, z_d, alpha=0.0)
    torch.testing.assert_close(A.float(), mixed.model.mix, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(c.float(), mixed.model.shift, rtol=1e-3, atol=1e-3)
    z_e2, _ = paired_view_features(mixed, tiny, images, RES, views=6, seed=4)
    assert not torch.allclose(z_e2[6:], z_e[6:])  # another seed, other views (view 0 is shared)
    # the test transform reaches view 0 of both backbones, as the test pass applies it (the views stay)
    from sfm_lib.data import PAPER

    cache: dict = {}
    t_e, t_d = paired_view_features(mixed, tiny, images, RES, views=6, seed=3, transform=PAPER, cache=cache,
                                    cache_key="x")
    torch.testing.assert_close(t_e.view(8, 6, -1), evaluate.view_features(tiny, images, RES, 6, 3, PAPER))
    assert not torch.allclose(t_e.view(8, 6, -1)[:, 0], z_e.view(8, 6, -1)[:, 0])
    torch.testing.assert_close(t_e.view(8, 6, -1)[:, 1:], z_e.view(8, 6, -1)[:, 1:])
    again, _ = paired_view_features(mixed, tiny, images, RES, views=6, seed=3, cache=cache, cache_key="x")
    torch.testing.assert_close(again, z_e)  # the transform is part of the in-memory cache key


# ------------------------------------------------------------------------------------------ classifier
def _classifier(g, D_e=6, D_d=5):
    return InheritedClassifier(torch.randn(C, D_d, generator=g), torch.randn(C, generator=g),
                               torch.randn(D_d, D_e, generator=g), torch.randn(D_d, generator=g),
                               [f"c{i}" for i in range(C)], {"eval_backbone": "tiny", "resolution": RES})


def test_logits_are_w_of_p_plus_b_by_a_naive_loop():
    g = torch.Generator().manual_seed(0)
    clf, z = _classifier(g), torch.randn(9, 6, generator=g)
    ref = torch.empty(9, C, dtype=torch.float64)
    W, b, A, c = (t.double() for t in (clf.weight, clf.bias, clf.proj_weight, clf.proj_bias))
    for n in range(9):
        p = [sum(A[i, j] * z[n, j].double() for j in range(6)) + c[i] for i in range(5)]
        for k in range(C):
            ref[n, k] = sum(W[k, i] * p[i] for i in range(5)) + b[k]
    torch.testing.assert_close(clf.logits(z).double(), ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(clf.predict_features(z), ref.argmax(1))
    labels = ref.argmax(1).clone()
    labels[:3] = (labels[:3] + 1) % C
    assert clf.accuracy(z, labels) == pytest.approx(100 * 6 / 9)
    with pytest.raises(ValueError, match="features"):
        clf.project(torch.randn(3, 7))
    with pytest.raises(ValueError, match="inconsistent"):
        InheritedClassifier(clf.weight, clf.bias[:2], clf.proj_weight, clf.proj_bias, clf.classes)


def test_save_load_roundtrip_and_storage_bytes(tmp_path):
    clf = _classifier(torch.Generator().manual_seed(1), D_e=7, D_d=5)
    path = tmp_path / "clf.safetensors"
    clf.save(path)
    back = InheritedClassifier.load(path)
    for name in ("weight", "bias", "proj_weight", "proj_bias"):
        assert torch.equal(getattr(back, name), getattr(clf, name)), name
    assert back.classes == clf.classes and back.meta == clf.meta
    assert clf.storage_bytes() == {"W": C * 5 * 4, "b": C * 4, "P": (5 * 7 + 5) * 4,
                                   "total": (C * 5 + C + 5 * 7 + 5) * 4}
    DistilledSet(torch.rand(2, 3, 8, 8), torch.tensor([0, 1]), ["a", "b"]).save(tmp_path / "d.safetensors")
    with pytest.raises(ValueError, match="not an inherited classifier"):
        InheritedClassifier.load(tmp_path / "d.safetensors")
    with pytest.raises(FileNotFoundError):
        InheritedClassifier.load(tmp_path / "missing.safetensors")


def test_storage_report_png_decodes_back_to_the_uint8_images():
    from PIL import Image

    g = torch.Generator().manual_seed(2)
    images = torch.rand(3, 3, 12, 10, generator=g)
    images[0] = 0.5  # a flat image compresses well
    clf = _classifier(g)
    rep = storage_report(clf, images)
    assert rep["images_uint8"] == 3 * 3 * 12 * 10 and rep["images_float32"] == 4 * rep["images_uint8"]
    assert rep["inherited"] == rep["W"] + rep["b"] + rep["P"] and rep["n_images"] == 3
    total, u8 = 0, (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    from numpy import asarray
    for i in range(3):
        buf = io.BytesIO()
        Image.fromarray(u8[i], "RGB").save(buf, format="PNG")
        total += len(buf.getvalue())
        buf.seek(0)
        assert (asarray(Image.open(buf)) == u8[i]).all()  # lossless
    assert rep["images_png"] == total == png_bytes(images)
    assert png_bytes(images[:1]) < png_bytes(images[1:2])


def test_dataset_bytes_counts_native_uint8(splits):
    train, _ = splits
    assert dataset_bytes(train) == len(train) * SIDE * SIDE
    assert dataset_bytes(evaluate.random_subset(train, 2, 0)) == 2 * C * SIDE * SIDE


# ----------------------------------------------------------------------------------------- end to end
def test_inherit_on_the_same_backbone_is_close_to_the_golden_classifier(tiny, splits):
    train, test = splits
    golden = golden_classifier(tiny, train, test, RES, epochs=30, batch_size=16, lr=1e-2)
    W, b = golden.weights[0][0], golden.weights[1][0]
    clf = inherit(golden, tiny, tiny, _distilled(train, 3), RES, views=8, alpha=1e-6)
    assert clf.meta["n_views"] == 3 * C * 8 and clf.meta["eval_backbone"] == "tiny"
    assert torch.equal(clf.weight, W) and torch.equal(clf.bias, b)
    z, y = evaluate.features_mod.compute(tiny, test, RES, progress=False)
    rel = (clf.project(z) - z).norm() / z.norm()
    assert rel < 0.02, f"P is not close to the identity on held-out features: {rel:.3g}"
    assert abs(clf.accuracy(z, y) - golden.top1[0]) <= 100 / len(y) * 1.01  # at most one test image flips
    images, _ = test.batch(torch.arange(len(test)))
    assert torch.equal(clf.predict(images, tiny), clf.predict_features(z))
    with pytest.raises(ValueError, match="reads tiny"):
        clf.predict(images, _backbone("other"))


def test_comparison_rows(tiny, mixed, splits):
    from types import SimpleNamespace

    train, test = splits
    sides = {"tiny": SimpleNamespace(backbone=tiny, train=train, stats=None),
             "tiny_mixed": SimpleNamespace(backbone=mixed, train=train, stats=None)}
    dset = _distilled(train)
    kept = {}
    df = comparison(sides, {"tiny": dset}, test, RES,
                    [("tiny", "tiny", ("distilled", "random", "centroids")), ("tiny", "tiny_mixed")],
                    views=4, probe_seeds=(0, 1), epochs=3, probe_views=2, full_epochs=2, keep=kept)
    assert sorted(kept) == [("tiny", "tiny", "centroids"), ("tiny", "tiny", "distilled"), ("tiny", "tiny", "random"),
                            ("tiny", "tiny_mixed", "distilled")]
    z, y = evaluate.features_mod.compute(mixed, test, RES, progress=False)
    assert df.iloc[5]["top1"] == kept[("tiny", "tiny_mixed", "distilled")].accuracy(z, y)
    summ = summary(df)
    assert list(summ["eval_backbone"]) == ["tiny", "tiny_mixed"]
    assert summ.iloc[0]["inherited_random"] == df.iloc[1]["top1"]
    assert summ.iloc[0]["over_random"] == pytest.approx(df.iloc[0]["top1"] - df.iloc[1]["top1"])
    assert math.isnan(summ.iloc[1]["over_random"])  # no P fitted on random images for that pair
    assert summ.iloc[1]["over_normal"] == pytest.approx(df.iloc[5]["top1"] - df.iloc[6]["top1"])
    assert summ.iloc[0]["of_full_data"] == pytest.approx(100 * df.iloc[0]["top1"] / df.iloc[4]["top1"])
    import matplotlib

    matplotlib.use("Agg")
    from sfm_lib import plots

    ax = plots.accuracy_vs_storage(df, title="t")
    assert len(ax.collections) >= len(df)
    assert list(df["method"]) == ["inherited"] * 3 + ["normal probe", "full-data probe", "inherited",
                                                       "normal probe", "full-data probe"]
    assert list(df["fit_on"][:3]) == ["distilled", "random", "centroids"]
    assert df["top1"].between(0, 100).all()
    same = df.iloc[0]
    assert same["identity_gap"] >= 0 and same["projector_r2"] <= 1
    assert math.isnan(df.iloc[5]["identity_gap"])
    assert df.iloc[0]["storage_bytes"] == (C * 32 + C + 32 * 32 + 32) * 4
    assert df.iloc[5]["storage_bytes"] == (C * 32 + C + 32 * 24 + 32) * 4  # P: 24 φ_e dims → 32 φ_d dims
    assert df.iloc[3]["storage_bytes"] == png_bytes(dset.images)
    assert df.iloc[4]["storage_bytes"] == dataset_bytes(train)
    small = compact(df)  # the book's view: same numbers, short names, kB
    assert small.index.names == ["φ_d", "φ_e", "classifier"] and len(small) == len(df)
    assert small.index[1] == ("tiny", "tiny", "inherited, P on random") and small.index[3][2] == "normal probe"
    assert list(small["top-1"]) == list(df["top1"]) and small["α"].iloc[0] == df["alpha"].iloc[0]
    assert small["kB kept"].iloc[3] == png_bytes(dset.images) / 1000
    with pytest.raises(ValueError, match="unknown fit sets"):
        comparison(sides, {"tiny": dset}, test, RES, [("tiny", "tiny", ("noise",))])
    # a named further fit set (the book's: images distilled with both backbones) is fitted like the others
    other = _distilled(train)
    other.images = other.images.flip(-1)
    kept2 = {}
    df2 = comparison(sides, {"tiny": dset}, test, RES, [("tiny", "tiny_mixed", ("distilled", "flipped"))],
                     fit_images={"flipped": other}, views=4, probe_seeds=(0,), epochs=2, probe_views=2,
                     full_epochs=2, keep=kept2)
    assert list(df2["fit_on"][:2]) == ["distilled", "flipped"]
    golden = golden_classifier(tiny, train, test, RES, seeds=(0,), epochs=2)
    want = inherit(golden, tiny, mixed, other, RES, views=4, seed=0, classes=dset.classes)
    torch.testing.assert_close(kept2[("tiny", "tiny_mixed", "flipped")].proj_weight, want.proj_weight)
    assert df2.iloc[1]["top1"] == want.accuracy(z, y)
    with pytest.raises(ValueError, match="choose from distilled, random, centroids, flipped"):
        comparison(sides, {"tiny": dset}, test, RES, [("tiny", "tiny", ("noise",))], fit_images={"flipped": other})
    # full_probes: the golden classifier and the ceiling are trained once across calls, and the rows stay equal
    from sfm_lib import inherit as inherit_mod

    calls = []

    def counted(*args, **kw):
        calls.append(args[0].name)
        return golden_classifier(*args, **kw)

    shared = {}
    again = dict(fit_images={"flipped": other}, views=4, probe_seeds=(0,), epochs=2, probe_views=2, full_epochs=2)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(inherit_mod, "golden_classifier", counted)
        first = comparison(sides, {"tiny": dset}, test, RES, [("tiny", "tiny_mixed", ("distilled", "flipped"))],
                           full_probes=shared, **again)
        second = comparison(sides, {"tiny": dset}, test, RES, [("tiny", "tiny_mixed", ("distilled", "flipped"))],
                            full_probes=shared, **again)
    assert calls == [tiny.name, mixed.name] and sorted(shared) == ["tiny", "tiny_mixed"]
    cols = ["method", "fit_on", "top1", "golden_top1", "alpha"]
    pd_testing = pytest.importorskip("pandas").testing
    pd_testing.assert_frame_equal(first[cols], second[cols])
    pd_testing.assert_frame_equal(first[cols], df2[cols])


def test_probe_pieces_compose_to_linear_probe(tiny, splits):
    """evaluate's split: probe_features → fit_probes → accuracies is linear_probe, bit for bit."""
    train, test = splits
    trains = [evaluate.random_subset(train, 2, s) for s in (0, 1)] + [evaluate.random_subset(train, 3, 2)]
    seeds = (0, 1, 2)
    ref = evaluate.linear_probe(tiny, trains, test, RES, epochs=6, seeds=seeds, views=3)
    feats, labels = evaluate.probe_features(tiny, trains, RES, views=3, seeds=seeds)
    assert [f.shape for f in feats] == [(8, 3, 32), (8, 3, 32), (12, 3, 32)]
    W, b = evaluate.fit_probes(feats, labels, C, epochs=6, seeds=seeds)
    z, y = evaluate.features_mod.compute(tiny, test, RES, progress=False)
    assert evaluate.accuracies(W, b, z, y) == ref.top1
    assert torch.equal(W, ref.weights[0]) and torch.equal(b, ref.weights[1])
    with pytest.raises(ValueError, match="one of each"):
        evaluate.fit_probes(feats[:2], labels, C, epochs=6, seeds=seeds)


# ------------------------------------------------------------------------------------------ command line
def test_cli_inherit_writes_json_and_the_classifier(tmp_path, capsys, tiny_fmnist_dir, monkeypatch):
    import json

    from sfm_lib.cli import main

    monkeypatch.setenv("SFM_DATA", str(tiny_fmnist_dir))  # 270 train, 30 val, 100 test images: fast full splits
    with pytest.raises(SystemExit) as info:
        main(["inherit", "--help"])
    assert info.value.code == 0 and "--eval-backbone" in capsys.readouterr().out
    g = torch.Generator().manual_seed(0)
    dpath = tmp_path / "d.safetensors"
    from sfm_lib.data import FASHION_MNIST_CLASSES

    DistilledSet(torch.rand(10, 3, 32, 32, generator=g), torch.arange(10), list(FASHION_MNIST_CLASSES),
                 {"backbone": "effnet_lite0", "method": "sfm", "ipc": 1, "dataset": "fashion_mnist"}).save(dpath)
    out, clf_path = tmp_path / "inherit.json", tmp_path / "clf.safetensors"
    common = ["inherit", "--distilled", str(dpath), "--resolution", "32", "--device", "cpu", "--views", "3",
              "--epochs", "3", "--probe-views", "2", "--seeds", "2", "--full-epochs", "1", "--val-per-class", "3"]
    assert main(common + ["--distill-backbone", "effnet_lite0", "--eval-backbone", "effnet_lite1",
                          "--json", str(out), "--save", str(clf_path)]) == 0
    got = json.loads(out.read_text())
    assert {"inherited", "normal_probe", "full_data", "storage_bytes"} <= got.keys()
    for key in ("inherited", "normal_probe", "full_data"):
        assert 0 <= got[key]["top1"] <= 100, key
    assert got["inherited"]["eval_backbone"] == "effnet_lite1" and got["full_data"]["n_train"] == 270
    scores = got["inherited"]["validation_top1"]  # α chosen on the 3 val images per class the golden never saw
    assert len(scores) == len(ALPHA_GRID) - 1 and IDENTITY not in scores  # two backbones: no P = I
    assert got["inherited"]["n_validation"] == 30
    assert scores[str(got["inherited"]["alpha"])] == max(scores.values())
    st = got["storage_bytes"]
    assert st["W"] == 10 * 1280 * 4 and st["P"] == (1280 * 1280 + 1280) * 4
    assert st["images_uint8"] == 10 * 3 * 32 * 32 and st["images_float32"] == 4 * st["images_uint8"]
    clf = InheritedClassifier.load(clf_path)
    assert clf.meta["distill_backbone"] == "effnet_lite0" and clf.proj_weight.shape == (1280, 1280)
    assert "inherited" in capsys.readouterr().out
    # bad input: a clear message and status 2
    assert main(common + ["--distill-backbone", "effnet_lite2"]) == 2
    assert "--distill-backbone effnet_lite0" in capsys.readouterr().err
    assert main(common + ["--distill-backbone", "effnet_lite0", "--dataset", "cifar100"]) == 2
    assert "error:" in capsys.readouterr().err
    assert main(common + ["--distill-backbone", "effnet_lite0", "--alpha", "0.1,x"]) == 2
    assert "--alpha takes numbers" in capsys.readouterr().err


def test_per_class_split_is_cached_apart_and_its_distillation_evaluates_on_the_test_split(tiny, splits):
    """The second backbone's statistics come from N images per class of the same training split: they are
    cached apart from the whole split's, and what is distilled from them is scored on the dataset's test
    split (a renamed subset was refused by the data check, which chapter 5 hit at full size)."""
    from sfm_lib import distill, features, stats
    from sfm_lib.inherit import per_class_split

    train, test = splits
    test.name = train.name  # the two splits of one dataset, as data.load gives them
    sub = per_class_split(train, 3)
    assert sub.name == train.name and sub.split == "train" and len(sub) == 3 * C
    assert torch.equal(sub.targets.bincount(), torch.full((C,), 3))
    assert features.cache_path(tiny, sub, RES) != features.cache_path(tiny, train, RES)
    st = stats.cached_extract(tiny, sub, RES, progress=False)
    assert st.counts.tolist() == [3] * C
    dset = distill.sfm(tiny, st, ipc=1, steps=2, resolution=RES, progress=False)
    assert dset.meta["dataset"] == train.name
    evaluate.check_same_data(dset, test)  # no error: the subset belongs to the same dataset
    renamed = _with_meta(dset, dataset="other")
    with pytest.raises(ValueError, match="distilled from 'other'"):
        evaluate.check_same_data(renamed, test)


def _with_meta(dset: DistilledSet, **meta) -> DistilledSet:
    return DistilledSet(dset.images, dset.labels, dset.classes, {**dset.meta, **meta})


def test_alpha_is_chosen_by_validation_top1_of_each_separately_fitted_classifier(tiny, mixed, splits):
    """Several ridge strengths: the one whose classifier, fitted alone, scores best on the validation
    features wins (first of ties); every score is recorded; without validation images it is an error."""
    from sfm_lib import features
    from sfm_lib.inherit import validation_split

    train, test = splits
    golden = golden_classifier(tiny, train, test, RES, epochs=2)
    val = validation_split(_dataset("val", 6, 2), 4)
    z_v, y_v = features.compute(mixed, val, RES, progress=False)
    grid = (1e-4, 0.1, 10.0, 1e3)
    alone = {a: inherit(golden, tiny, mixed, _distilled(train, 2), RES, views=4, alpha=a).accuracy(z_v, y_v)
             for a in grid}
    best = max(grid, key=lambda a: (alone[a], -grid.index(a)))
    clf = inherit(golden, tiny, mixed, _distilled(train, 2), RES, views=4, alpha=grid, validation=(z_v, y_v))
    assert clf.meta["alpha"] == best and clf.meta["validation_top1"] == alone
    assert clf.meta["n_validation"] == 4 * C
    with pytest.raises(ValueError, match="no validation images"):
        inherit(golden, tiny, mixed, _distilled(train, 2), RES, views=4, alpha=grid)


def test_validation_split_takes_the_first_images_of_a_val_split_and_refuses_training_splits(splits):
    from sfm_lib import data
    from sfm_lib.inherit import validation_split

    train, _ = splits
    val = _dataset("val", 6, 2)
    sub = validation_split(val, 3)
    want = torch.cat([torch.nonzero(val.targets == c).flatten()[:3] for c in range(C)]).sort().values
    assert sub.indices == want.tolist() and torch.equal(sub.targets.bincount(), torch.full((C,), 3))
    assert validation_split(val) is val  # 0: all of it
    from sfm_lib.inherit import validation_rest

    rest = validation_rest(val, 3)  # the images that judge, disjoint from those that choose α
    assert sorted(rest.indices + sub.indices) == list(range(len(val))) and not set(rest.indices) & set(sub.indices)
    assert torch.equal(rest.targets, val.targets[rest.indices]) and rest.split == "val"
    with pytest.raises(ValueError, match="smallest class"):
        validation_split(val, 7)
    for split in ("train", "trainval"):
        other = _dataset(split, 6, 2)
        with pytest.raises(ValueError, match=f"the {split!r} split, which the golden classifier"):
            validation_split(other, 3)
        with pytest.raises(ValueError, match="data.load\\(name, 'val'\\)"):
            validation_split(data.subset(other, [0, 1]), 1)  # also under a Subset


def test_the_identity_candidate_gives_the_golden_classifier_exactly_on_one_backbone(tiny, mixed, splits):
    """φ_e = φ_d: P = I is a candidate, and when the validation images choose it the inherited classifier is the
    golden one bit for bit (its logits, its test top-1); for two backbones it is never tried."""
    from sfm_lib import features

    train, test = splits
    golden = golden_classifier(tiny, train, test, RES, epochs=5, batch_size=16, lr=1e-2)
    W, b = golden.weights[0][0], golden.weights[1][0]
    val = _dataset("val", 6, 2)
    z_v, y_v = features.compute(tiny, val, RES, progress=False)
    # α = 1e6 shrinks A to 0 (every image gets the mean's class): the identity wins on merit, not on order
    clf = inherit(golden, tiny, tiny, _distilled(train, 2), RES, views=4, alpha=(1e6, IDENTITY),
                  validation=(z_v, y_v))
    assert clf.meta["alpha"] == IDENTITY and set(clf.meta["validation_top1"]) == {1e6, IDENTITY}
    assert clf.meta["validation_top1"][IDENTITY] > clf.meta["validation_top1"][1e6]
    z, y = features.compute(tiny, test, RES, progress=False)
    assert torch.equal(clf.project(z), z) and torch.equal(clf.logits(z), z @ W.T + b)
    assert clf.accuracy(z, y) == golden.top1[0]
    assert clf.storage_bytes()["P"] == 0  # nothing to keep besides W and b
    # another Backbone object with the same identity is the same φ
    twin = _backbone()
    assert inherit(golden, tiny, twin, _distilled(train), RES, views=2, alpha=IDENTITY).meta["alpha"] == IDENTITY
    # two backbones: the identity is skipped, and alone it is an error
    z_m, y_m = features.compute(mixed, val, RES, progress=False)
    other = inherit(golden, tiny, mixed, _distilled(train), RES, views=2, alpha=ALPHA_GRID[:2],
                    validation=(z_m, y_m))
    assert list(other.meta["validation_top1"]) == [ALPHA_GRID[1]]
    with pytest.raises(ValueError, match="needs φ_e = φ_d"):
        inherit(golden, tiny, mixed, _distilled(train), RES, views=2, alpha=IDENTITY)
    with pytest.raises(ValueError, match="neither a number nor 'identity'"):
        inherit(golden, tiny, tiny, _distilled(train), RES, views=2, alpha=("idnetity", 0.1), validation=(z_v, y_v))


def test_comparison_refuses_validation_images_the_golden_classifier_trains_on(tiny, splits):
    from types import SimpleNamespace

    train, test = splits
    dset = _distilled(train)
    for golden_on, val_split in (("train", "train"), ("trainval", "val")):
        side = SimpleNamespace(backbone=tiny, train=_dataset(golden_on, 12, 0), stats=None)
        with pytest.raises(ValueError, match=f"trained on '{golden_on}'"):
            comparison({"tiny": side}, {"tiny": dset}, test, RES, [("tiny", "tiny")], views=2, alpha=ALPHA_GRID,
                       validation=_dataset(val_split, 3, 2), probe_seeds=(0,), epochs=1, probe_views=1,
                       full_epochs=1)
