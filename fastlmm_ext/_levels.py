"""Factor levels collected over blocks of rows, so every chunk codes a level the same way.

A model built chunk by chunk (``lmer_chunked``, Dask partitions) must number the levels of
each factor exactly as the in-memory path numbers them from the whole data (see
``_data.factor_codes``): categoricals keep their category order, bools are FALSE < TRUE,
everything else is sorted (numbers numerically, text lexically); only levels present in
complete rows count.  :class:`LevelScanner` gathers the values a first pass over the chunks
sees; :class:`GlobalLevels` then turns any chunk's columns into codes against those levels.

Categoricals whose chunks carry different category lists (e.g. Parquet row groups with their
own dictionaries) are ordered by first appearance of each category, chunk by chunk.  Values
that differ only in type but print alike (1 and '1': text in early files, numbers in a later
one) are refused naming the column, as the in-memory path refuses them (``_data.unique_labels``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ._data import (_labels, combine_factors, factor_codes, is_factor_dtype, recode_combinations, reject_complex,
                    unique_labels)
from ._exceptions import DataError

__all__ = ["LevelScanner", "GlobalLevels", "ColumnLevels"]


@dataclass(frozen=True)
class ColumnLevels:
    """Levels of one column: labels in model order, and whether it is an ordered factor."""
    labels: tuple[str, ...]
    ordered: bool = False
    index: pd.Index = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "index", pd.Index(list(self.labels), dtype=object))

    def codes(self, values: pd.Series, name: str) -> np.ndarray:
        """Codes of ``values`` (no missing values) against these levels."""
        local, uniq_labels = _local_labels(values)
        pos = self.index.get_indexer(pd.Index(uniq_labels, dtype=object))
        if (pos < 0).any():
            new = [lab for lab, ps in zip(uniq_labels, pos) if ps < 0][:5]
            raise DataError(f"column {name!r} has level(s) {new} that the level scan did not see; "
                            "chunks must yield the same rows on every pass")
        return pos.astype(np.int64)[local]


def _local_labels(values: pd.Series) -> tuple[np.ndarray, list[str]]:
    """Codes into this block's own distinct values and those values' labels (as factor_codes
    makes them), so labelling costs one call per distinct value, not per row."""
    dtype = values.dtype
    if isinstance(dtype, pd.CategoricalDtype):
        codes = np.asarray(values.cat.codes, dtype=np.int64)
        return codes, _labels(list(dtype.categories), np.arange(len(dtype.categories)))
    if pd.api.types.is_bool_dtype(dtype):
        return np.asarray(values, dtype=bool).astype(np.int64), ["FALSE", "TRUE"]
    codes, uniques = pd.factorize(values)
    return np.asarray(codes, dtype=np.int64), _labels(np.asarray(uniques, dtype=object)
                                                      if not _numeric(uniques) else np.asarray(uniques),
                                                      np.arange(len(uniques)))


def _numeric(uniques) -> bool:
    dt = getattr(uniques, "dtype", None)
    return dt is not None and not isinstance(dt, pd.api.extensions.ExtensionDtype) and np.dtype(dt).kind in "iuf"


class LevelScanner:
    """Accumulates the distinct values of factor columns and of multi-column grouping factors.

    ``columns``: columns the model matrices read (numeric ones are only typed);
    ``groups``: grouping factors, each a tuple of columns (``a:b`` → ``("a", "b")``)."""

    def __init__(self, columns: list[str], groups: list[tuple[str, ...]]):
        group_cols = {c for g in groups for c in g}
        self.columns = list(dict.fromkeys([*columns, *[c for g in groups for c in g]]))
        self.group_columns = group_cols
        self.groups = [g for g in dict.fromkeys(groups) if len(g) > 1]
        self._values: dict[str, list] = {c: [] for c in self.columns}
        self._cats: dict[str, list] = {c: [] for c in self.columns}   # category lists seen
        self._ordered: dict[str, bool] = {c: False for c in self.columns}
        self._kind: dict[str, str] = {}
        self._combos: dict[tuple[str, ...], list[pd.DataFrame]] = {g: [] for g in self.groups}

    def add(self, df: pd.DataFrame) -> None:
        """Record the values of complete rows ``df``.  A numeric column that is not a grouping
        factor is only typed (its values are not kept: it is a covariate, not a factor)."""
        for c in self.columns:
            s = df[c]
            reject_complex(s, c)
            kind = _kind(s.dtype)
            self._set_kind(c, kind)
            if kind == "number" and c not in self.group_columns:
                continue
            if isinstance(s.dtype, pd.CategoricalDtype):
                present = np.flatnonzero(np.bincount(np.asarray(s.cat.codes, dtype=np.int64),
                                                     minlength=len(s.dtype.categories)))
                self._cats[c].append(list(s.dtype.categories))
                self._values[c].append(np.asarray(s.dtype.categories, dtype=object)[present])
                self._ordered[c] = self._ordered[c] or bool(s.dtype.ordered)
            else:
                self._values[c].append(pd.unique(s.to_numpy()) if kind != "bool"
                                       else np.unique(np.asarray(s, dtype=bool)))
        for g in self.groups:
            self._combos[g].append(df[list(g)].drop_duplicates())
        self._compact()

    def _set_kind(self, c: str, kind: str) -> None:
        prev = self._kind.setdefault(c, kind)
        if prev != kind:
            if "number" in (prev, kind) and c not in self.group_columns:
                raise DataError(f"column {c!r} is numeric in some chunks and text/categorical in others; "
                                "give the reader an explicit dtype for it")
            self._kind[c] = "mixed"

    @property
    def factor_columns(self) -> list[str]:
        """Columns that are factors: non-numeric ones, and every grouping column."""
        return [c for c in self.columns if self._kind.get(c, "number") != "number" or c in self.group_columns]

    def merge(self, other: "LevelScanner") -> "LevelScanner":
        for c in self.columns:
            self._values[c] += other._values[c]
            self._cats[c] += other._cats[c]
            self._ordered[c] = self._ordered[c] or other._ordered[c]
            k = other._kind.get(c)
            if k is not None:
                self._set_kind(c, k)
        for g in self.groups:
            self._combos[g] += other._combos[g]
        self._compact()
        return self

    def _compact(self) -> None:
        """Keep one array of distinct values per column (memory stays O(levels), not O(chunks))."""
        for c, vals in self._values.items():
            if len(vals) > 1:
                self._values[c] = [pd.unique(np.concatenate([np.asarray(v, dtype=object) for v in vals]))]
        for g, frames in self._combos.items():
            if len(frames) > 1:
                self._combos[g] = [pd.concat(frames, ignore_index=True).drop_duplicates()]

    def finish(self) -> "GlobalLevels":
        columns: dict[str, ColumnLevels] = {}
        for c in self.factor_columns:
            vals = np.concatenate([np.asarray(v, dtype=object) for v in self._values[c]]) if self._values[c] \
                else np.zeros(0, dtype=object)
            kind = self._kind.get(c, "other")
            if kind == "categorical":
                order: list = []
                seen = set()
                for cats in self._cats[c]:
                    for v in cats:
                        if v not in seen:
                            seen.add(v)
                            order.append(v)
                present = set(pd.unique(vals).tolist())
                kept = [v for v in order if v in present]
                labels = unique_labels(_labels(np.asarray(kept, dtype=object), np.arange(len(present))), kept, c)
            elif kind == "bool":
                present = set(np.asarray(vals, dtype=bool).tolist())
                labels = [lab for v, lab in ((False, "FALSE"), (True, "TRUE")) if v in present]
            else:
                series = pd.Series(vals) if kind == "mixed" or not len(vals) else \
                    pd.Series(vals, dtype=_pandas_dtype(vals))
                labels = factor_codes(series, c)[1]
            columns[c] = ColumnLevels(tuple(labels), ordered=self._ordered[c])
        levels = GlobalLevels(columns=columns, groups={},
                              non_numeric={c for c in self.columns if self._kind.get(c, "number") != "number"})
        for g in self.groups:
            combos = self._combos[g][0] if self._combos[g] else pd.DataFrame(columns=list(g))
            levels.groups[g] = levels._combo_levels(combos, g)
        return levels


def _kind(dtype) -> str:
    if isinstance(dtype, pd.CategoricalDtype):
        return "categorical"
    if pd.api.types.is_bool_dtype(dtype):
        return "bool"
    if is_factor_dtype(dtype):
        return "text"
    return "number"


def _pandas_dtype(vals: np.ndarray):
    """A dtype that sorts ``vals`` the way a column of them sorts in the in-memory path."""
    try:
        arr = np.asarray(vals.tolist())
    except Exception:
        return object
    return arr.dtype if arr.dtype.kind in "iufb" else object


@dataclass
class GlobalLevels:
    """Levels of every factor column and multi-column grouping factor of a model."""
    columns: dict[str, ColumnLevels]
    groups: dict[tuple[str, ...], tuple[list, list[str]]]   # combine_factors' steps, labels
    non_numeric: set[str] = field(default_factory=set)              # columns that are factors in the frame

    def codes(self, df: pd.DataFrame, column: str) -> np.ndarray:
        return self.columns[column].codes(df[column], column)

    def _combo_levels(self, combos: pd.DataFrame, group: tuple[str, ...]):
        """Present combinations of a:b…, first factor varying slowest, labelled 'x:y', as
        ``_design._group_codes`` builds them from the whole data (``_data.combine_factors``):
        (the steps that code later chunks, the labels)."""
        _, labels, steps = combine_factors([self.codes(combos, g) for g in group],
                                           [list(self.columns[g].labels) for g in group])
        return steps, labels

    def group_codes(self, df: pd.DataFrame, group: tuple[str, ...]) -> np.ndarray:
        """Level codes of grouping factor ``group`` for the rows of ``df``."""
        codes = [self.codes(df, g) for g in group]
        if len(group) == 1:
            return codes[0]
        out = recode_combinations(codes, [list(self.columns[g].labels) for g in group], self.groups[group][0])
        if (out < 0).any():
            raise DataError(f"grouping factor {':'.join(group)!r} has combinations the level scan did not see; "
                            "chunks must yield the same rows on every pass")
        return out

    def group_labels(self, group: tuple[str, ...]) -> list[str]:
        if len(group) == 1:
            return list(self.columns[group[0]].labels)
        return self.groups[group][1]

    def categorize(self, df: pd.DataFrame) -> pd.DataFrame:
        """Copy of ``df`` whose non-numeric columns are Categoricals over the global labels (what
        ``_data.prepare_factors`` makes from the whole data); numeric columns unchanged."""
        out = {}
        for c in df.columns:
            if c in self.non_numeric:
                lv = self.columns[c]
                out[c] = pd.Categorical.from_codes(lv.codes(df[c], c), categories=pd.Index(list(lv.labels)),
                                                   ordered=lv.ordered)
            else:
                out[c] = df[c]
        return pd.DataFrame(out, index=df.index)
