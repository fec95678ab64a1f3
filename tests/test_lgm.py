"""LGM (method.md §5): the head gradient, its flow identity, the real-data stream, the objective against a
hand computation, two-pass, exact resume, and the command line."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sfm_lib import distill, flow
from sfm_lib.augment import Augment
from sfm_lib.backbones import square_resize
from sfm_lib.cli import main
from sfm_lib.data import DistilledSet, TensorImageDataset, load, subset
from sfm_lib.objectives import LGMObjective, RealStream, head_gradient

C, RES = 3, 32


@pytest.fixture(scope="module")
def toy_real():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (C * 12, 20, 20), generator=g, dtype=torch.uint8)
    targets = torch.arange(C).repeat(12)  # interleaved classes, so a class-major reading would be wrong
    return TensorImageDataset(images, targets, [f"c{i}" for i in range(C)], "toy")


def _closed_form(z, labels, w, b):
    """(softmax(ZWᵀ + b) − Y)ᵀ Z / N and its column sums / N, in float64, by hand."""
    z, w, b = z.double(), w.double(), b.double()
    p = torch.softmax(z @ w.t() + b, dim=1)
    y = F.one_hot(labels, w.shape[0]).double()
    return (p - y).t() @ z / len(z), (p - y).sum(0) / len(z)


def test_head_gradient_is_the_closed_form():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(17, 5, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 4, (17,), generator=g)
    w, b = torch.randn(4, 5, generator=g, dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64)
    gw, gb = head_gradient(z, labels, w, b)
    ew, eb = _closed_form(z, labels, w, b)
    torch.testing.assert_close(gw.double(), ew, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gb.double(), eb, rtol=1e-5, atol=1e-7)


def test_at_zero_head_a_balanced_gradient_is_the_batch_flow():
    """Row c of ∂CE/∂W at W = 0, b = 0 on a class-balanced batch equals (C−1)/C² · (mean_{k≠c} μ̂_k − μ̂_c)."""
    k, n, d = 5, 7, 6
    g = torch.Generator().manual_seed(2)
    z = torch.randn(k * n, d, generator=g, dtype=torch.float64) + 3.0
    labels = torch.arange(k).repeat(n)
    gw, gb = _closed_form(z, labels, torch.zeros(k, d), torch.zeros(k))
    mu = torch.stack([z[labels == c].mean(0) for c in range(k)])
    batch_flow = torch.stack([mu[[j for j in range(k) if j != c]].mean(0) - mu[c] for c in range(k)])
    torch.testing.assert_close(gw, (k - 1) / k**2 * batch_flow, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gb, torch.zeros(k, dtype=torch.float64), rtol=0, atol=1e-12)
    got, _ = head_gradient(z, labels, torch.zeros(k, d, dtype=torch.float64), torch.zeros(k, dtype=torch.float64))
    torch.testing.assert_close(got, (k - 1) / k**2 * flow.real_flow(mu))
    # an unbalanced batch breaks the identity (so the test above can fail)
    gw_u, _ = _closed_form(z[3:], labels[3:], torch.zeros(k, d), torch.zeros(k))
    assert not torch.allclose(gw_u, (k - 1) / k**2 * batch_flow, atol=1e-3)


def test_stream_covers_each_epoch_once_and_resumes(toy_real):
    s = RealStream(toy_real, 5, seed=3)
    seen = torch.cat([s.next_indices() for _ in range(36 // 5)])  # 35 of the first epoch's 36
    assert len(set(seen.tolist())) == 35
    state = s.state_dict()
    nxt = s.next_indices()  # runs into the second epoch
    assert nxt[0].item() not in seen.tolist() and int(s.position[0, 0]) == 1
    t = RealStream(toy_real, 5, seed=3)
    t.load_state_dict(state)
    assert torch.equal(t.next_indices(), nxt)
    other_seed = RealStream(toy_real, 5, seed=4).next_indices()
    assert not torch.equal(other_seed, RealStream(toy_real, 5, seed=3).next_indices())
    balanced = RealStream(toy_real, 6, seed=0, balanced=True)
    for _ in range(5):
        assert torch.bincount(toy_real.targets[balanced.next_indices()], minlength=C).tolist() == [2, 2, 2]
    with pytest.raises(ValueError, match="divisible"):
        RealStream(toy_real, 5, balanced=True)


def test_stream_reads_subsets_and_image_folders(toy_real, tmp_path):
    from PIL import Image

    sub = subset(toy_real, range(0, 36, 2))
    s = RealStream(sub, 4, seed=0)
    idx = s.next_indices()
    s.load_state_dict({"position": torch.zeros(1, 2, dtype=torch.long)})
    x, y = s.next(RES)
    expected = torch.stack([square_resize(sub[int(i)][0], RES) for i in idx])
    torch.testing.assert_close(x, expected)
    assert y.tolist() == sub.targets[idx].tolist()
    for c in range(C):
        (tmp_path / "train" / f"c{c}").mkdir(parents=True)
    for i in range(9):
        Image.fromarray(toy_real.images[i].numpy()).convert("RGB").save(tmp_path / "train" / f"c{i % C}" / f"{i}.png")
    folder = load(f"imagefolder:{tmp_path}", "train")
    fs = RealStream(folder, 4, seed=0, balanced=False)
    idx = fs.next_indices()
    fs.load_state_dict({"position": torch.zeros(1, 2, dtype=torch.long)})
    x, y = fs.next(RES)
    torch.testing.assert_close(x, torch.stack([square_resize(folder[int(i)][0], RES) for i in idx]))
    fs.close()


def test_objective_matches_a_hand_computation(lite0, toy_real):
    obj = LGMObjective(toy_real, lite0, ipc=1, augs=2, resolution=RES, head_std=0.5, seed=1)
    gen_state, pos = obj.generator.get_state(), obj.stream.state_dict()
    obj.begin_step()
    # redo the step's draws by hand: same generator, same stream position; images item by item
    gen = torch.Generator()
    gen.set_state(gen_state)
    again = RealStream(toy_real, 6, seed=1)
    again.load_state_dict(pos)
    idx = again.next_indices()
    w = 0.5 * torch.randn(C, lite0.feature_dim, generator=gen)
    x = torch.stack([square_resize(toy_real[int(i)][0], RES) for i in idx])
    aug = Augment()
    views = aug.apply(x, aug.sample(len(x), gen), RES)
    with torch.no_grad():
        z_real = lite0(lite0.preprocess(views, RES))
    ew, eb = _closed_form(z_real, toy_real.targets[idx], w, torch.zeros(C))
    torch.testing.assert_close(obj.weight, w)
    torch.testing.assert_close(obj.g_real.double(), torch.cat([ew.flatten(), eb]), rtol=1e-4, atol=1e-7)
    z = torch.randn(2 * C, lite0.feature_dim, generator=torch.Generator().manual_seed(5))
    labels = torch.arange(C).repeat(2)
    sw, sb = _closed_form(z, labels, w, torch.zeros(C))
    syn = torch.cat([sw.flatten(), sb])
    expected = 1 - F.cosine_similarity(syn, obj.g_real.double(), dim=0)
    assert float(obj(z, labels, labels * 0).detach()) == pytest.approx(float(expected), abs=1e-5)
    obj.begin_step()
    assert not torch.equal(obj.weight, w), "a fresh head every step"


def test_lgm_two_pass_gradient_equals_one_pass(lite0, toy_real):
    from toydata import one_and_two_pass

    losses, grads = one_and_two_pass(lite0, lambda: LGMObjective(toy_real, lite0, ipc=2, augs=2, resolution=RES,
                                                                 head_std=0.01, seed=0), C, RES)
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-7 * float(grads[0].abs().max()))


def _lgm(lite0, real, **kw):
    base = dict(ipc=1, steps=5, resolution=RES, augs=2, progress=False, seed=2, checkpoint_every=2)
    return distill.lgm(lite0, real, **{**base, **kw})


def test_lgm_run_stopped_and_resumed_is_bit_identical(lite0, toy_real, tmp_path, monkeypatch):
    full = _lgm(lite0, toy_real, checkpoint=tmp_path / "a.pt")
    assert full.meta["method"] == "lgm" and len(full.meta["loss_history"]) == 5
    assert full.images.shape == (C, 3, RES, RES) and full.classes == toy_real.classes

    def stop(step, loss, images):
        if step == 3:
            raise KeyboardInterrupt

    part = tmp_path / "b.pt"
    with pytest.raises(KeyboardInterrupt):
        _lgm(lite0, toy_real, checkpoint=part, callback=stop)
    state = torch.load(part, weights_only=True)
    assert state["step"] == 2 and set(state["objective"]) == {"generator", "position"}
    assert state["objective"]["position"].tolist() == [[0, 2 * 6]], "two batches of ipc·A·C = 6 read"
    spare = tmp_path / "spare.pt"
    spare.write_bytes(part.read_bytes())  # the resumed run below overwrites its checkpoint
    resumed = _lgm(lite0, toy_real, checkpoint=part, resume=True)
    torch.testing.assert_close(resumed.images, full.images, rtol=0, atol=0)
    assert resumed.meta["loss_history"] == full.meta["loss_history"]
    # guard: without the objective's state (head generator, stream position) the run ends elsewhere
    monkeypatch.setattr(LGMObjective, "load_state_dict", lambda self, s: None)
    forgetful = _lgm(lite0, toy_real, checkpoint=spare, resume=True)
    assert not torch.equal(forgetful.images, full.images)


def test_lgm_resume_refuses_another_dataset_or_head(lite0, toy_real, tmp_path):
    ckpt = tmp_path / "c.pt"
    _lgm(lite0, toy_real, checkpoint=ckpt, steps=2)
    other = TensorImageDataset(toy_real.images, toy_real.targets.flip(0), toy_real.classes, "toy")
    with pytest.raises(ValueError, match="lgm.labels") as info:
        _lgm(lite0, other, checkpoint=ckpt, resume=True, steps=3, head_std=0.1)
    assert "lgm.head_std: 0.01 in the checkpoint, 0.1 now" in str(info.value)


def test_cli_distill_lgm(tmp_path, capsys, tiny_fmnist_dir, monkeypatch):
    monkeypatch.setenv("SFM_DATA", str(tiny_fmnist_dir))
    out = tmp_path / "l.safetensors"
    assert main(["distill", "--method", "lgm", "--resolution", "32", "--steps", "2", "--augs", "1",
                 "--out", str(out), "--device", "cpu"]) == 0
    ds = DistilledSet.load(out)
    assert ds.meta["method"] == "lgm" and ds.images.shape == (10, 3, 32, 32) and ds.meta["dataset"] == "fashion_mnist"
    assert main(["distill", "--method", "lgm", "--stats", "s.safetensors", "--out", str(tmp_path / "x"),
                 "--device", "cpu"]) == 2
    assert "--dataset" in capsys.readouterr().err
    assert main(["distill", "--out", str(tmp_path / "y"), "--device", "cpu"]) == 2
    assert "--stats" in capsys.readouterr().err


def test_experiments_distilled_caches_lgm_runs_apart_from_sfm(session_cache, monkeypatch):
    from sfm_lib import experiments

    ctx = experiments.prepare("fashion_mnist", "effnet_lite0", 32, images_per_class=6, device="cpu")
    first = experiments.distilled(ctx, method="lgm", steps=1, augs=1, seed=4)
    assert first.meta["method"] == "lgm"
    calls = []
    monkeypatch.setattr(distill, "lgm", lambda *a, **k: calls.append(k) or first)
    again = experiments.distilled(ctx, method="lgm", steps=1, augs=1, seed=4)
    assert not calls and torch.equal(again.images, first.images)
    sfm = experiments.distilled(ctx, steps=1, augs=1, seed=4)
    assert sfm.meta["method"] == "sfm" and not torch.equal(sfm.images, first.images)
    with pytest.raises(ValueError, match="method"):
        experiments.distilled(ctx, method="dm")


def test_bench_methods_measures_seven_configurations(tmp_path, capsys):
    import json

    out = tmp_path / "m.json"
    assert main(["bench", "methods", "--resolution", "32", "--classes", "3", "--steps", "1", "--device", "cpu",
                 "--random-weights", "--threads", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert list(result["runs"]) == ["sfm_A1", "sfm_A10", "lgm_A1", "lgm_A3", "lgm_A10", "clp_A1", "unrolled_A1"]
    for row in result["runs"].values():
        assert row["median_s"] > 0 and row["peak_gib"] > 0 and row["peak_reset"] is True
    r = result["runs"]
    assert result["ratios"]["time"] == pytest.approx(r["lgm_A10"]["median_s"] / r["sfm_A1"]["median_s"], rel=0.01)
    assert result["ratios"]["memory"] == pytest.approx(r["lgm_A10"]["peak_gib"] / r["sfm_A1"]["peak_gib"], rel=0.01)
    assert result["device"] == "cpu" and result["command"].startswith("python -m sfm_lib bench methods")
    assert "LGM A=10 / SFM A=1" in capsys.readouterr().out
