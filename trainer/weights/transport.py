"""The one shape of the weight path: a `WeightTransport` brings a set of replicas to a policy version, and a
`WeightSource` says what a push carries (`WeightPayload`: the whole model, or a LoRA adapter with its
settings). The HTTP transport (trainer/weights/http.py) and the NCCL one (trainer/weights/nccl.py) stand
behind it; the sender (trainer/weights/sender.py) picks a primary and a fall-back among them.

Every rank calls `push` in the same order: reading the weights out of a ZeRO-3 learner is collective, so a
transport reads its payload on every rank and sends it from rank 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol

if TYPE_CHECKING:
    import torch

Transport = Literal["nccl", "http", "http_fallback"]
"""What carried a push, as the step record, the log line and `rpo_train_weight_sync_seconds{transport}` say
it: the configured transport by name, or "http_fallback" (NCCL was configured and failed)."""

TRANSPORTS: tuple[Transport, ...] = ("nccl", "http", "http_fallback")


@dataclass(frozen=True)
class WeightPayload:
    """What one push carries: (name, CPU tensor) pairs on rank 0 (empty on the other ranks), and the
    safetensors metadata a LoRA adapter travels with (None for a whole model)."""

    tensors: list[tuple[str, torch.Tensor]] = field(default_factory=list)
    adapter_metadata: dict[str, str] | None = None

    @property
    def is_adapter(self) -> bool:
        return self.adapter_metadata is not None


class WeightSource(Protocol):
    """Where a transport reads the weights to push (trainer/weights/export.py reads them out of the learner)."""

    def read(self) -> WeightPayload:
        """The current weights; collective (every rank calls it, in lockstep)."""
        ...


class WeightTransport(Protocol):
    """Brings replicas to a policy version. Every rank calls `push`; it returns once every replica serves
    `version`, else raises naming the replicas and the phase that failed."""

    name: Literal["nccl", "http"]

    def push(self, replicas: Sequence[str], version: int, label: str) -> None:
        """Push the current weights as `version`; `label` names the push in the log ("step 12")."""
        ...

    def close(self) -> None:
        """Release what the transport holds (a process group, connections); it may be used again after."""
        ...


class TransportFailed(RuntimeError):
    """A transport failed in `phase` (e.g. "setup", "send"); the sender falls back or stops on it."""

    def __init__(self, phase: str, cause: BaseException):
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.phase = phase


class WeightTransferError(RuntimeError):
    """NCCL failed and `rollout.require_nccl` forbids the HTTP fall-back; the message names phase and cause."""
