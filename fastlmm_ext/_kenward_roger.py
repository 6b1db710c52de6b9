"""Kenward–Roger (1997): the small-sample adjusted covariance of β̂ and the scaled F test of
Lβ = 0, as pbkrtest 0.5 computes them for lmerTest (``vcovAdj``, ``KRmodcomp``, ``Lb_ddf``), from
the q × q random-effects system instead of pbkrtest's n × n matrices.

**What is computed** (pbkrtest's conventions).  Var(y) = Σ = Σ_r γ_r G_r + σ² W⁻¹, with γ the
covariance elements of each term (the lower triangle of its σ²TTᵀ, in θ's order) and σ² last:
G_r = Z E_r Zᵀ, E_r = I_ℓ ⊗ e_r on the term's columns (e_r the k×k symmetric unit pattern of
element (i, j)), and G_σ = W⁻¹.  With Φ = Var(β̂) = (XᵀΣ⁻¹X)⁻¹ (the fit's ``vcov``),

    P_r = −XᵀΣ⁻¹G_rΣ⁻¹X,   Q_rs = XᵀΣ⁻¹G_rΣ⁻¹G_sΣ⁻¹X,   K_rs = tr(Σ⁻¹G_rΣ⁻¹G_s),
    I_rs = K_rs − 2 tr(ΦQ_rs) + tr(ΦP_rΦP_s)      (2 × the REML expected information of γ),
    W = 2 I⁺,   Φ_A = Φ + 2Φ [Σ_rs W_rs (Q_rs − P_rΦP_s)] Φ

(R_rs = 0: Σ is linear in γ).  W is a pseudo-inverse over the eigenvalues above √ε of the
largest (scale-free; pbkrtest switches from ``solve`` to ``MASS::ginv``, whose tolerance this is,
only when an eigenvalue is below 1e-10 in absolute value).  For a q-row L of full row rank (a
rank-deficient L is replaced by a basis of its rows, as ``force_full_rank``), Θ = Lᵀ(LΦLᵀ)⁻¹L,
u_r = ΘΦP_rΦ, A₁ = Σ_rs W_rs tr(u_r) tr(u_s), A₂ = Σ_rs W_rs tr(u_r u_s) and

    B = (A₁ + 6A₂)/(2q),  g = ((q+1)A₁ − (q+4)A₂)/((q+2)A₂),  d = 3q + 2(1 − g),
    c₁ = g/d,  c₂ = (q − g)/d,  c₃ = (q + 2 − g)/d,
    ρ = (1/q) [(1 − A₂/q)/(1 − c₂B)]² (1 + c₁B)/(1 − c₃B),
    m = 4 + (q + 2)/(qρ − 1)                        (the denominator df),
    λ = m(1 − A₂/q)/(m − 2)  (1 when |m − 2| < 0.01),  F = λ (Lβ̂)ᵀ(LΦ_ALᵀ)⁻¹(Lβ̂)/q ~ F(q, m).

A single contrast l has df m with q = 1 (``Lb_ddf``), variance l Φ_A lᵀ.

**How, without n × n matrices.**  With U = ZΛ, C = ZᵀWZ, H = ΛᵀC and lme4's A = ΛᵀCΛ + I,
Woodbury gives Σ⁻¹ = σ⁻² W K with K = I − U A⁻¹ UᵀW, and W⁻¹Σ⁻¹ = σ⁻² K.  Powers of K stay in
that form, K^m = I − U R_m UᵀW with R_m = A⁻¹ + ... + A⁻ᵐ (K·(I − URUᵀW) = I − U A⁻¹(I + R)UᵀW,
using UᵀWU = A − I), so every n × n product reduces to q × q ones:

    XᵀΣ⁻¹(W⁻¹Σ⁻¹)^{m−1} X = σ⁻²ᵐ (XᵀWX − H_Xᵀ R_m H_X),   H_X = ΛᵀZᵀWX,
    B  = ZᵀΣ⁻¹X = σ⁻²(ZᵀWX − HᵀA⁻¹H_X),   B₂ = ZᵀΣ⁻¹W⁻¹Σ⁻¹X = σ⁻⁴(ZᵀWX − HᵀR₂H_X),
    M  = ZᵀΣ⁻¹Z = σ⁻²(C − HᵀA⁻¹H),        M₂ = ZᵀΣ⁻¹W⁻¹Σ⁻¹Z = σ⁻²M − σ⁻⁴HᵀA⁻²H,
    tr((W⁻¹Σ⁻¹)²) = σ⁻⁴ tr K² = σ⁻⁴ (n − q + ‖A⁻¹‖²_F),

and P_r = −BᵀE_rB, P_σ = −XᵀΣ⁻¹W⁻¹Σ⁻¹X, Q_rs = BᵀE_rME_sB, Q_rσ = BᵀE_rB₂,
Q_σσ = XᵀΣ⁻¹(W⁻¹Σ⁻¹)²X, K_rs = tr(E_rME_sM), K_rσ = tr(E_rM₂), K_σσ = tr((W⁻¹Σ⁻¹)²).
(A⁻¹ = I − A⁻¹HΛ, so ‖A⁻¹‖² needs no more than A⁻¹H.)  The traces need every entry of M
between the levels involved, so A is taken apart into the connected components of the random
effects' graph (levels joined by shared observations): A, A⁻¹ and M are block diagonal over them.
Each component is factored densely (LAPACK; the entries of A⁻¹ from the Cholesky factor, as the
selected inverse is for the sparse factor), small components many at a time.  The cost is
Σ_c q_c³ plus the nonzeros of ZᵀWZ times q_c, the memory about 2 max_c q_c² doubles: nested
designs have small components, a crossed design one component of all its random effects
(InstEval: q = 4,100).  The data enter only through ZᵀWZ, ZᵀWX, XᵀWX and n, so chunked fits work.

Conventions: REML fits only (as lmerTest; pbkrtest silently refits an ML fit by REML).  Prior
weights enter Σ as σ²W⁻¹, so Φ = ``vcov`` exactly; pbkrtest uses σ²I whatever the weights while
taking Φ from the weighted fit, so R's values for a weighted fit are not these.  Singular fits
(some γ = 0) are computed as any other, as pbkrtest does.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.linalg as la
import scipy.sparse as sp
from scipy import stats
from scipy.sparse import csgraph

from ._crossprod import CrossProducts, full_ZtWZ
from ._exceptions import ArgumentError, DataError, NotPositiveDefiniteError
from ._params import tri_indices

__all__ = ["KenwardRogerInfo", "MAX_COMPONENT"]

#: Components with more random effects than this are factored one at a time, with sparse products.
_BATCH_MAX = 256
#: At most this many entries per dense array when small components are stacked.
_BATCH_ENTRIES = 2_000_000
#: The largest connected component of random effects the dense algebra accepts (about
#: 2 q_c² doubles: 6.4 GB at 20,000).
MAX_COMPONENT = 20_000


# ----------------------------------------------------------------------------- the parameters γ

@dataclass(frozen=True)
class _Param:
    """One covariance element γ_r: of term ``term`` with k×k pattern ``e`` (None: the residual σ²)."""
    name: str
    term: int | None
    e: np.ndarray | None


def _parameters(s) -> list[_Param]:
    """The γ of every term (its covariance elements, θ's order and names) and σ² last."""
    out = []
    names = iter(s.theta_names)
    for ti, t in enumerate(s.terms):
        for i, j in zip(*tri_indices(t.k)):
            e = np.zeros((t.k, t.k))
            e[i, j] = e[j, i] = 1.0
            out.append(_Param(next(names), ti, e))
    out.append(_Param("Residual", None, None))
    return out


# ----------------------------------------------------------------------------- components

class _Components:
    """The connected components of the random effects (columns of Z joined by a stored entry of
    ZᵀWZ's block-closed pattern), grouped by signature (the number of columns of each term), each
    component's columns in increasing order (so a term's columns are whole level blocks, in a
    row).  ``groups``: (signature, idx) with idx the (members, size) global columns."""

    def __init__(self, cp: CrossProducts, s):
        q, nt = s.q, len(s.terms)
        pattern = sp.csc_matrix((np.ones(cp.Ai.size, dtype=np.int8), cp.Ai, cp.Ap), shape=(q, q))
        ncomp, label = csgraph.connected_components(pattern, directed=False)
        term_of = np.repeat(np.arange(nt), [t.q for t in s.terms])
        counts = np.zeros((ncomp, nt), dtype=np.int64)
        np.add.at(counts, (label, term_of), 1)
        sigs, inv = np.unique(counts, axis=0, return_inverse=True)
        inv = np.asarray(inv).ravel()
        order = np.argsort(label, kind="stable")          # by component, columns ascending
        start = np.concatenate([[0], np.cumsum(counts.sum(axis=1))[:-1]])
        self.groups: list[tuple[np.ndarray, np.ndarray]] = []
        self.group_of = np.empty(q, dtype=np.int64)
        self.member_of = np.empty(q, dtype=np.int64)
        self.local_of = np.empty(q, dtype=np.int64)
        for g, sig in enumerate(sigs):
            comps = np.flatnonzero(inv == g)
            size = int(sig.sum())
            idx = order[start[comps][:, None] + np.arange(size)]
            self.groups.append((sig, idx))
            self.group_of[idx] = g
            self.member_of[idx] = np.arange(comps.size)[:, None]
            self.local_of[idx] = np.arange(size)[None, :]
        self.largest = int(max((int(sig.sum()) for sig, _ in self.groups), default=0))

    def entries(self, S: sp.spmatrix) -> _Entries:
        """The nonzeros of a q × q matrix whose entries lie within components, by group and member."""
        return _Entries(self, S)


class _Entries:
    """A sparse matrix's nonzeros sorted by (group, member), to cut out the dense or sparse block
    of any run of members of a group."""

    def __init__(self, comp: _Components, S: sp.spmatrix):
        coo = sp.coo_matrix(S)
        g, m = comp.group_of[coo.row], comp.member_of[coo.row]
        key = g * (comp.member_of.max(initial=0) + 1) + m
        order = np.argsort(key, kind="stable")
        self.key = key[order]
        self.row, self.col = comp.local_of[coo.row[order]], comp.local_of[coo.col[order]]
        self.val = coo.data[order]
        self.stride = comp.member_of.max(initial=0) + 1

    def _range(self, g: int, m0: int, m1: int) -> slice:
        lo, hi = np.searchsorted(self.key, [g * self.stride + m0, g * self.stride + m1])
        return slice(lo, hi)

    def dense(self, g: int, m0: int, m1: int, size: int) -> np.ndarray:
        """(m1 − m0, size, size) dense blocks of members m0..m1−1 of group g."""
        sl = self._range(g, m0, m1)
        out = np.zeros((m1 - m0, size, size))
        out[self.key[sl] - g * self.stride - m0, self.row[sl], self.col[sl]] = self.val[sl]
        return out

    def sparse(self, g: int, m: int, size: int) -> sp.csr_matrix:
        """The block of member m of group g as a size × size sparse matrix."""
        sl = self._range(g, m, m + 1)
        return sp.csr_matrix((self.val[sl], (self.row[sl], self.col[sl])), shape=(size, size))


# ----------------------------------------------------------------------------- one batch of components

class _DenseBatch:
    """C and H of a stack of small components as dense (m, s, s) arrays."""

    def __init__(self, C: np.ndarray, H: np.ndarray):
        self.C, self.H = C, H

    def ht(self, Y: np.ndarray) -> np.ndarray:
        """Hᵀ Y."""
        return np.swapaxes(self.H, 1, 2) @ Y

    def inv_h(self, Ainv: np.ndarray) -> np.ndarray:
        """A⁻¹ H."""
        return Ainv @ self.H

    def c_minus_(self, Y: np.ndarray) -> np.ndarray:
        """C − Y, in Y's memory."""
        np.subtract(self.C, Y, out=Y)
        return Y


class _SparseBlock:
    """C and H of one large component as sparse matrices (products cost nnz · s, not s³)."""

    def __init__(self, C: sp.csr_matrix, H: sp.csr_matrix):
        self.C, self.Ht = C.tocoo(), H.T.tocsr()

    def ht(self, Y: np.ndarray, nb: int = 256) -> np.ndarray:
        Y = Y[0]
        if Y.flags.c_contiguous:
            return (self.Ht @ Y)[None]
        out = np.empty((self.Ht.shape[0], Y.shape[1]))     # sparse @ strided copies Y: by panels
        for j0 in range(0, Y.shape[1], nb):
            out[:, j0:j0 + nb] = self.Ht @ np.ascontiguousarray(Y[:, j0:j0 + nb])
        return out[None]

    def inv_h(self, Ainv: np.ndarray) -> np.ndarray:
        return (self.Ht @ Ainv[0]).T[None]          # A⁻¹ symmetric: A⁻¹H = (HᵀA⁻¹)ᵀ

    def c_minus_(self, Y: np.ndarray) -> np.ndarray:
        np.negative(Y, out=Y)
        np.add.at(Y[0], (self.C.row, self.C.col), self.C.data)
        return Y


def _check_info(info: int, what: str) -> None:
    if info > 0:
        raise NotPositiveDefiniteError(f"{what}: ΛᵀZᵀWZΛ + I is not positive definite (column {info})")
    if info < 0:
        raise ArgumentError(f"{what}: LAPACK rejected argument {-info}")


def _symmetrize_lower_(a: np.ndarray, nb: int = 512) -> None:
    """Copy the lower triangle of a square array onto its upper one, a panel at a time (no
    full-size temporary)."""
    n = a.shape[0]
    for j0 in range(0, n, nb):
        j1 = min(n, j0 + nb)
        d = a[j0:j1, j0:j1]
        d[...] = np.tril(d) + np.tril(d, -1).T
        a[j0:j1, j1:] = a[j1:, j0:j1].T


def _factor_solve_invert(A: np.ndarray, HX: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(A⁻¹H_X, A⁻²H_X, A⁻¹) for a stack A (m, s, s), from the Cholesky factor of each A.  One
    large A is factored and inverted in its own memory by LAPACK (potrf, potrs, potri: the entries
    of A⁻¹ from the factor); a stack of small ones by batched solves against I."""
    m, s = A.shape[:2]
    if m == 1 and s > _BATCH_MAX:
        c, info = la.lapack.dpotrf(A[0].T, lower=1, overwrite_a=1)      # A symmetric: A[0].T is A, Fortran
        _check_info(info, "dpotrf")
        G1, info = la.lapack.dpotrs(c, HX[0], lower=1)
        G2, _ = la.lapack.dpotrs(c, G1, lower=1)
        inv, info = la.lapack.dpotri(c, lower=1, overwrite_c=1)
        _check_info(info, "dpotri")
        _symmetrize_lower_(inv)
        return G1[None], G2[None], inv.T[None]         # inv symmetric; .T is C-contiguous
    Lc = la.cholesky(A, lower=True)
    G1 = la.cho_solve((Lc, True), HX)
    G2 = la.cho_solve((Lc, True), G1)
    return G1, G2, la.cho_solve((Lc, True), np.broadcast_to(np.eye(s), A.shape))


class _Sums:
    """Running sums over components of everything the assembly needs (module docstring)."""

    def __init__(self, s, params: list[_Param], p: int):
        nt, nr = len(s.terms), len(params) - 1
        self.S = np.zeros((3, p, p))                   # H_Xᵀ A⁻ʲ H_X, j = 1, 2, 3
        self.trA2 = 0.0                                # ‖A⁻¹‖²_F
        self.D = [np.zeros((t.k, t.k)) for t in s.terms]      # Σ_a M_aa per term
        self.Gam = [np.zeros((t.k, t.k)) for t in s.terms]    # Σ_a (HᵀA⁻²H)_aa per term
        self.Omega = {(a, b): np.zeros((s.terms[a].k, s.terms[b].k, s.terms[a].k, s.terms[b].k))
                      for a in range(nt) for b in range(a, nt)}
        self.BEB = np.zeros((nr, p, p))                # BᵀE_rB
        self.Q = np.zeros((nr, nr, p, p))              # BᵀE_rME_sB
        self.Q0 = np.zeros((nr, p, p))                 # BᵀE_rB₂


def _apply_e(e: np.ndarray, Y: np.ndarray, k: int) -> np.ndarray:
    """(I ⊗ e) Y for the rows of one term, Y (m, n, c) with n = levels·k."""
    m, n, c = Y.shape
    return np.einsum("ij,majc->maic", e, Y.reshape(m, n // k, k, c)).reshape(m, n, c)


def _add_batch(sums: _Sums, s, params: list[_Param], sig: np.ndarray, make_A,
               blk: _DenseBatch | _SparseBlock, HX: np.ndarray, ZX: np.ndarray, sigma2: float) -> None:
    """Add one batch of components: ``make_A()`` its A (m, s, s; made here, so that its memory,
    which becomes A⁻¹, is freed as soon as A⁻¹H is formed), ``blk`` its C and H, H_X and ZᵀWX
    (m, s, p), ``sig`` the number of columns of each term."""
    G1, G2, Ainv = _factor_solve_invert(make_A(), HX)    # A⁻¹H_X, A⁻²H_X, A⁻¹
    sums.S[0] += np.einsum("msp,msq->pq", HX, G1)
    sums.S[1] += np.einsum("msp,msq->pq", G1, G1)
    sums.S[2] += np.einsum("msp,msq->pq", G1, G2)
    sums.trA2 += float(np.einsum("mij,mij->", Ainv, Ainv))
    Z1 = blk.inv_h(Ainv)                               # A⁻¹H
    del Ainv
    B = (ZX - blk.ht(G1)) / sigma2
    B2 = (ZX - blk.ht(G1 + G2)) / sigma2 ** 2
    M = blk.c_minus_(blk.ht(Z1))                       # σ² M = C − HᵀA⁻¹H
    M /= sigma2
    offsets = np.concatenate([[0], np.cumsum(sig)])
    span = {ti: slice(int(offsets[ti]), int(offsets[ti + 1])) for ti in range(len(s.terms)) if sig[ti]}
    _add_traces(sums, s, params, span, Z1, M, B, B2)


def _add_traces(sums: _Sums, s, params: list[_Param], span: dict, Z1: np.ndarray, M: np.ndarray,
                B: np.ndarray, B2: np.ndarray) -> None:
    """The traces and products of one batch from A⁻¹H (Z1), M (symmetric), B and B₂ (all
    (m, s, ·)); ``span``: the local columns of each term present.  Views and einsum only: no
    copy of an (s, s) array."""
    m = M.shape[0]
    for ti, sl in span.items():
        k = s.terms[ti].k
        nl = (sl.stop - sl.start) // k
        Zt = Z1[:, :, sl].reshape(m, -1, nl, k)
        sums.Gam[ti] += np.einsum("mxai,mxaj->ij", Zt, Zt)
        sums.D[ti] += np.einsum("maiaj->ij", M[:, sl, sl].reshape(m, nl, k, nl, k))
    for (a, b), Om in sums.Omega.items():
        if a in span and b in span:
            ka, kb = s.terms[a].k, s.terms[b].k
            Mab = M[:, span[a], span[b]]
            Mab = Mab.reshape(m, Mab.shape[1] // ka, ka, Mab.shape[2] // kb, kb)
            for k1 in range(kb):                       # Ω[j, k, i, l] = Σ_ab M_ab[j, k] M_ab[i, l]
                for k2 in range(kb):
                    Om[:, k1, :, k2] += np.einsum("majb,maib->ji", Mab[..., k1], Mab[..., k2])
    rand = [(r, pr) for r, pr in enumerate(params[:-1]) if pr.term in span]
    EB = {r: _apply_e(pr.e, B[:, span[pr.term]], s.terms[pr.term].k) for r, pr in rand}
    for r, pr in rand:
        sl = span[pr.term]
        sums.BEB[r] += np.einsum("msp,msq->pq", B[:, sl], EB[r])
        sums.Q0[r] += np.einsum("msp,msq->pq", EB[r], B2[:, sl])
        MEB = np.swapaxes(np.swapaxes(EB[r], 1, 2) @ M[:, sl, :], 1, 2)     # M E_r B, M symmetric
        for r2, pr2 in rand:
            sums.Q[r2, r] += np.einsum("msp,msq->pq", EB[r2], MEB[:, span[pr2.term]])


# ----------------------------------------------------------------------------- P, Q, K

def kr_pieces(s, cp: CrossProducts, theta: np.ndarray, sigma: float) -> tuple[list[str], np.ndarray, np.ndarray,
                                                                            np.ndarray]:
    """pbkrtest's P_r, Q_rs and K_rs = tr(Σ⁻¹G_rΣ⁻¹G_s) at (θ, σ) from the cross-products
    (module docstring): (names of γ, P (n_γ, p, p), Q (n_γ, n_γ, p, p), K (n_γ, n_γ))."""
    p, q, n = s.p, s.q, s.n
    sigma2 = float(sigma) ** 2
    params = _parameters(s)
    nr = len(params) - 1
    sums = _Sums(s, params, p)
    ZX, XWX = cp.ZtXy[:, :p], cp.XyXy[:p, :p]
    if q:
        comp = _Components(cp, s)
        if comp.largest > MAX_COMPONENT:
            raise DataError(f"ddf='kenward-roger' works on each connected set of random effects densely; this model "
                            f"has one of {comp.largest:,} random effects (more than {MAX_COMPONENT:,}: about "
                            f"{2 * 8 * comp.largest ** 2 / 1e9:.0f} GB); use ddf='satterthwaite'")
        C = full_ZtWZ(cp, s)
        Lam = s.Lambda(np.asarray(theta, dtype=float)).tocsr()
        H = (Lam.T @ C).tocsr()                        # ΛᵀZᵀWZ
        A = (H @ Lam + sp.identity(q, format="csr")).tocsr()
        HX = np.asarray(Lam.T @ ZX)                    # ΛᵀZᵀWX
        eC, eH, eA = comp.entries(C), comp.entries(H), comp.entries(A)
        for g, (sig, idx) in enumerate(comp.groups):
            m, size = idx.shape
            if size > _BATCH_MAX:
                for j in range(m):
                    blk = _SparseBlock(eC.sparse(g, j, size), eH.sparse(g, j, size))
                    _add_batch(sums, s, params, sig, lambda: eA.dense(g, j, j + 1, size), blk, HX[idx[j]][None],
                               ZX[idx[j]][None], sigma2)
                continue
            per = max(1, _BATCH_ENTRIES // (size * size))
            for m0 in range(0, m, per):
                m1 = min(m, m0 + per)
                blk = _DenseBatch(eC.dense(g, m0, m1, size), eH.dense(g, m0, m1, size))
                _add_batch(sums, s, params, sig, lambda: eA.dense(g, m0, m1, size), blk, HX[idx[m0:m1]],
                           ZX[idx[m0:m1]], sigma2)
    ng = nr + 1
    P = np.zeros((ng, p, p))
    Q = np.zeros((ng, ng, p, p))
    K = np.zeros((ng, ng))
    P[:nr] = -sums.BEB
    P[nr] = -(XWX - sums.S[0] - sums.S[1]) / sigma2 ** 2
    Q[:nr, :nr] = sums.Q
    Q[:nr, nr] = sums.Q0
    Q[nr, :nr] = np.swapaxes(sums.Q0, 1, 2)
    Q[nr, nr] = (XWX - sums.S.sum(axis=0)) / sigma2 ** 3
    for r, pr in enumerate(params[:-1]):
        a = pr.term
        K[r, nr] = K[nr, r] = float(np.sum(pr.e * (sums.D[a] / sigma2 - sums.Gam[a] / sigma2 ** 2)))
        for r2, pr2 in enumerate(params[:-1]):
            b = pr2.term
            lo, hi = (pr, pr2) if a <= b else (pr2, pr)
            K[r, r2] = float(np.einsum("ij,kl,jkil->", lo.e, hi.e, sums.Omega[(min(a, b), max(a, b))]))
    K[nr, nr] = (n - q + sums.trA2) / sigma2 ** 2
    return [pr.name for pr in params], P, Q, K


def adjusted_vcov(Phi: np.ndarray, P: np.ndarray, Q: np.ndarray, K: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(Φ_A, W) from Φ and pbkrtest's P, Q, K (module docstring)."""
    IE2 = (K - 2.0 * np.einsum("pq,rsqp->rs", Phi, Q)
           + np.einsum("rij,sji->rs", Phi @ P, Phi @ P))
    IE2 = (IE2 + IE2.T) / 2.0
    d, V = np.linalg.eigh(IE2)
    keep = np.abs(d) > math.sqrt(np.finfo(float).eps) * np.abs(d).max(initial=0.0)
    W = 2.0 * (V[:, keep] / d[keep]) @ V[:, keep].T
    U = np.einsum("rs,rspq->pq", W, Q) - np.einsum("rs,rpa,sbq,ab->pq", W, P, P, Phi, optimize=True)
    PhiA = Phi + 2.0 * Phi @ U @ Phi
    return (PhiA + PhiA.T) / 2.0, W


# ----------------------------------------------------------------------------- the result's KR information

def _row_basis(L: np.ndarray) -> np.ndarray:
    """L itself if of full row rank, else an orthonormal basis of its rows (pbkrtest's
    ``force_full_rank``; rank as Matrix::rankMatrix: singular values above max(dim)·ε·s_max)."""
    if L.shape[0] == 0:
        return L
    _, sv, Vt = np.linalg.svd(L, full_matrices=False)
    rank = int(np.sum(sv > max(L.shape) * np.finfo(float).eps * sv.max(initial=0.0)))
    return L if rank == L.shape[0] else Vt[:rank]


class KenwardRogerInfo:
    """Kenward–Roger's adjusted covariance of β̂ and its tests for one REML fit (module docstring).

    ``vcov``: Φ = Var(β̂) of the fit;  ``vcov_adj``: Φ_A (pbkrtest's ``vcovAdj``);  ``P``
    (n_γ, p, p) and ``W`` (n_γ × n_γ, the asymptotic covariance of γ̂): pbkrtest's ``attr(, "P")``
    and ``attr(, "W")``;  ``names``: the γ, named as θ (``Subject.(Intercept)``, ...) then
    ``Residual``.  :meth:`df_contrast` (``Lb_ddf``), :meth:`modcomp` (``KRmodcomp``) and
    :meth:`ftest` (lmerTest's KR row) test hypotheses."""

    def __init__(self, names: list[str], vcov: np.ndarray, vcov_adj: np.ndarray, P: np.ndarray, W: np.ndarray,
                 beta: np.ndarray, sigma: float):
        self.names, self.vcov, self.vcov_adj, self.P, self.W = list(names), vcov, vcov_adj, P, W
        self.beta, self.sigma = np.asarray(beta, dtype=float), float(sigma)

    @classmethod
    def from_result(cls, res) -> KenwardRogerInfo:
        """At the fitted (θ̂, σ̂) of a REML :class:`LmerResult` (ArgumentError for an ML fit)."""
        if not res.REML:
            raise ArgumentError("ddf='kenward-roger' needs a REML fit, as lmerTest's (pbkrtest would silently "
                                "refit the model by REML): fit with REML=True")
        s = res.structure
        cp = res.model.backend.crossprod
        if cp is None:                                 # the reference backend works on the rows
            cp = CrossProducts.from_structure(s)
        names, P, Q, K = kr_pieces(s, cp, res.theta, res.sigma)
        Phi = res.vcov.to_numpy()
        PhiA, W = adjusted_vcov(Phi, P, Q, K)
        return cls(names, Phi, PhiA, P, W, res.fixef.to_numpy(), res.sigma)

    # -- the two sums behind every test
    def _A12(self, L: np.ndarray, V0: np.ndarray) -> tuple[float, float]:
        """A₁ = Σ W_rs tr(u_r) tr(u_s), A₂ = Σ W_rs tr(u_r u_s), u_r = ΘV₀P_rV₀, Θ = Lᵀ(LV₀Lᵀ)⁻¹L:
        with LV₀Lᵀ = RRᵀ and J = R⁻¹LV₀, tr(u_r) = tr(JP_rJᵀ) and tr(u_r u_s) = tr(JP_rJᵀJP_sJᵀ).
        NaN when LV₀Lᵀ is singular (a zero contrast)."""
        try:
            R = la.cholesky(L @ V0 @ L.T, lower=True)
        except la.LinAlgError:
            return np.nan, np.nan
        J = la.solve_triangular(R, L @ V0, lower=True)
        Kr = np.einsum("ap,rpq,bq->rab", J, self.P, J)
        tr = np.einsum("raa->r", Kr)
        return float(tr @ self.W @ tr), float(np.einsum("rs,rab,sba->", self.W, Kr, Kr))

    @staticmethod
    def _ddf(A1: float, A2: float, q: int) -> tuple[float, float]:
        """Kenward and Roger's denominator df m and the scaling λ of F (module docstring)."""
        B = (A1 + 6.0 * A2) / (2.0 * q)
        with np.errstate(divide="ignore", invalid="ignore"):
            g = ((q + 1) * A1 - (q + 4) * A2) / ((q + 2) * A2)
            d = 3 * q + 2 * (1 - g)
            c1, c2, c3 = g / d, (q - g) / d, (q + 2 - g) / d
            V0 = 1 + c1 * B
            V0 = 0.0 if abs(V0) < 1e-10 else V0
            V1, V2 = 1 - c2 * B, 1 - c3 * B
            x = 1 - A2 / q
            ratio = 1.0 if (abs(x) < 1e-14 and abs(V1) < 1e-14) else x / V1
            rho = ratio ** 2 * V0 / V2 / q
            m = 4 + (q + 2) / (q * rho - 1)
            scale = 1.0 if abs(m - 2) < 0.01 else m * x / (m - 2)
        return float(m), float(scale)

    def _fstat(self, L, beta) -> tuple[int, float, float, float]:
        """(q, m, λ, F_U) of Lβ = 0 (L reduced to a basis of its rows; q = 0: nothing to test)."""
        L = _row_basis(np.atleast_2d(np.asarray(L, dtype=float)))
        q = L.shape[0]
        if q == 0:
            return 0, np.nan, np.nan, np.nan
        m, scale = self._ddf(*self._A12(L, self.vcov), q)
        Lb = L @ np.asarray(beta, dtype=float)
        FU = float(Lb @ la.solve(L @ self.vcov_adj @ L.T, Lb, assume_a="sym")) / q
        return q, m, scale, FU

    # -- tests
    def df_contrast(self, l) -> float:
        """Kenward–Roger df of the single contrast l β (pbkrtest's ``Lb_ddf(l, vcov(fit),
        vcovAdj(fit))``, as lmerTest's and emmeans' use it); its variance is l Φ_A lᵀ."""
        l = np.asarray(l, dtype=float).reshape(1, -1)
        return self._ddf(*self._A12(l, self.vcov), 1)[0]

    def modcomp(self, L, betaH=0.0) -> pd.DataFrame:
        """pbkrtest's ``KRmodcomp(fit, L, betaH)$test`` for Lβ = Lβ_H: rows ``Ftest`` (the scaled
        F = λ F_U on (q, m) df, ``F.scaling`` λ) and ``FtestU`` (F_U = (L(β̂ − β_H))ᵀ(LΦ_ALᵀ)⁻¹
        (L(β̂ − β_H))/q); columns stat, ndf, ddf, F.scaling, p.value."""
        q, m, scale, FU = self._fstat(L, self.beta - np.broadcast_to(np.asarray(betaH, dtype=float),
                                                                      self.beta.shape))
        if q == 0:
            raise ArgumentError("L has no non-zero row: nothing to test")
        return pd.DataFrame({"stat": [scale * FU, FU], "ndf": [q, q], "ddf": [m, m], "F.scaling": [scale, np.nan],
                             "p.value": [stats.f.sf(scale * FU, q, m), stats.f.sf(FU, q, m)]},
                            index=["Ftest", "FtestU"])

    def ftest(self, L, beta: np.ndarray, sigma: float) -> dict:
        """lmerTest's Kenward–Roger row for Lβ = 0 (``contestMD``): F value = λ F_U, NumDF = q,
        DenDF = m, Pr(>F) from F(q, m), Mean Sq = F_U σ̂², Sum Sq = q Mean Sq (unscaled F_U);
        all NaN when L has no non-zero row."""
        q, m, scale, FU = self._fstat(L, beta)
        if q == 0:
            return dict.fromkeys(["Sum Sq", "Mean Sq", "NumDF", "DenDF", "F value", "Pr(>F)"], np.nan)
        ms = FU * float(sigma) ** 2
        return {"Sum Sq": ms * q, "Mean Sq": ms, "NumDF": q, "DenDF": m, "F value": scale * FU,
                "Pr(>F)": float(stats.f.sf(scale * FU, q, m))}
