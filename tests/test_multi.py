"""SFM over several backbones: the loss and gradient against per-backbone computations done separately,
two-pass, exact resume, refusals, metadata."""
from __future__ import annotations

import pytest
import torch

from sfm_lib import backbones, distill
from sfm_lib.augment import Augment
from sfm_lib.images import make_images
from sfm_lib.stats import ClassStats

C, RES, CROP1 = 3, 32, 24  # lite1 sees its own input size (24 px) of the same 32 px views


@pytest.fixture(scope="module")
def lite1(session_cache):
    return backbones.load("effnet_lite1")


def _stats(bb, seed, resolution):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(C, bb.feature_dim, generator=g, dtype=torch.float64).abs()
    return ClassStats(means, torch.full((C,), 5), [f"c{i}" for i in range(C)],
                      {"backbone": bb.name, "feature_dim": bb.feature_dim, "resolution": resolution})


@pytest.fixture(scope="module")
def pair(lite0, lite1):
    return [lite0, lite1], [_stats(lite0, 0, RES), _stats(lite1, 1, CROP1)]


def _hand_loss(z: torch.Tensor, labels: torch.Tensor, stats: ClassStats) -> torch.Tensor:
    """1 − cos of the flows f_c = mean_{k≠c} s_k − s_c, by a loop over classes (float64)."""
    s = torch.stack([z[labels == c].mean(0) for c in range(C)]).double()
    m = stats.means.double()
    fs = torch.stack([torch.stack([s[k] for k in range(C) if k != c]).mean(0) - s[c] for c in range(C)])
    fr = torch.stack([torch.stack([m[k] for k in range(C) if k != c]).mean(0) - m[c] for c in range(C)])
    return 1 - torch.nn.functional.cosine_similarity(fs.flatten(), fr.flatten(), dim=0)


def _setup(ipc=2, augs=2):
    images = make_images("pixels", C * ipc, RES, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(C).repeat_interleave(ipc)
    slots = torch.arange(ipc).repeat(C)
    aug = Augment()
    params = aug.sample(C * ipc * augs, torch.Generator().manual_seed(7))
    return images, labels, slots, aug, params


def _multi(pair, weights=None, crops=(None, CROP1), ipc=2, ema=0.0):
    bbs, sts = pair
    phi = distill.MultiBackbone(bbs, crops)
    obj = distill.MultiSFMObjective([distill.SFMObjective(s, phi.device, ipc=ipc, ema=ema) for s in sts],
                                    phi.dims, weights, phi.names)
    return phi, obj


@pytest.mark.parametrize("weights", [None, (3.0, 1.0)])
def test_loss_and_gradient_are_the_weighted_means_of_separate_single_backbone_runs(pair, weights):
    """Multi: one step_gradient through MultiBackbone. Reference: per backbone k, its own forward of the
    same augmented views at its own size, the hand-written flow loss in float64, autograd separately."""
    ipc, augs = 2, 2
    images, labels, slots, aug, params = _setup(ipc, augs)
    phi, obj = _multi(pair, weights)
    loss = distill.step_gradient(images, phi, obj, aug, params, labels, slots, augs, RES)
    grad = images.pixels.grad.clone()

    w = [0.5, 0.5] if weights is None else [weights[0] / sum(weights), weights[1] / sum(weights)]
    view_labels = labels.repeat(augs)
    ref_loss, ref_grad = 0.0, torch.zeros_like(grad)
    for bb, st, size, wk in zip(*pair, (RES, CROP1), w):
        theta = images.pixels.detach().clone().requires_grad_(True)
        x = torch.sigmoid(2 * theta)[torch.arange(C * ipc * augs) % (C * ipc)]
        views = aug.apply(x, params, RES)
        z = bb(bb.preprocess(views, size))
        assert z.shape[1] == bb.feature_dim
        lk = _hand_loss(z, view_labels, st)
        (gk,) = torch.autograd.grad(lk, theta)
        ref_loss += wk * float(lk.detach())
        ref_grad += wk * gk
    assert float(loss) == pytest.approx(ref_loss, rel=1e-5)
    assert ref_grad.abs().max() > 0
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-6 * float(ref_grad.abs().max()))


def test_equal_weights_are_the_default_and_weights_are_normalised(pair):
    phi, obj = _multi(pair)
    assert obj.weights == [0.5, 0.5]
    assert _multi(pair, (2, 6))[1].weights == [0.25, 0.75]
    with pytest.raises(ValueError, match="1 backbone weights for 2 backbones"):
        _multi(pair, (1.0,))
    with pytest.raises(ValueError, match="positive sum"):
        _multi(pair, (0.0, 0.0))


@pytest.mark.parametrize("ema", [0.0, 0.7])
def test_two_pass_gradient_equals_one_pass(pair, ema):
    out = []
    for two_pass in (False, True):
        images, labels, slots, aug, params = _setup()
        phi, obj = _multi(pair, ema=ema)
        if ema:  # running averages "from earlier steps", so the smoothing changes the gradient
            obj.load_state_dict({f"{k}.running": s.means.float().flip(0) for k, s in enumerate(pair[1])})
        loss = distill.step_gradient(images, phi, obj, aug, params, labels, slots, 2, RES,
                                     two_pass=two_pass, chunk_size=5)
        out.append((float(loss), images.pixels.grad.clone()))
    (l1, g1), (l2, g2) = out
    assert l1 == pytest.approx(l2, rel=1e-5)
    assert g1.abs().max() > 0
    torch.testing.assert_close(g2, g1, rtol=1e-4, atol=1e-7 * float(g1.abs().max()))


def _run(pair, **kw):
    base = dict(ipc=1, steps=4, resolution=RES, progress=False, seed=3, backbone_crops=[None, CROP1])
    return distill.sfm(pair[0], pair[1], **{**base, **kw})


def test_killed_and_resumed_run_ends_with_the_same_images(pair, tmp_path):
    kw = dict(steps=5, ipc=2, augs=1, checkpoint_every=2, ema=0.7)
    full = _run(pair, checkpoint=tmp_path / "full.pt", **kw)

    class Killed(Exception):
        pass

    def kill(step, loss, images):
        if step == 3:
            raise Killed

    ckpt = tmp_path / "run.pt"
    with pytest.raises(Killed):
        _run(pair, checkpoint=ckpt, callback=kill, **kw)
    state = torch.load(ckpt, weights_only=True)
    assert state["step"] == 2 and {"0.running", "1.running"} <= set(state["objective"])
    resumed = _run(pair, checkpoint=ckpt, resume=True, **kw)
    torch.testing.assert_close(resumed.images, full.images, rtol=0, atol=0)
    assert resumed.meta["loss_history"] == full.meta["loss_history"]
    # guard: forgetting one backbone's running average changes the result
    state["objective"].pop("1.running")
    torch.save(state, ckpt)
    forgetful = _run(pair, checkpoint=ckpt, resume=True, **kw)
    assert not torch.equal(forgetful.images, full.images)


def test_checkpoint_of_other_backbones_or_weights_is_refused(pair, lite0, tmp_path):
    ckpt = tmp_path / "c.pt"
    _run(pair, checkpoint=ckpt, steps=2)
    with pytest.raises(ValueError, match="weights"):
        _run(pair, checkpoint=ckpt, resume=True, steps=3, backbone_weights=[2, 1])
    with pytest.raises(ValueError, match="other settings.*backbone"):
        distill.sfm(lite0, pair[1][0], ipc=1, steps=3, resolution=RES, progress=False, seed=3,
                    checkpoint=ckpt, resume=True)
    with pytest.warns(UserWarning, match="extracted at 24 px"), pytest.raises(ValueError, match="crops"):
        _run(pair, checkpoint=ckpt, resume=True, steps=3, backbone_crops=[None, None])


def test_metadata_records_every_backbone_and_weight(pair):
    out = _run(pair, steps=2, backbone_weights=[1, 3])
    m = out.meta
    assert m["backbone"] == "effnet_lite0+effnet_lite1"
    assert m["backbones"] == ["effnet_lite0", "effnet_lite1"] and m["backbone_weights"] == [0.25, 0.75]
    assert m["backbone_crops"] == [RES, CROP1] and m["stats_resolution"] == [RES, CROP1]
    assert len(m["loss_history"]) == 2


def test_a_list_of_one_is_the_single_backbone_run(pair, lite0):
    single = distill.sfm(lite0, pair[1][0], ipc=1, steps=3, resolution=RES, progress=False, seed=3)
    listed = distill.sfm([lite0], [pair[1][0]], ipc=1, steps=3, resolution=RES, progress=False, seed=3)
    torch.testing.assert_close(listed.images, single.images, rtol=0, atol=0)
    single.meta.pop("time_s"), listed.meta.pop("time_s")
    assert listed.meta == single.meta and "backbones" not in single.meta


def test_bad_pairings_are_clear_errors(pair, lite0, lite1):
    bbs, sts = pair
    with pytest.raises(ValueError, match="2 backbones but 1 statistics"):
        distill.sfm(bbs, sts[:1], steps=1, resolution=RES, progress=False)
    with pytest.raises(ValueError, match="statistics 1 .*effnet_lite1.*extracted with backbone 'effnet_lite0'"):
        distill.sfm([lite1, lite0], sts, steps=1, resolution=RES, progress=False)
    with pytest.raises(ValueError, match="need lists"):
        distill.sfm(lite0, sts[0], steps=1, resolution=RES, progress=False, backbone_weights=[1])


def test_compile_compiles_every_backbone_of_a_copy(pair, monkeypatch):
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda model, **kw: compiled.append(model) or model)
    out = _run(pair, steps=1, compile=True)
    assert compiled == [b.model for b in pair[0]] and out.meta["compile"] is True
