#!/usr/bin/env bash
# The test command: installs what it needs, makes sure Redis answers, lints, runs the whole suite.
# Usage: bash scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
.venv/bin/python scripts/ensure_redis.py
# The deploy tests run a real Prometheus (and promtool) against our services; Compose v2 comes with the dev extra.
if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "[test] installing prometheus from the OS packages"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null
  else
    echo "[test] prometheus missing and cannot apt-get it: tests/deploy will fail" >&2
  fi
fi
.venv/bin/ruff check .
.venv/bin/ruff format --check .
exec .venv/bin/pytest "$@"
