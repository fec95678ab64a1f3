"""Progress output: a bar for interactive readers, one summary line (or nothing) in a widget-less kernel."""
from __future__ import annotations

import sys

import pytest

from sfm_lib import progress


def test_a_terminal_gets_tqdms_text_bar(capsys):
    from tqdm.std import tqdm as std_tqdm

    assert progress.mode() == "terminal"  # pytest is no Jupyter kernel
    bar = progress.tqdm(range(3), desc="work", file=sys.stderr, mininterval=0)
    assert type(bar) is std_tqdm
    list(bar)
    assert "work: 100%" in capsys.readouterr().err


def test_a_notebook_with_widgets_gets_the_widget_bar(monkeypatch):
    monkeypatch.setattr(progress, "_in_kernel", lambda: True)
    monkeypatch.setattr(progress, "_has_widgets", lambda: True)
    assert progress.mode() == "widgets"


@pytest.fixture
def widgetless_kernel(monkeypatch):
    monkeypatch.setattr(progress, "_in_kernel", lambda: True)
    monkeypatch.setattr(progress, "_has_widgets", lambda: False)
    monkeypatch.setattr(progress, "SUMMARY_MIN_S", 0.0)


def test_a_widgetless_kernel_gets_one_summary_line_and_no_bar(widgetless_kernel, capsys):
    assert progress.mode() == "summary"
    with progress.tqdm(total=60000, desc="statistics effnet_lite0@64", unit="img", mininterval=0) as bar:
        for _ in range(6):
            bar.update(10000)
    for _ in progress.tqdm(range(5), desc="probe", unit="epoch"):
        pass
    out = capsys.readouterr()
    assert out.err == ""
    lines = out.out.splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith("statistics effnet_lite0@64: 60,000 images in ") and lines[0].endswith(" s")
    assert lines[1].startswith("probe: 5 epochs in ")


def test_summary_says_when_a_run_resumed_or_stopped_early(widgetless_kernel, capsys):
    bar = progress.tqdm(range(40, 100), initial=40, total=100, desc="SFM")
    for step in bar:
        bar.set_postfix(loss="0.1", refresh=False)
    bar = progress.tqdm(total=10, desc="features", unit="img")
    bar.update(4)
    bar.close()
    bar.close()  # a second close prints nothing more
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("SFM: 60 steps (resumed at 40) in ")
    assert lines[1].startswith("features: 4 images (stopped at 4 of 10) in ")
    assert len(lines) == 2


def test_short_or_disabled_work_prints_nothing(widgetless_kernel, monkeypatch, capsys):
    for _ in progress.tqdm(range(3), desc="off", disable=True):
        pass
    monkeypatch.setattr(progress, "SUMMARY_MIN_S", 60.0)
    for _ in progress.tqdm(range(3), desc="quick"):
        pass
    assert capsys.readouterr() == ("", "")


def test_in_a_real_kernel_without_widgets_only_the_summary_shows(tmp_path):
    """End to end in an ipykernel (no ipywidgets in this environment, as in the book build): importing
    sfm_lib and timm raises no IProgress warning, and a bar leaves exactly one stdout line."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    try:
        import ipywidgets  # noqa: F401
        pytest.skip("ipywidgets is installed: a notebook gets the widget bar")
    except ImportError:
        pass
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell("import sfm_lib\nimport timm\nfrom sfm_lib import features, progress\n"
                                  "print(progress.mode())"),
        nbformat.v4.new_code_cell("progress.SUMMARY_MIN_S = 0.0\n"
                                  "for _ in progress.tqdm(range(50), desc='probe', unit='epoch', "
                                  "mininterval=0):\n    pass"),
    ]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in nb.cells for o in c.outputs]
    assert all(o.get("name") == "stdout" for o in outputs), outputs
    assert outputs[0]["text"] == "summary\n"
    assert len(outputs) == 2 and outputs[1]["text"].startswith("probe: 50 epochs in "), outputs
