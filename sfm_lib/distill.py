"""One distillation loop for every objective (SFM, LGM; see :mod:`sfm_lib.objectives`) and one config.

:class:`DistillConfig` holds what both methods share: the image parameterisation, the augmentation, the
optimiser and its schedule, the number of steps, the seed, checkpoints, and the memory plan (one pass or
two-pass with a chunk size). :class:`Distiller` runs it for an objective; :func:`sfm` and :func:`lgm` are
the entry points. A step:

    objective.begin_step()             (LGM: a fresh head, a real batch and its head gradient)
    views v = 0 … A·N−1 of the images (image v mod N), z = φ(normalise(aug(decode(θ))))
    L = objective(z); ∂L/∂θ by one pass, or two passes (memory bounded by the chunk); Adam step on θ

No host–device synchronisation inside a step: the loss stays on the device and is read back every
``read_every`` steps (progress bar, non-finite check; the history is complete at the end), class means
are a reshape of the views, and labels are built and checked once per run.

Under torchrun (W processes, :mod:`sfm_lib.distributed`) each rank owns the images of its block of classes
[lo, hi) = :func:`distributed.block` (C), rows lo·ipc … hi·ipc − 1 of the class-major images: their
parameters, gradients and Adam state. It forwards only their views (see :func:`step_gradient`); the objective
combines what the loss needs across ranks (SFM the class means, LGM and CLP the features), so the loss is the
single-process loss on every rank and the gradient of a rank's rows is complete there: image gradients are
never sent. The generators are the same on every rank; a random draw for the images (noise start, a new
pyramid level) is made for all N images and cut to the rows. So loss and images equal a single-process run:
bit for bit where the backbone's features of an image do not depend on the other images of its batch (on the
CPU, Lite0 with batches of ≥ 16), else up to float rounding. The rows are gathered only for a checkpoint
(rank 0 receives and writes the whole set and the whole Adam state, as one process would) and at the end
(the returned :class:`DistilledSet` holds every image on every rank); every rank resumes its rows from the
same checkpoint (also with another W).
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from . import data, distributed
from .augment import Augment, AugmentParams
from .backbones import Backbone
from .data import DistilledSet
from .images import SyntheticImages, make_images
from .objectives import (LGMObjective, MultiBackbone, MultiSFMObjective, SFMObjective, ViewLayout,
                         _dataset_identity, tensor_hash)
from .progress import tqdm
from .stats import ClassStats
from .utils import atomic_path

__all__ = ["DistillConfig", "Distiller", "run", "sfm", "lgm", "DistilledSet", "SFMObjective", "LGMObjective",
           "MultiBackbone", "MultiSFMObjective", "Snapshots", "step_gradient", "ViewIndex", "DEFAULT_LR"]

DEFAULT_LR = {"pixels": 0.05, "pyramid": 0.01}
_CHECKPOINT_VERSION = 2


@dataclass
class DistillConfig:
    """Everything of a distillation run that is not the objective.

    ``param`` "pixels" or "pyramid" (a level added every ``grow_every`` steps, Adam re-created then);
    ``init`` "noise", "real" (random real images of the loop's ``init_dataset``, drawn by ``seed``) or a
    tensor of start images [N, 3, H, W] in [0, 1], class-major; ``augs`` = A views per image and step;
    ``lr`` None: :data:`DEFAULT_LR` of ``param``; ``schedule`` "constant" or "cosine" (over ``steps``).
    ``two_pass`` None: chosen automatically (CUDA: from the free memory; CPU: one pass); ``chunk_size``
    None: 256, or on CUDA as many views as fit. ``checkpoint`` written atomically every
    ``checkpoint_every`` steps and at the end; ``resume`` continues it exactly. ``compile``:
    ``torch.compile`` the backbone. ``read_every``: steps between reading the loss back to the host.
    """

    ipc: int = 1
    steps: int = 1000
    resolution: int = 64
    crop: int | None = None
    augs: int = 1
    lr: float | None = None
    schedule: str = "constant"
    param: str = "pixels"
    grow_every: int = 200
    init: Any = "noise"
    augment: Augment = field(default_factory=Augment)
    seed: int = 0
    two_pass: bool | None = None
    chunk_size: int | None = None
    checkpoint: str | os.PathLike | None = None
    checkpoint_every: int = 100
    resume: bool = False
    progress: bool = True
    compile: bool = False
    read_every: int = 10

    def check(self) -> None:
        """Raise ValueError naming any bad setting."""
        if self.ipc < 1:
            raise ValueError(f"ipc must be ≥ 1, got {self.ipc}")
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"schedule must be 'constant' or 'cosine', got {self.schedule!r}")
        if self.steps < 0 or self.augs < 1 or (self.chunk_size is not None and self.chunk_size < 1) \
                or self.checkpoint_every < 1 or self.read_every < 1:
            raise ValueError(f"need steps ≥ 0, augs ≥ 1, chunk_size ≥ 1, checkpoint_every ≥ 1, read_every ≥ 1 "
                             f"(got {self.steps}, {self.augs}, {self.chunk_size}, {self.checkpoint_every}, "
                             f"{self.read_every})")
        if self.resume and self.checkpoint is None:
            raise ValueError("resume=True needs a checkpoint path")

    @property
    def crop_size(self) -> int:
        return self.crop or self.resolution

    @property
    def learning_rate(self) -> float:
        return DEFAULT_LR.get(self.param, 0.01) if self.lr is None else float(self.lr)


# ------------------------------------------------------------------------------------------------- step
def _views(images: SyntheticImages, backbone: Backbone, augment: Augment, params: AugmentParams,
           image_idx: torch.Tensor, crop: int, rows: list[torch.Tensor] | None = None) -> torch.Tensor:
    """φ(normalise(aug(decode(images)[image_idx]))) for one chunk of views → [M, D]."""
    x = images.decode(rows) if rows is not None else images.decode()[image_idx]
    return backbone(backbone.preprocess(augment.apply(x, params, crop), crop))


def step_gradient(images: SyntheticImages, backbone: Backbone, objective, augment: Augment,
                  params: AugmentParams, labels: torch.Tensor, slots: torch.Tensor, augs: int, crop: int,
                  two_pass: bool = False, chunk_size: int = 256, views: "ViewIndex | None" = None) -> torch.Tensor:
    """Compute the loss of one step and accumulate its gradient into ``images``' parameters; returns the
    loss as a detached 0-d tensor on the device (no host sync).

    Views are ordered copy-major: view v shows image v mod N under augmentation ``params[v]``; the objective
    gets labels[v mod N] and slots[v mod N] (and may use its ``layout`` instead, see :mod:`sfm_lib.objectives`).

    One pass: decode → augment → φ → loss → backward (the graph holds every view's activations).
    Two passes (memory does not grow with the number of views): (1) features z of all views without a
    graph, chunk by chunk; g = ∂L/∂z. (2) for each chunk, re-decode just its images from parameter
    rows that are their own autograd leaves, redo the same augmentation and forward, and backpropagate
    z_chunk·g_chunk; the row gradients are index-added into the parameters' gradients. The crops are
    identical in both passes (per-image noise seeds), so the gradient equals the one-pass gradient. This
    holds for any objective that depends on the images only through z (SFM and LGM both do).

    Under torchrun (W processes) ``images`` hold this rank's rows (:attr:`ViewIndex.rows`); every rank gets
    the same ``params`` (one generator state) and forwards only the views of its block of classes
    (:meth:`ViewLayout.rank_views`); the objective combines its results across ranks
    (:func:`sfm_lib.distributed.sum_replicated`), so the loss is the single-process loss on every rank and
    the gradient of its rows, accumulated here, is the whole gradient of those rows (all their views are here).
    """
    views = views or ViewIndex.of(images.num_images, augs, labels, slots, objective.num_classes)
    if images.rows != views.rows:
        raise ValueError(f"this rank's views show images {views.rows[0]}–{views.rows[1] - 1}, but the images "
                         f"hold rows {images.rows[0]}–{images.rows[1] - 1}: under torchrun each rank holds the "
                         f"rows of its block of classes (make_images(..., rows=...), as Distiller does)")
    view_img, view_labels, view_slots = views.image, views.labels, views.slots
    if views.mine is not None:
        params = params.select(views.mine)
    if not two_pass:
        z = _views(images, backbone, augment, params, view_img, crop)
        loss = objective(z, view_labels, view_slots)
        loss.backward()
        return loss.detach()
    chunks = [torch.arange(s, min(s + chunk_size, len(view_img)), device=labels.device)
              for s in range(0, len(view_img), chunk_size)]
    tensors = list(images.parameters())
    with torch.no_grad():
        z = torch.cat([_views(images, backbone, augment, params.select(c), view_img[c], crop,
                              rows=[p[view_img[c]] for p in tensors]) for c in chunks])
    z.requires_grad_(True)
    loss = objective(z, view_labels, view_slots)
    (g,) = torch.autograd.grad(loss, z)
    for p in tensors:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    for c in chunks:
        idx = view_img[c]
        rows = [p.detach()[idx].requires_grad_(True) for p in tensors]
        zc = _views(images, backbone, augment, params.select(c), idx, crop, rows=rows)
        zc.backward(g[c])
        for p, r in zip(tensors, rows):
            p.grad.index_add_(0, idx, r.grad)
    return loss.detach()


@dataclass(frozen=True)
class ViewIndex:
    """The views of a step that this rank forwards: ``rows`` = [lo·ipc, hi·ipc), the images of its block of
    classes (all N without torchrun); ``image``, which of those rows each view shows (image ``rows[0] +
    image`` of the whole set); its label and slot; and under torchrun which of all views are this rank's
    (``mine``, else None). The same every step: the loop builds it once, so the objective checks the labels'
    order once (:class:`sfm_lib.objectives.SFMObjective`)."""

    image: torch.Tensor
    labels: torch.Tensor
    slots: torch.Tensor
    mine: torch.Tensor | None
    rows: tuple[int, int]

    @classmethod
    def of(cls, n: int, augs: int, labels: torch.Tensor, slots: torch.Tensor, num_classes: int) -> "ViewIndex":
        view_img, mine, rows = torch.arange(n * augs, device=labels.device) % n, None, (0, n)
        if distributed.world_size() > 1:
            ipc = n // num_classes
            lo, hi = distributed.block(num_classes)
            mine, rows = ViewLayout(augs, num_classes, ipc).rank_views(labels.device), (lo * ipc, hi * ipc)
            view_img = view_img[mine]
        return cls(view_img - rows[0], labels[view_img], slots[view_img], mine, rows)


def _map_rows(tree: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """``tree`` (nested dicts, lists, tuples) with ``fn`` applied to every tensor of ≥ 1 dimension: the per-image
    tensors of an images or Adam state dict, whose first dimension is the image; 0-d tensors (Adam's step),
    numbers and the images' extra state are kept."""
    if isinstance(tree, torch.Tensor):
        return fn(tree) if tree.dim() >= 1 else tree
    if isinstance(tree, dict):
        return {k: _map_rows(v, fn) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_map_rows(v, fn) for v in tree)
    return tree


def _initial_images(kind: str, labels: torch.Tensor, resolution: int, init, init_dataset, seed: int,
                    generator: torch.Generator, rows: tuple[int, int], **kw) -> SyntheticImages:
    """Rows [lo, hi) = ``rows`` of the start images. ``init``: "noise" (drawn for all N, cut to the rows);
    "real" (``ipc`` random real images per class of ``init_dataset``, drawn by ``seed``; only the rows' are
    read); or a tensor of images [N, 3, H, W] in [0, 1], class-major like ``labels``."""
    lo, hi = rows
    if isinstance(init, torch.Tensor):
        if init.ndim != 4 or init.shape[0] != len(labels) or init.shape[1] != 3:
            raise ValueError(f"init images must be [{len(labels)}, 3, H, W] (class-major), got {tuple(init.shape)}")
        real = init[lo:hi].float()
    elif init == "noise":
        return make_images(kind, len(labels), resolution, generator=generator, rows=rows, **kw)
    elif init != "real":
        raise ValueError(f"init must be 'noise', 'real' or a tensor of images, got {init!r}")
    elif init_dataset is None:
        raise ValueError("init='real' needs init_dataset (the real training set)")
    else:
        ipc = int((labels == 0).sum())
        sub = data.subset_per_class(init_dataset, ipc, seed=seed)
        order = torch.argsort(sub.targets, stable=True)
        real = data.real_images(sub, order[lo:hi], resolution)  # any size and mode, as the statistics pass sees it
    return make_images(kind, len(labels), resolution, init=real, generator=generator, rows=rows, **kw)


class Snapshots:
    """A ``callback`` for :func:`sfm` that keeps the decoded images after the given step counts."""

    def __init__(self, after_steps: Sequence[int]):
        self.after_steps = set(int(s) for s in after_steps)
        self.images: dict[int, torch.Tensor] = {}

    def __call__(self, step: int, loss: float, images: SyntheticImages) -> None:
        if step + 1 in self.after_steps:
            with torch.no_grad():
                self.images[step + 1] = images.decode().float().cpu()


def _save_checkpoint(path: Path, state: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _load_checkpoint(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt zip, truncated file, foreign pickle
        first = str(err).strip().splitlines()[0][:160] if str(err).strip() else ""
        raise ValueError(f"checkpoint {path} is unreadable ({type(err).__name__}: {first}); delete it to start "
                         f"over, or point --checkpoint elsewhere") from err


def _lr_at(step: int, steps: int, lr: float, schedule: str) -> float:
    """Learning rate of step ``step`` (0-based): constant, or cosine-decayed lr·(1 + cos(π·step/steps))/2."""
    if schedule == "constant":
        return lr
    return lr * 0.5 * (1.0 + math.cos(math.pi * step / max(1, steps)))


def _compiled(backbone: Backbone) -> Backbone:
    """A shallow copy of ``backbone`` whose model is ``torch.compile``-d (the original is left as it is)."""
    if isinstance(backbone, MultiBackbone):
        return MultiBackbone([_compiled(b) for b in backbone.backbones], backbone.crops)
    out = copy.copy(backbone)
    out.model = torch.compile(backbone.model)
    return out


def _differences(saved: dict, now: dict) -> list[str]:
    out = []
    for key in sorted(set(saved) | set(now)):
        a, b = saved.get(key, "(not set)"), now.get(key, "(not set)")
        if a != b:
            out.append(f"{key}: {a!r} in the checkpoint, {b!r} now")
    return out


class Distiller:
    """A prepared run: synthetic images, optimiser, generators, the objective, the memory plan.

    :meth:`step` does one full step (used by the loop and by the cost benchmark); :meth:`run` runs the loop
    with checkpoints, exact resume and the loss read back every ``read_every`` steps."""

    def __init__(self, backbone: Backbone, objective, config: DistillConfig, classes: Sequence[str],
                 init_dataset=None):
        config.check()
        self.config, self.objective, self.backbone = config, objective, backbone
        self.classes = list(classes)
        C, cfg = objective.num_classes, config
        if len(self.classes) != C:
            raise ValueError(f"{len(self.classes)} class names for an objective with {C} classes")
        self.crop, self.lr = cfg.crop_size, cfg.learning_rate
        dev = self.device = backbone.device
        self.labels = torch.arange(C, device=dev).repeat_interleave(cfg.ipc)  # class-major: the layout below
        self.slots = torch.arange(cfg.ipc, device=dev).repeat(C)
        self.layout = ViewLayout(cfg.augs, C, cfg.ipc)
        objective.layout = self.layout  # the labels above are in this order: checked once, for the whole run
        self.num_views = C * cfg.ipc * cfg.augs
        self._views: ViewIndex | None = None  # built at the first step (torchrun is up by then)
        self._planned = False  # the memory plan is made at the first step (also of a resumed run)
        if C < distributed.world_size():
            raise ValueError(f"the views of {C} classes cannot be shared by {distributed.world_size()} "
                             f"processes (each takes whole classes): launch at most {C}")
        blocks = [distributed.block(C, r) for r in range(distributed.world_size())]
        self.row_counts = [(hi - lo) * cfg.ipc for lo, hi in blocks]  # the images each rank owns
        lo, hi = blocks[distributed.rank()]
        self.image_gen = torch.Generator().manual_seed(cfg.seed)
        kw = {"grow_every": cfg.grow_every} if cfg.param == "pyramid" else {}
        self.images = _initial_images(cfg.param, self.labels.cpu(), cfg.resolution, cfg.init, init_dataset,
                                      cfg.seed, self.image_gen, (lo * cfg.ipc, hi * cfg.ipc), **kw).to(dev)
        self.init_dataset = init_dataset
        self.aug_gen = torch.Generator(device=dev).manual_seed(cfg.seed + 1)
        self.opt = self._make_opt()
        self.phi = _compiled(backbone) if cfg.compile else backbone
        self.two_pass: bool | None = cfg.two_pass if cfg.two_pass is not None or dev.type == "cuda" else False
        self.chunk_size: int | None = cfg.chunk_size if cfg.chunk_size is not None or dev.type == "cuda" else 256
        if self.two_pass is False and self.chunk_size is None:
            self.chunk_size = 256

    def _make_opt(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.images.parameters(), lr=self.lr)

    # ------------------------------------------------------------------------------------------ memory
    def fixed_bytes(self) -> int:
        """Bytes this rank holds for the whole run: its rows of the images at their final size (the last
        pyramid level, not the 1×1 of step 0), parameters, gradients and Adam's two moments, 4 · numel · 4 B;
        plus, for an objective with a real batch of B images (LGM), the images and views of its block of them
        (:func:`distributed.block` (B), all B in one process), 2 · (hi − lo) · 3 · crop² · 4 B."""
        params = 4 * self.images.final_numel() * 4
        stream = getattr(self.objective, "stream", None)
        lo, hi = distributed.block(int(getattr(stream, "batch_size", 0)))
        real = 2 * (hi - lo) * 3 * self.crop * self.crop * 4
        return params + real

    def _bytes_per_view(self, probe: int = 4) -> float:
        """Peak CUDA bytes of one view's whole step, from a probe on ``probe`` views of images of the final
        size: decode (every pyramid level), augmentation (crop, flip, noise), preprocessing, φ forward and
        the backward into the image parameters."""
        dev, cfg = self.device, self.config
        kw = {"grow_every": cfg.grow_every} if cfg.param == "pyramid" else {}
        init = torch.rand(probe, 3, cfg.resolution, cfg.resolution, generator=torch.Generator().manual_seed(0))
        images = make_images(cfg.param, probe, cfg.resolution, init=init, **kw).to(dev)  # every level
        params = cfg.augment.sample(probe, torch.Generator(device=dev).manual_seed(0))
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        z = _views(images, self.phi, cfg.augment, params, torch.arange(probe, device=dev), self.crop)
        z.square().sum().backward()
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev) - base
        del images, z
        return peak / probe

    def plan_memory(self) -> tuple[bool, int]:
        """(two_pass, chunk_size) for the whole run. Explicit settings are kept; on CUDA the missing ones
        come from the free memory: one pass when this rank's A·N views fit in 80 % of it after
        :meth:`fixed_bytes` (the final images, gradients and Adam state), else two-pass with the largest
        chunk that fits. An objective with a real forward (LGM) runs it without a graph in chunks of the same
        size. On the CPU: one pass, chunk 256, unless set."""
        if self.two_pass is None or self.chunk_size is None:
            dev = self.device
            free, _ = torch.cuda.mem_get_info(dev)
            budget = max(0.8 * free - self.fixed_bytes(), 0.0)
            per_view = max(self._bytes_per_view(), 1.0)
            torch.cuda.empty_cache()
            lo, hi = distributed.block(self.objective.num_classes)
            views = self.config.augs * self.config.ipc * (hi - lo)  # this rank's share
            if self.two_pass is None:
                self.two_pass = per_view * views > budget
            if self.chunk_size is None:
                self.chunk_size = max(1, min(views, int(budget // per_view)))
        if hasattr(self.objective, "chunk_size"):
            self.objective.chunk_size = self.chunk_size
        return self.two_pass, self.chunk_size

    def _oom_message(self) -> str:
        cfg = self.config
        how = (f"two-pass with chunks of {self.chunk_size} views" if self.two_pass else
               f"one pass over all {self.num_views} views")
        fix = (f"lower the chunk size (chunk_size / --chunk-size, now {self.chunk_size})" if self.two_pass else
               "use two-pass (two_pass=True / --two-pass, memory bounded by --chunk-size)")
        return (f"out of GPU memory in a distillation step ({how}; {cfg.augs} augs × {self.num_views // cfg.augs} "
                f"images). To fit: {fix}, or lower the views per step (augs / --augs, now {cfg.augs}) or the "
                f"images per class (ipc / --ipc, now {cfg.ipc})")

    # -------------------------------------------------------------------------------------------- step
    def step(self, step: int, update: bool = True) -> torch.Tensor:
        """One full step (0-based index ``step``): grow, objective.begin_step, views, loss, backward, Adam
        (``update=False``: no Adam step, as in a bare gradient probe). Returns the loss, a 0-d device tensor."""
        cfg = self.config
        if not self._planned:
            self.plan_memory()
            self._planned = True
        try:
            if self.images.grow(step):
                self.opt = self._make_opt()
            self.objective.begin_step(self.phi)
            params = cfg.augment.sample(self.num_views, self.aug_gen)
            self.opt.zero_grad(set_to_none=True)
            if self._views is None:
                self._views = ViewIndex.of(self.images.num_images, cfg.augs, self.labels, self.slots,
                                           self.objective.num_classes)
            loss = step_gradient(self.images, self.phi, self.objective, cfg.augment, params, self.labels,
                                 self.slots, cfg.augs, self.crop, two_pass=self.two_pass,
                                 chunk_size=self.chunk_size, views=self._views)
            if update:
                for group in self.opt.param_groups:
                    group["lr"] = _lr_at(step, cfg.steps, self.lr, cfg.schedule)
                self.opt.step()
        except torch.OutOfMemoryError as err:
            raise torch.OutOfMemoryError(self._oom_message()) from err
        return loss

    # ------------------------------------------------------------------------------------ checkpoints
    def identity(self) -> dict[str, Any]:
        """Everything that changes the result: a checkpoint of another identity is refused on resume.
        ``steps`` enters only with the cosine schedule (which depends on it), ``grow_every`` only for the
        pyramid; the memory plan (two-pass, chunk size) and ``compile`` do not change the gradient."""
        cfg = self.config
        init = cfg.init if isinstance(cfg.init, str) else f"images:{tensor_hash(torch.as_tensor(cfg.init))}"
        ident = {"method": self.objective.method, "backbone": self.backbone.name, "ipc": cfg.ipc,
                 "resolution": cfg.resolution, "crop": self.crop, "augs": cfg.augs, "lr": self.lr,
                 "schedule": cfg.schedule, "param": cfg.param, "init": init, "seed": cfg.seed,
                 "augment": dataclasses.asdict(cfg.augment)}
        if cfg.param == "pyramid":
            ident["grow_every"] = cfg.grow_every
        if cfg.schedule == "cosine":
            ident["steps"] = cfg.steps
        if cfg.init == "real" and self.init_dataset is not None:
            ident["init_dataset"] = _dataset_identity(self.init_dataset)
        ident.update({f"{self.objective.method}.{k}": v for k, v in self.objective.identity().items()})
        return json_safe(ident)

    def state_dict(self, step: int, history: list[float]) -> dict | None:
        """The checkpoint: the state of every image and the whole Adam state, as one process holds them. Under
        torchrun a collective: each rank sends its rows to rank 0, which gets the state; the others None."""
        def gather(t: torch.Tensor) -> torch.Tensor | None:
            return distributed.gather_rows(t, self.row_counts, dst=0)

        images, opt = _map_rows(self.images.state_dict(), gather), _map_rows(self.opt.state_dict(), gather)
        if not distributed.is_main():
            return None
        return {"version": _CHECKPOINT_VERSION, "identity": self.identity(), "step": step, "history": history,
                "images": images, "optimizer": opt,
                "objective": self.objective.state_dict(), "image_rng": self.image_gen.get_state(),
                "aug_rng": self.aug_gen.get_state().cpu(), "two_pass": self.two_pass,
                "chunk_size": self.chunk_size}

    def load_state_dict(self, state: dict, where: str = "checkpoint") -> tuple[int, list[float]]:
        """Restore a checkpoint of the same run (else ValueError naming each difference); → (step, history)."""
        if state.get("version") != _CHECKPOINT_VERSION or "identity" not in state:
            raise ValueError(f"{where} was written by an older version of sfm_lib (no run identity); delete it "
                             f"to start over")
        diff = _differences(state["identity"], self.identity())
        if diff:
            raise ValueError(f"{where} was made by another run, with other settings: " + "; ".join(diff)
                             + ". Resume with the same settings, or delete the checkpoint to start over")
        lo, hi = self.images.rows  # this rank's rows of the whole set (a copy: the rest is not kept)
        self.images.load_state_dict(_map_rows(state["images"], lambda t: t[lo:hi].clone()))
        self.images.to(self.device)
        self.opt = self._make_opt()
        self.opt.load_state_dict(_map_rows(state["optimizer"], lambda t: t[lo:hi].clone()))
        self.objective.load_state_dict(state.get("objective", {}))
        self.image_gen.set_state(state["image_rng"])
        self.aug_gen.set_state(state["aug_rng"])  # generator states are CPU byte tensors, CUDA ones too
        # the memory plan is made afresh (the free memory of this machine, the final images): never restored
        return int(state["step"]), list(state["history"])

    def _save(self, path: Path, step: int, history: list[float]) -> None:
        """Write the checkpoint of ``step`` (rank 0; under torchrun every rank sends its rows)."""
        state = self.state_dict(step, history)
        if state is not None:
            _save_checkpoint(path, state)

    # --------------------------------------------------------------------------------------------- run
    def run(self, callback: Callable | None = None, desc: str | None = None) -> DistilledSet:
        """The loop. ``callback(step, loss, images)`` after every step (``loss`` a 0-d device tensor; under
        torchrun ``images`` hold this rank's rows)."""
        cfg = self.config
        ckpt = Path(cfg.checkpoint) if cfg.checkpoint else None
        start, history = 0, []
        if cfg.resume and ckpt is not None and ckpt.is_file():
            start, history = self.load_state_dict(_load_checkpoint(ckpt), f"checkpoint {ckpt}")
        elif not cfg.resume and ckpt is not None and ckpt.exists():
            raise FileExistsError(f"checkpoint {ckpt} exists: pass resume=True (--resume) to continue that run, "
                                  f"or delete it to start over")
        if cfg.resume and distributed.world_size() > 1:  # every rank must continue from the same state
            found = distributed.all_reduce_sum(torch.tensor([float(start)], device=self.device))
            if float(found) != start * distributed.world_size():
                raise ValueError(f"under torchrun every rank must read the same checkpoint {ckpt} (found at "
                                 f"step {start} here, not on every rank): put it on a file system all "
                                 f"nodes share")
        buffer = torch.zeros(cfg.read_every, device=self.device)
        pending = []  # step indices whose loss sits in the buffer

        def read_back(bar) -> None:
            if not pending:
                return
            values = buffer[:len(pending)].tolist()  # the one host sync, every read_every steps
            for s, v in zip(pending, values):
                if not math.isfinite(v):
                    kept = (f"the last good checkpoint is kept at {ckpt}" if ckpt and ckpt.is_file()
                            else "no checkpoint")
                    raise FloatingPointError(
                        f"the loss became {v} at step {s} (found when reading back steps {pending[0]}–"
                        f"{pending[-1]}); {kept}. Try a lower lr (now {self.lr}).")
            history.extend(values)
            pending.clear()
            bar.set_postfix(loss=f"{values[-1]:.4f}", refresh=False)

        t0 = time.perf_counter()
        main = distributed.is_main()  # the only rank that shows progress (and writes checkpoints, _save)
        bar = tqdm(range(start, cfg.steps), desc=desc, disable=not cfg.progress or not main, initial=start,
                   total=cfg.steps, mininterval=1.0)
        try:
            for step in bar:
                loss = self.step(step)
                buffer[len(pending)].copy_(loss)
                pending.append(step)
                if callback is not None:
                    callback(step, loss, self.images)
                save = ckpt is not None and (step + 1) % cfg.checkpoint_every == 0
                if save or len(pending) == cfg.read_every or step + 1 == cfg.steps:
                    read_back(bar)
                if save:
                    self._save(ckpt, step + 1, history)
        finally:  # an objective that reads real images stops its loader workers, also on an error
            getattr(self.objective, "close", lambda: None)()
        bar.close()
        read_back(bar)
        if ckpt is not None and cfg.steps > start:
            self._save(ckpt, cfg.steps, history)
        with torch.no_grad():  # every rank's rows, on every rank (the only time images are sent)
            final = distributed.gather_rows(self.images.decode().float(), self.row_counts)
        meta = {**self.identity(), "steps": cfg.steps, "grow_every": cfg.grow_every,
                "init": cfg.init if isinstance(cfg.init, str) else "images",
                "two_pass": self.two_pass, "chunk_size": self.chunk_size, "compile": cfg.compile,
                "levels": getattr(self.images, "num_levels", None),
                "loss_history": history, "time_s": round(time.perf_counter() - t0, 2),
                "num_classes": self.objective.num_classes, "world_size": distributed.world_size()}
        return DistilledSet(final, self.labels.cpu(), self.classes, meta)


def json_safe(value: Any) -> Any:
    """Tuples → lists, recursively (what a JSON or checkpoint round trip gives back), so identities compare."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def run(backbone: Backbone, objective, config: DistillConfig, classes: Sequence[str], *, init_dataset=None,
        callback: Callable | None = None) -> DistilledSet:
    """Distil with ``objective`` under ``config`` (see :class:`Distiller`)."""
    desc = f"{objective.method.upper()} {backbone.name} ipc={config.ipc}"
    return Distiller(backbone, objective, config, classes, init_dataset).run(callback, desc)


def _config(arguments: dict[str, Any]) -> DistillConfig:
    """The checked :class:`DistillConfig` of an entry point's arguments (those named like its fields;
    ``augment=None`` means the default :class:`Augment`)."""
    names = {f.name for f in dataclasses.fields(DistillConfig)}
    config = DistillConfig(**{k: v for k, v in arguments.items() if k in names})
    config.augment = config.augment or Augment()
    config.check()
    return config


def sfm(backbone: Backbone | Sequence[Backbone], stats: ClassStats | Sequence[ClassStats], ipc: int = 1,
        steps: int = 1000, resolution: int = 64, *,
        crop: int | None = None, augs: int = 1, lr: float | None = None, schedule: str = "constant",
        param: str = "pixels", grow_every: int = 200, init: str = "noise", init_dataset=None, loss: str = "flow",
        subclass: bool = False, ema: float = 0.0, augment: Augment | None = None, seed: int = 0,
        two_pass: bool | None = None, chunk_size: int | None = None,
        checkpoint: str | os.PathLike | None = None, checkpoint_every: int = 100, resume: bool = False,
        progress: bool = True, callback=None, compile: bool = False,
        backbone_weights: Sequence[float] | None = None,
        backbone_crops: Sequence[int] | None = None) -> DistilledSet:
    """Distil ``ipc`` images per class by statistical flow matching.

    Each step: x̃ = decode(θ); A = ``augs`` augmented views per image; z = φ(normalise(aug(x̃)));
    L = 1 − cos(vec F̃(z), vec F(μ)); Adam step on θ. The backbone runs in bf16 autocast on CUDA.

    ``loss`` "flow" or "mse"; ``subclass`` matches image j of class c to the j-th k-means centre (needs
    ``stats.centres``); ``ema`` = β ∈ [0, 1): the loss sees the synthetic class means averaged over steps,
    s̄_t = β s̄_{t−1} + (1 − β) s_t, while the gradient flows through the current views (see
    :class:`SFMObjective`); β = 0.7 gives about the accuracy of twice the views per step at the cost of one.
    The other arguments are those of :class:`DistillConfig` (``init_dataset`` for ``init="real"``);
    ``callback(step, loss, images)`` is called after every step (e.g. :class:`Snapshots`).

    Several backbones: ``backbone`` and ``stats`` are lists paired in order (each statistics file checked
    against its backbone). Every backbone sees the same augmented views, each with its own preprocessing,
    at its own input size (``backbone_crops``, default the loop's crop); the loss is the weighted mean
    L = Σ_k w_k L_k / Σ_k w_k of the per-backbone losses (``backbone_weights``, default equal), each with
    its own running average (see :class:`MultiBackbone`, :class:`MultiSFMObjective`). A list of one is
    the single-backbone run.
    """
    if isinstance(backbone, (list, tuple)) or isinstance(stats, (list, tuple)):
        bbs = list(backbone) if isinstance(backbone, (list, tuple)) else [backbone]
        sts = list(stats) if isinstance(stats, (list, tuple)) else [stats]
        if len(bbs) != len(sts):
            raise ValueError(f"{len(bbs)} backbones but {len(sts)} statistics: give one statistics file per "
                             f"backbone, paired in order")
        if len(bbs) > 1 or backbone_weights is not None or backbone_crops is not None:
            return _sfm_multi(bbs, sts, backbone_weights, backbone_crops, ipc=ipc, steps=steps,
                              resolution=resolution, crop=crop, augs=augs, lr=lr, schedule=schedule, param=param,
                              grow_every=grow_every, init=init, init_dataset=init_dataset, loss=loss,
                              subclass=subclass, ema=ema, augment=augment, seed=seed, two_pass=two_pass,
                              chunk_size=chunk_size, checkpoint=checkpoint, checkpoint_every=checkpoint_every,
                              resume=resume, progress=progress, callback=callback, compile=compile)
        backbone, stats = bbs[0], sts[0]
    elif backbone_weights is not None or backbone_crops is not None:
        raise ValueError("backbone_weights and backbone_crops need lists of backbones and statistics")
    stats.check_compatible(backbone)
    config = _config(locals())
    _warn_if_other_size(stats, config.crop_size, "the backbone")
    objective = SFMObjective(stats, backbone.device, loss, subclass, ipc, ema)
    result = run(backbone, objective, config, stats.classes, init_dataset=init_dataset, callback=callback)
    result.meta.update(loss=loss, subclass=subclass, ema=ema, dataset=stats.meta.get("dataset"),
                       stats_resolution=stats.meta.get("resolution"))
    return result


def _warn_if_other_size(stats: ClassStats, size: int, seen_by: str, stacklevel: int = 2) -> None:
    """Warn (at the caller of the entry point) when ``stats`` were extracted at another input size than
    the ``size`` px views ``seen_by`` will see: the features, and so the targets, depend on the size."""
    if stats.meta.get("resolution") not in (None, size):
        warnings.warn(f"statistics were extracted at {stats.meta['resolution']} px but {seen_by} sees {size} px "
                      f"views: features depend on the input size", stacklevel=stacklevel + 1)


def _sfm_multi(backbones: list[Backbone], stats: list[ClassStats], weights: Sequence[float] | None,
               crops: Sequence[int] | None, *, ipc: int, steps: int, resolution: int, crop: int | None,
               augs: int, lr: float | None, schedule: str, param: str, grow_every: int, init, init_dataset,
               loss: str, subclass: bool, ema: float, augment: Augment | None, seed: int,
               two_pass: bool | None, chunk_size: int | None, checkpoint, checkpoint_every: int, resume: bool,
               progress: bool, callback, compile: bool) -> DistilledSet:
    """:func:`sfm` over several backbones (see there)."""
    for k, (bb, st) in enumerate(zip(backbones, stats)):
        try:
            st.check_compatible(bb)
        except ValueError as err:
            raise ValueError(f"statistics {k + 1} (paired with backbone {k + 1}, {bb.name}): {err}") from None
    if len({tuple(st.classes) for st in stats}) != 1:
        raise ValueError("the statistics files hold different classes: they must come from one dataset")
    config = _config(locals())
    phi = MultiBackbone(backbones, None if crops is None else [None if c is None else int(c) for c in crops])
    sizes = [c or config.crop_size for c in phi.crops]  # MultiBackbone checked one crop per backbone
    for bb, st, size in zip(backbones, stats, sizes):
        _warn_if_other_size(st, size, bb.name, stacklevel=3)
    objective = MultiSFMObjective([SFMObjective(st, phi.device, loss, subclass, ipc, ema) for st in stats],
                                  phi.dims, weights, phi.names, sizes)
    result = run(phi, objective, config, stats[0].classes, init_dataset=init_dataset, callback=callback)
    result.meta.update(loss=loss, subclass=subclass, ema=ema, dataset=stats[0].meta.get("dataset"),
                       backbones=phi.names, backbone_weights=objective.weights, backbone_crops=sizes,
                       stats_resolution=[st.meta.get("resolution") for st in stats])
    return result


def lgm(backbone: Backbone, dataset, ipc: int = 1, steps: int = 1000, resolution: int = 64, *,
        crop: int | None = None, augs: int = 10, lr: float | None = None, schedule: str = "constant",
        param: str = "pixels", grow_every: int = 200, init: str = "noise", init_dataset=None,
        head_std: float = 0.01, balanced: bool = False, augment: Augment | None = None, seed: int = 0,
        two_pass: bool | None = None, chunk_size: int | None = None,
        checkpoint: str | os.PathLike | None = None, checkpoint_every: int = 100, resume: bool = False,
        progress: bool = True, callback=None, compile: bool = False) -> DistilledSet:
    """Distil ``ipc`` images per class of ``dataset`` (the real training set) by linear gradient matching.

    Each step (see :class:`LGMObjective`): a fresh head W ~ N(0, ``head_std``²), b = 0; a real batch of
    ipc·A·C images (shuffled; ``balanced``: class-balanced), each augmented once; A = ``augs`` views of every
    synthetic image; L = 1 − cos(vec ∂CE_real/∂(W,b), vec ∂CE_syn/∂(W,b)); Adam step on the images. The real
    and synthetic views share ``augment``. ``init="real"`` draws from ``init_dataset`` (default ``dataset``).
    The other arguments are those of :class:`DistillConfig`.
    """
    config = _config(locals())
    objective = LGMObjective(dataset, backbone, ipc=ipc, augs=augs, resolution=resolution, crop=crop,
                             augment=config.augment, head_std=head_std, balanced=balanced, seed=seed)
    result = run(backbone, objective, config, dataset.classes, callback=callback,
                 init_dataset=dataset if init_dataset is None else init_dataset)
    result.meta.update(head_std=head_std, balanced=balanced, dataset=getattr(dataset, "name", None))
    return result
