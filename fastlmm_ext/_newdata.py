"""The design on new rows, for ``predict(newdata)``: X_new, the offsets and, per kept
random-effects term, its model matrix and the rows' levels.

As lme4's ``mkNewReTrms`` reuses the term builder of the fit, new rows go through the fit's own
evaluation (``_design.evaluate_rows``) with the fit's formulaic specs, which carry the training
levels, the contrasts (polynomial ones for ordered factors) and the state of stateful transforms
(poly, ns, bs, scale):

1. the columns the kept parts of the formula read are typed as in the fit's frame: a factor of
   the fit becomes a Categorical over its training levels, matched by label ("1" matches 1, 1.0
   and "1"), and a level it did not see is an error; every other column is numeric, as it was;
2. the fixed part, the offsets and the kept terms are evaluated by ``evaluate_rows`` with those
   specs; rank-deficient columns dropped by the fit are dropped again;
3. each row's level of a grouping factor is found by its label (an interaction labelled as the
   fit labels it, ``_data.interaction_labels``); a level the fit did not see gets code −1.

Rows with a missing value in a variable the prediction uses are left out (they predict NaN,
lme4's ``na.pass``); ``re_form`` chooses the terms and columns (:func:`selected_columns`).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ._contrasts import default_contrasts
from ._data import _label, as_frame, check_columns, interaction_labels, row_labels
from ._design import ModelStructure, _variables, evaluate_rows
from ._exceptions import ArgumentError, DataError, FastLMMError, FormulaError
from ._formula import parse_formula
from ._rformula import model_matrix, parse_expr, r_column_names, translate

__all__ = ["NewRows", "new_rows", "selected_columns", "selected_terms", "format_levels"]

_NA_FORMS = {"~0", "~-1", "~1-1", "na", "~na", "nan"}


def _is_population_form(re_form) -> bool:
    """re_form values meaning "no random effects": lme4's ``NA`` / ``~0``."""
    if re_form is False:
        return True
    if isinstance(re_form, float) and math.isnan(re_form):
        return True
    if isinstance(re_form, str):
        return re.sub(r"\s+", "", re_form).lower() in _NA_FORMS
    return False


def selected_columns(structure: ModelStructure, re_form) -> dict[int, np.ndarray]:
    """The random-effects columns kept by ``re_form``: term index → bool mask over the term's
    columns (terms with no kept column are left out), as lme4's ``mkNewReTrms`` chooses them.

    None → every column of every term; ``"~0"`` / ``"NA"`` / ``False`` / NaN → none; a formula of
    random terms such as ``"~ (1 | Subject)"`` → for each of its terms ``(expr | g)``, the columns
    that ``expr``'s model matrix would have, among the model's terms on the grouping factor g
    (lme4 picks them from ``ranef(fit)[[g]]`` by name).  So ``~ (1 | Subject)`` of a
    ``(Days | Subject)`` fit keeps only b̂'s intercept column, ``~ (0 + Days | Subject)`` only the
    slope, ``~ (Days | Subject)`` of a ``(Days || Subject)`` fit both of its terms, and
    ``~ (1 | Worker)`` of ``(1 | Worker/Machine)`` the Worker term.  Several terms keep the union
    of their columns.  A grouping factor, or a column, the model does not have is an
    ArgumentError naming it (the formula is read as R's dialect, never run as Python)."""
    s = structure
    if re_form is None:
        return {i: np.ones(t.k, dtype=bool) for i, t in enumerate(s.terms)}
    if _is_population_form(re_form):
        return {}
    if not isinstance(re_form, str):
        raise ArgumentError(f"re_form must be None, '~0'/'NA'/False or a formula string, got {re_form!r}")
    text = re_form.strip()
    if not text.startswith("~"):
        text = "~ " + text
    try:
        parsed = parse_formula(".re_form_response " + text)
    except Exception as e:
        raise ArgumentError(f"cannot parse re_form {re_form!r}: {e}") from e
    terms_text = ", ".join(f"({t.expr} | {t.factor})" for t in s.terms)
    out: dict[int, np.ndarray] = {}
    for rt in parsed.random:
        label = rt.group_name()
        where = f"re_form term ({rt.expr} | {label})"
        cands = [i for i, t in enumerate(s.terms) if t.factor == label]
        if not cands:
            factors = ", ".join(repr(f) for f in s.factor_levels)
            raise ArgumentError(f"{where} is not a random-effects term of the model: {label!r} is not one of its "
                                f"grouping factors ({factors}); terms: {terms_text}")
        same = [i for i in cands if _squash(s.terms[i].expr) == _squash(rt.expr)]
        if same:      # the model's own term: all of its columns
            out.setdefault(same[0], np.zeros(s.terms[same[0]].k, dtype=bool))[:] = True
            continue
        for name in _re_form_column_names(s, rt.expr, where):
            hit = next(((i, j) for i in cands for j, c in enumerate(s.terms[i].cnms) if c == name), None)
            if hit is None:
                have = [c for i in cands for c in s.terms[i].cnms]
                raise ArgumentError(f"{where} is not a random-effects term of the model: its column {name!r} is not "
                                    f"among the random effects of {label!r} ({', '.join(map(repr, have))}); "
                                    f"terms: {terms_text}")
            out.setdefault(hit[0], np.zeros(s.terms[hit[0]].k, dtype=bool))[hit[1]] = True
    return dict(sorted(out.items()))


def selected_terms(structure: ModelStructure, re_form) -> list[int]:
    """Indices of the random-effects terms kept whole by ``re_form`` (:func:`selected_columns`),
    for uses that hold whole terms (``simulate``); a term kept only in part is an ArgumentError."""
    cols = selected_columns(structure, re_form)
    part = [structure.terms[i] for i, m in cols.items() if not m.all()]
    if part:
        which = ", ".join(f"({t.expr} | {t.factor})" for t in part)
        raise ArgumentError(f"re_form {re_form!r} keeps only some columns of the term(s) {which}; "
                            "here re_form must name whole terms")
    return list(cols)


def _squash(text: str) -> str:
    return re.sub(r"\s+", "", text)


def _re_form_column_names(s: ModelStructure, expr: str, where: str) -> list[str]:
    """R's names of the columns of a re_form term's model matrix: ``expr`` built on a few rows
    typed as the fit's frame (its factors with the training levels and orderedness, everything
    else numbers), so the names are those the term would have on the fit's data."""
    try:
        tr = translate(expr, [], s.allow_python, where)
        factors = {c: s.variable_levels[c] for c in tr.columns if c in s.variable_levels}
        m = max([10, *(len(cats) for cats, _ in factors.values())])
        frame = pd.DataFrame({c: pd.Categorical([factors[c][0][r % len(factors[c][0])] for r in range(m)],
                                                categories=factors[c][0], ordered=factors[c][1])
                              if c in factors else np.linspace(1.0, 2.0, m) for c in tr.columns},
                             index=range(m))
        mm = model_matrix(tr, frame, where, default_contrasts(frame, tr.variables), s.allow_python)
    except FormulaError:
        raise                       # a refused formula stays a FormulaError, naming its part
    except FastLMMError as e:
        raise ArgumentError(f"cannot build the columns of {where}: {e}") from e
    return r_column_names(mm.model_spec)


def format_levels(levels, limit: int = 5) -> str:
    """'a', 'b', 'c' (and 7 more): levels for an error message."""
    shown = ", ".join(repr(str(lv)) for lv in levels[:limit])
    return shown + (f" (and {len(levels) - limit} more)" if len(levels) > limit else "")


@dataclass
class NewRows:
    """The design on the usable rows of new data (``ok`` of the rows given; m = ok.sum())."""
    index: pd.Index          # newdata's index
    ok: np.ndarray           # bool[n]: no missing value in a used variable
    X: np.ndarray            # [m, p] the fit's fixed-effects columns
    offset: np.ndarray       # [m] the total offset (formula terms and the argument)
    terms: list              # per kept term: (term index, Xi [m, k], codes [m] into its levels, −1 if new)
    unseen: dict             # grouping factor → its levels the fit did not see


def new_rows(s: ModelStructure, newdata, keep: list[int], offset=None) -> NewRows:
    """The design of ``newdata`` for the terms ``keep`` (module docstring).  ``offset``: the
    fit's ``offset=`` argument for the new rows (an array or a column of ``newdata``), which must be
    given again when the fit had one, since it is not part of the formula."""
    nd = as_frame(newdata)
    n_all = len(nd)
    cols = list(nd.columns)
    parsed, py = s.parsed, s.allow_python
    fixed_vars = _variables(parsed.fixed, "the formula", cols, py)
    off_vars = {c for o in parsed.offsets for c in parse_expr(o, cols, py).columns}
    re_vars: set[str] = set()
    group_vars: list[str] = []
    for i in keep:
        t = s.terms[i]
        re_vars |= _variables(t.expr, "the formula", cols, py)
        group_vars.extend(g for g in t.group_columns if g not in group_vars)
    used = list(dict.fromkeys([*sorted(fixed_vars), *sorted(off_vars), *sorted(re_vars), *group_vars]))
    check_columns(nd, used)

    if offset is None and s.offset is not None and not parsed.offsets:
        raise DataError("the model was fitted with an offset= argument; pass offset= (an array or a "
                        "column of newdata) to predict on new data")
    off_arg = None
    if offset is not None:
        if isinstance(offset, str):
            check_columns(nd, [offset])
            off_arg = _numeric_column(nd[offset], offset)
        else:
            off_arg = np.asarray(offset, dtype=float).ravel()
            if off_arg.shape[0] != n_all:
                raise DataError(f"offset has length {off_arg.shape[0]} but newdata has {n_all} rows")

    ok = ~nd[used].isna().any(axis=1).to_numpy() if used else np.ones(n_all, bool)
    if off_arg is not None:
        ok &= ~np.isnan(off_arg)
    m = int(ok.sum())
    if m == 0:
        return NewRows(index=nd.index, ok=ok, X=np.zeros((0, s.p)), offset=np.zeros(0), terms=[], unseen={})
    sub = nd.loc[ok, used].reset_index(drop=True) if used else pd.DataFrame(index=range(m))
    if s.p and s.fixed_spec is None:
        raise DataError("this fit keeps no model spec of its fixed part, so it cannot predict on new data")
    frame = _typed_as_fitted(s, sub, fixed_vars | off_vars | re_vars)

    labels = {}

    def group_codes(group) -> np.ndarray:
        t = next(s.terms[i] for i in keep if tuple(s.terms[i].group_columns) == tuple(group))
        lab = np.asarray(interaction_labels([row_labels(sub[g]) for g in group]), dtype=object) \
            if len(group) > 1 else row_labels(sub[group[0]])
        pos = {lv: j for j, lv in enumerate(t.levels)}
        labels[tuple(group)] = lab
        return np.fromiter((pos.get(lv, -1) for lv in lab), dtype=np.int64, count=m)

    try:
        block = evaluate_rows(parsed, frame, group_codes, offset_arg=None if off_arg is None else off_arg[ok],
                              fixed_spec=s.fixed_spec, allow_python=py, response=False, finite=False,
                              random=[(s.terms[i].expr, s.terms[i].group_columns, s.terms[i].spec) for i in keep])
    except FormulaError as e:
        raise DataError(f"newdata: {e}") from e
    pos = {nm: j for j, nm in enumerate(block.fixef_names)}
    missing = [nm for nm in s.fixef_names if nm not in pos]
    if missing:
        raise DataError(f"fixed-effects columns {missing} could not be built from newdata (got {block.fixef_names})")
    X = block.X[:, [pos[nm] for nm in s.fixef_names]]
    terms, unseen = [], {}
    for i, cnms, Xi, codes in zip(keep, block.term_cnms, block.term_Xi, block.term_codes):
        t = s.terms[i]
        if tuple(cnms) != tuple(t.cnms):
            raise DataError(f"random-effects term ({t.expr} | {t.factor}) gives columns {list(cnms)} on newdata, "
                            f"the fit has {list(t.cnms)}")
        if (codes < 0).any():
            unseen.setdefault(t.factor, list(dict.fromkeys(labels[tuple(t.group_columns)][codes < 0])))
        terms.append((i, Xi, codes))
    return NewRows(index=nd.index, ok=ok, X=X, offset=np.zeros(m) if block.offset is None else block.offset,
                   terms=terms, unseen=unseen)


def _typed_as_fitted(s: ModelStructure, sub: pd.DataFrame, read: set[str]) -> pd.DataFrame:
    """The columns of ``sub`` that the model matrices read, typed as in the fit's frame: factors of
    the fit as Categoricals over their training levels (by label; a new level is an error),
    everything else as numbers."""
    factors, numeric = _spec_variables(s.fixed_spec)
    for c, (cats, ordered) in s.variable_levels.items():
        factors.setdefault(c, (list(cats), bool(ordered)))
    frame = {}
    for c in (c for c in sub.columns if c in read):
        col = sub[c]
        if c in factors and c not in numeric:   # (a column also used as a number, as in `x + C(x)`,
            cats, ordered = factors[c]          # stays a number: C() re-encodes it)
            frame[c], new = _training_categorical(col, cats, ordered)
            if new:
                raise DataError(f"factor {c!r} has new level(s) {format_levels(new)} not seen in the fitted "
                                f"data (levels: {format_levels([_label(x) for x in cats], 10)})")
        elif pd.api.types.is_numeric_dtype(col.dtype) and not pd.api.types.is_bool_dtype(col.dtype):
            frame[c] = col
        else:
            frame[c] = _numeric_column(col, c)
    return pd.DataFrame(frame, index=sub.index)


def _training_categorical(values: pd.Series, categories, ordered: bool) -> tuple[pd.Categorical, list[str]]:
    """``values`` as a Categorical with the training categories, matched by label; returns it
    and the labels that are not training levels (their codes are -1)."""
    labs = row_labels(values)
    pos = {_label(c): i for i, c in enumerate(categories)}
    codes = np.fromiter((pos.get(lv, -1) if lv is not None else -1 for lv in labs), dtype=np.int64, count=len(labs))
    unseen = sorted({lv for lv, c in zip(labs, codes) if c < 0 and lv is not None})
    return pd.Categorical.from_codes(codes, categories=list(categories), ordered=ordered), unseen


def _spec_variables(spec) -> tuple[dict, set]:
    """From the fixed part's formulaic ModelSpec: factor column → (training categories, contr.poly?)
    and the set of columns it treats as numeric (the spec's evaluated terms are not columns)."""
    factors, numeric = {}, set()
    if spec is None:
        return factors, numeric
    params = spec.materializer_params or {}
    exprs, contrasts = params.get("exprs", {}), params.get("contrasts", {})
    for key, val in (spec.encoder_state or {}).items():
        try:
            kind, st = val
        except (TypeError, ValueError):
            continue
        key = str(key)
        if key in exprs:
            continue
        kind = str(getattr(kind, "value", kind)).lower()
        if kind == "categorical" and isinstance(st, dict) and "categories" in st:
            rc = contrasts.get(key)
            factors[key] = (list(st["categories"]), getattr(rc, "kind", None) == "contr.poly")
        elif kind == "numerical":
            numeric.add(key)
    return factors, numeric


def _numeric_column(s: pd.Series, name: str) -> np.ndarray:
    try:
        return pd.to_numeric(s.astype(object) if isinstance(s.dtype, pd.CategoricalDtype) else s,
                             errors="raise").to_numpy(dtype=np.float64, na_value=np.nan)
    except (TypeError, ValueError) as e:
        raise DataError(f"column {name!r} of newdata must be numeric, as in the fitted data: {e}") from e
