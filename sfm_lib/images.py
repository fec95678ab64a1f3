"""Synthetic-image parameterisations (method.md §4).

Every parameterisation is an ``nn.Module`` whose ``decode()`` returns images [N, 3, R, R] in
[0, 1]. A module may hold only the rows ``rows`` = [lo, hi) of a set of N images (under torchrun each rank
owns its block of classes): it then decodes those rows, and every random draw (the noise start, a new
pyramid level) is made for all N images and cut to the rows, so the rows equal those of the whole set. ``PixelImages`` decodes x = sigmoid(2p). ``PyramidImages`` stores a Laplacian-like pyramid
of levels at sides 1, 2, 4, …, R, decodes x = sigmoid(2·M·Σ_l up(P_l)) with M a fixed colour
decorrelation, and grows one level at a time during optimisation. The number of levels is saved in
the module's extra state, so ``state_dict`` round-trips through ``torch.save`` /
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "COLOR_CORRELATION",
    "color_matrix",
    "SyntheticImages",
    "PixelImages",
    "PyramidImages",
    "make_images",
    "pyramid_sizes",
]

COLOR_CORRELATION = ((0.26, 0.09, 0.02), (0.27, 0.00, -0.05), (0.27, -0.09, 0.03))
"""Raw 3×3 colour matrix of the pyramid decoder (rows = output channels)."""


def color_matrix(dtype: torch.dtype = torch.float32) -> Tensor:
    """M = A / max_j ‖A[:, j]‖ with A = COLOR_CORRELATION; applied as out_c = Σ_j M[c, j]·in_j."""
    a = torch.tensor(COLOR_CORRELATION, dtype=torch.float64)
    return (a / a.norm(dim=0).max()).to(dtype)


def pyramid_sizes(resolution: int) -> list[int]:
    """Level sides 1, 2, 4, … (< resolution), then exactly ``resolution``."""
    if resolution < 1:
        raise ValueError(f"resolution must be ≥ 1, got {resolution}")
    sizes, s = [], 1
    while s < resolution:
        sizes.append(s)
        s *= 2
    return sizes + [resolution]


def _resize(x: Tensor, size: int) -> Tensor:
    """Bilinear resize to size×size (align_corners=False, antialiased when shrinking)."""
    if x.shape[-2:] == (size, size):
        return x
    shrink = x.shape[-1] > size or x.shape[-2] > size
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)


def _logit_half(x: Tensor, eps: float) -> Tensor:
    """Inverse of sigmoid(2p): p = logit(clamp(x, eps, 1 − eps)) / 2."""
    return torch.logit(x.clamp(eps, 1 - eps)) / 2


def _randn(shape: tuple[int, ...], generator: torch.Generator | None) -> Tensor:
    dev = generator.device if generator is not None else "cpu"
    return torch.randn(shape, generator=generator, device=dev)


def _rows_of(num_images: int, rows: tuple[int, int] | None) -> tuple[int, int]:
    lo, hi = (0, num_images) if rows is None else (int(rows[0]), int(rows[1]))
    if not 0 <= lo < hi <= num_images:
        raise ValueError(f"rows must be [lo, hi) with 0 ≤ lo < hi ≤ {num_images}, got [{lo}, {hi})")
    return lo, hi


class SyntheticImages(nn.Module):
    """Base class: rows [lo, hi) = ``rows`` (default: all) of ``num_images`` learnable images of side
    ``resolution``; ``decode()`` ∈ [0, 1] gives the hi − lo images held (:attr:`num_rows`)."""

    def __init__(self, num_images: int, resolution: int, rows: tuple[int, int] | None = None) -> None:
        super().__init__()
        if num_images < 1 or resolution < 1:
            raise ValueError(f"need num_images ≥ 1 and resolution ≥ 1, got {num_images}, {resolution}")
        self.num_images = int(num_images)
        self.resolution = int(resolution)
        self.rows = _rows_of(self.num_images, rows)

    @property
    def num_rows(self) -> int:
        """The number of images this module holds, hi − lo."""
        return self.rows[1] - self.rows[0]

    def _draw(self, shape: tuple[int, ...], generator: torch.Generator | None) -> Tensor:
        """randn of ``shape`` for all N images, cut to the held rows (the same numbers as one whole set's)."""
        lo, hi = self.rows
        full = _randn((self.num_images, *shape), generator)
        return full if (lo, hi) == (0, self.num_images) else full[lo:hi].clone()

    def decode(self, rows: list[Tensor] | None = None) -> Tensor:
        """Images [hi − lo, 3, R, R] in [0, 1]. ``rows``: decode these parameter tensors instead of the module's
        own (same order as ``parameters()``, any number of rows) — used to decode a chunk of images
        from row slices that are their own autograd leaves."""
        raise NotImplementedError

    def forward(self) -> Tensor:
        return self.decode()

    def grow(self, step: int) -> bool:
        """Called before optimisation step ``step``; True if the parameter set changed (re-create the optimizer)."""
        return False

    def final_numel(self) -> int:
        """Parameter count once the images have grown to their last form (the whole run's maximum)."""
        return sum(p.numel() for p in self.parameters())

    def get_extra_state(self) -> dict[str, Any]:
        return {"num_images": self.num_images, "resolution": self.resolution}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        got = (state["num_images"], state["resolution"])
        if got != (self.num_images, self.resolution):
            raise ValueError(f"checkpoint holds {got[0]} images at {got[1]}px, module "
                             f"{self.num_images} at {self.resolution}px")

    def _check_init(self, init: Tensor) -> Tensor:
        """``init``: the start images of the held rows, [hi − lo, 3, H, W] in [0, 1], resized to R."""
        if init.dim() != 4 or init.shape[0] != self.num_rows or init.shape[1] != 3:
            raise ValueError(f"init must be [{self.num_rows}, 3, H, W], got {tuple(init.shape)}")
        return _resize(init.detach().float(), self.resolution)


class PixelImages(SyntheticImages):
    """Plain pixels: parameter p [N, 3, R, R], x = sigmoid(2p).

    Random init p ~ N(0, init_std²); from real images x ∈ [0, 1] (resized to R bilinearly):
    p = logit(clamp(x, init_eps, 1 − init_eps)) / 2.
    """

    def __init__(self, num_images: int, resolution: int, init: Tensor | None = None,
                 generator: torch.Generator | None = None, init_std: float = 1.0,
                 init_eps: float = 1e-3, rows: tuple[int, int] | None = None) -> None:
        super().__init__(num_images, resolution, rows)
        if init is None:
            p = init_std * self._draw((3, resolution, resolution), generator)
        else:
            p = _logit_half(self._check_init(init), init_eps)
        self.pixels = nn.Parameter(p)

    def decode(self, rows: list[Tensor] | None = None) -> Tensor:
        return torch.sigmoid(2 * (self.pixels if rows is None else rows[0]))


class PyramidImages(SyntheticImages):
    """Multi-scale pyramid with colour decorrelation.

    Levels P_l [N, 3, s_l, s_l] with s_l in ``pyramid_sizes(R)``. Decode::

        y = Σ_l up_R(P_l)            (bilinear, align_corners=False)
        z_c = Σ_j M[c, j] · y_j      (M = color_matrix(), or I if decorrelate=False)
        x = sigmoid(2z)

    Random init starts with the 1×1 level only (randn); ``grow(step)`` adds the next level every
    ``grow_every`` steps: old levels ×k/(k+1), new level randn/(k+1), k = current level count.
    Init from real images x: all levels at once, z = logit(x)/2, y = M⁻¹z, and y is split
    Laplacian-style: P_0 = avgpool_{s_0}(y), P_l = avgpool_{s_l}(y − Σ_{m<l} up(P_m)), the finest
    level holding the remaining residual, so decode() reproduces x (up to the eps clamp).
    """

    def __init__(self, num_images: int, resolution: int, grow_every: int = 200,
                 init: Tensor | None = None, generator: torch.Generator | None = None,
                 decorrelate: bool = True, init_eps: float = 1e-3, rows: tuple[int, int] | None = None) -> None:
        super().__init__(num_images, resolution, rows)
        if grow_every < 1:
            raise ValueError(f"grow_every must be ≥ 1, got {grow_every}")
        self.grow_every = int(grow_every)
        self.decorrelate = bool(decorrelate)
        self.generator = generator
        self.sizes = pyramid_sizes(resolution)
        m = color_matrix() if decorrelate else torch.eye(3)
        self.register_buffer("color", m, persistent=False)
        self.levels = nn.ParameterList()
        if init is None:
            self.levels.append(nn.Parameter(self._draw((3, 1, 1), generator)))
        else:
            z = _logit_half(self._check_init(init), init_eps)
            residual = torch.einsum("cj,njhw->nchw", torch.linalg.inv(m.double()).to(z.device), z.double())
            for s in self.sizes:
                level = F.adaptive_avg_pool2d(residual, s) if s != self.resolution else residual
                residual = residual - self._up(level)
                self.levels.append(nn.Parameter(level.float()))

    @property
    def num_levels(self) -> int:
        return len(self.levels)

    def final_numel(self) -> int:
        """(hi − lo) · 3 · Σ_l s_l²: every level of the held rows, also while only the first ones exist."""
        return self.num_rows * 3 * sum(s * s for s in self.sizes)

    def _up(self, level: Tensor) -> Tensor:
        r = self.resolution
        if level.shape[-1] == r:
            return level
        return F.interpolate(level, size=(r, r), mode="bilinear", align_corners=False)

    def decode(self, rows: list[Tensor] | None = None) -> Tensor:
        y = sum(self._up(p) for p in (self.levels if rows is None else rows))
        z = torch.einsum("cj,njhw->nchw", self.color.to(y.dtype), y)
        return torch.sigmoid(2 * z)

    def grow(self, step: int) -> bool:
        """At step > 0 with step % grow_every == 0 and levels missing: add one level (drawn for all N images,
        the held rows kept); return True."""
        k = self.num_levels
        if step <= 0 or step % self.grow_every or k >= len(self.sizes):
            return False
        s = self.sizes[k]
        ref = self.levels[0]
        with torch.no_grad():
            for p in self.levels:
                p.mul_(k / (k + 1))
        new = self._draw((3, s, s), self.generator) / (k + 1)
        self.levels.append(nn.Parameter(new.to(device=ref.device, dtype=ref.dtype)))
        return True

    def get_extra_state(self) -> dict[str, Any]:
        return {**super().get_extra_state(), "num_levels": self.num_levels}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        """Restore the level count (runs before the levels' tensors are loaded, so their shapes match)."""
        super().set_extra_state(state)
        k = int(state["num_levels"])
        if not 1 <= k <= len(self.sizes):
            raise ValueError(f"num_levels {k} outside [1, {len(self.sizes)}]")
        ref = self.levels[0]
        if self.num_levels > k:
            self.levels = nn.ParameterList(list(self.levels)[:k])
        while self.num_levels < k:
            s = self.sizes[self.num_levels]
            self.levels.append(nn.Parameter(ref.new_zeros(self.num_rows, 3, s, s)))


_KINDS = {"pyramid": PyramidImages, "pixels": PixelImages}


def make_images(kind: str, num_images: int, resolution: int, *, init: Tensor | None = None,
                generator: torch.Generator | None = None, rows: tuple[int, int] | None = None,
                **kw: Any) -> SyntheticImages:
    """Build a parameterisation by name: "pyramid" or "pixels" (extra keywords go to its constructor);
    ``rows`` = [lo, hi): hold only those rows of the ``num_images`` (``init``: their start images)."""
    if kind not in _KINDS:
        raise ValueError(f"unknown image kind {kind!r}; valid kinds: {sorted(_KINDS)}")
    return _KINDS[kind](num_images, resolution, init=init, generator=generator, rows=rows, **kw)
