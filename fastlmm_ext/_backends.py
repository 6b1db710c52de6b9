"""The criterion backends: one interface, three implementations of lme4's profiled criterion.

Every backend takes the same frozen :class:`ModelStructure` and returns the same
:class:`~fastlmm_ext._pls.PLSState` (β̂, û, b = Λû, r², log-determinants, R_X), so any
difference between them is numerics alone; the criterion itself is computed from the PLS pieces
by ``_pls.profiled_criterion``.

* ``"compiled"`` (:class:`CompiledBackend`): the CHOLMOD kernel over the cross-products of
  [Z X y], symbolic analysis once, numeric refactorization per θ, the gradient from the
  selected inverse of the factor.  The only backend that takes CHOLMOD's ``ordering``.
* ``"blocked"`` (``_blocked.BlockedBackend``): MixedModels.jl's two-block layout, with the
  gradient.
* ``"reference"`` (:class:`ReferenceBackend`): the dense, equation-by-equation NumPy path of
  ``_reference.py``, on the rows; no gradient.
* ``"single"`` (``_single.SingleTermBackend``): one random-effects term, A + I block diagonal,
  closed form per level (compiled, no CHOLMOD), with the gradient.

:class:`Backend` declares every member callers may use, the optional features included as
explicit members (``crossprod`` is None and ``has_gradient`` False where there are none), so no
caller probes a backend for attributes or reaches into its kernel.

``backend="auto"`` takes, of ``"compiled"`` and ``"blocked"`` where both apply, the one with the
lower estimated time per (f, g) evaluation (:func:`choose_backend`, estimates from ``_cost``:
CHOLMOD's symbolic analysis against the dense block's size); a non-default ``ordering`` is a
CHOLMOD option, so with it ``"auto"`` means ``"compiled"``.  ``ordering`` with ``"blocked"``,
``"reference"`` or ``"single"`` is refused.  How the backend was chosen is a :class:`BackendChoice`.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import scipy.linalg as la
import scipy.sparse as sp

from . import _selinv
from ._blocked import BlockedBackend, blocked_applicable
from ._cost import PathCost, blocked_cost, blocked_counts, compiled_cost
from ._crossprod import CrossProducts, full_ZtWZ, kernel_layout, level_blocks
from ._design import ModelStructure
from ._exceptions import ArgumentError
from ._gradient import fd_fallback, theta_gradient
from ._kernel import PLSKernel, symbolic_facts
from ._openmp import openmp_dynamic
from ._pls import PLSState, profiled_criterion, residual_df
from ._reference import ReferencePLS
from ._single import SingleTermBackend, single_term_applicable
from ._threads import active_threads, available_cores, cholmod_blas_threads

__all__ = ["Backend", "CompiledBackend", "ReferenceBackend", "BlockedBackend", "SingleTermBackend", "make_backend",
           "choose_backend", "BackendChoice", "check_backend", "single_term_applicable", "BACKENDS", "ORDERINGS"]

BACKENDS = ("auto", "compiled", "reference", "blocked", "single")
ORDERINGS = ("default", "amd", "natural")


class Backend(Protocol):
    """What every criterion backend provides (:class:`CompiledBackend`, ``BlockedBackend``,
    :class:`ReferenceBackend`, ``SingleTermBackend``).

    ``theta`` arguments are float arrays of length dim θ within the bounds (the model checks
    them).  The compiled and blocked backends keep the factor of the last θ and reuse it when
    asked for that θ again (the state after a fit, the profile's pieces)."""

    name: str                           # "compiled" | "blocked" | "reference" | "single"
    crossprod: CrossProducts | None     # the cross-products of [Z X y]; None for the reference path
    sum_log_w: float                    # Σ log wᵢ over rows of positive weight (0 without weights)
    has_gradient: bool                  # whether gradient() is available
    ordering: str | None                # CHOLMOD's fill-reducing ordering; None without CHOLMOD

    def objective(self, theta: np.ndarray, reml: bool) -> float:
        """lme4's profiled REML criterion or ML deviance at θ (``_pls.profiled_criterion``)."""

    def gradient(self, theta: np.ndarray, reml: bool) -> np.ndarray:
        """∂ objective / ∂θ (``_gradient``); ArgumentError where ``has_gradient`` is False."""

    def state(self, theta: np.ndarray) -> PLSState:
        """The PLS solution at θ."""

    def pls_terms(self, theta: np.ndarray) -> tuple[float, float]:
        """(log|L_θ|², r²(θ)) at θ without the modes (what the profile likelihood needs)."""

    def inverse_blocks(self, theta: np.ndarray, term_index: int) -> np.ndarray:
        """Diagonal k×k blocks of (ΛᵀZᵀWZΛ + I)⁻¹ for every level of one term: (ℓ, k, k)."""

    def solve_L(self, theta: np.ndarray, rhs: np.ndarray) -> np.ndarray:
        """L_θ⁻¹ P rhs for a dense q × m ``rhs``, with P(ΛᵀZᵀWZΛ + I)Pᵀ = L_θ L_θᵀ the factor at θ
        (P the fill-reducing permutation; the blocked path orders its later levels, the reference
        path has P = I), so that ‖L_θ⁻¹ P v‖² = vᵀ(ΛᵀZᵀWZΛ + I)⁻¹v: forward solves, no inverse formed."""

    def with_response(self, s: ModelStructure, crossprod: CrossProducts | None) -> Backend:
        """A backend for other data on the same design (``s`` with the new y, or the rows kept
        by a deletion; ``crossprod`` its cross-products from ``_response``, or ones on the same
        ZᵀWZ pattern with other weights; None for the reference path, which uses ``s``'s rows)."""


class _SharedKernel:
    """A PLSKernel shared by the backends of one design (one per response, see
    :meth:`CompiledBackend.with_response`); ``owner`` is the token of the backend whose response
    the kernel currently holds, ``M`` (its values' array, the full ZᵀWZ) once a gradient or a
    Hessian model has needed it.

    It keeps what the kernel is built from (ZᵀWZ's arrays, the block layout, the ordering), so
    it pickles without CHOLMOD's factor: a copy builds its kernel, and so redoes the symbolic
    analysis, on first use.  ``analysis``: a symbolic analysis of the pattern already made
    (``choose_backend``'s), handed to the first kernel so that the pattern is ordered once."""
    __slots__ = ("M", "owner", "_design", "_kernel", "_threads", "_analysis")

    def __init__(self, s: ModelStructure, cp: CrossProducts, ordering: str, analysis: dict | None = None):
        self._design = (cp.Ap, cp.Ai, cp.Mx, kernel_layout(s), ordering)
        self._kernel, self.owner, self.M, self._threads = None, None, None, None
        self._analysis = analysis

    def kernel_for(self, cp: CrossProducts, token: int) -> PLSKernel:
        """The kernel holding ``cp``'s response and ZᵀWZ values (built from the design on first
        use; ``cp``'s ZᵀWZ has the design's pattern, its values may differ: other weights)."""
        if self._kernel is None:
            openmp_dynamic()
            Ap, Ai, _, (bstart, bsize, toff, Tflat, theta_pos), ordering = self._design
            self._kernel = PLSKernel(Ap, Ai, cp.Mx, bstart, bsize, toff, Tflat, theta_pos, cp.ZtXy, cp.XyXy,
                                     ordering, self._analysis)
            self._analysis = None
        elif self.owner != token:
            self._kernel.set_response(cp.ZtXy, cp.XyXy, cp.Mx)    # drops the factor of the other response
        self.owner = token
        n = active_threads()             # CHOLMOD's OpenMP teams at the fit's thread count (CHOLMOD >= 4)
        if n is not None and n != self._threads:
            self._kernel.set_threads(n)
            self._threads = n
        return self._kernel

    @property
    def ordering(self) -> str:
        return self._design[4]

    def __getstate__(self):
        return self._design

    def __setstate__(self, design) -> None:
        self._design = design
        self._kernel, self.owner, self.M, self._threads, self._analysis = None, None, None, None, None


_tokens = itertools.count()


class CompiledBackend:
    """CHOLMOD kernel: symbolic analysis at construction, numeric refactorization per θ.

    Backends made by :meth:`with_response` share one kernel (and its symbolic analysis); each
    switches the kernel to its own response before using it, so they can be used in any order,
    but not at the same time from several threads.  The kernel remembers the θ of its factor,
    so a factor is reused only when it is the one at the θ asked for, whoever updated it last."""
    name = "compiled"
    has_gradient = True

    def __init__(self, s: ModelStructure, ordering: str = "default", crossprod: CrossProducts | None = None,
                 _shared: _SharedKernel | None = None, analysis: dict | None = None):
        self.s = s
        self.crossprod = crossprod if crossprod is not None else CrossProducts.from_structure(s)
        self._token = next(_tokens)
        self._M_blocks = None    # level blocks of ZᵀWZ, for the one-term gradient
        if _shared is None:
            # analysis: symbolic_facts of this pattern with this ordering, if already made
            _shared = _SharedKernel(s, self.crossprod, ordering, analysis)
            _shared.kernel_for(self.crossprod, self._token)   # the symbolic analysis, now
        self._shared = _shared

    def __getstate__(self) -> dict:
        # The design and this response's cross-products; the kernel is rebuilt from them on first
        # use after loading (see _SharedKernel); a loaded backend gets a token of its process.
        return {"s": self.s, "crossprod": self.crossprod, "_shared": self._shared}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._token = next(_tokens)
        self._M_blocks = None

    @property
    def sum_log_w(self) -> float:
        return self.crossprod.sum_log_w

    @property
    def ordering(self) -> str:
        return self._shared.ordering

    def with_response(self, s: ModelStructure, crossprod: CrossProducts | None) -> CompiledBackend:
        """A backend for another response on the same design (``s`` with the new y, ``crossprod``
        from :func:`~fastlmm_ext._response.response_crossproducts`), sharing this one's kernel."""
        return CompiledBackend(s, crossprod=crossprod, _shared=self._shared)

    @property
    def kernel(self) -> PLSKernel:
        """The kernel, switched to this backend's response if another backend used it last (the
        CHOLMOD-specific part of this backend: its tests read the factor through it)."""
        return self._shared.kernel_for(self.crossprod, self._token)

    def _factor(self, theta: np.ndarray) -> PLSKernel:
        """The kernel with its factor at θ (refactorized unless it is already there)."""
        theta = np.ascontiguousarray(theta, dtype=np.float64)
        kernel = self.kernel
        if not kernel.is_at(theta):
            kernel.update(theta)
        return kernel

    def objective(self, theta: np.ndarray, reml: bool) -> float:
        # An optimiser rarely asks twice for one θ: refactorize without asking the cache.
        k = self.kernel
        k.update(np.ascontiguousarray(theta, dtype=np.float64))
        return profiled_criterion(k.ldL2, k.ldRX2, k.pwrss, self.s.n, self.s.p, reml, self.crossprod.sum_log_w)

    def pls_terms(self, theta: np.ndarray) -> tuple[float, float]:
        k = self._factor(theta)
        return k.ldL2, k.pwrss

    def gradient(self, theta: np.ndarray, reml: bool) -> np.ndarray:
        """∂f/∂θ (see ``_gradient.py``): summed diagonal blocks of (A+I)⁻¹ from the kernel's
        selected inverse (Takahashi recurrences on the CHOLMOD factor), plus H Hᵀ for REML;
        ρ = ZᵀW(ỹ − Xβ̃) − ZᵀWZ Λû from the cross-products."""
        theta = np.ascontiguousarray(theta, dtype=np.float64)
        k = self._factor(theta)
        st = k.state()
        p, cp = self.s.p, self.crossprod
        u = st["u"]
        b = np.empty_like(u)
        for t in self.s.terms:
            sl = slice(t.col_offset, t.col_offset + t.q)
            b[sl] = (u[sl].reshape(t.nlevels, t.k) @ t.T(theta).T).ravel()
        rho = cp.ZtXy[:, p] - cp.ZtXy[:, :p] @ st["beta"] - self.full_ZtWZ() @ b
        H = k.H_REML() if reml else None
        G = []
        for t in self.s.terms:
            if len(self.s.terms) == 1:
                Gt = self._single_term_inverse_sum(t, theta)
            else:
                Gt = _selinv.inverse_blocks(k, t.col_offset, t.k, t.nlevels).sum(axis=0)
            if H is not None and p:
                Ht = H[t.col_offset:t.col_offset + t.q].reshape(t.nlevels, t.k, p)
                Hk = Ht.transpose(1, 0, 2).reshape(t.k, -1)       # Σ_a H_a H_aᵀ as one BLAS product
                Gt = Gt + Hk @ Hk.T
            G.append(Gt)
        g = theta_gradient(self.s, theta, G, rho, u, st["pwrss"], residual_df(self.s.n, p, reml))
        f0 = profiled_criterion(k.ldL2, k.ldRX2, k.pwrss, self.s.n, p, reml, cp.sum_log_w)   # f(θ), known
        return fd_fallback(g, lambda th: self.objective(th, reml), theta, self.s.lower, f0=f0)

    def _single_term_inverse_sum(self, t, theta: np.ndarray) -> np.ndarray:
        """Σ_l (Tᵀ M_l T + I)⁻¹ for a model with one term: A + I is then block diagonal with
        blocks Tᵀ M_l T + I (M_l the level's k×k block of ZᵀWZ), so the diagonal blocks of its
        inverse are k×k inverses (closed form for k ≤ 2), no selected inverse needed."""
        kk = t.k
        if self._M_blocks is None:
            self._M_blocks = level_blocks(self.crossprod, t)
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

    def full_ZtWZ(self) -> sp.csr_matrix:
        """ZᵀWZ as a full symmetric sparse matrix (``_crossprod.full_ZtWZ``), built once per set
        of values and shared by the gradient and the Hessian model."""
        if self._shared.M is None or self._shared.M[0] is not self.crossprod.Mx:
            self._shared.M = (self.crossprod.Mx, full_ZtWZ(self.crossprod, self.s))
        return self._shared.M[1]

    def state(self, theta: np.ndarray) -> PLSState:
        theta = np.ascontiguousarray(theta, dtype=np.float64)
        st = self._factor(theta).state()
        p = self.s.p
        u = st["u"]
        return PLSState(theta=theta.copy(), beta=st["beta"] + self.crossprod.beta_shift, u=u,
                        b=self.s.Lambda_dot(theta, u), pwrss=st["pwrss"], ldL2=st["ldL2"],
                        ldRX2=st["ldRX2"], RX=st["R"][:p, :p].T.copy())

    def inverse_blocks(self, theta: np.ndarray, term_index: int) -> np.ndarray:
        """Diagonal k×k blocks of (Λᵀ ZᵀWZ Λ + I)⁻¹ for every level of one term, from the
        kernel's selected inverse of the factor."""
        t = self.s.terms[term_index]
        return _selinv.inverse_blocks(self._factor(theta), t.col_offset, t.k, t.nlevels)

    def solve_L(self, theta: np.ndarray, rhs: np.ndarray) -> np.ndarray:
        """L⁻¹ P rhs with CHOLMOD's factor at θ (forward solve on the permuted right-hand side)."""
        return self._factor(theta).solve_L(rhs)


class ReferenceBackend:
    """Dense NumPy/SciPy path (see ``_reference.py``); no cross-products, no gradient."""
    name = "reference"
    has_gradient = False
    crossprod = None
    ordering = None

    def __init__(self, s: ModelStructure):
        self.s = s
        self.ref = ReferencePLS(s)

    def __getstate__(self) -> dict:
        return {"s": self.s}     # ReferencePLS holds copies of y and w: rebuilt on load

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["s"])

    @property
    def sum_log_w(self) -> float:
        return self.ref.sum_log_w

    def with_response(self, s: ModelStructure, crossprod: CrossProducts | None = None) -> ReferenceBackend:
        """A backend for another response (``s`` with the new y); the dense path is rebuilt."""
        return ReferenceBackend(s)

    def objective(self, theta: np.ndarray, reml: bool) -> float:
        return self.ref.objective(theta, reml)

    def gradient(self, theta: np.ndarray, reml: bool) -> np.ndarray:
        raise ArgumentError("backend 'reference' has no analytic gradient; use backend='compiled' or 'blocked'")

    def pls_terms(self, theta: np.ndarray) -> tuple[float, float]:
        st = self.ref.solve(theta)
        return st["ldL2"], st["pwrss"]

    def state(self, theta: np.ndarray) -> PLSState:
        st = self.ref.solve(theta)
        return PLSState(theta=np.array(theta, dtype=float), beta=st["beta"], u=st["u"], b=st["b"],
                        pwrss=st["pwrss"], ldL2=st["ldL2"], ldRX2=st["ldRX2"], RX=st["RX"])

    def inverse_blocks(self, theta: np.ndarray, term_index: int) -> np.ndarray:
        L = self.ref.solve(theta)["L"]
        return _blocks_by_solves(self.s, term_index, lambda E: la.solve_triangular(L, E, lower=True))

    def solve_L(self, theta: np.ndarray, rhs: np.ndarray) -> np.ndarray:
        """L⁻¹ rhs with the dense factor (P = I)."""
        L = self.ref.solve(theta)["L"]
        return la.solve_triangular(L, np.asarray(rhs, dtype=float).reshape(self.s.q, -1), lower=True)


def _blocks_by_solves(s: ModelStructure, term_index: int, solve_L, chunk_elems: int = 20_000_000) -> np.ndarray:
    """Diagonal blocks of (L Lᵀ)⁻¹ for one term as Xᵀ X with L X = E (E the term's columns of
    the identity), solved in chunks of at most ``chunk_elems`` entries."""
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


# The dense q₂ × q₂ block of the blocked path (and its inverse) must fit: 6000 columns are 0.3 GB each.
AUTO_BLOCKED_MAX_Q2 = 6000
# A factor with at most this many times ZᵀZ's own lower entries is close to what any ordering can
# give (every factor holds at least those): auto then keeps the pattern's own order (see choose_backend).
NATURAL_FILL = 1.5


@dataclass(frozen=True)
class BackendChoice:
    """How a model's backend was chosen: ``backend`` (the one built), ``requested`` (what was asked
    for), ``reason``; for ``"auto"``, each candidate's estimated seconds per (f, g) evaluation at
    ``threads`` threads (``estimates``, :class:`~fastlmm_ext._cost.PathCost`, with the counts
    behind them: CHOLMOD's fl and lnz, the dense block's q₂, Σ cₐ²)."""
    backend: str
    requested: str
    reason: str
    estimates: tuple[PathCost, ...] = ()
    threads: int | None = None
    #: the symbolic analysis behind a choice of "compiled" by estimate, for :func:`make_backend`
    #: to hand to the kernel (the pattern is then ordered once); None once handed over
    analysis: dict | None = field(default=None, repr=False, compare=False)

    def __str__(self) -> str:
        return f"{self.backend} ({self.reason})"


def choose_backend(s: ModelStructure, backend: str = "auto", *, ordering: str = "default",
                   crossprod: CrossProducts | None = None, threads: int | None = None) -> BackendChoice:
    """The backend for ``backend`` (``"auto"`` resolved) and why.

    ``"auto"``: ``"single"`` for one random-effects term (closed form per level block, no sparse
    factor); ``"compiled"`` where the blocked path does not apply (a vector-valued term after
    the first, more than AUTO_BLOCKED_MAX_Q2 later columns) or an ordering is asked for; else the
    path with the lower estimate of seconds per (f, g) (``_cost``) at ``threads`` threads (None:
    the cores free now): CHOLMOD's from its symbolic analysis of ZᵀZ's pattern (the flops of the
    factor under AMD, which leaves a Zipf-skewed design's heavy levels to the end; its BLAS at
    ``_threads.cholmod_blas_threads``), the blocked path's from its dense q₂ × q₂ block and the
    Gram products that fill it.
    When that picks ``"compiled"``, the choice carries the analysis (``analysis``), and
    :func:`make_backend` given the choice builds the kernel with its permutation as given instead
    of ordering the pattern again (the same factor).  The pattern's own order is analysed first:
    where its factor has at most NATURAL_FILL times ZᵀZ's lower entries (which every ordering's
    factor holds) and its estimate already beats the blocked path's, CHOLMOD's ordering is not
    searched and the kernel keeps that order (nested designs, a slope term crossed with a small
    factor)."""
    check_backend(backend, ordering)
    if backend != "auto":
        return BackendChoice(backend, backend, f"backend={backend!r} given")
    if ordering != "default":
        return BackendChoice("compiled", "auto", f"ordering={ordering!r} is CHOLMOD's")
    if not s.terms:
        return BackendChoice("compiled", "auto", "no random-effects terms")
    if single_term_applicable(s):
        return BackendChoice("single", "auto", "one random-effects term: ZᵀWZ is block diagonal, "
                             "solved in closed form per level")
    if not blocked_applicable(s, max_q2=AUTO_BLOCKED_MAX_Q2):
        why = ("a vector-valued term after the first" if any(t.k > 1 for t in s.terms[1:]) else
               f"more than {AUTO_BLOCKED_MAX_Q2} columns after the first term")
        return BackendChoice("compiled", "auto", f"the blocked path does not apply: {why}")
    cp = crossprod if crossprod is not None else CrossProducts.from_structure(s)
    n = threads if threads is not None else available_cores()
    counts = blocked_counts(s, cp)
    blocked = blocked_cost(counts, n)
    # The pattern's own order (first term's levels, then the later terms') is analysed in a few ms,
    # CHOLMOD's AMD in up to 50 (slope_by_factor's 100k rows).  Where that order's factor is within
    # NATURAL_FILL of ZᵀZ's own entries and already beats the blocked estimate, no ordering could
    # change the choice, and the kernel keeps that order.
    natural = symbolic_facts(cp.Ap, cp.Ai, "natural")
    fill = natural["lnz"] / counts["nnz_lower"]
    nc = cholmod_blas_threads(n)       # CHOLMOD's BLAS may run on fewer (an old OpenBLAS: one)
    compiled = compiled_cost(natural, counts, nc)
    if fill <= NATURAL_FILL and compiled.seconds < blocked.seconds:
        how = f"; CHOLMOD in the pattern's own order (its factor {fill:.2f}× ZᵀZ's entries)"
        facts = natural
    else:
        # AMD alone, not CHOLMOD's default search: that adds METIS where fl/lnz ≥ 500, which cost
        # 85 ms more on crossed200k (161 against 76) and 42 on skewed100k (64 against 22) for a
        # factor no smaller (skewed100k: 3.43e8 flops against AMD's 3.32e8)
        facts, how = symbolic_facts(cp.Ap, cp.Ai, "amd"), ""
        compiled = compiled_cost(facts, counts, nc)
    estimates = (compiled, blocked)
    best = min(estimates, key=lambda e: e.seconds)
    reason = (f"lower estimated time per (f, g) at {n} thread{'s' if n > 1 else ''}: "
              + ", ".join(str(e) for e in estimates) + (how if best.backend == "compiled" else ""))
    return BackendChoice(best.backend, "auto", reason, estimates, n,
                         analysis=facts if best.backend == "compiled" else None)


def check_backend(backend: str, ordering: str = "default") -> None:
    """ArgumentError for an unknown backend or ordering, or an ordering for a backend without
    CHOLMOD (the ordering is CHOLMOD's)."""
    if backend not in BACKENDS:
        raise ArgumentError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if ordering not in ORDERINGS:
        raise ArgumentError(f"unknown ordering {ordering!r}; choose one of {', '.join(ORDERINGS)}")
    if ordering != "default" and backend in ("blocked", "reference", "single"):
        raise ArgumentError(f"ordering={ordering!r} is CHOLMOD's fill-reducing ordering, but backend {backend!r} "
                            "does not use CHOLMOD; use backend='compiled' (or 'auto') with it")


def make_backend(s: ModelStructure, backend: str | BackendChoice = "auto", *, ordering: str = "default",
                 crossprod: CrossProducts | None = None, threads: int | None = None) -> Backend:
    """The backend ``backend`` for structure ``s`` (``crossprod``: its cross-products, if already
    formed).  ``"auto"``: :func:`choose_backend` (at ``threads`` threads).  A
    :class:`BackendChoice` of ``s`` and ``crossprod`` (``choose_backend``'s) builds its backend,
    the compiled kernel from the choice's analysis when it has one."""
    analysis = None
    if isinstance(backend, BackendChoice):
        backend, analysis = backend.backend, backend.analysis
    check_backend(backend, ordering)
    if backend == "reference":
        if not s.has_rows:
            raise ArgumentError("backend 'reference' needs the model's rows; a model built from accumulated "
                                "cross-products (lmer_chunked, Dask) uses backend='auto', 'compiled' or 'blocked'")
        return ReferenceBackend(s)
    if crossprod is None:
        crossprod = CrossProducts.from_structure(s)
    if backend == "auto":
        choice = choose_backend(s, backend, ordering=ordering, crossprod=crossprod, threads=threads)
        backend, analysis = choice.backend, choice.analysis
    if backend == "blocked":
        return BlockedBackend(s, crossprod=crossprod)
    if backend == "single":
        return SingleTermBackend(s, crossprod=crossprod)
    return CompiledBackend(s, ordering=ordering, crossprod=crossprod, analysis=analysis)
