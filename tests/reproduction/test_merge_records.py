"""Joining a protocol's records made in parts (services/reproduction/merge_records.py), on a committed part of the
varied-length record: the joined record is every figure recomputed over all the parts' runs, and parts that
are not one protocol, one machine and one starting model are refused with what differs."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from services.reproduction.merge_records import MergeError, _plan, main, merge_records, take_arms
from services.reproduction.protocols import PROTOCOLS
from services.reproduction.results import results_from_runs

REPO = Path(__file__).resolve().parents[2]
RECORD = REPO / "docs/results/arith-long-var/parts/seed-0.json"  # one part of the committed record
TASK = "arith-long-var"


@pytest.fixture(scope="module")
def committed():
    return json.loads(RECORD.read_text())


def one_seed(record: dict, seed: int) -> dict:
    """A part holding only `seed`'s runs of the headline arms, as `rpo reproduce --seeds 1 --set
    train.seed=S --arms <headline>` writes it (rows taken from the record's earliest seed)."""
    first = str(min(record["seeds"]))
    headline = {arm for pair in PROTOCOLS[TASK].headline_pairs for arm in pair}
    part = copy.deepcopy(record)
    part["runs"] = {
        arm: {str(seed): by_seed[first]} for arm, by_seed in part["runs"].items() if arm in headline
    }
    part["seeds"] = [seed]
    part["command"] = f"rpo reproduce --task {TASK} --seeds 1 --set train.seed={seed}"
    return part


def base_part(record: dict) -> dict:
    part = copy.deepcopy(record)
    part["runs"] = {arm: {"0": by_seed["0"]} for arm, by_seed in part["runs"].items()}
    part["seeds"] = [0]
    return part


def test_the_joined_record_recomputes_every_figure_over_all_the_parts(committed):
    first, second = base_part(committed), one_seed(committed, 5)
    merged = merge_records([("first", first), ("second", second)], TASK)
    assert merged["seeds"] == [0, 5]
    # The headline arms hold both seeds; the variants, run at the first seed only, one.
    assert merged["arms"]["rpo-grpo"]["seeds"] == [0, 5]
    assert merged["arms"]["rpo-grpo-budget160"]["seeds"] == [0]
    assert (
        merged["arms"]["rpo-grpo"]["length_room"]["steps"]
        == 2 * first["arms"]["rpo-grpo"]["length_room"]["steps"]
    )
    assert merged["comparisons"]["rpo-grpo"]["seeds"] == [0, 5]
    # Each part's command and commit are kept; the wall time adds up.
    assert [p["seeds"] for p in merged["parts"]] == [[0], [5]]
    assert (
        merged["command"].startswith(f"rpo reproduce --task {TASK}")
        and second["command"] in merged["command"]
    )
    part_seconds = [
        sum(row["wall_seconds"] for by_seed in part["runs"].values() for row in by_seed.values())
        for part in (first, second)
    ]
    assert merged["wall_seconds_by_seed"] == pytest.approx({0: part_seconds[0], 5: part_seconds[1]})
    # The figures are the ones computed from the rows directly.
    rows = {arm: {int(s): row for s, row in by_seed.items()} for arm, by_seed in first["runs"].items()}
    for arm, by_seed in second["runs"].items():
        rows[arm].update({int(s): row for s, row in by_seed.items()})
    direct = results_from_runs(rows, _plan(TASK, [0, 5]), {})
    as_json = lambda value: json.loads(json.dumps(value))  # noqa: E731
    assert as_json(merged["comparisons"]) == as_json(direct["comparisons"])
    assert as_json(merged["arms"]) == as_json(direct["arms"])
    assert merged["targets"] == direct["targets"]


def test_a_run_held_by_two_parts_is_refused(committed):
    with pytest.raises(MergeError, match="both hold arm grpo at seed 0"):
        merge_records([("a", base_part(committed)), ("b", one_seed(committed, 0))], TASK)


def split_by_arms(record: dict) -> tuple[dict, dict]:
    """Seed 0 in two parts, as `--arms` runs it: the headline arms, then the variants."""
    headline = {arm for pair in PROTOCOLS[TASK].headline_pairs for arm in pair}
    first, second = base_part(record), base_part(record)
    first["runs"] = {arm: rows for arm, rows in first["runs"].items() if arm in headline}
    second["runs"] = {arm: rows for arm, rows in second["runs"].items() if arm not in headline}
    return first, second


def test_parts_at_one_seed_must_have_evaluated_the_same_starting_model(committed):
    first, second = split_by_arms(committed)
    assert merge_records([("a", first), ("b", second)], TASK)["seeds"] == [0]
    question = next(iter(second["runs"]["rpo-grpo-budget160"]["0"]["evals"]["before"]["per_question"]))
    for by_seed in second["runs"].values():
        scores = by_seed["0"]["evals"]["before"]["per_question"]
        scores[question] = 1.0 - scores[question]
    with pytest.raises(MergeError, match="different starting models: 'before' differs on 1 of"):
        merge_records([("a", first), ("b", second)], TASK)


def test_a_later_seed_shares_the_first_parts_starting_evaluation_and_keeps_its_own(committed):
    first, second = base_part(committed), one_seed(committed, 1)
    for by_seed in second["runs"].values():  # sampled with seed 1: other scores
        for label in ("before", "before T=1", "val before"):
            by_seed["1"]["evals"][label]["per_question"] = {
                q: 1.0 - v for q, v in by_seed["1"]["evals"][label]["per_question"].items()
            }
    second["eval_before"] = {"before": {"pass_at_1": 0.123}}
    merged = merge_records([("a", first), ("b", second)], TASK)
    theirs = first["runs"]["grpo"]["0"]["evals"]
    for arm in ("grpo", "rpo-grpo"):
        for label in ("before", "before T=1", "val before"):
            assert merged["runs"][arm]["1"]["evals"][label]["per_question"] == theirs[label]["per_question"]
    assert merged["eval_before"]["before"]["pass_at_1"] == theirs["before"]["pass_at_1"]
    assert merged["parts"][1]["eval_before"] == {"before": {"pass_at_1": 0.123}}
    # The caller's records are not changed.
    assert second["runs"]["grpo"]["1"]["evals"]["before"]["per_question"] != theirs["before"]["per_question"]


def test_another_configuration_or_machine_is_refused(committed):
    changed = one_seed(committed, 1)
    changed["base_config"]["train"]["lr"] = 1e-4
    with pytest.raises(MergeError, match=r"b and a ran with another base_config \(differs in train\.lr"):
        merge_records([("a", base_part(committed)), ("b", changed)], TASK)
    moved = one_seed(committed, 1)
    moved["machine"] = {**moved["machine"], "cpu": "another CPU"}
    with pytest.raises(MergeError, match="step times from two machines"):
        merge_records([("a", base_part(committed)), ("b", moved)], TASK)
    smoke = {**one_seed(committed, 1), "smoke": True}
    with pytest.raises(MergeError, match="smoke record"):
        merge_records([("a", base_part(committed)), ("b", smoke)], TASK)
    empty = {**one_seed(committed, 1), "runs": {}, "seeds": []}
    with pytest.raises(MergeError, match="b holds no finished run"):
        merge_records([("a", base_part(committed)), ("b", empty)], TASK)
    outside = one_seed(committed, 1)
    outside["runs"]["rpo-grpo-budget160"] = {"1": committed["runs"]["rpo-grpo-budget160"]["0"]}
    with pytest.raises(MergeError, match="outside the arith-long-var protocol.*rpo-grpo-budget160 seed 1"):
        merge_records([("a", base_part(committed)), ("b", outside)], TASK)


def test_the_command_writes_the_record_and_names_a_bad_file(committed, tmp_path, capsys):
    first, second = tmp_path / "first.json", tmp_path / "second.json"
    first.write_text(json.dumps(base_part(committed)))
    second.write_text(json.dumps(one_seed(committed, 1)))
    assert main(["--task", TASK, str(first), str(second)]) == 0
    assert json.loads(capsys.readouterr().out)["seeds"] == [0, 1]
    second.write_text('{"runs": {}}')
    assert main(["--task", TASK, str(first), str(second)]) == 2
    err = capsys.readouterr().err
    assert str(second) in err and "not an `rpo reproduce` record" in err and "base_config" in err
    second.write_text("{not json")
    assert main(["--task", TASK, str(first), str(second)]) == 2
    assert str(second) in capsys.readouterr().err


def test_the_part_with_the_lowest_seed_comes_first_whatever_the_order_given(committed):
    first, second = base_part(committed), one_seed(committed, 1)
    second["commit"], second["eval_before"] = "f" * 40, {"before": {"pass_at_1": 0.5}}
    for by_seed in second["runs"].values():
        by_seed["1"]["evals"]["before"]["per_question"] = {}
    given = merge_records([("a", first), ("b", second)], TASK)
    reversed_ = merge_records([("b", second), ("a", first)], TASK)
    assert reversed_["eval_before"] == given["eval_before"] == committed["eval_before"]
    assert [p["seeds"] for p in reversed_["parts"]] == [[0], [1]]
    assert reversed_["arms"] == given["arms"]
    # On one day, the commit named is the part given last (the later run).
    assert given["commit"] == "f" * 40 and reversed_["commit"] == committed["commit"]


FOLLOW_UP = "arith-long-var-budget"


def renamed(record: dict, arm: str, to: str) -> dict:
    """A part holding only `arm`'s seed-0 run, filed under the name `to` (its settings unchanged)."""
    part = base_part(record)
    part["runs"] = {to: part["runs"][arm]}
    part["arms"] = {to: {**part["arms"][arm], "name": to}}
    return part


def test_a_follow_up_takes_its_full_path_arms_from_an_earlier_record(committed, tmp_path, capsys):
    # The varied record's one-seed variant has exactly the follow-up's alpha-0.1 fixed-budget settings.
    rpo_part = renamed(committed, "rpo-grpo-budget160", "rpo-grpo-alpha0.1-fixed160")
    grpo_part = take_arms("varied", committed, ["grpo-alpha0.1"])
    assert set(grpo_part["runs"]) == {"grpo-alpha0.1"} and grpo_part["seeds"] == [0]
    merged = merge_records([("rpo", rpo_part), ("varied", grpo_part)], FOLLOW_UP)
    assert merged["parts"][1]["arms_taken"] == ["grpo-alpha0.1"]
    # The pair's comparison is the variant's in the varied record: the same two runs.
    ours = merged["comparisons"]["rpo-grpo-alpha0.1-fixed160"]
    theirs = committed["comparisons"]["rpo-grpo-budget160"]
    as_json = lambda value: json.loads(json.dumps(value))  # noqa: E731
    assert as_json(ours["accuracy_difference"]) == theirs["accuracy_difference"]
    assert ours["full"] == "grpo-alpha0.1"
    # The command line takes FILE:ARM,ARM.
    rpo_file, varied_file = tmp_path / "rpo.json", tmp_path / "varied.json"
    rpo_file.write_text(json.dumps(rpo_part))
    varied_file.write_text(json.dumps(committed))
    assert main(["--task", FOLLOW_UP, str(rpo_file), f"{varied_file}:grpo-alpha0.1"]) == 0
    assert (
        json.loads(capsys.readouterr().out)["comparisons"]["rpo-grpo-alpha0.1-fixed160"][
            "accuracy_difference"
        ]
        == (theirs["accuracy_difference"])
    )
    # Without the selection the varied record brings runs the follow-up does not plan.
    assert main(["--task", FOLLOW_UP, str(rpo_file), str(varied_file)]) == 2
    assert "outside the arith-long-var-budget protocol" in capsys.readouterr().err
    assert main(["--task", FOLLOW_UP, str(rpo_file), f"{varied_file}:grpo-alpha0.1,dapo"]) == 2
    assert f"{varied_file}:grpo-alpha0.1,dapo holds no run of arm dapo" in capsys.readouterr().err


def test_a_run_made_with_other_settings_than_its_arm_is_refused(committed):
    # Filed as the alpha-0.01 fixed-budget arm, but run at alpha 0.1.
    wrong = renamed(committed, "rpo-grpo-budget160", "rpo-grpo-fixed160")
    grpo_part = take_arms("varied", committed, ["grpo"])
    with pytest.raises(
        MergeError, match=r"arm rpo-grpo-fixed160 ran with other settings.*alpha \(0\.1 against 0\.01\)"
    ):
        merge_records([("rpo", wrong), ("varied", grpo_part)], FOLLOW_UP)


def test_a_part_spec_names_a_file_and_perhaps_its_arms(tmp_path, capsys):
    from services.reproduction.merge_records import _part_spec

    assert _part_spec("a/b.json") == (Path("a/b.json"), [])
    assert _part_spec("dir:x/b.json") == (Path("dir:x/b.json"), [])  # a colon inside the path
    assert _part_spec("a/b.json: grpo, grpo-no-length") == (Path("a/b.json"), ["grpo", "grpo-no-length"])
    with pytest.raises(MergeError, match="name the arms to take"):
        _part_spec("a/b.json:,")
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    assert main(["--task", TASK, str(listed), f"{listed}:grpo"]) == 2
    assert "not a JSON object" in capsys.readouterr().err
