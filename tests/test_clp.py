"""CLP-DD (sfm_lib.clp): the KRR probe against an explicit ridge solution, the loss by hand and its gradient
by gradcheck, the real-batch stream, two-pass, exact resume, several backbones, and torchrun (gloo, 2
processes) against one process.

Also the script torchrun launches in the last test (see ``__main__`` at the end)."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from sfm_lib.augment import Augment
from sfm_lib.clp import CLPObjective, MultiCLPObjective, clp, clp_loss, krr_probe
from sfm_lib.data import DistilledSet, TensorImageDataset

C, RES = 3, 32


def _explicit_ridge(z: torch.Tensor, y: torch.Tensor, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """argmin_{W,b} ‖ZW + 1bᵀ − Y‖² + λ‖W‖², λ = ridge·tr(HZZᵀH)/M (H the centring matrix), by least
    squares on the stacked system [[Z, 1], [√λ I, 0]] [W; bᵀ] = [[Y], [0]] (float64)."""
    z, y = z.double(), y.double()
    m, d = z.shape
    h = torch.eye(m, dtype=z.dtype) - torch.full((m, m), 1.0 / m, dtype=z.dtype)
    lam = ridge * torch.trace(h @ z @ z.t() @ h) / m
    a = torch.cat([torch.cat([z, torch.ones(m, 1, dtype=z.dtype)], 1),
                   torch.cat([lam.sqrt() * torch.eye(d, dtype=z.dtype), torch.zeros(d, 1, dtype=z.dtype)], 1)])
    rhs = torch.cat([y, torch.zeros(d, y.shape[1], dtype=z.dtype)])
    sol = torch.linalg.lstsq(a, rhs, driver="gelsd").solution
    return sol[:d], sol[d]


@pytest.mark.parametrize("m,d", [(6, 9), (12, 5)])  # sample space (M ≤ D) and primal (M > D)
def test_krr_probe_is_the_explicit_ridge_solution(m, d):
    g = torch.Generator().manual_seed(m)
    z = torch.randn(m, d, generator=g, dtype=torch.float64) * 3 + 1
    y = F.one_hot(torch.arange(C).repeat(m // C), C)
    w, b = krr_probe(z, y, 0.05)
    ew, eb = _explicit_ridge(z, y, 0.05)
    torch.testing.assert_close(w, ew, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(b, eb, rtol=1e-9, atol=1e-10)
    other, _ = _explicit_ridge(z, y, 0.5)
    assert not torch.allclose(w, other, atol=1e-3), "the ridge strength must change the solution"
    with pytest.raises(ValueError, match="ridge must be > 0"):
        krr_probe(z, y, 0.0)


@pytest.mark.parametrize("m,d", [(6, 8), (9, 4)])
def test_clp_loss_by_hand_and_its_gradient_by_gradcheck(m, d):
    g = torch.Generator().manual_seed(d)
    z = torch.randn(m, d, generator=g, dtype=torch.float64)
    labels = torch.arange(C).repeat(m // C)
    z_real = torch.randn(11, d, generator=g, dtype=torch.float64)
    y_real = torch.randint(0, C, (11,), generator=g)
    w, b = _explicit_ridge(z, F.one_hot(labels, C), 0.1)
    logits = (z_real @ w + b) / 0.2
    by_hand = (torch.logsumexp(logits, 1) - logits[torch.arange(11), y_real]).mean()
    got = clp_loss(z, labels, z_real, y_real, C, ridge=0.1, tau=0.2)
    torch.testing.assert_close(got, by_hand, rtol=1e-9, atol=1e-12)
    assert torch.autograd.gradcheck(lambda x: clp_loss(x, labels, z_real, y_real, C, 0.1, 0.2),
                                    (z.clone().requires_grad_(True),), eps=1e-6, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="tau must be > 0"):
        clp_loss(z, labels, z_real, y_real, C, tau=0.0)


def _table(n: int = 50, d: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.arange(n) % C


def test_real_batches_are_reproducible_cover_an_epoch_and_resume():
    table, labels = _table()
    a = CLPObjective(table, labels, C, "cpu", real_batch=16, seed=3)
    drawn = []
    for _ in range(3):
        a.begin_step()
        drawn.append(a.z_real.clone())
        rows = torch.cat([torch.nonzero((table == r).all(1)).flatten() for r in a.z_real])
        assert torch.equal(a.y_real, labels[rows]), "each real feature keeps its label"
    first_epoch = torch.cat(drawn)
    assert len(torch.unique(first_epoch, dim=0)) == 48, "no row twice within an epoch"
    state = a.state_dict()
    a.begin_step()
    b = CLPObjective(table, labels, C, "cpu", real_batch=16, seed=3)
    for expected in drawn:
        b.begin_step()
        assert torch.equal(b.z_real, expected), "same seed, same stream"
    c = CLPObjective(table, labels, C, "cpu", real_batch=16, seed=3)
    c.load_state_dict(state)
    c.begin_step()
    assert torch.equal(c.z_real, a.z_real), "resumed from the state: the next batch"
    d = CLPObjective(table, labels, C, "cpu", real_batch=16, seed=4)
    d.begin_step()
    assert not torch.equal(d.z_real, drawn[0])
    cached = CLPObjective(table.half().float(), labels, C, "cpu", real_batch=16, seed=3)  # as the cache gives
    cached.begin_step()
    assert cached.table.dtype == torch.float16 and a.table.dtype == torch.float32, "float16 only where exact"
    assert cached.z_real.dtype == torch.float32 and torch.equal(cached.z_real, drawn[0].half().float())


def test_objective_refuses_bad_input_in_one_line():
    table, labels = _table()
    for kw, match in (({"ridge": 0.0}, "ridge > 0"), ({"tau": -1.0}, "tau > 0"), ({"real_batch": 0}, "real_batch")):
        with pytest.raises(ValueError, match=match) as info:
            CLPObjective(table, labels, C, "cpu", **kw)
        assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match=r"real labels must lie in 0 … 1"):
        CLPObjective(table, labels, 2, "cpu")
    with pytest.raises(RuntimeError, match="begin_step"):
        CLPObjective(table, labels, C, "cpu")(table[:6], labels[:6], labels[:6])
    with pytest.raises(ValueError, match="real training set"):
        clp(None, torch.zeros(3), steps=1)


def test_two_pass_gradient_equals_one_pass(lite0, single_thread):
    from toydata import one_and_two_pass

    table, labels = _table(40, lite0.feature_dim)
    losses, grads = one_and_two_pass(lite0, lambda: CLPObjective(table.abs(), labels, C, "cpu", real_batch=16,
                                                                 seed=0), C, RES)
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6 * float(grads[0].abs().max()))


@pytest.fixture(scope="module")
def toy_real():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (C * 12, 20, 20), generator=g, dtype=torch.uint8)
    return TensorImageDataset(images, torch.arange(C).repeat(12), [f"c{i}" for i in range(C)], "toy")


def _clp(lite0, real, **kw):
    base = dict(ipc=1, steps=5, resolution=RES, augs=2, progress=False, seed=2, checkpoint_every=2,
                real_batch=16, init="real")
    return clp(lite0, real, **{**base, **kw})


def test_run_stopped_and_resumed_is_bit_identical(lite0, toy_real, tmp_path, monkeypatch, single_thread):
    full = _clp(lite0, toy_real, checkpoint=tmp_path / "a.pt")
    assert full.meta["method"] == "clp" and len(full.meta["loss_history"]) == 5
    assert full.meta["clp.ridge"] == 0.01 and full.meta["clp.tau"] == 0.1 and full.meta["clp.real_batch"] == 16
    assert full.meta["dataset"] == "toy" and full.meta["features_resolution"] == RES
    assert full.images.shape == (C, 3, RES, RES) and full.classes == toy_real.classes

    def stop(step, loss, images):
        if step == 3:
            raise KeyboardInterrupt

    part = tmp_path / "b.pt"
    with pytest.raises(KeyboardInterrupt):
        _clp(lite0, toy_real, checkpoint=part, callback=stop)
    state = torch.load(part, weights_only=True)
    assert state["step"] == 2 and state["objective"]["position"].tolist() == [[0, 32]], "two batches of 16 read"
    spare = tmp_path / "spare.pt"
    spare.write_bytes(part.read_bytes())  # the resumed run below overwrites its checkpoint
    resumed = _clp(lite0, toy_real, checkpoint=part, resume=True)
    torch.testing.assert_close(resumed.images, full.images, rtol=0, atol=0)
    assert resumed.meta["loss_history"] == full.meta["loss_history"]
    with pytest.raises(ValueError, match="clp.tau: 0.1 in the checkpoint, 0.2 now"):
        _clp(lite0, toy_real, checkpoint=spare, resume=True, tau=0.2)
    # guard: without the objective's state (the stream position) the run ends elsewhere
    monkeypatch.setattr(CLPObjective, "load_state_dict", lambda self, s: None)
    forgetful = _clp(lite0, toy_real, checkpoint=spare, resume=True)
    assert not torch.equal(forgetful.images, full.images)


def test_several_backbones_weigh_the_per_backbone_losses(lite0, toy_real, single_thread):
    (t1, labels), (t2, _) = _table(30, 5, seed=1), _table(30, 7, seed=2)
    parts = [CLPObjective(t, labels, C, "cpu", real_batch=12, seed=5) for t in (t1, t2)]
    multi = MultiCLPObjective(parts, [5, 7], weights=[1.0, 3.0])
    multi.begin_step()
    assert torch.equal(parts[0].y_real, parts[1].y_real), "the parts draw the same real images"
    z = torch.randn(2 * C, 12, generator=torch.Generator().manual_seed(0))
    lab = torch.arange(C).repeat(2)
    each = [clp_loss(z[:, :5], lab, parts[0].z_real, parts[0].y_real, C),
            clp_loss(z[:, 5:], lab, parts[1].z_real, parts[1].y_real, C)]
    expected = 0.25 * each[0] + 0.75 * each[1]
    torch.testing.assert_close(multi(z, lab, lab * 0).double(), expected, rtol=1e-6, atol=1e-7)
    assert abs(float(each[0] - each[1])) > 1e-3, "the two parts differ, so the weights matter"
    pair = _clp([lite0, lite0], toy_real, steps=1, checkpoint_every=100, backbone_weights=[1, 1])
    assert pair.meta["method"] == "clp" and pair.meta["backbones"] == ["effnet_lite0", "effnet_lite0"]
    assert pair.meta["features_resolution"] == [RES, RES] and len(pair.meta["loss_history"]) == 1
    with pytest.raises(ValueError, match="list of at least 2 backbones"):
        _clp(lite0, toy_real, steps=1, backbone_weights=[1.0])


# ------------------------------------------------------------------------------------- torchrun, gloo
# The run below as 2 CPU processes (launched by torch.distributed.run = torchrun, this file as the
# script) against the same run in this process. 40 views, 20 per rank: on the CPU Lite0's features of
# an image change by ~1e-6 with batches < 16.
_TORCHRUN_RUN = dict(ipc=2, steps=3, resolution=RES, augs=2, lr=0.05, init="real", real_batch=64, seed=1,
                     augment=Augment(scale=(0.3, 1.0), noise_p=0.5), progress=False)


def _torchrun_child(out: str) -> None:
    from sfm_lib import backbones, data, distributed

    torch.set_num_threads(1)
    distributed.init("cpu")
    try:
        result = clp(backbones.load("effnet_lite0", "cpu"), data.load("fashion_mnist", "train"), **_TORCHRUN_RUN)
        if distributed.is_main():
            result.save(out)
    finally:
        distributed.finish()


def test_clp_under_torchrun_equals_one_process(tmp_path, tiny_fmnist_dir, monkeypatch, lite0, single_thread):
    from test_distributed import _env

    from sfm_lib import data

    env = _env(tiny_fmnist_dir, tmp_path / "cache")
    out = tmp_path / "two.safetensors"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__, str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = DistilledSet.load(out)
    monkeypatch.setenv("SFM_DATA", str(tiny_fmnist_dir))
    # the real features the two processes cached: an entry of the session cache made by another test (other
    # threads, other batches) may differ in float16 rounding, which the optimisation then amplifies
    monkeypatch.setenv("SFM_CACHE", str(tmp_path / "cache"))
    one = clp(lite0, data.load("fashion_mnist", "train"), **_TORCHRUN_RUN)
    torch.testing.assert_close(two.images, one.images, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.tensor(two.meta["loss_history"]), torch.tensor(one.meta["loss_history"]),
                               rtol=1e-5, atol=1e-6)
    assert two.meta["world_size"] == 2 and one.meta["world_size"] == 1
    assert one.meta["clp.features"] == two.meta["clp.features"], "both read the same cached real features"


if __name__ == "__main__":  # the script of each torchrun process in the test above
    _torchrun_child(sys.argv[1])
