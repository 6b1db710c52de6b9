"""The parametric bootstrap of a fitted model (lme4's ``bootMer`` and ``confint(method = "boot")``).

Every replicate draws y* as ``simulate`` does (new random effects and noise, ``_simulate``) and
refits the same design to it, recording θ, σ, β and the SDs/correlations of each term in θ's
positions (``_params.Cv_to_Sv``: SDs √diag Σ_i on the diagonal of T's lower triangle,
correlations Σ_i[a, b]/(sd_a sd_b) off it, named ``.sig01``, ``.sig02``, ...).  Replicate r uses
the r-th child of ``SeedSequence(seed)``, so the results do not depend on how the replicates are
spread over workers (``_parallel``).
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

from ._data import check_level
from ._parallel import n_workers, run_tasks
from ._params import Cv_to_Sv
from ._progress import Progress
from ._simulate import Simulator, make_simulator
from ._summary import confint_row_names, format_pct, select_parm

__all__ = ["BootstrapResult", "bootstrap"]


def param_vector(structure, theta, sigma, beta) -> np.ndarray:
    """[.sig01 ..., .sigma, β...] as lme4's confint rows."""
    return np.concatenate([Cv_to_Sv(structure.terms, np.asarray(theta, float), float(sigma)), [float(sigma)],
                           np.asarray(beta, dtype=float)])


@dataclass
class _Job:
    """What every worker needs: the model (pickled once per worker process), the simulator and
    the options of the refits."""
    model: object
    sim: Simulator
    fit_options: dict

    def replicate(self, seed) -> tuple:
        """Simulate y* from ``seed`` and refit: (values, θ, converged, singular, error)."""
        s = self.model.structure
        try:
            y = self.sim.draw(np.random.default_rng(seed))
            r = self.model.refit(y, **self.fit_options)
            return (param_vector(s, r.theta, r.sigma, r.fixef.to_numpy()), np.asarray(r.theta, float),
                    bool(r.converged), bool(r.singular), None)
        except Exception as e:  # a failed refit is recorded, not fatal (bootMer counts them too)
            return np.full(s.ntheta + 1 + s.p, np.nan), np.full(s.ntheta, np.nan), False, False, \
                f"{type(e).__name__}: {e}"


def _quiet(job: _Job) -> _Job:
    """A worker's setup (``_parallel``): the refits' warnings are counted in ``status``, not shown."""
    warnings.simplefilter("ignore")
    return job


def _replicates(job: _Job, chunk: tuple[list[int], list]) -> list[tuple]:
    """The replicates of one chunk (a ``_parallel`` task): its indices with their seeds."""
    return [job.replicate(seed) for seed in chunk[1]]


def bootstrap(res, nsim: int, seed=None, n_jobs: int = 1, progress=None,
              fit_options: dict | None = None) -> BootstrapResult:
    """``nsim`` parametric bootstrap replicates of the fit ``res`` (``LmerResult.bootstrap`` says
    how; module docstring)."""
    nsim = int(nsim)
    if nsim < 1:
        raise ValueError(f"nsim must be a positive integer, got {nsim}")
    n_jobs = n_workers(n_jobs, nsim)
    s = res.structure
    t_start = time.perf_counter()
    seeds = (root := np.random.SeedSequence(seed)).spawn(nsim)
    job = _Job(res.model, make_simulator(res, "~0"), dict(fit_options or {}))
    # Chunks of replicates: a few per worker, so that a slow one does not hold up the others.
    size = 1 if n_jobs == 1 else max(1, math.ceil(nsim / (n_jobs * 4)))
    chunks = [(list(range(a, min(a + size, nsim))), seeds[a:a + size]) for a in range(0, nsim, size)]
    bar = Progress(progress, "bootstrap", "fits", total=nsim)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            parts, parallel = run_tasks(_quiet, _replicates, chunks, job, n_jobs, bar, weight=lambda c: len(c[0]),
                                        local=job)
    finally:
        bar.close()
    results = [r for part in parts for r in part]
    names = confint_row_names(s)
    idx = pd.RangeIndex(nsim, name="replicate")
    reps = pd.DataFrame(np.vstack([r[0] for r in results]), columns=names, index=idx)
    theta = pd.DataFrame(np.vstack([r[1] for r in results]).reshape(nsim, s.ntheta), columns=list(s.theta_names),
                         index=idx)
    status = pd.DataFrame({"converged": [r[2] for r in results], "singular": [r[3] for r in results],
                           "error": pd.Series([r[4] for r in results], dtype=object)}, index=idx)
    est = pd.Series(param_vector(s, res.theta, res.sigma, res.fixef.to_numpy()), index=names, name="estimate")
    out = BootstrapResult(reps, theta, est, status, seed if seed is not None else root.entropy, parallel,
                          n_jobs, time.perf_counter() - t_start)
    if out.n_failed:
        warnings.warn(f"{out.n_failed} of {nsim} bootstrap refits failed (first: "
                      f"{status['error'].dropna().iloc[0]}); their rows are NaN", RuntimeWarning, stacklevel=3)
    return out


# ----------------------------------------------------------------------------- the result

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
        level = check_level(level)
        kind = str(type).lower()
        if kind not in ("perc", "basic", "norm"):
            raise ValueError(f"unknown type {type!r}; choose 'perc', 'basic' or 'norm'")
        a = (1.0 - float(level)) / 2.0
        cols = format_pct([a, 1.0 - a])
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
