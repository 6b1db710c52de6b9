"""Progress of long runs on stderr, only when asked: a fit's evaluations (with the best criterion so
far), the passes over chunks, bootstrap refits and profile bounds all report through one class.

``mode``: True → shown; False → never; None → shown only on a terminal, once the run has taken
more than ``delay`` seconds (the default of the bootstrap and the profile).  When shown: a tqdm
line on a terminal with tqdm installed, otherwise a plain line at most once a second, and at the
end a one-line total.  Library calls never print unless the caller asked.
"""
from __future__ import annotations

import sys
import time
from typing import Iterable, Iterator

__all__ = ["Progress"]


class Progress:
    """Counts of a run (``update``), shown on stderr as the module docstring says.

    ``desc`` names the run ("fit", "bootstrap", "chunks (levels)"), ``unit`` what is counted
    ("evaluations", "fits"), ``total`` how many there will be (None: open-ended); with ``label``
    ("REML criterion") the smallest value passed to ``update`` is shown too.  ``write`` prints a
    line without breaking a tqdm line."""

    def __init__(self, mode: bool | None, desc: str, unit: str, total: int | None = None, label: str | None = None,
                 prefix: str = "fastlmm_ext", delay: float = 2.0):
        self.mode, self.desc, self.unit, self.total, self.label = mode, desc, unit, total, label
        self.prefix, self.delay = prefix, delay
        self.n = 0
        self.best = float("inf")
        self.start = self._last = time.perf_counter()
        self.bar = None              # the tqdm line, when there is one
        self.shown = False
        if mode is True:
            self._show()

    def _show(self) -> None:
        self.shown = True
        if not _isatty(sys.stderr):  # logs and pipes get plain lines
            return
        try:
            from tqdm import tqdm
        except ImportError:
            return
        fmt = "{desc}: {n_fmt}" + ("/{total_fmt}" if self.total else "") + f" {self.unit}" + "{postfix} [{elapsed}]"
        self.bar = tqdm(total=self.total, initial=self.n, desc=f"{self.prefix}: {self.desc}", file=sys.stderr,
                        bar_format=fmt if self.total is None else None, unit=f" {self.unit}", leave=False,
                        mininterval=0.1, dynamic_ncols=True)

    def _best(self) -> str:
        return f", {self.label} {self.best:.6f}" if self.label is not None else ""

    def update(self, k: int = 1, value: float | None = None) -> None:
        """``k`` more done; ``value`` (with a ``label``): a criterion value, of which the best is shown."""
        self.n += k
        if value is not None and value < self.best:
            self.best = float(value)
        now = time.perf_counter()
        if not self.shown:
            if self.mode is None and now - self.start > self.delay and _isatty(sys.stderr) \
                    and (self.total is None or self.n < self.total):
                self._show()
            return
        if self.bar is not None:
            if self.label is not None:
                self.bar.set_postfix_str(self._best()[2:], refresh=False)
            self.bar.update(k)
        elif now - self._last >= 1.0:
            self._last = now
            of = f"/{self.total}" if self.total else ""
            print(f"{self.prefix}: {self.desc}: {self.n}{of} {self.unit}{self._best()}, {now - self.start:.1f}s elapsed",
                  file=sys.stderr, flush=True)

    def iterate(self, items: Iterable) -> Iterator:
        """The items of ``items``, each counted once it has been used; closed at the end."""
        try:
            for item in items:
                yield item
                self.update(1)
        finally:
            self.close()

    def write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        """End the tqdm line and print the total (only if the progress was shown); idempotent."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.shown:
            self.shown = False
            self.mode = False
            print(f"{self.prefix}: {self.desc} done: {self.n} {self.unit}{self._best()}, "
                  f"{time.perf_counter() - self.start:.2f}s", file=sys.stderr, flush=True)


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False
