"""A prompt-only dataset (no reference column, `data.answer_field: null`) loads with empty references, and
is refused, naming the functions, when a reward function compares against a reference."""

from __future__ import annotations

import json

import pytest

from services.core.config import ConfigError, load_config
from services.core.data import load_questions
from services.core.data_sources import DatasetError


def test_a_prompt_only_dataset_loads_with_empty_references(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Say {w}."}) + "\n" for w in ("hi", "bye")))
    cfg = load_config(
        None,
        ["data.answer_field=null", "data.question_field=prompt", "reward.functions=[{function: format}]"],
    )
    questions = load_questions(str(path), cfg.data)
    assert [(q.question, q.answer) for q in questions] == [("Say hi.", ""), ("Say bye.", "")]
    # with the answer field named, the same file is refused (the column is missing)
    with pytest.raises(DatasetError, match="missing field 'answer'"):
        load_questions(str(path), load_config(None, ["data.question_field=prompt"]).data)


def test_a_reward_that_needs_a_reference_refuses_a_prompt_only_dataset():
    with pytest.raises(
        ConfigError, match=r"prompt-only dataset\), but the reward function\(s\) exact compare"
    ):
        load_config(
            None, ["data.answer_field=null", "reward.functions=[{function: exact}, {function: format}]"]
        )
