"""Named recipes: the distillation settings of one measured setting, kept in one place.

A recipe fixes how SFM optimises the images (steps, views per step, running average, start, crop and
noise of the augmentation, parameterisation, learning rate and its schedule); the run itself (data,
backbone, resolution, IPC, seed) is chosen separately. Each recipe is named for the setting on which it
was measured:

- ``fmnist-lite0-64`` (the default): what measured best on the validation split of the offline default,
  Fashion-MNIST with EfficientNet-Lite0 at 64 px (chapters 2 and 3): plain pixels, Adam lr 0.05, real-image
  start, two views per step for 500 steps with a running average of the class means (β = 0.7), crops of
  30–100 %, no noise. Two views for 500 steps beat one view for 1000 (as many backbone passes, and less
  time) on validation; chapter 3's ablation of the views shows both in every build.
- ``paper``: the papers' ImageNet settings (method.md §4): a pyramid with a new level every 200 steps,
  Adam lr 2e-3, 5000 steps, noise start, crops of 8–100 %, noise with p = .5, one view per step, no
  running average.

``sfm_kwargs(name, **overrides)`` gives the keyword arguments of :func:`sfm_lib.distill.sfm`;
``describe(name, **overrides)`` the one-line summary that the command line prints and stores.

:func:`run` is what the command line and every chapter build a distillation from: a recipe (its name plus
overrides of any of its settings) and the run's own crop size and memory plan, as one :class:`Run`. So
``distill --preset paper --resolution 256 --crop 224 --two-pass`` and a chapter executed with the
``in1k-*`` preset build the same :class:`~sfm_lib.distill.DistillConfig`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from .augment import Augment

__all__ = ["Recipe", "RECIPES", "DEFAULT", "get", "sfm_kwargs", "describe", "Run", "run"]


@dataclass(frozen=True)
class Recipe:
    """Distillation settings of one named recipe.

    ``crop_scale`` is the smallest area fraction of the random resized crop (the largest is 1) and
    ``noise_p`` the probability of additive N(0.5, 0.2²) noise per view; together they build the
    :class:`~sfm_lib.augment.Augment` (flip p .5 always)."""

    name: str
    measured_on: str
    steps: int
    augs: int
    ema: float
    init: str
    crop_scale: float
    noise_p: float
    param: str
    lr: float
    schedule: str = "constant"
    grow_every: int = 200

    def __post_init__(self) -> None:
        problems = [f"{key} must be {rule}, got {getattr(self, key)!r}" for key, ok, rule in [
            ("steps", self.steps >= 0, "≥ 0"), ("augs", self.augs >= 1, "≥ 1"),
            ("grow_every", self.grow_every >= 1, "≥ 1"), ("lr", self.lr > 0, "> 0")] if not ok]
        if not 0 <= self.ema < 1:
            problems.append("ema must lie in [0, 1)")
        if not 0 < self.crop_scale <= 1 or not 0 <= self.noise_p <= 1:
            problems.append("crop_scale must lie in (0, 1] and noise_p in [0, 1]")
        for key, allowed in [("init", ("noise", "real")), ("param", ("pixels", "pyramid")),
                             ("schedule", ("constant", "cosine"))]:
            if getattr(self, key) not in allowed:
                problems.append(f"{key} must be one of {', '.join(allowed)}")
        if problems:
            raise ValueError(f"recipe {self.name!r}: " + "; ".join(problems))

    def augment(self) -> Augment:
        """Flip + random resized crop (area ``crop_scale``–1) + noise with p ``noise_p``."""
        return Augment(scale=(self.crop_scale, 1.0), noise_p=self.noise_p)

    def settings(self) -> dict[str, Any]:
        """Every setting (no name, no description), as plain JSON-able values: for metadata."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ("name", "measured_on")}

    def sfm_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`sfm_lib.distill.sfm` (``augment`` built from crop and noise;
        ``grow_every`` only for the pyramid). ``init="real"`` still needs ``init_dataset`` from the caller."""
        kw = {k: v for k, v in self.settings().items() if k not in ("crop_scale", "noise_p", "grow_every")}
        kw["augment"] = self.augment()
        if self.param == "pyramid":
            kw["grow_every"] = self.grow_every
        return kw

    def describe(self) -> str:
        """One line: the name, where it was measured, and every setting."""
        pyramid = f", a level every {self.grow_every} steps" if self.param == "pyramid" else ""
        return (f"{self.name} (measured on {self.measured_on}): {self.steps} steps, {self.param}{pyramid}, "
                f"Adam lr {self.lr:g} {self.schedule}, init {self.init}, {self.augs} view(s) per step, "
                f"ema {self.ema:g}, crop {self.crop_scale:g}-1, noise p {self.noise_p:g}")


RECIPES: dict[str, Recipe] = {r.name: r for r in [
    Recipe("fmnist-lite0-64", "Fashion-MNIST, EfficientNet-Lite0, 64 px (the offline default)",
           steps=500, augs=2, ema=0.7, init="real", crop_scale=0.3, noise_p=0.0, param="pixels", lr=0.05),
    Recipe("paper", "ImageNet-100/1k with ViT-B backbones (the papers' settings)",
           steps=5000, augs=1, ema=0.0, init="noise", crop_scale=0.08, noise_p=0.5, param="pyramid", lr=2e-3),
]}
DEFAULT = "fmnist-lite0-64"
"""The recipe used when none is named: the one that measured best on the offline default."""


def get(name: str | None = None, **overrides: Any) -> Recipe:
    """The recipe ``name`` (default :data:`DEFAULT`) with ``overrides`` replacing its settings; overrides
    that are ``None`` are ignored (so unset command-line options can be passed straight through)."""
    name = DEFAULT if name is None else name
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}")
    fields = {f.name for f in dataclasses.fields(Recipe)} - {"name", "measured_on"}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"not settings of a recipe: {', '.join(unknown)} (settings: {', '.join(sorted(fields))})")
    changed = {k: v for k, v in overrides.items() if v is not None}
    recipe = dataclasses.replace(RECIPES[name], **changed)
    if changed and any(getattr(RECIPES[name], k) != v for k, v in changed.items()):
        recipe = dataclasses.replace(recipe, name=f"{name} + " + ", ".join(
            f"{k}={v}" for k, v in changed.items() if getattr(RECIPES[name], k) != v))
    return recipe


def sfm_kwargs(name: str | None = None, **overrides: Any) -> dict[str, Any]:
    """``get(name, **overrides).sfm_kwargs()``: keyword arguments of :func:`sfm_lib.distill.sfm`."""
    return get(name, **overrides).sfm_kwargs()


def describe(name: str | None = None, **overrides: Any) -> str:
    """``get(name, **overrides).describe()``: e.g. for the command line's ``recipe: ...`` line."""
    return get(name, **overrides).describe()


@dataclass(frozen=True)
class Run:
    """A recipe and the run's own settings that do not change what is optimised: ``crop`` (the backbone input
    size of the views; None: the image resolution), ``two_pass`` and ``chunk_size`` (the memory plan; None:
    automatic, see :meth:`sfm_lib.distill.Distiller.plan_memory`)."""

    recipe: Recipe
    crop: int | None = None
    two_pass: bool | None = None
    chunk_size: int | None = None

    def sfm_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`sfm_lib.distill.sfm` (and :func:`sfm_lib.experiments.distilled`)."""
        return {**self.recipe.sfm_kwargs(), "crop": self.crop, "two_pass": self.two_pass,
                "chunk_size": self.chunk_size}

    def lgm_kwargs(self, augs: int | None = None) -> dict[str, Any]:
        """Keyword arguments of :func:`sfm_lib.distill.lgm`: the same images, optimiser and augmentation, no
        running average (an SFM setting), ``augs`` copies of the synthetic set per step (default the recipe's)."""
        kw = self.sfm_kwargs()
        kw.pop("ema")
        if augs is not None:
            kw["augs"] = augs
        return kw

    def at_steps(self, steps: int) -> "Run":
        """The same run for ``steps`` steps (≥ 1), named as :func:`get` names it (``"<recipe> + steps=N"``
        where N is not the recipe's own)."""
        if steps < 1:
            raise ValueError(f"steps must be ≥ 1, got {steps}")
        base = self.recipe.name.split(" + ", 1)[0]  # get's names: the registered name + the changes
        kept = {k: v for k, v in self.recipe.settings().items() if k != "steps"}
        recipe = get(base, **kept, steps=int(steps))  # steps last, as run() names them
        return dataclasses.replace(self, recipe=recipe)

    def describe(self) -> str:
        """The recipe's line, with the crop and the memory plan when they are set."""
        extra = [f"crop {self.crop} px" if self.crop else "",
                 {True: "two-pass", False: "one pass", None: ""}[self.two_pass],
                 f"chunks of {self.chunk_size} views" if self.chunk_size else ""]
        extra = [e for e in extra if e]
        return self.recipe.describe() + (f"; {', '.join(extra)}" if extra else "")


def run(name: str | None = None, overrides: Mapping[str, Any] | None = None, *, steps: int | None = None,
        crop: int | None = 0, two_pass: bool | None = None, chunk_size: int | None = 0) -> Run:
    """The :class:`Run` of recipe ``name`` with ``overrides`` of its settings (a mapping, e.g. a chapter's
    ``recipe_overrides``) and ``steps`` (None or 0: the recipe's). ``crop`` and ``chunk_size`` 0 or None:
    unset; ``two_pass`` None: automatic (a chapter passes its ``two_pass`` parameter as ``two_pass or None``)."""
    changes = dict(overrides or {})
    if steps:
        changes["steps"] = int(steps)
    if steps is not None and steps < 0:
        raise ValueError(f"steps must be ≥ 0, got {steps}")
    for key, value in (("crop", crop), ("chunk_size", chunk_size)):
        if value is not None and value < 0:
            raise ValueError(f"{key} must be ≥ 0 (0: unset), got {value}")
    return Run(get(name, **changes), crop=crop or None, two_pass=two_pass, chunk_size=chunk_size or None)
