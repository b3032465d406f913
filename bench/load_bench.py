"""Load, measured: dozens of concurrent clients against the cache server and against a rollout replica,
for a bounded time each; throughput, p50/p99 latency, errors, and (cache) lost or doubled updates.

- cache: `rpo serve cache` as its own process over Redis. Each client owns a few questions; it loops
  reading prefixes and sending epsilon-greedy updates with its own increasing step numbers (epsilon 1, so
  every update replaces the entry), and re-sends a share of its updates as a retry would (same step).
  Afterwards every entry's `update_count` must equal the number of distinct steps the client sent for it:
  an update lost or applied twice shows as a difference.
- rollout: `rpo serve rollout` on the warm tiny model; each client loops on `/v1/generate` (an 8-token
  prompt, 16 new tokens, n = 2).

    python bench/load_bench.py [--clients 32] [--seconds 20] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

import httpx

from cache_server.embedded import free_port
from services.core.clients.cache import CacheClient
from services.core.http_client import RetryPolicy, ServiceCallError
from services.core.schemas.cache import GroupUpdate, PutEntry, UpdateCandidate
from services.models.tiny_model_cache import cached_tiny_model

REPO = Path(__file__).resolve().parents[1]
QUESTIONS_PER_CLIENT = 4
RETRY_SHARE = 0.2
"""Share of updates sent twice (the second as a retry of the same step would be)."""


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else float("nan")


def start(argv: list[str], url: str, timeout: float) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RPO_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "--log-level", "WARNING", *argv],
        cwd=REPO,
        env=env,
        start_new_session=True,
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"{argv[:2]} exited {proc.returncode}")
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"{argv[:2]} did not become ready in {timeout} s")


def summary(name: str, latencies: list[float], errors: int, seconds: float, clients: int, **extra) -> dict:
    return {
        "target": name,
        "clients": clients,
        "seconds": round(seconds, 1),
        "requests": len(latencies),
        "requests_per_second": len(latencies) / seconds,
        "p50_ms": percentile(latencies, 0.5) * 1e3,
        "p99_ms": percentile(latencies, 0.99) * 1e3,
        "errors": errors,
        **extra,
    }


async def cache_load(url: str, clients: int, seconds: float) -> dict:
    run_id = f"load-{os.getpid()}"
    policy = RetryPolicy(max_attempts=3, read_timeout_seconds=30, max_total_seconds=60)
    latencies: list[float] = []
    errors = 0
    steps_sent: dict[str, set[int]] = {}
    async with CacheClient(url, policy=policy) as setup:
        qids = [f"c{c}-q{i}" for c in range(clients) for i in range(QUESTIONS_PER_CLIENT)]
        await setup.put_entries(run_id, [PutEntry(question_id=q, token_ids=[1, 2, 3, 4]) for q in qids])
    deadline = time.monotonic() + seconds

    async def client(c: int) -> None:
        nonlocal errors
        rng = random.Random(c)
        own = [f"c{c}-q{i}" for i in range(QUESTIONS_PER_CLIENT)]
        step = c * 1_000_000  # each client's steps are its own
        async with CacheClient(url, policy=policy) as cache:
            while time.monotonic() < deadline:
                step += 1
                qid = rng.choice(own)
                group = GroupUpdate(
                    question_id=qid,
                    candidates=[UpdateCandidate(suffix_ids=[5, 6], reward=rng.random(), correct=True)],
                    policy_version=1,
                )
                sends = 2 if rng.random() < RETRY_SHARE else 1
                for call in ("prefixes", *["update"] * sends):
                    t0 = time.perf_counter()
                    try:
                        if call == "prefixes":
                            await cache.prefixes(run_id, own, 2, seed=step)
                        else:
                            await cache.update(run_id, step, [group], epsilon=1.0)
                            steps_sent.setdefault(qid, set()).add(step)
                    except ServiceCallError:
                        errors += 1
                        continue
                    latencies.append(time.perf_counter() - t0)

    started = time.monotonic()
    await asyncio.gather(*(client(c) for c in range(clients)))
    elapsed = time.monotonic() - started
    async with CacheClient(url, policy=policy) as check:
        entries = await check.read_entries(run_id, qids)
        await check.delete_run(run_id)
    lost = doubled = 0
    for qid, entry in zip(qids, entries, strict=True):
        expected = len(steps_sent.get(qid, ()))
        got = entry.update_count if entry is not None else 0
        lost += max(0, expected - got)
        doubled += max(0, got - expected)
    updates = sum(len(s) for s in steps_sent.values())
    return summary(
        "cache server", latencies, errors, elapsed, clients, updates=updates, lost=lost, doubled=doubled
    )


async def rollout_load(url: str, clients: int, seconds: float) -> dict:
    latencies: list[float] = []
    errors = 0
    tokens = 0
    deadline = time.monotonic() + seconds
    body = {"prompts": [[40, 41, 42, 43, 44, 45, 46, 47]], "n": 2, "max_tokens": 16, "temperature": 1.0}

    async def client(c: int) -> None:
        nonlocal errors, tokens
        async with httpx.AsyncClient(timeout=120) as http:
            while time.monotonic() < deadline:
                t0 = time.perf_counter()
                try:
                    r = await http.post(url + "/v1/generate", json={**body, "seed": c})
                except httpx.HTTPError:
                    errors += 1
                    continue
                if r.status_code != 200:
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - t0)
                tokens += sum(len(s["token_ids"]) for s in r.json()["results"][0])

    started = time.monotonic()
    await asyncio.gather(*(client(c) for c in range(clients)))
    elapsed = time.monotonic() - started
    return summary(
        "rollout replica (/v1/generate)",
        latencies,
        errors,
        elapsed,
        clients,
        tokens_per_second=tokens / elapsed,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--targets", default="cache,rollout")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    results = []
    targets = args.targets.split(",")
    if "cache" in targets:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = start(["serve", "cache", "--port", str(port), "--redis-url", args.redis_url], url, 60)
        try:
            results.append(asyncio.run(cache_load(url, args.clients, args.seconds)))
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    if "rollout" in targets:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        model = cached_tiny_model("warm")
        proc = start(["serve", "rollout", "--model", str(model), "--port", str(port)], url, 600)
        try:
            results.append(asyncio.run(rollout_load(url, args.clients, args.seconds)))
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"Command: python bench/load_bench.py --clients {args.clients} --seconds {args.seconds:g}")
    print(f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores\n")
    print("| target | clients | requests | req/s | p50 ms | p99 ms | errors | notes |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        notes = (
            f"{r['updates']} updates: {r['lost']} lost, {r['doubled']} doubled"
            if "updates" in r
            else f"{r['tokens_per_second']:,.0f} tokens/s"
        )
        print(
            f"| {r['target']} | {r['clients']} | {r['requests']:,} | {r['requests_per_second']:,.0f} | "
            f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['errors']} | {notes} |"
        )


if __name__ == "__main__":
    main()
