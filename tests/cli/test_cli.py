"""The `rpo` command line as a user runs it: a real subprocess, its output and exit code."""

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from services.core.config import load_config

RPO = [sys.executable, "-m", "services.cli"]


def rpo(*args, timeout=60, env=None):
    return subprocess.run([*RPO, *args], capture_output=True, text=True, timeout=timeout, env=env)


def test_help_lists_every_command_group():
    out = rpo("--help")
    assert out.returncode == 0
    for group in ("run", "train", "eval", "serve", "cache", "model", "data", "config"):
        assert f"    {group}" in out.stdout
    serve = rpo("serve", "--help")
    assert "cache" in serve.stdout and "rollout" in serve.stdout
    cache = rpo("cache", "--help")
    for sub in ("init", "export", "import", "stats"):
        assert sub in cache.stdout


def test_config_show_applies_file_env_and_flags(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("algorithm:\n  group_size: 4\n  epsilon: 0.25\n")
    out = rpo("config", "show", "--config", str(path), "--set", "algorithm.group_size=3")
    assert out.returncode == 0, out.stderr
    shown = yaml.safe_load(out.stdout)
    assert shown["algorithm"]["group_size"] == 3 and shown["algorithm"]["epsilon"] == 0.25


def test_bad_config_is_a_message_not_a_traceback(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("algorithm:\n  group_size: 4\n  epsilom: 0.25\n")
    out = rpo("config", "show", "--config", str(path))
    assert out.returncode == 2
    assert f"{path}, line 3: algorithm.epsilom: unknown key" in out.stderr
    assert "Traceback" not in out.stderr
    out = rpo("config", "show", "--set", "algorithm.epsilon=2")
    assert out.returncode == 2 and "algorithm.epsilon" in out.stderr and "Traceback" not in out.stderr


def test_data_synth_writes_the_splits(tmp_path):
    out = rpo(
        "data",
        "synth",
        "--out",
        str(tmp_path),
        "--set",
        "data.synthetic_train_size=12",
        "--set",
        "data.synthetic_eval_size=5",
    )
    assert out.returncode == 0, out.stderr
    train = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    held_out = [json.loads(line) for line in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert len(train) == 12 and len(held_out) == 5
    assert train[0]["solution"].endswith("\\boxed{" + train[0]["answer"] + "}")


def test_model_tiny_refuses_a_non_empty_directory(tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    out = rpo("model", "tiny", "--out", str(tmp_path))
    assert out.returncode == 2 and "not empty" in out.stderr


def test_model_tiny_writes_a_loadable_model(tmp_path):
    out = rpo("model", "tiny", "--out", str(tmp_path / "m"), timeout=120)
    assert out.returncode == 0, out.stderr
    # stderr is a pipe, not a terminal: no library progress bar ("Writing model shards") is drawn into it.
    assert "\r" not in out.stderr and "shards" not in out.stderr
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert model.config.hidden_size // model.config.num_attention_heads == 64


def test_the_multi_node_launcher_command_in_the_docs_is_accepted_by_rpo_train():
    """docs/deploy.md's DeepSpeed command, with the `--local_rank` the launcher appends unless told not to."""
    import re
    import shlex

    from services.cli.main import build_parser

    docs = (Path(__file__).resolve().parents[2] / "docs" / "deploy.md").read_text()
    commands = [line.strip() for line in docs.splitlines() if line.strip().startswith("deepspeed ")]
    assert commands, "docs/deploy.md shows the multi-node launcher command"
    for command in commands:
        argv = shlex.split(command)
        assert "--no_local_rank" in argv
        rpo_args = argv[argv.index("services.cli") + 1 :]
        for extra in ([], ["--local_rank=3"]):
            args = build_parser().parse_args([*rpo_args, *extra])
            assert args.command == "train" and re.fullmatch(r".+\.ya?ml", args.config)


def test_data_inspect_shows_the_dataset_as_training_loads_it(tmp_path, tiny_model_dir):
    rows = [
        {"question": "Tom has 3 apples and buys 4 more. How many?", "answer": "3+4 = <<3+4=7>>7\n#### 7"},
        {"question": "Sue reads 5 pages a day for 6 days. How many pages?", "answer": "#### 30"},
        {"question": "Tom has 3 apples and  buys 4 more. How many?", "answer": "#### 7"},
    ]
    path = tmp_path / "gsm8k.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = rpo("data", "inspect", str(path), "--set", f"model.path={tiny_model_dir}")
    assert out.returncode == 0, out.stderr
    assert "rows: 3; questions: 2; repeats dropped: 1; ids derived from the question text: 2" in out.stdout
    assert "Tom has 3 apples and buys 4 more. How many?" in out.stdout  # the prompt as the model sees it
    assert "correct (auto) on 2 of 2 rows" in out.stdout  # math-verify matches GSM8K's `#### 7`
    assert "columns the reward functions get: answer" in out.stdout

    weighted = "reward.functions=[{function: math}, {function: format, weight: 0.1}]"
    out = rpo("data", "inspect", str(path), "--set", f"model.path={tiny_model_dir}", "--set", weighted)
    assert out.returncode == 0, out.stderr
    assert "correct (math) on 2 of 2 rows" in out.stdout
    assert "mean score per reward function: math 1.000, format 0.000" in out.stdout  # a bare \boxed{7}

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"question": "no answer"}) + "\n")
    out = rpo("data", "inspect", str(bad), "--set", f"model.path={tiny_model_dir}")
    assert out.returncode == 2 and "bad.jsonl, line 2: missing field 'answer'" in out.stderr
    assert "Traceback" not in out.stderr


def test_version_and_a_stray_argument_answered_with_the_commands_own_usage():
    from importlib.metadata import version

    out = rpo("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"rpo {version('rpo-rl')}"
    out = rpo("run", "--bogus")
    assert out.returncode == 2
    assert "rpo run: error: unrecognized arguments: --bogus" in out.stderr
    assert "usage: rpo run" in out.stderr and "--run-dir" in out.stderr  # the command's flags, not the list


def test_logging_flags_work_before_and_after_the_command():
    for args in (
        ("--log-level", "DEBUG", "config", "show"),
        ("config", "show", "--log-level", "DEBUG", "--log-json"),
    ):
        out = rpo(*args)
        assert out.returncode == 0, out.stderr
    from services.cli.main import build_parser

    parser = build_parser()
    assert parser.parse_args(["--log-level", "ERROR", "config", "show"]).log_level == "ERROR"
    assert parser.parse_args(["config", "show", "--log-level", "ERROR"]).log_level == "ERROR"
    assert parser.parse_args(["config", "show"]).log_level == "INFO"


def test_cache_export_and_import_name_their_files_alike():
    from services.cli.main import build_parser

    parser = build_parser()
    assert parser.parse_args(["cache", "export", "--out", "x.jsonl"]).out == "x.jsonl"
    assert parser.parse_args(["cache", "import", "--in", "x.jsonl"]).in_file == "x.jsonl"
    assert parser.parse_args(["cache", "import", "--file", "x.jsonl"]).in_file == "x.jsonl"  # the old name


def test_config_show_says_whose_configuration_it_prints():
    library = rpo("config", "show")
    assert library.returncode == 0 and library.stdout.startswith("# what `rpo train`, `rpo serve`")
    assert "--run" in library.stdout.splitlines()[0]
    run = rpo("config", "show", "--run", "--set", "train.max_steps=7")
    assert run.returncode == 0 and run.stdout.startswith("# what `rpo run` uses (its built-in preset")
    shown = yaml.safe_load(run.stdout)
    assert shown["train"]["run_dir"] == "runs/tiny-demo" and shown["train"]["max_steps"] == 7
    assert yaml.safe_load(library.stdout)["train"]["run_dir"] != "runs/tiny-demo"


def test_rpo_run_takes_your_model_and_data_by_flag_and_then_starts_from_the_library_defaults():
    """`rpo run --model --dataset --eval-dataset`: each flag sets its setting, and a user's model or data with
    no --config leaves the tiny preset (its 96-token responses would not fit them)."""
    from services.cli.main import build_parser
    from services.supervisor.main_job import preset_path, run_config

    flags = ["--model", "org/model", "--dataset", "org/data", "--eval-dataset", "held.jsonl"]
    cfg = run_config(build_parser().parse_args(["run", *flags]))
    assert (cfg.model.path, cfg.data.dataset, cfg.data.eval_dataset) == (
        "org/model",
        "org/data",
        "held.jsonl",
    )
    library = load_config(None, [])
    assert cfg.train.run_dir == library.train.run_dir != load_config(preset_path(), []).train.run_dir
    assert cfg.algorithm.max_response_tokens == library.algorithm.max_response_tokens
    # only the evaluation set named: still the preset (the model and the training data are the built-in ones)
    preset = run_config(build_parser().parse_args(["run", "--eval-dataset", "held.jsonl"]))
    assert preset.train.run_dir == "runs/tiny-demo" and preset.data.eval_dataset == "held.jsonl"


def test_a_model_path_that_is_not_a_model_is_a_message_with_the_way_out(tmp_path):
    data = tmp_path / "q.jsonl"
    data.write_text('{"question": "1+1", "answer": "2"}\n')
    for args in (
        ("eval", "--model", str(tmp_path / "nonexistent")),
        ("data", "inspect", str(data), "--set", f"model.path={tmp_path / 'nonexistent'}"),
    ):
        out = rpo(*args)
        assert out.returncode == 2 and "not an HF model directory" in out.stderr, out.stderr[-2000:]
        assert "Traceback" not in out.stderr
    # a Hub id missing from the cache, offline (the suite runs with HF_HUB_OFFLINE=1): how to fetch it
    out = rpo("eval", "--model", "Qwen/Qwen2.5-0.5B")
    assert out.returncode == 2 and "not in the Hugging Face cache" in out.stderr, out.stderr[-2000:]
    assert "`hf download Qwen/Qwen2.5-0.5B`" in out.stderr and "HF_HUB_OFFLINE" in out.stderr
    assert "Traceback" not in out.stderr


def test_a_missing_field_names_the_setting_and_the_rows_fields(tmp_path):
    data = tmp_path / "q.jsonl"
    data.write_text('{"problem": "1+1", "answer": "2"}\n')
    out = rpo("data", "inspect", str(data))
    assert out.returncode == 2
    assert "missing field 'question' (question; set data.question_field" in out.stderr
    assert "the row's fields: 'problem', 'answer'" in out.stderr


def test_environment_list_values_and_section_typos_reach_the_user_as_messages():
    env = {k: v for k, v in os.environ.items() if not k.startswith("RPO_")}
    show = rpo("config", "show", env={**env, "RPO_SERVICES__ROLLOUT_URLS": "http://a:1,http://b:2"})
    assert show.returncode == 0, show.stderr
    assert yaml.safe_load(show.stdout)["services"]["rollout_urls"] == ["http://a:1", "http://b:2"]
    typo = rpo("config", "show", env={**env, "RPO_ALGORITM__GROUP_SIZE": "4"})
    assert typo.returncode == 2 and "no section 'algoritm'" in typo.stderr and "Traceback" not in typo.stderr


def test_data_inspect_shows_a_conversational_dataset(tmp_path, tiny_model_dir):
    rows = [
        {
            "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2=?"}],
            "answer": "4",
        },
        {"messages": [{"role": "user", "content": "3+3=?"}], "answer": "6"},
    ]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = rpo("data", "inspect", str(path), "--set", f"model.path={tiny_model_dir}")
    assert out.returncode == 0, out.stderr
    assert "conversational rows (messages): 2; the example's turns: system, user" in out.stdout
    assert "be brief\nQ: 2+2=?\nA:" in out.stdout  # the tiny model has no chat template: the plain reading
