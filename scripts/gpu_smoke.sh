#!/usr/bin/env bash
# The GPU check of `rpo run`, in the image the user runs (rpo-rl:latest, `docker compose build`): on the
# host it checks the GPUs and the image, then runs the rest in a container (`docker run --gpus all`, this
# script with --inside): the image's stack, a short `rpo run` on the tiny model with the HTTP weight push,
# the same with rollout.weight_transfer=nccl (2+ GPUs: trainer and replica each on their own, placed by
# the GPU claims), and greedy parity between a replica and transformers after a push, both in float32. The
# transport is read from the step records: the NCCL run fails if any push fell back to HTTP. One line per
# check, then the measured figures. Exit 1 if a check failed.
#
# --cpu runs the same checks on this machine's .venv on CPU (DS_ACCELERATOR=cpu, vLLM's CPU engine, the
# CPU settings of `rpo run`'s built-in preset, a few eval questions): what the test suite runs
# (tests/scripts/test_gpu_smoke.py). There the NCCL run's trainer uses HTTP, as it must (NCCL weight
# transfer needs a GPU): the figures line says so, from the step records.
#
# Usage: bash scripts/gpu_smoke.sh [--cpu] [--image IMAGE] [--steps N] [--eval-questions N] [OUT_DIR]
#   (GPU: about 8 minutes on one datacenter GPU with the image built, an estimate; defaults 8 steps, 100
#    eval questions. --cpu: defaults 3 steps, 8 eval questions)
set -uo pipefail
cd "$(dirname "$0")/.."
cpu=0
inside=0
steps=
eval_questions=
out=
image=rpo-rl:${RPO_IMAGE_TAG:-latest}
usage() {
  echo "usage: bash scripts/gpu_smoke.sh [--cpu] [--image IMAGE] [--steps N] [--eval-questions N] [OUT_DIR]" >&2
  exit 2
}
while [ $# -gt 0 ]; do
  case $1 in
    --cpu) cpu=1 ;;
    --inside) inside=1 ;;  # internal: the part that runs in the container
    --image) [ $# -ge 2 ] || usage; image=$2; shift ;;
    --steps) [ $# -ge 2 ] || usage; steps=$2; shift ;;
    --eval-questions) [ $# -ge 2 ] || usage; eval_questions=$2; shift ;;
    -h|--help) usage ;;
    -*) echo "gpu_smoke.sh: unknown option $1" >&2; usage ;;
    *) [ -z "$out" ] || usage; out=$1 ;;
  esac
  shift
done
for n in "$steps" "$eval_questions"; do
  if [ -n "$n" ] && ! [[ $n =~ ^[1-9][0-9]*$ ]]; then echo "gpu_smoke.sh: '$n' is not a positive count" >&2; exit 2; fi
done
if [ $cpu = 1 ]; then
  out=${out:-runs/cpu-smoke}; steps=${steps:-3}; eval_questions=${eval_questions:-8}
else
  out=${out:-runs/gpu-smoke}; steps=${steps:-8}; eval_questions=${eval_questions:-100}
fi
mkdir -p "$out"
failed=0
check() {  # check NAME COMMAND...: run it, log to $out/NAME.log, print one line
  local name=$1 t0=$SECONDS
  shift
  if "$@" >"$out/$name.log" 2>&1; then
    echo "[ok]   $name ($((SECONDS - t0)) s)"
  else
    echo "[fail] $name ($((SECONDS - t0)) s): $(grep -v '^[[:space:]]*$' "$out/$name.log" | tail -1 | cut -c1-200) (see $out/$name.log)"
    failed=1
  fi
}

# --- GPU, on the host: the GPUs and the image, then the rest in the image ---------------------------------
if [ $cpu = 0 ] && [ $inside = 0 ]; then
  echo "mode: gpu, in the image $image"
  check gpu nvidia-smi -L
  check image docker image inspect "$image"
  [ $failed = 0 ] || { echo "(no GPU or no image: build it with \`docker compose build\`, docs/deploy.md)"; exit 1; }
  gpus=$(grep -c '^GPU ' "$out/gpu.log")
  out_abs=$(cd "$out" && pwd)
  mkdir -p "$out_abs/cache"
  # the image's user is the caller (the outputs are theirs); the tiny model's cache survives reruns
  exec docker run --rm --gpus all --ipc=host --shm-size 8g --user "$(id -u):$(id -g)" \
    -e RPO_SMOKE_GPUS="$gpus" -e HOME=/out -v "$out_abs:/out" -v "$out_abs/cache:/var/cache/rpo" \
    -v "$PWD/scripts:/opt/rpo-scripts:ro" --entrypoint bash "$image" \
    /opt/rpo-scripts/gpu_smoke.sh --inside --steps "$steps" --eval-questions "$eval_questions" /out
fi

# The model `rpo run` trains by default (services/supervisor/presets/tiny-demo.yaml): built once, then cached.
model=builtin:tiny-warm
short=(--set train.max_steps="$steps" --set data.eval_max_questions="$eval_questions")
if [ $cpu = 1 ]; then
  echo "mode: cpu (DS_ACCELERATOR=cpu, vLLM's CPU engine; no GPU checks)"
  export DS_ACCELERATOR=cpu
  py=.venv/bin/python; rpo=.venv/bin/rpo; here=scripts
  check install bash scripts/bootstrap.sh
  check stack $py -c "import torch, vllm, deepspeed; from vllm.platforms import current_platform; \
assert current_platform.is_cpu(), 'vLLM did not pick its CPU platform'; \
print(torch.__version__, vllm.__version__, deepspeed.__version__, 'cpu')"
  # The preset's CPU settings (float32, the CPU KV cache); cache init samples only what the steps visit.
  short+=(--set data.max_questions=$((steps * 16)))
  parity_args=(--cpu)
  nccl=cpu
else
  export DS_ACCELERATOR=cuda
  py=python; rpo=rpo; here=$(dirname "$0")
  check stack $py -c "import torch, vllm, deepspeed, peft; assert torch.cuda.is_available(), 'no CUDA'; \
print(torch.__version__, torch.version.cuda, torch.cuda.nccl.version(), vllm.__version__, deepspeed.__version__, \
torch.cuda.get_device_name())"
  [ $failed = 0 ] || { echo "(the image sees no GPU: is the NVIDIA Container Toolkit installed? docs/deploy.md)"; exit 1; }
  # The replica takes 30% of the GPU, the trainer the rest.
  short+=(--set rollout.gpu_memory_utilization=0.3 --set train.precision=bf16 --set model.dtype=bfloat16)
  parity_args=()
  nccl=gpu
  if [ "${RPO_SMOKE_GPUS:-1}" -lt 2 ]; then nccl=skip; fi
fi
check run-http $rpo run --run-dir "$out/run-http" --set model.path=$model "${short[@]}"
if [ $nccl = skip ]; then
  echo "[skip] run-nccl: one GPU, and NCCL cannot join two processes on one device (docs/deploy.md)"
else
  # GPU: the claims put the trainer on GPU 0 and the replica on GPU 1, as compose does
  claims=(); [ $nccl = gpu ] && claims=(--set "gpus.claim_dir=$out/gpu-claims")
  check run-nccl $rpo run --run-dir "$out/run-nccl" --set model.path=$model "${short[@]}" "${claims[@]}" \
    --set rollout.weight_transfer=nccl --set train.nccl_host=127.0.0.1
fi
warm=$($py -c "from services.models.model_path import resolve_model_path; print(resolve_model_path('$model'))")
check parity $py "$here/gpu_smoke.py" "${parity_args[@]}" "$warm" "$out/run-http/final" "$out"

# The figures and the transports, from the runs' own step records (trainer/telemetry/records.py, weight_transport).
$py "$here/gpu_smoke_records.py" "$out" "$nccl" || failed=1
exit $failed
