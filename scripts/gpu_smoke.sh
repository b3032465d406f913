#!/usr/bin/env bash
# The GPU check, on a machine with one NVIDIA GPU: installs the pinned GPU stack, builds the tiny model
# locally (no downloads), runs a short `rpo run` on the GPU (vLLM's CUDA engine, DeepSpeed on CUDA) with
# the HTTP weight push and with rollout.weight_transfer=nccl, then checks greedy parity between a replica
# and transformers after a push. One line per check, then the measured figures. Exit 1 if a check failed.
#
# --cpu runs the same checks on CPU (DS_ACCELERATOR=cpu, vLLM's CPU engine; no nvidia-smi check, no GPU
# memory settings, the CPU settings of `rpo run`'s built-in preset, a few eval questions): what the test
# suite runs (tests/scripts/test_gpu_smoke.py). There the NCCL run's trainer uses HTTP (NCCL weight transfer
# needs a GPU), and the figures line says so.
#
# Usage: bash scripts/gpu_smoke.sh [--cpu] [--steps N] [--eval-questions N] [OUT_DIR]
#   (GPU: about 8 minutes on one datacenter GPU, first install apart; defaults 8 steps, 100 eval questions.
#    --cpu: defaults 3 steps, 8 eval questions)
set -uo pipefail
cd "$(dirname "$0")/.."
cpu=0
steps=
eval_questions=
out=
usage() { echo "usage: bash scripts/gpu_smoke.sh [--cpu] [--steps N] [--eval-questions N] [OUT_DIR]" >&2; exit 2; }
while [ $# -gt 0 ]; do
  case $1 in
    --cpu) cpu=1 ;;
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
    echo "[fail] $name ($((SECONDS - t0)) s): see $out/$name.log"
    failed=1
  fi
}

# The model `rpo run` trains by default (services/demo/presets/tiny-demo.yaml): built once, then cached.
model=builtin:tiny-warm
short=(--set train.max_steps="$steps" --set data.eval_max_questions="$eval_questions")
if [ $cpu = 1 ]; then
  echo "mode: cpu (DS_ACCELERATOR=cpu, vLLM's CPU engine; no GPU checks)"
  export DS_ACCELERATOR=cpu
  check install bash scripts/bootstrap.sh
  check stack .venv/bin/python -c "import torch, vllm, deepspeed; from vllm.platforms import current_platform; \
assert current_platform.is_cpu(), 'vLLM did not pick its CPU platform'; \
print(torch.__version__, vllm.__version__, deepspeed.__version__, 'cpu')"
  # The preset's CPU settings (float32, the CPU KV cache); cache init samples only what the steps visit.
  short+=(--set data.max_questions=$((steps * 16)))
  parity_args=(--cpu)
else
  check gpu nvidia-smi -L
  check install bash scripts/bootstrap.sh
  export DS_ACCELERATOR=cuda
  check stack .venv/bin/python -c "import torch, vllm, deepspeed; assert torch.cuda.is_available(), 'no CUDA'; \
print(torch.__version__, torch.version.cuda, vllm.__version__, deepspeed.__version__, torch.cuda.get_device_name())"
  # The replica takes 30% of the GPU, the trainer the rest.
  short+=(--set rollout.gpu_memory_utilization=0.3 --set train.precision=bf16 --set model.dtype=bfloat16)
  parity_args=()
fi
check run-http .venv/bin/rpo run --run-dir "$out/run-http" --set model.path=$model "${short[@]}"
check run-nccl .venv/bin/rpo run --run-dir "$out/run-nccl" --set model.path=$model "${short[@]}" \
  --set rollout.weight_transfer=nccl --set train.nccl_host=127.0.0.1
warm=$(.venv/bin/python -c "from services.demo.model_path import resolve_model_path; print(resolve_model_path('$model'))")
check parity .venv/bin/python scripts/gpu_smoke.py "${parity_args[@]}" "$warm" "$out/run-http/final" "$out"

# The figures (from the runs' own records): decode tokens/s, weight push and step time.
.venv/bin/python - "$out" <<'PY'
import json, statistics, sys
from pathlib import Path
from trainer.progress import read_step_records
out = Path(sys.argv[1])
for name in ("run-http", "run-nccl"):
    steps = read_step_records(out / name)[1:]  # the first step pays warm-up
    if not steps:
        print(f"{name}: no steps recorded"); continue
    mean = lambda f: statistics.fmean(f(r) for r in steps)
    print(f"{name}: step {mean(lambda r: r.step_seconds):.2f} s, rollout {mean(lambda r: r.phases['rollout']):.2f} s, "
          f"train {mean(lambda r: r.phases['train']):.2f} s, weight sync {mean(lambda r: r.phases['weight_sync']):.3f} s, "
          f"decode {mean(lambda r: r.tokens_per_second):,.0f} tokens/s")
log = out / "run-nccl.log"  # `rpo run`'s own output: the trainer's lines are in it
text = log.read_text(errors="replace") if log.exists() else ""
if "the trainer runs on CPU: weights go over HTTP" in text:
    how = "HTTP (the trainer runs on CPU: NCCL weight transfer needs a GPU)"
elif "NCCL weight transfer failed" in text or not text:
    how = "HTTP (NCCL fell back; on one GPU NCCL cannot join two processes)"
else:
    how = "NCCL"
print("run-nccl: weights went over " + how)
PY
exit $failed
