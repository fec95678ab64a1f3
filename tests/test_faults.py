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
    """An uninterrupted statistics pass over the tiny split (300 images, 38 batches), started at once so
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
    assert int(a.counts.sum()) == 300


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
