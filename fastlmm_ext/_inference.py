"""Inference after the fit: t-tests with Satterthwaite's degrees of freedom, type III F-tests,
Wald confidence intervals and likelihood-ratio tests of nested models.

Satterthwaite's method (as in lmerTest 3.1)
-------------------------------------------
The variance parameters are  φ = (θ, σ), θ as in lme4 (Var(b) = σ² Λ_θ Λ_θᵀ).  With β at its
conditional estimate β̂(θ), the deviance (−2 log-likelihood, *not* profiled over σ) is

    ML:    d(θ, σ) = log|L_θ|² − Σ log wᵢ + r²(θ)/σ² + n log(2πσ²)
    REML:  d(θ, σ) = log|L_θ|² − Σ log wᵢ + log|R_X|² + r²(θ)/σ² + (n − p) log(2πσ²)

(r² = penalised weighted residual sum of squares).  At σ² = r²/n (ML) or r²/(n − p) (REML) these
are lme4's profiled criteria.  The asymptotic covariance of φ̂ is A = 2 H⁻¹, H the Hessian of d
at the optimum (a Moore–Penrose inverse over the eigenvalues > 1e-8).  The covariance of β̂ is
V(φ) = σ² (R_XᵀR_X)⁻¹ and J_k = ∂V/∂φ_k.  For a contrast l (a row vector),

    var = l V lᵀ,   g_k = l J_k lᵀ,   ν = 2 var² / (gᵀ A g),

and t = l β̂ / √var is referred to a t distribution with ν degrees of freedom.  For a q-row
contrast matrix L the F statistic is F = (Lβ̂)ᵀ (L V Lᵀ)⁻¹ (Lβ̂) / q.  With L V Lᵀ = P D Pᵀ, the
rows of PᵀL give q independent t statistics with ν_m = 2 d_m² / (g_mᵀ A g_m); the F statistic's
denominator df is ν = 2E/(E − q), E = Σ ν_m/(ν_m − 2) (2 if any ν_m ≤ 2; the common value if all
ν_m agree to 1e-8).  H and J_k are computed by central differences with Richardson
extrapolation (the scheme of R's numDeriv, which lmerTest uses).  Like lmerTest, a parameter on
its boundary (a zero diagonal θ of a singular fit) is differenced two-sided: the criterion is
defined, and even in that θ, on both sides.

Type III hypotheses (SAS "type III estimable functions", as lmerTest builds them)
---------------------------------------------------------------------------------
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
"""
from __future__ import annotations

import itertools
import math
import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.linalg as la
from scipy import stats

from ._params import tri_indices
from ._pls import deviance_at_sigma
from ._rformula import factor_label, r_column_names
from ._threads import bundled_blas_single_thread

__all__ = ["InferenceMixin", "SatterthwaiteInfo", "anova"]

DDF_OPTIONS = ("satterthwaite", "residual", "normal", "z")
_COEF_COLUMNS = ["Estimate", "Std. Error", "df", "t value", "Pr(>|t|)"]
_ANOVA_COLUMNS = ["Sum Sq", "Mean Sq", "NumDF", "DenDF", "F value", "Pr(>F)"]
_LRT_COLUMNS = ["npar", "AIC", "BIC", "logLik", "deviance", "Chisq", "Df", "Pr(>Chisq)"]


def _check_ddf(ddf: str) -> str:
    key = str(ddf).lower().replace("-", "").replace("_", "") if isinstance(ddf, str) else None
    aliases = {"satterthwaite": "satterthwaite", "residual": "residual", "normal": "normal", "z": "normal"}
    if key not in aliases:
        raise ValueError(f"unknown ddf {ddf!r}; choose one of {', '.join(repr(o) for o in DDF_OPTIONS)}")
    return aliases[key]


# ----------------------------------------------------------------------------- numerical derivatives

def _step_sizes(x: np.ndarray, d: float, eps: float, zero_tol: float) -> np.ndarray:
    """Initial steps h_i = d·|x_i|, or eps where |x_i| is (near) zero."""
    return np.abs(d * x) + eps * (np.abs(x) < zero_tol)


def _richardson(approx: list, r: int) -> object:
    """Richardson extrapolation of r central-difference estimates taken at steps h, h/2, h/4, ...
    (error series in h², h⁴, ...): repeatedly combine neighbours as (4^m a_{k+1} − a_k)/(4^m − 1)."""
    a = list(approx)
    for m in range(1, r):
        a = [(a[k + 1] * 4.0 ** m - a[k]) / (4.0 ** m - 1.0) for k in range(len(a) - 1)]
    return a[0]


@dataclass(frozen=True)
class _DerivOptions:
    d: float = 1e-4          # relative initial step (numDeriv: 0.1 for Hessians, 1e-4 for Jacobians)
    eps: float = 1e-4        # absolute initial step for parameters at (or near) zero
    zero_tol: float = math.sqrt(np.finfo(float).eps / 7e-7)
    r: int = 4               # number of step halvings (Richardson terms)


HESSIAN_STEPS = _DerivOptions(d=0.1)
JACOBIAN_STEPS = _DerivOptions(d=1e-4)


def hessian_richardson(f, x: np.ndarray, opts: _DerivOptions = HESSIAN_STEPS) -> np.ndarray:
    """Hessian of a scalar f at x.

    Diagonal: (f(x + h eᵢ) − 2f(x) + f(x − h eᵢ))/h².  Off-diagonal, reusing the diagonal:
    (f(x + hᵢeᵢ + hⱼeⱼ) − 2f(x) + f(x − hᵢeᵢ − hⱼeⱼ) − Hᵢᵢhᵢ² − Hⱼⱼhⱼ²)/(2hᵢhⱼ).  Each at
    steps h, h/2, ..., h/2^{r−1}, combined by Richardson extrapolation."""
    x = np.asarray(x, dtype=float)
    n = x.size
    f0 = f(x)
    h0 = _step_sizes(x, opts.d, opts.eps, opts.zero_tol)
    H = np.zeros((n, n))
    for i in range(n):
        est = []
        h = h0.copy()
        for _ in range(opts.r):
            e = np.zeros(n)
            e[i] = h[i]
            est.append((f(x + e) - 2.0 * f0 + f(x - e)) / h[i] ** 2)
            h = h / 2.0
        H[i, i] = _richardson(est, opts.r)
    for i in range(n):
        for j in range(i):
            est = []
            h = h0.copy()
            for _ in range(opts.r):
                e = np.zeros(n)
                e[i], e[j] = h[i], h[j]
                est.append((f(x + e) - 2.0 * f0 + f(x - e) - H[i, i] * h[i] ** 2 - H[j, j] * h[j] ** 2)
                           / (2.0 * h[i] * h[j]))
                h = h / 2.0
            H[i, j] = H[j, i] = _richardson(est, opts.r)
    return H


def jacobian_richardson(g, x: np.ndarray, opts: _DerivOptions = JACOBIAN_STEPS) -> list[np.ndarray]:
    """Derivatives ∂g/∂x_i (g array-valued) by central differences (g(x + h eᵢ) − g(x − h eᵢ))/(2h)
    with Richardson extrapolation over h, h/2, ...; returns one array per x_i."""
    x = np.asarray(x, dtype=float)
    n = x.size
    h0 = _step_sizes(x, opts.d, opts.eps, opts.zero_tol)
    out = []
    for i in range(n):
        est = []
        h = h0[i]
        for _ in range(opts.r):
            e = np.zeros(n)
            e[i] = h
            est.append((np.asarray(g(x + e)) - np.asarray(g(x - e))) / (2.0 * h))
            h = h / 2.0
        out.append(_richardson(est, opts.r))
    return out


# ----------------------------------------------------------------------------- Satterthwaite

class SatterthwaiteInfo:
    """Covariance of the variance parameters φ = (θ, σ) and the derivatives of Var(β̂) w.r.t. φ
    at a given (θ, σ) of a :class:`LinearMixedModel` (see the module docstring for the formulas).

    ``hessian``: H = ∂²d/∂φ²;  ``vcov_varpar``: A = 2H⁺ (eigenvalues ≤ ``tol`` dropped, with a
    warning for negative or zero ones);  ``jacobian``: [∂Var(β̂)/∂φ_k];  ``vcov_beta``: Var(β̂)."""

    def __init__(self, model, theta, sigma: float, tol: float = 1e-8,
                 hessian_steps: _DerivOptions = HESSIAN_STEPS, jacobian_steps: _DerivOptions = JACOBIAN_STEPS):
        s = model.structure
        self.n, self.p = s.n, s.p
        self.REML = bool(model.REML)
        self._backend = model.backend
        self._sum_log_w = model.backend.sum_log_w
        self._states: dict[bytes, object] = {}
        self.varpar = np.concatenate([np.asarray(theta, dtype=float).ravel(), [float(sigma)]])
        self.vcov_beta = self.vcov_beta_at(self.varpar)
        self.hessian = hessian_richardson(self.deviance, self.varpar, hessian_steps)
        evals, evecs = np.linalg.eigh((self.hessian + self.hessian.T) / 2.0)
        self.hessian_eigenvalues = evals
        neg = evals < -tol
        zero = np.abs(evals) <= tol
        if neg.any():
            warnings.warn(f"Model failed to converge with {int(neg.sum())} negative eigenvalue(s) of the Hessian "
                          f"of the deviance in (theta, sigma): {', '.join(f'{v:.1e}' for v in evals[neg])}",
                          RuntimeWarning, stacklevel=3)
        if zero.any():
            warnings.warn(f"Model may not have converged with {int(zero.sum())} eigenvalue(s) of the Hessian "
                          f"close to zero: {', '.join(f'{v:.1e}' for v in evals[zero])}",
                          RuntimeWarning, stacklevel=3)
        pos = evals > tol
        Vp = evecs[:, pos]
        self.vcov_varpar = 2.0 * (Vp / evals[pos]) @ Vp.T
        self.jacobian = jacobian_richardson(self.vcov_beta_at, self.varpar, jacobian_steps)
        self._states.clear()   # the PLS solutions are only needed while differentiating

    @classmethod
    def from_result(cls, res, **kwargs) -> SatterthwaiteInfo:
        """At the fitted (θ̂, σ̂) of an :class:`LmerResult`."""
        return cls(res.model, res.theta, res.sigma, **kwargs)

    # -- the two functions of φ that are differentiated
    def _state(self, theta: np.ndarray):
        key = np.asarray(theta, dtype=float).tobytes()
        st = self._states.get(key)
        if st is None:
            st = self._backend.state(np.asarray(theta, dtype=float))
            self._states[key] = st
        return st

    def deviance(self, varpar: np.ndarray) -> float:
        """−2 log-likelihood (REML or ML, as the fit) at φ = (θ, σ), β at β̂(θ)."""
        theta, sigma = varpar[:-1], float(varpar[-1])
        st = self._state(theta)
        return deviance_at_sigma(st.ldL2, st.ldRX2, st.pwrss, sigma, self.n, self.p, self.REML, self._sum_log_w)

    def vcov_beta_at(self, varpar: np.ndarray) -> np.ndarray:
        """Var(β̂) = σ² (R_XᵀR_X)⁻¹ at φ = (θ, σ)."""
        theta, sigma = varpar[:-1], float(varpar[-1])
        st = self._state(theta)
        if self.p == 0:
            return np.zeros((0, 0))
        Ri = la.solve_triangular(st.RX, np.eye(self.p), lower=False)
        return sigma * sigma * (Ri @ Ri.T)

    # -- tests
    def df_contrast(self, l: np.ndarray) -> float:
        """Satterthwaite df of the single contrast l β."""
        l = np.asarray(l, dtype=float).ravel()
        var = float(l @ self.vcov_beta @ l)
        g = np.array([l @ J @ l for J in self.jacobian])
        denom = float(g @ self.vcov_varpar @ g)
        with np.errstate(divide="ignore", invalid="ignore"):
            return float(2.0 * var * var / denom) if denom > 0 else np.inf


def _fstat_ddf(nu: np.ndarray, tol: float = 1e-8) -> float:
    """Denominator df of an F statistic that averages q independent squared t statistics with
    ν_m df:  ν = 2E/(E − q), E = Σ ν_m/(ν_m − 2); 2 if any ν_m ≤ 2; mean(ν) if all ν_m agree."""
    nu = np.asarray(nu, dtype=float)
    if nu.size == 1:
        return float(nu[0])
    if np.all(np.abs(np.diff(nu)) < tol):
        return float(nu.mean())
    if np.any(nu <= 2):
        return 2.0
    E = float(np.sum(nu / (nu - 2.0)))
    return 2.0 * E / (E - nu.size)


_SQRT_EPS = math.sqrt(np.finfo(float).eps)


def _contest_md(L, beta, V, sigma, df_of, ddf_const, eps=_SQRT_EPS) -> dict:
    """Joint test of Lβ = 0: the contrast's covariance L V Lᵀ = P D Pᵀ, q = #{d > eps·d_max},
    F = Σ_m (p_mᵀLβ)²/d_m / q;  DenDF from the per-direction df (``df_of``) or ``ddf_const``."""
    L = np.atleast_2d(np.asarray(L, dtype=float))
    nan_row = {"Sum Sq": np.nan, "Mean Sq": np.nan, "NumDF": np.nan, "DenDF": np.nan, "F value": np.nan,
               "Pr(>F)": np.nan}
    if L.shape[0] == 0 or L.shape[1] == 0:
        return nan_row
    if L.shape[0] == 1:
        l = L[0]
        var = float(l @ V @ l)
        Fv = float(l @ beta) ** 2 / var
        q = 1
        ddf = df_of(l) if ddf_const is None else ddf_const
    else:
        VL = L @ V @ L.T
        d, P = np.linalg.eigh((VL + VL.T) / 2.0)
        order = np.argsort(d)[::-1]
        d, P = d[order], P[:, order]
        tol = max(eps * d[0], 0.0)
        q = int(np.sum(d > tol))
        if q == 0:
            return nan_row
        PtL = P[:, :q].T @ L
        t2 = (PtL @ beta) ** 2 / d[:q]
        Fv = float(t2.sum() / q)
        if ddf_const is not None:
            ddf = ddf_const
        elif q == 1:
            ddf = df_of(PtL[0])
        else:
            ddf = _fstat_ddf(np.array([df_of(PtL[m]) for m in range(q)]))
    ms = Fv * sigma ** 2
    if np.isinf(ddf):
        pval = float(stats.chi2.sf(Fv * q, q))
    else:
        pval = float(stats.f.sf(Fv, q, ddf))
    return {"Sum Sq": ms * q, "Mean Sq": ms, "NumDF": q, "DenDF": float(ddf), "F value": Fv, "Pr(>F)": pval}


# ----------------------------------------------------------------------------- terms and hypotheses

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


def confint_row_names(structure) -> list[str]:
    """lme4's confint rows: .sig01, .sig02, ... (random-effect SDs and correlations, in θ's
    positions), .sigma, then the fixed effects."""
    nsig = structure.ntheta
    width = max(2, len(str(nsig)))
    return [f".sig{i + 1:0{width}d}" for i in range(nsig)] + [".sigma"] + list(structure.fixef_names)


def confint_row_labels(structure) -> dict[str, str]:
    """lme4's ``oldNames = FALSE`` labels of the variance-parameter rows of ``confint``, keyed
    by the default names: per term, in θ's order, ``.sigNN`` → ``sd_<column>|<factor>`` for the
    SD of a column of the term's model matrix and ``cor_<column i>.<column j>|<factor>`` for the
    correlation of columns i > j (e.g. ``sd_(Intercept)|Subject``, ``cor_Days.(Intercept)|Subject``,
    ``sd_Days|Subject``), then ``.sigma`` → ``sigma``.  A label that would repeat (the same
    term twice) gets R's make.unique suffix ``.1``."""
    from ._design import _unique_names
    labels = []
    for t in structure.terms:
        for i, j in zip(*tri_indices(t.k)):
            labels.append(f"sd_{t.cnms[i]}|{t.factor}" if i == j else f"cor_{t.cnms[i]}.{t.cnms[j]}|{t.factor}")
    old = confint_row_names(structure)[:structure.ntheta + 1]
    return dict(zip(old, _unique_names(labels) + ["sigma"]))


def select_parm(table: pd.DataFrame, parm) -> pd.DataFrame:
    """Rows ``parm`` (a name or names) of a confint table; KeyError naming unknown ones."""
    if parm is None:
        return table
    parm = [parm] if isinstance(parm, str) else list(parm)
    missing = [q for q in parm if q not in table.index]
    if missing:
        raise KeyError(f"unknown parameter(s) {missing}; available: {list(table.index)}")
    return table.loc[parm]


def _format_pct(probs) -> list[str]:
    """R's confint column labels: 100·prob formatted as R's format(digits = 3) (3 significant
    digits, trailing zeros dropped, common number of decimals), then ' %'."""
    vals = [100.0 * float(p) for p in probs]
    decs = []
    for v in vals:
        if v == 0.0:
            decs.append(0)
            continue
        r = round(v, 2 - math.floor(math.log10(abs(v))))
        k = 0
        while k < 15 and abs(round(r, k) - r) > 1e-9 * abs(r):
            k += 1
        decs.append(k)
    dec = max(decs)
    return [f"{v:.{dec}f} %" for v in vals]


# ----------------------------------------------------------------------------- the mixin

class InferenceMixin:
    """Inference methods of :class:`LmerResult`: ``coef_table``, ``anova_table``, ``confint``,
    ``contrast_test`` and ``satterthwaite`` (the cached derivative information)."""

    # -- Satterthwaite building block (computed once per result)
    @property
    def satterthwaite(self) -> SatterthwaiteInfo:
        """Hessian of the deviance in φ = (θ, σ), A = 2H⁻¹ and ∂Var(β̂)/∂φ (computed on first use)."""
        info = self.__dict__.get("_satterthwaite_info")
        if info is None:
            with bundled_blas_single_thread():   # many small solves: as in the fit (sleepstudy 0.56 s → 0.10 s)
                info = SatterthwaiteInfo.from_result(self)
            self.__dict__["_satterthwaite_info"] = info
        return info

    def _ddf_for(self, ddf: str):
        """(df of a contrast l) for the chosen method: a function of l."""
        kind = _check_ddf(ddf)
        if kind == "satterthwaite":
            return self.satterthwaite.df_contrast, None
        if kind == "residual":
            return None, float(self.structure.n - self.structure.p)
        return None, np.inf

    def coef_table(self, ddf: str = "satterthwaite") -> pd.DataFrame:
        """Fixed-effect estimates with t tests, like ``summary(fit)$coefficients`` of lmerTest.

        ``ddf="satterthwaite"`` (default): t = β̂_j / SE_j on Satterthwaite's
        ν_j = 2 V_jj² / (gᵀ A g), g_k = (∂V/∂φ_k)_jj (module docstring);  ``"residual"``:
        ν = n − p;  ``"normal"`` (or ``"z"``): standard normal p-values, df = inf.
        Columns: Estimate, Std. Error, df, t value, Pr(>|t|)."""
        beta = self.fixef.to_numpy()
        p = beta.size
        df_of, const = self._ddf_for(ddf) if p else (None, np.nan)
        se = np.sqrt(np.diag(self.vcov.to_numpy()))
        if df_of is not None:
            dfs = np.array([df_of(np.eye(p)[j]) for j in range(p)])
        else:
            dfs = np.full(p, const)
        with np.errstate(divide="ignore", invalid="ignore"):
            t = beta / se
        pval = np.array([2.0 * (stats.norm.sf(abs(tj)) if np.isinf(dj) else stats.t.sf(abs(tj), dj))
                         for tj, dj in zip(t, dfs)])
        return pd.DataFrame({"Estimate": beta, "Std. Error": se, "df": dfs, "t value": t, "Pr(>|t|)": pval},
                            index=self.fixef.index, columns=_COEF_COLUMNS)

    def contrast_test(self, L, ddf: str = "satterthwaite") -> pd.DataFrame:
        """F test of the hypothesis L β = 0 for a contrast matrix L (rows × p; a vector is one row).

        F = (Lβ̂)ᵀ(L V Lᵀ)⁻¹(Lβ̂)/q (q = rank), DenDF as in ``anova_table``; Sum Sq = q·F·σ̂²."""
        df_of, const = self._ddf_for(ddf)
        L = np.atleast_2d(np.asarray(L, dtype=float))
        if L.shape[1] != self.structure.p:
            raise ValueError(f"L must have {self.structure.p} columns (one per fixed effect), got {L.shape[1]}")
        row = _contest_md(L, self.fixef.to_numpy(), self.vcov.to_numpy(), self.sigma, df_of, const)
        return pd.DataFrame([row], columns=_ANOVA_COLUMNS)

    def anova_hypotheses(self) -> dict[str, np.ndarray]:
        """Type III contrast matrix of every fixed-effect term (lmerTest's ``anova(fit)``; type I
        when the model has a single term), each rows × p in the fit's coefficient order."""
        cached = self.__dict__.get("_type3_hypotheses")
        if cached is not None:
            return cached
        s = self.structure
        terms, has_intercept, kept = _fixed_terms(s)
        if s.p <= 1 or len(terms) <= 1:
            XtX = s.X.T @ s.X if s.has_rows else self.model.backend.cp.XyXy[:s.p, :s.p]
            out = _type1_contrasts(XtX, terms) if s.p >= 1 else {}
        else:
            out = _type3_contrasts(s, terms, has_intercept, kept)
        self.__dict__["_type3_hypotheses"] = out
        return out

    def anova_table(self, ddf: str = "satterthwaite") -> pd.DataFrame:
        """Type III ANOVA table with F tests per fixed-effect term, like lmerTest's ``anova(fit)``.

        Each term's hypothesis L β = 0 (``anova_hypotheses``) is tested with
        F = (Lβ̂)ᵀ(L V Lᵀ)⁻¹(Lβ̂)/q; ``"satterthwaite"`` DenDF from the eigen-directions of L V Lᵀ
        (module docstring), ``"residual"`` n − p, ``"normal"`` inf (χ²_q/q reference).
        Mean Sq = F·σ̂², Sum Sq = q·Mean Sq.  Columns: Sum Sq, Mean Sq, NumDF, DenDF, F value, Pr(>F)."""
        _check_ddf(ddf)
        hyp = self.anova_hypotheses()
        df_of, const = self._ddf_for(ddf) if hyp else (None, np.nan)
        beta, V = self.fixef.to_numpy(), self.vcov.to_numpy()
        rows = {name: _contest_md(L, beta, V, self.sigma, df_of, const) for name, L in hyp.items()}
        tab = pd.DataFrame.from_dict(rows, orient="index", columns=_ANOVA_COLUMNS) if rows else \
            pd.DataFrame(columns=_ANOVA_COLUMNS, dtype=float)
        if len(tab) and np.isfinite(tab["NumDF"]).all():
            tab["NumDF"] = tab["NumDF"].astype(int)
        return tab

    @property
    def confint_labels(self) -> dict[str, str]:
        """Which term each variance-parameter row of :meth:`confint` belongs to: ``.sig01`` →
        ``sd_(Intercept)|Subject``, ``.sig02`` → ``cor_Days.(Intercept)|Subject``, ...,
        ``.sigma`` → ``sigma`` (lme4's ``oldNames = FALSE`` labels; see ``confint(oldNames=False)``)."""
        return confint_row_labels(self.structure)

    def confint(self, method: str = "wald", level: float = 0.95, parm=None, nsim: int = 500,
                seed=None, n_jobs: int = 1, oldNames: bool = True, progress=None) -> pd.DataFrame:
        """Confidence intervals like lme4's ``confint(fit, method=...)``.

        Rows in lme4's order: ``.sig01``, ``.sig02``, ... (one per random-effect SD/correlation,
        in θ's order), ``.sigma``, then the fixed effects; columns named from ``level``
        ("2.5 %", "97.5 %").  ``oldNames=False`` labels the variance rows as lme4 then does,
        ``sd_(Intercept)|Subject``, ``cor_Days.(Intercept)|Subject``, ``sigma`` (the mapping is
        :attr:`confint_labels`); ``parm`` takes either kind of name.

        * ``"wald"``: β̂_j ± z_{(1+level)/2}·SE_j (NaN for the variance parameters, as lme4).
        * ``"profile"``: profile-likelihood intervals of the ML deviance (see ``_profile.py``);
          two root searches per row, run by ``n_jobs`` processes (``-1``: all cores; threads
          where processes cannot be used) with the same result as ``n_jobs=1``.
        * ``"boot"``: percentile intervals from ``nsim`` parametric bootstrap refits (``seed``,
          ``n_jobs`` as in :meth:`bootstrap`).

        ``progress`` (profile and boot): True → a tqdm bar on stderr; None (default) → one only
        on a terminal once the run has taken more than 2 s; False → never."""
        m = str(method).lower()
        if not (0.0 < float(level) < 1.0):
            raise ValueError(f"level must be in (0, 1), got {level!r}")
        labels = confint_row_labels(self.structure)
        if parm is not None:
            back = {new: old for old, new in labels.items()}
            parm = back.get(parm, parm) if isinstance(parm, str) else [back.get(q, q) for q in parm]
        if m == "profile":
            from ._profile import profile_confint
            table = profile_confint(self, float(level), parm, n_jobs=n_jobs, progress=progress)
        elif m == "boot":
            # lme4's confint(method="boot"): percentile intervals of a parametric bootstrap
            boot = self.bootstrap(int(nsim), seed=seed, n_jobs=n_jobs, progress=progress)
            table = boot.confint(level=float(level), parm=parm)
        elif m == "wald":
            a = (1.0 - float(level)) / 2.0
            cols = _format_pct([a, 1.0 - a])
            z = stats.norm.ppf(1.0 - a)
            nsig = self.structure.ntheta
            names = confint_row_names(self.structure)
            beta = self.fixef.to_numpy()
            se = np.sqrt(np.diag(self.vcov.to_numpy()))
            lo = np.concatenate([np.full(nsig + 1, np.nan), beta - z * se])
            hi = np.concatenate([np.full(nsig + 1, np.nan), beta + z * se])
            table = select_parm(pd.DataFrame({cols[0]: lo, cols[1]: hi}, index=names), parm)
        else:
            raise ValueError(f"unknown method {method!r}; choose 'wald', 'profile' or 'boot'")
        return table if oldNames else table.rename(index=labels)


# ----------------------------------------------------------------------------- likelihood-ratio tests

def anova(*results, names=None) -> pd.DataFrame:
    """Likelihood-ratio tests of nested models, like lme4's ``anova(m1, m2, ...)``.

    REML fits are refitted by ML first.  Models are sorted by their number of parameters
    (k = p + dim θ + 1) and compared in sequence:  Chisq_i = 2·max(0, logLik_i − logLik_{i−1}),
    Df_i = k_i − k_{i−1}, Pr(>Chisq) = P(χ²_{Df} > Chisq).  Also AIC = −2 logLik + 2k,
    BIC = −2 logLik + k log n, deviance = −2 logLik.  All models must have the same number of
    observations.  ``names`` labels the rows (default: "model1", ... in the order given).
    A single model gives its type III ``anova_table()``."""
    if len(results) == 1 and isinstance(results[0], (list, tuple)):
        results = tuple(results[0])
    if not results:
        raise ValueError("anova() needs at least one fitted model")
    if len(results) == 1:
        return results[0].anova_table()
    if names is None:
        names = [f"model{i + 1}" for i in range(len(results))]
    names = list(names)
    if len(names) != len(results):
        raise ValueError(f"got {len(names)} names for {len(results)} models")
    nobs = {int(r.nobs) for r in results}
    if len(nobs) > 1:
        raise ValueError(f"models were not all fitted to the same number of observations: {sorted(nobs)}")
    y0 = results[0].structure.y
    if any(r.structure.has_rows and y0 is not None and not np.array_equal(r.structure.y, y0)
           for r in results[1:]):
        raise ValueError("models were not all fitted to the same response values; "
                         "likelihood-ratio tests need the same data")
    fits = []
    for r in results:
        if r.REML:
            r = r.model.ml_twin().fit()
        fits.append(r)
    order = sorted(range(len(fits)), key=lambda i: fits[i].npar)   # stable, as R's order()
    fits = [fits[i] for i in order]
    labels = [names[i] for i in order]
    npar = np.array([f.npar for f in fits], dtype=float)
    ll = np.array([f.loglik for f in fits])
    chisq = np.concatenate([[np.nan], 2.0 * np.maximum(0.0, np.diff(ll))])
    dfc = np.concatenate([[np.nan], np.diff(npar)])
    with np.errstate(invalid="ignore"):
        pv = np.where(np.isnan(dfc), np.nan, stats.chi2.sf(chisq, np.where(np.isnan(dfc) | (dfc <= 0), np.nan, dfc)))
    out = pd.DataFrame({
        "npar": npar.astype(int), "AIC": [f.aic for f in fits], "BIC": [f.bic for f in fits], "logLik": ll,
        "deviance": -2.0 * ll, "Chisq": chisq, "Df": dfc, "Pr(>Chisq)": pv}, index=labels, columns=_LRT_COLUMNS)
    return out
