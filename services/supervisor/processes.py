"""Supervision of the child processes `rpo run` (and `rpo eval` without replicas) starts on localhost.

Guarantees: every child runs in its own process group (so a Ctrl-C in the terminal reaches only us, and
stopping a child stops its workers too, e.g. vLLM's engine core); `stop_all` stops them in reverse start
order with SIGTERM, then SIGKILL after a timeout, and is called on normal exit, on failure of any part and
on Ctrl-C/SIGTERM (the context manager). A child that dies is reported with its name, exit code and the
tail of its log file, never as a hang: every wait has a timeout and checks the child is still alive.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import httpx
import yaml

from services.core.config import RunConfig

log = logging.getLogger("rpo.processes")


class PartFailed(RuntimeError):
    """A child process exited or never became ready; the message names it and quotes its log."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def log_tail(path: Path | None, lines: int = 25) -> str:
    if path is None or not path.exists():
        return "(no log)"
    text = path.read_text(errors="replace").splitlines()
    return "\n".join(text[-lines:]) or "(empty log)"


def write_run_config(cfg: RunConfig, path: Path) -> tuple[Path, dict[str, str]]:
    """Write the resolved config for child processes; returns (file, environment for the children).

    The file holds every resolved setting, so the children's environment drops our `RPO_<SECTION>__...`
    variables (they would override the file); the API token travels only as `RPO_API_TOKEN`, never on disk.
    """

    data = cfg.public_dict()
    data["services"].pop("api_token", None)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    env = {k: v for k, v in os.environ.items() if not (k.startswith("RPO_") and "__" in k)}
    env.pop("RPO_API_TOKEN", None)
    if cfg.services.api_token is not None:
        env["RPO_API_TOKEN"] = cfg.services.api_token.get_secret_value()
    return path, env


def rpo_command(*args: str) -> list[str]:
    """argv running an `rpo` subcommand with this interpreter (works without the console script on PATH)."""
    return [sys.executable, "-m", "services.cli", *args]


@dataclass
class Child:
    name: str
    popen: subprocess.Popen
    log_path: Path | None
    url: str | None = None
    _log_fh: IO | None = None
    done: bool = False
    """Waited for to the end (`Supervisor.wait`): its exit is no longer a failure of the job."""

    def exited(self) -> int | None:
        return self.popen.poll()

    def describe_exit(self) -> str:
        code = self.popen.returncode
        how = (
            f"was killed by {signal.Signals(-code).name}"
            if code is not None and code < 0
            else f"exited {code}"
        )
        return f"{self.name} {how}; last lines of {self.log_path}:\n{log_tail(self.log_path)}"


class Supervisor:
    """Starts, watches and stops child processes. Use as a context manager so they always stop."""

    def __init__(self, log_dir: str | Path, stop_timeout_seconds: float = 20.0):
        self.log_dir = Path(log_dir)
        self.stop_timeout_seconds = stop_timeout_seconds
        self.children: list[Child] = []

    def __enter__(self) -> Supervisor:
        return self

    def __exit__(self, *exc) -> None:
        self.stop_all()

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        url: str | None = None,
        log_to_file: bool = True,
        cwd: str | Path | None = None,
    ) -> Child:
        """Start `argv` in a new process group; stdout+stderr go to `logs/<name>.log` unless told otherwise.

        `env` is the child's whole environment (default: ours)."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{name}.log" if log_to_file else None
        fh = log_path.open("ab") if log_path is not None else None
        popen = subprocess.Popen(
            list(argv),
            stdout=fh,
            stderr=subprocess.STDOUT if fh is not None else None,
            stdin=subprocess.DEVNULL,
            env=env if env is not None else dict(os.environ),
            cwd=cwd,
            start_new_session=True,
        )
        child = Child(name=name, popen=popen, log_path=log_path, url=url, _log_fh=fh)
        self.children.append(child)
        log.info("started %s (pid %d)%s", name, popen.pid, f", log {log_path}" if log_path else "")
        return child

    def wait_ready(self, child: Child, timeout_seconds: float, path: str = "/readyz") -> None:
        """Poll `child.url + path` until it answers 200; fail fast if the child exits."""
        assert child.url is not None
        deadline = time.monotonic() + timeout_seconds
        last = "no answer yet"
        with httpx.Client(timeout=httpx.Timeout(2.0, connect=1.0)) as client:
            while time.monotonic() < deadline:
                if child.exited() is not None:
                    raise PartFailed(f"{child.describe_exit()}")
                try:
                    reply = client.get(child.url + path)
                    if reply.status_code == 200:
                        return
                    last = f"HTTP {reply.status_code}: {reply.text[:200]}"
                except httpx.HTTPError as exc:
                    last = f"{type(exc).__name__}: {exc}"
                time.sleep(0.5)
        raise PartFailed(
            f"{child.name} at {child.url} was not ready after {timeout_seconds:.0f} s (last: {last}); "
            f"last lines of {child.log_path}:\n{log_tail(child.log_path)}"
        )

    def check_alive(self, exclude: Sequence[Child] = ()) -> None:
        """Raise PartFailed if any child (other than `exclude`) has exited."""
        for child in self.children:
            if child in exclude or child.done:
                continue
            if child.exited() is not None:
                raise PartFailed(child.describe_exit())

    def wait(self, child: Child, timeout_seconds: float | None = None, poll_seconds: float = 0.5) -> int:
        """Wait for `child` to exit, checking the others stay alive; returns its exit code."""
        deadline = None if timeout_seconds is None else time.monotonic() + timeout_seconds
        while True:
            code = child.exited()
            if code is not None:
                child.done = True
                return code
            self.check_alive(exclude=[child])
            if deadline is not None and time.monotonic() > deadline:
                raise PartFailed(f"{child.name} did not finish within {timeout_seconds:.0f} s")
            time.sleep(poll_seconds)

    def stop(
        self, child: Child, sig: int = signal.SIGTERM, timeout_seconds: float | None = None
    ) -> int | None:
        """Signal the child's process group, wait, then SIGKILL the group if it is still there."""
        timeout = self.stop_timeout_seconds if timeout_seconds is None else timeout_seconds
        if child.exited() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(child.popen.pid, sig)
            try:
                child.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                log.warning(
                    "%s did not stop within %.0f s of %s: killing it",
                    child.name,
                    timeout,
                    sig.name if isinstance(sig, signal.Signals) else sig,
                )
        # Workers of the child (same process group) may outlive it: kill whatever is left of the group.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.popen.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.popen.wait(timeout=5)
        if child._log_fh is not None:
            child._log_fh.close()
            child._log_fh = None
        return child.popen.returncode

    def stop_all(self) -> None:
        """Stop every child, last started first."""
        while self.children:
            child = self.children.pop()
            code = self.stop(child)
            log.info("stopped %s (exit %s)", child.name, code)
