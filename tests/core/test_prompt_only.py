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


def test_chat_template_kwargs_reach_the_template_and_max_prompt_length_keeps_the_last_tokens():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from services.core.config import DataSection
    from services.core.data import build_prompt_text, encode_prompt

    vocab = {"<unk>": 0, "<eos>": 1}
    for ch in "QA: \n0123456789+=?abcdefghijklmnopqrstuvwxyz":
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")
    fast.chat_template = "{% if enable_thinking %}think {% endif %}{{ messages[-1]['content'] }}"
    assert build_prompt_text(fast, "2+2=?", DataSection()) == "2+2=?"
    fields = DataSection(chat_template_kwargs={"enable_thinking": True})
    assert build_prompt_text(fast, "2+2=?", fields) == "think 2+2=?"
    # 11 characters, one token each; the last 5 kept (TRL truncates prompts from the left)
    assert len(encode_prompt(fast, "2+2=?", fields)) == 11
    ids = encode_prompt(
        fast, "2+2=?", DataSection(chat_template_kwargs={"enable_thinking": True}, max_prompt_length=5)
    )
    assert fast.decode(ids).replace(" ", "") == "2+2=?"
