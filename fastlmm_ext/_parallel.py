"""Independent tasks run in parallel: ``fit_many``'s batches of responses, the bootstrap's
replicates and the profile's interval bounds.

One rule for the number of workers (:func:`n_workers`: ``n_jobs`` ≥ 1, or −1 for every core, at
most one per task) and one runner (:func:`run_tasks`):

* each worker builds its context once, ``setup(state)`` (a kernel, a profiler, a model), and then
  runs ``work(context, task)`` for the tasks it is given; the results come back in task order;
* with one worker, in this process (``local`` is its context when the caller already has one);
* with more, in a process pool: ``state`` is pickled once and unpickled by every worker's
  initializer (its BLAS at one thread, and its fits' default ``threads`` one: the pool already
  fills the cores, ``_threads.limit_process_threads``); where processes cannot
  be used (no fork/spawn, a broken pool, something that does not pickle by reference), in a
  thread pool instead, each thread with its own unpickled copy of ``state`` (a kernel is not
  shared between threads; the kernels release the GIL).

``work`` and ``setup`` must be module-level functions (or classes) so that processes can find
them.  The same arithmetic runs on the same inputs whatever the mode, so results do not depend on
``n_jobs``.
"""
from __future__ import annotations

import os
import pickle
import threading
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable, Sequence

from threadpoolctl import threadpool_limits

from ._exceptions import ArgumentError
from ._progress import Progress
from ._threads import fit_threads, limit_process_threads

__all__ = ["n_workers", "run_tasks"]

# What a process pool raises where processes cannot be used: then threads are used instead.
_NO_PROCESSES = (BrokenProcessPool, OSError, NotImplementedError, pickle.PicklingError, AttributeError, ImportError)


def n_workers(n_jobs, ntasks: int | None = None) -> int:
    """Workers for ``n_jobs``: a positive integer, or −1 for every core; at most ``ntasks``."""
    try:
        n = int(n_jobs)
    except (TypeError, ValueError):
        n = 0
    if n == -1:
        n = os.cpu_count() or 1
    if n < 1:
        raise ArgumentError(f"n_jobs must be a positive integer or -1, got {n_jobs!r}")
    return max(1, min(n, ntasks)) if ntasks is not None else n


_CONTEXT: list = []   # a pool process's context (or the error its setup raised), from _init_process


def _init_process(setup: Callable, payload: bytes) -> None:
    threadpool_limits(1)
    limit_process_threads(1)
    try:
        _CONTEXT[:] = [setup(pickle.loads(payload))]
    except Exception as e:  # noqa: BLE001 - re-raised by the first task, so the caller sees it
        _CONTEXT[:] = [e]


def _run_in_process(work: Callable, task) -> Any:
    ctx = _CONTEXT[0]
    if isinstance(ctx, Exception):
        raise ctx
    return work(ctx, task)


def run_tasks(setup: Callable[[Any], Any], work: Callable[[Any, Any], Any], tasks: Sequence, state: Any,
              workers: int, progress: Progress | None = None, weight: Callable[[Any], int] | None = None,
              local: Any = None) -> tuple[list, str]:
    """``[work(ctx, t) for t in tasks]`` with ``ctx = setup(state)`` once per worker (module
    docstring); returns the results in task order and how they ran: "serial", "processes" or
    "threads".  ``progress`` is told ``weight(task)`` (default 1) as each task finishes."""
    done = (lambda t: progress.update(weight(t) if weight is not None else 1)) if progress is not None \
        else (lambda t: None)
    out: list = [None] * len(tasks)
    if workers <= 1 or len(tasks) <= 1:
        ctx = local if local is not None else setup(state)
        for i, t in enumerate(tasks):
            out[i] = work(ctx, t)
            done(t)
        return out, "serial"
    workers = min(workers, len(tasks))
    payload = pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL)
    finished: set[int] = set()
    try:
        with ProcessPoolExecutor(max_workers=workers, initializer=_init_process, initargs=(setup, payload)) as ex:
            futs = {ex.submit(_run_in_process, work, t): i for i, t in enumerate(tasks)}
            for f in as_completed(futs):
                i = futs[f]
                out[i] = f.result()
                finished.add(i)
                done(tasks[i])
        return out, "processes"
    except _NO_PROCESSES:
        pass
    local_ctx = threading.local()

    def run(t):
        if not hasattr(local_ctx, "ctx"):
            local_ctx.ctx = setup(pickle.loads(payload))
        return work(local_ctx.ctx, t)
    # the workers' fits share this process's BLAS pools: one thread each (their fit_threads blocks
    # nest in this one)
    with fit_threads(1), ThreadPoolExecutor(max_workers=workers) as ex:
        futs = {ex.submit(run, t): i for i, t in enumerate(tasks) if i not in finished}
        for f in as_completed(futs):
            i = futs[f]
            out[i] = f.result()
            done(tasks[i])
    return out, "threads"
