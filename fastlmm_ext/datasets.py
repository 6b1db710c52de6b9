"""Small example data sets bundled with the package (copied from lme4's reference set).

* ``ingot``: pressure of 7 ingots × 3 metals (``pres ~ metal + (1|ingot)``)
* ``sleepstudy``: reaction times of 18 subjects over 10 days (``Reaction ~ Days + (Days|Subject)``)
* ``Penicillin``: crossed plate × sample design (``diameter ~ 1 + (1|plate) + (1|sample)``)
* ``Pastes``: casks nested in batches (``strength ~ 1 + (1|batch/cask)``)
"""
from __future__ import annotations

from importlib import resources

import numpy as np
import pandas as pd

__all__ = ["load", "names", "simulate_crossed", "simulate_nested"]

# Columns that are factors in R even when they look numeric.
_FACTORS = {"ingot": ["ingot", "metal"], "sleepstudy": ["Subject"], "Penicillin": ["plate", "sample"],
            "Pastes": ["batch", "cask", "sample"]}


def names() -> list[str]:
    return sorted(_FACTORS)


def load(name: str) -> pd.DataFrame:
    """Load a bundled data set as a DataFrame with its grouping columns as categoricals."""
    if name not in _FACTORS:
        raise ValueError(f"unknown data set {name!r}; available: {', '.join(names())}")
    with resources.files("fastlmm_ext").joinpath("data", f"{name}.csv").open("r") as fh:
        df = pd.read_csv(fh)
    for col in _FACTORS[name]:
        if col in df.columns:
            df[col] = pd.Categorical(df[col].astype(str), categories=sorted(df[col].astype(str).unique(), key=_natural))
    return df


def _natural(s: str):
    return (0, int(s), "") if s.isdigit() else (1, 0, s)


def simulate_crossed(n: int, la: int, lb: int, seed: int = 1, slope_sd: float = 0.0) -> pd.DataFrame:
    """Synthetic crossed design (the speed issue's benchmark):
    y = 1 + 0.5 x + a_i (sd 1) + b_j (sd 0.5) [+ s_i x (sd ``slope_sd``)] + ε (sd 1), x ~ N(0, 1),
    with a (``la`` levels) and b (``lb`` levels) drawn uniformly; numpy ``default_rng(seed)``."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, la, n)
    b = rng.integers(0, lb, n)
    x = rng.normal(size=n)
    y = 1 + 0.5 * x + rng.normal(0, 1, la)[a] + rng.normal(0, 0.5, lb)[b]
    if slope_sd:
        y = y + rng.normal(0, slope_sd, la)[a] * x
    y = y + rng.normal(size=n)
    return pd.DataFrame({"y": y, "x": x, "a": pd.Categorical(a), "b": pd.Categorical(b)})


def simulate_nested(n: int, la: int, per: int, seed: int = 2) -> pd.DataFrame:
    """Pastes-like nested design: ``per`` levels of c inside each of ``la`` levels of a,
    y = 60 + a_i (sd 2) + (c in a)_ij (sd 3) + ε (sd 1); fit with ``y ~ 1 + (1|a/c)``."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, la, n)
    c = rng.integers(0, per, n)
    ab = a * per + c
    y = 60 + rng.normal(0, 2, la)[a] + rng.normal(0, 3, la * per)[ab] + rng.normal(size=n)
    return pd.DataFrame({"y": y, "a": pd.Categorical(a), "c": pd.Categorical(c)})


def simulate_ratings(n: int = 1_000_000, n_users: int = 6040, n_items: int = 3706, seed: int = 1) -> pd.DataFrame:
    """Ratings in the MovieLens-1M shape (10⁶ ratings of 3,706 movies by 6,040 users by default):
    lognormal user activity, Zipf-like item popularity (weight ∝ rank^-0.9),
    rating = clip(round(3.6 + user (sd 0.45) + item (sd 0.5) + ε (sd 0.9)), 1, 5);
    fit with ``rating ~ 1 + (1|user) + (1|item)``.  Integer level codes, as read from a file."""
    rng = np.random.default_rng(seed)
    pu = rng.lognormal(0.0, 1.0, n_users)
    pm = 1.0 / np.arange(1, n_items + 1) ** 0.9
    u = rng.choice(n_users, n, p=pu / pu.sum())
    m = rng.permutation(n_items)[rng.choice(n_items, n, p=pm / pm.sum())]
    y = 3.6 + 0.45 * rng.normal(size=n_users)[u] + 0.5 * rng.normal(size=n_items)[m] + 0.9 * rng.normal(size=n)
    return pd.DataFrame({"rating": np.clip(np.round(y), 1, 5), "user": u, "item": m})
