"""eval_counts.py: the evaluation log, the best criterion (against lme4's tight optimum) and the
check's exit status."""
import json
import os
import pathlib
import sys

import numpy as np
import pytest

BENCH = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(BENCH))

import eval_counts  # noqa: E402
from eval_counts import EvalLog, best_criterion, record  # noqa: E402

import fastlmm_ext as fl  # noqa: E402

REFERENCE = pathlib.Path(os.environ.get("FASTLMM_REFERENCE_DIR", BENCH.parents[1] / "shared" / "reference"))


class _Quadratic:
    """A stand-in backend: f(θ) = |θ|², ∇f = 2θ."""
    def objective(self, theta, reml):
        return float(np.sum(np.asarray(theta) ** 2))

    def gradient(self, theta, reml):
        return 2 * np.asarray(theta)


def test_log_counts_calls_and_repeated_theta_and_passes_values_through():
    be = _Quadratic()
    log = EvalLog()
    log.attach(be)
    assert be.objective(np.array([1.0, 2.0]), True) == 5.0
    np.testing.assert_array_equal(be.gradient(np.array([1.0, 2.0]), True), [2.0, 4.0])
    be.objective(np.array([1.0, 2.0]), True)          # the same θ again: one repeat
    be.objective(np.array([1.0, 3.0]), True)
    be.gradient(np.array([1.0, 3.0]), True)           # a gradient at a θ the objective had: no repeat
    assert (log.count("f"), log.count("g")) == (3, 2)
    assert (log.repeats("f"), log.repeats("g")) == (1, 0)
    assert log.calls[0] == ("f", (1.0, 2.0))


def _tight(dataset: str, formula: str) -> float:
    fits = json.loads((REFERENCE / f"{dataset}.json").read_text())
    return next(f for f in fits if f["formula"] == formula and f["REML"])["tight_optimum"]["criterion"]


@pytest.mark.parametrize("dataset, formula", [("sleepstudy", "Reaction ~ Days + (Days|Subject)"),
                                              ("Penicillin", "diameter ~ 1 + (1|plate) + (1|sample)")])
def test_best_criterion_is_lme4s_tight_optimum(dataset, formula):
    if not REFERENCE.is_dir():
        pytest.skip(f"no lme4 reference data at {REFERENCE}")
    df = fl.datasets.load(dataset)
    best = best_criterion(formula, df)
    assert abs(best.criterion - _tight(dataset, formula)) < 1e-6
    rec = record(dataset, 0, df, "default", best, formula)
    assert not rec.error
    # every optimiser evaluation reaches the backend; the compiled criterion at θ̂ is the fit's own
    assert rec.calls_f >= rec.feval > 0
    assert abs(rec.criterion_at - rec.criterion) < 1e-8 * abs(rec.criterion)
    assert -1e-6 < rec.gap < 1e-6 and rec.best == best.criterion
    assert len(rec.thetas) == rec.calls_f + rec.calls_g


def test_a_backend_that_does_not_apply_is_reported_not_fatal():
    import generators
    shape = generators.SHAPES["crossed_slopes"]        # a vector term after the first: no blocked path
    df = generators.make("crossed_slopes", 1, "small", 0.1)
    best = best_criterion(shape.formula, df)
    rec = record("crossed_slopes", 1, df, "blocked", best, shape.formula)
    assert rec.error.startswith("ValueError") and rec.feval is None


def _run(tmp_path, *extra):
    out = tmp_path / "evals.json"
    code = eval_counts.main(["--shapes", "single_slope", "--seeds", "1", "--scale", "0.5", "--json", str(out),
                             *extra])
    return code, json.loads(out.read_text())


def test_exit_status_and_json(tmp_path):
    code, got = _run(tmp_path, "--backends", "compiled")
    assert code == 0
    assert [f["fit"] for f in got["fits"]] == ["default", "compiled"]
    d = got["fits"][0]
    assert d["nobs"] == 20_000 and d["feval"] >= 1 and d["gap"] < 1e-6
    assert got["summary"]["feval_median"] == d["feval"] and got["summary"]["designs"] == 1
    code, _ = _run(tmp_path, "--tol", "-1")          # every fit "worse" than best - (-1)
    assert code == 1
    code, _ = _run(tmp_path, "--evals-max", "1")
    assert code == 3
