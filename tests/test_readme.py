"""The README's Python examples run as written and print what the README shows."""
from __future__ import annotations

import contextlib
import io
import pathlib
import re
import warnings

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _blocks():
    """(python code, expected output or None) pairs, in README order."""
    text = README.read_text()
    blocks = re.findall(r"```(\w*)\n(.*?)```", text, flags=re.S)
    out = []
    for i, (lang, body) in enumerate(blocks):
        if lang == "python":
            nxt = blocks[i + 1] if i + 1 < len(blocks) else None
            out.append((body, nxt[1] if nxt is not None and nxt[0] == "" else None))
    return out


def _norm(s: str) -> list[str]:
    return [ln.rstrip() for ln in s.strip().splitlines()]


def test_readme_examples_run_and_match_their_output():
    blocks = _blocks()
    assert len(blocks) >= 4
    ns: dict = {}
    checked = 0
    for code, expected in blocks:
        buf = io.StringIO()
        with warnings.catch_warnings(), contextlib.redirect_stdout(buf):
            warnings.simplefilter("ignore")
            exec(compile(code, str(README), "exec"), ns)
        if expected is not None and buf.getvalue().strip():
            assert _norm(buf.getvalue()) == _norm(expected), code
            checked += 1
    assert checked >= 4
