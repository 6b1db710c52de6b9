"""Results and models pickle: ``pickle``, ``copy.deepcopy`` and a process pool give back objects
that compute the same numbers as the originals (the kernel is rebuilt from the cross-products on
load, so the arithmetic is the same), for every backend and for fits without rows."""
from __future__ import annotations

import copy
import pickle
import warnings
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pandas as pd
import pytest

import fastlmm_ext as fl
from fastlmm_ext import datasets

SLEEP = datasets.load("sleepstudy")
NEW = SLEEP.iloc[[0, 15, 40, 77, 120, 179]].reset_index(drop=True)
RTOL = 1e-10

CASES = {
    "compiled": ("Reaction ~ Days + (Days|Subject)", "compiled"),
    "blocked": ("Reaction ~ Days + (1|Subject) + (0 + Days|Subject)", "blocked"),
    "reference": ("Reaction ~ Days + (Days|Subject)", "reference"),
    "chunked": ("Reaction ~ Days + (Days|Subject)", None),
    "dask": ("Reaction ~ Days + (Days|Subject)", None),
}


def fit(case: str):
    formula, backend = CASES[case]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if case == "chunked":
            return fl.lmer_chunked(formula, [SLEEP.iloc[i:i + 50] for i in range(0, len(SLEEP), 50)])
        if case == "dask":
            dd = pytest.importorskip("dask.dataframe")
            return fl.lmer(formula, dd.from_pandas(SLEEP, npartitions=3))
        return fl.lmer(formula, SLEEP, backend=backend)


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    res = fit(request.param)
    return request.param, res, numbers(res)


def numbers(res) -> dict:
    """What a result computes (not only what it stores): the criterion at θ̂ and elsewhere,
    predictions, the summary, condVar, Satterthwaite's table, a profile interval and, for a
    fit with rows, fitted values, residuals and a refit."""
    m = res.model
    theta = res.theta
    other = np.where(res.structure.lower == 0, theta * 1.3 + 0.05, theta + 0.02)
    out = {
        "criterion": res.criterion, "theta": theta, "fixef": res.fixef.to_numpy(), "vcov": res.vcov.to_numpy(),
        "objective": m.objective(theta), "objective_other": m.objective(other),
        "predict": res.predict(NEW).to_numpy(), "predict_fixed": res.predict(NEW, re_form="~0").to_numpy(),
        "summary": res.summary(),
        "condvar": np.concatenate([v.ravel() for v in res.condvar.values()]),
        "coef_table": res.coef_table("satterthwaite").to_numpy(),
        "profile": res.confint(method="profile", parm=".sigma").to_numpy(),
    }
    if res.structure.has_rows:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            again = res.refit(2.0 * res.structure.y + 1.0)
        out.update(fitted=res.fitted(), residuals=res.residuals(type="pearson", scaled=True),
                   refit_criterion=again.criterion, refit_fixef=again.fixef.to_numpy())
    return out


def assert_same_numbers(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for key, value in want.items():
        if isinstance(value, str):
            assert got[key] == value, key
        else:
            np.testing.assert_allclose(got[key], value, rtol=RTOL, atol=0, err_msg=key)


def _numbers_in_worker(res):
    """Process-pool task: compute the numbers in another process and send the result back."""
    return res, numbers(res)


def test_pickle_round_trip(case):
    name, res, want = case
    back = pickle.loads(pickle.dumps(res, protocol=pickle.HIGHEST_PROTOCOL))
    assert back.backend == res.backend and back.structure.has_rows == (name not in ("chunked", "dask"))
    assert_same_numbers(numbers(back), want)


def test_deepcopy(case):
    _, res, want = case
    twin = copy.deepcopy(res)
    assert twin.model is not res.model and twin.model.backend is not res.model.backend
    assert_same_numbers(numbers(twin), want)
    assert_same_numbers(numbers(res), want)      # the original is untouched by its copy's use


def test_result_to_a_worker_process_and_back(case):
    """As joblib or multiprocessing use it: the result goes to a worker, is used there, comes back."""
    _, res, want = case
    with ProcessPoolExecutor(max_workers=1) as ex:
        back, there = ex.submit(_numbers_in_worker, res).result()
    assert_same_numbers(there, want)
    assert_same_numbers(numbers(back), want)


def test_model_pickles_and_fits_the_same():
    m = fl.LinearMixedModel("Reaction ~ Days + (Days|Subject)", SLEEP, backend="compiled")
    back = pickle.loads(pickle.dumps(m))
    # the kernel (CHOLMOD's symbolic analysis) is not in the pickle: it is rebuilt on first use
    assert back.backend._shared._kernel is None
    theta = np.array([0.9, 0.05, 0.2])
    assert back.objective(theta) == pytest.approx(m.objective(theta), rel=RTOL)
    assert back.backend._shared._kernel is not None
    a, b = m.fit(), back.fit()
    assert b.criterion == pytest.approx(a.criterion, rel=RTOL)
    np.testing.assert_allclose(b.theta, a.theta, rtol=RTOL)


def test_results_sharing_a_kernel_keep_sharing_after_loading():
    """A refit shares its design's kernel; pickled together they load with one shared kernel
    that each switches to its own response."""
    res = fit("compiled")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        twin = res.refit(3.0 * res.structure.y - 50.0)
    theta = np.array([1.1, -0.1, 0.3])
    want = [res.model.objective(theta), twin.model.objective(theta)]
    a, b = pickle.loads(pickle.dumps([res, twin]))
    assert a.model.backend._shared is b.model.backend._shared
    for _ in range(2):       # alternate: each evaluation switches the kernel's response
        assert a.model.objective(theta) == pytest.approx(want[0], rel=RTOL)
        assert b.model.objective(theta) == pytest.approx(want[1], rel=RTOL)


@pytest.mark.parametrize("backend", ["compiled", "blocked", "reference"])
def test_pickle_carries_the_rows_once(backend):
    """The n-sized arrays are y, X and each term's level codes and model matrix; Z (assembled
    from the codes) and the reference path's copies of y and w are rebuilt on load, not pickled."""
    rng = np.random.default_rng(7)
    n = 40_000 if backend != "reference" else 3_000
    df = pd.DataFrame({"x": rng.normal(size=n), "g": rng.integers(0, 60, n).astype(str),
                       "h": rng.integers(0, 25, n).astype(str)})
    df["y"] = df.x + rng.normal(size=df.g.nunique())[pd.factorize(df.g)[0]] + rng.normal(size=n)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = fl.lmer("y ~ x + (1|g) + (1|h)", df, backend=backend)
    s = res.structure
    rows = sum(a.nbytes for a in [s.y, s.X, *(t.codes for t in s.terms), *(t.Xi for t in s.terms)])
    size = len(pickle.dumps(res, protocol=pickle.HIGHEST_PROTOCOL))
    assert rows < size < rows + s.y.nbytes // 2     # a second copy of any n-vector would not fit
    back = pickle.loads(pickle.dumps(res))
    assert (back.structure.Z != s.Z).nnz == 0 and back.structure.Z.shape == s.Z.shape
