#!/usr/bin/env bash
# The Slurm check: a real one-node Slurm cluster on this machine (munge, slurmctld, slurmd from the OS
# packages, configured in a scratch directory on free ports), the job `rpo slurm script` writes for the
# CPU profile with 2 replicas as separate job steps; it waits for 3 trained steps with tokens saved > 0,
# cancels the job mid-step and checks no process is left, requeues it and checks that the trainer resumes
# from its last checkpoint with no cache update applied twice, then cancels it again. One line per check;
# the figures go to OUT/slurm_check.json (default runs/slurm-check). Needs root (slurmd runs as root) and
# Debian's slurm-wlm and munge packages, which it installs with apt-get when they are missing.
#
# Usage: bash scripts/slurm_check.sh [--out DIR] [--budget SECONDS]   (about 10 minutes on 2 cores: two
# requeues, each held 2 minutes by Slurm, and three starts of the two CPU replicas)
# The test suite does not run it (it runs the generated script's syntax and dry run: tests/cluster);
# docs/records/slurm-check-*.json keeps what it measured.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
  echo "slurm_check.sh: run it as root (slurmd and the job steps run as root here)" >&2
  exit 2
fi
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  echo "[slurm-check] installing slurm-wlm and munge from the OS packages"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null || {
    echo "slurm_check.sh: could not install slurm-wlm and munge with apt-get" >&2
    exit 1
  }
fi
if [ ! -s /etc/munge/munge.key ]; then
  echo "slurm_check.sh: /etc/munge/munge.key is missing (the munge package makes it: reinstall munge)" >&2
  exit 1
fi
PYTHON=${PYTHON:-.venv/bin/python}
exec "$PYTHON" scripts/slurm_check.py "$@"
