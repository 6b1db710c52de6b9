"""Profile intervals in parallel (processes, or threads where processes fail) equal the serial
ones; lme4's ``oldNames = FALSE`` labels; progress; the profiler's kernel bookkeeping."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

import fastlmm_ext as fl
from fastlmm_ext import _parallel, _profile, datasets

SLEEP = datasets.load("sleepstudy")


@pytest.fixture(scope="module")
def sleep_fit():
    return fl.lmer("Reaction ~ Days + (Days|Subject)", SLEEP)


@pytest.fixture(scope="module")
def serial(sleep_fit):
    return sleep_fit.confint(method="profile", n_jobs=1)


def test_profile_in_two_processes_equals_serial(sleep_fit, serial):
    par = sleep_fit.confint(method="profile", n_jobs=2)
    assert list(par.index) == list(serial.index) and list(par.columns) == list(serial.columns)
    np.testing.assert_allclose(par.to_numpy(), serial.to_numpy(), rtol=1e-9, atol=0)
    # lme4 1.1.31, confint(fm, method = "profile"): the README's table
    np.testing.assert_allclose(serial.loc[".sigma"], [22.898, 28.858], atol=1e-3)


def test_profile_threads_fallback_equals_serial(sleep_fit, serial, monkeypatch):
    """Where a process pool cannot start, the bounds are computed by threads, each with its own
    unpickled copy of the fit (a kernel is not shared between threads)."""
    def no_processes(*args, **kwargs):
        raise OSError("no process pools here")
    monkeypatch.setattr(_parallel, "ProcessPoolExecutor", no_processes)
    par = sleep_fit.confint(method="profile", n_jobs=2, parm=[".sig02", ".sigma", "Days"])
    np.testing.assert_allclose(par.to_numpy(), serial.loc[[".sig02", ".sigma", "Days"]].to_numpy(), rtol=1e-9)


def test_profile_of_a_fit_without_rows_in_parallel():
    chunks = [SLEEP.iloc[i:i + 60] for i in range(0, len(SLEEP), 60)]
    res = fl.lmer_chunked("Reaction ~ Days + (1|Subject)", chunks, REML=False)
    a = res.confint(method="profile", n_jobs=1)
    b = res.confint(method="profile", n_jobs=2)
    np.testing.assert_allclose(b.to_numpy(), a.to_numpy(), rtol=1e-9)


def test_n_jobs_checked(sleep_fit):
    with pytest.raises(ValueError, match="n_jobs"):
        sleep_fit.confint(method="profile", n_jobs=0)


def test_profile_progress_bar_on_request(sleep_fit, capsys):
    pytest.importorskip("tqdm")
    sleep_fit.confint(method="profile", parm=".sigma", progress=True)
    assert "profile" in capsys.readouterr().err
    sleep_fit.confint(method="profile", parm=".sigma", progress=False)
    assert capsys.readouterr().err == ""


# ----------------------------------------------------------------------------- labels

# lme4 1.1.31: rownames(confint(fit, method = "Wald", oldNames = FALSE))
LME4_NEW_NAMES = {
    "Reaction ~ Days + (Days|Subject)": ["sd_(Intercept)|Subject", "cor_Days.(Intercept)|Subject", "sd_Days|Subject",
                                         "sigma", "(Intercept)", "Days"],
    "Reaction ~ Days + (Days||Subject)": ["sd_(Intercept)|Subject", "sd_Days|Subject", "sigma", "(Intercept)", "Days"],
}
LME4_PASTES = ["sd_(Intercept)|cask:batch", "sd_(Intercept)|batch", "sigma", "(Intercept)"]


@pytest.mark.parametrize("formula", list(LME4_NEW_NAMES))
def test_old_names_false_labels_like_lme4(formula):
    res = fl.lmer(formula, SLEEP)
    wald = res.confint(oldNames=False)
    assert list(wald.index) == LME4_NEW_NAMES[formula]
    # the same numbers as the default names, and the mapping between the two
    np.testing.assert_array_equal(wald.to_numpy(), res.confint().to_numpy())
    assert list(res.confint_labels) == list(res.confint().index[:res.structure.ntheta + 1])
    assert list(res.confint_labels.values()) == LME4_NEW_NAMES[formula][:res.structure.ntheta + 1]


def test_old_names_false_nested_and_parm_by_either_name():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = fl.lmer("strength ~ 1 + (1|batch/cask)", datasets.load("Pastes"))
    assert list(res.confint(oldNames=False).index) == LME4_PASTES
    a = res.confint(parm=["sd_(Intercept)|batch", "(Intercept)"], oldNames=False)
    assert list(a.index) == ["sd_(Intercept)|batch", "(Intercept)"]
    np.testing.assert_array_equal(a.to_numpy(), res.confint(parm=[".sig02", "(Intercept)"]).to_numpy())
    a = res.confint(method="profile", parm="sigma", oldNames=False)
    b = res.confint(method="profile", parm=".sigma")
    assert list(a.index) == ["sigma"] and list(b.index) == [".sigma"]
    np.testing.assert_allclose(a.to_numpy(), b.to_numpy(), rtol=1e-12)


def test_boot_confint_takes_old_names_too():
    res = fl.lmer("Reaction ~ Days + (1|Subject)", SLEEP)
    ci = res.confint(method="boot", nsim=8, seed=2, oldNames=False)
    assert list(ci.index[:2]) == ["sd_(Intercept)|Subject", "sigma"]
    np.testing.assert_allclose(ci.to_numpy(), res.confint(method="boot", nsim=8, seed=2).to_numpy(), rtol=1e-12)


# ----------------------------------------------------------------------------- kernel bookkeeping

def test_profiler_factor_follows_theta(sleep_fit):
    """The profiler moves the compiled kernel's factor through its backend: a state asked for
    afterwards at θ̂ is the state at θ̂, not at the profiler's last θ."""
    prof = _profile.Profiler(sleep_fit)
    theta = prof.theta_hat
    want = prof.backend.state(theta).pwrss
    prof._ld_pwrss(theta * 1.5)
    assert prof._pieces(theta).pwrss == pytest.approx(want, rel=1e-12)
    fresh = fl.LinearMixedModel("Reaction ~ Days + (Days|Subject)", SLEEP, REML=False, backend="compiled")
    assert want == pytest.approx(fresh.backend.state(theta).pwrss, rel=1e-10)
