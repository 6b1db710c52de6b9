"""The one parallel runner (``_parallel``) of fit_many, the bootstrap and the profile: the worker
count rule, results in task order in every mode, one setup per worker, the thread fallback."""
from __future__ import annotations

import os
import threading

import pytest

import fastlmm_ext as fl
from fastlmm_ext import _parallel
from fastlmm_ext._parallel import n_workers, run_tasks


class Context:
    """A worker's context: counts its own setups (one per worker) and tasks."""

    def __init__(self, state):
        self.offset = state["offset"]
        self.where = (os.getpid(), threading.get_ident())


def work(ctx: Context, task: int) -> tuple:
    if task < 0:
        raise fl.DataError(f"task {task} refused")
    return task * task + ctx.offset, ctx.where


def test_n_workers():
    assert n_workers(1) == 1 and n_workers(3) == 3
    assert n_workers(-1) == (os.cpu_count() or 1)
    assert n_workers(8, ntasks=3) == 3 and n_workers(2, ntasks=0) == 1
    for bad in (0, -2, "two", None):
        with pytest.raises(fl.ArgumentError, match="n_jobs"):
            n_workers(bad)


@pytest.mark.parametrize("workers", [1, 2])
def test_results_in_task_order(workers):
    tasks = list(range(12))
    out, how = run_tasks(Context, work, tasks, {"offset": 0.5}, workers)
    assert how == ("serial" if workers == 1 else "processes")
    assert [r[0] for r in out] == [t * t + 0.5 for t in tasks]
    if workers == 2:
        assert all(r[1][0] != os.getpid() for r in out)            # ran in other processes
        assert len({r[1] for r in out}) <= 2                       # one context per worker


def test_serial_uses_the_callers_context():
    ctx = Context({"offset": 10.0})
    out, how = run_tasks(Context, work, [1, 2], {"offset": 0.0}, 1, local=ctx)
    assert how == "serial" and [r[0] for r in out] == [11.0, 14.0]


def test_threads_where_processes_cannot_start(monkeypatch):
    def no_processes(*args, **kwargs):
        raise OSError("no process pools here")
    monkeypatch.setattr(_parallel, "ProcessPoolExecutor", no_processes)
    tasks = list(range(9))
    counted = []

    class Count:
        def update(self, k):
            counted.append(k)
    out, how = run_tasks(Context, work, tasks, {"offset": 1.0}, 3, progress=Count(), weight=lambda t: t + 1)
    assert how == "threads"
    assert [r[0] for r in out] == [t * t + 1.0 for t in tasks]
    assert {r[1][0] for r in out} == {os.getpid()}
    assert sorted(counted) == [t + 1 for t in tasks]


def test_a_task_error_reaches_the_caller():
    with pytest.raises(fl.DataError, match="task -1 refused"):
        run_tasks(Context, work, [1, -1, 2], {"offset": 0.0}, 2)


def test_a_setup_error_reaches_the_caller():
    with pytest.raises(KeyError, match="offset"):
        run_tasks(Context, work, [1, 2, 3], {}, 2)
