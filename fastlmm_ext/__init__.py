"""fastlmm_ext: linear mixed models with lme4's formula syntax, fitted through a compiled CHOLMOD kernel.

>>> import fastlmm_ext as fl
>>> res = fl.lmer("Reaction ~ Days + (Days | Subject)", data=df)   # doctest: +SKIP
>>> print(res.summary())                                            # doctest: +SKIP
"""
import pathlib
import re
from importlib import metadata

from . import datasets
from ._api import lmer, lmer_chunked
from ._contrasts import contr
from ._exceptions import (ArgumentError, CholmodError, ContrastsError, ConvergenceWarning, DataError, FastLMMError,
                          FastLMMWarning, FormulaError, GroupingFactorError, IdentifiabilityError,
                          MissingColumnError, MissingValuesWarning, NotPositiveDefiniteError,
                          RankDeficiencyWarning, SingularFitWarning)
from ._formula import parse_formula
from ._inference import anova
from ._many import fit_many
from ._model import LinearMixedModel
from ._optimize import OptSummary
from ._results import LmerResult


def _version() -> str:
    """The installed distribution's version (importlib.metadata); in a source tree that is not
    installed, the version in the pyproject.toml beside the package."""
    try:
        return metadata.version("fastlmm_ext")
    except metadata.PackageNotFoundError:
        pyproject = pathlib.Path(__file__).resolve().parents[1] / "pyproject.toml"
        try:
            m = re.search(r'^version\s*=\s*"([^"]+)"', pyproject.read_text(encoding="utf-8"), flags=re.M)
        except OSError:
            m = None
        return m.group(1) if m else "0+unknown"


__version__ = _version()

__all__ = [
    "lmer", "lmer_chunked", "anova", "fit_many", "datasets", "LinearMixedModel", "LmerResult", "OptSummary", "parse_formula",
    "contr", "FastLMMError", "FormulaError", "DataError", "MissingColumnError", "ArgumentError", "GroupingFactorError", "ContrastsError",
    "IdentifiabilityError", "NotPositiveDefiniteError", "CholmodError",
    "FastLMMWarning", "ConvergenceWarning", "SingularFitWarning", "RankDeficiencyWarning",
    "MissingValuesWarning", "__version__",
]
