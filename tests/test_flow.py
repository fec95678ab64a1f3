"""Flows and the SFM loss against independent naive computations (float64 loops)."""

import pytest
import torch
import torch.nn.functional as F

from sfm_lib.flow import (
    class_means,
    decoupled_loss,
    real_flow,
    sfm_loss,
    straight_through_ema,
    subclass_means,
    subclass_real_flow,
    subclass_synthetic_flow,
    synthetic_flow,
)

D = 5


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def naive_means(x, y, c):
    out = []
    for k in range(c):
        rows = [x[i] for i in range(len(y)) if int(y[i]) == k]
        out.append(sum(rows) / len(rows))
    return torch.stack(out)


def naive_flow(mu):
    c = mu.shape[0]
    rows = []
    for i in range(c):
        others = torch.zeros_like(mu[0])
        for k in range(c):
            if k != i:
                others = others + mu[k]
        rows.append(others / (c - 1) - mu[i])
    return torch.stack(rows)


def naive_cos(a, b):
    a, b = a.flatten().tolist(), b.flatten().tolist()
    dot = sum(u * v for u, v in zip(a, b))
    na = sum(u * u for u in a) ** 0.5
    nb = sum(v * v for v in b) ** 0.5
    return dot / (na * nb)


def test_class_means_matches_naive_and_names_empty_classes():
    x = torch.randn(12, D, generator=_gen(), dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 0, 1, 2, 2, 2])
    torch.testing.assert_close(class_means(x, y, 3), naive_means(x, y, 3))
    with pytest.raises(ValueError, match=r"\[1, 3\]"):
        class_means(x[:4], torch.tensor([0, 2, 0, 2]), 4)


def test_real_flow_naive_and_identity():
    mu = torch.randn(6, D, generator=_gen(1), dtype=torch.float64)
    f = real_flow(mu)
    torch.testing.assert_close(f, naive_flow(mu))
    c = mu.shape[0]
    torch.testing.assert_close(f, c / (c - 1) * (mu.mean(0, keepdim=True) - mu))
    with pytest.raises(ValueError, match="at least 2 classes"):
        real_flow(mu[:1])


def test_loss_self_and_opposite():
    f = torch.randn(4, D, generator=_gen(2))
    assert sfm_loss(f, f).item() == pytest.approx(0.0, abs=1e-6)
    assert sfm_loss(-f, f).item() == pytest.approx(2.0, abs=1e-6)
    g = torch.randn(4, D, generator=_gen(3), dtype=torch.float64)
    assert sfm_loss(g, f.double()).item() == pytest.approx(1 - naive_cos(g, f.double()), abs=1e-12)


def test_loss_shift_and_positive_scale_invariance_but_not_negative_scale():
    g = _gen(4)
    c, ipc = 4, 3
    target = real_flow(torch.randn(c, D, generator=g, dtype=torch.float64))
    x = torch.randn(c * ipc, D, generator=g, dtype=torch.float64)
    y = torch.arange(c).repeat_interleave(ipc)
    base = sfm_loss(synthetic_flow(x, y, c), target)
    shift = torch.randn(D, generator=g, dtype=torch.float64) * 10
    shifted = sfm_loss(synthetic_flow(x + shift, y, c), target)
    scaled = sfm_loss(synthetic_flow(3.7 * x, y, c), target)
    negated = sfm_loss(synthetic_flow(-2.0 * x, y, c), target)
    torch.testing.assert_close(shifted, base)
    torch.testing.assert_close(scaled, base)
    assert abs(negated.item() - base.item()) > 1e-3
    torch.testing.assert_close(negated, 2 - base)


def test_ipc_duplicated_equals_ipc1():
    x = torch.randn(5, D, generator=_gen(5), dtype=torch.float64)
    y = torch.arange(5)
    torch.testing.assert_close(synthetic_flow(x.repeat(3, 1), y.repeat(3), 5), synthetic_flow(x, y, 5))


def buggy_flow(x, y, c):
    """Released-code formula: non-target mean over all other *images* (C·IPC − 1 of them)."""
    n = x.shape[0]
    out = []
    for k in range(c):
        own = [x[i] for i in range(n) if int(y[i]) == k]
        rest = [x[i] for i in range(n) if int(y[i]) != k]
        out.append(sum(rest) / (n - 1) - sum(own) / len(own))
    return torch.stack(out)


def test_unequal_counts_per_class_mean_first_and_differs_from_bug():
    g = _gen(6)
    c = 4
    y = torch.tensor([0, 0, 0, 1, 2, 2, 3, 3, 3, 3, 1, 0])
    x = torch.randn(len(y), D, generator=g, dtype=torch.float64)
    expect = naive_flow(naive_means(x, y, c))
    torch.testing.assert_close(synthetic_flow(x, y, c), expect)
    # with IPC > 1 (here: 3 images per class) the released formula is different
    y3 = torch.arange(c).repeat(3)
    x3 = torch.randn(len(y3), D, generator=g, dtype=torch.float64)
    diff = (synthetic_flow(x3, y3, c) - buggy_flow(x3, y3, c)).abs().max()
    assert diff > 1e-2
    # ... while with IPC = 1 it coincides (C·1 − 1 = C − 1)
    torch.testing.assert_close(synthetic_flow(x3[:c], y3[:c], c), buggy_flow(x3[:c], y3[:c], c))


def test_lgm_gradient_at_zero_head_is_positive_multiple_of_flow():
    """Row c of dCE/dW at W = 0, b = 0 on a balanced noiseless batch is +(C−1)/C² · f_c."""
    g = _gen(7)
    c, m = 6, 3
    mu = torch.randn(c, D, generator=g, dtype=torch.float64) * 3
    y = torch.arange(c).repeat(m)
    x = mu[y]
    w = torch.zeros(c, D, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(c, dtype=torch.float64, requires_grad=True)
    F.cross_entropy(x @ w.T + b, y).backward()
    flow = real_flow(mu)
    assert naive_cos(w.grad, flow) > 0.99
    torch.testing.assert_close(w.grad, (c - 1) / c**2 * flow)
    torch.testing.assert_close(b.grad, torch.zeros(c, dtype=torch.float64))


def test_decoupled_loss_is_mse():
    a = torch.randn(3, D, generator=_gen(8))
    b = torch.randn(3, D, generator=_gen(9))
    assert decoupled_loss(a, b).item() == pytest.approx(((a - b) ** 2).mean().item(), rel=1e-6)
    assert decoupled_loss(a, a).item() == 0.0


def test_subclass_k1_equals_class_flow():
    mu = torch.randn(4, D, generator=_gen(10), dtype=torch.float64)
    torch.testing.assert_close(subclass_real_flow(mu, mu[:, None]), real_flow(mu)[:, None])
    # centres averaging to the class mean → the slot-mean of the flows is the class flow
    offsets = torch.randn(4, 3, D, generator=_gen(11), dtype=torch.float64)
    centres = mu[:, None] + offsets - offsets.mean(1, keepdim=True)
    torch.testing.assert_close(subclass_real_flow(mu, centres).mean(1), real_flow(mu))


def test_subclass_hand_computed():
    # C = 2, K = 2, D = 1; synthetic rows: (class, slot, value), slot (0, 0) has two copies.
    feats = torch.tensor([[1.0], [3.0], [6.0], [10.0], [20.0]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 0, 1, 1])
    slots = torch.tensor([0, 0, 1, 0, 1])
    # z00 = 2, z01 = 6, z10 = 10, z11 = 20; s0 = 4, s1 = 15
    # f_{0,k} = s1 − z_{0,k} = 13, 9 ; f_{1,k} = s0 − z_{1,k} = −6, −16
    expect = torch.tensor([[[13.0], [9.0]], [[-6.0], [-16.0]]], dtype=torch.float64)
    torch.testing.assert_close(subclass_synthetic_flow(feats, labels, slots, 2, 2), expect)
    with pytest.raises(ValueError, match=r"\(1, 1\)"):
        subclass_synthetic_flow(feats[:4], labels[:4], slots[:4], 2, 2)


def test_subclass_synthetic_k1_equals_synthetic_flow():
    x = torch.randn(9, D, generator=_gen(12), dtype=torch.float64)
    y = torch.arange(3).repeat(3)
    got = subclass_synthetic_flow(x, y, torch.zeros(9, dtype=torch.long), 3, 1)
    torch.testing.assert_close(got[:, 0], synthetic_flow(x, y, 3))


def test_sfm_loss_gradcheck():
    g = _gen(13)
    c = 3
    y = torch.tensor([0, 1, 2, 0, 2, 1, 1])
    target = real_flow(torch.randn(c, D, generator=g, dtype=torch.float64))
    x = torch.randn(len(y), D, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda f: sfm_loss(synthetic_flow(f, y, c), target), (x,))
    slots = torch.tensor([0, 0, 0, 1, 1, 1, 0])
    centres = torch.randn(c, 2, D, generator=g, dtype=torch.float64)
    sub_target = subclass_real_flow(centres.mean(1), centres)
    assert torch.autograd.gradcheck(
        lambda f: sfm_loss(subclass_synthetic_flow(f, y, slots, c, 2), sub_target), (x,))


def test_low_precision_inputs_give_float32_loss():
    f = torch.randn(4, D, generator=_gen(14))
    loss = sfm_loss(f.bfloat16(), f)
    assert loss.dtype == torch.float32
    assert loss.item() < 1e-3


def test_loss_of_identical_flows_is_exactly_zero_not_negative():
    torch.manual_seed(0)
    for _ in range(20):
        f = torch.randn(10, 1280)
        assert float(sfm_loss(f, f.clone())) >= 0.0
        assert float(sfm_loss(f, -f)) <= 2.0


def test_subclass_means_naive_loop():
    g = torch.Generator().manual_seed(5)
    feats = torch.randn(12, 4, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2] * 4)
    slots = torch.tensor([0, 0, 0, 1, 1, 1] * 2)
    z = subclass_means(feats, labels, slots, 3, 2)
    for c in range(3):
        for k in range(2):
            rows = [i for i in range(12) if labels[i] == c and slots[i] == k]
            torch.testing.assert_close(z[c, k], sum(feats[i] for i in rows) / len(rows))
    with pytest.raises(ValueError, match=r"\(class, slot\) pairs without any sample"):
        subclass_means(feats[:3], labels[:3], slots[:3], 3, 2)


def _flow_loss(s, target):
    return sfm_loss(real_flow(s), target)


def test_straight_through_ema_value_and_gradient():
    """Value: the running average computed by hand. Gradient into the current statistic: ∂L/∂s evaluated
    at the running average (an independent autograd call at a leaf holding that value)."""
    g = torch.Generator().manual_seed(6)
    target = torch.randn(4, 5, generator=g, dtype=torch.float64)
    s1, s2 = (torch.randn(4, 5, generator=g, dtype=torch.float64) for _ in range(2))
    beta = 0.7
    first, running = straight_through_ema(s1, None, beta)
    torch.testing.assert_close(first, s1)
    torch.testing.assert_close(running, s1)
    current = s2.clone().requires_grad_(True)
    smoothed, running = straight_through_ema(current, running, beta)
    by_hand = beta * s1 + (1 - beta) * s2
    torch.testing.assert_close(running, by_hand)
    torch.testing.assert_close(smoothed.detach(), by_hand)
    assert not running.requires_grad
    (grad,) = torch.autograd.grad(_flow_loss(smoothed, target), current)
    leaf = by_hand.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(_flow_loss(leaf, target), leaf)
    torch.testing.assert_close(grad, expected)
    # and not the gradient at the current statistic itself (the point of the estimator)
    at_current = s2.clone().requires_grad_(True)
    (plain,) = torch.autograd.grad(_flow_loss(at_current, target), at_current)
    assert (grad - plain).abs().max() > 1e-3


def test_straight_through_ema_beta_zero_is_identity_and_bad_beta_fails():
    s = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    smoothed, _ = straight_through_ema(s, torch.zeros(3, 2, dtype=torch.float64), 0.0)
    torch.testing.assert_close(smoothed, s)
    for beta in (-0.1, 1.0):
        with pytest.raises(ValueError, match=r"beta must lie in \[0, 1\)"):
            straight_through_ema(s, None, beta)
    with pytest.raises(ValueError, match="running average has shape"):
        straight_through_ema(s, torch.zeros(2, 2), 0.5)
