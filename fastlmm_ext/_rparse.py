"""R's expression grammar for the evaluated terms of a formula: tokens, a parser, and deparse.

The parser reads the R subset a formula term may hold (``I(age^2)``, ``poly(conc, 2)``,
``log(Informed.liking)``, ``I(x > 1 & x < 3)``, ``ns(x, df = 3)``) into small tuples:

    ("num", value, text)  ("str", value)  ("const", value, text)  ("name", name)
    ("call", name, ((argname | None, node), ...))  ("op", op, left, right)  ("unary", op, x)
    ("paren", x)  ("list", (node, ...))

Names are R's: letters, digits, ``.`` and ``_`` (``Informed.liking``, ``as.numeric``,
``np.log`` are single names), or anything in backticks.  Binding powers are R's (``?Syntax``):
``^`` (and ``**``) binds tighter than unary minus, then ``%any%``, ``* /``, ``+ -``, comparisons,
``!``, ``&``, ``|``; so ``-x^2`` is −(x²) and ``x > 1 & x < 3`` is (x > 1) & (x < 3), as in R.
Operators a formula may not use (``$ @ :: [ { <- ~ ;`` and ``:`` inside a call) are refused
with an error naming them.

:func:`deparse` prints a tree as R's ``deparse`` does (R's spacing, numbers to 15 significant
digits, non-syntactic names in backticks, explicit parentheses kept), which is R's name of the
term in the model matrix.
"""
from __future__ import annotations

import ast
import math
import re
from dataclasses import dataclass

from ._exceptions import FormulaError

__all__ = ["Parser", "Tok", "tokens", "deparse", "r_name", "check_name", "KEYWORDS"]

KEYWORDS = {"TRUE": True, "FALSE": False, "NULL": None, "Inf": math.inf, "NaN": math.nan, "NA": math.nan,
             "True": True, "False": False, "None": None}          # and the Python spellings


# ----------------------------------------------------------------------------- tokens

@dataclass(frozen=True)
class Tok:
    kind: str      # name | num | str | op | end
    text: str      # a name (without backticks), the number as written, a string's value, an operator
    pos: int
    end: int
    quoted: bool = False


_NUM = re.compile(r"0[xX][0-9a-fA-F]+L?|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?L?")
_NAME_RE = re.compile(r"[A-Za-z_.][A-Za-z0-9_.]*")
_OPS = ("**", "<=", ">=", "==", "!=", "&&", "||", "<-", "::", "->",
        "+", "-", "*", "/", "^", "<", ">", "!", "&", "|", "=", "~", ":", "$", "@", "?",
        "(", ")", "[", "]", "{", "}", ",", ";")
_SYNTACTIC = re.compile(r"(?:[A-Za-z]|\.[._A-Za-z])[._A-Za-z0-9]*|\.")
_R_RESERVED = {"if", "else", "repeat", "while", "function", "for", "next", "break", "TRUE", "FALSE",
               "NULL", "Inf", "NaN", "NA", "NA_integer_", "NA_real_", "NA_character_", "in"}


def tokens(text: str) -> list[Tok]:
    """R's tokens of ``text``: names (dotted or backtick-quoted), numbers, strings, operators."""
    out, i, n = [], 0, len(text)
    while i < n:
        ch = text[i]
        if ch.isspace():
            i += 1
            continue
        if ch == "`":
            j = text.find("`", i + 1)
            if j < 0:
                raise FormulaError(f"unterminated ` in {text!r}")
            out.append(Tok("name", text[i + 1:j], i, j + 1, quoted=True))
            i = j + 1
            continue
        if ch in "'\"":
            j = i + 1
            while j < n and text[j] != ch:
                j += 2 if text[j] == "\\" else 1
            if j >= n:
                raise FormulaError(f"unterminated string in {text!r}")
            try:
                value = ast.literal_eval(text[i:j + 1])
            except (ValueError, SyntaxError):
                raise FormulaError(f"invalid string {text[i:j + 1]} in {text!r}") from None
            out.append(Tok("str", value, i, j + 1))
            i = j + 1
            continue
        m = _NUM.match(text, i)
        if m and (ch.isdigit() or (ch == "." and i + 1 < n and text[i + 1].isdigit())):
            out.append(Tok("num", m.group(), i, m.end()))
            i = m.end()
            continue
        m = _NAME_RE.match(text, i)
        if m:
            out.append(Tok("name", m.group(), i, m.end()))
            i = m.end()
            continue
        if ch == "%":
            j = text.find("%", i + 1)
            if j < 0:
                raise FormulaError(f"unterminated %operator% in {text!r}")
            out.append(Tok("op", text[i:j + 1], i, j + 1))
            i = j + 1
            continue
        op = next((o for o in _OPS if text.startswith(o, i)), None)
        if op is None:
            raise FormulaError(f"unexpected character {ch!r} in {text!r}")
        out.append(Tok("op", op, i, i + len(op)))
        i += len(op)
    out.append(Tok("end", "", n, n))
    return out


# ----------------------------------------------------------------------------- parser

_INFIX = {"||": 2, "|": 2, "&&": 3, "&": 3, "==": 5, "!=": 5, "<": 5, ">": 5, "<=": 5, ">=": 5,
          "+": 6, "-": 6, "*": 7, "/": 7, "^": 11, "**": 11}
_PCT = 8                      # %%, %/%, %in%
_NOT, _NEG = 4, 10            # prefix ! and unary -/+
_REFUSED_OPS = {"$": "attribute access '$'", "@": "attribute access '@'", "::": "namespace access '::'",
                "[": "subscript '['", "{": "braces '{'", "<-": "assignment '<-'", "->": "assignment '->'",
                "~": "a formula '~'", "?": "'?'", ";": "';'", ":": "the ':' operator"}


class Parser:
    def __init__(self, text: str, term: str):
        self.text, self.term = text, term
        self.toks = tokens(text)
        self.i = 0

    def error(self, what: str) -> FormulaError:
        return FormulaError(f"{what} is not allowed in formula term {self.term!r}")

    @property
    def tok(self) -> Tok:
        return self.toks[self.i]

    def take(self) -> Tok:
        t = self.toks[self.i]
        self.i += 1
        return t

    def expect(self, op: str) -> None:
        if self.tok.kind != "op" or self.tok.text != op:
            raise FormulaError(f"expected {op!r} at {self.text[self.tok.pos:self.tok.pos + 10]!r} in formula "
                               f"term {self.term!r}")
        self.i += 1

    def parse(self) -> tuple:
        node = self.expr(0)
        if self.tok.kind != "end":
            t = self.tok
            if t.kind == "name" and t.text.startswith("."):
                raise self.error(f"attribute access {t.text!r}")
            if t.kind == "op" and t.text in _REFUSED_OPS:
                raise self.error(_REFUSED_OPS[t.text])
            raise FormulaError(f"unexpected {self.text[t.pos:t.end]!r} in formula term {self.term!r}")
        return node

    def expr(self, rbp: int) -> tuple:
        left = self.prefix()
        while True:
            t = self.tok
            if t.kind == "name" and t.text.startswith(".") and not t.quoted:
                raise self.error(f"attribute access {t.text!r}")
            if t.kind != "op":
                return left
            if t.text.startswith("%") and len(t.text) > 1:
                bp = _PCT
            elif t.text in _INFIX:
                bp = _INFIX[t.text]
            elif t.text in _REFUSED_OPS or t.text == "(":
                if t.text == "(":
                    raise self.error("calling the result of an expression")
                raise self.error(_REFUSED_OPS[t.text])
            else:
                return left
            if bp <= rbp:
                return left
            self.i += 1
            op = "^" if t.text == "**" else t.text
            right = self.expr(bp - 1 if op == "^" else bp)     # ^ is right-associative
            left = ("op", op, left, right)

    def prefix(self) -> tuple:
        t = self.take()
        if t.kind == "num":
            return ("num", _number(t.text), t.text)
        if t.kind == "str":
            return ("str", t.text)
        if t.kind == "name":
            check_name(t.text, self.term)
            if not t.quoted and t.text in KEYWORDS:
                return ("const", KEYWORDS[t.text], t.text)
            if self.tok.kind == "op" and self.tok.text == "(":
                return self.call(t)
            return ("name", t.text)
        if t.kind == "op":
            if t.text == "(":
                inner = self.expr(0)
                self.expect(")")
                return ("paren", inner)
            if t.text in ("-", "+"):
                return ("unary", t.text, self.expr(_NEG))
            if t.text == "!":
                return ("unary", "!", self.expr(_NOT))
            if t.text == "[":           # a Python list of values: knots=[1, 2]
                items = []
                while not (self.tok.kind == "op" and self.tok.text == "]"):
                    items.append(self.expr(0))
                    if self.tok.kind == "op" and self.tok.text == ",":
                        self.i += 1
                    elif not (self.tok.kind == "op" and self.tok.text == "]"):
                        raise FormulaError(f"expected ',' or ']' in formula term {self.term!r}")
                self.i += 1
                return ("list", tuple(items))
            if t.text in _REFUSED_OPS:
                raise self.error(_REFUSED_OPS[t.text])
        if t.kind == "end":
            raise FormulaError(f"formula term {self.term!r} ends unexpectedly")
        raise FormulaError(f"unexpected {self.text[t.pos:t.end]!r} in formula term {self.term!r}")

    def call(self, name: Tok) -> tuple:
        self.expect("(")
        args = []
        while not (self.tok.kind == "op" and self.tok.text == ")"):
            argname = None
            nxt = self.toks[self.i + 1]
            if self.tok.kind in ("name", "str") and nxt.kind == "op" and nxt.text == "=":
                argname = self.tok.text
                check_name(argname, self.term)
                self.i += 2
            if self.tok.kind == "op" and self.tok.text in (",", ")"):
                raise self.error("an empty argument")
            args.append((argname, self.expr(0)))
            if self.tok.kind == "op" and self.tok.text == ",":
                self.i += 1
            elif not (self.tok.kind == "op" and self.tok.text == ")"):
                t = self.tok
                if t.kind == "op" and t.text == "=":
                    raise self.error("'=' other than for a named argument")
                raise FormulaError(f"expected ',' or ')' at {self.text[t.pos:t.pos + 10]!r} in formula term "
                                   f"{self.term!r}")
        self.i += 1
        return ("call", name.text, tuple(args))


def check_name(name: str, term: str) -> None:
    """Refuse a name with a double underscore (Python's dunder names are the way into its internals)."""
    if "__" in name:
        dunder = next(p for p in name.split(".") if "__" in p)
        raise FormulaError(f"dunder name {dunder!r} is not allowed in formula term {term!r}")


def _number(text: str) -> float:
    t = text[:-1] if text.endswith("L") else text
    return float(int(t, 16)) if t[:2].lower() == "0x" else float(t)


# ----------------------------------------------------------------------------- deparse

def r_name(name: str) -> str:
    """A name as R prints it: backtick-quoted unless syntactic."""
    return name if _SYNTACTIC.fullmatch(name) and name not in _R_RESERVED else f"`{name}`"


def _r_number(v: float) -> str:
    """R's deparse of a double: up to 15 significant digits, fixed notation unless scientific
    is shorter (R's formatReal with scipen = 0)."""
    if v != v:
        return "NaN"
    if math.isinf(v):
        return "Inf" if v > 0 else "-Inf"
    if v == 0:
        return "0"
    ref = float(f"{v:.14e}")
    sig = next(s for s in range(1, 16) if float(f"{v:.{s - 1}e}") == ref)
    sci = f"{v:.{sig - 1}e}"
    mant, exp = sci.split("e")
    e = int(exp)
    sci = f"{mant}e{'-' if e < 0 else '+'}{abs(e):02d}"
    fixed = f"{v:.{max(0, sig - 1 - e)}f}"
    return fixed if len(fixed) <= len(sci) else sci


_SPACED = {"+", "-", "*", "==", "!=", "<", ">", "<=", ">=", "&", "&&", "|", "||"}


def deparse(node: tuple) -> str:
    """R's ``deparse`` of a parsed expression (its label as a model-matrix column name)."""
    kind = node[0]
    if kind == "num":
        return _r_number(node[1])
    if kind == "str":
        return '"' + node[1].replace("\\", "\\\\").replace('"', '\\"') + '"'
    if kind == "const":
        return node[2]
    if kind == "name":
        return r_name(node[1])
    if kind == "paren":
        return f"({deparse(node[1])})"
    if kind == "unary":
        return node[1] + deparse(node[2])
    if kind == "op":
        op = node[1]
        sep = " " if op in _SPACED or (op.startswith("%") and op not in ("%%", "%/%")) else ""
        return f"{deparse(node[2])}{sep}{op}{sep}{deparse(node[3])}"
    if kind == "call":
        args = ", ".join(deparse(a) if k is None else f"{r_name(k)} = {deparse(a)}" for k, a in node[2])
        return f"{r_name(node[1])}({args})"
    return "[" + ", ".join(deparse(x) for x in node[1]) + "]"
