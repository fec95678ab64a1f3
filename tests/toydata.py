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
