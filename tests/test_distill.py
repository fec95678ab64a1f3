"""SFM distillation loop: gradients, two-pass equivalence, checkpoints and exact resume, bad input."""
from __future__ import annotations

import pytest
import torch

from sfm_lib import analysis, distill, flow
from sfm_lib.augment import Augment
from sfm_lib.images import make_images
from sfm_lib.stats import ClassStats

C, RES = 3, 32


@pytest.fixture(scope="module")
def toy_stats(lite0):
    g = torch.Generator().manual_seed(0)
    means = torch.randn(C, lite0.feature_dim, generator=g, dtype=torch.float64).abs()
    centres = means[:, None, :] + 0.1 * torch.randn(C, 2, lite0.feature_dim, generator=g, dtype=torch.float64)
    return ClassStats(means, torch.full((C,), 5), [f"c{i}" for i in range(C)],
                      {"backbone": lite0.name, "feature_dim": lite0.feature_dim, "resolution": RES}, centres.float())


def _run(lite0, stats, **kw):
    base = dict(ipc=1, steps=4, resolution=RES, progress=False, seed=3)
    return distill.sfm(lite0, stats, **{**base, **kw})


def _full_and_interrupted(lite0, stats, tmp_path, **kw):
    """An uninterrupted run, and the checkpoint of the same run stopped during step 4 (last saved after 2)."""
    full = _run(lite0, stats, checkpoint=tmp_path / "a.pt", **kw)
    part = tmp_path / "b.pt"

    def stop(step, loss, images):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(lite0, stats, checkpoint=part, callback=stop, **kw)
    return full, part


def _grads(lite0, stats, kind, two_pass, chunk_size, ipc=2, augs=2, ema=0.0):
    torch.manual_seed(0)
    images = make_images(kind, C * ipc, RES, generator=torch.Generator().manual_seed(1),
                         **({"grow_every": 1} if kind == "pyramid" else {}))
    if kind == "pyramid":
        images.grow(1), images.grow(2)  # three levels, so every level gets a gradient
    labels = torch.arange(C).repeat_interleave(ipc)
    slots = torch.arange(ipc).repeat(C)
    objective = distill.SFMObjective(stats, lite0.device, ipc=ipc, ema=ema)
    if ema:  # a running average from "earlier steps", so the smoothing changes the gradient
        objective.load_state_dict({"running": stats.means.float().flip(0)})
    aug = Augment()
    params = aug.sample(C * ipc * augs, torch.Generator().manual_seed(7))
    loss = distill.step_gradient(images, lite0, objective, aug, params, labels, slots, augs, RES,
                                 two_pass=two_pass, chunk_size=chunk_size)
    return float(loss), [p.grad.clone() for p in images.parameters()]


@pytest.mark.parametrize("kind,ema", [("pixels", 0.0), ("pyramid", 0.0), ("pixels", 0.7)])
def test_two_pass_gradient_equals_one_pass(lite0, toy_stats, kind, ema):
    loss1, g1 = _grads(lite0, toy_stats, kind, two_pass=False, chunk_size=1, ema=ema)
    loss2, g2 = _grads(lite0, toy_stats, kind, two_pass=True, chunk_size=5, ema=ema)  # chunks straddle copies
    assert loss1 == pytest.approx(loss2, rel=1e-5)
    for a, b in zip(g1, g2):
        assert a.abs().max() > 0
        # float32 sums in another order: an AVX2 CPU (no AVX-512) put 1e-8 between the two on an entry whose
        # level's largest is 3e-2, so the tolerance is a millionth of the largest entry (a bug moves O(1))
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6 * float(a.abs().max()))


def test_one_pass_gradient_matches_finite_difference(lite0, toy_stats):
    """The loss through decode → augment → φ → flow cosine, differentiated by autograd, against a central
    finite difference along a random direction (float32, so a loose tolerance)."""
    images = make_images("pixels", C, RES, generator=torch.Generator().manual_seed(1))
    labels, slots = torch.arange(C), torch.zeros(C, dtype=torch.long)
    objective = distill.SFMObjective(toy_stats, lite0.device)
    aug = Augment(noise_p=0.0)
    params = aug.sample(C, torch.Generator().manual_seed(2))
    distill.step_gradient(images, lite0, objective, aug, params, labels, slots, 1, RES)
    grad = images.pixels.grad.clone()
    direction = torch.randn(images.pixels.shape, generator=torch.Generator().manual_seed(4))
    direction /= direction.norm()
    eps = 1e-2

    def loss_at(t):
        with torch.no_grad():
            x = torch.sigmoid(2 * (images.pixels + t * direction))
            z = lite0(lite0.preprocess(aug.apply(x, params, RES), RES))
            return float(objective(z, labels, slots))

    fd = (loss_at(eps) - loss_at(-eps)) / (2 * eps)
    assert float((grad * direction).sum()) == pytest.approx(fd, rel=0.05, abs=1e-5)


def test_objective_is_the_flow_cosine(lite0, toy_stats):
    z = torch.randn(2 * C, lite0.feature_dim)
    labels = torch.arange(C).repeat(2)
    obj = distill.SFMObjective(toy_stats, lite0.device, ipc=2)
    syn = torch.stack([z[labels == c].mean(0) for c in range(C)]).double()
    real = toy_stats.means
    fs = syn.sum(0) / (C - 1) - syn * C / (C - 1)  # f_c = mean_{k≠c} s_k − s_c, written another way
    fr = real.sum(0) / (C - 1) - real * C / (C - 1)
    expected = 1 - torch.nn.functional.cosine_similarity(fs.flatten(), fr.flatten(), dim=0)
    assert float(obj(z, labels, torch.zeros_like(labels))) == pytest.approx(float(expected), abs=1e-5)
    mse = distill.SFMObjective(toy_stats, lite0.device, loss="mse")
    assert float(mse(z, labels, labels)) == pytest.approx(float(((syn - real) ** 2).mean()), rel=1e-4)


def test_sfm_reduces_the_loss_and_saves(lite0, toy_stats, tmp_path):
    out = _run(lite0, toy_stats, steps=12)
    hist = out.meta["loss_history"]
    assert len(hist) == 12 and min(hist[-3:]) < hist[0]
    assert out.images.shape == (C, 3, RES, RES) and 0 <= out.images.min() and out.images.max() <= 1
    assert out.labels.tolist() == list(range(C))
    path = tmp_path / "d.safetensors"
    out.save(path)
    back = distill.DistilledSet.load(path)
    torch.testing.assert_close(back.images, out.images)
    assert back.labels.tolist() == out.labels.tolist() and back.classes == out.classes
    assert back.meta["loss_history"] == hist and back.meta["backbone"] == lite0.name


@pytest.mark.parametrize("param,ema", [("pixels", 0.0), ("pyramid", 0.0), ("pixels", 0.7)])
def test_killed_and_resumed_run_ends_with_the_same_images(lite0, toy_stats, tmp_path, param, ema):
    kw = dict(steps=7, param=param, grow_every=2, ipc=2, augs=2, checkpoint_every=2, ema=ema)
    full = _run(lite0, toy_stats, checkpoint=tmp_path / "full.pt", **kw)

    class Killed(Exception):
        pass

    def kill_at_5(step, loss, images):
        if step == 4:  # dies during step 5: the last checkpoint is the one after step 4
            raise Killed

    ckpt = tmp_path / "run.pt"
    with pytest.raises(Killed):
        _run(lite0, toy_stats, checkpoint=ckpt, callback=kill_at_5, **kw)
    state = torch.load(ckpt, weights_only=True)
    assert state["step"] == 4
    resumed = _run(lite0, toy_stats, checkpoint=ckpt, resume=True, **kw)
    torch.testing.assert_close(resumed.images, full.images, rtol=0, atol=0)
    assert resumed.meta["loss_history"] == full.meta["loss_history"]


def test_resume_needs_the_saved_running_average(lite0, toy_stats, tmp_path, monkeypatch):
    """Guards the test above: forgetting the objective's state on resume changes the result."""
    kw = dict(steps=5, ema=0.7, checkpoint_every=2)
    full, part = _full_and_interrupted(lite0, toy_stats, tmp_path, **kw)
    assert "running" in torch.load(part, weights_only=True)["objective"]
    monkeypatch.setattr(distill.SFMObjective, "load_state_dict", lambda self, state: None)
    forgetful = _run(lite0, toy_stats, checkpoint=part, resume=True, **kw)
    assert not torch.equal(forgetful.images, full.images)


def test_objective_with_ema_is_the_loss_at_the_running_class_means(lite0, toy_stats):
    g = torch.Generator().manual_seed(8)
    labels = torch.arange(C).repeat(2)
    beta = 0.6
    objs = {kind: distill.SFMObjective(toy_stats, lite0.device, loss=kind, ipc=2, ema=beta) for kind in ("flow", "mse")}
    running = None
    real = toy_stats.means
    fr = real.sum(0) / (C - 1) - real * C / (C - 1)
    for _ in range(3):
        z = torch.randn(2 * C, lite0.feature_dim, generator=g)
        syn = torch.stack([z[labels == c].double().mean(0) for c in range(C)])
        running = syn if running is None else beta * running + (1 - beta) * syn
        fs = running.sum(0) / (C - 1) - running * C / (C - 1)
        expected = 1 - torch.nn.functional.cosine_similarity(fs.flatten(), fr.flatten(), dim=0)
        assert float(objs["flow"](z, labels, labels * 0)) == pytest.approx(float(expected), abs=1e-5)
        assert float(objs["mse"](z, labels, labels * 0)) == pytest.approx(float(((running - real) ** 2).mean()),
                                                                         rel=1e-4)
    with pytest.raises(ValueError, match="ema must lie in"):
        distill.SFMObjective(toy_stats, lite0.device, ema=1.0)


def test_resume_with_other_settings_is_refused(lite0, toy_stats, tmp_path):
    ckpt = tmp_path / "c.pt"
    _run(lite0, toy_stats, checkpoint=ckpt, steps=2)
    with pytest.raises(ValueError, match="other settings"):
        _run(lite0, toy_stats, checkpoint=ckpt, resume=True, steps=3, ipc=2)


def test_unreadable_checkpoint_is_a_clear_error_and_left_alone(lite0, toy_stats, tmp_path):
    ckpt = tmp_path / "c.pt"
    ckpt.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="unreadable"):
        _run(lite0, toy_stats, checkpoint=ckpt, resume=True)
    assert ckpt.read_bytes() == b"not a checkpoint"


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(lite0, toy_stats, tmp_path, monkeypatch):
    ckpt = tmp_path / "c.pt"
    real_step = distill.step_gradient
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        value = real_step(*a, **k)
        return torch.tensor(float("nan")) if calls["n"] == 4 else value

    monkeypatch.setattr(distill, "step_gradient", flaky)
    with pytest.raises(FloatingPointError, match="last good checkpoint"):
        _run(lite0, toy_stats, checkpoint=ckpt, checkpoint_every=2, steps=6)
    assert torch.load(ckpt, weights_only=True)["step"] == 2


def test_bad_input_is_rejected(lite0, toy_stats):
    other = ClassStats(toy_stats.means, toy_stats.counts, toy_stats.classes, {"backbone": "effnet_lite2"})
    with pytest.raises(ValueError, match="effnet_lite2"):
        _run(lite0, other)
    with pytest.raises(ValueError, match="ipc"):
        _run(lite0, toy_stats, ipc=0)
    with pytest.raises(ValueError, match="unknown image kind"):
        _run(lite0, toy_stats, param="voxels")
    no_centres = ClassStats(toy_stats.means, toy_stats.counts, toy_stats.classes, dict(toy_stats.meta))
    with pytest.raises(ValueError, match="--kmeans 2"):
        _run(lite0, no_centres, subclass=True, ipc=2)
    with pytest.raises(ValueError, match="init_dataset"):
        _run(lite0, toy_stats, init="real")


def test_subclass_targets_run_and_use_the_centres(lite0, toy_stats, monkeypatch):
    from sfm_lib import backbones

    # 1. The target, by a naive loop in float64: f_{c,k} = (1/(C−1)) Σ_{c'≠c} μ_{c'} − z_{c,k}.
    means, centres = toy_stats.means.double(), toy_stats.centres.double()
    naive = torch.empty(C, 2, lite0.feature_dim, dtype=torch.float64)
    for c in range(C):
        others = sum(means[o] for o in range(C) if o != c) / (C - 1)
        for k in range(2):
            naive[c, k] = others - centres[c, k]
    target = distill.SFMObjective(toy_stats, lite0.device, subclass=True, ipc=2).target
    torch.testing.assert_close(target.double(), naive, rtol=1e-6, atol=1e-6)

    # 2. The objective pairs slot j with centre j: with centres that average to the class means,
    # synthetic features equal to centre j for slot j give loss 0, and swapped slots do not.
    g = torch.Generator().manual_seed(4)
    D = 5
    mu = torch.randn(C, D, generator=g, dtype=torch.float64)
    delta = torch.randn(C, D, generator=g, dtype=torch.float64)
    paired = ClassStats(mu, torch.full((C,), 5), [f"c{i}" for i in range(C)], {"feature_dim": D},
                        torch.stack([mu + delta, mu - delta], 1).float())
    objective = distill.SFMObjective(paired, torch.device("cpu"), subclass=True, ipc=2)
    labels, slots = torch.tensor([0, 0, 1, 1, 2, 2] * 3), torch.tensor([0, 1] * 9)
    z = paired.centres[labels, slots]
    assert float(objective(z, labels, slots)) < 1e-6
    assert float(objective(paired.centres[labels, 1 - slots], labels, slots)) > 0.05

    # 3. The loop feeds the views of output image i (the j-th image of its class) to the objective
    # with that class and slot j. A stand-in backbone returns each view's pixel mean, and image i is
    # a flat grey of its own level, so every view can be traced to its image.
    class PixelMean(torch.nn.Module):
        num_features = 3

        def forward(self, x):
            return x.mean(dim=(2, 3))

    fake = backbones.Backbone(PixelMean(), "pixel_mean", (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), torch.device("cpu"))
    st = ClassStats(torch.rand(C, 3, generator=g, dtype=torch.float64), torch.full((C,), 5),
                    [f"c{i}" for i in range(C)], {"backbone": "pixel_mean", "feature_dim": 3},
                    torch.rand(C, 2, 3, generator=g))
    N = 2 * C
    levels = 0.2 + 0.5 * torch.arange(N, dtype=torch.float64) / N
    init = levels.float()[:, None, None, None].expand(N, 3, RES, RES).clone()
    seen = []
    real_call = distill.SFMObjective.__call__

    def spy(self, z, labels, slots):
        seen.append((z.detach().double()[:, 0].clone(), labels.clone(), slots.clone()))
        return real_call(self, z, labels, slots)

    monkeypatch.setattr(distill.SFMObjective, "__call__", spy)
    out = distill.sfm(fake, st, ipc=2, steps=1, resolution=RES, progress=False, subclass=True, init=init,
                      lr=1e-9, augs=3, augment=Augment(noise_p=0.0))
    assert out.images.shape[0] == N and out.meta["subclass"] is True
    out_labels = out.labels.tolist()
    rank = [out_labels[:i].count(out_labels[i]) for i in range(N)]  # image i is the rank[i]-th of its class
    (z, labels, slots), = seen
    assert len(z) == 3 * N
    image = ((z - 0.2) * N / 0.5).round().long()
    assert torch.allclose(z, levels[image], atol=1e-4), "every view is a flat grey of one image"
    assert sorted(image.tolist()) == sorted(list(range(N)) * 3)
    for v in range(len(z)):
        i = int(image[v])
        assert int(labels[v]) == out_labels[i] and int(slots[v]) == rank[i], v


def test_init_from_real_images_starts_at_those_images(lite0, toy_stats, fmnist_train):
    sub = torch.utils.data.Subset(fmnist_train, range(0, 600))
    sub.targets, sub.classes, sub.name = fmnist_train.targets[:600], fmnist_train.classes, fmnist_train.name
    ten = ClassStats(torch.rand(10, lite0.feature_dim, dtype=torch.float64), torch.ones(10, dtype=torch.long),
                     fmnist_train.classes, {"backbone": lite0.name})
    out = distill.sfm(lite0, ten, steps=0, resolution=28, init="real", init_dataset=sub, progress=False, seed=0)
    for img, y in zip(out.images, out.labels):
        matches = [(img - sub[i][0]).abs().max() < 2e-3 for i in range(600) if int(sub.targets[i]) == int(y)]
        assert any(matches)


def test_an_existing_checkpoint_is_never_overwritten_by_a_fresh_run(lite0, toy_stats, tmp_path):
    ckpt = tmp_path / "c.pt"
    _run(lite0, toy_stats, checkpoint=ckpt, steps=2)
    before = ckpt.read_bytes()
    with pytest.raises(FileExistsError, match="resume"):
        _run(lite0, toy_stats, checkpoint=ckpt, steps=2)
    assert ckpt.read_bytes() == before


def test_snapshots_keep_the_images_after_the_asked_steps(lite0, toy_stats):
    snaps = distill.Snapshots([1, 3])
    out = _run(lite0, toy_stats, steps=3, callback=snaps)
    assert sorted(snaps.images) == [1, 3]
    torch.testing.assert_close(snaps.images[3], out.images)
    assert not torch.equal(snaps.images[1], snaps.images[3])


def test_cosine_schedule_values():
    import math

    assert distill._lr_at(0, 100, 0.1, "cosine") == pytest.approx(0.1)
    assert distill._lr_at(50, 100, 0.1, "cosine") == pytest.approx(0.05)
    assert distill._lr_at(25, 100, 0.1, "cosine") == pytest.approx(0.05 * (1 + math.cos(math.pi / 4)))
    assert distill._lr_at(99, 100, 0.1, "cosine") < 0.1 * 1e-3
    assert distill._lr_at(99, 100, 0.1, "constant") == 0.1


def test_cosine_schedule_resumes_exactly(lite0, toy_stats, tmp_path):
    kw = dict(steps=5, schedule="cosine", checkpoint_every=2)
    full, part = _full_and_interrupted(lite0, toy_stats, tmp_path, **kw)
    resumed = _run(lite0, toy_stats, checkpoint=part, resume=True, **kw)
    torch.testing.assert_close(resumed.images, full.images, rtol=0, atol=0)


def test_gradient_agreement_against_a_hand_computation(lite0, toy_stats):
    images = torch.rand(C, 3, RES, RES, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(C)
    aug = Augment()
    with torch.no_grad():  # targets near the images' own features: the gradient is then sensitive to the views
        near = lite0(lite0.preprocess(images, RES)).double()
    near = near + 0.05 * near.std() * torch.randn(near.shape, generator=torch.Generator().manual_seed(1))
    toy_stats = ClassStats(near, torch.ones(C, dtype=torch.long), list("abc"), {"backbone": lite0.name})
    got = analysis.gradient_agreement(lite0, toy_stats, images, labels, aug, RES, draws=4, augs=(1, 4), betas=(0.5,),
                                     warmup=2)
    assert float(got["A=1"].min()) < 0.99
    assert set(got) == {"A=1", "A=4", "ema β=0.5"} and [len(v) for v in got.values()] == [4, 1, 2]
    torch.testing.assert_close(got["A=4"], torch.ones(1), atol=1e-6, rtol=0)  # the estimate is the reference
    gen = torch.Generator().manual_seed(0)  # the same draws, redone by hand
    with torch.no_grad():
        draws = [lite0(lite0.preprocess(aug(images, RES, gen), RES)).double() for _ in range(4)]
    target = flow.real_flow(toy_stats.means.double())

    def grad(s):
        s = s.clone().requires_grad_(True)
        fs = s.sum(0) / (C - 1) - s * C / (C - 1)
        loss = 1 - torch.nn.functional.cosine_similarity(fs.flatten(), target.flatten(), dim=0)
        return torch.autograd.grad(loss, s)[0].flatten()

    ref = grad(sum(draws) / 4)
    cos = lambda a, b: float(a @ b / (a.norm() * b.norm()))  # noqa: E731
    assert got["A=1"].tolist() == pytest.approx([cos(grad(d), ref) for d in draws], abs=1e-5)
    ema2 = 0.5 * (0.5 * draws[0] + 0.5 * draws[1]) + 0.5 * draws[2]
    ema3 = 0.5 * ema2 + 0.5 * draws[3]
    assert got["ema β=0.5"].tolist() == pytest.approx([cos(grad(ema2), ref), cos(grad(ema3), ref)], abs=1e-5)
    with pytest.raises(ValueError, match="draws"):
        analysis.gradient_agreement(lite0, toy_stats, images, labels, aug, RES, draws=4, augs=(8,))


def test_class_means_by_reshape_equal_the_index_path():
    from sfm_lib.objectives import ViewLayout

    augs, ipc, dim = 3, 2, 5
    z = torch.randn(augs * C * ipc, dim, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(C).repeat_interleave(ipc).repeat(augs)  # copy-major views of class-major images
    slots = torch.arange(ipc).repeat(C).repeat(augs)
    layout = ViewLayout(augs, C, ipc)
    torch.testing.assert_close(layout.class_means(z), flow.class_means(z, labels, C), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layout.subclass_means(z), flow.subclass_means(z, labels, slots, C, ipc),
                               rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="augs=3"):
        layout.class_means(z[:-1])


def test_objectives_read_nothing_back_to_the_host(lite0, toy_stats, monkeypatch):
    """With the layout the SFM loss (class means, flow, ema) runs without .item() / .tolist()."""
    from sfm_lib.objectives import ViewLayout

    def forbidden(*a, **k):
        raise AssertionError("host sync inside the step")

    z = torch.randn(2 * C, lite0.feature_dim)
    labels = torch.arange(C).repeat(2)
    for kw in ({}, {"ema": 0.5}, {"subclass": True, "ipc": 1}):
        obj = distill.SFMObjective(toy_stats, lite0.device, **kw)
        obj.layout = ViewLayout(2, C, 1)
        monkeypatch.setattr(torch.Tensor, "item", forbidden)
        monkeypatch.setattr(torch.Tensor, "tolist", forbidden)
        obj(z, labels, labels * 0)
        obj(z, labels, labels * 0)
        monkeypatch.undo()
    with pytest.raises(AssertionError, match="host sync"):  # guard: the general path does read back
        monkeypatch.setattr(torch.Tensor, "tolist", forbidden)
        distill.SFMObjective(toy_stats, lite0.device)(z, labels, labels * 0)


def test_resume_names_every_difference(lite0, toy_stats, tmp_path):
    ckpt = tmp_path / "c.pt"
    _run(lite0, toy_stats, checkpoint=ckpt, steps=2, schedule="cosine", param="pyramid", grow_every=1)
    other_stats = ClassStats(toy_stats.means + 1e-9, toy_stats.counts, toy_stats.classes, dict(toy_stats.meta),
                             toy_stats.centres)
    with pytest.raises(ValueError, match="other settings") as info:
        _run(lite0, other_stats, checkpoint=ckpt, resume=True, steps=3, schedule="cosine", param="pyramid",
             grow_every=2, augment=Augment(noise_p=0.1), ema=0.5)
    msg = str(info.value)
    for key in ("steps: 2 in the checkpoint, 3 now", "grow_every: 1 in the checkpoint, 2 now", "augment:",
                "sfm.statistics:", "sfm.ema: 0.0 in the checkpoint, 0.5 now"):
        assert key in msg
    # a constant schedule does not depend on the number of steps: a finished run may be extended
    ckpt2 = tmp_path / "d.pt"
    short = _run(lite0, toy_stats, checkpoint=ckpt2, steps=2)
    longer = _run(lite0, toy_stats, checkpoint=ckpt2, steps=3, resume=True)
    assert longer.meta["loss_history"][:2] == short.meta["loss_history"]
    assert len(longer.meta["loss_history"]) == 3


def test_non_finite_loss_names_the_step(lite0, toy_stats, monkeypatch):
    real_step = distill.step_gradient
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        value = real_step(*a, **k)
        return torch.tensor(float("inf")) if calls["n"] == 3 else value

    monkeypatch.setattr(distill, "step_gradient", flaky)
    with pytest.raises(FloatingPointError, match=r"inf at step 2 \(found when reading back steps 0–4\)"):
        _run(lite0, toy_stats, steps=5)


def test_out_of_memory_names_the_setting_to_lower(lite0, toy_stats, monkeypatch):
    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")

    monkeypatch.setattr(distill, "step_gradient", oom)
    with pytest.raises(torch.OutOfMemoryError, match="--two-pass") as info:
        _run(lite0, toy_stats, augs=2)
    assert "--augs, now 2" in str(info.value) and "--ipc" in str(info.value)
    with pytest.raises(torch.OutOfMemoryError, match="--chunk-size, now 4"):
        _run(lite0, toy_stats, two_pass=True, chunk_size=4)


def test_compile_flag_compiles_a_copy_of_the_backbone(lite0, toy_stats, monkeypatch):
    compiled = []

    def fake_compile(model, **kw):
        compiled.append(model)
        return model

    monkeypatch.setattr(torch, "compile", fake_compile)
    out = _run(lite0, toy_stats, steps=1, compile=True)
    assert compiled == [lite0.model] and out.meta["compile"] is True
    _run(lite0, toy_stats, steps=1)
    assert len(compiled) == 1


def test_memory_plan_on_cpu_is_explicit(lite0, toy_stats):
    stats_cfg = distill.DistillConfig(ipc=1, steps=1, resolution=RES)
    d = distill.Distiller(lite0, distill.SFMObjective(toy_stats, lite0.device), stats_cfg, toy_stats.classes)
    assert d.plan_memory() == (False, 256)
    cfg = distill.DistillConfig(ipc=1, steps=1, resolution=RES, two_pass=True, chunk_size=7)
    d = distill.Distiller(lite0, distill.SFMObjective(toy_stats, lite0.device), cfg, toy_stats.classes)
    assert d.plan_memory() == (True, 7)


def test_memory_plan_on_cuda_from_free_memory(lite0, toy_stats, monkeypatch):
    """The automatic plan with a stand-in for the CUDA queries: one pass when all views fit in 80 % of the
    free memory (after images, gradients, Adam state), else two-pass with the largest chunk that fits."""
    cfg = distill.DistillConfig(ipc=2, steps=1, resolution=RES, augs=4)  # 24 views
    d = distill.Distiller(lite0, distill.SFMObjective(toy_stats, lite0.device, ipc=2), cfg, toy_stats.classes)
    fixed = 4 * C * 2 * 3 * RES * RES * 4
    monkeypatch.setattr(d, "_bytes_per_view", lambda: 1000.0)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    for free, expected in [((fixed + 24_000) / 0.8 + 10, (False, 24)), ((fixed + 10_000) / 0.8 + 10, (True, 10))]:
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev=None, f=free: (int(f), 10**12))
        d.two_pass, d.chunk_size = None, None
        assert d.plan_memory() == expected
    d.two_pass, d.chunk_size = True, None  # an explicit two-pass keeps its setting, the chunk is planned
    assert d.plan_memory() == (True, 10)


def test_the_plan_counts_the_final_pyramid_of_the_papers_imagenet1k_ipc10_run(monkeypatch):
    """Fixed bytes of the plan = 4 × (every parameter of the LAST pyramid level), from shapes alone: the
    images of ImageNet-1k at IPC 10, 256 px, grown on the meta device through all nine levels (the random
    draws of new levels are meta tensors too, so nothing of the 10 GB is allocated)."""
    from sfm_lib import images as images_mod, recipes

    monkeypatch.setattr(images_mod, "_randn", lambda shape, generator: torch.empty(shape, device="meta"))

    paper = recipes.get("paper")
    pyr = images_mod.make_images(paper.param, 10_000, 256, grow_every=1).to("meta")
    step = 1
    while pyr.grow(step):
        step += 1
    last = sum(p.numel() * p.element_size() for p in pyr.parameters())
    assert pyr.num_levels == 9 and last == 10_000 * 3 * sum(4 ** k for k in range(9)) * 4
    fresh = images_mod.make_images(paper.param, 10_000, 256, grow_every=1).to("meta")  # step 0: one 1×1 level
    assert sum(p.numel() for p in fresh.parameters()) == 10_000 * 3
    assert 4 * fresh.final_numel() * 4 == 4 * last  # params, grads, Adam's two moments
    assert 4 * last / 2 ** 30 > 39  # the ~39 GiB the step-0 plan used to miss


def test_the_plan_made_at_step_0_still_fits_after_the_last_growth(lite0, toy_stats, monkeypatch):
    """CUDA's queries mocked: the plan is made at step 0, when the pyramid holds one 1×1 level. Once every
    level exists, its fixed bytes (the real parameters ×4) plus the views it lets one pass (or one chunk)
    hold must still be within the 80 % of free memory it planned for. (The old plan counted the 1×1 level
    only and chose one pass here.)"""
    res, ipc = 64, 2
    cfg = distill.DistillConfig(ipc=ipc, steps=40, resolution=res, param="pyramid", grow_every=1)
    d = distill.Distiller(lite0, distill.SFMObjective(toy_stats, lite0.device, ipc=ipc), cfg, toy_stats.classes)
    per_view, views = 50_000.0, C * ipc
    final = 4 * 4 * C * ipc * 3 * sum(s * s for s in [1, 2, 4, 8, 16, 32, 64])
    free = (final + per_view * views / 2) / 0.8 + 1  # all views fit next to the 1×1 level, half next to the last
    monkeypatch.setattr(d, "_bytes_per_view", lambda: per_view)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev=None: (int(free), 10**12))
    d.two_pass, d.chunk_size = None, None
    two_pass, chunk = d.plan_memory()
    step = 1
    while d.images.grow(step):
        step += 1
    held = 4 * sum(p.numel() * p.element_size() for p in d.images.parameters())
    assert held == final
    assert held + per_view * (chunk if two_pass else views) <= 0.8 * free, (two_pass, chunk)


def test_a_resumed_run_plans_its_memory_afresh(lite0, toy_stats, tmp_path, monkeypatch):
    """The automatic plan is not restored from the checkpoint: a resumed run measures again."""
    ckpt = tmp_path / "run.ckpt"
    cfg = dict(ipc=1, steps=2, resolution=RES, checkpoint=ckpt, checkpoint_every=1, progress=False)
    distill.Distiller(lite0, distill.SFMObjective(toy_stats, lite0.device), distill.DistillConfig(**cfg),
                      toy_stats.classes).run()
    state = torch.load(ckpt, weights_only=True)
    state["two_pass"], state["chunk_size"] = True, 3  # as an automatic plan on another machine would leave it
    torch.save(state, ckpt)
    d = distill.Distiller(lite0, distill.SFMObjective(toy_stats, lite0.device),
                          distill.DistillConfig(**{**cfg, "steps": 3, "resume": True}), toy_stats.classes)
    d.run()
    assert (d.two_pass, d.chunk_size) == (False, 256)  # the CPU's own plan, not the checkpoint's


def test_a_call_whose_labels_are_not_in_the_layouts_order_takes_the_general_path(toy_stats):
    """The review's case: the objective was used through the loop (its layout set), then called again with
    as many rows but the labels in another order. The loss must be the one of those labels (the index
    path), not the layout's reshape of rows it no longer describes."""
    from sfm_lib.objectives import ViewLayout

    augs, ipc = 2, 2
    layout = ViewLayout(augs, C, ipc)
    g = torch.Generator().manual_seed(3)
    z = torch.randn(layout.size, toy_stats.feature_dim, generator=g)
    for kw in ({}, {"subclass": True}):
        obj = distill.SFMObjective(toy_stats, "cpu", ipc=ipc, **kw)
        obj.layout = layout
        labels, slots = layout.labels(), layout.slots()
        in_order = obj(z, labels, slots)
        perm = torch.randperm(layout.size, generator=g)
        shuffled = obj(z, labels[perm], slots[perm])  # same rows, other labels: other class means
        general = distill.SFMObjective(toy_stats, "cpu", ipc=ipc, **kw)(z, labels[perm], slots[perm])
        torch.testing.assert_close(shuffled, general)
        assert not torch.allclose(shuffled, in_order)
        # and back in order, the layout path is used again (same value as the general path there)
        torch.testing.assert_close(obj(z, labels, slots), in_order)


@pytest.mark.parametrize("param", ["pixels", "pyramid"])
def test_the_per_view_probe_runs_the_whole_view_pipeline(lite0, toy_stats, monkeypatch, param):
    """The probe behind the CUDA plan (its CUDA counters mocked, so it runs here): decode of images at the
    final size, augmentation, preprocessing, forward and backward, without touching the run's own images."""
    calls = []
    for name in ("synchronize", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, lambda dev=None: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda dev=None: 0)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda dev=None: calls.append(1) or 4000)
    cfg = distill.DistillConfig(ipc=1, steps=1, resolution=RES, param=param, grow_every=1)
    d = distill.Distiller(lite0, distill.SFMObjective(toy_stats, lite0.device), cfg, toy_stats.classes)
    before = [p.detach().clone() for p in d.images.parameters()]
    assert d._bytes_per_view(probe=4) == 1000.0 and calls == [1]
    assert all(torch.equal(a, b) and p.grad is None for a, b, p in zip(before, d.images.parameters(),
                                                                       d.images.parameters()))
