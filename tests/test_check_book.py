"""The browser check of the built book (scripts/check_book.py) on tiny hand-made pages."""
from __future__ import annotations

import importlib.util
import struct
import sys
import zlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("check_book", ROOT / "scripts" / "check_book.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


check_book = _load()
pytestmark = pytest.mark.skipif(check_book.find_browser() is None,
                                reason="no headless Chromium (apt-get install chromium-headless-shell)")


def _png(width: int = 4, height: int = 3) -> bytes:
    """A red RGB PNG, written by hand."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\0" + b"\xff\0\0" * width for _ in range(height))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def _page(body: str, head: str = "") -> str:
    return f'<!doctype html><html><head><meta charset="utf-8">{head}</head><body>{body}</body></html>'


def _mathjax() -> Path | None:
    """MathJax 3 as sphinx-mathjax-offline ships it (None where that package is missing)."""
    spec = importlib.util.find_spec("sphinx-mathjax-offline")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "static" / "mathjax" / "tex-chtml.js"
    return path if path.is_file() else None


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    site = tmp_path_factory.mktemp("html")
    (site / "dot.png").write_bytes(_png())
    output = '<div class="cell_output docutils container"><div class="output {kind}"><pre>{text}</pre></div></div>'
    pages = {
        # a clean page: a picture, a plain output, TeX-looking text only inside code
        "good": _page('<p>Text.</p><img src="../dot.png">' + output.format(kind="stream", text="60,000 images")
                      + r"<pre>print('$$ \frac')</pre>"),
        "raw_tex": _page(r'<div class="math notranslate nohighlight">\[\mu_c = \frac{1}{n_c}\]</div>'),
        "broken_image": _page('<p>Text.</p><img src="missing.png">'),
        "traceback": _page(output.format(kind="traceback highlight-ipythontb",
                                         text="Traceback (most recent call last):\nValueError: bad")),
        "stderr": _page(output.format(kind="stderr", text="progress 10%")),
        "warning": _page(output.format(kind="stream", text="UserWarning: something is off")),
        "js_error": _page('<script>throw new Error("boom")</script><p>Text.</p>'),
        "wide_code": _page('<div class="cell_input"><pre style="width: 300px; overflow: auto">'
                           + "x = 1  # " + "long comment " * 10 + "</pre></div>"),
        # a shell command of the prose cut at its box; a wide output is not code (outputs wrap or scroll)
        "wide_prose_code": _page('<div class="highlight-bash notranslate"><div class="highlight">'
                                 '<pre style="width: 300px; overflow: auto">python -m sfm_lib distill '
                                 + "--long-option value " * 10 + "</pre></div></div>"
                                 + '<div class="cell_output"><div class="highlight-none"><pre style="width: 300px;'
                                 ' overflow: auto">' + "output " * 40 + "</pre></div></div>"),
        # a table wider than its column (hidden behind a scroll bar), and a narrow one that fits
        "wide_table": _page('<div class="cell_output" style="width: 300px; overflow-x: auto"><table>'
                            '<tr><th>top1</th>' + "<th>a long column name</th>" * 6 + '</tr></table></div>'
                            '<div class="cell_output" style="width: 300px"><table><tr><th>fits</th></tr>'
                            '</table></div>'),
        # notebook pages (they have code cells) need a chapter card above the first cell
        "chapter_ok": _page('<main><div class="admonition chapter-card"><p>This build: 3 min.</p></div>'
                            '<div class="cell"><div class="cell_input"><pre>issues = 3</pre></div></div>'
                            '<p>Code such as <code>the closing notes</code> is not prose.</p></main>'),
        "no_card": _page('<main><p>Text.</p><div class="cell"><pre>x = 1</pre></div></main>'),
        "late_card": _page('<main><div class="cell"><pre>x = 1</pre></div>'
                           '<div class="admonition chapter-card"><p>card</p></div></main>'),
        "unseen": _page("<main><p>The numbers are computed when the book is built; the closing notes of the "
                        "project record them.</p><ul><li>See issue 21 for more.</li></ul></main>"),
        "overlap": _page(output.format(kind="stderr", text="/x/plots.py:9: LabelOverlapWarning: figure labels "
                                                           "overlap: 'random' and 'centroids'")),
    }
    mathjax = _mathjax()
    if mathjax is not None:
        pages["math"] = _page(r'<div class="math notranslate nohighlight">\[\mu_c = \frac{1}{n_c}\]</div>',
                              head=f'<script defer src="{mathjax.as_uri()}"></script>')
        # a displayed formula wider than its column: its right end is clipped
        wide = r"\[" + " + ".join(rf"\frac{{x_{{{i}}}}}{{y_{{{i}}}}}" for i in range(30)) + r"\]"
        pages["wide_math"] = _page('<div class="math notranslate nohighlight" style="width: 300px; '
                                   f'overflow-x: hidden">{wide}</div>',
                                   head=f'<script defer src="{mathjax.as_uri()}"></script>')
    (site / "sub").mkdir()
    (site / "_static").mkdir()
    (site / "_static" / "asset.html").write_text(_page("not a page"))
    for name, html in pages.items():
        (site / ("sub" if name == "good" else ".") / f"{name}.html").write_text(html)
    shots = site.parent / "shots"
    found = check_book.check_book(site, shots, check_book.find_browser())
    return {Path(r.path).stem: r for r in found}, shots


def test_every_page_is_checked_and_photographed(reports):
    found, shots = reports
    assert "asset" not in found, "asset folders are not pages"
    assert len(list(shots.glob("*.png"))) == len(found)
    assert (shots / "sub__good.png").read_bytes().startswith(b"\x89PNG")


def test_a_clean_page_passes(reports):
    good = reports[0]["good"]
    assert good.problems == [] and good.images == 1


def test_raw_tex_is_caught(reports):
    problems = reports[0]["raw_tex"].problems
    assert any(p.startswith("raw TeX") for p in problems)
    assert any("not rendered" in p for p in problems)


def test_a_broken_image_is_caught(reports):
    assert any(p == "image does not load: missing.png" for p in reports[0]["broken_image"].problems)


@pytest.mark.parametrize("page, kind", [("traceback", "traceback"), ("stderr", "stderr output"),
                                        ("warning", "warning")])
def test_tracebacks_warnings_and_stderr_in_outputs_are_caught(reports, page, kind):
    assert any(p.startswith(f"cell output with a {kind}") for p in reports[0][page].problems)


def test_code_wider_than_its_box_is_caught(reports):
    assert any(p.startswith("code cut at the right edge: 'x = 1") for p in reports[0]["wide_code"].problems)


def test_a_code_block_of_the_prose_wider_than_its_box_is_caught(reports):
    problems = [p for p in reports[0]["wide_prose_code"].problems if p.startswith("code cut")]
    assert problems == ["code cut at the right edge: 'python -m sfm_lib distill --long-option value --long-option '"]


def test_a_table_wider_than_its_column_is_caught(reports):
    problems = reports[0]["wide_table"].problems
    assert len(problems) == 1 and problems[0].startswith("table wider than the column: 'top1 a long column")


def test_a_javascript_error_is_caught(reports):
    assert any("boom" in p for p in reports[0]["js_error"].problems)


def test_formulas_rendered_by_the_bundled_mathjax_pass(reports):
    if "math" not in reports[0]:
        pytest.skip("sphinx-mathjax-offline is not installed")
    math = reports[0]["math"]
    assert math.problems == [] and math.formulas == 1


def test_a_displayed_formula_wider_than_its_column_is_caught(reports):
    if "wide_math" not in reports[0]:
        pytest.skip("sphinx-mathjax-offline is not installed")
    problems = reports[0]["wide_math"].problems
    assert len(problems) == 1, problems
    assert problems[0].startswith(r"formula cut at the right edge: '\\frac{x_{0}}{y_{0}} + \\frac{x_{1}}")
    assert reports[0]["math"].problems == [], "a formula that fits is not cut"


def test_a_chapter_card_above_the_first_cell_passes(reports):
    assert reports[0]["chapter_ok"].problems == []


@pytest.mark.parametrize("page, problem", [
    ("no_card", "no chapter card (an element of class chapter-card)"),
    ("late_card", "the chapter card is not at the top (it comes after the first code cell)")])
def test_a_notebook_page_without_a_card_at_its_top_fails(reports, page, problem):
    assert reports[0][page].problems == [problem]


def test_sentences_that_point_at_notes_or_issues_fail(reports):
    problems = reports[0]["unseen"].problems
    assert len(problems) == 2 and all(p.startswith("points at what a reader cannot see") for p in problems)
    assert "closing notes" in problems[0] and "issue 21" in problems[1]


def test_overlapping_figure_labels_are_named(reports):
    assert reports[0]["overlap"].problems == ["overlapping figure labels: 'random' and 'centroids'"]
