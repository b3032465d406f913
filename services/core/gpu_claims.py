"""Which GPUs a process of a compose box uses: `docker compose up --scale rollout=N` starts N identical
replica containers that all see every GPU, so each one claims its own at start.

The rule (`plan_gpus`, pure, tested against fake device lists):
- the trainer owns the first `gpus.trainer` devices;
- each replica claims `gpus.per_replica` devices among the others, the lowest free ones, by taking an
  exclusive `flock` on `<gpus.claim_dir>/gpu-<index>.lock` (a volume every container mounts). The lock
  lives as long as the process: a replica that dies frees its GPUs, a restarted one claims again;
- claims happen one at a time: a replica holds `<gpus.claim_dir>/claims.lock` while it reads which GPUs are
  held and takes its own (milliseconds; a claim waits up to `CLAIM_WAIT_SECONDS` for it), so a GPU another
  replica is only testing never looks taken, and two replicas starting together never both give up;
- a replica that finds every GPU left to replicas held by other replicas raises `NoFreeGpu` (a surplus
  replica: `rpo serve rollout` exits 0 with one line saying so, and compose's `restart: on-failure` leaves
  it stopped), which is told apart from a box too small for the request (`GpuPlacementError`);
- on a box with fewer GPUs than the trainer plus one replica need, with `gpus.share_with_trainer` (the
  default), the single replica shares the trainer's first GPU; the split is explicit: the replica takes
  `rollout.gpu_memory_utilization` of it (at most `gpus.shared_rollout_fraction`),
  `gpus.shared_headroom_fraction` is left for the two processes' CUDA contexts, and the trainer caps its own
  allocator at what remains (`trainer_share`);
- too few GPUs for a request is an error at start that names what is missing.
The process then sees only its GPUs (`CUDA_VISIBLE_DEVICES`), set before CUDA is initialised, numbered
as here: nvidia-smi's indices are in PCI order, and the claim sets `CUDA_DEVICE_ORDER=PCI_BUS_ID` (CUDA's
default, fastest first, would map a claimed index to another GPU on a box with mixed models).
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from services.core.config import GpusSection
from services.core.cuda_check import fork_safe_cuda_env

try:
    import fcntl
except ImportError:  # pragma: no cover - non-POSIX: no claims (compose boxes are Linux)
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("rpo.gpus")

DEVICES_ENV = "RPO_GPU_DEVICES"
"""Overrides device discovery (a comma-separated list of indices): tests, or a box whose nvidia-smi lies."""


CLAIM_WAIT_SECONDS = 120.0
"""Most seconds a claim waits for another replica's claim to finish (each takes milliseconds)."""
MUTEX_NAME = "claims.lock"
"""The lock file in `gpus.claim_dir` a replica holds while it claims."""


class GpuPlacementError(RuntimeError):
    """Too few GPUs for what was asked; the message says which and how many."""


class NoFreeGpu(GpuPlacementError):
    """Every GPU this replica could use is held by another replica: a surplus replica (scale down)."""


@dataclass
class GpuPlan:
    devices: list[str]
    """The indices this process uses."""
    shared_with_trainer: bool = False
    """A replica on the trainer's GPU (a box with too few GPUs to give each its own)."""
    memory_fraction: float | None = None
    """The share of each device's memory this process may use (set when the GPU is shared)."""


@dataclass
class GpuClaim:
    """What `claim_gpus` holds: the plan, and the lock files that keep other replicas off its GPUs."""

    plan: GpuPlan
    _locks: list[IO] = field(default_factory=list, repr=False)

    def release(self) -> None:
        for fh in self._locks:
            fh.close()
        self._locks.clear()


def visible_gpus() -> list[str]:
    """The box's GPU indices: `RPO_GPU_DEVICES`, else `nvidia-smi` (none when it is missing or fails)."""
    override = os.environ.get(DEVICES_ENV)
    if override is not None:
        return [d.strip() for d in override.split(",") if d.strip()]
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip()]


def trainer_share(gpus: GpusSection, rollout_memory: float) -> float:
    """The trainer's cap on a GPU it shares with a replica, as a fraction of the device's memory: what the
    replica's `rollout_memory` and the headroom for both CUDA contexts leave. Raises GpuPlacementError when
    nothing is left (a rollout share above `gpus.shared_rollout_fraction` is refused on the replica's side)."""
    share = 1.0 - rollout_memory - gpus.shared_headroom_fraction
    if share <= 0.0:
        raise GpuPlacementError(
            f"the trainer shares its GPU with a rollout replica and would get nothing: rollout.gpu_memory_"
            f"utilization ({rollout_memory}) + gpus.shared_headroom_fraction ({gpus.shared_headroom_fraction}) "
            "must be below 1"
        )
    return share


def plan_gpus(
    role: str, devices: list[str], gpus: GpusSection, rollout_memory: float, taken: set[str]
) -> GpuPlan:
    """The devices `role` ("trainer" or "rollout") uses on a box with `devices`, given those other replicas
    have `taken`. Raises GpuPlacementError naming what is missing."""
    trainer_devices = devices[: gpus.trainer]
    if role == "trainer":
        if len(devices) < gpus.trainer:
            raise GpuPlacementError(
                f"the trainer needs {gpus.trainer} GPU(s) (gpus.trainer) and the box has {len(devices)}"
            )
        if len(devices) < gpus.trainer + gpus.per_replica and gpus.share_with_trainer:
            return GpuPlan(
                trainer_devices, shared_with_trainer=True, memory_fraction=trainer_share(gpus, rollout_memory)
            )
        return GpuPlan(trainer_devices)
    if role != "rollout":
        raise ValueError(f"role {role!r}: trainer or rollout")
    spare = [d for d in devices[gpus.trainer :] if d not in taken]
    if len(devices) >= gpus.trainer + gpus.per_replica:
        if len(spare) >= gpus.per_replica:
            return GpuPlan(spare[: gpus.per_replica])
        others = sorted(set(devices[gpus.trainer :]) & taken, key=devices.index)
        raise NoFreeGpu(
            f"this rollout replica needs {gpus.per_replica} GPU(s) (gpus.per_replica) and none are free: the box "
            f"has {len(devices)}, the trainer keeps {', '.join(trainer_devices) or 'none'} (gpus.trainer="
            f"{gpus.trainer}), other replicas hold {', '.join(others) or 'none'}. Scale rollout down to "
            f"{(len(devices) - gpus.trainer) // gpus.per_replica} or add GPUs"
        )
    # Fewer GPUs than the trainer plus one replica: share the trainer's first GPU, one replica only.
    if not gpus.share_with_trainer or not devices:
        raise GpuPlacementError(
            f"this rollout replica needs {gpus.per_replica} GPU(s) of its own and the box has {len(devices)}, "
            f"{gpus.trainer} of them the trainer's"
            + ("" if devices else " (no GPU found: is the NVIDIA container toolkit installed?)")
        )
    if rollout_memory > gpus.shared_rollout_fraction:
        raise GpuPlacementError(
            f"this rollout replica shares GPU {devices[0]} with the trainer, so rollout.gpu_memory_utilization "
            f"({rollout_memory}) must be at most gpus.shared_rollout_fraction ({gpus.shared_rollout_fraction})"
        )
    if devices[0] in taken:
        raise NoFreeGpu(
            f"the box has {len(devices)} GPU(s): one rollout replica shares GPU {devices[0]} with the trainer, "
            "and another replica already does. Scale rollout to 1 or add GPUs"
        )
    return GpuPlan([devices[0]], shared_with_trainer=True, memory_fraction=rollout_memory)


def _try_lock(path: Path) -> IO | None:
    fh = path.open("a")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        return None
    return fh


def _claim_mutex(root: Path, wait_seconds: float) -> IO:
    """The claim directory's mutex (`MUTEX_NAME`), waited for up to `wait_seconds`."""
    deadline = time.monotonic() + wait_seconds
    while (fh := _try_lock(root / MUTEX_NAME)) is None:
        if time.monotonic() > deadline:
            raise GpuPlacementError(
                f"another process has held {root / MUTEX_NAME} for over {wait_seconds:.0f} s while claiming "
                "GPUs (a claim takes milliseconds): is a replica stuck at start?"
            )
        time.sleep(0.05)
    return fh


def claim_gpus(role: str, gpus: GpusSection, rollout_memory: float) -> GpuClaim | None:
    """Claim this process's GPUs and restrict it to them (`CUDA_VISIBLE_DEVICES`); None when
    `gpus.claim_dir` is unset (the process uses what it sees, as outside compose)."""
    if gpus.claim_dir is None:
        return None
    if fcntl is None:  # pragma: no cover - non-POSIX
        raise GpuPlacementError("gpus.claim_dir needs POSIX file locks")
    devices = visible_gpus()
    root = Path(gpus.claim_dir)
    root.mkdir(parents=True, exist_ok=True)
    locks: list[IO] = []
    if role == "trainer":
        plan = plan_gpus("trainer", devices, gpus, rollout_memory, set())
    else:
        # One claim at a time (the mutex): a GPU lock that cannot be taken now is held by a running replica,
        # never by one that is only testing it. Free GPUs are locked as they are found; the plan keeps the
        # lowest ones it needs and the others are let go before the mutex is.
        with _claim_mutex(root, CLAIM_WAIT_SECONDS):
            free: dict[str, IO] = {}
            for device in devices:
                if (lock := _try_lock(root / f"gpu-{device}.lock")) is not None:
                    free[device] = lock
            try:
                plan = plan_gpus("rollout", devices, gpus, rollout_memory, set(devices) - set(free))
                locks = [free.pop(d) for d in plan.devices]
            finally:
                for fh in free.values():
                    fh.close()
    fork_safe_cuda_env()  # CUDA_DEVICE_ORDER=PCI_BUS_ID: CUDA's indices are the ones claimed above
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(plan.devices)
    how = (
        f", sharing it with the trainer ({plan.memory_fraction:.2f} of its memory)"
        if plan.shared_with_trainer
        else ""
    )
    log.info("%s uses GPU(s) %s of %s%s", role, ",".join(plan.devices), ",".join(devices), how)
    return GpuClaim(plan, locks)
