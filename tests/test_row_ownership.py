"""Under torchrun each rank owns the images (parameters, gradients, Adam state) of its block of classes.

- A module holding rows [lo, hi) of N images equals those rows of the whole set (noise and real starts,
  every pyramid growth), bit for bit.
- Uneven blocks (3 ranks, C = 5: 1, 2, 2 classes): SFM and LGM, pixels and the pyramid, real and noise
  starts equal one process's run, also resumed with another number of processes; each rank held only its
  rows; the checkpoint holds every image and the whole Adam state, as one process's does.
- What a step sends, counted by wrapping every collective of torch.distributed (gloo, 2 processes,
  C = 10, IPC 10, 32 px, Lite0): SFM the class means only, LGM the features only; the images once, at the end.

The torchrun runs are launched by torch.distributed.run with this file as the script (``__main__`` at the end).
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from sfm_lib.images import make_images, pyramid_sizes

C, IPC, RES = 10, 10, 32


# ------------------------------------------------------------------------------------------ held rows
@pytest.mark.parametrize("kind", ["pixels", "pyramid"])
@pytest.mark.parametrize("start", ["noise", "real"])
def test_held_rows_equal_those_rows_of_the_whole_set(kind, start):
    """Rows [1, 3) of 5 images, built and grown with the same generator state as the whole set: every
    parameter and the decoded images equal the whole set's rows exactly, after every growth; the state
    round-trips; the plan's numel counts the held rows only."""
    n, res, rows = 5, 8, (1, 3)
    real = torch.rand(n, 3, 11, 11, generator=torch.Generator().manual_seed(2)) if start == "real" else None
    kw = {"grow_every": 1} if kind == "pyramid" else {}
    whole = make_images(kind, n, res, init=real, generator=torch.Generator().manual_seed(1), **kw)
    part = make_images(kind, n, res, init=None if real is None else real[1:3],
                       generator=torch.Generator().manual_seed(1), rows=rows, **kw)
    assert (part.num_images, part.num_rows, part.rows) == (n, 2, rows)
    assert part.final_numel() * n == whole.final_numel() * 2
    for step in range(8):
        assert whole.grow(step) == part.grow(step)
        assert [tuple(p.shape) for p in part.parameters()] == [(2, *p.shape[1:]) for p in whole.parameters()]
        assert all(torch.equal(a, b[1:3]) for a, b in zip(part.parameters(), whole.parameters()))
        assert torch.equal(part.decode(), whole.decode()[1:3])
    if kind == "pyramid" and start == "noise":
        assert whole.num_levels == 4, "the levels grew (8 px: sides 1, 2, 4, 8)"
    again = make_images(kind, n, res, init=torch.rand(2, 3, 8, 8), rows=rows, **kw)
    again.load_state_dict(part.state_dict())
    assert torch.equal(again.decode(), part.decode())
    with pytest.raises(ValueError, match=r"^rows must be \[lo, hi\) with 0 ≤ lo < hi ≤ 5, got \[3, 3\)$"):
        make_images(kind, n, res, rows=(3, 3))
    with pytest.raises(ValueError, match=r"init must be \[2, 3, H, W\]"):
        make_images(kind, n, res, init=torch.rand(n, 3, 8, 8), rows=rows)


def test_the_class_means_of_a_block_are_those_rows_of_all_classes_bit_for_bit():
    """SFM on a rank averages its block's views: those means must be the whole set's rows exactly, for the
    uneven blocks below (8 copies, ipc 2, C = 5 over 2, 3, 4 ranks). A mean over (0, 2) at once was not
    (its summation order depends on the number of classes: 1.8e-7 apart)."""
    from sfm_lib.objectives import ViewLayout

    A, C5, ipc, D = 8, 5, 2, 1280
    z = torch.rand(A * C5 * ipc, D, generator=torch.Generator().manual_seed(0))
    whole = ViewLayout(A, C5, ipc).class_means(z)
    for world in (2, 3, 4):
        for r in range(world):
            lo, hi = r * C5 // world, (r + 1) * C5 // world
            mine = (torch.arange(A)[:, None] * C5 * ipc + torch.arange(lo * ipc, hi * ipc)[None]).flatten()
            assert torch.equal(ViewLayout(A, hi - lo, ipc).class_means(z[mine]), whole[lo:hi]), (world, r)


def test_a_step_refuses_images_that_are_not_this_ranks_rows(monkeypatch, lite0, single_thread):
    """Rank 1 of 2 over 2 classes must hold rows 1 … 1 (ipc 1); the whole set is refused in one line."""
    from sfm_lib import bench, distill, distributed
    from sfm_lib.augment import Augment

    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    objective = distill.SFMObjective(bench.random_stats(lite0, 2), lite0.device)
    labels, slots = torch.arange(2), torch.zeros(2, dtype=torch.long)
    images = make_images("pixels", 2, RES, generator=torch.Generator().manual_seed(0))
    params = Augment().sample(2, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"^this rank's views show images 1–1, but the images hold rows 0–1: "):
        distill.step_gradient(images, lite0, objective, Augment(), params, labels, slots, 1, RES)
_COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "reduce_scatter_tensor",
                "reduce", "gather", "scatter", "all_to_all_single", "send", "recv")


def _count_collectives(log: list) -> None:
    """Wrap torch.distributed's collectives: each call appends Σ numel·element_size of its tensors."""
    import torch.distributed as dist

    def nbytes(x) -> int:
        if isinstance(x, torch.Tensor):
            return x.numel() * x.element_size()
        return sum(nbytes(t) for t in x) if isinstance(x, (list, tuple)) else 0

    def wrap(name, fn):
        def counted(*args, **kw):
            tensors = args[:1] if name != "all_gather" else args[1:2]  # all_gather(out_list, tensor): what it sends
            log.append((name, sum(nbytes(t) for t in tensors)))
            return fn(*args, **kw)
        return counted

    for name in _COLLECTIVES:
        if hasattr(dist, name):
            setattr(dist, name, wrap(name, getattr(dist, name)))


def _bytes_child(method: str, out: str) -> None:
    """One SFM or LGM run (C = 10, IPC 10, 32 px, Lite0, 3 steps): the bytes of every step's collectives
    and of the run's end; rank 0 writes them as JSON."""
    from sfm_lib import backbones, bench, data, distill, distributed

    torch.set_num_threads(1)
    distributed.init("cpu")
    try:
        backbone = backbones.load("effnet_lite0", "cpu")
        log: list = []
        _count_collectives(log)
        marks: list[int] = []
        kw = dict(ipc=IPC, steps=3, resolution=RES, augs=1 if method == "sfm" else 2, progress=False,
                  callback=lambda step, loss, images: marks.append(len(log)))
        if method == "sfm":
            result = distill.sfm(backbone, bench.random_stats(backbone, C), **kw)
        else:
            result = distill.lgm(backbone, data.load("fashion_mnist", "train"), **kw)
        edges = [0, *marks]
        per_step = [sum(b for _, b in log[s:e]) for s, e in zip(edges, edges[1:])]
        end = sum(b for _, b in log[marks[-1]:])
        if distributed.is_main():
            with open(out, "w") as f:
                json.dump({"per_step": per_step, "end": end, "images": list(result.images.shape),
                           "calls": [name for name, _ in log[:marks[0]]]}, f)
    finally:
        distributed.finish()


def _run_bytes(method: str, tmp_path, tiny_fmnist_dir) -> dict:
    from test_distributed import _env

    out = tmp_path / f"{method}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__, method,
           str(out)]
    proc = subprocess.run(cmd, env=_env(tiny_fmnist_dir, tmp_path / "cache"), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_a_step_sends_the_class_means_or_the_features_and_never_the_images(tmp_path, tiny_fmnist_dir):
    """2 ranks, C = 10, IPC 10, 32 px, Lite0 (D = 1280): an SFM step all-reduces the [C, D] class means (one
    call), an LGM step the features of the A·N synthetic views and of the B = IPC·A·C real images (two calls);
    the N images (N·3·32²·4 B) are sent once, at the end. (Before row ownership a step also all-reduced the
    whole image gradient: 1,280,000 and 3,276,800 B per step.)"""
    D, N, A = 1280, C * IPC, 2
    images = N * 3 * RES * RES * 4
    sfm = _run_bytes("sfm", tmp_path, tiny_fmnist_dir)
    assert sfm["per_step"] == [C * D * 4] * 3 and sfm["calls"] == ["all_reduce"]
    lgm = _run_bytes("lgm", tmp_path, tiny_fmnist_dir)
    assert lgm["per_step"] == [(A * N + IPC * A * C) * D * 4] * 3 and lgm["calls"] == ["all_reduce"] * 2
    assert sfm["end"] == lgm["end"] == images and sfm["images"] == [N, 3, RES, RES]


# ----------------------------------------------------------------------------------- uneven blocks
# 3 ranks over C = 5 classes: blocks of 1, 2 and 2 classes, ipc 2, 8 views per image (at least 16 views
# per rank: on the CPU Lite0's features of an image change by ~1e-6 with batches < 16).
UNEVEN = dict(classes=5, ipc=2, augs=8)
CASES = {  # name: (method, param, init, steps of the first run and of the resumed one, W of the resumed one)
    "sfm-pixels-real": ("sfm", "pixels", "real", (3, 5), 2),
    "lgm-pyramid-noise": ("lgm", "pyramid", "noise", (3, 6), 2),  # resumed: rows get the missing levels
    "sfm-pyramid-real": ("sfm", "pyramid", "real", (2, 3), 2),
    "lgm-pixels-noise": ("lgm", "pixels", "noise", (2, 3), 1),
}


def _uneven_real():
    """The real training set of the uneven cases: 100 random colour images, 5 classes."""
    from sfm_lib import bench

    return bench.synthetic_real_dataset(UNEVEN["classes"], 100, RES, seed=3)


@pytest.fixture(scope="module")
def uneven_stats(tmp_path_factory, lite0, single_thread):
    """SFM's statistics of :func:`_uneven_real` (one process; real targets give gradients well above Adam's
    eps, where rounding differences between batch sizes stay rounding differences)."""
    from sfm_lib import stats

    path = tmp_path_factory.mktemp("uneven") / "stats.safetensors"
    stats.extract(lite0, _uneven_real(), RES, progress=False).save(path)
    return str(path)


def _uneven_run(backbone, name: str, steps: int, checkpoint: str, resume: bool, stats_path: str):
    """Case ``name`` of :data:`CASES` through the loop (pyramid: a level every step) → (result, distiller)."""
    from sfm_lib import distill
    from sfm_lib.augment import Augment
    from sfm_lib.objectives import LGMObjective
    from sfm_lib.stats import ClassStats

    method, param, init, _, _ = CASES[name]
    ipc, augs = UNEVEN["ipc"], UNEVEN["augs"]
    real = _uneven_real()
    augment = Augment(scale=(0.3, 1.0), noise_p=0.5)
    cfg = distill.DistillConfig(ipc=ipc, steps=steps, resolution=RES, augs=augs, lr=0.05, param=param,
                                grow_every=1, init=init, augment=augment, seed=1, checkpoint=checkpoint,
                                checkpoint_every=2, resume=resume, progress=False)
    if method == "sfm":
        objective = distill.SFMObjective(ClassStats.load(stats_path), backbone.device, ipc=ipc, ema=0.5)
    else:
        objective = LGMObjective(real, backbone, ipc=ipc, augs=augs, resolution=RES, augment=augment, seed=1)
    d = distill.Distiller(backbone, objective, cfg, real.classes, init_dataset=real)
    return d.run(), d


def _uneven_child(name: str, steps: str, checkpoint: str, resume: str, stats_path: str, out: str) -> None:
    """One torchrun rank of :func:`_uneven_run`; every rank checks that it got all images back, writes what
    it held (rows, parameter and Adam numel), and rank 0 the result."""
    from sfm_lib import backbones, distributed

    torch.set_num_threads(1)
    distributed.init("cpu")
    try:
        result, d = _uneven_run(backbones.load("effnet_lite0", "cpu"), name, int(steps), checkpoint,
                                resume == "resume", stats_path)
        assert result.images.shape[0] == UNEVEN["classes"] * UNEVEN["ipc"], "every rank gets every image"
        adam = sum(t.numel() for s in d.opt.state.values() for t in s.values() if t.dim())
        held = {"rows": list(d.images.rows), "params": sum(p.numel() for p in d.images.parameters()),
                "adam": adam, "final_numel": d.images.final_numel(), "fixed_bytes": d.fixed_bytes()}
        with open(f"{out}.rank{distributed.rank()}", "w") as f:
            json.dump(held, f)
        if distributed.is_main():
            result.save(out)
    finally:
        distributed.finish()


def _launch(world: int, args: list[str], tmp_path) -> None:
    from test_distributed import _env

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}", __file__,
           *args]
    proc = subprocess.run(cmd, env=_env(tmp_path, tmp_path / "cache"), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _assert_close_tree(a, b, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape, where
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-12, msg=lambda m: f"{where}: {m}")
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_close_tree(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for k, (x, y) in enumerate(zip(a, b)):
            _assert_close_tree(x, y, f"{where}[{k}]")
    elif isinstance(a, float):
        assert b == pytest.approx(a, rel=1e-5, abs=1e-6), where
    else:
        assert a == b, where


@pytest.mark.parametrize("name", list(CASES))
def test_uneven_blocks_equal_one_process_and_resume_with_another_world(name, tmp_path, lite0, uneven_stats):
    """3 ranks, C = 5: the images and losses of a run, and of its resume with 2 or 1 processes, equal one
    process's doing the same to 1e-5; each rank held 2, 4, 4 rows (parameters, Adam state, and the memory
    plan's fixed bytes count them and its block of LGM's real batch only);
    the 3-rank checkpoint (rank 0's, gathered) equals one process's, images and the whole Adam state."""
    from sfm_lib.data import DistilledSet

    method, param, init, (first, then), world = CASES[name]
    one_ckpt, two_ckpt, out = tmp_path / "one.ckpt", tmp_path / "three.ckpt", tmp_path / "three.safetensors"
    one_a, _ = _uneven_run(lite0, name, first, str(one_ckpt), False, uneven_stats)
    saved_one = torch.load(one_ckpt, weights_only=True)
    one_b, _ = _uneven_run(lite0, name, then, str(one_ckpt), True, uneven_stats)

    _launch(3, [name, str(first), str(two_ckpt), "fresh", uneven_stats, str(out)], tmp_path)
    three_a = DistilledSet.load(out)
    held = [json.loads((tmp_path / f"three.safetensors.rank{r}").read_text()) for r in range(3)]
    assert [h["rows"] for h in held] == [[0, 2], [2, 6], [6, 10]]
    sides = pyramid_sizes(RES) if param == "pyramid" else [RES]
    grown = sides[:first] if init == "noise" else sides  # noise: a level at each step 1 … first − 1
    real = [26, 27, 27] if method == "lgm" else [0, 0, 0]  # each rank's block of LGM's 80 real images
    for h, b in zip(held, real):
        rows = h["rows"][1] - h["rows"][0]
        assert h["params"] == rows * 3 * sum(s * s for s in grown) and h["adam"] == 2 * h["params"]
        assert h["final_numel"] == rows * 3 * sum(s * s for s in sides)
        assert h["fixed_bytes"] == 16 * h["final_numel"] + 2 * b * 3 * RES * RES * 4, "the plan counts own rows"
    _assert_close_tree(torch.load(two_ckpt, weights_only=True), saved_one)
    shutil.copy(two_ckpt, tmp_path / "three-first.ckpt")
    if world == 1:
        three_b, _ = _uneven_run(lite0, name, then, str(two_ckpt), True, uneven_stats)
    else:
        _launch(world, [name, str(then), str(two_ckpt), "resume", uneven_stats, str(out)], tmp_path)
        three_b = DistilledSet.load(out)
    for a, b in ((one_a, three_a), (one_b, three_b)):
        torch.testing.assert_close(b.images, a.images, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.tensor(b.meta["loss_history"]), torch.tensor(a.meta["loss_history"]),
                                   rtol=1e-5, atol=1e-6)
    assert three_a.meta["world_size"] == 3 and three_b.meta["world_size"] == world
    assert len(three_b.meta["loss_history"]) == then
    assert (three_b.images - three_a.images).abs().max() > 1e-3, "the resumed run moved the images on"


if __name__ == "__main__":  # the script of each torchrun process in the tests above
    if sys.argv[1] in CASES:
        _uneven_child(*sys.argv[1:7])
    else:
        _bytes_child(sys.argv[1], sys.argv[2])
