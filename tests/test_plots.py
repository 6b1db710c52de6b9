"""Diagnostic plots (fastlmm_ext.plots): contents of the figures and the PNG files."""
from __future__ import annotations

import sys
import warnings

import numpy as np
import pandas as pd
import pytest
from scipy import stats

import matplotlib  # noqa: E402  (a test requirement: pip install .[test])
if "matplotlib.pyplot" not in sys.modules:
    matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import fastlmm_ext as fl  # noqa: E402
from fastlmm_ext import datasets, plots  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


@pytest.fixture(scope="module")
def sleep():
    return fl.lmer("Reaction ~ Days + (Days|Subject)", datasets.load("sleepstudy"))


@pytest.fixture(scope="module")
def pastes():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fl.lmer("strength ~ 1 + (1|batch/cask)", datasets.load("Pastes"))


def _marker_line(ax):
    """The Line2D holding the plotted points (label set by plots.py)."""
    labels = ("conditional mode", "observed", "observations")
    lines = [ln for ln in ax.get_lines() if ln.get_label() in labels]
    assert len(lines) == 1
    return lines[0]


def test_caterpillar(sleep):
    fig = plots.caterpillar(sleep)
    axes = fig.get_axes()
    assert len(axes) == 2
    assert [ax.get_title() for ax in axes] == ["(Intercept)", "Days"]
    assert "Subject" in fig._suptitle.get_text() and "95%" in fig._suptitle.get_text()
    modes = sleep.ranef["Subject"]
    sds = sleep.ranef_condsd["Subject"]
    order = np.argsort(modes["(Intercept)"].to_numpy(), kind="stable")
    z = stats.norm.ppf(0.975)
    for ax, col in zip(axes, modes.columns):
        line = _marker_line(ax)
        x, y = line.get_xdata(), line.get_ydata()
        assert len(x) == 18
        np.testing.assert_allclose(x, modes[col].to_numpy()[order])
        np.testing.assert_array_equal(y, np.arange(18))
        segs = ax.collections[0].get_segments()
        assert len(segs) == 18
        widths = np.array([s[1][0] - s[0][0] for s in segs])
        np.testing.assert_allclose(widths, 2 * z * sds[col].to_numpy()[order], rtol=1e-10)
        assert ax.get_xlabel() == "Conditional mode"
    # sorted by the first column; level names on the first panel
    assert np.all(np.diff(_marker_line(axes[0]).get_xdata()) >= 0)
    labels = [t.get_text() for t in axes[0].get_yticklabels()]
    assert labels == [str(v) for v in modes.index[order]]
    assert axes[0].get_ylabel() == "Subject"


def test_caterpillar_level_and_group(sleep, pastes):
    w95 = np.diff(plots.caterpillar(sleep).get_axes()[0].collections[0].get_segments()[0][:, 0])[0]
    w50 = np.diff(plots.caterpillar(sleep, level=0.5).get_axes()[0].collections[0].get_segments()[0][:, 0])[0]
    assert w50 / w95 == pytest.approx(stats.norm.ppf(0.75) / stats.norm.ppf(0.975))
    fig = plots.caterpillar(pastes, group="batch")
    assert len(fig.get_axes()) == 1 and len(_marker_line(fig.get_axes()[0]).get_xdata()) == 10
    fig = plots.caterpillar(pastes)                       # default: the factor with most levels
    assert len(_marker_line(fig.get_axes()[0]).get_xdata()) == 30
    with pytest.raises(ValueError, match="unknown grouping factor 'nope'"):
        plots.caterpillar(pastes, group="nope")
    with pytest.raises(ValueError, match="level"):
        plots.caterpillar(sleep, level=1.0)


def test_caterpillar_many_levels_has_no_tick_labels():
    rng = np.random.default_rng(7)
    g = np.repeat(np.arange(120), 4)
    df = pd.DataFrame({"y": rng.normal(size=120)[g] + rng.normal(size=g.size), "g": [f"L{i}" for i in g]})
    res = fl.lmer("y ~ 1 + (1|g)", df)
    ax = plots.caterpillar(res).get_axes()[0]
    assert len(_marker_line(ax).get_xdata()) == 120
    assert len(ax.get_yticks()) == 0
    assert "120 levels" in ax.get_ylabel()


def test_resid_fitted(sleep):
    fig = plots.resid_fitted(sleep)
    (ax,) = fig.get_axes()
    line = _marker_line(ax)
    np.testing.assert_allclose(line.get_xdata(), sleep.fitted())
    np.testing.assert_allclose(line.get_ydata(), sleep.residuals(), rtol=1e-10, atol=1e-9)
    assert ax.get_xlabel().startswith("Fitted values") and ax.get_ylabel().startswith("Residuals")
    assert "Residuals vs fitted" in ax.get_title()


def test_qq_resid(sleep):
    fig = plots.qq_resid(sleep)
    (ax,) = fig.get_axes()
    line = _marker_line(ax)
    r = np.sort(sleep.residuals(scaled=True))
    np.testing.assert_allclose(line.get_ydata(), r)
    x = line.get_xdata()
    assert len(x) == 180 and np.all(np.diff(x) > 0)
    assert x[0] == pytest.approx(stats.norm.ppf(0.5 / 180))      # R's ppoints(180)
    assert ax.get_xlabel() == "Standard normal quantiles" and ax.get_ylabel() == "Scaled residuals"
    assert len(ax.get_lines()) == 2                                 # points and the quartile line


def test_qq_ranef(sleep, pastes):
    fig = plots.qq_ranef(sleep)
    axes = fig.get_axes()
    assert len(axes) == 2
    for ax, col in zip(axes, ["(Intercept)", "Days"]):
        line = _marker_line(ax)
        np.testing.assert_allclose(line.get_ydata(), np.sort(sleep.ranef["Subject"][col].to_numpy()))
        assert ax.get_title() == col
    fig = plots.qq_ranef(pastes, group="batch")
    assert len(fig.get_axes()) == 1 and len(_marker_line(fig.get_axes()[0]).get_ydata()) == 10


def test_save_all(sleep, pastes, tmp_path):
    paths = plots.save_all(sleep, tmp_path / "sleep")
    names = [p.rsplit("/", 1)[-1] for p in map(str, paths)]
    assert names == ["resid_fitted.png", "qq_resid.png", "caterpillar_Subject.png", "qq_ranef_Subject.png"]
    for p in paths:
        data = open(p, "rb").read()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5_000
    paths = plots.save_all(pastes, tmp_path / "pastes")
    names = sorted(str(p).rsplit("/", 1)[-1] for p in paths)
    assert names == ["caterpillar_batch.png", "caterpillar_cask_batch.png", "qq_ranef_batch.png",
                     "qq_ranef_cask_batch.png", "qq_resid.png", "resid_fitted.png"]
    assert plt.get_fignums() == []                                  # save_all closes its figures


def test_missing_matplotlib_message(sleep, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)            # makes `import matplotlib` fail
    with pytest.raises(ImportError, match=r"pip install fastlmm_ext\[plot\]"):
        plots.qq_resid(sleep)


def test_profile_plot_traces_cross_zero_at_estimates(tmp_path):
    import numpy as np

    import fastlmm_ext as fl
    from fastlmm_ext import datasets, plots
    from fastlmm_ext._profile import profile_table

    res = fl.lmer("diameter ~ 1 + (1|plate) + (1|sample)", datasets.load("Penicillin"))
    tab = profile_table(res, npoints=7)
    assert list(dict.fromkeys(tab["parameter"])) == [".sig01", ".sig02", ".sigma", "(Intercept)"]
    for name, sub in tab.groupby("parameter"):
        sub = sub.sort_values("value")
        assert np.all(np.diff(sub["zeta"].to_numpy()) > 0), name      # ζ increases through ψ̂
        assert sub["zeta"].min() < -2.5 and sub["zeta"].max() > 2.5
    fig = plots.profile(res, table=tab)
    assert sum(ax.get_visible() for ax in fig.axes) == 4
    path = tmp_path / "profile.png"
    fig.savefig(path, dpi=80)
    assert path.stat().st_size > 5000
