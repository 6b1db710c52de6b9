"""Time per response of ``fit_many`` against a plain Python loop of ``lmer`` calls and of ``refit``.

Usage (from the repository root)::

    python benchmarks/fit_many_speed.py [--responses M] [--loop K] [--designs sleepstudy crossed5k]

For each design, M synthetic responses (new random effects and noise drawn from the design's own
model) are fitted four ways, and the wall time per response is printed:

* ``lmer loop``: ``fl.lmer(formula, data.assign(y=...))`` for the first K responses (design,
  cross-products and symbolic analysis rebuilt every time);
* ``refit loop``: one ``LinearMixedModel``, then ``model.refit(y)`` for the first K responses;
* ``fit_many n_jobs=1`` and ``n_jobs=2`` on all M responses (pool start-up included).

The last column is the largest difference in the criterion between fit_many and the lmer loop.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if any((REPO / "fastlmm_ext").glob("_kernel*.so")) and str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))      # this checkout, when its kernel is built in place (as compare.py)

import fastlmm_ext as fl
from fastlmm_ext import datasets


def sleepstudy(m: int, seed: int = 1):
    """sleepstudy's design; y = 251 + 10.5 Days + b0 + b1 Days + ε with
    b0 ~ N(0, 25²), b1 ~ N(0, 6²) per subject and ε ~ N(0, 25²)."""
    df = datasets.load("sleepstudy")
    rng = np.random.default_rng(seed)
    g = df["Subject"].cat.codes.to_numpy()
    days = df["Days"].to_numpy()
    Y = np.empty((len(df), m))
    for j in range(m):
        Y[:, j] = (251 + 10.5 * days + rng.normal(0, 25, 18)[g] + rng.normal(0, 6, 18)[g] * days
                   + rng.normal(0, 25, len(df)))
    return "~ Days + (Days|Subject)", df, Y


def crossed5k(m: int, seed: int = 1):
    """5,000 rows, 200 × 50 crossed levels (datasets.simulate_crossed), responses drawn like its y."""
    df = datasets.simulate_crossed(5_000, 200, 50)
    rng = np.random.default_rng(seed)
    a, b, x = df["a"].cat.codes.to_numpy(), df["b"].cat.codes.to_numpy(), df["x"].to_numpy()
    Y = np.empty((len(df), m))
    for j in range(m):
        Y[:, j] = (1 + 0.5 * x + rng.normal(0, 1, 200)[a] + rng.normal(0, 0.5, 50)[b]
                   + rng.normal(size=len(df)))
    return "~ x + (1|a) + (1|b)", df, Y


DESIGNS = {"sleepstudy": sleepstudy, "crossed5k": crossed5k}


def _per_response(fn, count: int) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return (time.perf_counter() - t0) / count, out


def run(name: str, m: int, k: int) -> dict:
    rhs, df, Y = DESIGNS[name](m)
    k = min(k, m)
    fl.lmer("y " + rhs, df.assign(y=Y[:, 0]))          # warm-up: imports, first-call set-up
    t_lmer, crit_lmer = _per_response(
        lambda: [fl.lmer("y " + rhs, df.assign(y=Y[:, j])).criterion for j in range(k)], k)
    model = fl.LinearMixedModel("y " + rhs, df.assign(y=Y[:, 0]))
    t_refit, _ = _per_response(lambda: [model.refit(Y[:, j]).criterion for j in range(k)], k)
    t_many1, tab = _per_response(lambda: fl.fit_many(rhs, df, Y, n_jobs=1), m)
    t_many2, tab2 = _per_response(lambda: fl.fit_many(rhs, df, Y, n_jobs=2), m)
    diff = max(np.max(np.abs(tab.criterion.to_numpy()[:k] - np.array(crit_lmer))),
               np.max(np.abs(tab2.criterion.to_numpy() - tab.criterion.to_numpy())))
    return {"design": name, "n": len(df), "responses": m, "lmer loop": t_lmer, "refit loop": t_refit,
            "fit_many n_jobs=1": t_many1, "fit_many n_jobs=2": t_many2, "max |Δ criterion|": diff}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--responses", type=int, default=200, help="responses per design (default 200)")
    ap.add_argument("--loop", type=int, default=50,
                    help="responses timed in the lmer/refit loops (default 50)")
    ap.add_argument("--designs", nargs="+", default=list(DESIGNS), choices=list(DESIGNS))
    args = ap.parse_args(argv)
    cols = ["lmer loop", "refit loop", "fit_many n_jobs=1", "fit_many n_jobs=2"]
    print(f"{'design':<11} {'n':>6} {'m':>4}  " + "  ".join(f"{c:>17}" for c in cols) + "  max |Δ criterion|")
    print("(milliseconds per response)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")           # singular fits among the synthetic responses
        for name in args.designs:
            r = run(name, args.responses, args.loop)
            print(f"{name:<11} {r['n']:>6} {r['responses']:>4}  "
                  + "  ".join(f"{1e3 * r[c]:>17.2f}" for c in cols) + f"  {r['max |Δ criterion|']:.1e}")
    print(f"speed-up of fit_many (n_jobs=1) over the lmer loop is the ratio of the first and third columns; "
          f"{os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
