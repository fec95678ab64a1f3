"""Statistical flows between class means and the SFM loss (method.md §3).

Notation: C classes, feature dim D, μ_c the mean feature of class c and μ̄ = (1/C) Σ_k μ_k.

Real flow of class c (the direction from μ_c to the mean of the *other* classes)::

    f_c = (1/(C−1)) Σ_{k≠c} μ_k − μ_c  =  C/(C−1) · (μ̄ − μ_c)

so F = [f_1 … f_C] is the centred class-mean matrix, negated and scaled by C/(C−1).

The synthetic flow F̃ is the same map applied to the per-class means s_c of synthetic features.
The loss is ``L = 1 − cos(vec F̃, vec F)``, one cosine over the whole flattened matrix. Because F̃
only depends on differences of class means, L is invariant to a global shift s_c → s_c + v (same
v for every class) and, being a cosine, to a positive global scale s_c → a·s_c with a > 0 (a < 0
flips F̃ and turns L into 2 − L).

Sub-class targets (an extension for IPC > 1): class c gets K centres z_{c,k} and each synthetic
image of class c is tied to a slot k. Its target is f_{c,k} = mean_{c'≠c} μ_{c'} − z_{c,k}; when
the centres of class c average to μ_c, mean_k f_{c,k} = f_c.

Smoothed synthetic statistics (an option of the distillation loop): a step sees A augmented views per
image, so s_c is a noisy A-view estimate of the expected feature E_aug φ(aug(x̃_c)), and ∂L/∂s evaluated
at a noisy s points the wrong way. :func:`straight_through_ema` evaluates the loss at a running average
s̄_t = β s̄_{t−1} + (1 − β) s_t over steps while the gradient still flows through the current views.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "class_means",
    "real_flow",
    "synthetic_flow",
    "sfm_loss",
    "decoupled_loss",
    "subclass_means",
    "subclass_real_flow",
    "subclass_synthetic_flow",
    "straight_through_ema",
]


def _check_labels(labels: Tensor, n: int, num_classes: int, name: str = "labels") -> Tensor:
    if labels.dim() != 1 or labels.shape[0] != n:
        raise ValueError(f"{name} must have shape [{n}], got {tuple(labels.shape)}")
    labels = labels.long()
    if n and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"{name} must lie in [0, {num_classes}), got range "
                         f"[{int(labels.min())}, {int(labels.max())}]")
    return labels


def class_means(features: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """Per-class mean μ_c = (1/n_c) Σ_{i: y_i=c} x_i of ``features`` [N, D] → [C, D].

    Differentiable w.r.t. ``features``. Raises ValueError naming the classes with no sample.
    """
    if features.dim() != 2:
        raise ValueError(f"features must be [N, D], got {tuple(features.shape)}")
    labels = _check_labels(labels, features.shape[0], num_classes)
    sums = features.new_zeros(num_classes, features.shape[1]).index_add(0, labels, features)
    counts = torch.bincount(labels, minlength=num_classes)
    empty = (counts == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"classes without any sample: {empty}")
    return sums / counts.to(features.dtype).unsqueeze(1)


def _other_means(means: Tensor) -> Tensor:
    """m_c = (1/(C−1)) Σ_{k≠c} μ_k for ``means`` [C, D]; requires C ≥ 2."""
    if means.dim() != 2:
        raise ValueError(f"means must be [C, D], got {tuple(means.shape)}")
    c = means.shape[0]
    if c < 2:
        raise ValueError(f"a flow needs at least 2 classes, got C={c}")
    return (means.sum(0, keepdim=True) - means) / (c - 1)


def real_flow(means: Tensor) -> Tensor:
    """Flow matrix F [C, D] with f_c = mean_{k≠c} μ_k − μ_c = C/(C−1)·(μ̄ − μ_c)."""
    return _other_means(means) - means


def synthetic_flow(features: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """F̃ = real_flow(s) with s_c the per-class mean of ``features`` [N, D].

    Averaging per class first makes IPC > 1 (and unequal counts) correct: the non-target term is
    a mean over the C−1 other *classes*, not over the C·IPC−1 other images.
    """
    return real_flow(class_means(features, labels, num_classes))


def _cosine(a: Tensor, b: Tensor, eps: float = 1e-12) -> Tensor:
    """cos(vec a, vec b) = <a, b> / max(‖a‖·‖b‖, eps), computed in at least float32 and clamped to [−1, 1]
    (rounding can push it just past ±1; the loss 1 − cos then stays in [0, 2])."""
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {tuple(a.shape)} vs {tuple(b.shape)}")
    dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
    a = a.reshape(-1).to(dtype)
    b = b.reshape(-1).to(dtype)
    return ((a @ b) / (a.norm() * b.norm()).clamp_min(eps)).clamp(-1.0, 1.0)


def sfm_loss(syn_flow: Tensor, real_flow: Tensor) -> Tensor:
    """SFM loss L = 1 − cos(vec F̃, vec F), a scalar in [0, 2]; any matching shapes."""
    return 1.0 - _cosine(syn_flow, real_flow.to(syn_flow.device))


def decoupled_loss(syn_means: Tensor, real_means: Tensor) -> Tensor:
    """Ablation: match absolute class means, L = mean_{c,d} (s_{c,d} − μ_{c,d})² ."""
    if syn_means.shape != real_means.shape:
        raise ValueError(f"shape mismatch: {tuple(syn_means.shape)} vs {tuple(real_means.shape)}")
    dtype = torch.promote_types(syn_means.dtype, torch.float32)
    return F.mse_loss(syn_means.to(dtype), real_means.to(device=syn_means.device, dtype=dtype))


def subclass_real_flow(means: Tensor, centres: Tensor) -> Tensor:
    """Sub-class flow [C, K, D]: f_{c,k} = mean_{c'≠c} μ_{c'} − z_{c,k}.

    ``means`` [C, D] are class means μ, ``centres`` [C, K, D] the sub-class centres z. If
    mean_k z_{c,k} = μ_c then mean_k f_{c,k} = f_c (the class-level flow); K = 1 with z = μ gives
    exactly F.
    """
    if centres.dim() != 3 or centres.shape[0] != means.shape[0] or centres.shape[2] != means.shape[1]:
        raise ValueError(f"centres must be [C, K, D] = [{means.shape[0]}, K, {means.shape[1]}], "
                         f"got {tuple(centres.shape)}")
    return _other_means(means).unsqueeze(1) - centres


def subclass_means(features: Tensor, labels: Tensor, slots: Tensor, num_classes: int, num_slots: int) -> Tensor:
    """Per-(class, slot) means z̃ [C, K, D]: z̃_{c,k} is the mean of the rows i of ``features`` [M, D] with
    ``labels[i]`` = c and ``slots[i]`` = k (e.g. the augmented copies of image k of class c)."""
    n = features.shape[0]
    labels = _check_labels(labels, n, num_classes)
    slots = _check_labels(slots, n, num_slots, name="slots")
    try:
        z = class_means(features, labels * num_slots + slots, num_classes * num_slots)
    except ValueError:
        counts = torch.bincount(labels * num_slots + slots, minlength=num_classes * num_slots)
        empty = [divmod(i, num_slots) for i in (counts == 0).nonzero().flatten().tolist()]
        raise ValueError(f"(class, slot) pairs without any sample: {empty}") from None
    return z.view(num_classes, num_slots, -1)


def subclass_synthetic_flow(features: Tensor, labels: Tensor, slots: Tensor,
                            num_classes: int, num_slots: int) -> Tensor:
    """Synthetic sub-class flow [C, K, D]: f̃_{c,k} = mean_{c'≠c} s_{c'} − z̃_{c,k}.

    Row i of ``features`` [M, D] belongs to class ``labels[i]`` and slot ``slots[i]`` ∈ [0, K)
    (image j of class c ↔ centre j). z̃_{c,k} is the mean over all rows of (c, k) (see
    :func:`subclass_means`) and s_c = mean_k z̃_{c,k} — equal to the plain per-class mean when every
    slot has the same number of rows. Compare with ``subclass_real_flow`` via ``sfm_loss``.
    """
    z = subclass_means(features, labels, slots, num_classes, num_slots)
    return subclass_real_flow(z.mean(1), z)


def straight_through_ema(current: Tensor, running: Tensor | None, beta: float) -> tuple[Tensor, Tensor]:
    """Smoothed statistic with the current step's gradient: returns (ŝ, s̄) with

        s̄ = β·s̄_prev + (1 − β)·sg(s)      (s̄ = sg(s) on the first call, ``running`` None)
        ŝ = s̄ + s − sg(s)                  (value s̄, ∂ŝ/∂s = I)

    sg = stop-gradient. A loss L(ŝ) has the value L(s̄) and passes ∂L/∂ŝ evaluated at s̄ back into s, i.e.
    into the current views only; s̄ averages about (1 + β)/(1 − β) steps. ``beta`` = 0 gives ŝ = s.
    Store s̄ (detached) and pass it back as ``running`` on the next call.
    """
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"beta must lie in [0, 1), got {beta}")
    value = current.detach()
    if running is not None:
        if running.shape != current.shape:
            raise ValueError(f"running average has shape {tuple(running.shape)}, the statistic "
                             f"{tuple(current.shape)}")
        value = beta * running.to(value) + (1.0 - beta) * value
    return value + (current - current.detach()), value
