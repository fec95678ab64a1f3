"""Datasets as ``(image, label)`` pairs: image a float32 tensor ``3×H×W`` in [0, 1].

``load(name, split)`` is the one entry point. Splits (:data:`SPLITS`):

- ``train`` — the published training split *less* the validation images: what statistics, distillation,
  baselines and the golden classifier use.
- ``val`` — the validation split, where every choice is made (recipe, sweeps, the CI ridge strength): an
  image folder's ``val/`` folder if it has one, else a fixed hold-out of the published training split,
  :data:`VAL_FRACTION` of each class (:func:`holdout_indices`). Disjoint from ``train``.
- ``trainval`` — the published training split whole (``train`` ∪ ``val`` when held out; an image folder's
  ``train/`` when it has its own ``val/``): only for runs that make no choice on ``val``.
- ``test`` — the published test split: every reported number, and nothing else.

Names:

- ``fashion_mnist`` — the embedded default. Looked for, in order, in ``root``, ``$SFM_DATA``, the Debian
  package's folder (``apt-get install dataset-fashion-mnist``) and the torchvision download folder;
  downloaded (torchvision) only when ``download=True``.
- ``mnist``, ``cifar10``, ``cifar100`` — through torchvision (``download=True`` where there is internet).
- ``imagefolder:PATH`` — ``PATH/train/<class>/*.png|jpg``, ``PATH/test/<class>/*`` and optionally
  ``PATH/val/<class>/*``. Files in other
  modes (grey, grey+alpha, CMYK, RGBA, palette, 16-bit grey) are converted to 8-bit RGB. A file that
  cannot be decoded raises :class:`BadImageError` naming it; the feature pass skips such files when
  ``skip_bad=True`` (see :mod:`sfm_lib.features`).

Grey images become 3 channels (a view, no copy). Every dataset has ``.classes``, ``.targets``
(a LongTensor of labels, so per-class selections never touch the images) and ``.name``.
"""
from __future__ import annotations

import gzip
import copy
import hashlib
import math
import os
import socket
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .utils import cache_dir, load_tensors, save_tensors

__all__ = ["load", "DistilledSet", "TensorImageDataset", "ImageFolderDataset", "BadImageError", "subset",
           "subset_per_class", "square_resize", "real_images", "EvalTransform", "SQUARE", "PAPER", "INTERPOLATIONS",
           "CROP_MODES", "Fingerprint", "fingerprint", "DEBIAN_FASHION_MNIST", "NAMES", "SPLITS", "VAL_FRACTION",
           "VAL_SALT", "holdout_indices", "item_ids"]

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
NAMES = ("fashion_mnist", "mnist", "cifar10", "cifar100", "imagefolder:PATH")
SPLITS = ("train", "val", "trainval", "test")
VAL_FRACTION = 0.1
"""Share of each class of a published training split held out as the ``val`` split (no ``val/`` folder)."""
VAL_SALT = "sfm-val-v1"
"""Salt of the hash that ranks the items of a class for the hold-out (:func:`holdout_indices`)."""
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}
_DOWNLOAD_TIMEOUT_S = 30.0


class TensorImageDataset(Dataset):
    """Images held as uint8 ``[N, H, W]`` (grey) or ``[N, H, W, 3]`` (colour); items are float [0,1] 3×H×W."""

    def __init__(self, images: torch.Tensor, targets: Sequence[int] | torch.Tensor, classes: Sequence[str],
                 name: str):
        if images.dtype != torch.uint8 or images.ndim not in (3, 4):
            raise ValueError(f"images must be uint8 [N,H,W] or [N,H,W,3], got {images.dtype} {tuple(images.shape)}")
        self.images = images
        self.targets = torch.as_tensor(targets, dtype=torch.long)
        if len(self.targets) != len(images):
            raise ValueError(f"{len(images)} images but {len(self.targets)} labels")
        self.classes = list(classes)
        self.name = name
        self.image_size: tuple[int, int] | None = (images.shape[1], images.shape[2])

    def __len__(self) -> int:
        return len(self.targets)

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images ``[B,3,H,W]`` float in [0,1] and labels ``[B]`` for ``indices``, in one vectorised gather."""
        imgs = self.images[indices]
        imgs = imgs.unsqueeze(1).expand(-1, 3, -1, -1) if imgs.ndim == 3 else imgs.permute(0, 3, 1, 2)
        return imgs.float().div_(255.0), self.targets[indices]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img = self.images[i]
        img = img.unsqueeze(0).expand(3, -1, -1) if img.ndim == 2 else img.permute(2, 0, 1)
        return img.float().div_(255.0), int(self.targets[i])  # float() copies, so div_ is safe


class BadImageError(ValueError):
    """A file in an image folder that cannot be decoded (the message names the file and the cause)."""

    def __init__(self, path: Path | str, cause: str, hint: str = ""):
        self.path, self.cause, self.hint = str(path), cause, hint
        super().__init__(f"{path}: unreadable image ({cause})" + (f"; {hint}" if hint else ""))


_SIXTEEN_BIT = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


def _to_rgb(im) -> "np.ndarray":
    """A PIL image in any common mode → uint8 ``[H, W, 3]``. 16-bit grey is scaled by 255/65535 (not
    clipped); palette images go through RGBA (so a transparent palette entry is read as its colour)."""
    import numpy as np

    if im.mode in _SIXTEEN_BIT:
        arr = np.asarray(im).astype(np.float64)
        grey = np.clip(np.rint(arr * (255.0 / 65535.0)), 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if im.mode == "P":
        im = im.convert("RGBA")
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


class ImageFolderDataset(Dataset):
    """``root/<class>/<image>`` files read lazily with PIL (any mode → RGB); image sizes may differ.

    ``skip_bad``: the feature pass (:func:`sfm_lib.features.iterate`) skips unreadable files instead of
    stopping at the first one. Reading one item directly always raises :class:`BadImageError`.
    """

    def __init__(self, root: Path, classes: Sequence[str], name: str, skip_bad: bool = False):
        self.root = Path(root)
        self.classes = list(classes)
        self.name = name
        self.image_size = None
        self.skip_bad = skip_bad
        files, targets = [], []
        for c, cls in enumerate(self.classes):
            folder = self.root / cls
            found = sorted(p for p in folder.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES) if folder.is_dir() else []
            files += found
            targets += [c] * len(found)
        if not files:
            raise FileNotFoundError(f"{self.root}: no images (.png/.jpg) under any class folder {self.classes}")
        self.files = files
        self.targets = torch.tensor(targets, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.files)

    def read_uint8(self, i: int) -> torch.Tensor:
        """Image ``i`` as uint8 ``[3, H, W]``; raises :class:`BadImageError` if it cannot be decoded."""
        from PIL import Image

        path = self.files[i]
        try:
            with Image.open(path) as im:
                arr = _to_rgb(im)
        except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as err:
            text = str(err).splitlines()[0] if str(err) else ""
            text = text.replace(f" '{path}'", "").replace(str(path), "").strip(" :")
            cause = f"{type(err).__name__}: {text}" if text else type(err).__name__
            raise BadImageError(path, cause) from None
        return torch.from_numpy(arr.copy()).permute(2, 0, 1)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.read_uint8(i).float() / 255.0, int(self.targets[i])


def subset(dataset: Dataset, indices: Sequence[int]) -> torch.utils.data.Subset:
    """``dataset[indices]`` as a Subset that keeps ``targets``, ``classes``, ``name`` and ``image_size``."""
    sub = torch.utils.data.Subset(dataset, [int(i) for i in indices])
    sub.targets = dataset.targets[torch.as_tensor(sub.indices, dtype=torch.long)]
    sub.classes, sub.name = dataset.classes, dataset.name
    sub.image_size = getattr(dataset, "image_size", None)
    return sub


def subset_per_class(dataset: Dataset, per_class: int, seed: int | None = None) -> torch.utils.data.Subset:
    """The first ``per_class`` images of every class (or a random ``per_class`` if ``seed`` is given)."""
    targets = dataset.targets
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    picks = []
    for c in range(len(dataset.classes)):
        idx = torch.nonzero(targets == c).flatten()
        if g is not None:
            idx = idx[torch.randperm(len(idx), generator=g)]
        picks.append(idx[:per_class])
    return subset(dataset, torch.cat(picks).sort().values.tolist())


INTERPOLATIONS = ("bilinear", "bicubic")
"""Interpolations of :func:`square_resize` and :class:`EvalTransform` (timm's eval configs use these two)."""
CROP_MODES = ("square", "center")
"""Geometries of :class:`EvalTransform`: the library's centre square first, or timm's ``center``."""


def _interpolate(images: torch.Tensor, size: tuple[int, int], interpolation: str, antialias: bool) -> torch.Tensor:
    """[N,3,H,W] or [3,H,W] resized to ``size`` (half-pixel centres); bicubic clamped to [0, 1], as PIL's
    8-bit result saturates."""
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    batched = images if images.ndim == 4 else images[None]
    out = F.interpolate(batched, size=size, mode=interpolation, align_corners=False, antialias=antialias)
    if interpolation == "bicubic":
        out = out.clamp(0.0, 1.0)
    return out if images.ndim == 4 else out[0]


def square_resize(images: torch.Tensor, resolution: int, interpolation: str = "bilinear") -> torch.Tensor:
    """Centre square crop, then resize to ``resolution``²; no-op when the images already have that size.
    Differentiable; works on [N,3,H,W] and [3,H,W].

    ``bilinear``: antialiased when shrinking. ``bicubic``: always through the antialiasing kernel (PIL's
    cubic, a = −0.5, which torchvision's tensor ``Resize`` also uses; plain bicubic takes a = −0.75),
    clamped to [0, 1]."""
    h, w = images.shape[-2:]
    side = min(h, w)
    if h != w:
        top, left = (h - side) // 2, (w - side) // 2
        images = images[..., top:top + side, left:left + side]
    if side == resolution:
        return images
    return _interpolate(images, (resolution, resolution), interpolation,
                        antialias=interpolation == "bicubic" or side > resolution)


def _short_side_resize(images: torch.Tensor, side: int, interpolation: str) -> torch.Tensor:
    """torchvision's ``Resize(side)`` on tensors: the short side to ``side``, the long one to
    ``int(side · long / short)``, antialiased; no-op when that is the size already."""
    h, w = images.shape[-2:]
    size = (side, int(side * w / h)) if h <= w else (int(side * h / w), side)
    if size == (h, w):
        return images
    return _interpolate(images, size, interpolation, antialias=True)


@dataclass(frozen=True)
class EvalTransform:
    """How a real image becomes the backbone's ``size``² input at test time and in the statistics pass:
    resize so that the short side is ``S = ⌊size / crop_pct⌋`` (timm's rule), then take the centre
    ``size``² crop (offset ``round((S' − size) / 2)`` per axis, torchvision's ``CenterCrop``).

    ``crop_mode``:

    - ``"center"`` — timm's eval transform (``transforms_imagenet_eval``, ``crop_mode="center"``):
      torchvision's ``Resize(S)`` of the whole image (short side S, long side ``int(S · long / short)``,
      antialiased) → ``CenterCrop(size)``. The papers' ``Resize(256) → CenterCrop(224)`` is
      ``EvalTransform(0.875, "bicubic", "center")`` at 224 (:data:`PAPER`).
    - ``"square"`` — the library's own: the centre square first, then :func:`square_resize` to S, then the
      crop. The default, :data:`SQUARE` (crop_pct 1, bilinear), is :func:`square_resize` bit for bit: the
      path before transforms existed. On square images the two modes are one computation up to
      antialiasing on upsampling (bilinear: within 1 ulp); on others ``center`` samples the long side on
      a grid shifted by up to a pixel.

    Bicubic results are clamped to [0, 1], as PIL's 8-bit output saturates (torchvision's float path does
    not clamp, timm's PIL path does)."""

    crop_pct: float = 1.0
    interpolation: str = "bilinear"
    crop_mode: str = "square"

    def __post_init__(self) -> None:
        if not 0.0 < self.crop_pct <= 1.0:
            raise ValueError(f"crop_pct must lie in (0, 1], got {self.crop_pct}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {self.interpolation!r}")
        if self.crop_mode not in CROP_MODES:
            raise ValueError(f"crop_mode must be one of {CROP_MODES}, got {self.crop_mode!r}")

    def scale_size(self, size: int) -> int:
        """The short side ``⌊size / crop_pct⌋`` before the crop (timm's rule)."""
        return math.floor(size / self.crop_pct)

    def __call__(self, images: torch.Tensor, size: int) -> torch.Tensor:
        """Images [N,3,H,W] or [3,H,W] float in [0, 1] → [N,3,size,size] (or [3,size,size]); differentiable."""
        scale = self.scale_size(size)
        if self.crop_mode == "square":
            out = square_resize(images, scale, self.interpolation)
        else:
            out = _short_side_resize(images, scale, self.interpolation)
        h, w = out.shape[-2:]
        if (h, w) == (size, size):
            return out
        top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
        return out[..., top:top + size, left:left + size]

    def __str__(self) -> str:
        return "square" if self == SQUARE else f"{self.crop_mode} crop {self.crop_pct:g} {self.interpolation}"


SQUARE = EvalTransform()
"""The offline default: centre square, bilinear resize to the input size (:func:`square_resize`)."""
PAPER = EvalTransform(0.875, "bicubic", "center")
"""The papers' test transform at 224 px: ``Resize(256, bicubic) → CenterCrop(224)`` (crop fraction 0.875)."""


def real_images(dataset: Dataset, indices: Sequence[int] | torch.Tensor, resolution: int,
                transform: EvalTransform | None = None) -> torch.Tensor:
    """Items ``indices`` of ``dataset`` as float ``[B, 3, r, r]`` in [0, 1] (CPU), each turned into the loop's
    input exactly as the statistics pass turns it: any size and mode → RGB, then ``transform`` (default
    :data:`SQUARE`: centre square, bilinear resize). The one place where real images become tensors of one
    size: the real-image start of distillation, centroid and neighbour images, the fit sets of classifier
    inheritance and LGM's real batches all call it. One vectorised gather for in-memory datasets (also
    under a Subset)."""
    transform = SQUARE if transform is None else transform
    idx = torch.as_tensor(indices, dtype=torch.long).flatten()
    base, where = dataset, idx
    while isinstance(base, torch.utils.data.Subset):
        where = torch.as_tensor(base.indices, dtype=torch.long)[where]
        base = base.dataset
    if len(idx) == 0:
        return torch.empty(0, 3, resolution, resolution)
    if hasattr(base, "batch"):
        return transform(base.batch(where)[0], resolution)
    return torch.stack([transform(dataset[int(i)][0], resolution) for i in idx.tolist()])


@dataclass
class DistilledSet:
    """Synthetic images ``[N,3,H,W]`` in [0,1], hard labels ``[N]``, class names and metadata.

    ``meta`` holds at least ``backbone``, ``method``, ``ipc``, ``resolution`` and the ``loss_history``.
    Saved as safetensors (``images``, ``labels``) with the metadata as JSON in the header.
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], int(self.labels[i])

    @property
    def targets(self) -> torch.Tensor:
        return self.labels

    @property
    def name(self) -> str:
        return f"distilled:{self.meta.get('method', '?')}"

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.images.shape[-2:])

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically (temp file + rename)."""
        save_tensors(path, {"images": self.images.float().clamp(0, 1), "labels": self.labels.long()},
                     {**self.meta, "classes": self.classes})

    @classmethod
    def load(cls, path: str | os.PathLike) -> "DistilledSet":
        tensors, meta = load_tensors(path)
        if "images" not in tensors or "labels" not in tensors:
            raise ValueError(f"{path}: not a distilled set (needs tensors 'images' and 'labels'); "
                             f"make one with `python -m sfm_lib distill ...`")
        classes = meta.pop("classes", [str(i) for i in range(int(tensors["labels"].max()) + 1)])
        return cls(tensors["images"], tensors["labels"], classes, meta)

class Fingerprint:
    """A SHA-256 of what identifies the first ``n`` items of a dataset, in order, grown item range by item
    range (``advance``) so that a long pass pays for each item once: for an image folder the relative file
    paths, for every dataset the labels (and a subset's indices). The digest does not depend on how the
    range was split into calls.

    Stored in statistics checkpoints, so a resumed pass refuses data whose items before the checkpoint
    changed, while files after it may be removed (e.g. an unreadable one).
    """

    def __init__(self, dataset: Dataset):
        self.dataset, self.n = dataset, 0
        self._parts = {k: hashlib.sha256() for k in ("paths", "labels", "indices")}
        base, self._idx = dataset, None
        if isinstance(dataset, torch.utils.data.Subset):
            base, self._idx = dataset.dataset, torch.as_tensor(dataset.indices, dtype=torch.long)
        self._folder = base if isinstance(base, ImageFolderDataset) else None

    def advance(self, stop: int) -> "Fingerprint":
        """Take in items ``n .. stop−1``."""
        lo, hi = self.n, stop
        if hi <= lo:
            return self
        self._parts["labels"].update(torch.as_tensor(self.dataset.targets[lo:hi]).long().numpy().tobytes())
        order = range(lo, hi)
        if self._idx is not None:
            self._parts["indices"].update(self._idx[lo:hi].numpy().tobytes())
            order = self._idx[lo:hi].tolist()
        if self._folder is not None:
            cut = len(str(self._folder.root)) + 1
            self._parts["paths"].update("".join(str(self._folder.files[i])[cut:] + "\n" for i in order).encode())
        self.n = hi
        return self

    def hexdigest(self) -> str:
        name = getattr(self.dataset, "name", type(self.dataset).__name__)
        head = f"{name}|{getattr(self.dataset, 'split', None)}|{self.n}|"
        return hashlib.sha256((head + "|".join(h.hexdigest() for h in self._parts.values())).encode()).hexdigest()


def fingerprint(dataset: Dataset, n: int | None = None) -> str:
    """:class:`Fingerprint` of the first ``n`` items of ``dataset`` (default: all)."""
    return Fingerprint(dataset).advance(len(dataset) if n is None else n).hexdigest()


# ----------------------------------------------------------------------------------------------- idx files
def _read_idx(path: Path) -> torch.Tensor:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (EOFError, gzip.BadGzipFile, zlib.error) as err:
        raise ValueError(f"{path}: truncated or corrupt gzip file ({err}); delete it and fetch it again") from err
    if len(data) < 4 or len(data) < 4 + 4 * data[3]:
        raise ValueError(f"{path}: truncated idx header")
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise ValueError(f"{path}: not an idx file of unsigned bytes")
    shape = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    offset = 4 + 4 * ndim
    flat = torch.frombuffer(bytearray(data[offset:]), dtype=torch.uint8)
    if flat.numel() != int(torch.tensor(shape).prod()):
        raise ValueError(f"{path}: truncated idx file ({flat.numel()} values for shape {shape})")
    return flat.view(*shape)


def _find_idx(folder: Path, stem: str, subfolders: Sequence[str]) -> Path | None:
    for sub in subfolders:
        for suffix in ("", ".gz"):
            p = folder / sub / (stem + suffix)
            if p.is_file():
                return p
    return None


def _load_mnist_like(name: str, split: str, root: str | None, download: bool) -> TensorImageDataset:
    fashion = name == "fashion_mnist"
    prefix = "train" if split == "train" else "t10k"
    tv_folder = "FashionMNIST/raw" if fashion else "MNIST/raw"
    # (folder, sub-folders to try): a folder the user names may hold the files directly; the shared
    # cache only in torchvision's layout, where MNIST and Fashion-MNIST cannot be confused.
    candidates: list[tuple[Path, tuple[str, ...]]] = []
    for user in (root, os.environ.get("SFM_DATA")):
        if user:
            candidates.append((Path(user), ("", "fashion-mnist" if fashion else "mnist", tv_folder)))
    if fashion:
        candidates.append((DEBIAN_FASHION_MNIST, ("",)))
    candidates.append((cache_dir() / "data", (tv_folder,)))
    for folder, subs in candidates:
        img = _find_idx(folder, f"{prefix}-images-idx3-ubyte", subs)
        lab = _find_idx(folder, f"{prefix}-labels-idx1-ubyte", subs)
        if img and lab:
            return _idx_dataset(img, lab, name)
    if download:
        import torchvision

        cls = torchvision.datasets.FashionMNIST if fashion else torchvision.datasets.MNIST
        target = Path(root) if root else cache_dir() / "data"
        _download(lambda: cls(str(target), train=split == "train", download=True), name)
        return _load_mnist_like(name, split, str(target), download=False)
    looked = "\n  ".join(str(folder / s) for folder, subs in candidates for s in subs)
    fix = ("apt-get install dataset-fashion-mnist   (Debian/Ubuntu, as root; works offline)\n"
           "or pass download=True (--download) where there is internet" if fashion else
           "pass download=True (--download) where there is internet")
    raise FileNotFoundError(f"{name} ({split}) not found. Looked for {prefix}-images-idx3-ubyte[.gz] in:\n  {looked}\n"
                            f"To install it: {fix}")


def _idx_dataset(img: Path, lab: Path, name: str) -> TensorImageDataset:
    classes = FASHION_MNIST_CLASSES if name == "fashion_mnist" else [str(i) for i in range(10)]
    return TensorImageDataset(_read_idx(img), _read_idx(lab).long(), classes, name)


def _download(fn, name: str):
    """Run a torchvision download with a socket timeout so an offline machine fails fast and clearly."""
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(_DOWNLOAD_TIMEOUT_S)
    try:
        return fn()
    except (OSError, RuntimeError) as err:
        raise RuntimeError(f"downloading {name} failed ({err}). Without internet, use a dataset that ships "
                           f"offline (fashion_mnist from the Debian package) or an imagefolder:PATH") from err
    finally:
        socket.setdefaulttimeout(old)


def _load_cifar(name: str, split: str, root: str | None, download: bool) -> TensorImageDataset:
    import torchvision

    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    target = Path(root or os.environ.get("SFM_DATA") or cache_dir() / "data")
    try:
        ds = cls(str(target), train=split == "train", download=False)
    except RuntimeError:
        if not download:
            raise FileNotFoundError(f"{name} not found in {target}. Pass download=True (--download) where there is "
                                    f"internet, or root=<folder holding the torchvision copy>") from None
        ds = _download(lambda: cls(str(target), train=split == "train", download=True), name)
    return TensorImageDataset(torch.from_numpy(ds.data), ds.targets, ds.classes, name)


def _load_imagefolder(path: str, folder_name: str, skip_bad: bool = False) -> ImageFolderDataset:
    """The images of ``PATH/<folder_name>/<class>/*``, classes named by the sub-folders of ``PATH/train``."""
    base = Path(path).expanduser().resolve()
    folder = base / folder_name
    if not folder.is_dir():
        raise FileNotFoundError(f"imagefolder: {folder} does not exist; expected {base}/train/<class>/*.png|jpg "
                                f"and {base}/test/<class>/*")
    train = base / "train"
    classes = sorted(p.name for p in (train if train.is_dir() else folder).iterdir() if p.is_dir())
    if not classes:
        raise FileNotFoundError(f"imagefolder: no class sub-folders in {train if train.is_dir() else folder}")
    return ImageFolderDataset(folder, classes, f"imagefolder:{base}", skip_bad=skip_bad)


def item_ids(dataset: Dataset) -> list[str]:
    """What names each item of a published split for the hold-out: an image folder's file path relative to
    the split folder (``<class>/<file>``, so adding a file moves no other), else the item's index."""
    if isinstance(dataset, ImageFolderDataset):
        return [p.relative_to(dataset.root).as_posix() for p in dataset.files]
    return [str(i) for i in range(len(dataset))]


def holdout_indices(targets: torch.Tensor, ids: Sequence[str], fraction: float = VAL_FRACTION) -> torch.Tensor:
    """Indices (sorted) of the items held out for validation: in each class c of n_c items, the
    k_c = ⌊fraction · n_c + ½⌋ items with the smallest SHA-256(``VAL_SALT:<class>:<id>``) (hex digest), ``ids``
    as :func:`item_ids` gives them. Fixed by the data alone: no RNG, the same items on every machine."""
    targets = torch.as_tensor(targets, dtype=torch.long)
    if len(ids) != len(targets):
        raise ValueError(f"{len(ids)} item ids for {len(targets)} labels")
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must lie in [0, 1), got {fraction}")
    picks: list[int] = []
    for c in targets.unique().tolist():
        members = torch.nonzero(targets == c).flatten().tolist()
        k = math.floor(fraction * len(members) + 0.5)
        rank = sorted(members, key=lambda i: hashlib.sha256(f"{VAL_SALT}:{c}:{ids[i]}".encode()).hexdigest())
        picks += rank[:k]
    return torch.tensor(sorted(picks), dtype=torch.long)


def _take(dataset: TensorImageDataset | ImageFolderDataset, indices: torch.Tensor):
    """Items ``indices`` of a published split as a dataset of the same type (not a Subset, so its features
    and statistics are cached like a whole split; the cache keys hold its content)."""
    if isinstance(dataset, TensorImageDataset):
        return TensorImageDataset(dataset.images[indices], dataset.targets[indices], dataset.classes, dataset.name)
    out = copy.copy(dataset)
    out.__dict__.pop("_sfm_files_identity", None)
    out.files = [dataset.files[i] for i in indices.tolist()]
    out.targets = dataset.targets[indices]
    return out


def _split_off(dataset: TensorImageDataset | ImageFolderDataset, split: str):
    """``split`` ("train" or "val") of a published training split by the hold-out of :func:`holdout_indices`."""
    held = holdout_indices(dataset.targets, item_ids(dataset))
    if split == "val":
        if len(held) == 0:
            raise ValueError(f"{dataset.name}: no class has the ≥ 5 training images a {VAL_FRACTION:.0%} hold-out "
                             f"needs, so the val split is empty; add a val/<class>/ folder or more images")
        return _take(dataset, held)
    keep = torch.ones(len(dataset), dtype=torch.bool)
    keep[held] = False
    return _take(dataset, torch.nonzero(keep).flatten())


def _published(name: str, split: str, root: str | None, download: bool, skip_bad: bool) -> Dataset:
    """A split as published: "train" or "test" (an image folder also "val", its val/ folder)."""
    if name.startswith("imagefolder:"):
        return _load_imagefolder(name.split(":", 1)[1], split, skip_bad)
    if name in ("fashion_mnist", "mnist"):
        return _load_mnist_like(name, split, root, download)
    if name in ("cifar10", "cifar100"):
        return _load_cifar(name, split, root, download)
    raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(NAMES)}")


def _has_val_folder(name: str) -> bool:
    return name.startswith("imagefolder:") and (Path(name.split(":", 1)[1]).expanduser().resolve() / "val").is_dir()


def load(name: str, split: str = "train", root: str | None = None, download: bool = False,
         skip_bad: bool = False) -> Dataset:
    """Load dataset ``name`` (see module doc) for ``split`` in :data:`SPLITS`: "train" (published training
    split less the validation images), "val", "trainval" (the published training split whole) or "test".

    ``skip_bad``: image folders only — the feature pass skips files that cannot be decoded (and reports
    them) instead of stopping at the first one."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if split == "test":
        ds = _published(name, "test", root, download, skip_bad)
    elif _has_val_folder(name):
        ds = _published(name, "val" if split == "val" else "train", root, download, skip_bad)
    else:
        ds = _published(name, "train", root, download, skip_bad)
        if split != "trainval":
            ds = _split_off(ds, split)
    ds.split = split
    return ds
