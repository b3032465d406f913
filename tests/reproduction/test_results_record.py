"""docs/results.md is the committed records rendered: rendering docs/results/results.json, the varied-length
task's record and the fixed-budget follow-up's again gives the page byte for byte; the records are their
protocols at three seeds, the second joined from its committed parts (joining them again gives it byte for
byte), and the page shows the plots it names."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from services.reproduction.merge_records import merge_records
from services.reproduction.protocols import ARMS, PROTOCOLS
from services.reproduction.results_doc import VARIED_RECORD, render_results_doc
from services.reproduction.results_follow_up import BUDGET_RECORD

REPO = Path(__file__).resolve().parents[2]
RECORD = REPO / "docs/results/results.json"
PAGE = REPO / "docs/results.md"
VARIED_PARTS = "docs/results/arith-long-var/parts"


@pytest.fixture(scope="module")
def record() -> dict:
    return json.loads(RECORD.read_text())


@pytest.fixture(scope="module")
def varied() -> dict:
    return json.loads((REPO / VARIED_RECORD).read_text())


@pytest.fixture(scope="module")
def budget() -> dict:
    return json.loads((REPO / BUDGET_RECORD).read_text())


def test_the_committed_page_is_the_committed_records_rendered(record, varied, budget):
    rendered = render_results_doc(record, "docs/results/results.json", varied, VARIED_RECORD, budget)
    assert rendered == PAGE.read_text(), (
        "docs/results.md differs from its records: render it again with `python -m "
        f"services.reproduction.results_doc docs/results/results.json {VARIED_RECORD} {BUDGET_RECORD} > "
        "docs/results.md`"
    )


def test_the_follow_up_record_is_its_whole_protocol_at_three_seeds(budget):
    protocol = PROTOCOLS["arith-long-var-budget"]
    assert budget["seeds"] == [0, 1, 2] and not budget.get("smoke")
    assert budget["command"] == "rpo reproduce --task arith-long-var-budget --seeds 3"
    assert re.fullmatch(r"[0-9a-f]{40}", budget["commit"]), "the record must name a clean commit"
    assert set(budget["arms"]) == set(protocol.arm_names)
    for name in protocol.arm_names:
        assert budget["arms"][name]["seeds"] == [0, 1, 2], name
        assert budget["arms"][name]["length_room"]["steps"] == 36, name
    for rpo, _ in protocol.headline_pairs:
        assert budget["arms"][rpo]["settings"]["suffix_budget"] == 160
    assert "## The fixed-budget follow-up" in PAGE.read_text()


def test_the_varied_record_is_its_protocol_at_three_seeds_from_clean_commits(varied):
    protocol = PROTOCOLS["arith-long-var"]
    assert varied["seeds"] == [0, 1, 2]
    assert varied["command"].startswith("rpo reproduce --task arith-long-var")
    assert re.fullmatch(r"[0-9a-f]{40}", varied["commit"]), "the record must name a clean commit"
    for part in varied["parts"]:
        assert part["command"].startswith("rpo reproduce --task arith-long-var"), part["command"]
        assert re.fullmatch(r"[0-9a-f]{40}", part["commit"]), "each part must name a clean commit"
    assert varied["task"] == "builtin:arith-long-var on builtin:tiny-warm-long-var"
    for arm in protocol.arms:
        row = varied["arms"][arm.name]
        assert row["seeds"] == ([0] if arm.first_seed_only else varied["seeds"]), arm.name
        assert row["length_room"]["steps"] == 12 * len(row["seeds"]), arm.name
    page = PAGE.read_text()
    assert "## The second task: correct answers that vary in length" in page
    assert "### Both tasks side by side" in page


def test_the_varied_record_is_its_committed_parts_joined(varied):
    parts = sorted((REPO / VARIED_PARTS).glob("*.json"))
    assert [p.name for p in parts] == ["seed-0.json", "seeds-1-2.json"]
    names = [p.relative_to(REPO).as_posix() for p in parts]
    joined = merge_records(
        [(name, json.loads((REPO / name).read_text())) for name in names], "arith-long-var"
    )
    assert joined["joined_by"] == varied["joined_by"]
    assert json.dumps(joined, indent=2, default=str) + "\n" == (REPO / VARIED_RECORD).read_text(), (
        f"{VARIED_RECORD} is not its parts joined: `{varied['joined_by']} > {VARIED_RECORD}`"
    )


def test_the_record_is_the_whole_protocol_at_three_seeds(record):
    assert record["seeds"] == [0, 1, 2]
    assert record["command"].startswith("rpo reproduce") and "--smoke" not in record["command"]
    assert re.fullmatch(r"[0-9a-f]{40}", record["commit"]), "the record must name a clean commit"
    for arm in ARMS:
        row = record["arms"][arm.name]
        assert row["seeds"] == ([0] if arm.first_seed_only else [0, 1, 2]), arm.name


def test_every_image_the_page_shows_is_committed():
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", PAGE.read_text())
    assert images
    for image in images:
        assert (PAGE.parent / image).read_bytes().startswith(b"\x89PNG\r\n\x1a\n"), image


def test_the_learning_rate_check_in_the_docs_is_its_records(varied):
    """docs/training.md's learning-rate table (the varied-length protocol) is the final validation pass@1 of
    the records it names, and its 2e-5 row the varied record's seed 0."""
    text = (REPO / "docs/training.md").read_text()
    finals = {
        "2e-5": {
            arm: varied["runs"][arm]["0"]["evals"]["val after"]["pass_at_1"] for arm in ("grpo", "rpo-grpo")
        }
    }
    for rate in ("1e-5", "4e-5"):
        probe = json.loads((REPO / f"docs/records/lr-probe-var-2026-12-07/lr-{rate}.json").read_text())
        assert probe["base_config"]["train"]["lr"] == float(rate) and probe["seeds"] == [0]
        assert re.fullmatch(r"[0-9a-f]{40}", probe["commit"]), "the probe must name a clean commit"
        finals[rate] = {
            arm: probe["runs"][arm]["0"]["evals"]["val after"]["pass_at_1"] for arm in ("grpo", "rpo-grpo")
        }
    for rate, final in finals.items():
        grpo, rpo = 100 * final["grpo"], 100 * final["rpo-grpo"]
        row = re.search(
            rf"^  \| {re.escape(rate)}[^|]* \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([-+\d.]+) \|$", text, re.M
        )
        assert row, rate
        assert [float(v) for v in row.groups()] == pytest.approx([grpo, rpo, (grpo + rpo) / 2, rpo - grpo]), (
            rate
        )
    chosen = max(finals, key=lambda rate: sum(finals[rate].values()))
    assert f"By the rule, validation chooses {chosen}" in text


def test_the_rebuilt_warm_model_is_the_first_parts(varied):
    """The varied record's second part rebuilt the warm model; evaluated with seed 0's sampling it scores each
    test question as the first part's starting evaluation did (docs/training.md, "How the record was run")."""
    check = json.loads((REPO / "docs/records/warm-var-rebuilt-2026-12-07.json").read_text())
    assert check["command"].endswith("--set train.seed=0")
    rebuilt = {q: c / n for q, (n, c) in check["eval"]["correct_per_question"].items()}
    assert rebuilt == varied["runs"]["grpo"]["0"]["evals"]["before"]["per_question"]
    assert varied["parts"][1]["eval_before"]["before"]["pass_at_1"] != check["eval"]["pass_at_1"]
