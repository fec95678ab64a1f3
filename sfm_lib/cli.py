"""Command line: ``python -m sfm_lib {stats,distill,eval,baselines,bench} ...`` (``--help`` on each)."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

__all__ = ["main", "build_parser"]


class CliError(Exception):
    """A user-facing error: printed without a traceback, exit status 2."""


def _common(p: argparse.ArgumentParser, dataset: bool = True) -> None:
    if dataset:
        p.add_argument("--dataset", default="fashion_mnist",
                       help="fashion_mnist (offline default), mnist, cifar10, cifar100 or imagefolder:PATH")
        p.add_argument("--data-root", default=None, help="folder holding the dataset files (optional)")
        p.add_argument("--download", action="store_true", help="download the dataset (needs internet)")
    p.add_argument("--backbone", default="effnet_lite0",
                   help="effnet_lite0|1|2 (offline) or any timm model name (internet for weights)")
    p.add_argument("--resolution", type=int, default=64, help="backbone input resolution in pixels")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1, ...")


def _json_out(path: str | None, payload: dict) -> None:
    if path:
        from .utils import atomic_path

        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(payload, indent=2))


# ------------------------------------------------------------------------------------------------ stats
def _cmd_stats(a: argparse.Namespace) -> None:
    from . import backbones, data, stats

    ds = data.load(a.dataset, "train", root=a.data_root, download=a.download)
    if a.max_per_class:
        ds = data.subset_per_class(ds, a.max_per_class)
    bb = backbones.load(a.backbone, a.device)
    st = stats.extract(bb, ds, a.resolution, batch_size=a.batch_size, num_workers=a.workers, kmeans_k=a.kmeans,
                       cache_features=a.cache_features)
    st.save(a.out)
    print(f"wrote {a.out}: means {tuple(st.means.shape)}, counts {st.counts.tolist()}")


# ---------------------------------------------------------------------------------------------- distill
def _cmd_distill(a: argparse.Namespace) -> None:
    from . import backbones, data, distill, stats

    if a.method != "sfm":
        raise CliError(f"--method {a.method}: only 'sfm' is implemented in this command so far")
    st = stats.ClassStats.load(a.stats)
    bb = backbones.load(a.backbone, a.device)
    init_ds = data.load(a.dataset, "train", root=a.data_root, download=a.download) if a.init == "real" else None
    checkpoint = a.checkpoint or (a.out + ".ckpt")
    result = distill.sfm(bb, st, ipc=a.ipc, steps=a.steps, resolution=a.resolution, crop=a.crop, augs=a.augs,
                         lr=a.lr, param=a.param, grow_every=a.grow_every, init=a.init, init_dataset=init_ds,
                         loss=a.loss, subclass=a.subclass, seed=a.seed, two_pass=a.two_pass,
                         chunk_size=a.chunk_size, checkpoint=checkpoint, checkpoint_every=a.checkpoint_every,
                         resume=a.resume)
    result.save(a.out)
    hist = result.meta["loss_history"]
    print(f"wrote {a.out}: images {tuple(result.images.shape)}, final loss "
          f"{hist[-1] if hist else float('nan'):.4f}, {result.meta['time_s']} s (checkpoint {checkpoint})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sfm_lib",
                                     description="Dataset distillation for frozen backbones by statistical flow matching.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("stats", help="one pass of the backbone over the training set -> class means",
                       description="Extract per-class feature means (float64) and counts; write safetensors "
                                   "(tensors 'means' [C,D] and 'counts' [C]) plus JSON metadata.")
    _common(p)
    p.add_argument("--out", required=True, help="output .safetensors file (written atomically)")
    p.add_argument("--max-per-class", type=int, default=0, help="use only the first N images of each class")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: 0 in-memory, else 4)")
    p.add_argument("--kmeans", type=int, default=0, help="also fit K k-means centres per class (sub-class targets)")
    p.add_argument("--cache-features", action="store_true", help="also cache every feature for later evaluation")
    p.set_defaults(func=_cmd_stats)

    p = sub.add_parser("distill", help="distil IPC synthetic images per class from class statistics",
                       description="Statistical flow matching: optimise synthetic images so that the flows between "
                                   "their class means match the real flows. Writes safetensors ('images' "
                                   "[N,3,H,W] in [0,1], 'labels' [N]); checkpoints to OUT.ckpt for --resume.")
    _common(p)
    p.add_argument("--method", default="sfm", choices=["sfm"], help="distillation method")
    p.add_argument("--stats", required=True, help="class statistics from `python -m sfm_lib stats`")
    p.add_argument("--out", required=True, help="output .safetensors file (written atomically)")
    p.add_argument("--ipc", type=int, default=1, help="synthetic images per class")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--crop", type=int, default=None, help="backbone input size of the augmented views "
                                                         "(default: --resolution)")
    p.add_argument("--augs", type=int, default=1, help="augmented views per image and step")
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate (default per --param)")
    p.add_argument("--param", default="pixels", choices=["pixels", "pyramid"])
    p.add_argument("--grow-every", type=int, default=200, help="pyramid: steps between new levels")
    p.add_argument("--init", default="noise", choices=["noise", "real"], help="start from noise or real images")
    p.add_argument("--loss", default="flow", choices=["flow", "mse"], help="flow cosine (SFM) or mean MSE (ablation)")
    p.add_argument("--subclass", action="store_true", help="match image j of a class to its j-th k-means centre")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--two-pass", action="store_true", help="memory-bounded backward (same gradient)")
    p.add_argument("--chunk-size", type=int, default=256, help="views per chunk in --two-pass mode")
    p.add_argument("--checkpoint", default=None, help="checkpoint file (default OUT.ckpt)")
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint")
    p.set_defaults(func=_cmd_distill)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (CliError, ValueError, FileNotFoundError, FileExistsError, RuntimeError, ImportError, FloatingPointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
