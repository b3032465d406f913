#!/usr/bin/env bash
# Estimates the size of the image deploy/Dockerfile builds with ENGINE=gpu, without Docker and without a GPU:
#   1. resolves the image's pip install (pyproject's dependencies + [gpu], deploy/constraints-gpu.txt) for
#      CPython 3.12 on manylinux x86_64 up to glibc 2.39 (Ubuntu 24.04): pip install --dry-run --report;
#   2. sizes the wheels with HTTP HEAD (the compressed download);
#   3. downloads them (only those missing from WORK/wheels), builds deepspeed (sdist only) and the project,
#      installs every wheel into a fresh 3.12 venv and measures it (with the .pyc pip writes);
#   4. looks for CUDA/cuDNN/NCCL libraries that more than one wheel brings;
#   5. sizes the apt packages with this host's apt lists (Installed-Size), less what ubuntu:24.04 has.
# Then prints a summary table and writes it as WORK/summary.json. Takes about 10 GB of disk in WORK.
#
# Environment: PYTHON312 (a CPython 3.12; default python3.12 on PATH), RPO_PYPI_INDEX_URL (default
# https://pypi.org/simple), PIP_CERT / REQUESTS_CA_BUNDLE / SSL_CERT_FILE (a CA bundle, first one set wins),
# UBUNTU_BASE_BYTES (the base image's size, default in measure.py).
set -euo pipefail

usage() { echo "usage: bench/gpu_image/estimate.sh [WORK_DIR]   (default WORK_DIR: runs/gpu-image in the repo)"; }
die() { echo "[gpu-image] error: $*" >&2; exit 1; }
log() { echo "[gpu-image] $*"; }

case "${1:-}" in -h|--help) usage; exit 0 ;; esac
[ $# -le 1 ] || { usage >&2; exit 2; }

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
[ -f "$REPO/pyproject.toml" ] && [ -f "$REPO/deploy/Dockerfile" ] || die "no pyproject.toml/deploy/Dockerfile in $REPO"
CONSTRAINTS=$REPO/deploy/constraints-gpu.txt
INDEX=${RPO_PYPI_INDEX_URL:-https://pypi.org/simple}
PY=${PYTHON312:-python3.12}
command -v "$PY" >/dev/null 2>&1 || die "no Python 3.12 ('$PY' not found): set PYTHON312=/path/to/python3.12"
"$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null \
  || die "$PY is not CPython 3.12: set PYTHON312=/path/to/python3.12"
for tool in curl tar sha256sum timeout; do command -v $tool >/dev/null || die "$tool is needed"; done

CA=${PIP_CERT:-${REQUESTS_CA_BUNDLE:-${SSL_CERT_FILE:-}}}
[ -z "$CA" ] || [ -f "$CA" ] || die "CA bundle $CA does not exist"
export GPUIMG_CA=$CA   # for the curl workers below
PIP_NET=(--index-url "$INDEX" --timeout 60 --retries 3 ${CA:+--cert "$CA"})

# pip sees none of this host's pip configuration (config files, PIP_* variables): a local wheel directory
# (find-links), an extra index or a constraint there would change what resolves (e.g. a torch cap or a
# directory of CPU wheels), and the estimate must be that of the Dockerfile's install from the index alone.
# The CA bundle, if any, comes back as --cert above.
PIPENV=(env)
for v in $(compgen -e | grep '^PIP_' || true); do PIPENV+=(-u "$v"); done
PIPENV+=(PIP_CONFIG_FILE=/dev/null PIP_DISABLE_PIP_VERSION_CHECK=1)

W=${1:-$REPO/runs/gpu-image}
mkdir -p "$W" && W=$(cd "$W" && pwd) && cd "$W"
M=(venv312/bin/python "$HERE/measure.py")
START=$SECONDS
log "repo $REPO, work dir $W, python $PY, index $INDEX${CA:+, CA $CA}"

log "step 1/5 resolve the GPU install (CPython 3.12, manylinux x86_64, glibc <= 2.39)"
[ -x venv312/bin/pip ] || "$PY" -m venv venv312
# pyproject's [project].dependencies + [gpu], as the Dockerfile's `pip install -c constraints ".[gpu]"`.
# deepspeed is published as an sdist only, which --only-binary cannot resolve: its own requirements are
# resolved instead, and its wheel is built from the sdist in step 3.
"$PY" - "$REPO/pyproject.toml" reqs.txt deepspeed-spec.txt <<'PY'
import sys, tomllib
with open(sys.argv[1], "rb") as f:
    p = tomllib.load(f)["project"]
deps = p["dependencies"] + p["optional-dependencies"]["gpu"]
with open(sys.argv[2], "w") as reqs, open(sys.argv[3], "w") as ds:
    for d in deps:
        print(d, file=ds if d.startswith("deepspeed") else reqs)
PY
rm -rf ds && mkdir ds
timeout 600 "${PIPENV[@]}" venv312/bin/pip download -q --no-deps --no-binary :all: "${PIP_NET[@]}" \
  -c "$CONSTRAINTS" -d ds -r deepspeed-spec.txt
tar xzf ds/deepspeed-*.tar.gz -C ds
grep -hv '^\s*#' ds/deepspeed-*/requirements/requirements.txt >> reqs.txt
PLATS=(--platform linux_x86_64 --platform manylinux2014_x86_64)
for i in $(seq 5 39); do PLATS+=(--platform "manylinux_2_${i}_x86_64"); done   # glibc 2.39 = Ubuntu 24.04
timeout 1800 "${PIPENV[@]}" venv312/bin/pip install -q --dry-run --ignore-installed --report report.json \
  --target t --python-version 3.12 --implementation cp --abi cp312 "${PLATS[@]}" --only-binary=:all: \
  "${PIP_NET[@]}" -c "$CONSTRAINTS" -r reqs.txt

log "step 2/5 compressed sizes (HTTP HEAD)"
"${M[@]}" sizes report.json > sizes.txt; head -1 sizes.txt

log "step 3/5 download the wheels, build deepspeed and the project, install them all into a fresh venv"
mkdir -p wheels
# wheels.tsv: name version bytes url file sha256; a file of the right size is not fetched again, a new one
# is checked against the index's sha256 (- when the index gives none).
while IFS=$'\t' read -r _ _ size url file sha; do
  [ "$(stat -c %s "wheels/$file" 2>/dev/null || echo -1)" = "$size" ] || printf '%s %s %s\n' "$url" "$file" "${sha:--}"
done < wheels.tsv > missing.txt
log "  $(wc -l < missing.txt) of $(wc -l < wheels.tsv) wheels to download"
# shellcheck disable=SC2016
xargs -r -P 8 -n 3 sh -c '
  curl -fsSL --connect-timeout 30 --max-time 1800 --retry 3 ${GPUIMG_CA:+--cacert "$GPUIMG_CA"} \
    -o "wheels/$1.part" "$0" || exit 255
  [ "$2" = - ] || echo "$2  wheels/$1.part" | sha256sum -c --quiet - || exit 255
  mv "wheels/$1.part" "wheels/$1"' < missing.txt
rm -rf built src && mkdir built src
timeout 1800 "${PIPENV[@]}" venv312/bin/pip wheel -q --no-deps "${PIP_NET[@]}" -w built ds/deepspeed-*.tar.gz
# What the Dockerfile copies of the project, built outside the repo so the build leaves nothing there.
(cd "$REPO" && cp -r pyproject.toml README.md services cache_server trainer "$W/src/")
timeout 600 "${PIPENV[@]}" venv312/bin/pip wheel -q --no-deps "${PIP_NET[@]}" -w built ./src
"${M[@]}" unpacked > unpacked.txt; head -1 unpacked.txt
rm -rf optvenv && "$PY" -m venv optvenv
mapfile -t WHEELS < <(cut -f5 wheels.tsv | sed 's|^|wheels/|'); WHEELS+=(built/*.whl)
"${PIPENV[@]}" optvenv/bin/pip install -q --no-deps --no-index "${WHEELS[@]}"
"${M[@]}" installed optvenv > installed.txt; head -1 installed.txt

log "step 4/5 CUDA-family libraries in more than one copy"
"${M[@]}" dups > dups.txt; head -1 dups.txt

log "step 5/5 apt packages over ubuntu:24.04"
rm -f apt.json
if command -v apt-get >/dev/null && command -v apt-cache >/dev/null; then
  # The closure of the Dockerfile's apt-get install on an empty system (local apt lists, no network).
  : > empty-status
  apt-get -s -o Dir::State::status="$W/empty-status" -o Debug::NoLocking=1 install -y --no-install-recommends \
    python3 python3-venv python3-dev g++ libnuma1 curl ca-certificates > apt-sim.txt \
    || die "apt-get -s failed (no apt lists? run apt-get update): see $W/apt-sim.txt"
  awk '/^Inst/{print $2}' apt-sim.txt | sort > apt-closure.txt
  "${M[@]}" apt apt-closure.txt > apt.txt; head -1 apt.txt
else
  log "  no apt-get here: apt packages not measured"
fi

echo
"${M[@]}" summary --index-url "$INDEX" --elapsed $((SECONDS - START)) | tee summary.txt
log "details: $W/{sizes,unpacked,installed,dups,apt}.txt, $W/summary.json"
