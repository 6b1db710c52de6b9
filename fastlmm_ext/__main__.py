"""``python -m fastlmm_ext [EXAMPLE ...]``: fit bundled examples and print lme4's summary layout."""
from __future__ import annotations

import argparse
import sys

from . import __version__, datasets
from ._api import lmer

EXAMPLES = {
    "ingot": "pres ~ metal + (1|ingot)",
    "sleepstudy": "Reaction ~ Days + (Days|Subject)",
    "Penicillin": "diameter ~ 1 + (1|plate) + (1|sample)",
    "Pastes": "strength ~ 1 + (1|batch/cask)",
}
DEFAULT = ["ingot", "sleepstudy"]


def build_parser() -> argparse.ArgumentParser:
    listing = "\n".join(f"  {name:<11} lmer({formula!r})" for name, formula in EXAMPLES.items())
    parser = argparse.ArgumentParser(
        prog="python -m fastlmm_ext",
        description="Fit bundled example data sets with fastlmm_ext and print lme4-style summaries.",
        epilog=f"examples:\n{listing}\n\nTo fit your own data: fastlmm-ext fit DATA FORMULA (fastlmm-ext --help).",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("examples", nargs="*", metavar="EXAMPLE",
                        help=f"examples to fit (default: {' '.join(DEFAULT)}); choose from {', '.join(EXAMPLES)}")
    parser.add_argument("--version", action="version", version=f"fastlmm_ext {__version__}")
    return parser


def main(argv=None) -> int:
    """Fit the named examples; an unknown name exits with status 2 and the list of choices."""
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    unknown = [name for name in args.examples if name not in EXAMPLES]
    if unknown:
        parser.error(f"unknown example {unknown[0]!r}; choose from {', '.join(EXAMPLES)}")   # exits 2
    for name in args.examples or DEFAULT:
        res = lmer(EXAMPLES[name], datasets.load(name))
        print(f"== {name}: lmer({EXAMPLES[name]!r}) ==")
        print(res.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
