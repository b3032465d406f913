"""`rpo data inspect PATH [--set data....]`: a dataset loaded exactly as training loads it, and what the
model and the reward will make of it, before any service starts. Prints the row count, the repeats dropped
and ids derived (services/core/data.py), one prompt as the model will see it, and how the configured reward
scores each reference answer given back as a response. A bad row is one message with the file, line and
field (exit 2), as in training.
"""

from __future__ import annotations

import argparse

from services.core.cli_args import UsageError, config_from_args
from services.core.data import DatasetError, build_prompt_text, encode_prompt, load_dataset
from services.core.data_sources import Source
from services.core.reward_terms import ScoringGroup, score_groups
from services.core.rewards import RewardSpecError, resolve_reward
from services.models.model_path import resolve_model_path

SCORED_ROWS = 200
"""How many reference answers are scored against themselves (math-verify takes a few ms each)."""


def final_answer(reference: str) -> str:
    """What a model's boxed answer would hold: GSM8K's number after the last `####`, else the reference."""
    return reference.rsplit("####", 1)[1].strip() if "####" in reference else reference.strip()


def inspect_main(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    try:
        loaded = load_dataset(
            Source(args.path, cfg.data.subset, cfg.data.split, cfg.data.revision, setting="PATH"), cfg.data
        )
        terms = cfg.reward.reward_terms()
        for term in terms:
            resolve_reward(term.function, args.path)
    except (DatasetError, RewardSpecError) as exc:
        raise UsageError(str(exc)) from None
    # lazy: heavy import (transformers), paid only on this path
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        resolve_model_path(cfg.model.path, cfg.model.revision), trust_remote_code=cfg.model.trust_remote_code
    )
    example = loaded.questions[0]
    prompt = build_prompt_text(tokenizer, example, cfg.data)
    prompt_ids = encode_prompt(tokenizer, example, cfg.data)
    scored = loaded.questions[:SCORED_ROWS]
    groups = [
        ScoringGroup(
            question_id=q.id,
            reference=q.answer,
            texts=[f"\\boxed{{{final_answer(q.answer)}}}"],
            completion_ids=[[]],
            prompt=q.prompt_as_given(),
            columns=q.columns,
        )
        for q in scored
    ]
    scores = [group[0] for group in score_groups(terms, cfg.reward.correctness_index(), args.path, groups)]
    perfect = sum(1 for s in scores if s.correct)
    print(f"dataset: {args.path}")
    print(
        f"rows: {loaded.rows}; questions: {len(loaded.questions)}; repeats dropped: {loaded.repeats_dropped}; ids derived from the question text: {loaded.derived_ids}"
    )
    conversational = sum(1 for q in loaded.questions if q.messages)
    if conversational:
        print(
            f"conversational rows ({cfg.data.messages_field}): {conversational}; the example's turns: "
            + ", ".join(role for role, _ in example.messages)
        )
    print(f"example ({example.id}), as the model sees it ({len(prompt_ids)} tokens, model {cfg.model.path}):")
    print("-" * 80)
    print(prompt)
    print("-" * 80)
    print(f"reference answer: {example.answer!r}")
    print(f"columns the reward functions get: {', '.join(example.columns) or 'none'}")
    decisive = terms[cfg.reward.correctness_index()].label()
    print(
        f"each reference answer given back boxed: correct ({decisive}) on {perfect} of {len(scored)} rows"
        + ("" if perfect == len(scored) else " (check data.answer_field and the reward functions)")
    )
    if len(terms) > 1:
        means = {t.label(): sum(s.scores[t.label()] or 0.0 for s in scores) / len(scores) for t in terms}
        print("mean score per reward function: " + ", ".join(f"{k} {v:.3f}" for k, v in means.items()))
    return 0
