"""Chapter 4's comparison of the methods, run once and recorded: the chapter's setting at its defaults (read
from the notebook's parameters cell), SFM, LGM, CLP-DD and ours (:func:`sfm_lib.experiments.comparison_methods`;
at an IPC above 1 in the form of the chapter's larger IPC: one view, sub-class targets), at equal steps and
at equal time, for every distillation seed, scored by the chapter's probes on the test and the validation
split (:func:`sfm_lib.experiments.method_comparison`). By default the chapter's larger IPC for its
``steps_methods_large``; ``--ipc 1`` its IPC 1 comparison for its ``steps``. The chapter shows both in place
of running them when its ``recorded`` parameter is on (its default) and its setting is the recording's;
``--steps`` and ``--methods`` record longer runs, which the chapter shows beside them.

    python scripts/record_comparison.py [--ipc N] [--steps N] [--methods "SFM,ours"] [--out FILE]

The runs happen in this call, one after the other on one machine, so the equal-time budget is that
machine's; the JSON (written atomically) holds the command, the machine, the setting and one row per
(method, comparison, distillation seed).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sfm_lib import experiments, recipes  # noqa: E402

CHAPTER = ROOT / "book" / "04_vs_gradient_matching.ipynb"


def chapter_defaults() -> dict:
    """The defaults of chapter 4's parameters cell."""
    import papermill as pm

    return {k: eval(v["default"]) for k, v in pm.inspect_notebook(str(CHAPTER)).items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ipc", type=int, default=0, help="images per class (default: the chapter's ipc_large)")
    p.add_argument("--steps", type=int, default=0, help="steps of every method (default: the chapter's)")
    p.add_argument("--methods", default="", help="comma-separated labels to run, SFM's first (default: all)")
    p.add_argument("--out", default="", help="default: results/comparison/ipc<IPC>-<STEPS>steps.json")
    a = p.parse_args()
    d = chapter_defaults()
    ipc = a.ipc or d["ipc_large"]
    steps = a.steps or (d["steps"] if ipc == 1 else d["steps_methods_large"])
    ctx = experiments.prepare(d["dataset"], d["backbone"], d["resolution"], d["images_per_class"], d["device"],
                              d["download"], progress=False, crop=d["crop"], pretrained=d["pretrained"],
                              transform=d["test_transform"], kmeans_k=d["ipc_large"])
    run = recipes.run(d["recipe"], d["recipe_overrides"], steps=steps, crop=d["crop"],
                      two_pass=d["two_pass"] or None, chunk_size=d["chunk_size"])
    base = {k: v for k, v in run.lgm_kwargs().items() if k not in ("augs", "steps")}
    probe = dict(probe_seeds=d["probe_seeds"], epochs=d["epochs"], views=d["views"])
    methods = experiments.comparison_methods(run.recipe, lgm_augs=d["lgm_augs"], large=ipc > 1)
    if a.methods:
        wanted = [m.strip() for m in a.methods.split(",")]
        if wanted[0] != next(iter(methods)) or not set(wanted) <= set(methods):
            p.error(f"--methods: labels of {', '.join(methods)}, {next(iter(methods))!r} first (the clock)")
        methods = {m: methods[m] for m in wanted}
    table = experiments.method_comparison(ctx, methods, ipc=ipc, steps=steps, base=base,
                                          distill_seeds=d["distill_seeds"], **probe)
    same = experiments.comparison_setting(ctx, run, ipc=ipc, steps=steps, distill_seeds=d["distill_seeds"],
                                          methods=methods, **probe)
    out = Path(a.out or ROOT / "results" / "comparison" / f"ipc{ipc}-{steps}steps.json")
    experiments.write_recording(out, table, same, ["python", "scripts/record_comparison.py", *sys.argv[1:]])
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
