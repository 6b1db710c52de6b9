"""Progress of long fits on stderr (criterion, evaluations, elapsed), only when asked.

On a terminal with tqdm installed: a tqdm status line; otherwise a plain line at most once a
second.  Library calls never print unless the caller asked (``verbose=True``).
"""
from __future__ import annotations

import sys
import time

__all__ = ["Progress"]

class Progress:
    """Progress of the fit on stderr: evaluations, best criterion so far, elapsed time.

    On a terminal with tqdm installed: a tqdm status line; otherwise a plain line at most once a
    second.  Both end with a one-line total.  ``write`` prints a message without breaking the status line."""

    def __init__(self, enabled: bool, label: str, prefix: str = "fastlmm_ext"):
        self.prefix = prefix
        self.enabled = enabled
        self.label = label
        self.n = 0
        self.best = float("inf")
        self.start = time.perf_counter()
        self._last = self.start
        self._bar = None
        if enabled:
            tqdm = None
            if _isatty(sys.stderr):  # a status line only makes sense on a terminal; logs get plain lines
                try:
                    from tqdm import tqdm
                except ImportError:
                    pass
            if tqdm is not None:
                self._bar = tqdm(total=None, desc=f"{self.prefix}: fitting", unit=" evals", file=sys.stderr,
                                 bar_format="{desc}: {n_fmt} evaluations{postfix} [{elapsed}]",
                                 leave=False, mininterval=0.1)

    def update(self, value: float) -> None:
        self.n += 1
        if value < self.best:
            self.best = float(value)
        if not self.enabled:
            return
        msg = f"{self.label} {self.best:.6f}"
        if self._bar is not None:
            self._bar.set_postfix_str(msg, refresh=False)
            self._bar.update(1)
        else:
            now = time.perf_counter()
            if now - self._last >= 1.0:
                self._last = now
                print(f"{self.prefix}: fitting: {self.n} evaluations, {msg}, {now - self.start:.1f}s elapsed",
                      file=sys.stderr, flush=True)

    def write(self, line: str) -> None:
        if self._bar is not None:
            self._bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elapsed = time.perf_counter() - self.start
        print(f"{self.prefix}: fit done: {self.n} evaluations, {self.label} {self.best:.6f}, {elapsed:.2f}s",
              file=sys.stderr, flush=True)


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False
