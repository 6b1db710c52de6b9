"""The single-term backend: one random-effects term, A + I block diagonal, closed form per level.

With one term (k columns, ℓ levels), Λ = I_ℓ ⊗ T and ZᵀWZ = blockdiag_l(M_l), so

    L_θ L_θᵀ = ΛᵀZᵀWZΛ + I = blockdiag_l(Tᵀ M_l T + I):

the Cholesky factor, the solves for c_u and R_ZX, r², β̂, û and the diagonal blocks of
(A + I)⁻¹ that the gradient and condVar need are ℓ independent k×k problems.  The compiled
kernel ``_blockdiag.BlockDiagPLS`` does them in one pass over the levels (no sparse matrices, no
CHOLMOD, no symbolic analysis); this module puts it behind the :class:`~._backends.Backend`
interface.  The profiled criterion is ``_pls.profiled_criterion`` of the kernel's pieces and the
gradient ``_gradient.term_gradient`` of its Σ_l ρ_l û_lᵀ and Σ_l (Tᵀ M_l T + I)⁻¹ (+ Σ_l H_l H_lᵀ
for REML), as for the other backends.
"""
from __future__ import annotations

import numpy as np

from ._blockdiag import BlockDiagPLS
from ._crossprod import CrossProducts, level_blocks
from ._design import ModelStructure
from ._exceptions import ArgumentError
from ._gradient import fd_fallback, term_gradient
from ._pls import PLSState, profiled_criterion, residual_df

__all__ = ["SingleTermBackend", "single_term_applicable"]


def single_term_applicable(s: ModelStructure) -> bool:
    """The single-term backend fits models with exactly one random-effects term (any k)."""
    return len(s.terms) == 1


class SingleTermBackend:
    """Criterion, gradient, modes and conditional variances of a one-term model from the level
    blocks of its cross-products (module docstring); the members of ``_backends.Backend``.

    The kernel keeps the factor pieces of the last θ, so ``state``, ``gradient`` and
    ``inverse_blocks`` at the θ of the last ``objective`` reuse them."""
    name = "single"
    has_gradient = True
    ordering = None
    # No Newton steps on _hessian's model: its NumPy passes over q-vectors cost 3-5 of this
    # path's compiled (f, g) (slope500k: 50 ms against 10-15 ms), so the BFGS updates' 7
    # evaluations take less time than its 3 (0.14 s against 0.35 s).
    hessian_model = False

    def __init__(self, s: ModelStructure, crossprod: CrossProducts | None = None, _M: np.ndarray | None = None):
        if not single_term_applicable(s):
            raise ArgumentError(f"backend 'single' needs exactly one random-effects term; this model has "
                                f"{len(s.terms)}: use backend='compiled' or 'auto'")
        self.s = s
        cp = crossprod if crossprod is not None else CrossProducts.from_structure(s)
        self.crossprod = cp
        t = s.terms[0]
        # M_l is shared by every response on the design (with_response); W_l and [X ỹ]ᵀW[X ỹ] are the response's
        self._M = np.ascontiguousarray(level_blocks(cp, t)) if _M is None else _M
        W = np.ascontiguousarray(cp.ZtXy).reshape(t.nlevels, t.k, s.p + 1)
        self._pls = BlockDiagPLS(self._M, W, np.ascontiguousarray(cp.XyXy))

    def __getstate__(self) -> dict:
        return {"s": self.s, "crossprod": self.crossprod}     # the kernel is rebuilt from them on load

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["s"], crossprod=state["crossprod"])

    @property
    def sum_log_w(self) -> float:
        return self.crossprod.sum_log_w

    def with_response(self, s: ModelStructure, crossprod: CrossProducts | None) -> SingleTermBackend:
        """A backend for other data on the same design: the level blocks M_l are shared when
        ``crossprod`` carries this ZᵀWZ (another response), rebuilt from it otherwise (other weights)."""
        cp = crossprod if crossprod is not None else CrossProducts.from_structure(s)
        return SingleTermBackend(s, crossprod=cp, _M=self._M if cp.Mx is self.crossprod.Mx else None)

    def _at(self, theta: np.ndarray) -> BlockDiagPLS:
        theta = np.ascontiguousarray(theta, dtype=np.float64)
        if not self._pls.is_at(theta):
            self._pls.update(theta)
        return self._pls

    def objective(self, theta: np.ndarray, reml: bool) -> float:
        k = self._pls
        k.update(np.ascontiguousarray(theta, dtype=np.float64))
        return profiled_criterion(k.ldL2, k.ldRX2, k.pwrss, self.s.n, self.s.p, reml, self.crossprod.sum_log_w)

    def pls_terms(self, theta: np.ndarray) -> tuple[float, float]:
        k = self._at(theta)
        return k.ldL2, k.pwrss

    def gradient(self, theta: np.ndarray, reml: bool) -> np.ndarray:
        """∂f/∂θ (``_gradient``) from the kernel's Σ ρ_l û_lᵀ and summed inverse blocks."""
        theta = np.ascontiguousarray(theta, dtype=np.float64)
        k = self._at(theta)
        _, _, PU, G = k.solve(True, reml)
        g = term_gradient(self.s.terms[0], theta, G, PU, k.pwrss, residual_df(self.s.n, self.s.p, reml))
        return fd_fallback(g, lambda th: self.objective(th, reml), theta, self.s.lower)

    def state(self, theta: np.ndarray) -> PLSState:
        theta = np.ascontiguousarray(theta, dtype=np.float64)
        k = self._at(theta)
        beta, u, _, _ = k.solve(False, False)
        t = self.s.terms[0]
        b = (u.reshape(t.nlevels, t.k) @ t.T(theta).T).ravel()          # b_l = T û_l  (Λ = I ⊗ T)
        p = self.s.p
        return PLSState(theta=theta.copy(), beta=beta + self.crossprod.beta_shift, u=u, b=b, pwrss=k.pwrss,
                        ldL2=k.ldL2, ldRX2=k.ldRX2, RX=k.R_factor()[:p, :p].T.copy())

    def solve_L(self, theta: np.ndarray, rhs: np.ndarray) -> np.ndarray:
        """L_θ⁻¹ rhs (P = I) with the per-level factors of Tᵀ M_l T + I, for a q × m ``rhs``."""
        B = np.ascontiguousarray(np.asarray(rhs, dtype=np.float64).reshape(self.s.q, -1))
        return self._at(theta).solve_L(B)

    def inverse_blocks(self, theta: np.ndarray, term_index: int) -> np.ndarray:
        """(Tᵀ M_l T + I)⁻¹ for every level l: the diagonal blocks of (ΛᵀZᵀWZΛ + I)⁻¹."""
        if term_index != 0:
            raise ArgumentError(f"term_index {term_index} out of range: the model has one random-effects term")
        return self._at(theta).inverse_blocks()
