"""Scale benchmarks of issue 6: time and peak memory of large fits, one process per problem.

    python benchmarks/scale.py                 # all problems
    python benchmarks/scale.py movielens       # one of: movielens, crossed1e7, chunked1e7

* ``movielens``: 10⁶ ratings, 6,040 users × 3,706 items (the MovieLens-1M shape), with skewed
  user activity and item popularity (``datasets.simulate_ratings``),
  ``rating ~ 1 + (1|user) + (1|item)``;
* ``crossed1e7``: 10⁷ rows, factor a with 10⁵ levels crossed with b (2,000 levels),
  ``y ~ x + (1|a) + (1|b)``, in memory;
* ``chunked1e7``: the same 10⁷ rows written to a Parquet file and fitted by ``lmer_chunked``
  (one row group at a time), to show the memory of the out-of-core path.

Each problem runs in a fresh subprocess so its peak resident memory (``ru_maxrss``) is its own.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time

PROBLEMS = ("movielens", "crossed1e7", "chunked1e7")


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def make_parquet(path: str) -> None:
    """The 10⁷-row crossed design as a Parquet file (run in its own process, so that the fitting
    process's peak memory does not include making the data)."""
    import fastlmm_ext as fl
    fl.datasets.simulate_crossed(10_000_000, 100_000, 2000).to_parquet(path, row_group_size=500_000)


def run_one(name: str) -> dict:
    import fastlmm_ext as fl
    t0 = time.perf_counter()
    if name == "chunked1e7":
        path = os.path.join(tempfile.mkdtemp(prefix="fastlmm_scale_"), "crossed1e7.parquet")
        subprocess.run([sys.executable, __file__, "--make", path], check=True)
        t_data = time.perf_counter() - t0
        base_mb = _peak_mb()
        t1 = time.perf_counter()
        model = fl.LinearMixedModel.from_chunks("y ~ x + (1|a) + (1|b)", path, chunksize=500_000)
        os.remove(path)
        return _fit_and_report(name, model, t1, t_data, base_mb)
    if name == "movielens":
        df = fl.datasets.simulate_ratings()
        formula = "rating ~ 1 + (1|user) + (1|item)"
    else:
        df = fl.datasets.simulate_crossed(10_000_000, 100_000, 2000)
        formula = "y ~ x + (1|a) + (1|b)"
    t_data = time.perf_counter() - t0
    base_mb = _peak_mb()
    t1 = time.perf_counter()
    model = fl.LinearMixedModel(formula, df)
    return _fit_and_report(name, model, t1, t_data, base_mb)


def _fit_and_report(name: str, model, t1: float, t_data: float, base_mb: float) -> dict:
    t_build = time.perf_counter() - t1
    t2 = time.perf_counter()
    res = model.fit()
    t_fit = time.perf_counter() - t2
    return {"problem": name, "nobs": res.nobs, "levels": res.ngrps, "backend": res.backend,
            "build_s": round(t_build, 2), "fit_s": round(t_fit, 2), "total_s": round(t_build + t_fit, 2),
            "evaluations": int(res.optsummary.feval), "criterion": res.criterion, "theta": res.theta.tolist(),
            "data_s": round(t_data, 2), "peak_rss_mb": round(_peak_mb()), "rss_before_model_mb": round(base_mb)}


def main(argv: list[str]) -> None:
    if len(argv) > 1 and argv[1] == "--make":
        make_parquet(argv[2])
        return
    if len(argv) > 1 and argv[1] == "--one":
        print(json.dumps(run_one(argv[2])))
        return
    names = argv[1:] or list(PROBLEMS)
    rows = []
    for name in names:
        out = subprocess.run([sys.executable, __file__, "--one", name], capture_output=True, text=True)
        if out.returncode != 0:
            print(f"{name}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"{name:12s} n={r['nobs']:>9,d} levels={r['levels']} backend={r['backend']:8s} build {r['build_s']:6.2f} s"
              f"  fit {r['fit_s']:6.2f} s ({r['evaluations']} evals)  total {r['total_s']:6.2f} s"
              f"  peak RSS {r['peak_rss_mb']:,} MB (before the model: {r['rss_before_model_mb']:,} MB)", flush=True)
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main(sys.argv)
