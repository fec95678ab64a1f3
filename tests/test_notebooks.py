"""Every chapter runs end to end under papermill with tiny parameters, and the book is wired correctly."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BOOK = ROOT / "book"

TINY = dict(resolution=32, images_per_class=20, device="cpu")
CHAPTERS = {
    "01_statistics.ipynb": {},
    "02_flow_matching.ipynb": dict(steps=4, pyramid_steps=8, agreement_draws=12),
    "03_evaluation.ipynb": dict(steps=3, distill_seeds=[0], probe_seeds=[0, 1], epochs=5, views=2, ipc_large=2,
                                steps_large=2, ablations=["loss"], eval_backbones=["effnet_lite1"],
                                full_epochs=[1, 2],
                                cross_images_per_class=20),
    "04_vs_gradient_matching.ipynb": dict(batch_sizes=[1, 3, 0], draws=2, grad_steps=2, lgm_augs=1, steps=2,
                                          distill_seeds=[0], probe_seeds=[0, 1], epochs=5, views=2,
                                          bench_steps=1, bench_views=[1], feature_steps=2, ipc_large=2,
                                          steps_methods_large=2),
    "05_classifier_inheritance.ipynb": dict(other_backbone="effnet_lite1", other_images_per_class=20, steps=3,
                                            other_steps=2, views=2, probe_seeds=[0, 1], epochs=5,
                                            probe_views=2, val_per_class=5, fit_seeds=[0]),
}


def _toc_files() -> list[str]:
    import yaml

    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    return [c["file"] for c in toc["chapters"]]


def test_every_notebook_is_in_the_toc_and_tested():
    notebooks = sorted(p.name for p in BOOK.glob("*.ipynb"))
    assert notebooks == sorted(CHAPTERS)
    assert sorted(Path(f).name + ".ipynb" for f in _toc_files() if not (ROOT / f"{f}.md").is_file()) == notebooks
    assert all((ROOT / f"{f}.ipynb").is_file() or (ROOT / f"{f}.md").is_file() for f in _toc_files())


@pytest.mark.parametrize("name", sorted(CHAPTERS))
def test_chapter_structure(name):
    """A parameters cell, a Colab install cell tagged skip-execution that installs this repository, no outputs
    committed."""
    import yaml

    nb = json.loads((BOOK / name).read_text())
    tags = [c.get("metadata", {}).get("tags", []) for c in nb["cells"]]
    assert sum("parameters" in t for t in tags) == 1
    colab = [c for c, t in zip(nb["cells"], tags) if "skip-execution" in t]
    assert len(colab) == 1 and nb["cells"].index(colab[0]) <= 1, "the Colab cell comes first"
    repo = yaml.safe_load((ROOT / "_config.yml").read_text())["repository"]["url"]
    source = "".join(colab[0]["source"])
    assert "google.colab" in source and f"git+{repo}" in source and "torch" not in source.split("pip install")[1]
    assert all(not c.get("outputs") for c in nb["cells"] if c["cell_type"] == "code")


@pytest.mark.parametrize("path", sorted(BOOK.glob("*.ipynb")), ids=lambda p: p.name)
def test_chapter_code_fits_the_column(path):
    """The rendered page cuts code at the right edge beyond 88 characters (PEP 8's long limit)."""
    nb = json.loads(path.read_text())
    long = [f"cell {i}: {line}" for i, c in enumerate(nb["cells"]) if c["cell_type"] == "code"
            for line in "".join(c["source"]).splitlines() if len(line) > 88]
    assert not long, "code lines over 88 characters:\n" + "\n".join(long)


@pytest.mark.parametrize("name", sorted(CHAPTERS))
def test_every_parameter_line_is_read_by_papermill(name):
    """papermill skips a line it cannot parse (e.g. a comment holding "="): every assignment of the
    parameters cell must come out as a typed parameter with its comment as help."""
    import papermill as pm

    nb = json.loads((BOOK / name).read_text())
    cell = next(c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", []))
    assigned = [line.split(":")[0] for line in "".join(cell["source"]).splitlines() if line.strip()]
    declared = pm.inspect_notebook(str(BOOK / name))
    assert list(declared) == assigned
    assert all(v["help"] and v["inferred_type_name"] not in ("None", "Unknown type")
               for v in declared.values())


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CHAPTERS))
def test_chapter_runs_with_tiny_parameters(name, tmp_path, session_cache):
    import papermill as pm

    params = {**TINY, **CHAPTERS[name]}
    declared = pm.inspect_notebook(str(BOOK / name))
    unknown = set(params) - set(declared)
    assert not unknown, f"not parameters of {name}: {unknown}"
    untyped = [k for k, v in declared.items() if v["inferred_type_name"] in ("None", "Unknown type") or not v["help"]]
    assert not untyped, f"parameters without a type annotation or a comment in {name}: {untyped}"
    pm.execute_notebook(str(BOOK / name), str(tmp_path / name), parameters=params, cwd=str(BOOK),
                        kernel_name="python3", execution_timeout=900, progress_bar=False)
    out = json.loads((tmp_path / name).read_text())
    errors = [o for c in out["cells"] for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    images = [o for c in out["cells"] for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert images, "every chapter draws at least one figure"


@pytest.mark.slow
def test_a_failing_chapter_fails_the_book_build(tmp_path):
    """The book's own execution settings: a chapter that raises must make `jupyter-book build` fail."""
    import shutil
    import subprocess
    import sys

    import nbformat

    shutil.copy(ROOT / "_config.yml", tmp_path / "_config.yml")
    shutil.copytree(ROOT / "_ext", tmp_path / "_ext")  # the config's local Sphinx extension
    (tmp_path / "_toc.yml").write_text("format: jb-book\nroot: intro\nchapters:\n  - file: broken\n")
    (tmp_path / "intro.md").write_text("# intro\n")
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("raise RuntimeError('chapter failed')")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, tmp_path / "broken.ipynb")
    jb = Path(sys.executable).with_name("jupyter-book")
    run = subprocess.run([str(jb), "build", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert run.returncode != 0, run.stdout[-2000:]
    assert "chapter failed" in run.stdout + run.stderr, "the build must fail because of the chapter"
