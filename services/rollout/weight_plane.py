"""The replica's weight data plane: `PUT /v1/weights/{version}` on a port of its own.

Why not a route of the FastAPI app: an ASGI server hands a request body to the app in small pieces through
the event loop (about 0.5 GB/s here, several times slower than the socket), and a weight push is the one
request that is hundreds of megabytes to gigabytes. This listener is a plain threaded HTTP/1.1 server: a
push's body goes from the socket straight into the spool file with `readinto`, hashed piece by piece as it
lands, so a push runs at about the speed of a loopback copy (docs/benchmarks.md). Everything else a push
means (the version check, one push at a time, the atomic apply) stays in the `WeightUpdater` on the event
loop; this thread only parses the request, reads the body when the updater asks for it, and answers.

Errors have the API's shape (`{"error": {"type", "message", "field"}}`) and status codes: 401 without the
bearer token, 411 without Content-Length, 413 over `rollout.max_body_bytes`, 415 for another media type,
409 for a stale version, 422 naming the field or tensor, 503 (with Retry-After) when the apply failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from pydantic import SecretStr

from services.core.errors import (
    LengthRequired,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    ServiceError,
    Unauthorized,
    UnsupportedMediaType,
)
from services.core.schemas.common import ErrorResponse
from services.core.schemas.rollout import CHECKSUM_HEADER, WEIGHTS_MEDIA_TYPE, WeightPushResponse
from services.core.server_kit import MISSING_TOKEN, bearer_token_ok, error_headers
from services.rollout.metrics import RolloutMetrics
from services.rollout.weight_receive import PushBody
from services.rollout.weight_updater import WeightUpdater

log = logging.getLogger("rpo.rollout.weights")

PUSH_PATH = re.compile(r"^/v1/weights/(\d{1,18})$")
IDLE_TIMEOUT_SECONDS = 120.0
"""A push whose sender sends nothing for this long is dropped (the socket read times out)."""


class WeightPlane:
    """Serves weight pushes for one replica on `host:port` (0: a free port) from a thread of its own."""

    def __init__(
        self,
        updater: WeightUpdater,
        metrics: RolloutMetrics,
        replica: str,
        *,
        loop: asyncio.AbstractEventLoop,
        host: str,
        port: int,
        api_token: SecretStr | None,
        max_body_bytes: int,
    ):
        self.updater = updater
        self.metrics = metrics
        self.replica = replica
        self.loop = loop
        self.api_token = api_token
        self.max_body_bytes = max_body_bytes
        handler = type("WeightPushHandler", (_Handler,), {"plane": self})
        server_class = _Server6 if ":" in host else _Server
        self.server = server_class((host, port), handler)
        self.server.daemon_threads = True
        self.port: int = self.server.server_address[1]
        self._thread = threading.Thread(
            target=self.server.serve_forever, name="rpo-weight-plane", daemon=True
        )

    def start(self) -> WeightPlane:
        self._thread.start()
        return self

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=10)

    # -- one push ------------------------------------------------------------------------------------------
    def push(self, version: int, body: PushBody, checksum: str | None) -> WeightPushResponse:
        """Run the updater's push on the event loop (it reads `body` in a worker thread) and wait for it."""
        started = time.perf_counter()
        future = asyncio.run_coroutine_threadsafe(self.updater.push(version, body, checksum), self.loop)
        pushed = future.result()
        self.metrics.weight_pushes.labels("applied").inc()
        self.metrics.weight_push_bytes.inc(pushed.bytes)
        self.metrics.weight_sync_seconds.observe(time.perf_counter() - started)
        self.metrics.weight_apply_seconds.observe(pushed.apply_seconds)
        log.info(
            "serving policy version %d: %d tensors, %.1f MB received in %.2f s, applied in %.2f s",
            pushed.version,
            pushed.tensors,
            pushed.bytes / 2**20,
            pushed.receive_seconds,
            pushed.apply_seconds,
            extra={"replica": self.replica, "policy_version": pushed.version},
        )
        return WeightPushResponse(
            policy_version=pushed.version,
            replica=self.replica,
            tensors=pushed.tensors,
            bytes=pushed.bytes,
            receive_seconds=pushed.receive_seconds,
            apply_seconds=pushed.apply_seconds,
        )


class _Server(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        """A pusher that went away mid-answer is one log line, not a traceback on stderr."""
        exc = sys.exc_info()[1]
        log.warning("weight push from %s ended early: %s: %s", client_address[0], type(exc).__name__, exc)


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    plane: WeightPlane
    protocol_version = "HTTP/1.1"
    timeout = IDLE_TIMEOUT_SECONDS
    server_version = "rpo-weight-plane"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        log.debug("%s %s", self.address_string(), format % args)

    def do_PUT(self) -> None:  # noqa: N802 - http.server's naming
        body: PushBody | None = None
        try:
            version = self._version()
            body = self._body()
            content_type = self.headers.get("Content-Type", "")
            if content_type.split(";")[0].strip().lower() != WEIGHTS_MEDIA_TYPE:
                raise UnsupportedMediaType(
                    f"send the safetensors body as {WEIGHTS_MEDIA_TYPE}, not {content_type!r}",
                    field="Content-Type",
                )
            reply = self.plane.push(version, body, self.headers.get(CHECKSUM_HEADER))
        except ServiceError as exc:
            self.plane.metrics.weight_pushes.labels("failed" if exc.status >= 500 else "rejected").inc()
            if exc.status >= 500:
                log.warning("push of %s -> %d: %s", self.path, exc.status, exc.message)
            if body is not None and body.consumed == 0 and exc.status < 500:
                with contextlib.suppress(Exception):  # refused on its headers: read the body, then answer
                    body.discard()
            self._error(exc, complete=body is not None and body.consumed == body.length)
            return
        except Exception as exc:  # the thread must answer, whatever happened
            self.plane.metrics.weight_pushes.labels("failed").inc()
            log.exception("push of %s failed", self.path)
            self._error(ServiceError(f"{type(exc).__name__}: {exc}"), complete=False)
            return
        self._send(200, reply.model_dump_json().encode(), {})

    def do_GET(self) -> None:  # noqa: N802
        self._error(MethodNotAllowed("the weight port takes PUT /v1/weights/{version} only"), complete=False)

    do_POST = do_DELETE = do_PATCH = do_GET  # noqa: N815

    def _version(self) -> int:
        """The version a push names; checks path and token before any body byte is read."""
        match = PUSH_PATH.match(self.path.split("?", 1)[0])
        if match is None:
            raise NotFound(f"no such path {self.path!r} on the weight port: PUT /v1/weights/{{version}}")
        if not bearer_token_ok(self.headers.get("Authorization"), self.plane.api_token):
            raise Unauthorized(MISSING_TOKEN)
        return int(match.group(1))

    def _body(self) -> PushBody:
        """The body, once its Content-Length is known and within `rollout.max_body_bytes`."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise LengthRequired("send the body with a Content-Length, not chunked", field="Content-Length")
        raw_length = self.headers.get("Content-Length")
        if raw_length is None or not raw_length.strip().isdigit():
            raise LengthRequired(
                f"a push needs a Content-Length header (got {raw_length!r})", field="Content-Length"
            )
        length = int(raw_length)
        if length > self.plane.max_body_bytes:
            raise PayloadTooLarge(
                f"a push of {length} bytes is over this replica's limit of {self.plane.max_body_bytes} "
                "(rollout.max_body_bytes)",
                field="Content-Length",
            )
        return PushBody(self.rfile, length)

    def _error(self, exc: ServiceError, *, complete: bool) -> None:
        """Answer with the API's error shape; close the connection when the body was not read whole."""
        body = ErrorResponse.model_validate(
            {"error": {"type": exc.type, "message": exc.message, "field": exc.field}}
        )
        headers = error_headers(exc)
        if not complete:
            headers["Connection"] = "close"
            self.close_connection = True
        self._send(exc.status, body.model_dump_json().encode(), headers)

    def _send(self, status: int, payload: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(payload)
