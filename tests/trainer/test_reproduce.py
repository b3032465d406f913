"""`rpo reproduce --smoke`: its arms (GRPO, RPO+GRPO with and without the length reward, DAPO, RPO+DAPO, and
RPO+GRPO at the timing L) end to end on the short task's warm model, the results they fill in, the plots, and resuming at the arm an
interrupted reproduction stopped in."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from training_helpers import REPO

from services.supervisor.reproduce import MAIN_ARMS

MAIN_NAMES = {a.name for a in MAIN_ARMS}

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
pytestmark = pytest.mark.timeout(1500)  # the first test's setup runs six arms end to end (about 6 minutes)


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


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, warm_model_dir) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("reproduce") / "out"
    done = _reproduce(out)
    assert done.returncode == 0, (done.stdout + done.stderr)[-8000:]
    return out, done


def test_every_arm_row_is_filled(smoke):
    out, _ = smoke
    results = json.loads((out / "results.json").read_text())
    assert list(results["arms"]) == [arm.name for arm in MAIN_ARMS]
    for name, row in results["arms"].items():
        assert row["steps"] == 2, name
        for label in ("eval_before", "eval_after"):
            ev = row[label]
            assert ev["questions"] == 8 and ev["k"] == 2, (name, label)
            low, high = ev["pass_at_1_ci"]
            assert low <= ev["pass_at_1"] <= high, (name, label)
        assert row["decoded_tokens_per_sample"] > 0, name
        assert row["mean_step_seconds"] > 0 and row["wall_seconds"] > 0, name
        assert all(row["phases"][p] >= 0 for p in ("rollout", "train", "weight_sync", "cache")), name
        assert row["phases"]["rollout"] > 0 and row["phases"]["train"] > 0, name
        assert len(row["series"]["generated_tokens"]) == 2, name
    arms = results["arms"]
    # The arms are what their names say.
    assert arms["grpo"]["settings"]["mode"] == "full" and arms["rpo-grpo"]["settings"]["mode"] == "rpo"
    assert arms["rpo-grpo-no-length"]["settings"]["alpha"] == 0
    assert (
        arms["dapo"]["settings"]["algorithm"] == "dapo" and arms["dapo"]["settings"]["updates_per_batch"] == 2
    )
    # Full-path arms reuse nothing; RPO arms reuse cached prefixes and decode fewer tokens per sample.
    assert arms["grpo"]["reused_prefix_tokens_per_sample"] == 0
    for rpo, full in (("rpo-grpo", "grpo"), ("rpo-dapo", "dapo")):
        assert arms[rpo]["reused_prefix_tokens_per_sample"] > 0
        cmp = results["comparisons"][rpo]
        assert cmp["full"] == full
        assert 0 < cmp["decoded_tokens_predicted"] < 1 and 0 < cmp["decoded_tokens_measured"]
    # The starting model is evaluated once (first arm) and shared.
    assert {json.dumps(r["eval_before"], sort_keys=True) for r in arms.values()} == {
        json.dumps(arms["grpo"]["eval_before"], sort_keys=True)
    }
    assert set(results["differences"]) == {a.name for a in MAIN_ARMS} - {"grpo"}
    # Each RPO arm's accuracy is compared with its own full-path arm (RPO+DAPO with DAPO, not GRPO).
    for rpo, full in (("rpo-grpo", "grpo"), ("rpo-dapo", "dapo")):
        diff = results["comparisons"][rpo]["pass_at_1_difference"]
        gap = arms[rpo]["eval_after"]["pass_at_1"] - arms[full]["eval_after"]["pass_at_1"]
        assert diff["difference"] == pytest.approx(gap, abs=1e-9)
        assert diff["ci"][0] <= diff["difference"] <= diff["ci"][1]
    timing = arms["rpo-grpo-timing"]["settings"]
    assert timing["truncation_limit"] == 32 and timing["mode"] == "rpo"
    assert results["comparisons"]["rpo-grpo-timing"]["full"] == "grpo"
    names = " ".join(t["target"] for t in results["targets"])
    for target in (
        "rollout phase RPO/full <= 0.3",
        "step time RPO/full <= 0.5",
        "equal wall-clock",
        "equal steps",
    ):
        assert target in names


def test_tables_and_plots_are_written(smoke):
    out, done = smoke
    text = (out / "results.md").read_text()
    for arm in MAIN_ARMS:
        assert f"| {arm.label} |" in text
    assert "| RPO+GRPO / GRPO |" in text and "| RPO+DAPO / DAPO |" in text
    assert "## Targets" in text and "## Arms" in text
    assert "| RPO+GRPO |" in done.stdout  # printed too
    for name in ("accuracy_vs_time.png", "decoded_tokens_per_step.png", "response_length.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, name


def test_an_interrupted_reproduction_resumes_at_the_arm_it_stopped_in(smoke):
    out, _ = smoke
    kept = {a.name: (out / "arms" / a.name / "metrics.jsonl").stat().st_mtime_ns for a in MAIN_ARMS[:-1]}
    last = out / "arms" / MAIN_ARMS[-1].name
    # What an interrupted last arm leaves: a run directory without an ok summary.
    summary = json.loads((last / "summary.json").read_text())
    (last / "summary.json").write_text(json.dumps({**summary, "ok": False, "error": "interrupted"}))
    done = _reproduce(out)
    assert done.returncode == 0, (done.stdout + done.stderr)[-8000:]
    log = done.stdout + done.stderr
    count = len(MAIN_ARMS)
    assert f"{count - 1} of {count} arms finished" in log
    assert f"arm {count}/{count} {MAIN_ARMS[-1].name}" in log and f"arm 1/{count}" not in log
    assert {n: (out / "arms" / n / "metrics.jsonl").stat().st_mtime_ns for n in kept} == kept
    assert json.loads((last / "summary.json").read_text())["ok"]
    results = json.loads((out / "results.json").read_text())
    assert list(results["arms"]) == [arm.name for arm in MAIN_ARMS]


def test_an_arm_planned_with_other_settings_is_run_again(smoke, tmp_path):
    from services.supervisor.main_job import preset_path
    from services.supervisor.reproduce import SMOKE_OVERRIDES, SMOKE_PRESET, Reproduction

    out, _ = smoke
    copy = tmp_path / "reproduce"
    (copy / "arms").mkdir(parents=True)
    (copy / "plan.json").write_text((out / "plan.json").read_text())
    for arm in MAIN_ARMS:
        (copy / "arms" / arm.name).mkdir()
        (copy / "arms" / arm.name / "summary.json").write_text(
            (out / "arms" / arm.name / "summary.json").read_text()
        )

    def done(timing_limit: int) -> list[str]:
        overrides = [*SMOKE_OVERRIDES, f"train.run_dir={copy}"]
        return Reproduction(
            preset_path(SMOKE_PRESET),
            overrides,
            sweep=False,
            smoke=True,
            command="t",
            timing_limit=timing_limit,
        ).prepare()

    timing = MAIN_ARMS[-1].name
    smoke_limit = json.loads((out / "results.json").read_text())["arms"][timing]["settings"][
        "truncation_limit"
    ]
    assert set(done(smoke_limit)) == MAIN_NAMES  # same plan: every arm is finished
    assert set(done(smoke_limit + 1)) == MAIN_NAMES - {timing}  # the timing arm's L changed: it runs again


def test_bad_flags_are_usage_errors(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RPO_")}
    for flags, message in (
        (["--steps", "0"], "--steps must be >= 1"),
        (["--gpu-rollout-share", "1.5"], "--gpu-rollout-share must be in [0, 1]"),
        (["--timing-limit", "0"], "--timing-limit must be >= 1"),
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


def test_sweep_plan_adds_one_arm_per_new_point_and_reuses_equal_ones():
    from services.supervisor.main_job import preset_path
    from services.supervisor.reproduce import SMOKE_OVERRIDES, SWEEPS, Reproduction

    plan = Reproduction(
        preset_path("tiny-demo.yaml"), list(SMOKE_OVERRIDES), sweep=True, smoke=True, command="rpo reproduce"
    ).plan
    arms = {a["name"]: a for a in plan["arms"]}
    points = {p: {str(x["value"]): x["arm"] for x in plan["sweeps"][p]} for p in SWEEPS}
    # tiny-demo's L is 64 and the timing arm's 32: those points are the existing arms
    assert points["L"]["64"] == "rpo-grpo" and points["L"]["32"] == "rpo-grpo-timing"
    assert arms[points["L"]["0.5l"]]["settings"]["truncation_limit"] == "0.5l"
    assert points["alpha"]["0.0"] == "rpo-grpo-no-length" and points["alpha"]["0.01"] == "rpo-grpo"
    assert points["G"]["6"] == "rpo-grpo"
    # a G point has its own full-path arm at that G
    for g in ("4", "8"):
        rpo = arms[points["G"][g]]
        assert rpo["settings"]["group_size"] == int(g) and rpo["settings"]["mode"] == "rpo"
        full = arms[rpo["full"]]
        assert full["settings"]["group_size"] == int(g) and full["settings"]["mode"] == "full"
    # epsilon only acts when a question comes back: its points (0.5 included) and their GRPO arm train on
    # a third of the questions, three visits each
    assert {points["epsilon"][e] for e in ("0.1", "0.5", "1.0")}.isdisjoint(MAIN_NAMES)
    for e in ("0.1", "0.5", "1.0"):
        rpo = arms[points["epsilon"][e]]
        assert rpo["settings"]["epsilon"] == float(e) and rpo["settings"]["epochs"] == 3
        full = arms[rpo["full"]]
        assert full["settings"]["mode"] == "full" and full["settings"]["epochs"] == 3
        assert full["settings"]["max_questions"] == rpo["settings"]["max_questions"]
    new = [a for a in plan["arms"] if a["sweep"]]
    assert len(new) == 11 and len({json.dumps(a["settings"], sort_keys=True) for a in plan["arms"]}) == len(
        plan["arms"]
    )


def test_sweep_tables_render_from_a_finished_reproduction(smoke):
    from services.supervisor.results import render_markdown

    out, _ = smoke
    results = json.loads((out / "results.json").read_text())
    results["sweeps"] = {"L": [{"value": 64, "arm": "rpo-grpo"}, {"value": 32, "arm": "rpo-grpo-timing"}]}
    text = render_markdown(results)
    assert "## Sweep: L" in text
    rows = [
        line
        for line in text.split("## Sweep: L")[1].splitlines()
        if line.startswith("| 64 ") or line.startswith("| 32 ")
    ]
    assert len(rows) == 2 and all(row.count("|") == 10 for row in rows)
    # the L = 32 point's paired difference is against its full arm, GRPO
    diff = results["comparisons"]["rpo-grpo-timing"]["pass_at_1_difference"]["difference"]
    assert f"| {100 * diff:+.1f} [" in next(row for row in rows if row.startswith("| 32 "))
