"""Cost benchmarks that print ratios measured in one run (machines are noisy: compare within a run).

- :func:`stats_throughput`: the statistics pass against its two halves, making the batches (decoding, all
  workers) and the backbone's forward on them, at the same batch size and resolution (is the data pipeline
  the bottleneck?); :func:`jpeg_folder` writes an ImageNet-like JPEG folder to run it on.
- :func:`step_cost`: time and peak memory of one SFM step (one- or two-pass) for any backbone, class
  count, IPC and image size, with random statistics and optionally random weights (cost does not depend
  on weight values) — the papers' ImageNet-scale settings on a GPU.
- :func:`fold_gain`: a distillation step's forward and backward, and a feature batch, through the backbone as
  loaded (batch norms folded, channels-last) against the same model unfolded: the speed-up and the largest
  feature difference.
- :func:`methods_cost`: SFM (A = 1, 10) against LGM (A = 1, 3, 10), full steps of the one distillation
  loop, time and peak memory (CUDA: allocator peak; CPU: peak resident memory of a fresh process each).
"""
from __future__ import annotations

import json
import statistics as pystats
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from . import data, distill, stats
from .backbones import Backbone
from .data import TensorImageDataset
from .objectives import LGMObjective

__all__ = ["stats_throughput", "jpeg_folder", "step_cost", "fold_gain", "method_step", "methods_cost", "methods_table",
           "synthetic_real_dataset", "METHOD_CONFIGS"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def stats_throughput(backbone: Backbone, dataset, resolution: int, images: int = 4096, batch_size: int = 256,
                     repeats: int = 2, checkpoint_every: int = 0, num_workers: int | None = None
                     ) -> dict[str, Any]:
    """Images/s of the statistics pass over ``images`` real images (the first of each class) and of its two
    halves, best of ``repeats`` rounds for each, measured alternately in the same process:

    - ``decode_img_s``: the pass's batches made (decoded and resized by all ``num_workers`` workers,
      default :func:`sfm_lib.features.default_workers`; in-memory data: uint8 slices), no forward;
    - ``forward_img_s``: φ alone on the same batches, decoded beforehand and held on the device;
    - ``pipeline_img_s``: ``stats.extract``, the real pass;
    - ``ratio`` = pipeline / min(decode, forward): 1 when the pass runs as fast as its slower half.

    ``checkpoint_every`` = N > 0 also times the pass with a checkpoint every N batches (written to a
    temporary folder) in the same rounds: ``checkpoint_ratio`` = its throughput / the plain pass's.
    """
    import tempfile

    from . import features

    per_class = max(1, images // len(dataset.classes))
    sub = data.subset_per_class(dataset, per_class)
    dev = backbone.device
    workers = features.default_workers(sub) if num_workers is None else num_workers
    with torch.inference_mode():
        backbone(backbone.preprocess(torch.rand(batch_size, 3, resolution, resolution, device=dev), resolution))
    dec, fwd, ext, ckp = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(repeats):
            t0 = time.perf_counter()
            made = [b[0] for b in features._batches(sub, resolution, batch_size, workers, dev)]
            dec.append(len(sub) / (time.perf_counter() - t0))
            held = [features._to_device(x, dev) for x in made]
            del made
            _sync(dev)
            t0 = time.perf_counter()
            with torch.inference_mode():
                for x in held:
                    backbone.features(x, resolution)
            _sync(dev)
            fwd.append(sum(len(x) for x in held) / (time.perf_counter() - t0))
            del held
            t0 = time.perf_counter()
            stats.extract(backbone, sub, resolution, batch_size=batch_size, num_workers=workers, progress=False)
            _sync(dev)
            ext.append(len(sub) / (time.perf_counter() - t0))
            if checkpoint_every:
                t0 = time.perf_counter()
                stats.extract(backbone, sub, resolution, batch_size=batch_size, num_workers=workers,
                              progress=False, checkpoint=Path(tmp) / f"bench{r}.ckpt",
                              checkpoint_every=checkpoint_every)
                _sync(dev)
                ckp.append(len(sub) / (time.perf_counter() - t0))
    row = {"backbone": backbone.name, "resolution": resolution, "batch_size": batch_size, "images": len(sub),
           "dataset": getattr(dataset, "name", None), "decode_img_s": round(max(dec), 1),
           "forward_img_s": round(max(fwd), 1), "pipeline_img_s": round(max(ext), 1),
           "ratio": round(max(ext) / min(max(dec), max(fwd)), 3), "workers": workers,
           "cores": features.available_cores(), "loader": features.LOADER, "device": str(dev),
           "threads": torch.get_num_threads(), "repeats": repeats}
    if checkpoint_every:
        row.update(checkpoint_every=checkpoint_every, checkpoint_img_s=round(max(ckp), 1),
                   checkpoint_ratio=round(max(ckp) / max(ext), 3))
    return row


def jpeg_folder(path: str | Path, classes: int = 10, per_class: int = 40, seed: int = 0,
                test_per_class: int | None = None) -> Path:
    """Write an ImageNet-like image folder: ``path/train/<class>/*.JPEG`` (``per_class`` each) and
    ``path/test/<class>/*.JPEG`` (``test_per_class``, default max(1, per_class // 5)); returns ``path``.

    Each image: short side uniform in 333–500 px, aspect ratio (long/short) uniform in 1–4/3, landscape or
    portrait, JPEG quality 90 (4:2:0). Content: random crops of scikit-image's sample photos when
    scikit-image is installed, else smooth random images (bicubically enlarged random colour grids at two
    scales, plus a per-class tint), so files decode like photos of that size. Reproducible from ``seed``."""
    import numpy as np
    from PIL import Image

    root = Path(path)
    rng = np.random.default_rng(seed)
    photos = _sample_photos()
    test_per_class = max(1, per_class // 5) if test_per_class is None else test_per_class
    for split, n in (("train", per_class), ("test", test_per_class)):
        for c in range(classes):
            folder = root / split / f"class{c:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            tint = np.random.default_rng([seed, c]).integers(-40, 40, 3)
            for k in range(n):
                short = int(rng.integers(333, 501))
                long = int(round(short * rng.uniform(1.0, 4.0 / 3.0)))
                w, h = (long, short) if rng.random() < 0.5 else (short, long)
                if photos:
                    im = _photo_crop(photos[int(rng.integers(len(photos)))], w, h, rng)
                else:
                    coarse = Image.fromarray(rng.integers(0, 256, (h // 64 + 2, w // 64 + 2, 3), dtype=np.uint8))
                    fine = Image.fromarray(rng.integers(0, 256, (h // 8 + 2, w // 8 + 2, 3), dtype=np.uint8))
                    im = Image.blend(coarse.resize((w, h), Image.BICUBIC), fine.resize((w, h), Image.BICUBIC), 0.3)
                arr = np.clip(np.asarray(im, dtype=np.int16) + tint, 0, 255).astype(np.uint8)
                Image.fromarray(arr).save(folder / f"{split}_{c:03d}_{k:05d}.JPEG", quality=90)
    return root


def _sample_photos() -> list:
    """scikit-image's colour sample photos as uint8 [H, W, 3] arrays, or [] without scikit-image."""
    try:
        import skimage.data as sk
    except ImportError:
        return []
    out = []
    for name in ("astronaut", "coffee", "chelsea", "rocket", "cat", "hubble_deep_field", "immunohistochemistry"):
        img = getattr(sk, name, None)
        if img is not None:
            arr = img()
            if arr.ndim == 3 and arr.shape[2] == 3:
                out.append(arr)
    return out


def _photo_crop(photo, w: int, h: int, rng):
    """A random crop of ``photo`` with aspect w:h (as large as a random fraction ≥ 0.5 allows), resized to w × h."""
    from PIL import Image

    H, W = photo.shape[:2]
    scale = rng.uniform(0.5, 1.0) * min(W / w, H / h)
    cw, ch = max(1, int(w * scale)), max(1, int(h * scale))
    x0, y0 = int(rng.integers(0, W - cw + 1)), int(rng.integers(0, H - ch + 1))
    return Image.fromarray(photo[y0:y0 + ch, x0:x0 + cw]).resize((w, h), Image.BICUBIC)


def random_stats(backbone: Backbone, num_classes: int) -> stats.ClassStats:
    C, D = num_classes, backbone.feature_dim
    return stats.ClassStats(torch.randn(C, D, dtype=torch.float64, generator=torch.Generator().manual_seed(0)),
                            torch.ones(C, dtype=torch.long), [str(c) for c in range(C)], {"backbone": backbone.name})


def synthetic_real_dataset(num_classes: int, images: int, resolution: int, seed: int = 0) -> TensorImageDataset:
    """An in-memory stand-in for a real training set: ``images`` random uint8 colour images of side
    ``resolution``, classes in turn (LGM's cost does not depend on the pixel values)."""
    per_class = -(-images // num_classes)
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (per_class * num_classes, resolution, resolution, 3), generator=g, dtype=torch.uint8)
    return TensorImageDataset(x, torch.arange(num_classes).repeat(per_class), [str(c) for c in range(num_classes)],
                              "synthetic")


def method_step(backbone: Backbone, method: str = "sfm", num_classes: int = 10, ipc: int = 1, resolution: int = 64,
                crop: int | None = None, augs: int = 1, two_pass: bool = False, chunk_size: int = 256,
                param: str = "pixels", steps: int = 6, warmup: int | None = None, optimizer: bool = True,
                dataset=None) -> dict[str, Any]:
    """Median wall time and peak CUDA memory of full distillation steps of ``method`` ("sfm" / "lgm" / "clp" /
    "unrolled"), the loop's own :meth:`sfm_lib.distill.Distiller.step`: for LGM it includes drawing the head, reading and
    augmenting the real batch of ipc·A·C images and its forward pass. SFM's statistics are random (cost does
    not depend on them); LGM reads ``dataset``, or an in-memory :func:`synthetic_real_dataset` when None; CLP
    and the unrolled probe (ours, K = :data:`sfm_lib.unrolled.PROBE_STEPS` probe steps) score their probe on
    a table of random "real" features (2048 per step, as the methods' default).
    ``warmup`` untimed steps first (None: 2 on CUDA, 1 on the CPU). ``optimizer=False`` leaves out Adam (a
    bare gradient step). Peak memory is NaN on the CPU (see
    :func:`methods_cost`, which measures it in a fresh process)."""
    dev = backbone.device
    warmup = (2 if dev.type == "cuda" else 1) if warmup is None else warmup  # CUDA: lazy init, autotuning
    crop = crop or resolution
    cfg = distill.DistillConfig(ipc=ipc, steps=warmup + steps, resolution=resolution, crop=crop, augs=augs,
                                param=param, two_pass=two_pass, chunk_size=chunk_size, progress=False)
    if method == "sfm":
        objective = distill.SFMObjective(random_stats(backbone, num_classes), dev, ipc=ipc)
    elif method == "lgm":
        if dataset is None:
            dataset = synthetic_real_dataset(num_classes, 2 * ipc * augs * num_classes, resolution)
        if len(dataset.classes) != num_classes:
            raise ValueError(f"{getattr(dataset, 'name', 'the dataset')} has {len(dataset.classes)} classes, "
                             f"not {num_classes}: pass --classes {len(dataset.classes)}")
        objective = LGMObjective(dataset, backbone, ipc=ipc, augs=augs, resolution=resolution, crop=crop,
                                 augment=cfg.augment)
    elif method in ("clp", "unrolled"):
        from .clp import CLPObjective
        from .unrolled import UnrolledProbeObjective

        g = torch.Generator().manual_seed(0)  # cost does not depend on the values of the real features
        table = torch.randn(max(4096, 4 * num_classes), backbone.feature_dim, generator=g)
        labels = torch.arange(len(table)) % num_classes
        objective = (CLPObjective(table, labels, num_classes, dev) if method == "clp" else
                     UnrolledProbeObjective(table, labels, num_classes, dev, n_images=num_classes * ipc))
    else:
        raise ValueError(f"method must be 'sfm', 'lgm', 'clp' or 'unrolled', got {method!r}")
    runner = distill.Distiller(backbone, objective, cfg, [str(c) for c in range(num_classes)])
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    times = []
    for i in range(warmup + steps):
        _sync(dev)
        t0 = time.perf_counter()
        runner.step(i, update=optimizer)
        _sync(dev)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else float("nan")
    return {"method": method, "backbone": backbone.name, "classes": num_classes, "ipc": ipc,
            "resolution": resolution, "crop": crop, "augs": augs, "two_pass": two_pass, "param": param,
            "median_s": round(pystats.median(times), 4), "peak_gib": round(peak, 3), "device": str(dev),
            "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"}


def step_cost(backbone: Backbone, num_classes: int = 100, ipc: int = 1, resolution: int = 256,
              crop: int | None = None, augs: int = 1, two_pass: bool = False, chunk_size: int = 256,
              param: str = "pixels", steps: int = 6, warmup: int = 2, optimizer: bool = True) -> dict[str, Any]:
    """Median wall time and peak memory (CUDA) of full SFM steps: decode, augment, φ, loss, backward, Adam
    (``optimizer=False`` leaves Adam's state out). One configuration of :func:`method_step`."""
    row = method_step(backbone, "sfm", num_classes, ipc, resolution, crop, augs, two_pass, chunk_size, param,
                      steps, warmup, optimizer)
    row.pop("method")
    return row


def _median_time(fn, steps: int, device: torch.device, warmup: int = 2) -> float:
    times = []
    for i in range(warmup + steps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return pystats.median(times)


def fold_gain(name: str, device: str = "cpu", pretrained: bool = True, resolution: int = 64,
              images: int = 10, batch_size: int = 256, steps: int = 20) -> dict[str, Any]:
    """Time of φ's forward + backward to the input on ``images`` images (a distillation step's backbone
    work) and of a no-grad forward on ``batch_size`` images (the feature and statistics passes), with the
    backbone as :func:`sfm_lib.backbones.load` gives it (batch norms folded, channels-last) and with
    ``fold=False``, in one run. Ratios > 1: the folded backbone is faster. ``max_rel_diff``: the largest
    feature difference on the same batch, relative to the largest feature."""
    import copy

    from .backbones import load

    plain = load(name, device, pretrained=pretrained, fold=False)
    folded = copy.copy(plain)  # the same weights (random ones too), folded
    folded.model = copy.deepcopy(plain.model)
    folded.fold()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(images, 3, resolution, resolution, generator=g).to(folded.device)
    big = torch.rand(batch_size, 3, resolution, resolution, generator=g).to(folded.device)

    def step(bb: Backbone):
        xi = x.clone().requires_grad_(True)
        bb.features(xi, resolution).square().sum().backward()

    def forward(bb: Backbone):
        with torch.no_grad():
            bb.features(big, resolution)

    row: dict[str, Any] = {"backbone": folded.name, "folded": folded.folded, "resolution": resolution,
                           "images": images, "batch_size": batch_size, "device": str(folded.device),
                           "threads": torch.get_num_threads()}
    for what, fn, n in [("step", step, steps), ("forward", forward, max(3, steps // 5))]:
        t_plain, t_folded = (_median_time(lambda: fn(bb), n, folded.device) for bb in (plain, folded))
        row.update({f"{what}_s_plain": round(t_plain, 5), f"{what}_s_folded": round(t_folded, 5),
                    f"{what}_ratio": round(t_plain / t_folded, 3)})
    with torch.no_grad():
        a, b = plain.features(big, resolution), folded.features(big, resolution)
    row["max_rel_diff"] = float((a - b).abs().max() / a.abs().max())
    return row


METHOD_CONFIGS = (("sfm", 1), ("sfm", 10), ("lgm", 1), ("lgm", 3), ("lgm", 10), ("clp", 1), ("unrolled", 1))
"""(method, A) measured by :func:`methods_cost`."""


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _one_process(spec: dict[str, Any]) -> dict[str, Any]:
    """In a fresh process: load the backbone (and data), note the resident memory, reset the peak (write 5
    to /proc/self/clear_refs), run :func:`method_step`, and report the peak resident memory above it."""
    from . import backbones, data

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    bb = backbones.load(spec["backbone"], spec["device"], pretrained=spec["pretrained"])
    ds = data.load(spec["dataset"], "train", root=spec["data_root"]) if spec["dataset"] else None
    if ds is None and spec["method"] == "lgm":
        ds = synthetic_real_dataset(spec["num_classes"], 2 * spec["ipc"] * spec["augs"] * spec["num_classes"],
                                    spec["resolution"])
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        reset = True
    except OSError:
        reset = False
    base = _status_kib("VmRSS")
    row = method_step(bb, spec["method"], spec["num_classes"], spec["ipc"], spec["resolution"], spec["crop"],
                      spec["augs"], spec["two_pass"], spec["chunk_size"], spec["param"], spec["steps"],
                      optimizer=spec["optimizer"], dataset=ds)
    row["peak_gib"] = round((_status_kib("VmHWM") - base) / 2**20, 3)
    row["baseline_gib"] = round(base / 2**20, 3)
    row["peak_reset"] = reset
    return row


def _child_main() -> None:
    """Entry point of the per-configuration process: a JSON spec on stdin, the JSON row as the last stdout line."""
    spec = json.loads(sys.stdin.read())
    print(json.dumps(_one_process(spec)))


def methods_cost(backbone_name: str, device: str = "cpu", pretrained: bool = True, num_classes: int = 10,
                 ipc: int = 1, resolution: int = 64, crop: int | None = None, two_pass: bool = False,
                 chunk_size: int = 256, param: str = "pixels", steps: int = 6, optimizer: bool = True,
                 dataset: str | None = None, data_root: str | None = None, threads: int = 0,
                 configs: Sequence[tuple[str, int]] = METHOD_CONFIGS, command: str = "") -> dict[str, Any]:
    """SFM at A = 1, 10, LGM at A = 1, 3, 10, CLP-DD and the unrolled probe at A = 1 (``configs``), same
    backbone and settings, in one run.

    Per configuration: the median time of a full step (:func:`method_step`) and the peak memory — on CUDA
    ``torch.cuda.max_memory_allocated`` (in this process, reset between configurations); on the CPU the
    peak resident memory of a fresh process per configuration above its resident memory once the backbone
    (and data) are loaded. LGM reads ``dataset`` (a name for :func:`sfm_lib.data.load`), or an in-memory
    synthetic set of the right size when None. Returns ``{"runs": {"sfm_A1": row, …}, "ratios": {"time",
    "memory"} (LGM A=10 over SFM A=1), "device", "gpu", "command", "settings"}``."""
    from . import backbones, data
    from .utils import resolve_device

    dev = resolve_device(device)
    spec = {"backbone": backbone_name, "device": str(dev), "pretrained": pretrained, "num_classes": num_classes,
            "ipc": ipc, "resolution": resolution, "crop": crop, "two_pass": two_pass, "chunk_size": chunk_size,
            "param": param, "steps": steps, "optimizer": optimizer, "dataset": dataset, "data_root": data_root,
            "threads": threads}
    runs: dict[str, dict[str, Any]] = {}
    if dev.type == "cuda":
        if threads:
            torch.set_num_threads(threads)
        bb = backbones.load(backbone_name, dev, pretrained=pretrained)
        ds = data.load(dataset, "train", root=data_root) if dataset else None
        for method, augs in configs:
            runs[f"{method}_A{augs}"] = method_step(bb, method, num_classes, ipc, resolution, crop, augs, two_pass,
                                                    chunk_size, param, steps, optimizer=optimizer,
                                                    dataset=ds if method == "lgm" else None)
            torch.cuda.empty_cache()
    else:
        for method, augs in configs:
            child = subprocess.run([sys.executable, "-c", "from sfm_lib.bench import _child_main; _child_main()"],
                                   input=json.dumps({**spec, "method": method, "augs": augs}), text=True,
                                   capture_output=True)
            if child.returncode != 0:
                tail = child.stderr.strip().splitlines()[-1:] or ["(no message)"]
                raise RuntimeError(f"the benchmark process for {method} A={augs} failed: {tail[0]}")
            runs[f"{method}_A{augs}"] = json.loads(child.stdout.strip().splitlines()[-1])
    first = next(iter(runs.values()))
    ratios = {}
    if "sfm_A1" in runs and "lgm_A10" in runs:
        a, b = runs["lgm_A10"], runs["sfm_A1"]
        ratios = {"time": round(a["median_s"] / b["median_s"], 2),
                  "memory": round(a["peak_gib"] / b["peak_gib"], 2) if b["peak_gib"] > 0 else float("nan")}
    return {"runs": runs, "ratios": ratios, "device": first["device"], "gpu": first["gpu"], "command": command,
            "settings": {k: v for k, v in spec.items() if k not in ("device",)},
            "threads": threads or torch.get_num_threads()}


def methods_table(result: dict[str, Any]) -> str:
    """The runs of :func:`methods_cost` as a plain-text table, with the ratios."""
    w = max([len("run"), *map(len, result["runs"])])  # the longest run's name sets the column
    lines = [f"{'run':<{w}} {'time/step (s)':>14} {'peak (GiB)':>11}"]
    for name, row in result["runs"].items():
        lines.append(f"{name:<{w}} {row['median_s']:>14.4f} {row['peak_gib']:>11.3f}")
    r = result["ratios"]
    if r:
        lines.append(f"LGM A=10 / SFM A=1: time {r['time']}x, memory {r['memory']}x ({result['gpu']})")
    return "\n".join(lines)
