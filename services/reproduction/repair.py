"""The long task's repair property, measured: from prefixes cut out of WRONG answers, how often do the
model's continuations still reach the right answer?

This is RPO's situation exactly. The cache holds a wrong answer; a step cuts m ~ U{0..L} tokens off its end
and samples suffixes of at most m new tokens (the release code's budget) from the rest. On the short task a
wrong prefix can only be "fixed" by a compensating error. On the long task (`services.core.synthetic_long`)
a suffix can redo the check or the redo that went wrong, so some continuations are right. `repair_rate`
samples the model's own answers, keeps the wrong ones, cuts and continues them, and counts; beside it, two
controls: right answers cut and continued the same way, and fresh answers from scratch.

It runs the model with transformers on CPU (no service needed), for the tests and `bench/repair_rate.py`.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from services.core.algorithm import truncation_limit
from services.core.schemas.common import TruncationLimit
from services.core.synthetic import PROMPT_TEMPLATE
from services.core.synthetic_long import LongTaskConfig, check_answer, make_split
from services.models.tiny_model import EOS_ID, PAD_ID
from services.reproduction.statistics import bootstrap_interval


@dataclass
class RepairResult:
    questions_sampled: int
    """Questions whose answer was sampled to find wrong ones (the first answer of each is a fresh sample)."""
    wrong_answers: int
    """Wrong answers that were cut and continued."""
    continuations: int
    repaired: int
    """Continuations of wrong answers (prefix + suffix) whose answer is right."""
    answers_repaired: int
    """Wrong answers with at least one right continuation."""
    mean_cut_tokens: float
    right_answers: int = 0
    """Control: right answers cut and continued the same way."""
    right_continuations: int = 0
    kept: int = 0
    """Continuations of right answers that are still right."""
    fresh_samples: int = 0
    """Control: the answers sampled from scratch at the continuations' temperature, one per question."""
    fresh_correct: int = 0
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)
    """95% bootstrap intervals of `rate`, `kept_rate` and `fresh_rate`, resampling answers (questions)."""

    @property
    def rate(self) -> float:
        return self.repaired / max(1, self.continuations)

    @property
    def kept_rate(self) -> float:
        return self.kept / max(1, self.right_continuations)

    @property
    def fresh_rate(self) -> float:
        return self.fresh_correct / max(1, self.fresh_samples)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "rate": self.rate, "kept_rate": self.kept_rate, "fresh_rate": self.fresh_rate}


def _sample(model: Any, prompts: list[list[int]], max_new: list[int], temperature: float) -> list[list[int]]:
    """One sampled continuation per prompt (token ids), each cut at its own budget and at EOS (kept)."""
    # lazy: heavy import (torch), paid only on this path
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), PAD_ID, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):  # left padding: every continuation starts at the same column
        ids[row, width - len(prompt) :] = torch.tensor(prompt)
        mask[row, width - len(prompt) :] = 1
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=True,
            temperature=temperature,
            top_p=1.0,
            max_new_tokens=max(max_new),
            eos_token_id=EOS_ID,
            pad_token_id=PAD_ID,
        )
    results = []
    for row, budget in enumerate(max_new):
        new = out[row, width:].tolist()[:budget]
        if EOS_ID in new:
            new = new[: new.index(EOS_ID) + 1]
        results.append(new)
    return results


def repair_rate(
    model_dir: str | Path,
    task: LongTaskConfig,
    *,
    wrong_wanted: int = 48,
    max_questions: int = 400,
    limit: TruncationLimit = "0.5l",
    samples: int = 4,
    answer_temperature: float = 0.9,
    temperature: float = 1.0,
    max_answer_tokens: int = 640,
    batch_size: int = 64,
    seed: int = 0,
    split: str = "val",
) -> RepairResult:
    """Sample answers on the task's `split` questions (at the cache-init temperature) until `wrong_wanted`
    wrong, finished answers are found; cut m ~ U{1..L} tokens off each (L resolved against the answer's
    length, as the cache server does for a first visit) and sample `samples` suffixes of at most m tokens.

    Two controls, with the same temperature: as many right answers, cut and continued the same way (how
    often a continuation keeps a right answer right), and one fresh answer per question sampled from
    scratch (how often the model is right with no prefix at all)."""
    # lazy: heavy import (torch), paid only on this path
    import torch

    # lazy: heavy import (transformers), paid only on this path
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    rng = random.Random(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    rows = make_split(task, split)[:max_questions]
    found: dict[bool, list[tuple[dict, list[int], list[int]]]] = {False: [], True: []}
    sampled = 0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        prompts = [tokenizer(PROMPT_TEMPLATE.format(question=r["question"]))["input_ids"] for r in chunk]
        answers = _sample(model, prompts, [max_answer_tokens] * len(chunk), answer_temperature)
        sampled += len(chunk)
        for row, prompt, answer in zip(chunk, prompts, answers, strict=True):
            finished = bool(answer) and answer[-1] == EOS_ID
            text = tokenizer.decode(answer, skip_special_tokens=True)
            if finished:
                found[check_answer(text, row["answer"]) == 1.0].append((row, prompt, answer[:-1]))
        if len(found[False]) >= wrong_wanted:
            break
    wrong = found[False][:wrong_wanted]
    right = found[True][: len(wrong)]  # the control: as many right answers as wrong ones
    cuts: list[int] = []
    wrong_hits = _continue(model, tokenizer, wrong, limit, samples, temperature, batch_size, rng, cuts)
    right_hits = _continue(model, tokenizer, right, limit, samples, temperature, batch_size, rng, [])
    fresh = _fresh(model, tokenizer, rows[:sampled], max_answer_tokens, temperature, batch_size)
    return RepairResult(
        questions_sampled=sampled,
        wrong_answers=len(wrong),
        continuations=samples * len(wrong),
        repaired=sum(wrong_hits),
        answers_repaired=sum(1 for h in wrong_hits if h),
        mean_cut_tokens=sum(cuts) / max(1, len(cuts)),
        right_answers=len(right),
        right_continuations=samples * len(right),
        kept=sum(right_hits),
        fresh_samples=len(fresh),
        fresh_correct=sum(fresh),
        intervals={
            "rate": bootstrap_interval([h / samples for h in wrong_hits]),
            "kept_rate": bootstrap_interval([h / samples for h in right_hits]),
            "fresh_rate": bootstrap_interval(fresh),
        },
    )


def _continue(
    model: Any,
    tokenizer: Any,
    answers: list[tuple[dict, list[int], list[int]]],
    limit: TruncationLimit,
    samples: int,
    temperature: float,
    batch_size: int,
    rng: random.Random,
    cuts: list[int],
) -> list[int]:
    """Cut each answer as an RPO step does and count, per answer, its right continuations."""
    jobs: list[tuple[int, list[int], int]] = []  # (answer index, prompt + prefix, budget m)
    for index, (_, prompt, answer) in enumerate(answers):
        top = truncation_limit(limit, len(answer), len(answer))
        m = rng.randint(1, max(1, top))
        cuts.append(m)
        prefix = answer[: max(0, len(answer) - m)]
        jobs.extend((index, prompt + prefix, m) for _ in range(samples))
    hits = [0] * len(answers)
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        suffixes = _sample(model, [j[1] for j in chunk], [j[2] for j in chunk], temperature)
        for (index, ids, _), suffix in zip(chunk, suffixes, strict=True):
            row, prompt, _ = answers[index]
            text = tokenizer.decode(ids[len(prompt) :] + suffix, skip_special_tokens=True)
            hits[index] += int(check_answer(text, row["answer"]) == 1.0)
    return hits


def _fresh(
    model: Any, tokenizer: Any, rows: list[dict], max_tokens: int, temperature: float, batch_size: int
) -> list[float]:
    """One answer per question from scratch at `temperature`: 1.0 where it is right."""
    scores = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        prompts = [tokenizer(PROMPT_TEMPLATE.format(question=r["question"]))["input_ids"] for r in chunk]
        for row, answer in zip(
            chunk, _sample(model, prompts, [max_tokens] * len(chunk), temperature), strict=True
        ):
            scores.append(check_answer(tokenizer.decode(answer, skip_special_tokens=True), row["answer"]))
    return scores
