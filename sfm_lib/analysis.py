"""Diagnostics the chapters plot: how the LGM head gradient relates to the flow, and how each method's
image gradient turns from one step to the next.

**The LGM gradient is a flow (method.md §3).** A linear head z = W h + b on features h ∈ R^D, C classes,
p = softmax(z), cross-entropy averaged over a batch {(h_i, y_i)}_{i=1..N}:

    G = ∂CE/∂W = (1/N) Σ_i (p_i − e_{y_i}) h_iᵀ,      row c:  g_c = (1/N) Σ_i p_{ic} h_i − (n_c/N) μ̂_c,

with μ̂_c the batch mean of class c and n_c its count. At W = 0, b = 0 the softmax is uniform, p_{ic} = 1/C.
For a class-balanced batch (n_c = N/C) Σ_i h_i / N = μ̄̂ (the mean of the batch's class means), so

    g_c = (1/C)(μ̄̂ − μ̂_c) = (C−1)/C² · f̂_c,      f̂_c = mean_{k≠c} μ̂_k − μ̂_c = C/(C−1)(μ̄̂ − μ̂_c),

i.e. G = +(C−1)/C² · F̂: the head gradient points *along* the flow matrix F̂ of the batch (gradient
descent on W moves it along −F̂, towards the centred class means). The bias gradient Σ_i (p_i − e_{y_i})/N
is 0 there. LGM therefore matches a flow estimated on one real batch ("local"); SFM matches the flow F of
the class means of the whole training set ("global"). :func:`lgm_flow_cosine` measures cos(vec G, vec F)
as the head's standard deviation σ and the batch size move away from this ideal.

**Local versus global, measured.** :func:`step_to_step_cosine` takes, for each method, a callable that
returns the loss of one step on fixed images x with that step's fresh randomness (augmentations; for LGM
also the head and the real batch), and reports cos(∂L_t/∂x, ∂L_{t+1}/∂x) between consecutive steps.

**Few views against the expectation (chapter 2).** :func:`gradient_agreement` compares the flow-loss
gradient with respect to the synthetic class means at an estimate from A views, or at a running average,
with the gradient at the mean over many views.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Mapping, Sequence

import torch
from torch import Tensor

from . import flow
from .augment import Augment
from .backbones import Backbone
from .stats import ClassStats

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["head_gradient", "lgm_flow_cosine", "ImageLoss", "image_loss", "step_to_step_cosine",
           "gradient_agreement"]

ImageLoss = Callable[[Tensor, torch.Generator], Tensor]
"""One step's loss as a function of the images x [N, 3, H, W] in [0, 1] and a generator that supplies
all of that step's randomness; differentiable w.r.t. x."""


def _cos(a: Tensor, b: Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return float((a @ b) / (a.norm() * b.norm()).clamp_min(1e-300))


def head_gradient(features: Tensor, labels: Tensor, weight: Tensor, bias: Tensor | None = None,
                  chunk_size: int = 8192) -> tuple[Tensor, Tensor]:
    """Closed-form gradient of the mean cross-entropy of a linear head, in float64 (the LGM objective takes
    the same gradient by autograd, :func:`sfm_lib.objectives.head_gradient`; this one is exact in float64,
    streams any number of rows and takes many heads at once).

    With p_i = softmax(W h_i + b) and Y the one-hot labels: ∂CE/∂W = (1/N) (P − Y)ᵀ H ∈ R^{C×D} and
    ∂CE/∂b = (1/N) Σ_i (p_i − e_{y_i}) ∈ R^C, for ``features`` H [N, D], ``labels`` [N], ``weight`` W [C, D]
    or a stack of K heads [K, C, D], ``bias`` b [C] / [K, C] (None: 0). Rows are processed ``chunk_size``
    at a time, so N may be a whole split. Returns (∂CE/∂W, ∂CE/∂b), shaped like (``weight``, b).
    """
    single = weight.dim() == 2
    w = (weight.unsqueeze(0) if single else weight).double().to(features.device)
    if features.dim() != 2 or w.dim() != 3 or features.shape[1] != w.shape[2]:
        raise ValueError(f"need features [N, D] and weight [C, D] or [K, C, D], got {tuple(features.shape)} "
                         f"and {tuple(weight.shape)}")
    K, C = w.shape[:2]
    labels = flow._check_labels(labels, features.shape[0], C)
    b = torch.zeros(K, C, dtype=torch.float64, device=features.device) if bias is None else \
        bias.double().to(features.device).reshape(-1, C).expand(K, C)
    gw, gb = torch.zeros_like(w), torch.zeros_like(b)
    for start in range(0, features.shape[0], chunk_size):
        h = features[start:start + chunk_size].double()
        r = torch.softmax(torch.einsum("nd,kcd->knc", h, w) + b[:, None], dim=2)  # [K, n, C]
        r[:, torch.arange(len(h)), labels[start:start + chunk_size]] -= 1.0
        gw += torch.einsum("knc,nd->kcd", r, h)
        gb += r.sum(1)
    n = max(1, features.shape[0])
    gw, gb = gw / n, gb / n
    return (gw[0], gb[0]) if single else (gw, gb)


def _class_means64(features: Tensor, labels: Tensor, num_classes: int, chunk_size: int = 8192) -> Tensor:
    """Per-class means in float64, converting ``chunk_size`` rows at a time (a whole split stays float32)."""
    sums = torch.zeros(num_classes, features.shape[1], dtype=torch.float64, device=features.device)
    for start in range(0, features.shape[0], chunk_size):
        sums.index_add_(0, labels[start:start + chunk_size], features[start:start + chunk_size].double())
    counts = torch.bincount(labels, minlength=num_classes)
    if (counts == 0).any():
        raise ValueError(f"classes without any sample: {(counts == 0).nonzero().flatten().tolist()}")
    return sums / counts.double().unsqueeze(1)


def _balanced_batch(labels: Tensor, num_classes: int, per_class: int, gen: torch.Generator) -> Tensor:
    """Indices of ``per_class`` random images of every class (without replacement)."""
    idx = []
    for c in range(num_classes):
        rows = (labels == c).nonzero().flatten()
        if len(rows) < per_class:
            raise ValueError(f"class {c} has {len(rows)} images, fewer than images_per_class={per_class}")
        idx.append(rows[torch.randperm(len(rows), generator=gen)[:per_class]])
    return torch.cat(idx)


def lgm_flow_cosine(features: Tensor, labels: Tensor, num_classes: int, *, means: Tensor | None = None,
                    sigmas: Sequence[float] = (0.0, 1e-3, 1e-2, 1e-1),
                    images_per_class: Sequence[int] = (1, 3, 10, 100, 0), draws: int = 8,
                    seed: int = 0) -> "pd.DataFrame":
    """cos(vec G, vec F): the LGM head gradient on a real batch against the global real flow.

    G = ∂CE/∂W (:func:`head_gradient`) for a head W ~ N(0, σ²) (entrywise), b = 0, on a class-balanced batch
    of ``images_per_class`` random images per class (0: the whole of ``features``, every image once).
    F = ``flow.real_flow(means)``, ``means`` defaulting to the class means of all of ``features``. The
    orientation is G ∝ +F (see the module docstring), so the cosine is +1 at σ = 0 on the whole split
    (class-balanced), and a cosine near 1 means "G points along the flow".

    Each (σ, batch size) pair is drawn ``draws`` times (a new batch and a new head each time; the whole
    split is the same batch every time). Returns one row per draw: ``sigma``, ``images_per_class`` (for the
    whole split, the mean count per class), ``whole_split``, ``draw``, ``cosine`` = cos(G, F) and
    ``cosine_batch_flow`` = cos(G, F̂), F̂ the flow of the batch's own class means.
    """
    import pandas as pd

    if draws < 1:
        raise ValueError(f"draws must be ≥ 1, got {draws}")
    labels = flow._check_labels(labels, features.shape[0], num_classes)
    if means is None:
        means = _class_means64(features, labels, num_classes)
    target = flow.real_flow(means.double().to(features.device))
    gen = torch.Generator().manual_seed(seed)
    rows = []
    C, D = num_classes, features.shape[1]
    for k in images_per_class:
        if k < 0:
            raise ValueError(f"images_per_class must be ≥ 1 (or 0 for the whole split), got {k}")
        # the whole split is one batch: its heads of every draw go through one streaming pass
        batches = [(range(draws), None)] if k == 0 else [
            ([d], _balanced_batch(labels.cpu(), C, k, gen).to(features.device)) for d in range(draws)]
        for ds, idx in batches:
            h = features if idx is None else features[idx]
            y = labels if idx is None else labels[idx]
            batch_flow = flow.real_flow(_class_means64(h, y, C))
            heads = [(d, float(sigma)) for d in ds for sigma in sigmas]
            w = torch.stack([sigma * torch.randn(C, D, generator=gen, dtype=torch.float64)
                             for _, sigma in heads])
            g, _ = head_gradient(h, y, w.to(features.device))
            for (d, sigma), gk in zip(heads, g):
                rows.append({"sigma": sigma, "images_per_class": k or len(labels) / C,
                             "whole_split": k == 0, "draw": d, "cosine": _cos(gk, target),
                             "cosine_batch_flow": _cos(gk, batch_flow)})
    return pd.DataFrame(rows)


def image_loss(objective, backbone: Backbone, labels: Tensor, augment: Augment, crop: int,
               augs: int = 1) -> ImageLoss:
    """One distillation step's loss as an :data:`ImageLoss`, for any objective of the loop
    (:class:`sfm_lib.objectives.SFMObjective`, :class:`~sfm_lib.objectives.LGMObjective`).

    ``objective.begin_step(backbone)`` draws what the objective needs (LGM: a head W ~ N(0, σ²) and an
    augmented real batch, from the objective's own generator; SFM: nothing); then ``augs`` views per
    image, copy-major, are drawn by ``augment`` from the step's generator, z = φ(normalise(aug(x))), and
    the loss is ``objective(z, labels, slots)`` (slot = the image's rank within its class). ``labels`` [N]
    are the images' classes; the generator must live on the backbone's device."""
    labels = labels.long().cpu()
    seen: dict[int, int] = {}
    slots = []
    for y in labels.tolist():
        slots.append(seen.get(y, 0))
        seen[y] = slots[-1] + 1
    idx = torch.arange(len(labels) * augs) % len(labels)
    view_labels = labels[idx].to(backbone.device)
    view_slots = torch.tensor(slots)[idx].to(backbone.device)

    def loss(images: Tensor, gen: torch.Generator) -> Tensor:
        if images.shape[0] != len(labels):
            raise ValueError(f"{images.shape[0]} images for {len(labels)} labels")
        objective.begin_step(backbone)
        views = augment.apply(images[idx.to(images.device)], augment.sample(len(idx), gen), crop)
        z = backbone(backbone.preprocess(views, crop))
        return objective(z, view_labels, view_slots)

    return loss


def step_to_step_cosine(losses: Mapping[str, ImageLoss], images: Tensor, steps: int = 8,
                        seed: int = 0, device: torch.device | str | None = None) -> "pd.DataFrame":
    """How much each method's image gradient turns from one step to the next, at fixed images.

    For each method m and steps t = 0 … ``steps``−1, g_t = ∂L_t/∂x at the same ``images`` x, L_t the
    method's loss with step t's randomness (one generator seeded with ``seed`` per method, consumed in
    order, so step t+1 has fresh draws). Returns one row per (method, t < steps−1): ``method``, ``step`` t,
    ``cosine_next`` = cos(vec g_t, vec g_{t+1}) and ``cosine_mean`` = cos(vec g_t, vec ḡ), ḡ the mean of
    the ``steps`` gradients (how well one step points along the average direction).
    """
    import pandas as pd

    if steps < 2:
        raise ValueError(f"steps must be ≥ 2 (a cosine needs two consecutive gradients), got {steps}")
    device = torch.device(device) if device is not None else images.device
    rows = []
    for name, loss_fn in losses.items():
        gen = torch.Generator(device=device).manual_seed(seed)
        grads = []
        for _ in range(steps):
            x = images.detach().to(device).clone().requires_grad_(True)
            (g,) = torch.autograd.grad(loss_fn(x, gen), x)
            grads.append(g.detach().double().flatten().cpu())
        mean = torch.stack(grads).mean(0)
        for t in range(steps - 1):
            rows.append({"method": name, "step": t, "cosine_next": _cos(grads[t], grads[t + 1]),
                         "cosine_mean": _cos(grads[t], mean)})
    return pd.DataFrame(rows)


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
