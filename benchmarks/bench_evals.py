"""asv: evaluation counts and optimum quality of the default fit on designs from the second
generator (``generators.py``, small sizes), as ``benchmarks/eval_counts.py`` measures them.

Tracked per (design, seed): the optimiser's evaluations (``optsummary.feval``), the objective and
gradient calls of the whole fit (logged on the backend), and criterion − best criterion (tight
compiled BOBYQA, restarted once) in units of 1e-9.  Evaluation counts do not depend on the load
of the machine, so unlike timings they are comparable between runs.
"""
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import eval_counts  # noqa: E402
import generators  # noqa: E402

DESIGNS = ["uniform_crossed", "zipf_ratings", "tiny_variance", "nested3", "crossed_slopes", "single_slope"]
SEEDS = [1, 2]


class EvalCounts:
    params = (DESIGNS, SEEDS)
    param_names = ["design", "seed"]
    timeout = 900

    def setup_cache(self):
        """Every (design, seed) fitted once: the default fit and the best criterion."""
        out = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for design in DESIGNS:
                shape = generators.SHAPES[design]
                for seed in SEEDS:
                    df = generators.make(design, seed)
                    best = eval_counts.best_criterion(shape.formula, df)
                    rec = eval_counts.record(design, seed, df, "default", best, shape.formula)
                    out[design, seed] = {"feval": rec.feval, "calls_f": rec.calls_f, "calls_g": rec.calls_g,
                                         "gap": rec.gap}
        return out

    def track_feval(self, cache, design, seed):
        return cache[design, seed]["feval"]
    track_feval.unit = "evaluations"

    def track_objective_calls(self, cache, design, seed):
        return cache[design, seed]["calls_f"]
    track_objective_calls.unit = "calls"

    def track_gradient_calls(self, cache, design, seed):
        return cache[design, seed]["calls_g"]
    track_gradient_calls.unit = "calls"

    def track_criterion_gap(self, cache, design, seed):
        return cache[design, seed]["gap"] * 1e9
    track_criterion_gap.unit = "1e-9"
