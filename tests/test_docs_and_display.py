"""What users read: the summary's correlation table (against R's text), the singular-fit
message, the docstrings of the public entry points, ``python -m fastlmm_ext`` and the version."""
from __future__ import annotations

import inspect
import os
import pathlib
import pydoc
import re
import subprocess
import sys
import warnings

import numpy as np
import pandas as pd
import pytest

import fastlmm_ext as fl
from fastlmm_ext import datasets
from fastlmm_ext._optimize import SINGULAR_MESSAGE

from conftest import reference_dir

ROOT = pathlib.Path(__file__).resolve().parents[1]


def correlation_block(summary: str) -> list[str]:
    lines = summary.splitlines()
    start = lines.index("Correlation of Fixed Effects:")
    out = []
    for ln in lines[start + 1:]:
        if not ln.strip():
            break
        out.append(ln.rstrip())
    return out


# lme4 1.1.31, print(summary(lmer(...))): the "Correlation of Fixed Effects" block (trailing blanks
# dropped).  R: ingot <- read.csv("ingot.csv") with ingot and metal as factors; cake likewise with
# replicate and recipe as factors.
R_INGOT = """\
       (Intr) metali
metali -0.488
metaln -0.488  0.500"""

R_CAKE = """\
        (Intr) recipB recipC
recipeB -0.094
recipeC -0.094  0.500
temp    -0.897  0.000  0.000"""


def test_correlation_of_fixed_effects_as_lme4_prints_it_ingot():
    res = fl.lmer("pres ~ metal + (1|ingot)", datasets.load("ingot"))
    assert correlation_block(res.summary()) == R_INGOT.splitlines()


def test_correlation_of_fixed_effects_as_lme4_prints_it_four_coefficients():
    cake = pd.read_csv(reference_dir() / "cake.csv")
    cake["replicate"] = cake["replicate"].astype(str)
    res = fl.lmer("angle ~ recipe + temp + (1|replicate)", cake)
    assert correlation_block(res.summary()) == R_CAKE.splitlines()


def test_correlation_block_widths_and_negative_zero():
    """Every entry is formatted to the matrix's common width (R's format()), columns left-aligned,
    and a correlation that rounds to -0 prints as 0.000."""
    from fastlmm_ext._summary import correlation_rows
    V = np.array([[1.0, -0.5, 0.0002], [-0.5, 1.0, -0.0002], [0.0002, -0.0002, 1.0]])
    assert correlation_rows(V, ["(Intercept)", "x", "averyveryverylongname"]) == [
        "            (Intr) x",
        "x           -0.500",
        "avryvryvryl  0.000  0.000"]
    V = np.array([[4.0, 1.0], [1.0, 1.0]])     # no negative entry: width 5
    assert correlation_rows(V, ["a", "b"]) == ["  a", "b 0.500"]


def test_correlation_not_shown_beyond_lme4s_cor_max():
    rng = np.random.default_rng(3)
    df = pd.DataFrame({"f": np.repeat(list("abcdefghijklm"), 20), "g": np.tile(np.arange(10).astype(str), 26)})
    df["y"] = rng.normal(size=len(df))
    res = fl.lmer("y ~ f + (1|g)", df)
    assert res.structure.p == 13
    text = res.summary()
    assert "Correlation of Fixed Effects:" not in text
    assert "Correlation matrix not shown, as p = 13 > 12" in text


# ----------------------------------------------------------------------------- singular fits

def test_singular_message_points_to_something_that_exists():
    df = datasets.load("sleepstudy").copy()
    df["junk"] = np.tile(np.arange(10), 18)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = fl.lmer("Reaction ~ Days + (1|Subject) + (1|junk)", df)
    assert res.singular
    assert [str(w.message) for w in caught if issubclass(w.category, fl.SingularFitWarning)] == [SINGULAR_MESSAGE]
    assert SINGULAR_MESSAGE in res.messages and SINGULAR_MESSAGE in res.summary()
    for text in (SINGULAR_MESSAGE, res.summary(), res._repr_html_()):
        assert "isSingular')" not in text
    target = re.search(r"help\((\S+)\)", SINGULAR_MESSAGE).group(1)
    assert pydoc.locate(target) is fl.SingularFitWarning
    doc = inspect.getdoc(fl.SingularFitWarning)
    assert "res.singular" in doc and "Singular fits" in doc
    assert "### Singular fits" in (ROOT / "README.md").read_text()


# ----------------------------------------------------------------------------- docstrings

def documented_parameters(doc: str) -> set[str]:
    """Names in a numpydoc "Parameters" section ("a, b : type" lines; ``**kw`` as ``kw``)."""
    lines = doc.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.strip() == "Parameters")
    assert set(lines[start + 1].strip()) == {"-"}
    names: set[str] = set()
    for ln in lines[start + 2:]:
        if ln.strip() and set(ln.strip()) == {"-"}:
            break                                  # the next section's underline
        m = re.match(r"^(\S[^:]*?)\s*(?::|$)", ln)
        if m and not ln.startswith(" "):
            names |= {n.strip().lstrip("*") for n in m.group(1).split(",")}
    return names


ENTRY_POINTS = {
    "lmer": (fl.lmer, fl.lmer),
    "LinearMixedModel": (fl.LinearMixedModel, fl.LinearMixedModel.__init__),
    "LinearMixedModel.fit": (fl.LinearMixedModel.fit, fl.LinearMixedModel.fit),
    "lmer_chunked": (fl.lmer_chunked, fl.lmer_chunked),
    "fit_many": (fl.fit_many, fl.fit_many),
}


@pytest.mark.parametrize("name", list(ENTRY_POINTS))
def test_docstring_documents_every_parameter(name):
    documented, function = ENTRY_POINTS[name]
    params = [p for p in inspect.signature(function).parameters if p != "self"]
    doc = inspect.getdoc(documented)
    missing = set(params) - documented_parameters(doc)
    assert not missing, f"{name}: parameters not documented: {sorted(missing)}"
    assert "Returns" in doc or name == "LinearMixedModel"


def test_lmer_help_documents_fit_options_and_result():
    doc = inspect.getdoc(fl.lmer)
    for option in inspect.signature(fl.LinearMixedModel.fit).parameters:
        if option != "self":
            assert option in doc, option
    for attr in ("fixef", "theta", "sigma", "varcorr", "ranef", "condvar", "loglik", "singular", "summary()"):
        assert attr in doc, attr
    assert "log|L_θ|²" in doc                       # the criterion it minimises
    result_doc = inspect.getdoc(fl.LmerResult)
    for attr in ("fixef", "se, vcov", "theta", "sigma", "varcorr", "ranef, condvar", "criterion", "ngrps",
                 "messages", "optsummary"):
        assert attr in result_doc, attr


# ----------------------------------------------------------------------------- python -m, version

def run_main(*args, cwd):
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(fl.__file__)))
    return subprocess.run([sys.executable, "-m", "fastlmm_ext", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)


def test_python_dash_m_help(tmp_path):
    proc = run_main("--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: python -m fastlmm_ext")
    for name, formula in [("ingot", "pres ~ metal + (1|ingot)"), ("Pastes", "strength ~ 1 + (1|batch/cask)")]:
        assert name in proc.stdout and formula in proc.stdout


def test_python_dash_m_unknown_example_exits_2_with_the_choices(tmp_path):
    proc = run_main("ingot", "nope", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stdout == ""
    assert "Traceback" not in proc.stderr
    assert "unknown example 'nope'; choose from ingot, sleepstudy, Penicillin, Pastes" in proc.stderr


def test_python_dash_m_version(tmp_path):
    proc = run_main("--version", cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip() == f"fastlmm_ext {fl.__version__}"


def test_version_from_metadata_with_a_source_tree_fallback(monkeypatch):
    from importlib import metadata
    pyproject = (ROOT / "pyproject.toml").read_text()
    declared = re.search(r'^version\s*=\s*"([^"]+)"', pyproject, flags=re.M).group(1)
    try:
        assert fl.__version__ == metadata.version("fastlmm_ext")
    except metadata.PackageNotFoundError:
        assert fl.__version__ == declared

    def not_installed(name):
        raise metadata.PackageNotFoundError(name)
    monkeypatch.setattr(metadata, "version", not_installed)
    # not installed: the version of the pyproject.toml beside the package, if there is one (a source
    # tree), else "0+unknown" (an installed copy whose metadata went missing)
    beside = pathlib.Path(fl.__file__).resolve().parents[1] / "pyproject.toml"
    assert fl._version() == (declared if beside.exists() else "0+unknown")


# ----------------------------------------------------------------------------- the sdist

def test_sdist_carries_what_building_and_testing_need(tmp_path):
    """The sdist has the Cython sources, scripts, CI and the tests with their data (CI builds it
    with isolation and installs it in a fresh virtualenv; here it is built in this environment)."""
    proc = subprocess.run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(tmp_path),
                           str(ROOT)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    import tarfile
    (sdist,) = tmp_path.glob("fastlmm_ext-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    for need in ["src_c/_kernel.pyx", "src_c/_selinv.pyx", "src_c/fastlmm_ext/_kernel.pxd", "src_c/_gram.pyx",
                 "src_c/_dense.pyx", "src_c/cholmod.pxd", "setup.py", "pyproject.toml",
                 "MANIFEST.in", "README.md", "scripts/setup.sh", "scripts/example.sh", ".ci/run",
                 "tests/conftest.py", "tests/reference_extra/extra.json", "tests/reference_extra/make_extra.R",
                 "fastlmm_ext/data/ingot.csv", "fastlmm_ext/__main__.py"]:
        assert need in names, need
    assert not [n for n in names if n.endswith((".so", ".pyc")) or n.startswith("build/")]
