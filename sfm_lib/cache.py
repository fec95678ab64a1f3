"""Keys of the on-disk caches (features, class statistics, distilled sets): one function makes them all.

An entry's file name is ``<label>-<key>.safetensors`` in ``cache_dir()/<kind>/``, with a readable label and

    key = SHA-256( canonical JSON of {kind, format version, every input the result depends on} )[:24].

Inputs are described by :func:`describe`, never by their printed form:

- a backbone by its canonical name, whether its weights are pretrained (random weights: a digest of the
  weights too, since two random initialisations differ), its precision (fp32 on the CPU, bf16 autocast
  on CUDA) and the input size it was built for, if one;
- a dataset by its name, split, size and content: in-memory images and labels by their bytes, an image
  folder by its file list (relative path, size, modification time), a subset by the base data set's
  identity and its indices;
- a tensor by its dtype, shape and a digest of its bytes (the printed form elides values);
- class statistics by their tensors and class names; dataclasses field by field.

:data:`VERSIONS` holds a format version per kind: bump it when the code changes what an entry holds
(e.g. another k-means sample), so that old entries are never read again.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from .utils import cache_dir

__all__ = ["VERSIONS", "entry", "key", "describe", "tensor_identity", "backbone_identity", "dataset_identity"]

VERSIONS = {"features": 2, "stats": 2, "distilled": 2}
"""Format version of each cache kind (1 was the key without this module)."""


def tensor_identity(t: torch.Tensor) -> dict[str, Any]:
    """dtype, shape and the SHA-256 of the bytes of tensor ``t`` (copied to the CPU if needed)."""
    flat = t.detach().reshape(-1).contiguous().cpu()
    data = flat.view(torch.uint8).numpy() if flat.numel() else b""
    return {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
            "sha256": hashlib.sha256(data).hexdigest()}


def _weights_digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor_identity(t)["sha256"].encode())
    return h.hexdigest()


def backbone_identity(backbone) -> dict[str, Any]:
    """Canonical name, pretrained or not (random: + weights digest), precision and fixed input size."""
    ident = {"name": backbone.name, "pretrained": bool(getattr(backbone, "pretrained", True)),
             "precision": getattr(backbone, "precision", "fp32"), "img_size": getattr(backbone, "img_size", None)}
    if not ident["pretrained"]:
        memo = getattr(backbone, "_weights_digest", None)
        if memo is None:  # frozen weights: one digest per Backbone object
            memo = _weights_digest(backbone.model)
            backbone._weights_digest = memo
        ident["weights"] = memo
    return ident


def _files_identity(files, root) -> dict[str, Any]:
    """SHA-256 over (relative path, size, mtime in ns) of every file, in order."""
    h = hashlib.sha256()
    for f in files:
        st = os.stat(f)
        rel = os.path.relpath(f, root) if root is not None else str(f)
        h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return {"count": len(files), "sha256": h.hexdigest()}


def dataset_identity(dataset) -> dict[str, Any]:
    """What makes a dataset's results: type, name, split, size, classes and content (see module doc)."""
    if isinstance(dataset, torch.utils.data.Subset):
        return {"subset_of": dataset_identity(dataset.dataset),
                "indices": tensor_identity(torch.as_tensor(dataset.indices, dtype=torch.int64))}
    ident: dict[str, Any] = {"type": type(dataset).__name__, "name": getattr(dataset, "name", None),
                             "split": getattr(dataset, "split", None), "size": len(dataset)}
    if getattr(dataset, "classes", None) is not None:
        ident["classes"] = [str(c) for c in dataset.classes]
    images, files = getattr(dataset, "images", None), getattr(dataset, "files", None)
    if isinstance(images, torch.Tensor):
        ident["images"] = tensor_identity(images)
    elif files is not None:  # the list is fixed when the dataset is made: stat each file once per object
        memo = getattr(dataset, "_sfm_files_identity", None)
        if memo is None or memo[0] != len(files):
            memo = (len(files), _files_identity(files, getattr(dataset, "root", None)))
            dataset._sfm_files_identity = memo
        ident["files"] = memo[1]
    labels = getattr(dataset, "targets", None)
    if isinstance(labels, torch.Tensor):
        ident["targets"] = tensor_identity(labels)
    return ident


def describe(value: Any) -> Any:
    """A JSON-ready description of ``value`` that changes whenever the value does (see module doc).

    Raises TypeError for values it cannot describe faithfully (e.g. a function), rather than guess."""
    from .backbones import Backbone
    from .stats import ClassStats

    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, torch.Tensor):
        return {"tensor": tensor_identity(value)}
    if isinstance(value, Backbone):
        return {"backbone": backbone_identity(value)}
    if isinstance(value, ClassStats):
        tensors = {"means": value.means, "counts": value.counts}
        if value.centres is not None:
            tensors["centres"] = value.centres
        return {"stats": {k: tensor_identity(t) for k, t in tensors.items()}, "classes": list(value.classes)}
    if isinstance(value, torch.utils.data.Dataset):
        return {"dataset": dataset_identity(value)}
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {"type": type(value).__name__,
                **{f.name: describe(getattr(value, f.name)) for f in dataclasses.fields(value)}}
    if isinstance(value, dict):
        return {str(k): describe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [describe(v) for v in value]
    raise TypeError(f"cannot make a cache key from a {type(value).__name__} ({value!r:.80}); pass plain values, "
                    f"tensors, datasets or dataclasses")


def key(kind: str, **inputs: Any) -> str:
    """24 hex digits of SHA-256 over the canonical JSON of ``kind``, its version and ``inputs``."""
    if kind not in VERSIONS:
        raise ValueError(f"unknown cache kind {kind!r}; one of {', '.join(VERSIONS)}")
    doc = {"kind": kind, "version": VERSIONS[kind], "inputs": describe(inputs)}
    blob = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def entry(kind: str, label: str, **inputs: Any) -> Path:
    """``cache_dir()/<kind>/<label>-<key>.safetensors``: the one place where cache file names are made."""
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in label)
    return cache_dir() / kind / f"{safe}-{key(kind, **inputs)}.safetensors"
