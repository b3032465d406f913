"""`rpo reproduce --smoke`: runs over two training seeds end to end on the short task's warm model (GRPO,
RPO+GRPO, RPO+GRPO at epsilon 0), the results they fill in (seed-by-seed comparisons, equal time from the
validation curves, the epsilon sweep), the tables and plots, resuming at the run an interrupted
reproduction stopped in, and the full protocol's plan."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.trainer.training_helpers import REPO

SMOKE_ARMS = ("grpo", "rpo-grpo", "rpo-grpo-eps0")
SEEDS = (0, 1)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
pytestmark = pytest.mark.timeout(1500)  # the first test's setup runs six runs end to end (about 6 minutes)


def _reproduce(out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RPO_")}
    env.setdefault("DS_ACCELERATOR", "cpu")
    return subprocess.run(
        [sys.executable, "-m", "services.cli", "reproduce", "--smoke", "--run-dir", str(out), *extra],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )


SMOKE_FLAGS = ("--seeds", "2", "--arms", ",".join(SMOKE_ARMS))


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, warm_model_dir) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("reproduce") / "out"
    done = _reproduce(out, *SMOKE_FLAGS)
    assert done.returncode == 0, (done.stdout + done.stderr)[-8000:]
    return out, done


def test_every_run_is_read_back_and_the_arms_cover_both_seeds(smoke):
    out, _ = smoke
    results = json.loads((out / "results.json").read_text())
    assert results["seeds"] == list(SEEDS) and list(results["arms"]) == list(SMOKE_ARMS)
    assert results["commit"] and results["eval_labels"] == ["after", "after T=1"]
    for name in SMOKE_ARMS:
        assert set(results["runs"][name]) == {"0", "1"}
        for seed, row in results["runs"][name].items():
            assert row["steps"] == 2, (name, seed)
            # the test set before (shared: evaluated once) and after at both temperatures; the validation
            # curve before, at step 1 and after
            assert {
                "before",
                "before T=1",
                "after",
                "after T=1",
                "val before",
                "val step 1",
                "val after",
            } <= set(row["evals"])
            assert (
                row["evals"]["after"]["temperature"] == 0.6
                and row["evals"]["after T=1"]["temperature"] == 1.0
            )
            assert row["evals"]["val step 1"]["split"] == "val" and row["evals"]["after"]["split"] == "test"
            assert len(row["evals"]["after"]["per_question"]) == 8
            assert row["decoded_tokens_per_sample"] > 0 and row["mean_step_seconds"] > 0
        summary = results["arms"][name]
        assert summary["seeds"] == [0, 1]
        for label in ("after", "after T=1"):
            acc = summary["accuracy"][label]
            assert acc["seeds"] == 2 and acc["questions"] == 8 and acc["ci"][0] <= acc["mean"] <= acc["ci"][1]
    runs = results["runs"]
    # RPO's cache initialisation counts in its training time; full path has none.
    assert runs["rpo-grpo"]["0"]["cache_init_seconds"] > 0 and runs["grpo"]["0"]["cache_init_seconds"] == 0
    assert runs["rpo-grpo"]["0"]["training_seconds"] > runs["rpo-grpo"]["0"]["cache_init_seconds"]
    # all of it: `rpo run` seeds the cache before the trainer starts, then the trainer checks it again
    seeded = json.loads((out / "arms/rpo-grpo/seed-0/summary.json").read_text())["cache_init"]["seconds"]
    assert runs["rpo-grpo"]["0"]["cache_init_seconds"] >= seeded > 0
    # the wall time says how much of it went to finding (or building) the warm model
    model_seconds = [
        json.loads((out / f"arms/{name}/seed-{seed}/summary.json").read_text())["setup_seconds"]["model"]
        for name in SMOKE_ARMS
        for seed in SEEDS
    ]
    assert results["model_build_seconds"] == pytest.approx(sum(model_seconds))
    # Each question comes back (two epochs of 4): the RPO arms' second step updates cache entries again.
    assert sum(runs["rpo-grpo"]["0"]["series"]["cache_updates"][1].values()) > 0


def test_comparisons_are_seed_by_seed_with_intervals(smoke):
    out, _ = smoke
    results = json.loads((out / "results.json").read_text())
    cmp = results["comparisons"]["rpo-grpo"]
    assert cmp["full"] == "grpo" and cmp["seeds"] == [0, 1]
    ratios = cmp["decoded_tokens"]
    runs = results["runs"]
    expected = [
        runs["rpo-grpo"][s]["decoded_tokens_per_sample"] / runs["grpo"][s]["decoded_tokens_per_sample"]
        for s in ("0", "1")
    ]
    assert ratios["per_seed"] == pytest.approx(expected) and 0 < ratios["mean"] < 1
    assert ratios["ci"][0] <= ratios["mean"] <= ratios["ci"][1]  # a t interval over the two seeds
    diff = cmp["accuracy_difference"]["after"]
    by_seed = [
        sum(runs["rpo-grpo"][s]["evals"]["after"]["per_question"].values()) / 8
        - sum(runs["grpo"][s]["evals"]["after"]["per_question"].values()) / 8
        for s in ("0", "1")
    ]
    assert diff["mean"] == pytest.approx(sum(by_seed) / 2) and diff["ci"][0] <= diff["mean"] <= diff["ci"][1]
    eq = results["equal_time"]["rpo-grpo"]
    assert len(eq["seconds"]) == 2 and not math.isnan(eq["mean"])
    assert eq["seconds"] == pytest.approx([runs["rpo-grpo"][s]["training_seconds"] for s in ("0", "1")])
    # the sweep: epsilon 0.5 (the headline arm) against epsilon 0, paired seed by seed
    assert set(results["epsilon"]) == {"rpo-grpo"} and results["epsilon"]["rpo-grpo"]["after"]["seeds"] == 2
    names = " ".join(t["target"] for t in results["targets"])
    assert "equal steps, T=0.6" in names and "equal steps, T=1" in names and "equal time" in names
    assert "epsilon sweep" in names


def test_tables_and_plots_are_written(smoke):
    out, done = smoke
    text = (out / "results.md").read_text()
    for label in ("| GRPO | 2 |", "| RPO+GRPO | 2 |", "| RPO+GRPO / GRPO | 2 |", "## Targets"):
        assert label in text, label
    assert "| RPO+GRPO | 2 |" in done.stdout  # printed too
    for name in (
        "accuracy_vs_time.png",
        "decoded_tokens_per_step.png",
        "response_length.png",
        "cut_at_budget.png",
    ):
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, name


def test_an_interrupted_reproduction_resumes_at_the_run_it_stopped_in(smoke):
    out, _ = smoke
    dirs = [f"arms/{arm}/seed-{seed}" for seed in SEEDS for arm in SMOKE_ARMS]
    kept = {d: (out / d / "metrics.jsonl").stat().st_mtime_ns for d in dirs[:-1]}
    last = out / dirs[-1]
    # What an interrupted last run leaves: a run directory without an ok summary.
    summary = json.loads((last / "summary.json").read_text())
    (last / "summary.json").write_text(json.dumps({**summary, "ok": False, "error": "interrupted"}))
    done = _reproduce(out, *SMOKE_FLAGS)
    assert done.returncode == 0, (done.stdout + done.stderr)[-8000:]
    log = done.stdout + done.stderr
    assert f"{len(dirs) - 1} of {len(dirs)} runs finished" in log
    assert f"run {len(dirs)}/{len(dirs)} rpo-grpo-eps0 seed 1" in log and f"run 1/{len(dirs)}" not in log
    assert {d: (out / d / "metrics.jsonl").stat().st_mtime_ns for d in kept} == kept
    assert json.loads((last / "summary.json").read_text())["ok"]


def test_a_partial_invocation_keeps_the_runs_planned_before(smoke, tmp_path):
    """Running the protocol in parts: `--arms grpo` in a directory that holds more arms plans only grpo, and
    the results still hold every finished run."""
    from services.reproduction.reproduce import SMOKE_OVERRIDES, SMOKE_PRESET, Reproduction
    from services.supervisor.main_job import preset_path

    out, _ = smoke
    copy = tmp_path / "reproduce"
    (copy / "arms").mkdir(parents=True)
    (copy / "plan.json").write_text((out / "plan.json").read_text())
    for seed in SEEDS:
        for arm in SMOKE_ARMS:
            run = copy / "arms" / arm / f"seed-{seed}"
            run.mkdir(parents=True)
            for name in ("summary.json", "metrics.jsonl"):
                (run / name).write_text((out / "arms" / arm / f"seed-{seed}" / name).read_text())

    def reproduction(arms: tuple[str, ...], seeds: int, extra: tuple[str, ...] = ()) -> Reproduction:
        overrides = [*SMOKE_OVERRIDES, f"train.run_dir={copy}", *extra]
        return Reproduction(
            preset_path(SMOKE_PRESET), overrides, seeds=seeds, arms=arms, smoke=True, command="t"
        )

    part = reproduction(("grpo",), 2)
    assert set(part.prepare()) == {"arms/grpo/seed-0", "arms/grpo/seed-1"}
    results = part.write_results()
    assert set(results["arms"]) == set(SMOKE_ARMS) and results["seeds"] == [0, 1]
    # A third seed for one arm: the two finished, the new one to run.
    assert set(reproduction(("rpo-grpo",), 3).prepare()) == {"arms/rpo-grpo/seed-0", "arms/rpo-grpo/seed-1"}
    # An arm whose settings changed runs again (here every arm: the base's epsilon changed is a new base).
    assert reproduction(("grpo",), 2, ("algorithm.epsilon=0.25",)).prepare() == []


def test_the_full_protocol_plans_every_arm_at_every_seed():
    from services.reproduction.protocols import ARMS
    from services.reproduction.reproduce import PRESET, Reproduction
    from services.supervisor.main_job import preset_path

    plan = Reproduction(preset_path(PRESET), [], seeds=3, smoke=False, command="t").plan
    runs = [(r["arm"], r["seed"]) for r in plan["runs"]]
    per_seed = [a.name for a in ARMS if not a.first_seed_only]
    assert runs == [(a.name, 0) for a in ARMS] + [(n, s) for s in (1, 2) for n in per_seed]
    assert all(f"train.seed={s}" in r["overrides"] for r, (_, s) in zip(plan["runs"], runs, strict=True))
    arms = {a["name"]: a for a in plan["arms"]}
    # each RPO arm is paired with its own kind
    assert arms["rpo-grpo-no-length"]["full"] == "grpo-no-length"
    assert (
        arms["grpo-no-length"]["settings"]["alpha"] == 0
        and arms["grpo-no-length"]["settings"]["mode"] == "full"
    )
    assert arms["rpo-grpo-0.1l"]["settings"]["truncation_limit"] == "0.1l"
    assert [arms[n]["settings"]["epsilon"] for n in ("rpo-grpo-eps0", "rpo-grpo", "rpo-grpo-eps1")] == [
        0,
        0.5,
        1,
    ]
    assert arms["dapo"]["settings"]["updates_per_batch"] == 2 and "2 updates" in arms["dapo"]["label"]
    # several epochs over a small question set: every question comes back
    for arm in arms.values():
        assert arm["settings"]["epochs"] == 4 and arm["settings"]["max_questions"] == 48


def test_bad_flags_are_usage_errors(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RPO_")}
    for flags, message in (
        (["--steps", "0"], "--steps must be >= 1"),
        (["--seeds", "0"], "--seeds must be >= 1"),
        (["--arms", "grpo,nonsense"], "--arms: unknown arm nonsense"),
        (["--set", "algorithm.group_size=0"], "algorithm.group_size"),
    ):
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "services.cli",
                "reproduce",
                "--smoke",
                "--run-dir",
                str(tmp_path),
                *flags,
            ],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 2, done.stderr
        assert message in done.stderr and "Traceback" not in done.stderr


def test_the_results_page_is_rendered_from_the_record_and_its_numbers_come_from_it(smoke, tmp_path):
    from services.reproduction.formatting import signed
    from services.reproduction.results_doc import render_results_doc

    out, _ = smoke
    results = json.loads((out / "results.json").read_text())
    page = render_results_doc(results)
    assert page == render_results_doc(json.loads((out / "results.json").read_text()))  # deterministic
    assert f"at commit `{results['commit']}`" in page and "## Targets" in page and "## Reading" in page
    diff = results["comparisons"]["rpo-grpo"]["accuracy_difference"]["after"]
    assert f"RPO+GRPO - GRPO is {signed(diff['mean'])} points" in page
    # change a figure in the record: the page follows
    results["comparisons"]["rpo-grpo"]["accuracy_difference"]["after"]["mean"] = 0.4321
    assert "RPO+GRPO - GRPO is +43.2 points" in render_results_doc(results)
    # the command line: a record that cannot be read is one message and exit 2
    bad = tmp_path / "results.json"
    bad.write_text("{not json")
    done = subprocess.run(
        [sys.executable, "-m", "services.reproduction.results_doc", str(bad)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "cannot read the record" in done.stderr and "Traceback" not in done.stderr


def test_the_varied_length_protocol_plans_its_arms():
    """`--task arith-long-var`: its preset, the three headline pairs at every seed, the two variants once."""
    from services.reproduction.protocols import PROTOCOLS, SCALED_ALPHA
    from services.reproduction.reproduce import Reproduction
    from services.supervisor.main_job import preset_path

    protocol = PROTOCOLS["arith-long-var"]
    plan = Reproduction(
        preset_path(protocol.preset), [], seeds=3, smoke=False, command="t", protocol=protocol
    ).plan
    arms = {a["name"]: a for a in plan["arms"]}
    assert plan["task"] == "arith-long-var" and plan["length_target"] and plan["protocol_minutes"] == 150
    headline = {n for pair in plan["headline_pairs"] for n in pair}
    runs = [(r["arm"], r["seed"]) for r in plan["runs"]]
    assert {(n, s) for n in headline for s in (0, 1, 2)} <= set(runs)
    assert [r for r in runs if r[0] not in headline] == [
        ("rpo-grpo-suffix-loss", 0),
        ("rpo-grpo-budget160", 0),
    ]
    assert [
        arms[n]["settings"]["alpha"]
        for n in ("rpo-grpo", f"rpo-grpo-alpha{SCALED_ALPHA:g}", "rpo-grpo-no-length")
    ] == [0.01, SCALED_ALPHA, 0.0]
    assert arms["rpo-grpo-suffix-loss"]["settings"]["loss_on_suffix_only"] is True
    assert arms["rpo-grpo-budget160"]["settings"]["suffix_budget"] == 160
    for arm in arms.values():  # the varied task, every question back several times
        assert arm["settings"]["max_questions"] * arm["settings"]["epochs"] >= 5 * 32
    assert plan["base"]["data"]["dataset"] == "builtin:arith-long-var"
    assert plan["base"]["model"]["path"] == "builtin:tiny-warm-long-var"


def test_the_fixed_budget_follow_up_plans_the_varied_pairs_with_a_fixed_budget():
    """`--task arith-long-var-budget`: the varied protocol's GRPO arms as they are, each RPO headline arm with
    its suffix budget fixed at 160, every arm at every seed, in a run directory of its own."""
    from services.reproduction.protocols import FIXED_SUFFIX_BUDGET, PROTOCOLS
    from services.reproduction.reproduce import Reproduction
    from services.supervisor.main_job import preset_path

    def plan(task):
        protocol = PROTOCOLS[task]
        return Reproduction(
            preset_path(protocol.preset), [], seeds=3, smoke=False, command="t", protocol=protocol
        ).plan

    varied, budget = plan("arith-long-var"), plan("arith-long-var-budget")
    assert budget["base"] == varied["base"] and budget["length_target"]
    varied_arms = {a["name"]: a["settings"] for a in varied["arms"]}
    budget_arms = {a["name"]: a["settings"] for a in budget["arms"]}
    for (rpo, full), (varied_rpo, varied_full) in zip(
        budget["headline_pairs"], varied["headline_pairs"], strict=True
    ):
        assert full == varied_full and budget_arms[full] == varied_arms[full]
        assert rpo == f"{varied_rpo}-fixed{FIXED_SUFFIX_BUDGET}"
        assert budget_arms[rpo] == {**varied_arms[varied_rpo], "suffix_budget": FIXED_SUFFIX_BUDGET}
    assert sorted((r["arm"], r["seed"]) for r in budget["runs"]) == sorted(
        (arm, seed) for arm in budget_arms for seed in (0, 1, 2)
    )
    # Its runs do not land in the varied protocol's directory (one preset, two protocols).
    from services.core.config import load_config

    preset_run_dir = load_config(preset_path("reproduce-var.yaml"), []).train.run_dir
    assert PROTOCOLS["arith-long-var-budget"].run_dir not in (None, str(preset_run_dir))
    assert "rpo-grpo-budget160" not in budget_arms  # the varied variant (alpha 0.1) keeps its own name


def test_the_follow_up_runs_in_its_own_directory_unless_told_otherwise():
    from services.cli.main import build_parser
    from services.core.config import load_config
    from services.reproduction.protocols import PROTOCOLS
    from services.reproduction.reproduce import reproduce_overrides
    from services.supervisor.main_job import preset_path

    protocol = PROTOCOLS["arith-long-var-budget"]

    def run_dir(*flags: str) -> str:
        args = build_parser().parse_args(["reproduce", "--task", protocol.task, *flags])
        return str(
            load_config(preset_path(protocol.preset), reproduce_overrides(args, protocol)).train.run_dir
        )

    assert run_dir() == protocol.run_dir
    assert run_dir("--run-dir", "elsewhere") == "elsewhere"
    assert run_dir("--set", "train.run_dir=there") == "there"
    assert run_dir("--smoke") == "runs/reproduce-smoke"  # the smoke preset's, whatever the task


def test_an_arm_of_another_task_is_a_usage_error():
    from services.core.cli_args import UsageError
    from services.reproduction.protocols import PROTOCOLS
    from services.reproduction.reproduce import chosen_arms

    with pytest.raises(UsageError, match="--task arith-long-var"):
        chosen_arms("rpo-grpo-eps0", PROTOCOLS["arith-long-var"])
    assert chosen_arms("rpo-grpo-eps0") == ("rpo-grpo-eps0",)
