"""What a formula may evaluate: R's formula dialect on top of formulaic, without running code.

formulaic would evaluate every function-call term (``log(x)``, ``I(x^2)``) with Python's
``eval``, builtins and the caller's namespace included, so a formula could run any code.  Here
each such term is read by a parser for R's expression grammar (``_rparse``) and evaluated by
an interpreter that knows only

* the data's columns (a name is a column wherever it is not called: a column ``Treatment``,
  ``log`` or ``C`` is the column, ``log(x)`` the function),
* R's functions of the dialect (``FUNCTIONS``: log, log2, log10, log1p, exp, sqrt, abs, ...,
  I, poly, scale, ns, bs, factor, as.factor, as.numeric, relevel, c; the Python spellings C and
  center) and numpy's ufuncs as ``np.<ufunc>`` / ``numpy.<ufunc>``,
* numbers, strings, TRUE/FALSE, arithmetic (``^`` and ``**`` are powers), comparisons, ``!``,
  ``&``, ``|``, ``%%``, ``%/%``, ``%in%`` and keyword arguments.

Anything else (attribute access, subscripts, dunder names, lambdas, ...) is refused with a
:class:`FormulaError` naming the offending part before anything is evaluated.  The formula
handed to formulaic holds only column names and placeholders (``_fl0``) for the evaluated
terms, so formulaic does its term algebra (``*``, ``:``, ``(a + b)^2``, ``-``) and encoding, and
evaluates nothing: its materializer here (:class:`RFormulaMaterializer`) looks placeholders up in
this module's interpreter, data columns in the data, and nothing else.

R's names: dotted names are ordinary names (``Informed.liking``), backticks quote any name,
and model-matrix columns are named as R names them (``I(age^2)``, ``poly(conc, 2)1``,
``Treatmentchilled:log(conc)``, ```my col```) from the deparsed expression
(:func:`deparse`) and formulaic's level or basis-column fields (:func:`r_column_names`).

``allow_python=True`` opts out: expressions that are not R are evaluated by Python's ``eval``
(builtins, ``np``, ``pd``), and unknown names are looked up in Python.  The formula can then run
any code.
"""
from __future__ import annotations

import ast
import builtins
import keyword
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from formulaic import Formula, ModelSpec, SimpleFormula
from formulaic.materializers import PandasMaterializer
from formulaic.materializers.types import FactorValues
from formulaic.parser.types import Term
from formulaic.transforms import C as _formulaic_C, center as _formulaic_center
from formulaic.utils.layered_mapping import LayeredMapping
from formulaic.utils.variables import Variable
from interface_meta import override

from ._contrasts import RContrasts, CONTRAST_NAMES
from ._exceptions import DataError, FormulaError, MissingColumnError
from ._rfunctions import as_numeric, bs, factor, ns, poly, r_c, r_log, relevel, scale
from ._rparse import Parser, Tok, check_name, deparse, r_name, tokens

__all__ = ["RExpr", "Translated", "FUNCTIONS", "STATEFUL", "parse_expr", "translate", "evaluate",
           "evaluate_vector", "model_matrix", "r_column_names", "factor_label", "RFormulaMaterializer"]


# ----------------------------------------------------------------------------- the namespace

@dataclass(frozen=True)
class _Fn:
    """A function a formula may call: the implementation, its R parameter names (arguments
    are matched as R matches them: by exact name, then by position; None = positional only)
    and whether it keeps a state for new data."""
    impl: Callable
    params: tuple[str, ...] | None
    stateful: bool = False


def _ufunc(f) -> _Fn:
    return _Fn(f, None)


def _identity(x):
    return x


def _C(x, contrasts=None, levels=None):
    """formulaic's ``C(x, contrasts, levels=)`` (Python spelling), R's contrasts by ``contr.<name>``."""
    return _formulaic_C(x, contrasts=contrasts, levels=levels)


def _center(x, *, _state):
    return _formulaic_center(np.asarray(x, dtype=float), _state=_state)


FUNCTIONS: dict[str, _Fn] = {
    "I": _Fn(_identity, ("x",)),
    "log": _Fn(r_log, ("x", "base")),
    "log2": _ufunc(np.log2), "log10": _ufunc(np.log10), "log1p": _ufunc(np.log1p),
    "exp": _ufunc(np.exp), "expm1": _ufunc(np.expm1), "sqrt": _ufunc(np.sqrt), "abs": _ufunc(np.abs),
    "sin": _ufunc(np.sin), "cos": _ufunc(np.cos), "tan": _ufunc(np.tan), "asin": _ufunc(np.arcsin),
    "acos": _ufunc(np.arccos), "atan": _ufunc(np.arctan), "sinh": _ufunc(np.sinh), "cosh": _ufunc(np.cosh),
    "tanh": _ufunc(np.tanh), "floor": _ufunc(np.floor), "ceiling": _ufunc(np.ceil), "trunc": _ufunc(np.trunc),
    "sign": _ufunc(np.sign), "round": _Fn(lambda x, digits=0: np.round(x, int(digits)), ("x", "digits")),
    "poly": _Fn(poly, ("x", "degree", "raw"), stateful=True),
    "scale": _Fn(scale, ("x", "center", "scale"), stateful=True),
    "ns": _Fn(ns, ("x", "df", "knots", "intercept", "Boundary.knots"), stateful=True),
    "bs": _Fn(bs, ("x", "df", "knots", "degree", "intercept", "Boundary.knots"), stateful=True),
    "center": _Fn(_center, ("x",), stateful=True),
    "factor": _Fn(factor, ("x", "levels")),
    "as.factor": _Fn(factor, ("x",)),
    "relevel": _Fn(relevel, ("x", "ref")),
    "as.numeric": _Fn(as_numeric, ("x",)),
    "c": _Fn(r_c, None),
    "C": _Fn(_C, ("x", "contrasts", "levels")),
}
STATEFUL = frozenset(name for name, fn in FUNCTIONS.items() if fn.stateful)

_CONSTANTS: dict[str, object] = {"pi": math.pi, "T": True, "F": False,
                                 **{name: RContrasts(name) for name in CONTRAST_NAMES}}
_NUMPY_PREFIXES = ("np.", "numpy.")


def _function(name: str) -> _Fn | None:
    """The function a formula may call by ``name``: R's, or a numpy ufunc as np.<ufunc>."""
    fn = FUNCTIONS.get(name)
    if fn is not None:
        return fn
    for prefix in _NUMPY_PREFIXES:
        if name.startswith(prefix):
            attr = name[len(prefix):]
            obj = getattr(np, attr, None) if attr.isidentifier() and not attr.startswith("_") else None
            if isinstance(obj, np.ufunc):
                return _ufunc(obj)
    return None


# ----------------------------------------------------------------------------- expressions

@dataclass(frozen=True)
class RExpr:
    """One evaluated part of a formula (a call such as ``log(x)``, or a response/offset).

    ``tree`` is the parsed R expression, its names resolved: ("col", name) for a data column,
    ("const", value, text) for a constant, ("py", name) for a name left to Python (allow_python
    only).  A Python-only expression (allow_python) has ``tree=None`` and is evaluated from ``text``."""
    label: str
    text: str
    tree: tuple | None
    columns: tuple[str, ...]
    stateful: tuple[str, ...] = ()
    python: bool = False            # Python source (tree is None)
    allow_python: bool = False      # names left to Python may be evaluated (the interpreter checks again)


def _attribute_error(name: str, columns, term: str) -> FormulaError | None:
    """The refusal for a dotted ``name`` that reads an attribute of a column, module or function."""
    parts = name.split(".")
    for k in range(len(parts) - 1, 0, -1):
        root = ".".join(parts[:k])
        if root in columns or root in ("np", "numpy", "contr"):
            return FormulaError(f"attribute access '.{parts[k]}' is not allowed in formula term {term!r}")
    return None


def _resolve(node: tuple, columns, term: str, allow_python: bool, used: dict, stateful: list) -> tuple:
    """Resolve the names of a parsed expression (see :class:`RExpr`); refuse what a formula may not do."""
    kind = node[0]
    if kind == "name":
        name = node[1]
        check_name(name, term)
        if name in columns:
            used[name] = None
            return ("col", name)
        if name in _CONSTANTS:
            return ("const", _CONSTANTS[name], name)
        if allow_python:
            root = name.split(".")[0]
            if root in columns:
                used[root] = None
            return ("py", name)
        err = _attribute_error(name, columns, term)
        if err is not None:
            raise err
        used[name] = None           # a column the data lacks: reported by the column check
        return ("col", name)
    if kind == "call":
        name = node[1]
        check_name(name, term)
        fn = _function(name)
        if fn is None and allow_python and name.split(".")[0] in columns:
            used[name.split(".")[0]] = None       # a method of a column: x.clip(0)
        if fn is None and not allow_python:
            err = _attribute_error(name, columns, term)
            if err is not None:
                raise err
            raise FormulaError(f"unknown function {name}() in formula term {term!r}; formulas may call "
                               f"{', '.join(sorted(FUNCTIONS))} and numpy's ufuncs as np.<name>")
        if fn is not None and fn.stateful:
            stateful.append(name)
        args = []
        for k, a in node[2]:
            if k is not None:
                check_name(k, term)
                if k.startswith("_"):
                    raise FormulaError(f"argument name {k!r} is not allowed in formula term {term!r}")
            args.append((k, _resolve(a, columns, term, allow_python, used, stateful)))
        if fn is not None:
            _match_args(name, fn, [k for k, _ in args], term)
        return ("call", name, tuple(args))
    if kind in ("op", "unary"):
        if kind == "op" and node[1].startswith("%") and node[1] not in ("%%", "%/%", "%in%"):
            raise FormulaError(f"operator {node[1]} is not supported in formula term {term!r}")
        return node[:2] + tuple(_resolve(x, columns, term, allow_python, used, stateful) for x in node[2:])
    if kind == "paren":
        return ("paren", _resolve(node[1], columns, term, allow_python, used, stateful))
    if kind == "list":
        return ("list", tuple(_resolve(x, columns, term, allow_python, used, stateful) for x in node[1]))
    return node


def _match_args(name: str, fn: _Fn, argnames: list, term: str) -> list[str]:
    """R's argument matching (exact names, then positions): the parameter of each argument."""
    if fn.params is None:
        if any(k is not None for k in argnames):
            raise FormulaError(f"{name}() takes no named arguments in formula term {term!r}")
        nin = getattr(fn.impl, "nin", None)
        if nin is not None and len(argnames) != nin:
            raise FormulaError(f"{name}() takes {nin} argument(s), got {len(argnames)}, in formula term {term!r}")
        return [None] * len(argnames)
    params = list(fn.params)
    named = [k for k in argnames if k is not None]
    for k in named:
        if k not in params:
            raise FormulaError(f"unused argument {k!r} to {name}() in formula term {term!r}")
    if len(set(named)) != len(named):
        raise FormulaError(f"an argument of {name}() is given twice in formula term {term!r}")
    free = [p for p in params if p not in named]
    out = []
    for k in argnames:
        if k is not None:
            out.append(k)
        elif not free:
            raise FormulaError(f"too many arguments to {name}() in formula term {term!r}")
        else:
            out.append(free.pop(0))
    if params[0] not in out:
        raise FormulaError(f"{name}() needs its argument {params[0]!r} in formula term {term!r}")
    return out


def parse_expr(text: str, columns, allow_python: bool = False, term: str | None = None) -> RExpr:
    """Parse and check one expression of a formula (``I(age^2)``, ``log(y)``, ``np.log(x)``).

    Raises :class:`FormulaError` for anything a formula may not evaluate (module docstring);
    with ``allow_python``, text that is not an R expression is kept as Python source."""
    term = term or " ".join(text.split())
    cols = set(map(str, columns))
    try:
        tree = Parser(text, term).parse()
    except FormulaError:
        if not allow_python:
            raise
        return RExpr(label=term, text=text, tree=None, columns=tuple(sorted(_python_names(text) & cols)),
                     python=True, allow_python=True)
    used: dict = {}
    stateful: list = []
    resolved = _resolve(tree, cols, term, allow_python, used, stateful)
    return RExpr(label=deparse(tree), text=text, tree=resolved, columns=tuple(used), stateful=tuple(stateful),
                 allow_python=bool(allow_python))


def _python_names(text: str) -> set[str]:
    try:
        tree = ast.parse(_backticks_to_names(text)[0], mode="eval")
    except SyntaxError:
        return set()
    return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}


# ----------------------------------------------------------------------------- evaluation

_BINARY: dict[str, Callable] = {
    "+": np.add, "-": np.subtract, "*": np.multiply, "/": np.true_divide, "%%": np.mod, "%/%": np.floor_divide,
    "==": lambda a, b: a == b, "!=": lambda a, b: a != b, "<": np.less, ">": np.greater,
    "<=": np.less_equal, ">=": np.greater_equal, "&": np.logical_and, "&&": np.logical_and,
    "|": np.logical_or, "||": np.logical_or,
}


def _power(a, b):
    return np.power(np.asarray(a, dtype=float), np.asarray(b, dtype=float))


def _in(a, b):
    return np.isin(np.asarray(a, dtype=object), np.asarray(b, dtype=object).ravel())


def _py_globals() -> dict:
    return {"__builtins__": builtins, "np": np, "numpy": np, "pd": pd, "math": math}


class _Interpreter:
    """Evaluates a resolved expression tree on the data; ``state`` holds each stateful call's
    state, keyed by the call's deparse."""

    def __init__(self, data: Mapping, state: dict, term: str, allow_python: bool):
        self.data, self.state, self.term, self.allow_python = data, state, term, allow_python

    def python(self, name: str):
        """allow_python only: a name Python resolves (np.where, x.clip)."""
        if not self.allow_python:
            raise FormulaError(f"{name!r} is not allowed in formula term {self.term!r}")
        return eval(name, _py_globals(), _PythonNames(self.data))  # noqa: S307 - the user opted in

    def run(self, node: tuple):
        kind = node[0]
        if kind in ("num", "const", "str"):
            return node[1]
        if kind == "col":
            if node[1] not in self.data:
                raise MissingColumnError([node[1]], [str(c) for c in self.data])
            return self.data[node[1]]
        if kind == "py":
            return self.python(node[1])
        if kind == "paren":
            return self.run(node[1])
        if kind == "unary":
            v = self.run(node[2])
            return np.logical_not(v) if node[1] == "!" else (np.negative(v) if node[1] == "-" else v)
        if kind == "op":
            a, b = self.run(node[2]), self.run(node[3])
            if node[1] == "^":
                return _power(a, b)
            if node[1] == "%in%":
                return _in(a, b)
            return _BINARY[node[1]](a, b)
        if kind == "list":
            return np.asarray([self.run(x) for x in node[1]])
        if kind == "call":
            return self.call(node)
        raise FormulaError(f"cannot evaluate formula term {self.term!r}")   # an unresolved tree

    def call(self, node: tuple):
        name, args = node[1], node[2]
        fn = _function(name)
        if fn is None:        # allow_python: a Python callable named in the formula
            f = self.python(name)
            values = [(k, self.run(a)) for k, a in args]
            return f(*[v for k, v in values if k is None], **{k: v for k, v in values if k is not None})
        values = [(k, self.run(a)) for k, a in args]
        params = _match_args(name, fn, [k for k, _ in values], self.term)
        if fn.params is None:
            return fn.impl(*[v for _, v in values])
        kwargs = {p.replace(".", "_"): v for p, (_, v) in zip(params, values)}
        if fn.stateful:
            kwargs["_state"] = self.state.setdefault(deparse(_unresolve(node)), {})
        try:
            return fn.impl(**kwargs)
        except TypeError as e:
            raise FormulaError(f"{name}(): {e} in formula term {self.term!r}") from None


def _unresolve(node: tuple) -> tuple:
    """A resolved tree back in parser form (for its deparse)."""
    kind = node[0]
    if kind in ("col", "py"):
        return ("name", node[1])
    if kind == "call":
        return ("call", node[1], tuple((k, _unresolve(a)) for k, a in node[2]))
    if kind in ("op", "unary"):
        return node[:2] + tuple(_unresolve(x) for x in node[2:])
    if kind == "paren":
        return ("paren", _unresolve(node[1]))
    if kind == "list":
        return ("list", tuple(_unresolve(x) for x in node[1]))
    return node


class _PythonNames(Mapping):
    """allow_python: Python names are data columns, then the dialect's functions and constants."""

    def __init__(self, data: Mapping, extra: Mapping | None = None):
        self.data, self.extra = data, extra or {}

    def __getitem__(self, key):
        if key in self.extra:
            return self.extra[key]
        if key in self.data:
            return self.data[key]
        fn = FUNCTIONS.get(key)
        if fn is not None:
            return fn.impl
        if key in _CONSTANTS:
            return _CONSTANTS[key]
        raise KeyError(key)

    def __iter__(self):
        return iter([*self.extra, *self.data, *FUNCTIONS, *_CONSTANTS])

    def __len__(self) -> int:
        return len(self.extra) + len(self.data) + len(FUNCTIONS) + len(_CONSTANTS)


def _backticks_to_names(text: str) -> tuple[str, dict[str, str]]:
    names: dict[str, str] = {}

    def sub(m):
        key = f"_flq{len(names)}"
        names[key] = m.group(1)
        return key
    return re.sub(r"`([^`]*)`", sub, text), names


class _StateArgs(ast.NodeTransformer):
    """allow_python: give each call of a stateful dialect function its state argument."""

    def __init__(self):
        self.keys: list[str] = []

    def visit_Call(self, node):
        self.generic_visit(node)
        if isinstance(node.func, ast.Name) and node.func.id in STATEFUL:
            key = ast.unparse(node)
            self.keys.append(key)
            node.keywords.append(ast.keyword("_state", ast.Subscript(ast.Name("_flstate", ast.Load()),
                                                                     ast.Constant(key), ast.Load())))
        return node


def _eval_python(expr: RExpr, data: Mapping, state: dict):
    """allow_python: Python's eval of the expression (builtins, np, pd, the data's columns)."""
    src, quoted = _backticks_to_names(expr.text)
    tree = ast.parse(src.strip(), mode="eval")
    tr = _StateArgs()
    tree = ast.fix_missing_locations(tr.visit(tree))
    for key in tr.keys:
        state.setdefault(key, {})
    extra = {k: data[v] for k, v in quoted.items()}
    extra["_flstate"] = state
    for name in STATEFUL:    # the stateful functions take _state= as a keyword
        extra[name] = FUNCTIONS[name].impl
    return eval(compile(tree, "<formula>", "eval"), _py_globals(), _PythonNames(data, extra))  # noqa: S307


def evaluate(expr: RExpr, data: Mapping, state: dict | None = None):
    """The value of ``expr`` on ``data`` (columns by name); ``state`` (a dict, filled when empty)
    carries the stateful transforms' state to new data."""
    state = {} if state is None else state
    if expr.python:
        if not expr.allow_python:
            raise FormulaError(f"formula term {expr.label!r} is Python code, which formulas may not run")
        try:
            return _eval_python(expr, data, state)
        except (FormulaError, DataError, MissingColumnError):
            raise
        except Exception as e:
            raise FormulaError(f"cannot evaluate formula term {expr.label!r}: {type(e).__name__}: {e}") from e
    return _Interpreter(data, state, expr.label, expr.allow_python).run(expr.tree)


def _finish(values, n: int, index, label: str):
    """A term's value as formulaic takes it: numbers as float arrays (scalars repeated), logicals
    and factors as categoricals (R: ``I(x > 2)TRUE``), matrices with columns 1..k."""
    if isinstance(values, FactorValues):
        return values
    if isinstance(values, pd.Categorical):
        return pd.Series(values, index=index)
    if isinstance(values, pd.Series):
        if isinstance(values.dtype, pd.CategoricalDtype):
            return values
        values = values.to_numpy()
    arr = np.asarray(values)
    if arr.ndim == 0:
        arr = np.full(n, arr.item())
    if arr.shape[0] != n:
        raise DataError(f"formula term {label!r} has {arr.shape[0]} values for {n} rows")
    if arr.dtype == bool:
        present = [lab for lab, v in (("FALSE", False), ("TRUE", True)) if (arr == v).any()]
        return pd.Series(pd.Categorical(np.where(arr, "TRUE", "FALSE"), categories=present), index=index)
    if arr.dtype.kind not in "iuf":
        raise DataError(f"formula term {label!r} is not numeric (dtype {arr.dtype})")
    arr = arr.astype(np.float64)
    if arr.ndim == 2:
        return FactorValues(arr, kind="numerical", column_names=tuple(str(j + 1) for j in range(arr.shape[1])))
    return arr


def evaluate_vector(expr: RExpr, frame: pd.DataFrame, what: str) -> np.ndarray:
    """A numeric vector (the response, an offset) from ``expr`` on ``frame``."""
    v = evaluate(expr, frame)
    if isinstance(v, FactorValues) or (np.ndim(v) == 2 and np.shape(v)[1] != 1):
        raise DataError(f"{what} {expr.label!r} must be a single numeric column")
    out = _finish(v, len(frame), frame.index, expr.label)
    if isinstance(out, pd.Series):
        raise DataError(f"{what} {expr.label!r} must be numeric, not a factor")
    return np.asarray(out, dtype=np.float64).reshape(-1)


# ----------------------------------------------------------------------------- translation

@dataclass(frozen=True)
class Translated:
    """A right-hand side as formulaic gets it: ``text`` has data columns (backtick-quoted unless
    identifiers) and placeholders for the evaluated terms ``exprs``; ``labels`` gives R's name of
    each placeholder and of each non-syntactic column; ``columns`` are the data columns read."""
    text: str
    exprs: dict[str, RExpr] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    columns: tuple[str, ...] = ()
    variables: tuple[str, ...] = ()      # the columns named as variables of the formula (not inside a call)
    order: tuple[str, ...] = ()          # formulaic's factor names in order of first appearance (R's variable order)

    @property
    def stateful(self) -> list[str]:
        return [f for e in self.exprs.values() for f in e.stateful]


_FORMULA_OPS = {"+", "-", "*", "/", ":", "^", "**", "(", ")", "%in%"}


def translate(rhs: str, columns, allow_python: bool = False, where: str = "formula") -> Translated:
    """Translate a formula's right-hand side for formulaic (see :class:`Translated`); every
    evaluated term is parsed and checked first (:func:`parse_expr`)."""
    cols = set(map(str, columns))
    toks = tokens(rhs)
    out: list[str] = []
    exprs: dict[str, RExpr] = {}
    by_label: dict[str, str] = {}
    labels: dict[str, str] = {}
    used: dict[str, None] = {}
    variables: dict[str, None] = {}
    order: dict[str, None] = {}
    i = 0
    while toks[i].kind != "end":
        t = toks[i]
        nxt = toks[i + 1]
        e = None
        if t.kind == "name" and nxt.kind == "op" and nxt.text in ("(", "["):
            j = _chain_end(toks, i + 1)
            e = parse_expr(rhs[t.pos:toks[j - 1].end], cols, allow_python)
        elif t.kind == "name":
            check_name(t.text, " ".join(rhs.split()))
            variables[t.text] = None
            j = i + 1
            if t.text.isidentifier() and not keyword.iskeyword(t.text):
                used[t.text] = order[t.text] = None
                out.append(t.text)
                if r_name(t.text) != t.text:
                    labels[t.text] = r_name(t.text)
                i = j
                continue
            # any other name (x.1, `my col`) goes to formulaic as a placeholder too
            e = RExpr(label=r_name(t.text), text=t.text, tree=("col", t.text), columns=(t.text,))
        if e is not None:
            key = by_label.get(e.label)
            if key is None:
                key = _placeholder(len(by_label), cols)
                by_label[e.label] = key
                exprs[key] = e
                labels[key] = e.label
            used.update(dict.fromkeys(e.columns))
            order[key] = None
            out.append(key)
            i = j
            continue
        if t.kind == "num":
            out.append(t.text)
        elif t.kind == "op" and (t.text in _FORMULA_OPS):
            out.append(t.text)
        else:
            if allow_python:
                names = tuple(sorted(_python_names(rhs) & cols))
                return Translated(text=rhs, columns=names, variables=names)
            what = f"{t.text!r}" if t.kind == "op" else f"the {t.kind} {rhs[t.pos:t.end]}"
            raise FormulaError(f"unexpected {what} in {where} {' '.join(rhs.split())!r}")
        i += 1
    return Translated(text=" ".join(out), exprs=exprs, labels=labels, columns=tuple(used),
                      variables=tuple(variables), order=tuple(order))


def _chain_end(toks: list[Tok], i: int) -> int:
    """Index after a call/subscript chain starting at the bracket ``toks[i]``: f(...)[...](...).name"""
    while True:
        t = toks[i]
        if t.kind == "op" and t.text in ("(", "["):
            depth = 0
            while True:
                t = toks[i]
                if t.kind == "end":
                    raise FormulaError("unclosed bracket in formula")
                if t.kind == "op" and t.text in ("(", "["):
                    depth += 1
                elif t.kind == "op" and t.text in (")", "]"):
                    depth -= 1
                    if depth == 0:
                        i += 1
                        break
                i += 1
        elif t.kind == "name" and t.text.startswith(".") and not t.quoted and toks[i - 1].end == t.pos:
            i += 1
        else:
            return i


def _placeholder(k: int, columns) -> str:
    name = f"_fl{k}"
    while name in columns:
        name += "_"
    return name


# ----------------------------------------------------------------------------- materializer

_LEVELS = "(levels)"     # the fit's levels of a factor-valued term, in its state (no call deparses so)


def _check_levels(label: str, values, state: dict) -> None:
    """A factor-valued term (factor(k), I(x > 2)) records its levels when the model is built; on
    new data a level the fit did not see is an error (R: "factor has new levels")."""
    if not isinstance(values, pd.Series) or not isinstance(values.dtype, pd.CategoricalDtype):
        return
    present = [str(c) for c in values.cat.categories[np.unique(values.cat.codes[values.cat.codes >= 0])]]
    if _LEVELS not in state:
        state[_LEVELS] = present
        return
    new = sorted(set(present) - set(state[_LEVELS]))
    if new:
        raise DataError(f"factor {label!r} has new level(s) {new[:5]} not among the levels the model was built "
                        f"with ({', '.join(state[_LEVELS][:10])}); in chunks, make the column a categorical first")


class RFormulaMaterializer(PandasMaterializer):
    """formulaic's pandas materializer with nothing to evaluate but data columns and this
    module's expressions (``exprs``: placeholder → :class:`RExpr`), and R's ``contrasts``
    ({column: RContrasts}) for factor columns.  Kept in the model spec, so new data (predict)
    are evaluated the same way, with the stateful transforms' state of the fit."""
    REGISTER_NAME = "fastlmm_ext_r"
    REGISTER_INPUTS = ()
    REGISTER_OUTPUTS = ("pandas", "numpy")

    def __init__(self, data, context=None, **params):
        super().__init__(data, context=None, **params)
        # nothing but the data: not the caller's frame, not formulaic's transforms
        self.layered_context = LayeredMapping(LayeredMapping(self.data_context, name="data"))
        self._spec = None

    @override
    def _evaluate_factor(self, factor, spec, drop_rows):
        self._spec = spec
        return super()._evaluate_factor(factor, spec, drop_rows)

    @override
    def _lookup(self, name: str):
        exprs = self.params.get("exprs") or {}
        if name in exprs:
            e = exprs[name]
            state = self._spec.transform_state.setdefault(name, {}) if self._spec is not None else {}
            try:
                values = _finish(evaluate(e, self.data, state), len(self.data), self.data.index, e.label)
            except (FormulaError, DataError, MissingColumnError):
                raise
            except Exception as err:     # numpy's or a transform's complaint, named by the term
                raise FormulaError(f"cannot evaluate formula term {e.label!r}: {type(err).__name__}: {err}") from err
            if e.tree is not None and e.tree[0] == "col":           # a column that is not an identifier
                return self._column(e.tree[1], values), {Variable(e.tree[1], roles=("value",), source="data")}
            _check_levels(e.label, values, state)
            return values, {Variable(c, roles=("value",), source="data") for c in e.columns}
        if name in self.data.columns:
            return self._column(name, self.data[name]), {Variable(name, roles=("value",), source="data")}
        raise MissingColumnError([name], [str(c) for c in self.data.columns])

    def _column(self, name: str, values):
        """A data column, with its R contrasts when it is a factor that has them."""
        rc = (self.params.get("contrasts") or {}).get(name)
        return _formulaic_C(values, contrasts=rc) if rc is not None else values

    @override
    def _evaluate(self, expr, metadata, spec):
        if not self.params.get("allow_python"):
            raise FormulaError(f"formula term {expr!r} would run Python code, which formulas may not do "
                               "(allow_python=True permits it)")
        e = RExpr(label=expr, text=expr, tree=None, columns=(), python=True, allow_python=True)
        values = _eval_python(e, self.data, spec.transform_state.setdefault(expr, {}))
        return _finish(values, len(self.data), self.data.index, expr), set()


def model_matrix(tr: Translated, frame: pd.DataFrame, where: str, contrasts: Mapping | None = None,
                 allow_python: bool = False):
    """formulaic's model matrix of a translated right-hand side on ``frame`` (complete rows),
    with the model spec that rebuilds it on new data.  The factors of each interaction are put in
    the order the variables first appear in the formula, as R's ``terms`` orders them
    (``log(z):f`` is R's term ``f:log(z)``)."""
    formula = Formula(tr.text)
    if isinstance(formula, SimpleFormula) and tr.order:
        rank = {name: i for i, name in enumerate(tr.order)}
        formula = SimpleFormula([Term(sorted(t.factors, key=lambda f: rank.get(f.expr, -1))) for t in formula],
                                _ordering=formula.ordering)
    spec = ModelSpec.from_spec(formula, materializer=RFormulaMaterializer, na_action="ignore",
                               output="pandas", materializer_params={"exprs": dict(tr.exprs), "labels": dict(tr.labels),
                                                           "contrasts": dict(contrasts or {}),
                                                           "allow_python": bool(allow_python)})
    try:
        return spec.get_model_matrix(frame)
    except (FormulaError, DataError, MissingColumnError):
        raise
    except Exception as e:
        cause = e.__cause__ if isinstance(e.__cause__, (FormulaError, DataError, MissingColumnError)) else None
        if cause is not None:
            raise cause from None
        raise FormulaError(f"cannot build the model matrix of {where}: {e}") from e


def factor_label(spec, expr: str) -> str:
    """R's label of one of formulaic's factor expressions of ``spec`` (placeholders, quoted names)."""
    labels = (spec.materializer_params or {}).get("labels", {}) if spec is not None else {}
    return labels.get(expr, expr)


def r_column_names(spec) -> list[str]:
    """R's names of the model-matrix columns of ``spec``: "(Intercept)", the factors' labels
    joined by ":", each followed by its level or basis column ("Incomehigh", "poly(x, 2)1")."""
    out = []
    for es in spec.structure:
        factors = [str(f) for f in es.term.factors if str(f) != "1"]
        for col in es.columns:
            out.append("(Intercept)" if col == "Intercept" and not factors else _column_name(col, factors, spec))
    return out


def _column_name(col: str, factors: list[str], spec) -> str:
    parts, rest = [], col
    for i, f in enumerate(factors):
        if not rest.startswith(f):
            return col                   # not formulaic's layout: leave it
        rest = rest[len(f):]
        fld = ""
        if rest.startswith("["):
            if i == len(factors) - 1:
                fld, rest = rest[1:-1] if rest.endswith("]") else rest[1:], ""
            else:
                cut = rest.find("]:" + factors[i + 1])
                if cut < 0:
                    return col
                fld, rest = rest[1:cut], rest[cut + 1:]
            if fld.startswith("T."):
                fld = fld[2:]
        parts.append(factor_label(spec, f) + fld)
        if i < len(factors) - 1:
            if not rest.startswith(":"):
                return col
            rest = rest[1:]
    return ":".join(parts)
