"""The replica's reward scorer (services.rollout.scoring) with its real worker processes: a request's groups go
out as one batch per worker, and a batch that hangs scores 0 within the timeout while the pool is replaced,
so the next request is scored normally."""

from __future__ import annotations

import asyncio
import json
import logging

from services.core.reward_terms import ScoringGroup
from services.core.schemas.rollout import RewardTerm
from services.rollout.scoring import RewardScorer

REWARDS = """
import json, os, time
from pathlib import Path


def counted(completions, **kwargs):
    with Path(__file__).with_suffix(".jsonl").open("a") as fh:
        fh.write(json.dumps({"pid": os.getpid(), "n": len(completions)}) + "\\n")
    # Rendezvous: wait (up to 30 s) until a second call has started, so the two batches can only finish if
    # they run at the same time in two processes; one worker taking both would wait here, then run alone.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if len(Path(__file__).with_suffix(".jsonl").read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    return [1.0] * len(completions)


def hangs_on_q2(completions, reference, **kwargs):
    if "stuck" in reference:
        time.sleep(600)
    return [0.5] * len(completions)
"""


def _groups(n: int, stuck: int | None = None) -> list[ScoringGroup]:
    return [
        ScoringGroup(
            question_id=f"q{i}",
            reference="stuck" if i == stuck else str(i),
            texts=["a", "b", "c"],
            completion_ids=[[1], [2], [3]],
        )
        for i in range(n)
    ]


def test_groups_go_out_as_one_batch_per_worker(tmp_path):
    (tmp_path / "rewards.py").write_text(REWARDS)
    scorer = RewardScorer(workers=2, timeout_seconds=60)
    scorer.start()
    try:
        terms = [RewardTerm(function=f"{tmp_path / 'rewards.py'}:counted")]
        scored = asyncio.run(scorer.score(terms, 0, "x", _groups(5)))
    finally:
        scorer.close()
    assert [[s.raw for s in g] for g in scored] == [[1.0] * 3] * 5  # in the groups' order
    calls = [json.loads(line) for line in (tmp_path / "rewards.jsonl").read_text().splitlines()]
    assert sorted(c["n"] for c in calls) == [6, 9]  # 3 groups and 2 groups of 3 responses
    assert len({c["pid"] for c in calls}) == 2  # in two worker processes, at the same time


def test_a_hanging_batch_scores_zero_in_time_and_the_next_request_is_scored(tmp_path, caplog):
    (tmp_path / "rewards.py").write_text(REWARDS)
    terms = [RewardTerm(function=f"{tmp_path / 'rewards.py'}:hangs_on_q2")]
    scorer = RewardScorer(workers=2, timeout_seconds=3)
    scorer.start()
    try:
        with caplog.at_level(logging.WARNING, logger="rpo.rollout.rewards"):
            scored = asyncio.run(asyncio.wait_for(scorer.score(terms, 0, "x", _groups(4, stuck=2)), 60))
        after = asyncio.run(asyncio.wait_for(scorer.score(terms, 0, "x", _groups(4)), 60))
    finally:
        scorer.close()
    # batches q0,q1 and q2,q3: the second one hangs on q2 and scores 0, the first is scored
    assert [[s.raw for s in g] for g in scored] == [[0.5] * 3, [0.5] * 3, [0.0] * 3, [0.0] * 3]
    assert "scoring questions q2, q3 took over 3 s" in caplog.text
    assert [[s.raw for s in g] for g in after] == [[0.5] * 3] * 4
