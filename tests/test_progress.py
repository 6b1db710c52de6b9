"""The one progress reporter (``_progress.Progress``) of fits, chunk passes, the bootstrap and
the profile: when it shows, what it prints."""
from __future__ import annotations

import pytest

from fastlmm_ext import _progress
from fastlmm_ext._progress import Progress


def test_bar_only_on_a_terminal_after_the_delay(monkeypatch, capfd):
    pytest.importorskip("tqdm")
    monkeypatch.setattr(_progress, "_isatty", lambda stream: True)
    bar = Progress(None, "bootstrap", "fits", total=5, delay=3600.0)
    bar.update(1)
    assert bar.bar is None                       # a quick run shows nothing
    bar = Progress(None, "bootstrap", "fits", total=5, delay=0.0)
    bar.update(1)
    assert bar.bar is not None                   # a slow one on a terminal gets a bar
    bar.update(1)
    bar.close()
    monkeypatch.setattr(_progress, "_isatty", lambda stream: False)
    bar = Progress(None, "bootstrap", "fits", total=5, delay=0.0)
    bar.update(1)
    assert bar.bar is None and not bar.shown
    capfd.readouterr()


def test_plain_lines_off_a_terminal(capsys):
    """On a pipe or log: no tqdm, a total line at the end, with the best value when labelled."""
    p = Progress(True, "fit", "evaluations", label="REML criterion")
    for v in (3.0, 1.5, 2.0):
        p.update(1, v)
    assert p.bar is None
    p.close()
    p.close()                                    # idempotent
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("fastlmm_ext: fit done: 3 evaluations, REML criterion 1.500000, ")


def test_never_when_off(capsys):
    p = Progress(False, "chunks (levels)", "chunks")
    assert list(p.iterate(iter(range(4)))) == [0, 1, 2, 3]
    assert p.n == 4 and capsys.readouterr().err == ""
    q = Progress(True, "chunks (levels)", "chunks", prefix="fastlmm-ext")
    assert list(q.iterate([1, 2])) == [1, 2]
    assert capsys.readouterr().err.startswith("fastlmm-ext: chunks (levels) done: 2 chunks, ")
