"""The bash text of the Slurm batch script `rpo slurm script` writes (services/cluster/slurm.py fills the
@NAME@ fields). Kept apart so the generator reads as Python and the script as bash; the test suite runs
the result through `bash -n` and its dry run.
"""

TEMPLATE = r"""#!/bin/bash
# RPO on Slurm: the whole stack in one allocation. Written by:
#   @COMMAND_LINE@
# Regenerate it rather than edit it. Layout:
@DESCRIBE@
# Submit: sbatch THIS_FILE. Secrets: RPO_API_TOKEN (and any RPO_* setting) from the submitting shell or
# from the env file below (mode 0600); without a token the job makes one of its own. docs/deploy.md,
# "Past one machine".
@SBATCH@

set -uo pipefail

RPO_PYTHON=${RPO_PYTHON:-@PYTHON@}
CONFIG=@CONFIG@
RUN_DIR=@RUN_DIR@
ENV_FILE=${RPO_ENV_FILE:-@ENV_FILE@}
DRY_RUN=${RPO_SLURM_DRY_RUN:-0}
NODES_NEEDED=@NODES@
CACHE_PORT=@CACHE_PORT@
METRICS_PORT=@METRICS_PORT@
MASTER_PORT=@MASTER_PORT@
REPLICAS=(@REPLICAS@)  # name:node-index:port:gpus
TRAINER_RANKS=@TRAINER_RANKS@
TRAINER_NODES=@TRAINER_NODES@
TRAINER_PER_NODE=@TRAINER_PER_NODE@
TRAINER_GPUS=@TRAINER_GPUS@
RESTARTS=@RESTARTS@
STOP_SECONDS=@STOP_SECONDS@

say() { echo "[rpo-slurm $(date -u +%H:%M:%S)] $*"; }
die() { say "error: $*"; cleanup failed; exit 1; }

TOKEN_BEFORE=${RPO_API_TOKEN:-}
if [[ -f $ENV_FILE ]]; then
  set -a
  # shellcheck disable=SC1090
  source "$ENV_FILE"
  set +a
fi
if [[ -z ${RPO_API_TOKEN:-} ]]; then
  TOKEN_FROM="made for this job"
  RPO_API_TOKEN=$("$RPO_PYTHON" -c 'import secrets; print(secrets.token_urlsafe(32))')
elif [[ $RPO_API_TOKEN != "$TOKEN_BEFORE" ]]; then
  TOKEN_FROM="from $ENV_FILE"
else
  TOKEN_FROM="from the submitting environment"
fi
unset TOKEN_BEFORE
export RPO_API_TOKEN
# the CPU profile runs DeepSpeed on CPU; a GPU job does not inherit a CPU setting from the submitting shell
if [[ @CPU@ == 1 ]]; then export DS_ACCELERATOR=cpu; else unset DS_ACCELERATOR; fi

if [[ $DRY_RUN == 1 ]]; then
  read -r -a NODES <<< "${RPO_SLURM_NODES:?dry run: set RPO_SLURM_NODES to the host names}"
  JOB=dry
else
  mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
  JOB=$SLURM_JOB_ID
fi
(( ${#NODES[@]} >= NODES_NEEDED )) || { echo "the allocation has ${#NODES[@]} node(s), the layout $NODES_NEEDED" >&2; exit 2; }
HEAD=${NODES[0]}

# Where every process finds the others: the allocation's host names, nothing hard-wired.
urls=()
for r in "${REPLICAS[@]}"; do
  IFS=: read -r _ node port _ <<< "$r"
  urls+=("\"http://${NODES[$node]}:$port\"")
done
export RPO_SERVICES__CACHE_URL="http://$HEAD:$CACHE_PORT"
export RPO_SERVICES__ROLLOUT_URLS="[$(IFS=,; echo "${urls[*]}")]"
export RPO_TRAIN__RUN_DIR=$RUN_DIR
export RPO_TRAIN__METRICS_HOST=0.0.0.0
export RPO_TRAIN__METRICS_PORT=$METRICS_PORT
export RPO_CACHE_SERVER__DATA_DIR=$RUN_DIR/redis
unset RPO_SERVICES__ROLLOUT_DISCOVERY RPO_SERVICES__REDIS_URL
# Prometheus's file-based discovery reads this (file_sd_configs), under the job names the Grafana
# dashboard selects on; the host names change with each allocation, so it is written at every start.
prometheus_targets() {
  local r name node port gpus
  local -a replicas=()
  for r in "${REPLICAS[@]}"; do
    IFS=: read -r name node port gpus <<< "$r"
    replicas+=("\"${NODES[$node]}:$port\"")
  done
  printf '[{"targets": ["%s:%s"], "labels": {"job": "rpo-cache"}}, ' "$HEAD" "$CACHE_PORT"
  printf '{"targets": [%s], "labels": {"job": "rpo-rollout"}}, ' "$(IFS=,; echo "${replicas[*]}")"
  printf '{"targets": ["%s:%s"], "labels": {"job": "rpo-trainer"}}]\n' "$HEAD" "$METRICS_PORT"
}

if [[ $DRY_RUN == 1 ]]; then
  echo "prometheus targets: $(prometheus_targets)"
  echo "token: RPO_API_TOKEN $TOKEN_FROM (every step inherits it; it is on no command line)"
  env | grep -E '^(RPO_|DS_ACCELERATOR=)' | grep -v '^RPO_API_TOKEN=' | sort | sed 's/^/env: /'
else
  mkdir -p "$RUN_DIR/logs"
  prometheus_targets > "$RUN_DIR/prometheus-targets.json"
fi
say "job $JOB (restart ${SLURM_RESTART_COUNT:-0}) on ${NODES[*]}: cache $RPO_SERVICES__CACHE_URL, replicas $RPO_SERVICES__ROLLOUT_URLS"

declare -A PID=()   # step name -> the srun that runs it
declare -A URL=()
declare -A STARTS=()
STOPPING=0

# step NAME NODE-INDICES NTASKS PER-NODE GPUS -- COMMAND...: one job step, in the background.
step() {
  local name=$1 nodes=$2 ntasks=$3 per_node=$4 gpus=$5
  shift 6
  local hosts
  hosts=$(for i in $nodes; do echo "${NODES[$i]}"; done | paste -sd,)
  local count
  count=$(wc -w <<< "$nodes")
  local -a run=(srun --overlap --nodes="$count" --ntasks="$ntasks" --ntasks-per-node="$per_node"
    --nodelist="$hosts" --job-name="rpo-$name" --kill-on-bad-exit=1 --input=none
    --output="$RUN_DIR/logs/$name.log" --open-mode=append@GRES@)
  local -a envs=()
  if [[ -n $gpus ]]; then envs=(env CUDA_VISIBLE_DEVICES="$gpus"); fi
  if [[ $DRY_RUN == 1 ]]; then
    echo "step $name: ${run[*]} ${envs[*]} $*"
    PID[$name]=0
    return
  fi
  "${run[@]}" "${envs[@]}" "$@" < /dev/null &
  PID[$name]=$!
  STARTS[$name]=$(( ${STARTS[$name]:-0} + 1 ))
  say "step $name started on $hosts (srun pid ${PID[$name]}, log $RUN_DIR/logs/$name.log)"
}

alive() { [[ ${PID[$1]:-} ]] && kill -0 "${PID[$1]}" 2>/dev/null; }

# stop SECONDS NAMES...: SIGTERM to each step's processes, wait, then SIGKILL what is left.
stop() {
  local seconds=$1
  shift
  local name
  for name in "$@"; do alive "$name" && signal_step TERM "$name"; done
  local deadline=$(( SECONDS + seconds ))
  for name in "$@"; do
    while alive "$name" && (( SECONDS < deadline )); do sleep 1; done
    if alive "$name"; then
      say "step $name did not stop in ${seconds} s: killing it"
      signal_step KILL "$name"
    fi
    [[ ${PID[$name]:-} ]] && wait "${PID[$name]}" 2>/dev/null
  done
  return 0
}

# signal_step SIGNAL NAME: the signal to the step's processes (scancel), or to its srun if Slurm no longer
# lists the step (srun then ends the step).
signal_step() {
  local id
  id=$(step_id "$2")
  if [[ -n $id ]]; then
    scancel --quiet --signal="$1" "$JOB.$id" 2>/dev/null
  else
    kill -"$1" "${PID[$2]}" 2>/dev/null
  fi
}

step_id() { squeue --noheader --steps --job "$JOB" --format='%i %j' 2>/dev/null | awk -v n="rpo-$1" '$2 == n {split($1, a, "."); print a[2]}'; }

cleanup() {
  (( STOPPING )) && return
  STOPPING=1
  trap '' TERM INT USR1
  say "stopping ($1): the trainer first (it finishes its step and checkpoints), then the services"
  [[ $DRY_RUN == 1 ]] && return
  stop "$STOP_SECONDS" trainer
  local -a services=()
  local name
  for name in "${!PID[@]}"; do [[ $name != trainer ]] && services+=("$name"); done
  stop 60 "${services[@]}"
  say "every step has ended"
}

requeue_before_time_limit() {
  say "the time limit is near: checkpoint, then requeue (the job resumes from the checkpoint)"
  cleanup "time limit"
  scontrol requeue "$JOB"
  exit 0
}

trap 'cleanup "SIGTERM (scancel or requeue)"; exit 143' TERM
trap 'cleanup SIGINT; exit 130' INT
trap requeue_before_time_limit USR1
trap 'cleanup "script exit"' EXIT

ready() { "$RPO_PYTHON" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + "/readyz", timeout=3)' "$1" 2>/dev/null; }

# wait_ready NAMES...: every step answers /readyz; a step that exits meanwhile is named with its log.
wait_ready() {
  [[ $DRY_RUN == 1 ]] && return
  local name
  local deadline=$(( SECONDS + ${RPO_SLURM_START_SECONDS:-900} ))
  for name in "$@"; do
    until ready "${URL[$name]}"; do
      alive "$name" || die "step $name exited during start; its log: $RUN_DIR/logs/$name.log"$'\n'"$(tail -n 20 "$RUN_DIR/logs/$name.log")"
      (( SECONDS < deadline )) || die "step $name did not answer ${URL[$name]}/readyz in time"
      sleep 2 & wait $!
    done
    say "step $name is ready at ${URL[$name]}"
  done
}

start_replica() {
  local name=$1 node=$2 port=$3 gpus=$4
  URL[$name]="http://${NODES[$node]}:$port"
  step "$name" "$node" 1 1 "$gpus" -- env RPO_ROLLOUT__WEIGHT_PORT=$(( port + 1 )) RPO_ROLLOUT__REPLICA_NAME="$name" \
    RPO_GPUS__PER_REPLICA=@GPUS_PER_REPLICA@ \
    "$RPO_PYTHON" -m services.cli serve rollout --config "$CONFIG" --host 0.0.0.0 --port "$port"
}

URL[cache]="http://$HEAD:$CACHE_PORT"
step cache 0 1 1 "" -- "$RPO_PYTHON" -m services.cli serve cache --config "$CONFIG" --host 0.0.0.0 --port "$CACHE_PORT"
wait_ready cache
names=()
for r in "${REPLICAS[@]}"; do
  IFS=: read -r name node port gpus <<< "$r"
  start_replica "$name" "$node" "$port" "$gpus"
  names+=("$name")
done
wait_ready "${names[@]}"

# The trainer: one task per rank; each rank takes its ids from Slurm. --resume: a requeued job continues
# from the last checkpoint under $RUN_DIR (a first start has none and begins at step 0).
trainer_nodes=$(seq -s ' ' 0 $(( TRAINER_NODES - 1 )))
export MASTER_ADDR=$HEAD MASTER_PORT
step trainer "$trainer_nodes" "$TRAINER_RANKS" "$TRAINER_PER_NODE" "$TRAINER_GPUS" -- \
  bash -c 'export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS; exec "$@"' rpo-rank \
  "$RPO_PYTHON" -m services.cli train --config "$CONFIG" --resume
[[ $DRY_RUN == 1 ]] && { trap - EXIT; exit 0; }

# Watch: the trainer's end ends the job; a replica that dies is restarted, the cache server is not.
while alive trainer; do
  sleep 5 & wait $!
  alive cache || die "step cache (the cache server) exited; its log: $RUN_DIR/logs/cache.log"
  for r in "${REPLICAS[@]}"; do
    IFS=: read -r name node port gpus <<< "$r"
    if ! alive "$name" && alive trainer; then
      wait "${PID[$name]}"
      code=$?
      (( ${STARTS[$name]} - 1 >= RESTARTS )) && die "step $name exited ($code) $RESTARTS times; its log: $RUN_DIR/logs/$name.log"
      say "step $name exited ($code); restarting it (the trainer goes on with the others meanwhile)"
      start_replica "$name" "$node" "$port" "$gpus"
    fi
  done
done
wait "${PID[trainer]}"
code=$?
say "the trainer exited with $code"
cleanup "the trainer ended"
exit "$code"
"""
