"""Progress output that suits whoever reads it.

* a terminal (or any plain Python process): tqdm's text bar on stderr;
* a Jupyter or Colab notebook with ipywidgets: tqdm's widget bar;
* a notebook kernel without widgets (the book build, papermill): no bar, since every refresh would become
  an output block of its own, only one summary line on stdout when a long computation ends, e.g.
  ``statistics effnet_lite0@64: 60,000 images in 141 s``.

Use :func:`tqdm` exactly like ``tqdm.auto.tqdm``. Importing this module also silences tqdm's
"IProgress not found" warning (it names a file of the machine that runs the kernel and is of no use to
a reader of the book); ``sfm_lib`` imports it first, before timm pulls in ``tqdm.auto``.
"""
from __future__ import annotations

import sys
import time
import warnings
from typing import Any

__all__ = ["tqdm", "mode", "SUMMARY_MIN_S"]

# A computation shorter than this many seconds leaves no summary line in a widget-less kernel.
SUMMARY_MIN_S = 5.0

warnings.filterwarnings("ignore", message="IProgress not found")

_PLURAL = {"img": "images", "it": "steps", "epoch": "epochs"}


def _in_kernel() -> bool:
    """True inside a Jupyter kernel (notebook, lab, Colab, papermill), False in a terminal or IPython shell."""
    if "ipykernel.zmqshell" not in sys.modules:
        return False
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    return shell is not None and "qt" not in type(shell).__name__.lower()


def _has_widgets() -> bool:
    try:
        from tqdm.notebook import IProgress
    except ImportError:
        return False
    return IProgress is not None


def mode() -> str:
    """``"terminal"`` (text bar), ``"widgets"`` (notebook bar) or ``"summary"`` (one line at the end)."""
    if not _in_kernel():
        return "terminal"
    return "widgets" if _has_widgets() else "summary"


class _Null:
    """A file that swallows what tqdm would draw."""

    def write(self, s: str) -> None:
        pass

    def flush(self) -> None:
        pass


def _summary_class():
    from tqdm.std import tqdm as std_tqdm

    class SummaryTqdm(std_tqdm):
        """Counts like tqdm, draws nothing, prints ``desc: N units in T s`` on close."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["file"] = _Null()
            self._summary_done = False
            super().__init__(*args, **kwargs)

        def close(self) -> None:
            if not self.disable and not self._summary_done:
                self._summary_done = True
                elapsed = time.time() - self.start_t
                if elapsed >= SUMMARY_MIN_S:
                    print(self._summary(elapsed), file=sys.stdout, flush=True)
            super().close()

        def _summary(self, elapsed: float) -> str:
            unit = _PLURAL.get(self.unit, self.unit)
            done = self.n - self.initial
            count = f"{done:,} {unit}"
            if self.total is not None and self.n < self.total:
                count += f" (stopped at {self.n:,} of {self.total:,})"
            elif self.initial:
                count += f" (resumed at {self.initial:,})"
            seconds = f"{elapsed:.1f}" if elapsed < 10 else f"{elapsed:,.0f}"
            head = f"{self.desc}: " if self.desc else ""
            return f"{head}{count} in {seconds} s"

    return SummaryTqdm


def tqdm(*args: Any, **kwargs: Any):
    """A progress bar for the current reader (see the module docstring); arguments as ``tqdm.tqdm``."""
    kind = mode()
    if kind == "widgets":
        from tqdm.notebook import tqdm as bar
    elif kind == "summary":
        bar = _summary_class()
    else:
        from tqdm.std import tqdm as bar
    return bar(*args, **kwargs)
