"""Figures used by the book: image grids, a PCA map of features with class means and flows, curves.

:func:`watch_labels` makes every pyplot figure check its labels when it is drawn: two texts (tick labels,
annotations, legend entries, titles) whose glyph boxes overlap raise a :class:`LabelOverlapWarning`,
which the book's browser check (``scripts/check_book.py``) reports as overlapping figure labels."""
from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Sequence

import torch

__all__ = ["image_grid", "PCA", "feature_map", "counts_bar", "loss_curve", "snapshot_grid", "agreement",
           "flow_cosine", "step_cosines", "method_costs", "accuracy_vs_storage", "LabelOverlapWarning",
           "overlapping_labels", "watch_labels"]


# ------------------------------------------------------------------------------------------ label overlap
class LabelOverlapWarning(UserWarning):
    """Two labels of a drawn figure overlap (see :func:`overlapping_labels`)."""


def _text_box(text, renderer):
    """The corners of a text's glyph box in display pixels: its unrotated extent turned by its rotation
    around the centre of its axis-aligned extent (which the turned box shares)."""
    from matplotlib.text import Text

    outer = text.get_window_extent(renderer)
    angle = math.radians(text.get_rotation() % 180)
    if abs(math.sin(angle)) < 1e-6:
        return [(outer.x0, outer.y0), (outer.x1, outer.y0), (outer.x1, outer.y1), (outer.x0, outer.y1)]
    flat = Text(0, 0, text.get_text(), fontproperties=text.get_fontproperties(),
                linespacing=text.get_linespacing(), usetex=text.get_usetex())
    flat.set_figure(text.get_figure(root=True) if hasattr(text, "get_figure") else text.figure)
    inner = flat.get_window_extent(renderer)
    cx, cy = (outer.x0 + outer.x1) / 2, (outer.y0 + outer.y1) / 2
    w, h = inner.width / 2, inner.height / 2
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in [(-w, -h), (w, -h), (w, h), (-w, h)]]


def _polygons_overlap(a, b, margin: float = 0.5) -> bool:
    """Separating-axis test of two convex quadrilaterals, overlapping by more than ``margin`` pixels."""
    for poly in (a, b):
        for i in range(len(poly)):
            (x0, y0), (x1, y1) = poly[i], poly[(i + 1) % len(poly)]
            nx, ny = y0 - y1, x1 - x0
            norm = math.hypot(nx, ny) or 1.0
            pa = [(x * nx + y * ny) / norm for x, y in a]
            pb = [(x * nx + y * ny) / norm for x, y in b]
            if min(max(pa), max(pb)) - max(min(pa), min(pb)) <= margin:
                return False
    return True


def overlapping_labels(fig, renderer=None) -> list[tuple[str, str]]:
    """Pairs of visible, non-empty texts of ``fig`` whose glyph boxes overlap (rotated texts by their
    turned box, so rotated tick labels side by side do not count)."""
    from matplotlib.text import Text

    if renderer is None:
        fig.canvas.draw_without_rendering() if hasattr(fig.canvas, "draw_without_rendering") else None
        renderer = fig.canvas.get_renderer()
    hidden = _undrawn_tick_labels(fig)
    texts = [t for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip() and t.get_alpha() != 0
             and id(t) not in hidden
             and (t.axes is None or t.get_clip_on() is False or _inside_axes(t, renderer))]
    boxes = [(t, _text_box(t, renderer)) for t in texts]
    found = []
    for i, (t, a) in enumerate(boxes):
        for u, b in boxes[i + 1:]:
            if _polygons_overlap(a, b):
                found.append((t.get_text(), u.get_text()))
    return found


def _undrawn_tick_labels(fig) -> set[int]:
    """Ids of the tick labels a draw leaves out: matplotlib keeps label objects of ticks outside the view
    interval (visible, at stale positions) but does not draw them."""
    hidden = set()
    for ax in fig.axes:
        for axis in ax._axis_map.values() if hasattr(ax, "_axis_map") else (ax.xaxis, ax.yaxis):
            try:
                drawn = set(map(id, axis._update_ticks()))
            except Exception:  # a private helper; without it every label counts
                continue
            for tick in axis.get_major_ticks() + axis.get_minor_ticks():
                if id(tick) not in drawn:
                    hidden.update({id(tick.label1), id(tick.label2)})
    return hidden


def _inside_axes(text, renderer) -> bool:
    """A clipped text (an annotation, a data label) counts only where it is drawn inside its axes."""
    box, clip = text.get_window_extent(renderer), text.axes.bbox
    return box.x1 > clip.x0 and box.x0 < clip.x1 and box.y1 > clip.y0 and box.y0 < clip.y1


def _warn_on_overlap(event) -> None:
    pairs = overlapping_labels(event.canvas.figure, event.renderer)
    if pairs:
        shown = "; ".join(f"{a!r} and {b!r}" for a, b in pairs[:3])
        more = f" (and {len(pairs) - 3} more pairs)" if len(pairs) > 3 else ""
        warnings.warn(f"figure labels overlap: {shown}{more}", LabelOverlapWarning, stacklevel=2)


def _watch(fig) -> None:
    """A ``figure.hooks`` entry: check the figure's labels at every draw."""
    fig.canvas.mpl_connect("draw_event", _warn_on_overlap)


def watch_labels() -> None:
    """From now on every figure made through pyplot warns (:class:`LabelOverlapWarning`) when it is drawn
    with overlapping labels (matplotlib's ``figure.hooks``). Called by :class:`sfm_lib.report.Card`."""
    import matplotlib

    hook = f"{__name__}:_watch"
    if hook not in matplotlib.rcParams["figure.hooks"]:
        matplotlib.rcParams["figure.hooks"] = [*matplotlib.rcParams["figure.hooks"], hook]


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


def _cosine_lines(ax, table, by: str, x: str, label: Callable[[Any], str]) -> None:
    """One line per value of column ``by``: the mean of ``cosine`` against column ``x`` (log scale), with a
    band of ± one std over the rows that share both, under a grey line at cosine 1 (the same direction)."""
    for key, rows in table.groupby(by):
        agg = rows.groupby(x)["cosine"].agg(["mean", "std"]).fillna(0.0)
        at = agg.index.to_numpy(dtype=float)
        line, = ax.plot(at, agg["mean"], marker="o", label=label(key))
        ax.fill_between(at, agg["mean"] - agg["std"], agg["mean"] + agg["std"], color=line.get_color(),
                        alpha=0.15, linewidth=0)
    ax.set_xscale("log")
    ax.axhline(1.0, color="0.8", lw=0.8, zorder=0)


def flow_cosine(table, ax=None, title: str | None = None):
    """Cosine between the LGM head gradient and the real flow against the images per class in the batch
    (log scale), one line per head standard deviation σ: mean over draws, with a band of ± one std.
    ``table``: the DataFrame of :func:`sfm_lib.analysis.lgm_flow_cosine`."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(7, 3.5))
    _cosine_lines(ax, table, "sigma", "images_per_class", lambda s: "σ = 0" if s == 0 else f"σ = {s:g}")
    ax.set_xlabel("real images per class in the batch (rightmost: the whole split)")
    ax.set_ylabel("cos(∂CE/∂W, real flow F)")
    ax.legend(title="head W ~ N(0, σ²)", fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    if title:
        ax.set_title(title)
    return ax


def probe_fidelity(table, ax=None, title: str | None = None):
    """Cosine between the unrolled probe's ΔW after K steps and the evaluation probe's ΔW, against K (log
    scale), one line per images per class: mean over seeds with a band of ± one std. ``table``: a DataFrame
    of :func:`sfm_lib.unrolled.probe_fidelity` rows with an ``ipc`` column."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(7, 3.5))
    _cosine_lines(ax, table, "ipc", "steps", lambda n: f"IPC {n}")
    ax.set_xlabel("steps K of the unrolled probe")
    ax.set_ylabel("cos(ΔW after K steps, ΔW of evaluation)")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
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
    the (φ_d → φ_e) pair, marker = the method and, for inherited classifiers, the images P was fitted on
    (filled: the distilled images; hollow triangles: random or centroid real images, the controls). No text
    sits beside the points: the controls of a pair have the same storage and close accuracies, and labels
    there would overlap. The legend is outside the axes, right of them."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(7, 4))
    shapes = {("inherited", "distilled"): ("o", True), ("inherited", "random"): ("^", False),
              ("inherited", "centroids"): ("v", False), ("normal probe", None): ("s", True),
              ("full-data probe", None): ("*", True)}
    names = {("inherited", "distilled"): "inherited, P fitted on the distilled images",
             ("inherited", "random"): "inherited, P fitted on random real images",
             ("inherited", "centroids"): "inherited, P fitted on centroid images",
             ("normal probe", None): "normal probe on the distilled images",
             ("full-data probe", None): "full-data probe"}
    pairs = list(dict.fromkeys(zip(table["distill_backbone"], table["eval_backbone"])))
    cmap = plt.get_cmap("tab10")
    seen = set()
    for k, (d, e) in enumerate(pairs):
        rows = table[(table["distill_backbone"] == d) & (table["eval_backbone"] == e)]
        colour = cmap(k % 10)
        for _, r in rows.iterrows():
            fit = r["fit_on"] if r["method"] == "inherited" and isinstance(r["fit_on"], str) else None
            key = (r["method"], fit)
            seen.add(key)
            marker, filled = shapes.get(key, ("x", True))
            ax.scatter(r["storage_bytes"], r["top1"], marker=marker, s=120 if marker == "*" else 60,
                       edgecolors=colour, facecolors=colour if filled else "none", linewidths=1.4, zorder=3)
        ax.plot([], [], color=colour, lw=6, label=f"distil {d}, evaluate {e}")
    for key, (marker, filled) in shapes.items():
        if key in seen:
            ax.scatter([], [], marker=marker, edgecolors="0.3", facecolors="0.3" if filled else "none",
                       label=names[key])
    ax.set_xscale("log")
    ax.set_xlabel("bytes kept (W, b, P in float32 · distilled images as PNG · training set as uint8)")
    ax.set_ylabel("top-1 on the real test split (%)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    ax.grid(alpha=0.3, which="major")
    if title:
        ax.set_title(title)
    return ax
