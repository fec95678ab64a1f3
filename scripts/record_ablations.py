"""Chapter 3's ablations on the offline default, run once and recorded: Fashion-MNIST, EfficientNet-Lite0,
64 px, the recipe ``fmnist-lite0-64`` at IPC 1, each pair of :data:`sfm_lib.experiments.ABLATIONS` changing
one of its settings (:func:`sfm_lib.experiments.ablation_table`), three distillation seeds, three probes (1000
epochs, 40 views), scored on the test and the validation split. The chapter reads the file when its
``ablations`` parameter is empty (its default: on two CPU cores the runs take about twelve minutes of the
build), and chooses on the validation column.

    python scripts/record_ablations.py [--ablations augs,ema,...] [--out FILE]

Distilled sets come from the cache (``SFM_CACHE``) where an earlier run made them. The JSON (written
atomically) holds the command, the machine, the setting (the chapter shows the rows only for the same one)
and one row per (ablation, variant, distillation seed).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sfm_lib import experiments, recipes  # noqa: E402

ALL = ["augs", "ema", "noise", "param", "loss"]  # chapter 3's pairs
PROBE = {"probe_seeds": [0, 1, 2], "epochs": 1000, "views": 40, "distill_seeds": [0, 1, 2]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ablations", default=",".join(ALL), help="comma-separated keys of ABLATIONS")
    p.add_argument("--out", default=str(ROOT / "results" / "ablations" / "ipc1.json"))
    a = p.parse_args()
    names = [n for n in a.ablations.split(",") if n]
    unknown = [n for n in names if n not in experiments.ABLATIONS]
    if unknown:
        p.error(f"unknown ablations {unknown}; choose from {', '.join(experiments.ABLATIONS)}")
    ctx = experiments.prepare("fashion_mnist", "effnet_lite0", 64, 0, "cpu", False, progress=False, kmeans_k=10)
    run = recipes.run("fmnist-lite0-64", {})
    table = experiments.ablation_table(ctx, names, {**run.sfm_kwargs(), "ipc": 1},
                                       distill_seeds=tuple(PROBE["distill_seeds"]),
                                       probe_seeds=tuple(PROBE["probe_seeds"]), epochs=PROBE["epochs"],
                                       views=PROBE["views"])
    out = Path(a.out)
    experiments.write_recording(out, table, experiments.setting(ctx, run, **PROBE),
                                ["python", "scripts/record_ablations.py", *sys.argv[1:]])
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
