"""Keep NumPy's and SciPy's bundled OpenBLAS single-threaded while the kernel works.

CHOLMOD links the system OpenBLAS, whose threads do the heavy supernodal work; NumPy and SciPy
wheels bundle their own OpenBLAS with its own thread pool.  In the optimisation loop the two
alternate many times per second on tiny NumPy calls, and each pool's spinning threads steal the
cores from the other (measured on InstEval: gradient 110 ms with both pools threaded, 25 ms with
the bundled pools at one thread).  threadpoolctl limits only the bundled libraries.
"""
from __future__ import annotations

import contextlib
import threading

from threadpoolctl import ThreadpoolController

__all__ = ["bundled_blas_single_thread"]

_BUNDLED = ("libscipy_openblas", "libopenblas64_", "libscipy_openblas64_")


_lock = threading.Lock()
_depth = 0            # how many bundled_blas_single_thread blocks are open (any thread)
_saved: list = []     # (library controller, thread count) to restore when the outermost block closes


@contextlib.contextmanager
def bundled_blas_single_thread():
    """Within the block, the wheels' own OpenBLAS copies use one thread (no-op without threadpoolctl).

    Nested blocks cost nothing: only the outermost one looks the libraries up (a few ms, it reads
    the loaded libraries) and restores their thread counts, so a loop of many small fits can open
    one block around all of them (``fit_many``; sleepstudy on 2 cores: 10.6 ms → 1.6 ms per fit)."""
    global _depth, _saved
    with _lock:
        if _depth == 0:
            _saved = _limit_bundled()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                for lib, n in _saved:
                    lib.set_num_threads(n)
                _saved = []


_bundled_libs: list | None = None


def _bundled() -> list:
    """The bundled OpenBLAS controllers, looked up once per process (the lookup reads every
    loaded library, ~3 ms; NumPy's and SciPy's copies are loaded before any fit can start)."""
    global _bundled_libs
    if _bundled_libs is None:
        ctl = ThreadpoolController()
        _bundled_libs = [lib for lib in ctl.lib_controllers
                         if lib.internal_api == "openblas" and any(lib.prefix.startswith(p) for p in _BUNDLED)
                         and "site-packages" in (lib.filepath or "")]
    return _bundled_libs


def _limit_bundled() -> list:
    bundled = _bundled()
    saved = [(lib, lib.num_threads) for lib in bundled]
    for lib in bundled:
        lib.set_num_threads(1)
    return saved


@contextlib.contextmanager
def bundled_blas_all_threads():
    """Inside a :func:`bundled_blas_single_thread` block, give the bundled OpenBLAS back its
    usual thread count for one large dense LAPACK call (the two-block path's Cholesky and
    inverse of the q₂ × q₂ Schur complement; CHOLMOD's OpenBLAS is idle there, so the two pools
    do not compete).  Costs one C call per library, no library lookup."""
    with _lock:
        saved = list(_saved) if _depth > 0 else []
    for lib, n in saved:
        lib.set_num_threads(n)
    try:
        yield
    finally:
        for lib, _ in saved:
            lib.set_num_threads(1)
