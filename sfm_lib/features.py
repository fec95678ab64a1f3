"""One streaming pass of a frozen backbone over a dataset, and an on-disk cache of its features.

The pass never holds the images in memory: batches of uint8 images are fed to the backbone's device
(pinned host memory and non-blocking copies on CUDA), turned into floats in [0, 1] there, and φ runs
under ``torch.inference_mode``; the caller consumes the features batch by batch.

- In-memory datasets (Fashion-MNIST, CIFAR, or subsets of them): uint8 slices, resized per batch on the
  device.
- Image folders (mixed sizes): the DataLoader workers decode each file to uint8 and take its centre
  square (exact in uint8). On CUDA these crops are copied as uint8 and resized on the device, one
  batched resize per distinct crop size; on the CPU the workers resize them (in parallel). Both do what
  :func:`backbones.square_resize` does on the float image, so the features are those of the float path.
  (Rounding the resized image to uint8 in the workers instead would change Lite0 features at 32 px by up
  to 6 %: the backbone is that sensitive to ±0.5/255 per pixel.)
- Any other dataset of float images: a DataLoader with a per-image crop and resize in float.

Files that cannot be decoded stop the pass with :class:`sfm_lib.data.BadImageError` (one line naming the
file), or are skipped and reported with ``skip_bad=True``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset

from . import cache
from .backbones import Backbone, square_resize
from .data import BadImageError, ImageFolderDataset, TensorImageDataset
from .utils import load_tensors, save_tensors

__all__ = ["iterate", "stream", "Batch", "FeatureTable", "compute", "store", "cache_path", "dataset_key", "default_workers"]


_RESIZE_ON_DEVICE: bool | None = None  # image folders: None = on CUDA only (tests set it to cover both)


class Batch(NamedTuple):
    """One step of :func:`stream`: features ``[B, D]`` (float32, on the backbone's device), labels ``[B]``,
    how many dataset items this batch consumed (B plus the skipped ones) and the skipped files."""

    features: torch.Tensor
    labels: torch.Tensor
    consumed: int
    skipped: list[str]


def _folder_of(dataset: Dataset) -> tuple[ImageFolderDataset, list[int] | None] | None:
    """The image folder behind ``dataset`` (itself or a Subset of it) and the subset indices, else None."""
    if isinstance(dataset, ImageFolderDataset):
        return dataset, None
    if isinstance(dataset, torch.utils.data.Subset) and isinstance(dataset.dataset, ImageFolderDataset):
        return dataset.dataset, list(dataset.indices)
    return None


class _DecodeFolder(Dataset):
    """Items ``start..`` of an image folder as (image, label, bad-file note or None): the image is the
    uint8 centre square ``[3, s, s]``, or, with ``resize``, that square resized to ``[3, r, r]`` float."""

    def __init__(self, folder: ImageFolderDataset, indices: list[int] | None, start: int, resolution: int,
                 resize: bool):
        self.folder, self.indices, self.start, self.resolution = folder, indices, start, resolution
        self.resize = resize
        self.n = (len(folder) if indices is None else len(indices)) - start

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        j = self.start + i
        j = j if self.indices is None else self.indices[j]
        label = int(self.folder.targets[j])
        try:
            img = self.folder.read_uint8(j)
        except BadImageError as err:  # reported by the main process: a worker's raise carries its traceback
            return None, label, (err.path, err.cause)
        h, w = img.shape[-2:]
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        img = img[:, top:top + side, left:left + side].contiguous()
        if self.resize:
            img = square_resize(img.float() / 255.0, self.resolution)
        return img, label, None


def _collate_folder(items):
    """(images: one tensor if all have one size, else a list; labels [B]; items consumed; bad files)."""
    good = [(img, y) for img, y, bad in items if bad is None]
    bad = [b for _, _, b in items if b is not None]
    images = [img for img, _ in good]
    if images and all(img.shape == images[0].shape for img in images):
        images = torch.stack(images)
    return images, torch.tensor([y for _, y in good], dtype=torch.long), len(items), bad


def _to_device(images: torch.Tensor | list[torch.Tensor], resolution: int, device: torch.device) -> torch.Tensor:
    """A batch onto ``device`` as float [B, 3, H, W] in [0, 1] (non-blocking copies). A list of uint8
    squares of several sizes is resized there, one batched resize per size (bitwise as one by one)."""
    if isinstance(images, torch.Tensor):
        x = images.to(device, non_blocking=True)
        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
        return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
    out = torch.empty(len(images), 3, resolution, resolution, device=device)
    by_side: dict[int, list[int]] = {}
    for k, img in enumerate(images):
        by_side.setdefault(img.shape[-1], []).append(k)
    for ks in by_side.values():
        x = torch.stack([images[k].to(device, non_blocking=True) for k in ks]).float().div_(255.0)
        out[torch.tensor(ks, device=device)] = square_resize(x, resolution)
    return out


class _SquareResize(Dataset):
    """Per-image centre square crop + bilinear resize (float images), so mixed sizes can be batched."""

    def __init__(self, dataset: Dataset, resolution: int, start: int):
        self.dataset, self.resolution, self.start = dataset, resolution, start

    def __len__(self) -> int:
        return len(self.dataset) - self.start

    def __getitem__(self, i: int):
        img, label = self.dataset[self.start + i]
        return square_resize(img, self.resolution), label


def default_workers(dataset: Dataset) -> int:
    """0 for in-memory tensor datasets (a worker would only add copies), else up to 4 decoding workers."""
    if getattr(dataset, "image_size", None) is not None:
        return 0
    return min(4, os.cpu_count() or 1)


def stream(backbone: Backbone, dataset: Dataset, resolution: int, batch_size: int = 256,
           num_workers: int | None = None, *, start: int = 0, skip_bad: bool | None = None
           ) -> Iterator[Batch]:
    """φ over items ``start, start+1, …`` of ``dataset`` in order, batch by batch (see :class:`Batch`).

    An unreadable file raises :class:`BadImageError` before any feature of its batch is computed, unless
    ``skip_bad`` (default: the dataset's own ``skip_bad`` attribute, else False).
    """
    if skip_bad is None:
        owner = dataset.dataset if isinstance(dataset, torch.utils.data.Subset) else dataset
        skip_bad = bool(getattr(owner, "skip_bad", False))
    dev = backbone.device
    with torch.inference_mode():
        for images, labels, consumed, bad in _batches(dataset, resolution, batch_size, num_workers, dev, start):
            if bad and not skip_bad:
                path, cause = bad[0]
                raise BadImageError(path, cause, "pass skip_bad=True (--skip-bad) to skip unreadable files")
            if len(labels):
                feats = backbone.features(_to_device(images, resolution, dev), resolution)
            else:
                feats = torch.empty(0, backbone.feature_dim, device=dev)
            yield Batch(feats, labels.to(dev, non_blocking=True), consumed, [p for p, _ in bad])


def iterate(backbone: Backbone, dataset: Dataset, resolution: int, batch_size: int = 256,
            num_workers: int | None = None, progress: bool = True, desc: str = "features", *,
            skip_bad: bool | None = None, skipped: list[str] | None = None
            ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(φ(preprocess(x)) [B, D] float32 on the backbone's device, labels [B])`` over ``dataset`` in order.

    ``skip_bad``: skip files that cannot be decoded (default: the dataset's ``skip_bad``); their paths are
    appended to ``skipped`` when a list is given. Otherwise the first such file raises BadImageError.
    """
    from .progress import tqdm

    with tqdm(total=len(dataset), desc=desc, unit="img", disable=not progress, mininterval=2.0) as bar:
        for batch in stream(backbone, dataset, resolution, batch_size, num_workers, skip_bad=skip_bad):
            if skipped is not None:
                skipped.extend(batch.skipped)
            yield batch.features, batch.labels
            bar.update(batch.consumed)


def _batches(dataset: Dataset, resolution: int, batch_size: int, num_workers: int | None,
             device: torch.device, start: int = 0
             ) -> Iterator[tuple[torch.Tensor, torch.Tensor, int, list[tuple[str, str]]]]:
    """(images uint8 [B,1|3,H,W] or float [B,3,r,r] on the CPU, labels [B], items consumed, bad files)."""
    base, indices = dataset, None
    if isinstance(dataset, torch.utils.data.Subset):
        base, indices = dataset.dataset, torch.as_tensor(dataset.indices)
    if isinstance(base, TensorImageDataset) and not num_workers:
        order = torch.arange(len(base)) if indices is None else indices
        for s in range(start, len(order), batch_size):
            idx = order[s:s + batch_size]
            imgs = base.images[idx]
            imgs = imgs.unsqueeze(1) if imgs.ndim == 3 else imgs.permute(0, 3, 1, 2)
            yield imgs, base.targets[idx], len(idx), []
        return
    workers = default_workers(dataset) if num_workers is None else num_workers
    pin = device.type == "cuda"
    folder = _folder_of(dataset)
    if folder is not None:
        on_device = device.type == "cuda" if _RESIZE_ON_DEVICE is None else _RESIZE_ON_DEVICE
        source = _DecodeFolder(folder[0], folder[1], start, resolution, resize=not on_device)
        yield from DataLoader(source, batch_size=batch_size, shuffle=False, num_workers=workers,
                              pin_memory=pin, collate_fn=_collate_folder)
        return
    for images, labels in DataLoader(_SquareResize(dataset, resolution, start), batch_size=batch_size,
                                     shuffle=False, num_workers=workers, pin_memory=pin):
        yield images, labels, len(labels), []


def dataset_key(dataset: Dataset) -> str | None:
    """A file-name-safe key for a whole dataset split (``name-split-N``), or None for subsets."""
    split = getattr(dataset, "split", None)
    if split is None or isinstance(dataset, torch.utils.data.Subset):
        return None
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in dataset.name)
    return f"{safe}-{split}-{len(dataset)}"


def cache_path(backbone: Backbone, dataset: Dataset, resolution: int) -> Path | None:
    """Where the features of a whole dataset split are cached (key: :mod:`sfm_lib.cache`), or None for
    subsets (not cached)."""
    key = dataset_key(dataset)
    if key is None:
        return None
    return cache.entry("features", f"{key}-{backbone.name}-{resolution}", backbone=backbone, dataset=dataset,
                       resolution=resolution)


def compute(backbone: Backbone, dataset: Dataset, resolution: int, batch_size: int = 256,
            num_workers: int | None = None, cache: bool = True, progress: bool = True, *,
            skip_bad: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Features ``[N, D]`` (float32, CPU) and labels ``[N]`` of a whole dataset, from the cache when present.

    The pass fills one preallocated float16 table (N × D × 2 bytes, no per-batch list). ``skip_bad``: as in
    :func:`iterate`; the skipped files have no row.
    """
    path = cache_path(backbone, dataset, resolution) if cache else None
    if path is not None and path.is_file():
        tensors, _ = load_tensors(path)
        return tensors["features"].float(), tensors["labels"]
    table = FeatureTable(len(dataset), backbone.feature_dim)
    for f, y in iterate(backbone, dataset, resolution, batch_size, num_workers, progress, skip_bad=skip_bad):
        table.add(f, y)
    # Rounded through float16 whatever happens, so a cache hit and a miss give identical numbers.
    half = table.features()
    out = half.float(), table.labels()
    if path is not None:
        store(path, half, out[1], backbone=backbone.name, resolution=resolution)
    return out


class FeatureTable:
    """Rows of features streamed into one preallocated float16 table ``[capacity, D]`` (CPU) and labels."""

    def __init__(self, capacity: int, dim: int):
        self._feats = torch.empty(capacity, dim, dtype=torch.float16)
        self._labels = torch.empty(capacity, dtype=torch.long)
        self.n = 0

    def add(self, feats: torch.Tensor, labels: torch.Tensor) -> None:
        b = len(labels)
        self._feats[self.n:self.n + b] = feats.to("cpu", torch.float16)
        self._labels[self.n:self.n + b] = labels.cpu()
        self.n += b

    def features(self) -> torch.Tensor:
        return self._feats[:self.n]

    def labels(self) -> torch.Tensor:
        return self._labels[:self.n]


def store(path: Path, features: torch.Tensor, labels: torch.Tensor, **meta) -> None:
    """Write a feature cache file (float16 features: half the disk, ample precision for probes)."""
    save_tensors(path, {"features": features.half(), "labels": labels.long()}, meta)
