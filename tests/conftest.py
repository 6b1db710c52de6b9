"""Shared fixtures: lme4 reference fits from ../shared/reference (next to the checkout)."""
from __future__ import annotations

import contextlib
import json
import os
import pathlib
import warnings

import pandas as pd
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
REFERENCE = pathlib.Path(os.environ.get("FASTLMM_REFERENCE_DIR", ROOT.parent / "shared" / "reference"))


def reference_dir() -> pathlib.Path:
    if not REFERENCE.is_dir():
        raise RuntimeError(f"lme4 reference data not found at {REFERENCE}; set FASTLMM_REFERENCE_DIR")
    return REFERENCE


def load_reference_data(fit: dict, directory: pathlib.Path | None = None) -> pd.DataFrame:
    """Read a reference CSV (from the lme4 reference folder, or ``directory``) and restore R's
    factor types and level orders from `data_columns`."""
    path = (reference_dir() if directory is None else directory) / fit["data_file"]
    df = pd.read_csv(path, compression="gzip" if path.suffix == ".gz" else None)
    for col, info in fit["data_columns"].items():
        if info.get("type") in ("factor", "ordered factor"):
            vals = df[col]
            if pd.api.types.is_float_dtype(vals.dtype):
                vals = vals.map(lambda v: str(int(v)) if float(v).is_integer() else str(v))
            else:
                vals = vals.astype(str)
            df[col] = pd.Categorical(vals, categories=[str(v) for v in info["levels"]],
                                     ordered=info["type"] == "ordered factor")
    return df


def all_reference_fits() -> list[tuple[str, dict]]:
    out = []
    for p in sorted(reference_dir().glob("*.json")):
        data = json.loads(p.read_text())
        if isinstance(data, list):
            out += [(p.stem, f) for f in data if isinstance(f, dict) and "formula" in f and "data_file" in f]
    return out


_cache: dict = {}

BACKEND_NAMES = ("compiled", "blocked", "reference", "single")


@pytest.fixture(params=BACKEND_NAMES)
def backend(request) -> str:
    """Each criterion backend in turn: a test that takes ``backend`` runs once per implementation
    of ``_backends.Backend`` (as tabmat's tests run once per matrix type)."""
    return request.param


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    """The single-term backend fits one random-effects term only: a test run with
    ``backend="single"`` on a model with more terms, refused with that ArgumentError, is skipped
    (test_single.py checks the refusal itself)."""
    try:
        return (yield)
    except Exception as e:
        import fastlmm_ext as fl
        params = getattr(getattr(item, "callspec", None), "params", {})
        if (params.get("backend") == "single" and isinstance(e, fl.ArgumentError)
                and "needs exactly one random-effects term" in str(e)):
            pytest.skip("backend 'single' does not apply: the model has more than one random-effects term")
        raise


@pytest.fixture(scope="session")
def fitted_reference():
    """Fit each reference model once per session (backend 'compiled'); returns a getter."""
    import fastlmm_ext as fl

    def get(key: str, fit: dict):
        if key not in _cache:
            df = load_reference_data(fit)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                _cache[key] = (df, fl.lmer(fit["formula"], df, REML=fit["REML"]))
        return _cache[key]
    return get


def quiet_lmer(formula, data, **kw):
    """fl.lmer with its warnings (singular fits, dropped rows) silenced."""
    import fastlmm_ext as fl
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fl.lmer(formula, data, **kw)


@pytest.fixture(scope="module")
def sleep():
    """sleepstudy and its REML fit of ``Reaction ~ Days + (Days|Subject)``."""
    import fastlmm_ext as fl
    df = fl.datasets.load("sleepstudy")
    return df, quiet_lmer("Reaction ~ Days + (Days|Subject)", df)


@pytest.fixture(scope="module")
def dyestuff():
    """lme4's Dyestuff reference data and its REML fit."""
    fit = next(f for k, f in all_reference_fits() if k == "Dyestuff" and f["REML"])
    df = load_reference_data(fit)
    return df, quiet_lmer(fit["formula"], df)


@contextlib.contextmanager
def raises_named(cls, *names):
    """pytest.raises(cls), and the error is a FastLMMError whose message contains every one of
    ``names`` (the column, argument or file at fault)."""
    import fastlmm_ext as fl
    with pytest.raises(cls) as info:
        yield info
    assert isinstance(info.value, fl.FastLMMError), type(info.value)
    for name in names:
        assert name in str(info.value), (name, str(info.value))
