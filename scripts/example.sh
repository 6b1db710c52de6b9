#!/usr/bin/env bash
# Set up (see setup.sh) and fit the bundled examples, printing lme4-style summaries.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"
bash scripts/setup.sh
# Run outside the checkout so Python imports the installed package (with its compiled kernel),
# not the source folder.
cd "$(mktemp -d)"
"$root/.venv/bin/python" -m fastlmm_ext "$@"
