"""sfm_lib.report (chapter cards, glue, downloads, the results page's records, export) and the label
check of sfm_lib.plots."""
from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import pytest
import torch

from sfm_lib import cli, plots, repro, report
from sfm_lib.data import DistilledSet


def _set(classes=("T-shirt/top", "Trouser", "Bag"), ipc=2, size=8, **meta) -> DistilledSet:
    g = torch.Generator().manual_seed(0)
    n = len(classes) * ipc
    return DistilledSet(torch.rand(n, 3, size, size, generator=g), torch.arange(len(classes)).repeat(ipc),
                        list(classes), {"method": "sfm", "backbone": "effnet_lite0", "resolution": size,
                                        "sfm.statistics": "0123456789abcdef",
                                        "recipe": {"name": "default", "steps": 5}, **meta})


@pytest.fixture
def build(tmp_path, monkeypatch):
    """An empty build folder, $SFM_RESULTS unset (as in the book's build), restored afterwards."""
    folder = tmp_path / "build"
    monkeypatch.setenv(report.BUILD_ENV, str(folder))
    monkeypatch.delenv(repro.RESULTS_ENV, raising=False)
    yield folder
    monkeypatch.delenv(repro.RESULTS_ENV, raising=False)


# ------------------------------------------------------------------------------------------ glue, formats
def test_glued_text_displays_without_quotes():
    assert report.glue("top1", 72.345, ".1f") is None  # no kernel here: does nothing
    text = report.Text(format(72.345, ".1f"))
    assert text == "72.3" and repr(text) == "72.3"
    with pytest.raises(ValueError, match="glue name"):
        report.glue("has space", 1)


@pytest.mark.parametrize("seconds, text", [(0.25, "0.2 s"), (42.4, "42 s"), (185, "3 min 05 s"),
                                           (3725, "1 h 02 min")])
def test_format_seconds(seconds, text):
    assert report.format_seconds(seconds) == text


@pytest.mark.parametrize("n, text", [(512, "512 B"), (3 << 20, "3.0 MiB"), (812 << 20, "812 MiB"),
                                     (int(1.4 * (1 << 30)), "1.4 GiB")])
def test_format_bytes(n, text):
    assert report.format_bytes(n) == text


# ------------------------------------------------------------------------------------------ the card
def test_the_card_measures_time_and_peak_memory_and_collects_the_tables(build):
    card = report.Card("03_evaluation")
    assert Path(repro.os.environ[repro.RESULTS_ENV]) == (build / "results" / "03_evaluation").resolve()
    repro.record("summary", {"top1": 71.5})
    time.sleep(0.3)
    card.finish(headline={"SFM top-1 (%)": torch.tensor(71.5)})
    record = card.record
    assert 0.3 <= record["wall_s"] < 60
    assert 0 < record["peak_rss_bytes"] <= report.peak_rss_bytes()  # the high-water mark so far
    assert record["headline"] == {"SFM top-1 (%)": 71.5}
    assert record["machine"]["cores"] >= 1 and record["date"]
    saved = json.loads((build / "cards" / "03_evaluation.json").read_text())
    assert saved == record
    tables = json.loads((build / "results" / "03_evaluation" / "summary.json").read_text())
    assert tables["rows"] == [{"top1": 71.5}]


def test_the_peak_memory_is_the_high_water_mark_of_the_process():
    """A fresh process that held 200 MiB for a moment reports 200 MiB more than one that did not."""
    import subprocess
    import sys

    code = ("import sys; from sfm_lib import report; b = bytearray(int(sys.argv[1])); "
            "b[::4096] = b'x' * len(b[::4096]); del b; print(report.peak_rss_bytes())")
    peaks = [int(subprocess.run([sys.executable, "-c", code, str(n)], capture_output=True, text=True,
                                check=True).stdout) for n in (0, 200 << 20)]
    assert peaks[1] - peaks[0] >= 190 << 20, peaks


def test_a_card_keeps_the_folder_of_the_reproduction_runner(tmp_path, monkeypatch):
    runner = tmp_path / "out" / "tables" / "01_statistics"  # what `repro` sets
    monkeypatch.delenv(report.BUILD_ENV, raising=False)
    monkeypatch.setenv(repro.RESULTS_ENV, str(runner))
    card = report.Card("01_statistics")
    card.finish()
    assert repro.os.environ[repro.RESULTS_ENV] == str(runner)
    assert (tmp_path / "out" / "cards" / "01_statistics.json").is_file()  # beside the run's tables


def test_a_new_card_drops_the_tables_of_an_earlier_build(build):
    report.Card("02_flow_matching")
    repro.record("old", {"a": 1})
    repro.os.environ.pop(repro.RESULTS_ENV)
    report.Card("02_flow_matching")
    assert not (build / "results" / "02_flow_matching" / "old.json").exists()


def test_results_follow_the_toc_and_skip_chapters_without_a_card(build, tmp_path):
    root = tmp_path / "repo"
    root.mkdir()
    (root / "_toc.yml").write_text("format: jb-book\nroot: book/intro\nchapters:\n  - file: book/02_b\n"
                                   "  - file: book/01_a\n  - file: book/03_c\n")
    for stem, value in [("01_a", 1.0), ("02_b", 2.0)]:
        repro.os.environ.pop(repro.RESULTS_ENV, None)
        card = report.Card(stem)
        repro.record("t", {"x": value})
        card.finish(headline={"x": value})
    found = report.results(root=root)
    assert list(found) == ["02_b", "01_a"]
    assert found["01_a"]["tables"]["t"]["x"].tolist() == [1.0]
    assert found["02_b"]["headline"] == {"x": 2.0}


def test_the_tiny_times_come_from_a_repro_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text(json.dumps({"preset": "tiny", "overrides": {},
                                                  "chapters": {"01_statistics": {"time_s": 12.5}}}))
    path = report.save_tiny_times(run, tmp_path / "tiny.json")
    times = report.tiny_times(path)
    assert times["01_statistics"]["time_s"] == 12.5 and "CPU core" in times["01_statistics"]["machine"]
    assert report.tiny_text(times["01_statistics"]).startswith("12 s (measured on ")
    assert report.tiny_times(tmp_path / "missing.json") == {} and report.tiny_text(None) == "not recorded yet"
    (run / "results.json").write_text(json.dumps({"preset": "cpu-default", "chapters": {}}))
    with pytest.raises(ValueError, match="not tiny"):
        report.save_tiny_times(run, tmp_path / "tiny.json")


# ------------------------------------------------------------------------------------------ downloads
def test_downloads_write_what_the_page_links(build):
    import pandas as pd
    from PIL import Image

    from sfm_lib.stats import ClassStats

    ds = _set()
    st = ClassStats(torch.randn(3, 4, dtype=torch.float64), torch.tensor([5, 6, 7]), list(ds.classes), {})
    paths = report.downloads("02_flow_matching", distilled={"sfm-ipc2": ds}, stats={"statistics": st},
                             tables={"run": pd.DataFrame({"steps": [5], "loss": [0.25]})})
    folder = build / "downloads" / "02_flow_matching"
    assert sorted(p.name for p in paths) == ["run.csv", "sfm-ipc2.png", "sfm-ipc2.safetensors",
                                             "statistics.safetensors"]
    back = DistilledSet.load(folder / "sfm-ipc2.safetensors")
    assert torch.equal(back.images, ds.images) and back.classes == ds.classes
    assert torch.equal(ClassStats.load(folder / "statistics.safetensors").means, st.means)
    assert Image.open(folder / "sfm-ipc2.png").size == (2 * 10, 3 * 10)  # ipc columns, a row per class
    assert (folder / "run.csv").read_text().splitlines() == ["steps,loss", "5,0.25"]
    with pytest.raises(ValueError, match="file name"):
        report.downloads("02_flow_matching", tables={"../escape": pd.DataFrame({"a": [1]})})


# ------------------------------------------------------------------------------------------ export
def test_export_writes_an_image_folder_and_a_card(tmp_path):
    import numpy as np
    from PIL import Image

    ds = _set()
    ds.save(tmp_path / "d.safetensors")
    (tmp_path / "eval.json").write_text(json.dumps({"top1": [70.0, 72.0], "top1_mean": 71.0, "top1_std": 1.41,
                                                    "seeds": [0, 1], "meta": {"backbone": "effnet_lite2"}}))
    card = report.export(tmp_path / "d.safetensors", tmp_path / "out", evaluation=tmp_path / "eval.json")
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["Bag", "T-shirt_top", "Trouser", "card.json"]
    assert sorted(p.name for p in (out / "Bag").iterdir()) == ["0.png", "1.png"]
    first_bag = ds.images[ds.labels == 2][0]
    pixels = np.asarray(Image.open(out / "Bag" / "0.png"))
    assert np.array_equal(pixels, (first_bag.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy())
    saved = json.loads((out / "card.json").read_text())
    assert saved == json.loads(json.dumps(card))
    assert saved["statistics_hash"] == "0123456789abcdef" and saved["backbone"] == "effnet_lite0"
    assert saved["recipe"] == {"name": "default", "steps": 5} and saved["images"] == 6
    assert saved["accuracy"] == {"top1_mean": 71.0, "top1_std": 1.41, "seeds": [0, 1], "backbone": "effnet_lite2"}
    assert len(saved["sha256"]) == 64
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary folder left


def test_export_takes_the_accuracy_from_the_metadata(tmp_path):
    _set(evaluation={"top1_mean": 64.0}).save(tmp_path / "d.safetensors")
    assert report.export(tmp_path / "d.safetensors", tmp_path / "out")["accuracy"] == {"top1_mean": 64.0}


def test_a_set_made_in_python_gets_its_settings_as_the_recipe(tmp_path):
    ds = _set(steps=300, augs=1, ema=0.7)
    del ds.meta["recipe"]
    ds.save(tmp_path / "d.safetensors")
    card = report.export(tmp_path / "d.safetensors", tmp_path / "out")
    assert card["recipe"] == {"steps": 300, "augs": 1, "ema": 0.7}


def test_export_refuses_a_non_empty_folder_unless_forced(tmp_path, capsys):
    _set().save(tmp_path / "d.safetensors")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    argv = ["export", "--distilled", str(tmp_path / "d.safetensors"), "--out", str(out)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not empty" in err and "--force" in err
    assert (out / "keep.txt").read_text() == "mine"
    assert cli.main(argv + ["--force"]) == 0
    assert "wrote" in capsys.readouterr().out and not (out / "keep.txt").exists()
    assert (out / "card.json").is_file()


def test_a_failed_export_leaves_the_old_folder_and_no_temporary_one(tmp_path, monkeypatch):
    from PIL import Image

    _set().save(tmp_path / "d.safetensors")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    calls = []

    def failing(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk full")
        return original(self, *args, **kwargs)

    original = Image.Image.save
    monkeypatch.setattr(Image.Image, "save", failing)
    with pytest.raises(OSError, match="disk full"):
        report.export(tmp_path / "d.safetensors", out, force=True)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.safetensors", "out"]


@pytest.mark.parametrize("args, message", [
    (["--distilled", "{tmp}/missing.safetensors"], "no such file"),
    (["--distilled", "{tmp}/d.safetensors", "--eval-json", "{tmp}/missing.json"], "eval --json"),
    (["--distilled", "{tmp}/d.safetensors", "--eval-json", "{tmp}/bad.json"], "no top1_mean"),
])
def test_export_errors_are_one_line(tmp_path, capsys, args, message):
    _set().save(tmp_path / "d.safetensors")
    (tmp_path / "bad.json").write_text(json.dumps({"top1": 3}))
    rc = cli.main(["export", "--out", str(tmp_path / "out")] + [a.format(tmp=tmp_path) for a in args])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------ figure labels
@pytest.fixture
def agg():
    import matplotlib
    import matplotlib.pyplot as plt

    before = matplotlib.get_backend()
    plt.switch_backend("agg")
    hooks = list(matplotlib.rcParams["figure.hooks"])
    yield plt
    plt.close("all")
    matplotlib.rcParams["figure.hooks"] = hooks
    plt.switch_backend(before)


def _drawn_warnings(fig) -> list[str]:
    import io

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fig.savefig(io.BytesIO(), format="png")
    return [str(w.message) for w in caught if issubclass(w.category, plots.LabelOverlapWarning)]


def test_overlapping_labels_warn_when_the_figure_is_drawn(agg):
    plots.watch_labels()
    plots.watch_labels()  # once is enough
    fig, ax = agg.subplots()
    ax.annotate("random", (0.5, 0.5))
    ax.annotate("centroids", (0.5, 0.51))
    ax.annotate("apart", (0.1, 0.9))
    assert plots.overlapping_labels(fig) == [("random", "centroids")]
    assert _drawn_warnings(fig) == ["figure labels overlap: 'random' and 'centroids'"]


def test_rotated_tick_labels_side_by_side_do_not_count(agg):
    plots.watch_labels()
    names = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
             "Ankle boot"]
    ax = plots.counts_bar(torch.full((10,), 6000), names)
    assert _drawn_warnings(ax.figure) == []
    fig, ax = agg.subplots(figsize=(2, 2))  # the same labels crammed flat into a narrow axis do
    ax.set_xticks(range(10), names)
    assert _drawn_warnings(fig)


def test_the_accuracy_against_storage_figure_has_no_overlapping_labels(agg):
    """Chapter 5's figure: each pair's controls sit at the same storage with close accuracies."""
    import pandas as pd

    rows = []
    for d, e in [("effnet_lite0", "effnet_lite0"), ("effnet_lite0", "effnet_lite2"),
                 ("effnet_lite2", "effnet_lite0")]:
        for fit, top1 in [("distilled", 80.0), ("random", 79.6), ("centroids", 79.8)]:
            rows.append(dict(distill_backbone=d, eval_backbone=e, method="inherited", fit_on=fit, top1=top1,
                             storage_bytes=6.6e6))
        rows.append(dict(distill_backbone=d, eval_backbone=e, method="normal probe", fit_on=None, top1=62.0,
                         storage_bytes=3.1e4))
        rows.append(dict(distill_backbone=d, eval_backbone=e, method="full-data probe", fit_on=None, top1=88.0,
                         storage_bytes=4.7e7))
    plots.watch_labels()
    fig, ax = agg.subplots(figsize=(8, 4.5))
    plots.accuracy_vs_storage(pd.DataFrame(rows), ax=ax, title="Fashion-MNIST, 64 px, 1 image per class")
    assert _drawn_warnings(fig) == []
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "inherited, P fitted on random real images" in labels and len(labels) == 3 + 5


def test_glue_in_a_kernel_records_plain_text_and_shows_nothing(tmp_path):
    """What myst-nb reads for {glue}`name`: a hidden display record of the text, without quotes."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("from sfm_lib import report\n"
                                          "report.glue('sfm_top1', 72.345, '.1f')")]
    NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    (output,) = nb.cells[0].outputs
    assert output.metadata["scrapbook"]["name"] == "sfm_top1"
    assert output.data == {"application/papermill.record/text/plain": "72.3"}  # nothing a reader sees


def test_labels_of_ticks_outside_the_view_do_not_count(agg):
    """matplotlib keeps (visible) label objects of ticks it does not draw; a two-step loss curve on a log
    scale has such a label where the lowest y label is drawn."""
    plots.watch_labels()
    ax = plots.loss_curve([0.68, 0.65])  # chapter 2 at the tiny preset: 2 steps
    assert _drawn_warnings(ax.figure) == []


# ------------------------------------------------------------------------------------------ the chapters
BOOK = Path(__file__).resolve().parents[1] / "book"
CARD_NAMES = {"card_time", "card_memory", "card_machine", "card_date", "card_tiny"}


def _chapter_cells(path: Path) -> list[tuple[str, str, list[str]]]:
    nb = json.loads(path.read_text())
    return [(c["cell_type"], "".join(c["source"]), c.get("metadata", {}).get("tags", [])) for c in nb["cells"]]


@pytest.mark.parametrize("path", sorted(BOOK.glob("*.ipynb")), ids=lambda p: p.name)
def test_every_chapter_measures_itself_and_glues_what_its_prose_names(path):
    """A card in the title cell, the clock started right after the parameters and stopped in the last cell,
    every {glue} name of the prose glued by a code cell, every {download} file written by the chapter."""
    import re

    cells = _chapter_cells(path)
    code = "\n".join(src for kind, src, _ in cells if kind == "code")
    prose = "\n".join(src for kind, src, _ in cells if kind == "markdown")
    assert "chapter-card" in cells[0][1], "the chapter card sits in the title cell"
    params = next(i for i, (_, _, tags) in enumerate(cells) if "parameters" in tags)
    assert f'report.Card("{path.stem}")' in cells[params + 1][1]
    assert cells[-1][1].startswith("card.finish(") and cells[-1][0] == "code"
    named = set(re.findall(r"\{glue(?::\w+)?\}`([^`:]+)", prose))
    glued = set(re.findall(r'report\.glue\(\s*"([^"]+)"', code)) | CARD_NAMES
    assert named and named <= glued, f"named in the prose but glued nowhere: {sorted(named - glued)}"
    linked = re.findall(r"\{download\}`[^`<]*<_build/downloads/([^/]+)/([^>]+)>`", prose)
    assert linked and {chapter for chapter, _ in linked} == {path.stem}
    writer = next(src for kind, src, _ in cells if kind == "code" and "report.downloads(" in src)
    missing = [name for _, name in linked if f'"{name.rsplit(".", 1)[0]}"' not in writer]
    assert not missing, f"linked but not written by the downloads cell: {missing}"
    assert not re.search(r"closing notes|notes of the project", prose, re.I)


def test_the_results_page_comes_last_and_glues_what_it_names():
    import re

    import yaml

    toc = yaml.safe_load((BOOK.parent / "_toc.yml").read_text())
    assert toc["chapters"][-1]["file"] == "book/07_results"
    page = (BOOK / "07_results.md").read_text()
    named = set(re.findall(r"\{glue(?::\w+)?\}`([^`:]+)", page))
    assert named <= set(re.findall(r'report\.glue\(\s*"([^"]+)"', page)) | CARD_NAMES
    assert 'report.Card("07_results")' in page and "card.finish()" in page
