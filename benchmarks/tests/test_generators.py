"""The second generator makes what its docstrings say: sizes, level structure, skew, noise, and
true variance components that a fit recovers."""
import pathlib
import re
import sys

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import generators as G  # noqa: E402
from generators import SHAPES, make  # noqa: E402

import fastlmm_ext as fl  # noqa: E402

# every level present by construction (_allocate), or practically so (uniform draws, >= 40 rows a level)
ALL_LEVELS = {"uniform_crossed": {"a": 1_000, "b": 400}, "skewed_crossed": {"a": 1_500, "b": 300},
              "tiny_variance": {"g": 600, "h": 40}, "near_unit_corr": {"g": 3_000},
              "slope_by_factor": {"g": 500, "h": 100, "f": 3}, "crossed_slopes": {"a": 300, "b": 150},
              "single_slope": {"g": 10_000}}


@pytest.mark.parametrize("name", list(SHAPES))
def test_small_size_columns_and_ids(name):
    s = SHAPES[name]
    df = make(name, 1)
    assert len(df) == s.small["n"] and 20_000 <= len(df) <= 50_000
    assert set(re.findall(r"[A-Za-z_]\w*", s.formula)) <= set(df.columns)   # every variable of the formula
    assert not df.isna().any().any()
    for col in s.factors:
        # ids as a file gives them: strings or integers, never a Categorical
        assert not isinstance(df[col].dtype, pd.CategoricalDtype)
        assert pd.api.types.is_string_dtype(df[col].dtype) or pd.api.types.is_integer_dtype(df[col].dtype)
    for col, k in ALL_LEVELS.get(name, {}).items():
        assert df[col].nunique() == k


@pytest.mark.parametrize("name", list(SHAPES))
def test_seed_reproducible_and_distinct(name):
    a, b, c = make(name, 1), make(name, 1), make(name, 2)
    pd.testing.assert_frame_equal(a, b)
    assert not np.array_equal(a["y"].to_numpy(), c["y"].to_numpy())


def test_scale_shrinks_rows_and_levels_but_not_zipf_caps():
    df = make("uniform_crossed", 1, "large", 0.1)
    assert len(df) == 20_000 and df["a"].nunique() == 500 and df["b"].nunique() == 200
    z = make("zipf_ratings", 1, "small", 0.5)
    assert len(z) == 25_000 and z["u"].max() <= 6_040 and z["m"].max() <= 3_706


def test_zipf_ratings_shape():
    """P(u = 1) = 1/ζ(1.6), P(m = 1) = 1/ζ(1.4) (the caps take only the far tail); ratings 1..5."""
    from scipy.special import zeta
    df = make("zipf_ratings", 3)
    assert set(np.unique(df["y"])) <= {1.0, 2.0, 3.0, 4.0, 5.0}
    assert df["u"].min() >= 1 and df["u"].max() <= 6_040 and df["m"].max() <= 3_706
    assert abs(np.mean(df["u"] == 1) - 1 / zeta(1.6)) < 0.02
    assert abs(np.mean(df["m"] == 1) - 1 / zeta(1.4)) < 0.02
    # skewed: most ids never occur; the cap collects the tail, P(zipf(1.6) >= 6040) ≈ 0.0039
    assert df["u"].nunique() < 6_040 / 2 and 0.002 < np.mean(df["u"] == 6_040) < 0.006


def test_skewed_crossed_is_skewed():
    counts = make("skewed_crossed", 1)["a"].value_counts()
    assert counts.iloc[0] > 20 * counts.median()


def test_nested3_labels_repeat_inside_parents():
    df = make("nested3", 2)
    assert df["b"].nunique() <= 8 and df["c"].nunique() <= 6
    nb = df.groupby("a")["b"].nunique()
    assert nb.between(2, 8).all()
    nc = df.groupby(["a", "b"])["c"].nunique()
    assert nc.between(2, 6).all()
    # the labels alone are not the groups: (1|b) would pool different b's
    assert len(nb) == 60 and nb.sum() > 3 * df["b"].nunique()


def test_slope_by_factor_levels():
    f = make("slope_by_factor", 1)["f"].value_counts(normalize=True)
    assert abs(f["lo"] - 0.5) < 0.02 and abs(f["mid"] - 0.3) < 0.02 and abs(f["hi"] - 0.2) < 0.02


def test_noise_and_effect_helpers():
    rng = np.random.default_rng(7)
    t = G._t_noise(rng, 400_000, 2.0)
    assert abs(t.std() / 2.0 - 1) < 0.03
    z = (t - t.mean()) / t.std()
    assert np.mean(z ** 4) - 3 > 2           # t₅: excess kurtosis 6 (heavy tails)
    g = G._gamma_noise(rng, 400_000, 1.5)
    assert abs(g.mean()) < 0.01 and abs(g.std() / 1.5 - 1) < 0.01
    assert abs(np.mean(((g - g.mean()) / g.std()) ** 3) - np.sqrt(2)) < 0.1   # skewness 2/√2
    b = G._corr_effects(rng, 400_000, (1.0, 0.6), -0.7)
    C = np.cov(b.T)
    np.testing.assert_allclose(np.sqrt(np.diag(C)), [1.0, 0.6], rtol=0.01)
    assert abs(C[0, 1] / np.sqrt(C[0, 0] * C[1, 1]) + 0.7) < 0.01


def test_allocate_every_level_present():
    rng = np.random.default_rng(3)
    lv = G._allocate(rng, 1_000, 400, np.arange(1, 401) ** -1.0)
    assert lv.size == 1_000 and np.bincount(lv, minlength=400).min() >= 1
    with pytest.raises(ValueError, match="cannot give each of 400 levels a row"):
        G._allocate(rng, 100, 400)


def _sds(res) -> dict:
    vc = res.varcorr
    return {(r.grp, r.var1, r.var2): r.sdcor for r in vc.itertuples()}


def test_fits_recover_the_stated_parameters():
    """The docstrings' true values, recovered within sampling error by the default fit."""
    r = fl.lmer(SHAPES["uniform_crossed"].formula, make("uniform_crossed", 1))
    sd = _sds(r)
    assert abs(sd["a", "(Intercept)", None] / 0.8 - 1) < 0.1
    assert abs(sd["b", "(Intercept)", None] / 0.5 - 1) < 0.15
    assert abs(r.sigma - 1) < 0.03
    assert abs(r.fixef["x"] + 0.3) < 0.02

    r = fl.lmer(SHAPES["single_slope"].formula, make("single_slope", 1))
    sd = _sds(r)
    assert abs(sd["g", "(Intercept)", None] / 0.9 - 1) < 0.1
    assert abs(sd["g", "x", None] / 0.4 - 1) < 0.2
    assert abs(sd["g", "(Intercept)", "x"] + 0.4) < 0.15

    r = fl.lmer(SHAPES["near_unit_corr"].formula, make("near_unit_corr", 1))
    assert _sds(r)["g", "(Intercept)", "x"] > 0.9

    r = fl.lmer(SHAPES["nested3"].formula, make("nested3", 1))
    sd = _sds(r)
    assert abs(sd["a", "(Intercept)", None] - 1.0) < 0.35
    assert abs(sd["b:a", "(Intercept)", None] - 0.7) < 0.2
    assert abs(sd["c:b:a", "(Intercept)", None] - 0.5) < 0.1

    r = fl.lmer(SHAPES["tiny_variance"].formula, make("tiny_variance", 1))
    assert _sds(r)["h", "(Intercept)", None] < 0.1 * r.sigma
