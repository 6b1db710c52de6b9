"""Parse lme4-style model formulas such as ``"Reaction ~ Days + (Days | Subject)"``.

The parser only splits the formula into its parts; the fixed-effects right-hand side and
each random-effects ``expr`` are returned as text for formulaic to build model matrices.

Rules (those of lme4):

* exactly one top-level ``~`` with a non-empty response on its left;
* random-effects terms are top-level ``+`` terms of the form ``(expr | grouping)``
  (correlated effects) or ``(expr || grouping)`` (uncorrelated: one term per element);
  a ``|`` anywhere else, other than inside a function call such as ``I(a | b)``, is an error;
* the grouping is a name, an interaction ``a:b`` or a nesting ``a/b`` (= ``a + b:a``, lme4's naming);
* ``offset(expr)`` terms of the fixed part are collected in :attr:`ParsedFormula.offsets`;
* everything else on the right side is the fixed part, passed on unchanged.
"""
from __future__ import annotations

import functools

import re
from dataclasses import dataclass

from formulaic import Formula

from ._exceptions import FormulaError

__all__ = ["RandomTerm", "ParsedFormula", "parse_formula", "split_terms", "findbars"]

_OPEN = {"(": ")", "[": "]", "{": "}"}
_CLOSE = {v: k for k, v in _OPEN.items()}
_QUOTES = "'\"`"
# R's syntactic names (not a number such as ".5"), or any backtick-quoted name.
_NAME = re.compile(r"(?!\.\d)[A-Za-z_.][A-Za-z0-9_.]*|`[^`]+`")
# Operators that make a following '+'/'-' a unary sign inside a term ("x^-1"), not a separator.
_BINARY_OPS = "*^/:%"
# Deeper nesting is refused before any recursive step sees it (R's parser stops at 50 levels;
# formulaic and Python's parser overflow their recursion a few hundred levels down).
MAX_DEPTH = 100


@dataclass(frozen=True)
class RandomTerm:
    """One random-effects term ``(expr | group)`` after expanding ``||`` and ``/``.

    ``expr`` is a formulaic right-hand side ("1", "1 + Days", "0 + Days", "Days");
    ``group`` holds the names of the grouping factor, several for an interaction ``a:b``.
    """

    expr: str
    group: tuple[str, ...]

    def group_name(self) -> str:
        """The grouping factor as lme4 names it, e.g. ``"a:b"``."""
        return ":".join(self.group)

    @property
    def group_label(self) -> str:
        return self.group_name()


@dataclass(frozen=True)
class ParsedFormula:
    """A formula split into response, fixed part, random terms and offsets.

    ``fixed`` keeps the user's intercept choice verbatim ("0 + x", "x - 1"); when only
    random terms were given it is "1", and ``y ~ (1|g) - 1`` gives "-1".
    """

    response: str
    fixed: str
    random: tuple[RandomTerm, ...]
    offsets: tuple[str, ...] = ()


# ----------------------------------------------------------------------------- scanning

def _depths(s: str) -> list[int]:
    """Bracket depth of every character of ``s`` (a bracket itself counts as outside), or
    -1 for characters of quoted strings and backtick names.  Raises on imbalance."""
    out: list[int] = []
    stack: list[tuple[str, int]] = []
    quote, qstart, i = "", 0, 0
    while i < len(s):
        ch = s[i]
        if quote:
            out.append(-1)
            if ch == "\\" and quote != "`" and i + 1 < len(s):  # escaped character in a string
                out.append(-1)
                i += 1
            elif ch == quote:
                quote = ""
        elif ch in _QUOTES:
            quote, qstart = ch, i
            out.append(-1)
        elif ch in _OPEN:
            out.append(len(stack))
            stack.append((ch, i))
            if len(stack) > MAX_DEPTH:
                raise FormulaError(f"formula nests brackets more than {MAX_DEPTH} deep (at character {i + 1} of "
                                   f"{_quote(s[:40] + '...')}); simplify the expression")
        elif ch in _CLOSE:
            if not stack or stack[-1][0] != _CLOSE[ch]:
                raise FormulaError(f"unmatched {ch!r} in formula {_quote(s[:i + 1])}")
            stack.pop()
            out.append(len(stack))
        else:
            out.append(len(stack))
        i += 1
    if quote:
        raise FormulaError(f"unterminated {quote} in formula {_quote(s[qstart:])}")
    if stack:
        raise FormulaError(f"unclosed {stack[-1][0]!r} in formula {_quote(s[stack[-1][1]:])}")
    return out


def _quote(s: str) -> str:
    return repr(" ".join(s.split()))


def _top(s: str, chars: str) -> list[int]:
    """Positions of ``chars`` at bracket depth 0, outside quotes."""
    d = _depths(s)
    return [i for i, ch in enumerate(s) if d[i] == 0 and ch in chars]


def _squash(s: str) -> str:
    """Strip, and collapse runs of whitespace outside quotes into one space."""
    d = _depths(s)
    out: list[str] = []
    for i, ch in enumerate(s):
        if ch.isspace() and d[i] >= 0:
            if out and out[-1] != " ":
                out.append(" ")
        else:
            out.append(ch)
    return "".join(out).strip()


def _outer_group(s: str) -> str | None:
    """The inside of ``s`` if ``s`` is one parenthesised group ``( ... )``, else None."""
    s = s.strip()
    if not s.startswith("("):
        return None
    d = _depths(s)
    close = next(j for j in range(1, len(s)) if s[j] == ")" and d[j] == 0)
    return s[1:-1] if close == len(s) - 1 else None


def _strip_parens(s: str) -> str:
    while (inner := _outer_group(s)) is not None:
        s = inner
    return s.strip()


def _signed_terms(s: str) -> list[tuple[str, str]]:
    """Top-level terms of a right-hand side with their sign: "x - 1" → [('+','x'), ('-','1')]."""
    cuts = []
    for i in _top(s, "+-"):
        before = s[:i].rstrip()
        if not before or before[-1] not in _BINARY_OPS:
            cuts.append(i)
    out: list[tuple[str, str]] = []
    sign, start = "+", 0
    for k, i in enumerate(cuts + [len(s)]):
        text = _squash(s[start:i])
        if text:
            out.append((sign, text))
        elif not (k == 0 and i < len(s)):  # only a leading unary sign may have nothing before it
            raise FormulaError(f"empty term in {_quote(s)}")
        if i < len(s):
            sign, start = s[i], i + 1
    return out


def split_terms(rhs: str) -> list[str]:
    """Top-level ``+``-separated terms of ``rhs``, stripped; brackets and quotes are respected.

    ``"1 + x - z + (1 | g)"`` → ``["1", "x - z", "(1 | g)"]``; a blank ``rhs`` gives ``[]``.
    """
    if not rhs.strip():
        return []
    parts, start = [], 0
    for i in _top(rhs, "+") + [len(rhs)]:
        parts.append(rhs[start:i].strip())
        start = i + 1
    if parts and not parts[0] and len(parts) > 1:  # leading unary '+'
        parts = parts[1:]
    if not all(parts):
        raise FormulaError(f"empty term in {_quote(rhs)}")
    return parts


def _join(terms: list[tuple[str, str]]) -> str:
    out = ""
    for sign, text in terms:
        out += (text if sign == "+" else "-" + text) if not out else f" {sign} {text}"
    return out


# ----------------------------------------------------------------------------- bar terms

def _bar_inside(s: str) -> str | None:
    """For a bar term ``(expr | g)`` (redundant parentheses allowed) its inside, else None."""
    while (inner := _outer_group(s)) is not None:
        if _top(inner, "|"):
            return inner
        s = inner
    return None


def _plain_groups(s: str) -> list[str]:
    """Insides of the top-level parenthesised groups of ``s`` that are not function calls."""
    d = _depths(s)
    out = []
    for k, ch in enumerate(s):
        if ch == "(" and d[k] == 0:
            prev = s[:k].rstrip()[-1:]
            if prev and (prev.isalnum() or prev in "._)]`'\""):  # f(...): a call's arguments
                continue
            out.append(s[k + 1:next(j for j in range(k + 1, len(s)) if s[j] == ")" and d[j] == 0)])
    return out


def _hidden_bar(s: str) -> bool:
    """Whether a plain (non-call) parenthesised group anywhere in ``s`` holds a bar."""
    return any(_top(g, "|") or _hidden_bar(g) for g in _plain_groups(s))


def _groups(text: str, term: str) -> list[tuple[str, ...]]:
    """``a`` → [(a,)], ``a:b`` → [(a, b)], ``a/b`` → [(a,), (b, a)], ``a/b/c`` → [(a,), (b, a), (c, b, a)].

    Nesting names the inner factor first, as lme4 does (``(1|batch/cask)`` gives the factors
    ``batch`` and ``cask:batch``); an interaction segment keeps its own order (``a:b/c`` →
    [(a, b), (c, a, b)])."""
    segments: list[tuple[str, ...]] = []
    out: list[tuple[str, ...]] = []
    g = _strip_parens(text)
    starts = [-1] + _top(g, "/")
    for a, b in zip(starts, starts[1:] + [len(g)]):
        seg = _strip_parens(g[a + 1:b])
        cuts = [-1] + _top(seg, ":")
        names: list[str] = []
        for c, e in zip(cuts, cuts[1:] + [len(seg)]):
            name = _squash(_strip_parens(seg[c + 1:e]))
            if not _NAME.fullmatch(name):
                raise FormulaError(
                    f"invalid grouping factor {_quote(text)} in {term}: expected a name, "
                    "an interaction a:b or a nesting a/b")
            names.append(name.strip("`"))
        segments.append(tuple(names))
        out.append(tuple(n for sg in reversed(segments) for n in sg))
    return out


def _intercept(terms: list[tuple[str, str]]) -> tuple[bool | None, list[tuple[str, str]]]:
    """Split off intercept terms: True if "1" is explicit, False if removed ("0", "-1"),
    None if implicit.  The last intercept term wins, as in R."""
    icpt: bool | None = None
    rest = []
    for sign, text in terms:
        if text in ("0", "1"):
            icpt = (text == "1") == (sign == "+")
        else:
            rest.append((sign, text))
    return icpt, rest


def _elements(rest: list[tuple[str, str]], expr: str, term: str) -> list[str]:
    """Non-intercept terms of a ``||`` expr, expanded as R's ``terms()`` would (``a*b`` →
    a, b, a:b) and ordered by interaction order."""
    simple = all(sign == "+" and not _top(t, "*^/%") and not _plain_groups(t) for sign, t in rest)
    if simple:
        return sorted((t for _, t in rest), key=lambda t: len(_top(t, ":")))
    try:
        parsed = Formula("0 + " + _join(rest))
    except Exception as e:
        raise FormulaError(f"cannot expand {_quote(expr)} in {term}: {e}") from e
    out = []
    for t in parsed:
        factors = []
        for f in t.factors:
            lookup = str(getattr(f.eval_method, "value", f.eval_method)) == "lookup"
            factors.append(f"`{f.expr}`" if lookup and not f.expr.isidentifier() else f.expr)
        out.append(":".join(factors))
    return out


def _bar_parts(inner: str) -> tuple[list[str], list[str], list[tuple[str, ...]]]:
    """The inside of a bar term split into its effects (formulaic right-hand sides, one per
    element of a ``||`` term), their lhs as R deparses them, and its grouping factors."""
    term = _quote(f"({inner})")
    bars = _top(inner, "|")
    double = len(bars) == 2 and bars[1] == bars[0] + 1
    if len(bars) > 1 and not double:
        raise FormulaError(f"more than one '|' in random-effects term {term}")
    expr, grouping = inner[:bars[0]].strip(), inner[bars[-1] + 1:].strip()
    if not expr:
        raise FormulaError(f"random-effects term {term} has nothing left of the bar")
    if not grouping:
        raise FormulaError(f"random-effects term {term} has no grouping factor")
    if _hidden_bar(expr):
        raise FormulaError(f"random-effects term nested inside {term}")
    groups = _groups(grouping, term)
    icpt, rest = _intercept(_signed_terms(expr))
    if icpt is False and not rest:
        raise FormulaError(f"random-effects term {term} has no effects")
    if not double:
        if icpt is None and rest[0][0] == "-":
            icpt = True  # "-a" alone would leave nothing for formulaic to remove from
        e = _join(rest) if icpt is None else _join([("+", "1" if icpt else "0"), *rest])
        return [e], [_join(_signed_terms(expr))], groups
    exprs = ["1"] if icpt is not False else []
    exprs += ["0 + " + t for t in _elements(rest, expr, term)]
    return exprs, exprs, groups


def _random_terms(inner: str) -> list[RandomTerm]:
    exprs, _, groups = _bar_parts(inner)
    return [RandomTerm(e, g) for g in groups for e in exprs]


def findbars(formula: str) -> list[tuple[str, RandomTerm]]:
    """lme4's ``findbars``: the random-effects terms of ``formula`` in lme4's order, each as R
    deparses it (``"1 + x | g"``) with its :class:`RandomTerm`.  The order is the formula's, a
    ``||`` term expanded first ((1|g), then (0 + x|g)) and a nesting after it (``(1|a/b)``:
    ``1 | b:a`` before ``1 | a``)."""
    parse_formula(formula)           # the checks and messages of the parser
    rhs = formula[_top(formula, "~")[0] + 1:]
    out = []
    for _, text in _signed_terms(rhs):
        inner = _bar_inside(text)
        if inner is None:
            continue
        exprs, labels, groups = _bar_parts(inner)
        for e, lab in zip(exprs, labels):
            for g in reversed(groups):
                out.append((f"{lab} | {':'.join(g)}", RandomTerm(e, g)))
    return out


# ----------------------------------------------------------------------------- formula

def parse_formula(formula: str) -> ParsedFormula:
    """Split an lme4 formula into response, fixed part, random terms and offsets.

    Raises :class:`FormulaError`, quoting the offending part, for a malformed formula.  The
    result is immutable, so a formula fitted again (fit_many, bootstrap refits, benchmarks) is
    parsed once (an LRU cache of recent formulas).
    """
    if not isinstance(formula, str):
        raise FormulaError(f"formula must be a string, got {type(formula).__name__}")
    return _parse_formula(formula)


@functools.lru_cache(maxsize=256)
def _parse_formula(formula: str) -> ParsedFormula:
    if not formula.strip():
        raise FormulaError("formula is empty")
    tildes = _top(formula, "~")
    if len(tildes) != 1:
        what = "has no '~'" if not tildes else "has more than one top-level '~'"
        raise FormulaError(f"formula {_quote(formula)} {what}; expected 'response ~ terms'")
    lhs, rhs = formula[:tildes[0]], formula[tildes[0] + 1:]
    if not lhs.strip():
        raise FormulaError(f"formula needs a response: 'y ~ ...', got {_quote(formula)}")
    if not rhs.strip():
        raise FormulaError(f"formula {_quote(formula)} has nothing right of '~'")
    if _top(rhs, "|"):
        raise FormulaError(f"'|' outside parentheses in {_quote(rhs)}; "
                           "write random effects as (expr | group)")

    fixed: list[tuple[str, str]] = []
    random: list[RandomTerm] = []
    offsets: list[str] = []
    for sign, text in _signed_terms(rhs):
        inner = _bar_inside(text)
        if inner is not None:
            if sign == "-":
                raise FormulaError(f"random-effects term {_quote(text)} cannot be subtracted")
            random.extend(_random_terms(inner))
        elif _hidden_bar(text):
            raise FormulaError(f"random-effects term inside {_quote(text)}: (expr | group) "
                               "must be a top-level '+' term of the formula")
        elif text.startswith("offset(") and _outer_group(text[6:]) is not None:
            if sign == "-" or not _squash(text[7:-1]):
                raise FormulaError(f"invalid offset term {_quote(sign.strip('+') + text)}")
            offsets.append(_squash(text[7:-1]))
        else:
            fixed.append((sign, text))
    if not random:
        raise FormulaError(f"no random-effects terms specified in formula {_quote(formula)}; "
                           "add one such as (1 | group)")
    return ParsedFormula(response=_squash(lhs), fixed=_join(fixed) or "1",
                         random=tuple(random), offsets=tuple(offsets))
