"""Many responses on one design: the kernel's set_response, refit, and fit_many against lmer."""
from __future__ import annotations

import gc
import sys
import warnings

import numpy as np
import pandas as pd
import pytest

import fastlmm_ext as fl
from fastlmm_ext import datasets
from fastlmm_ext._crossprod import CrossProducts, kernel_layout
from fastlmm_ext._kernel import PLSKernel
from fastlmm_ext._pls import profiled_criterion
from fastlmm_ext._response import response_crossproducts

SLEEP = "~ Days + (Days|Subject)"
PENI = "~ 1 + (1|plate) + (1|sample)"


def _rss_mb() -> float:
    import os
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _quiet_lmer(formula, data, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fl.lmer(formula, data, **kw)


@pytest.fixture(scope="module")
def sleep() -> pd.DataFrame:
    """sleepstudy with synthetic responses: rescaled, noisier, one without a subject effect
    (a singular fit), one with a missing value."""
    df = datasets.load("sleepstudy")
    rng = np.random.default_rng(7)
    r = df.Reaction.to_numpy()
    out = df.assign(r1=0.5 * r + 3.0, r2=r + rng.normal(0, 25, len(r)), r3=rng.normal(100, 5, len(r)),
                    r4=-2.0 * r + rng.normal(0, 40, len(r)), r5=r + rng.normal(0, 10, len(r)))
    out.loc[[4, 77, 150], "r5"] = np.nan
    return out


@pytest.fixture(scope="module")
def peni() -> pd.DataFrame:
    df = datasets.load("Penicillin")
    rng = np.random.default_rng(3)
    df["w"] = rng.uniform(0.5, 2.0, len(df))
    df["o"] = rng.normal(0, 0.3, len(df))
    return df


def _peni_responses(df: pd.DataFrame, m: int, seed: int = 11) -> np.ndarray:
    """Crossed responses: plate and sample effects of varying size plus noise."""
    rng = np.random.default_rng(seed)
    pa, sa = df["plate"].cat.codes.to_numpy(), df["sample"].cat.codes.to_numpy()
    Y = np.empty((len(df), m))
    for j in range(m):
        Y[:, j] = (20 + rng.normal(0, 0.4 + 0.2 * j, 24)[pa] + rng.normal(0, 1 + 0.3 * j, 6)[sa]
                   + rng.normal(0, 0.5, len(df)))
    return Y


def _assert_row_matches(row, res, tol_crit=1e-8):
    assert row["criterion"] == pytest.approx(res.criterion, abs=tol_crit)
    assert row["nobs"] == res.nobs and row["REML"] == res.REML
    assert row["sigma"] == pytest.approx(res.sigma, rel=1e-6)
    assert row["singular"] == res.singular and row["converged"] == res.converged
    for nm, v in zip(res.theta_names, res.theta):
        assert row[f"theta:{nm}"] == pytest.approx(v, abs=1e-5)
    for nm in res.fixef.index:
        assert row[f"fixef:{nm}"] == pytest.approx(res.fixef[nm], rel=1e-6, abs=1e-9)
        assert row[f"se:{nm}"] == pytest.approx(res.se[nm], rel=1e-6)


# ----------------------------------------------------------------------------- kernel

def _criterion(k, theta, n, reml, p=2):
    """The kernel's profiled criterion at θ for sleepstudy's design (n = 180, p = 2, no weights):
    its PLS pieces through ``_pls``, as the compiled backend evaluates it."""
    k.update(theta)
    return profiled_criterion(k.ldL2, k.ldRX2, k.pwrss, n, p, reml)


def _kernel_and_two_responses():
    df = datasets.load("sleepstudy")
    m1 = fl.LinearMixedModel("Reaction ~ Days + (Days|Subject)", df)
    m2 = fl.LinearMixedModel("Reaction ~ Days + (Days|Subject)",
                             df.assign(Reaction=np.sqrt(df.Reaction) * 30))
    cp1, cp2 = (CrossProducts.from_structure(m.structure) for m in (m1, m2))
    k = PLSKernel(cp1.Ap, cp1.Ai, cp1.Mx, *kernel_layout(m1.structure), cp1.ZtXy, cp1.XyXy, "default")
    return k, cp1, cp2, m1, m2


def test_set_response_gives_the_new_responses_criterion_and_state():
    k, cp1, cp2, m1, m2 = _kernel_and_two_responses()
    th = np.array([0.9, 0.1, 0.3])
    assert _criterion(k, th, 180, True) == pytest.approx(m1.objective(th), abs=1e-10)
    k.set_response(cp2.ZtXy, cp2.XyXy)
    assert not k.has_state
    with pytest.raises(RuntimeError, match="update"):
        k.state()
    for reml in (True, False):
        m2.REML = reml
        assert _criterion(k, th, 180, reml) == pytest.approx(m2.objective(th), abs=1e-10)
    np.testing.assert_allclose(k.state()["beta"] + cp2.beta_shift, m2.backend.state(th).beta, rtol=1e-12)
    # read-only arrays are accepted (the kernel never writes them)
    ro = cp1.ZtXy.copy(order="F")
    ro.flags.writeable = False
    k.set_response(ro, cp1.XyXy)
    m1.REML = True
    assert _criterion(k, th, 180, True) == pytest.approx(m1.objective(th), abs=1e-10)


def test_set_response_validates_its_arguments():
    k, cp1, cp2, *_ = _kernel_and_two_responses()
    with pytest.raises(ValueError, match="Fortran"):
        k.set_response(np.ascontiguousarray(cp2.ZtXy), cp2.XyXy)
    with pytest.raises(ValueError, match=r"shape \(36, 3\)"):
        k.set_response(cp2.ZtXy[:10], cp2.XyXy)
    with pytest.raises(ValueError, match=r"shape \(3, 3\)"):
        k.set_response(cp2.ZtXy, np.asfortranarray(cp2.XyXy[:2, :2]))
    with pytest.raises(TypeError, match="float64"):
        k.set_response(cp2.ZtXy.astype(np.float32), cp2.XyXy)
    with pytest.raises(TypeError, match="numpy array"):
        k.set_response(cp2.ZtXy.tolist(), cp2.XyXy)
    # a rejected call leaves the old response in place
    th = np.array([0.9, 0.1, 0.3])
    k2 = PLSKernel(cp1.Ap, cp1.Ai, cp1.Mx, *kernel_layout(_kernel_and_two_responses()[3].structure),
                   cp1.ZtXy, cp1.XyXy, "default")
    assert _criterion(k, th, 180, True) == pytest.approx(_criterion(k2, th, 180, True), abs=1e-12)


def test_set_response_releases_old_arrays_and_memory_stays_flat():
    k, cp1, cp2, *_ = _kernel_and_two_responses()
    a, b = cp2.ZtXy.copy(order="F"), cp2.XyXy.copy(order="F")
    ra, rb = sys.getrefcount(a), sys.getrefcount(b)
    k.set_response(a, b)
    assert sys.getrefcount(a) > ra and sys.getrefcount(b) > rb     # kept alive by the kernel
    k.set_response(cp1.ZtXy, cp1.XyXy)
    assert (sys.getrefcount(a), sys.getrefcount(b)) == (ra, rb)    # and released on the next swap
    th = np.array([0.9, 0.1, 0.3])
    for _ in range(200):
        k.set_response(cp2.ZtXy.copy(order="F"), cp2.XyXy.copy(order="F"))
        k.update(th)
    gc.collect()
    before = _rss_mb()
    for i in range(5000):
        src = cp1 if i % 2 else cp2
        k.set_response(src.ZtXy.copy(order="F"), src.XyXy.copy(order="F"))
        k.update(th)
        k.state()
    gc.collect()
    assert _rss_mb() - before < 10.0


# ----------------------------------------------------------------------------- response cross-products

@pytest.mark.parametrize("extra", [{}, {"weights": "w"}, {"offset": "o"}, {"weights": "w", "offset": "o"}])
def test_response_crossproducts_equal_those_of_a_fresh_structure(peni, extra):
    Y = _peni_responses(peni, 3)
    m = fl.LinearMixedModel("diameter" + PENI, peni, **extra)
    cps = response_crossproducts(m.structure, m.backend.crossprod, Y)
    for j, cp in enumerate(cps):
        fresh = fl.LinearMixedModel("y" + PENI, peni.assign(y=Y[:, j]), **extra).backend.crossprod
        np.testing.assert_allclose(cp.ZtXy, fresh.ZtXy, rtol=1e-12, atol=1e-10)
        np.testing.assert_allclose(cp.XyXy, fresh.XyXy, rtol=1e-12, atol=1e-10)
        np.testing.assert_allclose(cp.beta_shift, fresh.beta_shift, rtol=1e-12)
        assert cp.Mx is m.backend.crossprod.Mx and cp.ZtXy.flags.f_contiguous and cp.XyXy.flags.f_contiguous


# ----------------------------------------------------------------------------- refit

@pytest.mark.parametrize("REML", [True, False])
@pytest.mark.parametrize("extra", ["none", "weights", "offset"])
@pytest.mark.parametrize("design", ["sleepstudy", "crossed"])
def test_refit_equals_a_fresh_lmer(sleep, peni, design, REML, extra):
    if design == "sleepstudy":
        df, lhs, rhs, y = sleep, "Reaction", SLEEP, sleep.r2.to_numpy()
    else:
        df, lhs, rhs, y = peni, "diameter", PENI, _peni_responses(peni, 1)[:, 0]
    rng = np.random.default_rng(5)
    kw = {"weights": rng.uniform(0.5, 2.0, len(df))} if extra == "weights" else \
        {"offset": rng.normal(0, 2.0, len(df))} if extra == "offset" else {}
    kw["backend"] = "compiled"        # the shared-kernel check below is about CHOLMOD's analysis
    m = fl.LinearMixedModel(lhs + rhs, df, REML=REML, **kw)
    first = _quiet_lmer(lhs + rhs, df, REML=REML, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = first.refit(y)
        res_m = m.refit(y)
    fresh = _quiet_lmer(lhs + rhs, df.assign(**{lhs: y}), REML=REML, **kw)
    for r in (res, res_m):
        assert r.criterion == pytest.approx(fresh.criterion, abs=1e-10)
        np.testing.assert_allclose(r.fixef, fresh.fixef, rtol=1e-7)
        np.testing.assert_allclose(r.theta, fresh.theta, atol=1e-6)
        assert r.sigma == pytest.approx(fresh.sigma, rel=1e-7)
        np.testing.assert_allclose(r.fitted(), fresh.fitted(), rtol=1e-7)
    assert res.model.backend.kernel is first.model.backend.kernel        # the analysis is shared


@pytest.mark.parametrize("backend", ["blocked", "reference", "single"])
def test_refit_other_backends(sleep, backend):
    m = fl.LinearMixedModel("Reaction" + SLEEP, sleep, backend=backend)
    res = m.refit(sleep.r4.to_numpy())
    fresh = fl.lmer("r4" + SLEEP, sleep, backend=backend)
    assert res.criterion == pytest.approx(fresh.criterion, abs=1e-9)
    np.testing.assert_allclose(res.fixef, fresh.fixef, rtol=1e-7)


def test_models_sharing_a_kernel_stay_independent(sleep):
    m = fl.LinearMixedModel("Reaction" + SLEEP, sleep)
    res0 = m.fit()
    res1 = res0.refit(sleep.r2.to_numpy())
    res2 = res1.refit(sleep.r4.to_numpy())
    th = np.array([0.8, 0.05, 0.2])
    want = [fl.LinearMixedModel(f"{c}{SLEEP}", sleep).objective(th) for c in ("Reaction", "r2", "r4")]
    for _ in range(2):      # in any order, each model evaluates its own response
        for r, w in zip((res2, res0, res1), (want[2], want[0], want[1])):
            assert r.model.objective(th) == pytest.approx(w, abs=1e-10)
    # quantities computed later from the shared kernel belong to the right response
    fresh1 = fl.lmer("r2" + SLEEP, sleep)
    for term, cv in res1.condvar.items():
        np.testing.assert_allclose(cv, fresh1.condvar[term], rtol=1e-6)
    assert res0.model.objective(res0.theta) == pytest.approx(res0.criterion, abs=1e-10)


def test_refit_rejects_bad_responses(sleep):
    m = fl.LinearMixedModel("Reaction" + SLEEP, sleep)
    y = sleep.r2.to_numpy()
    with pytest.raises(fl.DataError, match="length 179"):
        m.refit(y[:-1])
    with pytest.raises(fl.DataError, match="missing or infinite"):
        m.refit(np.where(np.arange(180) == 3, np.nan, y))
    with pytest.raises(fl.DataError, match="missing or infinite"):
        m.refit(np.where(np.arange(180) == 3, np.inf, y))
    with pytest.raises(fl.DataError, match="exact linear function"):
        m.refit(3.0 + 2.0 * sleep.Days.to_numpy())


# ----------------------------------------------------------------------------- fit_many

def test_fit_many_equals_lmer_on_each_response(sleep):
    names = ["r1", "r2", "r3", "r4", "r5", "Reaction"]
    before = sleep.copy()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fl.fit_many("Reaction" + SLEEP, sleep, names)      # the left-hand side is ignored
    pd.testing.assert_frame_equal(sleep, before)                  # the data are not touched
    th = ["Subject.(Intercept)", "Subject.Days.(Intercept)", "Subject.Days"]
    assert list(out.columns) == (["response", "nobs", "criterion", "REML", "sigma", "converged", "singular"]
                                 + [f"theta:{t}" for t in th] + ["fixef:(Intercept)", "fixef:Days",
                                                                 "se:(Intercept)", "se:Days", "messages"])
    assert out.response.tolist() == names
    assert out.dtypes["nobs"] == np.int64 and out.dtypes["REML"] == bool and out.dtypes["singular"] == bool
    for i, nm in enumerate(names):
        _assert_row_matches(out.iloc[i], _quiet_lmer(nm + SLEEP, sleep))
    # the response with missing values used its own complete rows
    assert out.nobs.tolist() == [180] * 4 + [177, 180]
    assert "177 complete rows" in out.messages[4]
    # r3 has no subject effect: singular, reported once for the whole call
    assert out.singular.tolist() == [False, False, True, False, False, False]
    assert "boundary (singular) fit" in out.messages[2]
    sing = [w for w in caught if issubclass(w.category, fl.SingularFitWarning)]
    assert len(sing) == 1 and str(sing[0].message).startswith("1 of 6 fits were singular")


def test_fit_many_crossed_design_array_responses_weights_offset_ML(peni):
    Y = _peni_responses(peni, 4)
    out = fl.fit_many(PENI, peni, Y, REML=False, weights="w", offset=peni.o.to_numpy())
    assert out.response.tolist() == ["y1", "y2", "y3", "y4"]
    assert not out.REML.any()
    for j in range(4):
        res = _quiet_lmer("y" + PENI, peni.assign(y=Y[:, j]), REML=False, weights="w",
                          offset=peni.o.to_numpy())
        _assert_row_matches(out.iloc[j], res)


def test_fit_many_dataframe_responses_fit_options_and_blocked_backend(peni):
    Y = pd.DataFrame(_peni_responses(peni, 3, seed=2), columns=["a", "b", "c"], index=peni.index)
    out = fl.fit_many(PENI, peni, Y, backend="blocked", optimizer="nelder_mead", check_conv=False)
    assert out.response.tolist() == ["a", "b", "c"]
    for j, nm in enumerate(Y.columns):
        res = _quiet_lmer("y" + PENI, peni.assign(y=Y[nm]), backend="blocked", optimizer="nelder_mead",
                          check_conv=False)
        _assert_row_matches(out.iloc[j], res)


def test_fit_many_in_two_processes_equals_serial_and_lmer(sleep):
    rng = np.random.default_rng(21)
    Y = sleep.Reaction.to_numpy()[:, None] + rng.normal(0, 30, (180, 12))
    Y[10, 3] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        par = fl.fit_many(SLEEP, sleep, Y, n_jobs=2)
        ser = fl.fit_many(SLEEP, sleep, Y)
    pd.testing.assert_frame_equal(par, ser)
    for j in (0, 3, 11):
        _assert_row_matches(par.iloc[j], _quiet_lmer("y" + SLEEP, sleep.assign(y=Y[:, j])))


def test_fit_many_on_a_dask_cluster(sleep):
    from distributed import Client, LocalCluster
    Y = sleep[["r1", "r2", "r4", "r5"]]
    with pytest.raises(ValueError, match="running dask.distributed Client"):
        fl.fit_many(SLEEP, sleep, ["r1"], client="auto")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ser = fl.fit_many(SLEEP, sleep, Y)
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                          dashboard_address=None) as cluster, Client(cluster) as client:
            dist = fl.fit_many(SLEEP, sleep, Y, client=client)
            auto = fl.fit_many(SLEEP, sleep, Y, client="auto")
    pd.testing.assert_frame_equal(dist, ser)
    pd.testing.assert_frame_equal(auto, ser)
    _assert_row_matches(dist.iloc[3], _quiet_lmer("r5" + SLEEP, sleep))


def test_fit_many_without_dask_says_how_to_install_it(sleep, monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)      # import distributed -> ImportError
    with pytest.raises(ImportError, match=r"fastlmm_ext\[dask\]"):
        fl.fit_many(SLEEP, sleep, ["r1"], client="auto")


def test_fit_many_n_jobs_minus_one_means_all_cores():
    import os

    from fastlmm_ext._many import _n_workers
    assert _n_workers(-1, None) == (os.cpu_count() or 1)


def test_fit_many_missing_design_rows_dropped_once(sleep):
    df = sleep.copy()
    df.loc[[0, 1], "Days"] = np.nan
    df.loc[[1, 2, 3], "r2"] = np.nan                 # row 1 is dropped by the design already
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fl.fit_many(SLEEP, df, ["r1", "r2"])
    assert len([w for w in caught if issubclass(w.category, fl.MissingValuesWarning)]) == 1
    assert out.nobs.tolist() == [178, 176]
    for i, nm in enumerate(["r1", "r2"]):
        _assert_row_matches(out.iloc[i], _quiet_lmer(nm + SLEEP, df))


def test_fit_many_records_a_failed_fit(sleep):
    df = sleep.assign(lin=3.0 + 2.0 * sleep.Days)
    with pytest.warns(RuntimeWarning, match="1 of 2 fits failed"):
        out = fl.fit_many(SLEEP, df, ["lin", "r1"])
    assert np.isnan(out.criterion[0]) and np.isnan(out["fixef:Days"][0]) and not out.converged[0]
    assert out.messages[0].startswith("error: DataError") and "exact linear function" in out.messages[0]
    _assert_row_matches(out.iloc[1], _quiet_lmer("r1" + SLEEP, df))


def test_fit_many_rejects_bad_inputs(sleep):
    with pytest.raises(fl.MissingColumnError, match="'nope'"):
        fl.fit_many(SLEEP, sleep, ["r1", "nope"])
    with pytest.raises(fl.DataError, match="'Subject' must be numeric"):
        fl.fit_many(SLEEP, sleep, ["r1", "Subject"])
    with pytest.raises(fl.DataError, match="empty"):
        fl.fit_many(SLEEP, sleep, [])
    with pytest.raises(fl.DataError, match="empty"):
        fl.fit_many(SLEEP, sleep, np.zeros((180, 0)))
    with pytest.raises(fl.DataError, match="has 3 rows but data has 180"):
        fl.fit_many(SLEEP, sleep, np.ones((3, 180)))
    with pytest.raises(fl.DataError, match="must be 2-D"):
        fl.fit_many(SLEEP, sleep, np.ones(180))
    with pytest.raises(fl.DataError, match="numeric"):
        fl.fit_many(SLEEP, sleep, np.full((180, 2), "a"))
    with pytest.raises(fl.DataError, match="infinite"):
        fl.fit_many(SLEEP, sleep, np.full((180, 2), np.inf))
    with pytest.raises(fl.DataError, match="index of data"):
        fl.fit_many(SLEEP, sleep, pd.DataFrame({"a": sleep.r1.to_numpy()}, index=sleep.index + 1))
    with pytest.raises(TypeError, match="column names"):
        fl.fit_many(SLEEP, sleep, [1, 2])
    with pytest.raises(fl.FormulaError, match="'~'"):
        fl.fit_many("Days + (Days|Subject)", sleep, ["r1"])
    with pytest.raises(ValueError, match="n_jobs"):
        fl.fit_many(SLEEP, sleep, ["r1"], n_jobs=0)
    with pytest.raises(ValueError, match="not both"):
        fl.fit_many(SLEEP, sleep, ["r1"], n_jobs=2, client="auto")
    with pytest.raises(ValueError, match="'auto'"):
        fl.fit_many(SLEEP, sleep, ["r1"], client="local")
    with pytest.raises(TypeError, match="invalid fit option"):
        fl.fit_many(SLEEP, sleep, ["r1"], optimiser="bobyqa")
    with pytest.raises(ValueError, match="unknown backend"):
        fl.fit_many(SLEEP, sleep, ["r1"], backend="gpu")
