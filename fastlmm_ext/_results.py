"""The fitted model: estimates, variance components, conditional modes, criteria.

At the optimum θ̂ (lme4's conventions):
    σ̂² = r²(θ̂) / (n − p) for REML fits,  r²(θ̂) / n for ML fits
    Var(β̂) = σ̂² (R_Xᵀ R_X)⁻¹
    Var(b) = σ̂² Λ_θ̂ Λ_θ̂ᵀ  (per term: σ̂² T Tᵀ)
    b̂ = Λ_θ̂ û  (conditional modes),  Var(b | y) ≈ σ̂² Λ (ΛᵀZᵀWZΛ + I)⁻¹ Λᵀ  (lme4's condVar)
    logLik = −criterion / 2;  AIC = −2 logLik + 2 k;  BIC = −2 logLik + k log n,  k = p + dim θ + 1
    residuals (lme4's residuals.merMod): response y − ŷ, Pearson √w (y − ŷ), scaled ones / σ̂

The result's other methods live with their ideas: ``predict`` (``_predict``), ``simulate``
(``_simulate``), ``bootstrap`` (``_bootstrap``), tests and intervals (``_inference``), hat values,
Cook's distances and deletion diagnostics (``_influence``), the summary
text (``_summary``), statsmodels' names (``_aliases``).  Derived models (an ML twin, a refit to a
new response) are asked of ``model``.
"""
from __future__ import annotations

from functools import cached_property

import numpy as np
import pandas as pd
import scipy.linalg as la

from . import _bootstrap, _means, _simulate
from ._aliases import StatsmodelsMixin
from ._bootstrap import BootstrapResult
from ._inference import InferenceMixin
from ._influence import InfluenceMixin
from ._optimize import OptSummary
from ._params import sd_cor
from ._pls import PLSState, profiled_criterion, residual_df
from ._predict import PredictMixin
from ._summary import format_summary

__all__ = ["LmerResult"]


class LmerResult(PredictMixin, InferenceMixin, InfluenceMixin, StatsmodelsMixin):
    """Result of :func:`fastlmm_ext.lmer` / :meth:`LinearMixedModel.fit` (lme4's ``merMod``).

    The formulas are in this module's docstring; names follow lme4 (statsmodels' names, e.g.
    ``params``, ``bse``, ``pvalues``, are aliases).  A result pickles (``pickle``,
    ``copy.deepcopy``, process pools): the kernel is rebuilt from the cross-products on first use.

    Attributes
    ----------
    fixef : pandas.Series
        β̂, indexed by R's coefficient names (``(Intercept)``, ``metali``, ...).
    se, vcov : pandas.Series, pandas.DataFrame
        Standard errors and Var(β̂) = σ̂² (R_XᵀR_X)⁻¹.
    theta : numpy.ndarray
        θ̂ in lme4's parameterisation (``theta_names``: ``Subject.(Intercept)``, ...).
    sigma : float
        Residual standard deviation σ̂.
    varcorr : pandas.DataFrame
        As R's ``as.data.frame(VarCorr(fit))``: grp, var1, var2, vcov, sdcor.
    ranef, condvar, ranef_condsd : dict
        Conditional modes b̂ per grouping factor (levels × terms), their conditional
        covariances per term (levels, k, k), and conditional SDs laid out like ``ranef``.
    criterion, loglik, aic, bic, deviance : float
        REML criterion or ML deviance at the optimum, logLik = −criterion/2, AIC, BIC, and
        the ML deviance at these estimates (lme4's ``deviance(fit, REML = FALSE)``).
    nobs, n_dropped, npar : int
        Observations used, rows dropped for missing values, p + dim θ + 1.
    ngrps : dict
        Levels per grouping factor.
    REML, converged, singular : bool
        The criterion fitted; the optimiser converged and lme4's checks passed; some θ on its
        bound (lme4's ``isSingular``, see ``SingularFitWarning``).
    messages : list of str
        Optimiser, convergence and singular-fit messages.
    optsummary : OptSummary
        The optimisation: optimizer, initial and final θ, evaluations, return code.
    model, structure : LinearMixedModel, ModelStructure
        The model (for ``objective(θ)``, ``refit``) and its design.
    """

    def __init__(self, model, state: PLSState, optsummary: OptSummary,
                 criterion: float, singular: bool, messages: list[str], conv_info: dict | None = None):
        s = model.structure
        self.model = model
        self.structure = s
        self.REML: bool = model.REML
        self.formula: str = s.formula
        self.backend: str = model.backend.name
        self._state = state
        self.optsummary = optsummary
        self.criterion: float = float(criterion)
        self.singular: bool = singular
        self.converged: bool = bool(optsummary.converged) and not any("failed to converge" in m for m in messages)
        self.messages: list[str] = list(messages)
        self.conv_info = conv_info or {}
        self.theta: np.ndarray = np.asarray(state.theta, dtype=float).copy()
        self.nobs: int = s.n
        self.n_dropped: int = s.n_dropped
        self.sigma: float = float(np.sqrt(state.pwrss / residual_df(s.n, s.p, self.REML)))
        if s.p:
            # (R_XᵀR_X)⁻¹ through two triangular solves with the factor, not an explicit inverse of R_XᵀR_X.
            Rinv_t = la.solve_triangular(state.RX, np.eye(s.p), lower=False)
            self._V = self.sigma ** 2 * (Rinv_t @ Rinv_t.T)
        else:
            self._V = np.zeros((0, 0))
        self.npar: int = s.p + s.ntheta + 1
        self.loglik: float = -self.criterion / 2.0
        self.aic: float = self.criterion + 2.0 * self.npar
        self.bic: float = self.criterion + np.log(s.n) * self.npar
        # lme4's deviance(fit, REML = FALSE): the ML deviance at these estimates.
        self.deviance: float = profiled_criterion(state.ldL2, state.ldRX2, state.pwrss, s.n, s.p, False,
                                                      model.backend.sum_log_w)
        self.ngrps: dict[str, int] = {}
        for t in s.terms:
            self.ngrps.setdefault(t.factor, t.nlevels)

    # ------------------------------------------------------------------ lme4-style accessors
    @cached_property
    def fixef(self) -> pd.Series:
        """β̂, named by X's columns (lme4's ``fixef``)."""
        return pd.Series(self._state.beta, index=list(self.structure.fixef_names), name="Estimate", dtype=float)

    @cached_property
    def vcov(self) -> pd.DataFrame:
        """Var(β̂) = σ̂² (R_XᵀR_X)⁻¹ (lme4's ``vcov``), named by X's columns."""
        names = list(self.structure.fixef_names)
        return pd.DataFrame(self._V, index=names, columns=names)

    @property
    def theta_names(self) -> list[str]:
        return self.structure.theta_names

    @property
    def beta(self) -> np.ndarray:
        return self.fixef.to_numpy()

    @property
    def se(self) -> pd.Series:
        return pd.Series(np.sqrt(np.diag(self.vcov.to_numpy())), index=self.fixef.index, name="Std. Error")

    def term_covariances(self) -> dict[str, np.ndarray]:
        """Σ_i = σ² T_i T_iᵀ for every random-effects term (keyed by the term's VarCorr name)."""
        out = {}
        for t in self.structure.terms:
            T = t.T(self.theta)
            out[t.name] = self.sigma ** 2 * (T @ T.T)
        return out

    @cached_property
    def varcorr(self) -> pd.DataFrame:
        """Variance components like R's ``as.data.frame(VarCorr(fit))``: per term the variances,
        then the covariances (sdcor = correlation), then the residual."""
        rows = []
        for t in self.structure.terms:
            S = self.term_covariances()[t.name]
            sd, C = sd_cor(t.T(self.theta), self.sigma)
            for i in range(t.k):
                rows.append((t.name, t.cnms[i], None, S[i, i], sd[i]))
            for i in range(t.k):
                for j in range(i + 1, t.k):
                    rows.append((t.name, t.cnms[i], t.cnms[j], S[i, j], C[i, j]))
        rows.append(("Residual", None, None, self.sigma ** 2, self.sigma))
        cols = list(zip(*rows))
        # object columns keep None for "no second variable", as R's NA (pandas would make it NaN)
        return pd.DataFrame({"grp": pd.Series(cols[0], dtype=object), "var1": pd.Series(cols[1], dtype=object),
                             "var2": pd.Series(cols[2], dtype=object), "vcov": np.array(cols[3], dtype=float),
                             "sdcor": np.array(cols[4], dtype=float)})

    VarCorr = property(lambda self: self.varcorr)

    @cached_property
    def ranef(self) -> dict[str, pd.DataFrame]:
        """Conditional modes b̂ = Λû per grouping factor: levels × term columns (terms that share
        a factor, e.g. (1|g) + (0+x|g), are combined as lme4's ranef() does)."""
        b = self._state.b
        return _by_factor(self.structure, [b[t.col_offset:t.col_offset + t.q].reshape(t.nlevels, t.k)
                                           for t in self.structure.terms])

    @cached_property
    def condvar(self) -> dict[str, np.ndarray]:
        """Conditional covariance of the modes per term (lme4's ``condVar``/postVar):
        array (levels, k, k) of σ² T [(ΛᵀZᵀWZΛ + I)⁻¹]_aa Tᵀ, keyed by the term's VarCorr name."""
        out = {}
        for i, t in enumerate(self.structure.terms):
            G = self.model.backend.inverse_blocks(self.theta, i)
            T = t.T(self.theta)
            out[t.name] = self.sigma ** 2 * np.einsum("ij,ljk,mk->lim", T, G, T)
        return out

    @cached_property
    def ranef_condsd(self) -> dict[str, pd.DataFrame]:
        """Conditional standard deviations of the modes, laid out like :attr:`ranef`."""
        return _by_factor(self.structure, [np.sqrt(np.maximum(np.einsum("lii->li", self.condvar[t.name]), 0.0))
                                           for t in self.structure.terms])

    # ------------------------------------------------------------------ fitted values
    def fitted(self) -> np.ndarray:
        """Conditional fitted values  Xβ̂ + Z b̂ + offset."""
        s = self.structure
        s.require_rows("fitted()")
        mu = s.X @ self._state.beta + s.Z @ self._state.b
        return mu + (s.offset if s.offset is not None else 0.0)

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

    # ------------------------------------------------------------------ simulation, bootstrap
    def simulate(self, nsim: int = 1, seed=None, re_form="~0") -> pd.DataFrame:
        """New responses from the fitted model, as lme4's ``simulate(fit, nsim, seed)``.

        y* = Xβ̂ + offset + Z Λ_θ̂ u* σ̂ + ε* σ̂/√w,  u* ~ N(0, I_q),  ε* ~ N(0, I_n)
        (zero-weight rows get no noise).  ``re_form="~0"`` (default, lme4's ``re.form = NA``)
        draws new random effects for every term; ``re_form=None`` holds all of them at their
        conditional modes b̂ (y* = ŷ + ε* σ̂/√w); a formula of terms holds only those.

        ``seed`` goes to ``np.random.default_rng``; each column draws u* then ε* from the same
        stream, so ``simulate(1, seed)`` is the first column of ``simulate(k, seed)``.
        Returns an n × nsim DataFrame, columns ``sim_1``, ..., indexed by the model's rows."""
        return _simulate.simulate(self, nsim, seed, re_form)

    def bootstrap(self, nsim: int, seed=None, n_jobs: int = 1, progress=None,
                  fit_options: dict | None = None) -> BootstrapResult:
        """Parametric bootstrap, as lme4's ``bootMer(fit, FUN, nsim, seed)`` with lme4's confint
        quantities: for each replicate r, y*_r is simulated as in :meth:`simulate` (new random
        effects and noise) and refitted on the same design (``model.refit``), recording
        the SDs/correlations of each term (``.sig01``, ...), ``.sigma``, the fixed effects and θ.

        * Reproducible: replicate r uses ``np.random.default_rng(SeedSequence(seed).spawn(nsim)[r])``,
          so results do not depend on ``n_jobs``.
        * ``n_jobs > 1`` (``-1``: all CPUs) refits with ``_parallel``: in a process pool (the model
          is pickled once per worker), or in threads where processes cannot be used.
        * ``progress``: True → shown on stderr; None → only on a terminal once the run has taken
          more than 2 s; False → never (``_progress``).  Nothing is printed otherwise.
        * Warnings of the refits (singular fits, convergence) are not shown; they are counted in
          ``status``.  A refit that fails gives a NaN row and its error message in ``status``.
        * ``fit_options`` go to every refit (e.g. ``{"check_conv": False}``).

        Returns a :class:`BootstrapResult` (``.replicates``, ``.theta``, ``.estimate``,
        ``.confint(level, type)``)."""
        return _bootstrap.bootstrap(self, nsim, seed, n_jobs, progress, fit_options)

    # ------------------------------------------------------------------ marginal means (_means)
    def ls_means(self, which=None, pairwise: bool = False, ddf: str = "satterthwaite",
                 level: float = 0.95) -> pd.DataFrame:
        """lmerTest's ``ls_means(fit, which, level, ddf, pairwise)``: least-squares means of each
        factor term (or the ``which`` ones) over the reference grid (covariates at their means,
        cells weighted equally), rows ``Product1``, ``Product1:Information2``; with
        ``pairwise=True`` their differences (``Product1 - Product2``, lmerTest's ``difflsmeans``).
        Columns Estimate, Std. Error, df, t value, lower, upper, Pr(>|t|); non-estimable rows NaN;
        ``ddf="satterthwaite" | "kenward-roger"`` (see ``_means``)."""
        return _means.ls_means(self, which, pairwise, ddf, level)

    def emmeans(self, specs, by=None, pairwise: bool = False, adjust: str = "tukey", level: float = 0.95,
                at: dict | None = None, df_method: str | None = None, **limits) -> _means.EMMeans:
        """R's ``emmeans(fit, specs, by, at = at, lmer.df = df_method)``: marginal means over the
        reference grid with emmeans' df for lmer fits (Kenward–Roger up to 3000 observations, see
        ``_means``); ``specs`` as ``"~ A"``, ``"~ A | B"``, ``"pairwise ~ A"`` or a list of names.
        ``.pairs(adjust="tukey" | "holm" | "bonferroni" | "none")`` / ``.contrast("pairwise")``
        give the pairwise contrasts; ``pairwise=True`` stores them in ``.contrasts``.
        ``pbkrtest_limit=`` and ``lmerTest_limit=`` (3000) move emmeans' size limits."""
        return _means.emmeans(self, specs, by, pairwise, adjust, level, at, df_method, **limits)

    # ------------------------------------------------------------------ display
    def summary(self) -> str:
        """lme4's ``print(summary(fit))`` layout (``_summary``)."""
        return format_summary(self)

    def __repr__(self) -> str:
        return (f"<LmerResult {self.formula!r} {'REML' if self.REML else 'ML'} criterion={self.criterion:.6f} "
                f"sigma={self.sigma:.6g} nobs={self.nobs}>")

    def __str__(self) -> str:
        return self.summary()

    # ------------------------------------------------------------------ new response
    def refit(self, new_y, **fit_options) -> LmerResult:
        """The same model fitted to a new response (lme4's ``refit(fit, newresp)``): see
        :meth:`LinearMixedModel.refit`; ``new_y`` has one value per used row (:attr:`nobs`)."""
        return self.model.refit(new_y, **fit_options)


def _by_factor(s, values: list[np.ndarray]) -> dict[str, pd.DataFrame]:
    """Per grouping factor, the terms' (levels × columns) ``values`` as one DataFrame: terms that
    share a factor, e.g. (1|g) + (0+x|g), side by side on the first term's levels, as lme4's
    ranef() combines them."""
    out: dict[str, pd.DataFrame] = {}
    for t, vals in zip(s.terms, values):
        df = pd.DataFrame(vals, index=pd.Index(list(t.levels), name=t.factor), columns=list(t.cnms))
        if t.factor in out:
            prev = out[t.factor]
            df = df.reindex(prev.index)
            out[t.factor] = pd.concat([prev, df[[c for c in df.columns if c not in prev.columns]]], axis=1)
        else:
            out[t.factor] = df
    return out
