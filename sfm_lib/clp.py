"""CLP-DD (closed-form linear-probe dataset distillation) as an objective of the one loop.

Peng et al., "Closed-Form Linear-Probe Dataset Distillation for Pre-trained Vision Models" (arXiv
2605.07194, 2026; no code released). Built here from the paper's description: the linear probe that the
synthetic set induces is computed in closed form, by kernel ridge regression (KRR) in sample space on the
features of the synthetic views, and the images are updated through a temperature-scaled softmax
cross-entropy of that probe on *real* features. The real features come from the feature cache of the
statistics pass (:func:`sfm_lib.features.compute`): no backbone forward of a real image during
distillation.

One step, with Z [M, D] the features of the M = A·C·ipc synthetic views, Y [M, C] their one-hot labels,
and a batch (Z_r [B, D], y_r) of cached real features:

    z̄ = mean of the rows of Z,  Z_c = Z − 1z̄ᵀ,  ȳ = mean of the rows of Y,  Y_c = Y − 1ȳᵀ   (centring)
    K = Z_c Z_cᵀ,  λ = ρ · tr(K) / M                                               (ridge, relative)
    W = Z_cᵀ (K + λ I_M)⁻¹ Y_c  = (Z_cᵀ Z_c + λ I_D)⁻¹ Z_cᵀ Y_c                     (push-through identity)
    L = CE(softmax(((Z_r − 1z̄ᵀ) W + 1ȳᵀ) / τ), y_r)  (mean over the batch)

(W, b = ȳ − Wᵀz̄) is the exact minimiser of ‖Z W + 1bᵀ − Y‖² + λ‖W‖² (a ridge probe with an unpenalised
bias). The solve runs in the smaller of the two spaces (M × M in sample space when M ≤ D, else D × D),
in float64, by Cholesky; λ depends on Z and is differentiated through (L is a plain function of Z).

What the paper does not pin down, and what this module takes (the issue's untuned values):

- the ridge: λ relative to the mean kernel diagonal, ρ = ``ridge`` = 0.01;
- the temperature τ = ``tau`` = 0.1;
- centring: the view features and the one-hot targets are centred (the bias above); the real features
  are centred by the synthetic mean z̄, i.e. scored by the probe as fitted;
- the real batch: ``real_batch`` = 2048 cached features per step, shuffled, not class-balanced, drawn
  without replacement within an epoch (:class:`sfm_lib.objectives.RealStream` over the cached labels);
- the real features are those of un-augmented real images (the statistics pass: resize, no crop, no
  flip), at the input size of the views (the loop's crop);
- the probe sees the augmented views as they are (every view is a training sample of the probe).

Under torchrun each rank passes the views of its block of classes; all views are gathered exactly (as
LGM does) and every rank computes the same probe and the same real batch, so the loss is the
single-process loss on every rank and each rank's gradient is that of its own views.
"""
from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from . import distill, distributed, features
from .augment import Augment
from .backbones import Backbone
from .data import DistilledSet
from .objectives import (MultiBackbone, MultiSFMObjective, RealStream, ViewLayout, _all_rows,
                         _dataset_identity, _layout_for_torchrun, tensor_hash)

__all__ = ["krr_probe", "clp_loss", "CLPObjective", "MultiCLPObjective", "real_features", "clp"]


def krr_probe(z: Tensor, targets: Tensor, ridge: float) -> tuple[Tensor, Tensor]:
    """The ridge probe of features ``z`` [M, D] and targets [M, C] → (W [D, C], b [C]), with centring:

        Z_c = Z − 1z̄ᵀ, Y_c = Y − 1ȳᵀ, λ = ridge · tr(Z_c Z_cᵀ)/M,
        W = Z_cᵀ (Z_c Z_cᵀ + λI)⁻¹ Y_c = (Z_cᵀ Z_c + λI)⁻¹ Z_cᵀ Y_c,   b = ȳ − Wᵀ z̄,

    the exact minimiser of ‖Z W + 1bᵀ − Y‖² + λ‖W‖². Sample space (M × M) when M ≤ D, else primal; float64."""
    if z.dim() != 2 or targets.dim() != 2 or len(z) != len(targets) or len(z) < 2:
        raise ValueError(f"expected features [M, D] and targets [M, C] with M ≥ 2, got {tuple(z.shape)} and "
                         f"{tuple(targets.shape)}")
    if not ridge > 0:
        raise ValueError(f"the relative ridge must be > 0, got {ridge}")
    z, y = z.double(), targets.double()
    z_mean, y_mean = z.mean(0), y.mean(0)
    zc, yc = z - z_mean, y - y_mean
    m, d = zc.shape
    lam = ridge * zc.square().sum() / m  # tr(K)/M = ‖Z_c‖²_F / M
    if m <= d:
        chol = torch.linalg.cholesky(zc @ zc.t() + lam * torch.eye(m, dtype=zc.dtype, device=zc.device))
        w = zc.t() @ torch.cholesky_solve(yc, chol)
    else:
        chol = torch.linalg.cholesky(zc.t() @ zc + lam * torch.eye(d, dtype=zc.dtype, device=zc.device))
        w = torch.cholesky_solve(zc.t() @ yc, chol)
    return w, y_mean - z_mean @ w


def clp_loss(z: Tensor, labels: Tensor, z_real: Tensor, y_real: Tensor, num_classes: int,
             ridge: float = 0.01, tau: float = 0.1) -> Tensor:
    """L = CE(softmax((Z_r W + 1bᵀ)/τ), y_r), mean over the real batch, with (W, b) = :func:`krr_probe`
    of the synthetic features ``z`` [M, D] and their centred one-hot ``labels``; float64, differentiable in z."""
    if not tau > 0:
        raise ValueError(f"the temperature tau must be > 0, got {tau}")
    w, b = krr_probe(z, F.one_hot(labels, num_classes), ridge)
    logits = (z_real.double() @ w + b) / tau
    return F.cross_entropy(logits, y_real)


class CLPObjective:
    """CLP-DD (module doc): the KRR probe of the synthetic views, scored by its temperature-scaled
    cross-entropy on a fresh batch of cached real features every step.

    ``table`` [N, D] and ``table_labels`` [N]: the real features (un-augmented, from the feature cache).
    ``begin_step`` draws the next ``real_batch`` rows from a :class:`RealStream` over the labels (seed
    ``seed``; each epoch a fresh permutation of (seed, epoch)); its position is the state for exact resume.
    The table stays on ``device`` for the run, in float16 when its values are float16 numbers (as the
    cache's are: exact), else as given: N·D·2 bytes (ImageNet-1k at D = 768: 2 GB)."""

    method = "clp"

    def __init__(self, table: Tensor, table_labels: Tensor, num_classes: int, device: torch.device | str, *,
                 ridge: float = 0.01, tau: float = 0.1, real_batch: int = 2048, seed: int = 0,
                 source: dict[str, Any] | None = None):
        table_labels = torch.as_tensor(table_labels, dtype=torch.long).cpu()
        if table.dim() != 2 or len(table) != len(table_labels) or len(table) == 0:
            raise ValueError(f"expected real features [N, D] and labels [N], N ≥ 1; got {tuple(table.shape)} "
                             f"and {tuple(table_labels.shape)}")
        if int(table_labels.min()) < 0 or int(table_labels.max()) >= num_classes:
            raise ValueError(f"real labels must lie in 0 … {num_classes - 1}, found {int(table_labels.min())} … "
                             f"{int(table_labels.max())}")
        if not ridge > 0 or not tau > 0 or real_batch < 1:
            raise ValueError(f"need ridge > 0, tau > 0 and real_batch ≥ 1, got {ridge}, {tau}, {real_batch}")
        self.num_classes = self.C = int(num_classes)
        self.ridge, self.tau, self.real_batch, self.seed = float(ridge), float(tau), int(real_batch), int(seed)
        self.device = torch.device(device)
        self.source = dict(source or {})
        self.features_hash = tensor_hash(table, table_labels)
        half = table.half()  # the cache's values are float16: held so on the device, exactly
        self.table = (half if torch.equal(half.to(table.dtype), table) else table).to(self.device)
        self.table_labels = table_labels.to(self.device)
        labels_only = SimpleNamespace(targets=table_labels, classes=list(range(self.C)))
        self.real_stream = RealStream(labels_only, self.real_batch, seed=self.seed)
        self.z_real: Tensor | None = None
        self.y_real: Tensor | None = None
        self.layout: ViewLayout | None = None  # used under torchrun only (to place each rank's views)

    def identity(self) -> dict[str, Any]:
        return {"ridge": self.ridge, "tau": self.tau, "real_batch": self.real_batch, "centred": True,
                "features": self.features_hash, **self.source}

    def begin_step(self, backbone: Backbone | None = None) -> None:
        """Draw the next real batch of cached features (no backbone forward; ``backbone`` is unused)."""
        idx = self.real_stream.next_indices().to(self.device, non_blocking=True)
        self.z_real, self.y_real = self.table[idx].float(), self.table_labels[idx]

    def __call__(self, z: Tensor, labels: Tensor, slots: Tensor) -> Tensor:
        if self.z_real is None:
            raise RuntimeError("CLPObjective: call begin_step() before the loss (it draws the real batch)")
        if distributed.world_size() > 1:  # z: this rank's views; the probe needs every view
            lay = _layout_for_torchrun(self)
            z = _all_rows(z, lay.rank_views(z.device), lay.size)
            labels = lay.labels(z.device)
        return self.loss(z, labels)

    def loss(self, z: Tensor, labels: Tensor) -> Tensor:
        """The loss of all views ``z`` with their ``labels`` against this step's real batch."""
        return clp_loss(z, labels, self.z_real, self.y_real, self.C, self.ridge, self.tau).float()

    def state_dict(self) -> dict[str, Tensor]:
        """The real stream's position (epoch, index)."""
        return self.real_stream.state_dict()

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.real_stream.load_state_dict(state)


class MultiCLPObjective(MultiSFMObjective):
    """CLP-DD over K backbones on the same views: L = Σ_k w̄_k L_k, L_k the loss of a :class:`CLPObjective`
    of backbone k on its block of z = [z₁ | … | z_K] (:class:`MultiBackbone`). The parts share the seed
    and the labels, so they draw the same real images each step (each from its own backbone's cache)."""

    method = "clp"

    def begin_step(self, backbone=None) -> None:
        """Every part draws its real batch."""
        for o in self.parts:
            o.begin_step()


def real_features(backbone: Backbone, dataset: Dataset, size: int, progress: bool = True) -> tuple[Tensor, Tensor]:
    """The cached features [N, D] and labels [N] of ``dataset`` at ``size`` px (:func:`features.compute`;
    under torchrun rank 0 fills the cache first, the others then read it)."""
    with distributed.main_first():
        return features.compute(backbone, dataset, size, progress=progress and distributed.is_main())


def clp(backbone: Backbone | Sequence[Backbone], dataset, ipc: int = 1, steps: int = 1000, resolution: int = 64, *,
        crop: int | None = None, augs: int = 1, lr: float | None = None, schedule: str = "constant",
        param: str = "pixels", grow_every: int = 200, init: str = "noise", init_dataset=None,
        ridge: float = 0.01, tau: float = 0.1, real_batch: int = 2048, augment: Augment | None = None,
        seed: int = 0, two_pass: bool | None = None, chunk_size: int | None = None,
        checkpoint: str | os.PathLike | None = None, checkpoint_every: int = 100, resume: bool = False,
        progress: bool = True, callback: Callable | None = None, compile: bool = False,
        backbone_weights: Sequence[float] | None = None,
        backbone_crops: Sequence[int] | None = None) -> DistilledSet:
    """Distil ``ipc`` images per class of ``dataset`` (the real training set) by CLP-DD (module doc).

    Each step: a batch of ``real_batch`` cached real features (computed once, :func:`real_features`, at
    the views' input size); A = ``augs`` views of every synthetic image, z = φ(normalise(aug(x̃)));
    (W, b) = KRR probe of z (relative ridge ``ridge``); L = CE(softmax((Z_r W + b)/``tau``), y_r); Adam
    step on the images. ``init="real"`` draws from ``init_dataset`` (default ``dataset``). The other
    arguments are those of :class:`sfm_lib.distill.DistillConfig`.

    Several backbones: a list; each has its own feature cache at its own input size (``backbone_crops``,
    default the loop's crop) and L = Σ_k w_k L_k / Σ_k w_k (``backbone_weights``, default equal)."""
    config = distill._config(locals())

    def part(table, table_labels, num_classes, device, seed, source):
        return CLPObjective(table, table_labels, num_classes, device, ridge=ridge, tau=tau, real_batch=real_batch,
                            seed=seed, source=source)

    result = _distil_on_real_features(backbone, dataset, part, config, progress=progress, callback=callback,
                                      init_dataset=init_dataset, backbone_weights=backbone_weights,
                                      backbone_crops=backbone_crops)
    result.meta.update(ridge=ridge, tau=tau, real_batch=real_batch, centred=True)
    return result


def _distil_on_real_features(backbone: Backbone | Sequence[Backbone], dataset, part: Callable[..., CLPObjective],
                             config: distill.DistillConfig, *, progress: bool, callback: Callable | None,
                             init_dataset, backbone_weights: Sequence[float] | None,
                             backbone_crops: Sequence[int] | None) -> DistilledSet:
    """The loop of an objective scored on cached real features (CLP-DD, unrolled-probe matching): each
    backbone's feature cache of ``dataset`` at its input size, one objective per backbone from
    ``part(table, table_labels, num_classes, device, seed=, source=)``, combined over several backbones by
    :class:`MultiCLPObjective` (L = Σ_k w̄_k L_k), then :func:`sfm_lib.distill.run`."""
    if not hasattr(dataset, "targets") or not hasattr(dataset, "classes"):
        raise ValueError("this method needs the real training set with .targets and .classes (e.g. data.load(...))")
    bbs = list(backbone) if isinstance(backbone, (list, tuple)) else [backbone]
    if len(bbs) == 1 and (backbone_weights is not None or backbone_crops is not None):
        raise ValueError("backbone_weights and backbone_crops need a list of at least 2 backbones")
    phi = bbs[0] if len(bbs) == 1 else MultiBackbone(bbs, None if backbone_crops is None else
                                                     [None if c is None else int(c) for c in backbone_crops])
    sizes = [config.crop_size] if len(bbs) == 1 else [c or config.crop_size for c in phi.crops]
    source = _dataset_identity(dataset)
    parts = []
    for bb, size in zip(bbs, sizes):
        table, table_labels = real_features(bb, dataset, size, progress)
        parts.append(part(table, table_labels, len(dataset.classes), bb.device, seed=config.seed,
                          source={**source, "features_size": size}))
    objective = parts[0] if len(bbs) == 1 else MultiCLPObjective(parts, phi.dims, backbone_weights, phi.names,
                                                                  sizes)
    result = distill.run(phi, objective, config, dataset.classes, callback=callback,
                         init_dataset=dataset if init_dataset is None else init_dataset)
    result.meta.update(dataset=source["dataset"], features_resolution=sizes[0] if len(bbs) == 1 else sizes)
    if len(bbs) > 1:
        result.meta.update(backbones=phi.names, backbone_weights=objective.weights, backbone_crops=sizes)
    return result
