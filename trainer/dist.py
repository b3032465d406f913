"""The trainer's process group: start it, ask who we are, move small objects and numbers between ranks.

Guarantees: `init_distributed()` is idempotent and works with or without DeepSpeed's launcher (alone it
makes a world of one on a free local port); the backend is gloo on CPU (DS_ACCELERATOR=cpu) and the
accelerator's own (nccl on CUDA) otherwise. Every other helper also works before `init_distributed()`,
as a world of one. `shard` splits a list the same way on every rank, so the ranks' slices together are the
whole list, in order, with sizes that differ by at most one.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any


def _torch_dist():
    # lazy: heavy import (torch), paid only on this path
    import torch.distributed as torch_dist

    return torch_dist


def _initialised() -> bool:
    torch_dist = _torch_dist()
    return torch_dist.is_available() and torch_dist.is_initialized()


def backend_name() -> str:
    """gloo on the CPU accelerator, the accelerator's communication backend (nccl on CUDA) elsewhere."""
    # lazy: heavy import (deepspeed), paid only on this path
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    return "gloo" if accelerator.device_name() == "cpu" else accelerator.communication_backend_name()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> None:
    """Join the process group (or make a world of one when no launcher set RANK/WORLD_SIZE).

    Also selects this rank's accelerator device (LOCAL_RANK) on GPUs. Safe to call more than once.
    """
    if _initialised():
        return
    # lazy: heavy import (deepspeed), paid only on this path
    import deepspeed

    # lazy: heavy import (deepspeed), paid only on this path
    from deepspeed.accelerator import get_accelerator

    launched = ("RANK" in os.environ and "WORLD_SIZE" in os.environ) or "OMPI_COMM_WORLD_RANK" in os.environ
    added: dict[str, str] = {}
    if not launched:  # a plain process: a world of one (an MPI launch is discovered by DeepSpeed)
        wanted = {
            "RANK": "0",
            "WORLD_SIZE": "1",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(_free_port()),
        }
        added = {k: v for k, v in wanted.items() if k not in os.environ}
        os.environ.update(added)
        os.environ.setdefault("LOCAL_RANK", "0")  # kept: deepspeed.initialize requires it
    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        accelerator.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    try:
        deepspeed.init_distributed(dist_backend=backend_name(), verbose=False)
    finally:
        # A child process (a trainer or test started from here) must not take this world for a launch
        # of its own and try to listen on our port.
        for key in added:
            os.environ.pop(key, None)
    if accelerator.device_name() == "cpu":
        _unlink_shm_allreduce_buffer()


def _unlink_shm_allreduce_buffer() -> None:
    """Workaround: on the CPU accelerator DeepSpeed maps one named POSIX shared-memory buffer per local rank
    (tens of MB, for its shm all-reduce) and never unlinks it, so every multi-rank run leaves them in
    /dev/shm, which is RAM (upstream: deepspeedai/DeepSpeed#4115, "the SHM object will remain in /dev/shm
    after DeepSpeed exit"). Once every rank has mapped every peer's buffer (DeepSpeed does that before
    `init_distributed` returns; the barrier makes sure all have returned), each rank removes the NAME of
    its own buffer: the mappings stay valid and the memory goes away with the last process.
    The name is DeepSpeed's (csrc/cpu/comm/shm.cpp): deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>.
    """
    if world_size() == 1 or "LOCAL_SIZE" not in os.environ:  # no shm buffer without a local peer
        return
    barrier()
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    name = f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank()}"
    with contextlib.suppress(OSError):
        os.unlink(name)


def rank() -> int:
    return _torch_dist().get_rank() if _initialised() else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return _torch_dist().get_world_size() if _initialised() else int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if _initialised() and world_size() > 1:
        _torch_dist().barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """`obj` from rank `src` on every rank (picklable objects; every rank must call it)."""
    if not _initialised() or world_size() == 1:
        return obj
    box = [obj if rank() == src else None]
    _torch_dist().broadcast_object_list(box, src=src)
    return box[0]


def sum_over_ranks(values: Sequence[float]) -> list[float]:
    """Element-wise sum of `values` over all ranks (float64; every rank must call it with the same length)."""
    if not _initialised() or world_size() == 1:
        return [float(v) for v in values]
    # lazy: heavy import (torch), paid only on this path
    import torch

    # lazy: heavy import (deepspeed), paid only on this path
    from deepspeed.accelerator import get_accelerator

    device = "cpu" if backend_name() == "gloo" else get_accelerator().current_device_name()
    tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    _torch_dist().all_reduce(tensor)
    return tensor.cpu().tolist()


def shard_bounds(n: int, ranks: int, index: int) -> tuple[int, int]:
    """[start, end) of rank `index`'s contiguous slice of n items: the first n % ranks ranks get one more."""
    base, extra = divmod(n, ranks)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


class RankZeroFailed(RuntimeError):
    """Raised on the other ranks when rank 0's part of a collective phase failed (its log has the cause)."""


@dataclass(frozen=True)
class _Failure:
    message: str


def on_main(fn: Callable[[], Any], share: Callable[[Any], Any] = lambda _: None) -> tuple[Any, Any]:
    """Run `fn` on rank 0 and broadcast `share(result)`; returns (result on rank 0 / None, shared). Collective.

    If `fn` raises on rank 0, the failure is broadcast and every other rank raises RankZeroFailed (instead of
    waiting for a collective that never comes).
    """
    result = shared = None
    if is_main():
        try:
            result = fn()
            shared = share(result)
        except BaseException as exc:
            broadcast_object(_Failure(f"{type(exc).__name__}: {exc}"))
            raise
    shared = broadcast_object(shared)
    if isinstance(shared, _Failure):
        raise RankZeroFailed(f"rank 0 failed: {shared.message}")
    return result, shared
