"""The compiled kernel: CHOLMOD errors become exceptions, memory stays flat, the GIL is released."""
from __future__ import annotations

import gc
import threading

import numpy as np
import pytest

import fastlmm_ext as fl
from fastlmm_ext import datasets
from fastlmm_ext._crossprod import CrossProducts, kernel_layout
from fastlmm_ext._kernel import PLSKernel


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        pages = int(fh.read().split()[1])
    import os
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _kernel_inputs():
    m = fl.LinearMixedModel("Reaction ~ Days + (Days|Subject)", datasets.load("sleepstudy"))
    cp = CrossProducts.from_structure(m.structure)
    return m, cp, kernel_layout(m.structure)


def test_no_memory_growth_over_evaluations_and_models():
    m, cp, layout = _kernel_inputs()
    theta = np.array([0.9, 0.1, 0.3])
    for _ in range(200):  # warm up allocator pools
        m.objective(theta)
        m.backend.state(theta)
    gc.collect()
    before = _rss_mb()
    for i in range(20_000):
        m.objective(theta * (1 + 1e-3 * (i % 7)))
    for _ in range(2_000):
        m.backend.state(theta)
    for _ in range(300):
        k = PLSKernel(cp.Ap, cp.Ai, cp.Mx, *layout, cp.ZtXy, cp.XyXy, "default")
        k.update(theta)
        del k
    gc.collect()
    assert _rss_mb() - before < 15.0


def test_not_positive_definite_fixed_block_raises_with_theta():
    m, cp, layout = _kernel_inputs()
    bad = cp.XyXy.copy(order="F")
    bad[1, 1] = -1.0
    k = PLSKernel(cp.Ap, cp.Ai, cp.Mx, *layout, cp.ZtXy, bad, "default")
    with pytest.raises(fl.NotPositiveDefiniteError, match="theta") as e:
        k.update(np.array([1.0, 0.0, 1.0]))
    assert e.value.theta is not None


def test_bad_kernel_arguments():
    m, cp, layout = _kernel_inputs()
    with pytest.raises(ValueError, match="ordering"):
        PLSKernel(cp.Ap, cp.Ai, cp.Mx, *layout, cp.ZtXy, cp.XyXy, "bogus")
    k = PLSKernel(cp.Ap, cp.Ai, cp.Mx, *layout, cp.ZtXy, cp.XyXy, "default")
    with pytest.raises(ValueError, match="length"):
        k.update(np.array([1.0]))
    with pytest.raises(RuntimeError, match="update"):
        k.state()


def test_kernel_is_usable_from_threads():
    """The numeric work runs without the GIL; separate models in threads give the same values."""
    df = datasets.load("sleepstudy")
    models = [fl.LinearMixedModel("Reaction ~ Days + (Days|Subject)", df) for _ in range(2)]
    want = models[0].objective([0.9, 0.1, 0.3])
    out = [None, None]

    def work(i):
        out[i] = [models[i].objective([0.9, 0.1, 0.3]) for _ in range(500)][-1]
    ts = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    assert out == [want, want]


def test_convergence_problem_warns():
    df = datasets.load("sleepstudy")
    with pytest.warns(fl.ConvergenceWarning):
        res = fl.lmer("Reaction ~ Days + (Days|Subject)", df, maxeval=5)
    assert not res.converged
    assert res.optsummary.feval == 5
    assert any("MAXEVAL" in m or "converge" in m for m in res.messages)
