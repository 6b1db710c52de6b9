"""statsmodels-style names and serialisation for LmerResult."""
from __future__ import annotations


class StatsmodelsMixin:
    """statsmodels names (params, bse, ...), to_dict/to_json and the notebook repr."""
