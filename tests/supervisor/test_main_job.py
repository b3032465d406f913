"""`rpo run`: process supervision (stop everything, name what died), the run directory, the summary table;
and end to end, the real command with a shortened config."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from services.core.config import load_config
from services.supervisor.main_job import fresh_run_dir, preset_path, render_summary
from services.supervisor.processes import PartFailed, Supervisor, free_port, write_run_config
from tests.trainer.training_helpers import REPO

SLEEPER = [sys.executable, "-c", "import time; time.sleep(600)"]


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its reaper counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_stop_all_stops_children_and_their_workers(tmp_path):
    # The child starts a grandchild (like vLLM's engine core) and then ignores SIGTERM.
    code = (
        "import signal, subprocess, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        f"p = subprocess.Popen({SLEEPER!r})\n"
        "print(p.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    with Supervisor(tmp_path, stop_timeout_seconds=1.0) as sup:
        child = sup.start("stubborn", [sys.executable, "-c", code])
        deadline = time.monotonic() + 10
        while not child.log_path.read_text().strip() and time.monotonic() < deadline:
            time.sleep(0.05)
        grandchild = int(child.log_path.read_text().split()[0])
        assert _alive(grandchild)
    assert child.popen.returncode is not None
    deadline = time.monotonic() + 5
    while _alive(grandchild) and time.monotonic() < deadline:  # SIGKILL is delivered asynchronously
        time.sleep(0.05)
    assert not _alive(grandchild)


def test_a_part_that_dies_is_named_with_its_log(tmp_path):
    with Supervisor(tmp_path) as sup:
        child = sup.start(
            "cache",
            [sys.executable, "-c", "import sys; print('redis unreachable at 10.0.0.1'); sys.exit(3)"],
            url=f"http://127.0.0.1:{free_port()}",
        )
        with pytest.raises(PartFailed, match=r"(?s)cache exited 3.*redis unreachable"):
            sup.wait_ready(child, timeout_seconds=30)
        other = sup.start("trainer", SLEEPER)
        with pytest.raises(PartFailed, match="cache exited 3"):
            sup.wait(other, timeout_seconds=5)


def test_a_child_waited_for_to_the_end_is_not_a_failure(tmp_path):
    with Supervisor(tmp_path) as sup:
        first = sup.start("cache-init", [sys.executable, "-c", "pass"])
        assert sup.wait(first, timeout_seconds=30) == 0
        second = sup.start("trainer", [sys.executable, "-c", "import time; time.sleep(0.5)"])
        assert sup.wait(second, timeout_seconds=30) == 0  # the first one's exit is not held against it


def test_readiness_wait_has_a_timeout(tmp_path):
    with Supervisor(tmp_path) as sup:
        child = sup.start("rollout", SLEEPER, url=f"http://127.0.0.1:{free_port()}")
        started = time.monotonic()
        with pytest.raises(PartFailed, match="not ready after 1 s"):
            sup.wait_ready(child, timeout_seconds=1)
        assert time.monotonic() - started < 5


def test_an_existing_run_directory_is_moved_aside(tmp_path):
    run = tmp_path / "runs" / "demo"
    fresh_run_dir(run)
    (run / "metrics.jsonl").write_text("{}\n")
    fresh_run_dir(run)
    assert run.is_dir() and not any(run.iterdir())
    aside = [p for p in run.parent.iterdir() if p.name.startswith("demo.")]
    assert len(aside) == 1 and (aside[0] / "metrics.jsonl").is_file()


def test_children_get_the_resolved_config_and_the_token_only_by_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("RPO_API_TOKEN", "s3cret")
    monkeypatch.setenv("RPO_ALGORITHM__GROUP_SIZE", "3")
    cfg = load_config(preset_path(), ["services.rollout_urls=[http://127.0.0.1:9]"])
    path, env = write_run_config(cfg, tmp_path / "config.yaml")
    assert "s3cret" not in path.read_text()
    assert env["RPO_API_TOKEN"] == "s3cret" and "RPO_ALGORITHM__GROUP_SIZE" not in env
    monkeypatch.delenv("RPO_ALGORITHM__GROUP_SIZE")
    again = load_config(path)  # the file alone reproduces the resolved config
    assert again.algorithm.group_size == 3 and again.services.rollout_urls == ["http://127.0.0.1:9"]
    assert again.model_dump(exclude={"services": {"api_token"}}) == cfg.model_dump(
        exclude={"services": {"api_token"}}
    )


def test_summary_table():
    summary = {
        "ok": True,
        "run_dir": "runs/x",
        "algorithm": "grpo",
        "mode": "rpo",
        "model": "/m/tiny",
        "eval_before": {"pass_at_1": 0.3, "pass_at_k": 0.5, "k": 4},
        "eval_after": {"pass_at_1": 0.45, "pass_at_k": 0.6, "k": 4},
        "full_path_reference": {"decoded_tokens_per_sample": 40.0},
        "first_step_decoded_tokens_per_sample": 10.0,
        "decoded_tokens_per_sample": 12.0,
        "reused_prefix_tokens": 12345,
        "steps": 20,
        "mean_step_seconds": 2.5,
        "wall_seconds": 300.0,
    }
    text = render_summary(summary)
    for expected in (
        "30.0%",
        "45.0%",
        "pass@4",
        "full-path 40.0",
        "rpo 10.0",
        "70% fewer",
        "12,345",
        "300 s",
    ):
        assert expected in text, expected
    assert "did not finish" in render_summary({"ok": False, "error": "cache exited 3", "run_dir": "r"})


# ------------------------------------------------------------------------------------------------------------
# End to end: the real `rpo run`, shortened (tiny sizes), as a subprocess

SHORT = (
    "data.max_questions=64",
    "data.eval_max_questions=32",
    "sampling.eval_samples=2",
    "algorithm.group_size=4",
    "train.questions_per_step=8",
    "train.max_steps=2",
    "train.checkpoint_every=1",
)


def _rpo_run(
    run_dir: Path, *extra: str, flags: tuple[str, ...] = (), env_extra: dict[str, str] | None = None
) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RPO_")}
    env.setdefault("DS_ACCELERATOR", "cpu")
    env.update(env_extra or {})
    sets = [a for item in (*SHORT, f"train.run_dir={run_dir}", *extra) for a in ("--set", item)]
    # Ctrl-C must reach the job even when pytest itself was started with SIGINT ignored (a shell's background
    # job is), which a child process would inherit: the job gets Python's own handler back first.
    restore_sigint = (
        "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
        "from services.cli.main import main; sys.exit(main())"
    )
    return subprocess.Popen(
        [sys.executable, "-c", restore_sigint, "run", *flags, *sets],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _started_pids(output: str) -> list[int]:
    return [int(m) for m in re.findall(r"started \S+ \(pid (\d+)\)", output)]


def test_rpo_run_on_a_model_and_dataset_named_by_hub_id_completes_and_stops_everything_it_started(
    tmp_path, warm_model_dir, hub_home
):
    """The user's path, offline: `rpo run --model ORG/NAME --dataset ORG/NAME --set data.subset=main` from a
    Hugging Face cache (tests/fixtures/hub.py), no --config, so the library defaults; evaluation on the
    dataset's own test split, each line naming it."""
    hub_home.add_model("rpo-test/tiny-warm", warm_model_dir)
    run_dir = tmp_path / "run"
    job = _rpo_run(
        run_dir,
        "data.subset=main",
        "train.metrics_port=0",
        "algorithm.max_response_tokens=96",
        flags=("--model", "rpo-test/tiny-warm", "--dataset", "rpo-test/arith-gsm8k"),
        env_extra=hub_home.env(),
    )
    output, _ = job.communicate(timeout=600)
    assert job.returncode == 0, output[-6000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["ok"] and summary["steps"] == 2
    assert summary["eval_before"]["questions"] == summary["eval_after"]["questions"] == 32
    assert summary["eval_after"]["dataset"] == "rpo-test/arith-gsm8k (main, test)"
    assert "evaluated on: rpo-test/arith-gsm8k (main, test)" in output  # the summary names the set
    assert "the library defaults (the paper's settings), not the tiny demo's preset" in output
    # the context sized from the model (2,048 positions) and the response budget, said once at start
    assert "context: model.max_model_len 608: algorithm.max_response_tokens 96 + 512" in output
    assert re.search(r"evaluation before on rpo-test/arith-gsm8k \(main, test\): pass@1", output), output[
        -4000:
    ]
    config = (run_dir / "config.yaml").read_text()
    assert "/models--rpo-test--tiny-warm/snapshots/" in config  # one snapshot, handed to every process
    assert summary["cache_init"]["written"] + summary["cache_init"]["empty"] == 64
    ref = summary["full_path_reference"]
    assert (
        ref["questions"] == 8
        and summary["first_step_decoded_tokens_per_sample"] < ref["decoded_tokens_per_sample"]
    )
    for text in ("held-out accuracy (pass@1)", "decoded tokens / sample", "wall time"):
        assert text in output
    assert (run_dir / "final" / "config.json").is_file() and (run_dir / "config.yaml").is_file()
    pids = _started_pids(output)
    assert len(pids) == 3  # cache server, rollout replica, trainer
    assert not [pid for pid in pids if _alive(pid)]


def test_rpo_run_with_lora_pushes_only_adapters_and_exports_the_adapter_and_the_merged_model(
    tmp_path, warm_model_dir
):
    """`rpo run --set train.lora.rank=8`: the replica keeps the base and takes each step's adapter (4 layers x
    7 linear layers x A and B = 56 tensors a push, not the model's 26 tensors); the run ends with both
    exports."""
    run_dir = tmp_path / "run"
    job = _rpo_run(run_dir, "train.lora.rank=8", "train.max_steps=3")
    output, _ = job.communicate(timeout=600)
    assert job.returncode == 0, output[-6000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["ok"] and summary["steps"] == 3 and summary["eval_after"]["step"] == 3
    replica_log = (run_dir / "logs" / "rollout.log").read_text()
    pushes = re.findall(r"serving policy version (\d+): (\d+) tensors", replica_log)
    assert [int(v) for v, _ in pushes] == [1, 2, 3]
    assert {int(t) for _, t in pushes} == {56}
    final = run_dir / "final"
    assert (final / "model.safetensors").is_file() and (final / "config.json").is_file()
    assert json.loads((final / "adapter" / "adapter_config.json").read_text())["r"] == 8
    assert (final / "adapter" / "adapter_model.safetensors").is_file()


def test_ctrl_c_stops_every_part_and_the_trainer_saves_a_checkpoint_and_rpo_run_resume_continues(
    tmp_path, warm_model_dir
):
    from trainer.checkpoint import Checkpointer
    from trainer.telemetry.progress import read_records

    run_dir = tmp_path / "run"
    job = _rpo_run(run_dir, "train.max_steps=50", "data.eval_dataset=null", "train.checkpoint_every=100")
    deadline = time.monotonic() + 400
    while (
        not (run_dir / "metrics.jsonl").exists()
        or '"kind": "step"' not in (run_dir / "metrics.jsonl").read_text()
    ):
        assert job.poll() is None, job.stdout.read()[-6000:]
        assert time.monotonic() < deadline, "no training step within 400 s"
        time.sleep(0.2)
    job.send_signal(signal.SIGINT)  # what Ctrl-C sends to the foreground process
    output, _ = job.communicate(timeout=300)
    assert job.returncode == 130, output[-6000:]
    assert "interrupted" in output
    latest = Checkpointer(run_dir / "checkpoints", keep=2).latest()
    assert latest is not None and 1 <= Checkpointer.read_state(latest).step < 50  # saved on the way out
    assert not [pid for pid in _started_pids(output) if _alive(pid)]
    assert "`rpo run --resume` continues" in output
    state = Checkpointer.read_state(latest)

    # The same command with --resume (two more steps): same directory, run id and cache, from that step on.
    resumed = _rpo_run(
        run_dir,
        f"train.max_steps={state.step + 2}",
        "data.eval_dataset=null",
        "train.checkpoint_every=100",
        flags=("--resume",),
    )
    output, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, output[-6000:]
    records = read_records(run_dir, None)
    resume = [r for r in records if r["kind"] == "resume"]
    assert [r["step"] for r in resume] == [state.step]
    after = [r["step"] for r in records[records.index(resume[0]) :] if r["kind"] == "step"]
    assert after == [state.step + 1, state.step + 2]
    assert not [
        r for r in records[records.index(resume[0]) :] if r["kind"] == "cache_init"
    ]  # restored instead
    assert f"resuming run {state.run_id}" in output
    assert not (tmp_path / "run.").exists() and not list(tmp_path.glob("run.*"))  # not moved aside


def test_rpo_run_resume_with_nothing_to_resume_says_so(tmp_path):
    job = _rpo_run(tmp_path / "empty", flags=("--resume",))
    output, _ = job.communicate(timeout=120)
    assert job.returncode == 2, output[-3000:]
    assert "--resume: no checkpoint under" in output and "Traceback" not in output
