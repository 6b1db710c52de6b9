"""The ``fastlmm-ext`` command, run as ``python -m fastlmm_ext._cli`` in a subprocess on real files."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pandas as pd
import pytest

import fastlmm_ext as fl
from fastlmm_ext import datasets

PKG_PARENT = os.path.dirname(os.path.dirname(fl.__file__))
SLEEP = "Reaction ~ Days + (Days|Subject)"


def run_cli(*args: str, cwd, extra_path: str | None = None) -> subprocess.CompletedProcess:
    """Run the CLI with the imported fastlmm_ext package first on the path, in ``cwd``."""
    env = dict(os.environ)
    parts = [p for p in (extra_path, PKG_PARENT, env.get("PYTHONPATH")) if p]
    env["PYTHONPATH"] = os.pathsep.join(parts)
    env.pop("MPLBACKEND", None)
    return subprocess.run([sys.executable, "-m", "fastlmm_ext._cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    errors = [ln for ln in lines if ln.startswith("fastlmm-ext: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], proc.stderr
    for frag in fragments:
        assert frag in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """sleepstudy as CSV, gzipped CSV and (when pyarrow is installed) Parquet, plus variants."""
    d = tmp_path_factory.mktemp("cli_data")
    df = datasets.load("sleepstudy")
    out = {"dir": d, "csv": d / "sleep.csv", "gz": d / "sleep.csv.gz"}
    df.to_csv(out["csv"], index=False)
    df.to_csv(out["gz"], index=False, compression="gzip")
    try:
        import pyarrow  # noqa: F401
        out["parquet"] = d / "sleep.parquet"
        df.to_parquet(out["parquet"])
    except ImportError:
        pass
    na = df.copy()
    na["Reaction"] = na["Reaction"].astype(float)
    na.loc[[3, 7, 20], "Reaction"] = np.nan
    out["na"] = d / "sleep_na.csv"
    na.to_csv(out["na"], index=False)
    labelled = df.assign(label="s" + df["Subject"].astype(str))
    out["labelled"] = d / "sleep_label.csv"
    labelled.to_csv(out["labelled"], index=False)
    out["notgz"] = d / "broken.csv.gz"
    out["notgz"].write_text("this is not gzip\n")
    out["empty"] = d / "empty.csv"
    out["empty"].write_text("")
    out["fakeparquet"] = d / "fake.parquet"
    out["fakeparquet"].write_text("a,b\n1,2\n")
    return out


def api_fit(path, formula=SLEEP, **kw):
    return fl.lmer(formula, pd.read_csv(path), **kw)


# ----------------------------------------------------------------------------- success paths

def test_fit_prints_summary(files, tmp_path):
    proc = run_cli("fit", str(files["csv"]), SLEEP, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for piece in ["Linear mixed model fit by REML", f"Formula: {SLEEP}",
                  "REML criterion at convergence: 1743.6",
                  "Random effects:", "Number of obs: 180, groups:  Subject, 18", "Fixed effects:", "t value"]:
        assert piece in out
    assert out.rstrip("\n") == api_fit(files["csv"]).summary().rstrip("\n")
    assert proc.stderr == ""


def test_json_equals_python_api(files, tmp_path):
    proc = run_cli("fit", str(files["csv"]), SLEEP, "--json", "fit.json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    got = json.loads((tmp_path / "fit.json").read_text())
    res = api_fit(files["csv"])
    expected = res.to_dict()
    assert set(got) == set(expected)
    for key in ["schema_version", "formula", "REML", "backend", "nobs", "n_dropped", "criterion",
                "logLik", "AIC", "BIC", "deviance", "sigma", "theta", "theta_names", "fixef", "vcov",
                "varcorr", "ngrps", "converged", "singular", "messages", "optsummary"]:
        assert key in got
    # same data, same code: the numbers agree to the last bit
    assert got["criterion"] == {"name": "REMLcrit", "value": res.criterion}
    assert got["logLik"] == res.loglik and got["AIC"] == res.aic and got["BIC"] == res.bic
    assert got["theta"] == pytest.approx(res.theta.tolist(), rel=1e-12)
    assert got["fixef"]["Days"]["estimate"] == pytest.approx(res.fixef["Days"], rel=1e-12)
    assert got["fixef"]["Days"]["se"] == pytest.approx(res.se["Days"], rel=1e-12)
    assert got["vcov"]["names"] == ["(Intercept)", "Days"]
    np.testing.assert_allclose(got["vcov"]["values"], res.vcov.to_numpy(), rtol=1e-12)
    assert got["ngrps"] == {"Subject": 18} and got["nobs"] == 180
    assert got == expected
    assert "wrote fit.json" in proc.stderr


@pytest.mark.parametrize("kind", ["gz", "parquet"])
def test_compressed_and_parquet_agree_with_csv(files, tmp_path, kind):
    assert kind in files, "pyarrow (a test requirement) is needed to write the Parquet file"
    proc = run_cli("fit", str(files[kind]), SLEEP, "--json", "fit.json", "--quiet", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "" and proc.stderr == ""
    got = json.loads((tmp_path / "fit.json").read_text())
    res = api_fit(files["csv"])
    assert got["criterion"]["value"] == pytest.approx(res.criterion, rel=1e-9)
    assert got["sigma"] == pytest.approx(res.sigma, rel=1e-6)
    estimates = [got["fixef"][n]["estimate"] for n in res.fixef.index]
    assert estimates == pytest.approx(res.fixef.tolist(), rel=1e-7)
    assert got["theta"] == pytest.approx(res.theta.tolist(), rel=1e-5, abs=1e-7)


def test_ml_and_reference_backend(files, tmp_path):
    proc = run_cli("fit", str(files["csv"]), SLEEP, "--ml", "--backend", "reference", "--json", "ml.json",
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Linear mixed model fit by maximum likelihood" in proc.stdout
    got = json.loads((tmp_path / "ml.json").read_text())
    assert got["REML"] is False and got["backend"] == "reference"
    assert got["criterion"]["name"] == "deviance"
    res = api_fit(files["csv"], REML=False)
    assert got["criterion"]["value"] == pytest.approx(res.criterion, rel=1e-9)
    assert got["criterion"]["value"] == pytest.approx(1751.9393, abs=1e-3)   # lme4's ML deviance


def test_json_to_stdout(files, tmp_path):
    proc = run_cli("fit", str(files["gz"]), SLEEP, "--json", "-", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)        # nothing but the JSON on stdout
    assert got["formula"] == SLEEP and got["nobs"] == 180


def test_verbose_shows_progress(files, tmp_path):
    proc = run_cli("fit", str(files["csv"]), SLEEP, "--verbose", "--quiet", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("fastlmm-ext: fit done:") and "evaluations" in last
    assert "REML criterion 1743.6" in last


def test_dropped_rows_warning(files, tmp_path):
    proc = run_cli("fit", str(files["na"]), SLEEP, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    warn = [ln for ln in proc.stderr.splitlines() if ln.startswith("fastlmm-ext: warning:")]
    assert warn == ["fastlmm-ext: warning: dropped 3 of 180 rows with missing values in the model's columns"]
    assert "Number of obs: 177" in proc.stdout


def test_singular_fit_warning(files, tmp_path):
    # Subject numbers do not vary with Days: the Days variance is estimated as 0
    proc = run_cli("fit", str(files["csv"]), "Subject ~ Days + (1|Days)", "--json", "s.json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "fastlmm-ext: warning: boundary (singular) fit: see help(fastlmm_ext.SingularFitWarning)" in proc.stderr.splitlines()
    assert json.loads((tmp_path / "s.json").read_text())["singular"] is True


def test_plots_written(files, tmp_path):
    import matplotlib  # noqa: F401  (a test requirement)
    proc = run_cli("fit", str(files["csv"]), SLEEP, "--plot", "figs", "--quiet", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    names = sorted(p.name for p in (tmp_path / "figs").iterdir())
    assert names == ["caterpillar_Subject.png", "qq_ranef_Subject.png", "qq_resid.png", "resid_fitted.png"]
    for n in names:
        data = (tmp_path / "figs" / n).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5_000


def test_reference_data_file(tmp_path):
    """lme4's reference fit of Penicillin, read by the CLI from the shared reference CSV."""
    from conftest import reference_dir
    ref_dir = reference_dir()
    fits = json.loads((ref_dir / "Penicillin.json").read_text())
    ref = next(f for f in fits if f["formula"] == "diameter ~ 1 + (1|plate) + (1|sample)" and f["REML"])
    proc = run_cli("fit", str(ref_dir / ref["data_file"]), ref["formula"], "--json", "-", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert got["criterion"]["value"] == pytest.approx(ref["criterion"], abs=1e-6)
    assert got["logLik"] == pytest.approx(ref["logLik"], abs=1e-6)
    assert got["AIC"] == pytest.approx(ref["AIC"], abs=1e-6)
    assert got["fixef"]["(Intercept)"]["estimate"] == pytest.approx(ref["fixef"]["(Intercept)"], rel=1e-6)
    assert got["ngrps"] == ref["ngrps"]


# ----------------------------------------------------------------------------- errors

def test_error_missing_file(tmp_path):
    assert_one_line_error(run_cli("fit", "no_such.csv", SLEEP, cwd=tmp_path),
                          "data file not found", "no_such.csv")


def test_error_bad_formula(files, tmp_path):
    assert_one_line_error(run_cli("fit", str(files["csv"]), "Reaction ~ Days + (Days|Subject", cwd=tmp_path),
                          "(Days|Subject")


def test_error_no_random_term(files, tmp_path):
    assert_one_line_error(run_cli("fit", str(files["csv"]), "Reaction ~ Days", cwd=tmp_path), "random")


def test_error_missing_column(files, tmp_path):
    assert_one_line_error(run_cli("fit", str(files["csv"]), "Reaction ~ Dayz + (1|Subject)", cwd=tmp_path),
                          "'Dayz'", "not found")


def test_error_non_numeric_response(files, tmp_path):
    assert_one_line_error(run_cli("fit", str(files["labelled"]), "label ~ Days + (1|Subject)", cwd=tmp_path),
                          "'label'", "numeric")


@pytest.mark.parametrize("which, fragment", [("notgz", "cannot read"), ("empty", "cannot read"),
                                             ("fakeparquet", "Parquet")])
def test_error_unreadable_file(files, tmp_path, which, fragment):
    assert which != "fakeparquet" or "parquet" in files, "pyarrow (a test requirement) is needed"
    assert_one_line_error(run_cli("fit", str(files[which]), SLEEP, cwd=tmp_path), fragment, files[which].name)


def test_error_unwritable_json(files, tmp_path):
    assert_one_line_error(run_cli("fit", str(files["csv"]), SLEEP, "--json", "no/such/dir/f.json", "-q",
                                  cwd=tmp_path), "cannot write JSON")


def test_error_missing_optional_dependencies(files, tmp_path):
    """pyarrow / matplotlib made unimportable: a one-line error naming the extra to install."""
    block = tmp_path / "block"
    for mod in ("pyarrow", "matplotlib"):
        (block / mod).mkdir(parents=True)
        (block / mod / "__init__.py").write_text(f"raise ImportError('{mod} blocked for this test')\n")
    parquet = files.get("parquet", files["dir"] / "missing.parquet")
    if not parquet.exists():
        parquet.write_bytes(b"PAR1")
    err = assert_one_line_error(run_cli("fit", str(parquet), SLEEP, cwd=tmp_path, extra_path=str(block)),
                                "pyarrow")
    assert "fastlmm_ext[parquet]" in err
    err = assert_one_line_error(run_cli("fit", str(files["csv"]), SLEEP, "--plot", "figs", cwd=tmp_path,
                                        extra_path=str(block)), "matplotlib")
    assert "fastlmm_ext[plot]" in err
    assert not (tmp_path / "figs").exists()


# ----------------------------------------------------------------------------- help

def test_help_explains_formula_syntax(tmp_path):
    proc = run_cli("--help", cwd=tmp_path)
    assert proc.returncode == 0
    for piece in ["(1|g)", "(x|g)", "(0 + x|g)", "(x||g)", "(1|a/b)", "(1|a:b)", "(1|a) + (1|b)", "fit"]:
        assert piece in proc.stdout
    proc = run_cli("fit", "--help", cwd=tmp_path)
    assert proc.returncode == 0
    for piece in ["(1|g)", "(x||g)", "(1|a/b)", "--json", "--plot", "--ml", "--backend", ".parquet",
                  "examples:"]:
        assert piece in proc.stdout


def test_no_command_is_usage_error(tmp_path):
    proc = run_cli(cwd=tmp_path)
    assert proc.returncode == 2 and "usage: fastlmm-ext" in proc.stderr


def test_main_in_process(files, tmp_path, capsys, monkeypatch):
    """main() returns the exit status instead of exiting, for embedding and the console script."""
    from fastlmm_ext._cli import main
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert main(["fit", str(files["csv"]), SLEEP, "--json", "f.json", "-q"]) == 0
    assert json.loads((tmp_path / "f.json").read_text())["nobs"] == 180
    assert main(["fit", "nope.csv", SLEEP]) == 2
    assert capsys.readouterr().err.strip() == "fastlmm-ext: error: data file not found: nope.csv"


def test_threads_option(files, tmp_path):
    proc = run_cli("fit", str(files["csv"]), SLEEP, "--threads", "1", "--quiet", "--json", "t.json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    got = json.loads((tmp_path / "t.json").read_text())
    assert got["criterion"]["value"] == pytest.approx(api_fit(files["csv"]).criterion, rel=1e-9)


@pytest.mark.parametrize("bad", ["0", "two"])
def test_error_bad_threads(files, tmp_path, bad):
    assert_one_line_error(run_cli("fit", str(files["csv"]), SLEEP, "--threads", bad, cwd=tmp_path), "--threads", bad)
