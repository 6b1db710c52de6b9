"""Build the compiled CHOLMOD kernel (src_c/_kernel.pyx -> fastlmm_ext._kernel), the selected
inverse of its factor (src_c/_selinv.pyx -> fastlmm_ext._selinv, which cimports the kernel's
declarations in src_c/fastlmm_ext/_kernel.pxd) and the sparse Gram kernel of the two-block path
(src_c/_gram.pyx -> fastlmm_ext._gram) and the closed-form kernel of one-term models
(src_c/_blockdiag.pyx -> fastlmm_ext._blockdiag).

CHOLMOD is located, in order, from the environment variables
SUITESPARSE_INCLUDE_DIR / SUITESPARSE_LIBRARY_DIR, from pkg-config (``cholmod``,
shipped by SuiteSparse >= 7), and from the usual system paths
(/usr/include/suitesparse, /usr/local/include/suitesparse, ...).
"""
import os
import shutil
import subprocess
import sys

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup


def _pkg_config(*args):
    if not shutil.which("pkg-config"):
        return []
    try:
        out = subprocess.run(["pkg-config", *args, "cholmod"], capture_output=True, text=True, check=True)
    except (subprocess.CalledProcessError, OSError):
        return []
    return out.stdout.split()


def _cholmod_paths():
    inc = [p for p in os.environ.get("SUITESPARSE_INCLUDE_DIR", "").split(os.pathsep) if p]
    lib = [p for p in os.environ.get("SUITESPARSE_LIBRARY_DIR", "").split(os.pathsep) if p]
    inc += [f[2:] for f in _pkg_config("--cflags-only-I") if f.startswith("-I")]
    lib += [f[2:] for f in _pkg_config("--libs-only-L") if f.startswith("-L")]
    for prefix in (os.environ.get("CONDA_PREFIX"), "/usr/local", "/usr", "/opt/homebrew"):
        if prefix:
            cand = os.path.join(prefix, "include", "suitesparse")
            if os.path.exists(os.path.join(cand, "cholmod.h")):
                inc.append(cand)
                lib.append(os.path.join(prefix, "lib"))
    if not any(os.path.exists(os.path.join(d, "cholmod.h")) for d in inc):
        raise SystemExit(
            "fastlmm_ext: cholmod.h not found. Install SuiteSparse (Debian/Ubuntu: "
            "apt-get install libsuitesparse-dev) or set SUITESPARSE_INCLUDE_DIR and "
            "SUITESPARSE_LIBRARY_DIR.")
    return inc, lib


include_dirs, library_dirs = _cholmod_paths()
# GCC's and Clang's OpenMP flag on Linux (libgomp / libomp); elsewhere the prange loops run serially.
OPENMP = ["-fopenmp"] if sys.platform.startswith("linux") else []

extensions = [
    Extension(
        f"fastlmm_ext.{name}",
        sources=[f"src_c/{name}.pyx"],
        include_dirs=[np.get_include(), "src_c", *include_dirs],
        library_dirs=library_dirs,
        libraries=["cholmod"],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        extra_compile_args=["-O3"],
    )
    for name in ("_kernel", "_selinv")
] + [
    # Sparse Gram products into dense matrices for the two-block path (no CHOLMOD needed); its
    # inverse_gram splits the levels over OpenMP threads (prange; serial where OPENMP is empty).
    Extension(
        "fastlmm_ext._gram",
        sources=["src_c/_gram.pyx"],
        include_dirs=[np.get_include(), "src_c"],     # src_c/include/gram_panel.h
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        extra_compile_args=["-O3", *OPENMP],
        extra_link_args=OPENMP,
    ),
    # The two-block path's dense Cholesky factor and triangular inverse, blocked over SciPy's BLAS.
    Extension(
        "fastlmm_ext._dense",
        sources=["src_c/_dense.pyx"],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        extra_compile_args=["-O3"],
    ),
    # Closed-form PLS of one-term models, block by block (no CHOLMOD).  No contraction into
    # fused multiply-adds: its row sums equal NumPy's bincount and CSR products operation by operation.
    Extension(
        "fastlmm_ext._blockdiag",
        sources=["src_c/_blockdiag.pyx"],
        include_dirs=[np.get_include()],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        extra_compile_args=["-O3", "-ffp-contract=off"],
    ),
]

setup(
    ext_modules=cythonize(
        extensions,
        include_path=["src_c"],
        build_dir="build/cython",
        compiler_directives={"language_level": 3},
    )
)
