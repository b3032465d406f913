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


def test_the_follow_up_sets_each_pair_beside_the_varied_records():
    """The fixed-budget follow-up's section, on a follow-up joined from committed runs: the varied record's
    alpha-0.1 variant at budget 160 (seed 0) filed as the follow-up's arm, against the varied record's GRPO
    run. Each figure in the budget-m column is the varied record's, each in the budget-160 column the
    follow-up's."""
    import copy
    import json
    from pathlib import Path

    from services.reproduction.formatting import pct, signed
    from services.reproduction.merge_records import merge_records, take_arms
    from services.reproduction.results_follow_up import follow_up_section

    results = Path(__file__).resolve().parents[2] / "docs/results/arith-long-var"
    varied = json.loads((results / "results.json").read_text())
    part = copy.deepcopy(json.loads((results / "parts/seed-0.json").read_text()))
    part["runs"] = {"rpo-grpo-alpha0.1-fixed160": {"0": part["runs"]["rpo-grpo-budget160"]["0"]}}
    part["arms"] = {"rpo-grpo-alpha0.1-fixed160": part["arms"]["rpo-grpo-budget160"]}
    part["seeds"] = [0]
    grpo = take_arms("varied.json:grpo-alpha0.1", varied, ["grpo-alpha0.1"])
    budget = merge_records([("rpo.json", part), ("varied.json:grpo-alpha0.1", grpo)], "arith-long-var-budget")
    page = "\n".join(follow_up_section(varied, budget, "docs/results/arith-long-var-budget/results.json"))

    def row(title: str, pair: str) -> str:
        table = page[page.index(f"**{pair}**") :]
        return next(line for line in table.splitlines() if line.startswith(f"| {title}"))

    pair = "RPO+GRPO, alpha 0.1, suffix budget 160 against GRPO, alpha 0.1"
    m_diff = varied["comparisons"]["rpo-grpo-alpha0.1"]["accuracy_difference"]["after"]["mean"]
    fixed_diff = budget["comparisons"]["rpo-grpo-alpha0.1-fixed160"]["accuracy_difference"]["after"]["mean"]
    line = row("RPO+GRPO - GRPO at equal steps, test, T=0.6", pair)
    assert f"| {signed(m_diff)} [" in line and f"| {signed(fixed_diff)} [" in line
    m_cut = varied["arms"]["rpo-grpo-alpha0.1"]["length_room"]["truncated_share"]
    fixed_cut = budget["arms"]["rpo-grpo-alpha0.1-fixed160"]["length_room"]["truncated_share"]
    assert row("RPO's responses cut at their budget", pair) == (
        f"| RPO's responses cut at their budget | {pct(m_cut)}% | {pct(fixed_cut)}% |"
    )
    assert fixed_cut < m_cut
    # A pair the follow-up has not run shows the varied record's figures beside dashes.
    line = row("RPO's responses cut at their budget", "rpo-grpo-fixed160 against GRPO, alpha 0.01")
    assert line.endswith("| - |")
    assert "`algorithm.suffix_budget: 160`" in page and "(results/arith-long-var-budget/" in page
    # A follow-up that ran its GRPO arms itself says so, with each record's starting model.
    own = {key: value for key, value in budget.items() if key != "parts"}
    own["eval_before"] = {**own["eval_before"], "before": {**own["eval_before"]["before"], "pass_at_1": 0.64}}
    page = "\n".join(follow_up_section(varied, own))
    assert "Every arm ran for this record." in page and "are its equal-step and length-reward rows" in page
    start = pct(varied["eval_before"]["before"]["pass_at_1"])
    assert f"starting model: pass@1 at T = 0.6 {start}% in the varied record, 64.0% here." in page
