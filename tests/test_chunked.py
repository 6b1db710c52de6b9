"""Fits from accumulated cross-products (lmer_chunked, Dask) equal in-memory fits and lme4's."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pandas as pd
import pytest

import fastlmm_ext as fl
from fastlmm_ext._exceptions import DataError, FormulaError, GroupingFactorError, MissingColumnError

from conftest import all_reference_fits, raises_named

REF_FITS = all_reference_fits()


def split(df: pd.DataFrame, k: int) -> list[pd.DataFrame]:
    """k chunks of (nearly) equal size, in row order."""
    edges = np.linspace(0, len(df), k + 1).astype(int)
    return [df.iloc[a:b] for a, b in zip(edges[:-1], edges[1:])]


def assert_same_fit(chunked, full, crit_tol=1e-8):
    assert chunked.criterion == pytest.approx(full.criterion, abs=crit_tol)
    assert list(chunked.fixef.index) == list(full.fixef.index)
    np.testing.assert_allclose(chunked.fixef.to_numpy(), full.fixef.to_numpy(), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(np.sqrt(np.diag(chunked.vcov)), np.sqrt(np.diag(full.vcov)), rtol=1e-5, atol=1e-10)
    np.testing.assert_allclose(chunked.theta, full.theta, rtol=1e-4, atol=1e-5)
    assert chunked.sigma == pytest.approx(full.sigma, rel=1e-6)
    assert chunked.nobs == full.nobs
    assert chunked.ngrps == full.ngrps
    assert chunked.theta_names == full.theta_names
    for name, tab in full.ranef.items():
        other = chunked.ranef[name]
        assert list(other.index) == list(tab.index)
        np.testing.assert_allclose(other.to_numpy(), tab.to_numpy(), rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- lme4 reference fits

@pytest.mark.parametrize("key,fit", [(f"{stem}:{i}", f) for i, (stem, f) in enumerate(REF_FITS)],
                         ids=[f"{stem}-{f['formula']}-{'REML' if f['REML'] else 'ML'}" for stem, f in REF_FITS])
def test_reference_fits_chunked(key, fit, fitted_reference):
    """Every public lme4 fit, from 5 chunks: equal to the in-memory fit and to lme4's numbers."""
    df, full = fitted_reference(key, fit)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = fl.lmer_chunked(fit["formula"], split(df, 5), REML=fit["REML"])
    assert not res.structure.has_rows
    assert_same_fit(res, full)
    assert res.criterion <= fit["criterion"] + 1e-6
    ref_fixef = fit["fixef"]
    names = list(ref_fixef) if isinstance(ref_fixef, dict) else list(res.fixef.index)
    vals = np.array(list(ref_fixef.values())) if isinstance(ref_fixef, dict) else np.asarray(ref_fixef)
    np.testing.assert_allclose(res.fixef[names].to_numpy(), vals, rtol=1e-4, atol=1e-8)
    assert res.sigma == pytest.approx(fit["sigma"], rel=1e-3)


# ----------------------------------------------------------------------------- sources and levels

@pytest.fixture(scope="module")
def mixed_frame() -> pd.DataFrame:
    """Text factors whose levels first appear in late chunks, a numeric grouping factor, a nested
    factor, a bool and an ordered factor, weights, an offset column and some missing values."""
    rng = np.random.default_rng(11)
    n = 3000
    g = rng.integers(0, 40, n)
    df = pd.DataFrame({
        "y": rng.normal(size=n),
        "x": rng.normal(size=n),
        "site": np.array(["s" + str(v) for v in rng.integers(0, 12, n)], dtype=object),
        "plot": rng.integers(0, 5, n),
        "g": g * 7 + 100,                      # numeric grouping factor (sorted numerically: 100 < 107 < ... )
        "trt": np.where(rng.random(n) < 0.5, "ctl", "drug"),
        "flag": rng.random(n) < 0.3,
        "dose": pd.Categorical(rng.choice(["lo", "mid", "hi"], n), categories=["lo", "mid", "hi"], ordered=True),
        "w": rng.uniform(0.5, 2.0, n),
        "off": rng.normal(scale=0.1, size=n),
    })
    df["y"] += 0.8 * rng.normal(size=40)[g] + 0.5 * df["x"] + (df["trt"] == "drug") * 0.7
    # sort so that "s9", "drug" and the largest g only show up in the last chunks
    df = df.sort_values(["site", "g"], key=lambda s: s.map(lambda v: str(v)[::-1]) if s.name == "site" else s)
    df.loc[df.index[:20], "x"] = np.nan
    df.loc[df.index[-7:], "y"] = np.nan
    return df.reset_index(drop=True)


MIXED_FORMULAS = [
    "y ~ x + trt + (1|site) + (1|g)",
    "y ~ x * trt + flag + dose + (x|site)",
    "y ~ x + (1|site/plot)",
    "y ~ x + (1|site:trt) + (0 + x||g)",
]


@pytest.mark.parametrize("formula", MIXED_FORMULAS)
def test_chunked_equals_in_memory_with_late_levels(mixed_frame, formula):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full = fl.lmer(formula, mixed_frame)
        res = fl.lmer_chunked(formula, split(mixed_frame, 7))
    assert_same_fit(res, full)
    assert res.n_dropped == full.n_dropped > 0
    for f in full.structure.terms:
        t = next(t for t in res.structure.terms if t.name == f.name)
        assert t.levels == f.levels


def test_weights_offset_and_missing_rows(mixed_frame):
    f = "y ~ x + trt + (1|site)"
    with pytest.warns(fl.MissingValuesWarning, match="dropped 27 of 3000 rows"):
        full = fl.lmer(f, mixed_frame, weights="w", offset="off")
    with pytest.warns(fl.MissingValuesWarning, match="dropped 27 of 3000 rows"):
        res = fl.lmer_chunked(f, split(mixed_frame, 4), weights="w", offset="off")
    assert_same_fit(res, full)
    assert "Weights: prior weights" in res.summary()


@pytest.mark.parametrize("reml", [True, False])
def test_sources_file_iterator_callable(tmp_path, mixed_frame, reml):
    f = "y ~ x + trt + (1|site) + (1|g)"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full = fl.lmer(f, mixed_frame, REML=reml)
        csv = tmp_path / "d.csv.gz"
        mixed_frame.to_csv(csv, index=False)
        pq = tmp_path / "d.parquet"
        mixed_frame.to_parquet(pq, row_group_size=700)
        fits = [
            fl.lmer_chunked(f, str(csv), REML=reml, chunksize=400),
            fl.lmer_chunked(f, pq, REML=reml, chunksize=500),
            fl.lmer_chunked(f, pd.read_csv(csv, chunksize=333), REML=reml),        # one-shot: spooled
            fl.lmer_chunked(f, (c for c in split(mixed_frame, 9)), REML=reml),     # generator: spooled
            fl.lmer_chunked(f, lambda: split(mixed_frame, 3), REML=reml),          # callable: read twice
            fl.lmer_chunked(f, mixed_frame, REML=reml),                            # one DataFrame
        ]
    for res in fits:
        assert_same_fit(res, full)


def test_one_chunk_per_row_group_and_empty_chunks(mixed_frame):
    """Empty chunks and chunks with only missing rows are skipped, and counted."""
    f = "y ~ x + (1|site)"
    parts = split(mixed_frame.iloc[20:], 3)
    chunks = [mixed_frame.iloc[:0], mixed_frame.iloc[:20], *parts]       # the first 20 rows all miss x
    with pytest.warns(fl.MissingValuesWarning):
        res = fl.lmer_chunked(f, chunks)
    with pytest.warns(fl.MissingValuesWarning):
        full = fl.lmer(f, mixed_frame)
    assert_same_fit(res, full)


def test_rank_deficient_column_dropped():
    rng = np.random.default_rng(5)
    df = pd.DataFrame({"y": rng.normal(size=400), "x": rng.normal(size=400), "g": rng.integers(0, 20, 400)})
    df["x2"] = 2.0 * df["x"]
    df["y"] += 1e6          # a large mean: the shift keeps r² from cancelling
    with pytest.warns(fl.RankDeficiencyWarning, match="x2"):
        full = fl.lmer("y ~ x + x2 + (1|g)", df)
    with pytest.warns(fl.RankDeficiencyWarning, match="x2"):
        res = fl.lmer_chunked("y ~ x + x2 + (1|g)", split(df, 6))
    assert list(res.fixef.index) == ["(Intercept)", "x"]
    assert_same_fit(res, full)


def test_results_from_cross_products(mixed_frame):
    """What the cross-products determine works; row-level quantities raise a clear error."""
    f = "y ~ x + trt + (1|site) + (1|g)"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full = fl.lmer(f, mixed_frame)
        res = fl.lmer_chunked(f, split(mixed_frame, 5))
    pd.testing.assert_frame_equal(res.coef_table(), full.coef_table(), rtol=1e-5)
    pd.testing.assert_frame_equal(res.anova_table(), full.anova_table(), rtol=1e-5)
    pd.testing.assert_frame_equal(res.varcorr, full.varcorr, rtol=1e-5)
    pd.testing.assert_frame_equal(res.ranef_table(), full.ranef_table(), rtol=1e-4, atol=1e-7)
    pd.testing.assert_frame_equal(res.confint("wald"), full.confint("wald"), rtol=1e-5)
    new = mixed_frame.dropna().head(50)
    np.testing.assert_allclose(res.predict(new), full.predict(new), rtol=1e-5, atol=1e-6)
    assert res.aic == pytest.approx(full.aic, abs=1e-7)
    assert res.deviance == pytest.approx(full.deviance, abs=1e-5)   # not minimised: first order in θ
    summary = res.summary()
    assert "not kept" in summary and "Fixed effects:" in summary
    for call in (res.fitted, res.residuals, res.simulate, lambda: res.predict(), lambda: res.getME("X")):
        with pytest.raises(DataError, match="accumulated cross-products"):
            call()
    ml = fl.lmer_chunked(f.replace(" + (1|g)", ""), split(mixed_frame, 5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lrt = fl.anova(ml, res)
        lrt_full = fl.anova(fl.lmer(f.replace(" + (1|g)", ""), mixed_frame), full)
    np.testing.assert_allclose(lrt["Chisq"].to_numpy()[1:], lrt_full["Chisq"].to_numpy()[1:], rtol=1e-5)


def test_large_mean_no_cancellation():
    """y + 1e7 gives the same criterion: the accumulators shift y by a least-squares fit."""
    df = fl.datasets.simulate_crossed(4000, 60, 30, seed=9)
    base = fl.lmer_chunked("y ~ x + (1|a) + (1|b)", split(df, 8))
    df2 = df.assign(y=df["y"] + 1e7 + 3e5 * df["x"])
    big = fl.lmer_chunked("y ~ x + (1|a) + (1|b)", split(df2, 8))
    assert big.criterion == pytest.approx(base.criterion, abs=1e-7)
    np.testing.assert_allclose(big.theta, base.theta, rtol=1e-6)


# ----------------------------------------------------------------------------- bad input

@pytest.mark.filterwarnings("ignore::fastlmm_ext.MissingValuesWarning")
def test_chunked_errors(mixed_frame):
    chunks = split(mixed_frame, 3)
    with pytest.raises(MissingColumnError, match="nope"):
        fl.lmer_chunked("y ~ nope + (1|site)", chunks)
    with pytest.raises(FormulaError, match="scale"):
        fl.lmer_chunked("y ~ scale(x) + (1|site)", chunks)
    with pytest.raises(DataError, match="no DataFrame"):
        fl.lmer_chunked("y ~ x + (1|site)", [])
    with pytest.raises(DataError, match="must be a pandas DataFrame"):
        fl.lmer_chunked("y ~ x + (1|site)", [chunks[0], {"y": [1.0]}])
    with pytest.raises(DataError, match="column"):
        fl.lmer_chunked("y ~ x + (1|site)", chunks, weights=np.ones(len(mixed_frame)))
    with pytest.raises(DataError, match="must be numeric"):
        fl.lmer_chunked("site ~ x + (1|g)", chunks)
    with pytest.raises(GroupingFactorError, match="1 level"):
        fl.lmer_chunked("y ~ x + (1|one)", [c.assign(one="a") for c in chunks])
    with pytest.raises(DataError, match="no complete rows"):
        fl.lmer_chunked("y ~ x + (1|site)", [c.assign(x=np.nan) for c in chunks])
    with pytest.raises(DataError, match="numeric in some chunks"):
        fl.lmer_chunked("y ~ x + z + (1|site)", [chunks[0].assign(z=1.0), chunks[1].assign(z="a")])
    with pytest.raises(DataError, match="exact linear function"):
        fl.lmer_chunked("x2 ~ x + (1|site)", [c.dropna().assign(x2=lambda d: 3 * d["x"] + 1) for c in chunks])
    with pytest.raises(ValueError, match="backend"):
        fl.LinearMixedModel("y ~ x + (1|site)", None, backend="reference",
                            structure=fl.lmer_chunked("y ~ x + (1|site)", chunks).structure)


# ----------------------------------------------------------------------------- chunk files that cannot be read

def test_unreadable_chunk_files_are_named(tmp_path):
    sleep = fl.datasets.load("sleepstudy")
    f = "Reaction ~ Days + (1|Subject)"
    good = tmp_path / "s.csv.gz"
    sleep.to_csv(good, index=False)
    raw = good.read_bytes()
    truncated = tmp_path / "t.csv.gz"
    truncated.write_bytes(raw[:len(raw) // 2])
    corrupt = tmp_path / "c.parquet"
    corrupt.write_bytes(b"not a parquet file at all")
    folder = tmp_path / "folder.parquet"
    folder.mkdir()
    for path in [truncated, tmp_path / "missing.csv", tmp_path, corrupt, folder]:
        with raises_named(DataError, "cannot read chunk file", str(path)):
            fl.lmer_chunked(f, str(path))
    with raises_named(DataError, str(truncated)):
        fl.LinearMixedModel.from_chunks(f, truncated, chunksize=50)    # fails in a later chunk, named too


# ----------------------------------------------------------------------------- chunks that disagree

def _str_then_int(sleep: pd.DataFrame) -> list[pd.DataFrame]:
    """Subject as text in the first half of the rows and as integers in the second (every subject in both)."""
    early = sleep.Days < 5
    subj = sleep.Subject.astype(str)
    return [sleep[early].assign(Subject=subj[early]), sleep[~early].assign(Subject=subj[~early].astype(int))]


def test_grouping_column_text_then_numbers(tmp_path):
    """'308' in early files and 308 in a later one: the same label for two values, refused naming the
    column on every path, as the in-memory fit of the concatenated rows refuses it."""
    sleep = fl.datasets.load("sleepstudy")
    f = "Reaction ~ Days + (1|Subject)"
    parts = _str_then_int(sleep)
    paths = []
    for i, part in enumerate(parts):
        paths.append(tmp_path / f"part{i}.parquet")
        part.to_parquet(paths[-1])
    with raises_named(DataError, "'Subject'", "'308'", "print alike"):
        fl.lmer(f, pd.concat(parts))
    with raises_named(DataError, "'Subject'", "'308'", "print alike"):
        fl.lmer_chunked(f, parts)
    with raises_named(DataError, "'Subject'", "'308'", "print alike"):
        fl.lmer_chunked(f, lambda: (pd.read_parquet(p) for p in paths))
    dd = pytest.importorskip("dask.dataframe")
    import dask
    with dask.config.set({"dataframe.convert-string": False}):    # else Dask turns the column into text itself
        ddf = dd.from_pandas(pd.concat(parts), npartitions=2, sort=False)
        with raises_named(DataError, "'Subject'", "'308'", "print alike"):
            fl.lmer(f, ddf)


def test_mixed_types_without_clash_agree_with_in_memory():
    """Text in early chunks, numbers in later ones, no label shared: distinct levels, numbered as the
    in-memory fit of the concatenated rows numbers them."""
    sleep = fl.datasets.load("sleepstudy")
    f = "Reaction ~ Days + (1|Subject)"
    subj = sleep.Subject.astype(str)
    first = sleep.index < 90                  # subjects of the first 90 rows are not in the rest
    parts = [sleep[first].assign(Subject=subj[first]), sleep[~first].assign(Subject=subj[~first].astype(int) + 1000)]
    full = fl.lmer(f, pd.concat(parts))
    res = fl.lmer_chunked(f, parts)
    assert list(res.ranef["Subject"].index) == list(full.ranef["Subject"].index)
    assert_same_fit(res, full)


def test_chunk_columns_checked_like_data(mixed_frame):
    f = "y ~ x + (1|site)"
    chunks = [c.dropna() for c in split(mixed_frame, 3)]
    with raises_named(DataError, "'x'", "more than once"):
        fl.lmer_chunked(f, [chunks[0], pd.concat([chunks[1], chunks[1][["x"]]], axis=1)])
    multi = chunks[1].copy()
    multi.columns = pd.MultiIndex.from_tuples([("m", c) for c in multi.columns])
    with raises_named(DataError, "MultiIndex"):
        fl.lmer_chunked(f, [chunks[0], multi])
    with raises_named(DataError, "must be a pandas DataFrame", "ndarray"):
        fl.lmer_chunked(f, [chunks[0], chunks[1].to_numpy()])
    for col in ["y", "x"]:
        bad = [c.assign(**{col: c[col].astype(complex)}) for c in chunks]
        with raises_named(DataError, f"'{col}'", "complex"):
            fl.lmer_chunked(f, bad)
    with raises_named(DataError, "'w'", "complex"):
        fl.lmer_chunked(f, [c.assign(w=np.ones(len(c), complex)) for c in chunks], weights="w")
    with raises_named(DataError, "'w'", "zero in every row"):
        fl.lmer_chunked(f, [c.assign(w=0.0) for c in chunks], weights="w")
    with raises_named(DataError, "'w'", "negative"):
        fl.lmer_chunked(f, [chunks[0].assign(w=1.0), chunks[1].assign(w=-1.0)], weights="w")
    with raises_named(DataError, "'w'", "infinite"):
        fl.lmer_chunked(f, [c.assign(w=np.inf) for c in chunks], weights="w")
    with raises_named(DataError, "'o'", "numeric"):
        fl.lmer_chunked(f, [c.assign(o="a") for c in chunks], offset="o")
    # a chunk of zero weights among others is fine: only all-zero weights are refused
    zero_first = [chunks[0].assign(w=0.0), *[c.assign(w=1.0) for c in chunks[1:]]]
    res = fl.lmer_chunked(f, zero_first, weights="w")
    assert res.criterion == pytest.approx(fl.lmer(f, pd.concat(zero_first), weights="w").criterion, abs=1e-8)
    dd = pytest.importorskip("dask.dataframe")
    with raises_named(DataError, "'x'", "complex"):
        fl.lmer(f, dd.from_pandas(pd.concat(chunks).assign(x=lambda d: d["x"].astype(complex)), npartitions=2))


# ----------------------------------------------------------------------------- Dask

def test_dask_local_cluster_equals_in_memory(mixed_frame):
    dd = pytest.importorskip("dask.dataframe")
    from distributed import Client, LocalCluster

    f = "y ~ x * trt + (1|site) + (1|g)"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full = fl.lmer(f, mixed_frame)
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as lc, \
                Client(lc):
            res = fl.lmer(f, dd.from_pandas(mixed_frame, npartitions=6))
            model = fl.LinearMixedModel(f, dd.from_pandas(mixed_frame, npartitions=3), REML=False)
        ml = fl.lmer(f, mixed_frame, REML=False)
    assert not res.structure.has_rows
    assert_same_fit(res, full)
    assert_same_fit(model.fit(), ml)


def test_dask_without_client_uses_default_scheduler():
    dd = pytest.importorskip("dask.dataframe")
    df = fl.datasets.simulate_crossed(3000, 40, 20, seed=4)
    full = fl.lmer("y ~ x + (1|a) + (1|b)", df)
    res = fl.lmer("y ~ x + (1|a) + (1|b)", dd.from_pandas(df, npartitions=4))
    assert_same_fit(res, full)


# ----------------------------------------------------------------------------- out of core

def test_file_larger_than_the_memory_limit(tmp_path):
    """A CSV bigger than the memory the process may still allocate: pandas cannot load it,
    the chunked path fits it (in a subprocess with RLIMIT_AS set above its baseline)."""
    rng = np.random.default_rng(2)
    n = 3_500_000
    a = rng.integers(0, 3000, n)
    b = rng.integers(0, 30, n)
    x = rng.normal(size=n)
    y = 1 + 0.5 * x + rng.normal(size=3000)[a] + 0.5 * rng.normal(size=30)[b] + rng.normal(size=n)
    path = tmp_path / "big.csv"
    pd.DataFrame({"y": y.round(5), "x": x.round(5), "a": a, "b": b}).to_csv(path, index=False)
    size_mb = path.stat().st_size / 2**20
    budget_mb = 60                             # extra address space allowed after imports
    assert size_mb > budget_mb
    script = textwrap.dedent(f"""
        import resource, json, sys
        import numpy, pandas, scipy.sparse, nlopt, fastlmm_ext as fl, fastlmm_ext._kernel
        # warm up: the BLAS libraries allocate their buffers on first use
        df0 = fl.datasets.simulate_crossed(2000, 30, 20)
        fl.lmer("y ~ x + (1|a) + (1|b)", df0)
        fl.lmer_chunked("y ~ x + (1|a) + (1|b)", [df0])
        vm = [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmSize")][0] * 1024
        lim = vm + {budget_mb} * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
        try:
            pandas.read_csv({str(path)!r})
            whole = "loaded"
        except (MemoryError, OSError):    # OSError: pandas maps the file and the mapping is refused
            whole = "MemoryError"
        res = fl.lmer_chunked("y ~ x + (1|a) + (1|b)", {str(path)!r}, chunksize=50_000)
        print(json.dumps({{"whole": whole, "criterion": res.criterion, "nobs": res.nobs,
                          "fixef": res.fixef.tolist()}}))
    """)
    # the fastlmm_ext these tests import (installed, or an in-place build), whatever the cwd
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.path.dirname(os.path.dirname(fl.__file__)))
    # cwd: not the checkout, whose uncompiled fastlmm_ext would shadow the installed one
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    import json
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["whole"] == "MemoryError"
    assert got["nobs"] == n
    assert got["fixef"][1] == pytest.approx(0.5, abs=0.01)


def test_reduced_scale_ratings_all_paths_agree():
    """The MovieLens-shaped scale benchmark, reduced (10⁵ ratings, 1,200 × 700 levels, skewed
    activity): backend 'auto' (the dense two-block path here), CHOLMOD, chunks and Dask agree."""
    dd = pytest.importorskip("dask.dataframe")
    df = fl.datasets.simulate_ratings(100_000, 1200, 700, seed=3)
    f = "rating ~ 1 + (1|user) + (1|item)"
    auto = fl.lmer(f, df)
    assert auto.backend == "blocked"
    chol = fl.lmer(f, df, backend="compiled")
    chunked = fl.lmer_chunked(f, split(df, 6))
    dask = fl.lmer(f, dd.from_pandas(df, npartitions=3))
    for other in (chol, chunked, dask):
        assert_same_fit(other, auto)
    assert auto.criterion <= fl.lmer(f, df, backend="compiled", optimizer="bobyqa").criterion + 1e-6
