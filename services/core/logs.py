"""One logger factory for every process: plain lines for people, JSON lines on request.

Correlation fields (replica, step, policy_version, request_id) passed as `extra={...}` are kept in both
forms. Library code logs; only the CLI prints.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import TextIO

CORRELATION_FIELDS = ("replica", "phase", "step", "policy_version", "request_id", "run_id")


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        payload = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for name in CORRELATION_FIELDS:
            if hasattr(record, name):
                payload[name] = getattr(record, name)
        if record.exc_info:
            payload["exc"] = self.formatException(record.exc_info)
        return json.dumps(payload, default=str)


class _PlainFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        fields = " ".join(f"{n}={getattr(record, n)}" for n in CORRELATION_FIELDS if hasattr(record, n))
        line = f"{stamp} {record.levelname[0]} {record.name}: {record.getMessage()}"
        if fields:
            line += f" [{fields}]"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is when a record is emitted, not the stream it was created with.

    A process that swaps stderr (pytest's capture, a daemon that redirects it) would otherwise leave the
    handler writing to a closed file, and every later log line would print a "Logging error" traceback.
    """

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:
        pass  # StreamHandler.__init__ and setStream assign it; stderr is looked up when used instead


def setup_logging(level: str = "INFO", json_lines: bool = False) -> None:
    """Configure the root logger once per process (idempotent). Off a terminal, Hugging Face's progress
    bars are turned off too: there, progress is our own log lines."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_rpo", False):
            root.removeHandler(handler)
    handler = _StderrHandler()
    handler._rpo = True  # type: ignore[attr-defined]
    handler.setFormatter(_JsonFormatter() if json_lines else _PlainFormatter())
    root.addHandler(handler)
    root.setLevel(level)
    for noisy in ("httpx", "httpcore", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not sys.stderr.isatty():
        # Hugging Face libraries draw tqdm bars ("Loading weights", "Writing model shards") whatever the
        # output is; written to a log file each is a line of carriage returns. transformers reads this at
        # import, which the CLI defers until a handler runs, so setting it here takes effect.
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
