"""How ours (``experiments.distilled(method="sfm+unrolled")``) was set, on the validation split of the offline
default: Fashion-MNIST, EfficientNet-Lite0, 64 px, the recipe ``fmnist-lite0-64``. At IPC 1 (the recipe's 500
steps, two views per SFM step) each variant changes one setting of the refinement (the last 30 % of the steps)
or of SFM alone; at IPC 10 (``--ipc 10``: 200 steps, one view per SFM step, sub-class
targets, as chapter 4 compares the methods) SFM against ours. Every distillation seed is scored by three probes
(1000 epochs, 40 views).

The unrolled probe's steps K (``sfm_lib.unrolled.PROBE_STEPS``) were chosen after the other settings, with
the variants named ``K=…`` (4 views each), at 500 steps for both sizes:

    python scripts/choose_refinement.py --variants "ours K=20,ours K=50,ours K=100,ours K=200" \
        --out results/refinement_choice/probe-steps-ipc1.json
    python scripts/choose_refinement.py --ipc 10 --steps 500 --seeds 0,1 \
        --variants "sfm+sub,ours+sub K=20,ours+sub K=50,ours+sub K=100,ours+sub K=200" \
        --out results/refinement_choice/probe-steps-ipc10.json

The variants recorded before that choice keep the K = 20 they ran with.

    python scripts/choose_refinement.py [--ipc 1|10] [--steps N] [--variants NAME,...] [--seeds 0,1,2] [--out FILE]

Both splits are recorded; only ``val_top1`` chose anything (chapter 4 shows the table). Distilled sets come
from the cache (``SFM_CACHE``) where an earlier run made them. The JSON (written atomically) holds the
command, the machine, the steps and one row per (variant, seed).
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sfm_lib import experiments, recipes, report  # noqa: E402
from sfm_lib.utils import write_json  # noqa: E402

OURS = {"method": "sfm+unrolled", "probe_steps": 20}  # K = 20: these variants were recorded before K was chosen
PROBE_STEPS = (20, 50, 100, 200)  # the unrolled probe's steps K compared (4 views, the chosen refinement)
# name → (what it is, the keyword arguments of experiments.distilled over the recipe)
VARIANTS = {
    "sfm": ("SFM, the recipe (2 views)", {}),
    "sfm A=4": ("SFM with 4 views every step", {"augs": 4}),
    "ours A=2": ("ours, refined with SFM's 2 views", {**OURS, "refine_augs": None}),
    "ours A=4": ("ours, refined with 4 views", {**OURS, "refine_augs": 4}),
    "ours A=8": ("ours, refined with 8 views", {**OURS, "refine_augs": 8}),
    "ours A=2 lr 0.02": ("ours, refine rate 0.02", {**OURS, "refine_augs": None, "refine_lr": 0.02}),
    "ours A=2 refine 50%": ("ours, the last 50 % refined", {**OURS, "refine_augs": None, "refine_fraction": 0.5}),
    "ours A=2 real 8192": ("ours, 8192 real features a step", {**OURS, "refine_augs": None,
                                                                      "real_batch": 8192}),
    **{f"ours K={k}": (f"ours, 4 views, an unrolled probe of {k} steps", {**OURS, "refine_augs": 4, "probe_steps": k})
       for k in PROBE_STEPS},
}
SUB = {"augs": 1, "subclass": True}
VARIANTS_LARGE = {
    "sfm+sub": ("SFM with sub-class targets, 1 view", SUB),
    "ours+sub A=1": ("ours, refined with SFM's 1 view", {**SUB, **OURS, "refine_augs": None}),
    "ours+sub A=4": ("ours, refined with 4 views", {**SUB, **OURS, "refine_augs": 4}),
    **{f"ours+sub K={k}": (f"ours, 4 views, an unrolled probe of {k} steps",
                           {**SUB, **OURS, "refine_augs": 4, "probe_steps": k}) for k in PROBE_STEPS},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ipc", type=int, choices=(1, 10), default=1)
    p.add_argument("--variants", default=None, help="comma-separated names (default: all of that IPC)")
    p.add_argument("--seeds", default=None, help="distillation seeds (default: 0,1,2 at IPC 1; 0,1 at IPC 10)")
    p.add_argument("--steps", type=int, default=0, help="steps of every run (default: 500 at IPC 1, 200 at IPC 10)")
    p.add_argument("--out", default=None, help="default: results/refinement_choice/ipc<IPC>.json")
    a = p.parse_args()
    table = VARIANTS if a.ipc == 1 else VARIANTS_LARGE
    names = [n for n in (a.variants or ",".join(table)).split(",") if n]
    unknown = [n for n in names if n not in table]
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {', '.join(table)}")
    seeds = [int(s) for s in (a.seeds or ("0,1,2" if a.ipc == 1 else "0,1")).split(",")]
    ctx = experiments.prepare("fashion_mnist", "effnet_lite0", 64, 0, "cpu", False, progress=False,
                              kmeans_k=10 if a.ipc == 10 else 0)
    base = {**recipes.run("fmnist-lite0-64", {}).sfm_kwargs(), "ipc": a.ipc}
    if a.ipc == 10:  # as chapter 4's IPC 10 comparison, at 200 steps
        base = {**base, "steps": 200}
    if a.steps:
        base = {**base, "steps": a.steps}
    # experiments.sweep: each variant over the recipe, probed on test and scored on validation
    found = experiments.sweep(ctx, {name: table[name][1] for name in names}, base=base, distill_seeds=seeds,
                              probe_seeds=(0, 1, 2), epochs=1000, views=40)
    rows = [{"variant": r["variant"], "what": table[r["variant"]][0], "distill_seed": int(r["distill_seed"]),
             "val_top1": round(r["val_top1_mean"], 2), "top1": round(r["top1_mean"], 2)}
            for r in found.to_dict("records")]
    out = Path(a.out or ROOT / "results" / "refinement_choice" / f"ipc{a.ipc}.json")
    record = {"command": shlex.join(["python", "scripts/choose_refinement.py", *sys.argv[1:]]),
              "machine": report.describe_machine(report.machine()), "steps": base["steps"], "ipc": a.ipc,
              "rows": rows}
    write_json(out, record)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
