"""A learnable toy image dataset shared by the evaluation and inheritance tests."""
from __future__ import annotations

import torch

from sfm_lib.data import TensorImageDataset


def toy_dataset(split: str, per_class: int, seed: int, classes: int = 4, side: int = 16) -> TensorImageDataset:
    """Grey noise images whose brightness and stripe pattern depend on the class (learnable, all distinct)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(classes).repeat_interleave(per_class)
    noise = torch.rand(len(labels), side, side, generator=g)
    stripes = (torch.arange(side)[None, None, :] % (labels[:, None, None] + 2) == 0).float()
    base = 0.15 + 0.2 * labels[:, None, None].float()
    images = ((0.5 * base + 0.3 * stripes + 0.2 * noise).clamp(0, 1) * 255).to(torch.uint8)
    ds = TensorImageDataset(images, labels, [f"c{i}" for i in range(classes)], f"toy{seed}")
    ds.split = split
    return ds


def one_and_two_pass(backbone, make_objective, num_classes: int, resolution: int):
    """The loss and pixel gradient of one loop step (2 images per class, 2 views each, chunks of 5 views)
    with the one-pass and with the two-pass backward, for a fresh objective each (``make_objective()``,
    whose ``begin_step`` is called): ``(losses, grads)``, one-pass first."""
    from sfm_lib import distill
    from sfm_lib.augment import Augment
    from sfm_lib.images import make_images

    losses, grads = [], []
    for two_pass in (False, True):
        obj = make_objective()
        obj.begin_step()
        images = make_images("pixels", 2 * num_classes, resolution, generator=torch.Generator().manual_seed(1))
        aug = Augment()
        params = aug.sample(4 * num_classes, torch.Generator().manual_seed(7))
        labels, slots = torch.arange(num_classes).repeat_interleave(2), torch.arange(2).repeat(num_classes)
        losses.append(float(distill.step_gradient(images, backbone, obj, aug, params, labels, slots, 2, resolution,
                                                  two_pass=two_pass, chunk_size=5)))
        grads.append(images.pixels.grad.clone())
    return losses, grads
