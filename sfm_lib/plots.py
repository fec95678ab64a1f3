"""Figures used by the book: image grids, a PCA map of features with class means and flows, curves."""
from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["image_grid", "PCA", "feature_map", "counts_bar", "loss_curve", "snapshot_grid", "agreement",
           "flow_cosine", "step_cosines", "method_costs", "accuracy_vs_storage"]


def image_grid(images: torch.Tensor, labels: torch.Tensor, classes: Sequence[str], per_class: int = 8,
               ax=None, title: str | None = None):
    """Rows = classes, columns = the first ``per_class`` images of that class. Images ``[N,3,H,W]`` in [0,1]."""
    import matplotlib.pyplot as plt

    C = len(classes)
    cols = min(per_class, max(int((labels == c).sum()) for c in range(C)))
    h, w = images.shape[-2:]
    canvas = torch.ones(3, C * (h + 2), cols * (w + 2))
    for c in range(C):
        idx = torch.nonzero(labels == c).flatten()[:cols]
        for j, i in enumerate(idx.tolist()):
            canvas[:, c * (h + 2) + 1:c * (h + 2) + 1 + h, j * (w + 2) + 1:j * (w + 2) + 1 + w] = images[i].float()
    if ax is None:
        _, ax = plt.subplots(figsize=(max(3.0, 1.0 * cols + 1.5), 0.9 * C + 0.5))
    ax.imshow(canvas.clamp(0, 1).permute(1, 2, 0).numpy(), interpolation="nearest")
    ax.set_yticks([c * (h + 2) + h / 2 for c in range(C)], list(classes))
    ax.set_xticks([])
    if title:
        ax.set_title(title)
    return ax


class PCA:
    """2-D principal-component projection fitted on rows of ``x`` (centred SVD, float64)."""

    def __init__(self, x: torch.Tensor, k: int = 2):
        x = x.double()
        self.mean = x.mean(0)
        _, s, vh = torch.linalg.svd(x - self.mean, full_matrices=False)
        self.components = vh[:k]
        self.explained = (s[:k] ** 2 / (s ** 2).sum()).tolist()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x.double() - self.mean) @ self.components.T


def feature_map(feats: torch.Tensor, labels: torch.Tensor, means: torch.Tensor, classes: Sequence[str],
                pca: PCA | None = None, flows: bool = True, extra: torch.Tensor | None = None,
                extra_labels: torch.Tensor | None = None, ax=None, title: str | None = None):
    """Scatter of features in 2-D PCA, class means as large dots, and (``flows``) arrows μ_c → mean_{k≠c} μ_k,
    i.e. the real flow f_c. ``extra`` (e.g. distilled-image features) is drawn as stars. Returns (ax, pca)."""
    import matplotlib.pyplot as plt

    pca = pca or PCA(means if feats is None else feats)
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 6))
    cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    if feats is not None:
        p = pca(feats)
        ax.scatter(p[:, 0], p[:, 1], c=[cmap(int(y) % cmap.N) for y in labels], s=4, alpha=0.25, linewidths=0)
    m = pca(means)
    C = len(classes)
    for c in range(C):
        ax.scatter(m[c, 0], m[c, 1], color=cmap(c % cmap.N), s=90, edgecolors="k", zorder=3, label=classes[c])
    if flows:
        others = (m.sum(0, keepdim=True) - m) / (C - 1)
        for c in range(C):
            ax.annotate("", xy=others[c].tolist(), xytext=m[c].tolist(), zorder=2,
                        arrowprops=dict(arrowstyle="->", color=cmap(c % cmap.N), lw=1.5))
    if extra is not None:
        e = pca(extra)
        ax.scatter(e[:, 0], e[:, 1], c=[cmap(int(y) % cmap.N) for y in extra_labels], marker="*", s=220,
                   edgecolors="k", linewidths=0.8, zorder=4)
    ax.set_xlabel(f"PC1 ({100 * pca.explained[0]:.0f}% of variance)")
    ax.set_ylabel(f"PC2 ({100 * pca.explained[1]:.0f}%)")
    ax.legend(fontsize=7, loc="best", markerscale=0.6)
    if title:
        ax.set_title(title)
    return ax, pca


def counts_bar(counts: torch.Tensor, classes: Sequence[str], ax=None, title: str | None = None):
    """Bar chart of images per class."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(7, 2.5))
    ax.bar(range(len(classes)), counts.tolist(), color="tab:gray")
    ax.set_xticks(range(len(classes)), list(classes), rotation=45, ha="right")
    ax.set_ylabel("images")
    if title:
        ax.set_title(title)
    return ax


def loss_curve(history: Sequence[float], ax=None, title: str | None = None, label: str | None = None,
               grow_every: int | None = None):
    """Loss per step (log scale), with vertical lines where a pyramid level was added."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(7, 3))
    ax.plot(range(len(history)), history, lw=1, label=label)
    if grow_every:
        for s in range(grow_every, len(history), grow_every):
            ax.axvline(s, color="0.85", lw=0.8, zorder=0)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if title:
        ax.set_title(title)
    if label:
        ax.legend()
    return ax


def snapshot_grid(snapshots: dict[int, torch.Tensor], labels: torch.Tensor, classes: Sequence[str],
                  per_class: int = 1, title: str | None = None):
    """Rows = classes, columns = optimisation steps: how the first image(s) of each class evolve."""
    import matplotlib.pyplot as plt

    steps = sorted(snapshots)
    C = len(classes)
    fig, axes = plt.subplots(1, len(steps), figsize=(1.1 * len(steps) * per_class + 1.5, 0.9 * C + 0.8),
                             squeeze=False)
    for j, (ax, s) in enumerate(zip(axes[0], steps)):
        image_grid(snapshots[s], labels, classes, per_class=per_class, ax=ax, title=f"step {s}")
        if j:
            ax.set_yticks([])
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def agreement(cosines: dict[str, torch.Tensor], ax=None, title: str | None = None):
    """One box per estimator of :func:`sfm_lib.analysis.gradient_agreement`: its cosines with the reference
    gradient (1 = the gradient of the expected features)."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(7, 3))
    names = list(cosines)
    ax.boxplot([cosines[n].numpy() for n in names], vert=False, widths=0.6)
    ax.set_yticks(range(1, len(names) + 1), names)
    ax.invert_yaxis()
    ax.set_xlabel("cos(∂L/∂s at the estimate, ∂L/∂s at the expected features)")
    ax.set_xlim(right=1.0)
    if title:
        ax.set_title(title)
    return ax


def flow_cosine(table, ax=None, title: str | None = None):
    """Cosine between the LGM head gradient and the real flow against the images per class in the batch
    (log scale), one line per head standard deviation σ: mean over draws, with a band of ± one std.
    ``table``: the DataFrame of :func:`sfm_lib.analysis.lgm_flow_cosine`."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(7, 3.5))
    for sigma, rows in table.groupby("sigma"):
        agg = rows.groupby("images_per_class")["cosine"].agg(["mean", "std"]).fillna(0.0)
        x = agg.index.to_numpy(dtype=float)
        label = "σ = 0" if sigma == 0 else f"σ = {sigma:g}"
        line, = ax.plot(x, agg["mean"], marker="o", label=label)
        ax.fill_between(x, agg["mean"] - agg["std"], agg["mean"] + agg["std"], color=line.get_color(),
                        alpha=0.15, linewidth=0)
    ax.set_xscale("log")
    ax.set_xlabel("real images per class in the batch (rightmost: the whole split)")
    ax.set_ylabel("cos(∂CE/∂W, real flow F)")
    ax.axhline(1.0, color="0.8", lw=0.8, zorder=0)
    ax.legend(title="head W ~ N(0, σ²)", fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    if title:
        ax.set_title(title)
    return ax


def step_cosines(table, ax=None, title: str | None = None):
    """One box per method: the cosines between its image gradients at consecutive steps (1: the step
    points the same way as the last one). ``table``: the DataFrame of
    :func:`sfm_lib.analysis.step_to_step_cosine`."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(7, 2.5))
    names = list(dict.fromkeys(table["method"]))
    ax.boxplot([table.loc[table["method"] == n, "cosine_next"].to_numpy() for n in names], vert=False,
               widths=0.6)
    ax.set_yticks(range(1, len(names) + 1), names)
    ax.invert_yaxis()
    ax.set_xlabel("cos(∂L/∂x at step t, ∂L/∂x at step t+1), same images x")
    ax.set_xlim(min(0.0, float(table["cosine_next"].min())) - 0.05, 1.02)
    if title:
        ax.set_title(title)
    return ax


def method_costs(results, title: str | None = None):
    """Bars of the time per step and the peak memory of each configuration of ``bench methods``, relative
    to SFM at A = 1 of the same run, one colour per run. ``results``: label → the JSON of a run (with
    ``"runs"``: name → {``median_s``, ``peak_gib``}). Relative values let a CPU and a GPU run share axes."""
    import matplotlib.pyplot as plt
    import numpy as np

    labels = list(results)
    names = list(dict.fromkeys(n for r in results.values() for n in r["runs"]))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
    width = 0.8 / max(1, len(labels))
    for ax, key, what in [(axes[0], "median_s", "time per step"), (axes[1], "peak_gib", "peak memory")]:
        for j, label in enumerate(labels):
            runs = results[label]["runs"]
            ref = runs.get("sfm_A1", {}).get(key) or float("nan")
            vals = [runs[n][key] / ref if n in runs else float("nan") for n in names]
            ax.bar(np.arange(len(names)) + (j - (len(labels) - 1) / 2) * width, vals, width, label=label)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.set_ylabel(f"{what} (× SFM, A = 1)")
        ax.axhline(1.0, color="0.6", lw=0.8)
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig

def accuracy_vs_storage(table, ax=None, title: str | None = None):
    """Top-1 against bytes kept (log scale), one point per row of :func:`sfm_lib.inherit.comparison`: colour =
    the (φ_d → φ_e) pair, marker = the method (inherited classifiers fitted on each image set, the normal probe
    on the distilled images, the full-data probe)."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(7, 4))
    markers = {"inherited": "o", "normal probe": "s", "full-data probe": "*"}
    fills = {"distilled": None, "random": "none", "centroids": "none"}
    pairs = list(dict.fromkeys(zip(table["distill_backbone"], table["eval_backbone"])))
    cmap = plt.get_cmap("tab10")
    for k, (d, e) in enumerate(pairs):
        rows = table[(table["distill_backbone"] == d) & (table["eval_backbone"] == e)]
        for _, r in rows.iterrows():
            fit = r["fit_on"] if isinstance(r["fit_on"], str) else None
            face = fills.get(fit) if fit else None
            ax.scatter(r["storage_bytes"], r["top1"], marker=markers.get(r["method"], "x"), s=110 if
                       r["method"] == "full-data probe" else 60, color=cmap(k % 10), zorder=3,
                       facecolors=face if face else cmap(k % 10), linewidths=1.4)
            if fit and fit != "distilled":
                ax.annotate(fit, (r["storage_bytes"], r["top1"]), textcoords="offset points", xytext=(6, -3),
                            fontsize=7, color=cmap(k % 10))
        ax.plot([], [], color=cmap(k % 10), lw=6, label=f"distil {d}, evaluate {e}")
    for method, m in markers.items():
        ax.scatter([], [], marker=m, color="0.3", label=method)
    ax.scatter([], [], marker="o", facecolors="none", color="0.3", label="inherited, P fitted on real images")
    ax.set_xscale("log")
    ax.set_xlabel("bytes kept (W, b, P in float32 · distilled images as PNG · training set as uint8)")
    ax.set_ylabel("top-1 on the real test split (%)")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3, which="major")
    if title:
        ax.set_title(title)
    return ax
