"""Loading questions from every supported format, errors that point at the bad row, and prompt building."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from services.core.config import DataSection
from services.core.data import (
    DatasetError,
    Question,
    build_prompt_text,
    derived_id,
    encode_prompt,
    load_dataset,
    load_questions,
)
from services.core.rewards import math_reward

ROWS = [{"id": "a", "question": "1+1=?", "answer": "2"}, {"id": "b", "question": "2+3=?", "answer": 5}]


def write_jsonl(path, rows, extra_lines=()):
    lines = [json.dumps(r) for r in rows] + list(extra_lines)
    path.write_text("\n".join(lines) + "\n")
    return path


def test_jsonl(tmp_path):
    qs = load_questions(str(write_jsonl(tmp_path / "q.jsonl", ROWS)), DataSection())
    assert [(q.id, q.question, q.answer) for q in qs] == [("a", "1+1=?", "2"), ("b", "2+3=?", "5")]


def test_parquet_and_datasets_dir_with_custom_fields(tmp_path):
    renamed = [{"uid": r["id"], "problem": r["question"], "solution": str(r["answer"])} for r in ROWS]
    fields = DataSection(id_field="uid", question_field="problem", answer_field="solution")
    pq.write_table(pa.Table.from_pylist(renamed), tmp_path / "q.parquet")
    assert [q.id for q in load_questions(str(tmp_path / "q.parquet"), fields)] == ["a", "b"]

    import datasets

    datasets.Dataset.from_list(renamed).save_to_disk(str(tmp_path / "ds"))
    qs = load_questions(str(tmp_path / "ds"), fields)
    assert [(q.id, q.answer) for q in qs] == [("a", "2"), ("b", "5")]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ('{"id": "c", "answer": "1"}', r"q.jsonl, line 3: missing field 'question'"),
        ("{not json", r"q.jsonl, line 3: not valid JSON"),
        (
            '{"id": "a", "question": "x", "answer": "1"}',
            r"q.jsonl, line 3: 'id' 'a' is also the id of a different question at .*line 1",
        ),
        (
            '{"id": "c", "question": ["x"], "answer": "1"}',
            r"line 3: field 'question' must be a string or number",
        ),
        ('{"id": "c", "question": "  ", "answer": "1"}', r"line 3: field 'question' is empty"),
    ],
)
def test_bad_row_names_file_line_and_field(tmp_path, extra, message):
    path = write_jsonl(tmp_path / "q.jsonl", ROWS, [extra])
    with pytest.raises(DatasetError, match=message):
        load_questions(str(path), DataSection())


def test_bad_parquet_row_names_the_row(tmp_path):
    pq.write_table(pa.Table.from_pylist([{"id": "a", "question": "q"}]), tmp_path / "q.parquet")
    with pytest.raises(DatasetError, match=r"q.parquet, row 0: missing field 'answer'"):
        load_questions(str(tmp_path / "q.parquet"), DataSection())


def test_missing_and_unsupported(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        load_questions(str(tmp_path / "nope.jsonl"), DataSection())
    (tmp_path / "q.txt").write_text("id,question\n")
    with pytest.raises(DatasetError, match="unsupported dataset format"):
        load_questions(str(tmp_path / "q.txt"), DataSection())


def test_builtin_synthetic_splits_are_disjoint_and_limited():
    fields = DataSection(synthetic_train_size=50, synthetic_eval_size=20)
    train = load_questions("builtin:arith", fields)
    held_out = load_questions("builtin:arith-eval", fields)
    assert len(train) == 50 and len(held_out) == 20
    assert not {q.question for q in train} & {q.question for q in held_out}
    assert len(load_questions("builtin:arith", fields, limit=7)) == 7


def _char_tokenizer(chat_template=None):
    vocab = {"<unk>": 0, "<eos>": 1}
    for ch in "QA: \n0123456789+=?<>|abcdefghijklmnopqrstuvwxyz":
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")
    fast.chat_template = chat_template
    return fast


def test_plain_prompt_template():
    tok = _char_tokenizer()
    assert build_prompt_text(tok, "1+1=?", DataSection()) == "Q: 1+1=?\nA: "
    ids = encode_prompt(tok, "1+1=?", DataSection())
    assert tok.decode(ids).replace(" ", "") == "Q:1+1=?\nA:".replace(" ", "")


def test_chat_template_is_used_when_present():
    template = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}<|assistant|>"
    tok = _char_tokenizer(template)
    fields = DataSection(system_prompt="be brief")
    assert build_prompt_text(tok, "2+2=?", fields) == "<|system|>be brief<|user|>2+2=?<|assistant|>"
    assert build_prompt_text(tok, "2+2=?", DataSection(use_chat_template=False)) == "Q: 2+2=?\nA: "


GSM8K_ROWS = [  # GSM8K's own layout: no id column, the worked answer ending in `#### <number>`
    {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
     "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72"},
    {"question": "Weng earns $12 an hour for babysitting. How much did she earn?", "answer": "#### 10"},
    {"question": "Natalia  sold clips to 48 of her friends in April,\nand then she sold half as many clips in May.",
     "answer": "#### 72"},  # the first question again, spaced differently: a repeat
]  # fmt: skip


def test_rows_without_ids_get_stable_ids_and_repeated_questions_are_dropped(tmp_path, caplog):
    path = write_jsonl(tmp_path / "gsm8k.jsonl", GSM8K_ROWS)
    loaded = load_dataset(str(path), DataSection())
    assert (loaded.rows, loaded.repeats_dropped, loaded.derived_ids) == (3, 1, 2)
    assert [q.id for q in loaded.questions] == [
        derived_id(GSM8K_ROWS[0]["question"]),
        derived_id(GSM8K_ROWS[1]["question"]),
    ]
    assert loaded.questions[0].id == derived_id(
        GSM8K_ROWS[2]["question"]
    )  # whitespace does not change the id
    assert loaded.questions[0].id.startswith("q-") and len(loaded.questions[0].id) == 18
    # the same file read again (another run) gives the same ids, so the cache finds its entries again
    assert [q.id for q in load_dataset(str(path), DataSection()).questions] == [
        q.id for q in loaded.questions
    ]
    with caplog.at_level("INFO", logger="rpo.data"):
        assert len(load_questions(str(path), DataSection())) == 2
    assert "dropped 1 repeated question(s) of 3 rows" in caplog.text
    # a repeated row with an explicit id is a repeat too; one id on two different questions is an error
    rows = [*ROWS, {"id": "a", "question": "1+1=?", "answer": "2"}]
    assert load_dataset(str(write_jsonl(tmp_path / "r.jsonl", rows)), DataSection()).repeats_dropped == 1


def test_gsm8k_answers_are_scored_on_the_number_after_the_hashes():
    reference = GSM8K_ROWS[0]["answer"]
    assert math_reward("she sold 72 in all, so \\boxed{72}", reference) == 1.0
    assert math_reward("\\boxed{24}", reference) == 0.0  # the intermediate result is not the answer
    assert math_reward("\\boxed{71}", reference) == 0.0


CONVERSATION_ROWS = [  # TRL's and OpenRLHF's conversational layout: the prompt as turns, no question column
    {
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2=?"}],
        "answer": "4",
    },
    {
        "messages": [{"role": "system", "content": "show work"}, {"role": "user", "content": "2+2=?"}],
        "answer": "4",
    },
    {"messages": [{"role": "user", "content": "3+3=?"}], "answer": "6"},
    {
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2=?"}],
        "answer": "4",
    },
]


def test_conversational_rows_load_with_their_turns_and_a_conversation_wide_id(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in CONVERSATION_ROWS))
    loaded = load_dataset(str(path), DataSection())
    assert (loaded.rows, loaded.repeats_dropped, loaded.derived_ids) == (
        4,
        1,
        3,
    )  # the last row repeats the first
    first, second, third = loaded.questions
    assert first.question == second.question == "2+2=?"  # the text shown and logged: the last user turn
    assert first.id != second.id  # another system prompt is another prompt
    assert first.messages == (("system", "be brief"), ("user", "2+2=?")) and third.answer == "6"
    assert load_dataset(str(path), DataSection()).questions[0].id == first.id  # stable across loads


def test_a_conversation_goes_through_the_chat_template_or_reads_plainly_without_one():
    chat = Question(
        id="c", question="2+2=?", answer="4", messages=(("system", "be brief"), ("user", "2+2=?"))
    )
    template = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}<|assistant|>"
    tok = _char_tokenizer(template)
    assert build_prompt_text(tok, chat, DataSection()) == "<|system|>be brief<|user|>2+2=?<|assistant|>"
    # the row's own system turn wins over data.system_prompt; a row without one gets the config's
    assert (
        build_prompt_text(tok, chat, DataSection(system_prompt="x"))
        == "<|system|>be brief<|user|>2+2=?<|assistant|>"
    )
    bare = Question(id="d", question="3+3=?", answer="6", messages=(("user", "3+3=?"),))
    assert (
        build_prompt_text(tok, bare, DataSection(system_prompt="x"))
        == "<|system|>x<|user|>3+3=?<|assistant|>"
    )
    ids = encode_prompt(tok, chat, DataSection())
    assert tok.decode(ids).replace(" ", "") == "<|system|>bebrief<|user|>2+2=?<|assistant|>"
    plain = _char_tokenizer()  # no chat template: system turns as lines, each user turn through the template
    assert build_prompt_text(plain, chat, DataSection()) == "be brief\nQ: 2+2=?\nA: "


@pytest.mark.parametrize(
    "messages, message",
    [
        ("2+2=?", "field 'messages' must be a non-empty list of {role, content} turns"),
        ([], "field 'messages' must be a non-empty list"),
        ([{"role": "robot", "content": "hi"}], 'messages[0] must be {"role": one of system, user, assistant'),
        ([{"role": "user"}], "messages[0] must be"),
        (
            [{"role": "user", "content": "2+2=?"}, {"role": "assistant", "content": "4"}],
            "last turn of 'messages'",
        ),
    ],
)
def test_a_malformed_conversation_names_the_row_and_what_is_wrong(tmp_path, messages, message):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "1+1=?"}], "answer": "2"}) + "\n")
    with path.open("a") as fh:
        fh.write(json.dumps({"messages": messages, "answer": "4"}) + "\n")
    with pytest.raises(DatasetError) as err:
        load_dataset(str(path), DataSection())
    assert "chat.jsonl, line 2: " in str(err.value) and message in str(err.value)
