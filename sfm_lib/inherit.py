"""Classifier inheritance (method.md §7): reuse a classifier trained on the full real data with the
distillation backbone φ_d from another backbone φ_e, through a linear projector fitted on distilled images.

1. The **golden classifier** (W ∈ R^{C×D_d}, b): a linear probe on the whole real training split with φ_d —
   :func:`golden_classifier`, which is :func:`sfm_lib.evaluate.full_data_probe` (cached features, its recipe).
2. The **projector** P(z) = A z + c, A ∈ R^{D_d×D_e}, from φ_e features to φ_d features, fitted without labels
   on M augmented views v_m of the distilled images (flip + random resized crop; the same view goes into both
   backbones) by ridge least squares, in closed form and float64 (:func:`fit_projector`):

       min_{A,c} Σ_m ‖A φ_e(v_m) + c − φ_d(v_m)‖² + λ‖A‖²_F,   λ = α · tr(Z̃ᵀZ̃) / D_e,

   with Z̃ the centred φ_e features (the bias is not penalised): Aᵀ = (Z̃ᵀZ̃ + λI)⁻¹ Z̃ᵀỸ, c = ȳ − A z̄.
   α is chosen from :data:`ALPHA_GRID` by the top-1 of W · P(φ_e(x)) + b on labelled real validation
   images (:func:`validation_split` of ``data.load(name, "val")``: images the golden classifier, trained
   on ``"train"``, never saw; never the test split): one backbone wants a small α, two backbones a large
   one. When φ_e = φ_d the grid's :data:`IDENTITY` candidate keeps P = I (A = I, c = 0), so the inherited
   classifier can be the golden one exactly.
3. **Inference**: ŷ = argmax_c (W · P(φ_e(x)) + b)_c (:class:`InheritedClassifier`); φ_d is only needed to
   fit P.

What is stored is W, b and P (:func:`storage_report` counts their bytes against the distilled images).
Caveat: W saw the whole real training split (all but the validation images), so the inherited classifier answers a different question than a
probe trained on the distilled images alone.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset

from . import data, evaluate
from . import features as features_mod
from .backbones import Backbone
from .cache import backbone_identity
from .data import DistilledSet, EvalTransform
from .utils import load_tensors, save_tensors

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["golden_classifier", "paired_view_features", "fit_projector", "InheritedClassifier", "inherit",
           "png_bytes", "dataset_bytes", "storage_report", "per_class_split", "validation_split", "validation_rest",
           "prepare_side", "comparison", "summary", "compact", "FIT_SETS", "DEFAULT_ALPHA", "ALPHA_GRID", "IDENTITY"]

DEFAULT_ALPHA = 0.1
"""Ridge strength α (λ = α · tr(Z̃ᵀZ̃) / D_e, see the module doc) when no validation images are given: a
compromise between one backbone (best α ≤ 0.03 on Fashion-MNIST at 64 px) and two (best α 0.3–1)."""
IDENTITY = "identity"
"""The candidate P = I (A = I, c = 0) for φ_e = φ_d: the golden classifier itself (skipped for two backbones)."""
ALPHA_GRID = (IDENTITY, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0)
"""Candidates tried when P is chosen on validation images (:func:`inherit` with ``validation``): the identity
first (it wins ties: nothing to fit or store), then ridge strengths α."""
FIT_SETS = ("distilled", "random", "centroids")
"""Images the projector can be fitted on: the distilled set, random real images, centroid images."""


# ----------------------------------------------------------------------------------------------- golden
def golden_classifier(backbone: Backbone, train: Dataset, test: Dataset, resolution: int, *,
                      seeds: Sequence[int] = (0,), **probe_kw) -> evaluate.ProbeResult:
    """The golden classifier: :func:`sfm_lib.evaluate.full_data_probe` of φ_d = ``backbone`` on ``train``
    (whole-split features are cached on disk). Its first seed's probe, ``result.weights[0][0]`` and
    ``result.weights[1][0]``, is the golden (W, b); ``result.top1`` scores it on ``test`` with φ_d."""
    return evaluate.full_data_probe(backbone, train, test, resolution, seeds=seeds, **probe_kw)


def _golden_weights(golden: evaluate.ProbeResult | tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    if isinstance(golden, evaluate.ProbeResult):
        if golden.weights is None:
            raise ValueError("the golden ProbeResult carries no weights; make it with golden_classifier()")
        return golden.weights[0][0], golden.weights[1][0]
    W, b = golden
    return W, b


# -------------------------------------------------------------------------------------------- projector
def paired_view_features(distill_backbone: Backbone, eval_backbone: Backbone, images: Tensor, resolution: int,
                         views: int, seed: int = 0, *, cache: dict | None = None,
                         cache_key: Any = None, transform: EvalTransform | None = None) -> tuple[Tensor, Tensor]:
    """φ_e and φ_d features of the same ``views`` views of every image: (Z_e [N·K, D_e], Z_d [N·K, D_d]), row
    j·K + k the k-th view of image j. Views from :func:`sfm_lib.evaluate.view_features` with one ``seed`` for
    both backbones, so both see identical crops (view 0 un-augmented, the others flip + random resized crop).
    ``cache`` (a dict) with ``cache_key`` (naming the images) keeps each backbone's features for later calls.
    ``transform``: how view 0 becomes the input, as the test pass makes it (:func:`sfm_lib.evaluate.view_features`).
    """
    def feats(bb: Backbone) -> Tensor:
        key = (cache_key, bb.name, resolution, views, seed, transform)
        if cache is not None and cache_key is not None and key in cache:
            return cache[key]
        z = evaluate.view_features(bb, images, resolution, views, seed, transform).flatten(0, 1)
        if cache is not None and cache_key is not None:
            cache[key] = z
        return z

    z_e = feats(eval_backbone)
    return z_e, (z_e if eval_backbone is distill_backbone else feats(distill_backbone))


def fit_projector(z_e: Tensor, z_d: Tensor, alpha: float = DEFAULT_ALPHA) -> tuple[Tensor, Tensor, float]:
    """Ridge least squares from ``z_e`` [M, D_e] to ``z_d`` [M, D_d] in float64 (see the module doc):
    returns (A [D_d, D_e], c [D_d], λ) with P(z) = A z + c and λ = α · tr(Z̃ᵀZ̃) / D_e.

    ``alpha = 0`` is plain least squares and needs Z̃ of full column rank (M > D_e views in general position).
    """
    if z_e.ndim != 2 or z_d.ndim != 2 or z_e.shape[0] != z_d.shape[0]:
        raise ValueError(f"expected z_e [M, D_e] and z_d [M, D_d] with the same M, got {tuple(z_e.shape)} and "
                         f"{tuple(z_d.shape)}")
    if alpha < 0 or not math.isfinite(alpha):
        raise ValueError(f"alpha must be a finite number ≥ 0, got {alpha}")
    if z_e.shape[0] < 2:
        raise ValueError("fitting a projector needs at least 2 views")
    x, y = z_e.double(), z_d.double()
    x_mean, y_mean = x.mean(0), y.mean(0)
    xc, yc = x - x_mean, y - y_mean
    if alpha == 0 and int(torch.linalg.matrix_rank(xc)) < x.shape[1]:
        raise ValueError(f"the projector's normal equations are singular ({x.shape[0]} views for D_e = "
                         f"{x.shape[1]}, centred rank {int(torch.linalg.matrix_rank(xc))}); use alpha > 0 or "
                         f"more views")
    gram = xc.T @ xc
    lam = alpha * float(gram.diagonal().sum()) / x.shape[1]
    gram.diagonal().add_(lam)
    a_t = torch.linalg.solve(gram, xc.T @ yc)  # [D_e, D_d]
    A = a_t.T.contiguous()
    return A, y_mean - A @ x_mean, lam


# ----------------------------------------------------------------------------------------- classifier
@dataclass
class InheritedClassifier:
    """Golden (W [C, D_d], b [C]) composed with the projector P(z) = A z + c (A [D_d, D_e], c [D_d]):
    logits(z) = W (A z + c) + b for φ_e features z. ``meta``: backbones, resolution, how P was fitted."""

    weight: Tensor
    bias: Tensor
    proj_weight: Tensor
    proj_bias: Tensor
    classes: list[str]
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        C, D_d = self.weight.shape
        if self.bias.shape != (C,) or self.proj_weight.ndim != 2 or self.proj_weight.shape[0] != D_d \
                or self.proj_bias.shape != (D_d,) or len(self.classes) != C:
            raise ValueError(f"inconsistent shapes: W {tuple(self.weight.shape)}, b {tuple(self.bias.shape)}, "
                             f"A {tuple(self.proj_weight.shape)}, c {tuple(self.proj_bias.shape)}, "
                             f"{len(self.classes)} classes")

    @property
    def eval_dim(self) -> int:
        return int(self.proj_weight.shape[1])

    def project(self, z: Tensor) -> Tensor:
        """P(z) = A z + c for φ_e features ``z`` [N, D_e] (in the classifier's dtype)."""
        if z.ndim != 2 or z.shape[1] != self.eval_dim:
            raise ValueError(f"expected φ_e features [N, {self.eval_dim}], got {tuple(z.shape)}; are they from "
                             f"{self.meta.get('eval_backbone', 'the evaluation backbone')}?")
        return z.to(self.proj_weight.device, self.proj_weight.dtype) @ self.proj_weight.T + self.proj_bias

    def logits(self, z: Tensor) -> Tensor:
        """W · P(z) + b: [N, C]."""
        return self.project(z) @ self.weight.T + self.bias

    def predict_features(self, z: Tensor) -> Tensor:
        """argmax_c (W · P(z) + b)_c for φ_e features ``z`` [N, D_e]."""
        return self.logits(z).argmax(1)

    def predict(self, images: Tensor, backbone: Backbone, resolution: int | None = None) -> Tensor:
        """Class indices [N] of images [N, 3, H, W] in [0, 1]: argmax(W · P(φ_e(x)) + b), φ_e = ``backbone``
        (resize + centre crop to ``resolution``, default the one P was fitted at)."""
        expected = self.meta.get("eval_backbone")
        if expected is not None and backbone.name != expected:
            raise ValueError(f"this classifier reads {expected} features, got backbone {backbone.name}")
        res = int(resolution or self.meta.get("resolution") or images.shape[-1])
        with torch.inference_mode():
            z = torch.cat([backbone.features(images[i:i + 256], res).float().cpu()
                           for i in range(0, images.shape[0], 256)])
        return self.predict_features(z)

    def accuracy(self, z: Tensor, labels: Tensor) -> float:
        """Top-1 (%) on φ_e features ``z`` [N, D_e] with labels [N]."""
        return 100.0 * (self.predict_features(z).cpu() == labels.cpu()).double().mean().item()

    def storage_bytes(self) -> dict[str, int]:
        """Bytes of W, b and P (A and c) as stored (their dtype), and their sum; P = I (``meta["alpha"]`` is
        :data:`IDENTITY`) needs none."""
        def nbytes(t: Tensor) -> int:
            return t.numel() * t.element_size()

        identity = self.meta.get("alpha") == IDENTITY
        out = {"W": nbytes(self.weight), "b": nbytes(self.bias),
               "P": 0 if identity else nbytes(self.proj_weight) + nbytes(self.proj_bias)}
        out["total"] = sum(out.values())
        return out

    def save(self, path) -> None:
        """Safetensors (``W``, ``b``, ``P_weight``, ``P_bias``) with classes and meta as JSON; atomic."""
        save_tensors(path, {"W": self.weight, "b": self.bias, "P_weight": self.proj_weight,
                            "P_bias": self.proj_bias}, {**self.meta, "classes": self.classes,
                                                        "kind": "inherited_classifier"})

    @classmethod
    def load(cls, path) -> "InheritedClassifier":
        tensors, meta = load_tensors(path)
        missing = {"W", "b", "P_weight", "P_bias"} - tensors.keys()
        if missing:
            raise ValueError(f"{path}: not an inherited classifier (missing {sorted(missing)}); write one with "
                             f"`python -m sfm_lib inherit ... --save FILE`")
        meta.pop("kind", None)
        classes = meta.pop("classes", [str(i) for i in range(tensors["W"].shape[0])])
        return cls(tensors["W"], tensors["b"], tensors["P_weight"], tensors["P_bias"], classes, meta)


def _images(source: DistilledSet | Dataset | Tensor, resolution: int) -> Tensor:
    """The fit images as float [N, 3, H, W]: a real dataset's images (any size and mode) resized as the
    statistics pass resizes them (:func:`sfm_lib.data.real_images`)."""
    if isinstance(source, Tensor):
        return source.float()
    if isinstance(source, DistilledSet):
        return source.images.detach().float()
    if len(source) == 0:
        raise ValueError("no images to fit the projector on")
    return data.real_images(source, torch.arange(len(source)), resolution)


def inherit(golden: evaluate.ProbeResult | tuple[Tensor, Tensor], distill_backbone: Backbone,
            eval_backbone: Backbone, images: DistilledSet | Dataset | Tensor, resolution: int, *,
            views: int = 100, seed: int = 0, alpha: float | str | Sequence[float | str] = DEFAULT_ALPHA,
            validation: tuple[Tensor, Tensor] | None = None, classes: Sequence[str] | None = None,
            cache: dict | None = None, cache_key: Any = None,
            transform: EvalTransform | None = None) -> InheritedClassifier:
    """Fit P on ``views`` views of ``images`` (no labels used; normally the distilled set) and compose it
    with the golden (W, b) of φ_d = ``distill_backbone``. Stored in float32. ``cache``/``cache_key`` and
    ``transform`` (the test transform of the real images): see :func:`paired_view_features`.

    ``alpha``: the ridge strength, or several to choose from by top-1 on ``validation`` = (φ_e features
    [N, D_e], labels [N]) of labelled real images (e.g. of :func:`validation_split`); the first best wins,
    and ``meta`` records the choice (``alpha``) and every score (``validation_top1``). :data:`IDENTITY`
    among them is P = I, tried only when φ_e = φ_d (same identity, :func:`sfm_lib.cache.backbone_identity`)."""
    alphas = _candidates(alpha, _same_backbone(distill_backbone, eval_backbone))
    if len(alphas) > 1 and validation is None:
        raise ValueError(f"{len(alphas)} ridge strengths to choose from but no validation images; pass "
                         f"validation=(φ_e features, labels), e.g. of validation_split(data.load(name, 'val')), "
                         f"or one alpha")
    W, b = _golden_weights(golden)
    if W.shape[1] != distill_backbone.feature_dim:
        raise ValueError(f"the golden classifier has {W.shape[1]} inputs but {distill_backbone.name} gives "
                         f"{distill_backbone.feature_dim} features; pass the distillation backbone it was "
                         f"trained with")
    x = _images(images, resolution)
    fitted = any(a != IDENTITY for a in alphas)
    z_e, z_d = (paired_view_features(distill_backbone, eval_backbone, x, resolution, views, seed, cache=cache,
                                     cache_key=cache_key, transform=transform) if fitted else (None, None))
    if classes is None:
        classes = getattr(images, "classes", None) or [str(i) for i in range(W.shape[0])]
    best, scores = None, {}
    for a in alphas:
        if a == IDENTITY:
            D = distill_backbone.feature_dim
            A, c, lam = torch.eye(D, dtype=torch.float64), torch.zeros(D, dtype=torch.float64), None
        else:
            A, c, lam = fit_projector(z_e, z_d, a)
        meta = {"distill_backbone": distill_backbone.name, "eval_backbone": eval_backbone.name,
                "resolution": resolution, "views": views, "seed": seed, "alpha": a, "lambda": lam,
                "n_images": int(x.shape[0]), "n_views": int(z_e.shape[0]) if fitted else 0}
        clf = InheritedClassifier(W.float().cpu(), b.float().cpu(), A.float(), c.float(), list(classes), meta)
        if validation is None:
            return clf
        scores[a] = clf.accuracy(*validation)
        if best is None or scores[a] > scores[best.meta["alpha"]]:
            best = clf
    best.meta.update(validation_top1=scores, n_validation=int(validation[1].numel()))
    return best


def _same_backbone(distill_backbone: Backbone, eval_backbone: Backbone) -> bool:
    """φ_e = φ_d: one object, or the same name, weights, precision and input size, and equal feature dims."""
    return eval_backbone is distill_backbone or (
        eval_backbone.feature_dim == distill_backbone.feature_dim
        and backbone_identity(eval_backbone) == backbone_identity(distill_backbone))


def _candidates(alpha: float | str | Sequence[float | str], same: bool) -> tuple[float | str, ...]:
    """The candidates of ``alpha`` in order: ridge strengths as floats, :data:`IDENTITY` only when ``same``."""
    given = (alpha,) if isinstance(alpha, (int, float, str)) else tuple(alpha)
    if not given:
        raise ValueError("alpha: give a ridge strength or a non-empty sequence of them")
    bad = [a for a in given if isinstance(a, str) and a != IDENTITY]
    if bad:
        raise ValueError(f"alpha {bad[0]!r} is neither a number nor {IDENTITY!r}")
    out = tuple(a if a == IDENTITY else float(a) for a in given if same or a != IDENTITY)
    if not out:
        raise ValueError(f"alpha={IDENTITY!r} keeps P = I, which needs φ_e = φ_d; give a ridge strength for two "
                         f"backbones")
    return out


# ---------------------------------------------------------------------------------------------- storage
def png_bytes(images: Tensor) -> int:
    """Total bytes of the images [N, 3, H, W] in [0, 1] encoded one by one as 8-bit RGB PNG (PIL, in memory)."""
    import numpy as np
    from PIL import Image

    arr = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    total = 0
    for a in arr:
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(a), "RGB").save(buf, format="PNG")
        total += buf.tell()
    return total


def dataset_bytes(dataset: Dataset) -> int:
    """Bytes of a real image dataset as uint8 at its native size (grey images one channel)."""
    base = getattr(dataset, "dataset", dataset)
    if hasattr(base, "images") and isinstance(base.images, Tensor) and base.images.dtype == torch.uint8:
        return len(dataset) * base.images[0].numel()
    return len(dataset) * dataset[0][0].numel()


def storage_report(classifier: InheritedClassifier, images: DistilledSet | Tensor) -> dict[str, int]:
    """Bytes: W, b, P and their sum (``inherited``), against the distilled images as PNG, uint8 and float32."""
    x = _images(images, int(classifier.meta.get("resolution", 0)) or _native_side(images))
    own = classifier.storage_bytes()
    return {"W": own["W"], "b": own["b"], "P": own["P"], "inherited": own["total"],
            "images_png": png_bytes(x), "images_uint8": x.numel(), "images_float32": 4 * x.numel(),
            "n_images": int(x.shape[0])}


def _native_side(images) -> int:
    first = images[0][0] if not isinstance(images, Tensor) else images[0]
    return int(min(first.shape[-2:]))


# ------------------------------------------------------------------------------------------ other side
def per_class_split(dataset: Dataset, images_per_class: int) -> Dataset:
    """The first ``images_per_class`` images of every class as a dataset of its own, with the same name
    and split, so its features and statistics are cached on disk like a whole split (a ``Subset`` never
    is; the cache keys tell the two apart by size and content) and what is distilled from it still belongs
    to the dataset's test split (:func:`sfm_lib.evaluate.check_same_data`). Datasets not held in memory
    give :func:`sfm_lib.data.subset_per_class`."""
    from . import data as data_mod

    sub = data_mod.subset_per_class(dataset, images_per_class)
    if not isinstance(dataset, data_mod.TensorImageDataset):
        return sub
    idx = torch.as_tensor(sub.indices, dtype=torch.long)
    out = data_mod.TensorImageDataset(dataset.images[idx], dataset.targets[idx], dataset.classes,
                                      dataset.name)
    out.split = getattr(dataset, "split", "train")
    return out


_TRAINING_SPLITS = ("train", "trainval")


def _split_name(dataset: Dataset) -> str | None:
    """The ``split`` of a dataset or of the dataset under its Subsets (None when not recorded)."""
    while not hasattr(dataset, "split") and isinstance(dataset, torch.utils.data.Subset):
        dataset = dataset.dataset
    return getattr(dataset, "split", None)


def _check_unseen(validation: Dataset, golden_train: Dataset | None = None) -> None:
    """Refuse validation images the golden classifier trains on: a training split, or "val" when the golden
    classifier trains on "trainval" (which holds it)."""
    split, trained = _split_name(validation), None if golden_train is None else _split_name(golden_train)
    if split in _TRAINING_SPLITS or (split == "val" and trained == "trainval"):
        raise ValueError(f"the validation images come from the {split!r} split, which the golden classifier "
                         f"(trained on {trained or 'train'!r}) sees; take them from data.load(name, 'val') and "
                         f"train the golden classifier on 'train'")


def validation_rest(dataset: Dataset, images_per_class: int) -> Dataset:
    """The images of a validation split that :func:`validation_split` with ``images_per_class`` leaves out:
    held-out images that did not choose the projector's α either, to compare projectors (or fit sets) on."""
    from . import data as data_mod

    chosen = set(validation_split(dataset, images_per_class).indices) if images_per_class else set(
        range(len(dataset)))
    sub = data_mod.subset(dataset, [i for i in range(len(dataset)) if i not in chosen])
    sub.split = _split_name(dataset)
    return sub


def validation_split(dataset: Dataset, images_per_class: int = 0) -> Dataset:
    """The first ``images_per_class`` images of every class of a validation split (``data.load(name, "val")``;
    0: all of it): labelled real images to choose the projector on that neither the golden classifier
    (trained on ``"train"``) nor the test split contain. A training split is refused."""
    from . import data as data_mod

    _check_unseen(dataset)
    if images_per_class == 0:
        return dataset
    targets = torch.as_tensor(dataset.targets)
    counts = torch.bincount(targets, minlength=len(dataset.classes))
    if images_per_class < 0 or int(counts.min()) < images_per_class:
        raise ValueError(f"a validation split of {images_per_class} images per class needs ≥ 0 and at most "
                         f"the smallest class ({int(counts.min())} images); lower the number")
    sub = data_mod.subset_per_class(dataset, images_per_class)
    sub.split = _split_name(dataset)
    return sub


def prepare_side(ctx: Any, backbone: str | Backbone, images_per_class: int = 0, *,
                 progress: bool = False) -> Any:
    """A second :class:`sfm_lib.experiments.Context` beside ``ctx``: the same data and resolution with
    another backbone (loaded on ``ctx.backbone``'s device), its class statistics and feature cache on the
    first ``images_per_class`` training images of each class (0: all of ``ctx.train``), with ``ctx``'s test
    transform."""
    from . import backbones as backbones_mod
    from . import stats as stats_mod
    from .experiments import Context

    phi = backbone if isinstance(backbone, Backbone) else backbones_mod.load(backbone, ctx.backbone.device)
    train = per_class_split(ctx.train, images_per_class) if images_per_class else ctx.train
    transform = getattr(ctx, "transform", None)
    st = stats_mod.cached_extract(phi, train, ctx.resolution, cache_features=True, progress=progress,
                                  transform=transform)
    return Context(train, ctx.test, phi, st, ctx.resolution, ctx.image_size, ctx.val, transform)


# ------------------------------------------------------------------------------------------- comparison
def _projector_r2(clf: InheritedClassifier, z_e: Tensor, z_d: Tensor) -> float:
    """1 − ‖P(z_e) − z_d‖² / ‖z_d − mean z_d‖² on real (test) features: 1 = φ_d recovered exactly."""
    err = (clf.project(z_e).double() - z_d.double()).pow(2).sum()
    return float(1.0 - err / (z_d.double() - z_d.double().mean(0)).pow(2).sum())


def comparison(sides: Mapping[str, Any], distilled: Mapping[str, DistilledSet], test: Dataset, resolution: int,
               pairs: Sequence[tuple], *, ipc: int = 1, views: int = 100,
               alpha: float | str | Sequence[float | str] = DEFAULT_ALPHA, validation: Dataset | None = None,
               seed: int = 0, probe_seeds: Sequence[int] = (0, 1, 2), epochs: int = 1000, probe_views: int = 40,
               full_epochs: int = 10, progress: bool = False, keep: dict | None = None,
               transform: EvalTransform | None = None,
               fit_images: Mapping[str, Dataset] | None = None,
               full_probes: dict | None = None) -> "pd.DataFrame":
    """The rows of the inheritance comparison, each scored on the real ``test`` split; a tidy DataFrame.

    ``sides``: backbone name → an object with ``.backbone``, ``.train`` (and optionally ``.stats``), e.g. an
    :class:`sfm_lib.experiments.Context`. ``distilled``: distillation backbone name → its distilled set.
    ``pairs``: (φ_d name, φ_e name) or (φ_d name, φ_e name, fit sets) with fit sets from :data:`FIT_SETS`
    (default ("distilled",)); "random" draws ``ipc`` real images per class (seed ``seed``), "centroids" takes
    the real images nearest the φ_d class means (:func:`sfm_lib.evaluate.centroid_subset`), both of the same
    count as the distilled set when ``ipc`` matches it; ``fit_images`` names further image sets a pair may
    list as fit sets (e.g. ``{"distilled with both": a set distilled with φ_d and φ_e together}``). ``alpha`` and ``validation`` (labelled real images
    the golden classifiers never saw, e.g. :func:`validation_split` of ``data.load(name, "val")``; a
    training split is refused): how P is chosen, see :func:`inherit`.

    Rows per pair: ``inherited`` (one per fit set; golden = the full-data probe of φ_d, seed
    ``probe_seeds[0]``), ``normal probe`` (:func:`sfm_lib.evaluate.linear_probe` with φ_e on the distilled
    images) and ``full-data probe`` (φ_e, the ceiling). Columns: ``distill_backbone``, ``eval_backbone``,
    ``method``, ``fit_on``, ``top1``, ``top1_std`` (over probe seeds; 0 for one inherited classifier),
    ``golden_top1``, ``alpha`` (P's ridge strength, or :data:`IDENTITY`), ``projector_r2`` (1 − relative squared error of P(φ_e)
    against φ_d on the test split),
    ``identity_gap`` (‖A − I‖_F / ‖I‖_F when φ_e = φ_d), ``storage_bytes`` (what must be kept: W, b and P
    in float32; the distilled images as PNG; the real training set as uint8) and ``time_s``. ``keep``: a dict
    that receives every inherited classifier under (φ_d name, φ_e name, fit set). ``transform``: how real
    images become the input (test, validation, golden and full-data features, probes, fit views), e.g.
    ``ctx.transform``; part of every feature cache key. ``full_probes``: a dict kept across calls on the same
    ``sides``, ``test`` and probe settings (e.g. one per distillation seed), in which each backbone's full-data
    probe (φ_d's golden classifier, φ_e's ceiling) is trained once and then reused.
    """
    import time

    import pandas as pd

    full: dict[str, evaluate.ProbeResult] = {} if full_probes is None else full_probes
    view_cache: dict = {}  # view features of each image set, per backbone, shared by the pairs

    def full_probe(name: str) -> evaluate.ProbeResult:
        if name not in full:
            side = sides[name]
            full[name] = golden_classifier(side.backbone, side.train, test, resolution, seeds=tuple(probe_seeds),
                                           epochs=full_epochs, progress=progress, transform=transform)
        return full[name]

    test_feats = {name: features_mod.compute(sides[name].backbone, test, resolution, progress=progress,
                                             transform=transform) for name in sides}
    if validation is not None:
        for side in sides.values():
            _check_unseen(validation, side.train)
    val_feats = {name: (None if validation is None else
                        features_mod.compute(sides[name].backbone, validation, resolution, progress=progress,
                                             transform=transform))
                 for name in sides}
    rows = []
    for pair in pairs:
        d, e = pair[0], pair[1]
        fits = tuple(pair[2]) if len(pair) > 2 else ("distilled",)
        extra = dict(fit_images or {})
        unknown = set(fits) - set(FIT_SETS) - set(extra)
        if unknown:
            raise ValueError(f"unknown fit sets {sorted(unknown)}; choose from {', '.join([*FIT_SETS, *extra])}")
        if d not in distilled:
            raise ValueError(f"no distilled set for distillation backbone {d!r}; pass distilled={{{d!r}: ...}}")
        phi_d, phi_e, dset = sides[d].backbone, sides[e].backbone, distilled[d]
        golden = full_probe(d)
        base = {"distill_backbone": d, "eval_backbone": e}
        for fit in fits:
            t0 = time.perf_counter()
            if fit == "distilled":
                images = dset
            elif fit in extra:
                images = extra[fit]
            elif fit == "random":
                images = evaluate.random_subset(sides[d].train, ipc, seed)
            else:
                images = evaluate.centroid_subset(phi_d, sides[d].train, resolution, ipc,
                                                  stats=getattr(sides[d], "stats", None), progress=progress,
                                                  transform=transform)
            clf = inherit(golden, phi_d, phi_e, images, resolution, views=views, seed=seed, alpha=alpha,
                          validation=val_feats[e], classes=dset.classes, cache=view_cache, cache_key=(d, fit),
                          transform=transform)
            if keep is not None:
                keep[(d, e, fit)] = clf
            z_e, y = test_feats[e]
            gap = (float(torch.linalg.matrix_norm(clf.proj_weight.double() - torch.eye(clf.eval_dim,
                                                                                     dtype=torch.float64))
                          / math.sqrt(clf.eval_dim)) if d == e else float("nan"))
            rows.append({**base, "method": "inherited", "fit_on": fit, "top1": clf.accuracy(z_e, y),
                         "top1_std": 0.0, "golden_top1": golden.top1[0], "alpha": clf.meta["alpha"],
                         "projector_r2": _projector_r2(clf, z_e, test_feats[d][0]), "identity_gap": gap,
                         "storage_bytes": clf.storage_bytes()["total"],
                         "time_s": time.perf_counter() - t0})
        t0 = time.perf_counter()
        normal = evaluate.linear_probe(phi_e, dset, test, resolution, epochs=epochs, seeds=tuple(probe_seeds),
                                       views=probe_views, progress=progress, transform=transform)
        rows.append({**base, "method": "normal probe", "fit_on": None, "top1": normal.top1_mean,
                     "top1_std": normal.top1_std, "storage_bytes": png_bytes(dset.images),
                     "time_s": time.perf_counter() - t0})
        t0 = time.perf_counter()
        ceiling = full_probe(e)
        rows.append({**base, "method": "full-data probe", "fit_on": None, "top1": ceiling.top1_mean,
                     "top1_std": ceiling.top1_std, "storage_bytes": dataset_bytes(sides[e].train),
                     "time_s": time.perf_counter() - t0})
    columns = ["distill_backbone", "eval_backbone", "method", "fit_on", "top1", "top1_std", "golden_top1", "alpha",
               "projector_r2", "identity_gap", "storage_bytes", "time_s"]
    return pd.DataFrame(rows, columns=columns)


def summary(table: "pd.DataFrame") -> "pd.DataFrame":
    """One row per (φ_d, φ_e) pair of a :func:`comparison` table: top-1 of the inherited classifier per fit
    set (``inherited``, ``inherited_random``, ``inherited_centroids`` where present), the ``normal_probe``,
    the ``full_data`` probe on φ_e, ``of_full_data`` = 100 · inherited / full_data, ``over_normal`` =
    inherited − normal_probe and, where P was also fitted on random real images (the same count when
    :func:`comparison`'s ``ipc`` is the distilled set's), the gain over random ``over_random`` = inherited −
    inherited_random (points)."""
    import pandas as pd

    rows = []
    for (d, e), g in table.groupby(["distill_backbone", "eval_backbone"], sort=False):
        row: dict[str, Any] = {"distill_backbone": d, "eval_backbone": e}
        for _, r in g.iterrows():
            if r["method"] == "inherited":
                row["inherited" if r["fit_on"] == "distilled" else f"inherited_{r['fit_on']}"] = r["top1"]
            else:
                row["normal_probe" if r["method"] == "normal probe" else "full_data"] = r["top1"]
        if "inherited" in row:
            row["of_full_data"] = 100.0 * row["inherited"] / row["full_data"]
            row["over_normal"] = row["inherited"] - row["normal_probe"]
            if "inherited_random" in row:
                row["over_random"] = row["inherited"] - row["inherited_random"]
        rows.append(row)
    return pd.DataFrame(rows)


_SHORT = {"top1": "top-1", "top1_std": "± std", "golden_top1": "golden", "alpha": "α", "projector_r2": "R²",
          "identity_gap": "‖A−I‖/‖I‖", "storage_bytes": "kB kept"}


def compact(table: "pd.DataFrame") -> "pd.DataFrame":
    """A :func:`comparison` table narrow enough for a book page: indexed by (φ_d, φ_e, classifier), where the
    classifier names the fit set of an inherited one, short column names, kilobytes instead of bytes, and no
    ``time_s``. The numbers are the table's own."""
    out = table.copy()
    out["classifier"] = [f"inherited, P on {f}" if m == "inherited" else m
                         for m, f in zip(out["method"], out["fit_on"])]
    out["storage_bytes"] = out["storage_bytes"] / 1000.0
    out = out.rename(columns={"distill_backbone": "φ_d", "eval_backbone": "φ_e", **_SHORT})
    return out.set_index(["φ_d", "φ_e", "classifier"])[list(_SHORT.values())]
