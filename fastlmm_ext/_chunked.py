"""Fitting from data that arrives in chunks: out-of-core files and iterators of DataFrames.

Two passes over the chunks, each holding one chunk in memory at a time:

1. *levels*: the distinct levels of every factor in complete rows (``_levels``), so that each
   chunk numbers a level the way the whole data would (lme4's sorted levels);
2. *sums*: each chunk's contribution to the cross-products of [Z X y] (``_suffstats``).

The model is then fitted from the cross-products alone; the criterion equals the in-memory
fit's to rounding (tests: 1e-8).  A one-shot iterator (``pd.read_csv(..., chunksize=...)``)
cannot be read twice, so its chunks (only the model's columns) are spooled to a temporary
directory during the first pass and read back from there.

:class:`ChunkPlan` carries everything a worker needs to turn a chunk into sums; it is
picklable, so the Dask path (``_dask``) runs the same two functions per partition.
"""
from __future__ import annotations

import os
import tempfile
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import pandas as pd

from ._contrasts import check_contrast_names
from ._data import as_frame, as_numeric_array, check_columns, check_weights, is_polars_frame, no_positive_weight
from ._design import (ModelStructure, ModelVariables, ReTerm, check_response_type, check_term_size,
                      evaluate_rows, model_variables, order_terms, warn_rank_deficient)
from ._exceptions import DataError, FormulaError, MissingValuesWarning
from ._formula import ParsedFormula, parse_formula
from ._levels import GlobalLevels, LevelScanner
from ._ols import raise_if_exact
from ._progress import Progress
from ._rformula import parse_expr, translate
from ._suffstats import SuffStats

__all__ = ["structure_from_chunks", "ChunkPlan", "iter_file_chunks", "DEFAULT_CHUNKSIZE"]

DEFAULT_CHUNKSIZE = 500_000


# ----------------------------------------------------------------------------- sources

def iter_file_chunks(path, chunksize: int = DEFAULT_CHUNKSIZE, columns: list[str] | None = None
                     ) -> Iterator[pd.DataFrame]:
    """DataFrames of at most ``chunksize`` rows from a CSV (.csv, .csv.gz, .tsv) or Parquet file,
    reading only ``columns``.  A file that cannot be read (missing, a directory, truncated,
    corrupt) raises DataError naming it, whenever in the pass the reader finds out."""
    path = Path(path)
    name = path.name.lower()
    read_errors: tuple[type[BaseException], ...] = (OSError, EOFError, ValueError, zlib.error)
    try:
        if name.endswith((".parquet", ".pq")):
            import pyarrow
            import pyarrow.parquet as pq
            read_errors += (pyarrow.ArrowException,)
            pf = pq.ParquetFile(path)
            for batch in pf.iter_batches(batch_size=chunksize, columns=columns):
                yield batch.to_pandas()
        else:
            sep = "\t" if name.endswith((".tsv", ".tsv.gz", ".tab")) else ","
            usecols = (lambda c: c in set(columns)) if columns is not None else None
            yield from pd.read_csv(path, sep=sep, chunksize=chunksize, usecols=usecols)
    except read_errors as e:
        raise DataError(f"cannot read chunk file {str(path)!r}: {type(e).__name__}: {e}") from e


class _Source:
    """Chunks that can be read twice: a file path, a sequence of DataFrames, a callable returning
    a fresh iterable, or a one-shot iterator (spooled to a temporary directory on first read)."""

    def __init__(self, chunks, chunksize: int, columns: list[str] | None):
        self._spool: tempfile.TemporaryDirectory | None = None
        self._files: list[str] = []
        self._consumed = False
        if isinstance(chunks, (str, os.PathLike)):
            self._factory: Callable[[], Iterable] | None = lambda: iter_file_chunks(chunks, chunksize, columns)
        elif isinstance(chunks, pd.DataFrame) or is_polars_frame(chunks):
            one = _as_chunk(chunks)     # one frame (a polars one is iterable, by columns)
            self._factory = lambda: [one]
        elif isinstance(chunks, (list, tuple)):
            self._factory = lambda: chunks
        elif callable(chunks):
            self._factory = chunks
        elif isinstance(chunks, Iterable):
            self._factory = None
            self._once = iter(chunks)
        else:
            raise DataError(f"chunks must be a file path, DataFrames, or an iterable of DataFrames; "
                            f"got {type(chunks).__name__}")

    def first_pass(self, columns: list[str]) -> Iterator[pd.DataFrame]:
        if self._factory is not None:
            yield from (_as_chunk(c) for c in self._factory())
            return
        self._spool = tempfile.TemporaryDirectory(prefix="fastlmm_chunks_")
        for i, c in enumerate(self._once):
            c = _as_chunk(c)
            check_columns(c, columns)
            path = os.path.join(self._spool.name, f"{i:08d}.pkl")
            c[columns].to_pickle(path)
            self._files.append(path)
            yield c

    def second_pass(self) -> Iterator[pd.DataFrame]:
        if self._factory is not None:
            yield from (_as_chunk(c) for c in self._factory())
            return
        for path in self._files:
            yield pd.read_pickle(path)

    def close(self) -> None:
        if self._spool is not None:
            self._spool.cleanup()
            self._spool = None


def _as_chunk(c) -> pd.DataFrame:
    """A chunk as a pandas DataFrame (a polars one, or one with ``.to_pandas()``, is converted)."""
    if isinstance(c, pd.DataFrame) or is_polars_frame(c) or hasattr(c, "to_pandas"):
        return as_frame(c, what="a chunk")
    raise DataError(f"every chunk must be a pandas DataFrame, got {type(c).__name__}")


# ----------------------------------------------------------------------------- plan

@dataclass
class ChunkPlan:
    """What turning a chunk into sums needs, fixed after the level scan (picklable)."""
    formula: str
    parsed: ParsedFormula
    mv: ModelVariables
    weights: str | None
    offset: str | None
    levels: GlobalLevels | None = None
    fixed_spec: object = None
    terms: list[ReTerm] | None = None      # sorted terms without rows
    order: list[int] | None = None         # formula position of each sorted term
    fixef_names: list[str] | None = None   # all fixed-effects columns, before the rank check
    allow_python: bool = False
    contrasts: dict | None = None          # {column: RContrasts} of the fixed part, as given

    @classmethod
    def create(cls, formula: str, columns, weights=None, offset=None, allow_python: bool = False,
               contrasts=None) -> "ChunkPlan":
        if not isinstance(formula, str):
            raise FormulaError(f"formula must be a string, got {type(formula).__name__}")
        for name, arg in (("weights", weights), ("offset", offset)):
            if arg is not None and not isinstance(arg, str):
                raise DataError(f"{name}= must name a column when the data come in chunks")
        parsed = parse_formula(formula)
        mv = model_variables(parsed, columns, weights, offset, allow_python)
        # Stateful transforms (poly, scale, ns, bs, center) learn a state (mean, sd, knots, ...) from
        # the data they see; chunk by chunk they would each see a different chunk.
        cols = list(columns)
        parts = [parse_expr(e, cols, allow_python).stateful for e in (parsed.response, *parsed.offsets)]
        parts += [translate(t, cols, allow_python).stateful for t in (parsed.fixed, *(rt.expr for rt in parsed.random))]
        stateful = [f for p in parts for f in p]
        if stateful:
            raise FormulaError(f"{stateful[0]}() learns its state from the data it sees, so chunk by chunk it "
                               "would differ between chunks; transform the column before chunking")
        return cls(formula=formula, parsed=parsed, mv=mv, weights=weights, offset=offset,
                   allow_python=bool(allow_python), contrasts=check_contrast_names(contrasts, columns))

    # -- per chunk
    def complete_rows(self, df: pd.DataFrame) -> tuple[pd.DataFrame, int]:
        """The model's columns of the rows with no missing value, and how many rows were dropped."""
        check_columns(df, self.mv.all_columns)
        sub = df[self.mv.all_columns]
        bad = sub.isna().any(axis=1).to_numpy()
        n_bad = int(bad.sum())
        return (sub.loc[~bad] if n_bad else sub), n_bad

    def scanner(self) -> LevelScanner:
        return LevelScanner(self.mv.frame_columns, [tuple(rt.group) for rt in self.parsed.random])

    def scan(self, df: pd.DataFrame, scanner: LevelScanner) -> int:
        sub, n_bad = self.complete_rows(df)
        if len(sub):
            check_response_type(self.parsed, self.mv, sub)
            scanner.add(sub)
        return n_bad

    def rows(self, sub: pd.DataFrame):
        """Evaluate a block of complete rows with the global levels (and, after the first block,
        the fixed-effects columns of the first)."""
        frame = self.levels.categorize(sub[self.mv.frame_columns])
        w = as_numeric_array(sub[self.weights], self.weights, what="weights column") if self.weights else None
        if w is not None:
            check_weights(w, f"weights column {self.weights!r}", all_rows=False)
        o = as_numeric_array(sub[self.offset], self.offset, what="offset column") if self.offset else None
        block = evaluate_rows(self.parsed, frame, lambda g: self.levels.group_codes(sub, tuple(g)),
                              offset_arg=o, fixed_spec=self.fixed_spec, allow_python=self.allow_python,
                              contrasts=self.contrasts)
        return block, w

    def set_prototype(self, block) -> None:
        """Fix the fixed-effects columns and the sorted terms from the first evaluated block."""
        self.fixed_spec = block.fixed_spec
        self.fixef_names = list(block.fixef_names)
        term_levels = [self.levels.group_labels(tuple(rt.group)) for rt in self.parsed.random]
        self.terms = order_terms(self.parsed, block.term_cnms, term_levels, term_specs=block.term_specs)
        self.contrasts = block.contrasts
        m = len(self.parsed.random)
        self.order = sorted(range(m), key=lambda i: -len(term_levels[i]))

    def new_stats(self) -> SuffStats:
        return SuffStats(self.terms, len(self.fixef_names), weighted=self.weights is not None)

    def accumulate(self, df: pd.DataFrame, stats: SuffStats) -> SuffStats:
        sub, n_bad = self.complete_rows(df)
        stats.n_dropped += n_bad
        if len(sub):
            self.add_block(stats, *self.rows(sub))
        return stats

    def add_block(self, stats: SuffStats, block, w) -> None:
        """Add an evaluated block of rows (terms in formula order) to ``stats``."""
        stats.add(block.y, block.X, [block.term_codes[i] for i in self.order],
                  [block.term_Xi[i] for i in self.order], offset=block.offset, weights=w,
                  rows=block.frame[[c for c in block.frame.columns if c in self.mv.fixed]])

    # -- at the end
    def structure(self, stats: SuffStats):
        """The row-less ModelStructure and the kernel's cross-products from the summed stats."""
        n = stats.n
        if n == 0:
            raise DataError("no complete rows: the chunks held no row without missing values")
        if stats.n_dropped:
            warnings.warn(f"dropped {stats.n_dropped} of {n + stats.n_dropped} rows with missing values in the "
                          "model's columns", MissingValuesWarning, stacklevel=4)
        if self.weights is not None and not stats.sum_w > 0:
            raise no_positive_weight(f"weights column {self.weights!r}")
        for t in self.terms:
            check_term_size(t.factor, t.expr, t.nlevels, t.k, n)
        keep = stats.kept_columns()
        names = [self.fixef_names[j] for j in keep]
        dropped = [nm for j, nm in enumerate(self.fixef_names) if j not in set(keep)]
        warn_rank_deficient(dropped)
        cp = stats.finish(keep)
        # cp's ỹ is the weighted OLS residual, so its ỹᵀWỹ is the residual sum of squares
        raise_if_exact(float(cp.XyXy[-1, -1]), *stats.response_spread(), f"response {self.parsed.response!r}",
                       len(keep))
        lv = self.levels
        G = stats.unweighted_gram()
        s = ModelStructure(
            formula=self.formula, parsed=self.parsed, response=self.parsed.response, y=None, X=None,
            fixef_names=tuple(names), dropped_fixef=tuple(dropped), terms=tuple(self.terms), Z=None,
            offset=None, weights=None, n_dropped=stats.n_dropped, row_index=pd.RangeIndex(0),
            fixed_spec=self.fixed_spec,
            factor_levels={t.factor: list(t.levels) for t in self.terms},
            variable_levels={c: (list(lv.columns[c].labels), lv.columns[c].ordered)
                             for c in self.mv.frame_columns if c in lv.non_numeric},
            nobs=n, prior_weights=self.weights is not None, allow_python=self.allow_python,
            contrasts=dict(self.contrasts or {}),
            fixed_rows=None if stats.basis is None else stats.basis.reset_index(drop=True),
            fixed_gram=G[np.ix_(keep, keep)].copy())
        return s, cp


# ----------------------------------------------------------------------------- drivers

def structure_from_chunks(formula: str, chunks, *, weights: str | None = None, offset: str | None = None,
                          chunksize: int = DEFAULT_CHUNKSIZE, progress: bool = False, allow_python: bool = False,
                          contrasts=None):
    """The row-less model structure and cross-products of chunks of rows (see :func:`lmer_chunked`)."""
    source = _Source(chunks, chunksize, None)
    plan: ChunkPlan | None = None
    scanner = None
    stats = None
    try:
        hint = _columns_hint(formula, weights, offset, allow_python)
        for df in Progress(progress, "chunks (levels)", "chunks").iterate(source.first_pass(hint)):
            if plan is None:
                plan = ChunkPlan.create(formula, df.columns, weights, offset, allow_python, contrasts)
                scanner = plan.scanner()
            plan.scan(df, scanner)
        if plan is None:
            raise DataError("no data: the chunks iterable yielded no DataFrame")
        plan.levels = scanner.finish()
        dropped_before = 0
        for df in Progress(progress, "chunks (cross-products)", "chunks").iterate(source.second_pass()):
            if stats is not None:
                plan.accumulate(df, stats)
                continue
            sub, n_bad = plan.complete_rows(df)
            dropped_before += n_bad
            if len(sub):
                # the first block with rows fixes the fixed-effects columns, then is added as it is
                block, w = plan.rows(sub)
                plan.set_prototype(block)
                stats = plan.new_stats()
                stats.n_dropped += dropped_before
                plan.add_block(stats, block, w)
    finally:
        source.close()
    if stats is None:
        raise DataError("no complete rows: every row has a missing value in the model's columns")
    return plan.structure(stats)


def _columns_hint(formula, weights, offset, allow_python: bool) -> list[str]:
    """Columns to spool for a one-shot iterator: the model's, from the formula alone (no data
    columns yet: every name the formula reads as a variable is taken for a column)."""
    return model_variables(parse_formula(formula), (), weights, offset, allow_python).all_columns
