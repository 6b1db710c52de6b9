"""Small example data sets bundled with the package (copied from lme4's reference set).

* ``ingot``: pressure of 7 ingots × 3 metals (``pres ~ metal + (1|ingot)``)
* ``sleepstudy``: reaction times of 18 subjects over 10 days (``Reaction ~ Days + (Days|Subject)``)
* ``Penicillin``: crossed plate × sample design (``diameter ~ 1 + (1|plate) + (1|sample)``)
* ``Pastes``: casks nested in batches (``strength ~ 1 + (1|batch/cask)``)
"""
from __future__ import annotations

from importlib import resources

import pandas as pd

__all__ = ["load", "names"]

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
