"""Fault tests: a statistics pass and a distillation run through the command line, killed with SIGKILL at
a random point, then resumed with --resume, end exactly where uninterrupted runs end."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sfm_lib.distill import DistilledSet
from sfm_lib.stats import ClassStats
from sfm_lib.utils import load_tensors

RES = 32


def _env(tiny_fmnist_dir, cache) -> dict:
    env = {**os.environ, "SFM_DATA": str(tiny_fmnist_dir), "SFM_CACHE": str(cache), "OMP_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    return env


def _start(args, env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "sfm_lib", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen) -> str:
    """Wait for ``proc``; assert it succeeded."""
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    return err


def _kill_at_random(args, env, checkpoint: Path, rng: random.Random) -> str:
    """Start the command, wait until its first checkpoint exists, wait a random 0–1.5 s more, SIGKILL it.
    Returns what happened (for failure messages)."""
    proc = _start(args, env)
    try:
        t0 = time.monotonic()
        while not checkpoint.exists() and proc.poll() is None and time.monotonic() - t0 < 240:
            time.sleep(0.02)
        delay = rng.uniform(0.0, 1.5)
        time.sleep(delay)
        finished = proc.poll() is not None
        if not finished:
            proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    if finished:
        assert proc.returncode == 0, err
        return "finished before the kill"
    assert proc.returncode == -signal.SIGKILL
    return f"killed {delay:.2f} s after the first checkpoint"


@pytest.fixture
def rng():
    seed = random.randrange(10**6)
    print(f"fault-test seed {seed}")
    return random.Random(seed)


STATS = ["stats", "--resolution", str(RES), "--device", "cpu", "--batch-size", "8", "--kmeans", "2",
         "--checkpoint-every", "1", "--quiet"]


@pytest.fixture(scope="module")
def full_stats(tiny_fmnist_dir, tmp_path_factory):
    """An uninterrupted statistics pass over the tiny split (270 images, 34 batches), started at once so
    that it runs beside the interrupted one."""
    folder = tmp_path_factory.mktemp("faults")
    env = _env(tiny_fmnist_dir, folder / "cache")
    out = folder / "full.safetensors"
    return _start([*STATS, "--out", str(out)], env), out, env


def test_killed_statistics_pass_resumes_exactly(tmp_path, full_stats, rng):
    proc, full, env = full_stats
    part = tmp_path / "part.safetensors"
    ckpt = Path(str(part) + ".ckpt")
    what = _kill_at_random([*STATS, "--out", str(part)], env, ckpt, rng)
    print(what)
    _finish(_start([*STATS, "--out", str(part), "--resume"], env))
    if proc.returncode is None:
        _finish(proc)
    assert not Path(str(full) + ".ckpt").exists() and not ckpt.exists(), "removed once the output is written"
    a, b = ClassStats.load(full), ClassStats.load(part)
    assert torch.equal(a.means, b.means) and torch.equal(a.counts, b.counts), what
    assert torch.equal(a.centres, b.centres), what
    assert a.meta == b.meta
    assert int(a.counts.sum()) == 270


def test_killed_distillation_resumes_exactly(tmp_path, full_stats, rng):
    proc, st, env = full_stats
    if proc.returncode is None:
        _finish(proc)
    common = ["distill", "--stats", str(st), "--resolution", str(RES), "--device", "cpu", "--steps", "16",
              "--ipc", "2", "--subclass", "--checkpoint-every", "2"]
    full, part = tmp_path / "full.safetensors", tmp_path / "part.safetensors"
    uninterrupted = _start([*common, "--out", str(full)], env)
    what = _kill_at_random([*common, "--out", str(part)], env, Path(str(part) + ".ckpt"), rng)
    print(what)
    _finish(_start([*common, "--out", str(part), "--resume"], env))
    _finish(uninterrupted)
    a, b = DistilledSet.load(full), DistilledSet.load(part)
    assert torch.equal(a.images, b.images), what
    assert a.meta["loss_history"] == b.meta["loss_history"], what


# ------------------------------------------------------------------------------------------- bad input
@pytest.mark.usefixtures("single_thread")
def test_cli_bad_image_file_is_one_line_and_resumable(tmp_path, capsys, monkeypatch):
    import numpy as np
    from PIL import Image

    from sfm_lib.cli import main

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for cls in ("a", "b"):
            folder = tmp_path / "imgs" / split / cls
            folder.mkdir(parents=True)
            for i in range(5):
                Image.fromarray(rng.integers(0, 256, (20 + i, 24, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    bad = tmp_path / "imgs" / "train" / "b" / "2.png"
    bad.write_text("not an image")
    out = tmp_path / "s.safetensors"
    args = ["stats", "--dataset", f"imagefolder:{tmp_path / 'imgs'}", "--resolution", str(RES), "--device", "cpu",
            "--batch-size", "2", "--workers", "0", "--quiet", "--out", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith(f"error: {bad}: unreadable image (UnidentifiedImageError")
    assert "--resume --skip-bad" in err and "Traceback" not in err
    ckpt = Path(str(out) + ".ckpt")
    _, meta = load_tensors(ckpt)
    from sfm_lib import data

    train = data.load(f"imagefolder:{tmp_path / 'imgs'}", "train")  # the training split, less validation
    where = [str(f) for f in train.files].index(str(bad))
    assert meta["position"] == where // 2 * 2  # the batches before the bad file's are kept
    assert main([*args, "--resume", "--skip-bad"]) == 0
    st = ClassStats.load(out)
    expected = torch.bincount(train.targets, minlength=2) - torch.tensor([0, 1])
    assert st.meta["skipped"] == [str(bad)] and st.meta["num_skipped"] == 1 and torch.equal(st.counts.long(), expected)
    assert not ckpt.exists()
    # The same numbers as a pass over the same training images without the file (other batches: float32
    # rounding). Deleting the file would change the validation hold-out, so the subset is taken instead.
    from sfm_lib import backbones, stats

    clean = stats.extract(backbones.load("effnet_lite0"), data.subset(train, [i for i in range(len(train))
                                                                              if i != where]),
                          RES, batch_size=2, num_workers=0, progress=False)
    torch.testing.assert_close(clean.means, st.means, rtol=1e-5, atol=1e-5)


@pytest.mark.usefixtures("single_thread")
def test_mismatched_distilled_set_is_refused(tmp_path, capsys, tiny_fmnist_dir, monkeypatch, lite0):
    from sfm_lib import data, evaluate
    from sfm_lib.cli import main

    monkeypatch.setenv("SFM_DATA", str(tiny_fmnist_dir))
    digits = DistilledSet(torch.rand(10, 3, RES, RES), torch.arange(10), [str(i) for i in range(10)],
                          {"backbone": "effnet_lite0", "method": "sfm", "dataset": "mnist"})
    path = tmp_path / "digits.safetensors"
    digits.save(path)
    ev = ["eval", "--distilled", str(path), "--dataset", "fashion_mnist", "--resolution", str(RES), "--device",
          "cpu", "--seeds", "1", "--epochs", "2", "--views", "1"]
    assert main(ev) == 2
    err = capsys.readouterr().err
    assert "distilled from 'mnist'" in err and "'fashion_mnist'" in err and "'0' vs 'T-shirt/top'" in err
    assert "--allow-class-mismatch" in err and err.count("\n") == 1
    nb = ["baselines", "--kind", "neighbors", "--distilled", str(path), "--resolution", str(RES), "--device", "cpu",
          "--seeds", "1", "--epochs", "2", "--views", "1"]
    assert main(nb) == 2
    assert "distilled from 'mnist'" in capsys.readouterr().err
    assert main([*ev, "--allow-class-mismatch"]) == 0  # a deliberate transfer runs
    # The library entry points, and the recorded dataset alone (same class names) is enough to refuse.
    train, test = data.load("fashion_mnist", "train"), data.load("fashion_mnist", "test")
    same_names = DistilledSet(digits.images, digits.labels, list(test.classes), {"dataset": "mnist"})
    for fn in (lambda d, **kw: evaluate.linear_probe(lite0, d, test, RES, seeds=(0,), epochs=1, views=1, **kw),
               lambda d, **kw: evaluate.neighbor_subset(lite0, train, d, RES, **kw),
               lambda d, **kw: evaluate.baseline("neighbors", lite0, train, test, RES, seeds=(0,), distilled=d,
                                                 epochs=1, views=1, **kw)):
        for d in (digits, same_names):
            with pytest.raises(ValueError, match="does not belong to this dataset"):
                fn(d)
    fine = DistilledSet(digits.images, digits.labels, list(test.classes), {"dataset": "fashion_mnist"})
    assert len(evaluate.neighbor_subset(lite0, train, fine, RES)) == 10
    assert len(evaluate.neighbor_subset(lite0, train, digits, RES, allow_class_mismatch=True)) == 10


@pytest.fixture
def small_disk(tmp_path):
    """A real 256 KiB file system (tmpfs; needs root, as in CI), unmounted afterwards."""
    folder = tmp_path / "small"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(folder)],
                             capture_output=True).returncode == 0
    if not mounted:
        pytest.skip("cannot mount a small tmpfs here (not root)")
    yield folder
    subprocess.run(["umount", str(folder)], check=False)


def test_a_full_disk_while_writing_a_checkpoint_says_so_in_one_line(small_disk, tiny_fmnist_dir, tmp_path,
                                                                   monkeypatch, capsys):
    """The checkpoint of a distillation does not fit the disk: one line naming the full disk and the file (no
    `[enforce fail at inline_container.cc …]`), no traceback, and the output an earlier run left stays intact."""
    from sfm_lib import cli

    monkeypatch.setenv("SFM_DATA", str(tiny_fmnist_dir))
    stats_file = tmp_path / "st.safetensors"
    assert cli.main(["stats", "--resolution", str(RES), "--device", "cpu", "--quiet", "--out", str(stats_file)]) == 0
    out = small_disk / "d.safetensors"
    out.write_bytes(b"an earlier run's output" * 100)
    before = out.read_bytes()
    capsys.readouterr()
    code = cli.main(["distill", "--stats", str(stats_file), "--resolution", str(RES), "--device", "cpu",
                     "--steps", "2", "--checkpoint-every", "1", "--init", "noise", "--out", str(out)])
    lines = capsys.readouterr().err.strip().splitlines()
    err = [line for line in lines if not line.startswith("SFM ")]  # the progress bar
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), lines
    assert "Traceback" not in "\n".join(lines)
    assert "the disk is full" in err[0] and str(out) + ".ckpt" in err[0] and "inline_container" not in err[0]
    assert out.read_bytes() == before
    assert not [p for p in small_disk.iterdir() if p.name.endswith(".tmp")], "no temporary file is left"


def test_a_full_disk_is_recognised_from_the_writers_own_error(tmp_path, monkeypatch):
    """torch.save reports a full disk as a RuntimeError of its zip writer; with (almost) no space left on
    the folder's disk that is reported as the full disk it is, and the earlier file is kept."""
    import shutil
    from collections import namedtuple

    from sfm_lib.utils import DiskFullError, atomic_path

    target = tmp_path / "x.ckpt"
    target.write_text("earlier")
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9, 4096))
    with pytest.raises(DiskFullError, match=r"the disk is full: could not write .*x\.ckpt \(the earlier x\.ckpt is kept"):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"partial")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 128 vs 0")
    assert target.read_text() == "earlier"
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 0, 10**9))  # plenty of space: not that
    with pytest.raises(RuntimeError, match="unexpected pos"):
        with atomic_path(target):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 128 vs 0")


def test_write_json_is_strict_and_keeps_the_earlier_file_when_it_fails(tmp_path):
    import json
    from pathlib import Path

    from sfm_lib.utils import write_json

    target = tmp_path / "r.json"
    write_json(target, {"top1": 71.5, "where": Path("/data")})
    assert json.loads(target.read_text()) == {"top1": 71.5, "where": "/data"}
    before = target.read_text()
    with pytest.raises(ValueError):
        write_json(target, {"top1": float("nan")})  # NaN is not JSON: refused, and nothing is half-written
    assert target.read_text() == before and [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_a_negative_step_count_names_the_value(capsys, tmp_path):
    from sfm_lib import cli

    code = cli.main(["distill", "--stats", "x.safetensors", "--steps", "-3", "--out", str(tmp_path / "d")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == ["error: --steps must be ≥ 0, got -3"]
