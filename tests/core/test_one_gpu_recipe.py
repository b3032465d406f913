"""docs/one-gpu.md's recipe as shipped: configs/gsm8k_rewards.py scores GSM8K's answers as the page says, the
config reads a Hub dataset's subset through the real loader and reward plumbing, and the plan the page
prints is what `rpo plan` prints for that config (models by Hub id, from a prepared cache, offline)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from tests.fixtures.cli import run_rpo

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "one-gpu-gsm8k.yaml"


def _rewards():
    spec = importlib.util.spec_from_file_location("gsm8k_rewards", REPO / "configs" / "gsm8k_rewards.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_gsm8k_rewards_score_the_number_after_the_hashes():
    rewards = _rewards()
    answer = ["Natalia sold 48/2 = 24 clips in May.\n#### 1,072"] * 5
    completions = [
        "48 + 24 = 72, so \\boxed{1072}",  # right
        "So the total is \\boxed{1,072}.",  # right, written with a comma
        [
            {"role": "assistant", "content": "\\boxed{3} ... no: \\boxed{1072}"}
        ],  # conversational; the last box
        "The answer is 1072.",  # no box
        "\\boxed{1073}",  # wrong
    ]
    assert rewards.gsm8k_accuracy(completions, answer=answer) == [1.0, 1.0, 1.0, 0.0, 0.0]
    # format: reasoning, then exactly one box, and nothing after it (the second's full stop fails it)
    assert rewards.boxed_format(completions) == [1.0, 0.0, 0.0, 0.0, 0.0]


def _rpo(*args: str, env_extra: dict[str, str]):
    return run_rpo(*args, env_extra={**env_extra, "COLUMNS": "110"})  # the plan's tables at the page's width


def test_the_recipe_reads_a_hub_datasets_subset_and_its_rewards_call_the_references_right(hub_home):
    """The recipe's data and reward settings on a GSM8K-shaped Hub dataset (the tiny model's tokenizer)."""
    done = _rpo(
        "data",
        "inspect",
        "rpo-test/arith-gsm8k",
        "--config",
        str(CONFIG),
        "--set",
        "model.path=rpo-test/tiny-qwen2",
        env_extra=hub_home.env(),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rows: 96; questions: 96" in done.stdout  # the main subset's train split
    assert "correct (gsm8k_accuracy) on 96 of 96 rows" in done.stdout
    # the references given back boxed are right but not "reasoning, then a box": the format term scores 0
    assert "mean score per reward function: gsm8k_accuracy 1.000, boxed_format 0.000" in done.stdout


def test_the_plan_on_the_page_is_what_rpo_plan_prints_and_the_15b_needs_lora_on_24_gib(hub_home):
    page = (REPO / "docs" / "one-gpu.md").read_text()
    shown = re.search(
        r'```text title="rpo plan, Qwen2.5-0.5B-Instruct, 1 x 24 GiB"\n(.*?)```', page, re.DOTALL
    )
    assert shown, "docs/one-gpu.md has no plan block"
    box = ("--gpus", "1", "--gpu-memory", "24GiB")
    done = _rpo("plan", "--config", str(CONFIG), *box, env_extra=hub_home.env())
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout == shown.group(1), (
        "regenerate the block: COLUMNS=110 rpo plan --config ... (see the page)"
    )
    big = ("--set", "model.path=Qwen/Qwen2.5-1.5B-Instruct")
    refused = _rpo("plan", "--config", str(CONFIG), *big, *box, env_extra=hub_home.env())
    assert refused.returncode == 2 and "does not fit" in refused.stderr and "Traceback" not in refused.stderr
    assert "43.2 GiB" in refused.stdout and "43.2 GiB" in page
    assert "--set train.lora.rank=16" in refused.stderr
    lora = _rpo(
        "plan", "--config", str(CONFIG), *big, "--set", "train.lora.rank=16", *box, env_extra=hub_home.env()
    )
    assert lora.returncode == 0 and "the plan fits" in lora.stdout
