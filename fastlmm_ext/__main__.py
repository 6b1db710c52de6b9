"""``python -m fastlmm_ext [DATASET]``: fit a bundled example and print lme4's summary layout."""
import sys

from . import datasets, lmer

EXAMPLES = {
    "ingot": "pres ~ metal + (1|ingot)",
    "sleepstudy": "Reaction ~ Days + (Days|Subject)",
    "Penicillin": "diameter ~ 1 + (1|plate) + (1|sample)",
    "Pastes": "strength ~ 1 + (1|batch/cask)",
}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    names = argv or ["ingot", "sleepstudy"]
    for name in names:
        if name not in EXAMPLES:
            print(f"unknown example {name!r}; choose from {', '.join(EXAMPLES)}", file=sys.stderr)
            return 2
        res = lmer(EXAMPLES[name], datasets.load(name))
        print(f"== {name}: lmer({EXAMPLES[name]!r}) ==")
        print(res.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
