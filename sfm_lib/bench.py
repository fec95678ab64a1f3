"""Cost benchmarks that print ratios measured in one run (machines are noisy: compare within a run).

- :func:`stats_throughput`: the statistics pass against the backbone's forward-only throughput at the
  same batch size and resolution (is the data pipeline the bottleneck?).
- :func:`step_cost`: time and peak memory of one SFM step (one- or two-pass) for any backbone, class
  count, IPC and image size, with random statistics and optionally random weights (cost does not depend
  on weight values) — the papers' ImageNet-scale settings on a GPU.
"""
from __future__ import annotations

import statistics as pystats
import time
from typing import Any

import torch

from . import data, distill, stats
from .augment import Augment
from .backbones import Backbone
from .images import make_images

__all__ = ["stats_throughput", "step_cost"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def stats_throughput(backbone: Backbone, dataset, resolution: int, images: int = 4096, batch_size: int = 256,
                     repeats: int = 2, checkpoint_every: int = 0) -> dict[str, Any]:
    """Images/s of ``stats.extract`` on ``images`` real images vs φ on a fixed in-memory batch; best of
    ``repeats`` for each, measured alternately in the same process.

    ``checkpoint_every`` = N > 0 also times the pass with a checkpoint every N batches (written to a
    temporary folder) in the same rounds: ``checkpoint_ratio`` = its throughput / the plain pass's.
    """
    import tempfile
    from pathlib import Path

    per_class = max(1, images // len(dataset.classes))
    sub = data.subset_per_class(dataset, per_class)
    x = torch.rand(batch_size, 3, resolution, resolution, device=backbone.device)
    batches = max(1, len(sub) // batch_size)
    with torch.inference_mode():
        backbone(backbone.preprocess(x, resolution))  # warm-up
    fwd, ext, ckp = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(repeats):
            _sync(backbone.device)
            t0 = time.perf_counter()
            with torch.inference_mode():
                for _ in range(batches):
                    backbone(backbone.preprocess(x, resolution))
            _sync(backbone.device)
            fwd.append(batches * batch_size / (time.perf_counter() - t0))
            t0 = time.perf_counter()
            stats.extract(backbone, sub, resolution, batch_size=batch_size, progress=False)
            _sync(backbone.device)
            ext.append(len(sub) / (time.perf_counter() - t0))
            if checkpoint_every:
                t0 = time.perf_counter()
                stats.extract(backbone, sub, resolution, batch_size=batch_size, progress=False,
                              checkpoint=Path(tmp) / f"bench{r}.ckpt", checkpoint_every=checkpoint_every)
                _sync(backbone.device)
                ckp.append(len(sub) / (time.perf_counter() - t0))
    row = {"backbone": backbone.name, "resolution": resolution, "batch_size": batch_size, "images": len(sub),
           "forward_img_s": round(max(fwd), 1), "extract_img_s": round(max(ext), 1),
           "ratio": round(max(ext) / max(fwd), 3), "device": str(backbone.device),
           "threads": torch.get_num_threads()}
    if checkpoint_every:
        row.update(checkpoint_every=checkpoint_every, checkpoint_img_s=round(max(ckp), 1),
                   checkpoint_ratio=round(max(ckp) / max(ext), 3))
    return row


def step_cost(backbone: Backbone, num_classes: int = 100, ipc: int = 1, resolution: int = 256,
              crop: int | None = None, augs: int = 1, two_pass: bool = False, chunk_size: int = 256,
              param: str = "pixels", steps: int = 6, warmup: int = 2, optimizer: bool = True) -> dict[str, Any]:
    """Median wall time and peak memory (CUDA) of full SFM steps: decode, augment, φ, loss, backward, Adam.

    Statistics are random (cost does not depend on them). ``optimizer=False`` leaves out Adam's state
    (as in a bare gradient-step probe).
    """
    dev = backbone.device
    crop = crop or resolution
    C, D = num_classes, backbone.feature_dim
    st = stats.ClassStats(torch.randn(C, D, dtype=torch.float64), torch.ones(C, dtype=torch.long),
                          [str(c) for c in range(C)], {"backbone": backbone.name})
    labels = torch.arange(C, device=dev).repeat_interleave(ipc)
    slots = torch.arange(ipc, device=dev).repeat(C)
    objective = distill.SFMObjective(st, dev, ipc=ipc)
    images = make_images(param, C * ipc, resolution, generator=torch.Generator().manual_seed(0)).to(dev)
    opt = torch.optim.Adam(images.parameters(), lr=1e-3) if optimizer else None
    aug = Augment()
    gen = torch.Generator(device=dev).manual_seed(0)
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    times = []
    for i in range(warmup + steps):
        _sync(dev)
        t0 = time.perf_counter()
        for p in images.parameters():
            p.grad = None
        params = aug.sample(C * ipc * augs, gen)
        distill.step_gradient(images, backbone, objective, aug, params, labels, slots, augs, crop,
                              two_pass=two_pass, chunk_size=chunk_size)
        if opt is not None:
            opt.step()
        _sync(dev)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else float("nan")
    return {"backbone": backbone.name, "classes": C, "ipc": ipc, "resolution": resolution, "crop": crop,
            "augs": augs, "two_pass": two_pass, "param": param, "median_s": round(pystats.median(times), 4),
            "peak_gib": round(peak, 2), "device": str(dev),
            "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"}
