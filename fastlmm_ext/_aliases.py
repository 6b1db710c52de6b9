"""statsmodels-style names, lme4-style aliases and serialisation for LmerResult.

Everything here is derived from attributes that :class:`~fastlmm_ext.LmerResult` already has
(``fixef``, ``se``, ``vcov``, ``loglik``, ``aic``, ``bic``, ``ranef``, ``structure``, ...); the
mixin adds no state.

statsmodels names (as ``MixedLMResults``)::

    params = fixef            bse = se               tvalues = fixef / se
    pvalues = 2 Φ(−|t|)       conf_int(α) = β̂ ± z_{1−α/2} SE     llf = loglik
    df_resid = nobs − npar    cov_params() = vcov    random_effects = ranef

lme4 names: ``logLik``, ``AIC``, ``BIC`` (properties) and ``getME(name)``.

``to_dict()`` / ``to_json()`` give a JSON-able record of the fit (schema in :meth:`to_dict`);
in IPython and Jupyter the result displays as its summary text (``_repr_pretty_``, ``_repr_html_``).
"""
from __future__ import annotations

import html
import json
import math
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

__all__ = ["StatsmodelsMixin", "SCHEMA_VERSION", "GETME_NAMES"]

#: Version of the layout returned by ``LmerResult.to_dict()``; bumped on incompatible changes.
SCHEMA_VERSION = 1

#: Names understood by ``LmerResult.getME``.
GETME_NAMES = ("theta", "beta", "sigma", "X", "Z", "Zt", "y", "lower", "Lambda", "Lambdat",
               "n", "p", "q", "ntheta")


def _num(x) -> float | None:
    """A plain Python float, or None for NaN / ±inf (JSON has no representation for them)."""
    if x is None:
        return None
    v = float(x)
    return v if math.isfinite(v) else None


def _nums(a) -> list:
    """Nested lists of plain floats (None for non-finite values) from an array-like."""
    arr = np.asarray(a, dtype=float)
    if arr.ndim == 0:
        return _num(arr)  # type: ignore[return-value]
    if arr.ndim > 1:
        return [_nums(row) for row in arr]
    return [_num(v) for v in arr]


def _text(x) -> str | None:
    """A string, or None for R's NA (None / NaN in a pandas object column)."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return None
    return str(x)


class StatsmodelsMixin:
    """statsmodels names (params, bse, ...), lme4 aliases, to_dict/to_json and the notebook display.

    Mixed into :class:`~fastlmm_ext.LmerResult`; it relies on that class's attributes."""

    # ------------------------------------------------------------------ statsmodels names
    @property
    def params(self) -> pd.Series:
        """Fixed-effects estimates β̂ (same as ``fixef``)."""
        return self.fixef.copy()

    @property
    def bse(self) -> pd.Series:
        """Standard errors of β̂, √diag Var(β̂) (same as ``se``)."""
        return self.se

    @property
    def tvalues(self) -> pd.Series:
        """Wald statistics t = β̂ / SE(β̂)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            t = self.fixef.to_numpy() / self.se.to_numpy()
        return pd.Series(t, index=self.fixef.index, name="t value")

    @property
    def pvalues(self) -> pd.Series:
        """Two-sided p-values 2 Φ(−|t|) of t = β̂ / SE from the standard normal distribution,
        as statsmodels' MixedLM reports them (no small-sample degrees of freedom)."""
        t = self.tvalues.to_numpy()
        return pd.Series(2.0 * stats.norm.sf(np.abs(t)), index=self.fixef.index, name="P>|z|")

    def conf_int(self, alpha: float = 0.05) -> pd.DataFrame:
        """Wald (normal) confidence intervals β̂ ± z_{1−α/2} SE(β̂): a DataFrame indexed by the
        fixed-effect names with columns ``0`` (lower) and ``1`` (upper), as statsmodels returns."""
        alpha = float(alpha)
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"alpha must lie strictly between 0 and 1, got {alpha}")
        z = stats.norm.ppf(1.0 - alpha / 2.0)
        est, se = self.fixef.to_numpy(), self.se.to_numpy()
        return pd.DataFrame({0: est - z * se, 1: est + z * se}, index=self.fixef.index)

    @property
    def llf(self) -> float:
        """Log-likelihood at the optimum (the REML log-likelihood for REML fits), = ``loglik``."""
        return self.loglik

    @property
    def df_resid(self) -> int:
        """Residual degrees of freedom as lme4's ``df.residual``: nobs − npar, where
        npar = p + dim θ + 1 counts fixed effects, covariance parameters and σ."""
        return int(self.nobs - self.npar)

    def cov_params(self) -> pd.DataFrame:
        """Var(β̂) = σ̂² (R_XᵀR_X)⁻¹ as a DataFrame (same as ``vcov``)."""
        return self.vcov.copy()

    @property
    def random_effects(self) -> dict[str, pd.DataFrame]:
        """Conditional modes per grouping factor (levels × term columns), the same as ``ranef``.

        Unlike statsmodels (one Series per group level) this is keyed by grouping factor, since
        lme4 models may have several factors."""
        return self.ranef

    # ------------------------------------------------------------------ lme4 names
    @property
    def logLik(self) -> float:
        """lme4's ``logLik(fit)``: −criterion / 2."""
        return self.loglik

    @property
    def AIC(self) -> float:
        """lme4's ``AIC(fit)``: −2 logLik + 2 npar."""
        return self.aic

    @property
    def BIC(self) -> float:
        """lme4's ``BIC(fit)``: −2 logLik + npar log(nobs)."""
        return self.bic

    def getME(self, name: str):
        """lme4's ``getME(fit, name)``: a component of the fitted model.

        ``"theta"`` θ̂ (array), ``"beta"`` β̂ (array), ``"sigma"`` σ̂, ``"X"`` the n × p fixed-effects
        matrix (rank-deficient columns dropped), ``"Z"`` / ``"Zt"`` the sparse n × q random-effects
        matrix / its transpose, ``"y"`` the response, ``"lower"`` the lower bounds of θ,
        ``"Lambda"`` / ``"Lambdat"`` the sparse q × q relative covariance factor Λ_θ̂ / its
        transpose, ``"n"``, ``"p"``, ``"q"``, ``"ntheta"`` the dimensions."""
        s = self.structure
        getters = {
            "theta": lambda: self.theta.copy(),
            "beta": lambda: self.fixef.to_numpy().copy(),
            "sigma": lambda: float(self.sigma),
            "X": lambda: _rows(s, "getME('X')").X.copy(),
            "Z": lambda: _rows(s, "getME('Z')").Z.copy(),
            "Zt": lambda: _rows(s, "getME('Zt')").Z.T.tocsc(),
            "y": lambda: _rows(s, "getME('y')").y.copy(),
            "lower": lambda: s.lower.copy(),
            "Lambda": lambda: s.Lambda(self.theta),
            "Lambdat": lambda: s.Lambda(self.theta).T.tocsc(),
            "n": lambda: int(s.n),
            "p": lambda: int(s.p),
            "q": lambda: int(s.q),
            "ntheta": lambda: int(s.ntheta),
        }
        if name not in getters:
            raise ValueError(f"getME: unknown component {name!r}; available: {', '.join(GETME_NAMES)}")
        return getters[name]()

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """A JSON-able record of the fit; every number is a plain ``float``/``int`` and NaN or
        infinite values are ``None``.

        Schema (version :data:`SCHEMA_VERSION`)::

            schema_version  int
            formula         str
            REML            bool
            backend         "compiled" | "reference"
            nobs, n_dropped int   (observations used; rows dropped for missing values)
            npar, df_resid  int   (p + dim θ + 1; nobs − npar)
            criterion       {"name": "REMLcrit" | "deviance", "value": float}
            logLik, AIC, BIC, deviance, sigma   float  (deviance: ML deviance at the estimates)
            theta           [float]       lme4's θ, with
            theta_names     [str]         e.g. "Subject.(Intercept)", "Subject.Days.(Intercept)"
            fixef           {name: {"estimate", "se", "t", "p"}}   p: two-sided normal p-value
            vcov            {"names": [str], "values": [[float]]}  Var(β̂), row-major
            varcorr         [{"grp", "var1", "var2", "vcov", "sdcor"}]  as.data.frame(VarCorr);
                            var1/var2 None where R has NA; sdcor is a correlation on covariance rows
            ngrps           {factor: number of levels}
            converged, singular  bool
            messages        [str]
            optsummary      {"optimizer", "feval", "geval", "fmin", "theta_initial", "theta_final",
                             "return_code", "stop_reason"}
        """
        fixef = {}
        for name, est, se, t, p in zip(self.fixef.index, self.fixef.to_numpy(), self.se.to_numpy(),
                                       self.tvalues.to_numpy(), self.pvalues.to_numpy()):
            fixef[str(name)] = {"estimate": _num(est), "se": _num(se), "t": _num(t), "p": _num(p)}
        varcorr = [{"grp": _text(r.grp), "var1": _text(r.var1), "var2": _text(r.var2),
                    "vcov": _num(r.vcov), "sdcor": _num(r.sdcor)}
                   for r in self.varcorr.itertuples(index=False)]
        o = self.optsummary
        return {
            "schema_version": SCHEMA_VERSION,
            "formula": str(self.formula),
            "REML": bool(self.REML),
            "backend": str(self.backend),
            "nobs": int(self.nobs),
            "n_dropped": int(self.n_dropped),
            "npar": int(self.npar),
            "df_resid": self.df_resid,
            "criterion": {"name": "REMLcrit" if self.REML else "deviance", "value": _num(self.criterion)},
            "logLik": _num(self.loglik),
            "AIC": _num(self.aic),
            "BIC": _num(self.bic),
            "deviance": _num(self.deviance),
            "sigma": _num(self.sigma),
            "theta": _nums(self.theta),
            "theta_names": [str(n) for n in self.theta_names],
            "fixef": fixef,
            "vcov": {"names": [str(n) for n in self.vcov.index], "values": _nums(self.vcov.to_numpy())},
            "varcorr": varcorr,
            "ngrps": {str(k): int(v) for k, v in self.ngrps.items()},
            "converged": bool(self.converged),
            "singular": bool(self.singular),
            "messages": [str(m) for m in self.messages],
            "optsummary": {
                "optimizer": str(o.optimizer),
                "feval": int(o.feval),
                "geval": int(getattr(o, "geval", 0)),
                "fmin": _num(o.fmin),
                "theta_initial": _nums(o.theta_initial),
                "theta_final": _nums(o.theta_final) if o.theta_final is not None else None,
                "return_code": str(o.return_code),
                "stop_reason": str(getattr(o, "stop_reason", "")),
            },
        }

    def to_json(self, path=None, indent: int | None = 2) -> str:
        """:meth:`to_dict` as strict JSON text (NaN → ``null``); also written to ``path``
        (UTF-8, trailing newline) when one is given."""
        text = json.dumps(self.to_dict(), indent=indent, allow_nan=False, ensure_ascii=False)
        if path is not None:
            with open(path, "w", encoding="utf-8") as fh:
                fh.write(text + "\n")
        return text

    # ------------------------------------------------------------------ notebook display
    # Notebooks show the summary text itself (lme4's layout, as print(res.summary()) and R show
    # it), not a second rendering of it: one text to keep right, with the residuals, the
    # correlations and the messages that HTML tables left out, and no p-values of a kind the
    # summary does not print (coef_table has lmerTest's Satterthwaite tests).
    def _repr_html_(self) -> str:
        """Jupyter's rich display: the :meth:`summary` text, escaped, in a ``<pre>`` block."""
        return f'<pre class="fastlmm-ext-result">{html.escape(self.summary())}</pre>'

    def _repr_pretty_(self, p, cycle: bool) -> None:
        """IPython's display: the :meth:`summary` text (``repr`` stays one line)."""
        p.text(repr(self) if cycle else self.summary().rstrip("\n"))


def _rows(s, what: str):
    s.require_rows(what)
    return s
