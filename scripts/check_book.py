#!/usr/bin/env python3
"""Open every page of the built book in a headless Chromium with the network off, as an offline reader.

    python scripts/check_book.py [_build/html] [--screenshots _build/screenshots]

A page fails when it
  * shows raw TeX in its visible text (``\\[``, ``\\(``, ``\\frac``, ``$$``, ``\\begin{``),
  * has math in its source (Sphinx's ``.math`` elements) that MathJax did not render (``mjx-container``),
  * has an image that does not load (``naturalWidth`` 0),
  * has a code cell or a code block of the prose wider than its box (cut at the right edge at the 1280 px
    window width), or a table
    in a cell's output wider than the column (its right columns hidden behind a scroll bar), or a displayed
    formula wider than the text column (its right end clipped),
  * holds a traceback, a warning or a stderr stream in a notebook cell's output; a figure whose labels
    overlap is named as such (``sfm_lib.plots`` warns "figure labels overlap" when it is drawn),
  * is a notebook page (it has code cells) without a chapter card at its top (an element of class
    ``chapter-card``, e.g. an admonition with ``:class: chapter-card``, above the first cell),
  * has a sentence in its text that points at what a reader cannot see: closing notes, notes of the
    project, issues,
  * logs a JavaScript error, or fails to load one of its resources.
A screenshot of each page goes to the screenshots folder. Exit status 0: all good; 1: problems (listed);
2: the book or the browser is missing.

The browser is Debian's ``chromium-headless-shell`` (or $CHROMIUM), driven through the DevTools protocol
on a pipe, with nothing but the standard library. No network: every host name resolves to nothing and
every connection goes to a dead proxy, so a page that still needs the internet shows it here.
"""
from __future__ import annotations

import argparse
import base64
import fcntl
import json
import os
import re
import select
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

BROWSERS = ("chromium-headless-shell", "chromium", "chromium-browser")
WIDTH, MAX_HEIGHT = 1280, 16000
PAGE_TIMEOUT_S = 30.0

FLAGS = [
    "--no-sandbox",  # root in a container
    "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio",
    "--no-first-run", "--no-default-browser-check", "--disable-extensions", "--disable-sync",
    "--disable-background-networking", "--disable-component-update", "--disable-domain-reliability",
    "--disable-quic", "--disable-features=Translate,MediaRouter,OptimizationHints,AutofillServerCommunication",
    # the network is off: names resolve to nothing, connections go to a port where nothing listens
    "--host-resolver-rules=MAP * ~NOTFOUND", "--proxy-server=http://127.0.0.1:9",
    f"--window-size={WIDTH},900",
]

# Runs in the page after its load event: waits for MathJax, fonts and images, then reports.
PAGE_JS = r"""
(async () => {
  const within = (p, ms) => Promise.race([p, new Promise(r => setTimeout(r, ms))]);
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) {
    try { await within(MathJax.startup.promise, 15000); } catch (e) {}
  }
  const imgs = [...document.images];
  for (const img of imgs) if (img.loading === "lazy") img.loading = "eager";
  await within(Promise.all(imgs.map(img => img.complete ? null :
      new Promise(r => { img.addEventListener("load", r); img.addEventListener("error", r); }))), 15000);
  try { await within(document.fonts.ready, 5000); } catch (e) {}

  const SKIP = "script, style, noscript, template, pre, code, textarea, mjx-container, .highlight";
  const TEX = ["\\[", "\\(", "\\frac", "$$", "\\begin{"];
  const raw = [];
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  for (let n = walker.nextNode(); n; n = walker.nextNode()) {
    const el = n.parentElement;
    if (!el || el.closest(SKIP) || !el.checkVisibility()) continue;
    const hit = TEX.find(t => n.data.includes(t));
    if (hit) raw.push(n.data.trim().slice(0, 80));
  }
  const math = [...document.querySelectorAll(".math")];
  const unrendered = math.filter(m => !m.querySelector("mjx-container"))
                         .map(m => m.textContent.trim().slice(0, 80));
  const outputs = [], overlaps = [];
  for (const o of document.querySelectorAll(".cell_output .output")) {
    const text = o.innerText || o.textContent || "";
    const overlap = text.match(/figure labels overlap: [^\n]*/);
    if (overlap) { overlaps.push(overlap[0].slice(23, 143)); continue; }
    let why = null;
    if (o.matches(".stderr")) why = "stderr output";
    else if (o.matches(".traceback, .error") || /Traceback/.test(text)) why = "traceback";
    else if (/\b\w*Warning:/.test(text)) why = "warning";
    if (why) outputs.push(why + ": " + text.trim().split("\n")[0].slice(0, 100));
  }
  // code cells, and code blocks of the prose (a shell command, a snippet): not the outputs, which wrap
  const cut = [...document.querySelectorAll(".cell_input pre, div[class*='highlight-'] pre")]
    .filter(p => !p.closest(".cell_output"))
    .filter(p => p.scrollWidth > p.clientWidth + 1)
    .map(p => p.textContent.split("\n").reduce((a, l) => l.length > a.length ? l : a, "").slice(0, 60));
  // displayed formulas wider than the text column: their right end is clipped or behind a scroll bar
  const texOf = c => {
    try { return MathJax.startup.document.getMathItemsWithin(c)[0].math; } catch (e) { return c.textContent; }
  };
  const mathCut = [...document.querySelectorAll("mjx-container[display='true']")]
    .filter(c => {
      const box = c.closest(".math") || c, math = c.querySelector("mjx-math") || c;
      return box.scrollWidth > box.clientWidth + 1 || c.scrollWidth > c.clientWidth + 1 ||
        math.getBoundingClientRect().right > box.getBoundingClientRect().right + 1;
    })
    .map(c => texOf(c).replace(/\s+/g, " ").trim().slice(0, 60));
  const wide = [...document.querySelectorAll(".cell_output table")]
    .filter(t => t.getBoundingClientRect().right > t.closest(".cell_output").getBoundingClientRect().right + 1)
    .map(t => [...t.querySelectorAll("th")].map(h => h.textContent.trim()).filter(Boolean).join(" ").slice(0, 60));
  const main = document.querySelector("main") || document.body;
  const firstCell = main.querySelector(".cell");
  const card = main.querySelector(".chapter-card");
  let cardProblem = null;
  if (firstCell && !card) cardProblem = "no chapter card (an element of class chapter-card)";
  else if (firstCell && (card.compareDocumentPosition(firstCell) & Node.DOCUMENT_POSITION_PRECEDING))
    cardProblem = "the chapter card is not at the top (it comes after the first code cell)";
  const UNSEEN = /\b(closing notes?|notes of (the|this) project|project'?s? notes|issues?)\b/i;
  const unseen = [];
  const prose = document.createTreeWalker(main, NodeFilter.SHOW_TEXT);
  for (let n = prose.nextNode(); n; n = prose.nextNode()) {
    const el = n.parentElement;
    if (!el || el.closest(SKIP + ", .cell_output") || !el.checkVisibility()) continue;
    const block = el.closest("p, li, td, th, dd, dt, h1, h2, h3, h4, figcaption") || el;
    const bare = block.cloneNode(true);  // the block's prose, without its code
    bare.querySelectorAll(SKIP).forEach(c => c.replaceWith(" "));
    const text = (bare.textContent || "").replace(/\s+/g, " ").trim();
    const m = text.match(UNSEEN);
    if (m && !unseen.some(u => u.text === text)) {
      const at = Math.max(0, m.index - 50);
      unseen.push({text: text, shown: (at ? "…" : "") + text.slice(at, m.index + m[0].length + 50)});
    }
  }
  return {
    title: document.title,
    card: cardProblem, unseen: unseen.map(u => u.shown), overlaps: overlaps,
    height: Math.max(document.documentElement.scrollHeight, document.body ? document.body.scrollHeight : 0),
    formulas: document.querySelectorAll("mjx-container").length,
    math: math.length, unrendered: unrendered,
    images: imgs.length,
    broken: imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.getAttribute("src")),
    raw_tex: raw, outputs: outputs, cut: cut, mathCut: mathCut, wide: wide,
  };
})()
"""


def find_browser() -> str | None:
    """$CHROMIUM, else the first of :data:`BROWSERS` on PATH."""
    if os.environ.get("CHROMIUM"):
        return os.environ["CHROMIUM"]
    return next((p for p in map(shutil.which, BROWSERS) if p), None)


class Browser:
    """A headless Chromium spoken to through the DevTools protocol on fds 3/4 (--remote-debugging-pipe)."""

    def __init__(self, executable: str):
        self.profile = tempfile.mkdtemp(prefix="check-book-")
        to_browser_r, self._w = os.pipe()
        self._r, from_browser_w = os.pipe()

        def wire() -> None:  # in the child: its fd 3 reads our commands, fd 4 carries the answers
            a = fcntl.fcntl(to_browser_r, fcntl.F_DUPFD, 10)
            b = fcntl.fcntl(from_browser_w, fcntl.F_DUPFD, 10)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.proc = subprocess.Popen(
            [executable, *FLAGS, f"--user-data-dir={self.profile}", "--remote-debugging-pipe", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            close_fds=False, preexec_fn=wire)
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buf = b""
        self._id = 0
        self.events: list[dict] = []

    def _read(self, timeout: float) -> dict | None:
        while b"\0" not in self._buf:
            ready, _, _ = select.select([self._r], [], [], timeout)
            if not ready:
                return None
            chunk = os.read(self._r, 1 << 20)
            if not chunk:
                raise RuntimeError("the browser closed the DevTools pipe (did it crash?)")
            self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def send(self, method: str, params: dict | None = None, session: str | None = None,
             timeout: float = PAGE_TIMEOUT_S) -> dict:
        """One command; events that arrive meanwhile are kept in :attr:`events`."""
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        end = time.monotonic() + timeout
        while (left := end - time.monotonic()) > 0:
            reply = self._read(left)
            if reply is None:
                break
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error'].get('message')}")
                return reply["result"]
            self.events.append(reply)
        raise TimeoutError(f"{method}: no answer in {timeout:.0f} s")

    def wait_for(self, method: str, session: str, timeout: float = PAGE_TIMEOUT_S) -> bool:
        """Wait for event ``method`` of ``session`` (kept ones first)."""
        end = time.monotonic() + timeout
        seen = 0
        while True:
            for ev in self.events[seen:]:
                if ev.get("method") == method and ev.get("sessionId") == session:
                    return True
            seen = len(self.events)
            left = end - time.monotonic()
            if left <= 0:
                return False
            msg = self._read(left)
            if msg is None:
                return False
            self.events.append(msg)

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=5)
        except Exception:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._w)
        os.close(self._r)
        shutil.rmtree(self.profile, ignore_errors=True)


REDIRECT = re.compile(r'<meta[^>]+http-equiv=["\']refresh["\'][^>]+url=([^"\'>]+)', re.I)


@dataclass
class PageReport:
    path: str
    formulas: int = 0
    images: int = 0
    problems: list[str] = field(default_factory=list)
    redirect: str | None = None  # a page that only forwards (Sphinx's index.html): its target


def _log_problems(events: list[dict], session: str) -> list[str]:
    """JavaScript exceptions, console.error calls and failed loads logged by the page."""
    out = []
    for ev in events:
        if ev.get("sessionId") != session:
            continue
        p = ev.get("params", {})
        if ev["method"] == "Runtime.exceptionThrown":
            d = p["exceptionDetails"]
            out.append("JavaScript error: " + (d.get("exception", {}).get("description") or d.get("text", ""))
                       .splitlines()[0][:160])
        elif ev["method"] == "Runtime.consoleAPICalled" and p.get("type") == "error":
            text = " ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", []))
            out.append("console error: " + text[:160])
        elif ev["method"] == "Log.entryAdded" and p["entry"].get("level") == "error":
            e = p["entry"]
            out.append(f"{e.get('source', 'browser')} error: {e.get('text', '')[:120]} {e.get('url', '')}".strip())
    return out


def check_page(browser: Browser, page: Path, root: Path, shots: Path | None) -> PageReport:
    """Load ``page`` in a fresh tab and report what a reader would see wrong there."""
    rel = page.relative_to(root).as_posix()
    report = PageReport(rel)
    forward = REDIRECT.search(page.read_text(errors="replace"))
    if forward:  # nothing to see there; the target is a page of its own
        report.redirect = forward.group(1).strip()
        if not (page.parent / report.redirect.split("#")[0]).is_file():
            report.problems.append(f"redirects to a missing page: {report.redirect}")
        return report
    target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
    session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
    try:
        for domain in ("Page", "Runtime", "Log"):
            browser.send(f"{domain}.enable", session=session)
        browser.send("Emulation.setDeviceMetricsOverride", {"width": WIDTH, "height": 900,
                     "deviceScaleFactor": 1, "mobile": False}, session=session)
        start = len(browser.events)
        browser.send("Page.navigate", {"url": page.resolve().as_uri()}, session=session)
        if not browser.wait_for("Page.loadEventFired", session):
            report.problems.append(f"did not finish loading in {PAGE_TIMEOUT_S:.0f} s")
        result = browser.send("Runtime.evaluate", {"expression": PAGE_JS, "awaitPromise": True,
                                                   "returnByValue": True}, session=session, timeout=60)
        if "exceptionDetails" in result:
            raise RuntimeError(f"the page check failed on {rel}: {result['exceptionDetails'].get('text')}")
        info = result["result"]["value"]
        report.formulas, report.images = info["formulas"], info["images"]
        report.problems += [f"raw TeX in the text: {t!r}" for t in info["raw_tex"][:3]]
        if info["unrendered"]:
            report.problems.append(f"{len(info['unrendered'])} of {info['math']} formulas not rendered "
                                   f"(first: {info['unrendered'][0]!r})")
        report.problems += [f"image does not load: {src}" for src in info["broken"]]
        report.problems += [f"cell output with a {o}" for o in info["outputs"]]
        report.problems += [f"overlapping figure labels: {o}" for o in info["overlaps"]]
        if info["card"]:
            report.problems.append(info["card"])
        report.problems += [f"points at what a reader cannot see: {t!r}" for t in info["unseen"][:3]]
        report.problems += [f"code cut at the right edge: {line!r}" for line in info["cut"]]
        report.problems += [f"table wider than the column: {head!r}" for head in info["wide"]]
        report.problems += [f"formula cut at the right edge: {tex!r}" for tex in info["mathCut"]]
        if shots is not None:
            height = max(900, min(int(info["height"]), MAX_HEIGHT))
            shot = browser.send("Page.captureScreenshot", {
                "format": "png", "captureBeyondViewport": True,
                "clip": {"x": 0, "y": 0, "width": WIDTH, "height": height, "scale": 1}}, session=session)
            out = shots / (rel[:-len(".html")].replace("/", "__") + ".png")
            out.write_bytes(base64.b64decode(shot["data"]))
        report.problems += _log_problems(browser.events[start:], session)
    finally:
        browser.send("Target.closeTarget", {"targetId": target})
        browser.events = [e for e in browser.events if e.get("sessionId") != session]
    return report


def pages_of(root: Path) -> list[Path]:
    """Every HTML page of a Sphinx build, without its asset folders (``_static``, ``_sources``...)."""
    return sorted(p for p in root.rglob("*.html")
                  if not any(part.startswith("_") for part in p.relative_to(root).parts[:-1]))


def check_book(root: Path, shots: Path | None, executable: str) -> list[PageReport]:
    pages = pages_of(root)
    if shots is not None:
        shots.mkdir(parents=True, exist_ok=True)
    browser = Browser(executable)
    try:
        return [check_page(browser, p, root, shots) for p in pages]
    finally:
        browser.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("html", nargs="?", default="_build/html", help="the built book (default: _build/html)")
    parser.add_argument("--screenshots", default=None,
                        help="folder for one PNG per page (default: screenshots beside the html folder)")
    args = parser.parse_args(argv)
    root = Path(args.html)
    if not root.is_dir() or not pages_of(root):
        print(f"error: no built book in {root}: run `make book` first", file=sys.stderr)
        return 2
    executable = find_browser()
    if executable is None:
        print("error: no headless Chromium found: `apt-get install chromium-headless-shell` "
              "(or `make system`), or set $CHROMIUM", file=sys.stderr)
        return 2
    shots = Path(args.screenshots) if args.screenshots else root.parent / "screenshots"
    t0 = time.perf_counter()
    try:
        reports = check_book(root, shots, executable)
    except (OSError, RuntimeError, TimeoutError) as exc:
        print(f"error: the browser check could not run ({executable}): {exc}", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - t0
    failed = [r for r in reports if r.problems]
    for r in failed:
        for p in r.problems:
            print(f"{r.path}: {p}")
    formulas, images = sum(r.formulas for r in reports), sum(r.images for r in reports)
    redirects = sum(r.redirect is not None for r in reports)
    print(f"check-book: {len(reports) - redirects} pages (+{redirects} redirect), {formulas} formulas, "
          f"{images} images checked in "
          f"{elapsed:.1f} s ({Path(executable).name}, network off); screenshots in {shots}")
    if failed:
        print(f"check-book: FAILED on {len(failed)} of {len(reports)} pages")
        return 1
    print("check-book: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
