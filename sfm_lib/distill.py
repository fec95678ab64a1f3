"""Distillation loops (SFM; LGM in the same framework) and the :class:`DistilledSet` they return."""
from __future__ import annotations

import dataclasses
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from . import data, flow
from .augment import Augment, AugmentParams
from .backbones import Backbone
from .images import SyntheticImages, make_images
from .progress import tqdm
from .stats import ClassStats
from .utils import atomic_path, load_tensors, save_tensors

__all__ = ["DistilledSet", "SFMObjective", "Snapshots", "sfm", "step_gradient", "gradient_agreement", "DEFAULT_LR"]


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


# ------------------------------------------------------------------------------------------- objectives
class SFMObjective:
    """L = 1 − cos(vec F̃, vec F) with F the real flow of the class means and F̃ that of the synthetic
    features (per-class mean first). ``loss="mse"``: the decoupled ablation, MSE to the class means.
    ``subclass=True``: image j of class c is matched to the j-th k-means centre of class c (see
    :func:`sfm_lib.flow.subclass_real_flow`). ``ema`` = β > 0: the synthetic statistic (class means, or
    per-(class, slot) means) enters the loss as a running average over calls with the gradient of the
    current call (:func:`sfm_lib.flow.straight_through_ema`); the average is in :meth:`state_dict`."""

    def __init__(self, stats: ClassStats, device: torch.device, loss: str = "flow", subclass: bool = False,
                 ipc: int = 1, ema: float = 0.0):
        if loss not in ("flow", "mse"):
            raise ValueError(f"loss must be 'flow' or 'mse', got {loss!r}")
        if not 0.0 <= ema < 1.0:
            raise ValueError(f"ema must lie in [0, 1) (0: off), got {ema}")
        self.C, self.loss, self.subclass, self.ipc, self.ema = stats.num_classes, loss, subclass, ipc, ema
        self.running: torch.Tensor | None = None
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

    def __call__(self, z: torch.Tensor, labels: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        if self.subclass:
            stat = flow.subclass_means(z, labels, slots, self.C, self.ipc)
        else:
            stat = flow.class_means(z, labels, self.C)
        if self.ema:
            stat, self.running = flow.straight_through_ema(stat, self.running, self.ema)
        if self.loss == "mse":
            return flow.decoupled_loss(stat, self.means)
        if self.subclass:
            return flow.sfm_loss(flow.subclass_real_flow(stat.mean(1), stat), self.target)
        return flow.sfm_loss(flow.real_flow(stat), self.target)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The running average (empty before the first call or with ``ema`` = 0)."""
        return {} if self.running is None else {"running": self.running.detach().cpu()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        running = state.get("running")
        self.running = None if running is None else running.to(self.means.device)


# ------------------------------------------------------------------------------------------------- loop
DEFAULT_LR = {"pixels": 0.05, "pyramid": 0.01}


def _views(images: SyntheticImages, backbone: Backbone, augment: Augment, params: AugmentParams,
           image_idx: torch.Tensor, crop: int, rows: list[torch.Tensor] | None = None) -> torch.Tensor:
    """φ(normalise(aug(decode(images)[image_idx]))) for one chunk of views → [M, D]."""
    x = images.decode(rows) if rows is not None else images.decode()[image_idx]
    return backbone(backbone.preprocess(augment.apply(x, params, crop), crop))


def step_gradient(images: SyntheticImages, backbone: Backbone, objective, augment: Augment,
                  params: AugmentParams, labels: torch.Tensor, slots: torch.Tensor, augs: int, crop: int,
                  two_pass: bool = False, chunk_size: int = 256) -> float:
    """Compute the loss of one step and accumulate its gradient into ``images``' parameters.

    Views are ordered copy-major: view v shows image v mod N under augmentation ``params[v]``.

    One pass: decode → augment → φ → loss → backward (the graph holds every view's activations).
    Two passes (memory does not grow with the number of views): (1) features z of all views without a
    graph, chunk by chunk; g = ∂L/∂z. (2) for each chunk, re-decode just its images from parameter
    rows that are their own autograd leaves, redo the same augmentation and forward, and backpropagate
    z_chunk·g_chunk; the row gradients are index-added into the parameters' gradients. The crops are
    identical in both passes (per-image noise seeds), so the gradient equals the one-pass gradient.
    """
    n = images.num_images
    view_img = torch.arange(n * augs, device=labels.device) % n
    view_labels, view_slots = labels[view_img], slots[view_img]
    if not two_pass:
        z = _views(images, backbone, augment, params, view_img, crop)
        loss = objective(z, view_labels, view_slots)
        loss.backward()
        return loss.item()
    chunks = [torch.arange(s, min(s + chunk_size, n * augs), device=labels.device)
              for s in range(0, n * augs, chunk_size)]
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
    return loss.item()


def _initial_images(kind: str, labels: torch.Tensor, resolution: int, init, init_dataset, seed: int,
                    generator: torch.Generator, **kw) -> SyntheticImages:
    """``init``: "noise"; "real" (``ipc`` random real images per class of ``init_dataset``, drawn by
    ``seed``); or a tensor of images [N, 3, H, W] in [0, 1], class-major like ``labels``."""
    if isinstance(init, torch.Tensor):
        if init.ndim != 4 or init.shape[0] != len(labels) or init.shape[1] != 3:
            raise ValueError(f"init images must be [{len(labels)}, 3, H, W] (class-major), got {tuple(init.shape)}")
        real = init.float()
    elif init == "noise":
        return make_images(kind, len(labels), resolution, generator=generator, **kw)
    elif init != "real":
        raise ValueError(f"init must be 'noise', 'real' or a tensor of images, got {init!r}")
    elif init_dataset is None:
        raise ValueError("init='real' needs init_dataset (the real training set)")
    else:
        ipc = int((labels == 0).sum())
        sub = data.subset_per_class(init_dataset, ipc, seed=seed)
        order = torch.argsort(sub.targets, stable=True)
        real = torch.stack([sub[int(i)][0] for i in order])
    return make_images(kind, len(labels), resolution, init=real, generator=generator, **kw)


class Snapshots:
    """A ``callback`` for :func:`sfm` that keeps the decoded images after the given step counts."""

    def __init__(self, after_steps: Sequence[int]):
        self.after_steps = set(int(s) for s in after_steps)
        self.images: dict[int, torch.Tensor] = {}

    def __call__(self, step: int, loss: float, images: SyntheticImages) -> None:
        if step + 1 in self.after_steps:
            with torch.no_grad():
                self.images[step + 1] = images.decode().float().cpu()


def gradient_agreement(backbone: Backbone, stats: ClassStats, images: torch.Tensor, labels: torch.Tensor,
                       augment: Augment, resolution: int, *, draws: int = 64, augs: Sequence[int] = (1, 2, 4),
                       betas: Sequence[float] = (0.7, 0.9), warmup: int = 10, seed: int = 0) -> dict[str, torch.Tensor]:
    """How well the loss gradient ∂L/∂s from a few views points like the one at the expected features.

    For fixed ``images`` [N, 3, H, W] (class-major ``labels``), s⁽ᵏ⁾, k = 1 … ``draws``, are the class means of
    one augmented view per image, and s* = mean_k s⁽ᵏ⁾ stands for E_aug. Estimators of s: the mean of A
    consecutive draws (key ``"A=…"``), and the running average s̄_k = β s̄_{k−1} + (1 − β) s⁽ᵏ⁾ along the draws
    (key ``"ema β=…"``, from draw ``warmup`` on; the images do not move here, so it has no lag). Returns, per
    estimator, the cosines cos(∂L/∂s at the estimate, ∂L/∂s at s*) with L the class-level flow loss.
    """
    if draws < max(max(augs), warmup + 1):
        raise ValueError(f"draws={draws} must exceed warmup={warmup} and cover the largest A={max(augs)}")
    target = flow.real_flow(stats.means.double()).to(backbone.device)
    labels = labels.to(backbone.device)
    gen = torch.Generator(device=backbone.device).manual_seed(seed)
    x = images.to(backbone.device)
    with torch.no_grad():
        draw = torch.stack([flow.class_means(backbone(backbone.preprocess(augment(x, resolution, gen), resolution)),
                                             labels, stats.num_classes) for _ in range(draws)]).double()

    def grad_at(s: torch.Tensor) -> torch.Tensor:
        s = s.detach().clone().requires_grad_(True)
        (g,) = torch.autograd.grad(flow.sfm_loss(flow.real_flow(s), target), s)
        return g.flatten()

    reference = grad_at(draw.mean(0))

    def cosines(estimates: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack([torch.nn.functional.cosine_similarity(grad_at(e), reference, dim=0) for e in estimates])

    out = {f"A={a}": cosines([draw[k:k + a].mean(0) for k in range(0, draws - a + 1, a)]) for a in augs}
    for beta in betas:
        running, estimates = None, []
        for k in range(draws):
            _, running = flow.straight_through_ema(draw[k], running, beta)
            if k >= warmup:
                estimates.append(running)
        out[f"ema β={beta}"] = cosines(estimates)
    return {k: v.float().cpu() for k, v in out.items()}


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


def sfm(backbone: Backbone, stats: ClassStats, ipc: int = 1, steps: int = 1000, resolution: int = 64, *,
        crop: int | None = None, augs: int = 1, lr: float | None = None, schedule: str = "constant",
        param: str = "pixels",
        grow_every: int = 200, init: str = "noise", init_dataset=None, loss: str = "flow",
        subclass: bool = False, ema: float = 0.0, augment: Augment | None = None, seed: int = 0,
        two_pass: bool = False,
        chunk_size: int = 256, checkpoint: str | os.PathLike | None = None, checkpoint_every: int = 100,
        resume: bool = False, progress: bool = True, callback=None) -> DistilledSet:
    """Distil ``ipc`` images per class by statistical flow matching.

    Each step: x̃ = decode(θ); A = ``augs`` augmented views per image; z = φ(normalise(aug(x̃)));
    L = 1 − cos(vec F̃(z), vec F(μ)); Adam step on θ. The backbone runs in bf16 autocast on CUDA.

    ``param`` "pixels" or "pyramid" (levels added every ``grow_every`` steps, Adam re-created then);
    ``init`` "noise", "real" (random real images of ``init_dataset``) or a tensor of start images
    (class-major, e.g. the real images nearest each class mean); ``loss`` "flow" or "mse";
    ``subclass`` matches image j of class c to the j-th k-means centre (needs ``stats.centres``).
    ``ema`` = β ∈ [0, 1): the loss sees the synthetic class means averaged over steps, s̄_t = β s̄_{t−1} +
    (1 − β) s_t, while the gradient flows through the current views (see :class:`SFMObjective`); β = 0.7
    gives about the accuracy of twice the views per step at the cost of one.
    ``two_pass``: memory-bounded backward (see :func:`step_gradient`), same gradient.
    ``checkpoint``: written atomically every ``checkpoint_every`` steps and at the end (images, optimizer,
    every RNG state, step, loss history); ``resume=True`` continues from it and ends with exactly the
    images of an uninterrupted run. ``callback(step, loss, images)`` is called after every step (e.g.
    :class:`Snapshots`).
    """
    if ipc < 1:
        raise ValueError(f"ipc must be ≥ 1, got {ipc}")
    if schedule not in ("constant", "cosine"):
        raise ValueError(f"schedule must be 'constant' or 'cosine', got {schedule!r}")
    if steps < 0 or augs < 1 or chunk_size < 1 or checkpoint_every < 1:
        raise ValueError(f"need steps ≥ 0, augs ≥ 1, chunk_size ≥ 1, checkpoint_every ≥ 1 "
                         f"(got {steps}, {augs}, {chunk_size}, {checkpoint_every})")
    stats.check_compatible(backbone)
    crop = crop or resolution
    if stats.meta.get("resolution") not in (None, crop):
        warnings.warn(f"statistics were extracted at {stats.meta['resolution']} px but the backbone sees "
                      f"{crop} px views: features depend on the input size", stacklevel=2)
    lr = DEFAULT_LR.get(param, 0.01) if lr is None else lr
    augment = augment or Augment()
    dev = backbone.device
    C = stats.num_classes
    labels = torch.arange(C, device=dev).repeat_interleave(ipc)
    slots = torch.arange(ipc, device=dev).repeat(C)
    objective = SFMObjective(stats, dev, loss, subclass, ipc, ema)
    config = {"method": "sfm", "backbone": backbone.name, "ipc": ipc, "steps": steps, "resolution": resolution,
              "crop": crop, "augs": augs, "lr": lr, "schedule": schedule, "param": param, "grow_every": grow_every,
              "init": "images" if isinstance(init, torch.Tensor) else init, "loss": loss, "subclass": subclass,
              "ema": ema, "seed": seed, "augment": dataclasses.asdict(augment), "two_pass": two_pass,
              "dataset": stats.meta.get("dataset"), "stats_resolution": stats.meta.get("resolution")}

    image_gen = torch.Generator().manual_seed(seed)
    kw = {"grow_every": grow_every} if param == "pyramid" else {}
    images = _initial_images(param, labels.cpu(), resolution, init, init_dataset, seed, image_gen, **kw).to(dev)
    aug_gen = torch.Generator(device=dev).manual_seed(seed + 1)
    make_opt = lambda: torch.optim.Adam(images.parameters(), lr=lr)  # noqa: E731
    opt, start, history = make_opt(), 0, []

    ckpt = Path(checkpoint) if checkpoint else None
    if resume and ckpt is not None and ckpt.is_file():
        state = _load_checkpoint(ckpt)
        keys = ("ipc", "resolution", "crop", "param", "loss", "subclass", "ema", "seed", "backbone", "augs", "lr",
                "schedule", "init")
        saved = {"ema": 0.0, **state["config"]}  # checkpoints from before the ema option ran without it
        diff = {k: (saved.get(k), config[k]) for k in keys if saved.get(k) != config[k]}
        if diff:
            raise ValueError(f"checkpoint {ckpt} was made with other settings (saved, now): {diff}")
        images.load_state_dict(state["images"])
        images.to(dev)
        opt = make_opt()
        opt.load_state_dict(state["optimizer"])
        objective.load_state_dict(state.get("objective", {}))
        image_gen.set_state(state["image_rng"])
        aug_gen.set_state(state["aug_rng"])  # generator states are CPU byte tensors, CUDA ones too
        start, history = int(state["step"]), list(state["history"])
    elif resume and ckpt is None:
        raise ValueError("resume=True needs a checkpoint path")
    elif not resume and ckpt is not None and ckpt.exists():
        raise FileExistsError(f"checkpoint {ckpt} exists: pass resume=True (--resume) to continue that run, "
                              f"or delete it to start over")

    def snapshot(step: int) -> dict:
        return {"config": config, "step": step, "history": history, "images": images.state_dict(),
                "optimizer": opt.state_dict(), "objective": objective.state_dict(),
                "image_rng": image_gen.get_state(), "aug_rng": aug_gen.get_state().cpu()}

    t0 = time.perf_counter()
    bar = tqdm(range(start, steps), desc=f"SFM {backbone.name} ipc={ipc}", disable=not progress,
               initial=start, total=steps, mininterval=1.0)
    for step in bar:
        if images.grow(step):
            opt = make_opt()
        params = augment.sample(len(labels) * augs, aug_gen)
        opt.zero_grad(set_to_none=True)
        value = step_gradient(images, backbone, objective, augment, params, labels, slots, augs, crop,
                              two_pass=two_pass, chunk_size=chunk_size)
        if not math.isfinite(value):
            kept = f"the last good checkpoint is kept at {ckpt}" if ckpt and ckpt.is_file() else "no checkpoint"
            raise FloatingPointError(f"the loss became {value} at step {step}; {kept}. Try a lower lr "
                                     f"(now {lr}).")
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, steps, lr, schedule)
        opt.step()
        history.append(value)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{value:.4f}", refresh=False)
        if callback is not None:
            callback(step, value, images)
        if ckpt is not None and (step + 1) % checkpoint_every == 0:
            _save_checkpoint(ckpt, snapshot(step + 1))
    bar.close()
    if ckpt is not None and steps > start:
        _save_checkpoint(ckpt, snapshot(steps))
    with torch.no_grad():
        final = images.decode().float().cpu()
    meta = {**config, "loss_history": history, "time_s": round(time.perf_counter() - t0, 2),
            "num_classes": C}
    return DistilledSet(final, labels.cpu(), list(stats.classes), meta)
