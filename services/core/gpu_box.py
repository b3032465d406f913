"""The GPUs a memory plan is for: read from this machine (`nvidia-smi`), or given as a count and a size
(`rpo plan --gpus 2 --gpu-memory 80GiB`) for another box. No torch: asking torch would initialise CUDA in
a process that has not yet chosen its GPUs (services/core/gpu_claims.py).

Guarantees: a size is read exactly as written (`GiB`/`MiB` binary, `GB`/`MB` decimal, a bare number is
bytes) or refused with a message naming the forms; on a machine without a working `nvidia-smi` the box is
None (no GPU), never a guess.
"""

from __future__ import annotations

import re
import subprocess

from services.core.memory_plan import Box

UNITS = {
    "": 1,
    "b": 1,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
}
NVIDIA_SMI_SECONDS = 30.0


def parse_size(text: str) -> int:
    """`80GiB`, `24GB`, `81920MiB`, `1.5e10` -> bytes; ValueError naming the accepted forms otherwise."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in UNITS:
        raise ValueError(f"{text!r} is not a memory size: write it as 80GiB, 24GB or 81920MiB")
    size = int(float(match.group(1)) * UNITS[unit])
    if size <= 0:
        raise ValueError(f"{text!r}: a GPU's memory must be above 0")
    return size


def detect_box() -> Box | None:
    """This machine's GPUs from `nvidia-smi` (the smallest one's memory, so the plan holds on each); None
    when there is no GPU or no working nvidia-smi."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=NVIDIA_SMI_SECONDS,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    sizes = [int(float(line)) * 2**20 for line in out.stdout.split() if line.strip()]  # MiB per GPU
    return Box(len(sizes), min(sizes)) if sizes else None
