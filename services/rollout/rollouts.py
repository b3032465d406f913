"""Group rollouts (`/v1/rollouts`, docs/algorithm.md, step 2 and 3): the one place RPO saves decoding.

For a batch of questions: ONE batched cache call fetches every prefix (the cache server draws m and
truncates); each question's G suffixes are decoded within the suffix budget (`services.core.algorithm`), all
questions concurrently, under one policy version; prefix + suffix is scored with the configured reward and
its correct responses shaped by length within their group (unless `length_shaping` is off). `mode="full"`
skips the cache (full-path GRPO/DAPO: the only difference). A miss decodes G full samples and, when asked,
seeds the entry with the first one (its trailing EOS stripped: the cache stores answers without EOS). A response never exceeds `max_response_tokens` nor the context.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

from services.core.algorithm import cached_answer, length_shaped_rewards, overlong_penalty, suffix_budget
from services.core.clients.cache import CacheClient
from services.core.errors import InvalidInput, Unavailable
from services.core.http_client import ServiceCallError, ServiceHTTPError
from services.core.reward_terms import SampleScore, ScoringGroup
from services.core.rewards import RewardSpecError, resolve_reward
from services.core.schemas.cache import PutEntry
from services.core.schemas.common import pack_token_ids, unpack_token_ids
from services.core.schemas.rollout import (
    RolloutGroup,
    RolloutRequest,
    RolloutResponse,
    RolloutSample,
    RolloutStats,
)
from services.rollout.engine import RolloutEngine
from services.rollout.generation import check_prompt, check_serving, derive_seed
from services.rollout.metrics import RolloutMetrics
from services.rollout.scoring import RewardScorer
from services.rollout.weight_updater import WeightUpdater

log = logging.getLogger("rpo.rollout")


@dataclass
class _Plan:
    """What to decode for one question."""

    prompt: list[int]
    prefix: list[int]
    m: int
    hit: bool
    max_tokens: int


class GroupRollouts:
    def __init__(
        self,
        engine: RolloutEngine,
        updater: WeightUpdater,
        scorer: RewardScorer,
        cache: CacheClient | None,
        metrics: RolloutMetrics,
        replica: str,
    ):
        self.engine = engine
        self.updater = updater
        self.scorer = scorer
        self.cache = cache
        """`services.core.clients.cache.CacheClient`, or None when the replica has no cache server configured."""
        self.metrics = metrics
        self.replica = replica

    # ------------------------------------------------------------------------------------------ checks
    def _check(self, req: RolloutRequest) -> None:
        for i, term in enumerate(req.reward_terms()):
            try:
                resolve_reward(term.function, req.dataset)
            except RewardSpecError as exc:
                raise InvalidInput(
                    str(exc), field=f"rewards.{i}.function" if req.rewards else "reward"
                ) from None
        for i, q in enumerate(req.questions):
            check_prompt(
                q.prompt_ids, f"questions.{i}.prompt_ids", self.engine.vocab_size, self.engine.max_model_len
            )
        if req.mode == "rpo" and self.cache is None:
            raise Unavailable(
                f"replica {self.replica} has no cache server (services.cache_url); mode 'rpo' needs one",
                retry_after_seconds=30,
            )

    # ----------------------------------------------------------------------------------------- prefixes
    async def _prefixes(self, req: RolloutRequest) -> list[Any] | None:
        if req.mode != "rpo":
            return None

        ids = [q.id for q in req.questions]
        try:
            return await self.cache.prefixes(req.run_id, ids, req.truncation_limit, seed=req.seed)
        except ServiceHTTPError as exc:
            raise InvalidInput(
                f"the cache server refused the prefix request: {exc.detail}", field=exc.field
            ) from None
        except ServiceCallError as exc:
            raise Unavailable(
                f"replica {self.replica}: cache server unreachable while fetching prefixes: {exc}",
                retry_after_seconds=5,
            ) from None

    def _plan(self, req: RolloutRequest, prefixes: list[Any] | None) -> list[_Plan]:
        plans = []
        context = self.engine.max_model_len
        for i, q in enumerate(req.questions):
            prompt = list(q.prompt_ids)
            result = prefixes[i] if prefixes is not None else None
            if result is not None and result.hit:
                prefix = unpack_token_ids(result.prefix_ids)
                # A cached answer longer than a response may be (or than the context leaves) keeps what leaves
                # one token of room.
                prefix = prefix[: max(0, min(context - len(prompt), req.max_response_tokens) - 1)]
                budget = suffix_budget(result.m, req.suffix_budget, len(prefix), req.max_response_tokens)
                plan = _Plan(prompt, prefix, result.m, True, budget)
            else:
                plan = _Plan(prompt, [], 0, False, req.max_response_tokens)
            plan.max_tokens = max(1, min(plan.max_tokens, context - len(prompt) - len(plan.prefix)))
            plans.append(plan)
        return plans

    # ---------------------------------------------------------------------------------------------- run
    async def run(self, req: RolloutRequest) -> RolloutResponse:
        self._check(req)
        t0 = time.perf_counter()
        prefixes = await self._prefixes(req)
        plans = self._plan(req, prefixes)
        t1 = time.perf_counter()
        async with self.updater.gate.shared():
            version = check_serving(self.updater, req.min_policy_version, self.replica)
            outputs = await asyncio.gather(
                *(
                    self.engine.generate(
                        plan.prompt + plan.prefix,
                        n=req.group_size,
                        max_tokens=plan.max_tokens,
                        temperature=req.temperature,
                        top_p=req.top_p,
                        seed=derive_seed(req.seed, q.id),
                        top_k=req.top_k,
                        min_p=req.min_p,
                        repetition_penalty=req.repetition_penalty,
                        policy_version=version,
                    )
                    for q, plan in zip(req.questions, plans, strict=True)
                )
            )
        t2 = time.perf_counter()
        responses = [
            [plan.prefix + s.token_ids for s in samples] for plan, samples in zip(plans, outputs, strict=True)
        ]
        texts = await asyncio.to_thread(self._decode, responses)
        scoring = [
            ScoringGroup(
                question_id=q.id,
                reference=q.reference,
                texts=group_texts,
                completion_ids=group_ids,
                prompt=q.prompt if q.prompt is not None else prompt_text,
                columns=q.columns,
            )
            for q, group_texts, group_ids, prompt_text in zip(
                req.questions, texts, responses, await self._prompts_without_text(req), strict=True
            )
        ]
        scores = await self.scorer.score(req.reward_terms(), req.correctness_index(), req.dataset, scoring)
        t3 = time.perf_counter()
        groups = [
            self._group(req, q, plan, samples, ids, group_scores)
            for q, plan, samples, ids, group_scores in zip(
                req.questions, plans, outputs, responses, scores, strict=True
            )
        ]
        seeded_seconds = await self._seed_misses(req, groups, version)
        stats = RolloutStats(
            generated_tokens=sum(len(s.token_ids) for samples in outputs for s in samples),
            reused_prefix_tokens=sum(len(p.prefix) * req.group_size for p in plans),
            generation_seconds=t2 - t1,
            reward_seconds=t3 - t2,
            cache_seconds=(t1 - t0) + seeded_seconds,
        )
        self._count(req, groups, stats)
        return RolloutResponse.model_construct(
            policy_version=version, replica=self.replica, groups=groups, stats=stats
        )

    async def _prompts_without_text(self, req: RolloutRequest) -> list[str]:
        """The prompt decoded from its ids, for questions sent without their text (else "")."""
        if all(q.prompt is not None for q in req.questions):
            return [""] * len(req.questions)
        tokenizer = self.engine.tokenizer
        return await asyncio.to_thread(
            lambda: [
                "" if q.prompt is not None else tokenizer.decode(q.prompt_ids, skip_special_tokens=True)
                for q in req.questions
            ]
        )

    def _decode(self, responses: list[list[list[int]]]) -> list[list[str]]:
        tokenizer = self.engine.tokenizer
        return [[tokenizer.decode(ids, skip_special_tokens=True) for ids in group] for group in responses]

    def _group(
        self,
        req: RolloutRequest,
        q: Any,
        plan: _Plan,
        samples: list[Any],
        ids: list[list[int]],
        scores: list[SampleScore],
    ) -> RolloutGroup:
        lengths = [len(r) for r in ids]
        raw = [score.raw for score in scores]
        shaped = raw
        if req.length_shaping:
            decisive = req.reward_terms()[req.correctness_index()]
            shaped = length_shaped_rewards(
                raw,
                lengths,
                req.alpha,
                req.shaping_low,
                req.shaping_high,
                correct=[score.correct for score in scores],
                contributions=[
                    decisive.weight * (score.scores.get(decisive.label()) or 0.0) for score in scores
                ],
            )
        if req.overlong_buffer_tokens > 0:
            shaped = [
                r + overlong_penalty(n, req.max_response_tokens, req.overlong_buffer_tokens)
                for r, n in zip(shaped, lengths, strict=True)
            ]
        prefix_len = len(plan.prefix)
        return RolloutGroup.model_construct(
            question_id=q.id,
            cache_hit=plan.hit,
            m=plan.m,
            prefix_len=prefix_len,
            seeded_cache=False,
            samples=[
                RolloutSample.model_construct(
                    response_ids=response,
                    prefix_len=prefix_len,
                    suffix_logprobs=s.logprobs,
                    finish_reason=s.finish_reason,
                    raw_reward=score.raw,
                    shaped_reward=sr,
                    correct=score.correct,
                    reward_scores=score.scores,
                )
                for s, response, score, sr in zip(samples, ids, scores, shaped, strict=True)
            ],
        )

    async def _seed_misses(self, req: RolloutRequest, groups: list[RolloutGroup], version: int) -> float:
        """Write one entry per missed question (never overwriting one that appeared meanwhile)."""
        if req.mode != "rpo" or not req.seed_cache_on_miss:
            return 0.0

        entries, seeded = [], []
        for group in groups:
            if group.cache_hit:
                continue
            for sample in group.samples:
                answer = cached_answer(sample.response_ids, sample.finish_reason)
                if answer:
                    entries.append(
                        PutEntry(
                            question_id=group.question_id,
                            token_ids=pack_token_ids(answer),
                            reward=sample.shaped_reward,
                            correct=sample.correct,
                            policy_version=version,
                            last_group_min_len=min(len(s.response_ids) for s in group.samples),
                        )
                    )
                    seeded.append(group)
                    break
        if not entries:
            return 0.0
        started = time.perf_counter()
        try:
            reply = await self.cache.put_entries(req.run_id, entries, overwrite=False)
        except ServiceCallError as exc:
            log.warning(
                "seeding %d cache entries after misses failed (%s); those questions stay misses",
                len(entries),
                exc,
                extra={"replica": self.replica, "phase": "cache seed", "run_id": req.run_id},
            )
            return time.perf_counter() - started
        skipped = set(reply.skipped_question_ids)
        for group in seeded:
            group.seeded_cache = group.question_id not in skipped
        self.metrics.cache_seeded.inc(reply.written)
        return time.perf_counter() - started

    def _count(self, req: RolloutRequest, groups: list[RolloutGroup], stats: RolloutStats) -> None:
        m = self.metrics
        m.generated_tokens.inc(stats.generated_tokens)
        m.reused_prefix_tokens.inc(stats.reused_prefix_tokens)
        for group in groups:
            m.rollout_groups.labels(
                "off" if req.mode == "full" else "hit" if group.cache_hit else "miss"
            ).inc()
