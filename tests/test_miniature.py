"""The papers' run in miniature, through the real runner: `python -m sfm_lib repro in100-dinov2-ipc10` on a
generated folder of JPEG photos of mixed sizes, with random ViT weights, every chapter executed — SFM
at IPC 10 with 256 px images, 224 px crops, the papers' recipe, two-pass and the pyramid growing inside the
run; LGM against it (chapter 4); classifier inheritance across two ViTs (chapter 5). The overrides only
shrink the run (a test below checks that), and the backbones are the small ViTs of the same kinds (ViT-S/14
DINOv2 for ViT-B/14 DINOv2, a ViT-S/16 for the ViT-B/16 evaluated on): the same code paths at 224 px, at a
quarter of the compute (the miniature took 889 s with the ViT-Bs on a 2-core AVX2 CPU); nothing else of the
preset changes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sfm_lib import recipes, repro

ROOT = Path(__file__).resolve().parents[1]
PRESET = "in100-dinov2-ipc10"
# what the miniature may change besides sizes: where the data are, random weights, the CPU, two-pass on, and
# the small ViTs of the preset's kinds (patch 14 DINOv2 and a patch 16 ViT, as the preset's two)
NOT_SIZES = {"dataset": None, "pretrained": False, "device": "cpu", "two_pass": True,
             "backbone": "vit_small_patch14_dinov2.lvd142m", "eval_backbones": ["vit_small_patch16_224.augreg_in21k"],
             "other_backbone": "vit_small_patch16_224.augreg_in21k"}
SIZES = {"steps": 2, "steps_large": 2, "other_steps": 2, "recipe_overrides": {"grow_every": 1},
         "probe_seeds": [3407, 3408], "epochs": 2, "views": 2, "probe_views": 2, "ipc_large": 0,
         "lgm_augs": 1, "bench_steps": 1, "bench_views": [1], "feature_steps": 2, "draws": 2, "grad_steps": 2,
         "batch_sizes": [1, 0],
         "val_per_class": 1, "agreement_draws": 5,
         "multi_backbone": False, "fit_seeds": [0]}


def _shrinks(value, reference) -> bool:
    """A number no larger, a list of some of the reference's entries, a mapping whose values shrink."""
    if isinstance(value, dict):
        return all(_shrinks(v, reference[k]) for k, v in value.items())
    if isinstance(value, list):
        return set(value) <= set(reference)
    return value <= reference


def test_the_miniature_only_shrinks_the_preset():
    _, preset = repro.load_preset(PRESET, ROOT)
    declared = repro.chapter_parameters(repro.chapters(ROOT))
    defaults = {k: eval(v["default"]) for d in declared.values() for k, v in d.items()}
    paper = recipes.get(preset["recipe"])
    for key, value in SIZES.items():
        ref = preset.get(key, defaults[key])
        if key == "recipe_overrides":
            ref = {k: getattr(paper, k) for k in value}
        assert _shrinks(value, ref), (key, value, ref)
    assert set(NOT_SIZES) | set(SIZES) <= set(defaults)


@pytest.mark.slow
def test_the_papers_run_in_miniature(tmp_path):
    from sfm_lib import bench

    photos = bench.jpeg_folder(tmp_path / "photos", classes=2, per_class=12, seed=0, test_per_class=3)
    overrides = {**NOT_SIZES, "dataset": f"imagefolder:{photos}", **SIZES}
    argv = [sys.executable, "-m", "sfm_lib", "repro", PRESET, "--out", str(tmp_path / "out")]
    for key, value in overrides.items():
        argv += ["-p", key, json.dumps(value)]
    env = {**os.environ, "SFM_CACHE": str(tmp_path / "cache"), "PYTHONWARNINGS": "ignore"}
    t0 = time.perf_counter()
    run = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=900, cwd=ROOT)
    wall = time.perf_counter() - t0
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    chapters = results["chapters"]
    assert [c[:2] for c in chapters] == ["01", "02", "03", "04", "05"]
    times = {name: c["time_s"] for name, c in chapters.items()}
    print(f"miniature {PRESET}: {wall:.0f} s in all; chapters {times}")
    row = chapters["02_flow_matching"]["tables"]["distillation"][0]
    assert row["recipe"].startswith("paper + ") and (row["param"], row["lr"], row["steps"], row["ipc"]) == (
        "pyramid", 2e-3, 2, 10)
    assert row["two_pass"] is True and row["levels"] == 2 and row["crop"] == 224 and row["resolution"] == 256
