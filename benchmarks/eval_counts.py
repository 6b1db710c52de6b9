"""Evaluation counts of fastlmm_ext's default fit on independently generated designs, checked
against the best criterion.

Usage (from the repository root)::

    python benchmarks/eval_counts.py [--shapes NAME ...] [--seeds 1 2 3] [--size small|large]
                                     [--scale S] [--backends compiled blocked] [--tol 1e-6]
                                     [--evals-median M] [--evals-max K] [--json OUT]

For every shape of ``generators.SHAPES`` and every seed (default: all nine shapes, seeds 1-3,
the 20k-50k-row "small" size: 27 designs) the script

* fits with the defaults, as ``fl.lmer(formula, df)`` does (``LinearMixedModel(formula, df)``
  then ``.fit()``), with the backend's ``objective`` and ``gradient`` wrapped to log every θ
  they are called at (the numbers are passed through unchanged);
* with ``--backends``, fits again with ``backend=`` each of them (other options default);
* finds the best criterion: BOBYQA on the compiled path with tight tolerances
  (``ftol_abs=1e-12, xtol_abs=1e-10``, see ``BEST_OPTIONS``), restarted once from its own
  optimum (BOBYQA's quadratic model can stop short on flat or near-singular surfaces); the
  lower of the two is the best criterion;
* evaluates every fit's θ̂ on that same compiled objective, so that criterion − best is a
  difference in θ̂ alone, not in two backends' rounding.

Printed per fit: evaluations as the optimiser counts them (``optsummary.feval``; ``f`` and ``g``
separately when the optsummary has such fields, read with ``getattr``), the logged objective and
gradient calls of the whole fit (the optimiser's, and those after it: the snap to the bounds and,
for n ≤ 10⁴, lme4's derivative check), how many calls repeated a θ already evaluated, the time of
the whole fit from the DataFrame, and criterion − best.  Then the median and maximum evaluations
of the default fits and the speed work's target (median ≤ 8, maximum ≤ 15, every fit within
``--tol`` of the best criterion or lower).

Exit status: 0; 1 when some fit's criterion exceeds the best by more than ``--tol`` or a
default fit fails; 3 when
``--evals-median`` / ``--evals-max`` are given and the default fits exceed them.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import compare                                  # noqa: E402 - needs HERE on the path
import generators                               # noqa: E402

if __name__ == "__main__":          # as a script: this checkout when built in place (as compare.py);
    compare._use_source_tree()      # imported (asv), whatever fastlmm_ext the environment has
import fastlmm_ext as fl                        # noqa: E402

BEST_OPTIONS = {"optimizer": "bobyqa", "ftol_abs": 1e-12, "xtol_abs": 1e-10}
CRITERION_TOL = 1e-6
TARGET_MEDIAN, TARGET_MAX = 8, 15               # the speed work's "done when"
# optsummary fields that may count criterion-only and gradient evaluations separately
F_FIELDS = ("feval_f", "nfeval", "fevals")
G_FIELDS = ("geval", "feval_g", "gevals", "ngeval")


class EvalLog:
    """Every θ at which a backend's ``objective`` and ``gradient`` are called, in order.

    :meth:`attach` shadows the two methods on the backend instance (calls made by the backend
    itself, e.g. a finite-difference fallback inside ``gradient``, are logged too)."""

    def __init__(self):
        self.calls: list[tuple[str, tuple[float, ...]]] = []

    def attach(self, backend) -> None:
        objective = backend.objective
        gradient = getattr(backend, "gradient", None)

        def logged_objective(theta, reml):
            self.calls.append(("f", tuple(float(t) for t in np.ravel(theta))))
            return objective(theta, reml)
        backend.objective = logged_objective
        if gradient is not None:
            def logged_gradient(theta, reml):
                self.calls.append(("g", tuple(float(t) for t in np.ravel(theta))))
                return gradient(theta, reml)
            backend.gradient = logged_gradient

    def count(self, kind: str) -> int:
        return sum(1 for k, _ in self.calls if k == kind)

    def repeats(self, kind: str) -> int:
        """Calls of ``kind`` at a θ that an earlier call of the same kind already had."""
        seen: set = set()
        n = 0
        for k, th in self.calls:
            if k == kind:
                n += th in seen
                seen.add(th)
        return n


@dataclass
class FitRecord:
    """One fit: what the optimiser reports, what the log saw, and how good the optimum is."""
    shape: str
    seed: int
    nobs: int
    fit: str                       # "default", or the backend asked for
    backend: str = ""
    optimizer: str = ""
    feval: int | None = None       # optsummary.feval
    f_evals: int | None = None     # optsummary's criterion-only count, when it has one
    g_evals: int | None = None     # optsummary's gradient count, when it has one
    calls_f: int = 0               # logged objective calls over the whole fit
    calls_g: int = 0               # logged gradient calls
    repeated_f: int = 0            # objective calls at an already evaluated θ
    repeated_g: int = 0
    seconds: float = math.nan      # model build + fit, from the DataFrame
    build_s: float = math.nan
    criterion: float = math.nan    # res.criterion (the fit's own backend)
    criterion_at: float = math.nan  # the compiled objective at the fit's θ̂
    best: float = math.nan
    gap: float = math.nan          # criterion_at − best
    singular: bool = False
    converged: bool = True
    theta: list = field(default_factory=list)
    warnings: list = field(default_factory=list)
    error: str = ""
    thetas: list = field(default_factory=list)     # the log: [kind, θ] per call


def fit_logged(formula: str, df, backend: str = "auto", **fit_options) -> tuple[object, EvalLog, dict]:
    """``fl.lmer(formula, df, backend=backend, **fit_options)`` with the backend's calls logged.

    Returns (result, log, timings and warnings)."""
    log = EvalLog()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        model = fl.LinearMixedModel(formula, df, backend=backend)
        t1 = time.perf_counter()
        log.attach(model.backend)
        res = model.fit(**fit_options)
        t2 = time.perf_counter()
    info = {"build_s": t1 - t0, "seconds": t2 - t0,
            "warnings": sorted({f"{w.category.__name__}: {str(w.message).splitlines()[0][:120]}" for w in caught})}
    return res, log, info


@dataclass
class Best:
    """The best criterion of a design and the compiled model it was found with."""
    criterion: float
    theta: np.ndarray
    feval: int
    seconds: float
    model: object

    def gap(self, theta) -> tuple[float, float]:
        """(compiled criterion at θ, its difference from the best)."""
        at = float(self.model.objective(np.asarray(theta, dtype=float)))
        return at, at - self.criterion


def best_criterion(formula: str, df) -> Best:
    """Tight BOBYQA on the compiled path, restarted once from its optimum; the lower wins."""
    t0 = time.perf_counter()
    model = fl.LinearMixedModel(formula, df, backend="compiled")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = model.fit(check_conv=False, **BEST_OPTIONS)
        again = model.fit(check_conv=False, theta0=first.theta, **BEST_OPTIONS)
    win = again if again.criterion < first.criterion else first
    return Best(float(win.criterion), win.theta.copy(), first.optsummary.feval + again.optsummary.feval,
                time.perf_counter() - t0, model)


def _first_attr(obj, names) -> int | None:
    for name in names:
        v = getattr(obj, name, None)
        if v is not None:
            return int(v)
    return None


def record(shape: str, seed: int, df, fit: str, best: Best, formula: str) -> FitRecord:
    """Fit one way (``fit`` = "default" or a backend name) and measure it against ``best``."""
    rec = FitRecord(shape, seed, len(df), fit)
    try:
        res, log, info = fit_logged(formula, df, backend="auto" if fit == "default" else fit)
    except Exception as e:          # a backend that does not apply, or a failure: reported, not fatal
        rec.error = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
        return rec
    os_ = res.optsummary
    rec.backend, rec.optimizer = res.backend, os_.optimizer
    rec.feval = int(os_.feval)
    rec.f_evals, rec.g_evals = _first_attr(os_, F_FIELDS), _first_attr(os_, G_FIELDS)
    rec.calls_f, rec.calls_g = log.count("f"), log.count("g")
    rec.repeated_f, rec.repeated_g = log.repeats("f"), log.repeats("g")
    rec.seconds, rec.build_s, rec.warnings = info["seconds"], info["build_s"], info["warnings"]
    rec.criterion = float(res.criterion)
    rec.criterion_at, rec.gap = best.gap(res.theta)
    rec.best = best.criterion
    rec.singular, rec.converged = bool(res.singular), bool(res.converged)
    rec.theta = [float(t) for t in res.theta]
    rec.thetas = [[k, list(th)] for k, th in log.calls]
    return rec


# ------------------------------------------------------------------------------------- report
def _num(x, spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def print_table(rows: list[FitRecord], tol: float) -> None:
    head = ["shape", "seed", "n", "fit", "backend", "optimizer", "feval", "f", "g", "calls f/g", "repeat",
            "seconds", "crit - best", "sing", "note"]
    body = []
    for r in rows:
        if r.error:
            body.append([r.shape, str(r.seed), f"{r.nobs:,}", r.fit, "-", "-", "-", "-", "-", "-", "-", "-", "-",
                         "", r.error])
            continue
        body.append([r.shape, str(r.seed), f"{r.nobs:,}", r.fit, r.backend, r.optimizer, _num(r.feval, "d"),
                     _num(r.f_evals, "d"), _num(r.g_evals, "d"), f"{r.calls_f}/{r.calls_g}",
                     f"{r.repeated_f}/{r.repeated_g}" if r.repeated_f or r.repeated_g else "",
                     _num(r.seconds, ".3f"), f"{r.gap:+.2e}", "yes" if r.singular else "",
                     "!" if r.gap > tol else ""])
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    right = {1, 2, 6, 7, 8, 9, 10, 11, 12}

    def line(cells):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    print(line(head))
    print(line(["-" * w for w in widths]))
    for b in body:
        print(line(b))


def summarise(rows: list[FitRecord], tol: float) -> dict:
    """Median and maximum evaluations of the default fits, and the target check."""
    ok = [r for r in rows if r.fit == "default" and not r.error]
    fe = [r.feval for r in ok]
    calls = [r.calls_f for r in ok]
    worse = [r for r in rows if not r.error and r.gap > tol]
    out = {"designs": len(ok), "feval_median": statistics.median(fe) if fe else None,
           "feval_max": max(fe) if fe else None,
           "calls_f_median": statistics.median(calls) if calls else None, "calls_f_max": max(calls) if calls else None,
           "max_gap": max((r.gap for r in ok), default=None), "tolerance": tol,
           "worse_than_best": [f"{r.shape}/{r.seed}/{r.fit}: {r.gap:+.3g}" for r in worse],
           "repeated_theta": [f"{r.shape}/{r.seed}/{r.fit}: f {r.repeated_f}, g {r.repeated_g}"
                              for r in rows if r.repeated_f or r.repeated_g],
           "errors": [f"{r.shape}/{r.seed}/{r.fit}: {r.error}" for r in rows if r.error and r.fit == "default"]}
    for b in sorted({r.fit for r in rows if r.fit != "default"}):
        mine = [r.feval for r in rows if r.fit == b and not r.error]
        out[f"feval_{b}"] = {"median": statistics.median(mine) if mine else None, "max": max(mine, default=None)}
    return out


def print_summary(s: dict) -> None:
    yes = lambda c: "yes" if c else "NO"  # noqa: E731
    med, mx = s["feval_median"], s["feval_max"]
    print(f"\ndefault fits: {s['designs']} designs; evaluations (optsummary.feval) median {med}, max {mx}; "
          f"logged objective calls median {s['calls_f_median']}, max {s['calls_f_max']}")
    for k, v in s.items():
        if k.startswith("feval_") and isinstance(v, dict):
            print(f"backend={k[6:]}: evaluations median {v['median']}, max {v['max']}")
    if med is not None:
        print(f"target: median <= {TARGET_MEDIAN}: {yes(med <= TARGET_MEDIAN)}; max <= {TARGET_MAX}: "
              f"{yes(mx <= TARGET_MAX)}; every fit within {s['tolerance']:g} of the best criterion: "
              f"{yes(not s['worse_than_best'])} (largest criterion - best of the default fits: {s['max_gap']:+.3g})")
    for title, key in (("worse than the best criterion", "worse_than_best"),
                       ("a θ evaluated more than once (objective/gradient calls)", "repeated_theta"),
                       ("errors", "errors")):
        if s[key]:
            print(f"{title}:")
            for x in s[key]:
                print(f"  {x}")


def print_backend_choice(rows: list[FitRecord]) -> None:
    """Per shape (with ``--backends compiled blocked``): the backend "auto" chose and the median
    seconds of each backend over the seeds (one fit each: indicative on a shared machine)."""
    shapes = list(dict.fromkeys(r.shape for r in rows))
    fits = {r.fit for r in rows}
    if not {"compiled", "blocked"} <= fits:
        return
    print("\nbackend choice (median seconds over the seeds, one fit each):")
    print(f"  {'shape':16s} {'auto chose':10s} {'compiled':>9s} {'blocked':>9s}  faster")
    for sh in shapes:
        chose = sorted({r.backend for r in rows if r.shape == sh and r.fit == "default" and not r.error})
        t = {b: [r.seconds for r in rows if r.shape == sh and r.fit == b and not r.error] for b in ("compiled", "blocked")}
        med = {b: statistics.median(v) if v else None for b, v in t.items()}
        faster = ("-" if None in med.values() else min(med, key=med.get))
        print(f"  {sh:16s} {'/'.join(chose) or '-':10s} {_num(med['compiled'], '9.3f'):>9s} "
              f"{_num(med['blocked'], '9.3f'):>9s}  {faster}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", choices=list(generators.SHAPES), metavar="NAME",
                    help=f"designs (default all: {' '.join(generators.SHAPES)})")
    ap.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3], help="generator seeds (default 1 2 3)")
    ap.add_argument("--size", choices=("small", "large"), default="small",
                    help="small: 20k-50k rows (default); large: the comparison's sizes")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply rows and level counts (default 1)")
    ap.add_argument("--backends", nargs="+", choices=("compiled", "blocked"), default=[],
                    help="also fit with these backends (their other options default)")
    ap.add_argument("--tol", type=float, default=CRITERION_TOL,
                    help=f"allowed criterion - best criterion (default {CRITERION_TOL:g})")
    ap.add_argument("--evals-median", type=float, default=None, metavar="M",
                    help="exit 3 when the default fits' median evaluations exceed M")
    ap.add_argument("--evals-max", type=int, default=None, metavar="K",
                    help="exit 3 when some default fit takes more than K evaluations")
    ap.add_argument("--json", metavar="OUT", help="write every fit (with its logged θ's) and the summary")
    args = ap.parse_args(argv)

    meta = {"argv": sys.argv[1:], "size": args.size, "scale": args.scale, "seeds": args.seeds,
            "best_options": BEST_OPTIONS, "tolerance": args.tol, "versions": compare._versions(),
            "fastlmm_ext": {"file": fl.__file__, "git": compare._git_head()},
            "loadavg_before": compare._loadavg()}
    with warnings.catch_warnings():         # imports and first-call set-up are not timed
        warnings.simplefilter("ignore")
        fl.lmer("Reaction ~ Days + (Days|Subject)", fl.datasets.load("sleepstudy"))
    rows: list[FitRecord] = []
    for name in args.shapes or generators.SHAPES:
        shape = generators.SHAPES[name]
        for seed in args.seeds:
            df = generators.make(name, seed, args.size, args.scale)
            best = best_criterion(shape.formula, df)
            for fit in ["default"] + list(args.backends):
                rows.append(record(name, seed, df, fit, best, shape.formula))
                r = rows[-1]
                print(f"# {name} seed {seed} ({len(df):,} rows) {fit}: "
                      + (r.error or f"{r.backend}/{r.optimizer} {r.feval} evaluations, {r.seconds:.3f} s, "
                                    f"criterion - best {r.gap:+.2e} (best: {best.feval} BOBYQA evaluations)"),
                      file=sys.stderr, flush=True)
    meta["loadavg_after"] = compare._loadavg()
    print(f"# load average before: {meta['loadavg_before']}; after: {meta['loadavg_after']}")
    print_table(rows, args.tol)
    summary = summarise(rows, args.tol)
    print_summary(summary)
    print_backend_choice(rows)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"meta": meta, "summary": summary, "fits": [asdict(r) for r in rows]}, fh, indent=1,
                      default=float)
        print(f"\nwrote {args.json}")
    if summary["worse_than_best"] or summary["errors"]:
        return 1
    med, mx = summary["feval_median"], summary["feval_max"]
    if med is not None and ((args.evals_median is not None and med > args.evals_median)
                            or (args.evals_max is not None and mx > args.evals_max)):
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
