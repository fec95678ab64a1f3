"""Unrolled-probe matching (sfm_lib.unrolled): the rate budget against the evaluation's closed form, the
unrolled probe against torch.optim.Adam and against the evaluation's own probe (and its fidelity to it), its loss
by gradcheck and with dead features, and the objective in the loop (two-pass, exact resume, its identity)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sfm_lib import evaluate
from sfm_lib.data import TensorImageDataset
from sfm_lib.unrolled import (PROBE_STEPS, UnrolledProbeObjective, probe_budget, probe_fidelity, unrolled,
                              unrolled_loss, unrolled_probe)

C, RES = 3, 32


@pytest.mark.parametrize("n,lr,steps", [(10, 1e-3 * 10 / 256, 1000), (100, 1e-3 * 100 / 256, 1000),
                                        (250, 1e-3 * 100 / 256, 3000)])
def test_budget_is_the_sum_of_the_evaluation_rates(n, lr, steps):
    # Σ_{t<T} (1 + cos(πt/T))/2 = (T + 1)/2, since Σ_{t<T} cos(πt/T) = 1 (a telescoping identity)
    assert probe_budget(n) == pytest.approx(lr * (steps + 1) / 2, rel=1e-12)
    assert probe_budget(n, epochs=10) < probe_budget(n)
    with pytest.raises(ValueError, match="n_images ≥ 1"):
        probe_budget(0)


def test_unrolled_probe_is_torch_adam_with_the_cosine_schedule():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(12, 7, generator=g, dtype=torch.float64) + 1
    y = F.one_hot(torch.arange(12) % C, C).double()
    w0, b0 = 0.01 * torch.randn(7, C, generator=g, dtype=torch.float64), torch.zeros(C, dtype=torch.float64)
    steps, budget = 9, 0.3
    w, b = unrolled_probe(z, y, (w0, b0), steps, budget, eps=0.0)  # ε = 0: both denominators are √v̂
    # reference: torch's Adam on the mean cross-entropy, the rate set per step by the same cosine
    ref_w, ref_b = w0.clone().requires_grad_(True), b0.clone().requires_grad_(True)
    opt = torch.optim.Adam([ref_w, ref_b], lr=1.0, eps=0.0)
    shape = [0.5 * (1 + math.cos(math.pi * k / steps)) for k in range(steps)]
    for k in range(steps):
        opt.param_groups[0]["lr"] = budget * shape[k] / sum(shape)
        opt.zero_grad()
        F.cross_entropy(z @ ref_w + ref_b, y.argmax(1)).backward()
        opt.step()
    torch.testing.assert_close(w, ref_w.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(b, ref_b.detach(), rtol=1e-10, atol=1e-12)
    assert (w - w0).abs().max() > 0.1, "the probe moved"
    with_eps, _ = unrolled_probe(z, y, (w0, b0), steps, budget)
    torch.testing.assert_close(with_eps, w, rtol=0, atol=1e-4)  # ε = 1e-8 changes it only where ∇ ≈ 0


def test_loss_gradient_by_gradcheck_and_finite_with_dead_features():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(6, 5, generator=g, dtype=torch.float64)
    labels = torch.arange(6) % C
    z_real, y_real = torch.randn(10, 5, generator=g, dtype=torch.float64), torch.randint(0, C, (10,), generator=g)
    init = (0.01 * torch.randn(5, C, generator=g, dtype=torch.float64), torch.zeros(C, dtype=torch.float64))
    assert torch.autograd.gradcheck(lambda x: unrolled_loss(x, labels, z_real, y_real, C, init, 4, 0.05),
                                    (z.clone().requires_grad_(True),), eps=1e-6, atol=1e-6, rtol=1e-4)
    dead = z.clone()
    dead[:, 2] = 0  # a feature that is zero in every view (a pooled ReLU channel can be): ∇ = 0 there, v̂ = 0
    dead.requires_grad_(True)
    unrolled_loss(dead, labels, z_real, y_real, C, init, 4, 0.05).backward()
    assert torch.isfinite(dead.grad).all(), "√(v̂ + ε²) keeps the gradient finite where √v̂ + ε gives nan"


def test_with_as_many_steps_as_evaluation_it_is_the_evaluation_probe():
    """K = T steps at the budget of N images: the unrolled probe is evaluate.train_probe's (full batch, since
    B = min(100, N) = N; the same init), so the objective optimises exactly what evaluation trains."""
    g = torch.Generator().manual_seed(2)
    n, d, epochs = 2 * C, 10, 200
    z = torch.rand(n, d, generator=g, dtype=torch.float64) * 4
    labels = torch.arange(n) % C
    w_eval, b_eval = evaluate.train_probe(z, labels, C, epochs=epochs, seed=5)
    w0, b0 = evaluate._linear_init(d, C, 5, torch.float64)
    w, b = unrolled_probe(z, F.one_hot(labels, C).double(), (w0.T, b0), epochs, probe_budget(n, epochs))
    torch.testing.assert_close(w.T, w_eval, rtol=1e-5, atol=1e-7)  # √(v̂ + ε²) against √v̂ + ε
    torch.testing.assert_close(b, b_eval, rtol=1e-5, atol=1e-7)
    assert (w_eval - w0).abs().max() > 1e-3, "the probe moved"


def test_fidelity_is_one_where_the_unrolled_probe_is_the_evaluation_probe():
    """One view of N ≤ 100 images: the evaluation's mini-batch is the whole set, so K = T unrolled steps are its
    probe (cosine 1 between the two changes of W); five larger steps follow it less closely."""
    g = torch.Generator().manual_seed(3)
    n, d, epochs = 2 * C, 10, 200
    z = torch.rand(n, 1, d, generator=g, dtype=torch.float64) * 4
    labels = torch.arange(n) % C
    rows = probe_fidelity(z, labels, C, steps=(epochs, 5), seeds=(0, 1), epochs=epochs)
    cos = {(r["steps"], r["seed"]): r["cosine"] for r in rows}
    assert sorted(cos) == [(5, 0), (5, 1), (epochs, 0), (epochs, 1)]
    assert cos[(epochs, 0)] == pytest.approx(1.0, abs=1e-6) and cos[(epochs, 1)] == pytest.approx(1.0, abs=1e-6)
    assert cos[(5, 0)] < 1 - 1e-4 and cos[(5, 1)] < 1 - 1e-4  # a few large steps: near, not on, its path
    # the same cosine by hand for one (K, seed): evaluation's probe and the unrolled one from its start
    w0, b0 = evaluate._linear_init(d, C, 1, torch.float64)
    w_eval, _ = evaluate.train_probe(z, labels, C, epochs=epochs, seed=1)
    w5, _ = unrolled_probe(z[:, 0], F.one_hot(labels, C).double(), (w0.T, b0), 5, probe_budget(n, epochs))
    a, b = (w5.T - w0).flatten().numpy(), (w_eval - w0).flatten().numpy()
    assert cos[(5, 1)] == pytest.approx(float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))), rel=1e-9)
    with pytest.raises(ValueError, match=r"view_feats \[N, V, D\]"):
        probe_fidelity(z[:, 0], labels, C)


def _table(n: int = 40, d: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g).abs(), torch.arange(n) % C


def test_objective_draws_reproducible_inits_and_refuses_bad_input():
    table, labels = _table()
    a = UnrolledProbeObjective(table, labels, C, "cpu", n_images=C, real_batch=8, seed=1)
    b = UnrolledProbeObjective(table, labels, C, "cpu", n_images=C, real_batch=8, seed=1)
    a.begin_step(), b.begin_step()
    assert torch.equal(a.init[0], b.init[0]) and a.init[0].shape == (8, C)
    first = a.init[0].clone()
    state = a.state_dict()
    a.begin_step()
    assert not torch.equal(a.init[0], first), "a fresh init every step"
    b.load_state_dict(state)
    b.begin_step()
    assert torch.equal(b.init[0], a.init[0]), "the init follows the stream's position (exact resume)"
    assert a.identity()["probe_steps"] == PROBE_STEPS and a.budget == pytest.approx(probe_budget(C))
    with pytest.raises(ValueError, match="probe_steps ≥ 1") as info:
        UnrolledProbeObjective(table, labels, C, "cpu", n_images=C, probe_steps=0)
    assert "\n" not in str(info.value)


def test_two_pass_gradient_equals_one_pass(lite0, single_thread):
    from toydata import one_and_two_pass

    table, labels = _table(40, lite0.feature_dim)
    losses, grads = one_and_two_pass(lite0, lambda: UnrolledProbeObjective(table, labels, C, "cpu", n_images=2 * C,
                                                                           real_batch=16, probe_steps=5), C, RES)
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-5 * float(grads[0].abs().max()))


def test_run_stopped_and_resumed_is_bit_identical(lite0, tmp_path, single_thread):
    g = torch.Generator().manual_seed(0)
    real = TensorImageDataset(torch.randint(0, 256, (C * 12, 20, 20), generator=g, dtype=torch.uint8),
                              torch.arange(C).repeat(12), [f"c{i}" for i in range(C)], "toy")
    base = dict(ipc=1, steps=5, resolution=RES, augs=2, progress=False, seed=2, checkpoint_every=2,
                real_batch=16, init="real", probe_steps=4)
    full = unrolled(lite0, real, checkpoint=tmp_path / "a.pt", **base)
    assert full.meta["method"] == "unrolled" and full.meta["unrolled.probe_steps"] == 4
    assert full.meta["probe_budget"] == pytest.approx(probe_budget(C))

    def stop(step, loss, images):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        unrolled(lite0, real, checkpoint=tmp_path / "b.pt", callback=stop, **base)
    resumed = unrolled(lite0, real, checkpoint=tmp_path / "b.pt", resume=True, **base)
    torch.testing.assert_close(resumed.images, full.images, rtol=0, atol=0)
    assert resumed.meta["loss_history"] == full.meta["loss_history"]
    with pytest.raises(ValueError, match="probe_steps: 4 in the checkpoint, 6 now"):
        unrolled(lite0, real, checkpoint=tmp_path / "b.pt", resume=True, **{**base, "probe_steps": 6})
