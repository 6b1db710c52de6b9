"""Factor levels gathered over chunks (``_levels``): the same levels and codes as the in-memory
path reads off the whole data, whatever the chunking and the order of merges."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import fastlmm_ext as fl
from fastlmm_ext._data import factor_codes
from fastlmm_ext._design import _group_codes
from fastlmm_ext._levels import LevelScanner

RNG = np.random.default_rng(11)
N = 300
DF = pd.DataFrame({
    "g": RNG.choice(["s10", "s2", "s1", "x"], N),
    "k": RNG.integers(0, 6, N).astype(float),         # numbers as a grouping factor: sorted numerically
    "f": RNG.choice([True, False], N),
    "x": RNG.normal(size=N),
})
DF = DF[~((DF.g == "x") & (DF.k == 5.0))].reset_index(drop=True)      # one combination of g:k absent


def scan(chunks, merge_tree=False):
    def scanner_of(c):
        sc = LevelScanner(["f", "x"], [("g",), ("g", "k"), ("k", "g")])
        sc.add(c)
        return sc
    if merge_tree:       # as Dask reduces them: pairwise, in any grouping
        parts = [scanner_of(c) for c in chunks]
        while len(parts) > 1:
            parts = [parts[i].merge(parts[i + 1]) if i + 1 < len(parts) else parts[i] for i in range(0, len(parts), 2)]
        return parts[0].finish()
    sc = LevelScanner(["f", "x"], [("g",), ("g", "k"), ("k", "g")])
    for c in chunks:
        sc.add(c)
    return sc.finish()


@pytest.mark.parametrize("merge_tree", [False, True])
@pytest.mark.parametrize("nchunks", [1, 3, 7])
def test_levels_and_codes_as_in_memory(nchunks, merge_tree):
    shuffled = DF.sample(frac=1.0, random_state=nchunks)
    chunks = [shuffled.iloc[i::nchunks] for i in range(nchunks)]
    lv = scan(chunks, merge_tree)
    for col in ("g", "k", "f"):
        codes, labels = factor_codes(DF[col], col)
        assert list(lv.columns[col].labels) == labels
        np.testing.assert_array_equal(lv.codes(DF, col), codes)
    for group in (("g", "k"), ("k", "g")):
        codes, labels = _group_codes(DF, group)
        assert lv.group_labels(group) == labels
        np.testing.assert_array_equal(lv.group_codes(DF, group), codes)
    assert "x" not in lv.columns                      # a numeric covariate is not a factor


def test_categories_in_order_of_appearance():
    """Chunks whose categoricals carry different category lists: categories in order of first
    appearance, chunk by chunk, unused ones dropped."""
    a = pd.DataFrame({"c": pd.Categorical(["lo", "hi"], categories=["lo", "hi", "mid"])})
    b = pd.DataFrame({"c": pd.Categorical(["mid", "top"], categories=["top", "mid"])})
    sc = LevelScanner(["c"], [])
    sc.add(a)
    sc.add(b)
    assert sc.finish().columns["c"].labels == ("lo", "hi", "mid", "top")


def test_unseen_levels_and_mixed_types_are_refused():
    lv = scan([DF])
    with pytest.raises(fl.DataError, match="'g'.*did not see"):
        lv.codes(pd.DataFrame({"g": ["new"]}), "g")
    with pytest.raises(fl.DataError, match="combinations the level scan did not see"):
        lv.group_codes(pd.DataFrame({"g": ["x"], "k": [5.0]}), ("g", "k"))
    sc = LevelScanner([], [("h",)])
    sc.add(pd.DataFrame({"h": pd.Series([1, 2], dtype=object)}))
    sc.add(pd.DataFrame({"h": pd.Series(["1", "3"], dtype=object)}))
    with pytest.raises(fl.DataError, match="'h'.*print alike"):
        sc.finish()

