"""θ, the covariance parameters: their layout, T and Λ from them, their bounds, start and names,
and the standard deviations and correlations they stand for.

Random-effects term i (k columns, ℓ levels) has a k×k lower-triangular relative covariance
factor T_i, Var(b_i at one level) = σ² T_i T_iᵀ, and Λ_θ = blockdiag_i (I_ℓ ⊗ T_i).  θ stacks
each T_i's lower triangle **column by column**, terms in the model's order (lme4's layout):

    k = 2:  T = [θ₀  0 ]        k = 3:  T = [θ₀  0   0 ]
                [θ₁  θ₂]                    [θ₁  θ₃  0 ]
                                            [θ₂  θ₄  θ₅]

Diagonal elements are bounded below by 0 (lme4's ``lower``), the others are free; lme4 starts at
T = I.  The same positions, on the scale of the data, hold the standard deviations (diagonal) and
correlations (below it) of the term's covariance Σ = σ² T Tᵀ (lme4's ``Cv_to_Sv``; ``Sv_to_Cv``
is the inverse):

    sd_a = √Σ_aa,   cor_ab = Σ_ab / (sd_a sd_b).

A correlation with a zero SD is undefined and given as NaN, as lme4's ``as.data.frame(VarCorr)``
gives NA; a caller that needs a number there (the profile's start) says so where it does.
lme4 keeps these conversions in ``R/vcconv.R``.

The functions take terms with ``k``, ``theta_offset`` and ``ntheta`` (and ``factor``, ``cnms``
for the names), so that the design module and the compiled kernel's layout share them.
"""
from __future__ import annotations

import functools

import numpy as np
import scipy.linalg as la
import scipy.sparse as sp

__all__ = ["tri_indices", "flat_positions", "T_from_theta", "theta_from_T", "term_T", "Lambda", "lower_bounds",
           "theta_start", "theta_names", "theta_kinds", "sd_cor", "Cv_to_Sv", "Sv_to_Cv"]


@functools.lru_cache(maxsize=64)
def tri_indices(k: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column indices of a k×k lower triangle, column by column (θ's order); read-only
    arrays, made once per k."""
    cols, rows = np.triu_indices(k)     # (j, i) with i ≥ j, j slowest: the lower triangle by columns
    rows, cols = rows.astype(np.intp), cols.astype(np.intp)
    rows.flags.writeable = cols.flags.writeable = False
    return rows, cols


@functools.lru_cache(maxsize=64)
def _diagonal(k: int) -> np.ndarray:
    rows, cols = tri_indices(k)
    out = rows == cols
    out.flags.writeable = False
    return out


def flat_positions(k: int) -> np.ndarray:
    """Position of each of a term's θ in its T stored column-major (i + j·k for element [i, j])."""
    rows, cols = tri_indices(k)
    return rows + cols * k


def T_from_theta(values: np.ndarray, k: int) -> np.ndarray:
    """The k×k lower-triangular T whose lower triangle, column by column, is ``values``."""
    T = np.zeros((k, k))
    T[tri_indices(k)] = values
    return T


def theta_from_T(T: np.ndarray) -> np.ndarray:
    """θ of one term: T's lower triangle column by column (inverse of :func:`T_from_theta`)."""
    return np.asarray(T, dtype=float)[tri_indices(T.shape[0])]


def term_T(term, theta: np.ndarray) -> np.ndarray:
    """T of ``term`` at the model's θ."""
    return T_from_theta(theta[term.theta_offset:term.theta_offset + term.ntheta], term.k)


def Lambda(terms, theta: np.ndarray) -> sp.csc_matrix:
    """Λ_θ = blockdiag over terms of (I_ℓ ⊗ T_i), a sparse q × q lower-triangular matrix."""
    blocks = [sp.kron(sp.identity(t.nlevels, format="csc"), sp.csc_matrix(term_T(t, theta)), format="csc")
              for t in terms]
    return sp.block_diag(blocks, format="csc")


def Lambda_dot(terms, theta: np.ndarray, x: np.ndarray, transpose: bool = False) -> np.ndarray:
    """Λ_θ x (or Λ_θᵀ x) for a q-vector or q × m array, level block by level block
    ((I_ℓ ⊗ T) x = per level T x_a), without forming the sparse Λ."""
    x = np.asarray(x, dtype=float)
    out = np.empty_like(x)
    for t in terms:
        sl = slice(t.col_offset, t.col_offset + t.q)
        T = term_T(t, theta)
        if t.k == 1:
            out[sl] = T[0, 0] * x[sl]
            continue
        # one BLAS product over all levels ((ℓ·m) × k times k × k), not a batched einsum
        xa = x[sl].reshape(t.nlevels, t.k, -1)
        out[sl] = np.tensordot(xa, T, axes=([1], [0] if transpose else [1])).transpose(0, 2, 1).reshape(x[sl].shape)
    return out


def lower_bounds(terms) -> np.ndarray:
    """Lower bounds of θ: 0 for diagonal elements of each T, −∞ elsewhere."""
    diag = np.concatenate([_diagonal(t.k) for t in terms]) if terms else np.zeros(0, dtype=bool)
    return np.where(diag, 0.0, -np.inf)


def theta_start(terms) -> np.ndarray:
    """lme4's start: T = I, i.e. 1 on the diagonal of each T and 0 off it."""
    return np.concatenate([_diagonal(t.k) for t in terms]).astype(float) if terms else np.zeros(0)


def theta_names(terms) -> list[str]:
    """lme4's names of θ: 'g.(Intercept)', 'g.Days.(Intercept)', 'g.Days'."""
    return [f"{t.factor}.{t.cnms[i]}" if i == j else f"{t.factor}.{t.cnms[i]}.{t.cnms[j]}"
            for t in terms for i, j in zip(*tri_indices(t.k))]


def theta_kinds(terms) -> list[str]:
    """What each position of θ (and of :func:`Cv_to_Sv`) is: "sd" on a diagonal, "cor" below it."""
    return ["sd" if i == j else "cor" for t in terms for i, j in zip(*tri_indices(t.k))]


def sd_cor(T: np.ndarray, sigma: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """SDs and correlation matrix of Σ = σ² T Tᵀ (NaN correlations where an SD is 0)."""
    S = sigma ** 2 * (T @ T.T)
    sd = np.sqrt(np.maximum(np.diag(S), 0.0))
    with np.errstate(divide="ignore", invalid="ignore"):
        C = S / np.outer(sd, sd)
    C[(sd == 0.0)[:, None] | (sd == 0.0)[None, :]] = np.nan
    np.fill_diagonal(C, 1.0)
    return sd, C


def Cv_to_Sv(terms, theta: np.ndarray, sigma: float = 1.0) -> np.ndarray:
    """θ → per term the SDs (diagonal positions) and correlations (below it) of σ² T Tᵀ, in θ's
    positions (lme4's ``Cv_to_Sv``; module docstring)."""
    out = []
    for t in terms:
        sd, C = sd_cor(term_T(t, theta), sigma)
        rows, cols = tri_indices(t.k)
        out.append(np.where(rows == cols, sd[rows], C[rows, cols]))
    return np.concatenate(out) if out else np.zeros(0)


def Sv_to_Cv(terms, sv: np.ndarray, sigma: float = 1.0) -> np.ndarray:
    """Inverse of :func:`Cv_to_Sv`: per term Σ/σ² = D C D / σ² from the SDs D and correlations C,
    and T its Cholesky factor; a semidefinite Σ (a correlation of ±1, an SD of 0) gets the
    triangular factor of its eigen-square-root, signed to a non-negative diagonal."""
    theta = np.empty(sum(t.ntheta for t in terms))
    for t in terms:
        k, sl = t.k, slice(t.theta_offset, t.theta_offset + t.ntheta)
        rows, cols = tri_indices(k)
        vals = np.asarray(sv[sl], dtype=float)
        diag = rows == cols
        sd = np.zeros(k)
        sd[rows[diag]] = vals[diag]
        C = np.eye(k)
        C[rows[~diag], cols[~diag]] = C[cols[~diag], rows[~diag]] = vals[~diag]
        S = (sd[:, None] * C * sd[None, :]) / sigma ** 2
        try:
            T = np.linalg.cholesky(S)
        except np.linalg.LinAlgError:
            w, V = np.linalg.eigh(S)
            T = la.qr((V * np.sqrt(np.maximum(w, 0.0))).T, mode="r")[0].T
            T = T * np.sign(np.diag(T) + (np.diag(T) == 0))[None, :]
        theta[sl] = theta_from_T(T)
    return theta
