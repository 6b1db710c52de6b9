"""One interface, two implementations of the profiled criterion.

Both backends take the same frozen :class:`ModelStructure` and return the same
:class:`PLSState` (β̂, û, b = Λû, r², log-determinants, R_X), so any difference between them
is numerics alone.  ``"compiled"`` is the CHOLMOD kernel over the cross-products;
``"reference"`` is the dense, equation-by-equation NumPy path of ``_reference.py``.
"""
from __future__ import annotations

import itertools

import numpy as np
import scipy.linalg as la

from ._blocked import BlockedBackend, blocked_applicable
from ._crossprod import CrossProducts, kernel_layout, level_blocks
from ._design import ModelStructure
from ._pls import PLSState, profiled_criterion, residual_df
from ._reference import ReferencePLS

__all__ = ["PLSState", "CompiledBackend", "ReferenceBackend", "make_backend", "BACKENDS"]

BACKENDS = ("auto", "compiled", "reference", "blocked")


class _SharedKernel:
    """A PLSKernel shared by the backends of one design (one per response, see
    :meth:`CompiledBackend.with_response`); ``owner`` is the token of the backend whose response
    the kernel currently holds, ``M`` the full ZᵀWZ once a gradient has needed it.

    It keeps what the kernel is built from (ZᵀWZ's arrays, the block layout, the ordering), so
    it pickles without CHOLMOD's factor: a copy builds its kernel, and so redoes the symbolic
    analysis, on first use."""
    __slots__ = ("M", "owner", "_design", "_kernel")

    def __init__(self, s: ModelStructure, cp: CrossProducts, ordering: str):
        self._design = (cp.Ap, cp.Ai, cp.Mx, kernel_layout(s), ordering)
        self._kernel, self.owner, self.M = None, None, None

    def kernel_for(self, cp: CrossProducts, token: int):
        """The kernel holding ``cp``'s response (built from the design on first use)."""
        if self._kernel is None:
            from ._kernel import PLSKernel  # compiled: imported here so the reference path works without it
            from ._openmp import openmp_dynamic
            openmp_dynamic()
            Ap, Ai, Mx, (bstart, bsize, toff, Tflat, theta_pos), ordering = self._design
            self._kernel = PLSKernel(Ap, Ai, Mx, bstart, bsize, toff, Tflat, theta_pos, cp.ZtXy, cp.XyXy, ordering)
        elif self.owner == token:
            return self._kernel
        else:
            self._kernel.set_response(cp.ZtXy, cp.XyXy)
        self.owner = token
        return self._kernel

    def __getstate__(self):
        return self._design

    def __setstate__(self, design) -> None:
        self._design = design
        self._kernel, self.owner, self.M = None, None, None


_tokens = itertools.count()


class CompiledBackend:
    """CHOLMOD kernel: symbolic analysis at construction, numeric refactorization per θ.

    Backends made by :meth:`with_response` share one kernel (and its symbolic analysis); each
    switches the kernel to its own response before using it, so they can be used in any order,
    but not at the same time from several threads."""
    name = "compiled"

    def __init__(self, s: ModelStructure, ordering: str = "default", crossprod: CrossProducts | None = None,
                 _shared: _SharedKernel | None = None):
        self.s = s
        self.cp = crossprod if crossprod is not None else CrossProducts.from_structure(s)
        self._token = next(_tokens)
        self._at = None          # θ of the kernel's current factor
        self._M_blocks = None    # level blocks of ZᵀWZ, for the one-term gradient
        if _shared is None:
            _shared = _SharedKernel(s, self.cp, ordering)
            _shared.kernel_for(self.cp, self._token)   # the symbolic analysis, now
        self._shared = _shared

    def __getstate__(self) -> dict:
        # The design and this response's cross-products; the kernel is rebuilt from them on first
        # use after loading (see _SharedKernel); a loaded backend gets a token of its process.
        return {"s": self.s, "cp": self.cp, "_shared": self._shared}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._token = next(_tokens)
        self._at = None
        self._M_blocks = None

    def with_response(self, s: ModelStructure, crossprod: CrossProducts) -> CompiledBackend:
        """A backend for another response on the same design (``s`` with the new y, ``crossprod``
        from :func:`~fastlmm_ext._response.response_crossproducts`), sharing this one's kernel."""
        return CompiledBackend(s, crossprod=crossprod, _shared=self._shared)

    @property
    def kernel(self):
        """The kernel, switched to this backend's response if another backend used it last."""
        sh = self._shared
        if sh.owner != self._token:
            self._at = None
        return sh.kernel_for(self.cp, self._token)

    def _update(self, theta: np.ndarray) -> np.ndarray:
        theta = np.ascontiguousarray(theta, dtype=np.float64)
        kernel = self.kernel     # first: switching the response forgets the factor's θ
        if self._at is None or not np.array_equal(theta, self._at):
            self._at = None
            kernel.update(theta)
            self._at = theta.copy()
        return theta

    def objective(self, theta: np.ndarray, reml: bool) -> float:
        theta = np.ascontiguousarray(theta, dtype=np.float64)
        kernel = self.kernel
        self._at = None
        kernel.update(theta)
        self._at = theta.copy()
        return profiled_criterion(kernel.ldL2, kernel.ldRX2, kernel.pwrss, self.s.n, self.s.p, reml,
                                  self.cp.sum_log_w)

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
            if len(self.s.terms) == 1:
                Gt = self._single_term_inverse_sum(t, theta)
            else:
                Gt = k.inverse_blocks(t.col_offset, t.k, t.nlevels).sum(axis=0)
            if H is not None and p:
                Ht = H[t.col_offset:t.col_offset + t.q].reshape(t.nlevels, t.k, p)
                Hk = Ht.transpose(1, 0, 2).reshape(t.k, -1)       # Σ_a H_a H_aᵀ as one BLAS product
                Gt = Gt + Hk @ Hk.T
            G.append(Gt)
        d = residual_df(self.s.n, p, reml)
        g = theta_gradient(self.s, theta, G, rho, u, st["pwrss"], d)
        bad = np.flatnonzero(np.isnan(g))
        for i in bad:  # singular vector term: no T⁻¹, one-sided difference inwards
            e = np.zeros_like(theta)
            e[i] = 1e-6
            g[i] = (self.objective(theta + e, reml) - self.objective(theta, reml)) / 1e-6
        return g

    def _single_term_inverse_sum(self, t, theta: np.ndarray) -> np.ndarray:
        """Σ_l (Tᵀ M_l T + I)⁻¹ for a model with one term: A + I is then block diagonal with
        blocks Tᵀ M_l T + I (M_l the level's k×k block of ZᵀWZ), so the diagonal blocks of its
        inverse are k×k inverses (closed form for k ≤ 2), no selected inverse needed."""
        kk = t.k
        if self._M_blocks is None:
            self._M_blocks = level_blocks(self.cp, t)
        M = self._M_blocks
        T = t.T(theta)
        if kk == 1:
            return np.array([[np.sum(1.0 / (T[0, 0] ** 2 * M[:, 0, 0] + 1.0))]])
        if kk == 2:
            # Tᵀ M_l T + I entrywise (T lower triangular), then the 2×2 inverse's entries summed
            (t0, t1), t2 = T[:, 0], T[1, 1]
            m00, m01, m11 = M[:, 0, 0], M[:, 0, 1], M[:, 1, 1]
            a00 = t0 * t0 * m00 + 2.0 * t0 * t1 * m01 + t1 * t1 * m11 + 1.0
            a01 = t2 * (t0 * m01 + t1 * m11)
            a11 = t2 * t2 * m11 + 1.0
            det = a00 * a11 - a01 * a01
            s00, s11, s01 = np.sum(a11 / det), np.sum(a00 / det), -np.sum(a01 / det)
            return np.array([[s00, s01], [s01, s11]])
        A = T.T @ M @ T
        A[:, range(kk), range(kk)] += 1.0
        return np.linalg.inv(A).sum(axis=0)

    def _full_M(self):
        """ZᵀWZ as a full symmetric sparse matrix from its block-closed lower storage (entries
        inside a diagonal level block are stored in both triangles already)."""
        if self._shared.M is None:
            import scipy.sparse as sp
            q = self.s.q
            L = sp.csc_matrix((self.cp.Mx, self.cp.Ai, self.cp.Ap), shape=(q, q))
            bstart = kernel_layout(self.s)[0]
            coo = L.tocoo()
            off = bstart[coo.row] != bstart[coo.col]
            upper = sp.csc_matrix((coo.data[off], (coo.col[off], coo.row[off])), shape=(q, q))
            self._shared.M = (L + upper).tocsr()
        return self._shared.M

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

    def __getstate__(self) -> dict:
        return {"s": self.s}     # ReferencePLS holds copies of y and w: rebuilt on load

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["s"])

    def with_response(self, s: ModelStructure, crossprod: CrossProducts | None = None) -> ReferenceBackend:
        """A backend for another response (``s`` with the new y); the dense path is rebuilt."""
        return ReferenceBackend(s)

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


# "auto" takes the blocked path when the scalar later terms' Schur complement is at least this
# full (counted as Σ over first-term levels of (entries in its column of ZᵀZ's lower-left block)²,
# against q₂²): there, CHOLMOD's supernodal scatter into one large dense supernode is 2x slower
# than forming the dense block column by column (MovieLens shape: 0.85 s → 0.38 s per evaluation;
# crossed 200k: 0.073 → 0.066 s; InstEval 0.020 → 0.015 s).  Nested designs fill nothing: CHOLMOD.
AUTO_BLOCKED_MIN_FILL = 0.25
AUTO_BLOCKED_MAX_Q2 = 6000


def choose_backend(s: ModelStructure, cp: CrossProducts) -> str:
    """``"blocked"`` or ``"compiled"`` for ``backend="auto"`` (see AUTO_BLOCKED_MIN_FILL)."""
    if not s.terms or len(s.terms) < 2 or not blocked_applicable(s, max_q2=AUTO_BLOCKED_MAX_Q2):
        return "compiled"
    q1 = s.terms[0].q
    q2 = s.q - q1
    # entries of each first-term column below the first block (block-closed lower storage)
    cols = np.repeat(np.arange(s.q), np.diff(cp.Ap))
    below = (cols < q1) & (cp.Ai >= q1)
    per_col = np.bincount(cols[below], minlength=q1).astype(float)
    fill = float(np.sum(per_col ** 2)) / float(q2 * q2)
    return "blocked" if fill >= AUTO_BLOCKED_MIN_FILL else "compiled"


def make_backend(s: ModelStructure, backend: str = "compiled", **options):
    if backend == "auto":
        if options.get("crossprod") is None:
            options["crossprod"] = CrossProducts.from_structure(s)
        backend = choose_backend(s, options["crossprod"])
        if backend != "compiled":
            options.pop("ordering", None)
    if backend == "compiled":
        return CompiledBackend(s, **options)
    if backend == "reference":
        return ReferenceBackend(s, **options)
    if backend == "blocked":
        return BlockedBackend(s, **options)
    raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
