"""Formulas cannot run code: every exploit of formulaic's ``eval`` is refused with a
FormulaError naming the offending part, before anything is evaluated, through every entry
point (lmer, LinearMixedModel, chunks, Dask, fit_many, the CLI); hostile *data* are values;
``allow_python=True`` is the explicit opt-in (and then code does run); and the restricted
interpreter computes what numpy computes (hypothesis)."""
from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import fastlmm_ext as fl
from fastlmm_ext._design import build_structure
from test_cli import assert_one_line_error, run_cli


@pytest.fixture(scope="module")
def frame():
    rng = np.random.default_rng(7)
    n = 120
    return pd.DataFrame({"y": rng.normal(size=n) + np.repeat(rng.normal(size=12), 10),
                         "x": rng.uniform(0.5, 3.0, n), "z": rng.normal(size=n),
                         "g": np.repeat([f"g{i}" for i in range(12)], 10)})


def exploits(target: str) -> list[tuple[str, str]]:
    """(formula, fragment of the error) pairs; each would create ``target`` if it ran."""
    sys_call = f"np.lib._npyio_impl.os.system('touch {target}')"
    f2py = f"np.f2py.subprocess.call(['touch', '{target}'])"
    chain = f"x.__class__.__init__.__globals__['__builtins__']['__import__']('os').system('touch {target}')"
    return [
        (f"y ~ x + I(x + 0*{sys_call}) + (1|g)",
         "attribute access '.lib' is not allowed in formula term \"I(x + 0*np.lib._npyio_impl.os.system("),
        (f"y ~ x + {chain} + (1|g)", "dunder name '__class__' is not allowed"),
        (f"y ~ x + I({chain}) + (1|g)", "dunder name '__class__' is not allowed"),
        (f"y ~ x + (1 + I(x + 0*{sys_call})|g)", "attribute access '.lib'"),
        (f"y ~ x + (0 + {chain}|g)", "dunder name '__class__'"),
        (f"I(y + 0*{sys_call}) ~ x + (1|g)", "attribute access '.lib'"),
        (f"y ~ x + offset(0*{f2py}) + (1|g)", "attribute access '.f2py'"),
        (f"y ~ x + I(x + 0*{f2py}) + (1|g)", "attribute access '.f2py'"),
        (f"y ~ x + I(__import__('os').system('touch {target}')) + (1|g)", "dunder name '__import__'"),
        (f"y ~ x + I(eval(\"__import__('os').system('touch {target}')\")) + (1|g)", "unknown function eval()"),
        (f"y ~ x + I(exec('import os')) + (1|g)", "unknown function exec()"),
        (f"y ~ x + I(open('{target}', 'w')) + (1|g)", "unknown function open()"),
        (f"y ~ x + I(getattr(x, 'clip')) + (1|g)", "unknown function getattr()"),
        (f"y ~ x + x.clip(0) + (1|g)", "attribute access '.clip'"),
        (f"y ~ x + I(np.where(x > 1, 1, 0)) + (1|g)", "attribute access '.where'"),
        (f"y ~ x + I(x[0]) + (1|g)", "subscript '['"),
        (f"y ~ x + I((lambda: 0)()) + (1|g)", "':' operator"),
        (f"y ~ x + {{x + 1}} + (1|g)", "unexpected '{'"),
        (f"y ~ x + I(log(x).real) + (1|g)", "attribute access '.real'"),
        (f"y ~ x + I(log(x)$a) + (1|g)", "attribute access '$'"),
        (f"y ~ x + I(base::eval(x)) + (1|g)", "namespace access '::'"),
        (f"y ~ x + I(poly(x, 2, _state = 1)) + (1|g)", "argument name '_state'"),
    ]


@pytest.mark.parametrize("i", range(len(exploits("P"))))
def test_exploits_are_refused_and_run_nothing(frame, tmp_path, i):
    target = tmp_path / "pwned"
    formula, fragment = exploits(str(target))[i]
    for fit in (lambda: fl.lmer(formula, frame), lambda: fl.LinearMixedModel(formula, frame)):
        with pytest.raises(fl.FormulaError) as err:
            fit()
        assert fragment in str(err.value)
    assert not target.exists()


def test_exploits_refused_by_every_entry_point(frame, tmp_path):
    import dask.dataframe as dd
    target = tmp_path / "pwned"
    chunks = [frame.iloc[:60], frame.iloc[60:]]
    for formula, fragment in exploits(str(target))[:8]:
        rhs = formula.split("~", 1)[1]
        calls = [lambda: fl.lmer_chunked(formula, chunks),
                 lambda: fl.LinearMixedModel.from_chunks(formula, chunks),
                 lambda: fl.lmer(formula, dd.from_pandas(frame, npartitions=2))]
        if not formula.startswith("I("):       # fit_many replaces the response
            calls.append(lambda: fl.fit_many("~" + rhs, frame, ["y"]))
        for call in calls:
            with pytest.raises(fl.FormulaError, match="not allowed"):
                call()
    assert not target.exists()


def test_predict_cannot_be_made_to_run_code(frame, tmp_path):
    """predict(newdata) re-evaluates the fitted (allowed) formula; hostile *data* are values
    (levels, column names), and re_form is matched as text, never evaluated."""
    target = tmp_path / "pwned"
    code = f"__import__('os').system('touch {target}')"
    hostile = frame.assign(g=[code if i % 10 == 0 else g for i, g in enumerate(frame["g"])])
    hostile[f"os.system('touch {target}')"] = frame["z"]
    res = fl.lmer(f"y ~ log(x) + I(z^2) + `os.system('touch {target}')` + (1|g)", hostile)
    assert list(res.fixef.index)[-1] == f"`os.system('touch {target}')`"
    nd = hostile.head(15).copy()
    nd["g"] = [code] * 15
    pred = res.predict(nd, allow_new_levels=True)
    assert np.isfinite(pred).all()
    # re_form may hold part of a fitted term (lme4's mkNewReTrms), so its columns are evaluated,
    # by the same restricted evaluator as the fit's formula.
    with pytest.raises(fl.FormulaError, match=r"attribute access '\.lib' is not allowed"):
        res.predict(nd, re_form=f"~ (1 + I(np.lib._npyio_impl.os.system('touch {target}'))|g)")
    assert not target.exists()


def test_cli_refuses_exploits(frame, tmp_path):
    csv = tmp_path / "d.csv"
    frame.to_csv(csv, index=False)
    target = tmp_path / "pwned"
    for formula, fragment in [exploits(str(target))[0], exploits(str(target))[1], exploits(str(target))[5],
                              exploits(str(target))[6]]:
        proc = run_cli("fit", str(csv), formula, cwd=tmp_path)
        assert_one_line_error(proc, "not allowed in formula term")
        assert not target.exists()
    ok = run_cli("fit", str(csv), "y ~ log(x) + I(z^2) + (1|g)", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert "A formula cannot run code" in run_cli("fit", "--help", cwd=tmp_path).stdout


def test_nothing_but_columns_and_the_dialect_is_in_scope(frame):
    """The caller's names (np, pd), this package's module globals and formulaic's own transforms
    (lag, hashed, cr) are not reachable: a bare name is a column, a call an R function."""
    for formula, error, match in [("y ~ x + np + (1|g)", fl.MissingColumnError, "'np'"),
                                  ("y ~ x + pd + (1|g)", fl.MissingColumnError, "'pd'"),
                                  ("y ~ x + I(np) + (1|g)", fl.MissingColumnError, "'np'"),
                                  ("y ~ lag(x) + (1|g)", fl.FormulaError, r"unknown function lag\(\)"),
                                  ("y ~ hashed(g) + (1|g)", fl.FormulaError, r"unknown function hashed\(\)"),
                                  ("y ~ cr(x, df = 3) + (1|g)", fl.FormulaError, r"unknown function cr\(\)")]:
        with pytest.raises(error, match=match):
            fl.lmer(formula, frame)


def test_allow_python_opts_into_python(frame, tmp_path):
    """allow_python=True: np.log(x) as before, Python-only syntax works, and (the point of the
    warning in its docstring) a formula can then run code."""
    a = fl.lmer("y ~ np.log(x) + (1|g)", frame)
    b = fl.lmer("y ~ np.log(x) + (1|g)", frame, allow_python=True)
    assert b.criterion == pytest.approx(a.criterion, rel=1e-12)
    s = build_structure("y ~ I(np.where(x > 1, x, 0.0)) + I(x if True else 0) + x.clip(1) + (1|g)", frame,
                        allow_python=True)
    x = frame["x"].to_numpy()
    np.testing.assert_array_equal(s.X[:, 1:], np.column_stack([np.where(x > 1, x, 0.0), x, np.clip(x, 1, None)]))
    res = fl.lmer("y ~ I(np.where(x > 1, x, 0.0)) + (1|g)", frame, allow_python=True)
    np.testing.assert_allclose(res.predict(frame.head(5)), res.fitted()[:5], rtol=1e-12)
    target = tmp_path / "ran"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fl.RankDeficiencyWarning)   # the term is x + 0
        fl.lmer(f"y ~ x + I(x + 0*np.lib._npyio_impl.os.system('touch {target}')) + (1|g)", frame,
                allow_python=True)
    assert target.exists()


# ----------------------------------------------------------------------------- property test

_LEAVES = st.sampled_from(["x", "z", "2", "0.5", "3"])
_UNARY = {"log": np.log, "exp": lambda v: np.exp(v / 4), "sqrt": np.sqrt, "abs": np.abs, "log1p": np.log1p,
          "np.log": np.log, "numpy.sqrt": np.sqrt}


@st.composite
def _expr(draw, depth=0):
    """A random allowed expression and its value computed by numpy directly."""
    if depth >= 3 or draw(st.integers(0, 3)) == 0:
        leaf = draw(_LEAVES)
        return leaf, (lambda d, leaf=leaf: d[leaf] if leaf in ("x", "z") else float(leaf))
    kind = draw(st.sampled_from(["bin", "un", "pow", "neg"]))
    a_txt, a = draw(_expr(depth + 1))
    if kind == "un":
        name = draw(st.sampled_from(sorted(_UNARY)))
        f = _UNARY[name]
        txt = f"{name}(abs({a_txt}) + 1)" if name in ("log", "sqrt", "np.log", "numpy.sqrt", "log1p") else \
            f"{name}({a_txt})"
        if name == "exp":
            txt = f"exp(({a_txt})/4)"
            return txt, (lambda d: np.exp(a(d) / 4))
        if name == "abs":
            return txt, (lambda d: np.abs(a(d)))
        return txt, (lambda d: f(np.abs(a(d)) + 1))
    if kind == "neg":
        return f"-({a_txt})", (lambda d: -a(d))
    if kind == "pow":
        p = draw(st.sampled_from(["2", "3"]))
        op = draw(st.sampled_from(["^", "**"]))
        return f"({a_txt}){op}{p}", (lambda d: a(d) ** float(p))
    b_txt, b = draw(_expr(depth + 1))
    op = draw(st.sampled_from(["+", "-", "*"]))
    fn = {"+": np.add, "-": np.subtract, "*": np.multiply}[op]
    return f"({a_txt}) {op} ({b_txt})", (lambda d: fn(a(d), b(d)))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(_expr())
def test_allowed_terms_compute_what_numpy_computes(frame, expr):
    """A random allowed term gives the column numpy computes, and the same fit as that column
    given as data (the interpreter changes nothing but who may run code)."""
    text, value = expr
    d = {"x": frame["x"].to_numpy(), "z": frame["z"].to_numpy()}
    want = np.broadcast_to(np.asarray(value(d), dtype=float), (len(frame),))
    # constant up to rounding (e.g. x - (x + 2)): the design drops it as aliased with the intercept
    if not np.isfinite(want).all() or np.ptp(want) <= 1e-12 * np.abs(want).max() or np.abs(want).max() > 1e8:
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = build_structure(f"y ~ I({text}) + (1|g)", frame)
        np.testing.assert_allclose(s.X[:, 1], want, rtol=1e-12, atol=1e-12 * np.abs(want).max())
        res = fl.lmer(f"y ~ I({text}) + (1|g)", frame)
        ref = fl.lmer("y ~ v + (1|g)", frame.assign(v=want))
    assert res.criterion == pytest.approx(ref.criterion, rel=1e-9, abs=1e-9)
    np.testing.assert_allclose(res.fixef.to_numpy(), ref.fixef.to_numpy(), rtol=1e-7, atol=1e-9)
