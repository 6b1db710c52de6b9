"""Starting values of θ from moment estimates on the cross-products.

lme4 starts every fit at θ = 1 (each random-effect standard deviation equal to σ).  On large
crossed designs the first line search from there costs 4-5 of about 14 evaluations, and an
evaluation can cost a second.  For each scalar term j, the one-way analysis-of-variance
estimator on the residual ỹ of the fixed effects (read off the cross-products: level sums
Z_jᵀỹ, level counts diag Z_jᵀZ_j and ỹᵀỹ, so O(q) work)

    MSB = Σ_l S_l²/n_l / (ℓ−1),   MSW = (ỹᵀỹ − Σ_l S_l²/n_l)/(n−ℓ),
    n₀ = (n − Σ_l n_l²/n)/(ℓ−1),   σ_j² ≈ (MSB − MSW)/n₀,

with σ² ≈ ỹᵀỹ/n − Σ_j σ_j², gives θ_j ≈ σ_j/σ.  For crossed factors each one-way estimate is
close (the other factors average out within a level).  A term nested in a later one (each of its
levels inside one level P of the coarser term, read off the pattern of ZᵀZ) would take in the
coarser term's variance too; its estimate is the within-P one instead (nested ANOVA):

    MSB_w = (Σ_l S_l²/n_l − Σ_P S_P²/n_P)/(ℓ − ℓ_P),
    n₀ = (n − Σ_P Σ_{l∈P} n_l²/n_P)/(ℓ − ℓ_P),   σ_j² ≈ (MSB_w − MSW)/n₀.

It is only a start: the optimiser still finds the optimum, and an estimate at or below
zero starts the term at a small positive θ so that the optimiser can move either way.

A vector-valued term (k columns) gets its moment estimate from the level sums, again from the
cross-products alone: with M_l = Z_lᵀZ_l (the level's k×k diagonal block of ZᵀZ) and
r_l = Z_lᵀỹ, treating the other terms as noise,

    E[Σ_l r_l r_lᵀ] = Σ_l M_l Σ_b M_l + σ² Σ_l M_l,     E[ỹᵀỹ] = Σ_l tr(M_l Σ_b) + n σ²,

k² + 1 linear equations in vec Σ_b and σ² (no per-level inverse, so levels with few or collinear
rows do no harm).  T is the Cholesky factor of Σ_b/σ² after its eigenvalues are floored, so
that it is a proper start; otherwise the term keeps lme4's start (identity T).
"""
from __future__ import annotations

import numpy as np

from ._crossprod import CrossProducts, level_blocks
from ._design import ModelStructure
from ._params import theta_from_T

__all__ = ["moment_theta0", "curvature_guess", "column_mirrors", "row_directions"]

MIN_START = 0.05
MAX_START = 20.0


def moment_theta0(s: ModelStructure, cp: CrossProducts) -> np.ndarray:
    """θ₀ from one-way moment estimates for scalar terms, lme4's start elsewhere (module doc)."""
    theta = s.theta0.copy()
    n, p = cp.n, s.p
    tss = float(cp.XyXy[p, p])
    if n <= p + 1 or tss <= 0:
        return theta
    yz = cp.ZtXy[:, p]
    sig2, scalar = {}, []
    for i, t in enumerate(s.terms):
        if t.k != 1:
            T = _vector_start(t, cp, yz, tss, n)
            if T is not None:
                theta[t.theta_offset:t.theta_offset + t.ntheta] = theta_from_T(T)
            continue
        sl = slice(t.col_offset, t.col_offset + t.q)
        nl, S = level_blocks(cp, t)[:, 0, 0], yz[sl]
        ok = nl > 0
        ell = int(ok.sum())
        if ell < 2 or n <= ell:
            continue
        bss = float(np.sum(S[ok] ** 2 / nl[ok]))
        msw = max(tss - bss, 0.0) / (n - ell)
        parent = _nesting_parent(cp, s.terms, i) if ok.all() else None
        if parent is not None and parent.max() + 1 < ell:
            nP = np.bincount(parent, weights=nl)
            SP = np.bincount(parent, weights=S)
            inP = nP > 0
            df = ell - int(inP.sum())
            msb = (bss - float(np.sum(SP[inP] ** 2 / nP[inP]))) / df
            n0 = (n - float(np.sum(np.bincount(parent, weights=nl ** 2)[inP] / nP[inP]))) / df
        else:
            msb = bss / (ell - 1)
            n0 = (n - float(np.sum(nl[ok] ** 2)) / n) / (ell - 1)
        sig2[i] = max((msb - msw) / n0, 0.0) if n0 > 0 else 0.0
        scalar.append(i)
    if not scalar:
        return theta
    s2 = max(tss / n - sum(sig2.values()), 0.05 * tss / n)
    for i in scalar:
        theta[s.terms[i].theta_offset] = float(np.clip(np.sqrt(sig2[i] / s2), MIN_START, MAX_START))
    return theta


def curvature_guess(s: ModelStructure, cp: CrossProducts, theta: np.ndarray) -> np.ndarray:
    """The diagonal of ∂²f/∂θ² as the expected information gives it, the quasi-Newton method's
    starting matrix.

    Row r of a term's T gives each of its ℓ levels an effect of variance σ² v_r, v_r = Σ_c T_rc²,
    estimated with sampling variance σ² s_r², s_r² = 1 / mean_l (Z_lᵀZ_l)_rr; f holds about
    ℓ [log(v_r + s_r²) + (its squared estimate)/(v_r + s_r²)] for it, whose expected second
    derivative in T_rc is 4ℓ T_rc² / (v_r + s_r²)² (exact for a balanced one-way layout).  T_rc²
    is floored at s_r²/100 so that a component at its bound keeps a curvature, and for an
    off-diagonal T_rc (a covariance, curved even where it is 0) at v_r/2."""
    out = np.empty(s.ntheta)
    for t in s.terms:
        th = theta[t.theta_offset:t.theta_offset + t.ntheta]
        dM = np.einsum("lii->i", level_blocks(cp, t)) / max(t.nlevels, 1)
        s2 = 1.0 / np.maximum(dM, 1e-300)
        t2 = th ** 2
        if t.ntheta == t.k * (t.k + 1) // 2:
            rows = np.concatenate([np.arange(c, t.k) for c in range(t.k)])   # T's lower triangle by column
            cols = np.concatenate([np.full(t.k - c, c) for c in range(t.k)])
            v = np.bincount(rows, weights=th ** 2, minlength=t.k)
            v, s2 = v[rows], s2[rows]
            off = rows != cols
            t2[off] = np.maximum(t2[off], v[off] / 2.0)
        else:
            v = th ** 2
        t2 = np.maximum(t2, s2 / 100.0)
        out[t.theta_offset:t.theta_offset + t.ntheta] = 4.0 * t.nlevels * t2 / (v + s2) ** 2
    return out


def column_mirrors(s: ModelStructure) -> dict[int, np.ndarray]:
    """For each diagonal element T_cc of a vector term (its θ index), the θ indices of the rest of
    column c.  Changing the sign of a whole column of T leaves TTᵀ, so f, unchanged; with
    T_cc = 0 on its bound, the rest of the column can change sign alone and θ stays feasible —
    the mirror image of a boundary point, where moving T_cc inwards may lower f."""
    out: dict[int, np.ndarray] = {}
    for t in s.terms:
        if t.k == 1 or t.ntheta != t.k * (t.k + 1) // 2:
            continue
        for c in range(t.k - 1):
            start = t.theta_offset + c * t.k - c * (c - 1) // 2
            out[start] = np.arange(start + 1, start + t.k - c)
    return out


def row_directions(s: ModelStructure) -> list[list[np.ndarray]]:
    """Per vector term: the θ indices of each row T_i0 … T_ii of its T (the diagonal last).  The variance of effect i is σ²‖row i‖², and the row's direction sets its
    correlations with the effects before it; where some effect's variance is nearly 0, f hardly
    depends on the direction of the rows, and an optimum at a correlation of ±1 (T_ii = 0, a
    singular fit) lies at the end of a nearly flat valley (``_bfgs``'s row probe)."""
    out = []
    for t in s.terms:
        if t.k == 1 or t.ntheta != t.k * (t.k + 1) // 2:
            continue
        pos = lambda i, c: t.theta_offset + c * t.k - c * (c - 1) // 2 + (i - c)   # noqa: E731 - T[i, c]'s θ index
        out.append([np.array([pos(i, c) for c in range(i + 1)]) for i in range(t.k)])
    return out


def _nesting_parent(cp: CrossProducts, terms, i: int) -> np.ndarray | None:
    """For scalar term i nested in a later scalar term (every level of i meets exactly one level
    of it in ZᵀWZ's pattern), the level of the nesting term with the most levels that contains
    each level of i; None if no later term nests it."""
    t = terms[i]
    cols = slice(t.col_offset, t.col_offset + t.q)
    lo, hi = int(cp.Ap[t.col_offset]), int(cp.Ap[t.col_offset + t.q])
    rows = cp.Ai[lo:hi]
    col = np.repeat(np.arange(t.q), np.diff(cp.Ap[cols.start:cols.stop + 1]))
    best = None
    for u in terms[i + 1:]:
        if u.k != 1 or u.nlevels >= t.nlevels or (best is not None and u.nlevels <= best[0]):
            continue
        inside = (rows >= u.col_offset) & (rows < u.col_offset + u.q)
        if np.bincount(col[inside], minlength=t.q).max(initial=0) == 1 and inside.sum() == t.q:
            parent = np.empty(t.q, dtype=np.intp)
            parent[col[inside]] = rows[inside] - u.col_offset
            best = (u.nlevels, parent)
    return None if best is None else best[1]


def _vector_start(t, cp: CrossProducts, yz: np.ndarray, tss: float, n: int) -> np.ndarray | None:
    """T from the moment equations of the level sums (module docstring), or None."""
    k, ell = t.k, t.nlevels
    if ell < 2 * k:
        return None
    M = level_blocks(cp, t)
    r = yz[t.col_offset:t.col_offset + t.q].reshape(ell, k)
    kk = k * k
    A = np.zeros((kk + 1, kk + 1))
    A[:kk, :kk] = np.einsum("lij,lkm->ikjm", M, M).reshape(kk, kk)     # Σ_l M_l ⊗ M_l
    sumM = M.sum(axis=0).ravel()
    A[:kk, kk] = sumM
    A[kk, :kk] = sumM
    A[kk, kk] = n
    rhs = np.append(np.einsum("li,lj->ij", r, r).ravel(), tss)
    try:
        sol = np.linalg.lstsq(A, rhs, rcond=None)[0]
    except np.linalg.LinAlgError:  # pragma: no cover - lstsq of a finite system does not fail
        return None
    Sb, s2 = sol[:kk].reshape(k, k), float(sol[kk])
    if not np.isfinite(sol).all() or s2 <= 0:
        return None
    w, V = np.linalg.eigh((Sb + Sb.T) / 2.0 / s2)
    w = np.clip(w, (MIN_START ** 2) * max(float(w.max()), 1e-12), MAX_START ** 2)
    return np.linalg.cholesky((V * w) @ V.T)
