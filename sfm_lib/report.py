"""What a chapter tells its reader about itself: a card with its measured cost, measured numbers glued
into the prose, files to download, the records of the results page, and ``export`` of a distilled set.

In a chapter (the book's cells; any notebook works the same way)::

    card = report.Card("03_evaluation")       # first code cell: starts the clock
    ...
    report.glue("sfm_top1", 72.31, ".1f")     # prose: {glue}`sfm_top1` → 72.3
    report.downloads("03_evaluation", distilled={"sfm-ipc1": d}, tables={"summary": df})
    card.finish(headline={"SFM top-1 (%)": 72.31})   # last code cell

:class:`Card` measures the chapter's own wall time (from the card's cell to ``finish``) and the peak
resident memory of its kernel (``getrusage``: the high-water mark of the process, VmHWM on Linux), and
glues them as ``card_time``, ``card_memory`` and ``card_machine`` for the card at the top of the page
(myst-nb resolves a glue name anywhere on the page, so the card may show what is measured at the end).

Where the book's records go (:func:`build_dir`): ``$SFM_BOOK_BUILD``, or ``_build`` in the notebook's
working folder (the chapters run in ``book/``, so ``book/_build/``, which git ignores); under ``python -m
sfm_lib repro --out OUT``, ``OUT``:

- ``cards/<chapter>.json``: wall time, peak memory, machine, date, commit, headline numbers;
- ``results/<chapter>/<table>.json``: the tables the chapter passed to :func:`sfm_lib.repro.record`
  (the card points ``$SFM_RESULTS`` there unless the reproduction runner already set it);
- ``downloads/<chapter>/``: the files the page links with the ``{download}`` role.

The results page (:func:`results`) reads the cards and tables of the chapters of ``_toc.yml``.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Mapping

from .utils import atomic_path

__all__ = ["BUILD_ENV", "build_dir", "Card", "Text", "glue", "peak_rss_bytes", "machine", "describe_machine", "commit",
           "format_seconds", "format_bytes", "downloads", "results", "tiny_times", "export"]

BUILD_ENV = "SFM_BOOK_BUILD"
"""Folder of the book build's records (cards, tables, downloads); default ``_build`` in the working folder."""

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def build_dir() -> Path:
    """``$SFM_BOOK_BUILD``; else, where ``$SFM_RESULTS`` is set (``<folder>/<tables>/<chapter>``: by a
    :class:`Card`, or by ``python -m sfm_lib repro`` as ``OUT/tables/<chapter>``), two levels above it; else
    ``_build`` in the working folder (a chapter runs in ``book/``)."""
    from .repro import RESULTS_ENV

    if os.environ.get(BUILD_ENV):
        return Path(os.environ[BUILD_ENV])
    if os.environ.get(RESULTS_ENV):
        return Path(os.environ[RESULTS_ENV]).resolve().parents[1]
    return Path("_build")


def _check_name(name: str, what: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"{what} {name!r}: use letters, digits, '_', '.' and '-' only")
    return name


# ------------------------------------------------------------------------------------------ glue
class Text(str):
    """A string that displays as itself (a glued ``str`` would show its quotes)."""

    def __repr__(self) -> str:
        return str(self)

    def _repr_pretty_(self, p, cycle) -> None:
        p.text(str(self))


def glue(name: str, value: Any, fmt: str | None = None) -> None:
    """Glue ``value`` (formatted with ``fmt``, e.g. ``".1f"``) under ``name`` for ``{glue}`name``` in the
    prose, without showing it in the cell (and returning nothing, so a cell may end with it). Outside a
    notebook kernel it does nothing."""
    _check_name(name, "glue name")
    text = Text(format(value, fmt) if fmt else str(value))
    try:
        from IPython import get_ipython
    except ImportError:
        return
    if get_ipython() is None:
        return
    try:
        from myst_nb import glue as _glue
    except ImportError:  # Colab and plain Jupyter: the same display record, nothing visible
        from IPython.display import display

        display({"application/papermill.record/text/plain": str(text)}, raw=True,
                metadata={"scrapbook": {"name": name, "mime_prefix": "application/papermill.record/"}})
        return
    _glue(name, text, display=False)


# ------------------------------------------------------------------------------------------ measures
def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (Linux: VmHWM; elsewhere ``getrusage``)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def machine() -> dict[str, Any]:
    """What the numbers were measured on: CPU model and cores, torch threads, GPU, versions."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                cpu = re.sub(r"\s+", " ", line.split(":", 1)[1]).strip()
                break
    except OSError:
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": cores, "torch_threads": torch.get_num_threads(), "gpu": gpu,
            "memory_bytes": _total_memory(), "python": platform.python_version(), "torch": torch.__version__,
            "system": f"{platform.system()} {platform.release()}"}


def _total_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def describe_machine(m: Mapping[str, Any]) -> str:
    """One line: "2 CPU cores (AMD EPYC ...), 2 torch threads, no GPU"."""
    gpu = f"GPU {m['gpu']}" if m.get("gpu") else "no GPU"
    cores, threads = m.get("cores"), m.get("torch_threads")
    used = f", {threads} torch thread{'s' if threads != 1 else ''}" if threads else ""
    return f"{cores} CPU core{'s' if cores != 1 else ''} ({m.get('cpu')}){used}, {gpu}"


def commit(root: str | os.PathLike | None = None) -> str | None:
    """``git describe``-like id of the checkout this package sits in (short hash, ``+changes`` when the
    tree differs from it); None outside a git checkout."""
    from .repro import repository_root

    root = Path(root or repository_root())
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                              text=True, timeout=20)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def format_seconds(seconds: float) -> str:
    """``42 s``, ``3 min 05 s``, ``1 h 02 min``."""
    s = int(round(seconds))
    if s < 60:
        return f"{seconds:.0f} s" if seconds >= 1 else f"{seconds:.1f} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def format_bytes(n: float) -> str:
    """``812 MiB``, ``1.4 GiB``."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            value = n / size
            return f"{value:.1f} {unit}" if value < 10 else f"{value:.0f} {unit}"
    return f"{int(n)} B"


# ------------------------------------------------------------------------------------------ the card
class Card:
    """The measured cost of one chapter. Create it in the chapter's first code cell, call :meth:`finish`
    in its last one.

    On creation: starts the clock, points ``$SFM_RESULTS`` (where :func:`sfm_lib.repro.record` writes) at
    ``<build>/results/<chapter>/`` unless it is set already (``python -m sfm_lib repro`` sets it), clears
    that folder, and makes every pyplot figure warn when its labels overlap
    (:func:`sfm_lib.plots.watch_labels`)."""

    def __init__(self, chapter: str, *, folder: str | os.PathLike | None = None):
        from . import plots
        from .repro import RESULTS_ENV

        self.chapter = _check_name(chapter, "chapter")
        self.folder = Path(folder) if folder is not None else build_dir()
        self.started = time.perf_counter()
        self.date = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0)
        self.tables = None
        if not os.environ.get(RESULTS_ENV):
            self.tables = self.folder / "results" / self.chapter
            shutil.rmtree(self.tables, ignore_errors=True)
            os.environ[RESULTS_ENV] = str(self.tables.resolve())
        plots.watch_labels()
        self.record: dict[str, Any] | None = None

    def finish(self, headline: Mapping[str, Any] | None = None) -> None:
        """Stop the clock; glue ``card_time``, ``card_memory``, ``card_machine``, ``card_date``,
        ``card_tiny``; write ``<build>/cards/<chapter>.json`` (also kept as :attr:`record`).
        ``headline``: the chapter's main numbers (name → value) for the results page."""
        wall = time.perf_counter() - self.started
        peak = peak_rss_bytes()
        where = machine()
        tiny = tiny_times().get(self.chapter)
        self.record = {"chapter": self.chapter, "wall_s": round(wall, 1), "peak_rss_bytes": peak,
                       "date": self.date.isoformat(), "commit": commit(), "machine": where,
                       "headline": {str(k): _json_value(v) for k, v in (headline or {}).items()},
                       "tiny_s": tiny}
        with atomic_path(self.folder / "cards" / f"{self.chapter}.json") as tmp:
            tmp.write_text(json.dumps(self.record, indent=1, allow_nan=False))
        glue("card_time", format_seconds(wall))
        glue("card_memory", format_bytes(peak))
        glue("card_machine", describe_machine(where))
        glue("card_date", self.date.strftime("%Y-%m-%d"))
        glue("card_tiny", tiny_text(tiny))


def _json_value(v: Any) -> Any:
    try:
        v = v.item()  # numpy and torch scalars
    except AttributeError:
        pass
    if isinstance(v, float) and v != v:
        return None
    return v if isinstance(v, (int, float, str, bool, type(None))) else str(v)


def tiny_text(tiny: Mapping[str, Any] | None) -> str:
    """The card's sentence on the time at the ``tiny`` preset."""
    if not tiny:
        return "not recorded yet"
    return f"{format_seconds(tiny['time_s'])} (measured on {tiny['machine']}, {tiny['date']})"


def tiny_times(path: str | os.PathLike | None = None) -> dict[str, dict[str, Any]]:
    """Chapter → ``{time_s, machine, date}`` of the recorded ``tiny`` run: ``results/tiny.json`` of the
    repository (written by ``python -m sfm_lib.report tiny RUN_FOLDER``); empty when there is none."""
    from .repro import repository_root

    path = Path(path) if path is not None else repository_root() / "results" / "tiny.json"
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    m = describe_machine(content.get("machine", {}))
    return {stem: {"time_s": float(c["time_s"]), "machine": m, "date": content.get("date", "?")}
            for stem, c in content.get("chapters", {}).items() if isinstance(c, dict) and "time_s" in c}


def save_tiny_times(run_folder: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Turn the ``results.json`` of ``python -m sfm_lib repro tiny --out RUN_FOLDER`` into
    ``results/tiny.json`` (chapter times with this machine and today's date) for the cards."""
    from .repro import repository_root

    source = Path(run_folder) / "results.json"
    if not source.is_file():
        raise FileNotFoundError(f"{source} not found: run `python -m sfm_lib repro tiny --out {run_folder}` first")
    run = json.loads(source.read_text())
    if run.get("preset") != "tiny":
        raise ValueError(f"{source} is a run of preset {run.get('preset')!r}, not tiny")
    if run.get("overrides"):
        raise ValueError(f"{source} overrides parameters ({', '.join(run['overrides'])}); time the plain preset")
    out = Path(out) if out is not None else repository_root() / "results" / "tiny.json"
    payload = {"preset": "tiny", "command": "python -m sfm_lib repro tiny",
               "date": _dt.date.today().isoformat(), "machine": machine(), "commit": commit(),
               "chapters": {stem: {"time_s": c["time_s"]} for stem, c in run.get("chapters", {}).items()}}
    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps(payload, indent=1))
    return out


# ------------------------------------------------------------------------------------------ downloads
def downloads(chapter: str, *, distilled: Mapping[str, Any] | None = None,
              stats: Mapping[str, Any] | None = None, classifiers: Mapping[str, Any] | None = None,
              tables: Mapping[str, Any] | None = None, folder: str | os.PathLike | None = None) -> list[Path]:
    """Write a chapter's artefacts to ``<build>/downloads/<chapter>/`` for the page's ``{download}`` links
    and return the paths:

    - ``distilled``: name → :class:`~sfm_lib.data.DistilledSet`: ``<name>.safetensors`` and ``<name>.png``
      (the images as a grid, one row per class);
    - ``stats``: name → :class:`~sfm_lib.stats.ClassStats`: ``<name>.safetensors``;
    - ``classifiers``: name → :class:`~sfm_lib.inherit.InheritedClassifier`: ``<name>.safetensors``;
    - ``tables``: name → DataFrame (or anything :func:`sfm_lib.repro.record` takes): ``<name>.csv``.
    """
    import pandas as pd

    from .repro import _rows

    out = (Path(folder) if folder is not None else build_dir()) / "downloads" / _check_name(chapter, "chapter")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, ds in (distilled or {}).items():
        ds.save(out / f"{_check_name(name, 'file name')}.safetensors")
        png = out / f"{name}.png"
        with atomic_path(png) as tmp:
            _grid_png(ds, tmp)
        written += [out / f"{name}.safetensors", png]
    for group in (stats, classifiers):
        for name, obj in (group or {}).items():
            obj.save(out / f"{_check_name(name, 'file name')}.safetensors")
            written.append(out / f"{name}.safetensors")
    for name, table in (tables or {}).items():
        path = out / f"{_check_name(name, 'file name')}.csv"
        with atomic_path(path) as tmp:
            pd.DataFrame(_rows(table)).to_csv(tmp, index=False)
        written.append(path)
    return written


def _grid_png(ds, path: Path) -> None:
    """The images of a distilled set as one PNG: a row per class, IPC columns, 2 px white gaps."""
    import torch
    from PIL import Image

    images, labels = ds.images.float().clamp(0, 1), ds.labels.long()
    C = len(ds.classes)
    cols = max(1, max(int((labels == c).sum()) for c in range(C)))
    h, w = images.shape[-2:]
    canvas = torch.ones(3, C * (h + 2), cols * (w + 2))
    for c in range(C):
        for j, i in enumerate(torch.nonzero(labels == c).flatten().tolist()):
            canvas[:, c * (h + 2) + 1:c * (h + 2) + 1 + h, j * (w + 2) + 1:j * (w + 2) + 1 + w] = images[i]
    array = (canvas.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    Image.fromarray(array).save(path, format="PNG")


# ------------------------------------------------------------------------------------------ results page
def _toc_chapters(root: Path) -> list[str]:
    import yaml

    toc = yaml.safe_load((root / "_toc.yml").read_text())
    return [Path(entry["file"]).name for part in [toc] + toc.get("parts", [])
            for entry in part.get("chapters", [])]


def results(folder: str | os.PathLike | None = None, root: str | os.PathLike | None = None) -> dict[str, Any]:
    """What the results page shows: per chapter of ``_toc.yml`` (of ``root``; default: the book the
    working folder belongs to, else this checkout) that left a card in this build, its card
    (wall time, peak memory, machine, date, commit, headline) and its recorded tables (name → DataFrame),
    in book order."""
    import pandas as pd

    from .repro import _tables, repository_root

    folder = Path(folder) if folder is not None else build_dir()
    if root is None:  # the book being built: the chapters run in book/, below its _toc.yml
        root = next((p for p in (Path.cwd().parent, Path.cwd()) if (p / "_toc.yml").is_file()),
                    repository_root())
    root = Path(root)
    found = {}
    for stem in _toc_chapters(root):
        card = folder / "cards" / f"{stem}.json"
        if not card.is_file():
            continue
        found[stem] = {**json.loads(card.read_text()),
                       "tables": {name: pd.DataFrame(rows)
                                  for name, rows in _tables(folder / "results" / stem).items()}}
    return found


# ------------------------------------------------------------------------------------------ export
def _folder_name(name: str) -> str:
    """A class name as a folder name: path separators and control characters become '_'."""
    clean = re.sub(r"[/\\\x00-\x1f]", "_", str(name)).strip()
    return "_" + clean if clean in ("", ".", "..") else clean


def export(distilled: str | os.PathLike, out: str | os.PathLike, *, force: bool = False,
           evaluation: str | os.PathLike | None = None) -> dict[str, Any]:
    """Write a distilled set as an image folder, ``out/<class>/<i>.png``, plus ``out/card.json``: the
    recipe, the hash of the statistics it was distilled from, the backbone, the method, the measured
    accuracy (from the set's metadata, or from ``evaluation``: the JSON of ``python -m sfm_lib eval
    --json``) and the SHA-256 of the source file. Atomic: written to a temporary folder beside ``out``,
    then renamed. A non-empty ``out`` is replaced only with ``force``. Returns the card."""
    import hashlib

    import torch
    from PIL import Image

    from .data import DistilledSet

    source, out = Path(distilled), Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise FileExistsError(f"{out} is not empty: pass --force to replace it, or choose another --out")
    ds = DistilledSet.load(source)
    names = [_folder_name(c) for c in ds.classes]
    if len(set(names)) != len(names):
        raise ValueError(f"{source}: two classes have the same folder name ({names})")
    accuracy = ds.meta.get("evaluation")
    if evaluation is not None:
        path = Path(evaluation)
        try:
            result = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no such file (write it with `python -m sfm_lib eval --json`)") from None
        except ValueError:
            raise ValueError(f"{path}: not JSON (write it with `python -m sfm_lib eval --json`)") from None
        if not isinstance(result, dict) or "top1_mean" not in result:
            raise ValueError(f"{path}: no top1_mean; give the JSON of `python -m sfm_lib eval --json`")
        meta = result.get("meta") if isinstance(result.get("meta"), dict) else {}
        accuracy = {k: result[k] for k in ("top1_mean", "top1_std", "seeds") if k in result}
        accuracy.update({k: meta[k] for k in ("backbone", "dataset", "epochs", "views", "resolution")
                         if k in meta})
    statistics = {k: v for k, v in ds.meta.items() if k.endswith(".statistics")}
    card = {"source": source.name, "sha256": hashlib.sha256(source.read_bytes()).hexdigest(),
            "method": ds.meta.get("method"), "backbone": ds.meta.get("backbone"),
            "dataset": ds.meta.get("dataset"), "resolution": ds.meta.get("resolution"),
            "classes": list(ds.classes), "images": len(ds), "recipe": ds.meta.get("recipe") or _settings(ds.meta),
            "steps": ds.meta.get("steps"), "statistics_hash": statistics.get("sfm.statistics"),
            "accuracy": accuracy, "layout": "<class>/<i>.png, i counted from 0 within each class"}
    if len(statistics) > 1 or (statistics and "sfm.statistics" not in statistics):
        card["statistics_hash"] = statistics
    out.parent.mkdir(parents=True, exist_ok=True)
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        counts = [0] * len(ds.classes)
        images = (ds.images.float().clamp(0, 1) * 255).round().to(torch.uint8)
        for image, label in zip(images, ds.labels.tolist()):
            folder = tmp / names[label]
            folder.mkdir(exist_ok=True)
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{counts[label]}.png")
            counts[label] += 1
        card["images_per_class"] = dict(zip(ds.classes, counts))
        (tmp / "card.json").write_text(json.dumps(card, indent=1, allow_nan=False, default=str))
        os.chmod(tmp, 0o777 & ~_umask())
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return card


_SETTINGS = ("ipc", "steps", "augs", "lr", "schedule", "param", "grow_every", "init", "augment", "ema", "loss",
             "subclass", "seed", "crop")


def _settings(meta: Mapping[str, Any]) -> dict[str, Any] | None:
    """The distillation settings a set's metadata holds, for a set made in Python (``distill --out`` stores
    its recipe by name; ``distill.sfm`` and the chapters do not)."""
    found = {k: meta[k] for k in _SETTINGS if k in meta}
    return found or None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _main(argv: list[str] | None = None) -> int:
    """``python -m sfm_lib.report tiny RUN_FOLDER``: record the chapters' times at the tiny preset."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m sfm_lib.report",
                                     description="Record the chapters' times of a `repro tiny` run for the "
                                                 "chapter cards (results/tiny.json).")
    parser.add_argument("what", choices=["tiny"])
    parser.add_argument("run", help="the --out folder of `python -m sfm_lib repro tiny`")
    parser.add_argument("--out", default=None, help="default: results/tiny.json of the repository")
    a = parser.parse_args(argv)
    try:
        path = save_tiny_times(a.run, a.out)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(_main())
