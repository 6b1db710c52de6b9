"""Marginal means of a fit: lmerTest's ``ls_means`` / ``difflsmeans`` and R's ``emmeans`` /
``pairs`` / ``contrast(, "pairwise")`` on lmer fits.

**Reference grid.**  Every combination of the fixed part's factor levels and of the covariate
values: a numeric variable at its mean over the fit's rows (``ModelStructure.covariate_means``)
or at the values given by ``at=``.  Each cell c gives the row x_c of the *full* fixed-effects
design (the fit's columns, contrasts and transforms, aliased columns included), built by the fit's
own model spec.

**Marginal means.**  The mean of a combination of the levels of some grid variables averages
the cells holding it with equal weights (lmerTest's and emmeans' default): l = (1/|C|) Σ_{c∈C} x_c.
Its estimate is l β̂ over the kept columns (the aliased coefficients count as 0), its variance
l V lᵀ and its df those of the ddf method (``_inference.ddf_method``; Kenward–Roger: V = Φ_A).
A difference of two means, l_i − l_j, is tested the same way.

**Estimability.**  With rank-deficient X, l β is estimable iff l lies in the row space of X,
i.e. l N = 0 for an orthonormal basis N of the null space of the full X.  The dropped columns are
X_d = X_k C (``ModelStructure.aliased``), so the null space is spanned by the columns of [−C; I]
(kept rows, dropped rows).  A function is non-estimable when ‖Nᵀl‖² ≥ 10⁻⁸ ‖l‖² (the
estimability package's rule, which emmeans uses; lmerTest's |Σ_j (lN)_j| < √ε agrees on every
reference case); its row is all NaN.

**Degrees of freedom in emmeans.**  emmeans 1.8.4's rule for lmer fits: Kenward–Roger when
nobs ≤ ``pbkrtest_limit`` (3000), else Satterthwaite when nobs ≤ ``lmerTest_limit`` (3000), else
asymptotic (df = ∞; then the columns are z.ratio, asymp.LCL, asymp.UCL).  For an ML fit,
Kenward–Roger uses the REML refit's adjusted covariance, with the df of
``Lb_ddf(l, vcov(ML fit), vcovAdj(REML refit))``, as emmeans does through pbkrtest.

**Multiplicity (pairs).**  Each ``by`` group is one family: k means and m = k(k−1)/2 contrasts,
non-estimable ones included (emmeans counts them).  ``"tukey"``: p = P(Q_{k,ν} > √2 |t|) from
the studentized range, intervals ± q_{k,ν}(level)/√2 · SE;  ``"bonferroni"``: p·m (at most 1),
intervals at level 1 − (1 − level)/m;  ``"holm"``: Holm's step-down p (multipliers m, m−1, ...
over the estimable p-values in increasing order, made monotone), Bonferroni intervals;
``"none"``.  With a single contrast in a family every method is ``"none"``, as in emmeans.
"""
from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import scipy.linalg as la
from scipy import stats

from ._data import _label, check_level
from ._design import _from_spec
from ._exceptions import ArgumentError, DataError
from ._inference import DenominatorDF, ddf_method
from ._kenward_roger import KenwardRogerInfo
from ._newdata import _spec_variables
from ._rformula import r_column_names
from ._threads import fit_threads

__all__ = [
    "ADJUST_METHODS",
    "EMMContrasts",
    "EMMeans",
    "ReferenceGrid",
    "emmeans",
    "ls_means",
    "reference_grid",
]

#: The p-value adjustments of :meth:`EMMeans.pairs`.
ADJUST_METHODS = ("tukey", "holm", "bonferroni", "none")
#: estimability's tolerance on ‖Nᵀl‖² / ‖l‖².
_ESTIMABLE_TOL = 1e-8
#: emmeans' pbkrtest.limit and lmerTest.limit (emmeans 1.8.4 defaults).
PBKRTEST_LIMIT = 3000
LMERTEST_LIMIT = 3000

_LS_COLUMNS = ["Estimate", "Std. Error", "df", "t value", "lower", "upper", "Pr(>|t|)"]


# ----------------------------------------------------------------------------- the reference grid

@dataclass(frozen=True)
class ReferenceGrid:
    """The cells of the reference grid (module docstring).  ``variables``: grid variable → its
    values, in grid order (factor levels, or covariate values); ``factors``: which variables are
    factors; ``codes`` [cells, variables]: each cell's value index (the first variable varies
    fastest); ``X`` [cells, p_full]: the full-design rows; ``names``: the full design's columns;
    ``kept``: positions of the fit's columns in them; ``null_basis`` [p_full, d]: an orthonormal
    basis of the null space of the full X (d = number of aliased columns)."""
    variables: dict
    factors: tuple
    codes: np.ndarray
    X: np.ndarray
    names: tuple
    kept: np.ndarray
    null_basis: np.ndarray

    def average(self, over: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(L, combos): for each combination of the values of ``over`` (the first varying
        fastest), the equal-weight average of the full-design rows of its cells; combos
        [m, len(over)] the value indices of each row of L."""
        pos = [list(self.variables).index(v) for v in over]
        sizes = [len(self.variables[v]) for v in over]
        combos = _cartesian(sizes)
        if not over:
            return self.X.mean(axis=0, keepdims=True), combos
        radix = np.cumprod([1] + sizes[:-1])
        cell_of = self.codes[:, pos] @ radix
        A = np.zeros((int(np.prod(sizes)), self.X.shape[0]))
        A[cell_of, np.arange(self.X.shape[0])] = 1.0
        A /= A.sum(axis=1, keepdims=True)
        return A @ self.X, combos

    def estimable(self, L: np.ndarray) -> np.ndarray:
        """Whether each row l of L (full columns) has l β estimable: ‖Nᵀl‖² < 10⁻⁸ ‖l‖²."""
        L = np.atleast_2d(L)
        if self.null_basis.shape[1] == 0:
            return np.ones(L.shape[0], dtype=bool)
        chk = np.sum((L @ self.null_basis) ** 2, axis=1)
        ssq = np.sum(L ** 2, axis=1)
        return chk < _ESTIMABLE_TOL * np.where(ssq < _ESTIMABLE_TOL, 1.0, ssq)

    def labels(self, var: str) -> list[str]:
        """The value labels of grid variable ``var`` (levels as lme4 labels them, numbers as R
        prints them)."""
        return [_label(v) if var in self.factors else _num_label(v) for v in self.variables[var]]


def _cartesian(sizes: list[int]) -> np.ndarray:
    """Every combination of indices into lists of these sizes, the first varying fastest
    (R's expand.grid order): [prod(sizes), len(sizes)]; one empty combination for no list."""
    combos = list(itertools.product(*[range(k) for k in reversed(sizes)]))
    return np.array(combos, dtype=np.intp).reshape(len(combos), len(sizes))[:, ::-1]


def _num_label(x: float) -> str:
    """A covariate value as R prints it (15 significant digits, no trailing zeros)."""
    return f"{float(x):.15g}"


def _null_basis(s, names: list[str], kept: np.ndarray) -> np.ndarray:
    """Orthonormal basis of the null space of the full X: the columns of [−C; I] (module docstring)."""
    p_full = len(names)
    dropped = np.setdiff1d(np.arange(p_full), kept)
    if dropped.size == 0:
        return np.zeros((p_full, 0))
    if s.aliased is None:
        raise DataError(f"the fixed-effects columns {', '.join(s.dropped_fixef)} were dropped as aliased; marginal "
                        "means of such a fit need the relations among the design's columns, which a model fitted "
                        "from chunks or a Dask DataFrame does not keep")
    V = np.zeros((p_full, dropped.size))
    V[kept] = -s.aliased
    V[dropped, np.arange(dropped.size)] = 1.0
    return la.qr(V, mode="economic")[0]


def reference_grid(res, at: dict | None = None) -> ReferenceGrid:
    """The reference grid of a fit (module docstring).  ``at``: {variable: value or values} —
    a covariate's values (instead of its mean), or a subset of a factor's levels."""
    s = res.structure
    spec = s.fixed_spec
    if spec is None:
        raise DataError("this fit keeps no model spec of its fixed part, so marginal means cannot be computed")
    factors, numeric = _spec_variables(spec)
    if at is not None and not isinstance(at, dict):
        raise ArgumentError(f"at must be a dict of variable -> value(s), got {type(at).__name__}")
    at = {} if at is None else dict(at)
    for v in at:
        if v not in factors and v not in numeric:
            raise ArgumentError(f"at: {v!r} is not a variable of the fixed effects "
                                f"(variables: {', '.join(map(repr, [*factors, *sorted(numeric)]))})")
    variables: dict = {}
    for v in spec_variable_order(spec, factors, numeric):
        if v in factors:
            cats = list(factors[v][0])
            if v in at:
                want = [at[v]] if np.ndim(at[v]) == 0 else list(at[v])
                by_label = {_label(c): c for c in cats}
                bad = [w for w in want if _label(w) not in by_label]
                if bad:
                    raise ArgumentError(f"at: {bad!r} are not levels of factor {v!r} (levels: "
                                        f"{', '.join(_label(c) for c in cats)})")
                cats = [by_label[_label(w)] for w in want]
            variables[v] = cats
        elif v in at:
            try:
                vals = np.atleast_1d(np.asarray(at[v], dtype=float)).ravel()
            except (TypeError, ValueError) as e:
                raise ArgumentError(f"at: the values of covariate {v!r} must be numbers: {e}") from e
            if vals.size == 0 or not np.isfinite(vals).all():
                raise ArgumentError(f"at: covariate {v!r} needs finite values, got {at[v]!r}")
            variables[v] = [float(x) for x in vals]
        elif v in s.covariate_means:
            variables[v] = [s.covariate_means[v]]
        else:
            raise DataError(f"the mean of covariate {v!r} is not known for this fit (a model fitted from chunks "
                            f"or a Dask DataFrame does not keep it); give its value with at={{{v!r}: ...}}")
    names = list(variables)
    sizes = [len(variables[v]) for v in names]
    codes = _cartesian(sizes)
    ncell = codes.shape[0]
    frame = {}
    for j, v in enumerate(names):
        vals = [variables[v][i] for i in codes[:, j]]
        if v in factors:
            ordered = bool(s.variable_levels.get(v, (None, False))[1])
            frame[v] = pd.Categorical(vals, categories=list(factors[v][0]), ordered=ordered)
        else:
            frame[v] = np.asarray(vals, dtype=float)
    frame = pd.DataFrame(frame, index=pd.RangeIndex(ncell))
    X = np.asarray(_from_spec(spec, frame, "the fixed effects on the reference grid").to_numpy(dtype=np.float64),
                   dtype=np.float64).reshape(ncell, -1)
    full = r_column_names(spec)
    pos = {nm: j for j, nm in enumerate(full)}
    kept = np.array([pos[nm] for nm in s.fixef_names], dtype=np.intp)
    return ReferenceGrid(variables=variables, factors=tuple(v for v in names if v in factors), codes=codes,
                         X=X, names=tuple(full), kept=kept, null_basis=_null_basis(s, full, kept))


def spec_variable_order(spec, factors: dict, numeric: set) -> list[str]:
    """The fixed part's variables in the order the formula's terms first name them."""
    out = []
    for es in spec.structure:
        for f in es.term.factors:
            f = str(f)
            if (f in factors or f in numeric) and f not in out:
                out.append(f)
    return out + [v for v in [*factors, *sorted(numeric)] if v not in out]


def factor_terms(res) -> list[str]:
    """The fixed part's terms made of factors only (``Product``, ``Product:Information``), in the
    fit's term order: the terms lmerTest's ``ls_means`` reports."""
    factors, _ = _spec_variables(res.structure.fixed_spec)
    out = []
    for es in res.structure.fixed_spec.structure:
        fs = [str(f) for f in es.term.factors if str(f) != "1"]
        if fs and all(f in factors for f in fs):
            out.append(":".join(fs))
    return list(dict.fromkeys(out))


# ----------------------------------------------------------------------------- estimates and tests

def _pairs(m: int) -> np.ndarray:
    """The m(m−1)/2 × m matrix of the differences of m means, in R's ``combn`` order."""
    D = np.zeros((m * (m - 1) // 2, m))
    for r, (i, j) in enumerate(itertools.combinations(range(m), 2)):
        D[r, i], D[r, j] = 1.0, -1.0
    return D


@dataclass
class Estimates:
    """l β̂, its SE, df and t for each row of L (NaN rows: not estimable)."""
    estimate: np.ndarray
    se: np.ndarray
    df: np.ndarray
    t: np.ndarray
    estimable: np.ndarray


def estimate(res, grid: ReferenceGrid, L: np.ndarray, dm: DenominatorDF) -> Estimates:
    """l β̂ over the kept columns, SE = √(l V lᵀ) and df of the ddf method ``dm``, for each
    estimable row l of L (full columns); NaN elsewhere."""
    L = np.atleast_2d(L)
    ok = grid.estimable(L)
    Lk = L[:, grid.kept]
    beta = res.fixef.to_numpy()
    m = L.shape[0]
    est, se, df = np.full(m, np.nan), np.full(m, np.nan), np.full(m, np.nan)
    with fit_threads():   # bundled BLAS at one thread: many tiny solves: BLAS threads only wait (carrots: 3 s → 10 ms)
        for i in np.flatnonzero(ok):
            l = Lk[i]
            est[i] = float(l @ beta)
            se[i] = math.sqrt(max(float(l @ dm.vcov @ l), 0.0))
            df[i] = dm.df_of(l) if dm.const is None else dm.const
    with np.errstate(divide="ignore", invalid="ignore"):
        t = est / se
    return Estimates(est, se, df, t, ok)


def _t_sf2(t: np.ndarray, df: np.ndarray) -> np.ndarray:
    """Two-sided p-values of t on df (∞: normal); NaN where t is."""
    with np.errstate(invalid="ignore"):
        return 2.0 * stats.t.sf(np.abs(t), np.where(np.isnan(df), np.inf, df))


# ----------------------------------------------------------------------------- lmerTest's ls_means

def ls_means(res, which=None, pairwise: bool = False, ddf: str = "satterthwaite", level: float = 0.95) -> pd.DataFrame:
    """lmerTest's ``ls_means(fit, which, level, ddf, pairwise)`` (module docstring): one row per
    level combination of each factor term (``Product1``, ``Product1:Information2``), or per pair
    of them (``Product1 - Product2``, R's ``combn`` order) with ``pairwise=True``.  Columns:
    Estimate, Std. Error, df, t value, lower, upper (t intervals at ``level``), Pr(>|t|).
    ``attrs["hypotheses"]``: {term: the linear functions L over the full design's columns}."""
    level = check_level(level)
    terms = factor_terms(res)
    if which is None:
        which = terms
    else:
        which = [which] if isinstance(which, str) else list(which)
        bad = [w for w in which if w not in terms]
        if bad:
            raise ArgumentError(f"which: {bad!r} are not factor terms of the fixed effects "
                                f"(factor terms: {', '.join(map(repr, terms)) or 'none'})")
    dm = ddf_method(res, ddf)
    grid = reference_grid(res)
    rows, index, hyp = [], [], {}
    for term in which:
        vars_ = term.split(":")
        L, combos = grid.average(vars_)
        names = [":".join(f"{v}{grid.labels(v)[c]}" for v, c in zip(vars_, combo)) for combo in combos]
        if pairwise:
            D = _pairs(len(names))
            L = D @ L
            names = [f"{names[i]} - {names[j]}" for i, j in itertools.combinations(range(len(names)), 2)]
        e = estimate(res, grid, L, dm)
        with np.errstate(invalid="ignore"):
            q = stats.t.isf((1.0 - level) / 2.0, e.df)
        p = _t_sf2(e.t, e.df)
        rows.append(np.column_stack([e.estimate, e.se, e.df, e.t, e.estimate - q * e.se, e.estimate + q * e.se, p]))
        index += names
        hyp[term] = pd.DataFrame(L, index=names, columns=list(grid.names))
    tab = pd.DataFrame(np.vstack(rows) if rows else np.zeros((0, 7)), index=index, columns=_LS_COLUMNS)
    tab.attrs.update({"hypotheses": hyp, "ddf": ddf, "level": level})
    return tab


# ----------------------------------------------------------------------------- emmeans

_DF_NAMES = {"kenwardroger": "kenward-roger", "kr": "kenward-roger", "satterthwaite": "satterthwaite",
             "asymptotic": "asymptotic"}


def _kr_of_ml_fit(res) -> DenominatorDF:
    """emmeans' Kenward–Roger for an ML fit: pbkrtest refits by REML, so V = Φ_A of the REML refit
    and df = Lb_ddf(l, vcov(ML fit), Φ_A): the REML refit's P and W with the ML fit's Φ."""
    kr = res.__dict__.get("_emmeans_reml_kr")
    if kr is None:
        reml = type(res.model)._from_backend(res.structure, True, res.model.backend).fit().kenward_roger
        kr = KenwardRogerInfo(reml.names, res.vcov.to_numpy(), reml.vcov_adj, reml.P, reml.W,
                              res.fixef.to_numpy(), res.sigma)
        res.__dict__["_emmeans_reml_kr"] = kr
    return DenominatorDF(kr.df_contrast, None, kr.vcov_adj)


def emmeans_df(res, df_method=None, pbkrtest_limit: int = PBKRTEST_LIMIT,
               lmerTest_limit: int = LMERTEST_LIMIT) -> tuple[str, DenominatorDF, list[str]]:
    """(method, its DenominatorDF, notes): emmeans 1.8.4's choice of df for an lmer fit
    (module docstring); ``df_method`` None means emmeans' default, ``"kenward-roger"``."""
    key = "kenwardroger" if df_method is None else str(df_method).lower().replace("-", "").replace("_", "")
    mode = _DF_NAMES.get(key)
    if mode is None:
        raise ArgumentError(f"unknown df_method {df_method!r}; choose 'kenward-roger', 'satterthwaite' or 'asymptotic'")
    n = int(res.nobs)
    notes = []

    def too_big(pkg: str, limit: int) -> str:
        return (f"Note: D.f. calculations have been disabled because the number of observations exceeds {limit}. "
                f"To enable adjustments, pass {pkg}_limit={n} (or larger); but be warned that this may result in "
                "large computation time and memory use.")
    if mode == "kenward-roger" and n > pbkrtest_limit:
        notes.append(too_big("pbkrtest", pbkrtest_limit))
        mode = "satterthwaite"
    if mode == "satterthwaite" and n > lmerTest_limit:
        notes.append(too_big("lmerTest", lmerTest_limit))
        mode = "kenward-roger" if n <= pbkrtest_limit else "asymptotic"
    if mode == "kenward-roger":
        dm = ddf_method(res, "kenward-roger") if res.REML else _kr_of_ml_fit(res)
    elif mode == "satterthwaite":
        dm = ddf_method(res, "satterthwaite")
    else:
        dm = ddf_method(res, "normal")
    return mode, dm, notes


def _parse_specs(specs, by) -> tuple[list[str], list[str], bool]:
    """(spec variables, by variables, pairwise) from ``"~ A | B"``, ``"pairwise ~ A"``, ``"A"`` or a list."""
    pairwise = False
    if isinstance(specs, str):
        text = specs.strip()
        if "~" in text:
            lhs, text = text.split("~", 1)
            lhs = lhs.strip()
            if lhs == "pairwise":
                pairwise = True
            elif lhs:
                raise ArgumentError(f"specs {specs!r}: only 'pairwise ~ ...' is supported on the left of '~'")
        spec_part, _, by_part = text.partition("|")
        split = lambda t: [v.strip() for v in re.split(r"[+*:]", t) if v.strip()]
        svars, bvars = split(spec_part), split(by_part)
    elif isinstance(specs, (list, tuple)):
        svars, bvars = [str(v) for v in specs], []
    else:
        raise ArgumentError(f"specs must be a formula string such as '~ A | B' or a list of names, got {specs!r}")
    if by is not None:
        bvars += [by] if isinstance(by, str) else [str(v) for v in by]
    if not svars:
        raise ArgumentError(f"specs {specs!r} names no variable")
    return svars, list(dict.fromkeys(bvars)), pairwise


class _Table:
    """A result table that behaves like its DataFrame (``frame``) and prints as emmeans does."""
    frame: pd.DataFrame
    messages: list

    def to_frame(self) -> pd.DataFrame:
        return self.frame.copy()

    def __getitem__(self, key):
        return self.frame[key]

    def __len__(self) -> int:
        return len(self.frame)

    @property
    def columns(self):
        return self.frame.columns

    def _format(self, by: list[str]) -> str:
        out = []
        tab = self.frame
        groups = [((), tab)] if not by else list(tab.groupby(by, sort=False, observed=True))
        shown = [c for c in tab.columns if c not in by]
        for key, sub in groups:
            if by:
                key = key if isinstance(key, tuple) else (key,)
                out.append(", ".join(f"{b} = {_num_label(k) if isinstance(k, float) else k}"
                                     for b, k in zip(by, key)) + ":")
            out.append(_format_frame(sub[shown]))
            out.append("")
        out += list(self.messages)
        return "\n".join(out)


def _format_frame(df: pd.DataFrame) -> str:
    """Numbers to 3 significant digits of their column's scale, df to 1 decimal, p-values as R's
    emmeans prints them."""
    fmt = {}
    for c in df.columns:
        if c == "p.value":
            fmt[c] = lambda v: "NA" if pd.isna(v) else ("<.0001" if v < 1e-4 else f"{v:.4f}")
        elif c == "df":
            fmt[c] = lambda v: "NA" if pd.isna(v) else ("Inf" if np.isinf(v) else f"{v:.1f}")
        elif pd.api.types.is_float_dtype(df[c].dtype):
            fmt[c] = lambda v: "NA" if pd.isna(v) else f"{v:.4g}"
    return df.to_string(index=False, formatters=fmt)


@dataclass
class EMMeans(_Table):
    """Estimated marginal means (R's ``emmGrid`` summary with ``infer = TRUE``): ``frame`` has the
    spec and by columns, emmean, SE, df, lower.CL, upper.CL, t.ratio, p.value (z.ratio,
    asymp.LCL, asymp.UCL when every df is infinite); ``linfct`` the linear functions over the
    full design's columns; ``df_method`` the df method used; ``vcov`` the Var(β̂) used."""
    frame: pd.DataFrame
    specs: list
    by: list
    df_method: str
    level: float
    messages: list
    linfct: pd.DataFrame
    vcov: pd.DataFrame
    contrasts: EMMContrasts | None = None
    _res: object = field(default=None, repr=False)
    _grid: ReferenceGrid | None = field(default=None, repr=False)
    _dm: DenominatorDF | None = field(default=None, repr=False)
    _L: np.ndarray | None = field(default=None, repr=False)
    _labels: list | None = field(default=None, repr=False)

    def pairs(self, adjust: str = "tukey", level: float | None = None) -> EMMContrasts:
        """All pairwise differences of the means within each ``by`` group (emmeans' ``pairs``),
        with p-values and intervals adjusted by ``adjust`` over each group (module docstring)."""
        return _pairwise(self, adjust, self.level if level is None else check_level(level))

    def contrast(self, method: str = "pairwise", adjust: str | None = None, level: float | None = None) -> EMMContrasts:
        """emmeans' ``contrast(emm, method)``; ``"pairwise"`` (the same as :meth:`pairs`) is
        the method supported; ``adjust`` defaults to ``"tukey"`` as for pairs."""
        if method != "pairwise":
            raise ArgumentError(f"contrast method {method!r} is not supported; use 'pairwise'")
        return self.pairs("tukey" if adjust is None else adjust, level)

    def __str__(self) -> str:
        text = self._format(self.by)
        if self.contrasts is not None:
            text = "$emmeans\n" + text + "\n\n$contrasts\n" + str(self.contrasts)
        return text

    __repr__ = __str__


@dataclass
class EMMContrasts(_Table):
    """Pairwise contrasts of marginal means (emmeans' ``pairs`` summary with ``infer = TRUE``):
    ``frame`` has contrast, the by columns, estimate, SE, df, lower.CL, upper.CL, t.ratio,
    p.value; ``adjust`` the adjustment applied (``"none"`` for one-contrast families),
    ``family_size`` the means per family, ``n_contrasts`` the contrasts per family, ``linfct``
    the contrasts' linear functions over the full design's columns."""
    frame: pd.DataFrame
    by: list
    adjust: str
    family_size: int
    n_contrasts: int
    level: float
    messages: list
    linfct: pd.DataFrame

    def __str__(self) -> str:
        return self._format(self.by)

    __repr__ = __str__


def _zapsmall(x: np.ndarray, digits: int = 7) -> np.ndarray:
    """R's zapsmall (emmeans rounds the df so before the studentized range)."""
    fin = x[np.isfinite(x)]
    mx = float(np.max(np.abs(fin))) if fin.size else 0.0
    d = max(0, digits - math.ceil(math.log10(mx))) if mx > 0 else digits
    return np.where(np.isfinite(x), np.round(x, d), x)


def _holm(p: np.ndarray, n: int) -> np.ndarray:
    """R's ``p.adjust(p, "holm", n)``: NaN stay NaN, the others step down from n."""
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(~np.isnan(p))
    if ok.size:
        o = ok[np.argsort(p[ok], kind="stable")]
        adj = np.minimum(1.0, np.maximum.accumulate((n - np.arange(o.size)) * p[o]))
        out[o] = adj
    return out


def _adjusted(t: np.ndarray, df: np.ndarray, adjust: str, k: int, m: int, level: float) -> tuple[np.ndarray, np.ndarray]:
    """(adjusted p-values, critical values) of one family of m pairwise contrasts of k means."""
    dfi = np.where(np.isnan(df), np.inf, df)
    p = _t_sf2(t, dfi)
    ok = ~np.isnan(t)
    crit = np.full(t.shape, np.nan)
    if adjust == "tukey":
        pv = np.full(t.shape, np.nan)
        if ok.any():
            pv[ok] = stats.studentized_range.sf(math.sqrt(2.0) * np.abs(t[ok]), k, _zapsmall(dfi[ok]))
            # one quantile per distinct df (each costs a root search over a double integral); df that
            # agree to 12 digits share it, which moves it by less than 1e-12 relative
            key = np.array([float(f"{d:.12g}") for d in dfi[ok]])
            uniq, inv = np.unique(key, return_inverse=True)
            crit[ok] = (stats.studentized_range.ppf(level, k, uniq) / math.sqrt(2.0))[np.asarray(inv).ravel()]
        return pv, crit
    a = (1.0 - level) / 2.0
    if adjust in ("bonferroni", "holm"):
        crit[ok] = stats.t.isf(a / m, dfi[ok])
        return (np.minimum(1.0, p * m) if adjust == "bonferroni" else _holm(p, m)), crit
    crit[ok] = stats.t.isf(a, dfi[ok])
    return p, crit


def _pairwise(emm: EMMeans, adjust: str, level: float) -> EMMContrasts:
    adjust = str(adjust).lower()
    if adjust not in ADJUST_METHODS:
        raise ArgumentError(f"unknown adjust {adjust!r}; choose one of {', '.join(map(repr, ADJUST_METHODS))}")
    tab = emm.frame
    groups = [np.arange(len(tab))] if not emm.by else \
        [np.asarray(ix) for ix in tab.groupby(emm.by, sort=False, observed=True).indices.values()]
    k = len(groups[0])
    m = k * (k - 1) // 2
    if m == 0:
        raise ArgumentError(f"pairwise contrasts need at least two means per group; {emm.specs} has one")
    used = "none" if m == 1 else adjust
    D = _pairs(k)
    frames, Ls = [], []
    for rows in groups:
        L = D @ emm._L[rows]
        e = estimate(emm._res, emm._grid, L, emm._dm)
        pv, crit = _adjusted(e.t, e.df, used, k, m, level)
        labels = [emm._labels[r] for r in rows]
        part = {"contrast": [f"{labels[i]} - {labels[j]}" for i, j in itertools.combinations(range(k), 2)]}
        for b in emm.by:
            part[b] = [tab[b].iloc[rows[0]]] * m
        part.update({"estimate": e.estimate, "SE": e.se, "df": e.df, "lower.CL": e.estimate - crit * e.se,
                     "upper.CL": e.estimate + crit * e.se, "t.ratio": e.t, "p.value": pv})
        frames.append(pd.DataFrame(part))
        Ls.append(pd.DataFrame(L, index=part["contrast"], columns=list(emm._grid.names)))
    frame = _z_names(pd.concat(frames, ignore_index=True))
    msgs = [f"Degrees-of-freedom method: {emm.df_method}", f"Confidence level used: {level:g}"]
    if used == "tukey":
        if k >= 3:
            msgs += [f"Conf-level adjustment: tukey method for comparing a family of {k} estimates",
                     f"P value adjustment: tukey method for comparing a family of {k} estimates"]
    elif used in ("bonferroni", "holm"):
        msgs += [f"Conf-level adjustment: bonferroni method for {m} estimates",
                 f"P value adjustment: {used} method for {m} tests"]
    return EMMContrasts(frame=frame, by=list(emm.by), adjust=used, family_size=k, n_contrasts=m, level=level,
                        messages=msgs, linfct=pd.concat(Ls))


def _z_names(frame: pd.DataFrame) -> pd.DataFrame:
    """emmeans' asymptotic column names when every df is infinite or missing."""
    if len(frame) and bool(np.all(np.isnan(frame["df"]) | np.isinf(frame["df"]))):
        frame = frame.rename(columns={"lower.CL": "asymp.LCL", "upper.CL": "asymp.UCL", "t.ratio": "z.ratio"})
    return frame


def emmeans(res, specs, by=None, pairwise: bool = False, adjust: str = "tukey", level: float = 0.95,
            at: dict | None = None, df_method: str | None = None, pbkrtest_limit: int = PBKRTEST_LIMIT,
            lmerTest_limit: int = LMERTEST_LIMIT) -> EMMeans:
    """R's ``emmeans(fit, specs, by, at, lmer.df)`` on an lmer fit (module docstring), with
    ``pairwise=True`` (or ``"pairwise ~ A"``) also its ``pairs(, adjust)`` in ``.contrasts``."""
    level = check_level(level)
    svars, bvars, pw = _parse_specs(specs, by)
    grid = reference_grid(res, at)
    for v in svars + bvars:
        if v not in grid.variables:
            raise ArgumentError(f"specs/by: {v!r} is not a variable of the fixed effects "
                                f"(variables: {', '.join(map(repr, grid.variables))})")
    over = list(dict.fromkeys(svars + bvars))
    mode, dm, notes = emmeans_df(res, df_method, pbkrtest_limit, lmerTest_limit)
    L, combos = grid.average(over)
    e = estimate(res, grid, L, dm)
    with np.errstate(invalid="ignore"):
        q = stats.t.isf((1.0 - level) / 2.0, np.where(np.isnan(e.df), np.inf, e.df))
    # factor columns hold the level labels, covariate columns their values (as emmeans' grid)
    part = {v: [grid.labels(v)[c] if v in grid.factors else grid.variables[v][c] for c in combos[:, j]]
            for j, v in enumerate(over)}
    frame = pd.DataFrame({**part, "emmean": e.estimate, "SE": e.se, "df": e.df, "lower.CL": e.estimate - q * e.se,
                          "upper.CL": e.estimate + q * e.se, "t.ratio": e.t, "p.value": _t_sf2(e.t, e.df)})
    frame = _z_names(frame)
    averaged = [v for v in grid.factors if v not in over and len(grid.variables[v]) > 1]
    msgs = list(notes)
    if averaged:
        msgs.append(f"Results are averaged over the levels of: {', '.join(averaged)}")
    msgs += [f"Degrees-of-freedom method: {mode}", f"Confidence level used: {level:g}"]
    # contrast labels: a spec variable whose values all read as numbers is prefixed by its name
    label_parts = []
    for v in svars:
        labs = grid.labels(v)
        numeric = all(_is_number(x) for x in labs)
        label_parts.append([f"{v}{labs[c]}" if numeric else labs[c] for c in combos[:, over.index(v)]])
    labels = [" ".join(t) for t in zip(*label_parts)]
    labels = [f"({x})" if re.search(r"-|\+|/|\*", x) else x for x in labels]
    fnames = list(grid.names)
    emm = EMMeans(frame=frame, specs=svars, by=bvars, df_method=mode, level=level, messages=msgs,
                  linfct=pd.DataFrame(L, columns=fnames), vcov=pd.DataFrame(dm.vcov, index=res.fixef.index,
                                                                           columns=res.fixef.index),
                  _res=res, _grid=grid, _dm=dm, _L=L, _labels=labels)
    if pairwise or pw:
        emm.contrasts = emm.pairs(adjust)
    return emm


def _is_number(x: str) -> bool:
    try:
        float(x)
    except ValueError:
        return False
    return True
