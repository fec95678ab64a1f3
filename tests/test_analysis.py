"""analysis: the LGM head gradient against hand-written loops and autograd, the flow identity at W = 0,
and the step-to-step cosines."""
from __future__ import annotations

import math

import pytest
import torch

from sfm_lib import analysis
from sfm_lib.augment import Augment


def _clusters(C: int, per_class: int, D: int, seed: int = 0, spread: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    centres = 3 * torch.randn(C, D, generator=g, dtype=torch.float64)
    labels = torch.arange(C).repeat_interleave(per_class)
    feats = centres[labels] + spread * torch.randn(len(labels), D, generator=g, dtype=torch.float64)
    perm = torch.randperm(len(labels), generator=g)  # shuffled: the identity must not depend on order
    return feats[perm], labels[perm]


def _naive_gradient(h, y, W, b):
    """∂CE/∂W, ∂CE/∂b by explicit loops over samples and classes (float64)."""
    N, D = h.shape
    C = W.shape[0]
    gw = [[0.0] * D for _ in range(C)]
    gb = [0.0] * C
    for i in range(N):
        logits = [sum(W[c, d].item() * h[i, d].item() for d in range(D)) + b[c].item() for c in range(C)]
        top = max(logits)
        ex = [math.exp(z - top) for z in logits]
        total = sum(ex)
        for c in range(C):
            r = ex[c] / total - (1.0 if int(y[i]) == c else 0.0)
            gb[c] += r / N
            for d in range(D):
                gw[c][d] += r * h[i, d].item() / N
    return torch.tensor(gw, dtype=torch.float64), torch.tensor(gb, dtype=torch.float64)


def _naive_flow(h, y, C):
    """f_c = mean_{k≠c} μ_k − μ_c with μ_k the mean of the rows of class k, by loops."""
    D = h.shape[1]
    mu = []
    for c in range(C):
        rows = [h[i] for i in range(len(y)) if int(y[i]) == c]
        mu.append([sum(r[d].item() for r in rows) / len(rows) for d in range(D)])
    return torch.tensor([[sum(mu[k][d] for k in range(C) if k != c) / (C - 1) - mu[c][d] for d in range(D)]
                         for c in range(C)], dtype=torch.float64)


def test_head_gradient_at_zero_is_the_batch_flow_for_a_class_balanced_batch():
    C, D = 5, 7
    h, y = _clusters(C, 4, D)
    W, b = torch.zeros(C, D, dtype=torch.float64), torch.zeros(C, dtype=torch.float64)
    gw_loop, gb_loop = _naive_gradient(h, y, W, b)
    expected = (C - 1) / C**2 * _naive_flow(h, y, C)
    torch.testing.assert_close(gw_loop, expected, rtol=1e-13, atol=1e-14)  # the identity itself
    assert gb_loop.abs().max() < 1e-15
    gw, gb = analysis.head_gradient(h, y, W)
    torch.testing.assert_close(gw, expected, rtol=1e-13, atol=1e-14)
    assert gb.abs().max() < 1e-15


def test_head_gradient_at_zero_is_not_the_flow_for_an_unbalanced_batch():
    C, D = 4, 6
    h, y = _clusters(C, 5, D)
    keep = torch.ones(len(y), dtype=torch.bool)
    keep[(y == 0).nonzero().flatten()[:3]] = False
    gw, _ = analysis.head_gradient(h[keep], y[keep], torch.zeros(C, D, dtype=torch.float64))
    flow_ = _naive_flow(h[keep], y[keep], C)
    assert (gw - (C - 1) / C**2 * flow_).abs().max() > 1e-3


@pytest.mark.parametrize("chunk_size", [3, 8192])
def test_head_gradient_matches_autograd_and_loops(chunk_size):
    C, D = 4, 5
    h, y = _clusters(C, 3, D, seed=1)
    g = torch.Generator().manual_seed(2)
    W = 0.3 * torch.randn(C, D, generator=g, dtype=torch.float64)
    b = 0.2 * torch.randn(C, generator=g, dtype=torch.float64)
    Wl, bl = W.clone().requires_grad_(True), b.clone().requires_grad_(True)
    torch.nn.functional.cross_entropy(h @ Wl.T + bl, y).backward()
    gw, gb = analysis.head_gradient(h, y, W, b, chunk_size=chunk_size)
    torch.testing.assert_close(gw, Wl.grad, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(gb, bl.grad, rtol=1e-12, atol=1e-14)
    gw_loop, gb_loop = _naive_gradient(h, y, W, b)
    torch.testing.assert_close(gw, gw_loop, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(gb, gb_loop, rtol=1e-12, atol=1e-14)


def test_head_gradient_takes_a_stack_of_heads():
    C, D = 3, 4
    h, y = _clusters(C, 5, D, seed=5)
    W = torch.randn(6, C, D, dtype=torch.float64)
    b = torch.randn(6, C, dtype=torch.float64)
    gw, gb = analysis.head_gradient(h, y, W, b, chunk_size=4)
    assert gw.shape == (6, C, D) and gb.shape == (6, C)
    for k in range(6):
        one_w, one_b = analysis.head_gradient(h, y, W[k], b[k])
        torch.testing.assert_close(gw[k], one_w, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(gb[k], one_b, rtol=1e-12, atol=1e-14)


def test_lgm_flow_cosine_orientation_and_limits():
    C, D = 6, 16
    h, y = _clusters(C, 50, D, spread=2.0)
    df = analysis.lgm_flow_cosine(h, y, C, sigmas=(0.0, 1.0), images_per_class=(1, 10, 0), draws=3)
    assert set(df.columns) >= {"sigma", "images_per_class", "whole_split", "draw", "cosine",
                               "cosine_batch_flow"}
    assert len(df) == 3 * 3 * 2
    at0 = df[df.sigma == 0.0]
    # at W = 0 every class-balanced batch's gradient is its own flow, with a + sign
    assert (at0.cosine_batch_flow - 1).abs().max() < 1e-12
    whole = at0[at0.whole_split]
    assert (whole.cosine - 1).abs().max() < 1e-12 and (whole.images_per_class == 50).all()
    # one noisy image per class gives a worse estimate of the global flow than ten
    small = at0[at0.images_per_class == 1].cosine.mean()
    large = at0[at0.images_per_class == 10].cosine.mean()
    assert 0 < small < large < 1
    # a large head no longer has a uniform softmax: the gradient leaves the flow
    assert df[(df.sigma == 1.0) & df.whole_split].cosine.max() < 0.99


def test_lgm_flow_cosine_uses_the_given_means():
    C, D = 3, 4
    h, y = _clusters(C, 5, D)
    means = torch.randn(C, D, dtype=torch.float64)
    df = analysis.lgm_flow_cosine(h, y, C, means=-means, sigmas=(0.0,), images_per_class=(0,), draws=1)
    df2 = analysis.lgm_flow_cosine(h, y, C, means=means, sigmas=(0.0,), images_per_class=(0,), draws=1)
    assert df.cosine[0] == pytest.approx(-df2.cosine[0], abs=1e-12)
    with pytest.raises(ValueError, match="fewer than images_per_class"):
        analysis.lgm_flow_cosine(h, y, C, images_per_class=(6,))


def test_step_to_step_cosine_against_hand_computed_gradients():
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    fixed = torch.randn_like(x)

    def deterministic(images, gen):
        return (images * fixed).sum()

    def random_direction(images, gen):
        d = torch.randn(images.shape, generator=gen, dtype=images.dtype)
        return (images ** 2 * d).sum()

    df = analysis.step_to_step_cosine({"fixed": deterministic, "random": random_direction}, x, steps=4, seed=7)
    assert list(df.method.unique()) == ["fixed", "random"] and len(df) == 2 * 3
    assert (df[df.method == "fixed"].cosine_next - 1).abs().max() < 1e-12
    gen = torch.Generator().manual_seed(7)
    grads = [(2 * x * torch.randn(x.shape, generator=gen, dtype=x.dtype)).flatten() for _ in range(4)]
    mean = torch.stack(grads).mean(0)
    cos = torch.nn.functional.cosine_similarity
    got = df[df.method == "random"]
    for t in range(3):
        assert got.cosine_next.iloc[t] == pytest.approx(float(cos(grads[t], grads[t + 1], dim=0)), abs=1e-12)
        assert got.cosine_mean.iloc[t] == pytest.approx(float(cos(grads[t], mean, dim=0)), abs=1e-12)
    with pytest.raises(ValueError, match="steps must be"):
        analysis.step_to_step_cosine({"fixed": deterministic}, x, steps=1)


def _flow(means):
    C = len(means)
    return torch.stack([(means.sum(0) - means[c]) / (C - 1) - means[c] for c in range(C)])


def _cosine(a, b):
    a, b = a.double().flatten(), b.double().flatten()
    return float(a @ b / (a.norm() * b.norm()))


def test_closed_form_matches_the_lgm_objective_gradient():
    from sfm_lib import objectives

    C, D = 5, 9
    h, y = _clusters(C, 4, D, seed=3)
    g = torch.Generator().manual_seed(4)
    W = 0.05 * torch.randn(C, D, generator=g)
    gw, gb = analysis.head_gradient(h, y, W)
    lw, lb = objectives.head_gradient(h.float(), y, W, torch.zeros(C))
    torch.testing.assert_close(lw.double(), gw, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(lb.double(), gb, rtol=1e-4, atol=1e-6)


def test_image_loss_with_the_sfm_objective_is_the_flow_loss_of_the_views(lite0, single_thread):
    from sfm_lib import objectives
    from sfm_lib import stats as stats_mod

    C, crop = 3, 32
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2 * C, 3, crop, crop, generator=g)
    labels = torch.arange(C).repeat(2)
    means = torch.randn(C, lite0.feature_dim, generator=g, dtype=torch.float64)
    st = stats_mod.ClassStats(means, torch.ones(C, dtype=torch.long), ["a", "b", "c"], {"backbone": lite0.name})
    objective = objectives.SFMObjective(st, lite0.device, ipc=2)
    loss_fn = analysis.image_loss(objective, lite0, labels, Augment.none(), crop, augs=2)
    value = loss_fn(images, torch.Generator().manual_seed(1))
    with torch.no_grad():
        z = lite0.features(images, crop).double()
    # two identical (identity) views per image leave the class means unchanged
    s = torch.stack([z[labels == c].mean(0) for c in range(C)])
    assert float(value) == pytest.approx(1 - _cosine(_flow(s), _flow(means)), abs=1e-5)


def test_lgm_with_a_zero_head_and_balanced_batches_is_sfm_against_the_batch_flow(lite0, single_thread,
                                                                                 fmnist_train):
    """The theory on the real LGM objective: at W = 0 with class-balanced real batches, LGM's loss is
    1 − cos(flow of the real batch, flow of the synthetic views)."""
    from sfm_lib import data, objectives
    from sfm_lib.data import real_images
    from sfm_lib.objectives import RealStream

    crop, C = 32, 10
    train = data.subset_per_class(fmnist_train, 4)
    objective = objectives.LGMObjective(train, lite0, ipc=1, augs=2, resolution=crop, augment=Augment.none(),
                                        head_std=0.0, balanced=True, seed=3)
    labels = torch.arange(C)
    images = torch.rand(C, 3, crop, crop, generator=torch.Generator().manual_seed(0))
    loss_fn = analysis.image_loss(objective, lite0, labels, Augment.none(), crop, augs=2)
    value = float(loss_fn(images, torch.Generator().manual_seed(1)).detach())
    stream = RealStream(train, 2 * C, seed=3, balanced=True)  # the same stream: the same first batch
    idx = stream.next_indices()
    with torch.no_grad():
        z_real = lite0.features(real_images(train, idx, crop), crop).double()
        z_syn = lite0.features(images, crop).double()
    y_real = stream.targets[idx]
    real_means = torch.stack([z_real[y_real == c].mean(0) for c in range(C)])
    assert float(value) == pytest.approx(1 - _cosine(_flow(z_syn), _flow(real_means)), abs=1e-4)
