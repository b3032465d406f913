"""The one retry policy at the client boundary: every call from one of our processes to another goes
through `AsyncServiceClient` or `ServiceClient`.

Guarantees:
- every attempt has a connect and a read timeout (seconds, from the `services` config section), and a call
  with all its retries and back-off never runs past `max_total_seconds`;
- transport errors and 5xx are retried (honouring Retry-After), at most `max_attempts` times, each attempt on
  the next base URL when several are given (replicas); 4xx are never retried and raise `ServiceHTTPError`
  carrying the server's error type, message and field;
- every failure names the URL (so the replica) and the phase of the call;
- a wait is never silent: an attempt without an answer after `notice_after_seconds` logs which URL and
  phase it waits on, and again at that interval until it ends (a frozen replica is named while it hangs).
Elsewhere, errors propagate. The rule is written once (`_Attempts.judge`); the async and blocking clients
only send, and wait the delay it gives.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import functools
import itertools
import logging
import random
import ssl
import threading
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

log = logging.getLogger("rpo.client")


@dataclass(frozen=True)
class RetryPolicy:
    connect_timeout_seconds: float = 5.0
    """TCP connect timeout of one attempt."""
    read_timeout_seconds: float = 600.0
    """Longest wait for the next bytes of a response (and to send a body) in one attempt."""
    max_attempts: int = 3
    """Attempts per call (transport errors and 5xx only)."""
    max_total_seconds: float = 1800.0
    """Bound on one call: all attempts and back-off together."""
    backoff_seconds: float = 0.5
    """First back-off; doubles per retry (with jitter), capped at `backoff_max_seconds`."""
    backoff_max_seconds: float = 10.0
    notice_after_seconds: float = 10.0
    """An attempt still waiting after this long is logged (URL, phase, seconds), then at this interval; 0: never."""

    @classmethod
    def from_config(cls, services: Any) -> RetryPolicy:
        """From the `services` section of the run config."""
        return cls(
            connect_timeout_seconds=services.connect_timeout_seconds,
            read_timeout_seconds=services.request_timeout_seconds,
            max_attempts=services.max_attempts,
            max_total_seconds=services.max_call_seconds,
            backoff_seconds=services.retry_backoff_seconds,
            notice_after_seconds=services.slow_call_notice_seconds,
        )


class ServiceCallError(Exception):
    """A call failed: the last attempt's URL, the phase, how many attempts, and why."""

    def __init__(self, message: str, *, url: str, phase: str, attempts: int, status: int | None = None):
        super().__init__(message)
        self.url = url
        self.phase = phase
        self.attempts = attempts
        self.status = status


class ServiceHTTPError(ServiceCallError):
    """The service refused the request with a 4xx: the request is wrong; retrying would not help."""

    def __init__(
        self, *, url: str, phase: str, attempts: int, status: int, error_type: str, detail: str, field
    ):
        where = f" (field {field})" if field else ""
        super().__init__(
            f"{phase}: {url} answered {status} {error_type}{where}: {detail}",
            url=url,
            phase=phase,
            attempts=attempts,
            status=status,
        )
        self.error_type = error_type
        self.detail = detail
        self.field = field


def _error_of(response: httpx.Response) -> tuple[str, str, str | None]:
    try:
        error = response.json()["error"]
        return str(error["type"]), str(error["message"]), error.get("field")
    except Exception:
        return "http_error", response.text[:500] or response.reason_phrase, None


def _retry_after_seconds(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        when = email.utils.parsedate_to_datetime(value)
        return max(0.0, when.timestamp() - time.time()) if when is not None else None


class _Attempts:
    """The policy's bookkeeping for one call: which URL next, how long to wait, when to give up."""

    def __init__(self, policy: RetryPolicy, urls: Sequence[str], start: int, phase: str):
        self.policy, self.urls, self.start, self.phase = policy, urls, start, phase
        self.deadline = time.monotonic() + policy.max_total_seconds
        self.number = 0

    def next_url(self) -> str:
        self.number += 1
        return self.urls[(self.start + self.number - 1) % len(self.urls)]

    def timeout(self) -> httpx.Timeout:
        left = max(0.001, self.deadline - time.monotonic())
        p = self.policy
        connect, read = min(p.connect_timeout_seconds, left), min(p.read_timeout_seconds, left)
        return httpx.Timeout(connect=connect, read=read, write=read, pool=connect)

    def delay_before_retry(self, retry_after: float | None) -> float | None:
        """Seconds to wait before the next attempt, or None when the policy gives up."""
        if self.number >= self.policy.max_attempts:
            return None
        p = self.policy
        backoff = min(p.backoff_seconds * 2 ** (self.number - 1), p.backoff_max_seconds)
        delay = max(backoff * random.uniform(0.5, 1.0), retry_after or 0.0)
        if time.monotonic() + delay >= self.deadline:
            return None
        return delay

    def failure(self, url: str, reason: str, status: int | None = None) -> ServiceCallError:
        return ServiceCallError(
            f"{self.phase}: {url} failed after {self.number} attempt(s): {reason}",
            url=url,
            phase=self.phase,
            attempts=self.number,
            status=status,
        )

    def judge(self, url: str, result: httpx.Response | httpx.TransportError) -> float | None:
        """The policy's verdict on one attempt: None when `result` is the answer (a response below 400),
        else the seconds to wait before the next attempt. Raises `ServiceHTTPError` on a 4xx (never
        retried) and `ServiceCallError` when the policy gives up. An error response's body must be read."""
        retry_after, status = None, None
        if isinstance(result, httpx.TransportError):
            reason = _describe(result)
        elif result.status_code < 400:
            return None
        elif result.status_code < 500:
            raise self.http_error(url, result)
        else:
            status, retry_after = result.status_code, _retry_after_seconds(result)
            reason = f"{status} {_error_of(result)[1]}"
        delay = self.delay_before_retry(retry_after)
        if delay is None:
            raise self.failure(url, reason, status)
        log.warning("%s: %s: %s; retrying in %.2f s", self.phase, url, reason, delay)
        return delay

    def http_error(self, url: str, response: httpx.Response) -> ServiceHTTPError:
        error_type, detail, field = _error_of(response)
        return ServiceHTTPError(
            url=url,
            phase=self.phase,
            attempts=self.number,
            status=response.status_code,
            error_type=error_type,
            detail=detail,
            field=field,
        )


class _Waits:
    """The calls under way in this process, watched by one daemon thread that names those waiting long."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls: dict[int, list[Any]] = {}  # key -> [url, phase, started, next notice, interval]
        self._keys = itertools.count()
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def watching(self, url: str, phase: str, interval: float) -> Iterator[None]:
        if interval <= 0:
            yield
            return
        key = next(self._keys)
        now = time.monotonic()
        with self._lock:
            self._calls[key] = [url, phase, now, now + interval, interval]
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="rpo-slow-calls", daemon=True)
                self._thread.start()
        try:
            yield
        finally:
            with self._lock:
                self._calls.pop(key, None)

    def _run(self) -> None:
        while True:
            time.sleep(0.25)
            now = time.monotonic()
            with self._lock:
                due = [call for call in self._calls.values() if call[3] <= now]
                for call in due:
                    call[3] = now + call[4]
            for url, phase, started, _, _ in due:
                log.warning(
                    "%s: still waiting on %s after %.0f s (no answer yet)",
                    phase,
                    url,
                    now - started,
                    extra={"replica": url, "phase": phase},
                )


_WAITS = _Waits()


def _normalise_urls(base_urls: str | Sequence[str]) -> list[str]:
    urls = [base_urls] if isinstance(base_urls, str) else list(base_urls)
    if not urls:
        raise ValueError("at least one base URL is needed")
    return [u.rstrip("/") for u in urls]


def _headers(token: str | None, extra: Mapping[str, str] | None) -> dict[str, str]:
    headers = dict(extra or {})
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return headers


@functools.cache
def _tls_context() -> ssl.SSLContext:
    """One TLS context for every client of the process: building one loads the CA bundle (about 30 ms), which
    a client made per call (a weight push per replica and step) would otherwise pay each time."""
    return httpx.create_ssl_context()


def _describe(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class AsyncServiceClient:
    """Async HTTP calls to one service (or its replicas) under the retry policy."""

    def __init__(
        self,
        base_urls: str | Sequence[str],
        policy: RetryPolicy | None = None,
        *,
        token: str | None = None,
        headers: Mapping[str, str] | None = None,
        max_connections: int = 64,
    ):
        self.base_urls = _normalise_urls(base_urls)
        self.policy = policy or RetryPolicy()
        self._rotation = itertools.count()
        self._http = httpx.AsyncClient(
            headers=_headers(token, headers),
            verify=_tls_context(),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
            timeout=httpx.Timeout(
                self.policy.read_timeout_seconds, connect=self.policy.connect_timeout_seconds
            ),
        )

    async def request(self, method: str, path: str, *, phase: str, **kwargs: Any) -> httpx.Response:
        """One call; returns a 2xx/3xx response, raises ServiceHTTPError (4xx) or ServiceCallError."""
        return await self._send(method, path, phase, read_body=True, kwargs=kwargs)

    @contextlib.asynccontextmanager
    async def stream(
        self, method: str, path: str, *, phase: str, **kwargs: Any
    ) -> AsyncIterator[httpx.Response]:
        """A streamed response; retried until its headers arrive with a 2xx. Errors while reading the body
        propagate (the caller decides whether to start over)."""
        response = await self._send(method, path, phase, read_body=False, kwargs=kwargs)
        try:
            yield response
        finally:
            await response.aclose()

    async def _send(
        self, method: str, path: str, phase: str, *, read_body: bool, kwargs: dict[str, Any]
    ) -> httpx.Response:
        attempts = _Attempts(self.policy, self.base_urls, next(self._rotation), phase)
        while True:
            url = attempts.next_url()
            request = self._http.build_request(method, url + path, timeout=attempts.timeout(), **kwargs)
            result: httpx.Response | httpx.TransportError | None = None
            with _WAITS.watching(url + path, phase, self.policy.notice_after_seconds):
                try:
                    result = await self._http.send(request, stream=True)
                    if read_body or result.status_code >= 400:
                        await result.aread()  # reading to the end closes the stream
                except httpx.TransportError as exc:
                    if result is not None:
                        await result.aclose()
                    result = exc
            delay = attempts.judge(url, result)
            if delay is None:
                assert isinstance(result, httpx.Response)
                return result
            await asyncio.sleep(delay)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncServiceClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class ServiceClient:
    """Blocking twin of AsyncServiceClient, for command-line tools and synchronous callers."""

    def __init__(
        self,
        base_urls: str | Sequence[str],
        policy: RetryPolicy | None = None,
        *,
        token: str | None = None,
        headers: Mapping[str, str] | None = None,
    ):
        self.base_urls = _normalise_urls(base_urls)
        self.policy = policy or RetryPolicy()
        self._rotation = itertools.count()
        self._http = httpx.Client(
            headers=_headers(token, headers),
            verify=_tls_context(),
            timeout=httpx.Timeout(
                self.policy.read_timeout_seconds, connect=self.policy.connect_timeout_seconds
            ),
        )

    def request(self, method: str, path: str, *, phase: str, **kwargs: Any) -> httpx.Response:
        return self._send(method, path, phase, read_body=True, kwargs=kwargs)

    @contextlib.contextmanager
    def stream(self, method: str, path: str, *, phase: str, **kwargs: Any) -> Iterator[httpx.Response]:
        response = self._send(method, path, phase, read_body=False, kwargs=kwargs)
        try:
            yield response
        finally:
            response.close()

    def _send(
        self, method: str, path: str, phase: str, *, read_body: bool, kwargs: dict[str, Any]
    ) -> httpx.Response:
        attempts = _Attempts(self.policy, self.base_urls, next(self._rotation), phase)
        while True:
            url = attempts.next_url()
            request = self._http.build_request(method, url + path, timeout=attempts.timeout(), **kwargs)
            result: httpx.Response | httpx.TransportError | None = None
            with _WAITS.watching(url + path, phase, self.policy.notice_after_seconds):
                try:
                    result = self._http.send(request, stream=True)
                    if read_body or result.status_code >= 400:
                        result.read()
                except httpx.TransportError as exc:
                    if result is not None:
                        result.close()
                    result = exc
            delay = attempts.judge(url, result)
            if delay is None:
                assert isinstance(result, httpx.Response)
                return result
            time.sleep(delay)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ServiceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
