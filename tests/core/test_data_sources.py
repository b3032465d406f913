"""Every source a user's data comes in (services/core/data_sources.py) and which rows each role of a run
reads (services/core/data_roles.py): files of four formats, a folder of shards, a saved DatasetDict with its
split, the evaluation set of `eval_dataset: auto`, and the hold-out."""

from __future__ import annotations

import json

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from services.core.config import ConfigError, DataSection, load_config
from services.core.data import load_questions
from services.core.data_roles import choose_dataset, is_held_out, load_role
from services.core.data_sources import DatasetError

ROWS = [{"question": f"{n}+{n}?", "answer": str(2 * n), "level": n % 3} for n in range(40)]


def test_json_list_json_lines_and_csv_read_alike(tmp_path):
    (tmp_path / "list.json").write_text(json.dumps(ROWS))
    (tmp_path / "lines.json").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (tmp_path / "table.csv").write_text(
        "question,answer,level\n" + "".join(f"{r['question']},{r['answer']},{r['level']}\n" for r in ROWS)
    )
    read = {
        name: load_questions(str(tmp_path / name), DataSection())
        for name in ("list.json", "lines.json", "table.csv")
    }
    texts = {name: [(q.question, q.answer) for q in qs] for name, qs in read.items()}
    assert texts["list.json"] == texts["lines.json"] == texts["table.csv"]
    assert len(texts["table.csv"]) == 40 and texts["table.csv"][3] == ("3+3?", "6")
    assert read["list.json"][0].columns["level"] == 0 and read["table.csv"][0].columns["level"] == "0"


def test_bad_json_and_csv_name_the_file_and_line(tmp_path):
    (tmp_path / "bad.json").write_text('[\n {"question": "a", "answer": "1"},\n {"question": }\n]')
    with pytest.raises(DatasetError, match=r"bad.json, line 3: not valid JSON"):
        load_questions(str(tmp_path / "bad.json"), DataSection())
    (tmp_path / "bad.csv").write_text("question,answer\n1+1?,2\n2+2?,4,extra\n")
    with pytest.raises(DatasetError, match=r"bad.csv, line 3: more values than the header"):
        load_questions(str(tmp_path / "bad.csv"), DataSection())


def test_a_file_that_is_not_utf8_is_one_message_with_the_byte_offset(tmp_path):
    # `{"question": "caf` is 17 bytes, so the Latin-1 e-acute is byte 17 (counting from 0)
    (tmp_path / "latin1.jsonl").write_bytes(b'{"question": "caf\xe9?", "answer": "1"}\n')
    with pytest.raises(DatasetError, match=r"latin1.jsonl: not UTF-8 text \(byte 17"):
        load_questions(str(tmp_path / "latin1.jsonl"), DataSection())


def test_a_folder_of_parquet_shards_as_the_hub_lays_them_out(tmp_path):
    folder = tmp_path / "shards" / "data"
    folder.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(ROWS[:20]), folder / "train-00000-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist(ROWS[20:30]), folder / "train-00001-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist(ROWS[30:]), folder / "test-00000-of-00001.parquet")
    data = DataSection(dataset=str(tmp_path / "shards"))
    train, _ = load_role("train", data)
    test, choice = load_role("eval", data)
    assert (len(train), len(test)) == (30, 10)
    assert choice.describe() == f"{tmp_path / 'shards'} (test)"


def test_a_saved_dataset_dict_gives_the_split_asked_for_never_train_for_all(tmp_path):
    folder = tmp_path / "saved"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(ROWS[:30]), "validation": datasets.Dataset.from_list(ROWS[30:])}
    ).save_to_disk(str(folder))
    data = DataSection(dataset=str(folder), eval_split="validation")
    train, _ = load_role("train", data)
    evaluation, _ = load_role("eval", data)
    assert {q.question for q in evaluation} == {r["question"] for r in ROWS[30:]}
    assert not {q.question for q in train} & {q.question for q in evaluation}
    with pytest.raises(DatasetError, match=r"no split 'test' in this DatasetDict; it has train, validation"):
        load_role("eval", DataSection(dataset="builtin:arith", eval_dataset=str(folder)))


def test_auto_evaluates_a_user_dataset_on_its_own_data_or_refuses(tmp_path):
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    one_file = DataSection(dataset=str(tmp_path / "train.jsonl"))
    with pytest.raises(DatasetError) as refusal:
        choose_dataset("eval", one_file)
    message = str(refusal.value)
    for named in ("data.eval_dataset", "data.eval_holdout", "data.eval_split", "one file"):
        assert named in message
    # the built-in default keeps evaluating on its own held-out split; none disables evaluation
    assert choose_dataset("eval", DataSection()).source.spec == "builtin:arith-eval"
    assert (
        choose_dataset("eval", DataSection(dataset="builtin:arith-long")).source.spec
        == "builtin:arith-long-eval"
    )
    assert choose_dataset("eval", load_config(None, ["data.eval_dataset=none"]).data) is None


def test_a_hold_out_leaves_training_and_is_the_same_rows_every_time(tmp_path):
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    data = DataSection(dataset=str(tmp_path / "train.jsonl"), eval_holdout=0.25)
    train, train_choice = load_role("train", data)
    held, held_choice = load_role("eval", data)
    assert len(train) + len(held) == 40 and 4 <= len(held) <= 18  # a hash share: about 10 of 40
    assert not {q.id for q in train} & {q.id for q in held}
    assert all(is_held_out(q.id, 0.25) for q in held)
    assert held_choice.describe().startswith("held out from ") and "25%" in held_choice.describe()
    assert "less 25% held out" in train_choice.describe()
    again, _ = load_role("eval", data.model_copy(update={"max_questions": 5}))
    assert [q.id for q in again] == [q.id for q in held]  # a training limit does not move the hold-out


def test_a_hold_out_beside_a_named_evaluation_set_is_refused():
    with pytest.raises(ConfigError, match="data.eval_holdout .* only used with data.eval_dataset: auto"):
        load_config(None, ["data.eval_dataset=other.jsonl", "data.eval_holdout=0.1"])
