"""The one profiled criterion (``_pls``): by hand, against lme4's devfun through the dense
reference path's PLS pieces, and its relation to the deviance with σ given."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fastlmm_ext as fl
from conftest import reference_dir
from fastlmm_ext._pls import deviance_at_sigma, profiled_criterion, residual_df


def test_by_hand():
    # REML: ldL2 + ldRX2 + (n − p)(1 + log(2π r²/(n − p))); ML: ldL2 + n (1 + log(2π r²/n)); minus Σ log w
    assert profiled_criterion(1.0, 2.0, 3.0, 10, 2, True) == pytest.approx(3.0 + 8 * (1 + math.log(2 * math.pi * 3 / 8)))
    assert profiled_criterion(1.0, 2.0, 3.0, 10, 2, False) == pytest.approx(1.0 + 10 * (1 + math.log(2 * math.pi * 0.3)))
    assert profiled_criterion(1.0, 2.0, 3.0, 10, 2, False, sum_log_w=0.5) == \
        pytest.approx(profiled_criterion(1.0, 2.0, 3.0, 10, 2, False) - 0.5)
    assert residual_df(10, 2, True) == 8 and residual_df(10, 2, False) == 10
    # with σ given: ldL2 + r²/σ² + d log(2πσ²) (+ ldRX2 for REML)
    assert deviance_at_sigma(1.0, 2.0, 3.0, 1.5, 10, 2, True) == \
        pytest.approx(3.0 + 3.0 / 2.25 + 8 * math.log(2 * math.pi * 2.25))
    assert deviance_at_sigma(1.0, 2.0, 3.0, 1.5, 10, 2, False) == \
        pytest.approx(1.0 + 3.0 / 2.25 + 10 * math.log(2 * math.pi * 2.25))


def test_degenerate_inputs_are_refused():
    with pytest.raises(fl.NotPositiveDefiniteError, match="penalised residual sum of squares"):
        profiled_criterion(1.0, 0.0, 0.0, 10, 1, True)
    with pytest.raises(ValueError, match="sigma"):
        deviance_at_sigma(1.0, 0.0, 1.0, 0.0, 10, 1, True)


@settings(max_examples=200, deadline=None)
@given(ldL2=st.floats(-50, 50), ldRX2=st.floats(-50, 50), pwrss=st.floats(1e-6, 1e6), n=st.integers(3, 10_000),
       p=st.integers(0, 2), reml=st.booleans(), slw=st.floats(-10, 10))
def test_profiling_sigma_out(ldL2, ldRX2, pwrss, n, p, reml, slw):
    """The profiled criterion is the deviance at σ̂² = r²/d, where the deviance in σ is smallest."""
    d = residual_df(n, p, reml)
    sig = math.sqrt(pwrss / d)
    crit = profiled_criterion(ldL2, ldRX2, pwrss, n, p, reml, slw)
    assert deviance_at_sigma(ldL2, ldRX2, pwrss, sig, n, p, reml, slw) == pytest.approx(crit, rel=1e-12, abs=1e-9)
    for f in (0.9, 1.1):
        assert deviance_at_sigma(ldL2, ldRX2, pwrss, sig * f, n, p, reml, slw) > crit


@pytest.mark.parametrize("REML", [True, False])
def test_against_lme4_devfun(REML):
    """The reference path's dense PLS pieces through the one formula give lme4 1.1.31's devfun."""
    fits = json.loads((reference_dir() / "sleepstudy.json").read_text())
    ref = next(f for f in fits if f["formula"] == "Reaction ~ Days + (Days|Subject)" and f["REML"] == REML)
    m = fl.LinearMixedModel(ref["formula"], fl.datasets.load("sleepstudy"), REML=REML, backend="reference")
    for pt in ref["objective_at_theta"].values():
        st_ = m.backend.state(np.array(pt["theta"], dtype=float))
        got = profiled_criterion(st_.ldL2, st_.ldRX2, st_.pwrss, 180, 2, REML)
        assert got == pytest.approx(pt["objective"], rel=1e-10)
