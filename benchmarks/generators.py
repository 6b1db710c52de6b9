"""A second generator of benchmark designs, independent of ``fastlmm_ext.datasets.simulate_*``
and of ``bench_lmm.py``: other distributions, other label types, unequal group sizes.

The project's own generators draw normal covariates, normal noise and (mostly) uniform,
categorical levels; a fitter tuned on them can look better than it is.  Here:

* noise is Student-t (5 df) or centred gamma (skewed), scaled to the stated residual SD σ;
* covariates are uniform, skewed or bimodal, some with a group-level component (x varies
  between as well as within groups);
* group sizes are unequal: Zipf-like or lognormal level weights, or 1 row per level plus a
  uniform allocation of the rest; levels with no rows simply do not appear;
* grouping columns are what a file would give: non-contiguous integer ids, or strings
  (``"g004711"``), never a pandas Categorical; nested labels repeat inside their parent
  (``b1`` in every ``a``), so only the formula's ``a/b/c`` makes them nested.

Every generator takes the row count, the level counts and ``seed`` (``numpy.random.default_rng``)
and returns a DataFrame; :data:`SHAPES` lists them with their lme4 formula and a small
(20k-50k rows) and a large size.  The true parameters are in each docstring, as
y = fixed part + random effects + ε.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

__all__ = ["uniform_crossed", "zipf_ratings", "skewed_crossed", "tiny_variance", "near_unit_corr",
           "nested3", "slope_by_factor", "crossed_slopes", "single_slope", "Shape", "SHAPES", "make"]

T_DF = 5   # degrees of freedom of the t noise


# ------------------------------------------------------------------------------- building blocks
def _t_noise(rng: np.random.Generator, n: int, sd: float) -> np.ndarray:
    """Student-t (5 df) noise with standard deviation ``sd`` (Var t_ν = ν/(ν−2))."""
    return rng.standard_t(T_DF, n) * (sd / np.sqrt(T_DF / (T_DF - 2)))


def _gamma_noise(rng: np.random.Generator, n: int, sd: float, shape: float = 2.0) -> np.ndarray:
    """Right-skewed noise: (Gamma(shape, 1) − shape)/√shape, mean 0, SD ``sd`` (skewness 2/√shape)."""
    return (rng.gamma(shape, 1.0, n) - shape) * (sd / np.sqrt(shape))


def _allocate(rng: np.random.Generator, n: int, k: int, weights: np.ndarray | None = None) -> np.ndarray:
    """Level of each of n rows: one row per level, the other n − k drawn with probabilities
    ∝ ``weights`` (uniform if None), in random order; every level is present."""
    if n < k:
        raise ValueError(f"n = {n} rows cannot give each of {k} levels a row")
    p = None if weights is None else weights / weights.sum()
    rest = rng.choice(k, n - k, p=p)
    return rng.permutation(np.concatenate([np.arange(k), rest]))


def _int_ids(rng: np.random.Generator, k: int) -> np.ndarray:
    """k distinct, non-contiguous integer ids in random order (as read from a file)."""
    return rng.choice(np.arange(10_000, 10_000 + 50 * k), k, replace=False)


def _str_ids(rng: np.random.Generator, k: int, prefix: str) -> np.ndarray:
    """k distinct string ids (``prefix`` + six digits), in random order."""
    return np.array([f"{prefix}{i:06d}" for i in _int_ids(rng, k)], dtype=object)


def _corr_effects(rng: np.random.Generator, k: int, sd: tuple[float, float], rho: float) -> np.ndarray:
    """k draws of (b0, b1) ~ N(0, [[sd0², ρ sd0 sd1], [ρ sd0 sd1, sd1²]]), by the Cholesky factor."""
    L = np.array([[sd[0], 0.0], [rho * sd[1], np.sqrt(1.0 - rho * rho) * sd[1]]])
    return rng.standard_normal((k, 2)) @ L.T


def _frame(columns: dict) -> pd.DataFrame:
    """The data frame; object id columns become pandas' string dtype, as ``read_csv`` gives them."""
    return pd.DataFrame({c: (pd.array(v, dtype="str") if isinstance(v, np.ndarray) and v.dtype == object else v)
                         for c, v in columns.items()})


# -------------------------------------------------------------------------------------- shapes
def uniform_crossed(n: int = 200_000, n_a: int = 5_000, n_b: int = 2_000, sd_a: float = 0.8,
                    sd_b: float = 0.5, seed: int = 1) -> pd.DataFrame:
    """Uniform crossed design for ``y ~ x + (1|a) + (1|b)``:
    y = 2 − 0.3 x + a (sd ``sd_a``) + b (sd ``sd_b``) + ε (t₅, σ = 1), with a and b drawn
    uniformly from ``n_a`` and ``n_b`` integer ids and x ~ U(−2, 2)."""
    rng = np.random.default_rng([seed, 101])
    ia, ib = rng.integers(0, n_a, n), rng.integers(0, n_b, n)
    x = rng.uniform(-2.0, 2.0, n)
    y = 2.0 - 0.3 * x + rng.normal(0, sd_a, n_a)[ia] + rng.normal(0, sd_b, n_b)[ib] + _t_noise(rng, n, 1.0)
    return _frame({"y": y, "x": x, "a": _int_ids(rng, n_a)[ia], "b": _int_ids(rng, n_b)[ib]})


def zipf_ratings(n: int = 1_000_000, n_u: int = 6_040, n_m: int = 3_706, s_u: float = 1.6,
                 s_m: float = 1.4, seed: int = 1) -> pd.DataFrame:
    """Ratings with Zipf activity, the MovieLens-1M shape, for ``y ~ 1 + (1|u) + (1|m)``:
    user u = min(zipf(``s_u``), ``n_u``), item m = min(zipf(``s_m``), ``n_m``) (so the last id
    collects the tail and many ids never occur: 10⁶ rows give about 4,300 × 3,700 levels),
    y = clip(round(3.5 + u (sd 0.4) + m (sd 0.5) + ε (skewed, σ = 0.9)), 1, 5)."""
    rng = np.random.default_rng([seed, 102])
    u = np.minimum(rng.zipf(s_u, n), n_u)
    m = np.minimum(rng.zipf(s_m, n), n_m)
    latent = 3.5 + rng.normal(0, 0.4, n_u + 1)[u] + rng.normal(0, 0.5, n_m + 1)[m] + _gamma_noise(rng, n, 0.9)
    return pd.DataFrame({"y": np.clip(np.round(latent), 1.0, 5.0), "u": u, "m": m})


def skewed_crossed(n: int = 100_000, n_a: int = 5_000, n_b: int = 1_000, seed: int = 1) -> pd.DataFrame:
    """Crossed design with Zipf-like level weights (∝ rank^−1.0 for a, rank^−0.8 for b, every
    level present) for ``y ~ x + (1|a) + (1|b)``:
    y = 1 + 0.8 x + a (sd 0.6) + b (sd 0.9) + ε (t₅, σ = 1.2), x = 0.5 z_a + Exp(1) − 1
    (a skewed covariate with a between-a component, z_a ~ N(0, 1))."""
    rng = np.random.default_rng([seed, 103])
    ia = _allocate(rng, n, n_a, 1.0 / np.arange(1, n_a + 1) ** 1.0)
    ib = _allocate(rng, n, n_b, 1.0 / np.arange(1, n_b + 1) ** 0.8)
    x = 0.5 * rng.standard_normal(n_a)[ia] + rng.exponential(1.0, n) - 1.0
    y = 1.0 + 0.8 * x + rng.normal(0, 0.6, n_a)[ia] + rng.normal(0, 0.9, n_b)[ib] + _t_noise(rng, n, 1.2)
    return _frame({"y": y, "x": x, "a": _str_ids(rng, n_a, "a")[ia], "b": _str_ids(rng, n_b, "b")[ib]})


def tiny_variance(n: int = 30_000, n_g: int = 600, n_h: int = 40, ratio: float = 1e-3,
                  seed: int = 1) -> pd.DataFrame:
    """Near-singular scalar term, for ``y ~ x + (1|g) + (1|h)``: Var(h) = ``ratio`` × σ²,
    y = 0.5 x + g (sd 1) + h (sd √ratio) + ε (t₅, σ = 1), g with lognormal(0, 1) level
    weights, h uniform, x ~ U(0, 1); θ_h ≈ √ratio ≈ 0.03, and on some seeds 0."""
    rng = np.random.default_rng([seed, 104])
    ig = _allocate(rng, n, n_g, rng.lognormal(0.0, 1.0, n_g))
    ih = rng.integers(0, n_h, n)
    x = rng.uniform(0.0, 1.0, n)
    y = 0.5 * x + rng.normal(0, 1.0, n_g)[ig] + rng.normal(0, np.sqrt(ratio), n_h)[ih] + _t_noise(rng, n, 1.0)
    return _frame({"y": y, "x": x, "g": _str_ids(rng, n_g, "g")[ig], "h": _str_ids(rng, n_h, "h")[ih]})


def near_unit_corr(n: int = 24_000, n_g: int = 3_000, rho: float = 0.98, seed: int = 1) -> pd.DataFrame:
    """Vector term with its correlation near 1, for ``y ~ x + (1 + x|g)``:
    y = 10 + 2 x + b0 + b1 x + ε (skewed, σ = 1), (b0, b1) with SDs (1, 0.6) and correlation
    ``rho``; x = 0.4 z_g + U(−1, 1); group sizes 1 + a uniform allocation (mean n/n_g)."""
    rng = np.random.default_rng([seed, 105])
    ig = _allocate(rng, n, n_g)
    x = 0.4 * rng.standard_normal(n_g)[ig] + rng.uniform(-1.0, 1.0, n)
    b = _corr_effects(rng, n_g, (1.0, 0.6), rho)
    y = 10.0 + 2.0 * x + b[ig, 0] + b[ig, 1] * x + _gamma_noise(rng, n, 1.0)
    return _frame({"y": y, "x": x, "g": _str_ids(rng, n_g, "g")[ig]})


def nested3(n: int = 30_000, n_a: int = 60, max_b: int = 8, max_c: int = 6, seed: int = 1) -> pd.DataFrame:
    """Three-level nesting, for ``y ~ x + (1|a/b/c)``: each a has 2..``max_b`` b's, each b
    2..``max_c`` c's (uniform counts), rows spread over the c-cells with lognormal(0, 0.8)
    weights; b and c labels repeat in every parent (``b1``, ``c1``...).
    y = 5 + 0.4 x + a (sd 1) + b:a (sd 0.7) + c:b:a (sd 0.5) + ε (skewed, σ = 1),
    x = z_cell + U(−1, 1) (z_cell ~ N(0, 1) per c-cell)."""
    rng = np.random.default_rng([seed, 106])
    nb = rng.integers(2, max_b + 1, n_a)                    # b's in each a
    b_of = np.repeat(np.arange(n_a), nb)                    # parent a of each (a, b)
    b_lab = np.concatenate([np.arange(1, k + 1) for k in nb])
    nc = rng.integers(2, max_c + 1, b_of.size)              # c's in each (a, b)
    cell_b = np.repeat(np.arange(b_of.size), nc)            # parent (a, b) of each cell
    c_lab = np.concatenate([np.arange(1, k + 1) for k in nc])
    cell = _allocate(rng, n, cell_b.size, rng.lognormal(0.0, 0.8, cell_b.size))
    ib = cell_b[cell]
    ia = b_of[ib]
    x = rng.standard_normal(cell_b.size)[cell] + rng.uniform(-1.0, 1.0, n)
    y = (5.0 + 0.4 * x + rng.normal(0, 1.0, n_a)[ia] + rng.normal(0, 0.7, b_of.size)[ib]
         + rng.normal(0, 0.5, cell_b.size)[cell] + _gamma_noise(rng, n, 1.0))
    a_ids = _str_ids(rng, n_a, "a")
    return _frame({"y": y, "x": x, "a": a_ids[ia],
                   "b": np.array([f"b{v}" for v in b_lab], dtype=object)[ib],
                   "c": np.array([f"c{v}" for v in range(c_lab.max() + 1)], dtype=object)[c_lab[cell]]})


def slope_by_factor(n: int = 30_000, n_g: int = 500, n_h: int = 100, seed: int = 1) -> pd.DataFrame:
    """A random slope crossed with a scalar term and a fixed factor, for
    ``y ~ x * f + (1 + x|g) + (1|h)``: f in {lo, mid, hi} with probabilities (0.5, 0.3, 0.2),
    y = 1 + 0.5 x + (0.3, −0.2 for mid, hi) + x·(0.2, 0.4 for mid, hi) + b0_g + b1_g x + h
    + ε (t₅, σ = 1); (b0, b1): SDs (0.8, 0.4), correlation −0.3; h sd 0.5; g with
    lognormal(0, 1) level weights, h uniform; x ~ U(−1.5, 1.5) + 0.3 z_g."""
    rng = np.random.default_rng([seed, 107])
    ig = _allocate(rng, n, n_g, rng.lognormal(0.0, 1.0, n_g))
    ih = rng.integers(0, n_h, n)
    fi = rng.choice(3, n, p=[0.5, 0.3, 0.2])
    x = rng.uniform(-1.5, 1.5, n) + 0.3 * rng.standard_normal(n_g)[ig]
    b = _corr_effects(rng, n_g, (0.8, 0.4), -0.3)
    y = (1.0 + 0.5 * x + np.array([0.0, 0.3, -0.2])[fi] + np.array([0.0, 0.2, 0.4])[fi] * x
         + b[ig, 0] + b[ig, 1] * x + rng.normal(0, 0.5, n_h)[ih] + _t_noise(rng, n, 1.0))
    return _frame({"y": y, "x": x, "f": np.array(["lo", "mid", "hi"], dtype=object)[fi],
                   "g": _str_ids(rng, n_g, "g")[ig], "h": _int_ids(rng, n_h)[ih]})


def crossed_slopes(n: int = 30_000, n_a: int = 300, n_b: int = 150, seed: int = 1) -> pd.DataFrame:
    """Two crossed vector terms, for ``y ~ x + (1 + x|a) + (1 + x|b)``:
    y = −1 + x + (a0 + a1 x) + (b0 + b1 x) + ε (skewed, σ = 1), (a0, a1): SDs (1, 0.5),
    correlation 0.2; (b0, b1): SDs (0.6, 0.3), correlation −0.5; lognormal(0, 0.7) level weights
    for both; x bimodal: ±1 (equally likely) + N(0, 0.5²)."""
    rng = np.random.default_rng([seed, 108])
    ia = _allocate(rng, n, n_a, rng.lognormal(0.0, 0.7, n_a))
    ib = _allocate(rng, n, n_b, rng.lognormal(0.0, 0.7, n_b))
    x = rng.choice([-1.0, 1.0], n) + rng.normal(0, 0.5, n)
    ea, eb = _corr_effects(rng, n_a, (1.0, 0.5), 0.2), _corr_effects(rng, n_b, (0.6, 0.3), -0.5)
    y = -1.0 + x + ea[ia, 0] + ea[ia, 1] * x + eb[ib, 0] + eb[ib, 1] * x + _gamma_noise(rng, n, 1.0)
    return _frame({"y": y, "x": x, "a": _str_ids(rng, n_a, "a")[ia], "b": _str_ids(rng, n_b, "b")[ib]})


def single_slope(n: int = 500_000, n_g: int = 125_000, seed: int = 1) -> pd.DataFrame:
    """One factor with a correlated slope, for ``y ~ x + (1 + x|g)`` (n/n_g = 4 rows per group
    on average, 1 row per group plus a uniform allocation of the rest):
    y = 3 + 0.7 x + b0 + b1 x + ε (t₅, σ = 1), (b0, b1): SDs (0.9, 0.4), correlation −0.4;
    x = 0.5 z_g + Exp(1) − 1."""
    rng = np.random.default_rng([seed, 109])
    ig = _allocate(rng, n, n_g)
    x = 0.5 * rng.standard_normal(n_g)[ig] + rng.exponential(1.0, n) - 1.0
    b = _corr_effects(rng, n_g, (0.9, 0.4), -0.4)
    y = 3.0 + 0.7 * x + b[ig, 0] + b[ig, 1] * x + _t_noise(rng, n, 1.0)
    return _frame({"y": y, "x": x, "g": _str_ids(rng, n_g, "g")[ig]})


# ------------------------------------------------------------------------------------ registry
@dataclass(frozen=True)
class Shape:
    """A design: its generator, lme4 formula, grouping columns and two sizes (generator keywords)."""
    name: str
    make: Callable[..., pd.DataFrame]
    formula: str
    factors: tuple[str, ...]                       # grouping (and fixed factor) columns, for R
    small: dict = field(default_factory=dict)      # 20k-50k rows (evaluation counts, asv)
    large: dict = field(default_factory=dict)      # the comparison's size

    def rows(self, size: str = "small") -> int:
        return int(getattr(self, size)["n"])


SHAPES: dict[str, Shape] = {s.name: s for s in [
    Shape("uniform_crossed", uniform_crossed, "y ~ x + (1|a) + (1|b)", ("a", "b"),
          dict(n=40_000, n_a=1_000, n_b=400), dict(n=200_000, n_a=5_000, n_b=2_000)),
    Shape("zipf_ratings", zipf_ratings, "y ~ 1 + (1|u) + (1|m)", ("u", "m"),
          dict(n=50_000), dict(n=1_000_000)),
    Shape("skewed_crossed", skewed_crossed, "y ~ x + (1|a) + (1|b)", ("a", "b"),
          dict(n=30_000, n_a=1_500, n_b=300), dict(n=100_000, n_a=5_000, n_b=1_000)),
    Shape("tiny_variance", tiny_variance, "y ~ x + (1|g) + (1|h)", ("g", "h"),
          dict(n=30_000, n_g=600, n_h=40), dict(n=100_000, n_g=2_000, n_h=100)),
    Shape("near_unit_corr", near_unit_corr, "y ~ x + (1 + x|g)", ("g",),
          dict(n=24_000, n_g=3_000), dict(n=100_000, n_g=12_500)),
    Shape("nested3", nested3, "y ~ x + (1|a/b/c)", ("a", "b", "c"),
          dict(n=30_000, n_a=60), dict(n=100_000, n_a=200)),
    Shape("slope_by_factor", slope_by_factor, "y ~ x * f + (1 + x|g) + (1|h)", ("f", "g", "h"),
          dict(n=30_000, n_g=500, n_h=100), dict(n=100_000, n_g=2_000, n_h=300)),
    Shape("crossed_slopes", crossed_slopes, "y ~ x + (1 + x|a) + (1 + x|b)", ("a", "b"),
          dict(n=30_000, n_a=300, n_b=150), dict(n=100_000, n_a=1_000, n_b=500)),
    Shape("single_slope", single_slope, "y ~ x + (1 + x|g)", ("g",),
          dict(n=40_000, n_g=10_000), dict(n=500_000, n_g=125_000)),
]}


def make(shape: str, seed: int, size: str = "small", scale: float = 1.0) -> pd.DataFrame:
    """The data of ``SHAPES[shape]`` at ``size`` ("small" or "large"), rows and level counts
    multiplied by ``scale`` (e.g. 0.1 for a quick run; the Zipf caps stay)."""
    s = SHAPES[shape]
    kw = dict(getattr(s, size))
    if scale != 1.0:
        counts = {"n", "n_a", "n_b", "n_g", "n_h"}          # rows and level counts; not the Zipf caps
        kw = {k: max(2, int(round(v * scale))) if k in counts else v for k, v in kw.items()}
    return s.make(seed=seed, **kw)
