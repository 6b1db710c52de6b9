"""Many responses on one design: ``fit_many``.

The design (X, Z, ZᵀWZ, ZᵀWX, XᵀWX and CHOLMOD's symbolic analysis) is built once.  Each
response then costs its own cross-products ZᵀWỹ, XᵀWỹ, ỹᵀWỹ (one sparse-dense product per
batch of responses, see ``_response.py``) and one optimisation of θ with the shared kernel, the
same optimisation :func:`~fastlmm_ext.lmer` runs, so every row equals lmer on that response.

Work is cut into batches of responses.  A batch runs in this process (``n_jobs=1``), in a
process pool whose workers each build the kernel once from the shared statistics (``n_jobs > 1``,
``_parallel``; threads where processes cannot be used), or on a Dask cluster (``client=``) to
which those statistics are scattered once.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
import threading
import uuid
import warnings
from functools import partial

import numpy as np
import pandas as pd

from ._backends import check_backend, make_backend
from ._crossprod import CrossProducts
from ._data import as_frame, as_numeric_array, check_columns, check_reml, reject_complex
from ._design import ModelStructure, build_structure
from ._exceptions import (ArgumentError, ConvergenceWarning, DataError, FormulaError, MissingValuesWarning,
                          SingularFitWarning)
from ._formula import _top
from ._model import LinearMixedModel
from ._parallel import n_workers, run_tasks
from ._response import response_crossproducts
from ._threads import check_threads, fit_threads

__all__ = ["fit_many"]

_BATCH_BYTES = 32 * 2**20   # response cross-products held at once per batch (q·(p+1)·8 bytes each)


def fit_many(formula: str, data, responses, REML: bool = True, n_jobs: int = 1, client=None,
             backend: str = "auto", weights=None, offset=None, contrasts=None, allow_python: bool = False,
             threads: int | None = None, **fit_options) -> pd.DataFrame:
    """Fit the same linear mixed model to many responses, building the design once.

    Parameters
    ----------
    formula : lme4 formula without a response, ``"~ Days + (Days|Subject)"``.  A left-hand side,
        if given, is ignored: every response takes its place.
    data : DataFrame with the design's columns (and the responses, when named).
    responses : list of column names of ``data``; or a 2-D array / DataFrame with one column
        per response and one row per row of ``data`` (positional; a DataFrame must have the
        index of ``data``).  Names: the column names, else ``"y1"``, ``"y2"``, ...
    REML, backend, weights, offset, contrasts, allow_python : as for :func:`lmer`.
    n_jobs : worker processes (``-1``: all cores).  Each worker builds the kernel once.
    threads : BLAS/OpenMP threads per fit (see :class:`LinearMixedModel`).  Default None: with
        ``n_jobs=1``, the cores free at the start of each batch; in each worker of a pool (or on
        Dask), 1, since the workers already fill the cores.
    client : a ``dask.distributed.Client``, or ``"auto"`` for the active one
        (``distributed.get_client()``): batches run on the cluster instead (Dask is optional:
        ``pip install 'fastlmm_ext[dask]'``).
    fit_options : for :meth:`LinearMixedModel.fit` (``optimizer``, ``check_conv``, ...), the same
        for every response.

    Rows with a missing value in a design column are dropped once, as lmer drops them.  A
    response with missing values in the remaining rows is fitted on its own complete rows, on a
    design built for them (the answer of lmer on that response; ``nobs`` says how many rows).

    Returns
    -------
    DataFrame, one row per response in input order:

    ============== =================================================================
    response       name of the response
    nobs           observations used
    criterion      REML criterion or ML deviance at the optimum (lme4's ``deviance``/REMLcrit)
    REML           bool, the criterion fitted
    sigma          residual standard deviation σ̂
    converged      bool, the optimiser converged and lme4's gradient check passed
    singular       bool, some θ on its boundary (lme4's ``isSingular``)
    theta:<name>   θ̂, one column per element (``structure.theta_names``, e.g.
                   ``theta:Subject.(Intercept)``)
    fixef:<name>   β̂ per fixed effect (NaN if dropped for this response as rank-deficient)
    se:<name>      standard error of β̂
    messages       optimiser and convergence messages, ``"; "``-joined ("" if none);
                   ``"error: ..."`` for a fit that failed (its numbers are NaN)
    ============== =================================================================

    Singular and convergence warnings are not raised per response: the columns record them
    and one summary warning per kind is issued (e.g. "12 of 1000 fits were singular").
    """
    REML = check_reml(REML)
    check_backend(backend)
    threads = check_threads(threads)
    _check_fit_options(fit_options)
    workers = _n_workers(n_jobs, client)
    df = as_frame(data)
    names, Y_all = _response_matrix(df, responses)
    frame = df.copy(deep=False)
    frame.index = pd.RangeIndex(len(frame))          # row_index of the design = row positions
    ph = _placeholder(frame.columns)
    frame[ph] = np.random.default_rng(0).standard_normal(len(frame))   # any non-degenerate response
    formula_ph = f"{ph} ~ {_rhs(formula)}"
    s = build_structure(formula_ph, frame, weights, offset, allow_python, contrasts)
    rows = s.row_index.to_numpy()
    Y = Y_all[rows]
    complete = ~np.isnan(Y).any(axis=0)

    ctx = _Context(structure=dataclasses.replace(s, fixed_spec=None),
                   crossprod=CrossProducts.from_structure(s),
                   REML=bool(REML), backend=backend, fit_options=dict(fit_options),
                   threads=threads if threads is not None or client is None else 1,   # Dask: 1 per worker thread
                   formula=formula_ph,
                   placeholder=ph, weights=weights, offset=offset, allow_python=bool(allow_python),
                   contrasts=contrasts,
                   frame=None if complete.all() else _design_frame(frame, names, formula, weights, offset),
                   token=uuid.uuid4().hex)
    batches = _batches(Y, Y_all, complete, workers, s)
    if client is not None:
        out = _run_dask(client, ctx, batches)
    else:
        out = [r for part in run_tasks(_Worker, _fit_batch, batches, ctx, workers)[0] for r in part]
    return _assemble(out, names, s, bool(REML))


# ----------------------------------------------------------------------------- inputs

_FIT_DEFAULTS = {k: p.default for k, p in inspect.signature(LinearMixedModel.fit).parameters.items()
                 if p.default is not inspect.Parameter.empty}


def _check_fit_options(fit_options: dict) -> None:
    try:
        inspect.signature(LinearMixedModel.fit).bind(None, **fit_options)
    except TypeError as e:
        raise TypeError(f"fit_many: invalid fit option: {e}") from None


def _n_workers(n_jobs, client) -> int:
    n = n_workers(n_jobs)
    if client is not None and n != 1:
        raise ArgumentError("give either n_jobs (a local process pool) or client (Dask), not both")
    return n


def _rhs(formula: str) -> str:
    """The right-hand side of ``formula`` (any left-hand side dropped)."""
    if not isinstance(formula, str):
        raise FormulaError(f"formula must be a string, got {type(formula).__name__}")
    tildes = _top(formula, "~")
    if len(tildes) != 1:
        raise FormulaError(f"formula {formula!r} needs exactly one top-level '~', e.g. '~ x + (1|g)'")
    rhs = formula[tildes[0] + 1:].strip()
    if not rhs:
        raise FormulaError(f"formula {formula!r} has nothing right of '~'")
    return rhs


def _placeholder(columns) -> str:
    name = "fit_many_response_"
    while name in set(map(str, columns)):
        name += "_"
    return name


def _response_matrix(df: pd.DataFrame, responses) -> tuple[list[str], np.ndarray]:
    """Response names and the len(df) × m float matrix (NaN = missing)."""
    if isinstance(responses, str):
        responses = [responses]
    if isinstance(responses, pd.DataFrame):
        if not responses.index.equals(df.index):
            raise DataError("the responses DataFrame must have the index of data (rows are matched "
                            "by position); pass responses.to_numpy() to align by position only")
        names = [str(c) for c in responses.columns]
        cols = [as_numeric_array(responses.iloc[:, j], names[j], what="response") for j in range(len(names))]
        Y = np.column_stack(cols) if cols else np.zeros((len(df), 0))
    elif isinstance(responses, np.ndarray):
        Y = _numeric_array(responses, len(df))
        names = [f"y{j + 1}" for j in range(Y.shape[1])]
    elif isinstance(responses, (list, tuple, pd.Index)):
        names = list(responses)
        if not all(isinstance(c, str) for c in names):
            raise TypeError("responses must be a list of column names, or a 2-D array / DataFrame "
                            "with one column per response")
        check_columns(df, names)
        cols = [as_numeric_array(df[c], c, what="response column") for c in names]
        Y = np.column_stack(cols) if cols else np.zeros((len(df), 0))
    else:
        raise TypeError(f"responses must be a list of column names, a 2-D array or a DataFrame, "
                        f"got {type(responses).__name__}")
    if Y.shape[1] == 0:
        raise DataError("responses is empty: give at least one response")
    return names, np.asarray(Y, dtype=np.float64)


def _numeric_array(a: np.ndarray, n: int) -> np.ndarray:
    if a.ndim != 2:
        raise DataError(f"a responses array must be 2-D (rows of data × responses), got shape {a.shape}; "
                        "for one response use y.reshape(-1, 1)")
    if a.shape[0] != n:
        raise DataError(f"responses array has {a.shape[0]} rows but data has {n} rows "
                        f"(expected shape ({n}, number of responses))")
    reject_complex(a, "responses", what="array")
    try:
        Y = np.asarray(a, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise DataError(f"responses must be numeric: {e}") from None
    if np.isinf(Y).any():
        raise DataError(f"responses contain {int(np.isinf(Y).sum())} infinite value(s)")
    return Y


def _design_frame(frame: pd.DataFrame, names: list[str], formula: str, weights, offset) -> pd.DataFrame:
    """``frame`` without the response columns the design cannot use (shipped to workers to
    rebuild the design for responses with missing values)."""
    keep = {a for a in (weights, offset) if isinstance(a, str)}
    drop = [c for c in names if c in frame.columns and c not in keep and c not in formula]
    return frame.drop(columns=drop)


def _batches(Y: np.ndarray, Y_all: np.ndarray, complete: np.ndarray, workers: int, s: ModelStructure) -> list:
    """(indices, responses, complete) batches: complete responses as rows of the design,
    incomplete ones as rows of data, sorted by their missing-value pattern (one design each)."""
    m = Y.shape[1]
    per_cp = max(1, s.q * (s.p + 1) * 8)
    size = max(1, min(256, _BATCH_BYTES // per_cp, math.ceil(m / (4 * workers))))
    out = []
    idx = np.flatnonzero(complete)
    for a in range(0, idx.size, size):
        j = idx[a:a + size]
        out.append((j.tolist(), np.asfortranarray(Y[:, j]), True))
    inc = np.flatnonzero(~complete)
    if inc.size:
        keys = [np.packbits(np.isnan(Y_all[:, j])).tobytes() for j in inc]
        inc = inc[sorted(range(inc.size), key=keys.__getitem__)]   # equal patterns share a design
        for a in range(0, inc.size, size):
            j = inc[a:a + size]
            out.append((j.tolist(), np.asfortranarray(Y_all[:, j]), False))
    return out


# ----------------------------------------------------------------------------- fitting a batch

@dataclasses.dataclass
class _Context:
    """What every worker needs, sent once: the shared design and statistics, and the options."""
    structure: ModelStructure
    crossprod: CrossProducts
    REML: bool
    backend: str
    threads: int | None        # per fit; None: the free cores (1 in a pool worker, _parallel)
    fit_options: dict
    formula: str               # placeholder response ~ the user's right-hand side
    placeholder: str
    weights: object
    offset: object
    allow_python: bool
    contrasts: object
    frame: pd.DataFrame | None  # design columns of data, when some response has missing values
    token: str


class _Worker:
    """Fits batches with one kernel (built here, once) and a few designs for missing-value patterns;
    the context of a ``_parallel`` worker (or of a Dask worker thread)."""

    def __init__(self, ctx: _Context):
        self.ctx = ctx
        cp = _writable(ctx.crossprod)   # Dask may hand over read-only buffers; the kernel writes nothing
        s = ctx.structure
        be = make_backend(s, ctx.backend, crossprod=cp, threads=ctx.threads)
        self.base = LinearMixedModel._from_backend(s, ctx.REML, be, ctx.threads)
        self._designs: dict[bytes, tuple[LinearMixedModel, list[str]]] = {}
        self.options = {**_FIT_DEFAULTS, **ctx.fit_options}

    def fit_batch(self, idx: list[int], Y: np.ndarray, complete: bool) -> list[tuple]:
        """Rows (index, nobs, result or error text, warned: (singular, convergence), note)."""
        with fit_threads(self.ctx.threads):      # once per batch, not per fit (see _threads.py)
            if complete:
                return self._complete(idx, Y)
            return [self._incomplete(i, Y[:, j]) for j, i in enumerate(idx)]

    def _complete(self, idx, Y):
        base = self.base
        try:
            cps = response_crossproducts(base.structure, base.backend.crossprod, Y) \
                if base.backend.crossprod is not None else [None] * len(idx)
        except DataError:
            cps = [None] * len(idx)   # some response is degenerate: one at a time finds which

        def model(j):
            return base._with_response(np.ascontiguousarray(Y[:, j]), cps[j]), []
        return [self._fit_one(i, base.structure.n, partial(model, j), "") for j, i in enumerate(idx)]

    def _incomplete(self, i: int, y_all: np.ndarray):
        ok = ~np.isnan(y_all)
        n_ok = int(ok[self.base.structure.row_index.to_numpy()].sum())
        note = (f"fitted on its {n_ok} complete rows "
                f"({self.base.structure.n - n_ok} with a missing response dropped)")

        def model():
            m, notes = self._design(ok, y_all)
            return m._with_response(np.ascontiguousarray(y_all[m.structure.row_index.to_numpy()])), notes
        return self._fit_one(i, n_ok, model, note)

    def _fit_one(self, i: int, nobs: int, make_model, note: str) -> tuple:
        """Fit one response; its warnings are recorded, not raised, and a failure becomes a row too."""
        try:
            model, notes = make_model()
            res, warned = model._fit(**self.options)
        except Exception as e:  # noqa: BLE001 - recorded in the row, summarised once by fit_many
            return i, nobs, f"error: {type(e).__name__}: {e}", (False, False), note
        kinds = {category for category, _ in warned}
        return (i, res.nobs, _summary(res), (SingularFitWarning in kinds, ConvergenceWarning in kinds),
                "; ".join([x for x in (note, *notes) if x]))

    def _design(self, ok: np.ndarray, y_all: np.ndarray) -> tuple[LinearMixedModel, list[str]]:
        """The model on the rows where the response is present (as lmer builds it) and the
        warnings of building it (e.g. rank-deficient X on these rows), cached by pattern."""
        key = np.packbits(ok).tobytes()
        if key not in self._designs:
            ctx = self.ctx
            frame = ctx.frame.copy(deep=False)
            frame[ctx.placeholder] = y_all
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                s = build_structure(ctx.formula, frame, ctx.weights, ctx.offset, ctx.allow_python, ctx.contrasts)
            notes = [str(w.message) for w in caught if not issubclass(w.category, MissingValuesWarning)]
            if len(self._designs) >= 4:
                self._designs.pop(next(iter(self._designs)))
            self._designs[key] = (LinearMixedModel(ctx.formula, None, REML=ctx.REML, backend=ctx.backend,
                                                   structure=s, threads=ctx.threads), notes)
        return self._designs[key]


def _summary(res) -> dict:
    """The numbers of a fit that go into its row (what a worker sends back: not the result, which
    would carry the design with it)."""
    return {"criterion": res.criterion, "sigma": res.sigma, "converged": bool(res.converged),
            "singular": bool(res.singular), "theta": np.asarray(res.theta, dtype=float),
            "fixef": dict(zip(res.fixef.index, res.fixef.to_numpy())),
            "se": dict(zip(res.fixef.index, res.se.to_numpy())), "messages": list(res.messages)}


def _writable(cp: CrossProducts) -> CrossProducts:
    fix = {f.name: np.array(v) for f in dataclasses.fields(cp)
           if isinstance(v := getattr(cp, f.name), np.ndarray) and not v.flags.writeable}
    return dataclasses.replace(cp, **fix) if fix else cp


# ----------------------------------------------------------------------------- running batches

def _fit_batch(worker: _Worker, batch: tuple) -> list[tuple]:
    """One batch of responses (a ``_parallel`` task) with the worker's kernel."""
    return worker.fit_batch(*batch)


_DASK_WORKERS: dict = {}     # (context token, thread) -> _Worker, on a Dask worker
_DASK_LOCK = threading.Lock()


def _dask_batch(ctx: _Context, idx: list[int], Y: np.ndarray, complete: bool) -> list[tuple]:
    """Dask task: fit one batch with this worker thread's kernel for ``ctx`` (built on first use)."""
    key = (ctx.token, threading.get_ident())
    with _DASK_LOCK:
        worker = _DASK_WORKERS.get(key)
        if worker is None:
            for old in [k for k in _DASK_WORKERS if k[0] != ctx.token]:
                del _DASK_WORKERS[old]   # an earlier fit_many's kernels
    if worker is None:
        worker = _Worker(ctx)
        with _DASK_LOCK:
            _DASK_WORKERS[key] = worker
    return worker.fit_batch(idx, Y, complete)


def _run_dask(client, ctx: _Context, batches: list) -> list[tuple]:
    client = _dask_client(client)
    shared = client.scatter(ctx, broadcast=True, hash=False)
    data = client.scatter([b[1] for b in batches], hash=False)
    futures = [client.submit(_dask_batch, shared, b[0], y, b[2], pure=False) for b, y in zip(batches, data)]
    try:
        return [r for part in client.gather(futures) for r in part]
    finally:
        client.cancel([shared, *data, *futures])
        client.run(_dask_forget, ctx.token)      # the workers' kernels for this call


def _dask_forget(token: str) -> None:
    with _DASK_LOCK:
        for key in [k for k in _DASK_WORKERS if k[0] == token]:
            del _DASK_WORKERS[key]


def _dask_client(client):
    try:
        import distributed
    except ImportError:
        raise ImportError("fit_many(client=...) needs dask.distributed: "
                          "pip install 'fastlmm_ext[dask]'") from None
    if isinstance(client, str):
        if client != "auto":
            raise ValueError(f"client must be a dask.distributed.Client or 'auto', got {client!r}")
        try:
            return distributed.get_client()
        except ValueError:
            raise ValueError("client='auto' needs a running dask.distributed Client "
                             "(create one with distributed.Client(...))") from None
    if not isinstance(client, distributed.Client):
        raise TypeError(f"client must be a dask.distributed.Client or 'auto', got {type(client).__name__}")
    return client


# ----------------------------------------------------------------------------- the table

def _assemble(rows: list[tuple], names: list[str], s: ModelStructure, REML: bool) -> pd.DataFrame:
    """One row per response in input order (columns: see :func:`fit_many`); one warning per kind."""
    rows = sorted(rows, key=lambda r: r[0])
    m = len(rows)
    th_names, fx_names = list(s.theta_names), list(s.fixef_names)
    cols: dict[str, list] = {k: [] for k in ("response", "nobs", "criterion", "REML", "sigma", "converged",
                                              "singular", "messages")}
    theta = np.full((m, len(th_names)), np.nan)
    fixef = np.full((m, len(fx_names)), np.nan)
    se = np.full((m, len(fx_names)), np.nan)
    failed, singular, conv = [], 0, 0
    for r, (i, nobs, res, (warned_sing, warned_conv), note) in enumerate(rows):
        cols["response"].append(names[i])
        cols["nobs"].append(int(nobs))
        cols["REML"].append(REML)
        if isinstance(res, str):
            failed.append(f"{names[i]}: {res[len('error: '):]}")
            cols["criterion"].append(np.nan)
            cols["sigma"].append(np.nan)
            cols["converged"].append(False)
            cols["singular"].append(False)
            cols["messages"].append("; ".join(x for x in (res, note) if x))
            continue
        singular += warned_sing
        conv += warned_conv
        cols["criterion"].append(res["criterion"])
        cols["sigma"].append(res["sigma"])
        cols["converged"].append(res["converged"])
        cols["singular"].append(res["singular"])
        cols["messages"].append("; ".join([*res["messages"], *([note] if note else [])]))
        theta[r] = res["theta"]
        fixef[r] = [res["fixef"].get(nm, np.nan) for nm in fx_names]
        se[r] = [res["se"].get(nm, np.nan) for nm in fx_names]
    out = pd.DataFrame({k: cols[k] for k in ("response", "nobs", "criterion", "REML", "sigma", "converged",
                                             "singular")})
    out = out.astype({"nobs": np.int64, "REML": bool, "converged": bool, "singular": bool})
    extra = {**{f"theta:{nm}": theta[:, j] for j, nm in enumerate(th_names)},
             **{f"fixef:{nm}": fixef[:, j] for j, nm in enumerate(fx_names)},
             **{f"se:{nm}": se[:, j] for j, nm in enumerate(fx_names)},
             "messages": pd.Series(cols["messages"], dtype=object)}
    out = pd.concat([out, pd.DataFrame(extra)], axis=1)
    _warn_summary(m, singular, conv, failed)
    return out


def _warn_summary(m: int, singular: int, conv: int, failed: list[str]) -> None:
    if singular:
        warnings.warn(f"{singular} of {m} fits were singular (boundary fits); see the 'singular' column",
                      SingularFitWarning, stacklevel=4)
    if conv:
        warnings.warn(f"{conv} of {m} fits had convergence warnings; see the 'converged' and 'messages' "
                      "columns", ConvergenceWarning, stacklevel=4)
    if failed:
        warnings.warn(f"{len(failed)} of {m} fits failed (first: {failed[0]}); their rows are NaN",
                      RuntimeWarning, stacklevel=4)
