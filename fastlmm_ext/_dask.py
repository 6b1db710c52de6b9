"""Fitting a ``dask.dataframe.DataFrame``: cross-products per partition, reduced, fitted here.

The same two passes as the chunked path (``_chunked``), as Dask tasks on whatever scheduler is
active (a ``distributed.Client`` if one exists, a LocalCluster in the tests, a real cluster for
users): every partition is scanned for levels and the scanners are tree-reduced; then every
partition's sums (``SuffStats``) are computed and tree-reduced; only the reduced sums, whose
size is that of the random-effects system (not of the data), come back to the client, where
the kernel is built and θ optimised.  Dask is an optional dependency (``pip install
fastlmm_ext[dask]``) and is imported only when a Dask DataFrame is passed.
"""
from __future__ import annotations

import pandas as pd

from ._chunked import ChunkPlan
from ._data import check_columns
from ._exceptions import DataError

__all__ = ["is_dask_dataframe", "structure_from_dask"]


def is_dask_dataframe(obj) -> bool:
    """True for a dask DataFrame, without importing dask."""
    mod = type(obj).__module__ or ""
    return mod.startswith(("dask.", "dask_expr")) and hasattr(obj, "npartitions") and hasattr(obj, "to_delayed")


def _scan(df, plan: ChunkPlan):
    scanner = plan.scanner()
    n_bad = plan.scan(df, scanner)
    return scanner, n_bad


def _merge_scans(a, b):
    return a[0].merge(b[0]), a[1] + b[1]


def _sums(df, plan: ChunkPlan):
    return plan.accumulate(df, plan.new_stats())


def _merge_sums(a, b):
    return a.merge(b)


def _tree_reduce(items: list, merge, split_every: int = 8):
    """Pairwise (well, ``split_every``-wise) reduction of delayed values, depth log(n)."""
    from dask import delayed

    def combine(*xs):
        out = xs[0]
        for x in xs[1:]:
            out = merge(out, x)
        return out

    level = list(items)
    while len(level) > 1:
        level = [delayed(combine)(*level[i:i + split_every]) for i in range(0, len(level), split_every)]
    return level[0]


def structure_from_dask(formula: str, ddf, weights=None, offset=None, allow_python: bool = False, contrasts=None):
    """The row-less model structure and cross-products of a Dask DataFrame (module docstring)."""
    try:
        import dask
        from dask import delayed
    except ImportError as e:  # pragma: no cover - only reached with a dask object in hand
        raise ImportError("fitting a Dask DataFrame needs dask: pip install 'fastlmm_ext[dask]'") from e
    plan = ChunkPlan.create(formula, list(ddf.columns), weights, offset, allow_python, contrasts)
    check_columns(pd.DataFrame(columns=list(ddf.columns)), plan.mv.all_columns)
    parts = ddf[plan.mv.all_columns].to_delayed()
    if not parts:
        raise DataError("the Dask DataFrame has no partitions")

    plan_d = delayed(plan)   # one copy in the graph, not one per task
    scanner, _ = dask.compute(_tree_reduce([delayed(_scan)(p, plan_d) for p in parts], _merge_scans))[0]
    plan.levels = scanner.finish()
    # The fixed-effects columns and the sorted terms come from the first partition with complete
    # rows, as the chunked path takes them from its first chunk.
    for p in parts:
        sub, _ = plan.complete_rows(p.compute())
        if len(sub):
            plan.set_prototype(plan.rows(sub)[0])
            break
    else:
        raise DataError("no complete rows: every row has a missing value in the model's columns")
    plan_d = delayed(plan)
    stats = dask.compute(_tree_reduce([delayed(_sums)(p, plan_d) for p in parts], _merge_sums))[0]
    return plan.structure(stats)
