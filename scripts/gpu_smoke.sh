#!/usr/bin/env bash
# The GPU check, on a machine with one NVIDIA GPU: installs the pinned GPU stack, builds the tiny model
# locally (no downloads), runs a short `rpo run` on the GPU (vLLM's CUDA engine, DeepSpeed on CUDA) with
# the HTTP weight push and with rollout.weight_transfer=nccl, then checks greedy parity between a replica
# and transformers after a push. One line per check, then the measured figures. Exit 1 if a check failed.
# Usage: bash scripts/gpu_smoke.sh [OUT_DIR]      (about 8 minutes on one datacenter GPU, first install apart)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/gpu-smoke}
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

check gpu nvidia-smi -L
check install bash scripts/bootstrap.sh
export DS_ACCELERATOR=cuda
check stack .venv/bin/python -c "import torch, vllm, deepspeed; assert torch.cuda.is_available(), 'no CUDA'; \
print(torch.__version__, torch.version.cuda, vllm.__version__, deepspeed.__version__, torch.cuda.get_device_name())"
# Short runs: 8 steps; the replica takes 30% of the GPU, the trainer the rest.
short=(--set train.max_steps=8 --set data.eval_max_questions=100 --set rollout.gpu_memory_utilization=0.3
       --set train.precision=bf16 --set model.dtype=bfloat16)
check run-http .venv/bin/rpo run --run-dir "$out/run-http" "${short[@]}"
check run-nccl .venv/bin/rpo run --run-dir "$out/run-nccl" "${short[@]}" \
  --set rollout.weight_transfer=nccl --set train.nccl_host=127.0.0.1
warm=$(.venv/bin/python -c "from services.demo.model_path import resolve_model_path; print(resolve_model_path('builtin:tiny'))")
check parity .venv/bin/python scripts/gpu_smoke.py "$warm" "$out/run-http/final" "$out"

# The figures (from the runs' own records): decode tokens/s, weight push and step time.
.venv/bin/python - "$out" <<'PY'
import json, statistics, sys
from pathlib import Path
from trainer.progress import read_step_records
for name in ("run-http", "run-nccl"):
    steps = read_step_records(Path(sys.argv[1]) / name)[1:]  # the first step pays warm-up
    if not steps:
        print(f"{name}: no steps recorded"); continue
    mean = lambda f: statistics.fmean(f(r) for r in steps)
    print(f"{name}: step {mean(lambda r: r.step_seconds):.2f} s, rollout {mean(lambda r: r.phases['rollout']):.2f} s, "
          f"train {mean(lambda r: r.phases['train']):.2f} s, weight sync {mean(lambda r: r.phases['weight_sync']):.3f} s, "
          f"decode {mean(lambda r: r.tokens_per_second):,.0f} tokens/s")
log = Path(sys.argv[1]) / "run-nccl.log"  # `rpo run`'s own output: the trainer's lines are in it
fell_back = "NCCL weight transfer failed" in log.read_text(errors="replace") if log.exists() else True
print("run-nccl: weights went over " + ("HTTP (NCCL fell back; on one GPU NCCL cannot join two processes)" if fell_back else "NCCL"))
PY
exit $failed
