"""What one evaluation of the criterion and its gradient, (f, g), costs on each backend.

``backend="auto"`` takes the backend with the lower estimate (``_backends.choose_backend``).  The
estimates are operation counts read off the structure, converted to seconds with rates measured
on the development machine (2 cores, AVX-512, OpenBLAS 0.3; they matter only as ratios of one
path to the other, which other machines share to a good approximation):

* CHOLMOD (``"compiled"``), from CHOLMOD's own symbolic analysis of ZᵀZ's pattern
  (:func:`~fastlmm_ext._kernel.symbolic_facts`):
    - the factorization's flops fl = Σⱼ cⱼ² (cⱼ the entries of column j of L, CHOLMOD's count),
      in BLAS-3 calls when L is supernodal, in scalar loops when it is simplicial;
    - the gradient's selected inverse: for each supernode of ``nc`` columns and ``r`` rows below
      them, 2·nc·r² flops of products with the block of the inverse already computed, and r²
      entries gathered into that block;
    - per entry of L (the solves of [ZᵀX Zᵀy] and of the modes) and of ZᵀZ (forming ΛᵀZᵀZΛ, the
      gradient's residual ρ).
* The two-block path (``"blocked"``), from the layout (first term: ℓ₁ levels of k columns; q₂
  columns of later scalar terms; cₐ the entries of first-term column a below its block):
    - the dense q₂ × q₂ Schur complement: q₂³/3 flops to factor it (dpotrf), 2q₂³/3 to invert it
      for the gradient (dpotri), and a few passes over its q₂² entries;
    - the sparse Gram products L₂₁L₂₁ᵀ into it and the gradient's trace ⟨S₂₂⁻¹, ·⟩ against them:
      Σₐ cₐ² multiply-adds each (k(k+1)/2 traces for a vector first term), in scalar loops;
    - per level of the first term (its k × k factors, NumPy over (ℓ₁, k, k) arrays) and per entry
      of M₂₁.

Threads (``threads`` of the fit) divide the BLAS-3 parts by the parallel speed-up measured for
them; the scalar and per-entry parts run on one thread.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._crossprod import CrossProducts
from ._design import ModelStructure

__all__ = ["PathCost", "compiled_cost", "blocked_cost", "blocked_counts", "dense_flops"]

# Seconds per unit at one thread (development machine, min of repeated (f, g) evaluations).
DENSE_FLOP = 1.0 / 50e9          # dpotrf / dpotri of a large dense block (OpenBLAS)
SUPER_FLOP = 1.0 / 20e9          # CHOLMOD's supernodal factorization and the selected inverse's products
SIMPLICIAL_FLOP = 1.0 / 1.0e9    # CHOLMOD's simplicial (column by column) factorization
GRAM_MADD = 1.0 / 0.8e9          # one multiply-add of the sparse Gram kernels (_gram.pyx)
GATHER = 2.0e-9                  # one entry of a supernode's ancestor block gathered (selected inverse)
DENSE_ENTRY = 2.0e-9             # one entry of the dense q₂ × q₂ block touched by NumPy (a pass)
DENSE_PASSES = 6                 # passes over the dense block per (f, g): S₂₂ built, scaled, copied, ...
L_ENTRY = 6.0e-9                 # one entry of L per (f, g): solves, assembly, the selected inverse's reads
M_ENTRY = 4.0e-9                 # one entry of ZᵀZ per (f, g): Λᵀ M Λ, ρ
LEVEL = 1.5e-7                   # one level of the first term per (f, g), blocked path (per k³)
CALL = 3.0e-4                    # fixed cost of one (f, g): Python, NumPy calls
# Parallel speed-up of the BLAS-3 parts on n threads: dense LAPACK scales well, CHOLMOD's many
# small supernodes less.
DENSE_SPEEDUP = 0.9
SUPER_SPEEDUP = 0.6


@dataclass(frozen=True)
class PathCost:
    """Estimated seconds per (f, g) evaluation on one backend, and the counts behind them."""
    backend: str
    seconds: float
    counts: dict

    def __str__(self) -> str:
        return f"{self.backend} {self.seconds * 1e3:.3g} ms"


def _speedup(threads: int, efficiency: float) -> float:
    """How many times faster a BLAS-3 part runs on ``threads`` threads than on one."""
    return 1.0 + efficiency * (max(int(threads), 1) - 1)


def dense_flops(q2: int) -> float:
    """Flops of the blocked path's dense work per (f, g): q₂³/3 for dpotrf of S₂₂ and 2q₂³/3 for
    dpotri (its inverse, for the gradient)."""
    return float(q2) ** 3


def blocked_counts(s: ModelStructure, cp: CrossProducts) -> dict:
    """The blocked path's operation counts: q₁, k, ℓ₁, q₂, nnz(M₂₁) and Σₐ cₐ² (cₐ the entries
    of first-term column a below the first block, from ZᵀZ's block-closed lower storage)."""
    t1 = s.terms[0]
    q1 = t1.q
    cols = np.repeat(np.arange(s.q), np.diff(cp.Ap))
    below = (cols < q1) & (cp.Ai >= q1)
    c = np.bincount(cols[below], minlength=q1).astype(float)
    return {"q1": q1, "k": t1.k, "l1": t1.nlevels, "q2": s.q - q1, "nnz21": float(c.sum()),
            "sum_c2": float(np.sum(c * c)), "nnzM": float(cp.Ap[-1])}


def blocked_cost(counts: dict, threads: int = 1) -> PathCost:
    """Seconds per (f, g) on the two-block path (module docstring), from :func:`blocked_counts`."""
    k, q2 = counts["k"], counts["q2"]
    dense = dense_flops(q2) * DENSE_FLOP / _speedup(threads, DENSE_SPEEDUP) if q2 else 0.0
    traces = 1 + k * (k + 1) // 2                    # the S₂₂ update and the gradient's traces
    seconds = (dense + DENSE_PASSES * DENSE_ENTRY * float(q2) ** 2 + traces * GRAM_MADD * counts["sum_c2"]
               + M_ENTRY * (counts["nnzM"] + 2 * counts["nnz21"]) + LEVEL * counts["l1"] * k ** 3 + CALL)
    return PathCost("blocked", seconds, dict(counts))


def compiled_cost(facts: dict, counts: dict, threads: int = 1) -> PathCost:
    """Seconds per (f, g) on the CHOLMOD path (module docstring), from a symbolic analysis's
    :func:`~fastlmm_ext._kernel.symbolic_facts` and ZᵀZ's entries (``counts["nnzM"]``)."""
    fl, lnz = facts["fl"], facts["lnz"]
    if facts["is_super"]:
        nc = facts["super_ncols"].astype(float)
        r = facts["super_nrows"].astype(float) - nc
        blas = (fl + 2.0 * float(np.sum(nc * r * r))) * SUPER_FLOP / _speedup(threads, SUPER_SPEEDUP)
        gather = GATHER * float(np.sum(r * r))
        entries = float(np.sum(nc * (nc + r)))        # stored entries of the supernodal L
    else:
        blas = 3.0 * fl * SIMPLICIAL_FLOP             # factorization, and the selected inverse's recurrences
        gather, entries = 0.0, lnz
    seconds = blas + gather + L_ENTRY * entries + M_ENTRY * counts["nnzM"] + CALL
    out = {"fl": fl, "lnz": lnz, "is_super": bool(facts["is_super"]), "nsuper": int(facts.get("nsuper", 0)),
           "ordering": int(facts["ordering"])}
    return PathCost("compiled", seconds, out)
