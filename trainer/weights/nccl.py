"""The NCCL weight transport (`rollout.weight_transfer: nccl`, GPU only), with vLLM's own trainer-side
transfer engine: the replicas' /v1/weights/nccl routes are driven over HTTP, the tensors travel over NCCL.
Not exercised on a GPU by CI; `scripts/gpu_check.sh` checks it on a GPU box.

Control flow (`NcclTransport`): the group of the trainer and the replicas is set up on the first push (the
replicas join the rendezvous at `train.nccl_host:train.nccl_port`), reused while the set of replicas stays
the same, and set up again when a replica joins or leaves. Each set-up takes a fresh rendezvous port: the
first free one from `train.nccl_port` on, never the port of the group before (whose store may still hold
it), within `NCCL_PORT_SPAN` ports. A failure in set-up or send closes the group and raises
`TransportFailed` naming the phase; the sender (trainer/weights/sender.py) decides what follows.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from services.core.config import RunConfig
from services.core.http_client import RetryPolicy, ServiceCallError, ServiceClient
from trainer.weights.http_wire import WeightPushError
from trainer.weights.transport import TransportFailed

log = logging.getLogger("rpo.weights")

NCCL_PORT_SPAN = 64
"""Ports from `train.nccl_port` on that a set-up of the NCCL group may take."""


@dataclass
class _NcclFanOut:
    """vLLM's `VLLMWeightSyncClient` protocol over our replicas' /v1/weights/nccl routes: each call goes to
    every replica at once. Replica i joins the NCCL group at rank 1 + i (one worker per replica: TP = 1)."""

    urls: list[str]
    token: str | None
    timeout_seconds: float
    version: int = 0
    clients: dict[str, ServiceClient] = field(default_factory=dict)

    def __post_init__(self) -> None:
        policy = RetryPolicy(
            read_timeout_seconds=self.timeout_seconds, max_attempts=1, max_total_seconds=self.timeout_seconds
        )
        self.clients = {url: ServiceClient(url, policy, token=self.token) for url in self.urls}

    def _all(self, path: str, bodies: dict[str, dict[str, Any]], phase: str) -> None:
        def one(url: str) -> None:
            self.clients[url].request("POST", path, phase=phase, json=bodies[url])

        failures = {}
        with ThreadPoolExecutor(max_workers=len(self.urls)) as pool:
            futures = {url: pool.submit(one, url) for url in self.urls}
            for url, future in futures.items():
                try:
                    future.result()
                except ServiceCallError as exc:
                    failures[url] = (phase, str(exc))
        if failures:
            raise WeightPushError(self.version, failures)

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        bodies = {url: {"init_info": {**init_info, "rank_offset": 1 + i}} for i, url in enumerate(self.urls)}
        self._all("/v1/weights/nccl/init", bodies, "connect")

    def start_weight_update(self) -> None:
        self._all("/v1/weights/nccl/start", {u: {"version": self.version} for u in self.urls}, "validate")

    def update_weights(self, update_info: Any) -> None:
        body = {"version": self.version, "update_info": update_info}
        self._all("/v1/weights/nccl/update", {u: body for u in self.urls}, "upload")

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self._all("/v1/weights/nccl/finish", {u: {"version": self.version} for u in self.urls}, "apply")

    def close(self) -> None:
        for client in self.clients.values():
            client.close()


class NcclReplicaGroup:
    """Weights to every replica over NCCL with vLLM's trainer-side engine (`rollout.weight_transfer: nccl`).

    Create once per training run on every trainer rank (rank 0 sends and drives the replicas' routes; other
    ranks only take part in gathering), then `push(version)` after each step on every rank. `source` is a
    vLLM `WeightSource` yielding HF-named full tensors, or a module whose `named_parameters()` are (plain or
    FSDP; DeepSpeed ZeRO-3 needs a source that gathers). GPU only: not exercised by CI, check on a GPU box.
    """

    def __init__(
        self,
        urls: Sequence[str],
        source: Any,
        *,
        master_address: str,
        master_port: int,
        rank: int = 0,
        token: str | None = None,
        timeout_seconds: float = 600.0,
    ):
        # lazy: heavy import (vllm), paid only on this path
        from vllm.distributed.weight_transfer.base import ModuleSource, WeightSource

        # lazy: heavy import (vllm), paid only on this path
        from vllm.distributed.weight_transfer.nccl_engine import (
            NCCLTrainerInitInfo,
            NCCLTrainerWeightTransferEngine,
        )

        self.client = _NcclFanOut(list(urls), token, timeout_seconds)
        info = NCCLTrainerInitInfo(
            master_address=master_address,
            master_port=master_port,
            world_size=1 + len(self.client.urls),
            rank=rank,
        )
        weights = source if isinstance(source, WeightSource) else ModuleSource(source)
        self.engine = NCCLTrainerWeightTransferEngine.trainer_init(info, client=self.client, source=weights)

    def push(self, version: int) -> None:
        """Broadcast the current weights; every replica serves `version` when this returns (on rank 0)."""
        self.client.version = version
        self.engine.send_weights()

    def close(self) -> None:
        self.engine.shutdown()
        self.client.close()


class ReplicaGroup(Protocol):
    """A set-up NCCL group of the trainer and some replicas (`NcclReplicaGroup`)."""

    def push(self, version: int) -> None: ...

    def close(self) -> None: ...


MakeGroup = Callable[[list[str], int], ReplicaGroup]
"""(replicas, rendezvous port) -> a set-up group: `NcclReplicaGroup` by default; the seam where the tests
stand in for vLLM's engine."""


class NcclTransport:
    """Pushes the model's weights to replicas over NCCL (`WeightTransport`); one trainer process on a GPU."""

    name: Literal["nccl"] = "nccl"

    def __init__(self, cfg: RunConfig, model: Any, make_group: MakeGroup | None = None):
        self.cfg = cfg
        self.model = model
        self.make_group = make_group or self._vllm_group
        self.group: ReplicaGroup | None = None
        self.members: tuple[str, ...] = ()
        self.port: int | None = None
        """The rendezvous port of the group now (or last) set up."""

    def push(self, replicas: Sequence[str], version: int, label: str) -> None:
        members = tuple(sorted(replicas))
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
                    self.host,
                    port,
                )
                self.port = port
                self.group = self.make_group(list(members), port)
                self.members = members
                phase = "send"
            self.group.push(version)
        except Exception as exc:  # noqa: BLE001 - any failure is the transport's, named by its phase
            self.close()
            raise TransportFailed(phase, exc) from exc

    def close(self) -> None:
        if self.group is not None:
            try:
                self.group.close()
            except Exception as exc:  # noqa: BLE001 - a broken group must not stop the fall-back
                log.warning("closing the NCCL group: %s", exc)
            self.group = None
            self.members = ()

    @property
    def host(self) -> str:
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

    def _vllm_group(self, urls: list[str], port: int) -> ReplicaGroup:
        token = self.cfg.services.api_token
        return NcclReplicaGroup(
            urls,
            self.model,
            master_address=self.host,
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
