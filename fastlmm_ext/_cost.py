"""What one evaluation of the criterion and its gradient, (f, g), costs on each backend.

``backend="auto"`` takes the backend with the lower estimate (``_backends.choose_backend``).  The
estimates are operation counts read off the structure, converted to seconds by rates fitted (least
squares on relative error) to the CPU time of one (f, g) at one thread on 29 designs of the
benchmarks (crossed uniform and Zipf-skewed, nested, vector terms, 10³ to 10⁶ rows; 2-core AVX-512
machine, OpenBLAS 0.3, CHOLMOD 3).  Measured again at one thread on eight of the benchmark problems
(insteval, crossed200k, uniform200k, skewed100k, tinyvar100k, slopefactor100k, nested3_100k,
movielens1m; same machine), the CHOLMOD path took 1.3–2.5× its estimate and the blocked path
0.8–1.25× its own, so that at one thread (one core busy) InstEval went to CHOLMOD although the
blocked path was 1.15–1.3× faster.  The error depends on the design: on the 20k-row slope_by_factor
designs of ``benchmarks/generators.py`` the estimated CHOLMOD/blocked ratio is 0.79 and the
measured one 0.66 and 0.89 (seeds 1, 2), so a scale above 1.27 would send them to the blocked
path.  The CHOLMOD estimate is therefore only scaled, by COMPILED_RESCALE = 1.2, which puts
InstEval on the blocked path at one thread (by 12 %) and keeps slope_by_factor on CHOLMOD (by
5 %): the cheaper path at one thread is then picked on the eight problems (slopefactor100k's
paths within 10 % of each other), and on the 27 designs of ``benchmarks/eval_counts.py`` no
choice at one or two threads changed, nor on the eight at two threads.  A re-fit of every rate
on more designs would do better.  The
rates matter only as the ratio of one path to the other, which other machines share to a good
approximation (both paths spend their time in the same kinds of loop and the same BLAS calls).

* CHOLMOD (``"compiled"``), from CHOLMOD's own symbolic analysis of ZᵀZ's pattern
  (:func:`~fastlmm_ext._kernel.symbolic_facts`):
    - supernodal L (supernodes of ``nc`` columns with ``r`` rows below them): Σ nc³ for the dense
      diagonal blocks (their Cholesky factors and, for the gradient, their inverses: nc³/3 + 2nc³/3
      flops), Σ nc·r² for the selected inverse's products with the ancestors' block of the inverse,
      Σ r² entries gathered into that block, and per stored entry of L (the solves of [ZᵀX Zᵀy],
      the modes, the assembly) and of ZᵀZ (forming ΛᵀZᵀZΛ, the gradient's residual ρ);
    - simplicial L (column by column, scalar loops): its flop count fl = Σⱼ cⱼ² (cⱼ the entries of
      column j of L, CHOLMOD's count) and its entries lnz.
* The two-block path (``"blocked"``), from the layout (first term: ℓ₁ levels of k columns; q₂
  columns of later scalar terms; cₐ the entries of first-term column a below its block):
    - the dense q₂ × q₂ Schur complement: q₂³ flops (:func:`dense_flops`, the count the rates were
      fitted with: dpotrf's q₂³/3 and dpotri's 2q₂³/3), and passes over its q₂² entries.  Since
      then the path factors and inverts that block by ``_dense`` (2q₂³/3 flops, about 1.5× faster
      on InstEval's block), so its estimate errs on the dear side: re-measured after that change
      (2 cores, idle), auto stayed within 1.14× of the faster path on seven of those problems (all
      but uniform200k);
    - the sparse Gram products L₂₁L₂₁ᵀ into it and the gradient's traces ⟨S₂₂⁻¹, ·⟩ against them:
      Σₐ cₐ² multiply-adds each (1 + k(k+1)/2 of them), in scalar loops;
    - per entry of ZᵀZ and of M₂₁, and per level of the first term (its k × k factors, NumPy over
      (ℓ₁, k, k) arrays).

Threads (``threads`` of the fit) divide the dense BLAS-3 parts (Σ nc³, q₂³) by the parallel
speed-up assumed for large dense LAPACK calls; the rest is counted at one thread, as it runs
(the blocked gradient's ``_gram.inverse_gram`` included: ``_blocked`` calls it at one thread).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._crossprod import CrossProducts
from ._design import ModelStructure

__all__ = ["PathCost", "compiled_cost", "blocked_cost", "blocked_counts", "dense_flops"]

# Seconds per unit at one thread (fitted, see the module docstring).
DENSE_FLOP = 1.0 / 55e9          # a flop of a large dense Cholesky factor or inverse (either path)
SELINV_MADD = 1.1e-10            # a product of the selected inverse (Σ nc·r²), CHOLMOD path
GATHER = 5.5e-10                 # an entry of a supernode's ancestor block gathered (Σ r²)
SUPER_ENTRY = 1.8e-8             # a stored entry of a supernodal L per (f, g)
M_ENTRY = 5.5e-8                 # an entry of ZᵀZ per (f, g), CHOLMOD path
SUPER_CALL = 8.5e-4              # fixed cost of one (f, g), supernodal CHOLMOD path
SIMPLICIAL_FLOP = 2.0e-9         # a flop of CHOLMOD's simplicial factorization (fl), and its inverse
SIMPLICIAL_ENTRY = 4.1e-8        # an entry of a simplicial L per (f, g)
SIMPLICIAL_CALL = 1.0e-4         # fixed cost of one (f, g), simplicial CHOLMOD path
DENSE_ENTRY = 1.1e-8             # an entry of the dense q₂ × q₂ block per (f, g) (its passes)
GRAM_MADD = 3.6e-10              # a multiply-add of the sparse Gram kernels (_gram.pyx)
BLOCKED_ENTRY = 2.0e-8           # an entry of ZᵀZ or of M₂₁ per (f, g), blocked path
LEVEL = 1.35e-7                  # a level of the first term per (f, g), blocked path (per k³)
BLOCKED_CALL = 1.6e-4            # fixed cost of one (f, g), blocked path
# Parallel efficiency of the large dense LAPACK calls on n threads (speed-up 1 + 0.9 (n − 1)).
DENSE_SPEEDUP = 0.9
# The CHOLMOD estimate's factor from the re-measurement at one thread (module docstring).
COMPILED_RESCALE = 1.2


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
    """The blocked path's dense work per (f, g) in the units DENSE_FLOP was fitted in: q₂³ (then
    dpotrf's q₂³/3 and dpotri's 2q₂³/3; now the factor's and the triangular inverse's q₂³/3 each)."""
    return float(q2) ** 3


def blocked_counts(s: ModelStructure, cp: CrossProducts) -> dict:
    """The blocked path's operation counts: q₁, k, ℓ₁, q₂, nnz(M₂₁) and Σₐ cₐ² (cₐ the entries
    of first-term column a below the first block, from ZᵀZ's block-closed lower storage); also
    ZᵀZ's stored entries (nnzM) and those of its lower triangle (nnz_lower, the least any factor holds)."""
    t1 = s.terms[0]
    q1 = t1.q
    cols = np.repeat(np.arange(s.q), np.diff(cp.Ap))
    below = (cols < q1) & (cp.Ai >= q1)
    c = np.bincount(cols[below], minlength=q1).astype(float)
    return {"q1": q1, "k": t1.k, "l1": t1.nlevels, "q2": s.q - q1, "nnz21": float(c.sum()),
            "sum_c2": float(np.sum(c * c)), "nnzM": float(cp.Ap[-1]),
            "nnz_lower": float(np.count_nonzero(cp.Ai >= cols))}


def blocked_cost(counts: dict, threads: int = 1) -> PathCost:
    """Seconds per (f, g) on the two-block path (module docstring), from :func:`blocked_counts`."""
    k, q2 = counts["k"], counts["q2"]
    dense = dense_flops(q2) * DENSE_FLOP / _speedup(threads, DENSE_SPEEDUP)
    traces = 1 + k * (k + 1) // 2                    # the S₂₂ update and the gradient's traces
    seconds = (dense + DENSE_ENTRY * float(q2) ** 2 + traces * GRAM_MADD * counts["sum_c2"]
               + BLOCKED_ENTRY * (counts["nnzM"] + 2 * counts["nnz21"]) + LEVEL * counts["l1"] * k ** 3
               + BLOCKED_CALL)
    return PathCost("blocked", seconds, dict(counts))


def compiled_cost(facts: dict, counts: dict, threads: int = 1) -> PathCost:
    """Seconds per (f, g) on the CHOLMOD path (module docstring), from a symbolic analysis's
    :func:`~fastlmm_ext._kernel.symbolic_facts` and ZᵀZ's entries (``counts["nnzM"]``)."""
    fl, lnz = facts["fl"], facts["lnz"]
    if facts["is_super"]:
        nc = facts["super_ncols"].astype(float)
        r = facts["super_nrows"].astype(float) - nc
        dense = float(np.sum(nc ** 3)) * DENSE_FLOP / _speedup(threads, DENSE_SPEEDUP)
        seconds = (dense + SELINV_MADD * float(np.sum(nc * r * r)) + GATHER * float(np.sum(r * r))
                   + SUPER_ENTRY * float(np.sum(nc * (nc + r))) + M_ENTRY * counts["nnzM"] + SUPER_CALL)
    else:
        seconds = SIMPLICIAL_FLOP * fl + SIMPLICIAL_ENTRY * lnz + SIMPLICIAL_CALL
    seconds *= COMPILED_RESCALE
    out = {"fl": fl, "lnz": lnz, "is_super": bool(facts["is_super"]), "nsuper": int(facts.get("nsuper", 0)),
           "ordering": int(facts["ordering"])}
    return PathCost("compiled", seconds, out)
