"""The hypotheses of lmerTest's ANOVA tables and of its ``drop1``: for every fixed-effect term a
contrast matrix L (rows × p, in the fit's coefficients) whose F test of L β = 0 is the term's row.

Notation: X is the fitted design (n × p, aliased columns dropped), G = XᵀX (unweighted, as
lmerTest), t a term in R's term order, cols(t) its columns of X and C(t) the terms containing t.

* **Containment** (SAS's, lmerTest's ``containment``): F2 contains F1 when F2 has every variable of
  F1 and more, and the same covariates.  A covariate is what R's ``dataClasses`` calls "numeric", a
  plain number column; factors, logicals and matrix-valued terms (poly, ns, bs, scale) are not.
* **Type I** (sequential): the Doolittle factorisation G = Λ D Λᵀ, Λ unit lower triangular; the
  hypothesis of t is the rows cols(t) of Λᵀ = diag(R)⁻¹R (R the Cholesky factor of G).
* **Type II**: for t contained in other terms, the type I hypothesis of t with X's columns
  reordered as [other terms, t, C(t)] (t adjusted for every term but those containing it); for t
  contained in none, the identity rows cols(t) (the marginal hypothesis).
* **Type III** (SAS's type III estimable functions, lmerTest's ``get_contrasts_type3``): X_T is the
  design coded with treatment contrasts (aliased columns dropped as lme4 drops them) and D the
  complete, over-parameterised design: for every term the indicator of each cell of its factors
  (times its covariates), all cells kept, an empty one as a column of zeros.  Γ = X_T⁺ D expresses
  every cell parameter through the treatment coefficients; in Λ = Γᵀ (rows: cells) the columns of
  each term are replaced by their residual on the columns of the terms containing it
  (higher-order terms first).  The rows of Λ at X_T's own cells, columns cols(t), are t's
  hypothesis in treatment coding; X_T⁺X maps it to the fit's coding.  The hypotheses are
  estimable when cells are empty, and they do not depend on the contrasts of the fit.
* A model with a single term gets its type I hypotheses for every type, as lmerTest's.
* **drop1**: R's ``drop.scope`` (the terms whose variables are in no other term), each with the
  marginal hypothesis (a single term: type I); when X is rank deficient, the directions of span(X)
  that the design X₀ without t lacks: with R = X − P_{X₀}X, L = orth(XᵀR)ᵀ (lmerTest's
  ``get_Ldiffmat2``), none when X₀ spans X.

**Rows.**  X_T, D and X₀ are the data's, but they are needed only through linear relations
between design columns and through G.  The structure keeps the fixed part's data columns at a few
rows S on which X has its full rank (``_design.basis_rows``): every column of X_T, D or X₀ lies in
span(X) (R's codings), so on the data it is X·A for a unique A, and X_S A = (its value on S)
identifies A.  Hence X_T⁺D = A_T⁻¹A_D and X_T⁺X = A_T⁻¹ are computed on S exactly, and the
quantities that need all rows (which treatment columns lme4's rule drops, XᵀR) come from G
through its Cholesky factor R_G (X = Q R_G, Q orthonormal): X_T = Q (R_G A_T) has the column
relations of R_G A_T, and XᵀR = R_Gᵀ E with E the residual of R_G on span(R_G A₀).

lmerTest rounds its intermediate matrices to 7 significant digits (R's ``zapsmall``) and sets
entries of Λ below 10⁻⁶ to zero; both are mirrored (the latter on Λ scaled by the columns'
norms, so that it does not depend on the covariates' units).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.linalg as la
from formulaic import SimpleFormula

from ._design import independent_columns
from ._exceptions import ArgumentError, DataError, FormulaError
from ._rformula import factor_label, r_column_names

__all__ = ["FixedTerm", "FixedTerms", "spec_terms", "fixed_terms", "fixed_gram", "anova_hypotheses", "drop1_hypotheses",
           "check_anova_type"]

# R's functions whose value is a matrix: a term of them is not a covariate in lmerTest's containment
_MATRIX_FUNCTIONS = frozenset({"poly", "ns", "bs", "scale"})
_TYPES = {"1": 1, "2": 2, "3": 3, "I": 1, "II": 2, "III": 3}
DOOLITTLE_EPS = 1e-6        # lmerTest's doolittle(): |Λ| below this is 0
NONZERO_ROW = 1e-8          # lmerTest keeps the rows of a type III matrix with Σ|l| above this
RANK_TOL = 1e-7             # lme4's (and lmerTest's) tolerance of the rank decisions


def _zapsmall(x: np.ndarray, digits: int = 7) -> np.ndarray:
    """Round to ``digits`` significant digits relative to the largest |entry| (R's zapsmall)."""
    x = np.asarray(x, dtype=float)
    if x.size == 0:
        return x
    mx = np.nanmax(np.abs(x))
    if not np.isfinite(mx) or mx <= 0:
        return x
    return np.round(x, max(0, digits - math.ceil(math.log10(mx))))


def check_anova_type(type) -> int:
    """lmerTest's ``type``: 1, 2, 3 or "I", "II", "III" (also "1", "2", "3") → 1, 2 or 3."""
    ok = isinstance(type, (str, int, np.integer)) and not isinstance(type, bool)
    key = str(type).strip().upper() if ok else None
    if key not in _TYPES:
        hint = "; the denominator df method is the argument ddf=" if isinstance(type, str) else ""
        raise ArgumentError(f"type must be 1, 2 or 3 (or 'I', 'II', 'III'), got {type!r}{hint}")
    return _TYPES[key]


# ----------------------------------------------------------------------------- the terms

@dataclass(frozen=True)
class FixedTerm:
    """One term of the fixed part: R's label ("recipe:temperature"), its variables (formulaic's
    factor expressions), those that are covariates, and its columns of the fitted X."""
    label: str
    factors: tuple[str, ...]
    numeric: frozenset[str]
    columns: tuple[int, ...]


@dataclass(frozen=True)
class FixedTerms:
    """The terms of a model matrix (the fixed part's, or a random-effects term's) in R's order,
    whether it has an intercept, the columns of the full model matrix the fit kept, and p."""
    terms: tuple[FixedTerm, ...]
    intercept: bool
    kept: tuple[int, ...]
    p: int

    def containment(self) -> dict[str, list[str]]:
        """For each term, the terms containing it (module docstring), in term order."""
        return {t1.label: [t2.label for t2 in self.terms if set(t1.factors) < set(t2.factors)
                           and t1.numeric == t2.numeric] for t1 in self.terms}

    def drop_scope(self) -> list[str]:
        """R's ``drop.scope``: the terms whose variables are not all in another term."""
        return [t.label for t in self.terms
                if not any(u is not t and set(t.factors) <= set(u.factors) for u in self.terms)]

    def columns_of(self, labels) -> list[int]:
        by = {t.label: t.columns for t in self.terms}
        return [j for lab in labels for j in by[lab]]


def _calls(node: tuple, names) -> bool:
    """Whether a resolved expression tree (``_rformula``) calls one of ``names``."""
    kind = node[0]
    if kind == "call":
        return node[1] in names or any(_calls(a, names) for _, a in node[2])
    if kind in ("op", "unary"):
        return any(_calls(x, names) for x in node[2:])
    if kind == "paren":
        return _calls(node[1], names)
    if kind == "list":
        return any(_calls(x, names) for x in node[1])
    return False


def _is_covariate(spec, expr: str) -> bool:
    """R's dataClass "numeric": a numerical factor that is not matrix-valued (poly(x, 2), scale(x))."""
    st = spec.encoder_state.get(expr)
    if st is None or getattr(st[0], "value", str(st[0])) != "numerical":
        return False
    e = (spec.materializer_params or {}).get("exprs", {}).get(expr)
    return e is None or e.tree is None or not _calls(e.tree, _MATRIX_FUNCTIONS)


def _factors(es) -> tuple[str, ...]:
    return tuple(str(f) for f in es.term.factors if str(f) != "1")


def spec_terms(spec, names) -> FixedTerms:
    """The terms of a model spec (formulaic's order, which is R's), with their columns among the
    model matrix's columns ``names`` (R's names; those not kept after a rank check are absent)."""
    pos = {nm: i for i, nm in enumerate(r_column_names(spec))}
    if any(nm not in pos for nm in names):
        raise DataError("cannot match the fitted fixed-effect columns to the model spec's columns")
    kept = [pos[nm] for nm in names]
    where = {fc: j for j, fc in enumerate(kept)}
    terms, intercept = [], False
    for es in spec.structure:
        factors = _factors(es)
        if not factors:
            intercept = True
            continue
        label = ":".join(factor_label(spec, f) for f in factors)
        terms.append(FixedTerm(label, factors, frozenset(f for f in factors if _is_covariate(spec, f)),
                               tuple(where[i] for i in spec.term_indices[es.term] if i in where)))
    return FixedTerms(tuple(terms), intercept, tuple(kept), len(kept))


def fixed_terms(structure) -> FixedTerms:
    """The terms of the fixed part of ``structure``."""
    if structure.fixed_spec is None:
        raise DataError("the fixed-effects model spec is not available, so the ANOVA hypotheses cannot be built")
    return spec_terms(structure.fixed_spec, structure.fixef_names)


def fixed_gram(structure) -> np.ndarray:
    """G = XᵀX of the fitted columns, unweighted (lmerTest's hypotheses ignore prior weights)."""
    G = getattr(structure, "fixed_gram", None)
    if G is not None:
        return np.asarray(G, dtype=float)
    if structure.X is not None:
        return structure.X.T @ structure.X
    raise DataError("this model keeps neither its rows nor XᵀX, so its ANOVA hypotheses cannot be built")


# ----------------------------------------------------------------------------- types I, II, marginal

def doolittle_t(G: np.ndarray) -> np.ndarray:
    """Λᵀ of the Doolittle factorisation G = Λ D Λᵀ (Λ unit lower triangular): diag(R)⁻¹R with R
    the Cholesky factor of G, computed on G scaled to a unit diagonal; entries of the scaled Λ
    below ``DOOLITTLE_EPS`` are set to 0 (lmerTest's doolittle)."""
    if G.shape[0] == 0:
        return np.zeros((0, 0))
    d = np.sqrt(np.diag(G))
    R = la.cholesky(G / np.outer(d, d), lower=False)
    Lt = R / np.diag(R)[:, None]
    Lt[np.abs(Lt) < DOOLITTLE_EPS] = 0.0
    return Lt * d[None, :] / d[:, None]


def type1_hypotheses(G: np.ndarray, ft: FixedTerms) -> dict[str, np.ndarray]:
    """Sequential hypotheses: the rows cols(t) of Λᵀ (module docstring)."""
    Lt = doolittle_t(G)
    return {t.label: Lt[list(t.columns), :] for t in ft.terms}


def marginal_hypotheses(ft: FixedTerms) -> dict[str, np.ndarray]:
    """The identity rows cols(t): the test that the term's coefficients are zero."""
    eye = np.eye(ft.p)
    return {t.label: eye[list(t.columns), :] for t in ft.terms}


def type2_hypotheses(G: np.ndarray, ft: FixedTerms) -> dict[str, np.ndarray]:
    """Type II: marginal for a term contained in no other, else type I of the reordered design."""
    contains = ft.containment()
    out = marginal_hypotheses(ft)
    for t in ft.terms:
        if not contains[t.label]:
            continue
        own, outer = list(t.columns), ft.columns_of(contains[t.label])
        order = [j for j in range(ft.p) if j not in set(own) | set(outer)] + own + outer
        start = ft.p - len(own) - len(outer)
        L = np.zeros((len(own), ft.p))
        L[:, order] = doolittle_t(G[np.ix_(order, order)])[start:start + len(own), :]
        out[t.label] = L
    return out


# ----------------------------------------------------------------------------- designs on the kept rows

def _matrix(spec, frame: pd.DataFrame, what: str) -> tuple[np.ndarray, list[frozenset]]:
    """A model spec's matrix on ``frame`` and, per column, its term (the set of its factors)."""
    try:
        mm = spec.get_model_matrix(frame)
    except (FormulaError, DataError):
        raise
    except Exception as e:
        raise DataError(f"cannot build {what} for the ANOVA hypotheses: {type(e).__name__}: {e}") from e
    keys = [frozenset(_factors(es)) for es in mm.model_spec.structure for _ in es.columns]
    return np.asarray(mm.to_numpy(dtype=float), dtype=float).reshape(len(frame), -1), keys


class _KeptRows:
    """The model's designs on its kept rows S (``ModelStructure.fixed_rows``) and the relations
    that carry them to all rows (module docstring): ``relation(M_S)`` is the A with M = X A."""

    def __init__(self, structure, ft: FixedTerms):
        frame = getattr(structure, "fixed_rows", None)
        if frame is None:
            raise DataError("this model keeps no rows of its fixed-effects data (its structure was built without "
                            "them), so its ANOVA hypotheses cannot be built")
        self.spec, self.frame, self.ft = structure.fixed_spec, frame, ft
        X, _ = _matrix(self.spec, frame, "the fixed effects")
        self.X = X[:, list(ft.kept)]
        self.G = fixed_gram(structure)
        d = np.sqrt(np.diag(self.G))
        # X = Q R with R the Cholesky factor of G: X A = Q (R A), so R A has X A's column relations
        self.R = la.cholesky(self.G / np.outer(d, d), lower=False) * d[None, :]
        if len(independent_columns(self.X)) < ft.p:
            raise DataError("the rows kept for the ANOVA hypotheses do not span the design; "
                            "please report this with the model")

    def design(self, spec, what: str):
        return _matrix(spec, self.frame, what)

    def relation(self, M: np.ndarray) -> np.ndarray:
        """A with M = X A on all rows, from M on the kept rows (where X has full column rank).
        Every column must be in span(X) there: to lme4's rank tolerance, up to rounding."""
        A = np.linalg.lstsq(self.X, M, rcond=None)[0]
        err = np.abs(self.X @ A - M).max(axis=0, initial=0.0)
        if np.any(err > 10 * RANK_TOL * np.abs(M).max(axis=0, initial=0.0)):
            raise DataError("a design of the ANOVA hypotheses is not in the span of the model's fixed effects")
        return A


def _treatment_spec(spec):
    """The fit's model spec with every factor coded by treatment contrasts (lmerTest's remake)."""
    params = dict(spec.materializer_params or {})
    params["contrasts"] = {}
    state = {k: (kind, {kk: vv for kk, vv in st.items() if kk != "contrasts"})
             for k, (kind, st) in spec.encoder_state.items()}
    return spec.update(materializer_params=params, encoder_state=state, structure=None)


def _complete_design(rows: _KeptRows) -> tuple[np.ndarray, list[frozenset]]:
    """D on the kept rows: the intercept, then per term every cell of its factors (indicators,
    times its covariates), R's ``model.matrix(~ 0 + term)`` (lmerTest's get_rdX)."""
    blocks, keys = [], []
    if rows.ft.intercept:
        blocks.append(np.ones((len(rows.frame), 1)))
        keys.append(frozenset())
    for es in rows.spec.structure:
        if _factors(es):
            B, k = rows.design(rows.spec.update(formula=SimpleFormula([es.term]), structure=None),
                               f"the cells of {es.term}")
            blocks.append(B)
            keys += k
    return np.hstack(blocks), keys


def _match_cells(XT: np.ndarray, keysT: list, D: np.ndarray, keysD: list) -> list[int]:
    """For each column of X_T, the column of D that is the same cell of the same term (treatment
    coding's columns are cells), by their relations to X (equal columns have equal relations)."""
    rows = []
    for j in range(XT.shape[1]):
        cand = [c for c in range(D.shape[1]) if keysD[c] == keysT[j]
                and np.allclose(D[:, c], XT[:, j], rtol=1e-10, atol=1e-12 * (np.abs(XT[:, j]).max() + 1.0))]
        if not cand:
            raise DataError("type III hypotheses: a treatment-coded column is not a cell of its term (are contrasts "
                            "set inside the formula, as C(x, ...)? give them as contrasts= instead)")
        rows.append(cand[0])
    return rows


def type3_hypotheses(structure, ft: FixedTerms) -> dict[str, np.ndarray]:
    """Type III hypotheses (module docstring)."""
    rows = _KeptRows(structure, ft)
    XT_all, keysT_all = rows.design(_treatment_spec(rows.spec), "the treatment-coded design")
    A_all = rows.relation(XT_all)
    keepT = independent_columns(rows.R @ A_all)                 # lme4's rule on the data's X_T = X A
    if len(keepT) != ft.p:
        raise DataError(f"type III hypotheses: the treatment-coded design has rank {len(keepT)}, the model's {ft.p}")
    A_T, keysT = A_all[:, keepT], [keysT_all[j] for j in keepT]
    D, keysD = _complete_design(rows)
    A_D = rows.relation(D)
    L = _zapsmall(la.solve(A_T, A_D).T)                          # Λ = (X_T⁺ D)ᵀ: cells × treatment coefficients
    cols = {t.label: [j for j, k in enumerate(keysT) if k == frozenset(t.factors)] for t in ft.terms}
    contains = ft.containment()
    for t in sorted(ft.terms, key=lambda t: -len(t.factors)):    # higher-order terms first
        outer = [j for c in contains[t.label] for j in cols[c]]
        if outer and cols[t.label]:
            Y, C = L[:, cols[t.label]], L[:, outer]
            L[:, cols[t.label]] = _zapsmall(Y - C @ np.linalg.lstsq(C, Y, rcond=None)[0])
    L = L[_match_cells(A_T, keysT, A_D, keysD), :]
    out = {}
    for t in ft.terms:
        Lt = L[:, cols[t.label]].T
        Lt = Lt[np.abs(Lt).sum(axis=1) > NONZERO_ROW]
        out[t.label] = la.solve(A_T.T, Lt.T).T if Lt.shape[0] else np.zeros((0, ft.p))   # β_T = A_T⁻¹β
    return out


def anova_hypotheses(structure, type: int = 3) -> dict[str, np.ndarray]:
    """The contrast matrix of every fixed-effect term of lmerTest's ``anova(fit, type=)``, each
    rows × p in the fit's coefficient order (0 rows: nothing testable)."""
    ft = fixed_terms(structure)
    if ft.p == 0:
        return {}
    if ft.p <= 1 or len(ft.terms) <= 1 or type == 1:
        return type1_hypotheses(fixed_gram(structure), ft)
    if type == 2:
        return type2_hypotheses(fixed_gram(structure), ft)
    return type3_hypotheses(structure, ft)


# ----------------------------------------------------------------------------- drop1

def drop1_hypotheses(structure, scope=None) -> dict[str, np.ndarray | None]:
    """The hypotheses of lmerTest's ``drop1`` for the terms of ``scope`` (default: R's drop.scope);
    None for a term whose removal leaves span(X) unchanged (an NA row)."""
    ft = fixed_terms(structure)
    marginal = ft.drop_scope()
    if scope is None:
        scope = marginal
    else:
        scope = [scope] if isinstance(scope, str) else list(scope)
        if not scope or not all(isinstance(s, str) for s in scope):
            raise ArgumentError("scope should name the terms to drop: a string or a list of strings")
        bad = [s for s in scope if s not in marginal]
        if bad:
            raise ArgumentError(f"only marginal terms can be dropped from the model, not {bad}; "
                                f"the marginal terms are {marginal}")
    if not structure.dropped_fixef:
        hyp = type1_hypotheses(fixed_gram(structure), ft) if len(ft.terms) <= 1 else marginal_hypotheses(ft)
        return {s: hyp[s] for s in scope}
    rows = _KeptRows(structure, ft)
    G = rows.G
    out: dict[str, np.ndarray | None] = {}
    for s in scope:
        keep = [es.term for es in rows.spec.structure
                if ":".join(factor_label(rows.spec, f) for f in _factors(es)) != s]
        X0, _ = rows.design(rows.spec.update(formula=SimpleFormula(keep), structure=None), f"the model without {s}")
        A0 = rows.relation(X0)
        k0 = independent_columns(rows.R @ A0)                # X₀'s aliased columns out, by lme4's rule
        # In X = QR coordinates: X₀ = Q (R A₀), and the residual of X on X₀ is Q E with
        # E = R − P R (P the projector on span(R A₀)), so ‖(X − P_{X₀}X)_j‖ = ‖E_j‖ and XᵀR = RᵀE.
        B = la.orth(rows.R @ A0[:, k0], rcond=RANK_TOL) if k0 else np.zeros((ft.p, 0))
        E = rows.R - B @ (B.T @ rows.R)
        live = np.linalg.norm(E, axis=0) > RANK_TOL * np.sqrt(np.diag(G))   # columns of the residual not zero
        L = la.orth((rows.R.T @ E)[:, live], rcond=RANK_TOL).T if live.any() else np.zeros((0, ft.p))
        out[s] = _zapsmall(L) if L.shape[0] else None
    return out
