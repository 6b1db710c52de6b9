# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Dense kernels of the two-block path: the Cholesky factor of the q₂ × q₂ Schur complement and
the inverse of that factor, blocked by hand over SciPy's BLAS (``scipy.linalg.cython_blas``, the
bundled OpenBLAS, threaded by ``_threads.bundled_blas_all_threads``).

Both are LAPACK's right-looking blocked algorithms with panels of NB columns, in place on the
lower triangle of a Fortran-ordered array (the upper triangle is neither read nor written):

* ``cholesky_lower``, S = L Lᵀ: for each panel j, L_jj = chol(S_jj) (dpotrf on NB columns),
  L_{>j, j} = S_{>j, j} L_jj⁻ᵀ (dtrsm), S_{>j, >j} −= L_{>j, j} L_{>j, j}ᵀ (dsyrk, lower);
* ``invert_lower``, X = L⁻¹, panels from the last: with X_{>j, >j} already inverted,
  X_{>j, j} = −X_{>j, >j} L_{>j, j} L_jj⁻¹ (dtrmm, then dtrsm), X_jj = L_jj⁻¹ (dtrtri on NB columns).

Why not LAPACK's own dpotrf/dtrtri: OpenBLAS replaces them with implementations of its own that,
at these sizes, run at a third of its dsyrk's rate.  Measured (q = 1156, InstEval's block; bundled
OpenBLAS 0.3.30, 2-core Xeon, idle): factor 7.3 ms against dpotrf's 14.1 at two threads, 10.9
against 16.2 at one; inverse 8.6 against dtrtri's 9.2 at two, 13.7 against 19.9 at one; q = 2000:
factor 28.6 against 43.9.  NB = 64 for the factor and 96 for the inverse were the fastest of
32–384 on both sizes, at one thread and at two.

Python checks shapes and dtypes ("Python validates, Cython trusts").
"""
from scipy.linalg.cython_blas cimport dsyrk, dtrmm, dtrsm
from scipy.linalg.cython_lapack cimport dpotrf, dtrtri

cdef enum:
    NB_FACTOR = 64
    NB_INVERSE = 96


def cholesky_lower(double[::1, :] A) -> int:
    """Overwrite the lower triangle of the symmetric positive-definite A (n × n, Fortran order)
    with its Cholesky factor L (A = L Lᵀ).  Returns 0, or k > 0 when the leading minor of order k
    is not positive definite (LAPACK's info; the factor is then incomplete)."""
    cdef int n = A.shape[0], lda = max(A.shape[0], 1), j = 0, jb, m, info = 0
    cdef double one = 1.0, mone = -1.0
    cdef char lo = b'L', right = b'R', trans = b'T', notrans = b'N'
    if A.shape[1] != n:
        raise ValueError(f"cholesky_lower needs a square matrix, got {A.shape[0]} x {A.shape[1]}")
    with nogil:
        while j < n:
            jb = min(<int> NB_FACTOR, n - j)
            dpotrf(&lo, &jb, &A[j, j], &lda, &info)
            if info != 0:
                info += j
                break
            m = n - j - jb
            if m > 0:
                dtrsm(&right, &lo, &trans, &notrans, &m, &jb, &one, &A[j, j], &lda, &A[j + jb, j], &lda)
                dsyrk(&lo, &notrans, &m, &jb, &mone, &A[j + jb, j], &lda, &one, &A[j + jb, j + jb], &lda)
            j += jb
    return info


def invert_lower(double[::1, :] A) -> int:
    """Overwrite the lower triangle of A (n × n, Fortran order; its lower triangle a non-singular
    triangular L) with L⁻¹.  Returns 0, or k > 0 when L's k-th diagonal entry is 0 (LAPACK's info)."""
    cdef int n = A.shape[0], lda = max(A.shape[0], 1), j, jb, m, info = 0
    cdef double one = 1.0, mone = -1.0
    cdef char left = b'L', right = b'R', lo = b'L', notrans = b'N', nonunit = b'N'
    if A.shape[1] != n:
        raise ValueError(f"invert_lower needs a square matrix, got {A.shape[0]} x {A.shape[1]}")
    if n == 0:
        return 0
    with nogil:
        j = ((n - 1) // NB_INVERSE) * NB_INVERSE
        while j >= 0:
            jb = min(<int> NB_INVERSE, n - j)
            m = n - j - jb
            if m > 0:
                dtrmm(&left, &lo, &notrans, &nonunit, &m, &jb, &one, &A[j + jb, j + jb], &lda,
                      &A[j + jb, j], &lda)
                dtrsm(&right, &lo, &notrans, &nonunit, &m, &jb, &mone, &A[j, j], &lda, &A[j + jb, j], &lda)
            dtrtri(&lo, &nonunit, &jb, &A[j, j], &lda, &info)
            if info != 0:
                info += j
                break
            j -= NB_INVERSE
    return info
