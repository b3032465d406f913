"""Weights from the trainer to every rollout replica over HTTP: one streamed safetensors body per replica
and version, sent to the port of the replica's weight data plane (metadata announced once in its header,
XXH3-128 in `X-Content-XXH3-128`). The tensors are read in place, never copied into one body; `push_to_all`
pushes every replica concurrently from the same tensors and raises `WeightPushError` naming each failed
replica and the phase (connect, upload, validate, apply). The receiving side is `services/rollout/`
(`weight_plane.py`, `weight_receive.py`, `weight_updater.py`).
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx
import xxhash

from services.core.clients.rollout import VERSION_PATH, parse_reply, policy_for, token_for
from services.core.http_client import RetryPolicy, ServiceCallError, ServiceClient, ServiceHTTPError
from services.core.schemas.rollout import (
    CHECKSUM_HEADER,
    WEIGHTS_MEDIA_TYPE,
    WeightPushResponse,
    WeightVersion,
)
from services.core.weight_wire import TORCH_DTYPE_CODES, encode_header

if TYPE_CHECKING:
    import torch

    from services.core.config import RunConfig

UPLOAD_CHUNK_BYTES = 2**20
"""Pieces a push body is sent in: httpx copies each piece once (h11), and pieces of a few MiB or less keep
it at raw-socket speed on loopback (16 MiB pieces were 3x slower)."""


def _st_dtype(tensor: torch.Tensor) -> str:
    name = str(tensor.dtype).removeprefix("torch.")
    if name not in TORCH_DTYPE_CODES:
        raise ValueError(f"dtype {tensor.dtype} cannot travel in a safetensors body")
    return TORCH_DTYPE_CODES[name]


def _torch_dtype(code: str) -> torch.dtype:
    # lazy: heavy import (torch); `rpo cache init` and `rpo run` import the trainer's clients without it
    import torch

    names = {v: k for k, v in TORCH_DTYPE_CODES.items()}
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
    # lazy: heavy import (torch), only when a push body is laid out
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
        self.prefix = encode_header(header)
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
    return dataclasses.replace(
        policy, read_timeout_seconds=timeout_seconds, max_total_seconds=timeout_seconds
    )


def _version_of(client: ServiceClient, phase: str) -> WeightVersion:
    return parse_reply(WeightVersion, client.request("GET", VERSION_PATH, phase=phase))


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
        else:  # a transport failure: cut mid-body, or no answer after the whole body (a frozen replica)
            phase = "upload" if upload.sent < body.length else "no answer"
        raise _PhaseError(phase, str(exc)) from None
    parsed = parse_reply(WeightPushResponse, reply)
    return PushResult(url, parsed.policy_version, time.monotonic() - started, parsed)


_PREPARE_LOCK = threading.Lock()


def _prepare(
    tensors: list[tuple[str, Any]],
    dtype: str | None,
    cache: dict[str | None, SafetensorsBody],
    version: int,
    metadata: Mapping[str, str],
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
        cache[key] = SafetensorsBody(cast, {"rpo_policy_version": str(version), **metadata})
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
    metadata: Mapping[str, str] | None = None,
) -> dict[str, PushResult]:
    """Push `weights` as `version` to every replica at once; return when each serves it.

    `weights`: (HF name, tensor) pairs or a mapping, consumed once (a lazy ZeRO-3 gather is fine).
    Each replica is asked its version first: one that already serves `version` is left alone (so the
    trainer can push to every replica, lagging or not). `dtype`: "auto" casts floating tensors to the dtype
    each replica serves, None sends them as they are, or a safetensors code ("BF16"). `metadata`: more
    entries of the body's safetensors metadata (an adapter's LoRA settings, services/core/adapter_wire.py). Raises
    WeightPushError naming every replica that failed and the phase: connect, upload, validate (4xx: nothing
    changed there), apply (the replica answered that it failed) or no answer (the whole body went, no reply
    came within the timeout).
    """
    if not urls:
        raise ValueError("no replica to push to")
    tensors = materialize(weights)
    base = _push_policy(policy_for(cfg, policy), timeout_seconds)
    secret = token_for(cfg, token)
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
        body = _prepare(tensors, wanted, bodies, version, metadata or {})
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
            _prepare(tensors, dtype, bodies, version, metadata or {})
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
    metadata: Mapping[str, str] | None = None,
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
        metadata=metadata,
    )[base_url]


def model_bytes(tensors: Sequence[tuple[str, Any]]) -> int:
    """Bytes of (name, tensor) pairs."""
    return sum(math.prod(t.shape) * t.element_size() for _, t in tensors)
