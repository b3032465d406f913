"""Weights from the trainer to every replica over NCCL with vLLM's own trainer-side transfer engine
(`rollout.weight_transfer: nccl`, GPU only): the replicas' /v1/weights/nccl routes are driven over HTTP,
the tensors travel over NCCL. Not exercised by CI; check it on a GPU box.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from services.core.http_client import RetryPolicy, ServiceCallError, ServiceClient
from trainer.weights.http_wire import WeightPushError


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
