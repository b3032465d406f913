"""The trainer's one way of sending weights to replicas (`WeightSender.push`): a primary transport and, when
the primary is NCCL, HTTP as its fall-back, chosen once at start (`WeightSender.for_learner`).

NCCL is the primary when `rollout.weight_transfer: nccl` and the trainer can use it (one process, on a GPU,
no LoRA); otherwise HTTP is, with a warning naming why NCCL was not used. With LoRA a push is the adapter
alone (the replicas hold the base), always over HTTP. A catch-up push (`PushKind.CATCH_UP`: replicas that
joined late or restarted) goes over HTTP: it targets a few replicas, not the group.

When the primary fails (a replica cannot join, a timeout), the step's weights go over the fall-back instead,
with a warning naming the phase and the cause, and the primary is tried again only when the set of replicas
changes. Every push says which transport carried it (`Transport`): "nccl", "http" (configured, LoRA, or a
catch-up) or "http_fallback" (NCCL was configured and failed: the failed push and every later one until the
replicas change). The step record, the step's log line and the trainer's
`rpo_train_weight_sync_seconds{transport}` carry it. `rollout.require_nccl` makes every fall-back an error
(`WeightTransferError`, naming the phase and the cause), and a trainer that cannot use NCCL at all (CPU,
several ranks, LoRA) a configuration error at start. On one GPU shared by the trainer and a replica, NCCL
between two processes on the same device is not supported: use HTTP there (docs/deploy.md).
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from services.core.config import ConfigError, RunConfig
from trainer import dist
from trainer.weights.export import LearnerWeights
from trainer.weights.http import HttpTransport
from trainer.weights.nccl import NcclTransport
from trainer.weights.transport import Transport, TransportFailed, WeightTransferError, WeightTransport

if TYPE_CHECKING:
    from trainer.learner.engine import Learner

log = logging.getLogger("rpo.train")


class PushKind(enum.Enum):
    """Why weights are pushed, which decides the transport."""

    STEP = "step"
    """Every replica, after an optimizer step: the primary transport."""
    CATCH_UP = "catch up"
    """Replicas behind the learner (joined late, restarted): always HTTP."""


class WeightSender:
    """Pushes the learner's weights to replicas; every rank calls `push` (reading the weights is collective).

    `primary` carries each step's push; `fallback` (HTTP, when the primary is NCCL) carries it when the
    primary fails, unless `require_primary`; catch-up pushes go over the fall-back when there is one, else
    the primary (which is then HTTP)."""

    def __init__(
        self, primary: WeightTransport, fallback: WeightTransport | None = None, require_primary: bool = False
    ):
        self.primary = primary
        self.fallback = fallback
        self.require_primary = require_primary
        self.failed_members: tuple[str, ...] | None = None
        """The replicas the primary last failed for: their pushes use the fall-back until the set changes."""

    @classmethod
    def for_learner(cls, cfg: RunConfig, learner: Learner) -> WeightSender:
        """The sender of a training process: HTTP from the learner's weights, behind NCCL when configured
        and usable here."""
        http = HttpTransport(cfg, LearnerWeights(learner))
        if not use_nccl(cfg, on_gpu=not learner.on_cpu, world_size=dist.world_size()):
            return cls(http)
        return cls(NcclTransport(cfg, learner.module), http, require_primary=cfg.rollout.require_nccl)

    @property
    def use_nccl(self) -> bool:
        return self.primary.name == "nccl"

    def push(self, replicas: Sequence[str], version: int, kind: PushKind, label: str = "") -> Transport:
        """Bring every replica to `version`; returns the transport used ("nccl", "http" or
        "http_fallback"). `label` names the push in the log (e.g. "step 12"; default: the kind). Raises
        WeightTransferError when the primary fails and `rollout.require_nccl` forbids the fall-back."""
        replicas = list(replicas)
        label = label or kind.value
        members = tuple(sorted(replicas))
        if self.fallback is None or kind is PushKind.CATCH_UP:
            transport = self.fallback or self.primary
            transport.push(replicas, version, label)
            return transport.name
        if members == self.failed_members:  # the primary failed for these replicas: said then, not again
            self.fallback.push(replicas, version, label)
            return "http_fallback"
        try:
            self.primary.push(replicas, version, label)
        except TransportFailed as exc:
            if self.require_primary:
                raise WeightTransferError(
                    f"NCCL weight transfer of version {version} to {len(members)} replica(s) failed in "
                    f"{exc.phase} ({exc}); rollout.require_nccl forbids the HTTP fall-back"
                ) from exc
            log.warning(
                "NCCL weight transfer failed in %s (%s); version %d goes over HTTP (transport http_fallback), "
                "and NCCL is tried again when the replicas change",
                exc.phase,
                exc,
                version,
                extra={"phase": f"nccl {exc.phase}", "policy_version": version},
            )
            self.failed_members = members
            self.fallback.push(replicas, version, label)
            return "http_fallback"
        self.failed_members = None
        return self.primary.name

    def close(self) -> None:
        for transport in (self.primary, self.fallback):
            if transport is not None:
                transport.close()


def use_nccl(cfg: RunConfig, *, on_gpu: bool, world_size: int) -> bool:
    """Whether NCCL carries the weights: configured, and usable by this trainer (one process on a GPU, no
    LoRA). When configured but not usable: a warning naming why, or a ConfigError under
    `rollout.require_nccl`."""
    wanted = cfg.rollout.weight_transfer == "nccl"
    if cfg.rollout.require_nccl and not wanted:
        raise ConfigError("rollout.require_nccl is set, so rollout.weight_transfer must be nccl")
    if not wanted:
        return False
    why = consequence = None
    if cfg.train.lora.enabled:
        why = "train.lora is on"
        consequence = (
            "each step's adapter (a few MB) goes over HTTP, since the NCCL transfer carries whole models"
        )
    elif not on_gpu or world_size != 1:
        why = "the trainer runs on CPU" if not on_gpu else f"the trainer has {world_size} ranks"
        consequence = "weights go over HTTP"
    if why is None:
        return True
    if cfg.rollout.require_nccl:
        raise ConfigError(f"rollout.require_nccl is set, but {why}: NCCL cannot carry the weights")
    log.warning("rollout.weight_transfer=nccl, but %s: %s", why, consequence)
    return False
