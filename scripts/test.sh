#!/usr/bin/env bash
# The test command: installs what it needs, makes sure Redis answers, lints, runs the whole suite.
# Usage: bash scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
.venv/bin/python scripts/ensure_redis.py
.venv/bin/ruff check .
.venv/bin/ruff format --check .
exec .venv/bin/pytest "$@"
