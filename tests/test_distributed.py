"""torch.distributed helpers: single-process identities, and a 2-process gloo group checked against a
single-process computation of the same loss."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from sfm_lib import distributed


def test_single_process_is_the_identity():
    assert distributed.rank() == 0 and distributed.world_size() == 1 and distributed.is_main()
    t = torch.arange(5.0)
    assert distributed.all_reduce_sum(t) is t and torch.equal(t, torch.arange(5.0))
    x = torch.randn(3, requires_grad=True)
    assert distributed.sum_replicated(x) is x
    assert torch.equal(distributed.shard(5), torch.arange(5))
    assert distributed.describe()["world_size"] == 1
    rows = torch.randn(3, 2, requires_grad=True)
    for dst in (None, 0):
        got = distributed.gather_rows(rows, [3], dst=dst)
        assert torch.equal(got, rows) and not got.requires_grad
    with pytest.raises(ValueError, match=r"^2 row counts for 1 ranks$"):
        distributed.gather_rows(rows, [3, 1])
    with pytest.raises(ValueError, match=r"^rank 0 holds 3 rows, its count is 2$"):
        distributed.gather_rows(rows, [2])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    distributed.init("cpu")
    try:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(8, 4, generator=g, dtype=torch.float64)     # the same on every rank
        w = torch.randn(4, 3, generator=g, dtype=torch.float64).requires_grad_(True)
        rows = distributed.shard(len(x))                              # rank r: rows r, r + 2, ...
        partial = (x[rows] @ w).sum(0)                                # this rank's part of Σ_i x_i w
        total = distributed.sum_replicated(partial)
        loss = torch.tanh(total).pow(2).sum()                         # the same value on every rank
        loss.backward()
        distributed.all_reduce_sum(w.grad)
        out[rank] = (loss.detach(), w.grad.clone(), distributed.world_size(), distributed.is_main())
    finally:
        torch.distributed.destroy_process_group()


def test_two_gloo_processes_equal_one():
    """Loss and (all-reduced) gradient of a sharded sum equal the single-process ones; rank 0 is main."""
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 4, generator=g, dtype=torch.float64)
    w = torch.randn(4, 3, generator=g, dtype=torch.float64).requires_grad_(True)
    loss = torch.tanh((x @ w).sum(0)).pow(2).sum()
    loss.backward()
    for rank in (0, 1):
        r_loss, r_grad, world, main = out[rank]
        assert world == 2 and main == (rank == 0)
        torch.testing.assert_close(r_loss, loss.detach(), rtol=1e-12, atol=0)
        torch.testing.assert_close(r_grad, w.grad, rtol=1e-12, atol=1e-15)


# ------------------------------------------------------------------------------------- torchrun, gloo
# The command line launched by the real launcher (torch.distributed.run = torchrun) as 2 CPU processes,
# checked against one process run in this one. Small on purpose: these run in CI on 2 cores.
RES = 32


def _env(tiny_fmnist_dir, cache) -> dict:
    from pathlib import Path

    env = {**os.environ, "SFM_DATA": str(tiny_fmnist_dir), "SFM_CACHE": str(cache), "OMP_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1"}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    return env


def _torchrun(args, env, ok: bool = True):
    """``torchrun --standalone --nproc_per_node=2 -m sfm_lib ARGS``; returns the finished process."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "sfm_lib",
           *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if ok:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture
def one_thread(monkeypatch, tiny_fmnist_dir):
    """One intra-op thread, and the tiny data for the in-process runs too (the children get $SFM_DATA)."""
    monkeypatch.setenv("SFM_DATA", str(tiny_fmnist_dir))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _image_folder(root, per_class: int = 8):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        folder = root / "train" / cls
        folder.mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (20 + i, 24, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


def test_statistics_under_torchrun_equal_one_process_and_resume(tmp_path, tiny_fmnist_dir, one_thread):
    """2 ranks, each its block of an image folder: an unreadable file stops rank 1 (its checkpoint kept),
    --resume --skip-bad finishes; the means equal one process's (same skipped file) to 1e-6."""
    from sfm_lib.cli import main
    from sfm_lib.stats import ClassStats

    root = _image_folder(tmp_path / "imgs")
    bad = root / "train" / "b" / "5.png"  # in rank 1's block (the second half of the training items)
    bad.write_text("not an image")
    args = ["stats", "--dataset", f"imagefolder:{root}", "--resolution", str(RES), "--device", "cpu",
            "--batch-size", "2", "--workers", "0", "--checkpoint-every", "1", "--quiet"]
    env = _env(tiny_fmnist_dir, tmp_path / "cache")
    out = tmp_path / "two.safetensors"
    failed = _torchrun([*args, "--out", str(out)], env, ok=False)
    assert failed.returncode != 0 and f"error: rank 1: {bad}: unreadable image" in failed.stderr
    assert (tmp_path / "two.safetensors.ckpt.rank1of2").is_file() and not out.exists()
    _torchrun([*args, "--out", str(out), "--resume", "--skip-bad"], env)
    assert not list(tmp_path.glob("two.safetensors.ckpt*")), "every rank removes its checkpoint"
    one = tmp_path / "one.safetensors"
    assert main([*args, "--skip-bad", "--out", str(one)]) == 0
    a, b = ClassStats.load(one), ClassStats.load(out)
    # the ranks' blocks are batched otherwise than one process's items (the validation hold-out moves
    # them); Lite0's features of an image then differ in float32 rounding, hence atol 1e-6 on the means
    torch.testing.assert_close(b.means, a.means, rtol=1e-6, atol=1e-6)
    from sfm_lib import data

    train = data.load(f"imagefolder:{root}", "train")
    expected = torch.bincount(train.targets, minlength=2) - torch.tensor([0, 1])  # less the bad file
    assert torch.equal(a.counts, b.counts) and torch.equal(a.counts.long(), expected)
    assert b.meta["world_size"] == 2 and a.meta["world_size"] == 1
    assert b.meta["skipped"] == a.meta["skipped"] == [str(bad)]
    assert {k: v for k, v in a.meta.items() if k != "world_size"} == \
        {k: v for k, v in b.meta.items() if k != "world_size"}


@pytest.fixture(scope="module")
def tiny_stats(tiny_fmnist_dir, tmp_path_factory):
    """Class statistics of the tiny Fashion-MNIST split at 32 px, with 2 k-means centres (one process)."""
    from sfm_lib import backbones, data, stats

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ds = data.load("fashion_mnist", "train", root=str(tiny_fmnist_dir))
        st = stats.extract(backbones.load("effnet_lite0", "cpu"), ds, RES, kmeans_k=2, progress=False)
    finally:
        torch.set_num_threads(before)
    path = tmp_path_factory.mktemp("dist_stats") / "stats.safetensors"
    st.save(path)
    return path


def _one_process(args, out):
    from sfm_lib.cli import main
    from sfm_lib.data import DistilledSet

    assert main([*args, "--out", str(out)]) == 0
    return DistilledSet.load(out)


def test_distillation_under_torchrun_equals_one_process_and_resumes(tmp_path, tiny_fmnist_dir, tiny_stats,
                                                                    one_thread):
    """SFM (ipc 2, 2 views per image, noise, running average, real start): 3 steps under torchrun in one
    pass, then --resume to 5 steps under torchrun in two passes (chunks of 10 views); the images and the
    loss history equal those of the same two runs in one process to 1e-5, after 3 and after 5 steps."""
    from sfm_lib.data import DistilledSet

    args = ["distill", "--stats", str(tiny_stats), "--resolution", str(RES), "--device", "cpu", "--ipc", "2",
            "--augs", "2", "--ema", "0.5", "--init", "real", "--crop-scale", "0.3", "--noise-p", "0.5",
            "--lr", "0.05", "--checkpoint-every", "2"]
    # Chunks of 10 views hold the same views in both (a chunk's size changes its float rounding, and Adam
    # amplifies rounding where a gradient is near 0).
    first, then = ["--steps", "3", "--no-two-pass"], ["--steps", "5", "--resume", "--two-pass", "--chunk-size", "10"]
    env = _env(tiny_fmnist_dir, tmp_path / "cache")
    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    one_3 = _one_process([*args, *first], one)
    one_5 = _one_process([*args, *then], one)
    proc = _torchrun([*args, *first, "--out", str(two)], env)
    assert proc.stdout.count("wrote ") == 1, "only rank 0 prints"
    two_3 = DistilledSet.load(two)
    _torchrun([*args, *then, "--out", str(two)], env)
    two_5 = DistilledSet.load(two)
    for a, b in ((one_3, two_3), (one_5, two_5)):
        torch.testing.assert_close(b.images, a.images, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.tensor(b.meta["loss_history"]), torch.tensor(a.meta["loss_history"]),
                                   rtol=1e-5, atol=1e-6)
        assert b.meta["world_size"] == 2 and a.meta["world_size"] == 1
    assert len(two_5.meta["loss_history"]) == 5 and two_5.meta["two_pass"] and not two_3.meta["two_pass"]
    assert (two_5.images - two_3.images).abs().max() > 1e-3, "the resumed run moved the images on"


def test_lgm_under_torchrun_equals_one_process(tmp_path, tiny_fmnist_dir, one_thread):
    """LGM, 3 steps: the synthetic views and the real batch are sharded, their features gathered. (At
    least 20 views per rank: on the CPU Lite0's features of an image change by ~1e-6 with batches < 16.)"""
    args = ["distill", "--method", "lgm", "--resolution", str(RES), "--device", "cpu", "--ipc", "2",
            "--augs", "2", "--steps", "3", "--crop-scale", "0.3", "--noise-p", "0.5", "--lr", "0.05"]
    env = _env(tiny_fmnist_dir, tmp_path / "cache")
    one = _one_process(args, tmp_path / "one.safetensors")
    two = tmp_path / "two.safetensors"
    _torchrun([*args, "--out", str(two)], env)
    from sfm_lib.data import DistilledSet

    b = DistilledSet.load(two)
    torch.testing.assert_close(b.images, one.images, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.tensor(b.meta["loss_history"]), torch.tensor(one.meta["loss_history"]),
                               rtol=1e-5, atol=1e-6)
    assert b.meta["world_size"] == 2


def test_commands_that_do_not_run_under_torchrun_are_refused(monkeypatch, capsys):
    from sfm_lib.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["eval", "--distilled", "x.safetensors"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: `eval` does not run under torchrun") and "Traceback" not in err


def test_statistics_refuse_kmeans_and_feature_cache_with_several_ranks(monkeypatch, lite0, fmnist_train):
    from sfm_lib import data, stats

    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    small = data.subset(fmnist_train, range(4))
    for kw in ({"kmeans_k": 2}, {"cache_features": True}):
        with pytest.raises(ValueError, match="without torchrun"):
            stats.extract(lite0, small, RES, progress=False, **kw)


def test_rank_blocks_cover_the_items_in_order(fmnist_train):
    """The blocks of ranks 0 … W−1, one after the other, are the dataset's items (also for a subset)."""
    from sfm_lib import data, stats

    sub = data.subset(fmnist_train, [5, 9, 2, 7, 100, 3, 8])
    for world in (1, 2, 3, 8):
        blocks = [stats._rank_block(sub, r, world) for r in range(world)]
        assert [i for b in blocks for i in b.indices] == sub.indices
        assert all(b.dataset is fmnist_train and b.name == sub.name for b in blocks)
        assert torch.equal(torch.cat([b.targets for b in blocks]), sub.targets)


def test_statistics_resume_refuses_checkpoints_of_another_world_size(tmp_path, lite0, fmnist_train):
    """Per-rank checkpoints are named for W: resuming with another W is an error, not a silent restart."""
    from sfm_lib import data, stats

    small = data.subset(fmnist_train, range(4))
    (tmp_path / "s.ckpt.rank1of2").write_bytes(b"")
    with pytest.raises(ValueError, match=r"s.ckpt.rank1of2 .*another number of processes"):
        stats.extract(lite0, small, RES, progress=False, checkpoint=tmp_path / "s.ckpt", resume=True)
