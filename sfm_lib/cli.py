"""Command line: ``python -m sfm_lib {stats,distill,eval,baselines,bench,inherit,repro,export} ...`` (``--help``
on each).

``stats`` and ``distill`` also run under ``torchrun`` (e.g. ``torchrun --nproc_per_node=8 -m sfm_lib stats
...``): :func:`main` joins the process group, each rank uses the device of its ``LOCAL_RANK``, only rank 0
prints and writes, and the group is left at the end (see :mod:`sfm_lib.distributed`)."""
from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    import torch

__all__ = ["main", "build_parser"]


class CliError(Exception):
    """A user-facing error: printed without a traceback, exit status 2."""


def _probe_flags(p, epochs: int | None, epochs_help: str, mismatch_help: str) -> None:
    """The flags of every command that trains probes and reports their top-1."""
    p.add_argument("--seeds", type=int, default=None, help="number of probe seeds, 0..N-1 (default 3; with "
                                                           "--preset paper the papers' five, 3407-3411)")
    p.add_argument("--preset", default=None, choices=["paper"],
                   help="paper: the papers' protocol, probe seeds 3407-3411 and top-1 mean ± population std, with "
                        "--test-transform paper unless given")
    p.add_argument("--epochs", type=int, default=epochs, help=epochs_help)
    p.add_argument("--views", type=int, default=None, help="precomputed augmented views per image (default 40; "
                                                           "1 for the full-data probe)")
    p.add_argument("--on", default="test", choices=["test", "val"],
                   help="the split scored: test (what is reported) or val, the validation hold-out of the "
                        "training split (what choices are made on)")
    p.add_argument("--json", default=None, help="write top1_mean, top1_std (percent), seeds, ... as JSON")
    p.add_argument("--allow-class-mismatch", action="store_true", help=mismatch_help)


def _common(p: argparse.ArgumentParser, dataset: bool = True) -> None:
    if dataset:
        p.add_argument("--dataset", default="fashion_mnist",
                       help="fashion_mnist (offline default), mnist, cifar10, cifar100 or imagefolder:PATH")
        p.add_argument("--data-root", default=None, help="folder holding the dataset files (optional)")
        p.add_argument("--download", action="store_true", help="download the dataset (needs internet)")
    p.add_argument("--backbone", default="effnet_lite0",
                   help="effnet_lite0|1|2 (offline); the papers' dinov2_vitb14, clip_vitb16, eva02_vitb14; "
                        "or any timm model name (internet for weights)")
    p.add_argument("--resolution", type=int, default=64, help="backbone input resolution in pixels")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--test-transform", default=None, choices=["square", "paper", "model"],
                   help="how real images become the backbone's input (statistics, test, probes): square = centre "
                        "square, bilinear (the offline default); paper = Resize(256) -> CenterCrop(224), bicubic "
                        "(the papers'); model = the backbone's own timm config")


def _transform_kind(a: argparse.Namespace) -> str:
    """--test-transform, else paper under eval/baselines' --preset paper, else square (distill's --preset names
    a recipe, and distill reads no transform)."""
    if a.test_transform:
        return a.test_transform
    return "paper" if getattr(a, "preset", None) == "paper" else "square"


def _probe_seeds(a: argparse.Namespace) -> tuple[int, ...]:
    """--seeds N → 0..N−1; without it the papers' five seeds under --preset paper, else 0, 1, 2."""
    from .evaluate import PAPER_PROBE_SEEDS

    if a.seeds is not None:
        if a.seeds < 1:
            raise CliError(f"--seeds must be ≥ 1, got {a.seeds}")
        return tuple(range(a.seeds))
    return PAPER_PROBE_SEEDS if a.preset == "paper" else (0, 1, 2)


_DISTRIBUTED_COMMANDS = ("stats", "distill")


def _say(*args, **kwargs) -> None:
    """print on rank 0 only (under torchrun the other ranks stay quiet)."""
    from . import distributed

    if distributed.is_main():
        print(*args, **kwargs)


def _json_out(path: str | None, payload: dict) -> None:
    if path:
        from .utils import atomic_path

        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(payload, indent=2))


# ------------------------------------------------------------------------------------------------ stats
def _cmd_stats(a: argparse.Namespace) -> None:
    from pathlib import Path

    from . import backbones, data, distributed, stats

    with distributed.main_first():  # a download happens once
        ds = data.load(a.dataset, "train", root=a.data_root, download=a.download, skip_bad=a.skip_bad)
    if a.max_per_class:
        ds = data.subset_per_class(ds, a.max_per_class)
    bb = backbones.load(a.backbone, a.device)
    checkpoint = Path(a.checkpoint or (a.out + ".ckpt"))
    st = stats.extract(bb, ds, a.resolution, batch_size=a.batch_size, num_workers=a.workers, kmeans_k=a.kmeans,
                       cache_features=a.cache_features, skip_bad=a.skip_bad, checkpoint=checkpoint,
                       checkpoint_every=a.checkpoint_every, resume=a.resume, progress=not a.quiet,
                       transform=backbones.eval_transform(bb, _transform_kind(a)))
    if distributed.is_main():
        st.save(a.out)
    distributed.barrier()  # the output is written before any rank drops its checkpoint
    stats.rank_checkpoint(checkpoint).unlink(missing_ok=True)  # the output holds what it did
    skipped = st.meta["num_skipped"]
    note = f"; skipped {skipped} unreadable file(s), listed in the metadata ('skipped')" if skipped else ""
    world = st.meta["world_size"]
    note += f"; {world} processes" if world > 1 else ""
    _say(f"wrote {a.out}: means {tuple(st.means.shape)}, counts {st.counts.tolist()}{note}")


# ---------------------------------------------------------------------------------------------- distill
def _split(value: str | None) -> list[str]:
    return [v.strip() for v in value.split(",")] if value else []


def _floats(value: str, flag: str) -> list[float]:
    """Comma-separated numbers of ``flag``, or a CliError that shows what was given."""
    try:
        return [float(v) for v in _split(value)]
    except ValueError:
        raise CliError(f"{flag} takes numbers separated by commas, got {value!r}") from None


def _recipe(a: argparse.Namespace):
    """The preset (default: the book's recipe) with every recipe flag that was given replacing its value."""
    from . import recipes

    augs = a.augs if a.augs is not None or a.method != "lgm" else 10  # LGM's own default: 10 views
    return recipes.get(a.preset, steps=a.steps, augs=augs, ema=a.ema, init=a.init, crop_scale=a.crop_scale,
                       noise_p=a.noise_p, param=a.param, lr=a.lr, schedule=a.schedule, grow_every=a.grow_every)


def _run(a: argparse.Namespace):
    """The :class:`sfm_lib.recipes.Run` of the flags: the preset with every recipe flag given replacing its
    value, the crop and the memory plan. A bad value stops with one line naming it."""
    from . import recipes

    for flag, value in (("--steps", a.steps), ("--ipc", a.ipc), ("--crop", a.crop), ("--chunk-size", a.chunk_size),
                        ("--augs", a.augs), ("--checkpoint-every", a.checkpoint_every)):
        low = 0 if flag == "--steps" else 1
        if value is not None and value < low:
            raise CliError(f"{flag} must be ≥ {low}, got {value}")
    try:
        return recipes.Run(_recipe(a), crop=a.crop, two_pass=a.two_pass, chunk_size=a.chunk_size)
    except ValueError as err:
        raise CliError(str(err)) from None


def _distill_kwargs(a: argparse.Namespace, setting=None) -> dict:
    """Keyword arguments of ``distill.sfm`` / ``distill.lgm`` from the flags (all but the data, the backbones
    and the checkpoint path): what ``--preset paper`` builds and what the chapters must build for the same
    setting (tests/test_repro.py compares the two)."""
    setting = setting or _run(a)
    kw = setting.sfm_kwargs() if a.method == "sfm" else setting.lgm_kwargs()  # clp: no running average either
    return {**kw, "ipc": a.ipc, "resolution": a.resolution, "seed": a.seed,
            "checkpoint_every": a.checkpoint_every, "resume": a.resume}


def _init_images(path: str, ipc: int, resolution: int, classes) -> "torch.Tensor":
    """The images of the distilled set at ``path`` as a start: C·ipc images in class-major order at
    ``resolution`` px, of the same classes; anything else is one line that says what differs."""
    import torch

    from .data import DistilledSet

    try:
        ds = DistilledSet.load(path)
    except (OSError, ValueError) as err:
        raise CliError(f"--init-from {path}: cannot read a distilled set ({err})") from None
    want = (len(classes) * ipc, resolution)
    got = (ds.images.shape[0], ds.images.shape[-1])
    if list(ds.classes) != list(classes) or got != want:
        raise CliError(f"--init-from {path} holds {got[0]} images of {got[1]} px of classes {list(ds.classes)[:3]}…; "
                       f"this run needs {want[0]} (--ipc {ipc}) of {want[1]} px (--resolution) of "
                       f"{list(classes)[:3]}…")
    counts = torch.bincount(ds.labels.long(), minlength=len(classes))
    if not bool((counts == ipc).all()):
        raise CliError(f"--init-from {path} holds {counts.tolist()} images per class; this run starts from "
                       f"{ipc} of each class (--ipc {ipc})")
    order = ds.labels.argsort(stable=True)
    return ds.images[order].float()


def _cmd_distill(a: argparse.Namespace) -> None:
    from . import backbones, data, distill, distributed, stats

    names, stats_files = _split(a.backbone), _split(a.stats)
    if a.method == "lgm" and a.stats:
        raise CliError("--method lgm matches gradients on real images: pass --dataset (the training set), "
                       "not --stats")
    if a.method in ("clp", "unrolled") and a.stats:
        raise CliError(f"--method {a.method} reads the cached features of the real images of --dataset: pass "
                       f"--dataset (the training set), not --stats")
    if a.method == "sfm" and not a.stats:
        raise CliError("--method sfm needs --stats FILE (class statistics from `python -m sfm_lib stats`)")
    if a.method == "lgm" and len(names) > 1:
        raise CliError("several backbones work with --method sfm or clp only")
    if a.method == "sfm" and len(names) != len(stats_files):
        raise CliError(f"--backbone names {len(names)} backbone(s) but --stats {len(stats_files)} file(s); give "
                       f"one statistics file per backbone, paired in order (--backbone A,B --stats a.st,b.st)")
    weights = None
    if a.backbone_weights is not None:
        weights = _floats(a.backbone_weights, "--backbone-weights")
        if len(weights) != len(names):
            raise CliError(f"--backbone-weights gives {len(weights)} weight(s) for {len(names)} backbone(s)")
    setting = _run(a)
    r = setting.recipe
    if a.method != "sfm" and a.ema:
        raise CliError("--ema is a setting of --method sfm (the running average of its class means)")
    _say(f"recipe: {setting.describe()}")
    sts = [stats.ClassStats.load(f) for f in stats_files] if a.method == "sfm" else []
    for path, st in zip(stats_files, sts):
        if r.init == "real" and st.meta.get("dataset") not in (None, a.dataset):
            raise CliError(f"--init real takes images from --dataset {a.dataset}, but {path} holds statistics "
                           f"of {st.meta['dataset']}; pass --dataset {st.meta['dataset']}")
    bbs = [backbones.load(n, a.device) for n in names]
    needs_data = r.init == "real" or a.method in ("lgm", "clp", "unrolled")
    with distributed.main_first():  # a download happens once
        train = data.load(a.dataset, "train", root=a.data_root, download=a.download) if needs_data else None
    checkpoint = a.checkpoint or (a.out + ".ckpt")
    kw = _distill_kwargs(a, setting)
    common = dict(init_dataset=train if r.init == "real" else None, checkpoint=checkpoint, compile=a.compile)
    if a.init_from:
        kw["init"] = _init_images(a.init_from, a.ipc, a.resolution, train.classes if train is not None else
                                  sts[0].classes)
    phi = bbs if len(bbs) > 1 else bbs[0]  # one backbone, or a list (sfm, clp, unrolled)
    multi = dict(backbone_weights=weights) if len(bbs) > 1 else {}
    if a.method == "sfm":
        result = distill.sfm(phi, sts if len(sts) > 1 else sts[0], loss=a.loss, subclass=a.subclass, **multi, **kw,
                             **common)
    elif a.method == "clp":
        from . import clp

        result = clp.clp(phi, train, ridge=a.ridge, tau=a.tau, real_batch=a.real_batch, **multi, **kw, **common)
    elif a.method == "unrolled":
        from . import unrolled

        k = unrolled.PROBE_STEPS if a.probe_steps is None else a.probe_steps
        result = unrolled.unrolled(phi, train, probe_steps=k, real_batch=a.real_batch, **multi, **kw, **common)
    else:
        result = distill.lgm(bbs[0], train, head_std=a.head_std, balanced=a.balanced, **kw, **common)
    if a.init_from:
        result.meta["init_from"] = a.init_from
    result.meta["recipe"] = {"name": r.name, **r.settings()}
    if distributed.is_main():
        result.save(a.out)
    hist = result.meta["loss_history"]
    _say(f"wrote {a.out}: images {tuple(result.images.shape)}, final loss "
          f"{hist[-1] if hist else float('nan'):.4f}, {result.meta['time_s']} s (checkpoint {checkpoint})")


# --------------------------------------------------------------------------------------- eval, baselines
def _report(result, json_path: str | None, label: str, paper: bool = False) -> None:
    """One line that names the metric: top-1 mean ± std over the probe seeds (the sample std; the population
    std under --preset paper, as the papers' code reports it), then every seed's top-1."""
    per_seed = ", ".join(f"seed {s}: {t:.2f}" for s, t in zip(result.seeds, result.top1))
    std, kind = (result.top1_pstd, "population std") if paper else (result.top1_std, "std")
    print(f"{label}: top-1 mean ± {kind} over {len(result.seeds)} probe seeds {result.top1_mean:.2f} ± {std:.2f} % "
          f"({per_seed})")
    _json_out(json_path, {**result.to_dict(), "top1_pstd": result.top1_pstd})


def _cmd_eval(a: argparse.Namespace) -> None:
    from . import backbones, data, distill, evaluate

    ds = distill.DistilledSet.load(a.distilled)
    recipe = ds.meta.get("recipe")
    if isinstance(recipe, dict):
        settings = ", ".join(f"{k} {v}" for k, v in recipe.items() if k != "name")
        print(f"{a.distilled} was distilled with {ds.meta.get('backbone')}, recipe {recipe.get('name')}: "
              f"{settings}")
    test = data.load(a.dataset, a.on, root=a.data_root, download=a.download)
    if len(ds.classes) != len(test.classes):
        raise CliError(f"{a.distilled} has {len(ds.classes)} classes but {a.dataset} has {len(test.classes)}")
    bb = backbones.load(a.backbone, a.device)
    result = evaluate.linear_probe(bb, ds, test, a.resolution, epochs=a.epochs, seeds=_probe_seeds(a),
                                   views=a.views or 40, allow_class_mismatch=a.allow_class_mismatch,
                                   transform=backbones.eval_transform(bb, _transform_kind(a)))
    result.meta.update(distilled=a.distilled, distill_backbone=ds.meta.get("backbone"), dataset=a.dataset,
                       scored_on=a.on)
    _report(result, a.json, f"{a.distilled} on {bb.name}, {a.on} split", paper=a.preset == "paper")


def _cmd_baselines(a: argparse.Namespace) -> None:
    from . import backbones, data, distill, evaluate

    train = data.load(a.dataset, "train", root=a.data_root, download=a.download)
    test = data.load(a.dataset, a.on, root=a.data_root, download=a.download)
    bb = backbones.load(a.backbone, a.device)
    if a.kind == "neighbors" and not a.distilled:
        raise CliError("--kind neighbors needs --distilled FILE (the set whose neighbours are taken)")
    distilled = distill.DistilledSet.load(a.distilled) if a.distilled else None
    kw = {"views": a.views or (1 if a.kind == "full" else 40)}
    if a.epochs:
        kw["epochs"] = a.epochs
    result = evaluate.baseline(a.kind, bb, train, test, a.resolution, ipc=a.ipc, seeds=_probe_seeds(a),
                               distilled=distilled, allow_class_mismatch=a.allow_class_mismatch,
                               transform=backbones.eval_transform(bb, _transform_kind(a)), **kw)
    result.meta.update(dataset=a.dataset, ipc=a.ipc, scored_on=a.on)
    views = f", {kw['views']} views per image" if a.kind == "full" and kw["views"] > 1 else ""
    _report(result, a.json, f"{a.kind} baseline on {bb.name}{views}, {a.on} split", paper=a.preset == "paper")


# ------------------------------------------------------------------------------------------------ bench
def _cmd_bench(a: argparse.Namespace) -> None:
    from . import backbones, bench, data

    if a.what == "methods":
        import shlex

        dataset = None if a.random_weights else a.dataset
        result = bench.methods_cost(a.backbone, a.device, pretrained=not a.random_weights, num_classes=a.classes,
                                    ipc=a.ipc, resolution=a.resolution, crop=a.crop, two_pass=a.two_pass,
                                    chunk_size=a.chunk_size, param=a.param, steps=a.steps,
                                    optimizer=not a.no_optimizer, dataset=dataset, data_root=a.data_root,
                                    threads=a.threads, command="python -m sfm_lib " + shlex.join(a.argv))
        print(bench.methods_table(result))
        print(json.dumps(result))
        _json_out(a.json, result)
        return
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    if a.what == "fold":
        row = bench.fold_gain(a.backbone, a.device, pretrained=not a.random_weights, resolution=a.resolution,
                              images=a.classes * a.ipc, batch_size=a.batch_size, steps=max(a.steps, 10))
        print(f"batch norms folded: {row['folded']}; a step's forward + backward {row['step_ratio']:.2f} x, a "
              f"feature batch {row['forward_ratio']:.2f} x faster than unfolded ({row['backbone']} at "
              f"{row['resolution']} px, {row['images']} / {row['batch_size']} images, {row['device']}, "
              f"{row['threads']} threads); largest feature difference {row['max_rel_diff']:.1e} of the largest")
        print(json.dumps(row))
        _json_out(a.json, row)
        return
    bb = backbones.load(a.backbone, a.device, pretrained=not a.random_weights)
    if a.what == "stats":
        ds = data.load(a.dataset, "train", root=a.data_root, download=a.download)
        row = bench.stats_throughput(bb, ds, a.resolution, images=a.images, batch_size=a.batch_size,
                                     checkpoint_every=a.checkpoint_every, num_workers=a.workers)
        print(f"statistics pass {row['pipeline_img_s']} img/s; decode only {row['decode_img_s']}, forward only "
              f"{row['forward_img_s']} img/s: ratio {row['ratio']:.2f} to the slower ({row['images']} images, "
              f"{row['backbone']} at {row['resolution']} px, batch {row['batch_size']}, {row['workers']} workers "
              f"of {row['cores']} cores, {row['device']}, {row['threads']} threads)")
        if a.checkpoint_every:
            print(f"with a checkpoint every {a.checkpoint_every} batches {row['checkpoint_img_s']} img/s: "
                  f"ratio {row['checkpoint_ratio']:.3f} to the pass without")
    else:
        row = bench.step_cost(bb, num_classes=a.classes, ipc=a.ipc, resolution=a.resolution, crop=a.crop,
                              augs=a.augs, two_pass=a.two_pass, chunk_size=a.chunk_size, param=a.param,
                              steps=a.steps, optimizer=not a.no_optimizer)
        print(f"SFM step {row['median_s']} s, peak {row['peak_gib']} GiB ({row['backbone']}, C={row['classes']}, "
              f"ipc={row['ipc']}, {row['resolution']}->{row['crop']} px, augs={row['augs']}, "
              f"two_pass={row['two_pass']}, {row['gpu']})")
    print(json.dumps(row))
    _json_out(a.json, row)


# ------------------------------------------------------------------------------------------------ repro
def _cmd_repro(a: argparse.Namespace) -> None:
    from . import repro

    overrides = {key: repro.parse_value(value) for key, value in a.param or []}
    only = [c.strip() for c in a.chapters.split(",") if c.strip()] if a.chapters else None
    results = repro.run(a.preset, a.out, overrides, only=only, timeout=a.timeout)
    print(f"wrote {a.out}: {len(results['chapters'])} finished chapters, results.json, figures/")

# ----------------------------------------------------------------------------------------------- export
def _cmd_export(a: argparse.Namespace) -> None:
    from . import report

    card = report.export(a.distilled, a.out, force=a.force, evaluation=a.eval_json)
    acc = card["accuracy"]
    measured = f"top-1 {acc['top1_mean']:.2f} %" if isinstance(acc, dict) and "top1_mean" in acc else \
        "no measured accuracy (pass --eval-json)"
    print(f"wrote {a.out}: {card['images']} images in {len(card['classes'])} class folders and card.json "
          f"({card['method']}, {card['backbone']}, {measured})")


# ---------------------------------------------------------------------------------------------- inherit
def _cmd_inherit(a: argparse.Namespace) -> None:
    from . import backbones, data, distill, evaluate, features, inherit

    ds = distill.DistilledSet.load(a.distilled)
    made_with = ds.meta.get("backbone")
    if made_with not in (None, a.distill_backbone):
        raise CliError(f"{a.distilled} was distilled with {made_with}, not --distill-backbone "
                       f"{a.distill_backbone}; pass --distill-backbone {made_with}")
    whole_train = data.load(a.dataset, "train", root=a.data_root, download=a.download)
    test = data.load(a.dataset, "test", root=a.data_root, download=a.download)
    if len(ds.classes) != len(test.classes):
        raise CliError(f"{a.distilled} has {len(ds.classes)} classes but {a.dataset} has {len(test.classes)}")
    train = inherit.per_class_split(whole_train, a.images_per_class) if a.images_per_class else whole_train
    phi_d = backbones.load(a.distill_backbone, a.device)
    same = a.eval_backbone == a.distill_backbone
    phi_e = phi_d if same else backbones.load(a.eval_backbone, a.device)
    t = backbones.eval_transform(phi_d, a.test_transform)  # "model": phi_d's config, for both backbones
    full_kw = dict(seeds=(0,), epochs=a.full_epochs, transform=t)
    golden = inherit.golden_classifier(phi_d, train, test, a.resolution, **full_kw)
    alphas = ([v if v == inherit.IDENTITY else _floats(v, "--alpha")[0] for v in _split(a.alpha)] if a.alpha
              else inherit.ALPHA_GRID)
    validation = None
    if len(alphas) > 1:
        val = inherit.validation_split(data.load(a.dataset, "val", root=a.data_root, download=a.download),
                                       a.val_per_class)
        validation = features.compute(phi_e, val, a.resolution, progress=False, transform=t)
    clf = inherit.inherit(golden, phi_d, phi_e, ds, a.resolution, views=a.views, seed=a.seed, alpha=alphas,
                          validation=validation, transform=t)
    clf.meta.update(distilled=a.distilled, dataset=a.dataset, golden_top1=golden.top1[0])
    z_e, y = features.compute(phi_e, test, a.resolution, progress=False, transform=t)
    normal = evaluate.linear_probe(phi_e, ds, test, a.resolution, epochs=a.epochs, seeds=tuple(range(a.seeds)),
                                   views=a.probe_views, transform=t)
    full = golden if same else evaluate.full_data_probe(phi_e, train, test, a.resolution, **full_kw)
    payload = {"inherited": {"top1": clf.accuracy(z_e, y), "golden_top1": golden.top1[0], **clf.meta},
               "normal_probe": {"top1": normal.top1_mean, "top1_std": normal.top1_std, "seeds": normal.seeds},
               "full_data": {"top1": full.top1_mean, "backbone": a.eval_backbone, "n_train": len(train)},
               "storage_bytes": inherit.storage_report(clf, ds)}
    if a.save:
        clf.save(a.save)
    print(f"{a.distill_backbone} -> {a.eval_backbone}: inherited {payload['inherited']['top1']:.2f} %, normal probe "
          f"{normal.top1_mean:.2f} ± {normal.top1_std:.2f} %, full-data probe {full.top1_mean:.2f} % "
          f"(W, b, P: {payload['storage_bytes']['inherited']} bytes; images as PNG "
          f"{payload['storage_bytes']['images_png']} bytes)" + (f"; wrote {a.save}" if a.save else ""))
    _json_out(a.json, payload)


def _inherit_parser(sub) -> None:
    p = sub.add_parser("inherit", help="classifier inheritance: golden classifier of the distillation backbone "
                                       "through a projector fitted on the distilled images",
                       description="Train the golden classifier (a linear probe on the whole real training split "
                                   "with --distill-backbone), fit a linear projector from --eval-backbone features "
                                   "to --distill-backbone features on augmented views of the distilled images (ridge "
                                   "least squares, no labels), and score W·P(phi_e(x)) + b on the real test split, "
                                   "beside a normal probe on the distilled images and the full-data probe with "
                                   "--eval-backbone.")
    p.add_argument("--distilled", required=True, help="distilled set from `python -m sfm_lib distill`")
    p.add_argument("--distill-backbone", default="effnet_lite0", help="backbone of the golden classifier (phi_d)")
    p.add_argument("--eval-backbone", default="effnet_lite0", help="backbone the classifier reads (phi_e)")
    p.add_argument("--dataset", default="fashion_mnist",
                   help="fashion_mnist (offline default), mnist, cifar10, cifar100 or imagefolder:PATH")
    p.add_argument("--data-root", default=None, help="folder holding the dataset files (optional)")
    p.add_argument("--download", action="store_true", help="download the dataset (needs internet)")
    p.add_argument("--resolution", type=int, default=64, help="backbone input resolution in pixels")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--images-per-class", type=int, default=0,
                   help="train the golden classifier and full-data probe on the first N images per class (0: all)")
    p.add_argument("--views", type=int, default=100, help="augmented views per distilled image to fit the projector")
    p.add_argument("--alpha", default=None,
                   help="relative ridge strength of the projector, or several (comma-separated) to choose from "
                        "on --val-per-class images of the validation split; 'identity' keeps P = I when both backbones "
                        "are one (default: sfm_lib.inherit.ALPHA_GRID)")
    p.add_argument("--val-per-class", type=int, default=100,
                   help="first N images per class of the validation split that choose --alpha (0: all); never "
                        "seen by the golden classifier, never the test split")
    p.add_argument("--seed", type=int, default=0, help="seed of the projector's views")
    p.add_argument("--seeds", type=int, default=3, help="number of seeds of the normal probe")
    p.add_argument("--epochs", type=int, default=1000, help="epochs of the normal probe")
    p.add_argument("--probe-views", type=int, default=40, help="views per image of the normal probe")
    p.add_argument("--full-epochs", type=int, default=10, help="epochs of the golden and full-data probes")
    p.add_argument("--test-transform", default="square", choices=["square", "paper", "model"],
                   help="how real images become the input (golden, validation, test, probes): as for eval; model = "
                        "--distill-backbone's timm config, for both backbones")
    p.add_argument("--save", default=None, help="write the inherited classifier (W, b, P) as safetensors")
    p.add_argument("--json", default=None, help="write inherited / normal_probe / full_data top-1 and storage")
    p.set_defaults(func=_cmd_inherit)


def build_parser() -> argparse.ArgumentParser:
    from . import recipes

    parser = argparse.ArgumentParser(prog="python -m sfm_lib",
                                     description="Dataset distillation for frozen backbones by statistical flow matching.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("stats", help="one pass of the backbone over the training set -> class means",
                       description="Extract per-class feature means (float64) and counts; write safetensors "
                                   "(tensors 'means' [C,D] and 'counts' [C]) plus JSON metadata. Runs under torchrun too "
                                   "(each process reads a block of the images; not with --kmeans or "
                                   "--cache-features).")
    _common(p)
    p.add_argument("--out", required=True, help="output .safetensors file (written atomically)")
    p.add_argument("--max-per-class", type=int, default=0, help="use only the first N images of each class")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=None,
                   help="DataLoader workers (default: 0 in-memory, else one per core this process may use)")
    p.add_argument("--kmeans", type=int, default=0, help="also fit K k-means centres per class (sub-class targets)")
    p.add_argument("--cache-features", action="store_true", help="also cache every feature for later evaluation")
    p.add_argument("--skip-bad", action="store_true", help="skip image files that cannot be decoded (listed in "
                   "the output's metadata) instead of stopping at the first one")
    p.add_argument("--checkpoint", default=None, help="checkpoint file (default OUT.ckpt; removed once OUT "
                   "is written)")
    p.add_argument("--checkpoint-every", type=int, default=100, help="batches between checkpoints")
    p.add_argument("--resume", action="store_true", help="continue the pass from the checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_stats)

    p = sub.add_parser("distill", help="distil IPC synthetic images per class from class statistics",
                       description="Statistical flow matching (--method sfm, from --stats): optimise synthetic images "
                                   "so that the flows between their class means match the real flows. Linear "
                                   "gradient matching (--method lgm, from the real images of --dataset): match the "
                                   "gradients of random linear heads. Writes safetensors ('images' [N,3,H,W] in "
                                   "[0,1], 'labels' [N]); checkpoints to OUT.ckpt for --resume. The "
                                   "recipe flags default to --preset (printed as 'recipe: ...', stored in the "
                                   "output's metadata). Several backbones (sfm): --backbone effnet_lite0,"
                                   "effnet_lite1 --stats s0.safetensors,s1.safetensors (paired in order); the "
                                   "loss is the weighted mean of their flow losses on the same views. Runs under "
                                   "torchrun too (each process forwards the views of a block of classes; same "
                                   "result).")
    _common(p)
    p.add_argument("--method", default="sfm", choices=["sfm", "lgm", "clp", "unrolled"],
                   help="sfm: statistical flow matching (needs --stats); lgm: linear gradient matching on real "
                        "images of --dataset; clp: the closed-form linear probe (CLP-DD) scored on the cached "
                        "features of --dataset; unrolled: the evaluation's probe unrolled on the views, scored on "
                        "those features (ours: refine an sfm result with --init-from)")
    p.add_argument("--stats", default=None, help="sfm: class statistics from `python -m sfm_lib stats`; several "
                   "backbones: one file per --backbone, comma-separated in the same order")
    p.add_argument("--out", required=True, help="output .safetensors file (written atomically)")
    p.add_argument("--ipc", type=int, default=1, help="synthetic images per class")
    p.add_argument("--preset", default=None, choices=list(recipes.RECIPES),
                   help=f"the recipe whose settings are the defaults of the flags below (default "
                        f"{recipes.DEFAULT}, the book's; 'paper': the papers' ImageNet settings)")
    p.add_argument("--steps", type=int, default=None, help="distillation steps (default: the preset's)")
    p.add_argument("--crop", type=int, default=None, help="backbone input size of the augmented views "
                                                         "(default: --resolution)")
    p.add_argument("--augs", type=int, default=None, help="augmented views per image and step (default: sfm the "
                                                          "preset's, lgm 10)")
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate (default: the preset's)")
    p.add_argument("--schedule", default=None, choices=["constant", "cosine"],
                   help="learning-rate schedule (default: the preset's)")
    p.add_argument("--crop-scale", type=float, default=None, help="smallest area fraction of the random resized "
                                                                  "crop (default: the preset's)")
    p.add_argument("--noise-p", type=float, default=None, help="probability of additive Gaussian noise per view "
                                                               "(default: the preset's)")
    p.add_argument("--param", default=None, choices=["pixels", "pyramid"], help="default: the preset's")
    p.add_argument("--grow-every", type=int, default=None, help="pyramid: steps between new levels (default: the "
                                                                "preset's)")
    p.add_argument("--init", default=None, choices=["noise", "real"], help="start from noise or from random real "
                                                                           "images of --dataset (default: the preset's)")
    p.add_argument("--init-from", default=None, metavar="FILE",
                   help="start from the images of a distilled set (same classes, --ipc and --resolution), e.g. "
                        "refine an sfm result with --method unrolled")
    p.add_argument("--loss", default="flow", choices=["flow", "mse"], help="flow cosine (SFM) or mean MSE (ablation)")
    p.add_argument("--subclass", action="store_true", help="match image j of a class to its j-th k-means centre")
    p.add_argument("--ema", type=float, default=None, help="running average of the synthetic class means in the "
                   "loss, weight BETA in [0, 1) on the past (0: off; 0.7 ≈ twice the views per step; default: "
                   "the preset's)")
    p.add_argument("--backbone-weights", default=None, metavar="W1,W2,...",
                   help="sfm with several backbones (--backbone A,B --stats a,b): weights of their losses in "
                        "the weighted mean (default: equal)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--head-std", type=float, default=0.01, help="lgm: std of the random head W (b = 0)")
    p.add_argument("--balanced", action="store_true", help="lgm: class-balanced real batches (default shuffled)")
    p.add_argument("--ridge", type=float, default=0.01, help="clp: ridge of the kernel probe, relative to tr(K)/M")
    p.add_argument("--tau", type=float, default=0.1, help="clp: temperature of the cross-entropy on real features")
    p.add_argument("--real-batch", type=int, default=2048, help="clp, unrolled: real features per step")
    p.add_argument("--probe-steps", type=int, default=None,
                   help="unrolled: Adam steps of the unrolled probe (default: sfm_lib.unrolled.PROBE_STEPS)")
    p.add_argument("--two-pass", action=argparse.BooleanOptionalAction, default=None,
                   help="memory-bounded backward, same gradient (default: automatic on CUDA, off on CPU)")
    p.add_argument("--chunk-size", type=int, default=None,
                   help="views per chunk in --two-pass mode (default: 256 on CPU, what fits on CUDA)")
    p.add_argument("--compile", action="store_true", help="torch.compile the backbone")
    p.add_argument("--checkpoint", default=None, help="checkpoint file (default OUT.ckpt)")
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint")
    p.set_defaults(func=_cmd_distill)

    p = sub.add_parser("eval", help="linear probe trained on a distilled set, scored on the real test split",
                       description="Train one linear probe per seed on the distilled images (flip + random resized "
                                   "crop views) with a frozen backbone; print and save top-1 mean ± std.")
    _common(p)
    p.add_argument("--distilled", required=True, help="distilled set from `python -m sfm_lib distill`")
    _probe_flags(p, 1000, "probe epochs", "evaluate a set distilled from another dataset (other class names) on "
                 "purpose, e.g. a transfer experiment")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("baselines", help="real-image baselines scored with the same probe",
                       description="random: IPC random real images per class (a draw per seed); centroids: the "
                                   "real images nearest each class mean; neighbors: the nearest real image of each "
                                   "distilled image (--distilled); full: a probe on the whole training split.")
    _common(p)
    p.add_argument("--kind", required=True, choices=["random", "centroids", "neighbors", "full"])
    p.add_argument("--ipc", type=int, default=1)
    p.add_argument("--distilled", default=None, help="for --kind neighbors")
    _probe_flags(p, None, "probe epochs (default 1000; 10 for full)", "--kind neighbors: accept a set distilled "
                 "from another dataset (other class names) on purpose")
    p.set_defaults(func=_cmd_baselines)

    p = sub.add_parser("bench", help="cost benchmarks: statistics throughput, SFM step time and memory",
                       description="'stats': the statistics pass vs its halves, decode-only (all workers) and "
                                   "forward-only on the same batches (same batch size, resolution; --dataset "
                                   "imagefolder:DIR for JPEGs). "
                                   "'step': median time and peak GPU memory of one SFM step. 'methods': SFM at "
                                   "A = 1, 10 and LGM at A = 1, 3, 10 in one run (time per full step, peak memory: "
                                   "CUDA allocator, or on the CPU the peak resident memory of a fresh process each; "
                                   "LGM reads --dataset, or random in-memory images with --random-weights). "
                                   "'fold': a step's forward + backward (C·IPC images) and a feature batch "
                                   "through the backbone with its batch norms folded against unfolded.")
    p.add_argument("what", choices=["stats", "step", "methods", "fold"])
    _common(p)
    p.add_argument("--random-weights", action="store_true", help="random backbone weights (cost only)")
    p.add_argument("--images", type=int, default=4096, help="stats: images to stream")
    p.add_argument("--batch-size", type=int, default=256, help="stats: batch size")
    p.add_argument("--checkpoint-every", type=int, default=0, help="stats: also time the pass with a "
                   "checkpoint every N batches (0: not)")
    p.add_argument("--workers", type=int, default=None, help="stats: decoding workers (default: one per core "
                   "this process may use; in-memory data: 0)")
    p.add_argument("--classes", type=int, default=10, help="step: number of classes C")
    p.add_argument("--ipc", type=int, default=1)
    p.add_argument("--crop", type=int, default=None, help="step: backbone input size (default --resolution)")
    p.add_argument("--augs", type=int, default=1, help="step: views per image (methods: fixed 1, 10 / 1, 3, 10)")
    p.add_argument("--param", default="pixels", choices=["pixels", "pyramid"])
    p.add_argument("--two-pass", action="store_true")
    p.add_argument("--chunk-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=6, help="step: timed steps (after 2 warm-up steps)")
    p.add_argument("--no-optimizer", action="store_true", help="step: leave Adam out (bare gradient step)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--json", default=None, help="also write the result row as JSON")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("repro", help="run the book's chapters with a preset of parameters (papermill)",
                       description="Execute the chapters of _toc.yml in order with papermill, each with the keys "
                                   "of PRESET (repro/PRESET.yaml or a YAML file) that are its parameters, then "
                                   "the -p overrides. Writes the executed notebooks, results.json (every recorded "
                                   "table) and figures/ to --out; a second run skips finished chapters.")
    p.add_argument("preset", metavar="PRESET", help="preset name (repro/PRESET.yaml of the checkout) or a YAML file")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("-p", "--param", nargs=2, action="append", metavar=("KEY", "VALUE"),
                   help="override a chapter parameter; VALUE is a YAML literal (3, 0.5, [0, 1], cpu)")
    p.add_argument("--chapters", default=None, help="comma-separated chapter prefixes to run, e.g. 01,02")
    p.add_argument("--timeout", type=int, default=86400, help="seconds per notebook cell (a whole ImageNet "
                   "distillation can be one cell)")
    p.set_defaults(func=_cmd_repro)

    _inherit_parser(sub)

    p = sub.add_parser("export", help="write a distilled set as an image folder (<class>/<i>.png) + card.json",
                       description="Write the images of a distilled set as OUT/<class>/<i>.png and a JSON card "
                                   "(OUT/card.json: recipe, statistics hash, backbone, method, measured accuracy, "
                                   "SHA-256 of the source file), so the set can be shared and read by any tool. "
                                   "Written to a temporary folder, then renamed.")
    p.add_argument("--distilled", required=True, help="distilled set from `python -m sfm_lib distill`")
    p.add_argument("--out", required=True, help="output folder (refused when not empty, unless --force)")
    p.add_argument("--eval-json", default=None, help="the JSON of `python -m sfm_lib eval --json`: its top-1 "
                   "goes into the card (default: the set's own metadata, if it holds one)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.set_defaults(func=_cmd_export)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    from . import distributed

    launched = distributed.launched()
    if launched and args.command not in _DISTRIBUTED_COMMANDS:
        print(f"error: `{args.command}` does not run under torchrun (only {', '.join(_DISTRIBUTED_COMMANDS)} "
              f"do); run it as one process: python -m sfm_lib {args.command} ...", file=sys.stderr)
        return 2
    try:
        if launched:
            args.device = str(distributed.init(args.device))  # cuda:LOCAL_RANK, or the CPU with gloo
        args.func(args)
    except (CliError, ValueError, OSError, RuntimeError, ImportError, FloatingPointError) as err:
        where = f"rank {distributed.rank()}: " if distributed.world_size() > 1 else ""
        print(f"error: {where}{err}", file=sys.stderr)
        return 2
    finally:
        distributed.finish()
    return 0
