"""Quadratic forms of the inverse of the mixed-model equations at the fit, through the factor.

Henderson's mixed-model equations in (β, u), b = Λu, prior weights W, have the coefficient matrix

    A = [ XᵀWX      XᵀWZΛ        ]
        [ ΛᵀZᵀWX    ΛᵀZᵀWZΛ + I  ]

Every backend factors its random-effects block, P(ΛᵀZᵀWZΛ + I)Pᵀ = L Lᵀ (``Backend.solve_L``
solves with L), and the fixed-effects block through R_ZX = L⁻¹PΛᵀZᵀWX and
R_XᵀR_X = XᵀWX − R_ZXᵀR_ZX (the state's R_X).  With u first, A = M Mᵀ for the lower-triangular
M = [[PᵀL, 0], [R_ZXᵀ, R_Xᵀ]], so for g = (g_β, g_u)

    gᵀ A⁻¹ g = ‖w_u‖² + ‖w_β‖²,   L w_u = P g_u,   R_Xᵀ w_β = g_β − R_ZXᵀ w_u:

two triangular solves per column, no inverse formed.  σ̂² T A⁻¹ Tᵀ, T = blockdiag(I_p, Λ), is the
joint covariance of (β̂ − β, b̂ − b) given θ (Henderson's prediction-error covariance; its β block
is Var(β̂) = σ̂²(R_XᵀR_X)⁻¹), so for a row with fixed-effects row x and random-effects row z

    Var(xᵀβ̂ + zᵀb̂ − xᵀβ − zᵀb) = σ̂² gᵀA⁻¹g,   g = (x, Λᵀz),

and for the model's own rows w_i gᵢᵀA⁻¹gᵢ is the i-th diagonal entry of the hat matrix of the
whole (β, u) fit (lme4's ``hatvalues.merMod``: colSums(CL²) + colSums(CR²), CL = L⁻¹PΛᵀZᵀW^½).
"""
from __future__ import annotations

import numpy as np
import scipy.linalg as la
import scipy.sparse as sp

__all__ = ["mme_quadratic", "RZX"]

#: Most entries of one dense block of right-hand sides (q × rows): 32 MB.
CHUNK_ENTRIES = 4_000_000


def _ZtWX(res) -> np.ndarray:
    """ZᵀWX (q × p): from the backend's cross-products, or from the rows (reference path)."""
    cp = res.model.backend.crossprod
    s = res.structure
    if cp is not None:
        return np.asarray(cp.ZtXy[:, :s.p])
    WX = s.X if s.weights is None else s.X * s.weights[:, None]
    return np.asarray(s.Z.T @ WX).reshape(s.q, s.p)


def RZX(res) -> np.ndarray:
    """R_ZX = L⁻¹ P Λᵀ ZᵀWX (q × p) at the fit's θ̂ (module docstring)."""
    s = res.structure
    if not s.p:
        return np.zeros((s.q, 0))
    rhs = np.asfortranarray(s.Lambda(res.theta).T @ _ZtWX(res))
    return np.asarray(res.model.backend.solve_L(res.theta, rhs)).reshape(s.q, s.p)


def mme_quadratic(res, X: np.ndarray, Zt: sp.spmatrix, rzx: np.ndarray | None = None) -> np.ndarray:
    """gᵢᵀ A⁻¹ gᵢ for the rows gᵢ = (xᵢ, Λᵀzᵢ): ``X`` (m × p) the rows' fixed-effects columns,
    ``Zt`` (q × m, sparse) their random-effects columns in the fit's b order (zero where a term
    or column is not used).  Solved in blocks of rows of at most :data:`CHUNK_ENTRIES` entries;
    ``rzx``: :func:`RZX`, if already computed."""
    s = res.structure
    X = np.asarray(X, dtype=float).reshape(-1, s.p)
    m = X.shape[0]
    out = np.empty(m)
    if m == 0:
        return out
    rzx = RZX(res) if rzx is None else rzx
    LtZt = (s.Lambda(res.theta).T @ sp.csc_matrix(Zt)).tocsc()           # Λᵀ zᵢ as columns
    RX = res._state.RX
    per = max(1, CHUNK_ENTRIES // max(s.q, 1))
    for a in range(0, m, per):
        b = min(m, a + per)
        G = LtZt[:, a:b]
        if G.nnz:
            wu = np.asarray(res.model.backend.solve_L(res.theta, np.asfortranarray(G.toarray())))
            wu = wu.reshape(s.q, b - a)
        else:   # no random-effects column in these rows: w_u = 0
            wu = np.zeros((s.q, b - a))
        quad = np.einsum("ij,ij->j", wu, wu)
        if s.p:
            wb = la.solve_triangular(RX, X[a:b].T - rzx.T @ wu, trans="T", lower=False, check_finite=False)
            quad += np.einsum("ij,ij->j", wb, wb)
        out[a:b] = quad
    return out
