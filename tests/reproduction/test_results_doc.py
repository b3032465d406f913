"""The reading's sentences that are computed from the per-step series, fed known values."""

from __future__ import annotations

from services.reproduction.results_doc import _length_reward_sentences

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


def test_the_epsilon_reading_counts_how_the_cache_entries_were_replaced():
    from services.reproduction.results_doc import _epsilon_sentences

    def arm(label: str, group: str, epsilon: float) -> dict:
        return {"label": label, "group": group, "settings": {**SETTINGS, "epsilon": epsilon}}

    def run(*steps: dict, accuracy: tuple[float, ...] = (0.5, 0.5)) -> dict:
        series = {"cache_updates": list(steps), "accuracy": list(accuracy), "step": [1, 2][: len(accuracy)]}
        return {"series": series, "evals": {"after": {"temperature": 0.6}}}

    results = {
        "arms": {
            "rpo": arm("RPO", "headline", 0.5),
            "eps0": arm("eps 0", "epsilon", 0.0),
            "eps1": arm("eps 1", "epsilon", 1.0),
        },
        "epsilon": {"rpo": {"after": {"mean": 0.01, "ci": [-0.01, 0.03]}}},
        "runs": {
            "rpo": {
                "0": run({"best": 1, "other": 1}),
                "1": run({"best": 2, "other": 0}, accuracy=(0.5, 0.7)),
            },
            "eps0": {"0": run({"best": 0, "other": 2}, accuracy=(0.4, 0.2))},
            "eps1": {"0": run({"best": 2, "other": 0}, {"best": 2}, accuracy=(0.6, 0.9))},
        },
        # one step per epoch: the last epoch is step 2
        "base_config": {"data": {"max_questions": 4}, "train": {"questions_per_step": 4}},
    }
    lines = _epsilon_sentences(results)
    assert lines[0] == (
        "- **The epsilon rule acted:** the group's best response replaced the cache entry in RPO 3 of 4; "
        "eps 0 0 of 2; eps 1 4 of 4 updates (summed over seeds)."
    )
    # training accuracy in the last epoch, by epsilon, beside the held-out differences
    assert (
        "(the mean over the last epoch's steps, 2-2, and over seeds) was eps 0 20.0%; RPO 60.0%; eps 1 90.0%"
        in lines[1]
    )
    assert lines[2].startswith("- **RPO - epsilon 0, T=0.6:** +1.0 points") and "holds zero" in lines[2]
    assert "no effect on held-out accuracy" in lines[2]
    # a record without its base configuration says nothing of training accuracy
    del results["base_config"]
    assert _epsilon_sentences(results)[1].startswith("- **RPO - epsilon 0")


def test_rpo_arms_at_two_limits_are_read_side_by_side_most_decoded_first():
    from services.reproduction.results_doc import _reuse_sentence

    def arm(label: str, group: str, limit: str, decoded: float) -> dict:
        settings = {**SETTINGS, "truncation_limit": limit}
        return {
            "label": label,
            "group": group,
            "settings": settings,
            "decoded_tokens_per_sample": decoded,
            "response_len_mean": 300.0,
        }

    results = {
        "arms": {
            "grpo": arm("GRPO", "headline", "0.5l", 300.0),
            "short": arm("RPO, L=0.1l", "timing", "0.1l", 15.0),
            "rpo": arm("RPO", "headline", "0.5l", 75.0),
        },
        "comparisons": {
            "short": {
                "full": "grpo",
                "accuracy_difference": {"after": {"mean": -0.04, "ci": [-0.06, -0.02]}},
            },
            "rpo": {"full": "grpo", "accuracy_difference": {"after": {"mean": -0.01, "ci": [-0.03, 0.01]}}},
        },
        "eval_labels": ["after"],
        "runs": {"grpo": {"0": {"evals": {"after": {"temperature": 0.6}}}}},
    }
    (line,) = _reuse_sentence(results)
    assert line == (
        "- **Decoded share and accuracy, T=0.6, against GRPO:** RPO (L = 0.5l) decoded 75 of 300 tokens per "
        "sample and is -1.0 points [-3.0, +1.0]; RPO, L=0.1l decoded 15 of 300 tokens per sample and is "
        "-4.0 points [-6.0, -2.0]."
    )
