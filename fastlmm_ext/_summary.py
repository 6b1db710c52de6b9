"""Text and tables laid out as lme4 prints them: the ``print(summary(fit))`` text, and the row
names, labels and column headers of ``confint`` tables."""
from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd

from ._design import _unique_names
from ._optimize import SINGULAR_MESSAGE
from ._params import sd_cor, tri_indices

__all__ = ["format_summary", "abbreviate", "random_effects_rows", "correlation_rows", "COR_MAX", "confint_row_names",
           "confint_row_labels", "select_parm", "format_pct"]


def abbreviate(name: str, minlength: int = 6) -> str:
    """Shorten a name roughly as R's abbreviate(): drop lower-case vowels from the right,
    then lower-case letters from the right, keeping the first character."""
    if len(name) <= minlength:
        return name
    chars = list(name)
    for pattern in ("[aeiou]", "[a-z]"):
        i = len(chars) - 1
        while len(chars) > minlength and i > 0:
            if re.fullmatch(pattern, chars[i]):
                del chars[i]
            i -= 1
    return "".join(chars[:max(minlength, 0)] if len(chars) > minlength else chars)


def _table(rows: list[list[str]], header: list[str], n_left: int = 1) -> list[str]:
    """Columns padded to a common width; the first ``n_left`` left-aligned, the rest right-aligned.
    A row shorter than the header is blank in its missing cells (not cut off by zip)."""
    rows = [list(r) + [""] * (len(header) - len(r)) for r in rows]
    cols = list(zip(header, *rows)) if rows else [[h] for h in header]
    widths = [max(len(c) for c in col) for col in cols]
    out = []
    for r in [header, *rows]:
        cells = [(c.ljust(w) if j < n_left else c.rjust(w)) for j, (c, w) in enumerate(zip(r, widths))]
        out.append(" ".join(cells).rstrip())
    return out


#: lme4's option ``lme4.summary.cor.max``: the correlation of the fixed effects is shown up to this p.
COR_MAX = 12


def correlation_rows(V: np.ndarray, names: list[str]) -> list[str]:
    """lme4's "Correlation of Fixed Effects" block for Var(β̂) = V: the strict lower triangle of
    C = D⁻¹VD⁻¹ (D = √diag V), rows named by the coefficients (abbreviated to 11 characters) from
    the second on, columns by abbreviations to 6 characters up to the last but one.  As R prints
    it: every entry rounded to 3 decimals and formatted to one common width (that of the whole
    matrix, diagonal included), the columns left-aligned, the upper triangle blank."""
    p = len(names)
    d = np.sqrt(np.diag(V))
    with np.errstate(divide="ignore", invalid="ignore"):
        C = V / np.outer(d, d)
    # round first, then + 0.0: R prints a correlation that rounds to -0 as 0.000
    cell = lambda c: f"{np.round(c, 3) + 0.0:.3f}" if np.isfinite(c) else "NaN"  # noqa: E731
    lower = [[cell(C[i, j]) for j in range(i)] for i in range(1, p)]
    width = max([len(cell(1.0))] + [len(c) for r in lower for c in r])
    rows = [[abbreviate(names[i], 11)] + [c.rjust(width) for c in r] for i, r in zip(range(1, p), lower)]
    return _table(rows, [""] + [abbreviate(n) for n in names[:-1]], n_left=p)


def _g(x: float, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and np.isnan(x)):
        return "NaN"
    if 1e-4 <= abs(x) < 1e6 or x == 0:
        return f"{x:#.{digits}g}".rstrip(".")
    return f"{x:.{digits}e}"


def random_effects_rows(res, fmt) -> list[list[str]]:
    """Rows of lme4's "Random effects:" table: group (first row of a term only), name, variance,
    SD, correlations with the term's earlier columns; then the residual.  ``fmt`` formats numbers."""
    rows = []
    covs = res.term_covariances()
    for t in res.structure.terms:
        S = covs[t.name]
        sd, C = sd_cor(t.T(res.theta), res.sigma)
        for i in range(t.k):
            corr = ["NaN" if np.isnan(C[i, j]) else f"{C[i, j]:.2f}" for j in range(i)]
            rows.append([t.name if i == 0 else "", t.cnms[i], fmt(S[i, i]), fmt(sd[i]), " ".join(corr)])
    rows.append(["Residual", "", fmt(res.sigma ** 2), fmt(res.sigma), ""])
    return rows


def format_summary(res) -> str:
    s = res.structure
    lines = []
    if res.REML:
        lines.append("Linear mixed model fit by REML ['lmerMod']")
    else:
        lines.append("Linear mixed model fit by maximum likelihood  ['lmerMod']")
    lines.append(f"Formula: {res.formula}")
    if res.n_dropped:
        lines.append(f"   ({res.n_dropped} observation(s) deleted due to missingness)")
    if s.weighted:
        lines.append("Weights: prior weights")
    lines.append("")
    if res.REML:
        lines.append(f"REML criterion at convergence: {res.criterion:.1f}")
    else:
        hdr = ["AIC", "BIC", "logLik", "deviance", "df.resid"]
        vals = [f"{res.aic:.1f}", f"{res.bic:.1f}", f"{res.loglik:.1f}", f"{res.criterion:.1f}", f"{s.n - res.npar}"]
        w = [max(len(h), len(v)) + 2 for h, v in zip(hdr, vals)]
        lines.append("".join(h.rjust(x) for h, x in zip(hdr, w)))
        lines.append("".join(v.rjust(x) for v, x in zip(vals, w)))
    lines.append("")
    if s.has_rows:
        r = res.residuals(scaled=True)
        q = np.quantile(r, [0, 0.25, 0.5, 0.75, 1.0])
        lines.append("Scaled residuals: ")
        lines += _table([[f"{v:.4f}" for v in q]], ["Min", "1Q", "Median", "3Q", "Max"], n_left=0)
    else:
        lines.append("Scaled residuals: not kept (fitted from accumulated cross-products)")
    lines.append("")

    lines.append("Random effects:")
    rows = random_effects_rows(res, _g)
    has_corr = any(t.k > 1 for t in s.terms)
    hdr = ["Groups", "Name", "Variance", "Std.Dev."] + (["Corr"] if has_corr else [])
    rows = [r if has_corr else r[:4] for r in rows]
    lines += [" " + ln for ln in _table(rows, hdr, n_left=2)]
    groups = ", ".join(f"{k}, {v}" for k, v in res.ngrps.items())
    lines.append(f"Number of obs: {res.nobs}, groups:  {groups}")
    lines.append("")

    if s.p:
        lines.append("Fixed effects:")
        se = res.se.to_numpy()
        est = res.fixef.to_numpy()
        rows = [[nm, f"{e:.4g}" if abs(e) < 1e-3 else f"{e:.3f}", f"{d:.3f}" if d >= 1e-3 else f"{d:.3g}", f"{e / d:.3f}" if d > 0 else "NaN"]
                for nm, e, d in zip(s.fixef_names, est, se)]
        lines += _table(rows, ["", "Estimate", "Std. Error", "t value"])
        if 1 < s.p <= COR_MAX:
            lines.append("")
            lines.append("Correlation of Fixed Effects:")
            lines += correlation_rows(res.vcov.to_numpy(), list(s.fixef_names))
        elif s.p > COR_MAX:
            lines.append("")
            lines.append(f"Correlation matrix not shown, as p = {s.p} > {COR_MAX}: res.vcov has Var(beta-hat).")
    if res.singular:
        lines.append("optimizer (nloptwrap) convergence code: 0 (OK)" if res.converged else "")
        lines.append(SINGULAR_MESSAGE)
    for m in res.messages:
        if "singular" not in m:
            lines.append(m)
    lines.append("")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- confint tables

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


def format_pct(probs) -> list[str]:
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
