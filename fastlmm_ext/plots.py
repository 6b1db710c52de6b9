"""Diagnostic plots of a fitted model (matplotlib, an optional dependency: ``pip install fastlmm_ext[plot]``).

* :func:`caterpillar` — conditional modes b̂ of one grouping factor with intervals
  b̂ ± z_{(1+level)/2} · sd(b | y), levels sorted by the first column
  (lme4's ``dotplot(ranef(fit, condVar=TRUE))``);
* :func:`resid_fitted` — residuals y − ŷ (Pearson residuals √w (y − ŷ) for weighted fits) against the
  conditional fitted values ŷ = Xβ̂ + Zb̂ (lme4's ``plot(fit)``);
* :func:`qq_resid` — normal Q-Q plot of the scaled residuals √w (y − ŷ) / σ̂;
* :func:`qq_ranef` — normal Q-Q plot of the conditional modes of one grouping factor, per term column;
* :func:`save_all` — all of the above as PNG files.

Each function returns a :class:`matplotlib.figure.Figure` made with pyplot, so it shows inline in
notebooks and with ``plt.show()``.  When pyplot has not been imported yet and there is no display
(Linux without ``DISPLAY``/``WAYLAND_DISPLAY``, no ``MPLBACKEND``), the non-interactive Agg backend
is selected.  matplotlib is imported only when a plot is made.
"""
from __future__ import annotations

import os
import re
import sys
import textwrap

import numpy as np
from scipy import stats

from ._profile import profile_table

__all__ = ["caterpillar", "resid_fitted", "qq_resid", "qq_ranef", "save_all"]

#: Above this many levels the level names are not written on the axis.
MAX_LABELLED_LEVELS = 60


def _pyplot():
    """matplotlib.pyplot, with a clear ImportError when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError as e:  # pragma: no cover - exercised by tests through a blocked import
        raise ImportError("plotting needs matplotlib, which is not installed: "
                          "pip install fastlmm_ext[plot]  (or: pip install matplotlib)") from e
    if "matplotlib.pyplot" not in sys.modules and _headless():
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _headless() -> bool:
    """True on Linux/BSD without a display server and without a user-chosen MPLBACKEND."""
    if os.environ.get("MPLBACKEND"):
        return False
    if sys.platform.startswith(("win", "darwin")):
        return False
    return not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def _ppoints(n: int) -> np.ndarray:
    """R's ppoints(n): (i − a) / (n + 1 − 2a), a = 3/8 for n ≤ 10 else 1/2."""
    a = 3.0 / 8.0 if n <= 10 else 0.5
    return (np.arange(1, n + 1) - a) / (n + 1 - 2 * a)


def _qq(ax, values: np.ndarray, **scatter):
    """Normal Q-Q plot of ``values`` on ``ax`` with R's qqline (through the quartiles)."""
    v = np.sort(np.asarray(values, dtype=float))
    x = stats.norm.ppf(_ppoints(v.size))
    ax.plot(x, v, "o", ms=4, alpha=0.75, label="observed", **scatter)
    if v.size >= 2:
        q_y = np.quantile(v, [0.25, 0.75])
        q_x = stats.norm.ppf([0.25, 0.75])
        slope = (q_y[1] - q_y[0]) / (q_x[1] - q_x[0])
        icpt = q_y[0] - slope * q_x[0]
        xs = np.array([x.min(), x.max()])
        ax.plot(xs, icpt + slope * xs, "-", color="C3", lw=1.2, label="line through quartiles")
    ax.set_xlabel("Standard normal quantiles")
    ax.grid(True, alpha=0.3)


def _suptitle(fig, text: str, fontsize: float = 11.0) -> None:
    """Figure title wrapped to the figure's width (about 10 characters per inch at 11 pt)."""
    width_chars = max(20, int(fig.get_figwidth() * 10.0 * 11.0 / fontsize))
    fig.suptitle(textwrap.fill(text, width_chars), fontsize=fontsize)


def _pick_group(res, group: str | None) -> str:
    groups = list(res.ranef)
    if group is None:
        return groups[0]
    if group not in res.ranef:
        raise ValueError(f"unknown grouping factor {group!r}; the model has: {', '.join(groups)}")
    return group


def caterpillar(res, group: str | None = None, level: float = 0.95):
    """Caterpillar plot of the conditional modes of grouping factor ``group`` (default: the factor
    with the most levels): for every level, b̂ with the interval b̂ ± z·sd(b | y),
    z = Φ⁻¹((1 + level)/2), one panel per term column, levels sorted by the first column's mode.

    Returns the matplotlib Figure."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie strictly between 0 and 1, got {level}")
    plt = _pyplot()
    group = _pick_group(res, group)
    modes = res.ranef[group]
    sds = res.ranef_condsd[group].reindex(index=modes.index, columns=modes.columns)
    z = stats.norm.ppf(0.5 + level / 2.0)
    order = np.argsort(modes.iloc[:, 0].to_numpy(), kind="stable")
    nlev, ncol = modes.shape
    labelled = nlev <= MAX_LABELLED_LEVELS
    height = min(max(2.6, 0.2 * nlev + 1.4), 14.0) if labelled else 7.0
    width = max(5.0, 3.4 * ncol + (1.2 if labelled else 0.4))
    fig = plt.figure(figsize=(width, height), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, ncol, sharey=True, squeeze=False)[0])
    # line width and marker size follow the vertical space per level (in points)
    per_level = (height - 1.2) * 72.0 / nlev
    lw = float(np.clip(0.45 * per_level, 0.25, 1.4))
    ms = float(np.clip(0.8 * per_level, 1.0, 4.0))
    ypos = np.arange(nlev)
    names = [str(v) for v in modes.index[order]]
    for j, (ax, col) in enumerate(zip(axes, modes.columns)):
        b = modes[col].to_numpy()[order]
        sd = sds[col].to_numpy()[order]
        ax.axvline(0.0, color="0.5", lw=0.8, ls="--", zorder=0)
        ax.hlines(ypos, b - z * sd, b + z * sd, color="C0", lw=lw, alpha=0.8 if labelled else 0.45,
                  label=f"{level:.0%} interval")
        ax.plot(b, ypos, "o", color="C0" if labelled else "C1", ms=ms, label="conditional mode",
                markeredgecolor="white", markeredgewidth=0.4 if labelled else 0.0)
        ax.set_title(str(col))
        ax.set_xlabel("Conditional mode")
        ax.grid(True, axis="x", alpha=0.3)
        ax.set_ylim(-0.7, nlev - 0.3)
        if j == 0:
            ax.set_ylabel(group)
            if labelled:
                ax.set_yticks(ypos)
                ax.set_yticklabels(names, fontsize=8 if nlev > 30 else 9)
            else:
                ax.set_yticks([])
                ax.set_ylabel(f"{group} ({nlev} levels, sorted)")
    _suptitle(fig, f"Conditional modes of {group} with {level:.0%} intervals")
    return fig


def resid_fitted(res):
    """Residuals y − ŷ (√w (y − ŷ) when the fit has weights) against the conditional fitted
    values ŷ = Xβ̂ + Zb̂ (+ offset), with a reference line at 0. Returns the Figure."""
    plt = _pyplot()
    fitted = res.fitted()
    r = res.residuals(scaled=True) * res.sigma
    weighted = res.structure.weights is not None
    fig = plt.figure(figsize=(6.4, 4.6), layout="constrained")
    ax = fig.subplots()
    n = fitted.size
    ax.axhline(0.0, color="C3", lw=1.0, ls="--", zorder=0)
    ax.plot(fitted, r, "o", ms=4 if n <= 2000 else 1.5, alpha=0.7 if n <= 2000 else 0.3, label="observations")
    ax.set_xlabel("Fitted values (Xβ̂ + Zb̂)")
    ax.set_ylabel("Pearson residuals" if weighted else "Residuals (y − fitted)")
    ax.set_title(f"Residuals vs fitted: {res.formula}", fontsize=10)
    ax.grid(True, alpha=0.3)
    return fig


def qq_resid(res):
    """Normal Q-Q plot of the scaled residuals √w (y − ŷ) / σ̂ against standard normal
    quantiles (R's ppoints), with a line through the quartiles. Returns the Figure."""
    plt = _pyplot()
    fig = plt.figure(figsize=(5.2, 5.0), layout="constrained")
    ax = fig.subplots()
    _qq(ax, res.residuals(scaled=True))
    ax.set_ylabel("Scaled residuals")
    ax.set_title("Normal Q-Q plot of scaled residuals")
    return fig


def qq_ranef(res, group: str | None = None):
    """Normal Q-Q plots of the conditional modes b̂ of grouping factor ``group`` (default: the
    factor with the most levels), one panel per term column. Returns the Figure."""
    plt = _pyplot()
    group = _pick_group(res, group)
    modes = res.ranef[group]
    ncol = modes.shape[1]
    fig = plt.figure(figsize=(max(5.0, 4.2 * ncol + 0.6), 4.4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, ncol, squeeze=False)[0])
    for ax, col in zip(axes, modes.columns):
        _qq(ax, modes[col].to_numpy())
        ax.set_title(str(col))
        ax.set_ylabel("Conditional mode")
    _suptitle(fig, f"Normal Q-Q plot of the conditional modes of {group} ({modes.shape[0]} levels)")
    return fig


def profile(res, level: float = 0.99, npoints: int = 13, table=None):
    """Profile-likelihood traces, as lme4's ``xyplot(profile(fit))``: for every parameter
    (random-effect SDs and correlations, σ, fixed effects) the signed square root of the ML
    deviance change, ζ(ψ) = sign(ψ − ψ̂) √(D(ψ) − D̂), against ψ, with horizontal lines at the
    ±z of the 95 % and 99 % intervals. ``table`` reuses a :func:`fastlmm_ext._profile.profile_table`.
    Returns the Figure."""
    plt = _pyplot()
    tab = profile_table(res, npoints=npoints, level=level) if table is None else table
    params = list(dict.fromkeys(tab["parameter"]))
    ncol = min(3, len(params))
    nrow = int(np.ceil(len(params) / ncol))
    fig = plt.figure(figsize=(3.6 * ncol + 0.4, 3.0 * nrow + 0.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrow, ncol, squeeze=False).ravel())
    for ax, name in zip(axes, params):
        sub = tab[tab["parameter"] == name].sort_values("value")
        ax.plot(sub["value"], sub["zeta"], "-o", ms=3)
        for lev, ls in ((0.95, "--"), (0.99, ":")):
            z = stats.norm.ppf(0.5 + lev / 2)
            ax.axhline(z, color="0.5", lw=0.8, ls=ls)
            ax.axhline(-z, color="0.5", lw=0.8, ls=ls)
        ax.axhline(0.0, color="0.8", lw=0.6)
        ax.set_title(name)
        ax.set_xlabel("value")
        ax.set_ylabel("ζ")
        ax.grid(True, alpha=0.3)
    for ax in axes[len(params):]:
        ax.set_visible(False)
    _suptitle(fig, f"Profile ζ (ML deviance): {res.formula}")
    return fig


def _safe(name: str) -> str:
    """A file-name fragment from a factor label ('cask:batch' → 'cask_batch')."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(name)).strip("_") or "group"


def save_all(res, directory, dpi: int = 120, with_profile: bool = False) -> list[str]:
    """Write the diagnostic plots as PNG files into ``directory`` (created if needed) and return
    their paths: ``resid_fitted.png``, ``qq_resid.png``, per grouping factor
    ``caterpillar_<factor>.png`` and ``qq_ranef_<factor>.png``, and with ``with_profile=True``
    ``profile.png`` (many refits: slow for large models). Figures are closed after saving."""
    plt = _pyplot()
    os.makedirs(directory, exist_ok=True)
    jobs = [("resid_fitted", lambda: resid_fitted(res)), ("qq_resid", lambda: qq_resid(res))]
    if with_profile:
        jobs.append(("profile", lambda: profile(res)))
    used: set[str] = set()
    for g in res.ranef:
        stem = _safe(g)
        while stem in used:
            stem += "_"
        used.add(stem)
        jobs.append((f"caterpillar_{stem}", lambda g=g: caterpillar(res, g)))
        jobs.append((f"qq_ranef_{stem}", lambda g=g: qq_ranef(res, g)))
    paths = []
    for stem, make in jobs:
        fig = make()
        try:
            path = os.path.join(os.fspath(directory), stem + ".png")
            fig.savefig(path, dpi=dpi)
            paths.append(path)
        finally:
            plt.close(fig)
    return paths
