"""The OpenMP runtime's settings, through ctypes (CHOLMOD's OpenMP threads).

CHOLMOD ≥ 4 (SuiteSparse 7) runs parts of its supernodal factorization in OpenMP parallel
regions; Debian 12's CHOLMOD 3 (SuiteSparse 5.12) uses OpenMP only in its update routines, which
the kernel does not call.  Two settings keep those regions from oversubscribing the cores:

* dynamic adjustment (:func:`openmp_dynamic`): the runtime may then hand a region fewer threads
  than it asks for, which it does when the cores are busy (libgomp weighs the load average);
* the number of threads (:func:`set_openmp_threads`), which ``_threads.fit_threads`` sets to the
  fit's count.

Both are settings of the calling thread (OpenMP ICVs), so they are applied in the thread that
works; nothing happens where no OpenMP runtime is loaded.
"""
from __future__ import annotations

import ctypes
import os

__all__ = ["openmp_dynamic", "set_openmp_threads"]

_NAMES = ("libgomp.so.1", "libomp.so.5", "libomp.so")
_runtime: list = []      # [the loaded OpenMP runtime or None], looked up once


def _lib():
    if not _runtime:
        lib = None
        for name in _NAMES:
            try:
                cand = ctypes.CDLL(name, mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
            except OSError:
                continue
            if hasattr(cand, "omp_set_num_threads") and hasattr(cand, "omp_get_max_threads"):
                lib = cand
                break
        _runtime.append(lib)
    return _runtime[0]


def openmp_dynamic() -> bool:
    """Turn on OpenMP dynamic thread adjustment in this thread if an OpenMP runtime is loaded;
    True if done."""
    lib = _lib()
    if lib is None or not hasattr(lib, "omp_set_dynamic"):
        return False
    lib.omp_set_dynamic(1)
    return True


def set_openmp_threads(n: int) -> int | None:
    """Set this thread's OpenMP thread count to ``n``; returns the previous count (None, and
    nothing set, where no OpenMP runtime is loaded)."""
    lib = _lib()
    if lib is None:
        return None
    previous = int(lib.omp_get_max_threads())
    if previous != n:
        lib.omp_set_num_threads(int(n))
    return previous
