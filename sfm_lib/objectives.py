"""What a distillation step minimises: SFM and LGM as objectives of one loop (method.md §3, §5).

An objective maps the features z [M, D] of M = A·N augmented synthetic views (view v shows image v mod N,
"copy-major"; images class-major, ``ipc`` per class) to a scalar loss, differentiable in z. The loop
(:mod:`sfm_lib.distill`) does everything else. Interface:

- ``method`` ("sfm" / "lgm"), ``num_classes``;
- ``begin_step(backbone)``: draw what the step needs besides the synthetic views (LGM: a head, a real batch);
- ``__call__(z, labels, slots)`` → loss; the attribute ``layout`` (:class:`ViewLayout`, set once per run
  by the loop, which builds its labels in that order) makes class means a reshape (deterministic, no
  index_add, no host sync) for inputs of the layout's size; None (the default): the general index path;
- ``identity()``: everything of the objective that changes the result (resume compares it);
- ``state_dict()`` / ``load_state_dict()``: its own state for exact resume.

Because the loss depends on the images only through z, the loop's two-pass backward (features without a
graph, ∂L/∂z, chunked re-forward) is exact for both objectives: LGM's second-order graph runs through the
linear head only, never through the backbone.

Under torchrun each rank passes only the views of its block of classes (:meth:`ViewLayout.rank_views`),
and each objective combines the ranks' parts with :func:`sfm_lib.distributed.sum_replicated` (whose
backward hands each rank the gradient of its own part), so the loss is the single-process loss on every
rank. Each part is zero outside its own rows, so the sums only add zeros and are exact: SFM sums the class
means (each computed whole on the rank that holds its class); LGM sums the features themselves, zero-padded
to all views (and those of the real batch), and then computes the head gradients as one process does.
These sums are all a step sends: each rank owns the images of its block (:mod:`sfm_lib.distill`), and the
gradient of its views is the whole gradient of those images.
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from . import distributed, features, flow
from .augment import Augment
from .backbones import Backbone
from .data import BadImageError, real_images
from .stats import ClassStats

__all__ = ["ViewLayout", "SFMObjective", "MultiBackbone", "MultiSFMObjective", "LGMObjective", "RealStream",
           "head_gradient", "tensor_hash"]


def tensor_hash(*tensors: Tensor | None) -> str:
    """SHA-1 (16 hex digits) of the tensors' bytes, shapes and dtypes (None entries included as such)."""
    h = hashlib.sha1()
    for t in tensors:
        if t is None:
            h.update(b"none")
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class ViewLayout:
    """The standard order of M = augs·C·ipc views: index v = (a·C + c)·ipc + j is copy a of image j of class c.

    Then the per-class mean is z.view(A, C, ipc, D).sum(0).sum(1) / (A·ipc) — equal to :func:`flow.class_means`
    with labels = arange(C).repeat_interleave(ipc).repeat(A), but a reshape and sums in a fixed order."""

    augs: int
    num_classes: int
    ipc: int

    def fits(self, z: Tensor) -> bool:
        return z.dim() == 2 and z.shape[0] == self.augs * self.num_classes * self.ipc

    def check(self, z: Tensor) -> Tensor:
        m = self.augs * self.num_classes * self.ipc
        if z.dim() != 2 or z.shape[0] != m:
            raise ValueError(f"expected [{m}, D] features (augs={self.augs} × C={self.num_classes} × "
                             f"ipc={self.ipc}), got {tuple(z.shape)}")
        return z.view(self.augs, self.num_classes, self.ipc, z.shape[1])

    def class_means(self, z: Tensor) -> Tensor:
        """[C, D] per-class means: Σ over the copies, then over the slots, / (A·ipc). Two one-dimension sums, so
        the means of a block of classes (a torchrun rank's) equal those rows of all classes' bit for bit on the
        CPU; a mean over (0, 2) at once sums in an order that depends on the number of classes."""
        return self.check(z).sum(0).sum(1) / (self.augs * self.ipc)

    def subclass_means(self, z: Tensor) -> Tensor:
        """[C, ipc, D] per-(class, image) means over the copies."""
        return self.check(z).mean(dim=0)

    @property
    def size(self) -> int:
        return self.augs * self.num_classes * self.ipc

    def labels(self, device=None) -> Tensor:
        """The class of every view [M]: c for v = (a·C + c)·ipc + j."""
        return torch.arange(self.num_classes, device=device).repeat_interleave(self.ipc).repeat(self.augs)

    def slots(self, device=None) -> Tensor:
        """The image slot of every view [M]: j for v = (a·C + c)·ipc + j."""
        return torch.arange(self.ipc, device=device).repeat(self.num_classes * self.augs)

    def rank_views(self, device=None) -> Tensor:
        """Under torchrun, this rank's views in order: all copies of the images of its block of classes
        [lo, hi) = :func:`distributed.block` (C); every view without torchrun. Per class, one rank holds
        all views or none."""
        lo, hi = distributed.block(self.num_classes)
        rows = torch.arange(lo * self.ipc, hi * self.ipc, device=device)
        step = self.num_classes * self.ipc
        return (torch.arange(self.augs, device=device)[:, None] * step + rows[None]).flatten()


class _LayoutCheck:
    """Whether an objective may use its view layout for a call: the features must have the layout's size and
    the labels (and slots) the layout's order. The order is compared once per labels tensor (a host sync),
    then trusted while the same, unmodified tensors come back (the loop passes the same ones every step)."""

    def __init__(self):
        self._seen: tuple | None = None  # (labels, its version, slots, its version) that matched

    def __call__(self, layout: ViewLayout | None, z: Tensor, labels: Tensor, slots: Tensor | None,
                 offset: int = 0) -> bool:
        if layout is None or not layout.fits(z):
            return False
        seen = self._seen
        if seen is not None and seen[0] is labels and seen[1] == labels._version and seen[2] is slots \
                and (slots is None or seen[3] == slots._version):
            return True
        ok = labels.shape == (layout.size,) and torch.equal(labels, layout.labels(labels.device) + offset)
        if ok and slots is not None:
            ok = slots.shape == (layout.size,) and torch.equal(slots, layout.slots(slots.device))
        self._seen = (labels, labels._version, slots, None if slots is None else slots._version) if ok else None
        return ok


def _layout_for_torchrun(objective) -> ViewLayout:
    if objective.layout is None:
        raise ValueError(f"under torchrun {type(objective).__name__} needs the loop's view layout "
                         f"(objective.layout); run it through sfm_lib.distill")
    return objective.layout


# ----------------------------------------------------------------------------------------------------- SFM
class SFMObjective:
    """L = 1 − cos(vec F̃, vec F) with F the real flow of the class means and F̃ that of the synthetic
    features (per-class mean first). ``loss="mse"``: the decoupled ablation, MSE to the class means.
    ``subclass=True``: image j of class c is matched to the j-th k-means centre of class c (see
    :func:`sfm_lib.flow.subclass_real_flow`). ``ema`` = β > 0: the synthetic statistic (class means, or
    per-(class, slot) means) enters the loss as a running average over calls with the gradient of the
    current call (:func:`sfm_lib.flow.straight_through_ema`); the average is in :meth:`state_dict`."""

    method = "sfm"

    def __init__(self, stats: ClassStats, device: torch.device, loss: str = "flow", subclass: bool = False,
                 ipc: int = 1, ema: float = 0.0):
        if loss not in ("flow", "mse"):
            raise ValueError(f"loss must be 'flow' or 'mse', got {loss!r}")
        if not 0.0 <= ema < 1.0:
            raise ValueError(f"ema must lie in [0, 1) (0: off), got {ema}")
        self.stats = stats
        self.num_classes = self.C = stats.num_classes
        self.loss, self.subclass, self.ipc, self.ema = loss, subclass, ipc, ema
        self.running: Tensor | None = None
        self.layout: ViewLayout | None = None
        self._layout_ok = _LayoutCheck()
        means = stats.means.double()
        self.means = means.float().to(device)
        self.target = flow.real_flow(means).float().to(device)
        if subclass:
            if loss != "flow":
                raise ValueError("sub-class targets work with loss='flow' only")
            if stats.centres is None or stats.centres.shape[1] < ipc:
                have = 0 if stats.centres is None else stats.centres.shape[1]
                raise ValueError(f"sub-class targets need ≥ ipc={ipc} k-means centres per class in the statistics, "
                                 f"found {have}; re-run `python -m sfm_lib stats --kmeans {ipc} ...`")
            self.target = flow.subclass_real_flow(means, stats.centres[:, :ipc].double()).float().to(device)

    def identity(self) -> dict[str, Any]:
        centres = self.stats.centres[:, :self.ipc] if self.subclass else None
        return {"loss": self.loss, "subclass": self.subclass, "ema": self.ema,
                "statistics": tensor_hash(self.stats.means, self.stats.counts, centres)}

    def begin_step(self, backbone: Backbone | None = None) -> None:
        """Nothing to draw: the target is fixed."""

    def __call__(self, z: Tensor, labels: Tensor, slots: Tensor) -> Tensor:
        layout = self.layout if self._layout_ok(self.layout, z, labels, slots if self.subclass else None) else None
        if distributed.world_size() > 1:  # z: this rank's views; the means are over every rank's
            stat = self._shared_statistic(z, labels, slots)
        elif self.subclass:
            stat = (layout.subclass_means(z) if layout is not None
                    else flow.subclass_means(z, labels, slots, self.C, self.ipc))
        else:
            stat = layout.class_means(z) if layout is not None else flow.class_means(z, labels, self.C)
        if self.ema:
            stat, self.running = flow.straight_through_ema(stat, self.running, self.ema)
        if self.loss == "mse":
            return flow.decoupled_loss(stat, self.means)
        if self.subclass:
            return flow.sfm_loss(flow.subclass_real_flow(stat.mean(1), stat), self.target)
        return flow.sfm_loss(flow.real_flow(stat), self.target)

    def _shared_statistic(self, z: Tensor, labels: Tensor, slots: Tensor) -> Tensor:
        """Under torchrun: the class (or class-slot) means of every rank's views, the same on every rank.
        With the loop's layout, z holds all views of classes [lo, hi) (copy-major): their means are
        computed here as in one process and placed in rows lo … hi−1 of zeros, then summed over ranks."""
        lay, (lo, hi) = _layout_for_torchrun(self), distributed.block(self.C)
        local = ViewLayout(lay.augs, hi - lo, lay.ipc)  # checks that z holds the views of classes lo … hi−1
        if not self._layout_ok(local, z, labels, slots, offset=lo):
            raise ValueError(f"under torchrun the views of classes {lo}–{hi - 1} must come in the loop's order "
                             f"(copy-major, class-major, {lay.augs * (hi - lo) * lay.ipc} rows); run them "
                             f"through sfm_lib.distill")
        part = local.subclass_means(z) if self.subclass else local.class_means(z)
        before, after = part.new_zeros((lo, *part.shape[1:])), part.new_zeros((self.C - hi, *part.shape[1:]))
        return distributed.sum_replicated(torch.cat([before, part, after]))

    def state_dict(self) -> dict[str, Tensor]:
        """The running average (empty before the first call or with ``ema`` = 0)."""
        return {} if self.running is None else {"running": self.running.detach().cpu()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        running = state.get("running")
        self.running = None if running is None else running.to(self.means.device)


# -------------------------------------------------------------------------------------- several backbones
class MultiBackbone:
    """Several frozen backbones seen by the loop as one: features are concatenated, z = [φ₁(x) | … | φ_K(x)].

    The loop calls ``backbone(backbone.preprocess(views, crop))``; here ``preprocess`` only moves the
    augmented views (in [0, 1]) to the device, and the call gives each backbone its own preprocessing,
    φ_k(normalise_k(resize(x, r_k))) at its own input size r_k (``crops``, default: the loop's crop), then
    concatenates. Every backbone sees the SAME augmented views. :class:`MultiSFMObjective` splits z again
    by ``dims``. The distillation loop (one pass, two-pass, memory plan) needs no other change."""

    def __init__(self, backbones: Sequence[Backbone], crops: Sequence[int | None] | None = None):
        self.backbones = list(backbones)
        if len(self.backbones) < 2:
            raise ValueError(f"a MultiBackbone needs at least 2 backbones, got {len(self.backbones)}")
        devices = {str(b.device) for b in self.backbones}
        if len(devices) > 1:
            raise ValueError(f"all backbones must be on one device, got {', '.join(sorted(devices))}")
        self.crops = list(crops) if crops is not None else [None] * len(self.backbones)
        if len(self.crops) != len(self.backbones):
            raise ValueError(f"{len(self.crops)} crop sizes for {len(self.backbones)} backbones")
        self.names = [b.name for b in self.backbones]
        self.name = "+".join(self.names)
        self.device = self.backbones[0].device
        self.dims = [b.feature_dim for b in self.backbones]
        self.feature_dim = sum(self.dims)

    def __repr__(self) -> str:
        return f"MultiBackbone({self.names}, feature_dims={self.dims}, device={self.device})"

    def preprocess(self, images: Tensor, resolution: int) -> Tensor:
        """The [0, 1] views on the device (each backbone normalises and resizes them itself in the call)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images [N,3,H,W], got {tuple(images.shape)}")
        return images.to(self.device, non_blocking=True)

    def __call__(self, x: Tensor) -> Tensor:
        """[0, 1] views [N, 3, r, r] → [N, Σ_k D_k]: φ_k(preprocess_k(x, r_k)) side by side."""
        size = x.shape[-1]
        return torch.cat([b(b.preprocess(x, r or size)) for b, r in zip(self.backbones, self.crops)], dim=1)

    def features(self, images: Tensor, resolution: int) -> Tensor:
        return self(self.preprocess(images, resolution))


class MultiSFMObjective:
    """SFM over K backbones on the same views: L = Σ_k w_k L_k / Σ_k w_k, with L_k the loss of an
    :class:`SFMObjective` of backbone k (its own statistics, its own running average) on its block of the
    concatenated features z = [z₁ | … | z_K] of :class:`MultiBackbone` (``dims`` = D_1 … D_K). Hence
    ∂L/∂θ = Σ_k w̄_k ∂L_k/∂θ with w̄ = w / Σ w. ``weights`` default to equal; ``names`` and ``crops``
    (each backbone's input size) enter the identity only."""

    method = "sfm"

    def __init__(self, objectives: Sequence[SFMObjective], dims: Sequence[int], weights: Sequence[float] | None = None,
                 names: Sequence[str] | None = None, crops: Sequence[int] | None = None):
        self.parts = list(objectives)
        self.crops = None if crops is None else [int(c) for c in crops]
        self.dims = [int(d) for d in dims]
        if len(self.parts) != len(self.dims):
            raise ValueError(f"{len(self.parts)} objectives for {len(self.dims)} feature blocks")
        w = [1.0] * len(self.parts) if weights is None else [float(v) for v in weights]
        if len(w) != len(self.parts):
            raise ValueError(f"{len(w)} backbone weights for {len(self.parts)} backbones; give one weight each")
        if any(not v >= 0 for v in w) or not sum(w) > 0:
            raise ValueError(f"backbone weights must be ≥ 0 with a positive sum, got {w}")
        self.weights = [v / sum(w) for v in w]
        self.names = list(names) if names is not None else [f"backbone{k}" for k in range(len(self.parts))]
        classes = {o.num_classes for o in self.parts}
        if len(classes) != 1:
            raise ValueError(f"the statistics disagree on the number of classes: {sorted(classes)}")
        self.num_classes = self.C = classes.pop()
        self._layout: ViewLayout | None = None

    @property
    def layout(self) -> ViewLayout | None:
        return self._layout

    @layout.setter
    def layout(self, value: ViewLayout | None) -> None:
        self._layout = value
        for o in self.parts:
            o.layout = value

    def identity(self) -> dict[str, Any]:
        return {"backbones": self.names, "weights": self.weights, "dims": self.dims, "crops": self.crops,
                "per_backbone": [o.identity() for o in self.parts]}

    def begin_step(self, backbone=None) -> None:
        """Nothing to draw: the targets are fixed."""

    def split(self, z: Tensor) -> list[Tensor]:
        """z [M, Σ D_k] → [z₁ [M, D_1], …]."""
        if z.dim() != 2 or z.shape[1] != sum(self.dims):
            raise ValueError(f"expected features [M, {sum(self.dims)}] (dims {self.dims}), got {tuple(z.shape)}")
        return list(torch.split(z, self.dims, dim=1))

    def losses(self, z: Tensor, labels: Tensor, slots: Tensor) -> list[Tensor]:
        """The per-backbone losses L_k (each advances its own running average)."""
        return [o(zk, labels, slots) for o, zk in zip(self.parts, self.split(z))]

    def __call__(self, z: Tensor, labels: Tensor, slots: Tensor) -> Tensor:
        return sum(w * lk for w, lk in zip(self.weights, self.losses(z, labels, slots)))

    def state_dict(self) -> dict[str, Tensor]:
        """Every backbone's running average, keys ``"{k}.running"``."""
        return {f"{k}.{key}": v for k, o in enumerate(self.parts) for key, v in o.state_dict().items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        for k, o in enumerate(self.parts):
            o.load_state_dict({key[len(f"{k}."):]: v for key, v in state.items() if key.startswith(f"{k}.")})


# ----------------------------------------------------------------------------------------------------- LGM
def _all_rows(part: Tensor, rows: Tensor, total: int) -> Tensor:
    """[total, D]: rows ``rows`` from this rank's ``part``, the others from the other ranks — exactly
    (each row is non-zero on one rank only); differentiable, each rank's gradient is that of its rows."""
    full = part.new_zeros(total, part.shape[1]).index_copy(0, rows, part)
    return distributed.sum_replicated(full)


def head_gradient(z: Tensor, labels: Tensor, weight: Tensor, bias: Tensor,
                  create_graph: bool = False) -> tuple[Tensor, Tensor]:
    """Gradient of the mean cross-entropy CE = (1/N) Σ_i −log softmax(W z_i + b)_{y_i} w.r.t. the head:

        ∂CE/∂W = (P − Y)ᵀ Z / N,   ∂CE/∂b = (P − Y)ᵀ 1 / N,   P = softmax(Z Wᵀ + b), Y one-hot

    computed by autograd in float32 or wider. ``create_graph=True`` keeps it differentiable w.r.t. ``z``
    (LGM's synthetic side)."""
    dtype = torch.promote_types(torch.promote_types(z.dtype, weight.dtype), torch.float32)
    w = weight.detach().to(dtype).requires_grad_(True)
    b = bias.detach().to(dtype).requires_grad_(True)
    with torch.enable_grad():
        ce = F.cross_entropy(z.to(dtype) @ w.t() + b, labels)
        gw, gb = torch.autograd.grad(ce, (w, b), create_graph=create_graph)
    return gw, gb


def _seed_of(*parts: int) -> int:
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "little") >> 1


class RealStream:
    """An endless, reproducible stream of real training images: each epoch a fresh permutation drawn from
    (``seed``, pool, epoch), consumed in order; a batch may run into the next epoch. ``balanced=False``: one
    pool of every image (shuffled, classes as they come); ``balanced=True``: one pool per class and
    ``batch_size // C`` images of each class per batch. The position (epoch, index per pool) is the state.

    Image folders: :meth:`next` reads from a prefetching loader (:func:`sfm_lib.features.folder_batches`):
    ``num_workers`` DataLoader workers (None: :func:`sfm_lib.features.default_workers`; 0: read in this
    process) decode and resize the next batches, each split in one piece per worker, while the current step
    runs; the loader follows a copy of the position, so its batches are those of :meth:`next_indices`, and
    it is rebuilt from the position after :meth:`load_state_dict`. In-memory data: one vectorised gather."""

    def __init__(self, dataset: Dataset, batch_size: int, seed: int = 0, balanced: bool = False,
                 num_workers: int | None = None, prefetch: int = 2, pin_memory: bool = False):
        targets = torch.as_tensor(dataset.targets, dtype=torch.long)
        self.dataset, self.batch_size, self.seed, self.balanced = dataset, int(batch_size), int(seed), balanced
        self.num_workers, self.prefetch, self.pin_memory = num_workers, int(prefetch), bool(pin_memory)
        C = len(dataset.classes)
        if balanced:
            if batch_size % C:
                raise ValueError(f"a class-balanced batch needs a batch size divisible by C={C}, got {batch_size}")
            self.pools = [torch.nonzero(targets == c).flatten() for c in range(C)]
            empty = [c for c, p in enumerate(self.pools) if len(p) == 0]
            if empty:
                raise ValueError(f"{getattr(dataset, 'name', 'dataset')}: classes without any image: {empty}")
            self.take = [batch_size // C] * C
        else:
            if len(targets) == 0:
                raise ValueError("the real dataset is empty")
            self.pools, self.take = [torch.arange(len(targets))], [batch_size]
        self.targets = targets
        self.position = torch.zeros(len(self.pools), 2, dtype=torch.long)  # (epoch, index) per pool
        self._perm: dict[int, tuple[int, Tensor]] = {}
        self._ahead: tuple[tuple[int, int, int], Any, int] | None = None  # ((r, lo, hi), loader, pieces per batch)

    def _permutation(self, p: int, epoch: int) -> Tensor:
        cached = self._perm.get(p)
        if cached is None or cached[0] != epoch:
            g = torch.Generator().manual_seed(_seed_of(self.seed, p, epoch))
            cached = (epoch, self.pools[p][torch.randperm(len(self.pools[p]), generator=g)])
            self._perm[p] = cached
        return cached[1]

    def next_indices(self) -> Tensor:
        """Dataset indices of the next batch (and advance)."""
        out = []
        for p, want in enumerate(self.take):
            epoch, pos = (int(v) for v in self.position[p])
            while want > 0:
                perm = self._permutation(p, epoch)
                got = perm[pos:pos + want]
                out.append(got)
                want -= len(got)
                pos += len(got)
                if pos >= len(perm):
                    epoch, pos = epoch + 1, 0
            self.position[p] = torch.tensor([epoch, pos])
        return torch.cat(out)

    def _workers(self) -> int:
        if features.folder_of(self.dataset) is None:
            return 0
        return features.default_workers(self.dataset) if self.num_workers is None else int(self.num_workers)

    def _pieces(self, lo: int, hi: int, pieces: int):
        """Rows lo … hi−1 of every batch from the current position on, each batch in ``pieces`` lists."""
        twin = RealStream.__new__(RealStream)
        twin.__dict__.update(self.__dict__, position=self.position.clone(), _perm={}, _ahead=None)
        while True:
            rows = twin.next_indices()[lo:hi]
            yield from (part.tolist() for part in torch.tensor_split(rows, pieces))

    def next(self, resolution: int, rows: tuple[int, int] | None = None) -> tuple[Tensor, Tensor]:
        """Next batch: images [hi − lo, 3, r, r] of its rows ``rows`` = (lo, hi) (default: all; CPU, float
        in [0, 1], as :func:`sfm_lib.data.real_images` makes them) and the labels [B] of the whole batch."""
        lo, hi = rows if rows is not None else (0, self.batch_size)
        workers = self._workers()
        if workers == 0:
            idx = self.next_indices()
            return real_images(self.dataset, idx[lo:hi], resolution), self.targets[idx]
        key = (resolution, lo, hi)
        if self._ahead is None or self._ahead[0] != key:
            self.close()
            pieces = max(1, min(workers, hi - lo))
            loader = features.folder_batches(self.dataset, self._pieces(lo, hi, pieces), resolution, workers,
                                             pin_memory=self.pin_memory, prefetch=self.prefetch)
            self._ahead = (key, loader, pieces)
        _, loader, pieces = self._ahead
        parts = [next(loader) for _ in range(pieces)]
        idx = self.next_indices()
        bad = [b for part in parts for b in part[3]]
        if bad:
            raise BadImageError(*bad[0], "LGM's real batches need readable files: remove it or pass a dataset without it")
        return torch.cat([part[0] for part in parts]), self.targets[idx]

    def state_dict(self) -> dict[str, Tensor]:
        return {"position": self.position.clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        pos = state["position"]
        if pos.shape != self.position.shape:
            raise ValueError(f"stream position of shape {tuple(pos.shape)} does not fit {len(self.pools)} pool(s)")
        self.position = pos.clone().long()
        self.close()  # the loader ran ahead of another position: start one from this position

    def close(self) -> None:
        """Stop the prefetching workers now (the next :meth:`next` starts new ones from the position). Left to
        the garbage collector, an endless loader's workers are shut down whenever it runs, in whatever the
        process is doing by then, each waiting out the DataLoader's join timeout."""
        if self._ahead is not None:
            shutdown = getattr(self._ahead[1], "_shutdown_workers", None)  # torch's multi-process iterator
            self._ahead = None
            if shutdown is not None:
                shutdown()


def _dataset_identity(dataset: Dataset) -> dict[str, Any]:
    targets = torch.as_tensor(dataset.targets, dtype=torch.long)
    return {"dataset": getattr(dataset, "name", type(dataset).__name__), "split": getattr(dataset, "split", None),
            "images": len(targets), "labels": tensor_hash(targets)}


class LGMObjective:
    """Linear gradient matching, one step (method.md §5):

    1. a fresh head W ~ N(0, ``head_std``²) [C, D], b = 0, from the objective's own generator;
    2. a real batch of ipc·A·C training images from a :class:`RealStream` (shuffled; ``balanced``: the same
       number per class; image folders: prefetched by ``num_workers`` workers), each augmented once,
       features without a graph, ``chunk_size`` images per forward (None: 256); g_real = ∂CE/∂(W, b);
    3. on the A·N synthetic views z: g_syn = ∂CE/∂(W, b) with ``create_graph``;
    4. L = 1 − cos(vec g_real, vec g_syn).

    Under torchrun each rank reads, augments and forwards only its block of the real batch
    (:func:`sfm_lib.distributed.block`); the features are summed over ranks (:func:`_all_rows`).
    State for resume: the generator (heads and real-batch augmentation) and the stream position."""

    method = "lgm"

    def __init__(self, dataset: Dataset, backbone: Backbone, *, ipc: int = 1, augs: int = 10,
                 resolution: int = 64, crop: int | None = None, augment: Augment | None = None,
                 head_std: float = 0.01, balanced: bool = False, seed: int = 0, num_workers: int | None = None):
        if head_std < 0:
            raise ValueError(f"head_std must be ≥ 0, got {head_std}")
        if not hasattr(dataset, "targets") or not hasattr(dataset, "classes"):
            raise ValueError("LGM needs a real training set with .targets and .classes (e.g. data.load(...))")
        self.dataset, self.backbone = dataset, backbone
        self.num_classes = len(dataset.classes)
        self.ipc, self.augs, self.resolution = ipc, augs, resolution
        self.crop = crop or resolution
        self.augment = augment or Augment()
        self.head_std, self.balanced, self.seed = float(head_std), bool(balanced), int(seed)
        self.device = backbone.device
        self.stream = RealStream(dataset, ipc * augs * self.num_classes, seed=seed, balanced=balanced,
                                 num_workers=num_workers, pin_memory=self.device.type == "cuda")
        self.generator = torch.Generator(device=self.device).manual_seed(_seed_of(seed, "lgm"))
        self.chunk_size: int | None = None  # images per real forward (None: 256); the loop's memory plan sets it
        self.weight: Tensor | None = None
        self.bias: Tensor | None = None
        self.g_real: Tensor | None = None
        self.layout: ViewLayout | None = None  # used under torchrun only (to place each rank's views)

    def identity(self) -> dict[str, Any]:
        return {"head_std": self.head_std, "balanced": self.balanced, "real_augment": asdict(self.augment),
                **_dataset_identity(self.dataset)}

    def real_features(self, backbone: Backbone | None = None) -> tuple[Tensor, Tensor]:
        """The next real batch, each image augmented once, through φ without a graph in chunks: features of
        rows [lo, hi) = :func:`distributed.block` (B) of the batch (all rows in one process) and the labels
        [B] of the whole batch, on the device. The augmentation is drawn for the whole batch on every rank."""
        backbone = backbone or self.backbone
        B = self.stream.batch_size
        lo, hi = distributed.block(B)
        x, y = self.stream.next(self.resolution, (lo, hi))
        params = self.augment.sample(B, self.generator).select(slice(lo, hi))
        step = self.chunk_size or 256
        parts = []
        with torch.no_grad():
            for s in range(0, hi - lo, step):
                views = self.augment.apply(x[s:s + step].to(self.device, non_blocking=True),
                                           params.select(slice(s, s + step)), self.crop)
                parts.append(backbone(backbone.preprocess(views, self.crop)))
        z = torch.cat(parts) if parts else torch.empty(0, backbone.feature_dim, device=self.device)
        return z, y.to(self.device, non_blocking=True)

    def begin_step(self, backbone: Backbone | None = None) -> None:
        """Draw the head and the real batch; g_real = ∂CE/∂(W, b) on the real features (no graph)."""
        D = self.backbone.feature_dim
        self.weight = self.head_std * torch.randn(self.num_classes, D, generator=self.generator, device=self.device)
        self.bias = torch.zeros(self.num_classes, device=self.device)
        z, y = self.real_features(backbone)
        if distributed.world_size() > 1:  # each rank forwarded its block of the batch
            lo, hi = distributed.block(len(y))
            with torch.no_grad():
                z = _all_rows(z, torch.arange(lo, hi, device=z.device), len(y))
        gw, gb = head_gradient(z, y, self.weight, self.bias)
        self.g_real = torch.cat([gw.flatten(), gb]).detach()

    def __call__(self, z: Tensor, labels: Tensor, slots: Tensor) -> Tensor:
        if self.g_real is None:
            raise RuntimeError("LGMObjective: call begin_step() before the loss (it draws the head and real batch)")
        if distributed.world_size() > 1:  # z: this rank's views; the head gradient needs every view
            lay = _layout_for_torchrun(self)
            z = _all_rows(z, lay.rank_views(z.device), lay.size)
            labels = lay.labels(z.device)
        gw, gb = head_gradient(z, labels, self.weight, self.bias, create_graph=True)
        return flow.sfm_loss(torch.cat([gw.flatten(), gb]), self.g_real)

    def state_dict(self) -> dict[str, Tensor]:
        return {"generator": self.generator.get_state().cpu(), **self.stream.state_dict()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.generator.set_state(state["generator"])
        self.stream.load_state_dict(state)

    def close(self) -> None:
        """Stop the real stream's prefetching workers (the distillation loop calls it when a run ends)."""
        self.stream.close()
