"""lmerTest's ``ranova``: a likelihood-ratio test for each random-effects term.

Each term of lme4's ``findbars`` (``_formula.findbars``: ``(1|a/b)`` is ``(1 | b:a)`` and
``(1 | a)``) is reduced or removed and the model refitted by the fit's own criterion (a REML fit
is compared by REML, as lmerTest does):

* ``(1 | g)`` is removed;
* ``(f1 + f2 | g)`` gives one reduced model per term of its left side that no other term there
  contains (R's ``drop.scope``): that term dropped, the intercept kept as written, e.g.
  ``(1 + x | g)`` → ``(1 | g)``, the row ``x in (1 + x | g)``; a left side of that one term alone
  becomes ``(1 | g)`` (``(0 + x | g)`` → ``(1 | g)``);
* ``reduce_terms=False`` removes every term whole.

A reduced term's model matrix is its own columns of the remaining terms (and of the intercept).
A model with no random term left is the linear model: its (restricted) log-likelihood is the
criterion at θ = 0, where Λ = 0 and L_θ = I (lm's ``logLik(fit, REML = )``, npar = p + 1).

Table (lmerTest's): npar, logLik, AIC = −2 logLik + 2 npar, LRT = 2(logLik₀ − logLik),
Df = npar₀ − npar, Pr(>Chisq) = P(χ²_Df > LRT); the first row, ``<none>``, is the model itself.
``table.attrs["formulae"]`` holds the reduced models' formulas.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
from scipy import stats

from ._design import assemble_Z, order_terms
from ._exceptions import ArgumentError, FormulaError
from ._formula import RandomTerm, findbars
from ._hypotheses import spec_terms
from ._rformula import factor_label

__all__ = ["ranova_table"]

_COLUMNS = ["npar", "logLik", "AIC", "LRT", "Df", "Pr(>Chisq)"]


def _recoded(spec, labels) -> bool:
    """Whether a term among ``labels`` codes a factor by contrasts (R would give it full
    indicators once the left side has neither intercept nor the term that made it reduced)."""
    for es in spec.structure:
        label = ":".join(factor_label(spec, str(f)) for f in es.term.factors if str(f) != "1")
        if label in labels and any(sf.reduced for st in es.scoped_terms for sf in st.factors):
            return True
    return False


def _reductions(label: str, t, reduce_terms: bool) -> list[tuple[str, tuple | None]]:
    """The models of one random-effects term ``t`` (lme4's deparse ``label``): (row name, its
    replacement), the replacement None (the term removed) or (left side, model matrix, names)."""
    whole = [(f"({label})", None)]
    if not reduce_terms:
        return whole
    ft = spec_terms(t.spec, t.cnms)
    scope = ft.drop_scope()
    if not ft.terms or not scope:
        return whole
    icpt = [j for j, nm in enumerate(t.cnms) if nm == "(Intercept)"]
    out = []
    for s in scope:
        rest = [u for u in ft.terms if u.label != s]
        if not rest:
            new = ("1", np.ones((t.Xi.shape[0], 1)), ("(Intercept)",))
        else:
            if not icpt and _recoded(t.spec, {u.label for u in rest}):
                raise FormulaError(f"ranova cannot reduce the random-effects term ({label}) by {s}: without an "
                                   "intercept the remaining factors would be coded anew; write the term with an "
                                   "intercept, or fit the reduced model and compare with fastlmm_ext.anova")
            cols = icpt + [j for u in rest for j in u.columns]
            lhs = " + ".join(["1" if icpt else "0"] + [u.label for u in rest])
            new = (lhs, t.Xi[:, cols], tuple(t.cnms[j] for j in cols))
        out.append((f"{s} in ({label})", new))
    return out


def _formula(s, random) -> str:
    parts = [s.parsed.fixed, *(f"offset({o})" for o in s.parsed.offsets),
             *(f"({rt.expr} | {rt.group_name()})" for rt in random)]
    return f"{s.response} ~ " + " + ".join(parts)


def _reduced_fit(res, index: int, new) -> tuple[int, float, str]:
    """(npar, logLik, formula) of the model with its ``index``-th random-effects term (of the
    parsed formula) replaced by ``new`` (see :func:`_reductions`), refitted by the same criterion."""
    s = res.structure
    pool: dict = {}
    for t in s.terms:
        pool.setdefault((t.expr, tuple(t.group_columns)), []).append(t)
    random, cnms, levels, codes, Xis, specs = [], [], [], [], [], []
    for i, rt in enumerate(s.parsed.random):
        t = pool[(rt.expr, tuple(rt.group))].pop(0)
        if i == index and new is None:
            continue
        if i == index:
            lhs, Xi, cn = new
            rt, spec = RandomTerm(lhs, rt.group), None
        else:
            Xi, cn, spec = t.Xi, t.cnms, t.spec
        random.append(rt)
        cnms.append(list(cn))
        Xis.append(Xi)
        specs.append(spec)
        levels.append(list(t.levels))
        codes.append(t.codes)
    formula = _formula(s, random)
    if not random:
        return s.p + 1, -0.5 * res.model.objective(np.zeros(s.ntheta)), formula
    parsed = dataclasses.replace(s.parsed, random=tuple(random))
    terms = order_terms(parsed, cnms, levels, codes, Xis, specs)
    s2 = dataclasses.replace(s, formula=formula, parsed=parsed, terms=tuple(terms), Z=assemble_Z(terms, s.n),
                             factor_levels={t.factor: list(t.levels) for t in terms})
    fit = type(res.model)(formula, None, REML=res.REML, structure=s2).fit()
    return fit.npar, fit.loglik, formula


def ranova_table(res, reduce_terms: bool = True) -> pd.DataFrame:
    """lmerTest's ``ranova(fit, reduce.terms = )`` for an :class:`LmerResult` (module docstring)."""
    if not isinstance(reduce_terms, (bool, np.bool_)):
        raise ArgumentError(f"reduce_terms must be True or False, got {reduce_terms!r}")
    s = res.structure
    s.require_rows("ranova (it refits the model)")
    index: dict = {}
    for i, rt in enumerate(s.parsed.random):
        index.setdefault((rt.expr, tuple(rt.group)), []).append(i)
    terms = {(t.expr, tuple(t.group_columns)): t for t in s.terms}
    names, npar, loglik, formulae = ["<none>"], [res.npar], [res.loglik], {}
    for label, rt in findbars(s.formula):
        key = (rt.expr, tuple(rt.group))
        i = index[key].pop(0)
        for name, new in _reductions(label, terms[key], bool(reduce_terms)):
            k, ll, formulae[name] = _reduced_fit(res, i, new)
            names.append(name)
            npar.append(k)
            loglik.append(ll)
    npar_a, ll_a = np.array(npar, dtype=float), np.array(loglik)
    lrt = np.concatenate([[np.nan], 2.0 * (ll_a[0] - ll_a[1:])])
    df = np.concatenate([[np.nan], npar_a[0] - npar_a[1:]])
    with np.errstate(invalid="ignore"):
        pv = np.where(df > 0, stats.chi2.sf(lrt, np.where(df > 0, df, 1.0)), np.nan)
    out = pd.DataFrame({"npar": np.array(npar, dtype=int), "logLik": ll_a, "AIC": -2.0 * ll_a + 2.0 * npar_a,
                        "LRT": lrt, "Df": df, "Pr(>Chisq)": pv}, index=names, columns=_COLUMNS)
    out.attrs["formulae"] = formulae
    return out
