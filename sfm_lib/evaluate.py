"""Evaluation by linear probing (method.md §6): distilled sets, real-image baselines, cross-backbone tables.

A probe is a linear map (W ∈ R^{C×D}, b ∈ R^C) on frozen features φ(x), started at W ~ N(0, 0.01²), b = 0
(the released code's head), trained with softmax cross-entropy by Adam at lr = 1e-3·B/256 (B = min(100, N)
the batch), the rate decaying as

    lr_t = lr · (1 + cos(π t / T)) / 2,     t = 0 … T−1 the step, T = epochs · ⌈N / B⌉,

and scored by top-1 on the real test split (the test transform: ``transform``, a
:class:`sfm_lib.data.EvalTransform`, default the centre square resized, see
:func:`sfm_lib.backbones.eval_transform`) after the last epoch, as mean ± std over
probe seeds: :attr:`ProbeResult.top1_std` the sample std (ddof = 1), :attr:`ProbeResult.top1_pstd` the
population std (ddof = 0) of the papers' code, which probes with :data:`PAPER_PROBE_SEEDS`.

CPU-friendly emulation of "per-batch flip + random resized crop": for every seed, each training image is
seen through K = ``views`` fixed views (view 0 un-augmented, views 1…K−1 drawn by
:meth:`Augment.probe <sfm_lib.augment.Augment.probe>` from a generator seeded by the seed) whose features
are computed once; every epoch each image then uses one of its K views chosen at random. The backbone
runs N·K times per seed instead of N·epochs times, and the probes of all seeds train together as one
batched weight tensor [S, D, C] (Adam is element-wise, so this equals S independent runs).

Three pieces make a probe, and other modules use them on their own (classifier inheritance):
:func:`probe_features` (the views' features) → :func:`fit_probes` (the training) → :func:`accuracies`
(the score on test features from :func:`sfm_lib.features.compute`).

Baselines with the same probe: ``random`` real images (IPC per class, a new draw per seed), ``centroids``
(the real images whose features are nearest the class mean), ``neighbors`` (for each distilled image the
same-class real image of highest cosine similarity) and ``full`` (the whole training split, see
:func:`full_data_probe`). :func:`gain_over_random` scores a result against random real images at the same
IPC under the same probe and seeds (DD-Ranking's yardstick), and :func:`results_table` shows it.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset, Subset

from . import backbones as backbones_mod
from . import data as data_mod
from . import features as features_mod
from .augment import Augment
from .backbones import Backbone
from .data import SQUARE, DistilledSet, EvalTransform, TensorImageDataset, square_resize
from .stats import ClassStats
from .utils import resolve_device

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["ProbeResult", "linear_probe", "full_data_probe", "full_view_features", "train_probe", "accuracy", "cosine_lr",
           "view_features", "probe_features", "fit_probes", "accuracies", "random_subset", "centroid_subset",
           "neighbor_subset", "baseline", "cross_backbone", "results_table", "gain_over_random", "metric_name",
           "BASELINES", "PAPER_PROBE_SEEDS"]

BASELINES = ("random", "centroids", "neighbors", "full")
PAPER_PROBE_SEEDS = (3407, 3408, 3409, 3410, 3411)
"""The probe seeds of the papers' code: 5 probes, reported as mean ± population std (``top1_pstd``)."""
_CHUNK = 256  # images per backbone forward when computing view features
_ROWS = 16384  # feature rows converted to float64 at a time (class means of a whole split)


# ------------------------------------------------------------------------------------------------ result
@dataclass
class ProbeResult:
    """Top-1 accuracies (%) of one probe per seed, with what was evaluated in ``meta``.

    ``top1_std`` is the *sample* standard deviation (ddof = 1) over seeds, ``top1_pstd`` the *population*
    one (ddof = 0, NumPy's default, as the papers' code reports it); both 0 for a single seed.
    ``weights`` (not serialised) holds the trained probes: W [S, C, D], b [S, C] on the CPU.
    """

    top1: list[float]
    seeds: list[int]
    meta: dict[str, Any] = field(default_factory=dict)
    weights: tuple[Tensor, Tensor] | None = field(default=None, repr=False, compare=False)

    @property
    def top1_mean(self) -> float:
        return sum(self.top1) / len(self.top1)

    def std(self, ddof: int = 1) -> float:
        """√(Σ_s (a_s − ā)² / (S − ddof)) over the S seeds' top-1 a_s; 0 for one seed."""
        if ddof not in (0, 1):
            raise ValueError(f"ddof must be 1 (sample std) or 0 (population std), got {ddof}")
        n = len(self.top1)
        if n < 2:
            return 0.0
        m = self.top1_mean
        return math.sqrt(sum((a - m) ** 2 for a in self.top1) / (n - ddof))

    @property
    def top1_std(self) -> float:
        return self.std(1)

    @property
    def top1_pstd(self) -> float:
        return self.std(0)

    def __str__(self) -> str:
        return f"{self.top1_mean:.1f} ± {self.top1_std:.1f} % ({len(self.top1)} seeds, {self.meta.get('kind', '?')})"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ``top1``, ``top1_mean``, ``top1_std``, ``top1_pstd``, ``seeds``, ``meta`` (no weights)."""
        return {"top1": list(self.top1), "top1_mean": self.top1_mean, "top1_std": self.top1_std,
                "top1_pstd": self.top1_pstd, "seeds": list(self.seeds), "meta": dict(self.meta)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ProbeResult":
        """Inverse of :meth:`to_dict` (the derived mean and std are recomputed)."""
        return cls([float(a) for a in d["top1"]], [int(s) for s in d["seeds"]], dict(d.get("meta", {})))


# ------------------------------------------------------------------------------------------ probe training
def cosine_lr(step: int, total: int, base: float) -> float:
    """lr_t = base · (1 + cos(π t / T)) / 2: ``base`` at t = 0, 0 at t = T (after the last step)."""
    return base * 0.5 * (1.0 + math.cos(math.pi * step / total))


PROBE_INIT_STD = 0.01
"""Std of the probe's initial weights (bias 0), as the released code's linear head (DINO's linear-eval head)."""


def _linear_init(dim: int, num_classes: int, seed: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """W [C, D] ~ N(0, PROBE_INIT_STD²) drawn by a generator seeded by ``seed``, b = 0 (global RNG untouched).

    The init matters at these rates: with N = 10 images a probe takes 1000 Adam steps at lr 3.9e-5, so each
    weight moves by at most ≈ 0.025, the size of ``nn.Linear``'s default init (uniform, bound 1/√D ≈ 0.028
    for D = 1280), which then adds seed-to-seed noise of several points."""
    gen = torch.Generator().manual_seed(int(seed))
    weight = PROBE_INIT_STD * torch.randn(num_classes, dim, generator=gen, dtype=torch.float64)
    return weight.to(dtype), torch.zeros(num_classes, dtype=dtype)


def _check_probe_args(epochs: int, seeds: Sequence[int]) -> None:
    if epochs < 1:
        raise ValueError(f"epochs must be ≥ 1, got {epochs}")
    if len(seeds) == 0:
        raise ValueError("seeds is empty; pass at least one probe seed, e.g. seeds=(0, 1, 2)")


@contextlib.contextmanager
def _one_thread(device: torch.device):
    """One intra-op thread on the CPU: the probe's ops are tiny, and extra OpenMP threads only add overhead
    (10–70× slower steps when other processes share the cores)."""
    if device.type != "cpu":
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _train_probes(feats: Tensor, labels: Tensor, num_classes: int, *, epochs: int, batch_size: int, lr: float,
                  seeds: Sequence[int], init: Sequence[tuple[Tensor, Tensor]] | None = None,
                  progress: bool = False) -> tuple[Tensor, Tensor]:
    """Train S probes at once. ``feats`` [S, N, K, D] (K views per image; may be an expanded view), ``labels``
    [S, N]. Seed s drives its own init, shuffles and view choices. Returns W [S, C, D], b [S, C]."""
    S, N, K, D = feats.shape
    C, B, dev = num_classes, min(batch_size, N), feats.device
    if labels.shape != (S, N):
        raise ValueError(f"labels must be [S={S}, N={N}], got {tuple(labels.shape)}")
    if int(labels.min()) < 0 or int(labels.max()) >= C:
        raise ValueError(f"labels must lie in [0, {C}), got range [{int(labels.min())}, {int(labels.max())}]")
    inits = init if init is not None else [_linear_init(D, C, s, feats.dtype) for s in seeds]
    W = torch.stack([w.to(dev, feats.dtype).T for w, _ in inits]).contiguous().requires_grad_(True)  # [S, D, C]
    b = torch.stack([c.to(dev, feats.dtype) for _, c in inits])[:, None, :].contiguous().requires_grad_(True)
    opt = torch.optim.Adam([W, b], lr=lr)
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    rows = torch.arange(S, device=dev)[:, None]
    total, step = epochs * math.ceil(N / B), 0
    from .progress import tqdm

    with _one_thread(dev):
        for _ in tqdm(range(epochs), desc="probe", unit="epoch", disable=not progress, mininterval=2.0):
            # per seed: a fresh permutation and one random view per image for this epoch
            perm = torch.stack([torch.randperm(N, generator=g) for g in gens]).to(dev)
            view = (torch.stack([torch.randint(K, (N,), generator=g) for g in gens]).to(dev) if K > 1
                    else torch.zeros(S, N, dtype=torch.long, device=dev))
            for start in range(0, N, B):
                idx = perm[:, start:start + B]                                # [S, b]
                x = feats[rows, idx, view.gather(1, idx)]                      # [S, b, D]
                logits = torch.baddbmm(b, x, W)                                # [S, b, C]
                # Σ_s mean_i CE_s,i: the seeds' losses are independent, so W[s] gets only its own gradient
                loss = F.cross_entropy(logits.reshape(-1, C), labels[rows, idx].reshape(-1), reduction="sum")
                for group in opt.param_groups:
                    group["lr"] = cosine_lr(step, total, lr)
                opt.zero_grad(set_to_none=True)
                (loss / idx.shape[1]).backward()
                opt.step()
                step += 1
    return W.detach().transpose(1, 2).contiguous(), b.detach()[:, 0, :]


def _default_hparams(n: int, batch_size: int | None, lr: float | None) -> tuple[int, float]:
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    bs = min(100 if batch_size is None else int(batch_size), n)  # the batch actually used
    return bs, (1e-3 * bs / 256 if lr is None else float(lr))


def train_probe(train_feats: Tensor, train_labels: Tensor, num_classes: int, *, epochs: int,
                batch_size: int | None = None, lr: float | None = None, seed: int = 0,
                init: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """Linear probe on given features: ``train_feats`` [N, D] or [N, K, D] (K views, one drawn per image and
    epoch), labels [N] → (W [C, D], b [C]).

    Adam (β = 0.9, 0.999), lr = 1e-3·B/256 by default, B = min(100, N) by default, cosine decay to 0 over
    epochs·⌈N/B⌉ steps, mini-batches shuffled by ``seed``; ``init`` (W, b) defaults to W ~ N(0, 0.01²)
    (generator seeded by ``seed``), b = 0. Trains in the dtype and on the device of ``train_feats``.
    """
    if train_feats.ndim == 2:
        train_feats = train_feats[:, None, :]
    if train_feats.ndim != 3 or train_labels.shape != train_feats.shape[:1]:
        raise ValueError(f"expected train_feats [N, D] or [N, K, D] and labels [N], got "
                         f"{tuple(train_feats.shape)} and {tuple(train_labels.shape)}")
    _check_probe_args(epochs, [seed])
    bs, lr = _default_hparams(train_feats.shape[0], batch_size, lr)
    W, b = _train_probes(train_feats[None], train_labels.to(train_feats.device)[None], num_classes, epochs=epochs,
                         batch_size=bs, lr=lr, seeds=[seed], init=None if init is None else [init])
    return W[0], b[0]


def accuracy(W: Tensor, b: Tensor, feats: Tensor, labels: Tensor) -> float:
    """Top-1 in %: 100 · mean[argmax_c (W x + b)_c = y] for W [C, D], b [C], feats [N, D], labels [N]."""
    pred = (feats.to(W.dtype) @ W.T + b).argmax(1)
    return 100.0 * (pred == labels.to(pred.device)).double().mean().item()


def accuracies(W: Tensor, b: Tensor, feats: Tensor, labels: Tensor) -> list[float]:
    """Top-1 (%) of each probe s of W [S, C, D], b [S, C] on ``feats`` [N, D], scored on W's device."""
    feats, labels = feats.to(W.device, W.dtype), labels.to(W.device)
    return [accuracy(W[s], b[s], feats, labels) for s in range(W.shape[0])]


# ---------------------------------------------------------------------------------------- view features
def _images_of(dataset: Dataset, resolution: int, transform: EvalTransform | None = None
               ) -> tuple[Tensor, Tensor, EvalTransform | None]:
    """All images in [0, 1], labels [N] and the transform their view 0 still needs: a distilled set as it
    is (None: synthetic images are the input already); an in-memory dataset (one size) as stored, [N, 3,
    H, W], with ``transform`` (default :data:`SQUARE`); other datasets (image folders: any size and mode)
    as [N, 3, r, r] through ``transform`` already, as the statistics pass makes them
    (:func:`sfm_lib.data.real_images`), with None."""
    if isinstance(dataset, DistilledSet):
        return dataset.images.detach().float(), dataset.labels.long(), None
    transform = SQUARE if transform is None else transform
    base, idx = dataset, None
    if isinstance(dataset, Subset):
        base, idx = dataset.dataset, torch.as_tensor(dataset.indices, dtype=torch.long)
    if isinstance(base, TensorImageDataset):
        return *base.batch(torch.arange(len(base)) if idx is None else idx), transform
    if len(dataset) == 0:
        raise ValueError("the training set is empty")
    return data_mod.real_images(dataset, torch.arange(len(dataset)), resolution, transform), \
        torch.as_tensor(dataset.targets, dtype=torch.long).clone(), None


def view_features(backbone: Backbone, images: Tensor, resolution: int, views: int, seed: int,
                  transform: EvalTransform | None = None) -> Tensor:
    """Features [N, K, D] of K = ``views`` views of every image: view 0 the test-time input, ``transform``
    applied on the backbone's device as the test pass applies it (None: the images as given, resized by
    the backbone's preprocessing), views 1…K−1 flip + random resized crop (``Augment.probe()``, generator
    seeded by ``seed``) at ``resolution``.

    Crops are taken from the centre square of ``images`` at its native size (one interpolation) unless it
    is larger than ``resolution``, in which case it is first shrunk with antialiasing.
    """
    if views < 1:
        raise ValueError(f"views must be ≥ 1 (1 = no augmentation), got {views}")
    n, dev = images.shape[0], backbone.device
    base = square_resize(images, min(resolution, min(images.shape[-2:])))
    aug, gen = Augment.probe(), torch.Generator().manual_seed(int(seed))
    params = aug.sample(n * (views - 1), gen)  # row j ↦ image j % n, view 1 + j // n
    chunks = []
    with torch.inference_mode():
        for start in range(0, n, _CHUNK):
            first = images[start:start + _CHUNK]
            if transform is not None:
                first = transform(first.to(dev), resolution)
            chunks.append(backbone.features(first, resolution).float().cpu())
        for start in range(0, n * (views - 1), _CHUNK):
            j = torch.arange(start, min(start + _CHUNK, n * (views - 1)))
            crops = aug.apply(base[j % n].to(dev), params.select(j).to(dev), resolution)
            chunks.append(backbone.features(crops, resolution).float().cpu())
    feats = torch.cat(chunks).clone()  # a normal tensor (not an inference tensor): usable by autograd later
    return feats.view(views, n, -1).transpose(0, 1).contiguous()


# ------------------------------------------------------------------------------------------------ probes
def _num_classes(train: Dataset, test: Dataset) -> int:
    c_train, c_test = len(train.classes), len(test.classes)
    if c_train != c_test:
        raise ValueError(f"the training set has {c_train} classes but the test set {c_test}; evaluate on the "
                         f"test split of the dataset the training images come from")
    return c_test


def check_same_data(distilled: Dataset, dataset: Dataset, allow_mismatch: bool = False) -> None:
    """Raise ValueError if ``distilled`` (anything with ``meta``, e.g. a DistilledSet) was made from another
    dataset than ``dataset``: other class names, or another recorded ``meta["dataset"]``. The message
    names the difference. ``allow_mismatch=True`` (CLI ``--allow-class-mismatch``) is for deliberate
    transfers; the class counts must still agree."""
    meta = getattr(distilled, "meta", None)
    if allow_mismatch or not isinstance(meta, dict):
        return
    problems = []
    made_from, name = meta.get("dataset"), getattr(dataset, "name", None)
    if made_from is not None and name is not None and made_from != name:
        problems.append(f"it was distilled from {made_from!r}, the evaluation data is {name!r}")
    ours, theirs = list(distilled.classes), list(dataset.classes)
    if ours != theirs:
        diff = [(a, b) for a, b in zip(ours, theirs) if a != b][:3]
        shown = ", ".join(f"{a!r} vs {b!r}" for a, b in diff) or f"{len(ours)} vs {len(theirs)} classes"
        problems.append(f"its classes differ ({shown}{', ...' if len(diff) == 3 else ''})")
    if problems:
        raise ValueError(f"the distilled set does not belong to this dataset: {'; '.join(problems)}. Evaluate it "
                         f"on the dataset it was distilled from, or pass allow_class_mismatch=True "
                         f"(--allow-class-mismatch) for a deliberate transfer")


def probe_features(backbone: Backbone, trains: Sequence[Dataset], resolution: int, *, views: int,
                   seeds: Sequence[int], transform: EvalTransform | None = None) -> tuple[list[Tensor], list[Tensor]]:
    """The probes' training features: for every i, :func:`view_features` [N_i, K, D] of ``trains[i]`` (K =
    ``views``, augmentations drawn with ``seeds[i]``; real images' view 0 through ``transform``, the test
    transform, default :data:`SQUARE`) and its labels [N_i]."""
    if len(trains) != len(seeds):
        raise ValueError(f"{len(trains)} training sets for {len(seeds)} seeds; pass one per seed")
    feats, labels = [], []
    for train, seed in zip(trains, seeds):
        images, y, pending = _images_of(train, resolution, transform)
        if len(y) == 0:
            raise ValueError("the training set is empty")
        feats.append(view_features(backbone, images, resolution, views, seed, pending))
        labels.append(y.long())
    return feats, labels


def fit_probes(feats: Sequence[Tensor], labels: Sequence[Tensor], num_classes: int, *, epochs: int,
               seeds: Sequence[int], batch_size: int | None = None, lr: float | None = None,
               device: str | torch.device = "cpu", progress: bool = False) -> tuple[Tensor, Tensor]:
    """Probe i trained with seed ``seeds[i]`` on ``feats[i]`` [N_i, K, D] and ``labels[i]`` [N_i] (the
    recipe of :func:`train_probe`); probes whose training sets have the same size train together as one
    batched tensor. Returns W [S, C, D], b [S, C] on ``device``."""
    _check_probe_args(epochs, seeds)
    if not len(feats) == len(labels) == len(seeds):
        raise ValueError(f"{len(feats)} feature sets, {len(labels)} label sets and {len(seeds)} seeds; "
                         f"pass one of each per probe")
    dev = resolve_device(device)
    Ws: list[Tensor] = [torch.empty(0)] * len(seeds)
    bs_: list[Tensor] = [torch.empty(0)] * len(seeds)
    groups: dict[int, list[int]] = {}  # seeds whose training sets have the same size train together
    for i, y in enumerate(labels):
        groups.setdefault(len(y), []).append(i)
    for n, group in groups.items():
        bs, base_lr = _default_hparams(n, batch_size, lr)
        W, b = _train_probes(torch.stack([feats[i] for i in group]).to(dev),
                             torch.stack([labels[i] for i in group]).to(dev), num_classes, epochs=epochs,
                             batch_size=bs, lr=base_lr, seeds=[seeds[i] for i in group], progress=progress)
        for k, i in enumerate(group):
            Ws[i], bs_[i] = W[k], b[k]
    return torch.stack(Ws), torch.stack(bs_)


def _probe_many(backbone: Backbone, trains: Sequence[Dataset], test: Dataset, resolution: int, *, epochs: int,
                seeds: Sequence[int], views: int, batch_size: int | None, lr: float | None,
                device: str | torch.device | None, progress: bool, kind: str,
                transform: EvalTransform | None) -> ProbeResult:
    """Probe seed ``seeds[i]`` trained on ``trains[i]``: :func:`probe_features` → :func:`fit_probes` →
    :func:`accuracies` on the (cached) test features."""
    _check_probe_args(epochs, seeds)
    dev = backbone.device if device is None else resolve_device(device)
    C = _num_classes(trains[0], test)
    test_x, test_y = features_mod.compute(backbone, test, resolution, progress=progress, transform=transform)
    feats, labels = probe_features(backbone, trains, resolution, views=views, seeds=seeds, transform=transform)
    W, b = fit_probes(feats, labels, C, epochs=epochs, seeds=seeds, batch_size=batch_size, lr=lr, device=dev,
                      progress=progress)
    top1 = accuracies(W, b, test_x, test_y)
    n_train = len(labels[0])
    bs, base_lr = _default_hparams(n_train, batch_size, lr)
    first = trains[0]
    meta = {"kind": kind, "backbone": backbone.name, "resolution": resolution, "epochs": epochs, "views": views,
            "n_train": n_train, "batch_size": bs, "lr": base_lr, "train": getattr(first, "name", None),
            "test": getattr(test, "name", None), "n_test": len(test_y), "transform": _transform_name(transform)}
    if isinstance(first, DistilledSet):
        meta.update(distill_backbone=first.meta.get("backbone"), method=first.meta.get("method"),
                    ipc=first.meta.get("ipc"))
    return ProbeResult(top1, [int(s) for s in seeds], meta, (W.cpu(), b.cpu()))


def linear_probe(backbone: Backbone, train: Dataset | Sequence[Dataset], test: Dataset, resolution: int, *,
                 epochs: int = 1000, seeds: Sequence[int] = (0, 1, 2), views: int = 40, batch_size: int | None = None,
                 lr: float | None = None, device: str | torch.device | None = None, progress: bool = False,
                 kind: str | None = None, allow_class_mismatch: bool = False,
                 transform: EvalTransform | None = None) -> ProbeResult:
    """Top-1 (%) on ``test`` of linear probes trained on the small set ``train`` (method.md §6), one per seed.

    ``train``: a :class:`DistilledSet` or any small dataset of images (e.g. a ``Subset`` of real images), or
    a list of them, one per seed (seed ``seeds[i]`` trains on ``train[i]``). Each image is seen through
    ``views`` precomputed views (view 0 un-augmented; see the module doc); ``views=1`` trains without
    augmentation. Test features come from :func:`features.compute` (cached on disk for whole splits).
    ``device``: where the probe trains (default: the backbone's). ``kind`` labels the result ("distilled"
    for a DistilledSet, else "real", unless given). A distilled set from another dataset (class names or
    ``meta["dataset"]``) is refused unless ``allow_class_mismatch`` (see :func:`check_same_data`).
    ``transform``: the test transform of the real images, test and training (default :data:`SQUARE`; see
    :func:`sfm_lib.backbones.eval_transform`); distilled images are the input as they are.

    Note: with N = 10 images the defaults mean 1000 Adam steps at lr 3.9e-5; at 32 px (Lite0) that probe is
    not converged (seed std ≈ 5 points) and ``epochs=4000`` comes closer to method.md §9.
    """
    trains = list(train) if isinstance(train, (list, tuple)) else [train] * len(seeds)
    if len(trains) != len(seeds):
        raise ValueError(f"{len(trains)} training sets for {len(seeds)} seeds; pass one per seed or a single one")
    for t in trains:
        check_same_data(t, test, allow_class_mismatch)
    if kind is None:
        kind = "distilled" if trains and isinstance(trains[0], DistilledSet) else "real"
    return _probe_many(backbone, trains, test, resolution, epochs=epochs, seeds=seeds, views=views,
                       batch_size=batch_size, lr=lr, device=device, progress=progress, kind=kind,
                       transform=transform)


def full_view_features(backbone: Backbone, dataset: Dataset, resolution: int, views: int, seed: int = 0,
                       transform: EvalTransform | None = None, progress: bool = False) -> tuple[Tensor, Tensor]:
    """:func:`view_features` [N, K, D] of every image of a whole split (view 0 the test transform, views
    1…K−1 flip + random resized crop drawn with ``seed``) and its labels, cached like the features
    (float16; key: the split, backbone, resolution, K, seed and transform). K = 1: the feature cache."""
    if views == 1:
        x, y = features_mod.compute(backbone, dataset, resolution, progress=progress, transform=transform)
        return x[:, None], y
    path = None
    key = features_mod.dataset_key(dataset)
    if key is not None:
        from . import cache

        path = cache.entry("features", f"{key}-{backbone.name}-{resolution}-views{views}", backbone=backbone,
                           dataset=dataset, resolution=resolution, loader=features_mod.loader_key(transform),
                           views=views, seed=seed)
        if path.is_file():
            tensors, _ = features_mod.load_tensors(path)
            return tensors["features"].float().view(len(tensors["labels"]), views, -1), tensors["labels"]
    images, labels, pending = _images_of(dataset, resolution, transform)
    half = view_features(backbone, images, resolution, views, seed, pending).half()
    if path is not None:
        features_mod.store(path, half.flatten(0, 1), labels, backbone=backbone.name, resolution=resolution,
                           views=views)
    return half.float(), labels


def full_data_probe(backbone: Backbone, train_ds: Dataset, test_ds: Dataset, resolution: int, *, epochs: int = 10,
                    seeds: Sequence[int] = (0, 1, 2), batch_size: int = 256, lr: float | None = None,
                    device: str | torch.device | None = None, progress: bool = False,
                    transform: EvalTransform | None = None, views: int = 1) -> ProbeResult:
    """Full-data baseline: a probe per seed on the cached features of the whole training split, train and
    test images through ``transform`` (default :data:`SQUARE`).

    Deviation from §6: by default (``views=1``) the features are *un-augmented* (the test transform, read
    from the feature cache): recomputing flip + crop views of 60k images every epoch is too slow on a CPU.
    ``views=K`` > 1: K precomputed views per image (:func:`full_view_features`, cached), one drawn per image
    each epoch, as the probes of distilled sets draw theirs. Adam lr = 1e-3·B/256 (B = 256), cosine decay
    to 0, mini-batches shuffled by the seed.
    """
    _check_probe_args(epochs, seeds)
    if views < 1:
        raise ValueError(f"views must be ≥ 1 (1 = no augmentation), got {views}")
    dev = backbone.device if device is None else resolve_device(device)
    C = _num_classes(train_ds, test_ds)
    train_x, train_y = full_view_features(backbone, train_ds, resolution, views, 0, transform, progress)
    test_x, test_y = features_mod.compute(backbone, test_ds, resolution, progress=progress, transform=transform)
    bs, base_lr = _default_hparams(len(train_y), batch_size, lr)
    S = len(seeds)
    feats = train_x.to(dev)[None].expand(S, -1, -1, -1)  # shared by all seeds, no copy
    W, b = _train_probes(feats, train_y.to(dev)[None].expand(S, -1), C, epochs=epochs, batch_size=bs, lr=base_lr,
                         seeds=seeds, progress=progress)
    meta = {"kind": "full", "backbone": backbone.name, "resolution": resolution, "epochs": epochs, "views": views,
            "n_train": len(train_y), "batch_size": bs, "lr": base_lr, "train": getattr(train_ds, "name", None),
            "test": getattr(test_ds, "name", None), "n_test": len(test_y), "augmented": views > 1,
            "transform": _transform_name(transform)}
    return ProbeResult(accuracies(W, b, test_x, test_y), [int(s) for s in seeds], meta, (W.cpu(), b.cpu()))


# --------------------------------------------------------------------------------------------- baselines
def random_subset(dataset: Dataset, ipc: int, seed: int) -> Subset:
    """``ipc`` real images per class drawn uniformly without replacement by ``seed`` (indices sorted)."""
    if ipc < 1:
        raise ValueError(f"ipc must be ≥ 1, got {ipc}")
    counts = torch.bincount(dataset.targets, minlength=len(dataset.classes))
    if int(counts.min()) < ipc:
        short = [dataset.classes[c] for c in torch.nonzero(counts < ipc).flatten().tolist()]
        raise ValueError(f"ipc={ipc} but classes {short} have fewer images; lower ipc")
    return data_mod.subset_per_class(dataset, ipc, seed=seed)


def centroid_subset(backbone: Backbone, dataset: Dataset, resolution: int, ipc: int = 1,
                    stats: ClassStats | None = None, *, progress: bool = False,
                    transform: EvalTransform | None = None) -> Subset:
    """For each class c the ``ipc`` real images with the smallest ‖φ(x) − μ_c‖₂ (class-major, nearest first).

    μ_c from ``stats.means`` if given (made with the same ``transform``), else the mean of the (cached)
    features of ``dataset``, its images through ``transform`` (default :data:`SQUARE`).
    """
    if ipc < 1:
        raise ValueError(f"ipc must be ≥ 1, got {ipc}")
    x, y = features_mod.compute(backbone, dataset, resolution, progress=progress, transform=transform)
    C = len(dataset.classes)  # float64 per class below: no float64 copy of every feature
    if stats is not None:
        stats.check_compatible(backbone)
        if stats.num_classes != C:
            raise ValueError(f"stats have {stats.num_classes} classes but {dataset.name} has {C}; "
                             f"use the statistics of this dataset")
        means = stats.means.double()
    else:
        means = torch.zeros(C, x.shape[1], dtype=torch.float64)
        for s in range(0, len(y), _ROWS):
            means.index_add_(0, y[s:s + _ROWS], x[s:s + _ROWS].double())
        means /= torch.bincount(y, minlength=C).clamp(min=1)[:, None]
    picks = []
    for c in range(C):
        idx = torch.nonzero(y == c).flatten()
        if len(idx) < ipc:
            raise ValueError(f"class {dataset.classes[c]!r} has {len(idx)} images, fewer than ipc={ipc}")
        d = ((x[idx].double() - means[c]) ** 2).sum(1)
        picks.append(idx[d.argsort(stable=True)[:ipc]])
    return data_mod.subset(dataset, torch.cat(picks).tolist())


def neighbor_subset(backbone: Backbone, dataset: Dataset, distilled: DistilledSet, resolution: int, *,
                    progress: bool = False, allow_class_mismatch: bool = False,
                    transform: EvalTransform | None = None) -> Subset:
    """For every distilled image x̃_i (in order), the real image of its class most similar to it by cosine in
    the space of ``backbone`` (the distillation backbone), as the LGM code picks neighbours:

        n(i) = argmax_{j : y_j = ỹ_i} ⟨φ(x̃_i), φ(x_j)⟩ / (‖φ(x̃_i)‖ ‖φ(x_j)‖)     (first of ties, float64).

    Distilled features: ``backbone.features`` at ``resolution``, un-augmented (rounded through float16 like
    the cached real features); real features with the test ``transform`` (default :data:`SQUARE`). Two
    distilled images may share a neighbour; it then appears twice.
    A set distilled from another dataset is refused unless ``allow_class_mismatch`` (:func:`check_same_data`).
    """
    check_same_data(distilled, dataset, allow_class_mismatch)
    if len(distilled.classes) != len(dataset.classes):
        raise ValueError(f"the distilled set has {len(distilled.classes)} classes but {dataset.name} has "
                         f"{len(dataset.classes)}; pass the training split of the dataset that was distilled")
    x, y = features_mod.compute(backbone, dataset, resolution, progress=progress, transform=transform)
    with torch.inference_mode():
        q = torch.cat([backbone.features(distilled.images[i:i + _CHUNK].float(), resolution).cpu()
                       for i in range(0, len(distilled), _CHUNK)]).half().double()
    q = F.normalize(q, dim=1)
    labels = distilled.labels.long().cpu()  # x in float64 per class below, not all at once
    picks = torch.empty(len(labels), dtype=torch.long)
    for c in labels.unique().tolist():
        pool = torch.nonzero(y == c).flatten()
        if len(pool) == 0:
            raise ValueError(f"no real image of class {c} in {dataset.name}; is it the dataset that was distilled?")
        rows = torch.nonzero(labels == c).flatten()
        cos = q[rows] @ F.normalize(x[pool].double(), dim=1).T
        picks[rows] = pool[cos.argmax(1)]
    return data_mod.subset(dataset, picks.tolist())


def baseline(kind: str, backbone: Backbone, train_ds: Dataset, test_ds: Dataset, resolution: int, *, ipc: int = 1,
             seeds: Sequence[int] = (0, 1, 2), distilled: DistilledSet | None = None,
             stats: ClassStats | None = None, allow_class_mismatch: bool = False, **probe_kw) -> ProbeResult:
    """A real-image baseline scored with the same probe: ``kind`` in {"random", "centroids", "neighbors", "full"}.

    "random": seed s draws its own ``random_subset(train_ds, ipc, s)`` and trains its probe with seed s.
    "centroids": :func:`centroid_subset` (class means from ``stats`` if given). "neighbors": needs
    ``distilled`` (:func:`neighbor_subset`). "full": :func:`full_data_probe` (``views`` 1 unless given).
    ``probe_kw`` go to :func:`linear_probe` (epochs, views, batch_size, lr, device, progress, transform);
    the test ``transform`` also picks the centroids and neighbours.
    ``allow_class_mismatch``: "neighbors" of a set distilled from another dataset (see :func:`check_same_data`).
    """
    if kind not in BASELINES:
        raise ValueError(f"unknown baseline kind {kind!r}; choose one of {', '.join(BASELINES)}")
    if kind == "full":
        return full_data_probe(backbone, train_ds, test_ds, resolution, seeds=seeds, **probe_kw)
    if kind == "random":
        trains = [random_subset(train_ds, ipc, s) for s in seeds]
        result = linear_probe(backbone, trains, test_ds, resolution, seeds=seeds, kind="random", **probe_kw)
    elif kind == "centroids":
        sub = centroid_subset(backbone, train_ds, resolution, ipc, stats=stats,
                              progress=probe_kw.get("progress", False), transform=probe_kw.get("transform"))
        result = linear_probe(backbone, sub, test_ds, resolution, seeds=seeds, kind="centroids", **probe_kw)
    else:
        if distilled is None:
            raise ValueError('baseline("neighbors", ...) needs the distilled set: pass distilled=DistilledSet')
        sub = neighbor_subset(backbone, train_ds, distilled, resolution, progress=probe_kw.get("progress", False),
                              allow_class_mismatch=allow_class_mismatch, transform=probe_kw.get("transform"))
        result = linear_probe(backbone, sub, test_ds, resolution, seeds=seeds, kind="neighbors", **probe_kw)
        result.meta.update(distill_backbone=distilled.meta.get("backbone"), ipc=distilled.meta.get("ipc"))
    if kind != "neighbors":
        result.meta["ipc"] = ipc
    return result


# ------------------------------------------------------------------------------------------------ tables
def cross_backbone(distilled: DistilledSet, backbone_names: Sequence[str | Backbone], test_ds: Dataset,
                   resolution: int, *, seeds: Sequence[int] = (0, 1, 2), device: str | torch.device | None = None,
                   transform: EvalTransform | str | None = None, **probe_kw) -> pd.DataFrame:
    """Probe ``distilled`` with every evaluation backbone φ_e (names, loaded on ``device``, or Backbone objects).
    ``transform``: the test transform, one for all, or a kind of :func:`sfm_lib.backbones.eval_transform`
    ("model": each backbone's own).

    Columns: ``eval_backbone``, ``distill_backbone`` (``distilled.meta["backbone"]``), ``top1_mean``, ``top1_std``.
    """
    import pandas as pd

    rows = []
    for item in backbone_names:
        bb = item if isinstance(item, Backbone) else backbones_mod.load(item, resolve_device(device))
        t = backbones_mod.eval_transform(bb, transform) if isinstance(transform, str) else transform
        res = linear_probe(bb, distilled, test_ds, resolution, seeds=seeds, transform=t, **probe_kw)
        rows.append({"eval_backbone": bb.name, "distill_backbone": distilled.meta.get("backbone"),
                     "top1_mean": res.top1_mean, "top1_std": res.top1_std})
    return pd.DataFrame(rows, columns=["eval_backbone", "distill_backbone", "top1_mean", "top1_std"])


_PROBE_KEYS = ("backbone", "resolution", "epochs", "views", "batch_size", "lr", "n_train", "test", "n_test",
               "transform")
"""What "the same probe" means for :func:`gain_over_random`: the evaluation backbone, the probe's recipe, the
number of training images (IPC × classes), the test split and its transform; the seeds are compared too."""


def _transform_name(transform: EvalTransform | None) -> str:
    """The test transform as results record it (``str`` of :class:`EvalTransform`; None is "square")."""
    return str(SQUARE if transform is None else transform)


def _probe_key(result: ProbeResult) -> tuple:
    return tuple(result.meta.get(k) for k in _PROBE_KEYS) + (tuple(result.seeds),)


def gain_over_random(result: ProbeResult, random: ProbeResult) -> float:
    """Gain over random real images (points): top1_mean(result) − top1_mean(random), where ``random`` is
    :func:`baseline` ("random") at the same IPC, scored by the same probe (backbone, recipe, test split) with
    the same seeds; equal to the mean over seeds s of the paired difference a_s − r_s. Anything else is
    refused, naming what differs."""
    if random.meta.get("kind") != "random":
        raise ValueError(f"the second result must be the random real-image baseline, got kind "
                         f"{random.meta.get('kind')!r}; make it with baseline('random', ...)")
    if list(result.seeds) != list(random.seeds):
        raise ValueError(f"probe seeds differ ({list(result.seeds)} vs {list(random.seeds)}); score the random "
                         f"baseline with the same seeds")
    diff = [f"{k} {result.meta.get(k)!r} vs {random.meta.get(k)!r}" for k in _PROBE_KEYS
            if result.meta.get(k) != random.meta.get(k)]
    if diff:
        raise ValueError(f"not the same probe at the same IPC ({'; '.join(diff)}); score the random baseline "
                         f"with the same probe settings and ipc")
    return result.top1_mean - random.top1_mean


def metric_name(ddof: int = 1, gain: bool = False) -> str:
    """What a :func:`results_table` reports, in words (for captions)."""
    text = f"top-1 (%) on the test split, mean ± {'sample' if ddof else 'population'} std over probe seeds"
    if gain:
        text += "; gain over random = top-1 − top-1 of random real images at the same IPC, probe and seeds (points)"
    return text


def results_table(rows: Sequence[ProbeResult | dict[str, Any]], per_seed: bool = False, *, ddof: int = 1,
                  gain: bool = False) -> pd.DataFrame:
    """One row per result (``meta`` flattened into columns, then ``top1_mean``, ``top1_std``, ``n_seeds``), or
    with ``per_seed=True`` the long form (one row per result and seed: ``seed``, ``top1``) for seaborn.

    ``top1_std`` is the std over probe seeds with ``ddof`` (1: sample, 0: population, as the papers report
    it). ``gain``: a ``gain_over_random`` column, :func:`gain_over_random` against the random row of this
    table with the same probe, IPC and seeds (NaN where there is none; 0 for random rows). The words for
    the metric are in ``table.attrs["metric"]`` (:func:`metric_name`). Dicts are taken as they are, except
    that a ``to_dict()`` layout (with ``top1``/``seeds``/``meta``) is read as a ProbeResult.
    """
    import pandas as pd

    results = [ProbeResult.from_dict(r) if isinstance(r, dict) and {"top1", "seeds"} <= r.keys() else r
               for r in rows]
    randoms: dict[tuple, ProbeResult] = {}
    for r in results:
        if gain and isinstance(r, ProbeResult) and r.meta.get("kind") == "random":
            if _probe_key(r) in randoms:
                raise ValueError("two random rows with the same probe, IPC and seeds; keep one per setting")
            randoms[_probe_key(r)] = r
    out = []
    for row in results:
        if isinstance(row, ProbeResult):
            if per_seed:
                out += [{**row.meta, "seed": s, "top1": a} for s, a in zip(row.seeds, row.top1)]
                continue
            entry = {**row.meta, "top1_mean": row.top1_mean, "top1_std": row.std(ddof), "n_seeds": len(row.top1)}
            if gain:
                rand = randoms.get(_probe_key(row))
                entry["gain_over_random"] = math.nan if rand is None else gain_over_random(row, rand)
            out.append(entry)
        elif isinstance(row, dict):
            out.append(dict(row))
        else:
            raise ValueError(f"results_table takes ProbeResult or dict rows, got {type(row).__name__}")
    table = pd.DataFrame(out)
    table.attrs["metric"] = metric_name(ddof, gain)
    return table


def score_on(result: ProbeResult, backbone: Backbone, dataset: Dataset, resolution: int, *,
             progress: bool = False, transform: EvalTransform | None = None) -> ProbeResult:
    """The probes of ``result`` (its ``weights``, trained once) scored on another split, e.g. the
    validation split that choices are made on: top-1 (%) per seed on ``dataset``'s (cached) features, with
    ``meta["test"]`` naming it. Nothing is trained again, so the two splits judge the same probes.
    ``transform``: the test transform the result was scored with (refused if it is another)."""
    if result.weights is None:
        raise ValueError("this result holds no probe weights (e.g. it was read back from JSON): train the probes "
                         "again with linear_probe")
    recorded = result.meta.get("transform", _transform_name(None))
    if recorded != _transform_name(transform):
        raise ValueError(f"the probes were scored with the test transform {recorded!r}, not "
                         f"{_transform_name(transform)!r}: pass the same transform=")
    W, b = result.weights
    x, y = features_mod.compute(backbone, dataset, resolution, progress=progress, transform=transform)
    meta = {**result.meta, "test": getattr(dataset, "name", None), "split": getattr(dataset, "split", None),
            "n_test": len(y)}
    return ProbeResult(accuracies(W, b, x, y), list(result.seeds), meta, result.weights)
