"""Experiments as single calls: what every chapter does first, cached distillations, and sweeps.

- :func:`prepare` loads the data, the frozen backbone and the class statistics (cached on disk, so a
  later chapter does not redo the first chapter's pass).
- :func:`distilled` runs :func:`sfm_lib.distill.sfm` (or ``lgm``), or returns the result of an identical earlier call.
- :func:`sweep` distils and probes a set of variants and returns a tidy table; :data:`ABLATIONS` holds the
  standard ones (augmented views, smoothing, parameterisation, loss, sub-class targets, IPC), and
  :func:`ablation_table` runs several of them over a recipe.
- :func:`method_comparison` sets methods side by side at equal steps and at equal time;
  :func:`comparison_methods` are chapter 4's.
- ``recorded_*`` read the runs committed under ``results/`` (each with the command that made it);
  :func:`setting` is what a recording must share with a chapter to be shown in it.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

import torch
from torch.utils.data import Dataset

from . import backbones, cache, clp, data, distill, evaluate, features, stats, unrolled
from .augment import Augment
from .utils import resolve_device

if TYPE_CHECKING:
    import pandas as pd

    from . import recipes

__all__ = ["Context", "prepare", "distilled", "equal_time_steps", "step_seconds", "sweep", "ABLATIONS",
           "REFINE_FRACTION", "REFINE_LR", "REFINE_AUGS"]

ABLATIONS: dict[str, dict[str, dict[str, Any]]] = {
    "augs": {"A=1": {"augs": 1}, "A=2": {"augs": 2}},
    "ema": {"no smoothing": {"ema": 0.0}, "smoothed, β=0.7": {"ema": 0.7}},
    "init": {"centroid images": {"init": "centroids"}, "random real images": {"init": "real"},
             "noise": {"init": "noise"}},
    "noise": {"no noise": {"noise_p": 0.0}, "noise p=0.5": {"noise_p": 0.5}},
    "crop": {"crop area 30-100%": {"crop_scale": 0.3}, "crop area 8-100%": {"crop_scale": 0.08}},
    "param": {"pixels": {"param": "pixels", "lr": distill.DEFAULT_LR["pixels"]},
              "pyramid": {"param": "pyramid", "lr": distill.DEFAULT_LR["pyramid"]}},  # each at its own rate
    "loss": {"flow (SFM)": {"loss": "flow"}, "class-mean MSE (decoupled)": {"loss": "mse"}},
    "subclass": {"class targets": {"subclass": False}, "sub-class targets": {"subclass": True}},
    "ipc": {"IPC 1": {"ipc": 1}, "IPC 10": {"ipc": 10}},
}
"""Named ablations: variant name → keyword arguments of :func:`sfm_lib.distill.sfm`."""


@dataclass
class Context:
    """A chapter's data, frozen backbone and class statistics. ``resolution`` is the backbone's input size
    (statistics, probes, test images); ``image_size`` that of the synthetic images (0: the same; the papers
    distil 256 px images and feed 224 px crops). ``val``: the validation split (held out of ``train``;
    every choice is made on it, every reported number on ``test``). ``transform``: how real images become
    the backbone's input (statistics, test, probes; None: :data:`sfm_lib.data.SQUARE`)."""

    train: Dataset
    test: Dataset
    backbone: backbones.Backbone
    stats: stats.ClassStats
    resolution: int
    image_size: int = 0
    val: Dataset | None = None
    transform: data.EvalTransform | None = None

    def __repr__(self) -> str:
        return (f"{self.train.name}: {len(self.train)} train / {len(self.test)} test images, "
                f"{len(self.train.classes)} classes; {self.backbone}; statistics at {self.resolution} px")


def prepare(dataset: str = "fashion_mnist", backbone: str = "effnet_lite0", resolution: int = 64,
            images_per_class: int = 0, device: str = "auto", download: bool = False,
            kmeans_k: int = 0, progress: bool = True, *, crop: int = 0, pretrained: bool = True,
            transform: str = "square") -> Context:
    """Load train/test data, the frozen backbone and its class statistics (computed once, then cached).

    ``resolution``: the synthetic images' size; ``crop`` (0: ``resolution``) the backbone's input size, at
    which the statistics and every probe are computed. ``pretrained=False``: random backbone weights (cost
    checks and miniature runs only). ``transform``: the test transform, a kind of
    :func:`sfm_lib.backbones.eval_transform` ("square": centre square, bilinear, the offline default;
    "paper": Resize(256) → CenterCrop(224), bicubic; "model": the backbone's own timm config).
    ``images_per_class > 0`` keeps only the first N training images of each class (quick runs).
    ``kmeans_k > 0`` adds K k-means centres per class, fitted on the cached features (sub-class targets).
    ``progress``: show a progress bar while the statistics are computed.
    In Colab ``download`` is switched on (there is internet and no local copy).
    """
    download = download or "google.colab" in sys.modules
    train = data.load(dataset, "train", download=download)
    val = data.load(dataset, "val", download=download)
    test = data.load(dataset, "test", download=download)
    if images_per_class:
        train = data.subset_per_class(train, images_per_class)
    phi = backbones.load(backbone, resolve_device(device), pretrained=pretrained)
    size = crop or resolution
    t = backbones.eval_transform(phi, transform)
    st = stats.cached_extract(phi, train, size, cache_features=True, progress=progress, transform=t)
    if kmeans_k:
        feats, labels = features.compute(phi, train, size, transform=t)
        st = dataclasses.replace(st, centres=stats.class_centres(feats, labels, st.num_classes, kmeans_k),
                                 meta={**st.meta, "kmeans_k": kmeans_k})
    return Context(train, test, phi, st, size, resolution, val, t)


def _shorthands(kwargs: dict[str, Any], train: Dataset, crop_scale: float | None, noise_p: float | None) -> None:
    """In place: ``crop_scale`` and ``noise_p`` become the ``augment`` argument; ``init="real"`` draws from
    ``train``."""
    if crop_scale is not None or noise_p is not None:
        base = kwargs.get("augment") or Augment()
        kwargs["augment"] = dataclasses.replace(base, scale=(base.scale[0] if crop_scale is None else crop_scale,
                                                             base.scale[1]),
                                                noise_p=base.noise_p if noise_p is None else noise_p)
    if kwargs.get("init") == "real":
        kwargs.setdefault("init_dataset", train)


def _contexts(ctx: Context | Sequence[Context]) -> tuple[list[Context], Any, Any]:
    """The contexts of one backbone or several, with what :func:`sfm_lib.distill.sfm` takes for them: the
    backbone and statistics of a single context, or lists of them paired in order."""
    contexts = list(ctx) if isinstance(ctx, (list, tuple)) else [ctx]
    if not contexts:
        raise ValueError("at least one context is needed")
    if len(contexts) == 1:
        return contexts, contexts[0].backbone, contexts[0].stats
    return contexts, [c.backbone for c in contexts], [c.stats for c in contexts]


_SIGNATURES = {"sfm": inspect.signature(distill.sfm), "lgm": inspect.signature(distill.lgm),
               "clp": inspect.signature(clp.clp), "unrolled": inspect.signature(unrolled.unrolled)}


def distilled(ctx: Context | Sequence[Context], *, method: str = "sfm", crop_scale: float | None = None,
              noise_p: float | None = None, **kwargs) -> data.DistilledSet:
    """``distill.sfm(ctx.backbone, ctx.stats, resolution=ctx.resolution, **kwargs)`` (``method="lgm"``:
    ``distill.lgm(ctx.backbone, ctx.train, ...)``; ``"clp"`` and ``"unrolled"`` likewise on ``ctx.train``;
    ``"sfm+unrolled"``: SFM, then unrolled-probe matching for the last ``refine_fraction`` of the steps, see
    :func:`_refined`), cached on disk by its arguments and the statistics (LGM, CLP-DD, unrolled: the
    training set). With a ``callback`` (e.g. :class:`sfm_lib.distill.Snapshots`) the run always happens,
    since its side effects are wanted, and its result is stored for later calls. The memory plan
    (``two_pass``, ``chunk_size``) and ``compile`` are not part of the key: they do not change the result.

    Shorthands: ``crop_scale`` (smallest crop area) and ``noise_p`` build the ``augment``; ``init="real"``
    takes random images of ``ctx.train``; ``init="centroids"`` starts from the real images whose features are
    nearest the class means.

    Several backbones (SFM only): ``ctx`` a list of contexts, one per backbone, the same dataset; their
    backbones and statistics are paired in order (``backbone_weights``, ``backbone_crops`` as in
    :func:`sfm_lib.distill.sfm`); the first context gives the training images and the resolution. The key
    holds every backbone and the fingerprint of each one's statistics."""
    if method == "sfm+unrolled":
        return _refined(ctx, crop_scale=crop_scale, noise_p=noise_p, **kwargs)
    if method not in _SIGNATURES:
        raise ValueError(f"method must be one of {sorted(_SIGNATURES) + ['sfm+unrolled']}, got {method!r}")
    contexts, phi, stats = _contexts(ctx)
    if len(contexts) > 1 and method != "sfm":
        raise ValueError(f"several backbones work with method='sfm' only, got {method!r}")
    ctx = contexts[0]
    kwargs.setdefault("resolution", ctx.image_size or ctx.resolution)
    kwargs.setdefault("progress", False)
    _shorthands(kwargs, ctx.train, crop_scale, noise_p)
    source = stats if method == "sfm" else ctx.train
    # the key holds every argument of the method with its default filled in, so equal runs share one file
    bound = _SIGNATURES[method].bind_partial(phi, source, **kwargs)
    bound.apply_defaults()
    # the memory plan and compile do not change the result, so they stay out of the key
    args = {k: v for k, v in bound.arguments.items()
            if k not in ("backbone", "stats", "dataset", "callback", "progress", "compile", "two_pass", "chunk_size")
            and not (k in ("backbone_weights", "backbone_crops") and v is None)}  # None: one backbone
    init_name = "images" if isinstance(args["init"], torch.Tensor) else args["init"]
    keyed = source
    if method == "sfm" and not args.get("subclass"):  # sub-class centres only matter to sub-class targets
        keyed = [dataclasses.replace(s, centres=None) for s in source] if isinstance(source, list) else \
            dataclasses.replace(source, centres=None)
    path = cache.entry("distilled", method, backbone=phi, source=keyed, args=args)
    if path.is_file() and kwargs.get("callback") is None:
        return data.DistilledSet.load(path)
    if kwargs.get("init") == "centroids":
        nearest = evaluate.centroid_subset(ctx.backbone, ctx.train, ctx.resolution, kwargs.get("ipc", 1), ctx.stats,
                                           transform=ctx.transform)
        kwargs["init"] = data.real_images(nearest, torch.arange(len(nearest)), kwargs["resolution"])
    # looked up now, not at import (tests patch them)
    entry = {"sfm": distill.sfm, "lgm": distill.lgm, "clp": clp.clp, "unrolled": unrolled.unrolled}[method]
    result = entry(phi, source, **kwargs)
    result.meta["init"] = init_name
    result.save(path)
    return result


REFINE_FRACTION, REFINE_LR, REFINE_AUGS = 0.3, 0.01, 4
"""Ours, ``method="sfm+unrolled"``: the last 30 % of the run's steps refine SFM's images by unrolled-probe
matching at lr 0.01 with 4 views per image and step. Chosen on the validation split of the offline default
(IPC 1, 500 steps, 3 distillation seeds; chapter 4): the rate between 0.01, 0.02 and 0.003; 30 % against
50 %; 4 views against 2 (SFM's) and 8 (within the seeds' spread of 4, at twice the cost)."""


def _refined(ctx: Context | Sequence[Context], *, refine_fraction: float = REFINE_FRACTION,
             refine_lr: float = REFINE_LR, refine_augs: int | None = REFINE_AUGS, steps: int = 1000, callback=None,
             **kwargs) -> data.DistilledSet:
    """``method="sfm+unrolled"`` of :func:`distilled`: SFM for ``steps − R`` steps (``kwargs`` as for SFM),
    then :func:`sfm_lib.unrolled.unrolled` from its images for R = round(``refine_fraction``·steps) steps at
    ``refine_lr`` with ``refine_augs`` views per image and step (None: SFM's ``augs``; the same augmentation
    and seed). Both stages are cached as their own runs; a
    ``callback`` sees the steps numbered through both (0 … steps − 1), so a :class:`StepClock` times the whole."""
    if not 0 <= refine_fraction <= 1:
        raise ValueError(f"refine_fraction must lie in [0, 1], got {refine_fraction}")
    refine_steps = round(refine_fraction * steps)
    sfm_only = set(_SIGNATURES["sfm"].parameters) - set(_SIGNATURES["unrolled"].parameters)
    probe_only = set(_SIGNATURES["unrolled"].parameters) - set(_SIGNATURES["sfm"].parameters)
    first = distilled(ctx, method="sfm", steps=steps - refine_steps, callback=callback,
                      **{k: v for k, v in kwargs.items() if k not in probe_only})
    if refine_steps == 0:
        return first
    then = {k: v for k, v in kwargs.items() if k not in sfm_only | {"init", "init_dataset", "lr"}}
    if refine_augs is not None:
        then["augs"] = int(refine_augs)
    offset = steps - refine_steps
    shifted = None if callback is None else (lambda step, loss, images: callback(step + offset, loss, images))
    result = distilled(ctx, method="unrolled", steps=refine_steps, lr=refine_lr, init=first.images.clone(),
                       callback=shifted, **then)
    history = list(first.meta.get("loss_history", [])) + list(result.meta.get("loss_history", []))
    result.meta.update(method="sfm+unrolled", sfm_steps=offset, refine_steps=refine_steps, refine_lr=refine_lr,
                       refine_fraction=refine_fraction, refine_augs=then.get("augs", 1),
                       loss_history=history, steps=steps,
                       time_s=round(first.meta.get("time_s", 0.0) + result.meta.get("time_s", 0.0), 2))
    return result


def equal_time_steps(steps: int, backbones: int) -> int:
    """Steps of a run with ``backbones`` backbones at about the wall time of ``steps`` steps with one:
    ⌈steps / K⌉ for K backbones, since a step costs one forward and backward per backbone (the backbones'
    own costs differ; :func:`step_seconds` measures them)."""
    if steps < 1 or backbones < 1:
        raise ValueError(f"steps and backbones must be ≥ 1, got {steps} and {backbones}")
    return -(-steps // backbones)


def step_seconds(ctx: Context | Sequence[Context], *, steps: int = 6, repeats: int = 3, crop_scale: float | None = None,
                 noise_p: float | None = None, **kwargs) -> float:
    """Seconds per SFM step of :func:`distilled`'s run with these arguments (one backbone, or one per
    context), measured now: ``repeats`` short uncached runs of ``steps`` steps, the median of each run's
    loop time / steps. For comparing the cost of settings within one run, on one machine."""
    import statistics

    contexts, phi, stats = _contexts(ctx)
    kwargs.setdefault("resolution", contexts[0].image_size or contexts[0].resolution)
    kwargs.update(steps=steps, progress=False, checkpoint=None)
    _shorthands(kwargs, contexts[0].train, crop_scale, noise_p)
    if kwargs.get("init") == "centroids":
        kwargs["init"] = "real"  # the start does not change the cost
    times = [distill.sfm(phi, stats, **kwargs).meta["time_s"] / steps for _ in range(repeats)]
    return statistics.median(times)


def sweep(ctx: Context, variants: Mapping[str, Mapping[str, Any]], *, base: Mapping[str, Any] | None = None,
          distill_seeds: Sequence[int] = (0,), probe_seeds: Sequence[int] = (0, 1, 2), epochs: int = 1000,
          views: int = 40, progress: bool = False) -> "pd.DataFrame":
    """Distil every variant (``base`` updated by the variant's keywords) once per distillation seed, probe
    each result with ``probe_seeds``; one row per (variant, distillation seed): ``variant``,
    ``distill_seed``, ``top1_mean``, ``top1_std`` (on the test split), ``val_top1_mean`` (the same probes on
    the validation split ``ctx.val``, where choices are made; NaN without one), ``final_loss``. No timing
    column: a row may come from the cache, measured in another run under other conditions than the rows
    beside it."""
    import pandas as pd

    rows = []
    for name, kw in variants.items():
        for seed in distill_seeds:
            args = {**(base or {}), **kw, "seed": seed, "progress": progress}
            result = distilled(ctx, **args)
            probe = evaluate.linear_probe(ctx.backbone, result, ctx.test, ctx.resolution, epochs=epochs,
                                          seeds=probe_seeds, views=views, transform=ctx.transform)
            hist = result.meta.get("loss_history") or [float("nan")]
            rows.append({"variant": name, "distill_seed": seed, "top1_mean": probe.top1_mean,
                         "top1_std": probe.top1_std, "val_top1_mean": _val_top1(ctx, probe),
                         "final_loss": hist[-1]})
    return pd.DataFrame(rows)


_ABLATION_COLUMNS = ["ablation", "variant", "recipe", "distill_seed", "top1_mean", "top1_std", "val_top1_mean",
                     "final_loss"]
"""The columns of :func:`ablation_table` (and of its recordings) when there are no rows."""


def ablation_table(ctx: Context, names: Sequence[str], base: Mapping[str, Any], *,
                   distill_seeds: Sequence[int] = (0,), probe_seeds: Sequence[int] = (0, 1, 2), epochs: int = 1000,
                   views: int = 40) -> "pd.DataFrame":
    """The named :data:`ABLATIONS` over the recipe ``base``, each a :func:`sweep`, one table: the rows of
    every sweep with its name in ``ablation`` and ``recipe`` true on the variant that restates ``base``
    (which :func:`choose_on_validation` keeps unless another earns its place). The ``"augs"`` ablation has
    a third variant, one view for twice ``base["steps"]`` (as many backbone passes as two views): is the
    second view worth its cost?"""
    import pandas as pd

    unknown = [n for n in names if n not in ABLATIONS]
    if unknown:
        raise ValueError(f"unknown ablations {unknown}; choose from {', '.join(ABLATIONS)}")
    tables = []
    for name in names:
        variants = dict(ABLATIONS[name])
        if name == "augs":
            variants["A=1, twice the steps"] = {"augs": 1, "steps": 2 * base["steps"]}
        df = sweep(ctx, variants, base=base, distill_seeds=distill_seeds, probe_seeds=probe_seeds, epochs=epochs,
                   views=views)
        df["recipe"] = [_is_recipe(variants[v], base) for v in df["variant"]]
        tables.append(df.assign(ablation=name))
    return pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=_ABLATION_COLUMNS)


def _val_top1(ctx: Context, probe: "evaluate.ProbeResult") -> float:
    """Mean top-1 of the same probes on the validation split (NaN when the context has none)."""
    if ctx.val is None or len(ctx.val) == 0:
        return float("nan")
    return evaluate.score_on(probe, ctx.backbone, ctx.val, ctx.resolution, transform=ctx.transform).top1_mean


def choose_on_validation(table: "pd.DataFrame", by: str = "variant", within: str | None = None) -> "pd.DataFrame":
    """For each group ``within`` (e.g. an ablation), the row of ``by`` whose mean ``val_top1_mean`` over
    distillation seeds is highest: the choice made on validation, with its test top-1 beside it. Where the
    table marks the recipe's own rows (a boolean ``recipe`` column, as :func:`ablation_table`'s), the best
    other row replaces the recipe's only if it leads it on validation by more than the seeds' spread:
    ``lead`` = its mean − the recipe's mean (negative where the recipe is ahead) > ``spread`` = the larger
    std over distillation seeds of the two (0 with one seed). Columns: ``within`` (if given), then with a
    recipe column ``recipe``, ``other`` (that best other row), ``lead`` and ``spread``, then ``chosen``,
    ``val_top1``, ``test_top1``."""
    import pandas as pd

    keys = [within, by] if within else [by]
    grouped = table.groupby(keys, sort=False)
    means = grouped.agg(val=("val_top1_mean", "mean"), val_std=("val_top1_mean", "std"),
                        test=("top1_mean", "mean")).reset_index()
    marked = "recipe" in table.columns
    if marked:
        means["recipe"] = grouped["recipe"].any().to_numpy()
    rows = []
    for name, g in (means.groupby(within, sort=False) if within else [(None, means)]):
        pick = g.loc[g["val"].idxmax()]
        row = {within: name} if within else {}
        if marked and g["recipe"].any() and not g["recipe"].all():
            own, others = g[g["recipe"]].iloc[0], g[~g["recipe"]]
            best = others.loc[others["val"].idxmax()]
            lead, spread = best["val"] - own["val"], float(pd.Series([best["val_std"], own["val_std"]]).max())
            spread = 0.0 if spread != spread else spread  # one seed: NaN std, no spread
            pick = best if lead > spread else own
            row.update(recipe=own[by], other=best[by], lead=lead, spread=spread)
        rows.append({**row, "chosen": pick[by], "val_top1": pick["val"], "test_top1": pick["test"]})
    return pd.DataFrame(rows)


def _is_recipe(kw: Mapping[str, Any], base: Mapping[str, Any]) -> bool:
    """Whether the ablation variant ``kw`` only restates the recipe ``base`` (keyword arguments of
    :func:`distilled`): every key equals the recipe's value, its augmentation's for ``noise_p`` and
    ``crop_scale``, or :func:`sfm_lib.distill.sfm`'s default where the recipe does not set it."""
    defaults = {k: v.default for k, v in _SIGNATURES["sfm"].parameters.items()}
    aug = base.get("augment")
    for key, value in kw.items():
        if key == "noise_p" and aug is not None:
            own = aug.noise_p
        elif key == "crop_scale" and aug is not None:
            own = aug.scale[0]
        else:
            own = base.get(key, defaults.get(key))
        if own != value:
            return False
    return True


__all__ += ["StepClock", "method_comparison", "choose_on_validation", "ablation_table"]


class StepClock:
    """A distillation ``callback`` that times the run from its own creation (create it just before the
    call, so set-up counts too). Given ``budget_s`` it also keeps the images decoded after the last step
    that ended within that many seconds: ``images`` (None while no step fits), ``steps`` (how many steps
    that was) and ``elapsed_s`` (when it ended). :meth:`total_s` is the time since creation."""

    def __init__(self, budget_s: float | None = None):
        import time

        self._now = time.perf_counter
        self.budget_s, self.start = budget_s, self._now()
        self.steps, self.elapsed_s, self.images = 0, 0.0, None

    def total_s(self) -> float:
        return self._now() - self.start

    def __call__(self, step: int, loss: float, images) -> None:
        now = self.total_s()
        if self.budget_s is None or now <= self.budget_s:
            self.steps, self.elapsed_s = step + 1, now
            if self.budget_s is not None:
                with torch.no_grad():
                    self.images = images.decode().float().cpu()


def comparison_methods(recipe: "recipes.Recipe", *, lgm_augs: int = 3,
                       large: bool = False) -> dict[str, dict[str, Any]]:
    """Chapter 4's methods, as :func:`method_comparison`'s ``methods``, SFM first (the reference whose wall
    time is the equal-time budget): SFM with the recipe's views and running average, LGM with ``lgm_augs``
    copies, CLP-DD with the recipe's views, and ours (SFM refined by the unrolled probe). ``large``: the
    form of its larger IPC, every method at one view per image and step (A = 1) and SFM and ours with
    sub-class targets."""
    if large:
        one = {"augs": 1}
        return {"SFM + sub-class": dict(one, ema=recipe.ema, subclass=True), "LGM": dict(one, method="lgm"),
                "CLP-DD": dict(one, method="clp"),
                "ours + sub-class": dict(one, method="sfm+unrolled", ema=recipe.ema, subclass=True)}
    return {"SFM": dict(augs=recipe.augs, ema=recipe.ema), "LGM": dict(method="lgm", augs=lgm_augs),
            "CLP-DD": dict(method="clp", augs=recipe.augs),
            "ours": dict(method="sfm+unrolled", augs=recipe.augs, ema=recipe.ema)}


def refinement() -> dict[str, float]:
    """The settings of ours' refinement (:data:`REFINE_FRACTION`, :data:`REFINE_LR`, :data:`REFINE_AUGS` and
    the unrolled probe's steps :data:`sfm_lib.unrolled.PROBE_STEPS`), for the setting of a recorded run."""
    return {"fraction": REFINE_FRACTION, "lr": REFINE_LR, "augs": REFINE_AUGS, "probe_steps": unrolled.PROBE_STEPS}


_COMPARISON_COLUMNS = ["method", "comparison", "ipc", "distill_seed", "steps", "time_s", "top1_mean", "top1_std",
                       "val_top1_mean"]
"""The columns of :func:`method_comparison` (and of its recordings)."""


def method_comparison(ctx: Context, methods: Mapping[str, Mapping[str, Any]], *, ipc: int = 1,
                      steps: int = 300, distill_seeds: Sequence[int] = (0, 1),
                      probe_seeds: Sequence[int] = (0, 1, 2), epochs: int = 1000, views: int = 40,
                      base: Mapping[str, Any] | None = None, progress: bool = False) -> "pd.DataFrame":
    """Accuracy of several distillation methods at equal steps and at equal wall time.

    ``methods``: label → keyword arguments of :func:`distilled` (e.g. ``{"SFM": {}, "LGM": {"method":
    "lgm", "augs": 3}}``), each updated over ``base`` (the shared image parameterisation, augmentation and
    start). For every distillation seed, the first method (the reference) runs ``steps`` steps and its wall
    time T (set-up included) is the budget. Every other method also runs ``steps`` steps ("equal steps"),
    and its images after the last step that ended within T are its "equal time" result (its start images if
    no step fits; its full run if it is faster than the reference). All runs happen in this call, one after
    the other on the same machine, so their times are comparable. Each result is probed with
    ``probe_seeds`` (:func:`sfm_lib.evaluate.linear_probe`).

    One row per (method, comparison, distillation seed): ``method``, ``comparison`` ("equal steps" or
    "equal time"), ``ipc``, ``distill_seed``, ``steps``, ``time_s``, ``top1_mean``, ``top1_std`` (test split),
    ``val_top1_mean`` (the same probes on the validation split).
    """
    import pandas as pd

    if not methods:
        raise ValueError("methods is empty: give at least one label → keyword arguments")
    rows = []
    probe = dict(epochs=epochs, seeds=tuple(probe_seeds), views=views)
    for seed in distill_seeds:
        budget = None
        for label, kw in methods.items():
            args = {**(base or {}), **kw, "ipc": ipc, "steps": steps, "seed": seed, "progress": progress}
            clock = StepClock(budget)
            full = distilled(ctx, callback=clock, **args)
            runs = [("equal steps", full, steps, clock.total_s())]
            if budget is None:  # the reference sets the budget
                budget = runs[0][3]
                runs.append(("equal time", full, steps, budget))
            elif clock.steps == steps:
                runs.append(("equal time", full, steps, runs[0][3]))
            else:
                cut = distilled(ctx, **{**args, "steps": 0}) if clock.images is None else \
                    dataclasses.replace(full, images=clock.images, meta={**full.meta, "steps": clock.steps})
                runs.append(("equal time", cut, clock.steps, clock.elapsed_s))
            scores: dict[int, evaluate.ProbeResult] = {}
            for comparison, result, n, t in runs:
                if id(result) not in scores:  # the same images are probed once
                    scores[id(result)] = evaluate.linear_probe(ctx.backbone, result, ctx.test,
                                                               ctx.resolution, **probe, transform=ctx.transform)
                score = scores[id(result)]
                rows.append({"method": label, "comparison": comparison, "ipc": ipc, "distill_seed": seed,
                             "steps": n, "time_s": round(t, 2), "top1_mean": score.top1_mean,
                             "top1_std": score.top1_std, "val_top1_mean": _val_top1(ctx, score)})
    return pd.DataFrame(rows, columns=_COMPARISON_COLUMNS)


def summarise_comparison(acc: "pd.DataFrame", random_top1: float) -> "pd.DataFrame":
    """:func:`method_comparison`'s rows averaged over distillation seeds, per (comparison, method):
    ``top1`` and ``val_top1`` (means), ``seed_std`` (std of the seeds' top-1 means), ``probe_std`` (mean of
    the probes' std), ``steps``, ``time_s``, and ``gain_over_random`` = top1 − ``random_top1`` (random real
    images at the same IPC under the same probes)."""
    summary = acc.groupby(["comparison", "method"], sort=False).agg(
        top1=("top1_mean", "mean"), val_top1=("val_top1_mean", "mean"),
        seed_std=("top1_mean", "std"), probe_std=("top1_std", "mean"),
        steps=("steps", "mean"), time_s=("time_s", "mean"))
    summary["gain_over_random"] = summary["top1"] - random_top1
    return summary


__all__ += ["summarise_comparison", "recorded_costs", "recorded_full_data", "recorded_refinement",
            "recorded_ablations", "recorded_comparison", "comparison_setting", "recorded_or_run", "setting",
            "comparison_methods", "refinement", "write_recording"]


def _recorded_json(folder: str | None, default: str) -> Iterator[tuple[str, Any]]:
    """(file name, parsed JSON) of every ``*.json`` under ``folder`` (default: ``default`` inside the
    ``results/`` folder of the repository this package sits in; nothing when installed elsewhere), by name;
    files that cannot be read or parsed are skipped."""
    from pathlib import Path

    where = Path(folder) if folder is not None else Path(__file__).resolve().parents[1] / "results" / default
    for path in sorted(where.glob("*.json")) if where.is_dir() else []:
        try:
            yield path.name, json.loads(path.read_text())
        except (OSError, ValueError):
            continue


def recorded_full_data(folder: str | None = None) -> "pd.DataFrame":
    """The ``python -m sfm_lib baselines --kind full ... --json`` results committed under ``folder`` (default:
    ``results/full_data_views/``): one row per file with its views per image, epochs, the split scored and
    the top-1 mean over its probe seeds. Files that are not such results are skipped."""
    import pandas as pd

    rows = []
    for name, content in _recorded_json(folder, "full_data_views"):
        try:
            meta = content["meta"]
            if meta.get("kind") == "full":
                rows.append({"views": int(meta["views"]), "epochs": int(meta["epochs"]),
                             "scored_on": meta.get("scored_on", "test"), "probe_seeds": len(content["seeds"]),
                             "top1": float(content["top1_mean"]), "file": name})
        except (ValueError, KeyError, TypeError):
            continue
    columns = ["views", "epochs", "scored_on", "probe_seeds", "top1", "file"]
    return pd.DataFrame(rows, columns=columns).sort_values(["views", "epochs"], ignore_index=True)


def recorded_refinement(folder: str | None = None) -> "pd.DataFrame":
    """The ``python scripts/choose_refinement.py`` results committed under ``folder`` (default:
    ``results/refinement_choice/``), per (IPC, steps, variant) in the order run: ``val_top1`` and ``val_std``
    (mean and std over distillation seeds of the validation top-1, the split that chose), ``top1`` (test, the
    mean; reported only), ``seeds`` and ``file`` (the recording's name without ``.json``). Files that are not
    such results are skipped. ``attrs["sources"]``: file → its ``command`` and ``machine`` (rows of different
    files may come from different machines: compare within a file). Feature-space rows recorded beside them
    (``feature_rows`` of ``scripts/choose_whitened.py``: free feature vectors scored on validation) are in
    ``attrs["feature_rows"]``, name → validation top-1."""
    import pandas as pd

    rows, feature_rows, sources = [], {}, {}
    for name, content in _recorded_json(folder, "refinement_choice"):
        if isinstance(content, dict) and isinstance(content.get("rows"), list):
            stem = name.removesuffix(".json")
            rows += [{"ipc": content.get("ipc"), "steps": content.get("steps"), **r, "file": stem}
                     for r in content["rows"] if isinstance(r, dict)]
            if content["rows"]:
                sources[stem] = {k: content.get(k) for k in ("command", "machine")}
            feature_rows.update({r["rows"]: float(r["val_top1"]) for r in content.get("feature_rows", [])
                                 if isinstance(r, dict) and "rows" in r and "val_top1" in r})
    if not rows:
        table = pd.DataFrame(columns=["val_top1", "val_std", "top1", "seeds", "file"])
    else:
        table = pd.DataFrame(rows).groupby(["ipc", "steps", "variant"], sort=False, dropna=False).agg(
            val_top1=("val_top1", "mean"), val_std=("val_top1", "std"), top1=("top1", "mean"),
            seeds=("distill_seed", "count"), file=("file", "first"))
    table.attrs["feature_rows"] = feature_rows
    table.attrs["sources"] = sources
    return table


def setting(ctx: Context, run: Any, **extra: Any) -> dict[str, Any]:
    """What a recorded run must match to be shown beside a chapter's own: the data (name, training images),
    the backbone (name, pretrained or not), its input (resolution, transform), the recipe
    (``run.describe()`` of a :class:`sfm_lib.recipes.Run`) and ``extra`` (e.g. the probe settings). With
    ``steps`` in ``extra`` the recipe is described at those steps (:meth:`~sfm_lib.recipes.Run.at_steps`): a
    recording of 1000 steps is keyed by them, so a chapter that builds with fewer still finds it. Not the
    device: a GPU and a CPU run of the same setting are the same experiment."""
    if "steps" in extra:
        run = run.at_steps(int(extra["steps"]))
    return {"dataset": ctx.train.name, "train_images": len(ctx.train), "backbone": ctx.backbone.name,
            "pretrained": ctx.backbone.pretrained, "resolution": ctx.resolution, "transform": repr(ctx.transform),
            "recipe": run.describe(), **extra}


def _recorded_rows(folder: str | None, default: str, setting: Mapping[str, Any] | None,
                   columns: list[str]) -> "pd.DataFrame":
    """The ``rows`` of the recordings under ``folder`` (default: ``results/<default>/``) in the order run;
    with ``setting`` only those of the files whose recorded ``setting`` holds every one of its items. With
    the rows of exactly one file, ``attrs`` holds its ``command`` and ``machine``. No rows: the ``columns``."""
    import pandas as pd

    rows, sources = [], []
    for _, content in _recorded_json(folder, default):
        if not (isinstance(content, dict) and isinstance(content.get("rows"), list)):
            continue
        kept = content.get("setting") or {}
        if setting is None or all(kept.get(k) == v for k, v in setting.items()):
            rows += [r for r in content["rows"] if isinstance(r, dict)]
            sources.append({k: content.get(k) for k in ("command", "machine")})
    table = pd.DataFrame(rows, columns=None if rows else columns)
    if len(sources) == 1:
        table.attrs.update(sources[0])
    return table


def write_recording(path: str, table: "pd.DataFrame", setting: Mapping[str, Any], command: Sequence[str]) -> None:
    """Write a run made once for a chapter, as the ``recorded_*`` readers read it: ``command`` (its argv,
    shell-quoted), this machine (:func:`sfm_lib.report.describe_machine`), ``setting`` (:func:`setting`)
    and the table's rows, floats to four decimals; atomically (:func:`sfm_lib.utils.write_json`)."""
    import shlex

    from . import report
    from .utils import write_json

    rows = [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in table.to_dict("records")]
    write_json(path, {"command": shlex.join(command), "machine": report.describe_machine(report.machine()),
                      "setting": dict(setting), "rows": rows})


def recorded_ablations(folder: str | None = None, setting: Mapping[str, Any] | None = None) -> "pd.DataFrame":
    """The ``python scripts/record_ablations.py`` rows (:func:`ablation_table`) committed under ``folder``
    (default: ``results/ablations/``), in the order run; with ``setting`` only the files whose recorded
    ``setting`` holds every one of its items (e.g. the dataset, backbone and recipe of a chapter), so that
    another data set or backbone never shows them. Files that are not such results are skipped."""
    return _recorded_rows(folder, "ablations", setting, _ABLATION_COLUMNS)


def recorded_comparison(folder: str | None = None, setting: Mapping[str, Any] | None = None) -> "pd.DataFrame":
    """The ``python scripts/record_comparison.py`` rows (:func:`method_comparison`) committed under
    ``folder`` (default: ``results/comparison/``), for the files whose recorded ``setting`` holds every item
    of ``setting`` (as :func:`recorded_ablations`); ``attrs`` names the command and the machine of the run."""
    return _recorded_rows(folder, "comparison", setting, _COMPARISON_COLUMNS)


def comparison_setting(ctx: Context, run: Any, *, ipc: int, steps: int, distill_seeds: Sequence[int],
                       probe_seeds: Sequence[int], epochs: int, views: int,
                       methods: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """The :func:`setting` a :func:`method_comparison` is recorded under (``scripts/record_comparison.py``)
    and looked up by: the run at ``steps``, the IPC, seeds, probe and ours' :func:`refinement`; with
    ``methods`` those labels and arguments (None: any of the methods)."""
    chosen = {} if methods is None else {"methods": methods}
    return setting(ctx, run, probe_seeds=probe_seeds, epochs=epochs, views=views, ipc=ipc, steps=steps,
                   distill_seeds=distill_seeds, **chosen, refine=refinement())


def recorded_or_run(ctx: Context, run: Any, methods: Mapping[str, Mapping[str, Any]], *, ipc: int, steps: int,
                    distill_seeds: Sequence[int], probe_seeds: Sequence[int], epochs: int, views: int,
                    base: Mapping[str, Any] | None = None, recorded: bool = True,
                    folder: str | None = None) -> "pd.DataFrame":
    """:func:`method_comparison`'s rows for ``methods``: those recorded under exactly this
    :func:`comparison_setting` (:func:`recorded_comparison`; ``attrs`` names their command and machine)
    when ``recorded`` and there are any, else the comparison run now (empty ``attrs``)."""
    probe = dict(probe_seeds=probe_seeds, epochs=epochs, views=views)
    if recorded:
        same = comparison_setting(ctx, run, ipc=ipc, steps=steps, distill_seeds=distill_seeds, methods=methods,
                                  **probe)
        rows = recorded_comparison(folder, setting=same)
        if not rows.empty:
            return rows
    return method_comparison(ctx, methods, ipc=ipc, steps=steps, base=base, distill_seeds=distill_seeds, **probe)


def recorded_costs(folder: str | None = None) -> dict[str, dict[str, Any]]:
    """The ``python -m sfm_lib bench methods`` results committed as JSON under ``folder`` (default: the
    ``results/`` folder of the repository this package sits in), as ``"<gpu or device> (<file name>)"`` →
    the JSON. Files that are not such results are skipped."""
    found = {}
    for name, content in _recorded_json(folder, "."):
        if isinstance(content, dict) and isinstance(content.get("runs"), dict) and "sfm_A1" in content["runs"]:
            found[f"{content.get('gpu') or content.get('device', '?')} ({name})"] = content
    return found
