"""Predictions, residuals, simulation and the parametric bootstrap of a fitted model.

Model (lme4's notation):  y = Xβ + offset + Zb + ε,  b = Λ_θ u,  u ~ N(0, σ² I_q),  ε ~ N(0, σ² W⁻¹).

* ``predict``  (lme4's ``predict.merMod``):  ŷ = X_new β̂ + offset_new + Σ_i Z_i,new b̂_i over the
  random-effects terms i kept by ``re_form``;  Z_i,new holds the term's model-matrix row of each
  new observation in the columns of its level, so Z_i,new b̂_i = Σ_j X_i[r, j] · b̂_i[level(r), j].
  A level not seen in the fit contributes 0 (the mean of b) when ``allow_new_levels=True``.
* ``residuals`` (lme4's ``residuals.merMod``):  response  r = y − ŷ;  Pearson  √w (y − ŷ);
  ``scaled=True`` divides by σ̂.
* ``simulate`` (lme4's ``simulate.merMod``, ``re.form = NA``):
  y* = Xβ̂ + offset + Z Λ_θ̂ u* σ̂ + ε* σ̂/√w,  u* ~ N(0, I_q),  ε* ~ N(0, I_n).
* ``bootstrap`` (lme4's ``bootMer`` + ``confint(method = "boot")``): refit every simulated y* on
  the same design and record θ, σ, β and the SDs/correlations of each term
  (per term Σ_i = σ² T_i T_iᵀ: SDs √diag Σ_i on the diagonal of T's lower triangle, correlations
  Σ_i[a, b]/(sd_a sd_b) off it, in θ's column-wise order, named ``.sig01``, ``.sig02``, ...).
* ``ranef_table``: ``as.data.frame(ranef(fit, condVar = TRUE))``.
"""
from __future__ import annotations

import dataclasses
import math
import os
import pickle
import re
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool

import numpy as np
import pandas as pd
from scipy import stats

from ._data import _label, check_columns, is_factor_dtype
from ._exceptions import DataError
from ._inference import _format_pct, confint_row_names, select_parm
from ._params import Cv_to_Sv
from ._progress import Progress

__all__ = ["BootstrapResult", "PredictMixin"]

_NA_FORMS = {"~0", "~-1", "~1-1", "na", "~na", "nan"}


# ----------------------------------------------------------------------------- small helpers

def _is_population_form(re_form) -> bool:
    """re_form values meaning "no random effects": lme4's ``NA`` / ``~0``."""
    if re_form is False:
        return True
    if isinstance(re_form, float) and math.isnan(re_form):
        return True
    if isinstance(re_form, str):
        return re.sub(r"\s+", "", re_form).lower() in _NA_FORMS
    return False


def _selected_terms(structure, re_form) -> list[int]:
    """Indices of the random-effects terms kept by ``re_form``.

    None → all terms; ``"~0"`` / ``"NA"`` / ``False`` / NaN → none; a formula of random terms
    such as ``"~ (1 | Subject)"`` → the terms it names (each must be a term of the model)."""
    if re_form is None:
        return list(range(len(structure.terms)))
    if _is_population_form(re_form):
        return []
    if not isinstance(re_form, str):
        raise ValueError(f"re_form must be None, '~0'/'NA'/False or a formula string, got {re_form!r}")
    from ._formula import parse_formula
    text = re_form.strip()
    if not text.startswith("~"):
        text = "~ " + text
    try:
        parsed = parse_formula(".re_form_response " + text)
    except Exception as e:
        raise ValueError(f"cannot parse re_form {re_form!r}: {e}") from e
    squash = lambda s: re.sub(r"\s+", "", s)
    wanted = [(squash(rt.expr), tuple(rt.group)) for rt in parsed.random]
    have = [(squash(t.expr), tuple(t.group_columns)) for t in structure.terms]
    out = []
    for w in wanted:
        if w not in have:
            raise ValueError(f"re_form term ({w[0]} | {':'.join(w[1])}) is not a random-effects term of the model; "
                             f"terms: {', '.join(f'({e} | {chr(58).join(g)})' for e, g in have)}")
        out.append(have.index(w))
    return sorted(set(out))


def _labels(values: pd.Series) -> np.ndarray:
    """Level labels (object array; None where missing) of a column, as ``factor_codes`` labels
    levels: ints and integer-valued floats give "1", bools "TRUE"/"FALSE", strings themselves."""
    if isinstance(values.dtype, pd.CategoricalDtype):
        cats = np.array([_label(c) for c in values.cat.categories] + [None], dtype=object)
        codes = np.asarray(values.cat.codes, dtype=np.int64)
        return cats[np.where(codes < 0, len(cats) - 1, codes)]
    codes, uniques = pd.factorize(values, sort=False)
    labs = np.array([_label(u) for u in uniques] + [None], dtype=object)
    return labs[np.where(codes < 0, len(labs) - 1, codes)]


def _training_categorical(values: pd.Series, categories, ordered: bool) -> tuple[pd.Categorical, list[str]]:
    """``values`` as a Categorical with the training categories, matched by label; returns it
    and the labels that are not training levels (their codes are -1)."""
    labs = _labels(values)
    pos = {_label(c): i for i, c in enumerate(categories)}
    codes = np.fromiter((pos.get(l, -1) if l is not None else -1 for l in labs), dtype=np.int64, count=len(labs))
    unseen = sorted({l for l, c in zip(labs, codes) if c < 0 and l is not None})
    return pd.Categorical.from_codes(codes, categories=list(categories), ordered=ordered), unseen


def _fmt_levels(levels, limit: int = 5) -> str:
    shown = ", ".join(repr(str(l)) for l in levels[:limit])
    return shown + (f" (and {len(levels) - limit} more)" if len(levels) > limit else "")


def _spec_variables(spec) -> tuple[dict, set]:
    """From the fixed part's formulaic ModelSpec: factor column → (training categories, contr.poly?)
    and the set of columns it treats as numeric (the spec's evaluated terms are not columns)."""
    factors, numeric = {}, set()
    params = getattr(spec, "materializer_params", None) or {}
    exprs, contrasts = params.get("exprs", {}), params.get("contrasts", {})
    for key, val in (getattr(spec, "encoder_state", None) or {}).items():
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


def _required(rhs: str, columns, allow_python: bool) -> set[str]:
    """Data columns read by a right-hand side (the design module's rule)."""
    from ._design import _variables
    return _variables(rhs, "the formula", list(columns), allow_python)


def _numeric_column(s: pd.Series, name: str) -> np.ndarray:
    try:
        return pd.to_numeric(s.astype(object) if isinstance(s.dtype, pd.CategoricalDtype) else s,
                             errors="raise").to_numpy(dtype=np.float64, na_value=np.nan)
    except (TypeError, ValueError) as e:
        raise DataError(f"column {name!r} of newdata must be numeric, as in the fitted data: {e}") from e


# ----------------------------------------------------------------------------- parameters

def _param_vector(structure, theta, sigma, beta) -> np.ndarray:
    """[.sig01 ..., .sigma, β...] as lme4's confint rows."""
    return np.concatenate([Cv_to_Sv(structure.terms, np.asarray(theta, float), float(sigma)), [float(sigma)],
                           np.asarray(beta, dtype=float)])


# ----------------------------------------------------------------------------- simulation core

class _Simulator:
    """Draws y* = μ₀ + ZΛ_θ̂ u* σ̂ + ε* σ̂/√w for one rng; shared by simulate() and bootstrap()
    so that a replicate depends only on its seed.  Per replicate the rng draws u* (q values)
    first, then ε* (n values)."""

    def __init__(self, mu0: np.ndarray, ZL, sigma: float, weights: np.ndarray | None,
                 cond: np.ndarray | None = None, cond_cols: np.ndarray | None = None):
        self.mu0 = np.asarray(mu0, dtype=float)
        self.ZL = ZL.tocsr()
        self.sigma = float(sigma)
        if weights is None:
            self.esd = None
        else:
            w = np.asarray(weights, dtype=float)
            with np.errstate(divide="ignore"):
                # zero-weight rows do not enter the fit: give them no noise rather than infinite noise
                self.esd = np.where(w > 0, 1.0 / np.sqrt(np.where(w > 0, w, 1.0)), 0.0)
        self.cond = cond                # Z b̂ of the terms held at their modes (or None)
        self.cond_cols = cond_cols      # boolean mask of the u columns replaced by those modes

    @property
    def n(self) -> int:
        return self.mu0.shape[0]

    def draw(self, rng: np.random.Generator) -> np.ndarray:
        u = rng.standard_normal(self.ZL.shape[1])
        e = rng.standard_normal(self.n)
        if self.cond_cols is not None:
            u[self.cond_cols] = 0.0
        y = self.mu0 + self.sigma * (self.ZL @ u)
        if self.cond is not None:
            y = y + self.cond
        y = y + self.sigma * (e if self.esd is None else e * self.esd)
        return y


def _make_simulator(res, re_form="~0") -> _Simulator:
    s = res.structure
    s.require_rows("simulating responses (simulate, bootstrap)")
    keep = _selected_terms(s, re_form)
    mu0 = s.X @ res._state.beta + (s.offset if s.offset is not None else 0.0)
    ZL = (s.Z @ s.Lambda(res.theta)).tocsc()
    cond = cond_cols = None
    if keep:
        cond_cols = np.zeros(s.q, dtype=bool)
        cond = np.zeros(s.n)
        b = res._state.b
        for i in keep:
            t = s.terms[i]
            cond_cols[t.col_offset:t.col_offset + t.q] = True
            B = b[t.col_offset:t.col_offset + t.q].reshape(t.nlevels, t.k)
            cond += np.einsum("rj,rj->r", t.Xi, B[t.codes])
    return _Simulator(mu0, ZL, res.sigma, s.weights, cond, cond_cols)


# ----------------------------------------------------------------------------- bootstrap workers

_WORKER: dict = {}


def _init_worker(payload: bytes) -> None:
    """Process-pool initializer: unpickle the design once per worker process."""
    _WORKER.clear()
    _WORKER.update(pickle.loads(payload))


def _replicate(job: dict, model, seed) -> tuple:
    """One bootstrap replicate: simulate y* from ``seed`` and refit; (values, θ, converged, singular, error)."""
    try:
        y = job["sim"].draw(np.random.default_rng(seed))
        r = model.refit(y, **job["fit_options"])
        vals = _param_vector(job["structure"], r.theta, r.sigma, r.fixef.to_numpy())
        return vals, np.asarray(r.theta, float), bool(r.converged), bool(r.singular), None
    except Exception as e:  # a failed refit is recorded, not fatal (bootMer counts them too)
        nv = job["structure"].ntheta + 1 + job["structure"].p
        return (np.full(nv, np.nan), np.full(job["structure"].ntheta, np.nan), False, False,
                f"{type(e).__name__}: {e}")


def _job_model(job: dict):
    from ._model import LinearMixedModel
    s = job["structure"]
    return LinearMixedModel(s.formula, None, REML=job["REML"], backend=job["backend"],
                            ordering=job["ordering"], structure=s)


def _run_chunk_process(indices: list[int], seeds: list) -> list[tuple]:
    """Process-pool task: replicates ``indices`` with their seeds, warnings silenced."""
    job = _WORKER
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = _job_model(job)
        return [(i, *_replicate(job, model, sd)) for i, sd in zip(indices, seeds)]


def _run_chunk_thread(job: dict, indices: list[int], seeds: list) -> list[tuple]:
    model = _job_model(job)   # one model per task: backends keep per-model workspaces
    return [(i, *_replicate(job, model, sd)) for i, sd in zip(indices, seeds)]


# ----------------------------------------------------------------------------- bootstrap result

def _norm_inter(t: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """boot's ``norm.inter``: order statistics t_(k), k = ⌊(R+1)α⌋, interpolated on the normal
    quantile scale when (R+1)α is not an integer (the interval of ``boot.ci(type = "perc")``)."""
    t = np.sort(t[np.isfinite(t)])
    R = t.size
    out = np.full(alpha.shape, np.nan)
    if R == 0:
        return out
    for m, a in enumerate(alpha):
        rk = (R + 1) * a
        k = int(math.floor(rk + 1e-10))
        if abs(k - rk) < 1e-10 and 1 <= k <= R:
            out[m] = t[k - 1]
        elif k <= 0:
            out[m] = t[0]
        elif k >= R:
            out[m] = t[R - 1]
        else:
            z, zk, zk1 = stats.norm.ppf(a), stats.norm.ppf(k / (R + 1)), stats.norm.ppf((k + 1) / (R + 1))
            out[m] = t[k - 1] + (z - zk) / (zk1 - zk) * (t[k] - t[k - 1])
    return out


class BootstrapResult:
    """Parametric bootstrap replicates of a fit (lme4's ``bootMer``).

    Attributes
    ----------
    replicates : DataFrame, one row per replicate; columns ``.sig01``, ... (random-effect SDs and
        correlations in θ's order), ``.sigma``, then the fixed effects — lme4's confint rows.
    theta : DataFrame of the refitted θ (columns ``theta_names``).
    estimate : Series of the same quantities for the original fit (boot's ``t0``).
    status : DataFrame per replicate: ``converged``, ``singular``, ``error`` (None if the refit worked).
    seed (for ``seed=None`` the drawn entropy, so ``bootstrap(nsim, seed=result.seed)`` repeats the run),
    nsim, parallel ("serial" | "processes" | "threads"), n_jobs, elapsed (seconds).
    """

    def __init__(self, replicates: pd.DataFrame, theta: pd.DataFrame, estimate: pd.Series,
                 status: pd.DataFrame, seed, parallel: str, n_jobs: int, elapsed: float):
        self.replicates = replicates
        self.theta = theta
        self.estimate = estimate
        self.status = status
        self.seed = seed
        self.parallel = parallel
        self.n_jobs = n_jobs
        self.elapsed = elapsed

    @property
    def nsim(self) -> int:
        return len(self.replicates)

    @property
    def n_failed(self) -> int:
        return int(self.status["error"].notna().sum())

    @property
    def n_singular(self) -> int:
        return int(self.status["singular"].sum())

    def __len__(self) -> int:
        return self.nsim

    def to_frame(self) -> pd.DataFrame:
        """The replicates (a copy)."""
        return self.replicates.copy()

    def se(self) -> pd.Series:
        """Bootstrap standard errors: the SD (n − 1 divisor) of each column over finite replicates."""
        return self.replicates.std(ddof=1).rename("Std. Error")

    def confint(self, level: float = 0.95, type: str = "perc", parm=None) -> pd.DataFrame:
        """Bootstrap intervals like lme4's ``confint(fit, method = "boot", boot.type = type)``.

        ``"perc"``: (t*_(α/2), t*_(1−α/2)) from boot's ``norm.inter`` order statistics;
        ``"basic"``: (2t₀ − t*_(1−α/2), 2t₀ − t*_(α/2));
        ``"norm"``: t₀ − bias ∓ z_{1−α/2}·sd(t*), bias = mean(t*) − t₀.
        Non-finite replicates (failed refits, undefined correlations) are left out per column.
        Columns named as R's ("2.5 %", "97.5 %"); rows as :attr:`replicates`' columns."""
        if not (0.0 < float(level) < 1.0):
            raise ValueError(f"level must be in (0, 1), got {level!r}")
        kind = str(type).lower()
        if kind not in ("perc", "basic", "norm"):
            raise ValueError(f"unknown type {type!r}; choose 'perc', 'basic' or 'norm'")
        a = (1.0 - float(level)) / 2.0
        cols = _format_pct([a, 1.0 - a])
        lo, hi = [], []
        for name in self.replicates.columns:
            t = self.replicates[name].to_numpy(dtype=float)
            t0 = float(self.estimate[name])
            if kind == "perc":
                q = _norm_inter(t, np.array([a, 1.0 - a]))
            elif kind == "basic":
                q = 2.0 * t0 - _norm_inter(t, np.array([1.0 - a, a]))
            else:
                f = t[np.isfinite(t)]
                if f.size < 2:
                    q = np.array([np.nan, np.nan])
                else:
                    bias = f.mean() - t0
                    merr = f.std(ddof=1) * stats.norm.ppf(1.0 - a)
                    q = np.array([t0 - bias - merr, t0 - bias + merr])
            lo.append(q[0])
            hi.append(q[1])
        return select_parm(pd.DataFrame({cols[0]: lo, cols[1]: hi}, index=list(self.replicates.columns)), parm)

    def __repr__(self) -> str:
        extra = []
        if self.n_failed:
            extra.append(f"{self.n_failed} failed")
        if self.n_singular:
            extra.append(f"{self.n_singular} singular")
        tail = f" ({', '.join(extra)})" if extra else ""
        return f"<BootstrapResult nsim={self.nsim} seed={self.seed!r} parallel={self.parallel}{tail}>"


# ----------------------------------------------------------------------------- the mixin

class PredictMixin:
    """``predict``, ``residuals(type=...)``, ``simulate``, ``bootstrap`` and ``ranef_table`` for
    :class:`LmerResult` (needs ``structure``, ``_state``, ``theta``, ``sigma``, ``fixef``,
    ``ranef``, ``ranef_condsd``, ``model`` and ``fitted()``)."""

    # ------------------------------------------------------------------ predict
    def predict(self, newdata=None, re_form=None, allow_new_levels: bool = False, offset=None) -> pd.Series:
        """Predictions, as lme4's ``predict(fit, newdata, re.form, allow.new.levels)``.

        ŷ = X_new β̂ + offset_new + Σ_{i ∈ re_form} Σ_j X_i,new[:, j] · b̂_i[level, j]

        * ``newdata=None``: the model's rows (``re_form=None`` gives :meth:`fitted`).
        * X_new is built by the fit's formulaic spec (training levels and contrasts, polynomial
          contrasts for ordered factors, the same stateful transforms); columns dropped for rank
          deficiency are dropped again.  Factor levels are matched by their labels ("1" matches
          1, 1.0 and "1"); a level of a fixed-effect factor not seen in the fit is an error.
        * ``re_form``: None → every random-effects term; ``"~0"``, ``"NA"``, ``False`` or NaN →
          none (population level, Xβ̂ + offset); a formula such as ``"~ (1 | Subject)"`` → those terms.
        * Grouping levels not seen in the fit raise :class:`DataError` naming the factor and the
          levels, unless ``allow_new_levels=True``, when they contribute 0 (b's mean).
          Interactions and nested factors are matched by the combined label "b_level:a_level".
        * Rows with a missing value in a variable the prediction uses give NaN (lme4's na.pass).
        * Offsets: ``offset()`` terms of the formula are evaluated on ``newdata``; an offset given
          to the fit as ``offset=`` must be given again here (array or column of ``newdata``).

        Returns a float Series indexed like ``newdata`` (the model's rows for ``newdata=None``).
        """
        s = self.structure
        keep = _selected_terms(s, re_form)
        if newdata is None:
            if offset is not None:
                raise ValueError("offset= is only used with newdata")
            s.require_rows("predict() without newdata")
            mu = s.X @ self._state.beta + (s.offset if s.offset is not None else 0.0)
            b = self._state.b
            for i in keep:
                t = s.terms[i]
                B = b[t.col_offset:t.col_offset + t.q].reshape(t.nlevels, t.k)
                mu = mu + np.einsum("rj,rj->r", t.Xi, B[t.codes])
            return pd.Series(mu, index=s.row_index, name="predicted", dtype=float)
        return self._predict_new(newdata, keep, allow_new_levels, offset)

    def _predict_new(self, newdata, keep: list[int], allow_new_levels: bool, offset) -> pd.Series:
        from ._data import as_frame
        from ._rformula import evaluate_vector, parse_expr, r_column_names

        s = self.structure
        nd = as_frame(newdata)
        index = nd.index
        n_all = len(nd)
        cols = list(nd.columns)
        parsed = s.parsed
        py = bool(getattr(s, "allow_python", False))
        fixed_vars = _required(parsed.fixed, cols, py) if s.p else set()
        offsets = [parse_expr(o, cols, py) for o in parsed.offsets]
        off_vars = {c for e in offsets for c in e.columns}
        re_vars: set[str] = set()
        group_vars: list[str] = []
        for i in keep:
            t = s.terms[i]
            re_vars |= _required(t.expr, cols, py)
            group_vars.extend(g for g in t.group_columns if g not in group_vars)
        used = list(dict.fromkeys([*sorted(fixed_vars), *sorted(off_vars), *sorted(re_vars), *group_vars]))
        check_columns(nd, used)

        # Argument offset (not recoverable from the structure): must be passed again.
        arg_offset_only = s.offset is not None and not parsed.offsets
        if offset is None and arg_offset_only:
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

        # Rows usable: no missing value in any used variable (others predict NaN).
        ok = ~nd[used].isna().any(axis=1).to_numpy() if used else np.ones(n_all, bool)
        if off_arg is not None:
            ok &= ~np.isnan(off_arg)
        out = np.full(n_all, np.nan)
        if not ok.any():
            return pd.Series(out, index=index, name="predicted", dtype=float)
        sub = nd.loc[ok, used].reset_index(drop=True) if used else pd.DataFrame(index=range(int(ok.sum())))
        m = len(sub)

        # Factors of the fit: the training categories, matched by label (the fixed part's spec
        # knows its factors; ``structure.variable_levels``, when the design records it, all of them).
        factors, numeric = _spec_variables(s.fixed_spec)
        for c, info in (getattr(s, "variable_levels", None) or {}).items():
            if c not in factors:
                cats, ordered = info
                factors[c] = (list(cats), bool(ordered))
        frame = {}
        for c in sub.columns:
            col = sub[c]
            if c in factors and c not in numeric:   # (a column also used as a number, as in
                cats, poly = factors[c]                 # `x + C(x)`, stays as it is: C() re-encodes it)
                cat, unseen = _training_categorical(col, cats, ordered=poly)
                if unseen and (c in fixed_vars or c in off_vars or c in re_vars):
                    raise DataError(f"factor {c!r} has new level(s) {_fmt_levels(unseen)} not seen in the fitted "
                                    f"data (levels: {_fmt_levels([_label(x) for x in cats], 10)})")
                frame[c] = cat
            elif c in numeric and not pd.api.types.is_numeric_dtype(col.dtype) \
                    and not pd.api.types.is_bool_dtype(col.dtype):
                frame[c] = _numeric_column(col, c)
            elif pd.api.types.is_bool_dtype(col.dtype) or (is_factor_dtype(col.dtype)
                                                           and not isinstance(col.dtype, pd.CategoricalDtype)):
                # a factor only the random part uses: R's labels and sorted levels, as prepare_factors
                labs = _labels(col)
                lv = sorted({l for l in labs if l is not None})
                frame[c] = pd.Categorical(labs, categories=lv)
            else:
                frame[c] = col
        frame = pd.DataFrame(frame, index=sub.index)

        mu = np.zeros(m)
        if s.p:
            if s.fixed_spec is None:
                raise DataError("this fit keeps no model spec of its fixed part, so it cannot predict on new data")
            try:
                Xmm = s.fixed_spec.get_model_matrix(frame)
            except Exception as e:
                raise DataError(f"cannot build the fixed-effects model matrix for newdata: {e}") from e
            names = r_column_names(Xmm.model_spec)
            pos = {nm: j for j, nm in enumerate(names)}
            missing = [nm for nm in s.fixef_names if nm not in pos]
            if missing:
                raise DataError(f"fixed-effects columns {missing} could not be built from newdata "
                                f"(got {names})")
            Xn = np.asarray(Xmm.to_numpy(dtype=np.float64)).reshape(m, -1)[:, [pos[nm] for nm in s.fixef_names]]
            mu += Xn @ self._state.beta

        for e in offsets:
            mu += evaluate_vector(e, frame, "offset")
        if off_arg is not None:
            mu += off_arg[ok]

        b = self._state.b
        parts, unseen_by_factor = [], {}
        for i in keep:
            t = s.terms[i]
            Xi = self._term_matrix(t, frame, py)
            # level labels of the (possibly interaction) grouping factor, as _group_codes builds them
            lab = None
            for g in t.group_columns:
                lg = _labels(sub[g]).astype(object)
                lab = lg if lab is None else np.array([f"{x}:{y}" for x, y in zip(lab, lg)], dtype=object)
            pos = {lv: j for j, lv in enumerate(t.levels)}
            codes = np.fromiter((pos.get(l, -1) for l in lab), dtype=np.int64, count=m)
            new = codes < 0
            if new.any():
                unseen_by_factor.setdefault(t.factor, list(dict.fromkeys(lab[new])))
            parts.append((t, Xi, codes, new))
        if unseen_by_factor and not allow_new_levels:
            what = "; ".join(f"grouping factor {f!r}: {_fmt_levels(v)}" for f, v in unseen_by_factor.items())
            raise DataError(f"new level(s) not seen in the fitted data, {what}; use allow_new_levels=True "
                            "to predict them at the population level (random effect 0)")
        for t, Xi, codes, new in parts:
            B = b[t.col_offset:t.col_offset + t.q].reshape(t.nlevels, t.k)
            mu += np.where(new, 0.0, np.einsum("rj,rj->r", Xi, B[np.where(new, 0, codes)]))

        out[ok] = mu
        return pd.Series(out, index=index, name="predicted", dtype=float)

    @staticmethod
    def _term_matrix(t, frame: pd.DataFrame, allow_python: bool) -> np.ndarray:
        """The term's model matrix X_i on new rows (the fit's model spec of the term: its
        contrasts and transform state), checked against the fit's column names."""
        from ._rformula import model_matrix, r_column_names, translate

        def build(fr):
            if t.spec is not None:
                mm = t.spec.get_model_matrix(fr)
            else:
                mm = model_matrix(translate(t.expr, list(fr.columns), allow_python), fr, f"({t.expr} | {t.factor})",
                                  allow_python=allow_python)
            return np.asarray(mm.to_numpy(dtype=np.float64)).reshape(len(fr), -1), r_column_names(mm.model_spec)

        try:
            Xi, names = build(frame)
            error = None
        except Exception as e:   # noqa: BLE001 - retried below, then reported as DataError
            Xi, names, error = None, None, e
        if error is not None or tuple(names) != tuple(t.cnms):
            # string-typed numbers for a numeric variable of the term: try them as numbers
            fr2 = frame.copy()
            changed = False
            for c in fr2.columns:
                if c in t.group_columns:
                    continue
                col = fr2[c]
                if is_factor_dtype(col.dtype) and not pd.api.types.is_bool_dtype(col.dtype):
                    try:
                        fr2[c] = pd.to_numeric(col.astype(object)).astype(float)
                        changed = True
                    except (TypeError, ValueError):
                        pass
            if changed:
                try:
                    Xi, names = build(fr2)
                    error = None
                except Exception:   # noqa: BLE001 - the first error is the one to report
                    pass
        if error is not None:
            raise DataError(f"cannot build the random-effects term ({t.expr} | {t.factor}) for newdata: {error}") \
                from error
        if tuple(names) != tuple(t.cnms):
            raise DataError(f"random-effects term ({t.expr} | {t.factor}) gives columns {list(names)} on newdata, "
                            f"the fit has {list(t.cnms)}")
        return Xi

    # ------------------------------------------------------------------ residuals
    def residuals(self, type: str = "response", scaled: bool = False) -> np.ndarray:
        """Residuals as lme4's ``residuals(fit, type, scaled)`` for a linear mixed model.

        ŷ = Xβ̂ + Zb̂ + offset.  ``"response"`` (= ``"working"``): y − ŷ;  ``"pearson"``
        (= ``"deviance"``): √w (y − ŷ), lme4's weighted residuals (equal to y − ŷ without
        weights; lme4 does not divide Pearson residuals of an LMM by σ̂).  ``scaled=True``:
        √w (y − ŷ)/σ̂ whatever ``type`` (the summary's scaled residuals, lme's Pearson residuals;
        as this method always did — lme4 would give (y − ŷ)/σ̂ for a weighted ``"response"``)."""
        kind = str(type).lower()
        if kind not in ("response", "working", "pearson", "deviance"):
            raise ValueError(f"unknown residual type {type!r}; choose 'response' or 'pearson'")
        s = self.structure
        s.require_rows("residuals()")
        r = s.y - self.fitted()
        w = s.weights
        if w is not None and (scaled or kind in ("pearson", "deviance")):
            r = r * np.sqrt(w)
        if scaled:
            r = r / self.sigma
        return r

    # ------------------------------------------------------------------ simulate
    def simulate(self, nsim: int = 1, seed=None, re_form="~0") -> pd.DataFrame:
        """New responses from the fitted model, as lme4's ``simulate(fit, nsim, seed)``.

        y* = Xβ̂ + offset + Z Λ_θ̂ u* σ̂ + ε* σ̂/√w,  u* ~ N(0, I_q),  ε* ~ N(0, I_n)
        (zero-weight rows get no noise).  ``re_form="~0"`` (default, lme4's ``re.form = NA``)
        draws new random effects for every term; ``re_form=None`` holds all of them at their
        conditional modes b̂ (y* = ŷ + ε* σ̂/√w); a formula of terms holds only those.

        ``seed`` goes to ``np.random.default_rng``; each column draws u* then ε* from the same
        stream, so ``simulate(1, seed)`` is the first column of ``simulate(k, seed)``.
        Returns an n × nsim DataFrame, columns ``sim_1``, ..., indexed by the model's rows."""
        nsim = int(nsim)
        if nsim < 1:
            raise ValueError(f"nsim must be a positive integer, got {nsim}")
        sim = _make_simulator(self, re_form)
        rng = np.random.default_rng(seed)
        Y = np.empty((sim.n, nsim))
        for j in range(nsim):
            Y[:, j] = sim.draw(rng)
        return pd.DataFrame(Y, index=self.structure.row_index, columns=[f"sim_{j + 1}" for j in range(nsim)])

    # ------------------------------------------------------------------ bootstrap
    def bootstrap(self, nsim: int, seed=None, n_jobs: int = 1, progress=None,
                  fit_options: dict | None = None) -> BootstrapResult:
        """Parametric bootstrap, as lme4's ``bootMer(fit, FUN, nsim, seed)`` with lme4's confint
        quantities: for each replicate r, y*_r is simulated as in :meth:`simulate` (new random
        effects and noise) and refitted on the same design (``model.refit``), recording
        the SDs/correlations of each term (``.sig01``, ...), ``.sigma``, the fixed effects and θ.

        * Reproducible: replicate r uses ``np.random.default_rng(SeedSequence(seed).spawn(nsim)[r])``,
          so results do not depend on ``n_jobs``.
        * ``n_jobs > 1`` (``-1``: all CPUs) refits in a process pool (the design is pickled once per
          worker); if that cannot work it falls back to threads (the kernel releases the GIL).
        * ``progress``: True → a tqdm bar on stderr; None → one only on a terminal once the run
          has taken more than 2 s; False → never.  Nothing is printed otherwise.
        * Warnings of the refits (singular fits, convergence) are not shown; they are counted in
          ``status``.  A refit that fails gives a NaN row and its error message in ``status``.
        * ``fit_options`` go to every refit (e.g. ``{"check_conv": False}``).

        Returns a :class:`BootstrapResult` (``.replicates``, ``.theta``, ``.estimate``,
        ``.confint(level, type)``)."""
        nsim = int(nsim)
        if nsim < 1:
            raise ValueError(f"nsim must be a positive integer, got {nsim}")
        n_jobs = int(n_jobs)
        if n_jobs == -1:
            n_jobs = os.cpu_count() or 1
        if n_jobs < 1:
            raise ValueError(f"n_jobs must be a positive integer or -1, got {n_jobs}")
        n_jobs = min(n_jobs, nsim)
        fit_options = dict(fit_options or {})
        s = self.structure
        t_start = time.perf_counter()

        root = np.random.SeedSequence(seed)
        seeds = root.spawn(nsim)
        stripped = dataclasses.replace(s, fixed_spec=None)
        job = {"structure": stripped, "REML": bool(self.REML), "backend": self.model.backend_name,
               "ordering": self.model.ordering or "default", "fit_options": fit_options,
               "sim": _make_simulator(self, "~0")}

        results: dict[int, tuple] = {}
        bar = Progress(progress, "bootstrap", "fits", total=nsim)
        parallel = "serial"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if n_jobs == 1:
                    model = _job_model(job)
                    for i in range(nsim):
                        results[i] = _replicate(job, model, seeds[i])
                        bar.update(1)
                else:
                    chunk = max(1, math.ceil(nsim / (n_jobs * 4)))
                    chunks = [list(range(a, min(a + chunk, nsim))) for a in range(0, nsim, chunk)]
                    payload = None
                    try:
                        payload = pickle.dumps(job, protocol=pickle.HIGHEST_PROTOCOL)
                    except Exception:
                        payload = None
                    if payload is not None:
                        parallel = "processes"
                        try:
                            with ProcessPoolExecutor(max_workers=n_jobs, initializer=_init_worker,
                                                     initargs=(payload,)) as ex:
                                futs = {ex.submit(_run_chunk_process, c, [seeds[i] for i in c]): c for c in chunks}
                                for f in as_completed(futs):
                                    for row in f.result():
                                        results[row[0]] = row[1:]
                                    bar.update(len(futs[f]))
                        except (BrokenProcessPool, OSError, NotImplementedError, pickle.PicklingError, AttributeError,
                                ImportError):
                            parallel = "threads"
                    else:
                        parallel = "threads"
                    if parallel == "threads":
                        todo = [c for c in chunks if any(i not in results for i in c)]
                        with ThreadPoolExecutor(max_workers=n_jobs) as ex:
                            futs = {ex.submit(_run_chunk_thread, job, c, [seeds[i] for i in c]): c for c in todo}
                            for f in as_completed(futs):
                                for row in f.result():
                                    results[row[0]] = row[1:]
                                bar.update(len(futs[f]))
        finally:
            bar.close()

        names = confint_row_names(s)
        vals = np.vstack([results[i][0] for i in range(nsim)])
        thetas = np.vstack([results[i][1] for i in range(nsim)]).reshape(nsim, s.ntheta)
        idx = pd.RangeIndex(nsim, name="replicate")
        reps = pd.DataFrame(vals, columns=names, index=idx)
        theta = pd.DataFrame(thetas, columns=list(s.theta_names), index=idx)
        status = pd.DataFrame({"converged": [results[i][2] for i in range(nsim)],
                               "singular": [results[i][3] for i in range(nsim)],
                               "error": pd.Series([results[i][4] for i in range(nsim)], dtype=object)}, index=idx)
        est = pd.Series(_param_vector(s, self.theta, self.sigma, self.fixef.to_numpy()), index=names, name="estimate")
        out = BootstrapResult(reps, theta, est, status, seed if seed is not None else root.entropy, parallel,
                              n_jobs, time.perf_counter() - t_start)
        if out.n_failed:
            warnings.warn(f"{out.n_failed} of {nsim} bootstrap refits failed (first: "
                          f"{status['error'].dropna().iloc[0]}); their rows are NaN", RuntimeWarning, stacklevel=2)
        return out

    # ------------------------------------------------------------------ ranef table
    def ranef_table(self) -> pd.DataFrame:
        """Conditional modes with conditional SDs in long form, as R's
        ``as.data.frame(ranef(fit, condVar = TRUE))``: columns grpvar, term, grp, condval, condsd;
        rows by grouping factor (the order of :attr:`ranef`), then term, then level.
        condval = b̂ = Λ_θ̂ û;  condsd = √diag of σ̂² T [(ΛᵀZᵀWZΛ + I)⁻¹]_aa Tᵀ per level."""
        parts = []
        condsd = self.ranef_condsd
        for f, df in self.ranef.items():
            sd = condsd[f].reindex(index=df.index, columns=df.columns)
            nl = len(df.index)
            for term in df.columns:
                parts.append(pd.DataFrame({
                    "grpvar": [f] * nl, "term": [str(term)] * nl, "grp": [str(g) for g in df.index],
                    "condval": df[term].to_numpy(dtype=float), "condsd": sd[term].to_numpy(dtype=float)}))
        if not parts:
            return pd.DataFrame({"grpvar": [], "term": [], "grp": [], "condval": [], "condsd": []})
        return pd.concat(parts, ignore_index=True)
