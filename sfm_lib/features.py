"""One streaming pass of a frozen backbone over a dataset, and an on-disk cache of its features.

The pass never holds the images in memory: a DataLoader feeds batches, the backbone runs under
``torch.inference_mode``, and the caller consumes ``(features, labels)`` batch by batch. Fixed-size
datasets (Fashion-MNIST, CIFAR) are resized per batch on the backbone's device; datasets of mixed image
sizes (image folders) are cropped and resized per image in the DataLoader workers.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from .backbones import Backbone, square_resize
from .data import TensorImageDataset
from .utils import cache_dir, load_tensors, save_tensors

__all__ = ["iterate", "compute", "store", "cache_path", "dataset_key", "default_workers"]


class _SquareResize(Dataset):
    """Per-image centre square crop + bilinear resize, so images of mixed sizes can be batched."""

    def __init__(self, dataset: Dataset, resolution: int):
        self.dataset, self.resolution = dataset, resolution

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        img, label = self.dataset[i]
        return square_resize(img, self.resolution), label


def default_workers(dataset: Dataset) -> int:
    """0 for in-memory tensor datasets (a worker would only add copies), else up to 4 decoding workers."""
    if getattr(dataset, "image_size", None) is not None:
        return 0
    return min(4, os.cpu_count() or 1)


def iterate(backbone: Backbone, dataset: Dataset, resolution: int, batch_size: int = 256,
            num_workers: int | None = None, progress: bool = True, desc: str = "features"
            ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(φ(preprocess(x)) [B, D] float32 on the backbone's device, labels [B])`` over ``dataset`` in order."""
    from .progress import tqdm

    with torch.inference_mode(), tqdm(total=len(dataset), desc=desc, unit="img", disable=not progress,
                                      mininterval=2.0) as bar:
        for images, labels in _batches(dataset, resolution, batch_size, num_workers, backbone.device):
            feats = backbone.features(images, resolution)
            yield feats, labels.to(feats.device)
            bar.update(len(labels))


def _batches(dataset: Dataset, resolution: int, batch_size: int, num_workers: int | None,
             device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """In-memory tensor datasets (or subsets of one): vectorised slices, no per-item Python. Others: a
    DataLoader with per-image crop/resize in its workers."""
    base, indices = dataset, None
    if isinstance(dataset, torch.utils.data.Subset):
        base, indices = dataset.dataset, torch.as_tensor(dataset.indices)
    if isinstance(base, TensorImageDataset) and not num_workers:
        order = torch.arange(len(base)) if indices is None else indices
        for start in range(0, len(order), batch_size):
            yield base.batch(order[start:start + batch_size])
        return
    workers = default_workers(dataset) if num_workers is None else num_workers
    source = dataset if getattr(dataset, "image_size", None) is not None else _SquareResize(dataset, resolution)
    yield from DataLoader(source, batch_size=batch_size, shuffle=False, num_workers=workers,
                          pin_memory=device.type == "cuda")


def dataset_key(dataset: Dataset) -> str | None:
    """A file-name-safe key for a whole dataset split (``name-split-N``), or None for subsets."""
    split = getattr(dataset, "split", None)
    if split is None or isinstance(dataset, torch.utils.data.Subset):
        return None
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in dataset.name)
    return f"{safe}-{split}-{len(dataset)}"


def cache_path(backbone: Backbone, dataset: Dataset, resolution: int) -> Path | None:
    """Where the features of a whole dataset split are cached, or None for subsets (not cached)."""
    key = dataset_key(dataset)
    return None if key is None else cache_dir() / "features" / f"{key}-{backbone.name}-{resolution}.safetensors"


def compute(backbone: Backbone, dataset: Dataset, resolution: int, batch_size: int = 256,
            num_workers: int | None = None, cache: bool = True, progress: bool = True
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Features ``[N, D]`` (float32, CPU) and labels ``[N]`` of a whole dataset, from the cache when present."""
    path = cache_path(backbone, dataset, resolution) if cache else None
    if path is not None and path.is_file():
        tensors, _ = load_tensors(path)
        return tensors["features"].float(), tensors["labels"]
    feats, labels = [], []
    for f, y in iterate(backbone, dataset, resolution, batch_size, num_workers, progress):
        feats.append(f.cpu())
        labels.append(y.cpu())
    # Round through float16 whatever happens, so a cache hit and a miss give identical numbers.
    out = torch.cat(feats).half().float(), torch.cat(labels)
    if path is not None:
        store(path, *out, backbone=backbone.name, resolution=resolution)
    return out


def store(path: Path, features: torch.Tensor, labels: torch.Tensor, **meta) -> None:
    """Write a feature cache file (float16 features: half the disk, ample precision for probes)."""
    save_tensors(path, {"features": features.half(), "labels": labels.long()}, meta)
