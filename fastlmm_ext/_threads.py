"""Keep NumPy's and SciPy's bundled OpenBLAS single-threaded while the kernel works.

CHOLMOD links the system OpenBLAS, whose threads do the heavy supernodal work; NumPy and SciPy
wheels bundle their own OpenBLAS with its own thread pool.  In the optimisation loop the two
alternate many times per second on tiny NumPy calls, and each pool's spinning threads steal the
cores from the other (measured on InstEval: gradient 110 ms with both pools threaded, 25 ms with
the bundled pools at one thread).  threadpoolctl limits only the bundled libraries.
"""
from __future__ import annotations

import contextlib

__all__ = ["bundled_blas_single_thread"]

_BUNDLED = ("libscipy_openblas", "libopenblas64_", "libscipy_openblas64_")


@contextlib.contextmanager
def bundled_blas_single_thread():
    """Within the block, the wheels' own OpenBLAS copies use one thread (no-op without threadpoolctl)."""
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # pragma: no cover - threadpoolctl is a dependency
        yield
        return
    ctl = ThreadpoolController()
    bundled = [lib for lib in ctl.lib_controllers
               if lib.internal_api == "openblas" and any(lib.prefix.startswith(p) for p in _BUNDLED)
               and "site-packages" in (lib.filepath or "")]
    saved = [(lib, lib.num_threads) for lib in bundled]
    try:
        for lib in bundled:
            lib.set_num_threads(1)
        yield
    finally:
        for lib, n in saved:
            lib.set_num_threads(n)
