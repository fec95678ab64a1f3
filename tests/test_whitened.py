"""scripts/choose_whitened.py (candidate (a), whitened flows, measured and not in sfm_lib): its covariance,
target and losses against independent computations."""
import importlib.util
from pathlib import Path

import pytest
import torch

from sfm_lib import flow
from sfm_lib.stats import ClassStats

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("choose_whitened", ROOT / "scripts" / "choose_whitened.py")
whitened = importlib.util.module_from_spec(spec)
spec.loader.exec_module(whitened)


def _data(n=3000, d=6, c=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % c
    feats = torch.randn(n, d, generator=g) @ torch.randn(d, d, generator=g) + 3 * torch.randn(c, d, generator=g)[labels]
    means = torch.stack([feats[labels == k].double().mean(0) for k in range(c)])
    return feats, labels, means


def test_within_class_covariance_is_the_count_weighted_mean_of_the_class_covariances():
    feats, labels, means = _data(n=20000)  # more rows than one block
    got = whitened.within_class_covariance(feats, labels, means)
    want = sum((labels == k).sum() * torch.cov(feats[labels == k].double().T, correction=0)
               for k in range(len(means))) / len(feats)
    assert torch.allclose(got, want, atol=1e-10)


def test_the_whitened_flow_solves_the_regularised_system_at_the_asked_scale():
    feats, labels, means = _data()
    sw = whitened.within_class_covariance(feats, labels, means)
    f = flow.real_flow(means)
    fw = whitened.whitened_flow(means, sw, kappa=0.1, scale=0.3)
    assert fw.norm() == pytest.approx(0.3 * float(f.norm()))
    lam = 0.1 * float(torch.trace(sw)) / sw.shape[0]
    direction = fw @ (sw + lam * torch.eye(sw.shape[0], dtype=sw.dtype))  # ∝ F
    assert torch.allclose(direction / direction.norm(), f / f.norm(), atol=1e-10)
    # a huge ridge whitens nothing: the direction is SFM's own flow
    assert flow.sfm_loss(whitened.whitened_flow(means, sw, kappa=1e9, scale=1.0), f) < 1e-10


def test_the_losses_are_sfms_cosine_and_a_relative_mse_that_a_shift_does_not_change():
    feats, labels, means = _data()
    stats = ClassStats(means=means, counts=torch.bincount(labels).double(), classes=[str(k) for k in range(4)])
    target = whitened.whitened_flow(means, whitened.within_class_covariance(feats, labels, means), 0.1, 0.3)
    z = torch.randn(8, 6, dtype=torch.float64)
    y = torch.arange(8) % 4
    cos = whitened.WhitenedFlowObjective(stats, torch.device("cpu"), target, "cos", ema=0.0)
    assert cos(z, y, y) == pytest.approx(float(flow.sfm_loss(flow.synthetic_flow(z, y, 4), target)), abs=1e-6)
    mse = whitened.WhitenedFlowObjective(stats, torch.device("cpu"), target, "mse", ema=0.0)
    syn = flow.synthetic_flow(z, y, 4)
    want = float(((syn - target.float()) ** 2).sum() / (target.float() ** 2).sum())
    assert mse(z, y, y) == pytest.approx(want, rel=1e-5)
    assert mse(z + 5.0, y, y) == pytest.approx(want, rel=1e-4)
    # at the target's own means the loss is zero: means whose flow is F_w
    c = means.mean(0, keepdim=True)
    rows = (c - 3 / 4 * target).float()
    assert mse(rows, torch.arange(4), torch.arange(4)) < 1e-6
