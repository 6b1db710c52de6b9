"""Simulated responses (fastlmm_ext._simulate): reproducible streams and the model's moments."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest


def test_simulate_reproducible(sleep):
    df, res = sleep
    a = res.simulate(3, seed=11)
    assert a.shape == (len(df), 3) and list(a.columns) == ["sim_1", "sim_2", "sim_3"]
    assert a.index.equals(res.structure.row_index)
    pd.testing.assert_frame_equal(a, res.simulate(3, seed=11))
    np.testing.assert_array_equal(res.simulate(1, seed=11)["sim_1"], a["sim_1"])
    assert not np.allclose(a["sim_1"], res.simulate(1, seed=12)["sim_1"])
    # conditional on the modes: y* − ŷ is pure noise with SD σ̂
    c = res.simulate(200, seed=1, re_form=None).to_numpy() - res.fitted()[:, None]
    assert np.std(c) == pytest.approx(res.sigma, rel=0.03)
    with pytest.raises(ValueError, match="nsim"):
        res.simulate(0)


def test_simulate_moments_random_intercept(dyestuff):
    df, res = dyestuff
    nsim = 4000
    Y = res.simulate(nsim, seed=2024).to_numpy()
    sb2 = res.varcorr.set_index("grp").loc["Batch", "vcov"]
    s2 = res.sigma ** 2
    mu = res.fixef["(Intercept)"]
    # grand mean: each simulated data set's mean has variance σ_b²/6 + σ²/30 (6 batches of 5)
    se = np.sqrt((sb2 / 6 + s2 / 30) / nsim)
    assert abs(Y.mean() - mu) < 4 * se
    v = Y.var(axis=1, ddof=1)
    assert v.mean() == pytest.approx(sb2 + s2, rel=0.05)
    codes = res.structure.terms[0].codes
    C = np.cov(Y)
    same = (codes[:, None] == codes[None, :]) & ~np.eye(len(codes), dtype=bool)
    diff = codes[:, None] != codes[None, :]
    assert C[same].mean() == pytest.approx(sb2, rel=0.1)
    assert abs(C[diff].mean()) < 0.1 * sb2
