"""backend="auto" from a cost estimate (``_backends.choose_backend``, ``_cost``): the estimate's
inputs against direct counts (CHOLMOD's lnz and fl against a dense factor's nonzeros, the blocked
path's Gram-product count against Z, the dense flop formula against a counted Cholesky), and the
choice on designs where one path is clearly cheaper; the choice is always an applicable backend and
is recorded on the model.  No timings."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import fastlmm_ext as fl
from fastlmm_ext._backends import BackendChoice, choose_backend, single_term_applicable
from fastlmm_ext._blocked import blocked_applicable
from fastlmm_ext._cost import blocked_counts, blocked_cost, compiled_cost, dense_flops
from fastlmm_ext._crossprod import CrossProducts
from fastlmm_ext._design import build_structure
from fastlmm_ext._kernel import symbolic_facts


def crossed(n, la, lb, seed=1, zipf=None) -> pd.DataFrame:
    """y ~ x + (1|a) + (1|b): levels drawn uniformly, or (``zipf`` = (s_a, s_b)) Zipf-skewed with the
    tail collected in the last level, as in the MovieLens shape."""
    rng = np.random.default_rng(seed)
    if zipf is None:
        a, b = rng.integers(0, la, n), rng.integers(0, lb, n)
    else:
        a, b = np.minimum(rng.zipf(zipf[0], n), la), np.minimum(rng.zipf(zipf[1], n), lb)
    x = rng.normal(size=n)
    y = 1 + 0.5 * x + rng.normal(0, 0.8, la + 1)[a] + rng.normal(0, 0.5, lb + 1)[b] + rng.normal(size=n)
    return pd.DataFrame({"y": y, "x": x, "a": a.astype(str), "b": b.astype(str)})


def structure(formula, df):
    s = build_structure(formula, df)
    return s, CrossProducts.from_structure(s)


def dense_pattern_factor(cp: CrossProducts, q: int, seed=0) -> np.ndarray:
    """The Cholesky factor of a random SPD matrix with ZᵀZ's pattern, in the natural order: its
    nonzeros are L's structural nonzeros (random values cancel with probability 0)."""
    rng = np.random.default_rng(seed)
    low = sp.csc_matrix((rng.uniform(0.1, 1.0, cp.Ai.size), cp.Ai, cp.Ap), shape=(q, q)).toarray()
    low = np.tril(low, -1)
    A = low + low.T + np.diag(np.abs(low).sum(axis=0) + np.abs(low).sum(axis=1) + 1.0)
    return np.linalg.cholesky(A)


@pytest.mark.parametrize("formula, df", [
    ("y ~ x + (1|a) + (1|b)", crossed(600, 40, 15)),
    ("y ~ x + (1|a) + (1|b)", crossed(800, 60, 30, zipf=(1.6, 1.4))),
    ("y ~ x + (1 + x|a) + (1|b)", crossed(500, 30, 12, seed=2)),
])
def test_symbolic_facts_count_the_factor(formula, df):
    """CHOLMOD's lnz = Σⱼ cⱼ and fl = Σⱼ cⱼ² (cⱼ the entries of column j of L, diagonal included),
    counted on a dense factor of a matrix with ZᵀZ's pattern; natural ordering, so no permutation."""
    s, cp = structure(formula, df)
    L = dense_pattern_factor(cp, s.q)
    c = (np.abs(L) > 0).sum(axis=0).astype(float)
    facts = symbolic_facts(cp.Ap, cp.Ai, "natural")
    cols = np.repeat(np.arange(s.q), np.diff(cp.Ap))
    assert facts["n"] == s.q and facts["anz"] == np.sum(cp.Ai >= cols)      # tril(A); storage may hold more
    assert facts["lnz"] == c.sum()
    assert facts["fl"] == pytest.approx(np.sum(c * c), rel=1e-12)
    if facts["is_super"]:       # supernodes cover the columns, and hold at least L's entries
        nc, nr = facts["super_ncols"], facts["super_nrows"]
        assert nc.sum() == s.q and np.all(nr >= nc)
        assert np.sum(nc * nr - nc * (nc - 1) // 2) >= facts["lnz"]


def test_symbolic_facts_are_the_kernels():
    """The analysis alone gives the kernel's own facts (same pattern, same ordering, same switch
    between simplicial and supernodal)."""
    for df in (crossed(3000, 300, 60), crossed(3000, 300, 200, zipf=(1.6, 1.4))):
        m = fl.LinearMixedModel("y ~ x + (1|a) + (1|b)", df, backend="compiled")
        cp = m.backend.crossprod
        facts, info = symbolic_facts(cp.Ap, cp.Ai, "default"), m.backend.kernel.factor_info
        for key in ("is_super", "lnz", "fl", "n", "ordering", "nsuper"):
            assert facts[key] == info[key], key


def test_blocked_counts_against_Z():
    """cₐ (entries of first-term column a of ZᵀZ below the first block) = the later-term columns
    that share a row with level a; Σₐ cₐ² is the multiply-adds of the Gram product L₂₁L₂₁ᵀ."""
    df = crossed(2000, 80, 25)
    s, cp = structure("y ~ x + (1|a) + (1|b)", df)
    q1 = s.terms[0].q
    Z = sp.csc_matrix(s.Z)
    G = (Z[:, :q1].T @ Z[:, q1:]).tocsr()
    c = np.diff(G.indptr).astype(float)         # distinct later columns per first-term column
    counts = blocked_counts(s, cp)
    assert counts["q1"] == q1 and counts["q2"] == s.q - q1 and counts["l1"] == s.terms[0].nlevels
    assert counts["nnz21"] == c.sum() and counts["sum_c2"] == np.sum(c * c)
    assert counts["nnzM"] == cp.Ap[-1]


def _counted_dense_flops(q: int) -> int:
    """Flops (a multiply-add counts 2) of an unblocked Cholesky of a q × q matrix and of the
    inverse from its factor (triangular inverse, then L⁻ᵀL⁻¹), counted loop by loop."""
    chol = sum(2 * j * (q - j) for j in range(q))                   # column j: j updates of q - j entries
    trinv = sum(2 * j * (j + 1) // 2 for j in range(q))             # row j of L⁻¹: Σᵢ (j - i) products
    lauum = sum(2 * (j + 1) * (q - j) for j in range(q))            # row j of the lower triangle of L⁻ᵀL⁻¹
    return chol + trinv + lauum


@pytest.mark.parametrize("q", [50, 400])
def test_dense_flop_formula(q):
    """q₂³ per (f, g): q₂³/3 for dpotrf, 2q₂³/3 for dpotri, to leading order."""
    assert dense_flops(q) == pytest.approx(_counted_dense_flops(q), rel=4.0 / q)


def _applicable(s) -> set[str]:
    if single_term_applicable(s):
        return {"single"}           # one term: ZᵀWZ block diagonal, no factor to estimate
    return {"compiled", "blocked"} if blocked_applicable(s) else {"compiled"}


def test_zipf_crossed_picks_cholmod():
    """MovieLens-like skew: a few heavy levels, most levels in a handful of rows.  CHOLMOD orders
    the heavy levels last and its factor stays sparse; the blocked path's dense block is all of
    the second factor's levels."""
    s, cp = structure("y ~ x + (1|a) + (1|b)", crossed(30_000, 3000, 1500, zipf=(1.6, 1.4)))
    for threads in (1, 2):
        ch = choose_backend(s, crossprod=cp, threads=threads)
        est = {e.backend: e.seconds for e in ch.estimates}
        assert ch.backend == "compiled" and est["blocked"] > 5 * est["compiled"], ch


def test_uniform_filled_crossed_picks_blocked():
    """Uniform crossed levels fill the q₂ × q₂ Schur complement: CHOLMOD's supernodal factor and
    selected inverse of that dense block cost more than LAPACK's on the dense block itself."""
    s, cp = structure("y ~ x + (1|a) + (1|b)", crossed(60_000, 2000, 600))
    ch = choose_backend(s, crossprod=cp, threads=1)
    assert ch.backend == "blocked", ch
    assert ch.threads == 1 and [e.backend for e in ch.estimates] == ["compiled", "blocked"]
    assert ch.estimates[0].counts["is_super"]


@pytest.mark.parametrize("formula, df", [
    ("y ~ x + (1|a/b)", crossed(3000, 40, 8)),                       # nested
    ("y ~ x + (1|a) + (1 + x|b)", crossed(3000, 100, 30)),           # a vector term after the first
    ("y ~ x + (1 + x|a)", crossed(3000, 200, 10)),                   # a single term
    ("y ~ x + (1|a)", crossed(3000, 200, 10)),
    ("y ~ x + (1|a) + (1|b)", crossed(3000, 200, 10)),
])
def test_choice_is_applicable_and_follows_the_estimate(formula, df):
    s, cp = structure(formula, df)
    ch = choose_backend(s, crossprod=cp, threads=1)
    assert isinstance(ch, BackendChoice) and ch.requested == "auto"
    assert ch.backend in _applicable(s)
    if len(_applicable(s)) == 2:
        assert ch.backend == min(ch.estimates, key=lambda e: e.seconds).backend
        assert all(e.seconds > 0 for e in ch.estimates)
    elif ch.backend == "single":
        assert ch.estimates == () and "one random-effects term" in ch.reason
    else:
        assert ch.estimates == () and "does not apply" in ch.reason
    m = fl.LinearMixedModel(formula, df)                               # the model builds what was chosen
    assert m.backend_name == m.backend_choice.backend in _applicable(s)


def test_nested_design_picks_cholmod():
    """Nested levels fill nothing: CHOLMOD's factor has ZᵀZ's pattern, the dense block is all fill."""
    s, cp = structure("y ~ x + (1|a/b)", crossed(20_000, 300, 20))
    assert blocked_applicable(s)
    assert choose_backend(s, crossprod=cp, threads=1).backend == "compiled"


def test_natural_order_when_it_fills_little(monkeypatch):
    """A nested design's pattern fills nothing in its own order: auto takes CHOLMOD in that order
    without searching for another (no AMD analysis), its factor has ZᵀZ's lower entries, and
    its criterion is backend='compiled''s (CHOLMOD's own ordering) to rounding.  A Zipf-crossed
    design, which fills a lot in its own order, is still ordered by CHOLMOD."""
    import fastlmm_ext._backends as backends
    asked = []
    real = backends.symbolic_facts
    def spy(Ap, Ai, ordering="default"):
        asked.append(ordering)
        return real(Ap, Ai, ordering)
    monkeypatch.setattr(backends, "symbolic_facts", spy)
    df = crossed(20_000, 300, 20)
    m = fl.LinearMixedModel("y ~ x + (1|a/b)", df, threads=1)
    assert asked == ["natural"] and m.backend_name == "compiled" and "own order" in m.backend_choice.reason
    info, cp = m.backend.kernel.factor_info, m.backend.crossprod
    cols = np.repeat(np.arange(m.structure.q), np.diff(cp.Ap))
    assert info["ordering"] == 0 and info["lnz"] == np.count_nonzero(cp.Ai >= cols)
    ref = fl.LinearMixedModel("y ~ x + (1|a/b)", df, backend="compiled")
    for th in ([0.7, 0.4], [1.5, 0.05]):
        assert m.objective(th) == pytest.approx(ref.objective(th), rel=1e-11)
    asked.clear()
    z = fl.LinearMixedModel("y ~ x + (1|a) + (1|b)", crossed(20_000, 2000, 1000, zipf=(1.6, 1.4)), threads=1)
    assert asked == ["natural", "amd"] and z.backend_name == "compiled"
    assert z.backend.kernel.factor_info["ordering"] != 0


def test_estimates_grow_with_the_work():
    """Each estimate is increasing in its counts, and more threads never make a path dearer."""
    s, cp = structure("y ~ x + (1|a) + (1|b)", crossed(8000, 300, 120))
    counts = blocked_counts(s, cp)
    facts = symbolic_facts(cp.Ap, cp.Ai)
    b1 = blocked_cost(counts, 1).seconds
    assert blocked_cost({**counts, "q2": counts["q2"] * 2}, 1).seconds > b1
    assert blocked_cost({**counts, "sum_c2": counts["sum_c2"] * 2}, 1).seconds > b1
    assert blocked_cost(counts, 2).seconds <= b1
    c1 = compiled_cost(facts, counts, 1).seconds
    assert compiled_cost(facts, counts, 2).seconds <= c1
    if facts["is_super"]:                            # a larger dense supernode
        nc = facts["super_ncols"].copy()
        nc[-1] += 50
        assert compiled_cost({**facts, "super_ncols": nc, "super_nrows": facts["super_nrows"] + 50},
                             counts, 1).seconds > c1
    simplicial = {**facts, "is_super": False}
    assert compiled_cost({**simplicial, "fl": facts["fl"] * 2}, counts, 1).seconds > \
        compiled_cost(simplicial, counts, 1).seconds


def test_requested_backends_and_orderings():
    df = crossed(3000, 200, 60)
    for backend in ("compiled", "blocked", "reference"):
        m = fl.LinearMixedModel("y ~ x + (1|a) + (1|b)", df, backend=backend)
        assert m.backend_choice.backend == backend == m.backend_name and m.backend_choice.requested == backend
    m = fl.LinearMixedModel("y ~ x + (1|a) + (1|b)", df, ordering="amd")    # an ordering is CHOLMOD's
    assert m.backend_name == "compiled" and "ordering" in m.backend_choice.reason
    res = fl.lmer("y ~ x + (1|a) + (1|b)", df, threads=1)
    assert res.model.backend_choice.backend == res.backend and str(res.model.backend_choice).startswith(res.backend)
    # the model refitted, or as its ML twin, keeps the record
    assert res.model.ml_twin().backend_choice == res.model.backend_choice


def _kernel_pair(formula, df, analysis_of):
    """The compiled backend's kernel built from its own analysis, and one given ``analysis_of(cp)``."""
    from fastlmm_ext._backends import CompiledBackend
    s, cp = structure(formula, df)
    return CompiledBackend(s, crossprod=cp).kernel, CompiledBackend(s, crossprod=cp, analysis=analysis_of(cp)).kernel


def _same_factor(k1, k2, nth, seed=0):
    """Equal facts (every key: permutation, supernodes) and, at random θ's, the same criterion
    pieces and solves bit for bit: the same factor."""
    f1, f2 = k1.factor_info, k2.factor_info
    assert f1.keys() == f2.keys()
    for key in f1:
        if isinstance(f1[key], np.ndarray) or isinstance(f2[key], np.ndarray):
            np.testing.assert_array_equal(f1[key], f2[key], err_msg=key)
        else:
            assert f1[key] == f2[key], key
    rng = np.random.default_rng(seed)
    rhs = rng.normal(size=(f1["n"], 2))
    for _ in range(2):
        theta = rng.uniform(0.2, 1.5, nth)
        assert k1.update(theta) == k2.update(theta)
        assert (k1.ldL2, k1.ldRX2) == (k2.ldL2, k2.ldRX2)
        np.testing.assert_array_equal(k1.solve_L(rhs), k2.solve_L(rhs))


@pytest.mark.parametrize("formula, df", [
    ("y ~ x + (1|a) + (1|b)", crossed(8000, 800, 400, zipf=(1.6, 1.4))),     # supernodal, AMD
    ("y ~ x + (1|a) + (1|b)", crossed(3000, 300, 60)),
    ("y ~ x + (1|a/b)", crossed(3000, 40, 8)),
    ("y ~ x + (1 + x|a) + (1|b)", crossed(3000, 100, 30, seed=3)),
])
def test_a_handed_analysis_gives_the_same_factor(formula, df):
    """A kernel given symbolic_facts' analysis of its pattern uses the permutation as given and
    builds the factor of a kernel that orders the pattern itself: the same facts (the ordering
    code of the search that found it included) and the same numbers."""
    k1, k2 = _kernel_pair(formula, df, lambda cp: symbolic_facts(cp.Ap, cp.Ai, "default"))
    assert k2.analysis_reused and not k1.analysis_reused
    _same_factor(k1, k2, len(build_structure(formula, df).lower))


def test_a_foreign_analysis_is_not_used():
    """An analysis of another pattern (or a permutation of the wrong length) is refused by its
    facts, and the kernel orders the pattern itself."""
    df, other = crossed(3000, 300, 60), crossed(3000, 300, 60, seed=5)
    s2, cp2 = structure("y ~ x + (1|a) + (1|b)", other)
    foreign = symbolic_facts(cp2.Ap, cp2.Ai, "default")
    for bad in (foreign, {**foreign, "perm": foreign["perm"][:-1]}):
        k1, k2 = _kernel_pair("y ~ x + (1|a) + (1|b)", df, lambda cp: bad)
        assert not k2.analysis_reused
        _same_factor(k1, k2, 2)


def test_auto_orders_the_pattern_once(monkeypatch):
    """When the estimate picks CHOLMOD, the model's kernel is built from the estimate's analysis
    (handed over, not redone), and the criterion is the one of backend='compiled'."""
    import fastlmm_ext._backends as backends
    seen = []
    real = backends.PLSKernel

    def spy(*args):
        seen.append(args[-1])
        return real(*args)

    monkeypatch.setattr(backends, "PLSKernel", spy)
    df = crossed(20_000, 2000, 1000, zipf=(1.6, 1.4))
    m = fl.LinearMixedModel("y ~ x + (1|a) + (1|b)", df)
    assert m.backend_name == "compiled" and m.backend_choice.requested == "auto"
    assert len(seen) == 1 and isinstance(seen[0], dict) and "perm" in seen[0]
    assert m.backend.kernel.analysis_reused and m.backend_choice.analysis is None   # used, and not kept
    theta = np.array([0.7, 0.4])
    ref = fl.LinearMixedModel("y ~ x + (1|a) + (1|b)", df, backend="compiled")
    assert len(seen) == 2 and seen[1] is None              # asked for by name: its own analysis
    assert m.backend.objective(theta, True) == ref.backend.objective(theta, True)
    # a blocked choice carries no analysis
    m = fl.LinearMixedModel("y ~ x + (1|a) + (1|b)", crossed(60_000, 2000, 600), threads=1)
    assert m.backend_name == "blocked"
    s = m.structure
    assert backends.choose_backend(s, crossprod=m.backend.crossprod, threads=1).analysis is None


def test_insteval_picks_blocked_on_one_thread_too():
    """InstEval's (f, g) measured at one thread: blocked 51–59 ms CPU, CHOLMOD 62–68 ms (see
    _cost's docstring); with one core busy (threads=1) auto must not take CHOLMOD."""
    from conftest import REFERENCE
    df = pd.read_csv(REFERENCE / "InstEval.csv.gz", usecols=["s", "d", "dept", "service", "y"])
    for col in ("s", "d", "dept", "service"):
        df[col] = pd.Categorical(df[col])
    s, cp = structure("y ~ 1 + service + (1|s) + (1|d) + (1|dept:service)", df)
    for threads in (1, 2):
        assert choose_backend(s, crossprod=cp, threads=threads).backend == "blocked"
