"""compare.py: the generated problems, which peers can fit them, seeds, the summary over seeds,
the busy core, and one end-to-end run through worker processes."""
import json
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import compare  # noqa: E402
import generators  # noqa: E402
from compare import FITTERS, PROBLEMS, Row  # noqa: E402

GENERATED = ["uniform200k", "movielens1m", "skewed100k", "tinyvar100k", "corr100k", "nested3_100k",
             "slopefactor100k", "crossslopes100k", "slope500k4"]
FIXED = ["insteval", "crossed200k", "slope500k", "sleepstudy", "nested100k"]


def test_problems_fixed_kept_and_generated_added():
    assert set(FIXED + GENERATED) == set(PROBLEMS)
    for name in FIXED:
        assert not PROBLEMS[name].seeded
    for name in GENERATED:
        p = PROBLEMS[name]
        shape = generators.SHAPES[p.shape]
        assert p.seeded and p.formula == shape.formula and p.factors == shape.factors
        assert 20_000 <= shape.large["n"] <= 1_000_000


@pytest.mark.parametrize("name", GENERATED)
def test_quick_data_is_a_tenth_and_differs_by_seed(name):
    p = PROBLEMS[name]
    df1, df2 = p.data(True, 1), p.data(True, 2)
    assert len(df1) == generators.SHAPES[p.shape].large["n"] // 10
    assert not df1["y"].equals(df2["y"])


def _why(fitter: str, p, n: int):
    return p.cannot.get(fitter) or FITTERS[fitter].applies(p, n)


def test_which_peers_can_express_which_model():
    single = {"corr100k", "slope500k4"}
    for name in GENERATED:
        p = PROBLEMS[name]
        assert (_why("mixedlm-rs", p, 100_000) is None) == (name in single)
        assert _why("mixedlm", p, 10**6) is None
    assert "uncorrelated" in _why("statsmodels", PROBLEMS["slopefactor100k"], 1_000)
    assert "uncorrelated" in _why("statsmodels", PROBLEMS["crossslopes100k"], 1_000)
    assert _why("statsmodels", PROBLEMS["nested3_100k"], 100_000) is None
    assert "cap" in _why("statsmodels", PROBLEMS["uniform200k"], 200_000)
    assert _why("statsmodels", PROBLEMS["uniform200k"], 20_000) is None


def test_summary_over_seeds():
    rows = []
    for seed, sec, fe, diff in [(1, 1.0, 5, 1e-9), (2, 3.0, 9, -2e-3), (3, 2.0, 7, 0.0)]:
        rows.append(Row("p", "fastlmm_ext", seconds=sec / 2, times=[sec / 2], feval=4, criterion=10.0,
                        criterion_diff=0.0, ratio=1.0, seed=seed))
        rows.append(Row("p", "peer", seconds=sec, times=[sec], feval=fe, peak_mb=100.0 + seed, criterion=10.0 + diff,
                        criterion_diff=diff, ratio=2.0 * seed, seed=seed))
    rows.append(Row("p", "slowpeer", "skipped", "later seeds skipped", seed=2))
    got = {m.fitter: m for m in compare.summarise(rows)}
    peer = got["peer"]
    assert (peer.seeds, peer.ok, peer.seconds, peer.feval_median, peer.feval_max) == (3, 3, 2.0, 7, 9)
    assert peer.worst_diff == -2e-3 and peer.peak_mb == 103.0 and peer.ratio == 4.0
    assert peer.criterion is None                      # several data sets: no single criterion
    assert got["slowpeer"].ok == 0 and got["slowpeer"].note == "later seeds skipped"


def test_busy_core_runs_while_inside_and_is_gone_after():
    with compare.BusyCore() as busy:
        assert busy.proc.poll() is None
    assert busy.proc.poll() is not None
    assert busy.cpu_s is not None and busy.cpu_s >= 0 and busy.wall_s > 0
    assert "busy loop" in busy.describe()


def test_end_to_end_seeds_variants_and_busy_core(tmp_path, capsys):
    out = tmp_path / "cmp.json"
    code = compare.main(["--quick", "--only", "corr100k", "--fitters", "fastlmm_ext", "--no-r", "--seeds", "1", "2",
                         "--busy-core", "--json", str(out)])
    assert code == 0
    got = json.loads(out.read_text())
    assert got["meta"]["mode"] == "busy-core" and got["meta"]["busy_core"]["cpu_s"] is not None
    res = [(r["fitter"], r["seed"], r["status"]) for r in got["results"]]
    # the default fit (compiled, L-BFGS-B) brings compiled+BOBYQA and the blocked backend along
    for seed in (1, 2):
        for fitter in ("fastlmm_ext", "fastlmm_ext[compiled,bobyqa]", "fastlmm_ext[blocked]"):
            assert (fitter, seed, "ok") in res
    assert all(abs(r["criterion_diff"]) < 1e-6 for r in got["results"] if r["status"] == "ok")
    summary = {m["fitter"]: m for m in got["summary"]}
    assert summary["fastlmm_ext"]["seeds"] == 2 and summary["fastlmm_ext"]["ok"] == 2
    text = capsys.readouterr().out
    assert "mode: busy core" in text and "load average" in text
