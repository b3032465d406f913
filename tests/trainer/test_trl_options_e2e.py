"""A TRL-style script means the same here: a -1 penalty function and a partial-credit function on a prompt-only
dataset, with `loss_type: dr_grpo` and `scale_rewards: none`, trains real `rpo train` steps (the warm tiny
model, the shared replicas and cache server), and on each step's fixed batch the rewards, advantages and the
learner's loss are TRL's definitions, computed here by hand from the sampled completions the run logged
(`train.log_completions`, every response)."""

from __future__ import annotations

import json

import pytest

from services.core.synthetic import SyntheticTaskConfig, make_split

REWARDS = r'''
import re


def step_penalty(completions, **kwargs):
    """TRL-style penalty that needs no reference: -1 when a step `a+b=c` of the working is wrong, else 0."""
    def wrong(text):
        return any(int(a) + int(b) != int(c) for a, b, c in re.findall(r"(\d+)\+(\d+)=(\d+)", text))

    return [-1.0 if wrong(c) else 0.0 for c in completions]


def brevity(completions, completion_ids, **kwargs):
    """Partial credit for short completions: 1 - tokens / 64."""
    return [1.0 - len(ids) / 64 for ids in completion_ids]
'''

MAX_TOKENS = 64


def test_a_trl_script_with_a_penalty_on_prompts_only_trains_with_trls_rewards_and_dr_grpo_loss(
    tmp_path, warm_model_dir, rollout_cache_url, training_replicas
):
    from tests.trainer.training_helpers import run_config, run_trainer
    from trainer.telemetry.completions import read_completions
    from trainer.telemetry.progress import read_records

    (tmp_path / "my_rewards.py").write_text(REWARDS)
    rows = [{"prompt": r["question"]} for r in make_split(SyntheticTaskConfig(train_size=40), "train")]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    functions = [
        {"function": f"{tmp_path / 'my_rewards.py'}:step_penalty"},
        {"function": f"{tmp_path / 'my_rewards.py'}:brevity", "weight": 0.5},
    ]
    cfg, config_file = run_config(
        tmp_path,
        warm_model_dir,
        rollout_cache_url,
        [r.url for r in training_replicas],
        f"data.dataset={tmp_path / 'prompts.jsonl'}",
        "data.question_field=prompt",
        "data.answer_field=null",
        f"reward.functions={json.dumps(functions)}",
        "algorithm.mode=full",
        "algorithm.loss_type=dr_grpo",
        "algorithm.scale_rewards=none",
        f"algorithm.max_response_tokens={MAX_TOKENS}",
        "train.max_steps=2",
        "train.log_completions=true",
        "train.num_completions_to_log=null",
    )
    output = run_trainer(config_file, log_path=tmp_path / "trainer.log")
    assert "length-aware shaping is on" in output  # said plainly with a user's functions

    records = read_records(cfg.train.run_dir, "step")
    completions = read_completions(cfg.train.run_dir)
    assert [r["step"] for r in records] == [1, 2]
    beta, group_size = cfg.algorithm.beta, cfg.algorithm.group_size
    penalised = 0
    for record in records:
        rows = [c for c in completions if c["step"] == record["step"]]
        assert len(rows) == record["samples"] == cfg.train.questions_per_step * group_size
        for row in rows:
            scores = row["reward_scores"]
            # TRL's reward: the weighted sum, the -1 kept; no response is "correct" (the first function's
            # score never reaches 1), so shaping leaves every reward as written
            assert row["raw_reward"] == pytest.approx(scores["step_penalty"] + 0.5 * scores["brevity"])
            assert scores["brevity"] == pytest.approx(1 - row["length"] / MAX_TOKENS)
            assert row["shaped_reward"] == row["raw_reward"]
            penalised += scores["step_penalty"] == -1.0
        assert record["raw_reward_mean"] == pytest.approx(sum(r["raw_reward"] for r in rows) / len(rows))
        # scale_rewards none: A_i = R_i - mean of its group (TRL: no division by the std)
        by_question: dict[str, list[dict]] = {}
        for row in rows:
            by_question.setdefault(row["question_id"], []).append(row)
        for group in by_question.values():
            assert len(group) == group_size
            mean = sum(r["shaped_reward"] for r in group) / group_size
            for r in group:
                assert r["advantage"] == pytest.approx(r["shaped_reward"] - mean, abs=1e-9)
        # dr_grpo with one update per batch (ratio 1): loss = sum_i sum_t (-A_i + beta k3_t) / (N x L_max),
        # and sum_t k3_t over the batch = the record's token-mean KL x loss tokens
        n = len(rows)
        learner = record["learner"]
        assert learner["tokens"] == sum(r["length"] for r in rows)
        expected = (
            -sum(r["advantage"] * r["length"] for r in rows) + beta * learner["kl"] * learner["tokens"]
        ) / (n * MAX_TOKENS)
        assert learner["loss"] == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert records[0]["learner"]["kl"] == pytest.approx(0.0, abs=1e-6)  # step 1: the policy is the reference
    assert all(0 < r["learner"]["entropy"] < 20 for r in records)  # nats, over a small vocabulary
    assert penalised > 0, "no completion was penalised: the -1 never reached the advantages"
    assert min(r["raw_reward"] for r in completions) < 0
