"""asv benchmarks: objective evaluation and full fits, over design size, crossed vs nested, and backend.

Run: ``cd benchmarks && asv run --quick`` (or ``asv dev``).  Speed goals are checked here,
never by timed tests.
"""

import fastlmm_ext as fl
from fastlmm_ext import datasets


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
            k.inverse_diag()


class Fit:
    params = (["crossed-20k", "crossed-200k", "nested-100k"], ["compiled", "blocked"])
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
