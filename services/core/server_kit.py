"""What every FastAPI service of this project shares; `install_common(app, ...)` wires it all in.

Guarantees:
- one error shape, `{"error": {"type", "message", "field"}}`, for every failure: bad input is 422 naming the
  field path; domain errors (services.core.errors) map to their status, 503 with Retry-After; anything
  unexpected is a logged 500 whose body never carries a traceback;
- request bodies over `max_body_bytes` get 413, counted while reading (Content-Length is checked first but
  not trusted alone);
- mutating routes take `Depends(require_token)`: 401 unless the bearer token matches (constant-time); the
  token is never logged;
- `/healthz`, `/readyz` (a readiness callable), `/metrics` (the service's own registry), and a latency
  histogram per route template (never per id); bodies in JSON or msgpack via `typed_body`/`typed_response`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import secrets
import signal
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import uvicorn
from fastapi import Depends, FastAPI, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from pydantic import BaseModel, SecretStr, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.core.errors import ServiceError, Unauthorized
from services.core.schemas.common import (
    JSON_MEDIA_TYPE,
    MSGPACK_MEDIA_TYPE,
    ErrorResponse,
    HealthResponse,
    decode_model,
    encode_model,
    is_msgpack,
)

log = logging.getLogger("rpo.http")

LATENCY_BUCKETS_SECONDS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    300,
)
_LOC_SOURCES = {"body", "query", "path", "header", "cookie"}
_UNION_BRANCH_TAGS = {"int", "float", "str", "bool", "bytes", "none"}
_STATUS_TYPES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    503: "unavailable",
}

Readiness = Callable[[], Awaitable[None]]
"""Raises a ServiceError (usually `Unavailable`) when a dependency is not reachable; returns otherwise."""


# ---------------------------------------------------------------------------------------------------------
# Error shape


def error_response(
    status: int, type_: str, message: str, field: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    body = ErrorResponse.model_validate({"error": {"type": type_, "message": message, "field": field}})
    return JSONResponse(body.model_dump(mode="json"), status_code=status, headers=headers)


def _field_path(loc: tuple[Any, ...]) -> str | None:
    parts = list(loc)
    if parts and parts[0] in _LOC_SOURCES:
        parts = parts[1:]
    kept = [
        str(p)
        for p in parts
        if isinstance(p, int) or (str(p).isidentifier() and str(p) not in _UNION_BRANCH_TAGS)
    ]
    return ".".join(kept) or None


def _validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    by_field: dict[str, list[str]] = {}
    for err in errors:
        field = _field_path(tuple(err.get("loc", ())))
        msg = str(err.get("msg", "invalid value"))
        if err.get("type") == "extra_forbidden":
            msg = "unknown field"
        by_field.setdefault(field or "body", []).append(msg)
    parts = [f"{field}: {' or '.join(dict.fromkeys(msgs))}" for field, msgs in list(by_field.items())[:5]]
    if len(by_field) > 5:
        parts.append(f"... and {len(by_field) - 5} more fields")
    first = next(iter(by_field))
    return "; ".join(parts), (None if first == "body" else first)


async def _on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    message, field = _validation_message(list(exc.errors()))
    return error_response(422, "validation_error", message, field)


def error_headers(exc: ServiceError) -> dict[str, str]:
    """The headers an error answer carries: Retry-After when the caller may retry, the auth scheme on 401."""
    headers = {}
    if exc.retry_after_seconds is not None:
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after_seconds)))
    if exc.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return headers


async def _on_service_error(request: Request, exc: ServiceError) -> JSONResponse:
    if exc.status >= 500:
        log.warning("%s %s -> %d: %s", request.method, request.url.path, exc.status, exc.message)
    return error_response(exc.status, exc.type, exc.message, exc.field, error_headers(exc) or None)


async def _on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    type_ = _STATUS_TYPES.get(exc.status_code, "http_error")
    return error_response(exc.status_code, type_, str(exc.detail), None, getattr(exc, "headers", None))


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(ServiceError, _on_service_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)


# ---------------------------------------------------------------------------------------------------------
# Auth


MISSING_TOKEN = "missing or wrong bearer token (Authorization: Bearer <RPO_API_TOKEN>)"


def bearer_token_ok(authorization: str | None, expected: SecretStr | None) -> bool:
    """Whether an `Authorization` header carries the configured token (always, when none is configured);
    compared in constant time."""
    if expected is None:
        return True
    scheme, _, given = (authorization or "").partition(" ")
    return scheme.lower() == "bearer" and secrets.compare_digest(
        given.strip().encode(), expected.get_secret_value().encode()
    )


async def require_token(request: Request) -> None:
    """Dependency of mutating routes: 401 unless `Authorization: Bearer <token>` matches the configured token.

    No token configured (`app.state.rpo_api_token is None`) lets every request through.
    """
    if not bearer_token_ok(
        request.headers.get("authorization"), getattr(request.app.state, "rpo_api_token", None)
    ):
        raise Unauthorized(MISSING_TOKEN)


RequireToken = Depends(require_token)


# ---------------------------------------------------------------------------------------------------------
# Typed bodies in JSON or msgpack

_BODY_MODELS: dict[str, type[BaseModel]] = {}


def typed_body(model: type[BaseModel]) -> Any:
    """`Depends` that reads the body (JSON, or msgpack when Content-Type says so) into `model`; errors
    become 422 naming the field. Pair the route with `openapi_extra=body_openapi(model)`."""

    async def read_body(request: Request) -> BaseModel:
        content_type = request.headers.get("content-type", JSON_MEDIA_TYPE)
        msgpack_body = is_msgpack(content_type)
        if not msgpack_body and "json" not in content_type.lower():
            raise HTTPException(415, f"send {JSON_MEDIA_TYPE} or {MSGPACK_MEDIA_TYPE}, not {content_type}")
        body = await request.body()
        try:
            return decode_model(model, body, msgpack_body)
        except ValidationError as exc:
            errors = exc.errors(include_url=False, include_input=False, include_context=False)
            raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in errors]) from None
        except ValueError as exc:
            raise RequestValidationError(
                [{"type": "value_error", "loc": ("body",), "msg": str(exc)}]
            ) from None

    return Depends(read_body)


def body_openapi(model: type[BaseModel]) -> dict[str, Any]:
    """The `openapi_extra` that documents a `typed_body(model)` request body."""
    _BODY_MODELS[model.__name__] = model
    ref = {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}
    return {"requestBody": {"required": True, "content": {JSON_MEDIA_TYPE: ref, MSGPACK_MEDIA_TYPE: ref}}}


def typed_response(request: Request, model: BaseModel, status_code: int = 200) -> Response:
    """`model` as msgpack when the request's Accept names it, else JSON."""
    msgpack_body = is_msgpack(request.headers.get("accept"))
    media_type = MSGPACK_MEDIA_TYPE if msgpack_body else JSON_MEDIA_TYPE
    return Response(encode_model(model, msgpack_body), status_code=status_code, media_type=media_type)


def _install_openapi(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        paths_text = repr(schema.get("paths", {}))
        for name, model in _BODY_MODELS.items():
            if f"#/components/schemas/{name}" not in paths_text:
                continue
            model_schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            for def_name, definition in model_schema.pop("$defs", {}).items():
                components.setdefault(def_name, definition)
            components.setdefault(name, model_schema)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


# ---------------------------------------------------------------------------------------------------------
# Metrics, body limit and last-resort error handling (one pure ASGI middleware)


class HttpMetrics:
    """Per-route latency and request counts, in the service's own registry."""

    def __init__(self, registry: CollectorRegistry):
        self.duration = Histogram(
            "rpo_http_request_duration_seconds",
            "Time to answer an HTTP request, by route template",
            ["endpoint", "method"],
            buckets=LATENCY_BUCKETS_SECONDS,
            registry=registry,
        )
        self.requests = Counter(
            "rpo_http_requests",
            "HTTP requests answered, by route template and status code",
            ["endpoint", "method", "code"],
            registry=registry,
        )


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int):
        super().__init__(413, f"request body is larger than the limit of {limit} bytes")


class _ServiceMiddleware:
    def __init__(self, app: ASGIApp, metrics: HttpMetrics, max_body_bytes: int):
        self.app = app
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = [500, False]  # status code, response started
        limit = self.max_body_bytes

        async def tracking_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0], status[1] = message["status"], True
            await send(message)

        try:
            declared = _content_length(scope)
            if declared is not None and declared > limit:
                await _send_error(tracking_send, 413, "payload_too_large", BodyTooLarge(limit).detail)
                return
            received = 0

            async def limited_receive() -> Message:
                nonlocal received
                message = await receive()
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > limit:
                        raise BodyTooLarge(limit)
                return message

            await self.app(scope, limited_receive, tracking_send)
        except Exception:
            log.exception("unhandled error answering %s %s", scope.get("method"), _endpoint(scope))
            if not status[1]:
                await _send_error(tracking_send, 500, "internal_error", "internal server error (logged)")
        finally:
            endpoint, method = _endpoint(scope), scope.get("method", "")
            self.metrics.duration.labels(endpoint, method).observe(time.perf_counter() - start)
            self.metrics.requests.labels(endpoint, method, str(status[0])).inc()


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _endpoint(scope: Scope) -> str:
    route = scope.get("route")
    return getattr(route, "path", None) or "unmatched"


async def _send_error(send: Send, status: int, type_: str, message: str) -> None:
    response = error_response(status, type_, message)
    await send({"type": "http.response.start", "status": status, "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body})


# ---------------------------------------------------------------------------------------------------------
# Wiring


def install_common(
    app: FastAPI,
    *,
    registry: CollectorRegistry,
    readiness: Readiness,
    api_token: SecretStr | None,
    max_body_bytes: int,
    before_metrics: Callable[[], Awaitable[None]] | None = None,
) -> HttpMetrics:
    """Error handlers, auth token, body limit, latency metrics, /healthz, /readyz, /metrics, OpenAPI bodies."""
    app.state.rpo_api_token = api_token if api_token is not None and api_token.get_secret_value() else None
    install_error_handlers(app)
    metrics = HttpMetrics(registry)
    app.add_middleware(_ServiceMiddleware, metrics=metrics, max_body_bytes=max_body_bytes)
    _install_openapi(app)

    @app.get("/healthz", response_model=HealthResponse, tags=["health"])
    async def healthz() -> HealthResponse:
        """Liveness: the process answers."""
        return HealthResponse(status="ok")

    @app.get(
        "/readyz",
        response_model=HealthResponse,
        tags=["health"],
        responses={503: {"model": ErrorResponse, "description": "a dependency is not reachable"}},
    )
    async def readyz() -> HealthResponse:
        """Readiness: the service's dependencies answer (503 with Retry-After otherwise)."""
        await readiness()
        return HealthResponse(status="ready")

    @app.get("/metrics", tags=["health"], response_class=Response)
    async def metrics_endpoint() -> Response:
        """Prometheus text exposition of this service's registry."""
        if before_metrics is not None:
            try:
                await before_metrics()
            except Exception as exc:  # a scrape must not fail because a refresh did
                log.debug("metrics refresh failed: %s", exc)
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return metrics


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "missing or wrong bearer token"},
    413: {"model": ErrorResponse, "description": "request body too large"},
    422: {"model": ErrorResponse, "description": "bad input; `field` names it"},
    503: {"model": ErrorResponse, "description": "a dependency is down; retry after Retry-After seconds"},
}
"""`responses=` for routes, so the OpenAPI document shows the one error shape."""


# ---------------------------------------------------------------------------------------------------------
# Running


def _uvicorn_config(app: FastAPI, graceful_shutdown_seconds: float, **kwargs: Any) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        log_config=None,
        access_log=False,
        lifespan="on",
        server_header=False,
        timeout_graceful_shutdown=int(max(1, graceful_shutdown_seconds)),
        **kwargs,
    )


def bind_listener(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port (IPv6 when the host has a colon), for uvicorn's `sockets=`."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError:
        sock.close()
        raise
    return sock


def run_uvicorn(app: FastAPI, host: str, port: int, *, graceful_shutdown_seconds: float = 10.0) -> None:
    """Serve `app` until SIGINT/SIGTERM, then finish in-flight requests (up to the grace period) and run the
    lifespan's shutdown. A SIGTERM ends in SystemExit(0) once uvicorn is done, so callers' `finally`/`with`
    blocks (e.g. an embedded Redis) still run; SIGINT ends in KeyboardInterrupt as usual.

    The port is bound BEFORE the lifespan starts: uvicorn would bind it only after start-up, and a start-up
    that takes free ports of its own (vLLM's engine does) could take the very port this server was given.
    """

    def _exit_on_term(signum: int, frame: Any) -> None:
        raise SystemExit(0)

    try:
        sock = bind_listener(host, port)
    except OSError as exc:
        logging.getLogger("rpo.server").error("cannot listen on %s:%d: %s", host, port, exc.strerror or exc)
        raise SystemExit(1) from None
    previous = signal.signal(signal.SIGTERM, _exit_on_term)
    try:
        uvicorn.Server(_uvicorn_config(app, graceful_shutdown_seconds)).run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, previous)
        sock.close()


@contextlib.contextmanager
def serve_in_thread(
    app: FastAPI, host: str = "127.0.0.1", port: int = 0, *, start_timeout_seconds: float = 30.0
) -> Iterator[str]:
    """Serve `app` under uvicorn in a background thread (its own event loop); yields the base URL.

    For tests and for a process that hosts a service beside other work. Port 0 picks a free port (the socket
    is bound before the server starts, so there is no race).
    """
    sock = bind_listener(host, port)
    server = uvicorn.Server(_uvicorn_config(app, 5.0))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout_seconds
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            where = f"{host}:{sock.getsockname()[1]}"
            sock.close()
            raise RuntimeError(f"server on {where} did not start within {start_timeout_seconds} s")
        time.sleep(0.01)
    try:
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=start_timeout_seconds)
        sock.close()
