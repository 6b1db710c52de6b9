"""The sparse Gram kernels of the two-block path against dense NumPy products."""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

from fastlmm_ext._gram import gram_inner, gram_inner_sym, gram_lower_update


def _both(A: sp.spmatrix):
    r = A.tocsr()
    r.sort_indices()
    c = A.tocsc()
    c.sort_indices()
    i32 = lambda a: a.astype(np.int32)  # noqa: E731
    return (i32(r.indptr), i32(r.indices), r.data), (i32(c.indptr), i32(c.indices), c.data)


@settings(max_examples=60, deadline=None)
@given(q=st.integers(1, 40), m=st.integers(1, 60), density=st.floats(0.0, 0.6), seed=st.integers(0, 2**31 - 1),
       alpha=st.floats(-2.0, 2.0))
def test_gram_kernels_equal_dense_products(q, m, density, seed, alpha):
    rng = np.random.default_rng(seed)
    A = sp.random(q, m, density=density, random_state=rng, format="csr")
    B = sp.random(q, m, density=density, random_state=rng, format="csr")
    w = rng.uniform(0.1, 3.0, m)
    S0 = rng.normal(size=(q, q))
    Ssym = np.asfortranarray(S0 + S0.T)
    (rp, ri, rx), (cp, ci, cx) = _both(A)
    P = (A @ sp.diags(w) @ A.T).toarray()

    S = np.asfortranarray(S0.copy())
    gram_lower_update(S, rp, ri, rx, cp, ci, cx, w, alpha)
    expect = S0 + alpha * np.tril(P)
    np.testing.assert_allclose(np.tril(S), np.tril(expect), rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(np.triu(S, 1), np.triu(S0, 1))          # upper triangle untouched

    lower_only = np.asfortranarray(np.tril(Ssym) + np.triu(rng.normal(size=(q, q)), 1))   # junk above
    np.testing.assert_allclose(gram_inner_sym(lower_only, rp, ri, rx, cp, ci, cx, w), np.sum(Ssym * P),
                               rtol=1e-11, atol=1e-11)
    (brp, bri, brx), _ = _both(B)
    got = gram_inner(Ssym, cp, ci, cx, brp, bri, brx, w)
    np.testing.assert_allclose(got, np.sum(Ssym * (A @ sp.diags(w) @ B.T).toarray()), rtol=1e-11, atol=1e-11)
