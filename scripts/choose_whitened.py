"""Candidate (a) of our objectives, whitened flows, measured on the validation split of the offline default
(Fashion-MNIST, EfficientNet-Lite0, 64 px, the recipe ``fmnist-lite0-64``, IPC 1, its 500 steps, 3 seeds).

The within-class covariance Σ_w = (1/N) Σ_i (φ_i − μ_{y_i})(φ_i − μ_{y_i})ᵀ of the cached training features
(float64, D × D) and λ = κ·tr(Σ_w)/D give the whitened flow

    F_w = (F (Σ_w + λI)⁻¹) · s‖F‖/‖F (Σ_w + λI)⁻¹‖      (rows f_c of SFM's flow F, one global scale)

that a discriminant (LDA-like) rule would want between the class means. Two losses on the synthetic flow F̃
(the recipe's running average of the class means, as SFM's):

- ``cos``: L = 1 − cos(vec F̃, vec F_w), SFM's loss against the whitened direction (s does not matter);
- ``mse``: L = ‖F̃ − F_w‖² / ‖F_w‖², which also fixes the magnitude (translation invariant, as SFM).

First, in feature space: ten rows μ̄ − (C−1)/C · F_w (the means the whitened flow points between) as the
probe's training set, no augmentation, scored on validation, for each (κ, s). Then on images, each variant
distilled from random real images with the recipe's optimiser, augmentation and steps, and scored by three
probes (1000 epochs, 40 views) on validation (which chooses) and test (reported only).

    python scripts/choose_whitened.py [--variants NAME,...] [--seeds 0,1,2] [--out FILE]

Not part of ``sfm_lib``: the objective goes in only if it beats SFM on validation (chapter 4 shows the
table). The JSON (written atomically) holds the command, the machine, the feature-space rows and one row
per (variant, seed) in the format of ``scripts/choose_refinement.py``.
"""
from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sfm_lib import distill, evaluate, experiments, features, flow, recipes  # noqa: E402
from sfm_lib.objectives import SFMObjective  # noqa: E402
from sfm_lib.utils import write_json  # noqa: E402

KAPPAS, SCALES = (0.1, 1.0), (0.1, 0.3, 1.0)
# name → (what it is, loss, κ, s)
VARIANTS = {
    "whitened cos κ=0.1": ("SFM's cosine against the whitened flow, λ = 0.1·tr Σ_w/D", "cos", 0.1, 1.0),
    "whitened cos κ=1": ("SFM's cosine against the whitened flow, λ = 1·tr Σ_w/D", "cos", 1.0, 1.0),
    "whitened mse κ=0.1 s=0.3": ("relative MSE to the whitened flow, λ = 0.1·tr Σ_w/D, s = 0.3", "mse", 0.1, 0.3),
    "whitened mse κ=1 s=0.3": ("relative MSE to the whitened flow, λ = 1·tr Σ_w/D, s = 0.3", "mse", 1.0, 0.3),
}


def within_class_covariance(feats: torch.Tensor, labels: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """Σ_w [D, D] in float64, accumulated over blocks of rows (memory independent of N)."""
    sw = torch.zeros(feats.shape[1], feats.shape[1], dtype=torch.float64)
    for lo in range(0, len(feats), 8192):
        d = feats[lo:lo + 8192].double() - means[labels[lo:lo + 8192]]
        sw += d.T @ d
    return sw / len(feats)


def whitened_flow(means: torch.Tensor, sw: torch.Tensor, kappa: float, scale: float) -> torch.Tensor:
    """F_w = F (Σ_w + λI)⁻¹ rescaled to ``scale``·‖F‖, λ = κ·tr(Σ_w)/D (Σ_w symmetric)."""
    f = flow.real_flow(means)
    lam = kappa * float(torch.diagonal(sw).sum()) / sw.shape[0]
    fw = torch.linalg.solve(sw + lam * torch.eye(sw.shape[0], dtype=sw.dtype), f.T).T
    return fw * (scale * f.norm() / fw.norm())


class WhitenedFlowObjective(SFMObjective):
    """SFM with the whitened flow F_w as its target; ``loss`` "cos" (direction) or "mse" (relative MSE)."""

    method = "whitened"

    def __init__(self, stats, device, target: torch.Tensor, loss: str, ema: float):
        super().__init__(stats, device, "flow", False, 1, ema)
        self.target, self.kind = target.float().to(device), loss

    def identity(self) -> dict:
        return {**super().identity(), "whitened": self.kind}

    def __call__(self, z, labels, slots):
        stat = flow.class_means(z, labels, self.C)
        if self.ema:
            stat, self.running = flow.straight_through_ema(stat, self.running, self.ema)
        syn = flow.real_flow(stat)
        if self.kind == "cos":
            return flow.sfm_loss(syn, self.target)
        return (syn - self.target).pow(2).sum() / self.target.pow(2).sum()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default=None, help=f"comma-separated names (default: all: {', '.join(VARIANTS)})")
    p.add_argument("--seeds", default="0,1,2", help="distillation seeds")
    p.add_argument("--steps", type=int, default=None, help="distillation steps (default: the recipe's)")
    p.add_argument("--out", default=None, help="default: results/refinement_choice/whitened-ipc1.json")
    a = p.parse_args()
    names = [n for n in (a.variants or ",".join(VARIANTS)).split(",") if n]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    seeds = [int(s) for s in a.seeds.split(",")]
    ctx = experiments.prepare("fashion_mnist", "effnet_lite0", 64, 0, "cpu", False, progress=False)
    feats, labels = features.compute(ctx.backbone, ctx.train, ctx.resolution, progress=False,
                                     transform=ctx.transform)
    val_feats, val_labels = features.compute(ctx.backbone, ctx.val, ctx.resolution, progress=False,
                                             transform=ctx.transform)
    means, C = ctx.stats.means.double(), ctx.stats.num_classes
    sw = within_class_covariance(feats, labels, means)
    classes = torch.arange(C)

    def probe_val(rows: torch.Tensor) -> float:
        accs = [evaluate.accuracy(*evaluate.train_probe(rows, classes, C, epochs=1000, seed=s),
                                  val_feats.double(), val_labels) for s in (0, 1, 2)]
        return round(sum(accs) / len(accs), 2)

    centre = means.mean(0, keepdim=True)
    feature_rows = [{"rows": "class means", "val_top1": probe_val(means)}]
    for kappa in KAPPAS:
        for s in SCALES:  # f_c = C/(C−1)(μ̄ − μ_c), so the rows the flow points between are μ̄ − (C−1)/C f_c
            rows = centre - (C - 1) / C * whitened_flow(means, sw, kappa, s)
            feature_rows.append({"rows": f"whitened κ={kappa:g} s={s:g}", "kappa": kappa, "s": s,
                                 "val_top1": probe_val(rows)})
            print(feature_rows[-1])

    run = recipes.run("fmnist-lite0-64", {})
    kwargs = {**run.sfm_kwargs(), "ipc": 1, "progress": False}
    if a.steps is not None:
        kwargs["steps"] = a.steps
    rows = []
    for name in names:
        what, loss, kappa, s = VARIANTS[name]
        target = whitened_flow(means, sw, kappa, s)
        for seed in seeds:
            config = distill._config({**kwargs, "seed": seed})  # the entry points' checked config
            objective = WhitenedFlowObjective(ctx.stats, ctx.backbone.device, target, loss, kwargs["ema"])
            result = distill.run(ctx.backbone, objective, config, ctx.stats.classes, init_dataset=ctx.train)
            probe = evaluate.linear_probe(ctx.backbone, result, ctx.test, ctx.resolution, epochs=1000,
                                          seeds=(0, 1, 2), views=40, transform=ctx.transform)
            val = evaluate.score_on(probe, ctx.backbone, ctx.val, ctx.resolution, transform=ctx.transform)
            rows.append({"variant": name, "what": what, "distill_seed": seed,
                         "val_top1": round(val.top1_mean, 2), "top1": round(probe.top1_mean, 2)})
            print(rows[-1])
    out = Path(a.out or ROOT / "results" / "refinement_choice" / "whitened-ipc1.json")
    command = shlex.join(["python", "scripts/choose_whitened.py", *sys.argv[1:]])  # variant names hold spaces
    write_json(out, {"command": command,
                     "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores", "steps": kwargs["steps"],
                     "ipc": 1, "feature_rows": feature_rows, "rows": rows})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
