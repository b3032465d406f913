"""`rpo cache init`: seed the experience cache with one sampled answer per training question
(docs/algorithm.md, step 1).

Each answer is one full-path sample of the starting policy through the rollout service (mode `full`, G = 1,
at `sampling.init_temperature` / `init_top_p`, up to `sampling.init_max_tokens`), scored by the replica; it
is stored whether or not it is correct, without its trailing EOS (the stored answer is a state the policy
continues from). Questions are sampled and written in batches of `train.cache_init_batch_questions`.

Guarantees: resumable and safe to re-run: questions that already have an entry are skipped before
sampling, and the writes never overwrite (`overwrite=false`), so an entry the trainer has since updated is
kept. A sample with no token besides EOS cannot be stored; its question stays a miss, and its first
training rollout falls back to a full sample that seeds the entry.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from tqdm.auto import tqdm

from services.core.algorithm import cached_answer
from services.core.cli_args import UsageError, config_from_args, named_run_id
from services.core.config import RunConfig
from services.core.data import encode_prompt
from services.core.data_roles import training_questions
from services.core.schemas.cache import PutEntry
from services.models.model_path import resolve_model_path
from trainer.preflight import check_before_training
from trainer.rollouts.data_order import request_seed
from trainer.rollouts.services import RemoteServices

log = logging.getLogger("rpo.cache_init")


def seed_cache(
    cfg: RunConfig,
    remote: RemoteServices,
    questions: list | None = None,
    prompts: dict | None = None,
    min_policy_version: int = 0,
) -> dict[str, Any]:
    """Fill the cache for every training question that has no entry; returns counts and timings.
    `min_policy_version`: the trainer passes the version its replicas serve, so the answers are its policy's."""

    started = time.monotonic()
    if questions is None:
        questions = training_questions(cfg.data)
    if prompts is None:
        # lazy: heavy import (transformers), paid only on this path
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(
            resolve_model_path(cfg.model.path, cfg.model.revision),
            trust_remote_code=cfg.model.trust_remote_code,
        )
        prompts = {q.id: encode_prompt(tokenizer, q, cfg.data) for q in questions}
    batch_size = cfg.train.cache_init_batch_questions
    cached = remote.cached_question_ids([q.id for q in questions])
    todo = [q for q in questions if q.id not in cached]
    log.info(
        "cache init for run %s: %d of %d questions already cached, sampling %d",
        cfg.services.run_id,
        len(cached),
        len(questions),
        len(todo),
    )
    stats = {
        "questions": len(questions),
        "already_cached": len(cached),
        "written": 0,
        "empty": 0,
        "correct": 0,
    }
    generated = 0
    replicas = remote.replica_set.replicas()
    with tqdm(total=len(todo), desc="cache init", unit="q", disable=None) as bar:
        for index, start in enumerate(range(0, len(todo), batch_size)):
            chunk = todo[start : start + batch_size]
            batch = remote.replica_set.rollouts(
                replicas,
                chunk,
                prompts,
                settings=remote.plans.init(seed=request_seed(cfg.train.seed, 0, index)),
                min_policy_version=min_policy_version,
                phase="cache init",
            )
            generated += batch.generated_tokens
            entries = []
            for group in batch.groups:
                sample = group.samples[0]
                tokens = cached_answer(sample.response_ids, sample.finish_reason)
                if not tokens:
                    stats["empty"] += 1
                    continue
                stats["correct"] += int(sample.correct)
                entries.append(
                    PutEntry(
                        question_id=group.question_id,
                        token_ids=tokens,
                        reward=sample.raw_reward,
                        correct=sample.correct,
                        policy_version=batch.policy_version,
                    )
                )
            if entries:
                stats["written"] += remote.put_cache_entries(entries)
            bar.update(len(chunk))
    stats["generated_tokens"] = generated
    stats["seconds"] = time.monotonic() - started
    log.info(
        "cache init: wrote %d entries (%d correct, %d empty samples left as misses) in %.1f s",
        stats["written"],
        stats["correct"],
        stats["empty"],
        stats["seconds"],
    )
    return stats


def trainer_seeds_cache(cfg: RunConfig, resumed: bool) -> bool:
    """Whether the trainer seeds the cache before step 1: an RPO run starting fresh, with `train.seed_cache`.
    A resumed run restores its cache from the checkpoint instead; full-path runs have no cache."""
    return cfg.algorithm.mode == "rpo" and cfg.train.seed_cache and not resumed


def cache_init_main(args: Any) -> int:
    """`rpo cache init --config FILE`: needs `services.cache_url` and the rollout replicas."""

    cfg = config_from_args(args)
    if cfg.algorithm.mode != "rpo":
        raise UsageError("algorithm.mode is 'full': full-path runs use no cache, there is nothing to seed")
    named_run_id(cfg)  # the trainer must find these entries under the same id
    check_before_training(cfg)  # the same services and inputs the trainer needs, checked in seconds
    remote = RemoteServices(cfg)
    try:
        stats = seed_cache(cfg, remote)
    finally:
        remote.close()
    print(
        f"cache init (run {cfg.services.run_id}): {stats['written']} entries written, "
        f"{stats['already_cached']} already cached, {stats['empty']} empty samples left as misses"
    )
    return 0
