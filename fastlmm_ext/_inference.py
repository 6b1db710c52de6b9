"""Inference after the fit: t and F tests of the fixed effects, confidence intervals and
likelihood-ratio tests of nested models (the methods of :class:`LmerResult` that lmerTest and
lme4 provide).

* ``coef_table`` (lmerTest's ``summary(fit)$coefficients``): t = l β̂ / √(l V lᵀ) for each
  coefficient; ``contrast_test``, ``anova_table`` (lmerTest's ``anova(fit, type = 1 | 2 | 3)``)
  and ``drop1``: for a q-row contrast L, F = (Lβ̂)ᵀ (L V Lᵀ)⁻¹ (Lβ̂) / q, computed along the
  eigen-directions of L V Lᵀ (:func:`contrast_ftest`); the terms' hypotheses come from
  ``_hypotheses``.  ``ranova``: likelihood-ratio tests of the random-effects terms (``_ranova``).
* The denominator degrees of freedom come from a ddf method (:data:`DDF_METHODS`, a function of
  (result, method) returning the df of a contrast and the covariance of β̂ to use):
  ``"satterthwaite"`` (``_satterthwaite``), ``"kenward-roger"`` (``_kenward_roger``: the adjusted
  covariance Φ_A, and its own F test, scaled by λ on one denominator df m), ``"residual"``
  (n − p), ``"normal"`` (∞: z and χ²).
* ``confint``: Wald intervals β̂ ± z SE, profile-likelihood intervals (``_profile``) and
  parametric-bootstrap percentile intervals (``_bootstrap``).
* :func:`anova` of several fits: likelihood-ratio tests, REML fits refitted by ML first.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pandas as pd
from scipy import stats

from ._data import check_level
from ._exceptions import ArgumentError
from ._hypotheses import anova_hypotheses, check_anova_type, drop1_hypotheses
from ._kenward_roger import KenwardRogerInfo
from ._profile import profile_confint
from ._ranova import ranova_table
from ._satterthwaite import SatterthwaiteInfo, fstat_ddf
from ._summary import confint_row_labels, confint_row_names, format_pct, select_parm
from ._threads import fit_threads

__all__ = ["InferenceMixin", "anova", "contrast_ftest", "ddf_method", "DDF_METHODS", "DenominatorDF"]

_COEF_COLUMNS = ["Estimate", "Std. Error", "df", "t value", "Pr(>|t|)"]
_ANOVA_COLUMNS = ["Sum Sq", "Mean Sq", "NumDF", "DenDF", "F value", "Pr(>F)"]
_LRT_COLUMNS = ["npar", "AIC", "BIC", "logLik", "deviance", "Chisq", "Df", "Pr(>Chisq)"]


# ----------------------------------------------------------------------------- ddf methods

@dataclass(frozen=True)
class DenominatorDF:
    """How the tests of one ddf method get their degrees of freedom: ``df_of(l)``, the df of a
    single contrast l (per eigen-direction of a q-row contrast, combined by ``combine``), or one
    ``const`` for every contrast; ``vcov``, the Var(β̂) the tests use.  A method whose F test is
    not of that form gives ``ftest(L, beta, sigma)``, the whole row of :func:`contrast_ftest`."""
    df_of: Callable[[np.ndarray], float] | None
    const: float | None
    vcov: np.ndarray
    combine: Callable[[np.ndarray], float] = fstat_ddf
    ftest: Callable[[np.ndarray, np.ndarray, float], dict] | None = None


#: ddf method → its :class:`DenominatorDF` for a fitted result.  A new method (Kenward–Roger, say)
#: adds an entry: a function of the result returning its df of a contrast and its covariance.
DDF_METHODS: dict[str, Callable[..., DenominatorDF]] = {
    "satterthwaite": lambda res: DenominatorDF(res.satterthwaite.df_contrast, None, res.vcov.to_numpy()),
    "kenwardroger": lambda res: DenominatorDF(res.kenward_roger.df_contrast, None, res.kenward_roger.vcov_adj,
                                              ftest=res.kenward_roger.ftest),
    "residual": lambda res: DenominatorDF(None, float(res.structure.n - res.structure.p), res.vcov.to_numpy()),
    "normal": lambda res: DenominatorDF(None, np.inf, res.vcov.to_numpy()),
}
_DDF_ALIASES = {"z": "normal", "kr": "kenwardroger"}
DDF_OPTIONS = ("satterthwaite", "kenward-roger", "residual", "normal", "z")


def _check_ddf(ddf: str) -> str:
    """The ddf method's key (case, '-' and '_' ignored; "z" is "normal", "KR" "kenward-roger");
    ArgumentError if unknown."""
    key = str(ddf).lower().replace("-", "").replace("_", "") if isinstance(ddf, str) else None
    key = _DDF_ALIASES.get(key, key)
    if key not in DDF_METHODS:
        raise ArgumentError(f"unknown ddf {ddf!r}; choose one of {', '.join(repr(o) for o in DDF_OPTIONS)}")
    return key


def ddf_method(res, ddf: str) -> DenominatorDF:
    """The :class:`DenominatorDF` of method ``ddf`` for the result ``res``."""
    return DDF_METHODS[_check_ddf(ddf)](res)


_SQRT_EPS = math.sqrt(np.finfo(float).eps)


def contrast_ftest(L, beta: np.ndarray, sigma: float, ddf: DenominatorDF, eps: float = _SQRT_EPS) -> dict:
    """Joint test of Lβ = 0 with V = ``ddf.vcov``: L V Lᵀ = P D Pᵀ, q = #{d > eps·d_max},
    F = Σ_m (p_mᵀLβ)²/d_m / q; DenDF from the per-direction df (``ddf.df_of``, combined by
    ``ddf.combine``) or ``ddf.const``; Mean Sq = F σ̂², Sum Sq = q Mean Sq.  A method with its own
    test (``ddf.ftest``, Kenward–Roger's) gives the row instead."""
    L = np.atleast_2d(np.asarray(L, dtype=float))
    nan_row = {"Sum Sq": np.nan, "Mean Sq": np.nan, "NumDF": np.nan, "DenDF": np.nan, "F value": np.nan,
               "Pr(>F)": np.nan}
    if L.shape[0] == 0 or L.shape[1] == 0:
        return nan_row
    if ddf.ftest is not None:
        return ddf.ftest(L, beta, sigma)
    if L.shape[0] == 1:
        l = L[0]
        var = float(l @ ddf.vcov @ l)
        Fv = float(l @ beta) ** 2 / var
        q = 1
        den = ddf.df_of(l) if ddf.const is None else ddf.const
    else:
        VL = L @ ddf.vcov @ L.T
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
        if ddf.const is not None:
            den = ddf.const
        elif q == 1:
            den = ddf.df_of(PtL[0])
        else:
            den = ddf.combine(np.array([ddf.df_of(PtL[m]) for m in range(q)]))
    ms = Fv * sigma ** 2
    if np.isinf(den):
        pval = float(stats.chi2.sf(Fv * q, q))
    else:
        pval = float(stats.f.sf(Fv, q, den))
    return {"Sum Sq": ms * q, "Mean Sq": ms, "NumDF": q, "DenDF": float(den), "F value": Fv, "Pr(>F)": pval}


# ----------------------------------------------------------------------------- the mixin

class InferenceMixin:
    """Inference methods of :class:`LmerResult`: ``coef_table``, ``anova_table``, ``drop1``,
    ``ranova``, ``confint``, ``contrast_test``, ``satterthwaite`` (the cached derivative
    information) and ``kenward_roger`` / ``vcov_kr`` (Kenward–Roger's, cached)."""

    # -- Satterthwaite building block (computed once per result)
    @property
    def satterthwaite(self) -> SatterthwaiteInfo:
        """Hessian of the deviance in φ = (θ, σ), A = 2H⁻¹ and ∂Var(β̂)/∂φ (computed on first use)."""
        info = self.__dict__.get("_satterthwaite_info")
        if info is None:
            with fit_threads(self.model.threads):   # many small solves: as in the fit (sleepstudy 0.56 s → 0.10 s)
                info = SatterthwaiteInfo.from_result(self)
            self.__dict__["_satterthwaite_info"] = info
        return info

    # -- Kenward–Roger building block (computed once per result)
    @property
    def kenward_roger(self) -> KenwardRogerInfo:
        """Kenward–Roger's adjusted covariance Φ_A of β̂ and its tests (``_kenward_roger``; pbkrtest's
        ``vcovAdj``, ``KRmodcomp``, ``Lb_ddf``), computed on first use; REML fits only."""
        info = self.__dict__.get("_kenward_roger_info")
        if info is None:
            info = KenwardRogerInfo.from_result(self)
            self.__dict__["_kenward_roger_info"] = info
        return info

    @property
    def vcov_kr(self) -> pd.DataFrame:
        """Kenward–Roger's adjusted Var(β̂), Φ_A (pbkrtest's ``vcovAdj(fit)``), as :attr:`vcov`."""
        return pd.DataFrame(self.kenward_roger.vcov_adj, index=self.fixef.index, columns=self.fixef.index)

    def coef_table(self, ddf: str = "satterthwaite") -> pd.DataFrame:
        """Fixed-effect estimates with t tests, like ``summary(fit)$coefficients`` of lmerTest.

        ``ddf="satterthwaite"`` (default): t = β̂_j / SE_j on Satterthwaite's
        ν_j = 2 V_jj² / (gᵀ A g), g_k = (∂V/∂φ_k)_jj (module docstring);  ``"kenward-roger"``
        (or ``"Kenward-Roger"``, ``"KR"``; REML fits): SE_j = √(Φ_A)_jj and Kenward and Roger's df
        of β_j, as lmerTest's ``summary(fit, ddf = "Kenward-Roger")``;  ``"residual"``:
        ν = n − p;  ``"normal"`` (or ``"z"``): standard normal p-values, df = inf.
        Columns: Estimate, Std. Error, df, t value, Pr(>|t|)."""
        beta = self.fixef.to_numpy()
        p = beta.size
        dm = ddf_method(self, ddf) if p else None
        se = np.sqrt(np.diag(dm.vcov if p else self.vcov.to_numpy()))
        if dm is not None and dm.df_of is not None:
            dfs = np.array([dm.df_of(np.eye(p)[j]) for j in range(p)])
        else:
            dfs = np.full(p, dm.const if dm is not None else np.nan)
        with np.errstate(divide="ignore", invalid="ignore"):
            t = beta / se
        pval = np.array([2.0 * (stats.norm.sf(abs(tj)) if np.isinf(dj) else stats.t.sf(abs(tj), dj))
                         for tj, dj in zip(t, dfs)])
        return pd.DataFrame({"Estimate": beta, "Std. Error": se, "df": dfs, "t value": t, "Pr(>|t|)": pval},
                            index=self.fixef.index, columns=_COEF_COLUMNS)

    def contrast_test(self, L, ddf: str = "satterthwaite") -> pd.DataFrame:
        """F test of the hypothesis L β = 0 for a contrast matrix L (rows × p; a vector is one row).

        F = (Lβ̂)ᵀ(L V Lᵀ)⁻¹(Lβ̂)/q (q = rank), DenDF as in ``anova_table``; Sum Sq = q·F·σ̂².
        ``ddf="kenward-roger"``: F = λ (Lβ̂)ᵀ(L Φ_A Lᵀ)⁻¹(Lβ̂)/q on Kenward and Roger's m df, Sum Sq
        and Mean Sq from the unscaled F (lmerTest's; pbkrtest's ``KRmodcomp``)."""
        dm = ddf_method(self, ddf)
        L = np.atleast_2d(np.asarray(L, dtype=float))
        if L.shape[1] != self.structure.p:
            raise ArgumentError(f"L must have {self.structure.p} columns (one per fixed effect), got {L.shape[1]}")
        row = contrast_ftest(L, self.fixef.to_numpy(), self.sigma, dm)
        return pd.DataFrame([row], columns=_ANOVA_COLUMNS)

    def anova_hypotheses(self, type: int | str = 3) -> dict[str, np.ndarray]:
        """The contrast matrix L of every fixed-effect term that ``anova_table(type)`` tests
        (lmerTest's ``attr(anova(fit, type = ), "hypotheses")``), rows × p in the fit's
        coefficient order; 0 rows for a term with nothing testable (see ``_hypotheses``)."""
        t = check_anova_type(type)
        cache = self.__dict__.setdefault("_anova_hypotheses", {})
        if t not in cache:
            cache[t] = anova_hypotheses(self.structure, t)
        return cache[t]

    def _ftest_table(self, hyp: dict, ddf: str) -> pd.DataFrame:
        """One F test (:func:`contrast_ftest`) per term of ``hyp`` (an L, or None for an NA row)."""
        _check_ddf(ddf)
        dm = ddf_method(self, ddf) if any(L is not None and L.shape[0] for L in hyp.values()) else None
        beta = self.fixef.to_numpy()
        rows = {name: contrast_ftest(L, beta, self.sigma, dm) if L is not None and L.shape[0]
                else dict.fromkeys(_ANOVA_COLUMNS, np.nan) for name, L in hyp.items()}
        tab = pd.DataFrame.from_dict(rows, orient="index", columns=_ANOVA_COLUMNS) if rows else \
            pd.DataFrame(columns=_ANOVA_COLUMNS, dtype=float)
        if len(tab) and np.isfinite(tab["NumDF"]).all():
            tab["NumDF"] = tab["NumDF"].astype(int)
        return tab

    def anova_table(self, type: int | str = 3, ddf: str = "satterthwaite") -> pd.DataFrame:
        """ANOVA table of the fixed-effect terms, like lmerTest's ``anova(fit, type = , ddf = )``.

        ``type``: 3 (default), 2 or 1 (also "III", "II", "I"), the hypotheses of
        ``anova_hypotheses(type)``: SAS's type III, marginality (type II) or sequential (type I).
        Each term's L β = 0 is tested with F = (Lβ̂)ᵀ(L V Lᵀ)⁻¹(Lβ̂)/q; ``ddf``: "satterthwaite"
        (DenDF from the eigen-directions of L V Lᵀ, module docstring), "kenward-roger" (REML fits:
        Kenward and Roger's scaled F test, as ``contrast_test``; Mean Sq from the unscaled F),
        "residual" (n − p), "normal" (inf: χ²_q/q).  Mean Sq = F·σ̂², Sum Sq = q·Mean Sq.  Rows in R's term order; a term with nothing testable (its columns
        aliased) is moved to the end as an all-NaN row, as lmerTest does.  Columns: Sum Sq,
        Mean Sq, NumDF, DenDF, F value, Pr(>F)."""
        tab = self._ftest_table(self.anova_hypotheses(type), ddf)
        untestable = tab["NumDF"].isna().to_numpy()
        return pd.concat([tab[~untestable], tab[untestable]]) if untestable.any() else tab

    def drop1(self, scope: str | list[str] | None = None, ddf: str = "satterthwaite") -> pd.DataFrame:
        """F tests of dropping each marginal fixed-effect term, like lmerTest's ``drop1(fit)``
        (no refits: tests of contrasts of this fit).

        ``scope``: the terms to drop (default: every term in no other term, R's ``drop.scope``;
        others are refused).  A term's hypothesis is its coefficients = 0; when X is rank
        deficient, the directions of span(X) the model without the term lacks, and an all-NaN
        row when its removal leaves the span unchanged.  ``ddf`` and the columns as
        :meth:`anova_table`; ``table.attrs["hypotheses"]`` holds the contrasts tested."""
        hyp = drop1_hypotheses(self.structure, scope)
        tab = self._ftest_table(hyp, ddf)
        tab.attrs["hypotheses"] = hyp
        return tab

    def ranova(self, reduce_terms: bool = True) -> pd.DataFrame:
        """Likelihood-ratio tests of the random-effects terms, like lmerTest's ``ranova(fit)``.

        Each term is reduced (``(1 + x | g)`` → ``(1 | g)``, a row ``x in (1 + x | g)``) or, if
        it is ``(1 | g)`` or ``reduce_terms=False``, removed, and the model refitted by the same
        criterion (REML fits by REML).  Columns: npar, logLik, AIC, LRT, Df, Pr(>Chisq); the first
        row, ``<none>``, is this fit.  See ``_ranova``."""
        return ranova_table(self, reduce_terms)

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

        ``progress`` (profile and boot): True → shown on stderr (``_progress``); None (default)
        → only on a terminal once the run has taken more than 2 s; False → never."""
        m = str(method).lower()
        level = check_level(level)
        labels = confint_row_labels(self.structure)
        if parm is not None:
            back = {new: old for old, new in labels.items()}
            parm = back.get(parm, parm) if isinstance(parm, str) else [back.get(q, q) for q in parm]
        if m == "profile":
            table = profile_confint(self, float(level), parm, n_jobs=n_jobs, progress=progress)
        elif m == "boot":
            # lme4's confint(method="boot"): percentile intervals of a parametric bootstrap
            boot = self.bootstrap(int(nsim), seed=seed, n_jobs=n_jobs, progress=progress)
            table = boot.confint(level=float(level), parm=parm)
        elif m == "wald":
            a = (1.0 - float(level)) / 2.0
            cols = format_pct([a, 1.0 - a])
            z = stats.norm.ppf(1.0 - a)
            nsig = self.structure.ntheta
            names = confint_row_names(self.structure)
            beta = self.fixef.to_numpy()
            se = np.sqrt(np.diag(self.vcov.to_numpy()))
            lo = np.concatenate([np.full(nsig + 1, np.nan), beta - z * se])
            hi = np.concatenate([np.full(nsig + 1, np.nan), beta + z * se])
            table = select_parm(pd.DataFrame({cols[0]: lo, cols[1]: hi}, index=names), parm)
        else:
            raise ArgumentError(f"unknown method {method!r}; choose 'wald', 'profile' or 'boot'")
        return table if oldNames else table.rename(index=labels)


# ----------------------------------------------------------------------------- likelihood-ratio tests

def anova(*results, names=None, type: int | str = 3, ddf: str = "satterthwaite") -> pd.DataFrame:
    """Likelihood-ratio tests of nested models, like lme4's ``anova(m1, m2, ...)``.

    REML fits are refitted by ML first (``LinearMixedModel.ml_twin``).  Models are sorted by their number of parameters
    (k = p + dim θ + 1) and compared in sequence:  Chisq_i = 2·max(0, logLik_i − logLik_{i−1}),
    Df_i = k_i − k_{i−1}, Pr(>Chisq) = P(χ²_{Df} > Chisq).  Also AIC = −2 logLik + 2k,
    BIC = −2 logLik + k log n, deviance = −2 logLik.  All models must have the same number of
    observations.  ``names`` labels the rows (default: "model1", ... in the order given).
    A single model gives its ``anova_table(type, ddf)`` (type III by default, as lmerTest's
    ``anova(fit)``); ``type`` and ``ddf`` are ignored for several models."""
    if len(results) == 1 and isinstance(results[0], (list, tuple)):
        results = tuple(results[0])
    if not results:
        raise ArgumentError("anova() needs at least one fitted model")
    if len(results) == 1:
        return results[0].anova_table(type=type, ddf=ddf)
    if names is None:
        names = [f"model{i + 1}" for i in range(len(results))]
    names = list(names)
    if len(names) != len(results):
        raise ArgumentError(f"got {len(names)} names for {len(results)} models")
    nobs = {int(r.nobs) for r in results}
    if len(nobs) > 1:
        raise ArgumentError(f"models were not all fitted to the same number of observations: {sorted(nobs)}")
    y0 = results[0].structure.y
    if any(r.structure.has_rows and y0 is not None and not np.array_equal(r.structure.y, y0)
           for r in results[1:]):
        raise ArgumentError("models were not all fitted to the same response values; "
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
