"""Class statistics of the real data: the only thing SFM needs from it.

One streaming pass of the frozen backbone φ over the training set gives, for every class c,

    μ_c = (1 / n_c) Σ_{i : y_i = c} φ(x_i)        (accumulated in float64)

and the counts n_c. Optionally, per-class k-means centres (``kmeans=K``) on a bounded reservoir sample
of each class's features: sub-class targets for IPC > 1. The result is tiny (C×D numbers) and is saved
as safetensors (``means`` [C, D], ``counts`` [C], optional ``centres`` [C, K, D]) with JSON metadata.
"""
from __future__ import annotations

import inspect
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import Dataset

from . import cache
from . import features as features_mod
from .backbones import Backbone
from .utils import load_tensors, save_tensors

__all__ = ["ClassStats", "extract", "cached_extract", "kmeans", "class_centres"]


@dataclass
class ClassStats:
    """Per-class feature means ``[C, D]`` (float64), counts ``[C]``, class names, metadata, optional centres."""

    means: torch.Tensor
    counts: torch.Tensor
    classes: list[str]
    meta: dict[str, Any] = field(default_factory=dict)
    centres: torch.Tensor | None = None

    @property
    def num_classes(self) -> int:
        return self.means.shape[0]

    @property
    def feature_dim(self) -> int:
        return self.means.shape[1]

    def save(self, path: str | os.PathLike) -> None:
        """Write safetensors + JSON metadata atomically (temp file, then rename)."""
        tensors = {"means": self.means, "counts": self.counts}
        if self.centres is not None:
            tensors["centres"] = self.centres
        save_tensors(path, tensors, {**self.meta, "classes": self.classes})

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ClassStats":
        """Read a file written by :meth:`save` (safetensors: no pickled code runs)."""
        tensors, meta = load_tensors(path)
        missing = {"means", "counts"} - tensors.keys()
        if missing or "classes" not in meta:
            raise ValueError(f"{path}: not a class-statistics file (missing {sorted(missing) or ['classes']}); "
                             f"make one with `python -m sfm_lib stats ...`")
        classes = meta.pop("classes")
        return cls(tensors["means"], tensors["counts"], classes, meta, tensors.get("centres"))

    def check_compatible(self, backbone: Backbone) -> None:
        """Raise ValueError if these statistics were not made with ``backbone`` (name or feature dim differ)."""
        name = self.meta.get("backbone")
        if name is not None and name != backbone.name:
            raise ValueError(f"statistics were extracted with backbone {name!r} but {backbone.name!r} is used; "
                             f"re-run `python -m sfm_lib stats --backbone {backbone.name} ...` or use {name!r}")
        if self.feature_dim != backbone.feature_dim:
            raise ValueError(f"statistics have feature dim {self.feature_dim} but backbone {backbone.name!r} "
                             f"gives {backbone.feature_dim}; they come from another backbone")


def kmeans(x: torch.Tensor, k: int, iters: int = 30, generator: torch.Generator | None = None) -> torch.Tensor:
    """Lloyd's k-means with k-means++ seeding on rows of ``x`` [n, D] → centres [k, D], largest cluster first.

    Empty clusters keep their previous centre. Requires n ≥ k.
    """
    n = x.shape[0]
    if n < k:
        raise ValueError(f"k-means needs at least k={k} points, got {n}")
    x = x.float()
    first = torch.randint(n, (1,), generator=generator).item()
    centres = [x[first]]
    d2 = ((x - x[first]) ** 2).sum(1)
    for _ in range(1, k):
        probs = d2 / d2.sum() if d2.sum() > 0 else torch.full_like(d2, 1.0 / n)
        j = torch.multinomial(probs, 1, generator=generator).item()
        centres.append(x[j])
        d2 = torch.minimum(d2, ((x - x[j]) ** 2).sum(1))
    c = torch.stack(centres)
    for _ in range(iters):
        assign = torch.cdist(x, c).argmin(1)
        sums = torch.zeros_like(c).index_add_(0, assign, x)
        sizes = torch.bincount(assign, minlength=k)
        new = torch.where(sizes[:, None] > 0, sums / sizes.clamp(min=1)[:, None], c)
        if torch.allclose(new, c):
            break
        c = new
    sizes = torch.bincount(torch.cdist(x, c).argmin(1), minlength=k)
    return c[sizes.argsort(descending=True, stable=True)]


def class_centres(features: torch.Tensor, labels: torch.Tensor, num_classes: int, k: int, sample: int = 2000,
                  seed: int = 0) -> torch.Tensor:
    """K k-means centres per class [C, K, D] from given features (e.g. the feature cache), each class
    subsampled to at most ``sample`` rows by ``seed``."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for c in range(num_classes):
        rows = features[labels == c]
        if len(rows) > sample:
            rows = rows[torch.randperm(len(rows), generator=g)[:sample]]
        out.append(kmeans(rows, k, generator=g))
    return torch.stack(out)


class _Reservoir:
    """Uniform reservoir sample (Algorithm R) of at most ``size`` feature rows per class."""

    def __init__(self, num_classes: int, size: int, dim: int, generator: torch.Generator):
        self.size, self.g = size, generator
        self.buf = torch.zeros(num_classes, size, dim)
        self.seen = [0] * num_classes

    def add(self, feats: torch.Tensor, labels: torch.Tensor) -> None:
        for f, c in zip(feats.cpu().float(), labels.tolist()):
            s = self.seen[c]
            if s < self.size:
                self.buf[c, s] = f
            else:
                j = int(torch.randint(s + 1, (1,), generator=self.g))
                if j < self.size:
                    self.buf[c, j] = f
            self.seen[c] = s + 1

    def rows(self, c: int) -> torch.Tensor:
        return self.buf[c, :min(self.seen[c], self.size)]


def extract(backbone: Backbone, dataset: Dataset, resolution: int, batch_size: int = 256,
            device: str | torch.device | None = None, num_workers: int | None = None, kmeans_k: int = 0,
            kmeans_sample: int = 2000, seed: int = 0, cache_features: bool = False,
            progress: bool = True) -> ClassStats:
    """One pass of φ over ``dataset`` → :class:`ClassStats` (μ_c in float64, n_c).

    ``kmeans_k > 0`` also fits K centres per class on a reservoir of ``kmeans_sample`` features per class.
    ``cache_features`` also stores every feature in the feature cache (see :mod:`sfm_lib.features`), so a
    later evaluation needs no second pass.
    """
    if device is not None:
        backbone = backbone.to(device)
    classes = list(dataset.classes)
    C, D = len(classes), backbone.feature_dim
    sums = torch.zeros(C, D, dtype=torch.float64, device=backbone.device)
    counts = torch.zeros(C, dtype=torch.long, device=backbone.device)
    g = torch.Generator().manual_seed(seed)
    reservoir = _Reservoir(C, kmeans_sample, D, g) if kmeans_k > 0 else None
    cache_path = features_mod.cache_path(backbone, dataset, resolution) if cache_features else None
    kept_feats, kept_labels = [], []
    for feats, labels in features_mod.iterate(backbone, dataset, resolution, batch_size, num_workers, progress,
                                              desc=f"statistics {backbone.name}@{resolution}"):
        if labels.min() < 0 or labels.max() >= C:
            raise ValueError(f"label out of range [0, {C}) in {dataset.name}")
        sums.index_add_(0, labels, feats.double())
        counts += torch.bincount(labels, minlength=C)
        if reservoir is not None:
            reservoir.add(feats, labels)
        if cache_path is not None:
            kept_feats.append(feats.cpu())
            kept_labels.append(labels.cpu())
    if (counts == 0).any():
        empty = [classes[i] for i in torch.nonzero(counts == 0).flatten().tolist()]
        raise ValueError(f"classes without any image in {dataset.name}: {empty}")
    means = (sums / counts[:, None]).cpu()
    centres = None
    if reservoir is not None:
        centres = torch.stack([kmeans(reservoir.rows(c), kmeans_k, generator=g) for c in range(C)])
    if cache_path is not None:
        features_mod.store(cache_path, torch.cat(kept_feats), torch.cat(kept_labels), backbone=backbone.name,
                           resolution=resolution)
    meta = {"backbone": backbone.name, "feature_dim": D, "resolution": resolution, "dataset": dataset.name,
            "split": getattr(dataset, "split", None), "num_images": int(counts.sum()), "kmeans_k": kmeans_k}
    return ClassStats(means, counts.cpu(), classes, meta, centres)


_EXTRACT_SIGNATURE = inspect.signature(extract)
_RESULT_NEUTRAL = ("batch_size", "device", "num_workers", "cache_features", "progress")
"""Arguments of :func:`extract` that do not change its result (left out of the cache key)."""


def cached_extract(backbone: Backbone, dataset: Dataset, resolution: int, **kwargs) -> ClassStats:
    """:func:`extract`, reusing a file in the cache folder made with the same dataset split, backbone,
    resolution and settings (key: :mod:`sfm_lib.cache`; subsets are never cached)."""
    key = features_mod.dataset_key(dataset)
    if key is None:
        return extract(backbone, dataset, resolution, **kwargs)
    if kwargs.get("device") is not None:  # extract() would move it: key the device it runs on
        backbone = backbone.to(kwargs["device"])
    bound = _EXTRACT_SIGNATURE.bind(backbone, dataset, resolution, **kwargs)
    bound.apply_defaults()
    settings = {k: v for k, v in bound.arguments.items()
                if k not in ("backbone", "dataset", "resolution") + _RESULT_NEUTRAL}
    path = cache.entry("stats", f"{key}-{backbone.name}-{resolution}", backbone=backbone, dataset=dataset,
                       resolution=resolution, settings=settings)
    if path.is_file():
        return ClassStats.load(path)
    result = extract(backbone, dataset, resolution, **kwargs)
    result.save(path)
    return result
