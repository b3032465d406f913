"""The trainer's one way of sending weights to replicas (`WeightSender.push`): the transport is chosen once,
at start (vLLM's NCCL transfer when `rollout.weight_transfer: nccl` and the trainer is one process on a GPU,
else HTTP), and the fallback lives here too. The wire format is the core's (services/core/weight_wire.py);
the HTTP sender is trainer/weights/http_wire.py, the NCCL one trainer/weights/nccl.py.

With LoRA (`train.lora`) a push is the adapter alone (the replicas hold the base), always over HTTP.

HTTP: every rank takes part in gathering the weights (ZeRO-3: in lockstep, to the end); rank 0 keeps its CPU
copies and pushes them only once the gather is over, so a failed push never leaves the other ranks waiting
in a gather.

NCCL control flow: the group of replicas is set up on the first step's push (the replicas join the
rendezvous at `train.nccl_host:train.nccl_port`), reused while the set of replicas stays the same, and set
up again when a replica joins or leaves. When setting it up or sending fails (a replica cannot join, a
timeout), the step's weights go over HTTP instead, with a warning naming the failure, and NCCL is tried
again only when the set of replicas changes. A catch-up push (`PushKind.CATCH_UP`: replicas that joined late
or restarted) goes over HTTP: it targets a few replicas, not the group. On one GPU shared by the trainer and
a replica, NCCL between two processes on the same device is not supported: use HTTP there (docs/deploy.md).

Every push says which transport carried it (`Transport`): "nccl", "http" (configured, LoRA, or a catch-up),
or "http_fallback" (NCCL was configured and failed: the failed push and every later one until the replicas
change; the cause is logged once, at the failure). The step record, the step's log line and the trainer's
`rpo_train_weight_sync_seconds{transport}` carry it. `rollout.require_nccl` makes every fall-back an error
(`WeightTransferError`, naming the phase and the cause), and a trainer that cannot use NCCL at all (CPU,
several ranks, LoRA) a configuration error at start.

Each set-up of the group takes a fresh rendezvous port: the first free one from `train.nccl_port` on,
never the port of the group before (whose store may still hold it), within `NCCL_PORT_SPAN` ports.
"""

from __future__ import annotations

import enum
import logging
import socket
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from services.core.adapter_wire import METADATA_KEY, settings_json
from services.core.config import ConfigError, RunConfig
from trainer import dist
from trainer.telemetry.records import Transport
from trainer.weights.nccl import NcclReplicaGroup

log = logging.getLogger("rpo.train")


class ReplicaGroup(Protocol):
    def push(self, version: int) -> None: ...

    def close(self) -> None: ...


HttpPush = Callable[[list[str], int, str], None]
"""(replicas, version, label): the HTTP push to every replica, returning once all serve `version`."""

MakeGroup = Callable[[list[str], int], ReplicaGroup]
"""(replicas, rendezvous port): a set-up NCCL group of the trainer and those replicas."""

NCCL_PORT_SPAN = 64
"""Ports from `train.nccl_port` on that a set-up of the NCCL group may take."""


class WeightTransferError(RuntimeError):
    """NCCL failed and `rollout.require_nccl` forbids the HTTP fall-back; the message names phase and cause."""


class PushKind(enum.Enum):
    """Why weights are pushed, which decides the transport."""

    STEP = "step"
    """Every replica, after an optimizer step: the configured transport."""
    CATCH_UP = "catch up"
    """Replicas behind the learner (joined late, restarted): always HTTP."""


class WeightSender:
    """Pushes the learner's weights to replicas; every rank calls `push` (the HTTP gather is collective)."""

    def __init__(
        self,
        cfg: RunConfig,
        http_push: HttpPush,
        *,
        model: Any = None,
        on_gpu: bool = False,
        world_size: int = 1,
        make_group: MakeGroup | None = None,
    ):
        self.cfg = cfg
        self.http_push = http_push
        self.model = model
        self.make_group = make_group or self._nccl_group
        self.group: ReplicaGroup | None = None
        self.members: tuple[str, ...] = ()
        self.failed_members: tuple[str, ...] | None = None
        self.port: int | None = None
        """The rendezvous port of the group now (or last) set up."""
        self.require_nccl = cfg.rollout.require_nccl
        self.use_nccl = cfg.rollout.weight_transfer == "nccl"
        if self.require_nccl and not self.use_nccl:
            raise ConfigError("rollout.require_nccl is set, so rollout.weight_transfer must be nccl")
        why = consequence = None
        if self.use_nccl and cfg.train.lora.enabled:
            why = "train.lora is on"
            consequence = (
                "each step's adapter (a few MB) goes over HTTP, since the NCCL transfer carries whole models"
            )
        elif self.use_nccl and make_group is None and (not on_gpu or world_size != 1):
            why = "the trainer runs on CPU" if not on_gpu else f"the trainer has {world_size} ranks"
            consequence = "weights go over HTTP"
        if why is not None:
            if self.require_nccl:
                raise ConfigError(f"rollout.require_nccl is set, but {why}: NCCL cannot carry the weights")
            log.warning("rollout.weight_transfer=nccl, but %s: %s", why, consequence)
            self.use_nccl = False

    @classmethod
    def for_learner(cls, cfg: RunConfig, learner: Any, remote: Any) -> WeightSender:
        """The sender of a training process: HTTP through `remote` (rank 0's services; None elsewhere)."""

        def http_push(replicas: list[str], version: int, label: str) -> None:
            main = dist.is_main()
            if learner.lora is not None:  # the adapter alone; the replicas hold the base
                weights, metadata = learner.adapter_weights(), {METADATA_KEY: settings_json(learner.lora)}
            else:
                weights = [(name, tensor) for name, tensor in learner.named_weights() if main]  # collective
                metadata = None
            dist.on_main(
                lambda: remote.push_weights(replicas, version, weights, reason=label, metadata=metadata)
            )

        return cls(
            cfg,
            http_push,
            model=learner.module,
            on_gpu=not learner.on_cpu,
            world_size=dist.world_size(),
        )

    def push(self, replicas: Sequence[str], version: int, kind: PushKind, label: str = "") -> Transport:
        """Bring every replica to `version`; returns the transport used ("nccl", "http" or
        "http_fallback"). `label` names the push in the log (e.g. "step 12"; default: the kind). Raises
        WeightTransferError when NCCL fails and `rollout.require_nccl` is set."""
        replicas = list(replicas)
        label = label or kind.value
        members = tuple(sorted(replicas))
        if not self.use_nccl or kind is PushKind.CATCH_UP:
            self.http_push(replicas, version, label)
            return "http"
        if members == self.failed_members:  # NCCL failed for these replicas: said then, not again
            self.http_push(replicas, version, label)
            return "http_fallback"
        phase = "send"
        try:
            if self.group is None or members != self.members:
                phase = "setup" if self.group is None else "setup (replicas changed)"
                self.close()
                port = self._next_port()
                log.info(
                    "NCCL weight transfer: %s with %d replica(s) at %s:%d",
                    phase,
                    len(members),
                    self._host(),
                    port,
                )
                self.port = port
                self.group = self.make_group(list(members), port)
                self.members = members
                phase = "send"
            self.group.push(version)
        except Exception as exc:  # noqa: BLE001 - any failure falls back to the HTTP push, named
            self.close()
            cause = f"{type(exc).__name__}: {exc}"
            if self.require_nccl:
                raise WeightTransferError(
                    f"NCCL weight transfer of version {version} to {len(members)} replica(s) failed in {phase} "
                    f"({cause}); rollout.require_nccl forbids the HTTP fall-back"
                ) from exc
            log.warning(
                "NCCL weight transfer failed in %s (%s); version %d goes over HTTP (transport http_fallback), "
                "and NCCL is tried again when the replicas change",
                phase,
                cause,
                version,
                extra={"phase": f"nccl {phase}", "policy_version": version},
            )
            self.failed_members = members
            self.http_push(replicas, version, label)
            return "http_fallback"
        self.failed_members = None
        return "nccl"

    def close(self) -> None:
        if self.group is not None:
            try:
                self.group.close()
            except Exception as exc:  # noqa: BLE001 - a broken group must not stop the fallback
                log.warning("closing the NCCL group: %s", exc)
            self.group = None
            self.members = ()

    def _host(self) -> str:
        return self.cfg.train.nccl_host or socket.gethostname()

    def _next_port(self) -> int:
        """The first port from `train.nccl_port` on that is free here and not the previous group's."""
        first = self.cfg.train.nccl_port
        for port in range(first, min(first + NCCL_PORT_SPAN, 65536)):
            if port != self.port and _port_free(port):
                return port
        raise OSError(
            f"no free port for the NCCL rendezvous in {first}..{first + NCCL_PORT_SPAN - 1} (train.nccl_port)"
        )

    def _nccl_group(self, urls: list[str], port: int) -> ReplicaGroup:
        token = self.cfg.services.api_token
        return NcclReplicaGroup(
            urls,
            self.model,
            master_address=self._host(),
            master_port=port,
            rank=0,
            token=token.get_secret_value() if token is not None else None,
            timeout_seconds=self.cfg.train.weight_sync_timeout_seconds,
        )


def _port_free(port: int) -> bool:
    """Whether a listening socket can bind `port` on every address here (what the NCCL store does)."""
    with socket.socket() as probe:
        try:
            probe.bind(("", port))
        except OSError:
            return False
    return True
