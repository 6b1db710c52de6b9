"""Keep CHOLMOD's OpenMP threads from oversubscribing the cores.

Debian's CHOLMOD 5.x asks for a fixed team of CHOLMOD_OMP_NUM_THREADS = 4 OpenMP threads for
the scatter step of its supernodal factorization, whatever the machine has.  On 2 cores those 4
spinning threads and OpenBLAS's own threads take turns, and a factorization with a large dense
supernode runs 1.6x slower (MovieLens-shaped design, 1.47 s → 0.91 s per evaluation).  With
OpenMP's dynamic adjustment on, the runtime may hand out fewer threads than asked, which it does
when the cores are busy.  The setting is per thread (an OpenMP ICV), so it is applied in the
thread that builds a kernel; nothing happens if CHOLMOD was built without OpenMP.
"""
from __future__ import annotations

import ctypes
import os

__all__ = ["openmp_dynamic"]


def openmp_dynamic() -> bool:
    """Turn on OpenMP dynamic thread adjustment in this thread if libgomp is loaded; True if done."""
    for name in ("libgomp.so.1", "libomp.so.5", "libomp.so"):
        try:
            lib = ctypes.CDLL(name, mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
        except OSError:
            continue
        try:
            lib.omp_set_dynamic(1)
            return True
        except AttributeError:  # pragma: no cover - not an OpenMP runtime after all
            continue
    return False
