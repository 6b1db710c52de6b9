"""The parametric bootstrap (fastlmm_ext._bootstrap): reproducible replicates whatever the
workers, the replicate layout, boot's percentile intervals, and intervals against lme4."""
from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

from fastlmm_ext import _bootstrap, _parallel
from fastlmm_ext._bootstrap import BootstrapResult


def test_bootstrap_reproducible_and_layout(dyestuff):
    df, res = dyestuff
    b1 = res.bootstrap(12, seed=5)
    assert isinstance(b1, BootstrapResult) and len(b1) == 12 and b1.parallel == "serial"
    assert list(b1.replicates.columns) == [".sig01", ".sigma", "(Intercept)"]
    assert list(b1.theta.columns) == res.theta_names
    pd.testing.assert_frame_equal(b1.replicates, res.bootstrap(12, seed=5, progress=False).replicates)
    assert not np.allclose(b1.replicates.to_numpy(), res.bootstrap(12, seed=6).replicates.to_numpy())
    # .sig01 = σ·θ for a scalar term; the replicate's response is simulate(1, seed=child seed)
    np.testing.assert_allclose(b1.replicates[".sig01"], b1.theta.iloc[:, 0] * b1.replicates[".sigma"], rtol=1e-12)
    child = np.random.SeedSequence(5).spawn(12)[3]
    y3 = res.simulate(1, seed=child)["sim_1"].to_numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r3 = res.model.refit(y3)
    assert b1.replicates[".sigma"].iloc[3] == pytest.approx(r3.sigma, rel=1e-12)
    assert b1.estimate[".sigma"] == pytest.approx(res.sigma) and b1.estimate["(Intercept)"] == res.fixef.iloc[0]
    assert b1.status["error"].isna().all() and b1.n_failed == 0
    b0 = res.bootstrap(3)                                   # seed=None: the entropy drawn repeats it
    pd.testing.assert_frame_equal(b0.replicates, res.bootstrap(3, seed=b0.seed).replicates)
    with pytest.raises(ValueError, match="n_jobs"):
        res.bootstrap(3, n_jobs=0)


def test_bootstrap_parallel_matches_serial(dyestuff, monkeypatch):
    df, res = dyestuff
    serial = res.bootstrap(10, seed=99)
    procs = res.bootstrap(10, seed=99, n_jobs=2)
    assert procs.parallel == "processes"
    np.testing.assert_allclose(procs.replicates.to_numpy(), serial.replicates.to_numpy(), rtol=1e-12, atol=0)
    np.testing.assert_allclose(procs.theta.to_numpy(), serial.theta.to_numpy(), rtol=1e-12, atol=0)

    def no_processes(*a, **k):
        raise OSError("no process pools here")
    monkeypatch.setattr(_parallel, "ProcessPoolExecutor", no_processes)
    threads = res.bootstrap(10, seed=99, n_jobs=2)
    assert threads.parallel == "threads"
    np.testing.assert_allclose(threads.replicates.to_numpy(), serial.replicates.to_numpy(), rtol=1e-12, atol=0)


def test_bootstrap_progress_output(dyestuff, capfd):
    df, res = dyestuff
    res.bootstrap(3, seed=1)                       # stderr is not a terminal under pytest: silent
    res.bootstrap(3, seed=1, progress=False)
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    res.bootstrap(3, seed=1, progress=True)
    out, err = capfd.readouterr()
    assert out == "" and "bootstrap" in err


def test_bootstrap_sleepstudy_intervals(sleep):
    """lme4 1.1.31: sigma = 25.59, profile interval [22.90, 28.86]."""
    df, res = sleep
    boot = res.bootstrap(200, seed=20240601)
    ci = boot.confint()
    assert list(ci.columns) == ["2.5 %", "97.5 %"]
    assert list(ci.index) == [".sig01", ".sig02", ".sig03", ".sigma", "(Intercept)", "Days"]
    lo, hi = ci.loc[".sigma"]
    assert 21.5 < lo < 24.3 and 27.5 < hi < 30.3
    assert lo < 28.86 and hi > 22.90
    est = boot.estimate
    for kind in ("perc", "basic", "norm"):
        c = boot.confint(type=kind)
        inside = (c.iloc[:, 0] <= est) & (est <= c.iloc[:, 1])
        assert inside.all(), (kind, c)
    assert -1.0 <= ci.loc[".sig02"].min() and ci.loc[".sig02"].max() <= 1.0
    # Days: close to the Wald interval 10.47 ± 1.96·1.55
    assert ci.loc["Days"].tolist() == pytest.approx([7.44, 13.50], abs=1.0)
    c90 = boot.confint(level=0.9)
    assert list(c90.columns) == ["5 %", "95 %"]
    assert (c90.iloc[:, 0] >= ci.iloc[:, 0]).all() and (c90.iloc[:, 1] <= ci.iloc[:, 1]).all()
    assert boot.confint(parm=".sigma").shape == (1, 2)


def test_norm_inter_matches_boot():
    """boot's norm.inter: integer (R+1)α picks an order statistic; otherwise normal-scale interpolation."""
    t = np.arange(1.0, 40.0)            # R = 39: (R+1)·0.025 = 1 and (R+1)·0.975 = 39
    np.testing.assert_allclose(_bootstrap._norm_inter(t, np.array([0.025, 0.975])), [1.0, 39.0])
    t = np.arange(1.0, 101.0)           # R = 100: rk = 2.525 → between t(2) = 2 and t(3) = 3
    v = _bootstrap._norm_inter(t, np.array([0.025]))[0]
    from scipy.stats import norm
    z, z2, z3 = norm.ppf(0.025), norm.ppf(2 / 101), norm.ppf(3 / 101)
    assert v == pytest.approx(2 + (z - z2) / (z3 - z2))
