"""The ``fastlmm-ext`` command: fit a linear mixed model to a data file from the shell.

    fastlmm-ext fit DATA "FORMULA" [--ml] [--backend compiled|reference|...] [--threads N]
                    [--json OUT] [--plot DIR] [--quiet | --verbose]

DATA is CSV (``.csv``, optionally compressed: ``.csv.gz``, ...), tab-separated (``.tsv``) or
Parquet (``.parquet``/``.pq``, needs pyarrow).  The lme4-style summary goes to stdout; warnings,
progress and notes go to stderr, one line each, prefixed ``fastlmm-ext:``.

Exit status: 0 on success; 2 for a problem with the input (missing or unreadable file, bad
formula, missing column, unusable data, missing optional dependency), reported as one line
``fastlmm-ext: error: <message>``; 1 for an unexpected internal error; 130 when interrupted.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings

import pandas as pd

from . import __version__, plots
from ._backends import BACKENDS
from ._exceptions import FastLMMError
from ._model import LinearMixedModel
from ._progress import Progress

PROG = "fastlmm-ext"

SYNTAX = """\
formula syntax (lme4's; quote the formula for the shell):
  y ~ x + (1|g)              random intercept per level of g
  y ~ x + (x|g)              correlated random intercept and slope; same as (1 + x|g)
  y ~ x + (0 + x|g)          random slope only; same as (x - 1|g)
  y ~ x + (x||g)             uncorrelated intercept and slope: (1|g) + (0 + x|g)
  y ~ x + (1|a/b)            b nested in a: (1|a) + (1|b:a)
  y ~ x + (1|a:b)            grouping by the interaction of a and b
  y ~ x + (1|a) + (1|b)      crossed random effects
  y ~ 0 + x + (1|g)          no fixed intercept; same as x - 1
  y ~ a * b + (1|g)          interactions in the fixed part (a:b for the interaction only)
  y ~ (a + b + c)^2 + (1|g)  main effects and all two-way interactions
  y ~ x + offset(z) + (1|g)  a known offset

R's functions, with R's values and R's column names:
  I(x^2)  log(x)  log2 log10 log1p exp sqrt abs  poly(x, 2)  poly(x, 2, raw = TRUE)
  scale(x)  ns(x, df = 3)  bs(x, df = 4)  factor(k)  as.numeric(f)  relevel(f, "b")
  (^ is a power inside I() and function calls; np.log(x), I(x**2) and C(k) work too)
Names: a column is a variable wherever it is not called (a column named log or C is fine);
dotted names (Informed.liking) need no quotes; `any name` in backticks.
A formula cannot run code: only data columns, these functions and numpy ufuncs
(np.<name>) are evaluated; attribute access, subscripts and other Python are refused.

Text and boolean columns are factors (first level in sorted order is the reference).
Rows with a missing value in a used column are dropped, with a warning.
"""

EXAMPLES = """\
examples:
  fastlmm-ext fit sleepstudy.csv "Reaction ~ Days + (Days|Subject)"
  fastlmm-ext fit pastes.csv.gz "strength ~ 1 + (1|batch/cask)" --ml --json fit.json
  fastlmm-ext fit scores.parquet "y ~ x + (1|school) + (1|rater)" --plot plots/ --quiet
  fastlmm-ext fit data.csv "y ~ x + (x||g)" --json - > fit.json
"""

EXIT_OK, EXIT_INTERNAL, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class CLIError(Exception):
    """A user-facing problem: reported as one ``error:`` line with exit status 2."""


def _one_line(text: object) -> str:
    """Collapse a message to one line (pandas and pyarrow messages may span several)."""
    s = " ".join(str(text).split())
    return s


# ----------------------------------------------------------------------------- reading data

def _kind(path: str) -> str:
    """File type from the name: 'parquet', 'tsv' or 'csv' (compression suffixes ignored)."""
    name = path.lower()
    for comp in (".gz", ".bz2", ".xz", ".zst", ".zip"):
        if name.endswith(comp):
            name = name[: -len(comp)]
            break
    if name.endswith((".parquet", ".pq")):
        return "parquet"
    if name.endswith((".tsv", ".tab")):
        return "tsv"
    return "csv"


def read_data(path: str):
    """Read DATA into a pandas DataFrame: Parquet through pyarrow, otherwise CSV/TSV with
    compression inferred from the suffix.  Every failure becomes a :class:`CLIError`."""
    if not os.path.exists(path):
        raise CLIError(f"data file not found: {path}")
    if os.path.isdir(path):
        raise CLIError(f"data path is a directory, not a file: {path}")
    kind = _kind(path)
    if kind == "parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise CLIError("reading Parquet files needs pyarrow, which is not installed: "
                           "pip install fastlmm_ext[parquet]  (or: pip install pyarrow)") from None
    try:
        if kind == "parquet":
            df = pd.read_parquet(path, engine="pyarrow")
        else:
            df = pd.read_csv(path, sep="\t" if kind == "tsv" else ",", compression="infer")
    except Exception as e:  # pandas/pyarrow/gzip/codec errors all mean "cannot read this file"
        what = {"parquet": "Parquet", "tsv": "tab-separated text", "csv": "CSV"}[kind]
        raise CLIError(f"cannot read {path} as {what}: {_one_line(e) or type(e).__name__}") from e
    if df.shape[1] == 0:
        raise CLIError(f"no columns found in {path}")
    return df


# ----------------------------------------------------------------------------- commands

def _fit(args, progress_out: list) -> int:
    """The ``fit`` command; ``progress_out`` receives the progress reporter (for warnings)."""
    if args.plot is not None:  # fail before the fit when matplotlib is missing
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise CLIError("--plot needs matplotlib, which is not installed: "
                           "pip install fastlmm_ext[plot]  (or: pip install matplotlib)") from None
    threads = _threads(args.threads)
    df = read_data(args.data)
    reml = not args.ml
    # allow_python stays off on the command line: a formula from the shell never runs Python code
    model = LinearMixedModel(args.formula, df, REML=reml, backend=args.backend, allow_python=False,
                             threads=threads)
    progress = Progress(args.verbose, "fit", "evaluations", label="REML criterion" if reml else "deviance",
                        prefix=PROG)
    progress_out.append(progress)
    try:
        res = model.fit(verbose=progress)
    finally:
        progress.close()
        progress_out.remove(progress)

    json_to_stdout = args.json == "-"
    if not args.quiet and not json_to_stdout:
        text = res.summary()
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
        sys.stdout.flush()
    if args.json is not None:
        if json_to_stdout:
            sys.stdout.write(res.to_json() + "\n")
            sys.stdout.flush()
        else:
            try:
                res.to_json(args.json)
            except OSError as e:
                raise CLIError(f"cannot write JSON to {args.json}: {e.strerror or _one_line(e)}") from e
            _note(args, f"wrote {args.json}")
    if args.plot is not None:
        import matplotlib
        if "matplotlib.pyplot" not in sys.modules:
            matplotlib.use("Agg")  # files only, no window; an in-process caller's pyplot is left alone
        try:
            paths = plots.save_all(res, args.plot)
        except OSError as e:
            raise CLIError(f"cannot write plots to {args.plot}: {e.strerror or _one_line(e)}") from e
        for path in paths:
            _note(args, f"wrote {path}")
    return EXIT_OK


def _threads(text: str | None) -> int | None:
    """``--threads N``: a positive integer, or None when not given (the free cores)."""
    if text is None:
        return None
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise CLIError(f"--threads must be a positive integer, got {text!r}")
    return n


def _note(args, msg: str) -> None:
    if not args.quiet:
        print(f"{PROG}: {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``fastlmm-ext`` (sub-command ``fit``)."""
    parser = argparse.ArgumentParser(
        prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Fit linear mixed models with lme4's formula syntax (fastlmm_ext).",
        epilog=SYNTAX + "\n" + EXAMPLES + "\nRun 'fastlmm-ext fit --help' for the options of 'fit'.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    fit = sub.add_parser(
        "fit", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="fit a model to a CSV / CSV.gz / Parquet file and print the lme4-style summary",
        description="Fit FORMULA to the data in DATA by REML (default) or maximum likelihood\n"
                    "and print lme4's summary layout.\n\n"
                    "DATA: .csv, compressed .csv.gz (also .bz2/.xz/.zip/.zst), .tsv,\n"
                    "or Parquet (.parquet/.pq; needs pyarrow).",
        epilog=SYNTAX + "\n" + EXAMPLES)
    fit.add_argument("data", metavar="DATA", help="data file: .csv, .csv.gz, .tsv, .parquet or .pq")
    fit.add_argument("formula", metavar="FORMULA",
                     help='lme4 formula, e.g. "Reaction ~ Days + (Days|Subject)"')
    fit.add_argument("--ml", action="store_true", help="fit by maximum likelihood instead of REML")
    fit.add_argument("--backend", choices=BACKENDS, default="auto",
                     help="criterion evaluation: 'auto' (default) picks, of 'compiled' (CHOLMOD) and 'blocked' "
                          "(dense Schur complement), the one with the lower estimated time per evaluation; "
                          "'reference' is the dense NumPy path (see LinearMixedModel)")
    fit.add_argument("--threads", metavar="N", default=None,
                     help="threads for the BLAS and OpenMP work of the fit (default: the cores free when the "
                          "fit starts, from the CPU affinity, the cgroup quota and other processes' load)")
    fit.add_argument("--json", metavar="OUT",
                     help="write the fit as JSON (LmerResult.to_json) to OUT; '-' writes it to stdout "
                          "instead of the summary")
    fit.add_argument("--plot", metavar="DIR",
                     help="write diagnostic PNGs (residuals vs fitted, Q-Q plots, caterpillar plots) "
                          "into DIR; needs matplotlib")
    fit.add_argument("-q", "--quiet", action="store_true",
                     help="do not print the summary or notes (warnings and errors are still printed)")
    fit.add_argument("-v", "--verbose", action="store_true",
                     help="show progress of the fit (evaluations, criterion, elapsed time) on stderr")
    fit.set_defaults(handler=_fit)
    return parser


def main(argv=None) -> int:
    """Entry point of ``fastlmm-ext``; returns the exit status (see the module docstring)."""
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    if getattr(args, "handler", None) is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE

    progress_holder: list = []
    seen: set[str] = set()

    def show_warning(message, category, filename, lineno, file=None, line=None):
        text = _one_line(message) or category.__name__
        if text in seen:
            return
        seen.add(text)
        out = f"{PROG}: warning: {text}"
        if progress_holder:
            progress_holder[-1].write(out)
        else:
            print(out, file=sys.stderr, flush=True)

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show_warning
        try:
            return args.handler(args, progress_holder)
        except CLIError as e:
            return _error(str(e))
        except (FastLMMError, OSError, ImportError, ValueError) as e:
            # FastLMMError: formula / column / data problems; OSError: writing --json / --plot;
            # ValueError: data the model cannot use (e.g. from formulaic); ImportError: optional deps.
            return _error(_one_line(e) or type(e).__name__)
        except KeyboardInterrupt:
            print(f"{PROG}: interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED
        except Exception as e:  # a bug: still one line, but say so
            return _error(f"internal error ({type(e).__name__}): {_one_line(e)}; please report it",
                          EXIT_INTERNAL)


def _error(msg: str, code: int = EXIT_USAGE) -> int:
    print(f"{PROG}: error: {msg}", file=sys.stderr, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
