"""The design (``_design``, and the interaction levels of ``_data``): Z, the terms and their
order, grouping codes and labels, the rank rule, evaluate_rows on new rows (``_newdata``) —
against hand-built matrices, lme4's conventions and the reference fits."""
from __future__ import annotations

import pickle

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fastlmm_ext as fl
from fastlmm_ext._data import combine_factors, interaction_labels, recode_combinations
from fastlmm_ext._design import _group_codes, basis_rows, build_structure, independent_columns, rank_deficient_keep
from fastlmm_ext._newdata import new_rows, selected_terms

DF = pd.DataFrame({
    "y": [1.0, 2.5, 0.3, 4.1, 2.2, 3.3, 1.7, 0.9, 2.8, 3.9],
    "x": [0.5, -1.0, 2.0, 0.1, 1.5, -0.3, 0.8, 1.1, -2.0, 0.4],
    "g": ["b", "a", "b", "c", "a", "c", "b", "a", "c", "a"],
    "h": ["u", "v", "u", "u", "v", "v", "u", "v", "u", "v"],
})


def test_Z_and_terms_by_hand():
    """(x|g) + (1|h): terms sorted by decreasing levels (g: 3, h: 2), Z_g has columns level by
    level (1, x) and Z_h the indicators of h; θ offsets follow."""
    s = build_structure("y ~ x + (1|h) + (x|g)", DF)
    assert [t.factor for t in s.terms] == ["g", "h"]
    g, h = s.terms
    assert g.levels == ("a", "b", "c") and h.levels == ("u", "v")
    assert (g.col_offset, g.theta_offset, h.col_offset, h.theta_offset) == (0, 0, 6, 3)
    want = np.zeros((10, 8))
    for r, (x, gl, hl) in enumerate(zip(DF.x, DF.g, DF.h)):
        a = "abc".index(gl)
        want[r, 2 * a], want[r, 2 * a + 1] = 1.0, x
        want[r, 6 + "uv".index(hl)] = 1.0
    np.testing.assert_array_equal(s.Z.toarray(), want)
    np.testing.assert_array_equal(s.X, np.column_stack([np.ones(10), DF.x]))
    assert s.fixef_names == ("(Intercept)", "x") and s.theta_names == ["g.(Intercept)", "g.x.(Intercept)", "g.x",
                                                                        "h.(Intercept)"]


def test_nested_grouping_codes_and_labels():
    """(1|g/h) is (1|g) + (1|h:g); h:g keeps the combinations present, its first factor (h)
    varying slowest, labelled 'h_level:g_level' (lme4's b:a)."""
    s = build_structure("y ~ 1 + (1|g/h)", DF)
    t = next(t for t in s.terms if t.factor == "h:g")
    present = sorted({(h, g) for g, h in zip(DF.g, DF.h)})
    assert list(t.levels) == [f"{h}:{g}" for h, g in present]
    np.testing.assert_array_equal(t.codes, [present.index((h, g)) for g, h in zip(DF.g, DF.h)])
    codes, labels = _group_codes(DF, ("h", "g"))
    np.testing.assert_array_equal(codes, t.codes)
    assert labels == list(t.levels)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), sizes=st.lists(st.integers(1, 6), min_size=2, max_size=4),
       n=st.integers(1, 80))
def test_combine_factors_is_lexicographic(seed, sizes, n):
    """The present combinations in lexicographic order (first factor slowest), each row coded by
    its combination; recode_combinations codes the same rows the same way and unseen ones as −1.
    (One factor is its own codes and levels.)"""
    rng = np.random.default_rng(seed)
    codes = [rng.integers(0, k, n) for k in sizes]
    levels = [[f"l{j}" for j in range(k)] for k in sizes]
    out, labels, steps = combine_factors(codes, levels)
    rows = list(zip(*[c.tolist() for c in codes]))
    present = sorted(set(rows))
    assert labels == interaction_labels([[levels[i][c[i]] for c in present] for i in range(len(sizes))])
    np.testing.assert_array_equal(out, [present.index(r) for r in rows])
    np.testing.assert_array_equal(recode_combinations(codes, levels, steps), out)
    absent = [c for c in np.ndindex(*sizes) if c not in set(present)]
    if absent:
        other = [np.array([a[i] for a in absent]) for i in range(len(sizes))]
        assert (recode_combinations(other, levels, steps) == -1).all()
    one, one_labels, no_steps = combine_factors(codes[:1], levels[:1])
    assert one is not None and np.array_equal(one, codes[0]) and one_labels == levels[0] and no_steps == []


def test_rank_rule():
    """A column is kept if its part orthogonal to the kept ones has norm > 1e-7 of its own."""
    X = np.column_stack([np.ones(6), np.arange(6.0), 2 * np.arange(6.0) + 1, np.zeros(6), np.arange(6.0) ** 2])
    assert rank_deficient_keep(X.T @ X) == [0, 1, 4]
    with pytest.warns(fl.RankDeficiencyWarning):
        s = build_structure("y ~ x + I(2*x) + (1|g)", DF)
    assert s.fixef_names == ("(Intercept)", "x") and s.dropped_fixef == ("I(2 * x)",)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(3, 60), p=st.integers(1, 9), scale=st.sampled_from([1e-3, 1.0, 1e4]))
def test_independent_columns_and_basis_rows(seed, n, p, scale):
    """The rank rule on X itself: a planted exact combination of earlier columns, a zero column
    and columns beyond the rank are dropped (as the Gram rule does on well-conditioned X); the
    basis rows carry X's rank, so every relation among the columns holds on them."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, p)) * scale ** rng.uniform(0, 1, p)
    planted = set()
    for j in range(1, p):
        if rng.random() < 0.3:
            X[:, j] = X[:, :j] @ rng.integers(-3, 4, j) if rng.random() < 0.8 else 0.0
            if np.linalg.norm(X[:, j]) <= 1e-12 * np.linalg.norm(X[:, :j]):
                X[:, j] = 0.0     # the combination cancelled: rounding noise is not a planted relation
            planted.add(j)
    X = X[rng.permutation(n) if n > 1 else slice(None)]
    keep = independent_columns(X)
    r = np.linalg.matrix_rank(X)
    assert len(keep) == r and not planted & set(keep)
    assert keep == [j for j in range(p) if j not in planted][:r]
    if n > p:     # on a wide X the Gram rule's cancellation keeps columns past the rank
        assert keep == rank_deficient_keep(X.T @ X)
    S = basis_rows(X, X.T @ X)
    assert np.all(np.diff(S) > 0) and np.linalg.matrix_rank(X[S]) == r
    assert basis_rows(X, X.T @ X, rank=r).tolist() == S.tolist()


def test_structure_pickles_without_Z():
    s = build_structure("y ~ x + (x|g) + (1|h)", DF)
    assert "Z" not in {k for k, v in s.__getstate__().items() if v is not None}
    back = pickle.loads(pickle.dumps(s))
    assert (back.Z != s.Z).nnz == 0


def test_new_rows_through_evaluate_rows():
    """The design on new rows equals the fit's own rows where they coincide; unseen levels are −1."""
    with pytest.warns(fl.SingularFitWarning):
        res = fl.lmer("y ~ x + (x|g) + (1|h)", DF)
    s = res.structure
    keep = selected_terms(s, None)
    nd = DF.iloc[[3, 0, 7]].reset_index(drop=True)
    rows = new_rows(s, nd, keep)
    np.testing.assert_array_equal(rows.X, s.X[[3, 0, 7]])
    for i, Xi, codes in rows.terms:
        np.testing.assert_array_equal(Xi, s.terms[i].Xi[[3, 0, 7]])
        np.testing.assert_array_equal(codes, s.terms[i].codes[[3, 0, 7]])
    rows = new_rows(s, pd.DataFrame({"x": [1.0, 2.0], "g": ["a", "z"], "h": ["v", "w"]}), keep)
    assert rows.unseen == {"g": ["z"], "h": ["w"]}
    assert [c.tolist() for _, _, c in rows.terms] == [[0, -1], [1, -1]]
    assert selected_terms(s, "~0") == [] and selected_terms(s, "~ (1|h)") == [1]
