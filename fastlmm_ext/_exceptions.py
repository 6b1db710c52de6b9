"""Error and warning hierarchy of fastlmm_ext.

Every problem a user can cause raises a subclass of :class:`FastLMMError`; the
subclasses also derive from the built-in exception a Python user would expect
(``ValueError`` for bad values, ``KeyError`` for missing columns, ``TypeError`` for an argument
of the wrong type) so generic
``except ValueError`` handlers keep working.
"""
from __future__ import annotations

__all__ = [
    "FastLMMError", "FormulaError", "DataError", "MissingColumnError", "ArgumentError",
    "GroupingFactorError", "IdentifiabilityError", "NotPositiveDefiniteError",
    "CholmodError", "FastLMMWarning", "ConvergenceWarning", "SingularFitWarning",
    "RankDeficiencyWarning", "MissingValuesWarning", "ContrastsError",
]


class FastLMMError(Exception):
    """Base class of every error raised by fastlmm_ext."""


class FormulaError(FastLMMError, ValueError):
    """The model formula is malformed or uses unsupported syntax."""


class DataError(FastLMMError, ValueError):
    """The data cannot be used as given (wrong type, infinite values, empty, ...)."""


class ArgumentError(FastLMMError, TypeError, ValueError):
    """An argument other than the data has an unusable type or value (e.g. ``REML="no"``)."""


class MissingColumnError(FastLMMError, KeyError):
    """The formula names columns that the data does not have."""

    def __init__(self, missing: list[str], available: list[str] | None = None):
        self.missing = list(missing)
        msg = "column(s) not found in data: " + ", ".join(repr(m) for m in self.missing)
        if available is not None:
            msg += f" (available: {', '.join(map(str, available[:20]))}{', ...' if len(available) > 20 else ''})"
        self.message = msg
        super().__init__(msg)

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return self.message


class GroupingFactorError(DataError):
    """A grouping factor cannot support its random-effects term."""


class IdentifiabilityError(DataError):
    """Random effects and residual variance cannot be told apart (too many levels/effects)."""


class NotPositiveDefiniteError(FastLMMError, ArithmeticError):
    """A Cholesky factorization failed; ``theta`` holds the parameter vector where it happened."""

    def __init__(self, msg: str, theta=None):
        self.theta = theta
        super().__init__(msg if theta is None else f"{msg} at theta = {list(map(float, theta))}")


class CholmodError(FastLMMError, RuntimeError):
    """CHOLMOD reported an error status (out of memory, invalid input, ...)."""


class FastLMMWarning(UserWarning):
    """Base class of fastlmm_ext warnings."""


class ConvergenceWarning(FastLMMWarning):
    """The optimiser stopped without meeting its convergence criteria, or the gradient check failed."""


class SingularFitWarning(FastLMMWarning):
    """The fit is singular: some element of θ lies on (within 1e-4 of) its lower bound.

    lme4's ``isSingular``; the result says so in ``res.singular`` and ``res.messages``.  Such a
    θ means some variance is estimated as zero, or some correlation as ±1: the random-effects
    covariance is degenerate.  ``res.theta`` (lme4's θ) and ``res.varcorr`` show which term.
    The estimates are still the maximum of the (restricted) likelihood, but the model is
    probably more complex than the data support: simplify the random effects (drop the
    correlation with ``(x || g)``, drop the slope or the whole term) and compare the fits with
    ``fastlmm_ext.anova``.  The README's "Singular fits" section says more."""


class RankDeficiencyWarning(FastLMMWarning):
    """The fixed-effects model matrix is rank deficient; columns were dropped."""


class MissingValuesWarning(FastLMMWarning):
    """Rows with missing values were dropped before fitting."""


class ContrastsError(FastLMMError, ValueError):
    """The ``contrasts=`` argument names an unknown column or contrast, or a matrix of the wrong shape."""
