"""Mistakes a user makes on the command line and in the config: each ends the command with one message that
names the problem and exit status 2, never a traceback. The commands run in this process through
`services.cli.main.main` (the code `rpo` runs), with the environment each case sets; an exception escaping
`main` fails the test with its traceback."""

from __future__ import annotations

import json
import os

import pytest

from services.cli.main import main

ONE_ROW = {"d.jsonl": json.dumps({"question": "1+1?", "answer": "2"}) + "\n"}
"""A one-question dataset file, for the cases that need a good dataset to get to their mistake."""

CASES = [
    # (id, argv, environment, files to write {name: text}, what the message must name)
    ("group size below 2", ["config", "show", "--set", "algorithm.group_size=1"], {}, {}, "group_size"),
    ("epsilon out of range", ["config", "show", "--set", "algorithm.epsilon=2"], {}, {}, "algorithm.epsilon"),
    ("typo in a field", ["config", "show", "--set", "algorithm.epsilom=0.5"], {}, {}, "epsilom"),
    ("typo in a section", ["config", "show", "--set", "algoritm.epsilon=0.5"], {}, {}, "algoritm"),
    ("--set without a value", ["config", "show", "--set", "algorithm.epsilon"], {}, {}, "KEY=VALUE"),
    (
        "bad truncation limit",
        ["config", "show", "--set", "algorithm.truncation_limit=2l"],
        {},
        {},
        "truncation",
    ),
    ("unknown mode", ["run", "--set", "algorithm.mode=fast"], {}, {}, "algorithm.mode"),
    ("zero questions", ["config", "show", "--set", "data.max_questions=0"], {}, {}, "data.max_questions"),
    ("negative temperature", ["config", "show", "--set", "sampling.temperature=-1"], {}, {}, "temperature"),
    ("unknown tracker", ["config", "show", "--set", "train.report_to=neptune"], {}, {}, "neptune"),
    ("config file missing", ["config", "show", "--config", "{tmp}/nope.yaml"], {}, {}, "nope.yaml"),
    (
        "config file not YAML",
        ["config", "show", "--config", "{tmp}/c.yaml"],
        {},
        {"c.yaml": "a: [1\n"},
        "c.yaml",
    ),
    ("config file a list", ["config", "show", "--config", "{tmp}/c.yaml"], {}, {"c.yaml": "- 1\n"}, "c.yaml"),
    ("typo in a section, env", ["config", "show"], {"RPO_ALGORITM__GROUP_SIZE": "4"}, {}, "RPO_ALGORITM"),
    ("not a number, env", ["config", "show"], {"RPO_ALGORITHM__GROUP_SIZE": "four"}, {}, "group_size"),
    (
        "two reward functions, one name",
        ["config", "show", "--set", "reward.functions=[{function: exact}, {function: exact}]"],
        {},
        {},
        "named 'exact'",
    ),
    (
        "both reward forms",
        ["config", "show", "--set", "reward.function=math", "--set", "reward.functions=[{function: exact}]"],
        {},
        {},
        "not both",
    ),
    (
        "unknown reward function",
        ["data", "inspect", "{tmp}/d.jsonl", "--set", "reward.function=nonsense"],
        {},
        ONE_ROW,
        "'nonsense'",
    ),
    (
        "reward module missing",
        ["data", "inspect", "{tmp}/d.jsonl", "--set", "reward.functions=[{function: no_such_mod:f}]"],
        {},
        ONE_ROW,
        "cannot import no_such_mod",
    ),
    ("dataset missing", ["data", "inspect", "{tmp}/none.jsonl"], {}, {}, "none.jsonl"),
    ("dataset line not JSON", ["data", "inspect", "{tmp}/d.jsonl"], {}, {"d.jsonl": "{oops\n"}, "line 1"),
    (
        "answer field missing",
        ["data", "inspect", "{tmp}/d.jsonl", "--set", "data.answer_field=solution"],
        {},
        ONE_ROW,
        "data.answer_field",
    ),
    (
        "a Hub id as the model",
        ["data", "inspect", "{tmp}/d.jsonl", "--set", "model.path=Qwen/Qwen2.5-0.5B"],
        {},
        ONE_ROW,
        "Qwen/Qwen2.5-0.5B",
    ),
    ("eval of a missing model", ["eval", "--model", "{tmp}/no-model"], {}, {}, "no-model"),
    ("a stray flag", ["run", "--bogus"], {}, {}, "--bogus"),
    ("an unknown command", ["trian"], {}, {}, "trian"),
]


@pytest.mark.parametrize(("case", "argv", "env", "files", "named"), CASES, ids=[c[0] for c in CASES])
def test_a_mistake_is_one_message_and_exit_2(case, argv, env, files, named, tmp_path, monkeypatch, capsys):
    for name in list(os.environ):
        if name.startswith("RPO_") and "__" in name:
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    monkeypatch.chdir(tmp_path)  # nothing a case does lands in the checkout
    try:
        code = main([arg.replace("{tmp}", str(tmp_path)) for arg in argv])
    except SystemExit as exc:  # argparse's own errors (usage, then the message)
        code = exc.code
    out, err = capsys.readouterr()
    assert code == 2, f"{case}: exit {code}\n{out}\n{err}"
    assert named in err, f"{case}: the message does not name {named!r}:\n{err}"
    assert "Traceback" not in err + out
    message = [line for line in err.splitlines() if line.strip() and not line.startswith(("usage:", " "))]
    assert len(message) >= 1 and message[-1].startswith("rpo"), err


def test_there_are_more_than_twenty_mistakes():
    assert len(CASES) >= 20
