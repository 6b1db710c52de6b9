# Declarations of the compiled PLS kernel (src_c/_kernel.pyx, module fastlmm_ext._kernel), so that
# the selected inverse (src_c/_selinv.pyx) can read its CHOLMOD factor.  The file sits under
# src_c/fastlmm_ext/ because `cimport fastlmm_ext._kernel` must name the module Python imports.
cimport numpy as cnp

from cholmod cimport cholmod_common, cholmod_dense, cholmod_factor, cholmod_sparse


cdef class PLSKernel:
    cdef cholmod_common c
    cdef cholmod_factor *L
    cdef cholmod_sparse A
    cdef cholmod_dense *B
    cdef cholmod_dense *C
    cdef int q, p, nth
    cdef int[::1] Ap, Ai, bstart, bsize, toff, theta_pos
    cdef double[::1] Mx, Ax, Tflat, W
    cdef const double[::1, :] ZtXy, XyXy   # read only: the caller's arrays, replaced by set_response
    cdef double[::1, :] S
    cdef readonly double ldL2, ldRX2, pwrss
    cdef readonly bint has_state
    cdef readonly bint analysis_reused   # built from a handed analysis's permutation (not ordered here)
    cdef object _keep
    cdef dict _facts            # factor_info, read off the symbolic analysis
    cdef object selinv_cache    # (key, Z, layout) of the factor's selected inverse, kept by _selinv

    cdef void _set_theta(self, const double[::1] theta) noexcept nogil
    cdef void _form_A(self) noexcept nogil
    cdef void _lambdat_dense(self, const double[::1, :] src, double *dst, int ncol) noexcept nogil
    cdef double _logdet_L2(self) noexcept nogil
    cdef object _solve(self, int system, cnp.ndarray rhs)
    cdef dict _analyse_given(self, dict analysis)
