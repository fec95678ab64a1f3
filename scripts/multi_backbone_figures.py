"""Issue 14 figures: lite0+lite1 vs lite0 alone (chapter 3 recipe), 2 distillation seeds x 3 probe seeds,
on lite0, lite1, lite2, and the step times measured in the same run.
Usage: python scripts/multi_backbone_figures.py STEPS[,STEPS...] OUT.json"""
import json, sys, time
from sfm_lib import evaluate, experiments

steps_list = [int(s) for s in sys.argv[1].split(",")]
out = sys.argv[2]
ctx0 = experiments.prepare("fashion_mnist", "effnet_lite0", 64, 0, "cpu", progress=False)
ctx1 = experiments.prepare("fashion_mnist", "effnet_lite1", 64, 1000, "cpu", progress=False)
recipe = dict(augs=1, ema=0.7, init="real", crop_scale=0.3, noise_p=0.0)
probe = dict(epochs=1000, seeds=(0, 1, 2), views=40)
names = ["effnet_lite0", "effnet_lite1", "effnet_lite2"]
rows = []
for steps in steps_list:
    for seed in (0, 1):
        for label, c in [("lite0", ctx0), ("lite0+lite1", [ctx0, ctx1])]:
            t = time.time()
            d = experiments.distilled(c, ipc=1, steps=steps, seed=seed, **recipe)
            wall = time.time() - t
            df = evaluate.cross_backbone(d, names, ctx0.test, 64, device="cpu", **probe)
            for r in df.to_dict("records"):
                rows.append(dict(r, distilled=label, steps=steps, seed=seed,
                                 time_s=d.meta["time_s"], wall_this_run=round(wall, 1)))
            json.dump(rows, open(out, "w"), indent=1)
            print(label, steps, seed, df[["eval_backbone", "top1_mean"]].values.tolist(),
                  d.meta["time_s"], flush=True)
    one = experiments.step_seconds(ctx0, steps=6, repeats=3, **recipe)
    two = experiments.step_seconds([ctx0, ctx1], steps=6, repeats=3, **recipe)
    rows.append({"step_seconds_single": one, "step_seconds_pair": two, "steps": steps})
    json.dump(rows, open(out, "w"), indent=1)
    print("step s", one, two, two / one, flush=True)
