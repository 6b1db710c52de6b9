"""One interface, two implementations of the profiled criterion.

Both backends take the same frozen :class:`ModelStructure` and return the same
:class:`PLSState` (β̂, û, b = Λû, r², log-determinants, R_X), so any difference between them
is numerics alone.  ``"compiled"`` is the CHOLMOD kernel over the cross-products;
``"reference"`` is the dense, equation-by-equation NumPy path of ``_reference.py``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg as la

from ._crossprod import CrossProducts, kernel_layout
from ._design import ModelStructure
from ._reference import ReferencePLS

__all__ = ["PLSState", "CompiledBackend", "ReferenceBackend", "make_backend", "BACKENDS"]

BACKENDS = ("compiled", "reference", "blocked")


@dataclass(frozen=True)
class PLSState:
    """Solution of the penalised least-squares problem at one θ."""
    theta: np.ndarray
    beta: np.ndarray     # β̂(θ)
    u: np.ndarray        # spherical conditional modes û(θ)
    b: np.ndarray        # conditional modes on the original scale, Λ_θ û
    pwrss: float         # r²(θ)
    ldL2: float          # log |L_θ|²
    ldRX2: float         # log |R_X|²
    RX: np.ndarray       # upper-triangular p × p R_X (R_XᵀR_X = Xᵀ W X − R_ZXᵀR_ZX)


def _profiled(ldL2, ldRX2, pwrss, n, p, reml, sum_log_w):
    df = n - p if reml else n
    val = ldL2 - sum_log_w + df * (1.0 + np.log(2.0 * np.pi * pwrss / df))
    return val + ldRX2 if reml else val


class CompiledBackend:
    """CHOLMOD kernel: symbolic analysis at construction, numeric refactorization per θ."""
    name = "compiled"

    def __init__(self, s: ModelStructure, ordering: str = "default", crossprod: CrossProducts | None = None):
        from ._kernel import PLSKernel  # compiled extension; import here so the reference path works without it
        self.s = s
        self.cp = crossprod if crossprod is not None else CrossProducts.from_structure(s)
        bstart, bsize, toff, Tflat, theta_pos = kernel_layout(s)
        self.kernel = PLSKernel(self.cp.Ap, self.cp.Ai, self.cp.Mx, bstart, bsize, toff, Tflat, theta_pos,
                                self.cp.ZtXy, self.cp.XyXy, ordering)

        self._at = None          # θ of the kernel's current factor
        self._M = None           # full symmetric ZᵀWZ, built on the first gradient

    def _update(self, theta: np.ndarray) -> np.ndarray:
        theta = np.ascontiguousarray(theta, dtype=np.float64)
        if self._at is None or not np.array_equal(theta, self._at):
            self._at = None
            self.kernel.update(theta)
            self._at = theta.copy()
        return theta

    def objective(self, theta: np.ndarray, reml: bool) -> float:
        theta = np.ascontiguousarray(theta, dtype=np.float64)
        self._at = None
        val = self.kernel.objective(theta, self.s.n, reml, self.cp.sum_log_w)
        self._at = theta.copy()
        return val

    def gradient(self, theta: np.ndarray, reml: bool) -> np.ndarray:
        """∂f/∂θ (see ``_gradient.py``): summed diagonal blocks of (A+I)⁻¹ from the kernel's
        selected inverse (Takahashi recurrences on the CHOLMOD factor), plus H Hᵀ for REML;
        ρ = ZᵀW(ỹ − Xβ̃) − ZᵀWZ Λû from the cross-products."""
        from ._gradient import theta_gradient
        theta = self._update(theta)
        k = self.kernel
        st = k.state()
        p = self.s.p
        u = st["u"]
        b = np.empty_like(u)
        for t in self.s.terms:
            sl = slice(t.col_offset, t.col_offset + t.q)
            b[sl] = (u[sl].reshape(t.nlevels, t.k) @ t.T(theta).T).ravel()
        rho = self.cp.ZtXy[:, p] - self.cp.ZtXy[:, :p] @ st["beta"] - self._full_M() @ b
        H = k.H_REML() if reml else None
        G = []
        for t in self.s.terms:
            Gt = k.inverse_blocks(t.col_offset, t.k, t.nlevels).sum(axis=0)
            if H is not None and p:
                Ht = H[t.col_offset:t.col_offset + t.q].reshape(t.nlevels, t.k, p)
                Gt = Gt + np.einsum("aim,ajm->ij", Ht, Ht)
            G.append(Gt)
        d = self.s.n - p if reml else self.s.n
        g = theta_gradient(self.s, theta, G, rho, u, st["pwrss"], d)
        bad = np.flatnonzero(np.isnan(g))
        for i in bad:  # singular vector term: no T⁻¹, one-sided difference inwards
            e = np.zeros_like(theta)
            e[i] = 1e-6
            g[i] = (self.objective(theta + e, reml) - self.objective(theta, reml)) / 1e-6
        return g

    def _full_M(self):
        """ZᵀWZ as a full symmetric sparse matrix from its block-closed lower storage (entries
        inside a diagonal level block are stored in both triangles already)."""
        if self._M is None:
            import scipy.sparse as sp
            q = self.s.q
            L = sp.csc_matrix((self.cp.Mx, self.cp.Ai, self.cp.Ap), shape=(q, q))
            bstart = kernel_layout(self.s)[0]
            coo = L.tocoo()
            off = bstart[coo.row] != bstart[coo.col]
            upper = sp.csc_matrix((coo.data[off], (coo.col[off], coo.row[off])), shape=(q, q))
            self._M = (L + upper).tocsr()
        return self._M

    def state(self, theta: np.ndarray) -> PLSState:
        theta = self._update(theta)
        st = self.kernel.state()
        p = self.s.p
        u = st["u"]
        return PLSState(theta=theta.copy(), beta=st["beta"] + self.cp.beta_shift, u=u,
                        b=self.s.Lambda(theta) @ u, pwrss=st["pwrss"], ldL2=st["ldL2"],
                        ldRX2=st["ldRX2"], RX=st["R"][:p, :p].T.copy())

    def inverse_blocks(self, theta: np.ndarray, term_index: int, chunk_elems: int = 20_000_000) -> np.ndarray:
        """Diagonal k×k blocks of (Λᵀ ZᵀWZ Λ + I)⁻¹ for every level of one term, as
        Xᵀ X with L X = P E (E the term's columns of the identity), solved in chunks."""
        self._update(theta)
        t = self.s.terms[term_index]
        return self.kernel.inverse_blocks(t.col_offset, t.k, t.nlevels)


class ReferenceBackend:
    """Dense NumPy/SciPy path (see ``_reference.py``)."""
    name = "reference"

    def __init__(self, s: ModelStructure, **_ignored):
        self.s = s
        self.ref = ReferencePLS(s)

    def objective(self, theta: np.ndarray, reml: bool) -> float:
        return self.ref.objective(theta, reml)

    def state(self, theta: np.ndarray) -> PLSState:
        st = self.ref.solve(theta)
        return PLSState(theta=np.array(theta, dtype=float), beta=st["beta"], u=st["u"], b=st["b"],
                        pwrss=st["pwrss"], ldL2=st["ldL2"], ldRX2=st["ldRX2"], RX=st["RX"])

    def inverse_blocks(self, theta: np.ndarray, term_index: int, chunk_elems: int = 20_000_000) -> np.ndarray:
        L = self.ref.solve(theta)["L"]
        return _blocks_by_solves(self.s, term_index, lambda E: la.solve_triangular(L, E, lower=True), chunk_elems)


def _blocks_by_solves(s: ModelStructure, term_index: int, solve_L, chunk_elems: int) -> np.ndarray:
    t = s.terms[term_index]
    k, nl, q = t.k, t.nlevels, s.q
    out = np.empty((nl, k, k))
    per = max(1, chunk_elems // max(q * k, 1))
    for a0 in range(0, nl, per):
        a1 = min(nl, a0 + per)
        m = (a1 - a0) * k
        E = np.zeros((q, m), order="F")
        E[t.col_offset + a0 * k + np.arange(m), np.arange(m)] = 1.0
        Xs = np.asarray(solve_L(E)).reshape(q, a1 - a0, k)
        out[a0:a1] = np.einsum("ilk,ilm->lkm", Xs, Xs)
    return out


def make_backend(s: ModelStructure, backend: str = "compiled", **options):
    if backend == "compiled":
        return CompiledBackend(s, **options)
    if backend == "reference":
        return ReferenceBackend(s, **options)
    if backend == "blocked":
        from ._blocked import BlockedBackend
        return BlockedBackend(s, **options)
    raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
