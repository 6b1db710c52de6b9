"""Turning user data into clean numeric columns: the one place every data check lives (and the
check of ``REML``, the argument that comes with the data).

Conventions follow R's model frames as lme4 builds them:
* rows with a missing value in any column the model uses are dropped (and counted);
* string, object, bool and categorical columns are factors; a pandas Categorical keeps its
  own category order (first category = reference level), other factors use sorted levels;
* unused factor levels are dropped;
* an interaction a:b of factors has the combinations present as levels, the first factor
  varying slowest, labelled "a_level:b_level" (:func:`combine_factors`, used in memory, by the
  chunked level scan and for new rows).
"""
from __future__ import annotations

import warnings
from typing import Iterable

import numpy as np
import pandas as pd

from ._exceptions import ArgumentError, DataError, MissingColumnError, MissingValuesWarning

__all__ = ["as_frame", "check_columns", "drop_missing", "prepare_factors", "factor_codes", "RowsAt",
           "is_factor_dtype", "as_numeric_array", "reject_complex", "check_weights", "no_positive_weight",
           "unique_labels", "is_polars_frame", "row_labels", "interaction_labels", "combine_factors",
           "recode_combinations", "check_reml"]


def as_frame(data, what: str = "data") -> pd.DataFrame:
    """A pandas DataFrame of ``data``: a DataFrame as it is; a polars DataFrame, or any object with
    ``.to_pandas()`` or the dataframe interchange protocol, converted once; a dict of equally long
    columns or records as ``pd.DataFrame`` reads them.  A NumPy array (no column names), a dict of
    unequal columns and MultiIndex columns are refused naming what is wrong."""
    if data is None:
        raise DataError(f"no data given: pass a pandas DataFrame as `{what}`")
    if isinstance(data, pd.DataFrame):
        return _check_frame(data, what)
    if isinstance(data, np.ndarray):
        raise DataError(f"{what} is a NumPy array of shape {data.shape}; the formula names columns, so `{what}` "
                        "must be a DataFrame with named columns, e.g. pd.DataFrame(array, columns=[...])")
    if is_polars_frame(data):
        return _check_frame(_from_polars(data), what)
    if hasattr(data, "to_pandas") or hasattr(data, "__dataframe__"):
        return _check_frame(_via_pandas_protocols(data, what), what)
    if isinstance(data, dict):
        _check_dict_lengths(data, what)
    try:
        return _check_frame(pd.DataFrame(data), what)
    except (TypeError, ValueError) as e:
        raise DataError(f"cannot use {what} of type {type(data).__name__} as a data frame: {e}") from e


def _check_frame(df: pd.DataFrame, what: str) -> pd.DataFrame:
    if isinstance(df.columns, pd.MultiIndex):
        raise DataError(f"{what} has MultiIndex (hierarchical) columns such as {df.columns[0]!r}; formulas name "
                        "flat columns: flatten them first, e.g. df.columns = ['_'.join(map(str, c)) for c in df.columns]")
    return df


def _check_dict_lengths(data: dict, what: str) -> None:
    """A dict of columns must give every column the same length (scalars are broadcast)."""
    lengths = {str(k): len(v) for k, v in data.items() if np.ndim(v) > 0}
    if len(set(lengths.values())) > 1:
        shown = ", ".join(f"{k!r}: {n}" for k, n in list(lengths.items())[:10])
        raise DataError(f"the columns of {what} (a dict) have different lengths ({shown}); "
                        "every column needs one value per row")


def _from_polars(df) -> pd.DataFrame:
    """A polars DataFrame column by column through NumPy (no pyarrow needed).  Text stays text and so
    becomes a factor; an Enum keeps its category order (its first category is the reference
    level); a polars Categorical, which in polars 2 has no category order of its own, is text
    (levels sorted, as for a string column); nulls become NaN / None / pd.NA."""
    import polars as pl
    cols = {}
    for name in df.columns:
        s = df.get_column(name)
        dt = s.dtype
        if isinstance(dt, pl.Enum):
            cols[name] = pd.Categorical(s.to_numpy(), categories=list(dt.categories))
        elif dt == pl.Boolean and s.null_count():
            cols[name] = pd.array(s.to_list(), dtype="boolean")
        elif isinstance(dt, pl.Decimal):
            cols[name] = s.cast(pl.Float64).to_numpy()
        else:
            cols[name] = s.to_numpy()
    return pd.DataFrame(cols)


def _via_pandas_protocols(data, what: str) -> pd.DataFrame:
    """``data.to_pandas()`` (pyarrow Tables, ...) or pandas' reader of the interchange protocol."""
    try:
        if hasattr(data, "to_pandas"):
            out = data.to_pandas()
        else:
            with warnings.catch_warnings():   # pandas' notice that the protocol is deprecated
                warnings.simplefilter("ignore")
                out = pd.api.interchange.from_dataframe(data)
    except Exception as e:  # noqa: BLE001 - the library's own error, named and chained
        raise DataError(f"cannot convert {what} of type {type(data).__name__} to a pandas DataFrame: "
                        f"{type(e).__name__}: {e}") from e
    if not isinstance(out, pd.DataFrame):
        raise DataError(f"{what} of type {type(data).__name__} converted to {type(out).__name__}, "
                        "not to a pandas DataFrame")
    return out


def check_columns(df: pd.DataFrame, names: Iterable[str]) -> None:
    """Raise MissingColumnError naming every variable of the formula that ``df`` lacks, and
    DataError for a variable whose name ``df`` holds more than once (which one would be
    ambiguous; duplicates among columns the model does not read are ignored, as those columns are)."""
    names = list(names)
    missing = sorted({n for n in names if n not in df.columns})
    if missing:
        raise MissingColumnError(missing, [str(c) for c in df.columns])
    if not df.columns.is_unique:
        dup = sorted({str(c) for c in df.columns[df.columns.duplicated()]} & set(names))
        if dup:
            raise DataError(f"column(s) {', '.join(map(repr, dup))} appear more than once in the data and the "
                            "model uses them; rename or drop the duplicates")


def is_factor_dtype(dtype) -> bool:
    """True for dtypes R would treat as a factor: categorical, string, object, bool."""
    if isinstance(dtype, pd.CategoricalDtype):
        return True
    if pd.api.types.is_bool_dtype(dtype):
        return True
    if pd.api.types.is_string_dtype(dtype) or pd.api.types.is_object_dtype(dtype):
        return True
    return False


def drop_missing(df: pd.DataFrame, columns: list[str]) -> tuple[pd.DataFrame, np.ndarray]:
    """Drop rows with a missing value (NaN, None, pd.NA, NaT) in any of ``columns``.

    Returns the complete rows (``df`` itself when every row is complete: callers read the used
    columns by name and never write to it) and the boolean mask of kept rows; warns when rows are
    dropped, as lme4's ``na.omit`` silently would not (users asked to be told)."""
    if len(df) == 0:
        raise DataError("data has no rows")
    bad = np.zeros(len(df), bool)
    for c in columns:
        bad |= _missing(df[c])
    n_bad = int(bad.sum())
    if not n_bad:
        return df, ~bad
    if n_bad == len(df):
        raise DataError(
            f"no complete rows: every one of the {len(df)} rows has a missing value in "
            f"{', '.join(map(repr, columns))}")
    warnings.warn(f"dropped {n_bad} of {len(df)} rows with missing values in the model's columns",
                  MissingValuesWarning, stacklevel=4)
    return df[columns].loc[~bad], ~bad


def _missing(s: pd.Series) -> np.ndarray:
    """Rows where ``s`` is missing, as pandas' isna decides (NumPy floats and categoricals directly)."""
    dt = s.dtype
    if isinstance(dt, np.dtype) and dt.kind in "iub":
        return np.zeros(len(s), bool)
    if isinstance(dt, np.dtype) and dt.kind == "f":
        return np.isnan(s.to_numpy())
    if isinstance(dt, pd.CategoricalDtype):
        return np.asarray(s.cat.codes) < 0
    return s.isna().to_numpy()


class RowsAt:
    """A few rows of some prepared data columns, kept as arrays ({column: (Categorical dtype or
    None, values)} and the rows' index labels) until a DataFrame of them is asked for: building
    a DataFrame costs a small fit a noticeable share of its time, and these are rarely read."""

    def __init__(self, columns: dict, index):
        self.columns = columns
        self.index = index

    @classmethod
    def take(cls, frame: pd.DataFrame, columns, rows) -> RowsAt:
        """``rows`` (positions) of ``frame``'s ``columns`` (a factor as its codes and dtype)."""
        wanted, out = set(columns), {}
        for c in frame.columns:
            if c in wanted:
                v = frame[c]
                out[c] = ((v.dtype, np.asarray(v.cat.codes)[rows]) if isinstance(v.dtype, pd.CategoricalDtype)
                          else (None, v.to_numpy()[rows]))
        return cls(out, frame.index[rows])

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame({c: (pd.Categorical.from_codes(v, dtype=dt) if dt is not None else v)
                             for c, (dt, v) in self.columns.items()}, index=self.index)


def factor_codes(values: pd.Series, name: str) -> tuple[np.ndarray, list[str]]:
    """Integer codes 0..K-1 and level labels of a factor, unused levels dropped.

    Categoricals keep their category order; other values are sorted (numbers numerically,
    strings lexically); bools become FALSE/TRUE like R's logical factors."""
    dtype = values.dtype
    if isinstance(dtype, pd.CategoricalDtype):
        raw = np.asarray(values.cat.codes, dtype=np.int64)
        cats = values.cat.categories.to_numpy()          # an array: no Python list of 10⁵ levels
        present = np.flatnonzero(np.bincount(raw, minlength=len(cats)))   # O(n), no sort
        if present.size == len(cats):
            codes = raw                                   # every level used: the codes as they are
        else:
            remap = np.full(len(cats), -1, dtype=np.int64)
            remap[present] = np.arange(present.size)
            codes = remap[raw]
        return codes, unique_labels(_labels(cats, present), cats[present], name)
    if pd.api.types.is_bool_dtype(dtype):
        arr = np.asarray(values, dtype=bool)
        present = np.unique(arr)
        return np.searchsorted(present, arr).astype(np.int64), ["TRUE" if v else "FALSE" for v in present]
    try:
        codes, uniques = pd.factorize(values, sort=True)
    except TypeError:  # mixed types cannot be ordered: order their labels instead
        codes, uniques = pd.factorize(values)
        labels = unique_labels(_labels(np.asarray(list(uniques), dtype=object), np.arange(len(uniques))),
                               list(uniques), name)
        order = np.argsort(np.asarray(labels, dtype=object), kind="stable")
        rank = np.empty(len(order), dtype=np.int64)
        rank[order] = np.arange(len(order))
        return np.where(codes >= 0, rank[np.maximum(codes, 0)], -1), [labels[i] for i in order]
    labels = _labels(list(uniques) if not hasattr(uniques, "dtype") else uniques, np.arange(len(uniques)))
    return np.asarray(codes, dtype=np.int64), unique_labels(labels, uniques, name)


def unique_labels(labels: list[str], values: list, name: str) -> list[str]:
    """``labels`` if they are distinct; else DataError naming the column and two values that print
    alike.  An object column can hold values that differ only in type, such as 1 and '1':
    pandas keeps them apart, R's factor() would merge them into one level "1", and two levels
    with one label would make ranef, VarCorr and predict ambiguous, so such data are refused
    rather than guessed at (the chunked level scan refuses them the same way)."""
    if len(set(labels)) == len(labels):
        return labels
    first: dict[str, object] = {}
    for lab, v in zip(labels, values):
        if lab in first:
            raise DataError(f"column {name!r} holds values that differ only in type but print alike "
                            f"({first[lab]!r} and {v!r}, both level {lab!r}), for example text in some rows or "
                            f"chunks and numbers in others; convert the column to one type first "
                            f"(e.g. df[{name!r}].astype(str))")
        first[lab] = v
    return labels  # pragma: no cover - a repeated label was found above


def _labels(values, idx) -> list[str]:
    """Labels of ``values[idx]`` as :func:`_label` makes them, vectorised for integer levels
    (10⁵ levels: 0.1 s in a Python loop)."""
    arr = np.asarray(values)[np.asarray(idx, dtype=np.intp)] if len(idx) else np.asarray([], dtype=object)
    if arr.dtype.kind in "iu":
        return [str(v) for v in arr.tolist()]          # 2x faster than astype(str) for 10⁵ levels
    if arr.dtype.kind == "U" or (arr.dtype.kind == "O" and pd.api.types.infer_dtype(arr, skipna=False) == "string"):
        return arr.tolist()                            # strings are their own labels
    if arr.dtype.kind == "f" and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)) \
            and np.all(np.abs(arr) < 2**53):
        return arr.astype(np.int64).astype(str).tolist()
    return [_label(v) for v in arr]


def _label(v) -> str:
    if isinstance(v, (float, np.floating)) and float(v).is_integer():
        return str(int(v))
    if isinstance(v, (bool, np.bool_)):
        return "TRUE" if v else "FALSE"
    return str(v)


def row_labels(values: pd.Series) -> np.ndarray:
    """The level label of every row (object array; None where missing), as :func:`factor_codes`
    labels levels: ints and integer-valued floats give "1", bools "TRUE"/"FALSE", strings themselves."""
    if isinstance(values.dtype, pd.CategoricalDtype):
        cats = np.array([_label(c) for c in values.cat.categories] + [None], dtype=object)
        codes = np.asarray(values.cat.codes, dtype=np.int64)
        return cats[np.where(codes < 0, len(cats) - 1, codes)]
    codes, uniques = pd.factorize(values, sort=False)
    labs = np.array([_label(u) for u in uniques] + [None], dtype=object)
    return labs[np.where(codes < 0, len(labs) - 1, codes)]


# ----------------------------------------------------------------------------- interactions

def interaction_labels(parts) -> list[str]:
    """Level labels of an interaction a:b:…: the factors' labels joined by ':' (lme4's "b:a")."""
    return [":".join(map(str, t)) for t in zip(*parts)]


def combine_factors(codes: list[np.ndarray], levels: list[list[str]]) -> tuple[np.ndarray, list[str], list]:
    """The interaction of factors given by level codes (into ``levels``): the combinations present,
    ordered with the first factor varying slowest, labelled by :func:`interaction_labels`.

    Returns (each row's code into those combinations, their labels, the sorted keys of each step),
    the steps being what :func:`recode_combinations` needs to code other rows the same way.  The
    factors are combined one at a time (key = combination so far × ℓ + code), so keys stay below
    rows × ℓ whatever the number of factors."""
    out = np.asarray(codes[0], dtype=np.int64)
    labels = list(levels[0])
    steps = []
    for c, lv in zip(codes[1:], levels[1:]):
        keys, out = np.unique(out * len(lv) + c, return_inverse=True)
        out = out.astype(np.int64).ravel()
        labels = interaction_labels([[labels[k] for k in keys // len(lv)], [lv[k] for k in keys % len(lv)]])
        steps.append(keys)
    return out, labels, steps


def recode_combinations(codes: list[np.ndarray], levels: list[list[str]], steps: list) -> np.ndarray:
    """Codes into the combinations of :func:`combine_factors` (``steps``) of other rows' level
    codes; −1 for a combination it did not see."""
    out = np.asarray(codes[0], dtype=np.int64)
    for c, lv, keys in zip(codes[1:], levels[1:], steps):
        key = out * len(lv) + c
        pos = np.searchsorted(keys, key)
        found = (out >= 0) & (pos < keys.size)
        found[found] = keys[pos[found]] == key[found]
        out = np.where(found, pos, -1)
    return out


def prepare_factors(df: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """Copy of the used columns in which every factor-like column is a clean Categorical.

    String/object columns get sorted levels, bools get FALSE/TRUE, categoricals drop unused
    categories; numeric columns are checked for infinite values."""
    out = {}
    for col in columns:
        s = df[col]
        dtype = s.dtype
        if isinstance(dtype, pd.CategoricalDtype):
            used = np.bincount(np.asarray(s.cat.codes, dtype=np.int64) + 1, minlength=len(dtype.categories) + 1)
            out[col] = s if used[1:].all() else s.cat.remove_unused_categories()
            cats = list(out[col].cat.categories)
            unique_labels(_labels(cats, np.arange(len(cats))), cats, col)
        elif pd.api.types.is_bool_dtype(dtype):
            out[col] = pd.Categorical(np.where(np.asarray(s, dtype=bool), "TRUE", "FALSE"),
                                      categories=[c for c in ("FALSE", "TRUE")
                                                  if (c == "TRUE") in set(np.asarray(s, dtype=bool))])
        elif is_factor_dtype(dtype):
            codes, levels = factor_codes(s, col)
            out[col] = pd.Categorical.from_codes(codes, categories=levels)
        elif pd.api.types.is_numeric_dtype(dtype):
            arr = as_numeric_array(s, col)
            out[col] = arr
        else:
            raise DataError(f"column {col!r} has unsupported type {dtype}")
    return pd.DataFrame(out, index=df.index)


def as_numeric_array(s, name: str, what: str = "column") -> np.ndarray:
    """float64 array of a numeric column or array; infinite and complex values are an error naming it."""
    if isinstance(s, pd.Series) and is_factor_dtype(s.dtype):
        raise DataError(f"{what} {name!r} must be numeric, but has type {s.dtype}")
    reject_complex(s, name, what)
    try:
        if isinstance(s, pd.Series) and isinstance(s.dtype, np.dtype) and s.dtype.kind in "iuf":
            arr = np.array(s.to_numpy(), dtype=np.float64)      # NumPy dtypes: no NA to map, a copy
        else:
            arr = np.asarray(s.to_numpy(dtype=np.float64, na_value=np.nan) if isinstance(s, pd.Series)
                             else s, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise DataError(f"{what} {name!r} must be numeric: {e}") from e
    if np.isinf(arr).any():
        n = int(np.isinf(arr).sum())
        raise DataError(f"{what} {name!r} contains {n} infinite value(s)")
    return arr


def reject_complex(values, name: str, what: str = "column") -> None:
    """DataError for complex values, which a float64 model matrix would silently cut to their real part."""
    dtype = getattr(values, "dtype", None)
    if dtype is None:
        dtype = np.asarray(values).dtype
    if not isinstance(dtype, pd.api.extensions.ExtensionDtype) and np.dtype(dtype).kind == "c":
        raise DataError(f"{what} {name!r} is complex ({dtype}); linear mixed models need real numbers "
                        "(pass its real part or its modulus explicitly)")


def check_weights(w: np.ndarray, what: str, all_rows: bool = True) -> None:
    """Prior weights must be non-negative and, over all rows (``all_rows``; one chunk's may all
    be zero), not all zero.  ``w`` comes from as_numeric_array (finite or NaN)."""
    neg = int(np.sum(w < 0))
    if neg:
        raise DataError(f"{what} must be non-negative, but {neg} value(s) are negative")
    if all_rows and not np.any(w > 0):
        raise no_positive_weight(what)


def no_positive_weight(what: str) -> DataError:
    """The error for weights that are zero in every row (in memory, or summed over all chunks)."""
    return DataError(f"{what} is zero in every row the model uses; at least one observation needs a "
                     "positive weight")


def check_reml(REML) -> bool:
    """``REML`` as a bool: True/False (NumPy's too) or the integers 1/0, as R's ``if (REML)``
    coerces numbers; anything else (a string such as "no", None, an array) is refused rather than
    read by Python's truthiness, under which "no" would mean REML."""
    if isinstance(REML, (bool, np.bool_)):
        return bool(REML)
    if isinstance(REML, (int, np.integer)) and REML in (0, 1):
        return bool(REML)
    raise ArgumentError(f"REML must be True or False, got {REML!r} ({type(REML).__name__})")


def check_level(level) -> float:
    """A confidence level as a float strictly between 0 and 1 (``confint``, ``predict``'s
    intervals, ``ls_means``/``emmeans``, the bootstrap's intervals); ArgumentError otherwise."""
    try:
        lv = float(level)
    except (TypeError, ValueError):
        raise ArgumentError(f"level must be a number in (0, 1), got {level!r}") from None
    if not 0.0 < lv < 1.0:
        raise ArgumentError(f"level must be in (0, 1), got {level!r}")
    return lv


def is_polars_frame(obj) -> bool:
    """True for a polars DataFrame, without importing polars."""
    return type(obj).__module__.split(".")[0] == "polars" and hasattr(obj, "get_column")
