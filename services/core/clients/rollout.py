"""Typed clients of the rollout replicas, for the trainer, `rpo cache init` and `rpo eval`.

- `discover_replicas(cfg)`: the replicas' base URLs, from `services.rollout_urls` or, with
  `services.rollout_discovery: dns://host:port`, every address `host` resolves to (call it before each step);
- `RolloutClient`: generate, rollouts, version, the engine's sleep and wake (`rollout.sleep_mode`), on the
  one retry policy (`services.core.http_client`: transport errors and 5xx retried, 4xx never).

Weights travel from the trainer's side: `trainer/weights/http_wire.py` (HTTP) and `trainer/weights/nccl.py` (NCCL).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from services.core.http_client import (
    RetryPolicy,
    ServiceClient,
)
from services.core.schemas.common import MSGPACK_MEDIA_TYPE, decode_model, encode_model
from services.core.schemas.rollout import (
    EngineState,
    GenerateRequest,
    GenerateResponse,
    RolloutRequest,
    RolloutResponse,
    SleepRequest,
    WeightVersion,
)

if TYPE_CHECKING:
    from services.core.config import RunConfig

GENERATE_PATH = "/v1/generate"
ROLLOUT_PATH = "/v1/rollouts"
VERSION_PATH = "/v1/weights/version"
SLEEP_PATH = "/v1/engine/sleep"
WAKE_PATH = "/v1/engine/wake"
# ---------------------------------------------------------------------------------------------------------
# Discovery


def discover_replicas(cfg: RunConfig) -> list[str]:
    """Base URLs of every replica: `services.rollout_urls` as given, or the addresses of the DNS name in
    `services.rollout_discovery` (`dns://rollout:8200` -> one URL per A/AAAA record, sorted, deduplicated).
    A name that does not resolve gives an empty list (the caller says what to check)."""
    services = cfg.services
    if not services.rollout_discovery:
        return [u.rstrip("/") for u in services.rollout_urls]
    return resolve_dns_replicas(services.rollout_discovery)


def resolve_dns_replicas(spec: str) -> list[str]:
    """`dns://host:port` -> `http://address:port` for each address host resolves to."""
    if not spec.startswith("dns://"):
        raise ValueError(f"replica discovery {spec!r}: use dns://host:port")
    host, _, port = spec[len("dns://") :].rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"replica discovery {spec!r}: use dns://host:port")
    try:
        infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    except socket.gaierror:
        return []
    addresses = sorted({info[4][0] for info in infos}, key=lambda a: (ipaddress.ip_address(a).version, a))
    return [f"http://{f'[{a}]' if ':' in a else a}:{port}" for a in addresses]


# ---------------------------------------------------------------------------------------------------------
# Requests


def policy_for(cfg: RunConfig | None, policy: RetryPolicy | None) -> RetryPolicy:
    if policy is not None:
        return policy
    return RetryPolicy.from_config(cfg.services) if cfg is not None else RetryPolicy()


def token_for(cfg: RunConfig | None, token: str | None) -> str | None:
    if token is not None or cfg is None or cfg.services.api_token is None:
        return token
    return cfg.services.api_token.get_secret_value()


_MSGPACK = {"Content-Type": MSGPACK_MEDIA_TYPE, "Accept": MSGPACK_MEDIA_TYPE}


def parse_reply(model: type, response: Any) -> Any:
    return decode_model(model, response.content, "msgpack" in response.headers.get("content-type", ""))


class RolloutClient:
    """Blocking client of one replica (or several: each retry goes to the next)."""

    def __init__(
        self, base_urls: str | Sequence[str], *, token: str | None = None, policy: RetryPolicy | None = None
    ):
        self.http = ServiceClient(base_urls, policy, token=token)

    @classmethod
    def from_config(cls, cfg: RunConfig, base_urls: str | Sequence[str] | None = None) -> RolloutClient:
        return cls(
            base_urls or discover_replicas(cfg), token=token_for(cfg, None), policy=policy_for(cfg, None)
        )

    def generate(self, request: GenerateRequest) -> GenerateResponse:
        reply = self.http.request(
            "POST", GENERATE_PATH, phase="generate", content=encode_model(request, True), headers=_MSGPACK
        )
        return parse_reply(GenerateResponse, reply)

    def rollouts(self, request: RolloutRequest) -> RolloutResponse:
        reply = self.http.request(
            "POST", ROLLOUT_PATH, phase="rollout", content=encode_model(request, True), headers=_MSGPACK
        )
        return parse_reply(RolloutResponse, reply)

    def version(self) -> WeightVersion:
        return parse_reply(
            WeightVersion, self.http.request("GET", VERSION_PATH, phase="weight version check")
        )

    def sleep(self, level: int = 1) -> EngineState:
        """Put the engine to sleep (frees its GPU memory); 409 from a replica without rollout.sleep_mode."""
        body = SleepRequest(level=level).model_dump(mode="json")
        return parse_reply(
            EngineState, self.http.request("POST", SLEEP_PATH, phase="engine sleep", json=body)
        )

    def wake(self) -> EngineState:
        """Wake the engine (its GPU memory back, the weights it slept with)."""
        return parse_reply(EngineState, self.http.request("POST", WAKE_PATH, phase="engine wake"))

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> RolloutClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
