"""Thread counts for a fit: every BLAS and OpenMP pool sized from the cores actually free.

A fit's work runs in three pools of threads:

* the system OpenBLAS that CHOLMOD links: its supernodal factorization, and the selected
  inverse's products (``_selinv``);
* the OpenBLAS copies bundled in NumPy's and SciPy's wheels: the blocked path's dense Cholesky
  factor and inverse of the q₂ × q₂ Schur complement, and every small NumPy call;
* OpenMP (libgomp), which CHOLMOD ≥ 4 (SuiteSparse 7) uses in its supernodal factorization
  (CHOLMOD 3, SuiteSparse 5, uses it only in update routines the kernel does not call).  The
  blocked gradient's ``_gram.inverse_gram`` could run on it too, but is called at one thread: it
  follows the triangular inverse on the bundled OpenBLAS's threads (``_dense.invert_lower``),
  whose workers still spin on the other core.

OpenBLAS's threads spin for a while after each call before they sleep, so a thread that finds
no free core does not just wait: it takes the core from the thread it waits for, or from another
process.  With one of two cores busy, a fit whose pools ran two threads each took 2.3× its quiet
time, and one (f, g) evaluation of the 200k crossed design up to 10× under heavier load.  Hence
one thread count n per fit (:func:`fit_threads`), at most the cores free when the fit starts:

* n is the user's ``threads`` when given, else :func:`available_cores`: the CPUs this process may
  run on (its affinity mask and cgroup CPU quota) less the share of them other processes kept
  busy since the last look (``/proc/stat``, this process's own CPU time subtracted), rounded down:
  one thread when one core is free.  A read of a few small files (~0.2 ms), no waiting; made once
  per fit.
* CHOLMOD's OpenBLAS and OpenMP get n, except that an OpenBLAS older than
  :data:`THREADED_SYRK_FIXED` (Debian 12's 0.3.21) gets one thread (:func:`cholmod_blas_threads`):
  its SYRK and TRSM thread calls too small to gain from it, which CHOLMOD's supernodal
  factorization makes by the hundred (OpenBLAS PR #3960, "addresses performance issues seen
  with suitesparse's CHOLMOD").  Measured there (2 cores, idle), one refactorization at one
  thread against two: InstEval 27 against 144–200 ms (median), MovieLens-1M shape 18 against
  51–84, slope_by_factor 100k 17 against 84; only crossed200k's one large dense front gained
  (116 against 97 ms).  The bundled copies stay at one thread (their small calls
  in the optimisation loop would otherwise wake spinning threads: InstEval's gradient took 110 ms
  with both pools threaded, 25 ms with the bundled pools at one thread) except around the blocked
  path's large LAPACK calls (:func:`bundled_blas_all_threads`), where they get n as well.

Switching a count is one C call (~6 µs through threadpoolctl, measured); finding the libraries
(~3 ms, threadpoolctl reads every loaded library) is done once per process.  A worker of a process pool (``_parallel``)
is one of several processes that fill the cores, so its fits default to one thread
(:func:`limit_process_threads`).
"""
from __future__ import annotations

import contextlib
import math
import operator
import os
import threading
import time
from typing import Iterator, NamedTuple

from threadpoolctl import ThreadpoolController

from ._exceptions import ArgumentError
from ._openmp import set_openmp_threads

__all__ = ["fit_threads", "bundled_blas_all_threads", "available_cores", "check_threads", "active_threads",
           "cholmod_blas_threads", "limit_process_threads"]

_BUNDLED = ("libscipy_openblas", "libopenblas64_", "libscipy_openblas64_")

# A core counts as free when other processes used less than FREE_SLACK of it since the last look
# (the rounding of /proc/stat's 10 ms ticks, and a daemon's occasional tick, are not load).
FREE_SLACK = 0.2
# /proc/stat counts in ticks of 10 ms: an interval shorter than this says too little, and the last
# estimate is kept; one longer than STALE_AFTER may hide load that began lately, so the processes
# running at this moment are counted too.
MIN_INTERVAL = 0.1
STALE_AFTER = 2.0


def check_threads(threads) -> int | None:
    """``threads`` as given by a user: None (choose from the free cores) or a positive integer
    (NumPy integers too); anything else is an ArgumentError naming the argument."""
    if threads is None:
        return None
    try:
        if isinstance(threads, bool):
            raise TypeError
        n = operator.index(threads)
    except TypeError:
        raise ArgumentError("threads must be a positive integer or None (choose from the free cores), "
                            f"got {threads!r}") from None
    if n < 1:
        raise ArgumentError(f"threads must be a positive integer or None (choose from the free cores), got {n}")
    return n


# ----------------------------------------------------------------------------- free cores

class _CpuSample(NamedTuple):
    t: float         # monotonic clock, s
    busy: float      # CPU seconds spent by all processes on this process's CPUs
    own: float       # CPU seconds spent by this process (all its threads)
    running: int     # processes runnable at this moment (procs_running), this one included


_sample_lock = threading.Lock()
_last_sample: _CpuSample | None = None
_last_busy: float | None = None         # other processes' load at the last estimate, in cores
_process_cap: int | None = None         # fits in this process use at most this many threads by default
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _cpus() -> set[int]:
    try:
        return os.sched_getaffinity(0)
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return set(range(os.cpu_count() or 1))


_quota_cache: list = []     # [(monotonic time, quota)]: a quota changes rarely, its lookup costs ~0.3 ms
QUOTA_TTL = 30.0


def _cgroup_cores() -> float | None:
    """The CPU quota of this process's cgroup in cores (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``),
    None without a quota; looked up again after QUOTA_TTL seconds."""
    now = time.monotonic()
    if not _quota_cache or now - _quota_cache[0][0] > QUOTA_TTL:
        _quota_cache[:] = [(now, _read_cgroup_quota())]
    return _quota_cache[0][1]


def _read_cgroup_quota(root: str = "/sys/fs/cgroup", self_cgroup: str = "/proc/self/cgroup") -> float | None:
    """The quota in cores from the cgroup files under ``root`` (this process's cgroup first, as
    ``self_cgroup`` names it, then the root's)."""
    paths = ["/"]
    try:
        with open(self_cgroup) as fh:
            for line in fh:
                _, controllers, path = line.rstrip("\n").split(":", 2)
                if controllers in ("", "cpu", "cpu,cpuacct", "cpuacct,cpu"):
                    paths.insert(0, path)
    except (OSError, ValueError):
        pass
    for path in paths:
        path = path.rstrip("/")
        candidates = [(f"{root}{path}/cpu.max", None)]                       # v2: "quota period" or "max period"
        candidates += [(f"{root}/{d}{path}/cpu.cfs_quota_us", f"{root}/{d}{path}/cpu.cfs_period_us")
                       for d in ("cpu", "cpu,cpuacct")]                         # v1: quota -1 when unlimited
        for quota_file, period_file in candidates:
            try:
                with open(quota_file) as fh:
                    fields = fh.read().split()
                if period_file is not None:
                    with open(period_file) as fh:
                        fields.append(fh.read().strip())
            except OSError:
                continue
            if len(fields) < 2 or fields[0] in ("max", "-1"):
                return None
            try:
                quota, period = float(fields[0]), float(fields[1])
            except ValueError:
                return None
            return quota / period if quota > 0 and period > 0 else None
    return None


def _sample(cpus: set[int]) -> _CpuSample | None:
    """One reading of /proc/stat (the lines of ``cpus``) and of this process's CPU time."""
    try:
        with open("/proc/stat", "rb") as fh:
            lines = fh.read().split(b"\n")
    except OSError:
        return None
    t, own = time.monotonic(), time.process_time()
    busy_ticks, running = 0, 1
    want = {b"cpu%d" % c for c in cpus}
    for line in lines:
        if line.startswith(b"cpu") and line[3:4] != b" ":
            f = line.split()
            if f[0] in want:
                # user nice system idle iowait irq softirq steal: everything but idle and iowait
                v = [int(x) for x in f[1:9]]
                busy_ticks += v[0] + v[1] + v[2] + v[5] + v[6] + v[7]
        elif line.startswith(b"procs_running"):
            running = int(line.split()[1])
    return _CpuSample(t, busy_ticks / _TICK, own, running)


def _own_running() -> int:
    """This process's threads that are runnable now (the caller, and OpenBLAS threads still spinning)."""
    n = 0
    try:
        for tid in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{tid}/stat", "rb") as fh:
                    if fh.read().rsplit(b")", 1)[1].split()[0] == b"R":
                        n += 1
            except (OSError, IndexError):
                continue
    except OSError:
        return 1
    return max(n, 1)


def _busy_elsewhere(ncpu: int) -> float:
    """Cores kept busy by other processes: the CPU time all processes spent on this process's
    CPUs since the last look, less this process's own, per second; also the processes runnable
    right now when the last look is old."""
    global _last_sample, _last_busy
    now = _sample(_cpus())
    if now is None:                                   # no /proc/stat: the load average, this process aside
        try:
            return max(0.0, min(float(ncpu), os.getloadavg()[0] - 1.0))
        except (AttributeError, OSError):  # pragma: no cover
            return 0.0
    with _sample_lock:
        last, busy = _last_sample, _last_busy
        if last is not None and now.t - last.t >= MIN_INTERVAL:
            busy = ((now.busy - last.busy) - (now.own - last.own)) / (now.t - last.t)
            busy = max(0.0, min(float(ncpu), busy))
            if now.t - last.t > STALE_AFTER:
                busy = max(busy, float(max(0, now.running - _own_running())))
            _last_sample, _last_busy = now, busy
        elif last is None:
            _last_sample = now
        if busy is None:                              # no interval yet: what runs at this moment
            busy = float(max(0, now.running - _own_running()))
        return min(busy, float(ncpu))


_last_sample = _sample(_cpus())      # the first fit's estimate covers the time since import


def available_cores() -> int:
    """Threads a fit may use now without competing for cores: the CPUs this process may run on
    (affinity mask, cgroup quota), less the cores other processes keep busy, rounded down (one
    thread when only one core is free; at least one); at most :func:`limit_process_threads`'s
    cap in a pool worker."""
    ncpu = len(_cpus()) or 1
    quota = _cgroup_cores()
    limit = min(float(ncpu), quota) if quota is not None else float(ncpu)
    free = limit - _busy_elsewhere(ncpu)
    n = max(1, min(int(limit), int(math.floor(free + FREE_SLACK))))
    return min(n, _process_cap) if _process_cap is not None else n


def limit_process_threads(n: int) -> None:
    """Fits in this process default to at most ``n`` threads (a pool worker: the pool already
    fills the cores with processes); an explicit ``threads=`` still applies."""
    global _process_cap
    _process_cap = check_threads(n)


# ----------------------------------------------------------------------------- the pools

#: The first OpenBLAS release with SYRK's and SYMM's multithreading thresholds reworked for
#: CHOLMOD's calls (OpenBLAS PR #3960, merged after 0.3.22); older ones get one thread under CHOLMOD.
THREADED_SYRK_FIXED = (0, 3, 23)


def _version(text) -> tuple[int, ...] | None:
    """'0.3.21' (or '0.3.31.188.0', 'v0.3.21-dev') → (0, 3, 21, ...); None if unreadable."""
    parts = []
    for field in str(text or "").lstrip("v").split("."):
        digits = ""
        for ch in field:
            if not ch.isdigit():
                break
            digits += ch
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts) if parts else None


def _threads_for(lib, n: int) -> int:
    """n for a system BLAS library under CHOLMOD, 1 for an OpenBLAS older than THREADED_SYRK_FIXED."""
    if getattr(lib, "internal_api", None) == "openblas":
        v = _version(getattr(lib, "version", None))
        if v is not None and v < THREADED_SYRK_FIXED:
            return 1
    return n


def cholmod_blas_threads(n: int) -> int:
    """The threads CHOLMOD's BLAS runs on in a fit of n threads (module docstring): n, or 1 under
    an OpenBLAS whose threading of small SYRK/TRSM calls slows CHOLMOD down."""
    system = _controllers()[1]
    return min((_threads_for(lib, n) for lib in system), default=n)

_libs: tuple[list, list] | None = None


def _controllers() -> tuple[list, list]:
    """(bundled OpenBLAS copies, the system BLAS) controllers, looked up once per process: NumPy's,
    SciPy's and CHOLMOD's libraries are loaded before any fit can start."""
    global _libs
    if _libs is None:
        ctl = ThreadpoolController()
        bundled, system = [], []
        for lib in ctl.lib_controllers:
            if lib.user_api != "blas":
                continue
            if lib.internal_api == "openblas" and any(lib.prefix.startswith(p) for p in _BUNDLED) \
                    and "site-packages" in (lib.filepath or ""):
                bundled.append(lib)
            else:
                system.append(lib)
        _libs = (bundled, system)
    return _libs


_lock = threading.Lock()
_depth = 0              # how many fit_threads blocks are open (any thread)
_active: int | None = None   # the outermost block's thread count
_saved: list = []       # (library controller, thread count) to restore when the outermost block closes


def active_threads() -> int | None:
    """The thread count of the open :func:`fit_threads` block, None outside one."""
    return _active


@contextlib.contextmanager
def fit_threads(threads: int | None = None) -> Iterator[int]:
    """Within the block, the pools are set for a fit of ``threads`` threads (None:
    :func:`available_cores`): the bundled OpenBLAS copies at one, CHOLMOD's OpenBLAS at
    :func:`cholmod_blas_threads` (n), this thread's OpenMP at n.  Yields n.

    Nested blocks, in any thread, keep the outermost block's n and cost a C call: only the
    outermost one chooses n, sets the libraries and restores their counts, so a loop of many
    small fits can open one block around all of them (``fit_many``; sleepstudy on 2 cores:
    10.6 ms → 1.6 ms per fit)."""
    global _depth, _active, _saved
    with _lock:
        if _depth == 0:
            n = check_threads(threads)
            _active = n if n is not None else available_cores()
            bundled, system = _controllers()
            _saved = [(lib, lib.num_threads) for lib in bundled + system]
            for lib in bundled:
                lib.set_num_threads(1)
            for lib in system:
                lib.set_num_threads(_threads_for(lib, _active))
        _depth += 1
        n = _active
    previous = set_openmp_threads(n)      # an OpenMP setting of this thread only
    try:
        yield n
    finally:
        if previous is not None:
            set_openmp_threads(previous)
        with _lock:
            _depth -= 1
            if _depth == 0:
                for lib, count in _saved:
                    lib.set_num_threads(count)
                _saved, _active = [], None


@contextlib.contextmanager
def bundled_blas_all_threads() -> Iterator[None]:
    """Inside a :func:`fit_threads` block, give the bundled OpenBLAS the fit's n threads for one
    large dense LAPACK call (the two-block path's Cholesky factor and inverse of the q₂ × q₂ Schur
    complement; CHOLMOD's OpenBLAS is idle there, so the pools do not compete), and one again
    after it.  Outside a block, nothing changes."""
    n = _active
    bundled = _controllers()[0] if n is not None and n > 1 else []
    for lib in bundled:
        lib.set_num_threads(n)
    try:
        yield
    finally:
        for lib in bundled:
            lib.set_num_threads(1)
