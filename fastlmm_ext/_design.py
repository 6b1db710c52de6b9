"""From formula and data to the frozen model structure: y, X, Z and the random-effects terms.

Model (lme4's notation):  y = Xβ + Zb + offset + ε,  b = Λ_θ u,  u ~ N(0, σ² I),  ε ~ N(0, σ² W⁻¹).

* X comes from formulaic, the formula read in R's dialect by ``_rformula`` (nothing in it is
  run as Python code), with R's contrasts (``_contrasts``: treatment by default, contr.poly for
  ordered factors, the user's ``contrasts=``) and columns named as R names them
  ("(Intercept)", "metali", "recipeB:temperature.L", "poly(conc, 2)1").
* Z is assembled directly from integer level codes and each term's small dense model
  matrix: for term i with k_i columns and ℓ_i levels, Z_i has k_i·ℓ_i columns ordered level
  by level, so Λ_i = I_{ℓ_i} ⊗ T_i with T_i lower triangular (k_i × k_i).
* Terms are sorted by decreasing number of levels (stable), as lme4 does; θ stacks each
  T_i's lower triangle column by column in that order.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import scipy.linalg as la
import scipy.sparse as sp
from . import _params
from ._contrasts import check_contrast_names, default_contrasts, resolve_contrasts
from ._data import (RowsAt, as_frame, as_numeric_array, check_columns, check_weights, combine_factors,
                    drop_missing, factor_codes, is_factor_dtype, prepare_factors)
from ._exceptions import (DataError, FormulaError, GroupingFactorError, IdentifiabilityError,
                          RankDeficiencyWarning)
from ._formula import ParsedFormula, parse_formula
from ._ols import raise_if_exact_rows, response_shift
from ._rformula import RExpr, evaluate_vector, model_matrix, parse_expr, r_column_names, translate
from ._simple_design import DeferredSpec, simple_model_matrix

__all__ = ["ReTerm", "ModelStructure", "build_structure", "basis_rows", "independent_columns"]


@dataclass(frozen=True)
class ReTerm:
    """One random-effects term ``(expr | factor)`` after expansion of ``/`` and ``||``."""
    name: str                 # unique label used in VarCorr ("Subject", "Subject.1", "dept:service")
    factor: str               # grouping factor label ("Subject", "a:b")
    group_columns: tuple[str, ...]
    expr: str                 # formulaic right-hand side of the term's model matrix
    cnms: tuple[str, ...]     # R-style column names of the term's model matrix
    levels: tuple[str, ...]   # level labels of the grouping factor
    codes: np.ndarray | None  # int64[n] level code of each observation (None: built from cross-products)
    Xi: np.ndarray | None     # float64[n, k] the term's model matrix (None: built from cross-products)
    col_offset: int           # first column of this term in Z
    theta_offset: int         # first element of this term's θ
    ncols: int = -1           # k, when Xi is not kept
    spec: object = field(default=None, repr=False, compare=False)   # formulaic ModelSpec of Xi, for new data

    @property
    def k(self) -> int:
        return self.Xi.shape[1] if self.Xi is not None else self.ncols

    @property
    def nlevels(self) -> int:
        return len(self.levels)

    @property
    def q(self) -> int:
        return self.k * self.nlevels

    @property
    def ntheta(self) -> int:
        return self.k * (self.k + 1) // 2

    def T(self, theta: np.ndarray) -> np.ndarray:
        """The k×k lower-triangular relative covariance factor of this term at θ (``_params``)."""
        return _params.term_T(self, theta)


class _AssembledOnUse:
    """The ``Z`` field of :class:`ModelStructure`: given (or None) at construction, and for a
    structure with rows assembled from the terms' level codes and model matrices on first use
    (:func:`assemble_Z`), so that a fit that needs only the cross-products (one term: its level
    sums, ``_crossprod``) never builds the n × q sparse matrix.  A data descriptor as a dataclass
    field: the class access raises AttributeError, so the field keeps no default."""

    def __get__(self, obj, owner=None):
        if obj is None:
            raise AttributeError("Z")
        Z = obj.__dict__.get("_Z")
        if Z is None and obj.__dict__.get("y") is not None:
            Z = obj.__dict__["_Z"] = assemble_Z(list(obj.terms), obj.n)
        return Z

    def __set__(self, obj, value) -> None:
        obj.__dict__["_Z"] = value


class _FramedOnUse:
    """The ``fixed_rows`` field of :class:`ModelStructure`: a DataFrame, None, or a
    :class:`RowsAt` that becomes its DataFrame on first use (only the ANOVA hypotheses read it,
    and building a DataFrame costs a small fit a noticeable share of its time).  Its class
    access gives the field's default, None."""

    def __get__(self, obj, owner=None):
        if obj is None:
            return None
        v = obj.__dict__.get("_fixed_rows")
        if isinstance(v, RowsAt):
            v = obj.__dict__["_fixed_rows"] = v.frame()
        return v

    def __set__(self, obj, value) -> None:
        obj.__dict__["_fixed_rows"] = None if value is self else value   # the default is the descriptor


@dataclass(frozen=True)
class ModelStructure:
    """Everything the criterion needs, fixed once per model (θ-independent).

    A structure built from accumulated cross-products (``lmer_chunked``, Dask) keeps no rows:
    ``y``, ``X``, ``Z`` and the terms' ``codes``/``Xi`` are None, ``nobs`` holds n and
    ``has_rows`` is False; everything that needs only the cross-products still works.  With
    rows, ``Z`` is assembled when first used (``_AssembledOnUse``)."""
    formula: str
    parsed: ParsedFormula
    response: str
    y: np.ndarray | None           # float64[n]
    X: np.ndarray | None           # float64[n, p] (rank-deficient columns already dropped)
    fixef_names: tuple[str, ...]
    dropped_fixef: tuple[str, ...]
    terms: tuple[ReTerm, ...]
    Z: sp.csc_matrix | None = _AssembledOnUse()   # n × q (no default: see _AssembledOnUse)
    offset: np.ndarray | None
    weights: np.ndarray | None
    n_dropped: int
    row_index: pd.Index
    fixed_spec: object = field(repr=False, default=None)   # formulaic ModelSpec for new data
    factor_levels: dict = field(default_factory=dict)       # grouping factor -> levels
    variable_levels: dict = field(default_factory=dict)     # factor column -> (categories, ordered)
    nobs: int | None = None        # n for a structure without rows
    prior_weights: bool = False    # weights were given (for a structure without rows)
    allow_python: bool = False     # the formula's terms were evaluated as Python (see _rformula)
    contrasts: dict = field(default_factory=dict)   # factor column -> RContrasts of the fixed part (non-treatment)
    # For the ANOVA hypotheses (lmerTest builds them from the data): the fixed part's data columns
    # at a few rows on which X has its full rank (basis_rows), and the unweighted XᵀX.
    fixed_rows: pd.DataFrame | None = field(default=_FramedOnUse(), repr=False, compare=False)
    fixed_gram: np.ndarray | None = field(default=None, repr=False, compare=False)
    # For marginal means (_means): the fixed part's numeric variables at their means over the used
    # rows, and the dropped columns of X as combinations of the kept ones (alias_matrix).
    covariate_means: dict = field(default_factory=dict)
    aliased: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def has_rows(self) -> bool:
        return self.y is not None

    @property
    def weighted(self) -> bool:
        return self.weights is not None or self.prior_weights

    @property
    def n(self) -> int:
        return self.y.shape[0] if self.y is not None else int(self.nobs)

    @property
    def p(self) -> int:
        return len(self.fixef_names)

    @property
    def q(self) -> int:
        return sum(t.q for t in self.terms)

    def require_rows(self, what: str) -> None:
        """Raise a clear error for row-level quantities of a model fitted from cross-products."""
        if not self.has_rows:
            raise DataError(f"{what} needs the model's rows, but this model was fitted from accumulated "
                            "cross-products (lmer_chunked / a Dask DataFrame); use predict(newdata) on the rows "
                            "of interest instead")

    @property
    def ntheta(self) -> int:
        return sum(t.ntheta for t in self.terms)

    @property
    def lower(self) -> np.ndarray:
        """Lower bounds of θ: 0 for diagonal elements of each T, -inf elsewhere (``_params``)."""
        return _params.lower_bounds(self.terms)

    @property
    def theta0(self) -> np.ndarray:
        """lme4's start: 1 on the diagonal of each T, 0 off it."""
        return _params.theta_start(self.terms)

    @property
    def theta_names(self) -> list[str]:
        """lme4's names: 'g.(Intercept)', 'g.Days.(Intercept)', 'g.Days'."""
        return _params.theta_names(self.terms)

    def __getstate__(self) -> dict:
        # Z is assembled from the terms' level codes and model matrices (again on first use after
        # loading): pickle those, not the same rows a second time.
        return {**self.__dict__, "_Z": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    def Lambda(self, theta: np.ndarray) -> sp.csc_matrix:
        """Λ_θ = blockdiag over terms of (I_ℓ ⊗ T_i), a sparse q × q lower-triangular matrix."""
        return _params.Lambda(self.terms, theta)

    def Lambda_dot(self, theta: np.ndarray, x: np.ndarray, transpose: bool = False) -> np.ndarray:
        """Λ_θ x (Λ_θᵀ x with ``transpose``) for a q-vector or q × m array, without forming Λ_θ."""
        return _params.Lambda_dot(self.terms, theta, x, transpose)


# ----------------------------------------------------------------------------- names

def _unique_names(labels: list[str]) -> list[str]:
    """R's make.unique: the second 'Subject' becomes 'Subject.1', and so on."""
    seen: dict[str, int] = {}
    out = []
    for lab in labels:
        if lab in seen:
            seen[lab] += 1
            out.append(f"{lab}.{seen[lab]}")
        else:
            seen[lab] = 0
            out.append(lab)
    return out


# ----------------------------------------------------------------------------- building

def _variables(rhs: str, where: str, columns=(), allow_python: bool = False) -> set[str]:
    """Data columns a right-hand side reads (its terms are checked by ``_rformula.translate``)."""
    return set(translate(rhs, columns, allow_python, where).columns)


def _expr(text: str, columns, allow_python: bool, what: str) -> RExpr:
    """The response or an offset, parsed and checked."""
    try:
        return parse_expr(text, columns, allow_python)
    except FormulaError as e:
        raise FormulaError(f"{what} {text!r}: {e}") from None


def _vector_arg(arg, df: pd.DataFrame, name: str) -> np.ndarray | None:
    """weights= / offset= given as a column name or an array aligned with the data rows."""
    if arg is None:
        return None
    if isinstance(arg, str):
        check_columns(df, [arg])
        return as_numeric_array(df[arg], arg, what=f"{name} column")
    arr = as_numeric_array(arg if isinstance(arg, pd.Series) else np.asarray(arg), name, what="argument").ravel()
    if arr.shape[0] != len(df):
        raise DataError(f"{name} has length {arr.shape[0]} but data has {len(df)} rows")
    return arr


def rank_deficient_keep(G: np.ndarray, tol: float = 1e-7) -> list[int]:
    """Columns to keep given the Gram matrix G = XᵀX: column j stays only if its part
    orthogonal to the columns kept before it has norm above ``tol`` times its own norm (R's
    pivoting QR keeps the same columns).  A Cholesky that skips dependent columns, on G alone,
    so the chunked path can decide from accumulated cross-products."""
    p = G.shape[0]
    keep: list[int] = []
    Lk = np.zeros((p, p))
    for j in range(p):
        gjj = G[j, j]
        if gjj <= 0.0:
            continue
        if keep:
            m = len(keep)
            l = la.solve_triangular(Lk[:m, :m], G[keep, j], lower=True)
            r2 = gjj - l @ l
        else:
            l, r2 = np.zeros(0), gjj
        if np.sqrt(max(r2, 0.0)) > tol * np.sqrt(gjj):
            m = len(keep)
            Lk[m, :m] = l
            Lk[m, m] = np.sqrt(r2)
            keep.append(j)
    return keep


def independent_columns(M: np.ndarray, tol: float = 1e-7) -> list[int]:
    """:func:`rank_deficient_keep`'s rule on the columns of M itself rather than on MᵀM: column j
    stays if its residual on the columns kept before it has norm above ``tol`` times its own norm.
    The residual comes from Gram–Schmidt against an orthonormal basis of the kept columns, done
    twice, so it is not the difference of two nearly equal squares (the Gram rule's cancellation
    decides a column whose residual is about 1e-7 of its norm by rounding).  A tall M is first
    reduced to the triangle R of M = QR (LAPACK's Householder QR, whose backward error is small
    column by column): R's columns have M's relations and norms."""
    M = np.asarray(M, dtype=float)
    if M.shape[0] > M.shape[1]:
        M = np.linalg.qr(M, mode="r")
    Q = np.zeros((M.shape[0], 0))
    keep: list[int] = []
    for j in range(M.shape[1]):
        m = M[:, j]
        norm = np.linalg.norm(m)
        if norm == 0.0:
            continue
        r = m - Q @ (Q.T @ m)
        r -= Q @ (Q.T @ r)
        rn = np.linalg.norm(r)
        if rn > tol * norm:
            Q = np.column_stack([Q, r / rn])
            keep.append(j)
    return keep


def basis_rows(X: np.ndarray, G: np.ndarray, tol: float = 1e-7, rank: int | None = None) -> np.ndarray:
    """Sorted indices of a few rows of X on which X has its full rank r (the number of columns
    :func:`independent_columns` keeps; G = XᵀX gives the columns' norms): a linear relation among
    X's columns that holds on these rows holds on all.  A seeded sample of 2r + 8 rows; while the rank falls short, the rows farthest
    from the span of those chosen are added (pivoted QR of their residuals).  Columns are scaled
    to unit norm first, which changes no relation between rows.  ``rank``: r, when known."""
    n, p = X.shape
    if p == 0 or n == 0:
        return np.zeros(0, dtype=np.intp)
    d = np.sqrt(np.diag(G))
    Xs = X / np.where(d > 0, d, 1.0)
    r = len(independent_columns(Xs, tol)) if rank is None else rank
    if r == 0:
        return np.zeros(0, dtype=np.intp)
    S = np.sort(np.random.default_rng(0).choice(n, size=min(n, 2 * r + 8), replace=False))
    while len(S) < n:
        XS = Xs[S]
        have = len(independent_columns(XS, tol))
        if have >= r:
            break
        Q = la.orth(XS.T, rcond=tol)
        R = Xs - (Xs @ Q) @ Q.T
        far = np.flatnonzero(np.linalg.norm(R, axis=1) > tol * np.linalg.norm(Xs, axis=1))
        if not far.size:
            break
        piv = la.qr(R[far].T, mode="r", pivoting=True)[1]
        S = np.union1d(S, far[piv[:max(r - have, 1)]])
    return S


def alias_matrix(G: np.ndarray, keep: list[int]) -> np.ndarray | None:
    """C with X_dropped = X_kept C (kept × dropped), from G = XᵀX (or XᵀWX: W > 0 keeps the same
    relations): the columns the rank rule dropped are combinations of the kept ones, with
    coefficients C = G_kk⁻¹ G_kd (a solve with the Cholesky factor of G_kk).  None: nothing dropped."""
    drop = [j for j in range(G.shape[0]) if j not in set(keep)]
    if not drop:
        return None
    if not keep:
        return np.zeros((0, len(drop)))
    return la.cho_solve(la.cho_factor(G[np.ix_(keep, keep)]), G[np.ix_(keep, drop)])


def warn_rank_deficient(dropped: list[str]) -> None:
    if dropped:
        warnings.warn(f"fixed-effect model matrix is rank deficient so dropping {len(dropped)} "
                      f"column(s) / coefficient(s): {', '.join(dropped)}", RankDeficiencyWarning, stacklevel=4)


@dataclass(frozen=True)
class ModelVariables:
    """Which data columns a parsed formula reads, by role."""
    response: set[str]
    fixed: set[str]
    offsets: set[str]
    random: set[str]
    groups: list[str]
    extra: list[str]              # weights= / offset= given as column names

    @property
    def used(self) -> list[str]:
        return list(dict.fromkeys([*sorted(self.response), *sorted(self.fixed), *sorted(self.offsets),
                                   *sorted(self.random), *self.groups]))

    @property
    def all_columns(self) -> list[str]:
        return list(dict.fromkeys(self.used + self.extra))

    @property
    def frame_columns(self) -> list[str]:
        """Columns the model matrices read (a grouping-only column is not among them)."""
        read = self.response | self.fixed | self.random | self.offsets
        return [c for c in self.used if c not in self.groups or c in read]


def model_variables(parsed: ParsedFormula, columns, weights=None, offset=None,
                    allow_python: bool = False) -> ModelVariables:
    """The columns each part of the formula reads; every evaluated term is parsed and checked
    here, before any of them is evaluated (``_rformula``)."""
    cols = list(columns)
    groups: list[str] = []
    re_vars: set[str] = set()
    response = set(_expr(parsed.response, cols, allow_python, "response").columns)
    fixed = _variables(parsed.fixed, "the fixed effects", cols, allow_python)
    for rt in parsed.random:
        re_vars |= _variables(rt.expr, f"the random-effects term ({rt.expr} | {rt.group_name()})", cols,
                              allow_python)
        groups.extend(g for g in rt.group if g not in groups)
    off_vars = set().union(*[_expr(o, cols, allow_python, "offset").columns for o in parsed.offsets])
    return ModelVariables(response=response, fixed=fixed, offsets=off_vars, random=re_vars, groups=groups,
                          extra=[a for a in (weights, offset) if isinstance(a, str)])


def check_response_type(parsed: ParsedFormula, mv: ModelVariables, df: pd.DataFrame) -> None:
    """R refuses a factor response; so do we, naming the column."""
    for v in mv.response:
        if is_factor_dtype(df[v].dtype):
            raise DataError(f"response {parsed.response!r} must be numeric, but column {v!r} has type {df[v].dtype}")


@dataclass
class RowBlock:
    """What one block of complete rows contributes: y, the fixed-effects matrix, the offset and,
    per random-effects term (in formula order), its model matrix and grouping-factor codes."""
    y: np.ndarray | None     # None for new rows, which have no response
    X: np.ndarray
    fixef_names: list[str]
    fixed_spec: object
    offset: np.ndarray | None
    term_cnms: list[list[str]]
    term_Xi: list[np.ndarray]
    term_codes: list[np.ndarray]
    term_specs: list = field(default_factory=list)
    contrasts: dict = field(default_factory=dict)    # the fixed part's factor contrasts
    frame: pd.DataFrame | None = field(default=None, repr=False)   # the rows it was evaluated from


def evaluate_rows(parsed: ParsedFormula, frame: pd.DataFrame, group_codes, offset_arg=None,
                  fixed_spec=None, allow_python: bool = False, contrasts=None, *, response: bool = True,
                  random=None, finite: bool = True, simple: bool = False) -> RowBlock:
    """Evaluate the response, fixed effects, offsets and random-effects model matrices on
    ``frame`` (complete rows, factors already Categorical).  ``group_codes(group)`` gives the
    integer level codes of a grouping factor; ``fixed_spec`` (formulaic's ModelSpec of an earlier
    block) fixes the fixed-effects columns, so every chunk of a chunked fit gets the same ones.
    ``contrasts``: {column: RContrasts} of the fixed part's factors (checked names, see
    ``_contrasts``); the random-effects terms get R's defaults, as lme4 builds them.

    New rows (``_newdata``, lme4's mkNewReTrms reusing the term builder) pass ``response=False``
    (no y), ``random``: the terms to evaluate as (expr, group, spec) with each term's ModelSpec of
    the fit (its contrasts and transform state; default: every term of ``parsed``, built afresh),
    and ``finite=False`` (a non-finite value predicts NaN there instead of being refused).
    ``simple``: write the matrices of simple right-hand sides with NumPy (``_simple_design``),
    their model specs made when first used; a fit's own rows only (chunks and new rows are
    evaluated by the spec of the rows before them)."""
    n = len(frame)
    cols = list(frame.columns)
    y = None
    if response:
        # y: a bare column or an expression of columns (log(y)).
        ye = _expr(parsed.response, cols, allow_python, "response")
        if ye.tree is not None and ye.tree[0] == "col":
            y = as_numeric_array(frame[ye.tree[1]], parsed.response, what="response")
        else:
            y = evaluate_vector(ye, frame, "response")
        if not np.isfinite(y).all():
            raise DataError(f"response {parsed.response!r} has {int((~np.isfinite(y)).sum())} non-finite value(s) "
                            "after evaluation (e.g. log of a non-positive number)")

    if fixed_spec is None:
        tr = translate(parsed.fixed, cols, allow_python, "the fixed effects")
        fixed_contrasts = resolve_contrasts(contrasts or {}, frame, tr.variables)
        X, names, fixed_spec = _rhs_matrix(tr, frame, f"the fixed effects {parsed.fixed!r}", fixed_contrasts,
                                           allow_python, simple)
    else:
        fixed_contrasts = dict((fixed_spec.materializer_params or {}).get("contrasts", {}))
        Xmm = _from_spec(fixed_spec, frame, f"the fixed effects {parsed.fixed!r}")
        X = np.asarray(Xmm.to_numpy(dtype=np.float64), dtype=np.float64).reshape(n, -1)
        names = r_column_names(fixed_spec)
    if finite and not np.isfinite(X).all():
        bad = [c for c, ok in zip(names, np.isfinite(X).all(axis=0)) if not ok]
        raise DataError(f"fixed-effects columns {bad} have non-finite values")

    off_total = offset_arg
    for o in parsed.offsets:
        ov = evaluate_vector(_expr(o, cols, allow_python, "offset"), frame, "offset")
        off_total = ov if off_total is None else off_total + ov

    cnms, Xis, codes, specs = [], [], [], []
    for expr, group, spec in (random if random is not None else [(rt.expr, rt.group, None) for rt in parsed.random]):
        label = ":".join(group)
        where = f"the random-effects term ({expr} | {label})"
        if spec is None:
            tr = translate(expr, cols, allow_python, where)
            Xi, cnm, spec = _rhs_matrix(tr, frame, where, default_contrasts(frame, tr.variables), allow_python, simple)
        else:
            Zmm = _from_spec(spec, frame, where)
            Xi, cnm = Zmm.to_numpy(dtype=np.float64), r_column_names(spec)
        Xi = np.ascontiguousarray(Xi, dtype=np.float64).reshape(n, -1)
        if Xi.shape[1] == 0:
            raise FormulaError(f"random-effects term ({expr} | {label}) has no columns")
        if finite and not np.isfinite(Xi).all():
            raise DataError(f"random-effects term ({expr} | {label}) has non-finite values")
        cnms.append(cnm)
        Xis.append(Xi)
        specs.append(spec)
        codes.append(group_codes(group))
    return RowBlock(y=y, X=X, fixef_names=names, fixed_spec=fixed_spec, offset=off_total,
                    term_cnms=cnms, term_Xi=Xis, term_codes=codes, term_specs=specs, contrasts=fixed_contrasts,
                    frame=frame)


def _rhs_matrix(tr, frame: pd.DataFrame, where: str, contrasts: dict, allow_python: bool, simple: bool):
    """(matrix, R's column names, model spec) of the translated right-hand side ``tr`` on
    ``frame``: by ``_simple_design`` when ``simple`` and it applies (plain columns only, nothing
    evaluated), else by formulaic."""
    if simple and not allow_python and not tr.exprs and not tr.labels:
        got = simple_model_matrix(tr.text, frame, contrasts)
        if got is not None:
            def make(rows):
                return model_matrix(tr, rows, where, contrasts, allow_python).model_spec
            return got[0], got[1], DeferredSpec.of(make, frame, tr.columns)
    mm = model_matrix(tr, frame, where, contrasts, allow_python)
    return (np.asarray(mm.to_numpy(dtype=np.float64), dtype=np.float64).reshape(len(frame), -1),
            r_column_names(mm.model_spec), mm.model_spec)


def fixed_basis_rows(block: RowBlock, G: np.ndarray, columns, rank: int | None = None) -> RowsAt:
    """The data columns of the fixed part at the rows :func:`basis_rows` picks from the block's
    X (G its XᵀX): what ``ModelStructure.fixed_rows`` keeps for the ANOVA hypotheses."""
    return RowsAt.take(block.frame, columns, basis_rows(block.X, G, rank=rank))


def _from_spec(spec, frame: pd.DataFrame, what: str):
    """The model matrix of ``frame`` by a ModelSpec of earlier rows (same columns, levels, contrasts
    and transform state); formulaic's errors become a FormulaError naming ``what``."""
    try:
        return spec.get_model_matrix(frame, output="pandas", na_action="ignore")
    except FormulaError:
        raise
    except Exception as e:
        raise FormulaError(f"cannot build the model matrix of {what}: {e}") from e


def check_term_size(label: str, expr: str, nlevels: int, k: int, n: int) -> None:
    """lme4's checks on a random-effects term: > 1 level, fewer levels than observations, and
    fewer random effects than observations."""
    if nlevels < 2:
        raise GroupingFactorError(
            f"grouping factor {label!r} has {nlevels} level; grouping factors must have > 1 sampled level")
    if nlevels >= n:
        raise IdentifiabilityError(
            f"number of levels of grouping factor {label!r} ({nlevels}) must be < number of "
            f"observations ({n}); the random effects and the residual variance are unidentifiable")
    if k * nlevels >= n:
        raise IdentifiabilityError(
            f"number of observations ({n}) <= number of random effects ({k * nlevels}) "
            f"for term ({expr} | {label}); the random-effects parameters and the residual "
            "variance are probably unidentifiable")


def order_terms(parsed: ParsedFormula, term_cnms, term_levels, term_codes=None, term_Xi=None,
                term_specs=None) -> list[ReTerm]:
    """ReTerms in lme4's order (decreasing number of levels, stable) with column and θ offsets.
    ``term_codes``/``term_Xi`` are None for a structure built from cross-products alone;
    ``term_specs`` are the terms' model specs (for predicting on new data)."""
    m = len(parsed.random)
    order = sorted(range(m), key=lambda i: -len(term_levels[i]))
    names = _unique_names([":".join(parsed.random[i].group) for i in order])
    terms, col, th = [], 0, 0
    for nm, i in zip(names, order):
        rt = parsed.random[i]
        t = ReTerm(name=nm, factor=":".join(rt.group), group_columns=tuple(rt.group), expr=rt.expr,
                   cnms=tuple(term_cnms[i]), levels=tuple(term_levels[i]),
                   codes=None if term_codes is None else term_codes[i],
                   Xi=None if term_Xi is None else term_Xi[i], col_offset=col, theta_offset=th,
                   ncols=len(term_cnms[i]), spec=None if term_specs is None else term_specs[i])
        terms.append(t)
        col += t.q
        th += t.ntheta
    return terms


def build_structure(formula: str, data, weights=None, offset=None, allow_python: bool = False,
                    contrasts=None) -> ModelStructure:
    """Parse ``formula``, check ``data`` and assemble y, X, Z and the sorted random terms.

    ``allow_python``: evaluate terms that are not R's dialect as Python (they can run any code);
    ``contrasts``: {factor column: contrast} for the fixed part (``_contrasts``)."""
    if not isinstance(formula, str):
        raise FormulaError(f"formula must be a string, got {type(formula).__name__}")
    parsed = parse_formula(formula)
    df = as_frame(data)
    if len(df) == 0:
        raise DataError("data has no rows")

    mv = model_variables(parsed, df.columns, weights, offset, allow_python)
    user_contrasts = check_contrast_names(contrasts, df.columns)
    check_columns(df, mv.all_columns)

    w_all = _vector_arg(weights, df, "weights")
    o_all = _vector_arg(offset, df, "offset")
    df2, keep_mask = drop_missing(df, mv.all_columns)
    n_dropped = int(len(df) - keep_mask.sum())
    if w_all is not None and not isinstance(weights, str):
        w_all = w_all[keep_mask]
        if np.isnan(w_all).any():
            raise DataError(f"weights (an array) has {int(np.isnan(w_all).sum())} missing value(s) in rows the model "
                            "uses; give every used row a weight, or pass the weights as a column of data (rows "
                            "missing a weight are then dropped)")
    elif w_all is not None:
        w_all = as_numeric_array(df2[weights], weights, what="weights column")
    if o_all is not None and not isinstance(offset, str):
        o_all = o_all[keep_mask]
        if np.isnan(o_all).any():
            raise DataError(f"offset (an array) has {int(np.isnan(o_all).sum())} missing value(s) in rows the model "
                            "uses; give every used row an offset, or pass it as a column of data")
    elif o_all is not None:
        o_all = as_numeric_array(df2[offset], offset, what="offset column")
    if w_all is not None:
        check_weights(w_all, f"weights column {weights!r}" if isinstance(weights, str) else "weights")

    check_response_type(parsed, mv, df2)
    frame = prepare_factors(df2, mv.frame_columns)
    n = len(df2)

    term_levels: list[list[str]] = []

    def group_codes(group):
        codes, levels = _group_codes(df2, group)
        term_levels.append(levels)
        return codes

    rows = evaluate_rows(parsed, frame, group_codes, offset_arg=o_all, allow_python=allow_python,
                         contrasts=user_contrasts, simple=True)
    G = rows.X.T @ rows.X
    keep = independent_columns(rows.X)          # lme4 decides on X itself (pivoted QR, tol 1e-7)
    dropped = [nm for j, nm in enumerate(rows.fixef_names) if j not in keep]
    X, fixef_names = rows.X[:, keep], [rows.fixef_names[j] for j in keep]
    warn_rank_deficient(dropped)
    yt, _, r = response_shift(rows.y, X, rows.offset, w_all)
    raise_if_exact_rows(yt, r, w_all, f"response {parsed.response!r}", X.shape[1])

    factor_levels: dict[str, list[str]] = {}
    for rt, levels, Xi in zip(parsed.random, term_levels, rows.term_Xi):
        label = ":".join(rt.group)
        check_term_size(label, rt.expr, len(levels), Xi.shape[1], n)
        factor_levels[label] = levels
    terms = order_terms(parsed, rows.term_cnms, term_levels, rows.term_codes, rows.term_Xi, rows.term_specs)

    return ModelStructure(
        formula=formula, parsed=parsed, response=parsed.response, y=rows.y, X=np.asfortranarray(X),
        fixef_names=tuple(fixef_names), dropped_fixef=tuple(dropped), terms=tuple(terms),
        Z=None, offset=rows.offset, weights=w_all, n_dropped=n_dropped,
        row_index=df2.index, fixed_spec=rows.fixed_spec, factor_levels=factor_levels,
        variable_levels=variable_levels_of(frame), allow_python=bool(allow_python), contrasts=rows.contrasts,
        fixed_rows=fixed_basis_rows(rows, G, mv.fixed, len(keep)), fixed_gram=G[np.ix_(keep, keep)],
        covariate_means={c: float(np.mean(frame[c].to_numpy())) for c in sorted(mv.fixed)
                         if c in frame.columns and not isinstance(frame[c].dtype, pd.CategoricalDtype)},
        aliased=alias_matrix(G, keep))


def variable_levels_of(frame: pd.DataFrame) -> dict:
    """Categories (and orderedness) of every factor column the model matrices read, for predict."""
    out = {}
    for c in frame.columns:
        dt = frame[c].dtype
        if isinstance(dt, pd.CategoricalDtype):
            out[str(c)] = (dt.categories.tolist(), bool(dt.ordered))
    return out


def _group_codes(df: pd.DataFrame, group: tuple[str, ...]) -> tuple[np.ndarray, list[str]]:
    """Codes and labels of a grouping factor; an interaction a:b keeps only the combinations
    present, ordered with the first factor varying slowest, labelled 'a_level:b_level'
    (``_data.combine_factors``)."""
    codes, levels = zip(*(factor_codes(df[g], g) for g in group))
    out, labels, _ = combine_factors(list(codes), list(levels))
    return out, labels


def assemble_Z(terms: list[ReTerm], n: int) -> sp.csc_matrix:
    """Z = [Z_1 ... Z_m] from level codes: observation r, level c of term i, column j of the
    term's model matrix sits at Z[r, offset_i + c·k_i + j].  Every row holds exactly Σ k_i
    entries, already in column order, so the CSR arrays are written directly (no per-row loop,
    no sort) and converted to CSC once."""
    q = sum(t.q for t in terms)
    m = sum(t.k for t in terms)
    if m == 0:
        return sp.csc_matrix((n, q))
    itype = np.int32 if q < 2**31 - 1 and n * m < 2**31 - 1 else np.int64
    cols = np.empty((n, m), dtype=itype)
    vals = np.empty((n, m), dtype=np.float64)
    pos = 0
    for t in terms:
        base = t.col_offset + t.codes * t.k
        for j in range(t.k):
            cols[:, pos] = base + j
            vals[:, pos] = t.Xi[:, j]
            pos += 1
    indptr = np.arange(0, n * m + 1, m, dtype=itype)
    Z = sp.csr_matrix((vals.ravel(), cols.ravel(), indptr), shape=(n, q))
    Z.has_sorted_indices = True
    return Z.tocsc()
