"""The hypotheses of the ANOVA table of the fixed effects: type III (SAS "type III estimable
functions", as lmerTest builds them), and type I (sequential) for a model with a single term.

In the over-parameterised model (an indicator for every level, and every combination of levels in
an interaction) with parameters γ, the treatment-coded coefficients are β_T = G γ with
G = X_T⁺ X_over.  The columns of Gᵀ (one per coefficient, as functions of γ) of every term are
made orthogonal, in γ-space, to those of the terms containing it (higher-order terms first;
"contains" = all its variables and more, with the same numeric covariates).  The rows of the
result at the coefficients' own γ coordinates give each term's hypothesis in treatment coding;
they are mapped to the model's own coding (e.g. polynomial contrasts) by X_T⁺ X.  These
hypotheses depend on the model's terms and codings only, so they are computed on a small
synthetic design (every cell, generic numeric values) rather than the data.  Models with a single
term use type I (sequential) hypotheses, as lmerTest does.

Type I hypotheses are the rows of the Doolittle factor of XᵀX (its Cholesky factor U scaled to a
unit diagonal) at each term's columns.
"""
from __future__ import annotations

import itertools
import math
import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.linalg as la

from ._rformula import factor_label, r_column_names

__all__ = ["anova_hypotheses"]


def _zapsmall(x: np.ndarray, digits: int = 7) -> np.ndarray:
    """Round to ``digits`` significant digits relative to the largest |entry| (R's zapsmall)."""
    x = np.asarray(x, dtype=float)
    if x.size == 0:
        return x
    mx = np.nanmax(np.abs(x))
    if not np.isfinite(mx) or mx <= 0:
        return x
    return np.round(x, max(0, digits - math.ceil(math.log10(mx))))


@dataclass
class _FixedTerm:
    label: str                 # R-style label ("recipe:temperature")
    factors: tuple[str, ...]   # formulaic factor expressions
    columns: list[int]         # columns of the fitted X
    full_columns: list[int]    # columns of formulaic's full model matrix


def _fixed_terms(structure) -> tuple[list[_FixedTerm], bool, list[int]]:
    """Terms of the fixed part (without the intercept), whether there is an intercept, and the
    columns of formulaic's full model matrix that the fit kept (rank-deficient ones dropped)."""
    spec = structure.fixed_spec
    if spec is None:
        raise NotImplementedError("the fixed-effects model spec is not available; cannot map columns to terms")
    full_names = r_column_names(spec)
    kept_names = list(structure.fixef_names)
    if len(full_names) == len(kept_names):
        kept = list(range(len(full_names)))
    else:
        pos = {nm: i for i, nm in enumerate(full_names)}
        if not all(nm in pos for nm in kept_names):
            raise NotImplementedError("cannot match the fitted columns to the model spec's columns")
        kept = [pos[nm] for nm in kept_names]
    where = {fc: j for j, fc in enumerate(kept)}
    terms, has_intercept = [], False
    for es in spec.structure:
        factors = tuple(str(f) for f in es.term.factors if str(f) != "1")
        idx = list(spec.term_indices[es.term])
        if not factors:
            has_intercept = has_intercept or any(i in where for i in idx)
            continue
        label = ":".join(factor_label(spec, f) for f in factors)
        terms.append(_FixedTerm(label, factors, [where[i] for i in idx if i in where], idx))
    return terms, has_intercept, kept


def _is_categorical(spec, expr: str) -> bool:
    st = spec.encoder_state.get(expr)
    return st is not None and getattr(st[0], "value", str(st[0])) == "categorical"


def _containment(spec, terms: list[_FixedTerm]) -> dict[str, list[str]]:
    """For each term, the terms containing it (SAS): all of its variables and more, and the same
    numeric covariates."""
    out = {}
    for t1 in terms:
        v1 = set(t1.factors)
        n1 = {f for f in v1 if not _is_categorical(spec, f)}
        out[t1.label] = []
        for t2 in terms:
            v2 = set(t2.factors)
            n2 = {f for f in v2 if not _is_categorical(spec, f)}
            if v1 <= v2 and len(v2 - v1) > 0 and n1 == n2:
                out[t1.label].append(t2.label)
    return out


def _type1_contrasts(XtX: np.ndarray, terms: list[_FixedTerm]) -> dict[str, np.ndarray]:
    """Sequential (type I) hypotheses: rows of the Cholesky factor U of XᵀX scaled to a unit
    diagonal (the Doolittle factor of XᵀX), taken at each term's columns."""
    p = XtX.shape[0]
    U = la.cholesky(XtX, lower=False) if p > 1 else np.ones((1, 1))
    Lt = U / np.diag(U)[:, None] if p > 1 else U
    Lt[np.abs(Lt) < 1e-6] = 0.0
    return {t.label: Lt[t.columns, :] for t in terms}


def _synthetic_design(structure, terms: list[_FixedTerm]):
    """A small data frame with every combination of the categorical variables' levels, each
    repeated with generic values of the numeric variables; returns formulaic's model matrix there
    and, per factor expression, its values (category index, or the numeric columns)."""
    spec = structure.fixed_spec
    data_vars = set(spec.variables_by_source.get("data", set()))
    fvars = {str(k): set(map(str, v)) for k, v in spec.factor_variables.items()}
    all_factors = sorted({f for t in terms for f in t.factors})
    cat_var: dict[str, str] = {}      # categorical factor expr -> its raw variable
    levels_of: dict[str, list] = {}   # raw variable -> levels
    for f in all_factors:
        if _is_categorical(spec, f):
            raw = fvars.get(f, set()) & data_vars
            if len(raw) != 1:
                raise NotImplementedError(f"type III hypotheses: cannot trace factor {f!r} to one data column")
            v = raw.pop()
            levs = list(spec.encoder_state[f][1]["categories"])
            if v in levels_of and levels_of[v] != levs:
                raise NotImplementedError(f"type III hypotheses: column {v!r} is coded in two ways")
            cat_var[f], levels_of[v] = v, levs
    num_factors = [f for f in all_factors if f not in cat_var]
    num_vars = sorted(data_vars - set(levels_of))
    for f in num_factors:
        if fvars.get(f, set()) & set(levels_of):
            raise NotImplementedError(f"type III hypotheses: numeric factor {f!r} uses a categorical column")
    cat_vars = sorted(levels_of)
    cells = list(itertools.product(*[range(len(levels_of[v])) for v in cat_vars])) or [()]
    reps = 1 if not num_vars else len(terms) + 3
    n_over = 1 + sum(math.prod(len(levels_of[cat_var[f]]) if f in cat_var else 1 for f in t.factors) for t in terms)
    if len(cells) * reps * n_over > 50_000_000:
        raise NotImplementedError(f"type III hypotheses: the complete design ({len(cells)} cells x {n_over} "
                                  "over-parameterised columns) is too large")
    rng = np.random.default_rng(20240613)
    idx = np.array([c for _ in range(reps) for c in cells], dtype=np.int64).reshape(len(cells) * reps, len(cat_vars))
    n = idx.shape[0]
    frame = {}
    for k, v in enumerate(cat_vars):
        frame[v] = pd.Categorical.from_codes(idx[:, k], categories=pd.Index(levels_of[v], dtype=object))
    for v in num_vars:
        frame[v] = rng.uniform(0.5, 1.5, size=n)
    syn = pd.DataFrame(frame)
    Xfull = np.asarray(spec.get_model_matrix(syn).to_numpy(dtype=float), dtype=float)
    values: dict[str, np.ndarray] = {}
    for f in all_factors:
        if f in cat_var:
            values[f] = idx[:, cat_vars.index(cat_var[f])]
        else:
            sub = spec.update(formula="0 + " + (f if f.isidentifier() else f"`{f}`"), structure=None)
            values[f] = np.asarray(sub.get_model_matrix(syn).to_numpy(dtype=float)).reshape(n, -1)
    return Xfull, values, {f: len(levels_of[v]) for f, v in cat_var.items()}


def _product_columns(parts: list[np.ndarray]) -> np.ndarray:
    """Row-wise products of every combination of columns of the parts (first part varying fastest)."""
    out = np.ones((parts[0].shape[0], 1))
    for P in parts:
        out = np.einsum("ni,nj->nji", out, P).reshape(out.shape[0], -1)
    return out


def _type3_contrasts(structure, terms: list[_FixedTerm], has_intercept: bool, kept: list[int]) -> dict[str, np.ndarray]:
    """Type III hypotheses for every term (see the module docstring), in the fit's coding."""
    spec = structure.fixed_spec
    Xfull, values, nlev = _synthetic_design(structure, terms)
    n = Xfull.shape[0]
    Xorig = Xfull[:, kept]

    def indicators(f, reduced):
        M = np.zeros((n, nlev[f]))
        M[np.arange(n), values[f]] = 1.0
        return M[:, 1:] if reduced else M

    # Treatment-coded X with the same scoped terms (reduced or full coding per factor) and the
    # over-parameterised X: every term, every level (combination).
    XT_blocks, XT_term, rd_blocks, rd_term = [], [], [], []
    if has_intercept:
        rd_blocks.append(np.ones((n, 1)))
        rd_term.append("(Intercept)")
    for es in spec.structure:
        factors = tuple(str(f) for f in es.term.factors if str(f) != "1")
        label = ":".join(factor_label(spec, f) for f in factors) if factors else "(Intercept)"
        for st in es.scoped_terms:
            parts = [indicators(str(sf.factor), sf.reduced) if str(sf.factor) in nlev else values[str(sf.factor)]
                     for sf in st.factors]
            B = _product_columns(parts) if parts else np.ones((n, 1))
            XT_blocks.append(B)
            XT_term += [label] * B.shape[1]
        if factors:
            B = _product_columns([indicators(f, False) if f in nlev else values[f] for f in factors])
            rd_blocks.append(B)
            rd_term += [label] * B.shape[1]
    XT_full = np.hstack(XT_blocks)
    if XT_full.shape[1] != Xfull.shape[1]:
        raise NotImplementedError("type III hypotheses: could not rebuild the treatment-coded design")
    XT = XT_full[:, kept]
    XT_term = [XT_term[i] for i in kept]
    rdX = np.hstack(rd_blocks)
    p = XT.shape[1]
    if np.linalg.matrix_rank(XT) < p or np.linalg.matrix_rank(Xorig) < p:
        raise NotImplementedError("type III hypotheses: the synthetic design is rank deficient")
    G, *_ = np.linalg.lstsq(XT, rdX, rcond=None)            # rdX = XT G
    if np.abs(XT @ G - rdX).max() > 1e-8 * max(1.0, np.abs(rdX).max()):
        warnings.warn("type III hypotheses: some coefficients were dropped as aliased, so the hypotheses "
                      "are those of the remaining coefficients on a complete design; interpret with care",
                      RuntimeWarning, stacklevel=3)
    L = _zapsmall(G.T)                                       # rows: γ coordinates, columns: coefficients
    # γ coordinate of each treatment-coded coefficient (the over-parameterised column equal to it)
    row_of = []
    for j in range(p):
        cand = [r for r in range(rdX.shape[1]) if rd_term[r] == XT_term[j] and np.allclose(rdX[:, r], XT[:, j])]
        if not cand:
            raise NotImplementedError("type III hypotheses: a treatment-coded column has no over-parameterised match")
        row_of.append(cand[0])
    cols = {t.label: [j for j in range(p) if XT_term[j] == t.label] for t in terms}
    contains = _containment(spec, terms)
    order = sorted(range(len(terms)), key=lambda i: -len(terms[i].factors))   # stable
    for i in order:
        t = terms[i]
        if contains[t.label] and cols[t.label]:
            C = [j for c in contains[t.label] for j in cols[c]]
            if not C:
                continue
            Y = L[:, cols[t.label]]
            B, *_ = np.linalg.lstsq(L[:, C], Y, rcond=None)
            L[:, cols[t.label]] = _zapsmall(Y - L[:, C] @ B)
    Lp = L[row_of, :]
    Tmap = _zapsmall(np.linalg.lstsq(XT, Xorig, rcond=None)[0])   # β_T = Tmap β
    out = {}
    for t in terms:
        Lt = Lp[:, cols[t.label]].T
        Lt = Lt[np.abs(Lt).sum(axis=1) > 1e-8]
        out[t.label] = Lt @ Tmap
    return out


def anova_hypotheses(structure, XtX: np.ndarray) -> dict[str, np.ndarray]:
    """The contrast matrix of every fixed-effect term of lmerTest's ``anova(fit)``: type III, or
    type I (sequential) when the model has a single term; each rows × p in the fit's coefficient
    order.  ``XtX``: XᵀX of the fitted columns (type I's Doolittle factor)."""
    terms, has_intercept, kept = _fixed_terms(structure)
    if structure.p <= 1 or len(terms) <= 1:
        return _type1_contrasts(XtX, terms) if structure.p >= 1 else {}
    return _type3_contrasts(structure, terms, has_intercept, kept)
