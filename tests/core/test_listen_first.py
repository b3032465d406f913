"""A server started with `run_uvicorn` holds its port while its lifespan starts: a start-up that takes free
ports of its own (vLLM's engine does) can no longer take the one the server was given. A port already taken
ends the process with one line naming it."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

SERVER = textwrap.dedent(
    """
    import contextlib, json, os, signal, socket, sys
    from fastapi import FastAPI
    from services.core.server_kit import run_uvicorn

    port, out = int(sys.argv[1]), sys.argv[2]

    @contextlib.asynccontextmanager
    async def lifespan(app):
        probe = socket.socket()
        try:
            probe.bind(("127.0.0.1", port))
            held = False
        except OSError:
            held = True
        finally:
            probe.close()
        with open(out, "w") as fh:
            json.dump({"held_during_startup": held}, fh)
        os.kill(os.getpid(), signal.SIGTERM)
        yield

    run_uvicorn(FastAPI(lifespan=lifespan), "127.0.0.1", port)
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_port_is_held_before_the_lifespan_starts(tmp_path):
    out = tmp_path / "probe.json"
    proc = subprocess.run(
        [sys.executable, "-c", SERVER, str(_free_port()), str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert out.read_text() == '{"held_during_startup": true}'


def test_a_taken_port_is_one_clear_line(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-c", SERVER, str(port), str(tmp_path / "never.json")],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert proc.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "never.json").exists()
