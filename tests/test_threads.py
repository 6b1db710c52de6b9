"""Thread counts of a fit (``_threads``, ``_openmp``): the free cores from affinity, cgroup quota and
other processes' CPU time; every pool set inside a fit and restored after it; ``threads=`` through
every entry point; pool workers at one thread; the same optimum whatever the count."""
from __future__ import annotations

import os
import subprocess
import sys
import time
import warnings

import numpy as np
import pandas as pd
import pytest
from threadpoolctl import threadpool_info

import fastlmm_ext as fl
from conftest import raises_named
from fastlmm_ext import _openmp, _threads, datasets
from fastlmm_ext._parallel import run_tasks
from fastlmm_ext._threads import (active_threads, available_cores, bundled_blas_all_threads, check_threads,
                                  cholmod_blas_threads, fit_threads, limit_process_threads)

SLEEP = "Reaction ~ Days + (Days|Subject)"


def crossed(n=4000, la=120, lb=40, seed=3) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    a, b = rng.integers(0, la, n), rng.integers(0, lb, n)
    x = rng.normal(size=n)
    y = 1 + 0.5 * x + rng.normal(0, 0.8, la)[a] + rng.normal(0, 0.5, lb)[b] + rng.normal(size=n)
    return pd.DataFrame({"y": y, "x": x, "a": a.astype(str), "b": b.astype(str)})


def pool_counts() -> dict[str, int]:
    """Thread count of each BLAS library, 'bundled' (the wheels') or 'system' (CHOLMOD's)."""
    bundled_paths = {lib.filepath for lib in _threads._controllers()[0]}
    out: dict[str, set] = {"bundled": set(), "system": set()}
    for info in threadpool_info():
        if info["user_api"] == "blas":
            out["bundled" if info["filepath"] in bundled_paths else "system"].add(info["num_threads"])
    return {k: (v.pop() if len(v) == 1 else v) for k, v in out.items() if v}


# ----------------------------------------------------------------------------- the argument

def test_check_threads():
    assert check_threads(None) is None
    assert check_threads(1) == 1 and check_threads(np.int64(3)) == 3
    for bad in (0, -1, 1.5, "2", True, [2]):
        with raises_named(fl.ArgumentError, "threads"):
            check_threads(bad)


@pytest.mark.parametrize("bad", [0, "four", 2.5])
def test_entry_points_refuse_bad_threads(bad):
    df = datasets.load("sleepstudy")
    with raises_named(fl.ArgumentError, "threads"):
        fl.lmer(SLEEP, df, threads=bad)
    with raises_named(fl.ArgumentError, "threads"):
        fl.LinearMixedModel(SLEEP, df, threads=bad)
    with raises_named(fl.ArgumentError, "threads"):
        fl.lmer_chunked(SLEEP, [df.iloc[:90], df.iloc[90:]], threads=bad)
    with raises_named(fl.ArgumentError, "threads"):
        fl.fit_many("~ Days + (Days|Subject)", df, ["Reaction"], threads=bad)


# ----------------------------------------------------------------------------- free cores

def test_available_cores_arithmetic(monkeypatch):
    """Free cores = min(affinity, quota) less other processes' busy cores, rounded down, ≥ 1."""
    monkeypatch.setattr(_threads, "_cpus", lambda: {0, 1, 2, 3})
    monkeypatch.setattr(_threads, "_cgroup_cores", lambda: None)
    for busy, want in ((0.0, 4), (0.1, 4), (0.5, 3), (1.0, 3), (2.9, 1), (4.0, 1)):
        monkeypatch.setattr(_threads, "_busy_elsewhere", lambda ncpu, b=busy: b)
        assert available_cores() == want, busy
    monkeypatch.setattr(_threads, "_busy_elsewhere", lambda ncpu: 0.0)
    monkeypatch.setattr(_threads, "_cgroup_cores", lambda: 1.5)       # a quota of 1.5 CPUs: one thread
    assert available_cores() == 1
    monkeypatch.setattr(_threads, "_cgroup_cores", lambda: 2.0)
    assert available_cores() == 2
    monkeypatch.setattr(_threads, "_process_cap", 1)                  # a pool worker
    assert available_cores() == 1


def test_busy_elsewhere_subtracts_own_cpu_time(monkeypatch):
    """Other processes' load is all CPU time on our CPUs less our own, per second of the interval."""
    samples = iter([_threads._CpuSample(10.0, 100.0, 5.0, 1), _threads._CpuSample(12.0, 103.5, 6.5, 1)])
    monkeypatch.setattr(_threads, "_sample", lambda cpus: next(samples))
    monkeypatch.setattr(_threads, "_last_sample", None)
    monkeypatch.setattr(_threads, "_last_busy", None)
    monkeypatch.setattr(_threads, "_own_running", lambda: 1)
    assert _threads._busy_elsewhere(2) == 0.0          # first look: what runs now besides us (nothing)
    assert _threads._busy_elsewhere(2) == pytest.approx((3.5 - 1.5) / 2.0)


def test_stale_interval_counts_what_runs_now(monkeypatch):
    """An interval longer than STALE_AFTER may hide load that began lately: the processes running at
    this moment (less this process's own runnable threads) are a lower bound."""
    samples = iter([_threads._CpuSample(0.0, 0.0, 0.0, 1), _threads._CpuSample(100.0, 10.0, 10.0, 3)])
    monkeypatch.setattr(_threads, "_sample", lambda cpus: next(samples))
    monkeypatch.setattr(_threads, "_last_sample", None)
    monkeypatch.setattr(_threads, "_last_busy", None)
    monkeypatch.setattr(_threads, "_own_running", lambda: 1)
    _threads._busy_elsewhere(2)
    assert _threads._busy_elsewhere(2) == 2.0          # the average says idle; two others run now


def _spin(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


@pytest.mark.skipif(not os.path.exists("/proc/stat") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs /proc/stat and at least two CPUs")
def test_a_busy_process_takes_a_core():
    """With another process spinning, the fit gets at most the other CPUs (here: one of two)."""
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:           # until the loop has run for a while
            with open(f"/proc/{busy.pid}/stat") as fh:
                if int(fh.read().rsplit(")", 1)[1].split()[11]) > 20:    # utime, in ticks
                    break
            time.sleep(0.05)
        available_cores()                            # start an interval now
        time.sleep(0.5)
        assert available_cores() <= len(os.sched_getaffinity(0)) - 1
    finally:
        busy.kill()
        busy.wait()


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs sched_setaffinity")
def test_affinity_of_one_cpu_gives_one_thread():
    cpus = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {min(cpus)})
        assert available_cores() == 1
        with fit_threads() as n:
            assert n == 1
    finally:
        os.sched_setaffinity(0, cpus)


# ----------------------------------------------------------------------------- the pools

@pytest.mark.parametrize("n", [1, 2])
def test_fit_threads_sets_and_restores_every_pool(n):
    before = pool_counts()
    omp_before = _openmp.set_openmp_threads(3)
    try:
        with fit_threads(n) as got:
            assert got == n and active_threads() == n
            inside = pool_counts()
            assert inside["bundled"] == 1                  # the wheels' copies at one thread
            # CHOLMOD's OpenBLAS at n (one under an OpenBLAS with the small-SYRK threading defect)
            assert inside.get("system", cholmod_blas_threads(n)) == cholmod_blas_threads(n)
            if omp_before is not None:
                assert _openmp.set_openmp_threads(n) == n  # this thread's OpenMP count
            with bundled_blas_all_threads():               # a large LAPACK call of the blocked path
                assert pool_counts()["bundled"] == n
            assert pool_counts()["bundled"] == 1
            with fit_threads(5) as nested:                 # nested blocks keep the outer count
                assert nested == n and pool_counts() == inside
        assert active_threads() is None and pool_counts() == before
        if omp_before is not None:
            assert _openmp.set_openmp_threads(omp_before) == 3
    finally:
        if omp_before is not None:
            _openmp.set_openmp_threads(omp_before)


@pytest.mark.parametrize("version, n, want", [
    ("0.3.21", 2, 1), ("0.3.22", 4, 1), ("0.3.23", 2, 2), ("0.3.29", 2, 2), ("0.3.31.188.0", 2, 2),
    ("v0.3.21-dev", 2, 1), (None, 2, 2), ("unknown", 2, 2)])
def test_cholmod_blas_threads_for_openblas_versions(version, n, want):
    """An OpenBLAS before 0.3.23 threads CHOLMOD's small SYRK/TRSM calls to its cost: one thread."""
    class Lib:
        internal_api = "openblas"
    Lib.version = version
    assert _threads._threads_for(Lib(), n) == want

    class Other:
        internal_api, version = "mkl", "2023.0"
    assert _threads._threads_for(Other(), n) == n


def test_all_threads_outside_a_fit_changes_nothing():
    before = pool_counts()
    with bundled_blas_all_threads():
        assert pool_counts() == before


def test_kernel_thread_setting():
    """CHOLMOD ≥ 4 takes an OpenMP cap (Common.nthreads_max); CHOLMOD 3 has none to take."""
    m = fl.LinearMixedModel(SLEEP, datasets.load("sleepstudy"), backend="compiled")
    k = m.backend.kernel
    assert k.set_threads(1) in (True, False)
    with pytest.raises(ValueError):
        k.set_threads(0)


# ----------------------------------------------------------------------------- fits

def test_fit_records_threads_and_optimum_does_not_depend_on_them():
    df = crossed()
    fits = {}
    for n in (1, 2):
        for backend in ("compiled", "blocked"):
            res = fl.lmer("y ~ x + (1|a) + (1|b)", df, backend=backend, threads=n)
            assert res.optsummary.threads == n and res.model.threads == n
            fits[n, backend] = res
    ref = fits[1, "compiled"]
    for res in fits.values():
        assert res.criterion == pytest.approx(ref.criterion, abs=1e-6)
        np.testing.assert_allclose(res.theta, ref.theta, rtol=1e-4, atol=1e-6)
    default = fl.lmer("y ~ x + (1|a) + (1|b)", df)
    assert default.model.threads is None
    assert 1 <= default.optsummary.threads <= len(os.sched_getaffinity(0))


def test_threads_carry_to_refits_and_ml_twins():
    df = datasets.load("sleepstudy")
    m = fl.LinearMixedModel(SLEEP, df, threads=1)
    res = m.fit()
    assert res.refit(df["Reaction"].to_numpy() * 1.5).optsummary.threads == 1
    assert m.ml_twin().threads == 1
    chunked = fl.lmer_chunked(SLEEP, [df.iloc[:90], df.iloc[90:]], threads=1)
    assert chunked.optsummary.threads == 1 and chunked.criterion == pytest.approx(res.criterion, rel=1e-9)


def _worker_threads(state):
    return state


def _report(ctx, task) -> tuple[int, int]:
    with fit_threads() as n:
        return available_cores(), n


def test_pool_workers_use_one_thread():
    """A process-pool worker is one of several processes filling the cores: one thread per fit."""
    out, how = run_tasks(_worker_threads, _report, [0, 1, 2], None, 2)
    assert how == "processes" and all(r == (1, 1) for r in out)


def test_limit_process_threads(monkeypatch):
    monkeypatch.setattr(_threads, "_process_cap", None)
    limit_process_threads(1)
    assert available_cores() == 1
    with fit_threads(2) as n:                      # an explicit count still applies
        assert n == 2
    with raises_named(fl.ArgumentError, "threads"):
        limit_process_threads(0)


def test_fit_many_threads_equal_lmer():
    sleep = datasets.load("sleepstudy")
    rng = np.random.default_rng(4)
    Y = sleep["Reaction"].to_numpy()[:, None] + rng.normal(0, 20, (len(sleep), 4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        one = fl.fit_many("~ Days + (Days|Subject)", sleep, Y, threads=1)
        two = fl.fit_many("~ Days + (Days|Subject)", sleep, Y, n_jobs=2)
        ref = [fl.lmer(SLEEP, sleep.assign(Reaction=Y[:, j]), threads=2).criterion for j in range(4)]
    np.testing.assert_allclose(one["criterion"], ref, rtol=1e-9)
    np.testing.assert_allclose(two["criterion"], ref, rtol=1e-9)


@pytest.mark.parametrize("layout, want", [
    ({"cpu.max": "150000 100000\n"}, 1.5),                                  # v2, root cgroup
    ({"app/cpu.max": "200000 100000\n", "cpu.max": "max 100000\n"}, 2.0),   # v2, this process's cgroup first
    ({"cpu.max": "max 100000\n"}, None),                                     # v2, no quota
    ({"cpu/app/cpu.cfs_quota_us": "50000\n", "cpu/app/cpu.cfs_period_us": "100000\n"}, 0.5),   # v1
    ({"cpu,cpuacct/app/cpu.cfs_quota_us": "-1\n", "cpu,cpuacct/app/cpu.cfs_period_us": "100000\n"}, None),
    ({}, None),                                                               # no cgroup files
])
def test_cgroup_quota_files(tmp_path, layout, want):
    for rel, text in layout.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    own = tmp_path / "self_cgroup"
    own.write_text("12:cpu,cpuacct:/app\n0::/app\n")
    assert _threads._read_cgroup_quota(str(tmp_path), str(own)) == want


def test_the_build_runs_in_the_fit_thread_block(monkeypatch):
    """The structure is built (and chunks reduced) with the bundled BLAS at one thread and the
    fit's count chosen: its small BLAS calls would otherwise wake every OpenBLAS thread, which on a
    busy machine cost InstEval's exact-fit check 20 ms instead of 0.1 ms."""
    from fastlmm_ext import _model
    seen = []
    real_build, real_chunks = _model.build_structure, _model.structure_from_chunks

    def build(*a, **k):
        seen.append((active_threads(), pool_counts()["bundled"]))
        return real_build(*a, **k)

    def chunks(*a, **k):
        seen.append((active_threads(), pool_counts()["bundled"]))
        return real_chunks(*a, **k)
    monkeypatch.setattr(_model, "build_structure", build)
    monkeypatch.setattr(_model, "structure_from_chunks", chunks)
    df = crossed()
    fl.lmer("y ~ x + (1|a) + (1|b)", df, threads=2)
    fl.LinearMixedModel("y ~ x + (1|a) + (1|b)", df, threads=1)
    fl.lmer_chunked("y ~ x + (1|a) + (1|b)", [df.iloc[:2000], df.iloc[2000:]], threads=2)
    assert seen == [(2, 1), (1, 1), (2, 1)]
    assert active_threads() is None
