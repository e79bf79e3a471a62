#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the whole pipeline end to end in ${1:-demo}/:
# synth -> convert -> train -> infer -> report (m2m demo; a few minutes on 2 CPU cores).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
m2m demo "${1:-demo}"
