#!/usr/bin/env bash
# The project's test command: creates the environment when missing, then runs the suite.
# Extra arguments go to pytest (e.g. `bash tests/run.sh -k convert -x`).
set -euo pipefail
cd "$(dirname "$0")/.."
source ./env.sh
preload_mimalloc  # env.sh
exec python -m pytest tests "$@"
