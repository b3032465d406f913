"""Benchmark of the cache service against the same Redis work done directly with redis-py pipelines.

One training step of the paper's shape: Q questions (576) whose cached answers have T tokens (2,000);
prefix retrieval with L = 300, then a G = 6 epsilon-greedy update whose candidates are the prefix plus a
suffix of up to m tokens. "service" goes through `CacheClient` (msgpack over HTTP) to `rpo serve cache`,
started here as its own process; "raw" does the equivalent reads and writes straight to Redis from this
process (pipelined HMGET; select locally, pipelined HSET/HINCRBY/SADD of the chosen response and a marker),
without the idempotency check the service's Lua script makes. Both use the same Redis and key layout.

    python bench/cache_bench.py [--rounds 60] [--redis-url redis://127.0.0.1:6379/0]

Prints a Markdown table (p50 / p99 latency per batch, throughput in questions per second).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import redis.asyncio as aredis

from cache_server.embedded import free_port
from cache_server.store import Keys, prefix_length
from services.core.algorithm import draw_truncation, select_for_cache, truncation_limit
from services.core.clients.cache import CacheClient
from services.core.http_client import RetryPolicy
from services.core.schemas.cache import GroupUpdate, PutEntry, UpdateCandidate

REPO = Path(__file__).resolve().parents[1]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def random_ids(rng: random.Random, n: int) -> bytes:
    return rng.randbytes(4 * n)


def make_groups(prefixes: list[tuple[str, bytes, int]], g: int, rng: random.Random) -> list[GroupUpdate]:
    """G candidates per question: the shared prefix plus a suffix of 1..m tokens (the rollout's shape)."""
    groups = []
    for qid, prefix, m in prefixes:
        candidates = [
            UpdateCandidate(
                suffix_ids=random_ids(rng, rng.randint(1, max(1, m))),
                reward=rng.random(),
                correct=rng.random() < 0.5,
            )
            for _ in range(g)
        ]
        groups.append(
            GroupUpdate(question_id=qid, prefix_ids=prefix, candidates=candidates, policy_version=1)
        )
    return groups


async def service_rounds(
    url: str, run_id: str, qids: list[str], args, rng: random.Random
) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {"prefix": [], "update": [], "step": []}
    policy = RetryPolicy(read_timeout_seconds=60, max_attempts=1)
    async with CacheClient(url, policy=policy) as cache:
        for r in range(args.warmup + args.rounds):
            t0 = time.perf_counter()
            results = await cache.prefixes(run_id, qids, args.limit, seed=r)
            t1 = time.perf_counter()
            groups = make_groups([(x.question_id, x.prefix_ids, x.m) for x in results], args.group_size, rng)
            t2 = time.perf_counter()
            await cache.update(run_id, r, groups, epsilon=0.5, seed=r)
            t3 = time.perf_counter()
            if r >= args.warmup:
                times["prefix"].append(t1 - t0)
                times["update"].append(t3 - t2)
                times["step"].append((t1 - t0) + (t3 - t2))
    return times


async def raw_rounds(
    redis_url: str, run_id: str, qids: list[str], args, rng: random.Random
) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {"prefix": [], "update": [], "step": []}
    r_client = aredis.Redis.from_url(redis_url, max_connections=8)
    keys = Keys("rpo", run_id)
    try:
        for r in range(args.warmup + args.rounds):
            t0 = time.perf_counter()
            pipe = r_client.pipeline(transaction=False)
            for q in qids:
                pipe.hmget(keys.entry(q), "ids", "version", "lgml")
            rows = await pipe.execute()
            prefixes = []
            for q, (packed, _version, lgml) in zip(qids, rows, strict=True):
                n = len(packed) // 4
                m = draw_truncation(
                    truncation_limit(args.limit, int(lgml) if lgml else None, n), random.Random(f"{r}:{q}")
                )
                prefixes.append((q, packed[: prefix_length(n, m) * 4], m))
            t1 = time.perf_counter()
            groups = make_groups(prefixes, args.group_size, rng)
            t2 = time.perf_counter()
            now = repr(time.time())
            pipe = r_client.pipeline(transaction=False)
            for gr in groups:
                choice = select_for_cache(
                    [c.reward for c in gr.candidates],
                    [c.correct for c in gr.candidates],
                    0.5,
                    random.Random(),
                )
                c = gr.candidates[choice.index]
                ids = gr.prefix_ids + c.suffix_ids
                key = keys.entry(gr.question_id)
                pipe.hset(key, mapping={
                    "ids": ids, "len": len(ids) // 4, "reward": repr(c.reward), "correct": int(c.correct),
                    "version": gr.policy_version, "lgml": gr.group_min_len(), "updated": now, "step": r,
                })  # fmt: skip
                pipe.hincrby(key, "updates", 1)
                pipe.sadd(keys.index, gr.question_id)
                pipe.hset(keys.marker(r), gr.question_id, f"{choice.choice}:{choice.index}")
            await pipe.execute()
            t3 = time.perf_counter()
            if r >= args.warmup:
                times["prefix"].append(t1 - t0)
                times["update"].append(t3 - t2)
                times["step"].append((t1 - t0) + (t3 - t2))
    finally:
        await r_client.aclose()
    return times


def start_service(redis_url: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RPO_API_TOKEN"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "--log-level", "WARNING", "serve", "cache", "--port", str(port),
         "--redis-url", redis_url],
        cwd=REPO,
        env=env,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise SystemExit("the cache server did not become ready")


def server_means(url: str) -> dict[str, float]:
    """Mean time the server spent per request (its own histogram), warm-up rounds included."""
    text = httpx.get(url + "/metrics", timeout=10).text
    sums: dict[str, list[float]] = {}
    for line in text.splitlines():
        for suffix in ("_sum", "_count"):
            head = "rpo_http_request_duration_seconds" + suffix + "{"
            if line.startswith(head) and ("/prefixes" in line or "/updates" in line):
                endpoint = line.split('endpoint="')[1].split('"')[0]
                sums.setdefault(endpoint, [0.0, 0.0])[suffix == "_count"] = float(line.split()[-1])
    return {e: total / count for e, (total, count) in sums.items() if count}


def row(name: str, what: str, t: list[float], questions: int) -> str:
    p50, p99 = percentile(t, 0.5), percentile(t, 0.99)
    return f"| {name} | {what} | {p50 * 1e3:.1f} | {p99 * 1e3:.1f} | {statistics.mean(t) * 1e3:.1f} | {questions / statistics.mean(t):,.0f} |"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--questions", type=int, default=576)
    parser.add_argument("--answer-tokens", type=int, default=2000)
    parser.add_argument("--group-size", type=int, default=6)
    parser.add_argument("--limit", type=int, default=300, help="truncation limit L")
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()

    rng = random.Random(0)
    qids = [f"q{i}" for i in range(args.questions)]
    entries = [PutEntry(question_id=q, token_ids=random_ids(rng, args.answer_tokens)) for q in qids]
    service_run, raw_run = f"bench-svc-{os.getpid()}", f"bench-raw-{os.getpid()}"
    proc, url = start_service(args.redis_url)
    try:
        async with CacheClient(url) as cache:
            await cache.put_entries(service_run, entries)
            await cache.put_entries(raw_run, entries)
            service = await service_rounds(url, service_run, qids, args, random.Random(1))
            raw = await raw_rounds(args.redis_url, raw_run, qids, args, random.Random(1))
            server_side = server_means(url)
            await cache.delete_run(service_run)
            await cache.delete_run(raw_run)
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    print(f"Command: python bench/cache_bench.py --rounds {args.rounds} (Q={args.questions}, T={args.answer_tokens}, "
          f"G={args.group_size}, L={args.limit}); {os.cpu_count()} CPU cores, {platform.python_version()}, no GPU")  # fmt: skip
    print()
    print("| path | batch | p50 ms | p99 ms | mean ms | questions/s |")
    print("|---|---|---|---|---|---|")
    for what in ("prefix", "update", "step"):
        print(row("service", what, service[what], args.questions))
        print(row("raw redis-py", what, raw[what], args.questions))
    print()
    for endpoint, mean in server_side.items():
        print(f"- server-side mean of {endpoint} (rpo_http_request_duration_seconds): {mean * 1e3:.1f} ms")
    for what in ("prefix", "update", "step"):
        ratio = percentile(service[what], 0.5) / percentile(raw[what], 0.5)
        print(f"- {what}: service / raw at p50 = {ratio:.2f}x")


if __name__ == "__main__":
    asyncio.run(main())
