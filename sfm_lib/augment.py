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

Noise is counter-based, so a whole batch is drawn at once on the images' device with no host
synchronisation: the pixel pair (2m, 2m+1) of view i gets the 32 bits h = H(H(m) xor k_i), with
k_i = H(H(lo(s_i)) xor hi(s_i)) for the view's 64-bit seed s_i and H the 32-bit integer hash
``lowbias32`` (C. Wellons), computed exactly in int64 tensor arithmetic. The high and low 16 bits of
h give uniforms u, v ∈ (0, 1) (cell midpoints), and Box–Muller gives the pair
ε = √(−2 ln u)·(cos 2πv, sin 2πv). ε of view i is a function of s_i alone. (16-bit u caps |ε| at
4.85, a tail of probability 1.2·10⁻⁶ under N(0, 1): immaterial for augmentation noise, and half the
hashing of two 32-bit draws per pair.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["AugmentParams", "Augment", "gaussian_noise", "hash32"]

_PADDING = "border"
"""grid_sample padding. Sampled crops lie inside [−1, 1], so padding is only consulted within
half a pixel of the border, where "border" and "reflection" agree (both use the edge pixel) and
"zeros" would darken the edges. "border" also replicates edges, rather than inventing mirrored
content, if a caller passes a zoom-out θ."""

_M32 = 0xFFFFFFFF
_NOISE_BLOCK = 1 << 23
"""Pixel pairs per block of the noise computation: bounds its int64 temporaries (≈ 2 × 64 MiB)."""


def _mul32_(x: Tensor, c: int) -> Tensor:
    """x ← (x·c) mod 2³² in place, for int64 ``x`` holding values in [0, 2³²) and a 32-bit constant c.

    With c = c₀ + 2³¹·c₁ (c₀ < 2³¹): x·c₀ < 2⁶³ never overflows int64, and x·2³¹ ≡ (x mod 2)·2³¹."""
    low, top = c & 0x7FFFFFFF, c >> 31
    if top:
        odd = (x & 1) << 31
        return x.mul_(low).add_(odd).bitwise_and_(_M32)
    return x.mul_(low).bitwise_and_(_M32)


def hash32(x: Tensor) -> Tensor:
    """``lowbias32`` of every element of an int64 tensor of values in [0, 2³²) → values in [0, 2³²).

    x ^= x >> 16; x *= 0x7feb352d; x ^= x >> 15; x *= 0x846ca68b; x ^= x >> 16 (mod 2³²): a bijection of
    the 32-bit integers with near-ideal avalanche. Non-negative operands, so ``>>`` is a logical shift."""
    x = x.bitwise_xor(x >> 16)
    x = _mul32_(x, 0x7FEB352D)
    x.bitwise_xor_(x >> 15)
    x = _mul32_(x, 0x846CA68B)
    return x.bitwise_xor_(x >> 16)


def _view_keys(seeds: Tensor) -> Tensor:
    """32-bit key k_i = H(H(lo(s_i)) xor hi(s_i)) of every 64-bit view seed (int64 [N] → int64 [N])."""
    seeds = seeds.to(torch.int64)
    return hash32(hash32(seeds & _M32).bitwise_xor_((seeds >> 32) & _M32))


def gaussian_noise(seeds: Tensor, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> Tensor:
    """Standard normal noise [N, *shape] on the device of ``seeds`` [N] (int64): row i depends on seeds[i]
    only (see the module doc), so any subset of rows reproduces the same rows of a larger call.

    Vectorised, no host synchronisation; rows are processed in blocks of ≈ 2²⁴ elements (not per image)."""
    n, m = seeds.shape[0], math.prod(shape)
    pairs = (m + 1) // 2
    dev = seeds.device
    keys = _view_keys(seeds.to(dev))
    base = hash32(torch.arange(pairs, device=dev, dtype=torch.int64))  # H(m), shared by all views
    out = torch.empty(n, pairs, 2, device=dev, dtype=torch.float32)
    rows = max(1, _NOISE_BLOCK // pairs)
    for a in range(0, n, rows):
        h = hash32(base[None, :].bitwise_xor(keys[a:a + rows, None]))
        u = (h >> 16).to(torch.float32).add_(0.5).mul_(2.0 ** -16)
        v = (h & 0xFFFF).to(torch.float32).add_(0.5).mul_(2.0 * math.pi * 2.0 ** -16)  # 2πv
        del h
        radius = u.log_().mul_(-2.0).sqrt_()
        torch.stack((radius * torch.cos(v), radius.mul_(torch.sin(v))), dim=-1, out=out[a:a + rows])
    return out.view(n, 2 * pairs)[:, :m].reshape(n, *shape).to(dtype)


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
        rows with ``noise`` add ``noise_mean + noise_std·ε``, ε = :func:`gaussian_noise` of
        ``noise_seed[i]`` (float32, then the images' dtype): row i is independent of the other rows in
        the call. With ``noise_p`` = 0 no noise is added, whatever the flags. No host synchronisation.
        """
        n = images.shape[0]
        if len(params) != n:
            raise ValueError(f"{len(params)} parameter rows for {n} images")
        theta = params.theta.to(device=images.device, dtype=images.dtype)
        grid = F.affine_grid(theta, [n, images.shape[1], size, size], align_corners=False)
        out = F.grid_sample(images, grid, mode="bilinear", padding_mode=_PADDING, align_corners=False)
        if self.noise_p > 0:  # a setting, not data: no host synchronisation
            eps = gaussian_noise(params.noise_seed.to(out.device), tuple(out.shape[1:]), out.dtype)
            on = params.noise.to(device=out.device, dtype=out.dtype).view(n, 1, 1, 1)
            out = out + on * (self.noise_mean + self.noise_std * eps)
        return out

    def __call__(self, images: Tensor, size: int, generator: torch.Generator) -> Tensor:
        """``apply(images, sample(len(images), generator), size)``."""
        return self.apply(images, self.sample(images.shape[0], generator), size)
