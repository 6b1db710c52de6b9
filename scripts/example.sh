#!/usr/bin/env bash
# Set up (see setup.sh) and fit the bundled examples, printing lme4-style summaries.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m fastlmm_ext "$@"
