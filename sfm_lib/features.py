"""One streaming pass of a frozen backbone over a dataset, and an on-disk cache of its features.

The pass never holds the images in memory: batches are fed to the backbone's device (pinned host memory and
non-blocking copies on CUDA) and φ runs under ``torch.inference_mode``; the caller consumes the features
batch by batch.

- In-memory datasets (Fashion-MNIST, CIFAR, or subsets of them): uint8 slices, resized per batch on the
  device, no workers (a worker would only add copies).
- Image folders (mixed sizes, :func:`folder_batches`): DataLoader workers (by default one per core this
  process may use, :func:`default_workers`) decode each file (:func:`read_image`: JPEGs with
  ``torchvision.io.decode_jpeg``, which gives PIL's pixels bit for bit, everything else with PIL) and make
  the loop's input there, by the one reference computation of :func:`sfm_lib.data.real_images`
  (float in [0, 1], then the test transform, by default the centre square resized bilinearly,
  :func:`sfm_lib.data.square_resize`), on the CPU whatever the backbone's device, so the features never
  depend on a device's resize. Each worker prepares ``prefetch`` batches ahead; on CUDA they come from
  pinned memory. :data:`LOADER` names this method in the feature cache key.
- Any other dataset of float images: a DataLoader with the transform per image in float.

Every pass takes ``transform`` (a :class:`sfm_lib.data.EvalTransform`, default None:
:data:`sfm_lib.data.SQUARE`, see :func:`sfm_lib.backbones.eval_transform`); it enters the cache key
through :func:`loader_key`.

Files that cannot be decoded stop the pass with :class:`sfm_lib.data.BadImageError` (one line naming the
file), or are skipped and reported with ``skip_bad=True``.
"""
from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from . import cache
from .backbones import Backbone
from .data import SQUARE, BadImageError, EvalTransform, ImageFolderDataset, TensorImageDataset
from .utils import load_tensors, save_tensors

__all__ = ["iterate", "stream", "Batch", "FeatureTable", "compute", "store", "cache_path", "dataset_key",
           "default_workers", "available_cores", "read_image", "folder_batches", "folder_of", "LOADER",
           "loader_key"]

LOADER = "pil-pixels/cpu-square-resize/1"
"""How image-folder files become the backbone's input (decoded pixels as PIL gives them, then the test
transform on the CPU in float); part of every feature and statistics cache key (:func:`loader_key`).
Change it whenever that computation changes."""


def loader_key(transform: EvalTransform | None) -> str:
    """What the cache keys record of how real images become the input: :data:`LOADER`, and the transform
    unless it is :data:`sfm_lib.data.SQUARE` (the computation LOADER named before transforms existed, so
    its entries keep their keys; None means SQUARE)."""
    t = SQUARE if transform is None else transform
    return LOADER if t == SQUARE else f"{LOADER}|{t.crop_mode}:{t.crop_pct!r}:{t.interpolation}"


_JPEG_MAGIC = (0xFF, 0xD8, 0xFF)


class Batch(NamedTuple):
    """One step of :func:`stream`: features ``[B, D]`` (float32, on the backbone's device), labels ``[B]``,
    how many dataset items this batch consumed (B plus the skipped ones) and the skipped files."""

    features: torch.Tensor
    labels: torch.Tensor
    consumed: int
    skipped: list[str]


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity mask; ``os.cpu_count()`` where there is none)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_workers(dataset: Dataset) -> int:
    """0 for in-memory tensor datasets (a worker would only add copies), else one decoding worker per core
    this process may use, shared among the processes of one node under torchrun (``LOCAL_WORLD_SIZE``)."""
    if getattr(dataset, "image_size", None) is not None:
        return 0
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return max(1, available_cores() // local)


def folder_of(dataset: Dataset) -> tuple[ImageFolderDataset, list[int] | None] | None:
    """The image folder behind ``dataset`` (itself or Subsets of it, nested or not) and the folder index of
    every item of ``dataset`` (None: the folder itself), else None."""
    indices = None
    while isinstance(dataset, torch.utils.data.Subset):
        inner = [int(i) for i in dataset.indices]
        indices = inner if indices is None else [inner[i] for i in indices]
        dataset = dataset.dataset
    return (dataset, indices) if isinstance(dataset, ImageFolderDataset) else None


def read_image(folder: ImageFolderDataset, i: int) -> torch.Tensor:
    """File ``i`` of ``folder`` as uint8 ``[3, H, W]``, the pixels of :meth:`ImageFolderDataset.read_uint8`:
    JPEGs by ``torchvision.io.decode_jpeg`` in RGB mode (grey, RGB and CMYK files give PIL's pixels bit for
    bit, tests/test_loaders.py), every other file, and any JPEG torchvision refuses, by PIL (which raises
    :class:`BadImageError` naming an unreadable file)."""
    io = _torchvision_io()
    if io is not None:
        try:
            with warnings.catch_warnings():  # torchvision 0.29 warns that its decoders move to torchcodec
                warnings.simplefilter("ignore", DeprecationWarning)
                raw = io.read_file(str(folder.files[i]))
                if raw.numel() > 3 and tuple(raw[:3].tolist()) == _JPEG_MAGIC:
                    img = io.decode_jpeg(raw, mode=io.ImageReadMode.RGB)
                    if img.shape[1] * img.shape[2] <= 2 * _max_pixels():
                        return img  # else PIL refuses it as a decompression bomb, as it refuses it there
        except RuntimeError:
            pass
    return folder.read_uint8(i)


def _max_pixels() -> float:
    """PIL's limit beyond which it refuses an image as a decompression bomb (at twice this many pixels)."""
    from PIL import Image

    return Image.MAX_IMAGE_PIXELS or float("inf")


@functools.cache
def _torchvision_io():
    """``torchvision.io``, or None where it cannot be imported (imported once, before workers fork)."""
    try:
        import torchvision.io
    except ImportError:
        return None
    return torchvision.io


class _FolderImages(Dataset):
    """Item i of an image folder (``indices`` maps it to a file) as (image, label, None), the image exactly
    as :func:`sfm_lib.data.real_images` makes it with ``transform`` (float [3, r, r] in [0, 1]), or (None,
    label, (path, cause)) for a file that cannot be decoded."""

    def __init__(self, folder: ImageFolderDataset, indices: list[int] | None, resolution: int,
                 transform: EvalTransform):
        self.folder, self.indices, self.resolution, self.transform = folder, indices, resolution, transform

    def __len__(self) -> int:
        return len(self.folder) if self.indices is None else len(self.indices)

    def __getitem__(self, i: int):
        j = i if self.indices is None else self.indices[i]
        label = int(self.folder.targets[j])
        try:
            img = read_image(self.folder, j)
        except BadImageError as err:  # reported by the main process: a worker's raise carries its traceback
            return None, label, (err.path, err.cause)
        return self.transform(img.float() / 255.0, self.resolution), label, None


def _collate_folder(items):
    """(images [B, 3, r, r], labels [B], items consumed, bad files (path, cause)) of one batch."""
    good = [(img, y) for img, y, bad in items if bad is None]
    bad = [b for _, _, b in items if b is not None]
    images = torch.stack([img for img, _ in good]) if good else torch.empty(0)
    return images, torch.tensor([y for _, y in good], dtype=torch.long), len(items), bad


def folder_batches(dataset: Dataset, batches: Iterable[Sequence[int]], resolution: int,
                   num_workers: int | None = None, pin_memory: bool = False, prefetch: int = 2,
                   transform: EvalTransform | None = None
                   ) -> Iterator[tuple[torch.Tensor, torch.Tensor, int, list[tuple[str, str]]]]:
    """For each list of item positions in ``batches`` (any iterable, endless ones too) of an image folder or
    a Subset of one: (images float [B, 3, r, r] as :func:`sfm_lib.data.real_images` makes them, labels [B],
    items consumed, unreadable files as (path, cause)). ``num_workers`` DataLoader workers (default:
    :func:`default_workers`) decode and resize, ``prefetch`` batches each ahead of the consumer;
    ``pin_memory``: batches in pinned host memory (for non-blocking copies to CUDA); ``transform``: the
    test transform (default :data:`sfm_lib.data.SQUARE`)."""
    found = folder_of(dataset)
    if found is None:
        raise ValueError(f"folder_batches needs an image folder (or a Subset of one), got {type(dataset).__name__}")
    workers = default_workers(dataset) if num_workers is None else num_workers
    _torchvision_io()  # forked workers inherit the import (about 1 s each otherwise)
    extra = {"prefetch_factor": prefetch} if workers > 0 else {}
    images = _FolderImages(found[0], found[1], resolution, SQUARE if transform is None else transform)
    return iter(DataLoader(images, batch_sampler=batches,
                           num_workers=workers, pin_memory=pin_memory, collate_fn=_collate_folder, **extra))


def _to_device(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch onto ``device`` as float [B, 3, H, W] in [0, 1] (non-blocking copy; uint8 scaled there)."""
    x = images.to(device, non_blocking=True)
    x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


class _Transformed(Dataset):
    """Items ``start, start+1, …`` of a dataset of float images through ``transform`` at ``resolution``,
    so mixed sizes can be batched."""

    def __init__(self, dataset: Dataset, resolution: int, start: int, transform: EvalTransform):
        self.dataset, self.resolution, self.start, self.transform = dataset, resolution, start, transform

    def __len__(self) -> int:
        return len(self.dataset) - self.start

    def __getitem__(self, i: int):
        img, label = self.dataset[self.start + i]
        return self.transform(img, self.resolution), label


def stream(backbone: Backbone, dataset: Dataset, resolution: int, batch_size: int = 256,
           num_workers: int | None = None, *, start: int = 0, skip_bad: bool | None = None,
           transform: EvalTransform | None = None) -> Iterator[Batch]:
    """φ over items ``start, start+1, …`` of ``dataset`` in order, batch by batch (see :class:`Batch`), each
    image through ``transform`` (default :data:`sfm_lib.data.SQUARE`) at ``resolution``: in-memory images on
    the backbone's device, all others on the CPU (see the module doc).

    An unreadable file raises :class:`BadImageError` before any feature of its batch is computed, unless
    ``skip_bad`` (default: the dataset's own ``skip_bad`` attribute, else False).
    """
    if skip_bad is None:
        owner = dataset.dataset if isinstance(dataset, torch.utils.data.Subset) else dataset
        skip_bad = bool(getattr(owner, "skip_bad", False))
    dev = backbone.device
    transform = SQUARE if transform is None else transform
    with torch.inference_mode():
        for images, labels, consumed, bad in _batches(dataset, resolution, batch_size, num_workers, dev, start,
                                                      transform):
            if bad and not skip_bad:
                path, cause = bad[0]
                raise BadImageError(path, cause, "pass skip_bad=True (--skip-bad) to skip unreadable files")
            if len(labels):
                x = _to_device(images, dev)
                if images.dtype == torch.uint8:  # native in-memory images: the transform runs here
                    x = transform(x, resolution)
                feats = backbone.features(x, resolution)
            else:
                feats = torch.empty(0, backbone.feature_dim, device=dev)
            yield Batch(feats, labels.to(dev, non_blocking=True), consumed, [p for p, _ in bad])


def iterate(backbone: Backbone, dataset: Dataset, resolution: int, batch_size: int = 256,
            num_workers: int | None = None, progress: bool = True, desc: str = "features", *,
            skip_bad: bool | None = None, skipped: list[str] | None = None,
            transform: EvalTransform | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(φ(preprocess(x)) [B, D] float32 on the backbone's device, labels [B])`` over ``dataset`` in order.

    ``skip_bad``: skip files that cannot be decoded (default: the dataset's ``skip_bad``); their paths are
    appended to ``skipped`` when a list is given. Otherwise the first such file raises BadImageError.
    ``transform``: as in :func:`stream`.
    """
    from .progress import tqdm

    with tqdm(total=len(dataset), desc=desc, unit="img", disable=not progress, mininterval=2.0) as bar:
        for batch in stream(backbone, dataset, resolution, batch_size, num_workers, skip_bad=skip_bad,
                            transform=transform):
            if skipped is not None:
                skipped.extend(batch.skipped)
            yield batch.features, batch.labels
            bar.update(batch.consumed)


def _batches(dataset: Dataset, resolution: int, batch_size: int, num_workers: int | None,
             device: torch.device, start: int = 0, transform: EvalTransform = SQUARE
             ) -> Iterator[tuple[torch.Tensor, torch.Tensor, int, list[tuple[str, str]]]]:
    """(images, labels [B], items consumed, bad files) on the CPU: images uint8 [B,1|3,H,W] as stored
    (in-memory data; :func:`stream` applies ``transform`` on the device) or float [B,3,r,r], already through
    ``transform``."""
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
    if folder_of(dataset) is not None:
        n = len(dataset)
        batches = (range(s, min(s + batch_size, n)) for s in range(start, n, batch_size))
        yield from folder_batches(dataset, batches, resolution, workers, pin_memory=pin, transform=transform)
        return
    for images, labels in DataLoader(_Transformed(dataset, resolution, start, transform), batch_size=batch_size,
                                     shuffle=False, num_workers=workers, pin_memory=pin):
        yield images, labels, len(labels), []


def dataset_key(dataset: Dataset) -> str | None:
    """A file-name-safe key for a whole dataset split (``name-split-N``), or None for subsets."""
    split = getattr(dataset, "split", None)
    if split is None or isinstance(dataset, torch.utils.data.Subset):
        return None
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in dataset.name)
    return f"{safe}-{split}-{len(dataset)}"


def cache_path(backbone: Backbone, dataset: Dataset, resolution: int,
               transform: EvalTransform | None = None) -> Path | None:
    """Where the features of a whole dataset split are cached (key: :mod:`sfm_lib.cache`, with
    :func:`loader_key` of ``transform``), or None for subsets (not cached)."""
    key = dataset_key(dataset)
    if key is None:
        return None
    return cache.entry("features", f"{key}-{backbone.name}-{resolution}", backbone=backbone, dataset=dataset,
                       resolution=resolution, loader=loader_key(transform))


def compute(backbone: Backbone, dataset: Dataset, resolution: int, batch_size: int = 256,
            num_workers: int | None = None, cache: bool = True, progress: bool = True, *,
            skip_bad: bool | None = None, transform: EvalTransform | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Features ``[N, D]`` (float32, CPU) and labels ``[N]`` of a whole dataset, from the cache when present.

    The pass fills one preallocated float16 table (N × D × 2 bytes, no per-batch list). ``skip_bad``: as in
    :func:`iterate`; the skipped files have no row. ``transform``: as in :func:`stream` (part of the key).
    """
    path = cache_path(backbone, dataset, resolution, transform) if cache else None
    if path is not None and path.is_file():
        tensors, _ = load_tensors(path)
        return tensors["features"].float(), tensors["labels"]
    table = FeatureTable(len(dataset), backbone.feature_dim)
    for f, y in iterate(backbone, dataset, resolution, batch_size, num_workers, progress, skip_bad=skip_bad,
                        transform=transform):
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
