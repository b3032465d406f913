"""The epsilon-greedy choice has the paper's statistics, and concurrent clients with retries neither lose
nor double-apply an update."""

from __future__ import annotations

import asyncio
import math
import random
from collections import Counter

from cache_helpers import FAST_RETRIES, TOKEN, group

from services.core.clients.cache import CacheClient


async def test_epsilon_point_one_stores_the_best_about_ten_percent_and_others_uniformly(cache, run_id):
    # 2,000 groups of G = 6 with distinct rewards; the best is index 3. Without a seed each choice is an
    # independent draw: #best ~ Binomial(2000, 0.1): mean 200, sd sqrt(2000 * 0.1 * 0.9) = 13.4.
    # Each of the 5 others ~ Binomial(2000, 0.9 / 5 = 0.18): mean 360, sd 17.2. Bounds at 5 sd: a false
    # failure has probability below 1e-5.
    n, rewards = 2000, [0.1, 0.2, 0.3, 0.9, 0.5, 0.4]
    groups = [group(f"q{i}", rewards) for i in range(n)]
    results = []
    for start in range(0, n, 1000):
        results += await cache.update(run_id, 1, groups[start : start + 1000], epsilon=0.1)
    counts = Counter(r.index for r in results)
    assert all(r.choice == ("best" if r.index == 3 else "other") for r in results)
    assert abs(counts[3] - 200) <= 5 * math.sqrt(n * 0.1 * 0.9)
    for other in (0, 1, 2, 4, 5):
        assert abs(counts[other] - 360) <= 5 * math.sqrt(n * 0.18 * 0.82)


async def test_concurrent_clients_with_retries_lose_nothing_and_apply_nothing_twice(cache_url, run_id, cache):
    # 24 clients, 8 steps, 40 questions; every client sends each of its (step, questions) batch twice,
    # concurrently with the others, and batches of different clients overlap on questions and steps.
    # Exactly one application per distinct (step, question) must happen.
    questions = [f"q{i}" for i in range(40)]
    rng = random.Random(0)
    plans = []
    for c in range(24):
        step = c % 8
        chosen = rng.sample(questions, 15)
        plans.append((step, chosen))

    async def client_job(step: int, qids: list[str]) -> list:
        async with CacheClient(cache_url, token=TOKEN, policy=FAST_RETRIES) as client:
            groups = [group(q, [0.2, 0.8, 0.5], version=step) for q in qids]
            first, second = await asyncio.gather(
                client.update(run_id, step, groups, epsilon=0.5),
                client.update(run_id, step, list(reversed(groups)), epsilon=0.5),
            )
            return [(step, r.question_id, r.applied, r.index) for r in first + second]

    outcomes = [o for batch in await asyncio.gather(*(client_job(s, q) for s, q in plans)) for o in batch]
    distinct = {(s, q) for s, qids in plans for q in qids}
    applied = Counter((s, q) for s, q, was_applied, _ in outcomes if was_applied)
    assert set(applied) == distinct and set(applied.values()) == {1}
    # Every report of the same (step, question) names the same stored index.
    indexes: dict[tuple[int, str], set[int]] = {}
    for s, q, _, index in outcomes:
        indexes.setdefault((s, q), set()).add(index)
    assert all(len(v) == 1 for v in indexes.values())
    # Each entry counts exactly its distinct steps.
    entries = await cache.read_entries(run_id, questions)
    for q, e in zip(questions, entries, strict=True):
        steps = {s for s, qq in distinct if qq == q}
        assert (e.update_count if e else 0) == len(steps)
