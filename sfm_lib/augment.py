"""Differentiable, reproducible image augmentation, split into ``sample`` and ``apply`` (method.md §4).

``Augment.sample`` draws all randomness of a batch into an ``AugmentParams`` (affine matrices,
noise flags, per-image noise seeds); ``Augment.apply`` is then a deterministic, differentiable
function of the images. The output of image i depends only on image i and row i of the params,
so a batch may be processed in chunks (e.g. a two-pass backward that re-forwards chunk by chunk)
and reproduce exactly the same views.

Geometry, in the normalised coordinates of ``F.affine_grid`` (image spans [−1, 1]): an output
location u maps to the input location θ·[u; 1] with θ = [[σ·w, 0, t_x], [0, h, t_y]], where w, h
are the crop width/height as fractions of the side, (t_x, t_y) the crop centre and σ = −1 for a
horizontal flip, +1 otherwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["AugmentParams", "Augment"]

_PADDING = "border"
"""grid_sample padding. Sampled crops lie inside [−1, 1], so padding is only consulted within
half a pixel of the border, where "border" and "reflection" agree (both use the edge pixel) and
"zeros" would darken the edges. "border" also replicates edges, rather than inventing mirrored
content, if a caller passes a zoom-out θ."""


@dataclass
class AugmentParams:
    """Per-image augmentation parameters of a batch of N images.

    theta: [N, 2, 3] affine matrices for ``F.affine_grid`` (flip = negative x scale);
    noise: [N] bool, whether noise is added; noise_seed: [N] int64 seeds of the per-image noise.
    """

    theta: Tensor
    noise: Tensor
    noise_seed: Tensor

    def __len__(self) -> int:
        return self.theta.shape[0]

    def select(self, idx: int | slice | Tensor | list[int]) -> AugmentParams:
        """Rows ``idx`` (an int keeps the batch dimension)."""
        if isinstance(idx, int):
            idx = slice(idx, idx + 1) if idx != -1 else slice(-1, None)
        return AugmentParams(self.theta[idx], self.noise[idx], self.noise_seed[idx])

    __getitem__ = select

    def to(self, device: torch.device | str) -> AugmentParams:
        """Copy to ``device``."""
        return AugmentParams(self.theta.to(device), self.noise.to(device), self.noise_seed.to(device))

    @staticmethod
    def cat(params: list[AugmentParams]) -> AugmentParams:
        """Concatenate along the batch dimension."""
        return AugmentParams(torch.cat([p.theta for p in params]),
                             torch.cat([p.noise for p in params]),
                             torch.cat([p.noise_seed for p in params]))


@dataclass
class Augment:
    """Flip (p .5) + random resized crop + additive Gaussian noise N(noise_mean, noise_std²) with p noise_p.

    Crop: area fraction s ~ U(scale), log aspect ratio log r ~ U(log ratio), w = min(√(s·r), 1),
    h = min(√(s/r), 1) (fractions of the side, so the area is w·h ≤ s), centre uniform such that the
    crop stays inside the image.
    """

    flip: bool = True
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    noise_p: float = 0.5
    noise_mean: float = 0.5
    noise_std: float = 0.2

    @classmethod
    def probe(cls) -> Augment:
        """Evaluation-probe preset: flip + random resized crop, no noise."""
        return cls(noise_p=0.0)

    @classmethod
    def none(cls) -> Augment:
        """Identity preset: full image, no flip, no noise (``apply`` is then a bilinear resize)."""
        return cls(flip=False, scale=(1.0, 1.0), ratio=(1.0, 1.0), noise_p=0.0)

    def sample(self, n: int, generator: torch.Generator) -> AugmentParams:
        """Draw the parameters of ``n`` images from ``generator`` (tensors on its device)."""
        dev = generator.device

        def uniform(lo: float, hi: float) -> Tensor:
            return lo + (hi - lo) * torch.rand(n, generator=generator, device=dev, dtype=torch.float64)

        s = uniform(*self.scale)
        r = torch.exp(uniform(math.log(self.ratio[0]), math.log(self.ratio[1])))
        w = torch.sqrt(s * r).clamp(max=1.0)
        h = torch.sqrt(s / r).clamp(max=1.0)
        tx = (1.0 - w) * (2.0 * torch.rand(n, generator=generator, device=dev, dtype=torch.float64) - 1.0)
        ty = (1.0 - h) * (2.0 * torch.rand(n, generator=generator, device=dev, dtype=torch.float64) - 1.0)
        flip_u = torch.rand(n, generator=generator, device=dev)
        sign = torch.where(flip_u < 0.5, -1.0, 1.0).double() if self.flip else torch.ones_like(w)
        noise_u = torch.rand(n, generator=generator, device=dev)
        seeds = torch.randint(0, 2**62, (n,), generator=generator, device=dev, dtype=torch.int64)
        zero = torch.zeros_like(w)
        theta = torch.stack([torch.stack([sign * w, zero, tx], -1),
                             torch.stack([zero, h, ty], -1)], -2).float()
        return AugmentParams(theta, noise_u < self.noise_p, seeds)

    def apply(self, images: Tensor, params: AugmentParams, size: int) -> Tensor:
        """Views [N, C, size, size] of ``images`` [N, C, H, W]; differentiable w.r.t. ``images``.

        Bilinear ``grid_sample`` (align_corners=False, padding "border") on the grid of θ, then for
        rows with ``noise`` add ``noise_mean + noise_std·ε``, ε ~ N(0, I) drawn (in float32) from a
        generator on the images' device seeded with ``noise_seed[i]``: row i is independent of the
        other rows in the call.
        """
        n = images.shape[0]
        if len(params) != n:
            raise ValueError(f"{len(params)} parameter rows for {n} images")
        theta = params.theta.to(device=images.device, dtype=images.dtype)
        grid = F.affine_grid(theta, [n, images.shape[1], size, size], align_corners=False)
        out = F.grid_sample(images, grid, mode="bilinear", padding_mode=_PADDING, align_corners=False)
        rows = params.noise.nonzero().flatten().tolist()
        if rows:
            seeds = params.noise_seed.tolist()
            gen = torch.Generator(device=images.device)
            eps = []
            for i in rows:
                gen.manual_seed(seeds[i])
                eps.append(torch.randn(out.shape[1:], generator=gen, device=images.device))
            noise = torch.zeros_like(out)
            noise[rows] = self.noise_mean + self.noise_std * torch.stack(eps).to(out.dtype)
            out = out + noise
        return out

    def __call__(self, images: Tensor, size: int, generator: torch.Generator) -> Tensor:
        """``apply(images, sample(len(images), generator), size)``."""
        return self.apply(images, self.sample(images.shape[0], generator), size)
