"""asv benchmarks: objective evaluation, full fits and fit_many, over design size, crossed vs nested,
and backend.

Run: ``cd benchmarks && asv run --quick`` (or ``asv dev``).  Speed goals are checked here,
never by timed tests.
"""

import fastlmm_ext as fl
from fastlmm_ext import datasets
from fastlmm_ext._selinv import inverse_diag


crossed = datasets.simulate_crossed
nested = datasets.simulate_nested


DESIGNS = {
    "crossed-20k": (lambda: crossed(20_000, 1_000, 200), "y ~ x + (1|a) + (1|b)"),
    "crossed-200k": (lambda: crossed(200_000, 5_000, 2_000), "y ~ x + (1|a) + (1|b)"),
    "nested-100k": (lambda: nested(100_000, 1_000, 10), "y ~ 1 + (1|a/c)"),
}


class Objective:
    params = (["crossed-20k", "crossed-200k", "nested-100k"], ["compiled", "blocked"])
    param_names = ["design", "backend"]
    timeout = 300

    def setup(self, design, backend):
        make, formula = DESIGNS[design]
        self.model = fl.LinearMixedModel(formula, make(), backend=backend)
        self.theta = self.model.theta0 * 0.7

    def time_objective(self, design, backend):
        self.model.objective(self.theta)


    def time_gradient(self, design, backend):
        self.model.backend.gradient(self.theta * (1 + 1e-9), True)

    def time_selected_inverse(self, design, backend):
        """Takahashi selected inverse of the CHOLMOD factor (compiled path only)."""
        if backend == "compiled":
            k = self.model.backend.kernel
            k.update(self.theta * (1 + 2e-9))
            inverse_diag(k)


class Fit:
    params = (["crossed-20k", "crossed-200k", "nested-100k"], ["auto", "compiled", "blocked"])
    param_names = ["design", "backend"]
    timeout = 600

    def setup(self, design, backend):
        make, self.formula = DESIGNS[design]
        self.data = make()

    def time_fit(self, design, backend):
        fl.lmer(self.formula, self.data, backend=backend)

    def peakmem_fit(self, design, backend):
        fl.lmer(self.formula, self.data, backend=backend)

    def track_feval(self, design, backend):
        return fl.lmer(self.formula, self.data, backend=backend).optsummary.feval


class FitMany:
    """fit_many: ~200 responses on one design (built once), serial and in two processes.
    ``benchmarks/fit_many_speed.py`` prints the same per response next to a loop of lmer calls."""
    params = (["sleepstudy", "crossed-5k"], [1, 2])
    param_names = ["design", "n_jobs"]
    timeout = 600
    number = 1
    repeat = (1, 3, 60.0)

    def setup(self, design, n_jobs):
        import numpy as np
        rng = np.random.default_rng(1)
        m = 200
        if design == "sleepstudy":
            self.data = datasets.load("sleepstudy")
            self.formula = "~ Days + (Days|Subject)"
            g = self.data["Subject"].cat.codes.to_numpy()
            days = self.data["Days"].to_numpy()
            self.Y = np.column_stack([251 + 10.5 * days + rng.normal(0, 25, 18)[g]
                                      + rng.normal(0, 6, 18)[g] * days + rng.normal(0, 25, g.size)
                                      for _ in range(m)])
        else:
            self.data = crossed(5_000, 200, 50)
            self.formula = "~ x + (1|a) + (1|b)"
            a, b = self.data["a"].cat.codes.to_numpy(), self.data["b"].cat.codes.to_numpy()
            x = self.data["x"].to_numpy()
            self.Y = np.column_stack([1 + 0.5 * x + rng.normal(0, 1, 200)[a] + rng.normal(0, 0.5, 50)[b]
                                      + rng.normal(size=a.size) for _ in range(m)])

    def time_fit_many(self, design, n_jobs):
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fl.fit_many(self.formula, self.data, self.Y, n_jobs=n_jobs)


class Chunked:
    """Fits from accumulated cross-products: chunks of a DataFrame, and a Dask DataFrame on the
    local threaded scheduler (time and peak memory, against the in-memory fit in ``Fit``)."""
    params = (["crossed-200k", "nested-100k"], ["chunks-8", "dask-4"])
    param_names = ["design", "source"]
    timeout = 600

    def setup(self, design, source):
        make, self.formula = DESIGNS[design]
        self.data = make()

    def _fit(self, source):
        if source == "chunks-8":
            n = len(self.data)
            return fl.lmer_chunked(self.formula, [self.data.iloc[i * n // 8:(i + 1) * n // 8] for i in range(8)])
        import dask.dataframe as dd
        return fl.lmer(self.formula, dd.from_pandas(self.data, npartitions=4))

    def time_fit(self, design, source):
        self._fit(source)

    def peakmem_fit(self, design, source):
        self._fit(source)


class Scale:
    """The issue's scale problems (``benchmarks/scale.py`` runs them with peak RSS per process):
    a MovieLens-1M-shaped crossed design (10⁶ rows, 6,040 × 3,706 levels)."""
    timeout = 1800
    repeat = 1
    number = 1

    def setup(self):
        self.data = datasets.simulate_ratings()

    def time_movielens_fit(self):
        fl.lmer("rating ~ 1 + (1|user) + (1|item)", self.data)

    def peakmem_movielens_fit(self):
        fl.lmer("rating ~ 1 + (1|user) + (1|item)", self.data)
