"""Reproduction runs: presets of chapter parameters, the runner that executes the book with them, and
:func:`record`, which chapters call to hand their tables to the runner.

A *preset* is a YAML mapping of chapter parameters, ``repro/<name>.yaml`` in the repository. Its keys may
belong to different chapters: the runner passes each chapter only the keys that are its own parameters
(plain ``papermill ... -f repro/<name>.yaml`` injects all of them; keys a chapter does not declare are then
unused variables there, and papermill warns about them).

``run(preset, out)`` executes the chapters of ``_toc.yml`` in order (notebooks only) and writes to ``out``:

- ``<chapter>.ipynb``: the executed notebooks;
- ``figures/<chapter>-NN.png``: every figure (``image/png`` output) of each chapter, in order;
- ``tables/<chapter>/<name>.json``: every table a chapter passed to :func:`record`;
- ``results.json``: the preset, the overrides and, per finished chapter, its parameters, time, tables and
  figures;
- ``done/<chapter>.json``: written atomically when a chapter has finished. A later run with the same
  parameters skips that chapter; a chapter without the marker (a run killed while it ran) runs again,
  and its distillations and statistics come back from the on-disk cache.
"""
from __future__ import annotations

import base64
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from .utils import atomic_path, write_json

__all__ = ["RESULTS_ENV", "record", "repository_root", "presets", "load_preset", "parse_value", "chapters",
           "chapter_parameters", "check_keys", "check_types", "run"]

RESULTS_ENV = "SFM_RESULTS"
"""Folder where :func:`record` writes tables; set by :func:`run` for each chapter's kernel."""

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


# ------------------------------------------------------------------------------------------ chapter side
def _rows(table: Any) -> list[dict[str, Any]]:
    """A table as a list of JSON rows: a DataFrame (a named or non-default index becomes columns), a
    Series, a mapping of columns, a single row (mapping of scalars) or a list of rows."""
    import pandas as pd

    if isinstance(table, pd.Series):
        table = table.to_frame()
    if isinstance(table, Mapping):
        table = pd.DataFrame(table) if any(isinstance(v, (list, tuple)) for v in table.values()) else \
            pd.DataFrame([table])
    elif isinstance(table, (list, tuple)):
        table = pd.DataFrame(list(table))
    if not isinstance(table, pd.DataFrame):
        raise TypeError(f"record() takes a DataFrame, Series, mapping or list of rows, got {type(table).__name__}")
    if not isinstance(table.index, pd.RangeIndex) or any(n is not None for n in table.index.names):
        table = table.reset_index()
    table = table.copy()
    table.columns = [" / ".join(map(str, c)) if isinstance(c, tuple) else str(c) for c in table.columns]
    return json.loads(table.to_json(orient="records", double_precision=10))


def record(name: str, table: Any) -> Any:
    """Hand ``table`` to the reproduction runner as ``name`` and return it unchanged (so a cell can end with
    ``repro.record("summary", df)`` and still display it).

    Under ``python -m sfm_lib repro`` (``$SFM_RESULTS`` set) the table is written atomically as JSON rows
    to ``$SFM_RESULTS/<name>.json``; otherwise nothing is written."""
    if not _NAME.match(name):
        raise ValueError(f"table name {name!r}: use letters, digits, '_', '.' and '-' only")
    folder = os.environ.get(RESULTS_ENV)
    rows = _rows(table)  # also checks the type when nothing is written
    if folder:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        order = len(list(folder.glob("*.json")))
        target = folder / f"{name}.json"
        if target.is_file():
            order = json.loads(target.read_text())["order"]
        with atomic_path(target) as tmp:
            tmp.write_text(json.dumps({"name": name, "order": order, "rows": rows}, indent=1, allow_nan=False))
    return table


# ------------------------------------------------------------------------------------------ presets
def repository_root() -> Path:
    """The checkout this package was imported from (holds ``_toc.yml``, ``book/`` and ``repro/``)."""
    return Path(__file__).resolve().parents[1]


def presets(root: str | os.PathLike | None = None) -> list[str]:
    """Names of the presets in ``<root>/repro/``."""
    folder = Path(root or repository_root()) / "repro"
    return sorted(p.stem for p in folder.glob("*.yaml"))


def load_preset(preset: str | os.PathLike, root: str | os.PathLike | None = None) -> tuple[str, dict[str, Any]]:
    """``(name, parameters)`` of a preset given by name (``repro/<name>.yaml``) or by a YAML file's path."""
    import yaml

    root = Path(root or repository_root())
    path = Path(preset)
    if path.suffix not in (".yaml", ".yml") or not path.is_file():
        path = root / "repro" / f"{preset}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"no preset {str(preset)!r}: give a name among {', '.join(presets(root)) or '(none)'} "
                                f"or the path of a YAML file of chapter parameters")
    params = yaml.safe_load(path.read_text()) or {}
    if not isinstance(params, dict) or not all(isinstance(k, str) for k in params):
        raise ValueError(f"{path}: a preset is a YAML mapping of parameter names to values")
    return path.stem, params


def parse_value(text: str) -> Any:
    """A ``-p key value`` value as a YAML literal: ``3`` → 3, ``[0, 1]`` → [0, 1], ``cpu`` → "cpu",
    ``imagefolder:/data/in100`` → that string."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def chapters(root: str | os.PathLike | None = None) -> list[Path]:
    """The notebooks of ``_toc.yml``, in order (markdown chapters are not executed)."""
    import yaml

    root = Path(root or repository_root())
    toc_path = root / "_toc.yml"
    if not toc_path.is_file():
        raise FileNotFoundError(f"{toc_path} not found: `repro` runs the chapters of a checkout of the repository "
                                f"(git clone it, then run from there)")
    toc = yaml.safe_load(toc_path.read_text())
    files = [entry["file"] for part in [toc] + toc.get("parts", []) for entry in part.get("chapters", [])]
    return [root / f"{f}.ipynb" for f in files if (root / f"{f}.ipynb").is_file()]


def chapter_parameters(notebooks: Iterable[Path]) -> dict[str, dict[str, Any]]:
    """``{chapter stem: papermill.inspect_notebook(...)}``: the declared parameters of each notebook."""
    import papermill as pm

    return {nb.stem: pm.inspect_notebook(str(nb)) for nb in notebooks}


def check_keys(keys: Iterable[str], declared: Mapping[str, Mapping[str, Any]], source: str = "") -> None:
    """Raise ``ValueError`` naming every key that is a parameter of no chapter."""
    known = set().union(*[set(d) for d in declared.values()]) if declared else set()
    unknown = sorted(set(keys) - known)
    if unknown:
        raise ValueError(f"unknown parameter{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}{source}: "
                         f"not a parameter of any chapter ({', '.join(declared)}); list a chapter's parameters "
                         f"with `papermill --help-notebook book/<chapter>.ipynb`")


def _fits(value: Any, type_name: str) -> bool | None:
    """Whether ``value`` fits a papermill ``inferred_type_name`` (None: a type this check does not know)."""
    scalar = {"int": lambda v: isinstance(v, int) and not isinstance(v, bool),
              "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
              "str": lambda v: isinstance(v, str), "bool": lambda v: isinstance(v, bool)}
    name = type_name.replace(" ", "")
    if name in scalar:
        return scalar[name](value)
    if name.startswith("list[") and name.endswith("]") and name[5:-1] in scalar:
        return isinstance(value, list) and all(scalar[name[5:-1]](v) for v in value)
    return None


def check_types(values: Mapping[str, Any], declared: Mapping[str, Mapping[str, Any]], source: str = "") -> None:
    """Raise ``ValueError`` naming every value whose type differs from the one a chapter declares for it."""
    wrong = [f"{key} = {value!r} ({chapter} declares {d[key]['inferred_type_name']})"
             for key, value in values.items() for chapter, d in declared.items()
             if key in d and _fits(value, d[key]["inferred_type_name"]) is False]
    if wrong:
        raise ValueError(f"wrong type{source}: {'; '.join(wrong)}")


# ------------------------------------------------------------------------------------------ runner
def _select(notebooks: list[Path], only: Sequence[str] | None) -> list[Path]:
    if not only:
        return notebooks
    chosen = [nb for nb in notebooks if any(nb.stem.startswith(s) for s in only)]
    missing = [s for s in only if not any(nb.stem.startswith(s) for nb in notebooks)]
    if missing:
        raise ValueError(f"--chapters {', '.join(missing)}: no such chapter; chapters are "
                         f"{', '.join(nb.stem for nb in notebooks)} (a prefix such as 01 is enough)")
    return chosen


def _save_figures(notebook: Path, folder: Path, stem: str) -> list[str]:
    """Write every image/png output of an executed notebook to ``folder/<stem>-NN.png``."""
    for old in folder.glob(f"{stem}-*.png"):
        old.unlink()
    nb = json.loads(notebook.read_text())
    names = []
    for cell in nb["cells"]:
        for output in cell.get("outputs", []):
            png = output.get("data", {}).get("image/png")
            if png:
                path = folder / f"{stem}-{len(names) + 1:02d}.png"
                with atomic_path(path) as tmp:
                    tmp.write_bytes(base64.b64decode("".join(png) if isinstance(png, list) else png))
                names.append(f"figures/{path.name}")
    return names


def _tables(folder: Path) -> dict[str, list[dict[str, Any]]]:
    found = [json.loads(p.read_text()) for p in folder.glob("*.json")] if folder.is_dir() else []
    return {t["name"]: t["rows"] for t in sorted(found, key=lambda t: (t["order"], t["name"]))}


def _collect(out: Path, notebooks: list[Path]) -> dict[str, Any]:
    """Every finished chapter in ``out`` (also those of earlier runs), in book order."""
    found = {}
    for nb in notebooks:
        marker = out / "done" / f"{nb.stem}.json"
        if marker.is_file():
            found[nb.stem] = {**json.loads(marker.read_text()), "notebook": nb.name,
                              "tables": _tables(out / "tables" / nb.stem)}
    return found


def run(preset: str | os.PathLike, out: str | os.PathLike, overrides: Mapping[str, Any] | None = None, *,
        only: Sequence[str] | None = None, timeout: int = 86400, root: str | os.PathLike | None = None,
        log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the book's chapters with a preset's parameters (see the module docstring); returns the content
    of ``results.json``.

    Every key of the preset and of ``overrides`` must be a parameter of some chapter (checked before
    anything runs); each chapter receives the keys it declares, overrides last. ``only``: chapter-name
    prefixes to run (e.g. ``["01", "02"]``); ``timeout``: seconds per cell (papermill's
    ``execution_timeout``). A chapter that raises stops the run with ``RuntimeError``; its partly executed
    notebook stays in ``out``."""
    import papermill as pm

    root = Path(root or repository_root())
    overrides = dict(overrides or {})
    name, params = load_preset(preset, root)
    notebooks = chapters(root)
    declared = chapter_parameters(notebooks)
    check_keys(params, declared, f" in preset {name}")
    check_keys(overrides, declared, " given with -p")
    check_types(params, declared, f" in preset {name}")
    check_types(overrides, declared, " given with -p")
    merged = {**params, **overrides}
    placeholders = [f"{k}: {v}" for k, v in merged.items() if isinstance(v, str) and "/path/to/" in v]
    if placeholders:
        raise ValueError(f"preset {name} holds placeholder paths ({', '.join(placeholders)}); give the real "
                         f"ones, e.g. -p dataset imagefolder:/data/imagenet100")
    selected = _select(notebooks, only)

    out = Path(out)
    figures, done = out / "figures", out / "done"
    for folder in (out, figures, done):
        folder.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"preset": name, "preset_parameters": params, "overrides": overrides, "chapters": {}}
    previous = os.environ.get(RESULTS_ENV)
    try:
        for i, nb in enumerate(selected, 1):
            stem = nb.stem
            mine = {k: v for k, v in merged.items() if k in declared[stem]}
            marker = done / f"{stem}.json"
            finished = json.loads(marker.read_text()) if marker.is_file() else None
            label = f"[{i}/{len(selected)}] {stem}"
            if finished is not None and finished["parameters"] == json.loads(json.dumps(mine, default=str)):
                log(f"{label}: finished earlier, skipped")
            else:
                if finished is not None:
                    log(f"{label}: parameters changed since the finished run, running it again")
                    marker.unlink()
                tables = out / "tables" / stem
                shutil.rmtree(tables, ignore_errors=True)
                os.environ[RESULTS_ENV] = str(tables)
                log(f"{label}: running with {json.dumps(mine, default=str)}")
                t0 = time.perf_counter()
                try:
                    pm.execute_notebook(str(nb), str(out / nb.name), parameters=mine, cwd=str(nb.parent),
                                        kernel_name="python3", execution_timeout=timeout, progress_bar=False,
                                        log_output=False)
                except pm.PapermillExecutionError as err:
                    raise RuntimeError(f"chapter {stem} failed: {err.ename}: {err.evalue} (the notebook up to "
                                       f"the error is {out / nb.name}; run again to retry it)") from None
                finished = {"parameters": mine, "time_s": round(time.perf_counter() - t0, 1),
                            "figures": _save_figures(out / nb.name, figures, stem)}
                write_json(marker, finished)
                log(f"{label}: done in {finished['time_s']} s, {len(finished['figures'])} figures, "
                    f"{len(_tables(tables))} tables")
            results["chapters"] = _collect(out, notebooks)
            write_json(out / "results.json", results)
    finally:
        if previous is None:
            os.environ.pop(RESULTS_ENV, None)
        else:
            os.environ[RESULTS_ENV] = previous
    return results
