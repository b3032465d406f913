"""A CUDA driver too old for this install's torch, said once and plainly at process start.

Guarantees:
- `driver_problem` (pure) returns the message when a GPU is expected but CUDA is unavailable and the NVIDIA
  driver found is older than the minimum for the CUDA version torch was built for; None otherwise (CUDA
  works, no driver found, a CPU build of torch, or a driver new enough, where the cause is something else);
- the message names the driver found, torch's CUDA version, the minimum driver, and the two ways out;
- `check_cuda_driver(...)` reads the driver version (`nvidia-smi`, else `/proc/driver/nvidia/version`) and
  raises `CudaDriverError` with that message. The caller passes torch's facts (the shared core imports no
  torch), after the process has chosen its GPUs (`CUDA_VISIBLE_DEVICES`, `services.core.gpu_claims`):
  asking torch whether CUDA is available initialises the CUDA driver, which reads that variable once;
- `fork_safe_cuda_env()` makes a process safe to fork vLLM's engine core and workers from: torch asks NVML,
  not the CUDA driver, whether CUDA is available (`PYTORCH_NVML_BASED_CUDA_CHECK=1`), so the driver is never
  initialised in the parent (vLLM forks unless torch itself has set CUDA up, and a child forked after the
  driver started fails with "CUDA error: initialization error"); and CUDA numbers GPUs in PCI order
  (`CUDA_DEVICE_ORDER=PCI_BUS_ID`), the order of `nvidia-smi` and of the GPU claims. Called first thing by
  every process that lets vLLM start or chooses GPUs, before torch is imported.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

PROC_VERSION = Path("/proc/driver/nvidia/version")
"""The kernel module's version file, present wherever the NVIDIA driver is loaded (and in GPU containers)."""

MIN_DRIVER = {
    (11, 8): 520,
    (12, 0): 525,
    (12, 1): 530,
    (12, 2): 535,
    (12, 3): 545,
    (12, 4): 550,
    (12, 5): 555,
    (12, 6): 560,
    (12, 8): 570,
    (12, 9): 575,
    (13, 0): 580,
}
"""CUDA version -> the Linux driver branch its toolkit release ships with (NVIDIA's CUDA release notes, table
"CUDA Toolkit and Corresponding Driver Versions"); a CUDA version between two rows needs at least the lower
row's driver."""


FORK_SAFE_ENV = {"PYTORCH_NVML_BASED_CUDA_CHECK": "1", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
"""What `fork_safe_cuda_env` sets: torch's CUDA check through NVML (no driver start in the parent), and
nvidia-smi's GPU numbering for CUDA."""


def fork_safe_cuda_env(environ: dict[str, str] | os._Environ = os.environ) -> dict[str, str]:
    """Set `FORK_SAFE_ENV` in `environ` (this process's environment, inherited by its children); returns the
    settings it changed (name -> the value it replaced, "" where unset). A different value is overridden:
    the GPU claims and vLLM's fork rely on these two."""
    changed = {}
    for name, value in FORK_SAFE_ENV.items():
        if environ.get(name) != value:
            changed[name] = environ.get(name, "")
            environ[name] = value
    return changed


class CudaDriverError(RuntimeError):
    """The NVIDIA driver is too old for the CUDA version torch was built for; the message says what to do."""


def parse_cuda_version(text: str) -> tuple[int, int] | None:
    """`torch.version.cuda` ("13.0", "12.8") as (major, minor); None when it is not a version."""
    match = re.fullmatch(r"\s*(\d+)\.(\d+)(?:\.\d+)*\s*", text or "")
    return (int(match.group(1)), int(match.group(2))) if match else None


def parse_driver_version(text: str) -> str | None:
    """The driver version in `nvidia-smi --query-gpu=driver_version` output (first GPU's line) or in
    /proc/driver/nvidia/version ("NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  ..."); None
    when there is none."""
    for line in (text or "").splitlines():
        line = line.strip()
        if not line:
            continue
        if line.startswith("NVRM"):
            match = re.search(r"\s(\d{3,4}\.\d{1,3}(?:\.\d{1,3})?)\s", line + " ")
            return match.group(1) if match else None
        if re.fullmatch(r"\d{3,4}\.\d{1,3}(?:\.\d{1,3})?", line):
            return line
    return None


def min_driver(cuda: tuple[int, int]) -> int | None:
    """The oldest driver branch for CUDA `cuda`: its own row, else the nearest older row; None before 11.8."""
    known = [version for version in MIN_DRIVER if version <= cuda]
    return MIN_DRIVER[max(known)] if known else None


def driver_problem(
    driver: str | None, torch_cuda: str | None, cuda_available: bool, torch_version: str = ""
) -> str | None:
    """The message for a driver too old for torch's CUDA, or None (see the module docstring)."""
    if cuda_available or not driver or not torch_cuda:
        return None
    cuda = parse_cuda_version(torch_cuda)
    major = re.match(r"\d+", driver)
    if cuda is None or major is None:
        return None
    needed = min_driver(cuda)
    if needed is None or int(major.group()) >= needed:
        return None
    torch_name = f"torch {torch_version}" if torch_version else "torch"
    return (
        f"NVIDIA driver {driver} found, but this image's {torch_name} is built for CUDA {torch_cuda}, which "
        f"needs driver >= {needed}: CUDA cannot start. Upgrade the host's NVIDIA driver to {needed} or "
        f"newer, or build the image with an older torch (one built for a CUDA version driver {driver} "
        "supports)"
    )


def read_driver_version() -> str | None:
    """The host's NVIDIA driver version: `nvidia-smi`, else /proc/driver/nvidia/version; None if neither."""
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            ).stdout
        except (OSError, subprocess.SubprocessError):
            out = ""
        if version := parse_driver_version(out):
            return version
    try:
        return parse_driver_version(PROC_VERSION.read_text(errors="replace"))
    except OSError:
        return None


def gpu_expected() -> bool:
    """Whether this machine has an NVIDIA GPU to use: `nvidia-smi` on PATH or the driver's /proc file."""
    return shutil.which("nvidia-smi") is not None or PROC_VERSION.exists()


def no_gpu_problem(torch_cuda: str | None, gpu_visible: bool, torch_version: str = "") -> str | None:
    """The message for a replica whose torch is a CUDA build on a machine where no NVIDIA GPU is visible
    (vLLM's GPU engine would fail deep in its start-up: "Device string must not be empty"); None otherwise."""
    if not torch_cuda or gpu_visible:
        return None
    torch_name = f"torch {torch_version.split('+')[0]}" if torch_version else "torch"
    return (
        f"no NVIDIA GPU is visible here (no nvidia-smi, no {PROC_VERSION}) and this {torch_name} is built for "
        f"CUDA {torch_cuda}, with vLLM's GPU engine: give the container the GPUs (`docker run --gpus all`, or "
        "compose with the NVIDIA Container Toolkit installed), or use the CPU build (`rpo compose init --cpu`, "
        "or scripts/bootstrap.sh on a machine without a GPU)"
    )


def check_replica_gpu(torch_cuda: str | None, torch_version: str = "") -> None:
    """Raise CudaDriverError when a CUDA build of torch finds no GPU to run vLLM on (`no_gpu_problem`)."""
    message = no_gpu_problem(torch_cuda, gpu_expected(), torch_version)
    if message:
        raise CudaDriverError(message)


def check_cuda_driver(
    torch_cuda: str | None, cuda_available: Callable[[], bool], torch_version: str = ""
) -> None:
    """Raise CudaDriverError when a GPU is expected, CUDA is unavailable and the driver is too old for
    torch's CUDA; return otherwise. The caller passes torch's facts (`torch.version.cuda`,
    `torch.cuda.is_available`, `torch.__version__`): the shared core imports no torch. `cuda_available` is
    called only on a machine with an NVIDIA driver."""
    if not torch_cuda or not gpu_expected():  # a CPU build of torch, or no NVIDIA driver: nothing to check
        return
    message = driver_problem(read_driver_version(), torch_cuda, cuda_available(), torch_version.split("+")[0])
    if message:
        raise CudaDriverError(message)
