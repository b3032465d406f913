"""The reading's sentences that are computed from the per-step series, fed known values."""

from __future__ import annotations

from services.supervisor.results_doc import _length_reward_sentences

SETTINGS = {"algorithm": "grpo", "mode": "rpo", "alpha": 0.01, "seed": 0}


def _results(rewards: list[float], twin_tokens: list[int]) -> dict:
    series = {"reward_mean": rewards, "accuracy": [0.5, 0.5], "generated_tokens": [100, 120]}
    twin = {"reward_mean": [0.25, 0.25], "accuracy": [0.5, 0.5], "generated_tokens": twin_tokens}
    return {
        "base_config": {"algorithm": {"shaping_low": 0.5}},
        "arms": {
            "rpo": {"label": "RPO", "group": "headline", "settings": SETTINGS},
            "rpo-0": {"label": "RPO, no length", "group": "headline", "settings": {**SETTINGS, "alpha": 0.0}},
        },
        "runs": {"rpo": {"0": {"series": series}}, "rpo-0": {"0": {"series": twin}}},
    }


def test_the_length_reward_counts_the_steps_where_a_correct_response_scored_above_the_floor():
    # accuracy 0.5 and floor 0.5: a mean reward of 0.25 is every correct response at the floor
    (line,) = _length_reward_sentences(_results([0.25, 0.26], [100, 120]))
    assert "at 1 of 2 steps" in line and "RPO and RPO, no length decoded the same number of tokens" in line
    (line,) = _length_reward_sentences(_results([0.25, 0.25], [100, 121]))
    assert "at 0 of 2 steps" in line and "decoded the same" not in line
