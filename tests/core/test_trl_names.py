"""TRL's GRPOConfig, field by field: every field of TRL 1.16.0 (the bench extra's) has a row in docs/training.md
with a setting that exists here, or "none" and a reason; a TRL name used as a config key points at ours."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.core.config import ConfigError, RunConfig, load_config
from services.core.trl_names import GRPO_CONFIG_FIELDS, SAME, here, table

REPO = Path(__file__).resolve().parents[2]


def test_the_docs_table_is_current_and_has_every_field():
    page = (REPO / "docs" / "training.md").read_text()
    block = page.split("<!-- grpo-config-table -->\n", 1)[1].split("<!-- /grpo-config-table -->", 1)[0]
    assert block == table(), (
        "docs/training.md's GRPOConfig table is stale: render services.core.trl_names.table()"
    )
    rows = [line.split("|")[1].strip().strip("`") for line in block.splitlines()[2:]]
    assert rows == list(GRPO_CONFIG_FIELDS)
    assert len(set(GRPO_CONFIG_FIELDS)) == len(GRPO_CONFIG_FIELDS) == 189
    for field in GRPO_CONFIG_FIELDS:
        setting, note = here(field)
        assert setting or note, f"{field}: none, with no reason"


def test_every_setting_the_table_names_exists():
    known = {f"{s}.{f}" for s, sec in RunConfig.model_fields.items() for f in sec.annotation.model_fields}
    for field, (setting, _) in SAME.items():
        for name in (part.strip() for part in setting.split(",") if part.strip()):
            if name.startswith("rpo ") or name.endswith("[].weight"):
                continue
            assert name in known, f"{field} -> {name}: no such setting"


@pytest.mark.parametrize(
    ("key", "ours"),
    [
        ("train.learning_rate=1e-6", "here: train.lr"),
        ("algorithm.num_generations=4", "here: algorithm.group_size"),
        ("max_completion_length=128", "here: algorithm.max_response_tokens"),
        ("train.beta=0.1", "here: algorithm.beta"),
    ],
)
def test_a_trl_name_as_a_key_says_where_it_lives_here(key, ours):
    with pytest.raises(ConfigError) as err:
        load_config(None, [key])
    assert "unknown key" in str(err.value) and ours in str(err.value), str(err.value)


def test_a_config_file_that_is_not_utf8_is_one_message_with_the_byte_and_exit_2(tmp_path, capsys):
    from services.cli.main import main

    path = tmp_path / "c.yaml"
    path.write_bytes("train:\n  run_dir: caf\xe9\n".encode("latin-1"))  # the é is byte 21 (from 0), not UTF-8
    assert main(["config", "show", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}: not UTF-8 text (byte 21" in err and "Traceback" not in err


def test_a_misspelt_environment_variable_is_warned_about_with_the_right_spelling(monkeypatch, caplog):
    monkeypatch.setenv("RPO_TRAIN_LR", "1e-5")
    monkeypatch.setenv("RPO_ALGORITHM_GROUP_SIZE", "4")
    monkeypatch.setenv("RPO_API_TOKEN_FILE_X", "not ours")  # no section + field: not warned about
    with caplog.at_level("WARNING", logger="rpo.config"):
        cfg = load_config(None)
    assert cfg.train.lr == 1e-6  # ignored, as pydantic-settings ignores it ...
    warned = [r.getMessage() for r in caplog.records]
    # ... but said, with the right spelling
    assert any("RPO_TRAIN_LR is not read" in m and "did you mean RPO_TRAIN__LR?" in m for m in warned), warned
    assert any("did you mean RPO_ALGORITHM__GROUP_SIZE?" in m for m in warned), warned
    assert not any("RPO_API_TOKEN_FILE_X" in m for m in warned)
