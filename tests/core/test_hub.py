"""Models and datasets named by Hugging Face Hub id (services/core/hub.py, services/models/model_path.py,
services/core/data_sources.py), resolved by the real huggingface_hub and datasets code from a cache the
tests lay out (tests/fixtures/hub.py), with HF_HUB_OFFLINE=1: nothing is downloaded."""

from __future__ import annotations

import pytest

from services.core.config import ConfigError, DataSection
from services.core.data_roles import choose_dataset, load_role
from services.core.data_sources import DatasetError, Source, available_splits
from services.core.hub import looks_like_hub_id
from services.models.model_path import resolve_model_path


@pytest.mark.parametrize(
    ("spec", "hub"),
    [
        ("Qwen/Qwen2.5-0.5B-Instruct", True),
        ("openai/gsm8k", True),
        ("gpt2", True),
        ("data/train.jsonl", False),  # a file the user meant, even when it is missing
        ("./models/policy", False),
        ("/models/policy", False),
        ("builtin:arith", False),
        ("a/b/c", False),
    ],
)
def test_what_counts_as_a_hub_id(spec, hub):
    assert looks_like_hub_id(spec) is hub


def test_an_existing_local_folder_is_never_taken_for_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "model").mkdir(parents=True)
    assert not looks_like_hub_id("org/model")


def test_a_model_hub_id_resolves_to_its_snapshot_and_a_revision_to_its_own(offline_hub):
    main = resolve_model_path("rpo-test/tiny-qwen2")
    tagged = resolve_model_path("rpo-test/tiny-qwen2", revision="v1")
    assert (main / "config.json").is_file() and (tagged / "config.json").is_file()
    assert main.parent == tagged.parent and main != tagged  # two commits of one repository
    assert "tag v1" in (tagged / "generation_config.json").read_text()
    # the snapshot is what transformers loads by the same id, offline
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained("rpo-test/tiny-qwen2").hidden_size == 128


def test_a_model_missing_from_the_cache_offline_says_how_to_fetch_it(offline_hub):
    with pytest.raises(ConfigError) as err:
        resolve_model_path("rpo-test/not-there")
    message = str(err.value)
    assert "model.path 'rpo-test/not-there'" in message
    assert "hf download rpo-test/not-there" in message and "HF_HUB_OFFLINE" in message
    assert "huggingface-cli" not in message  # the installed huggingface_hub ships `hf`
    with pytest.raises(ConfigError, match="revision"):
        resolve_model_path("rpo-test/tiny-qwen2", revision="no-such-tag")


def test_a_local_directory_without_a_config_names_both_ways(tmp_path):
    with pytest.raises(ConfigError, match="not an HF model directory.*Hub id"):
        resolve_model_path(str(tmp_path))


def test_a_dataset_hub_id_reads_its_subset_and_split_as_load_dataset_does(offline_hub):
    data = DataSection(dataset="rpo-test/arith-gsm8k", subset="hard")
    train, train_choice = load_role("train", data)
    test, test_choice = load_role("eval", data)  # eval_dataset auto: the dataset's test split
    assert (len(train), len(test)) == (96, 40)
    assert train_choice.describe() == "rpo-test/arith-gsm8k (hard, train)"
    assert test_choice.describe() == "rpo-test/arith-gsm8k (hard, test)"
    assert all(q.question.count("+") == 3 for q in train)  # the hard subset: four terms
    assert all(q.answer.rsplit("####", 1)[1].strip().isdigit() for q in test)
    assert not {q.id for q in train} & {q.id for q in test}
    main, _ = load_role("train", data.model_copy(update={"subset": "main"}))
    assert all(q.question.count("+") == 1 for q in main)
    assert available_splits(Source("rpo-test/arith-gsm8k", subset="main")) == ("train", "test")


def test_an_unknown_subset_or_split_names_what_the_dataset_has(offline_hub):
    with pytest.raises(DatasetError, match=r"subset 'socratic'.*main.*hard"):
        load_role("train", DataSection(dataset="rpo-test/arith-gsm8k", subset="socratic"))
    with pytest.raises(DatasetError, match=r"no split 'validation'.*train, test"):
        load_role(
            "val", DataSection(dataset="builtin:arith", val_dataset="rpo-test/arith-gsm8k", subset="main")
        )


def test_a_dataset_missing_from_the_cache_offline_says_how_to_fetch_it(offline_hub):
    with pytest.raises(DatasetError) as err:
        load_role("train", DataSection(dataset="openai/gsm8k", subset="main"))
    message = str(err.value)
    assert "hf download openai/gsm8k --repo-type dataset" in message and "HF_HUB_OFFLINE" in message


def test_the_eval_split_is_chosen_by_setting(offline_hub):
    data = DataSection(dataset="rpo-test/arith-gsm8k", subset="main", eval_split="train")
    choice = choose_dataset("eval", data)
    assert choice.source.split == "train" and choice.describe() == "rpo-test/arith-gsm8k (main, train)"


def test_the_validation_set_reads_its_own_split_of_a_hub_dataset(offline_hub):
    data = DataSection(dataset="rpo-test/arith-gsm8k", subset="main", val_dataset="rpo-test/arith-gsm8k")
    assert load_role("val", data.model_copy(update={"val_dataset": None})) is None  # unset: no validation
    val, choice = load_role("val", data.model_copy(update={"val_split": "test"}))
    assert len(val) == 40 and choice.describe() == "rpo-test/arith-gsm8k (main, test)"
    train, _ = load_role("train", data)
    assert not {q.id for q in val} & {q.id for q in train}
    with pytest.raises(DatasetError, match="nope"):  # a split it lacks is named, as for the other roles
        load_role("val", data.model_copy(update={"val_split": "nope"}))


def test_data_inspect_reads_a_hub_dataset_subset_and_split_with_a_hub_model(offline_hub, capsys):
    from services.cli.main import main

    code = main(
        [
            "data",
            "inspect",
            "rpo-test/arith-gsm8k",
            "--set",
            "data.subset=hard",
            "--set",
            "data.split=test",
            "--set",
            "model.path=rpo-test/tiny-qwen2",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "rows: 40; questions: 40" in out  # the hard subset's test split
    assert "correct (auto) on 40 of 40 rows" in out  # GSM8K-style answers scored on the number after ####
