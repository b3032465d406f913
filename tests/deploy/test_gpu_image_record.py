"""The GPU image's committed record (bench/gpu_image/check.py, run where the image was built) against what
the repo says of it: the versions inside are the pins of deploy/constraints-gpu.txt, every check passed,
no duplicated CUDA library is of the Dockerfile's making, and docs/deploy.md quotes the record's figures."""

from __future__ import annotations

import json
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RECORD = REPO / "docs" / "records" / "gpu-image-2026-12-07.json"


def pins() -> dict[str, str]:
    lines = (REPO / "deploy" / "constraints-gpu.txt").read_text().splitlines()
    found = (re.match(r"^([A-Za-z0-9_.-]+)==([^\s;#]+)", line) for line in lines)
    return {m.group(1).lower(): m.group(2) for m in found if m}


def test_the_gpu_image_record_holds_the_pinned_versions_and_passed_every_check():
    record = json.loads(RECORD.read_text())
    assert record["failed"] == [] and all(c["status"] == "ok" for c in record["checks"])
    pinned = pins()
    for package in ("torch", "vllm", "deepspeed", "transformers", "peft"):
        assert record["versions"][package].split("+")[0] == pinned[package], package
    assert record["versions"]["torch"].endswith("+cu130") and record["versions"]["cuda"] == "13.0"
    assert record["duplicates_of_our_making"] == []


def test_the_deploy_page_quotes_the_records_figures():
    record = json.loads(RECORD.read_text())
    page = (REPO / "docs" / "deploy.md").read_text()
    assert RECORD.name in page
    assert f"| {record['build_seconds']:.0f} s |" in page
    assert f"{record['image_bytes'] / 1e9:.2f} GB" in page
    copies = record["duplicated_cuda_libraries"]
    extra = sum(d["extra_bytes"] for d in copies) / 1e6
    assert f"| {len(copies)} ({extra:.0f} MB beyond one copy each)" in page
