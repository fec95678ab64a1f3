"""Class statistics of the real data: the only thing SFM needs from it.

One streaming pass of the frozen backbone φ over the training set gives, for every class c,

    μ_c = (1 / n_c) Σ_{i : y_i = c} φ(x_i)        (accumulated in float64)

and the counts n_c. Optionally, per-class k-means centres (``kmeans=K``) on a bounded uniform sample
of each class's features (:class:`Reservoir`): sub-class targets for IPC > 1. Memory does not grow with
the number of images (except the optional feature cache, one float16 table). A long pass checkpoints its
float64 sums, counts and position and resumes exactly. The result is tiny (C×D numbers) and is saved as
safetensors (``means`` [C, D], ``counts`` [C], optional ``centres`` [C, K, D]) with JSON metadata.

Under ``torchrun`` (W processes, :mod:`sfm_lib.distributed`) rank r streams the r-th of W contiguous blocks
of the items, the float64 sums and counts are all-reduced, and every rank returns the same means (equal
to one process's up to float64 summation order); metadata records ``world_size``. Checkpoints are per rank
(``CKPT.rank{r}of{W}``, resumable with the same W). The k-means sample and the feature cache need one
process and are refused with W > 1.
"""
from __future__ import annotations

import inspect
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from . import cache, distributed
from . import data as data_mod
from . import features as features_mod
from .backbones import Backbone
from .utils import load_tensors, save_tensors

__all__ = ["ClassStats", "Reservoir", "extract", "cached_extract", "kmeans", "class_centres"]


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


class Reservoir:
    """A uniform sample without replacement of at most ``size`` feature rows per class, in bounded memory.

    Priority sampling: every row gets an independent key u ~ U(0, 1) and each class keeps the ``size``
    rows with the largest keys seen so far. The kept set of a class is then a uniformly random
    ``min(n_c, size)``-subset of its n_c rows (all orderings of i.i.d. keys are equally likely), as with
    Algorithm R, but a batch is merged with one top-k over ``[C, size + B]`` keys instead of a Python loop
    per row. Memory: ``C × size × D`` float32 rows plus ``C × size`` keys, whatever the number of images.
    """

    _EMPTY, _ABSENT = -1.0, -2.0  # keys of an empty slot, and of a batch row of another class

    def __init__(self, num_classes: int, size: int, dim: int, generator: torch.Generator):
        if size < 1:
            raise ValueError(f"the k-means sample size must be ≥ 1, got {size}")
        self.size, self.g = size, generator
        self.buf = torch.zeros(num_classes, size, dim)
        self.keys = torch.full((num_classes, size), self._EMPTY, dtype=torch.float64)

    def add(self, feats: torch.Tensor, labels: torch.Tensor) -> None:
        """Offer rows ``feats`` [B, D] of classes ``labels`` [B]."""
        feats, labels = feats.detach().to("cpu", torch.float32), labels.cpu()
        B, (C, S) = len(labels), self.keys.shape
        if B == 0:
            return
        u = torch.rand(B, generator=self.g, dtype=torch.float64)
        offered = torch.full((C, B), self._ABSENT, dtype=torch.float64)
        offered[labels, torch.arange(B)] = u
        top = torch.cat([self.keys, offered], 1).topk(S, dim=1).indices  # [C, S]
        kept_old = torch.zeros(C, S + B, dtype=torch.bool).scatter_(1, top, True)
        taken = kept_old[:, S:]                 # [C, B]: batch rows that enter class c's sample
        freed = ~kept_old[:, :S]                # [C, S]: slots whose row (or emptiness) leaves
        # Per class, as many rows enter as slots are freed; row-major order pairs them class by class.
        slot_c, slot_j = torch.nonzero(freed, as_tuple=True)
        _, row_b = torch.nonzero(taken, as_tuple=True)
        self.buf[slot_c, slot_j] = feats[row_b]
        self.keys[slot_c, slot_j] = u[row_b]

    def rows(self, c: int) -> torch.Tensor:
        """The sampled rows of class ``c`` [≤ size, D], in slot order."""
        return self.buf[c][self.keys[c] >= 0]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"reservoir_buf": self.buf, "reservoir_keys": self.keys, "reservoir_rng": self.g.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.buf.copy_(state["reservoir_buf"])
        self.keys.copy_(state["reservoir_keys"])
        self.g.set_state(state["reservoir_rng"])


_CKPT_KIND = "sfm_lib statistics checkpoint"
# Settings a resumed pass must share with its checkpoint: every one changes the result.
_RESUME_KEYS = ("dataset", "split", "backbone", "pretrained", "resolution", "batch_size", "kmeans_k",
                "kmeans_sample", "seed", "feature_dim", "num_classes", "world_size", "rank", "loader")


def _rank_block(dataset: Dataset, rank: int, world: int) -> Dataset:
    """Items ⌊r·n/W⌋ … ⌊(r+1)·n/W⌋ − 1 of ``dataset``: rank r's contiguous block (sequential file reads;
    a per-rank position then resumes it like a whole pass). Nested subsets are flattened."""
    lo, hi = distributed.block(len(dataset), rank, world)
    if isinstance(dataset, torch.utils.data.Subset):
        block = data_mod.subset(dataset.dataset, [dataset.indices[i] for i in range(lo, hi)])
    else:
        block = data_mod.subset(dataset, range(lo, hi))
    block.split = getattr(dataset, "split", None)
    return block


def rank_checkpoint(checkpoint: str | os.PathLike) -> Path:
    """This rank's statistics checkpoint: ``checkpoint`` itself in one process, else ``NAME.rank{r}of{W}``."""
    path, world = Path(checkpoint), distributed.world_size()
    return path if world == 1 else path.with_name(f"{path.name}.rank{distributed.rank()}of{world}")


def _refuse_other_world_checkpoints(checkpoint: Path, world: int) -> None:
    """A resume finds no checkpoint of its own but one of a pass with another number of processes."""
    others = [p.name for p in checkpoint.parent.glob(checkpoint.name + ".rank*of*")
              if not p.name.endswith(f"of{world}")]
    if world > 1 and checkpoint.is_file():
        others.append(checkpoint.name + " (one process)")
    if others:
        raise ValueError(f"no checkpoint of this rank for {world} process(es), but {', '.join(sorted(others))} "
                         f"in {checkpoint.parent} belong to a pass with another number of processes: resume "
                         f"with that many processes, or delete them to start over")


def _class_sums(labels: torch.Tensor, feats: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ_{i: y_i = c} f_i in float64 [C, D], n_c [C]) of one batch through a one-hot matrix product:
    deterministic on CUDA (no atomic adds), so a resumed pass equals an uninterrupted one bit for bit
    there too, and free of host synchronisation (unlike ``bincount`` or ``one_hot`` on CUDA)."""
    onehot = torch.zeros(len(labels), num_classes, dtype=torch.float64, device=feats.device)
    onehot.scatter_(1, labels[:, None], 1.0)
    return onehot.T @ feats.double(), onehot.sum(0).long()


def extract(backbone: Backbone, dataset: Dataset, resolution: int, batch_size: int = 256,
            device: str | torch.device | None = None, num_workers: int | None = None, kmeans_k: int = 0,
            kmeans_sample: int = 2000, seed: int = 0, cache_features: bool = False,
            progress: bool = True, *, skip_bad: bool | None = None,
            checkpoint: str | os.PathLike | None = None, checkpoint_every: int = 100,
            resume: bool = False, transform: data_mod.EvalTransform | None = None) -> ClassStats:
    """One pass of φ over ``dataset`` → :class:`ClassStats` (μ_c in float64, n_c).

    ``kmeans_k > 0`` also fits K centres per class on a bounded uniform sample (:class:`Reservoir`) of
    ``kmeans_sample`` features per class. ``cache_features`` also stores every feature in the feature cache
    (see :mod:`sfm_lib.features`; one preallocated float16 table), so a later evaluation needs no second
    pass. ``skip_bad``: skip image files that cannot be decoded (default: the dataset's ``skip_bad``);
    ``meta["skipped"]`` lists them and ``meta["num_skipped"]`` counts them.

    ``checkpoint``: every ``checkpoint_every`` batches, at the end, and before an unreadable file stops the
    pass, the float64 sums, counts, position, skipped files (and the k-means sample with its RNG state) are
    written there atomically. ``resume=True`` continues from it and gives exactly the result of an
    uninterrupted pass; it refuses a checkpoint made with another dataset, backbone, resolution, batch size
    or k-means setting, or whose items before the saved position differ. Without ``resume`` an existing
    checkpoint is never overwritten.

    ``transform``: the test transform of every image (default :data:`sfm_lib.data.SQUARE`, see
    :func:`sfm_lib.backbones.eval_transform`); a checkpoint made with another is refused.

    Under torchrun (W > 1): each rank streams its block of the items (see the module doc), checkpoints to
    :func:`rank_checkpoint` and resumes from it (same W); ``kmeans_k`` and ``cache_features`` are refused.
    """
    from .progress import tqdm

    if device is not None:
        backbone = backbone.to(device)
    if checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be ≥ 1 batch, got {checkpoint_every}")
    world, rank = distributed.world_size(), distributed.rank()
    if world > 1 and (kmeans_k > 0 or cache_features):
        raise ValueError("the k-means centres (--kmeans) and the feature cache (--cache-features) need the "
                         "whole pass in one process: run that statistics pass without torchrun")
    full_dataset = dataset
    if world > 1:
        dataset = _rank_block(dataset, rank, world)
    classes = list(dataset.classes)
    C, D = len(classes), backbone.feature_dim
    dev = backbone.device
    targets = torch.as_tensor(dataset.targets)
    if len(targets) and (int(targets.min()) < 0 or int(targets.max()) >= C):
        raise ValueError(f"label out of range [0, {C}) in {dataset.name}")
    sums = torch.zeros(C, D, dtype=torch.float64, device=dev)
    counts = torch.zeros(C, dtype=torch.long, device=dev)
    g = torch.Generator().manual_seed(seed)
    reservoir = Reservoir(C, kmeans_sample, D, g) if kmeans_k > 0 else None
    cache_path = features_mod.cache_path(backbone, dataset, resolution, transform) if cache_features else None
    table = features_mod.FeatureTable(len(dataset), D) if cache_path is not None else None
    config = {"kind": _CKPT_KIND, "dataset": dataset.name, "split": getattr(dataset, "split", None),
              "backbone": backbone.name, "pretrained": getattr(backbone, "pretrained", None),
              "resolution": resolution, "batch_size": batch_size, "kmeans_k": kmeans_k,
              "kmeans_sample": kmeans_sample if kmeans_k else None, "seed": seed if kmeans_k else None,
              "feature_dim": D, "num_classes": C, "world_size": world, "rank": rank,
              "loader": features_mod.loader_key(transform)}
    position, skipped = 0, []
    prefix = data_mod.Fingerprint(dataset)  # of the items before ``position``

    ckpt = rank_checkpoint(checkpoint) if checkpoint else None
    if resume and ckpt is None:
        raise ValueError("resume=True needs a checkpoint path")
    if resume and not ckpt.is_file():
        _refuse_other_world_checkpoints(Path(checkpoint), world)
    if resume and ckpt.is_file():
        tensors, saved = load_tensors(ckpt)
        if saved.get("kind") != _CKPT_KIND:
            raise ValueError(f"{ckpt} is not a statistics checkpoint; delete it or pass another --checkpoint")
        old = {"world_size": 1, "rank": 0,  # checkpoints written before torchrun support
               "loader": features_mod.LOADER}  # and before test transforms
        diff = {k: (saved.get(k, old.get(k)), config[k]) for k in _RESUME_KEYS
                if saved.get(k, old.get(k)) != config[k]}
        if diff:
            named = "; ".join(f"{k}: {a!r} in the checkpoint, {b!r} now" for k, (a, b) in diff.items())
            raise ValueError(f"checkpoint {ckpt} belongs to another statistics pass ({named}); run with the "
                             f"checkpoint's settings, or delete it to start over")
        position, skipped = int(saved["position"]), list(saved["skipped"])
        if position > len(dataset) or prefix.advance(position).hexdigest() != saved["fingerprint"]:
            raise ValueError(f"checkpoint {ckpt}: the first {position} items of {dataset.name} are not those "
                             f"the checkpoint has seen (files were added, renamed or removed before that "
                             f"point); delete it to start over")
        sums.copy_(tensors["sums"])
        counts.copy_(tensors["counts"])
        if reservoir is not None:
            reservoir.load_state_dict(tensors)
        if table is not None and position > 0:
            warnings.warn("the feature cache is not written by a resumed pass (the features before the "
                          "checkpoint are not kept); run features.compute later if you need it", stacklevel=2)
            table, cache_path = None, None
    elif not resume and ckpt is not None and ckpt.exists():
        raise FileExistsError(f"checkpoint {ckpt} exists: pass resume=True (--resume) to continue that pass, "
                              f"or delete it to start over")

    def save_checkpoint() -> None:
        tensors = {"sums": sums, "counts": counts}
        if reservoir is not None:
            tensors.update(reservoir.state_dict())
        meta = {**config, "position": position, "skipped": skipped,
                "fingerprint": prefix.advance(position).hexdigest()}
        save_tensors(ckpt, tensors, meta)

    batches = 0
    where = f" (rank 0 of {world})" if world > 1 else ""
    bar = tqdm(total=len(dataset), initial=position, desc=f"statistics {backbone.name}@{resolution}{where}",
               unit="img", disable=not progress or not distributed.is_main(), mininterval=2.0)
    try:
        for batch in features_mod.stream(backbone, dataset, resolution, batch_size, num_workers,
                                         start=position, skip_bad=skip_bad, transform=transform):
            feats, labels = batch.features, batch.labels
            if len(labels):
                batch_sums, batch_counts = _class_sums(labels, feats, C)
                sums += batch_sums
                counts += batch_counts
                if reservoir is not None:
                    reservoir.add(feats, labels)
                if table is not None:
                    table.add(feats, labels)
            position += batch.consumed
            skipped += batch.skipped
            batches += 1
            bar.update(batch.consumed)
            if ckpt is not None and batches % checkpoint_every == 0:
                save_checkpoint()
    except data_mod.BadImageError as err:
        if ckpt is None:
            raise data_mod.BadImageError(err.path, err.cause, "pass skip_bad=True (--skip-bad) to skip "
                                                              "unreadable files") from None
        save_checkpoint()
        raise data_mod.BadImageError(err.path, err.cause, f"the pass over the first {position} images is saved in "
                                                          f"{ckpt}: run again with --resume --skip-bad to skip such "
                                                          f"files, or remove this one and run again with --resume"
                                     ) from None
    finally:
        bar.close()
    if ckpt is not None:
        save_checkpoint()
    if world > 1:  # Σ over ranks of float64 sums and counts; every rank gets the whole skipped list
        distributed.all_reduce_sum(sums)
        distributed.all_reduce_sum(counts)
        lists: list = [None] * world
        torch.distributed.all_gather_object(lists, skipped)
        skipped = [path for part in lists for path in part]
        dataset = full_dataset
    if (counts == 0).any():
        empty = [classes[i] for i in torch.nonzero(counts == 0).flatten().tolist()]
        raise ValueError(f"classes without any image in {dataset.name}: {empty}")
    means = (sums / counts[:, None]).cpu()
    centres = None
    if reservoir is not None:
        centres = torch.stack([kmeans(reservoir.rows(c), kmeans_k, generator=g) for c in range(C)])
    if table is not None:
        features_mod.store(cache_path, table.features(), table.labels(), backbone=backbone.name,
                           resolution=resolution)
    meta = {"backbone": backbone.name, "feature_dim": D, "resolution": resolution, "dataset": dataset.name,
            "split": getattr(dataset, "split", None), "num_images": int(counts.sum()), "kmeans_k": kmeans_k,
            "num_skipped": len(skipped), "skipped": skipped, "world_size": world}
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
                if k not in ("backbone", "dataset", "resolution", "transform") + _RESULT_NEUTRAL}
    path = cache.entry("stats", f"{key}-{backbone.name}-{resolution}", backbone=backbone, dataset=dataset,
                       resolution=resolution, settings=settings,
                       loader=features_mod.loader_key(bound.arguments["transform"]))
    if path.is_file():
        return ClassStats.load(path)
    result = extract(backbone, dataset, resolution, **kwargs)
    if distributed.is_main():
        result.save(path)
    return result
