"""Command line: ``python -m sfm_lib {stats,distill,eval,baselines,bench} ...`` (``--help`` on each)."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Callable, Sequence

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

    for extra in _EXTRA_PARSERS:
        extra(sub)
    return parser


# Later modules register their sub-commands here (distill, eval, baselines, bench).
_EXTRA_PARSERS: list[Callable[[argparse._SubParsersAction], None]] = []


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (CliError, ValueError, FileNotFoundError, RuntimeError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
