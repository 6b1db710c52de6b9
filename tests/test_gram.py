"""The sparse kernels of the two-block path against dense NumPy on random inputs, and the
blocked backend built on them against the compiled one on a Schur block of several panels."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

import fastlmm_ext as fl
from fastlmm_ext._gram import inverse_gram, schur_lower


def _i32(a: np.ndarray) -> np.ndarray:
    return a.astype(np.int32)


def _csc(A: sp.spmatrix):
    c = sp.csc_matrix(A)
    c.sort_indices()
    return _i32(c.indptr), _i32(c.indices), c.data


@settings(max_examples=60, deadline=None)
@given(q=st.integers(1, 50), m=st.integers(0, 60), density=st.floats(0.0, 0.6),
       mdensity=st.floats(0.0, 0.5), seed=st.integers(0, 2**31 - 1))
def test_schur_lower_equals_dense(q, m, density, mdensity, seed):
    """Lower triangle of I + Λ M Λ − A Aᵀ; the upper triangle keeps what it held."""
    rng = np.random.default_rng(seed)
    A = sp.random(q, m, density=density, random_state=rng, format="csr")
    A.sort_indices()
    Ml = sp.tril(sp.random(q, q, density=mdensity, random_state=rng)).tocsc()
    Ml.sort_indices()
    lam = rng.uniform(0.0, 2.0, q) * (rng.uniform(size=q) > 0.1)           # some λ = 0
    S0 = np.asfortranarray(rng.normal(size=(q, q)))
    S = S0.copy(order="F")
    cp, ci, cx = _csc(A)
    schur_lower(S, lam, _i32(Ml.indptr), _i32(Ml.indices), Ml.data, _i32(A.indptr), _i32(A.indices),
                cp, ci, cx)
    M = (Ml + sp.tril(Ml, -1).T).toarray()
    want = np.eye(q) + lam[:, None] * M * lam[None, :] - (A @ A.T).toarray()
    scale = 1.0 + np.abs(want).max()
    np.testing.assert_allclose(np.tril(S), np.tril(want), rtol=0, atol=1e-13 * scale)
    np.testing.assert_array_equal(np.triu(S, 1), np.triu(S0, 1))


def _grouped(rng, q: int, nlev: int, k: int, density: float, shared: bool) -> sp.csc_matrix:
    """q × nlev·k; with ``shared`` the k columns of a group have the same rows (L₂₁'s pattern)."""
    if shared:
        P = sp.random(q, nlev, density=density, random_state=rng, format="csc")
        rows, grp = P.nonzero()
        r = np.repeat(rows, k)
        c = (np.repeat(grp, k) * k + np.tile(np.arange(k), rows.size))
        return sp.csc_matrix((rng.normal(size=r.size), (r, c)), shape=(q, nlev * k))
    return sp.random(q, nlev * k, density=density, random_state=rng, format="csc",
                     data_rvs=rng.standard_normal)


@settings(max_examples=60, deadline=None)
@given(q=st.integers(1, 110), nlev=st.integers(1, 25), k=st.integers(1, 3), density=st.floats(0.0, 0.5),
       shared=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_inverse_gram_equals_dense(q, nlev, k, density, shared, seed):
    """Y[a] = (Li A_a)ᵀ (Li A_a) per group of k columns and d = diag(Liᵀ Li), Li lower triangular
    (what lies above its diagonal is not read); q up to 110 spans several row panels."""
    rng = np.random.default_rng(seed)
    A = _grouped(rng, q, nlev, k, density, shared)
    Li = np.asfortranarray(rng.normal(size=(q, q)))                         # junk above the diagonal
    cp, ci, cx = _csc(A)
    Y, d = inverse_gram(Li, cp, ci, cx, k)
    Lt = np.tril(Li)
    W = (Lt @ A.toarray()).reshape(q, nlev, k)
    want = np.einsum("rai,raj->aij", W, W)
    np.testing.assert_allclose(Y, want, rtol=0, atol=1e-12 * (1.0 + np.abs(want).max()))
    np.testing.assert_allclose(d, (Lt ** 2).sum(axis=0), rtol=1e-13, atol=0)


@settings(max_examples=40, deadline=None)
@given(q=st.integers(1, 110), nlev=st.integers(1, 25), k=st.integers(1, 3), density=st.floats(0.0, 0.5),
       threads=st.integers(2, 5), seed=st.integers(0, 2**31 - 1))
def test_inverse_gram_threads_exact(q, nlev, k, density, threads, seed):
    """Split over threads, every group's Y_a is still summed by one thread in the same order:
    the result equals the one-thread result exactly (more threads than groups included), and
    the dense computation."""
    rng = np.random.default_rng(seed)
    A = _grouped(rng, q, nlev, k, density, True)
    Li = np.asfortranarray(rng.normal(size=(q, q)))
    cp, ci, cx = _csc(A)
    Y1, d1 = inverse_gram(Li, cp, ci, cx, k, 1)
    Yn, dn = inverse_gram(Li, cp, ci, cx, k, threads)
    np.testing.assert_array_equal(Yn, Y1)
    np.testing.assert_array_equal(dn, d1)
    W = (np.tril(Li) @ A.toarray()).reshape(q, nlev, k)
    want = np.einsum("rai,raj->aij", W, W)
    np.testing.assert_allclose(Yn, want, rtol=0, atol=1e-12 * (1.0 + np.abs(want).max()))


@pytest.mark.parametrize("formula, theta", [("y ~ x + (1|g1) + (1|g2)", [0.8, 0.5]),
                                            ("y ~ x + (x|g1) + (1|g2)", [0.9, 0.2, 0.6, 0.5])])
def test_inverse_gram_threads_on_a_crossed_design(formula, theta):
    """On a crossed design of several panels and uneven levels: the kernel on the blocked
    backend's L₂₂⁻¹ and L₂₁ gives the same Y and d at 1, 2 and 3 threads, bit for bit; the
    gradient of a fit at two threads (threaded LAPACK too, which rounds differently) agrees with
    the one at one thread to rounding, and with the compiled backend's."""
    import scipy.linalg as la
    from fastlmm_ext._threads import fit_threads
    df = _crossed(3, 4000, 300, 150)
    m = fl.LinearMixedModel(formula, df, backend="blocked")
    be, theta = m.backend, np.array(theta)
    f = be._factor(theta)
    Li = la.lapack.dtrtri(np.asfortranarray(f["L22"]), lower=1)[0]
    Y1, d1 = inverse_gram(Li, be._cp, be._ci, f["L21c"], be.k, 1)
    for n in (2, 3):
        Yn, dn = inverse_gram(Li, be._cp, be._ci, f["L21c"], be.k, n)
        np.testing.assert_array_equal(Yn, Y1)
        np.testing.assert_array_equal(dn, d1)
    g = {}
    for n in (1, 2):
        b = be.with_response(m.structure, be.crossprod)
        with fit_threads(n):
            g[n] = b.gradient(theta, True)
    want = fl.LinearMixedModel(formula, df, backend="compiled").backend.gradient(theta, True)
    np.testing.assert_allclose(g[2], g[1], rtol=1e-9, atol=1e-9 * np.abs(g[1]).max())
    np.testing.assert_allclose(g[2], want, rtol=1e-7, atol=1e-7 * np.abs(want).max())


def _crossed(seed: int, n: int, l1: int, l2: int):
    rng = np.random.default_rng(seed)
    g1, g2 = rng.integers(0, l1, n), rng.integers(0, l2, n)
    x = rng.normal(size=n)
    y = 1 + 0.5 * x + rng.normal(0, 1, l1)[g1] + rng.normal(0, 0.7, l1)[g1] * x + rng.normal(0, 0.5, l2)[g2] \
        + rng.normal(size=n)
    return pd.DataFrame({"y": y, "x": x, "g1": pd.Categorical(g1), "g2": pd.Categorical(g2)})


@pytest.mark.parametrize("formula", ["y ~ x + (1|g1) + (1|g2)", "y ~ x + (x|g1) + (1|g2)"])
@pytest.mark.parametrize("reml", [True, False])
def test_blocked_matches_compiled_on_a_large_schur_block(formula, reml):
    """q₂ = 150 later levels (five row panels of the inverse kernel): the blocked criterion,
    gradient and conditional-variance blocks equal the compiled (CHOLMOD, selected inverse) ones."""
    df = _crossed(3, 4000, 400, 150)
    mb = fl.LinearMixedModel(formula, df, REML=reml, backend="blocked")
    mc = fl.LinearMixedModel(formula, df, REML=reml, backend="compiled")
    assert mb.backend.q2 == 150
    theta = np.array([0.8, 0.3]) if mb.lower.size == 2 else np.array([1.1, 0.2, 0.4, 0.6])
    assert mb.objective(theta) == pytest.approx(mc.objective(theta), rel=1e-11)
    gb, gc = mb.backend.gradient(theta, reml), mc.backend.gradient(theta, reml)
    np.testing.assert_allclose(gb, gc, rtol=1e-7, atol=1e-7 * np.abs(gc).max())
    for i in range(2):
        want = mc.backend.inverse_blocks(theta, i)
        np.testing.assert_allclose(mb.backend.inverse_blocks(theta, i), want, rtol=1e-9,
                                   atol=1e-12 * np.abs(want).max())


def test_simd_variant_is_the_cpus():
    """The Gram loops' variant is AVX2 + FMA exactly where the CPU has both (x86-64), else the baseline."""
    from fastlmm_ext import _gram
    import platform
    assert _gram.SIMD_VARIANT in (0, 1)
    if platform.machine() in ("x86_64", "AMD64"):
        try:
            flags = open("/proc/cpuinfo").read().split()
        except OSError:
            return
        assert _gram.SIMD_VARIANT == int("avx2" in flags and "fma" in flags)
    else:
        assert _gram.SIMD_VARIANT == 0
