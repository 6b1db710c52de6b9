"""Sparse selected inverse of the kernel's factor: diag and per-level blocks of (A + I)⁻¹.

Checked against the dense inverse of A + I, A = ΛᵀZᵀWZΛ built from ``model.structure``, on
simplicial and supernodal CHOLMOD factors and every ordering.
"""
from __future__ import annotations

import gc
import os
import threading

import numpy as np
import pandas as pd
import pytest

import fastlmm_ext as fl
from conftest import REFERENCE
from fastlmm_ext import datasets
from fastlmm_ext._backends import _blocks_by_solves
from fastlmm_ext._crossprod import CrossProducts, kernel_layout
from fastlmm_ext import _selinv
from fastlmm_ext._kernel import PLSKernel

TOL = 1e-10
INSTEVAL = REFERENCE / "InstEval.csv.gz"



def cholmod_model(*args, **kw) -> fl.LinearMixedModel:
    """These tests are about the CHOLMOD kernel: never let backend='auto' pick the blocked path."""
    return fl.LinearMixedModel(*args, backend="compiled", **kw)


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        pages = int(fh.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _dense_inverse(s, theta):
    ZL = (s.Z @ s.Lambda(theta)).toarray()
    if s.weights is not None:
        ZL = ZL * np.sqrt(np.asarray(s.weights, dtype=float))[:, None]
    return np.linalg.inv(ZL.T @ ZL + np.eye(s.q))


def _rel(a, b):
    return np.abs(a - b).max() / max(np.abs(b).max(), 1e-300)


def _check(model, theta, kernel=None):
    """Compare inverse_diag and every term's inverse_blocks with the dense inverse; return factor_info."""
    s = model.structure
    k = kernel if kernel is not None else model.backend.kernel
    theta = np.ascontiguousarray(theta, dtype=float)
    k.update(theta)
    Ainv = _dense_inverse(s, theta)
    d = _selinv.inverse_diag(k)
    assert d.shape == (s.q,)
    assert _rel(d, np.diag(Ainv)) < TOL
    for t in s.terms:
        B = _selinv.inverse_blocks(k, t.col_offset, t.k, t.nlevels)
        assert B.shape == (t.nlevels, t.k, t.k)
        idx = t.col_offset + np.arange(t.nlevels)[:, None] * t.k + np.arange(t.k)[None, :]
        want = Ainv[idx[:, :, None], idx[:, None, :]]
        assert _rel(B, want) < TOL, t.name
    return k.factor_info


def _crossed(n, la, lb, seed=1, slope=False):
    return datasets.simulate_crossed(n, la, lb, seed=seed, slope_sd=0.3 if slope else 0.0)


def _nested(n, la, per, seed=2):
    return datasets.simulate_nested(n, la, per, seed=seed)


SEEN_SUPER = set()


@pytest.mark.parametrize("ordering", ["default", "amd", "natural"])
def test_single_scalar_term(ordering):
    df = _crossed(400, 30, 5)
    m = cholmod_model("y ~ x + (1|a)", df, ordering=ordering)
    for th in ([1.0], [0.37], [0.0], [5.0]):
        SEEN_SUPER.add(_check(m, th)["is_super"])


@pytest.mark.parametrize("ordering", ["default", "natural"])
def test_vector_term(ordering):
    df = _crossed(600, 40, 5, slope=True)
    m = cholmod_model("y ~ x + (x|a)", df, ordering=ordering)
    for th in ([1.0, 0.0, 1.0], [0.8, -0.4, 0.3], [0.5, 0.2, 0.0]):
        SEEN_SUPER.add(_check(m, th)["is_super"])


@pytest.mark.parametrize("ordering", ["default", "amd", "natural"])
def test_crossed_many_levels_supernodal(ordering):
    df = _crossed(20_000, 1_200, 250)
    m = cholmod_model("y ~ x + (1|a) + (1|b)", df, ordering=ordering)
    info = _check(m, [0.9, 0.45])
    assert info["is_super"]
    SEEN_SUPER.add(info["is_super"])
    _check(m, [0.2, 1.7])


def test_crossed_vector_and_scalar_supernodal():
    df = _crossed(8_000, 300, 120, slope=True)
    m = cholmod_model("y ~ x + (x|a) + (1|b)", df)
    info = _check(m, [0.9, -0.3, 0.4, 0.6])
    SEEN_SUPER.add(info["is_super"])
    _check(m, [0.0, 0.0, 0.4, 0.6])      # a degenerate first term: Λ columns of zeros


def test_crossed_small_simplicial():
    df = _crossed(300, 12, 6)
    m = cholmod_model("y ~ x + (1|a) + (1|b)", df)
    info = _check(m, [0.9, 0.45])
    assert not info["is_super"]
    SEEN_SUPER.add(info["is_super"])


@pytest.mark.parametrize("size", ["small", "large"])
def test_nested(size):
    df = _nested(600, 20, 4) if size == "small" else _nested(12_000, 300, 4)
    m = cholmod_model("y ~ 1 + (1|a/c)", df)
    assert len(m.structure.terms) == 2
    SEEN_SUPER.add(_check(m, [1.3, 0.7])["is_super"])
    _check(m, [0.1, 2.0])


def test_sleepstudy():
    m = cholmod_model("Reaction ~ Days + (Days|Subject)", datasets.load("sleepstudy"))
    for th in ([0.9667, 0.0152, 0.2309], [1.0, 0.0, 1.0], [2.0, -1.0, 0.5]):
        SEEN_SUPER.add(_check(m, th)["is_super"])
    m2 = cholmod_model("Reaction ~ Days + (1|Subject) + (0 + Days|Subject)", datasets.load("sleepstudy"))
    SEEN_SUPER.add(_check(m2, [0.9, 0.25])["is_super"])


def test_weighted():
    df = _crossed(5_000, 400, 80)
    w = np.random.default_rng(3).uniform(0.2, 3.0, len(df))
    m = cholmod_model("y ~ x + (1|a) + (1|b)", df, weights=w)
    SEEN_SUPER.add(_check(m, [0.9, 0.45])["is_super"])


def test_both_factor_kinds_covered():
    assert SEEN_SUPER == {True, False}


def test_matches_solve_based_blocks():
    """The selected inverse's blocks, also through the backend, equal the blocks from triangular
    solves with the factor (L X = P E; the test compared the backend with the kernel it calls)."""
    df = _crossed(6_000, 500, 100, slope=True)
    m = cholmod_model("y ~ x + (x|a) + (1|b)", df)
    th = np.array([0.7, 0.2, 0.5, 0.8])
    k = m.backend.kernel
    for i, t in enumerate(m.structure.terms):
        k.update(th)
        want = _blocks_by_solves(m.structure, i, k.solve_L)
        assert _rel(_selinv.inverse_blocks(k, t.col_offset, t.k, t.nlevels), want) < TOL
        assert _rel(m.backend.inverse_blocks(th, i), want) < TOL


def test_cache_follows_update():
    """The cached selected inverse belongs to the factor of the last update()."""
    df = _crossed(5_000, 300, 60)
    m = cholmod_model("y ~ x + (1|a) + (1|b)", df)
    k, s = m.backend.kernel, m.structure
    th1, th2 = np.array([0.9, 0.45]), np.array([0.3, 1.2])
    k.update(th1)
    d1 = _selinv.inverse_diag(k)
    k.update(th2)
    d2 = _selinv.inverse_diag(k)
    assert _rel(d2, np.diag(_dense_inverse(s, th2))) < TOL
    k.update(th1)
    assert np.array_equal(_selinv.inverse_diag(k), d1)
    assert np.array_equal(_selinv.inverse_diag(k), d1)   # reused


def test_errors():
    m = cholmod_model("Reaction ~ Days + (Days|Subject)", datasets.load("sleepstudy"))
    cp = CrossProducts.from_structure(m.structure)
    k = PLSKernel(cp.Ap, cp.Ai, cp.Mx, *kernel_layout(m.structure), cp.ZtXy, cp.XyXy, "default")
    with pytest.raises(RuntimeError, match="update"):
        _selinv.inverse_diag(k)
    with pytest.raises(RuntimeError, match="update"):
        _selinv.inverse_blocks(k, 0, 2, 18)
    k.update(np.array([1.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match="outside"):
        _selinv.inverse_blocks(k, 0, 2, 19)
    with pytest.raises(ValueError, match="outside"):
        _selinv.inverse_blocks(k, -1, 1, 1)
    with pytest.raises(ValueError, match="outside"):
        _selinv.inverse_blocks(k, 0, 0, 1)
    assert _selinv.inverse_blocks(k, 0, 2, 0).shape == (0, 2, 2)


def test_no_memory_growth():
    df = _crossed(5_000, 300, 200)
    m = cholmod_model("y ~ x + (1|a) + (1|b)", df)
    m2 = cholmod_model("Reaction ~ Days + (Days|Subject)", datasets.load("sleepstudy"))
    k, k2 = m.backend.kernel, m2.backend.kernel
    assert k.factor_info["is_super"] and not k2.factor_info["is_super"]

    def work(reps):
        for i in range(reps):
            k.update(np.array([0.9, 0.45 + 1e-3 * (i % 5)]))
            _selinv.inverse_diag(k)
            _selinv.inverse_blocks(k, 0, 1, 300)
            k2.update(np.array([0.9, 0.1 + 1e-3 * (i % 5), 0.3]))
            _selinv.inverse_blocks(k2, 0, 2, 18)
    work(100)
    gc.collect()
    before = _rss_mb()
    work(2_000)
    gc.collect()
    assert _rss_mb() - before < 15.0


def test_threads_give_same_values():
    df = _crossed(8_000, 600, 100)
    models = [cholmod_model("y ~ x + (1|a) + (1|b)", df) for _ in range(2)]
    th = np.array([0.8, 0.6])
    models[0].backend.kernel.update(th)
    want = _selinv.inverse_diag(models[0].backend.kernel)
    out = [None, None]

    def work(i):
        kk = models[i].backend.kernel
        for j in range(20):
            kk.update(th * (1 + 1e-3 * (j % 2)))
            kk.update(th)
            out[i] = _selinv.inverse_diag(kk)
    ts = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    assert np.array_equal(out[0], want) and np.array_equal(out[1], want)


@pytest.mark.parametrize("nb", [1, 2, 3, 7])
def test_narrow_panels(nb):
    """Wide supernodes are swept in panels; tiny panel widths exercise every panel branch."""
    old = _selinv._selinv_options(nb=nb)
    try:
        df = _crossed(8_000, 300, 120, slope=True)
        m = cholmod_model("y ~ x + (x|a) + (1|b)", df)
        assert _check(m, [0.9, -0.3, 0.4, 0.6])["is_super"]
        m2 = cholmod_model("Reaction ~ Days + (Days|Subject)", datasets.load("sleepstudy"))
        _check(m2, [0.9667, 0.0152, 0.2309])
    finally:
        _selinv._selinv_options(nb=old[0])


def test_scipy_blas_fallback():
    """The large products use CHOLMOD's BLAS when found, SciPy's otherwise: both agree."""
    assert _selinv.selinv_blas() in ("cholmod", "scipy")
    df = _crossed(20_000, 1_200, 250)
    m = cholmod_model("y ~ x + (1|a) + (1|b)", df)
    k = m.backend.kernel
    th = np.array([0.9, 0.45])
    k.update(th)
    d1 = _selinv.inverse_diag(k)
    old = _selinv._selinv_options(blas="scipy")
    try:
        assert _selinv.selinv_blas() == "scipy"
        d2 = _selinv.inverse_diag(k)            # option change invalidates the cache
        assert _check(m, th)["is_super"]
    finally:
        _selinv._selinv_options(blas=old[1])
    assert _rel(d2, d1) < 1e-13
    with pytest.raises(ValueError):
        _selinv._selinv_options(blas="mkl")
    with pytest.raises(ValueError):
        _selinv._selinv_options(nb=0)


def test_insteval_blocks_match_solves():
    """On the real InstEval factor (supernodal, q = 4128) the selected inverse equals the blocks
    obtained by triangular solves for the dept:service term."""
    df = pd.read_csv(INSTEVAL, usecols=["s", "d", "dept", "service", "y"])
    for col in ("s", "d", "dept", "service"):
        df[col] = pd.Categorical(df[col])
    m = cholmod_model("y ~ 1 + service + (1|s) + (1|d) + (1|dept:service)", df)
    th = np.array([0.3242, 0.5120, 0.3837])   # near the REML optimum
    k, t2 = m.backend.kernel, m.structure.terms[2]
    k.update(th)
    assert k.factor_info["is_super"]
    want = _blocks_by_solves(m.structure, 2, k.solve_L, 20_000_000)
    assert _rel(_selinv.inverse_blocks(k, t2.col_offset, t2.k, t2.nlevels), want) < TOL


@pytest.mark.parametrize("formula", ["y ~ x + (1|a)", "y ~ x + (1 + x|a)", "y ~ x + (1 + x + z|a)"])
def test_single_term_closed_form_equals_selected_inverse(formula):
    """One term: the gradient sums the k×k inverses of Tᵀ M_l T + I directly (closed form for
    k ≤ 2); they equal the diagonal blocks of the selected inverse of the CHOLMOD factor."""
    df = datasets.simulate_crossed(6000, 500, 2, seed=4, slope_sd=0.5)
    df["z"] = np.random.default_rng(1).normal(size=len(df))
    m = cholmod_model(formula, df)
    theta = m.theta0 * 0.8 + 0.05
    t = m.structure.terms[0]
    m.backend._factor(theta)
    selinv = _selinv.inverse_blocks(m.backend.kernel, t.col_offset, t.k, t.nlevels).sum(axis=0)
    np.testing.assert_allclose(m.backend._single_term_inverse_sum(t, theta), selinv, rtol=1e-12, atol=1e-12)
