"""A generated image folder of mixed sizes and modes (ImageNet's layout), shared by the tests that run the
command line and the chapters on it."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

MODES = ("RGB.jpg", "L.jpg", "CMYK.jpg", "RGBA.png", "P.png", "I;16.png", "LA.png", "RGB.png")


def _image(rng: np.random.Generator, mode: str, w: int, h: int, tint: np.ndarray) -> Image.Image:
    """Smooth colours (they survive JPEG) plus a class tint, in ``mode``."""
    yy, xx = np.mgrid[0:h, 0:w]
    phase = rng.uniform(0, 6.28, 3)
    rgb = np.stack([127 + 90 * np.sin(xx / (7 + 3 * k) + yy / (11 + k) + phase[k]) for k in range(3)], -1)
    rgb = np.clip(rgb + tint, 0, 255).astype(np.uint8)
    im = Image.fromarray(rgb)
    if mode == "I;16":
        return Image.fromarray((rgb.mean(-1) * 257).astype(np.uint16))
    if mode == "P":
        return im.quantize(16)
    return im.convert(mode)


def mixed_folder(root: Path, classes: int = 3, per_class: int = 8, test_per_class: int = 3, seed: int = 0,
                 sides: tuple[int, int] = (40, 96)) -> Path:
    """``root/{train,test}/class<k>/*``: every image of its own size (each side uniform in ``sides``) and, in
    turn, one of :data:`MODES` (RGB, grey and CMYK JPEGs; RGBA, palette, 16-bit grey, grey+alpha and RGB
    PNGs). Returns ``root``."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", per_class), ("test", test_per_class)):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            tint = np.array([60 * (c % 3) - 60, 40 * ((c + 1) % 3) - 40, 30 * (c % 2)])
            for k in range(n):
                mode, ext = MODES[(k + c) % len(MODES)].rsplit(".", 1)
                w, h = (int(v) for v in rng.integers(sides[0], sides[1] + 1, 2))
                im = _image(rng, mode, w, h, tint)
                im.save(folder / f"{k:03d}_{mode.replace(';', '')}.{ext}", **({"quality": 92} if ext == "jpg" else {}))
    return root
