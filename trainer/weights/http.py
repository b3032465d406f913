"""The HTTP weight transport, the default: every rank reads the payload (a ZeRO-3 gather is collective, in
lockstep, to the end); rank 0 keeps its CPU copies and pushes them only once the read is over, so a failed
push never leaves the other ranks waiting in a gather. The wire (one streamed safetensors body per replica,
to its weight data plane) is trainer/weights/http_wire.py.

A replica that cannot be reached, or stops answering mid-push, sits out the version (a warning names it and
what to check) as long as another replica took it; the next step's version check pushes to it when it comes
back. A replica that refuses or fails to apply the weights fails the step (`RolloutFailed`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Literal

from services.core.clients.replica_set import RolloutFailed, what_to_check
from services.core.config import RunConfig
from trainer import dist
from trainer.weights.http_wire import WeightPushError, push_to_all
from trainer.weights.transport import WeightPayload, WeightSource

log = logging.getLogger("rpo.weights")

SIT_OUT_PHASES = frozenset({"connect", "upload", "no answer"})
"""Weight-push failures of the transport (the replica is gone or frozen), as opposed to a refusal."""


class HttpTransport:
    """Pushes `source`'s weights to replicas over HTTP (`WeightTransport`)."""

    name: Literal["http"] = "http"

    def __init__(self, cfg: RunConfig, source: WeightSource):
        self.cfg = cfg
        self.source = source

    def push(self, replicas: Sequence[str], version: int, label: str) -> None:
        payload = self.source.read()  # collective: every rank, to the end
        dist.on_main(lambda: self.send(list(replicas), version, payload, label))

    def send(self, replicas: list[str], version: int, payload: WeightPayload, label: str) -> None:
        """Rank 0's half: `payload` as `version` to `replicas`; returns once every one serves it (each
        confirms), else raises naming each failed replica and the phase."""
        started = time.monotonic()
        try:
            push_to_all(
                replicas,
                version,
                payload.tensors,
                cfg=self.cfg,
                timeout_seconds=self.cfg.train.weight_sync_timeout_seconds,
                metadata=payload.adapter_metadata,
            )
        except WeightPushError as exc:
            unreachable = [url for url, (phase, _) in exc.failures.items() if phase in SIT_OUT_PHASES]
            if not (exc.succeeded and len(unreachable) == len(exc.failures)):
                raise RolloutFailed(
                    f"{exc}\ncheck those replicas' logs (a push needs about one model of free disk in "
                    "rollout.spool_dir) and train.weight_sync_timeout_seconds"
                ) from None
            for url in unreachable:
                log.warning(
                    "replica %s is unreachable and sits out version %d: %s; %s",
                    url,
                    version,
                    exc.failures[url][1],
                    what_to_check("rollout", url),
                    extra={"replica": url, "phase": "weight push", "policy_version": version},
                )
            return
        log.debug(
            "pushed version %d to %d replica(s) (%s) in %.2f s",
            version,
            len(replicas),
            label,
            time.monotonic() - started,
        )

    def close(self) -> None:
        """Nothing to release: each push opens and closes its own connections."""
