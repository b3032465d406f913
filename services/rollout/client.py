"""Typed clients of the rollout replicas, for the trainer, `rpo cache init` and `rpo eval`.

- `discover_replicas(cfg)`: the replicas' base URLs, from `services.rollout_urls` or, with
  `services.rollout_discovery: dns://host:port`, every address `host` resolves to (call it before each step);
- `RolloutClient` / `AsyncRolloutClient`: generate, rollouts, version, on the one retry policy
  (`services.http_client`: transport errors and 5xx retried, 4xx never);
- `push_weights` / `push_to_all`: one streamed safetensors body per replica and version, sent to the port
  of the replica's weight data plane (metadata announced once in its header, XXH3-128 in
  `X-Content-XXH3-128`); the tensors are read in place, never copied into one body; `push_to_all` pushes
  every replica concurrently from the same tensors and raises `WeightPushError`
  naming each failed replica and the phase (connect, upload, validate, apply);
- `NcclReplicaGroup`: vLLM's own NCCL weight transfer to replicas started with `rollout.weight_transfer:
  nccl` (GPU only; not exercised by CI).
"""

from __future__ import annotations

import ipaddress
import json
import math
import socket
import struct
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx
import xxhash

from services.http_client import (
    AsyncServiceClient,
    RetryPolicy,
    ServiceCallError,
    ServiceClient,
    ServiceHTTPError,
)
from services.schemas.common import MSGPACK_MEDIA_TYPE, decode_model, encode_model
from services.schemas.rollout import (
    CHECKSUM_HEADER,
    WEIGHTS_MEDIA_TYPE,
    GenerateRequest,
    GenerateResponse,
    RolloutRequest,
    RolloutResponse,
    WeightPushResponse,
    WeightVersion,
)

if TYPE_CHECKING:
    import torch

    from services.config import RunConfig

GENERATE_PATH = "/v1/generate"
ROLLOUT_PATH = "/v1/rollouts"
VERSION_PATH = "/v1/weights/version"
UPLOAD_CHUNK_BYTES = 2**20
"""Pieces a push body is sent in: httpx copies each piece once (h11), and pieces of a few MiB or less keep
it at raw-socket speed on loopback (16 MiB pieces were 3x slower)."""


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


def _policy(cfg: RunConfig | None, policy: RetryPolicy | None) -> RetryPolicy:
    if policy is not None:
        return policy
    return RetryPolicy.from_config(cfg.services) if cfg is not None else RetryPolicy()


def _token(cfg: RunConfig | None, token: str | None) -> str | None:
    if token is not None or cfg is None or cfg.services.api_token is None:
        return token
    return cfg.services.api_token.get_secret_value()


_MSGPACK = {"Content-Type": MSGPACK_MEDIA_TYPE, "Accept": MSGPACK_MEDIA_TYPE}


def _parse(model: type, response: Any) -> Any:
    return decode_model(model, response.content, "msgpack" in response.headers.get("content-type", ""))


class RolloutClient:
    """Blocking client of one replica (or several: each retry goes to the next)."""

    def __init__(
        self, base_urls: str | Sequence[str], *, token: str | None = None, policy: RetryPolicy | None = None
    ):
        self.http = ServiceClient(base_urls, policy, token=token)

    @classmethod
    def from_config(cls, cfg: RunConfig, base_urls: str | Sequence[str] | None = None) -> RolloutClient:
        return cls(base_urls or discover_replicas(cfg), token=_token(cfg, None), policy=_policy(cfg, None))

    def generate(self, request: GenerateRequest) -> GenerateResponse:
        reply = self.http.request(
            "POST", GENERATE_PATH, phase="generate", content=encode_model(request, True), headers=_MSGPACK
        )
        return _parse(GenerateResponse, reply)

    def rollouts(self, request: RolloutRequest) -> RolloutResponse:
        reply = self.http.request(
            "POST", ROLLOUT_PATH, phase="rollout", content=encode_model(request, True), headers=_MSGPACK
        )
        return _parse(RolloutResponse, reply)

    def version(self) -> WeightVersion:
        return _parse(WeightVersion, self.http.request("GET", VERSION_PATH, phase="weight version check"))

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> RolloutClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncRolloutClient:
    """Async twin of RolloutClient."""

    def __init__(
        self, base_urls: str | Sequence[str], *, token: str | None = None, policy: RetryPolicy | None = None
    ):
        self.http = AsyncServiceClient(base_urls, policy, token=token)

    async def generate(self, request: GenerateRequest) -> GenerateResponse:
        reply = await self.http.request(
            "POST", GENERATE_PATH, phase="generate", content=encode_model(request, True), headers=_MSGPACK
        )
        return _parse(GenerateResponse, reply)

    async def rollouts(self, request: RolloutRequest) -> RolloutResponse:
        reply = await self.http.request(
            "POST", ROLLOUT_PATH, phase="rollout", content=encode_model(request, True), headers=_MSGPACK
        )
        return _parse(RolloutResponse, reply)

    async def version(self) -> WeightVersion:
        return _parse(
            WeightVersion, await self.http.request("GET", VERSION_PATH, phase="weight version check")
        )

    async def aclose(self) -> None:
        await self.http.aclose()

    async def __aenter__(self) -> AsyncRolloutClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


# ---------------------------------------------------------------------------------------------------------
# Weight pushes over HTTP

_ST_DTYPES = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint8": "U8",
    "bool": "BOOL",
    "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2",
}


def _st_dtype(tensor: torch.Tensor) -> str:
    name = str(tensor.dtype).removeprefix("torch.")
    if name not in _ST_DTYPES:
        raise ValueError(f"dtype {tensor.dtype} cannot travel in a safetensors body")
    return _ST_DTYPES[name]


def _torch_dtype(code: str) -> torch.dtype:
    import torch

    names = {v: k for k, v in _ST_DTYPES.items()}
    return getattr(torch, names[code])


def materialize(
    weights: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
) -> list[tuple[str, Any]]:
    """(name, contiguous CPU tensor) pairs, consuming an iterator once; CPU tensors are not copied."""
    items = weights.items() if isinstance(weights, Mapping) else weights
    out, seen = [], set()
    for name, tensor in items:
        if name in seen:
            raise ValueError(f"tensor {name!r} appears twice in the weights to push")
        seen.add(name)
        t = tensor.detach()
        if t.device.type != "cpu":
            t = t.to("cpu")
        out.append((name, t.contiguous()))
    if not out:
        raise ValueError("no tensors to push")
    return out


def _byte_view(tensor: Any) -> memoryview:
    import torch

    flat = tensor.reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


class SafetensorsBody:
    """One safetensors file, never assembled: the header, then each tensor's bytes read in place.

    `checksum` is the XXH3-128 of the whole body (one pass over the tensors, a few ms per 100 MB)."""

    def __init__(self, tensors: list[tuple[str, Any]], metadata: Mapping[str, str] | None = None):
        header: dict[str, Any] = {"__metadata__": {"format": "pt", **(metadata or {})}}
        offset = 0
        self.views: list[memoryview] = []
        for name, tensor in tensors:
            view = _byte_view(tensor)
            header[name] = {
                "dtype": _st_dtype(tensor),
                "shape": list(tensor.shape),
                "data_offsets": [offset, offset + len(view)],
            }
            offset += len(view)
            self.views.append(view)
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the format aligns the data to 8 bytes
        self.prefix = struct.pack("<Q", len(raw)) + raw
        self.length = len(self.prefix) + offset
        self.tensors = len(tensors)
        hasher = xxhash.xxh3_128(self.prefix)
        for view in self.views:
            hasher.update(view)
        self.checksum = hasher.hexdigest()

    def pieces(self, chunk_bytes: int = UPLOAD_CHUNK_BYTES) -> Iterator[memoryview | bytes]:
        yield self.prefix
        for view in self.views:
            for start in range(0, len(view), chunk_bytes):
                yield view[start : start + chunk_bytes]


class _Upload:
    """A re-iterable request body (the retry policy may send it again) that records how far it got."""

    def __init__(self, body: SafetensorsBody):
        self.body = body
        self.sent = 0

    def __iter__(self) -> Iterator[memoryview | bytes]:
        self.sent = 0
        for piece in self.body.pieces():
            yield piece
            self.sent += len(piece)


class WeightPushError(RuntimeError):
    """A push failed on one or more replicas; `failures` maps each replica URL to (phase, message)."""

    def __init__(self, version: int, failures: dict[str, tuple[str, str]], succeeded: Sequence[str] = ()):
        lines = [f"{url} [{phase}]: {message}" for url, (phase, message) in failures.items()]
        done = f"; {len(succeeded)} other replica(s) serve it" if succeeded else ""
        super().__init__(
            f"weight push of version {version} failed on {len(failures)} replica(s){done}:\n  "
            + "\n  ".join(lines)
        )
        self.version = version
        self.failures = failures
        self.succeeded = list(succeeded)


class _PhaseError(Exception):
    def __init__(self, phase: str, message: str):
        super().__init__(message)
        self.phase = phase


@dataclass
class PushResult:
    url: str
    policy_version: int
    seconds: float
    reply: WeightPushResponse | None = None
    """None when the replica already served this version (a retried push)."""


def _push_policy(policy: RetryPolicy, timeout_seconds: float) -> RetryPolicy:
    return RetryPolicy(
        connect_timeout_seconds=policy.connect_timeout_seconds,
        read_timeout_seconds=timeout_seconds,
        max_attempts=policy.max_attempts,
        max_total_seconds=timeout_seconds,
        backoff_seconds=policy.backoff_seconds,
    )


def _version_of(client: ServiceClient, phase: str) -> WeightVersion:
    return _parse(WeightVersion, client.request("GET", VERSION_PATH, phase=phase))


def weight_plane_url(replica_url: str, serving: WeightVersion) -> str:
    """Where a replica takes pushes: its host, the weight port it announced."""
    if serving.weight_port is None:
        raise _PhaseError("connect", "the replica announces no weight port (is it still starting?)")
    url = httpx.URL(replica_url)
    return str(url.copy_with(port=serving.weight_port, path="/", query=None)).rstrip("/")


def _send(
    client: ServiceClient, data: ServiceClient, url: str, version: int, body: SafetensorsBody, started: float
) -> PushResult:
    """PUT the body to the replica's weight port (`data`); `client` (its API) answers a version check."""
    upload = _Upload(body)
    try:
        reply = data.request(
            "PUT",
            f"/v1/weights/{version}",
            phase=f"weight push v{version}",
            content=upload,
            headers={
                "Content-Type": WEIGHTS_MEDIA_TYPE,
                "Content-Length": str(body.length),
                CHECKSUM_HEADER: body.checksum,
            },
        )
    except ServiceHTTPError as exc:
        if exc.status == 409:  # a retried push the replica already applied is a success
            served = _version_of(client, "weight version check").policy_version
            if served == version:
                return PushResult(url, version, time.monotonic() - started)
        phase = "upload" if exc.status == 413 else "validate"
        raise _PhaseError(phase, f"{exc.status} {exc.error_type}: {exc.detail}") from None
    except ServiceCallError as exc:
        if exc.status is not None:  # 5xx after the retries: the replica failed to apply
            phase = "apply"
        elif "Connect" in str(exc) and upload.sent == 0:
            phase = "connect"
        else:
            phase = "upload" if upload.sent < body.length else "apply"
        raise _PhaseError(phase, str(exc)) from None
    parsed = _parse(WeightPushResponse, reply)
    return PushResult(url, parsed.policy_version, time.monotonic() - started, parsed)


_PREPARE_LOCK = threading.Lock()


def _prepare(
    tensors: list[tuple[str, Any]], dtype: str | None, cache: dict[str | None, SafetensorsBody], version: int
):
    key = dtype
    with _PREPARE_LOCK:
        if key in cache:
            return cache[key]
        if dtype is None:
            cast = tensors
        else:
            target = _torch_dtype(dtype)
            cast = [
                (n, t.to(target) if t.is_floating_point() and t.dtype != target else t) for n, t in tensors
            ]
        cache[key] = SafetensorsBody(cast, {"rpo_policy_version": str(version)})
    return cache[key]


def push_to_all(
    urls: Sequence[str],
    version: int,
    weights: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
    *,
    cfg: RunConfig | None = None,
    token: str | None = None,
    policy: RetryPolicy | None = None,
    timeout_seconds: float = 600.0,
    dtype: str | None = "auto",
) -> dict[str, PushResult]:
    """Push `weights` as `version` to every replica at once; return when each serves it.

    `weights`: (HF name, tensor) pairs or a mapping, consumed once (a lazy ZeRO-3 gather is fine).
    Each replica is asked its version first: one that already serves `version` is left alone (so the
    trainer can push to every replica, lagging or not). `dtype`: "auto" casts floating tensors to the dtype
    each replica serves, None sends them as they are, or a safetensors code ("BF16"). Raises
    WeightPushError naming every replica that failed and the phase: connect, upload, validate (4xx: nothing
    changed there) or apply.
    """
    if not urls:
        raise ValueError("no replica to push to")
    tensors = materialize(weights)
    base = _push_policy(_policy(cfg, policy), timeout_seconds)
    secret = _token(cfg, token)
    bodies: dict[str | None, SafetensorsBody] = {}
    clients = {url: ServiceClient(url, base, token=secret) for url in urls}

    def one(url: str) -> PushResult:
        client, started = clients[url], time.monotonic()
        try:
            serving = _version_of(client, "weight push: connect")
        except ServiceCallError as exc:
            raise _PhaseError("connect", str(exc)) from None
        if serving.policy_version == version:  # a retried or catch-up push it already applied
            return PushResult(url, version, time.monotonic() - started)
        wanted = serving.dtype if dtype == "auto" else dtype
        body = _prepare(tensors, wanted, bodies, version)
        data = ServiceClient(weight_plane_url(url, serving), base, token=secret)
        try:
            result = _send(client, data, url, version, body, started)  # answers once the version serves
        finally:
            data.close()
        if result.policy_version != version:
            raise _PhaseError(
                "apply", f"the push returned but the replica serves version {result.policy_version}"
            )
        return result

    try:
        # Bodies are prepared (hashed, maybe cast) once per dtype; the first replica asking builds it.
        if dtype != "auto":
            _prepare(tensors, dtype, bodies, version)
        results: dict[str, PushResult] = {}
        failures: dict[str, tuple[str, str]] = {}
        with ThreadPoolExecutor(max_workers=len(urls)) as pool:
            futures = {url: pool.submit(one, url) for url in urls}
            for url, future in futures.items():
                try:
                    results[url] = future.result()
                except _PhaseError as exc:
                    failures[url] = (exc.phase, str(exc))
                except ServiceCallError as exc:
                    failures[url] = ("apply", str(exc))
        if failures:
            raise WeightPushError(version, failures, sorted(results))
        return results
    finally:
        for client in clients.values():
            client.close()


def push_weights(
    base_url: str,
    weights: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
    version: int,
    *,
    cfg: RunConfig | None = None,
    token: str | None = None,
    policy: RetryPolicy | None = None,
    timeout_seconds: float = 600.0,
    dtype: str | None = "auto",
) -> PushResult:
    """Push `weights` as `version` to one replica (see push_to_all)."""
    return push_to_all(
        [base_url],
        version,
        weights,
        cfg=cfg,
        token=token,
        policy=policy,
        timeout_seconds=timeout_seconds,
        dtype=dtype,
    )[base_url]


# ---------------------------------------------------------------------------------------------------------
# NCCL data plane (GPU): vLLM's trainer-side engine drives these replicas' control routes


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
        from vllm.distributed.weight_transfer.base import ModuleSource, WeightSource
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


def model_bytes(tensors: Sequence[tuple[str, Any]]) -> int:
    """Bytes of (name, tensor) pairs."""
    return sum(math.prod(t.shape) * t.element_size() for _, t in tensors)
