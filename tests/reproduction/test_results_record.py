"""docs/results.md is the committed record rendered: rendering docs/results/results.json again gives the
page byte for byte, and the record is the whole protocol at three seeds, with the plots the page shows."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from services.reproduction.protocols import ARMS
from services.reproduction.results_doc import render_results_doc

REPO = Path(__file__).resolve().parents[2]
RECORD = REPO / "docs/results/results.json"
PAGE = REPO / "docs/results.md"


@pytest.fixture(scope="module")
def record() -> dict:
    return json.loads(RECORD.read_text())


def test_the_committed_page_is_the_committed_record_rendered(record):
    assert render_results_doc(record, "docs/results/results.json") == PAGE.read_text(), (
        "docs/results.md differs from its record: render it again with "
        "`python -m services.reproduction.results_doc docs/results/results.json > docs/results.md`"
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
