"""Head-to-head timing of fastlmm_ext against other linear-mixed-model fitters, on one machine.

Usage (from the repository root)::

    python benchmarks/compare.py [--quick] [--only NAME ...] [--fitters NAME ...] [--no-r]
                                 [--seeds 1 2 3] [--busy-core] [--per-seed]
                                 [--repeats K] [--timeout S] [--threads N] [--json OUT]

Problems: five fixed ones (InstEval, sleepstudy and three designs of ``bench_lmm`` /
``slope_data``) and nine from the second generator (``generators.py``: other distributions,
unequal and Zipf-skewed group sizes, integer and string ids), each made once per ``--seeds``
seed; the table reports per (problem, fitter) the median time, the median and maximum
evaluations over the seeds and the worst criterion difference.  ``--busy-core`` holds one core
with a plain Python busy loop in a separate process (started before the first fitter, killed
after the last), as a machine with other work running would.

For every problem the driver makes the data once (saved to a temporary pickle, and a CSV for R),
then runs every (problem, fitter) pair in a fresh worker process
(``python benchmarks/compare.py --worker PROBLEM FITTER DATA.pkl ...``), so that each fitter's peak
memory is its own.  A worker imports its fitter, makes one untimed warm-up fit on sleepstudy (lazy
imports and first-call set-up are not timed), loads the data, notes its memory high-water mark
("baseline"), then times complete fits from the DataFrame (formula parsing and design construction
included), and prints one JSON line with its final high-water mark ("peak").  The high-water mark is
the process's VmHWM from /proc/self/status: unlike ``ru_maxrss`` it does not inherit the RSS of the
driver that forked the worker.  lme4 runs the same way through ``Rscript benchmarks/lme4_time.R``
(no warm-up; its first fit is timed with the rest).

Reported per (problem, fitter): median elapsed seconds over the repeats (a fitter whose fit takes
longer than ``--slow`` seconds is fitted once), optimizer evaluations, peak and fit memory (MB),
the REML criterion on lme4's scale, and the time ratio peer / fastlmm_ext.  Every criterion is checked
against fastlmm_ext's; a difference above 1e-3 is flagged with "!".

Fitters (a missing one is listed as "not installed"):

* ``fastlmm_ext``: ``fastlmm_ext.lmer(formula, df)`` with its defaults; ``fastlmm_ext[compiled,bobyqa]``
  is added when the default backend or optimizer is something else, and ``fastlmm_ext[compiled]`` or
  ``fastlmm_ext[blocked]`` (``backend=`` that one, other options default) for the backend
  ``backend="auto"`` did not choose ("skipped" where the blocked path does not apply).
* ``mixedlm`` (PyPI mixedlm, Rust core): ``mixedlm.lmer(formula, df, REML=True)``; criterion
  ``REMLcrit()``, evaluations ``function_evals``.
* ``mixedlm-rs`` (PyPI mixedlm-rs, statsmodels-style, one grouping factor only):
  ``mixedlm_rs.mixedlm(fixed, df, groups=..., re_formula=...).fit(reml=True)``; criterion ``-2 llf``,
  evaluations ``diagnostics["n_objective_evaluations"]``.
* ``statsmodels``: ``statsmodels.formula.api.mixedlm(...).fit(reml=True)``; crossed designs as variance
  components of one all-covering group (``vc_formula``, capped at 20,000 rows); criterion ``-2 llf``
  (statsmodels' REML log-likelihood has lme4's constants: on sleepstudy -2 llf equals lme4's REMLcrit
  1743.628272); evaluations = calls of ``loglike`` (gradient calls are in the JSON).
* ``lme4``: ``lmer(formula, data, REML = TRUE)`` in R, when ``Rscript`` runs and ``library(lme4)`` loads.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
# lme4's reference data, where the tests look for it (FASTLMM_REFERENCE_DIR overrides).
REFERENCE_DIR = Path(os.environ.get("FASTLMM_REFERENCE_DIR", REPO.parent / "shared" / "reference"))
INSTEVAL_CSV = REFERENCE_DIR / "InstEval.csv.gz"
R_SCRIPT = HERE / "lme4_time.R"

CRITERION_TOL = 1e-3        # absolute agreement required of every peer's REML criterion
STATSMODELS_CROSSED_CAP = 20_000   # rows; statsmodels builds crossed designs densely
RESULT_MARK = "@@compare-result@@ "
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "RAYON_NUM_THREADS",
               "BLIS_NUM_THREADS")


def _use_source_tree() -> None:
    """Import fastlmm_ext from this checkout when its kernel has been built in place."""
    if any((REPO / "fastlmm_ext").glob("_kernel*.so")) and str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))


# --------------------------------------------------------------------------------------- problems
@dataclass(frozen=True)
class GroupSpec:
    """The model in statsmodels' terms: one grouping factor, optional variance components."""
    fixed: str                     # patsy fixed-effects formula
    groups: str | None             # grouping column; None: one group holding every row
    re_formula: str                # random effects within a group ("1", "~x", "0")
    vc_formula: dict | None = None  # variance components, e.g. {"b": "0 + C(b)"}

    @property
    def crossed(self) -> bool:
        return self.groups is None

    @property
    def single_factor(self) -> bool:
        return self.groups is not None and not self.vc_formula


@dataclass(frozen=True)
class Problem:
    name: str
    formula: str                                   # lme4 syntax (fastlmm_ext, mixedlm, lme4)
    make: Callable[[bool], pd.DataFrame] | None    # make(quick) -> data (fixed problems)
    factors: tuple[str, ...]                       # columns that are factors (for R)
    spec: GroupSpec | None                         # None: statsmodels cannot express the model
    description: str
    min_repeats: tuple[int, int] = (1, 1)          # (full, quick): lower bound on the repeats
    shape: str | None = None                       # generators.SHAPES name: new data for every seed
    cannot: dict = field(default_factory=dict)     # fitter -> why it cannot fit this model

    @property
    def seeded(self) -> bool:
        return self.shape is not None

    def data(self, quick: bool, seed: int | None) -> pd.DataFrame:
        """The problem's data; generated problems at their large size (a tenth with --quick)."""
        if self.shape is None:
            return self.make(quick)
        import generators
        return generators.make(self.shape, seed, "large", 0.1 if quick else 1.0)


def _crossed(quick: bool) -> pd.DataFrame:
    from bench_lmm import crossed
    k = 10 if quick else 1
    return crossed(200_000 // k, 5_000 // k, 2_000 // k, seed=1)


def _nested(quick: bool) -> pd.DataFrame:
    from bench_lmm import nested
    k = 10 if quick else 1
    # bench_lmm names the inner factor "c" (its levels 0..9 repeat within every "a")
    return nested(100_000 // k, 1_000 // k, 10).rename(columns={"c": "b"})


def slope_data(n: int, n_groups: int, seed: int = 2) -> pd.DataFrame:
    """y = 1 + 0.5 x + b0[g] + b1[g] x + noise; (b0, b1) ~ N(0, sd 1 and 0.5, corr 0.3), noise sd 1.

    Balanced: every group has n / n_groups rows (in random order)."""
    rng = np.random.default_rng(seed)
    g = rng.permutation(np.repeat(np.arange(n_groups), n // n_groups))
    x = rng.normal(size=g.size)
    sd = np.array([1.0, 0.5])
    cov = np.outer(sd, sd) * np.array([[1.0, 0.3], [0.3, 1.0]])
    b = rng.multivariate_normal(np.zeros(2), cov, size=n_groups)
    y = 1 + 0.5 * x + b[g, 0] + b[g, 1] * x + rng.normal(size=g.size)
    return pd.DataFrame({"y": y, "x": x, "g": pd.Categorical(g)})


def _slope(quick: bool) -> pd.DataFrame:
    k = 10 if quick else 1
    return slope_data(500_000 // k, 125_000 // k)


def _insteval(quick: bool) -> pd.DataFrame:
    """lme4's InstEval (real data, the same size with --quick); s, d, dept, service as factors."""
    df = pd.read_csv(INSTEVAL_CSV, usecols=["s", "d", "dept", "service", "y"])
    for col in ("s", "d", "dept", "service"):
        df[col] = pd.Categorical(df[col])          # integer codes: levels in numeric order
    return df


def _sleepstudy(quick: bool) -> pd.DataFrame:
    from fastlmm_ext import datasets
    return datasets.load("sleepstudy")


PROBLEMS: dict[str, Problem] = {p.name: p for p in [
    Problem("insteval", "y ~ 1 + service + (1|s) + (1|d) + (1|dept:service)", _insteval,
            ("s", "d", "dept", "service"),
            GroupSpec("y ~ 1 + service", None, "0",
                      {"s": "0 + C(s)", "d": "0 + C(d)", "ds": "0 + C(dept):C(service)"}),
            "lme4's InstEval, 73,421 rows, 3 crossed factors (2,972 + 1,128 + 28 levels)"),
    Problem("crossed200k", "y ~ x + (1|a) + (1|b)", _crossed, ("a", "b"),
            GroupSpec("y ~ x", None, "0", {"a": "0 + C(a)", "b": "0 + C(b)"}),
            "synthetic crossed: 200,000 rows, a 5,000 x b 2,000 levels (quick: 20,000; 500 x 200)"),
    Problem("slope500k", "y ~ x + (1 + x|g)", _slope, ("g",),
            GroupSpec("y ~ x", "g", "~x"),
            "one factor, correlated intercept and slope: 500,000 rows, 125,000 groups "
            "(quick: 50,000; 12,500)"),
    Problem("sleepstudy", "Reaction ~ Days + (Days|Subject)", _sleepstudy, ("Subject",),
            GroupSpec("Reaction ~ Days", "Subject", "~Days"),
            "lme4's sleepstudy, 180 rows, 18 subjects", min_repeats=(50, 10)),
    Problem("nested100k", "y ~ 1 + (1|a/b)", _nested, ("a", "b"),
            GroupSpec("y ~ 1", "a", "1", {"b": "0 + C(b)"}),
            "Pastes-like nested: 100,000 rows, a 1,000 levels x 10 b-levels (quick: 10,000; 100 x 10)"),
]}

# Problems from the second generator (generators.py), at SHAPES' large size; --quick: a tenth of the
# rows and levels (the Zipf caps of zipf_ratings stay).  Formula and factor columns from the shape.
_CORRELATED_CROSSED = ("correlated random slopes crossed with another factor: statsmodels' variance "
                       "components are uncorrelated")
_GENERATED = [
    ("uniform200k", "uniform_crossed", GroupSpec("y ~ x", None, "0", {"a": "0 + C(a)", "b": "0 + C(b)"}),
     "uniform crossed, a sd 0.8, b sd 0.5, t noise: 200,000 rows, 5,000 x 2,000 integer ids", {}),
    ("movielens1m", "zipf_ratings", GroupSpec("y ~ 1", None, "0", {"u": "0 + C(u)", "m": "0 + C(m)"}),
     "MovieLens-1M shape, u = min(zipf(1.6), 6040), m = min(zipf(1.4), 3706), ratings 1-5: 1,000,000 rows", {}),
    ("skewed100k", "skewed_crossed", GroupSpec("y ~ x", None, "0", {"a": "0 + C(a)", "b": "0 + C(b)"}),
     "crossed with Zipf-like level weights, skewed x: 100,000 rows, 5,000 x 1,000 string ids", {}),
    ("tinyvar100k", "tiny_variance", GroupSpec("y ~ x", None, "0", {"g": "0 + C(g)", "h": "0 + C(h)"}),
     "crossed, Var(h) = 1e-3 x residual (near singular): 100,000 rows, 2,000 x 100 levels", {}),
    ("corr100k", "near_unit_corr", GroupSpec("y ~ x", "g", "~x"),
     "one factor, intercept-slope correlation 0.98: 100,000 rows, 12,500 groups", {}),
    ("nested3_100k", "nested3", GroupSpec("y ~ x", "a", "1", {"b": "0 + C(b)", "c": "0 + C(b):C(c)"}),
     "3-level nesting, labels repeated in their parent, skewed cell sizes: 100,000 rows, 200 a's", {}),
    ("slopefactor100k", "slope_by_factor", None,
     "x * f fixed, (1 + x|g) crossed with (1|h): 100,000 rows, 2,000 x 300 levels",
     {"statsmodels": _CORRELATED_CROSSED}),
    ("crossslopes100k", "crossed_slopes", None,
     "two crossed vector terms (1 + x|a) + (1 + x|b): 100,000 rows, 1,000 x 500 levels",
     {"statsmodels": _CORRELATED_CROSSED}),
    ("slope500k4", "single_slope", GroupSpec("y ~ x", "g", "~x"),
     "one factor with a slope, 4 rows per group on average, t noise: 500,000 rows, 125,000 groups", {}),
]


def _generated_problems() -> dict[str, Problem]:
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    import generators
    out = {}
    for name, shape, spec, description, cannot in _GENERATED:
        sh = generators.SHAPES[shape]
        out[name] = Problem(name, sh.formula, None, sh.factors, spec, description, shape=shape, cannot=cannot)
    return out


PROBLEMS.update(_generated_problems())


# ---------------------------------------------------------------------------------------- fitters
# Each fit function takes (problem, data) and returns a dict with at least "criterion" (REML
# criterion on lme4's scale, or None when not comparable) and "feval"; it may add more fields.

def _fit_fastlmm(p: Problem, df: pd.DataFrame, **options) -> dict:
    import fastlmm_ext
    res = fastlmm_ext.lmer(p.formula, df, REML=True, **options)
    return {"criterion": float(res.criterion), "feval": int(res.optsummary.feval),
            "backend": res.backend, "optimizer": res.optsummary.optimizer,
            "sigma": float(res.sigma), "theta": [float(t) for t in res.theta],
            "converged": bool(res.converged)}


def _fit_fastlmm_bobyqa(p: Problem, df: pd.DataFrame) -> dict:
    return _fit_fastlmm(p, df, backend="compiled", optimizer="bobyqa")


def _fit_fastlmm_compiled(p: Problem, df: pd.DataFrame) -> dict:
    return _fit_fastlmm(p, df, backend="compiled")


def _fit_fastlmm_blocked(p: Problem, df: pd.DataFrame) -> dict:
    return _fit_fastlmm(p, df, backend="blocked")


def _blocked_applies(p: Problem, df: pd.DataFrame) -> str | None:
    """Why the blocked path cannot fit this model, or None (checked on the structure, untimed)."""
    from fastlmm_ext._blocked import blocked_applicable
    from fastlmm_ext._design import build_structure
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = build_structure(p.formula, df)
    if not s.terms or blocked_applicable(s):
        return None
    return "skipped: blocked path needs scalar terms after the first and a second block of <= 6000 columns"


def _fit_mixedlm(p: Problem, df: pd.DataFrame) -> dict:
    import mixedlm
    res = mixedlm.lmer(p.formula, df, REML=True)
    return {"criterion": float(res.REMLcrit()), "feval": int(res.function_evals),
            "optimizer": res.optimizer, "sigma": float(res.sigma),
            "theta": [float(t) for t in res.theta], "converged": bool(res.converged)}


def _fit_mixedlm_rs(p: Problem, df: pd.DataFrame) -> dict:
    import mixedlm_rs
    s = p.spec
    res = mixedlm_rs.mixedlm(s.fixed, df, groups=df[s.groups], re_formula=s.re_formula).fit(reml=True)
    diag = res.diagnostics
    return {"criterion": -2.0 * float(res.llf), "feval": int(diag["n_objective_evaluations"]),
            "extra_criterion_evals": int(diag.get("n_criterion_evaluations", 0)),
            "optimizer": diag.get("method"), "sigma": math.sqrt(res.scale), "converged": bool(res.converged)}


def _fit_statsmodels(p: Problem, df: pd.DataFrame) -> dict:
    import statsmodels.formula.api as smf
    s = p.spec
    if s.crossed:
        # statsmodels has no crossed random effects: one group spanning every row, each factor a
        # variance component of it (statsmodels' documented device), no group-level random effect.
        df = df.assign(_one=1)
        groups = "_one"
    else:
        groups = s.groups
    model = smf.mixedlm(s.fixed, df, groups=groups, re_formula=s.re_formula, vc_formula=s.vc_formula)
    calls = {"loglike": 0, "score": 0}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    model.loglike = counted("loglike", model.loglike)    # instance attributes shadow the methods
    model.score = counted("score", model.score)
    res = model.fit(reml=True)
    return {"criterion": -2.0 * float(res.llf), "feval": calls["loglike"], "score_calls": calls["score"],
            "sigma": math.sqrt(res.scale), "converged": bool(res.converged)}


@dataclass(frozen=True)
class Fitter:
    name: str
    module: str | None                       # import name checked for "not installed"
    fit: Callable[[Problem, pd.DataFrame], dict] | None
    applies: Callable[[Problem, int], str | None] = lambda p, n: None   # reason to skip, or None
    # reason to skip found on the data, in the worker before any timing (or None)
    applies_data: Callable[[Problem, pd.DataFrame], str | None] | None = None


def _single_factor_only(p: Problem, n: int) -> str | None:
    return None if p.spec is not None and p.spec.single_factor else "skipped: one grouping factor only"


def _statsmodels_applies(p: Problem, n: int) -> str | None:
    if p.spec is None:
        return "skipped: model not expressible as statsmodels groups and variance components"
    if p.spec.crossed and n > STATSMODELS_CROSSED_CAP:
        return f"skipped: crossed design, {n:,} rows > {STATSMODELS_CROSSED_CAP:,} cap"
    return None


FASTLMM = "fastlmm_ext"
FASTLMM_BOBYQA = "fastlmm_ext[compiled,bobyqa]"
FASTLMM_COMPILED = "fastlmm_ext[compiled]"
FASTLMM_BLOCKED = "fastlmm_ext[blocked]"
# run automatically for the backend that backend="auto" did not choose
OTHER_BACKEND = {"blocked": FASTLMM_COMPILED, "compiled": FASTLMM_BLOCKED}
FITTERS: dict[str, Fitter] = {f.name: f for f in [
    Fitter(FASTLMM, "fastlmm_ext", _fit_fastlmm),
    Fitter(FASTLMM_BOBYQA, "fastlmm_ext", _fit_fastlmm_bobyqa),
    Fitter(FASTLMM_COMPILED, "fastlmm_ext", _fit_fastlmm_compiled),
    Fitter(FASTLMM_BLOCKED, "fastlmm_ext", _fit_fastlmm_blocked, applies_data=_blocked_applies),
    Fitter("mixedlm", "mixedlm", _fit_mixedlm),
    Fitter("mixedlm-rs", "mixedlm_rs", _fit_mixedlm_rs, _single_factor_only),
    Fitter("statsmodels", "statsmodels", _fit_statsmodels, _statsmodels_applies),
    Fitter("lme4", None, None),               # run through Rscript, see run_lme4
]}


# ----------------------------------------------------------------------------------------- worker
def _vm_hwm_mb() -> float:
    """This process's peak resident set size so far (VmHWM), in MB."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_worker(problem: str, fitter: str, data_path: str, repeats: int, slow: float,
               warmup_path: str | None = None) -> None:
    """Time `repeats` complete fits (one if a fit takes longer than `slow` s); print one JSON line."""
    p, f = PROBLEMS[problem], FITTERS[fitter]
    # Import, and fit sleepstudy once, before the baseline: module loading and first-call set-up
    # count neither as fit time nor as fit memory.
    importlib.import_module("statsmodels.formula.api" if f.module == "statsmodels" else f.module)
    if warmup_path:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            f.fit(PROBLEMS["sleepstudy"], pd.read_pickle(warmup_path))
    df = pd.read_pickle(data_path)
    if f.applies_data is not None and (why := f.applies_data(p, df)) is not None:
        print(RESULT_MARK + json.dumps({"skipped": why}), flush=True)
        return
    baseline = _vm_hwm_mb()
    times, cpu_times, out, caught = [], [], {}, []
    while len(times) < repeats:
        gc.collect()
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            t0, c0 = time.perf_counter(), time.process_time()
            out = f.fit(p, df)
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)      # all threads: > elapsed when parallel
        if not caught:
            caught = sorted({f"{x.category.__name__}: {str(x.message).splitlines()[0][:160]}" for x in w})
        if times[-1] > slow:
            break
    out.update(times=times, cpu_times=cpu_times, warnings=caught, baseline_mb=baseline, peak_mb=_vm_hwm_mb())
    print(RESULT_MARK + json.dumps(out), flush=True)


# ----------------------------------------------------------------------------------------- driver
@dataclass
class Row:
    problem: str
    fitter: str
    status: str = "ok"            # ok | skipped | error | timeout
    note: str = ""
    seconds: float | None = None
    times: list = field(default_factory=list)
    feval: int | None = None
    peak_mb: float | None = None
    fit_mb: float | None = None
    criterion: float | None = None
    criterion_diff: float | None = None
    match: str = ""               # "", "!" (mismatch) or "n/a"
    ratio: float | None = None
    details: dict = field(default_factory=dict)
    seed: int | None = None       # generator seed (None: fixed data)


def _run_child(cmd: list[str], env: dict, timeout: float) -> tuple[int | None, str, str]:
    """Run one child; return (exit code, or None when killed at the timeout; stdout; stderr)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, text=True)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            code = None
        out.seek(0)
        err.seek(0)
        return code, out.read(), err.read()


def _worker_env(threads: int | None) -> dict:
    """The workers' environment: this checkout (when built in place) and benchmarks/ on the path."""
    env = dict(os.environ)
    path = [str(REPO)] if any((REPO / "fastlmm_ext").glob("_kernel*.so")) else []
    path += [str(HERE)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    env["PYTHONPATH"] = os.pathsep.join(path)
    if threads:
        env.update({v: str(threads) for v in THREAD_VARS})
    return env


def _last_line_error(stderr: str) -> str:
    lines = [x for x in stderr.strip().splitlines() if x.strip()]
    return lines[-1][:200] if lines else "no output"


def run_python(p: Problem, fitter: str, data_path: str, warmup_path: str, repeats: int, args) -> Row:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", p.name, fitter, data_path,
           "--warmup", warmup_path, "--repeats", str(repeats), "--slow", str(args.slow)]
    code, out, err = _run_child(cmd, _worker_env(args.threads), args.timeout)
    return _row_from_child(p.name, fitter, code, out, err, args.timeout,
                           lambda line: line.startswith(RESULT_MARK), len(RESULT_MARK))


def _row_from_child(problem, fitter, code, out, err, timeout, is_result, skip) -> Row:
    row = Row(problem, fitter)
    if code is None:
        row.status, row.note = "timeout", f"timeout after {timeout:.0f} s"
        return row
    lines = [x for x in out.splitlines() if is_result(x)]
    if code != 0 or not lines:
        row.status, row.note = "error", f"exit {code}: {_last_line_error(err)}"
        return row
    res = json.loads(lines[-1][skip:])
    if "skipped" in res:
        row.status, row.note = "skipped", res["skipped"]
        return row
    row.times = res.pop("times")
    row.seconds = statistics.median(row.times)
    row.feval = res.pop("feval", None)
    row.criterion = res.pop("criterion", None)
    row.peak_mb = res.pop("peak_mb", None)
    if row.peak_mb is not None and res.get("baseline_mb") is not None:
        row.fit_mb = max(0.0, row.peak_mb - res["baseline_mb"])
    row.details = res
    if res.get("warnings"):
        row.note = "; ".join(res["warnings"])[:120]
    return row


def r_available() -> str | None:
    """None when Rscript runs and lme4 loads, else why not."""
    if shutil.which("Rscript") is None:
        return "not installed (no Rscript)"
    try:
        probe = 'quit(status = !suppressMessages(requireNamespace("lme4", quietly = TRUE)))'
        done = subprocess.run(["Rscript", "-e", probe], check=False, capture_output=True, timeout=120)
    except subprocess.TimeoutExpired:
        return "not available (Rscript timed out)"
    return None if done.returncode == 0 else "not installed (library(lme4) does not load)"


def run_lme4(p: Problem, csv_path: str, repeats: int, args) -> Row:
    cmd = ["Rscript", str(R_SCRIPT), csv_path, p.formula, "TRUE", str(repeats), str(args.slow),
           ",".join(p.factors)]
    code, out, err = _run_child(cmd, _worker_env(args.threads), args.timeout)
    return _row_from_child(p.name, "lme4", code, out, err, args.timeout,
                           lambda line: line.startswith("{"), 0)


def _fmt(x, spec: str, missing: str = "-") -> str:
    return missing if x is None else format(x, spec)


def _seconds(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.4f}" if x < 0.1 else f"{x:.3f}" if x < 10 else f"{x:.1f}"


def _print_aligned(head: list[str], body: list[list[str]], right: set[int], problems: list[str]) -> None:
    """Columns padded to width (``right``: right-aligned), a blank line between problems."""
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]

    def line(cells):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    print(line(head))
    print(line(["-" * w for w in widths]))
    prev = None
    for prob, b in zip(problems, body):
        if prev is not None and prob != prev:
            print()
        prev = prob
        print(line(b))


def _criterion_cell(r: Row) -> str:
    if r.match == "n/a":
        return "n/a"
    return "-" if r.criterion is None else f"{r.criterion:.4f}{r.match if r.match == '!' else ''}"


def print_table(rows: list[Row]) -> None:
    """One line per (problem, seed, fitter)."""
    head = ["problem", "seed", "fitter", "seconds", "evals", "peak MB", "fit MB", "criterion", "ratio", "note"]
    body = [[r.problem, _fmt(r.seed, "d", ""), r.fitter, _seconds(r.seconds), _fmt(r.feval, "d"),
             _fmt(r.peak_mb, ".0f"), _fmt(r.fit_mb, ".0f"), _criterion_cell(r),
             _fmt(r.ratio, ".2f"), r.note if r.status != "ok" or r.note else ""] for r in rows]
    _print_aligned(head, body, {1, 3, 4, 5, 6, 7, 8}, [r.problem for r in rows])


def _print_mismatches(rows: list[Row]) -> None:
    bad = [r for r in rows if r.match == "!"]
    if bad:
        print("\n! criterion differs from fastlmm_ext's by more than", CRITERION_TOL)
        for r in bad:
            seed = "" if r.seed is None else f" (seed {r.seed})"
            print(f"  {r.problem}{seed} / {r.fitter}: {r.criterion:.6f} (difference {r.criterion_diff:+.6f})")


@dataclass
class Summary:
    """One (problem, fitter) over the seeds."""
    problem: str
    fitter: str
    seeds: int                     # data sets tried
    ok: int                        # ... that gave a fit
    seconds: float | None          # median over the seeds of each seed's median time
    feval_median: float | None
    feval_max: int | None
    peak_mb: float | None          # largest over the seeds
    fit_mb: float | None
    criterion: float | None        # the criterion, when there is one data set
    worst_diff: float | None       # criterion − fastlmm_ext's, the largest in absolute value
    ratio: float | None            # median over the seeds of seconds / fastlmm_ext's seconds
    note: str = ""


def summarise(rows: list[Row]) -> list[Summary]:
    """Rows grouped by (problem, fitter) in the order they ran; medians and maxima over seeds."""
    groups: dict[tuple[str, str], list[Row]] = {}
    for r in rows:
        groups.setdefault((r.problem, r.fitter), []).append(r)
    out = []
    for (prob, fitter), rs in groups.items():
        ok = [r for r in rs if r.status == "ok"]
        med = lambda xs: statistics.median(xs) if xs else None  # noqa: E731
        fe = [r.feval for r in ok if r.feval is not None]
        diffs = [r.criterion_diff for r in ok if r.criterion_diff is not None]
        notes = [r.note for r in rs if r.note]
        out.append(Summary(
            prob, fitter, len(rs), len(ok), med([r.seconds for r in ok if r.seconds is not None]),
            med(fe), max(fe) if fe else None,
            max((r.peak_mb for r in ok if r.peak_mb is not None), default=None),
            max((r.fit_mb for r in ok if r.fit_mb is not None), default=None),
            ok[0].criterion if len(rs) == 1 and ok else None,
            max(diffs, key=abs) if diffs else None, med([r.ratio for r in ok if r.ratio is not None]),
            "; ".join(dict.fromkeys(notes))[:140]))
    return out


def print_summary(summaries: list[Summary]) -> None:
    """One line per (problem, fitter): medians over the seeds (the criterion when there is one)."""
    head = ["problem", "fitter", "seeds", "seconds", "evals", "max", "peak MB", "fit MB", "criterion",
            "worst diff", "ratio", "note"]
    body = []
    for m in summaries:
        flag = "!" if m.worst_diff is not None and abs(m.worst_diff) > CRITERION_TOL else ""
        body.append([m.problem, m.fitter, f"{m.ok}/{m.seeds}" if m.seeds > 1 else ("1" if m.ok else "0"),
                     _seconds(m.seconds), _fmt(m.feval_median, "g"), _fmt(m.feval_max, "d"),
                     _fmt(m.peak_mb, ".0f"), _fmt(m.fit_mb, ".0f"), _fmt(m.criterion, ".4f"),
                     (_fmt(m.worst_diff, "+.1e") + flag) if m.fitter != FASTLMM else "",
                     _fmt(m.ratio, ".2f"), m.note])
    _print_aligned(head, body, {2, 3, 4, 5, 6, 7, 8, 9, 10}, [m.problem for m in summaries])


def _versions() -> dict:
    from importlib import metadata
    out = {}
    for dist in ("fastlmm_ext", "numpy", "scipy", "pandas", "mixedlm", "mixedlm-rs", "statsmodels"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def _git_head() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"],
                             check=False, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def _loadavg() -> str:
    try:
        return Path("/proc/loadavg").read_text().strip()
    except OSError:
        return ""


def _compare(rows: list[Row]) -> None:
    """Criterion differences and time ratios against the default fastlmm_ext fit of the problem."""
    ref = next((r for r in rows if r.fitter == FASTLMM and r.status == "ok"), None)
    for r in rows:
        if r.status != "ok":
            continue
        if r.criterion is None or not math.isfinite(r.criterion):
            r.match = "n/a"
        elif ref is not None and ref.criterion is not None:
            r.criterion_diff = r.criterion - ref.criterion
            r.match = "!" if abs(r.criterion_diff) > CRITERION_TOL else ""
        if ref is not None and ref.seconds:
            r.ratio = r.seconds / ref.seconds


def run_problem(p: Problem, wanted: list[str], tmp: str, warmup_path: str, repeats: int,
                r_missing: str | None, args) -> list[Row]:
    """Run the problem once (fixed data) or once per seed (generated data)."""
    if p.name == "insteval" and not INSTEVAL_CSV.exists():
        return [Row(p.name, FASTLMM, "skipped", f"no data: {INSTEVAL_CSV}")]
    rows: list[Row] = []
    slow: dict[str, int] = {}      # peer -> the seed on which one fit took longer than --slow
    for seed in (args.seeds if p.seeded else [None]):
        rows += _run_one_data_set(p, seed, wanted, tmp, warmup_path, repeats, r_missing, args, slow)
    return rows


# fastlmm_ext variants that run when asked for by name, else only when the default fit makes them
# informative (see _run_one_data_set)
_VARIANTS = (FASTLMM_BOBYQA, FASTLMM_COMPILED, FASTLMM_BLOCKED)


def _run_one_data_set(p: Problem, seed: int | None, wanted: list[str], tmp: str, warmup_path: str,
                      repeats: int, r_missing: str | None, args, slow: dict[str, int]) -> list[Row]:
    """Make the data, run each wanted fitter in its own process, compare with fastlmm_ext.

    A fitter (other than the default fastlmm_ext fit, the reference of every comparison) whose
    fit took longer than ``--slow`` seconds on one seed is not run on the later seeds (``slow``)."""
    df = p.data(args.quick, seed)
    n = len(df)
    tag = p.name if seed is None else f"{p.name}-seed{seed}"
    data_path = os.path.join(tmp, f"{tag}.pkl")
    df.to_pickle(data_path)
    k = max(repeats, p.min_repeats[1 if args.quick else 0])
    print(f"# {tag}: {p.formula}  ({n:,} rows; {p.description})", file=sys.stderr, flush=True)
    queue = [f for f in wanted if f not in _VARIANTS or f in (args.fitters or ())]
    rows: list[Row] = []
    while queue:
        name = queue.pop(0)
        fitter = FITTERS[name]
        if name in p.cannot:
            row = Row(p.name, name, "skipped", f"skipped: {p.cannot[name]}")
        elif name in slow:
            row = Row(p.name, name, "skipped", f"later seeds skipped: a fit took > {args.slow:g} s "
                                               f"(--slow) on seed {slow[name]}")
        elif name == "lme4":
            if r_missing:
                row = Row(p.name, name, "skipped", r_missing)
            else:
                csv_path = os.path.join(tmp, f"{tag}.csv")
                df.to_csv(csv_path, index=False)
                row = run_lme4(p, csv_path, k, args)
        elif fitter.module and importlib.util.find_spec(fitter.module) is None:
            row = Row(p.name, name, "skipped", "not installed")
        elif (why := fitter.applies(p, n)) is not None:
            row = Row(p.name, name, "skipped", why)
        else:
            row = run_python(p, name, data_path, warmup_path, k, args)
        row.seed = seed
        row.details.setdefault("nobs", n)
        rows.append(row)
        if seed is not None and name != FASTLMM and (row.status == "timeout" or (row.times and max(row.times) > args.slow)):
            slow.setdefault(name, seed)
        took = f" {_seconds(row.seconds)} s" if row.seconds is not None else ""
        print(f"#   {name}: {row.status}{took} {row.note}".rstrip(), file=sys.stderr, flush=True)
        if name == FASTLMM and row.status == "ok":
            chosen = (row.details.get("backend"), row.details.get("optimizer"))
            # the backend "auto" did not choose, and compiled+bobyqa when the default is not that
            extra = [OTHER_BACKEND.get(chosen[0])]
            if chosen != ("compiled", "bobyqa"):
                extra.insert(0, FASTLMM_BOBYQA)
            queue[:0] = [f for f in extra if f is not None and f not in queue]
    _compare(rows)
    return rows


class BusyCore:
    """A separate process running a plain Python busy loop, holding one core while it lives
    (``with BusyCore() as busy: ...``); afterwards ``busy.share`` is the share of a core it got.
    The loop looks up its parent every ~10⁷ iterations and ends when the driver is gone, so a
    killed run leaves no busy process behind."""
    LOOP = ("import os\nparent = os.getppid()\nwhile os.getppid() == parent:\n"
            "    for _ in range(10_000_000):\n        pass\n")

    def __enter__(self) -> BusyCore:
        self.proc = subprocess.Popen([sys.executable, "-c", self.LOOP], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.t0 = time.perf_counter()
        self.wall_s = self.cpu_s = self.share = None
        self.loadavg_end = ""
        return self

    def _cpu_seconds(self) -> float | None:
        """User + system CPU seconds of the busy process so far (/proc/PID/stat fields 14, 15)."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            return None

    def __exit__(self, *exc) -> None:
        self.cpu_s, self.wall_s = self._cpu_seconds(), time.perf_counter() - self.t0
        self.loadavg_end = _loadavg()
        self.share = self.cpu_s / self.wall_s if self.cpu_s is not None and self.wall_s > 0 else None
        self.proc.kill()
        self.proc.wait()

    def describe(self) -> str:
        share = "" if self.share is None else f" got {self.share:.2f} of a core over {self.wall_s:.0f} s"
        return f"busy core (a plain Python busy loop in process {self.proc.pid}{share})"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="synthetic problems 10x smaller, 1 repeat")
    ap.add_argument("--only", nargs="+", metavar="NAME", choices=list(PROBLEMS),
                    help=f"problems to run (default all: {' '.join(PROBLEMS)})")
    ap.add_argument("--fitters", nargs="+", metavar="NAME", choices=list(FITTERS),
                    help=f"fitters to run (default all: {' '.join(FITTERS)}); fastlmm_ext always runs, "
                         f"{FASTLMM_BOBYQA} too whenever fastlmm_ext's default fit used another backend "
                         f"or optimizer, and {FASTLMM_COMPILED} or {FASTLMM_BLOCKED} for the backend the "
                         "default did not choose")
    ap.add_argument("--no-r", action="store_true", help="do not run lme4 through Rscript")
    ap.add_argument("--repeats", type=int, default=None,
                    help="fits per (problem, fitter), median reported (default 3, --quick 1; sleepstudy at "
                         "least 50, --quick 10)")
    ap.add_argument("--slow", type=float, default=30.0,
                    help="a fitter whose fit takes longer than this many seconds is fitted once (default 30)")
    ap.add_argument("--timeout", type=float, default=None,
                    help="seconds before a worker is killed (default 1800, --quick 300)")
    ap.add_argument("--threads", type=int, default=None,
                    help="set OMP/OPENBLAS/MKL/RAYON/BLIS_NUM_THREADS for every fitter (default: unchanged)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3],
                    help="generator seeds of the generated problems (default 1 2 3; fixed problems run once)")
    ap.add_argument("--busy-core", action="store_true",
                    help="hold one core with a Python busy loop in another process while every fitter runs")
    ap.add_argument("--per-seed", action="store_true", help="also print one line per (problem, seed, fitter)")
    ap.add_argument("--json", metavar="OUT", help="also write the results and the set-up as JSON")
    ap.add_argument("--worker", nargs=3, metavar=("PROBLEM", "FITTER", "DATA"), help=argparse.SUPPRESS)
    ap.add_argument("--warmup", metavar="DATA", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    _use_source_tree()
    sys.path.insert(0, str(HERE))
    if args.worker:
        run_worker(*args.worker, repeats=args.repeats or 1, slow=args.slow, warmup_path=args.warmup)
        return 0

    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)
    args.timeout = args.timeout or (300.0 if args.quick else 1800.0)
    problems = [PROBLEMS[n] for n in (args.only or PROBLEMS)]
    wanted = [f for f in FITTERS if f == FASTLMM or f in (args.fitters or FITTERS)]
    r_missing = "skipped (--no-r)" if args.no_r else (r_available() if "lme4" in wanted else None)
    meta = {"argv": sys.argv[1:], "quick": args.quick, "repeats": repeats, "slow_s": args.slow,
            "timeout_s": args.timeout, "threads": args.threads,
            "thread_env": {v: os.environ.get(v) for v in THREAD_VARS if os.environ.get(v)},
            "python": sys.version.split()[0], "platform": platform.platform(), "cpus": os.cpu_count(),
            "versions": _versions(), "lme4": r_missing or "available", "loadavg_before": _loadavg(),
            "criterion_tolerance": CRITERION_TOL, "seeds": args.seeds,
            "mode": "busy-core" if args.busy_core else "normal"}
    import fastlmm_ext
    meta["fastlmm_ext"] = {"version": fastlmm_ext.__version__, "file": fastlmm_ext.__file__,
                           "git": _git_head()}
    rows: list[Row] = []
    busy = BusyCore() if args.busy_core else contextlib.nullcontext()
    with tempfile.TemporaryDirectory(prefix="fastlmm-compare-") as tmp, busy:
        warmup_path = os.path.join(tmp, "warmup.pkl")
        _sleepstudy(True).to_pickle(warmup_path)
        for p in problems:
            rows += run_problem(p, wanted, tmp, warmup_path, repeats, r_missing, args)
    meta["loadavg_after"] = busy.loadavg_end if args.busy_core else _loadavg()
    mode = busy.describe() if args.busy_core else "normal (no load added)"
    if args.busy_core:
        meta["busy_core"] = {"cpu_s": busy.cpu_s, "wall_s": busy.wall_s, "share_of_a_core": busy.share}
    summaries = summarise(rows)
    print(f"\nmode: {mode}; {os.cpu_count()} CPUs")
    print(f"load average (1, 5, 15 min): before {_three(meta['loadavg_before'])}; "
          f"at the end{' (busy loop still running)' if args.busy_core else ''} {_three(meta['loadavg_after'])}")
    if any(p.seeded for p in problems):
        print(f"generated problems: seeds {' '.join(map(str, args.seeds))}; seconds and ratio: medians over the "
              "seeds; evals: median and max; worst diff: criterion - fastlmm_ext's, largest in absolute value")
    print()
    if args.per_seed:
        print_table(rows)
        print()
    print_summary(summaries)
    _print_mismatches(rows)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"meta": meta, "results": [r.__dict__ for r in rows],
                       "summary": [m.__dict__ for m in summaries]}, fh, indent=1, default=float)
        print(f"\nwrote {args.json}")
    return 0


def _three(loadavg: str) -> str:
    """The three load averages of a /proc/loadavg line."""
    return " ".join(loadavg.split()[:3]) or "n/a"


if __name__ == "__main__":
    sys.exit(main())
