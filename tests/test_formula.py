"""Tests of the lme4 formula parser (fastlmm_ext._formula)."""
from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastlmm_ext._exceptions import FormulaError
from fastlmm_ext._formula import ParsedFormula, RandomTerm, parse_formula, split_terms


def R(expr: str, *group: str) -> RandomTerm:
    return RandomTerm(expr, tuple(group))


# ----------------------------------------------------------------------------- data classes

def test_dataclasses_are_frozen_and_named():
    rt = R("1", "a", "b")
    assert rt.group_name() == "a:b"
    assert rt.group_label == "a:b"
    with pytest.raises(dataclasses.FrozenInstanceError):
        rt.expr = "x"  # type: ignore[misc]
    pf = parse_formula("y ~ (1|g)")
    assert isinstance(pf, ParsedFormula)
    with pytest.raises(dataclasses.FrozenInstanceError):
        pf.fixed = "x"  # type: ignore[misc]
    assert issubclass(FormulaError, ValueError)


# ----------------------------------------------------------------------------- valid formulas

@pytest.mark.parametrize("formula, response, fixed, random", [
    ("Reaction ~ Days + (Days|Subject)", "Reaction", "Days", [R("Days", "Subject")]),
    ("Reaction ~ Days + (1 + Days | Subject)", "Reaction", "Days", [R("1 + Days", "Subject")]),
    ("y ~ 1 + (1|g1) + (1|g2)", "y", "1", [R("1", "g1"), R("1", "g2")]),
    ("y ~ x + (1 + x + z | g)", "y", "x", [R("1 + x + z", "g")]),
    ("y ~ x + (0 + x | g)", "y", "x", [R("0 + x", "g")]),
    ("y ~ x + (x - 1 | g)", "y", "x", [R("0 + x", "g")]),
    ("y ~ x + (-1 + x | g)", "y", "x", [R("0 + x", "g")]),
    ("y ~ x + (x + 0 | g)", "y", "x", [R("0 + x", "g")]),
    ("y ~ x + (1+x|g)", "y", "x", [R("1 + x", "g")]),
    ("y ~ (1|a:b)", "y", "1", [R("1", "a", "b")]),
    ("y ~ (1|a/b)", "y", "1", [R("1", "a"), R("1", "b", "a")]),
    ("y ~ (1|a/b/c)", "y", "1", [R("1", "a"), R("1", "b", "a"), R("1", "c", "b", "a")]),
    ("y ~ (1|a:b/c)", "y", "1", [R("1", "a", "b"), R("1", "c", "a", "b")]),
    ("y ~ (x|a/b)", "y", "1", [R("x", "a"), R("x", "b", "a")]),
    ("y ~ (1|(g))", "y", "1", [R("1", "g")]),
    ("y ~ (1|((a):b))", "y", "1", [R("1", "a", "b")]),
    ("y ~ 1 + service + (1|s) + (1|d) + (1|dept:service)", "y", "1 + service",
     [R("1", "s"), R("1", "d"), R("1", "dept", "service")]),
    ("angle ~ recipe * temperature + (1|recipe:replicate)", "angle", "recipe * temperature",
     [R("1", "recipe", "replicate")]),
    ("np.log(y) ~ I(x**2) + (1|g)", "np.log(y)", "I(x**2)", [R("1", "g")]),
    ("y ~ x:z + I(x^2) + (x:z + np.log(w) | g)", "y", "x:z + I(x^2)", [R("x:z + np.log(w)", "g")]),
    ("y ~ (1|g) + x", "y", "x", [R("1", "g")]),
    ("y ~ (1|g) + (1|g)", "y", "1", [R("1", "g"), R("1", "g")]),  # duplicates kept, as lme4 does
    ("y ~ ((1|g))", "y", "1", [R("1", "g")]),
    ("y.1 ~ .x + (1|.g_2)", "y.1", ".x", [R("1", ".g_2")]),
])
def test_valid(formula, response, fixed, random):
    pf = parse_formula(formula)
    assert pf == ParsedFormula(response, fixed, tuple(random), ())


@pytest.mark.parametrize("formula, fixed", [
    ("y ~ (1|g)", "1"),
    ("y ~ 0 + x + (1|g)", "0 + x"),
    ("y ~ x + 0 + (1|g)", "x + 0"),
    ("y ~ x - 1 + (1|g)", "x - 1"),
    ("y ~ -1 + x + (1|g)", "-1 + x"),
    ("y ~ (1|g) - 1", "-1"),          # the user's removal is kept as "-1"
    ("y ~ 0 + (1|g)", "0"),
    ("y ~ +0 + (1|g)", "0"),          # leading unary '+' dropped
    ("y ~ (a + b):c + (1|g)", "(a + b):c"),
    ("y ~ I((x+1)**2) + (1|g)", "I((x+1)**2)"),
    ("y ~ a*b - a:b + (1|g)", "a*b - a:b"),
    ("y ~ x^-1 + (1|g)", "x^-1"),     # a sign after an operator is not a term separator
    ("y ~ I(a | b) + (1|g)", "I(a | b)"),  # a bar inside a call is fixed-effects syntax
    ("y ~ C(f, levels=['a|b', 'c']) + (1|g)", "C(f, levels=['a|b', 'c'])"),
])
def test_fixed_part(formula, fixed):
    assert parse_formula(formula).fixed == fixed


def test_tilde_inside_call_is_not_top_level():
    pf = parse_formula("y ~ f(a ~ b) + (1|g)")
    assert pf.fixed == "f(a ~ b)"


def test_whitespace_and_newlines():
    pf = parse_formula("  Reaction   ~\n   Days +\n\t( 1 +   Days |   Subject )  \n")
    assert pf == ParsedFormula("Reaction", "Days", (R("1 + Days", "Subject"),), ())
    assert parse_formula("y~x+(1+x|g)") == parse_formula("y ~ x + (1 + x | g)")
    # whitespace inside quoted strings is left alone
    assert parse_formula("y ~ C(f, ref='a  b') + (1|g)").fixed == "C(f, ref='a  b')"


def test_backticks():
    pf = parse_formula("`my y` ~ `my x` + (1 + `my x` | `my group`)")
    assert pf.response == "`my y`"
    assert pf.fixed == "`my x`"
    assert pf.random == (R("1 + `my x`", "my group"),)
    pf = parse_formula("y ~ (1 | `a b`:`c|d`/e)")
    assert pf.random == (R("1", "a b", "c|d"), R("1", "e", "a b", "c|d"))


def test_offsets():
    pf = parse_formula("y ~ x + offset(log(t)) + (1|g)")
    assert pf.fixed == "x" and pf.offsets == ("log(t)",)
    pf = parse_formula("y ~ offset( log( t ) ) + offset(w) + (1|g)")
    assert pf.fixed == "1" and pf.offsets == ("log( t )", "w")
    # offset() inside another term is left to formulaic
    assert parse_formula("y ~ offset(a):b + (1|g)").fixed == "offset(a):b"


# ----------------------------------------------------------------------------- double bar

@pytest.mark.parametrize("formula, random", [
    ("y ~ (x || g)", [R("1", "g"), R("0 + x", "g")]),
    ("y ~ (1 + x + z || g)", [R("1", "g"), R("0 + x", "g"), R("0 + z", "g")]),
    ("y ~ (0 + x + z || g)", [R("0 + x", "g"), R("0 + z", "g")]),
    ("y ~ (x + z - 1 || g)", [R("0 + x", "g"), R("0 + z", "g")]),
    ("y ~ (1 || g)", [R("1", "g")]),
    ("y ~ (x || a/b)", [R("1", "a"), R("0 + x", "a"), R("1", "b", "a"), R("0 + x", "b", "a")]),
    ("y ~ (x || a:b)", [R("1", "a", "b"), R("0 + x", "a", "b")]),
    # elements are expanded and ordered like R's terms(): main effects, then interactions
    ("y ~ (a*b || g)", [R("1", "g"), R("0 + a", "g"), R("0 + b", "g"), R("0 + a:b", "g")]),
    ("y ~ (a:b + c || g)", [R("1", "g"), R("0 + c", "g"), R("0 + a:b", "g")]),
    ("y ~ (0 + a*b - a:b || g)", [R("0 + a", "g"), R("0 + b", "g")]),
    ("y ~ (`x 1`*f || g)", [R("1", "g"), R("0 + `x 1`", "g"), R("0 + f", "g"), R("0 + `x 1`:f", "g")]),
    ("y ~ (I(x^2) + np.log(z) || g)", [R("1", "g"), R("0 + I(x^2)", "g"), R("0 + np.log(z)", "g")]),
])
def test_double_bar(formula, random):
    pf = parse_formula(formula)
    assert pf.random == tuple(random)
    assert pf.fixed == "1"


def test_mixed_terms_keep_formula_order():
    pf = parse_formula("y ~ x + (1|a) + z + (x||b/c) + (0 + z|d)")
    assert pf.fixed == "x + z"
    assert pf.random == (R("1", "a"), R("1", "b"), R("0 + x", "b"), R("1", "c", "b"),
                         R("0 + x", "c", "b"), R("0 + z", "d"))


# ----------------------------------------------------------------------------- split_terms

@pytest.mark.parametrize("rhs, terms", [
    ("1 + x", ["1", "x"]),
    ("x - 1 + z", ["x - 1", "z"]),
    ("  a  +(1 + x | g)+ f(a + b, [c + d], 'e + f')", ["a", "(1 + x | g)", "f(a + b, [c + d], 'e + f')"]),
    ("`a + b` + c", ["`a + b`", "c"]),
    ("+ x", ["x"]),
    ("   ", []),
])
def test_split_terms(rhs, terms):
    assert split_terms(rhs) == terms


def test_split_terms_errors():
    with pytest.raises(FormulaError, match=r"empty term in 'x \+ \+ z'"):
        split_terms("x + + z")
    with pytest.raises(FormulaError, match=r"unclosed '\('"):
        split_terms("(x + z")


# ----------------------------------------------------------------------------- errors

@pytest.mark.parametrize("formula, message", [
    ("", r"formula is empty"),
    ("   \n ", r"formula is empty"),
    ("y + (1|g)", r"formula 'y \+ \(1\|g\)' has no '~'"),
    ("y ~ x ~ (1|g)", r"more than one top-level '~'"),
    ("~ x + (1|g)", r"formula needs a response: 'y ~ \.\.\.'"),
    ("  ~ (1|g)", r"formula needs a response"),
    ("y ~ ", r"nothing right of '~'"),
    ("y ~ x", r"no random-effects terms.*'y ~ x'"),
    ("y ~ (a + b):c", r"no random-effects terms"),
    ("y ~ I(a | b)", r"no random-effects terms"),
    ("y ~ x + 1 | g", r"'\|' outside parentheses in 'x \+ 1 \| g'"),
    ("y ~ x || g", r"'\|' outside parentheses"),
    ("y ~ x:(1|g)", r"random-effects term inside 'x:\(1\|g\)'.*top-level"),
    ("y ~ (1|g):x", r"random-effects term inside '\(1\|g\):x'"),
    ("y ~ x + (a + (1|g))", r"random-effects term inside '\(a \+ \(1\|g\)\)'"),
    ("y ~ -(1|g)", r"random-effects term '\(1\|g\)' cannot be subtracted"),
    ("y ~ x - (1|g)", r"cannot be subtracted"),
    ("y ~ ( | g)", r"'\( \| g\)' has nothing left of the bar"),
    ("y ~ (1 | )", r"'\(1 \| \)' has no grouping factor"),
    ("y ~ (1 || )", r"has no grouping factor"),
    ("y ~ (1 | g | h)", r"more than one '\|' in random-effects term '\(1 \| g \| h\)'"),
    ("y ~ (1 ||| g)", r"more than one '\|'"),
    ("y ~ (1 | g + h)", r"invalid grouping factor 'g \+ h' in '\(1 \| g \+ h\)'"),
    ("y ~ (1 | g*h)", r"invalid grouping factor 'g\*h'"),
    ("y ~ (1 | factor(g))", r"invalid grouping factor 'factor\(g\)'"),
    ("y ~ (1 | 3)", r"invalid grouping factor '3'"),
    ("y ~ (1 | a/)", r"invalid grouping factor 'a/'"),
    ("y ~ (1 | a::b)", r"invalid grouping factor 'a::b'"),
    ("y ~ (0 | g)", r"'\(0 \| g\)' has no effects"),
    ("y ~ (-1 || g)", r"has no effects"),
    ("y ~ (1|g", r"unclosed '\(' in formula '\(1\|g'"),
    ("y ~ x) + (1|g)", r"unmatched '\)' in formula 'y ~ x\)'"),
    ("y ~ x[1 + (1|g)", r"unclosed '\['"),
    ("y ~ (x] + (1|g)", r"unmatched '\]'"),
    ("y ~ x + 'abc + (1|g)", r"unterminated ' in formula"),
    ("y ~ `x + (1|g)", r"unterminated ` in formula"),
    ("y ~ x + + (1|g)", r"empty term in 'x \+ \+ \(1\|g\)'"),
    ("y ~ x + (1|g) +", r"empty term"),
    ("y ~ (x + | g)", r"empty term in 'x \+'"),
    ("y ~ -offset(t) + (1|g)", r"invalid offset term '-offset\(t\)'"),
    ("y ~ offset( ) + (1|g)", r"invalid offset term 'offset\( \)'"),
    ("y ~ (x:(1|h) | g)", r"random-effects term nested inside '\(x:\(1\|h\) \| g\)'"),
])
def test_errors(formula, message):
    with pytest.raises(FormulaError, match=message):
        parse_formula(formula)


@pytest.mark.parametrize("bad", [None, 3, b"y ~ (1|g)", ["y ~ (1|g)"]])
def test_non_string(bad):
    with pytest.raises(FormulaError, match="formula must be a string"):
        parse_formula(bad)


def test_errors_are_value_errors():
    with pytest.raises(ValueError):
        parse_formula("y ~ x")


# ----------------------------------------------------------------------------- property test

_NAMES = ["x", "z", "Days", "w.2", "`my x`"]
_GROUPS = ["g", "Subject", "a_b", "h.1", "`my group`"]
_FIXED = ["a", "b:c", "I(x**2)", "np.log(v)", "f*h"]
_SPACE = st.sampled_from(["", " ", "  ", "\n  "])


@st.composite
def _bar_term(draw):
    """A random (expr | grouping) term plus the RandomTerms it should parse to."""
    covs = draw(st.lists(st.sampled_from(_NAMES), unique=True, max_size=3))
    icpt = draw(st.sampled_from(["implicit", "explicit", "zero", "minus"] if covs else ["explicit"]))
    double = draw(st.booleans())
    segments = draw(st.lists(st.lists(st.sampled_from(_GROUPS), min_size=1, max_size=2),
                             min_size=1, max_size=3))
    sp = lambda: draw(_SPACE)  # noqa: E731
    plus = lambda: sp() + "+" + sp()  # noqa: E731
    body = plus().join(covs)
    text = {"implicit": body, "explicit": plus().join(["1", *covs]),
            "zero": plus().join(["0", *covs]), "minus": body + sp() + "-" + sp() + "1"}[icpt]
    grouping = "/".join(":".join(seg) for seg in segments)
    term = f"({sp()}{text}{sp()}{'||' if double else '|'}{sp()}{grouping}{sp()})"

    # nesting names the inner factor first (lme4: a/b -> a, b:a)
    names: list[str] = []
    groups = []
    for seg in segments:
        names = [n.strip("`") for n in seg] + names
        groups.append(tuple(names))
    if double:
        exprs = ([] if icpt in ("zero", "minus") else ["1"]) + [f"0 + {c}" for c in covs]
    else:
        exprs = [{"implicit": " + ".join(covs), "explicit": " + ".join(["1", *covs]),
                  "zero": " + ".join(["0", *covs]), "minus": " + ".join(["0", *covs])}[icpt]]
    return term, [RandomTerm(e, g) for g in groups for e in exprs]


@st.composite
def _formula(draw):
    bars = draw(st.lists(_bar_term(), min_size=1, max_size=4))
    fixed = draw(st.lists(st.sampled_from(_FIXED), max_size=3))
    fixed = [draw(st.sampled_from(["0", "1"]))] * draw(st.booleans()) + fixed
    minus = draw(st.booleans())
    # interleave fixed and bar terms, keeping each kind in order
    kinds = draw(st.permutations(["f"] * len(fixed) + ["r"] * len(bars)))
    fi, ri = iter(fixed), iter(bars)
    parts = [next(fi) if k == "f" else next(ri)[0] for k in kinds]
    rhs = (draw(_SPACE) + "+" + draw(_SPACE)).join(parts) + (" - 1" if minus else "")
    expected_fixed = " + ".join(fixed) + (" - 1" if minus else "")
    if not fixed:
        expected_fixed = "-1" if minus else "1"
    random = [rt for _, rts in bars for rt in rts]
    return f"y{draw(_SPACE)}~{draw(_SPACE)}{rhs}", expected_fixed, random


@settings(max_examples=300, deadline=None)
@given(_formula())
def test_random_formulas(case):
    formula, fixed, random = case
    pf = parse_formula(formula)
    assert pf.response == "y"
    assert pf.fixed == fixed
    assert pf.random == tuple(random)
    assert pf.offsets == ()
    # the parse is a fixed point: writing the expanded terms back gives the same result
    quote = lambda n: n if n.replace(".", "_").isidentifier() else f"`{n}`"  # noqa: E731
    again = f"{pf.response} ~ {pf.fixed} + " + " + ".join(
        f"({rt.expr} | {':'.join(map(quote, rt.group))})" for rt in pf.random)
    assert parse_formula(again) == pf
