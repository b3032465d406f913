"""GPU placement on a compose box: the plan against fake device lists (1, 2, 4, 8 GPUs, too few), the
claims through real file locks, and a replica that cannot get a GPU failing at start with one message."""

import os
import subprocess
import sys

import pytest

from services.core.config import GpusSection
from services.core.gpu_claims import GpuPlacementError, claim_gpus, plan_gpus


def _devices(n: int) -> list[str]:
    return [str(i) for i in range(n)]


@pytest.mark.parametrize("n", [2, 4, 8])
def test_each_replica_gets_its_own_gpu_and_the_trainer_keeps_the_first(n):
    gpus = GpusSection()
    assert plan_gpus("trainer", _devices(n), gpus, 0.85, set()).devices == ["0"]
    taken: set[str] = set()
    for expected in range(1, n):
        plan = plan_gpus("rollout", _devices(n), gpus, 0.85, taken)
        assert plan.devices == [str(expected)] and not plan.shared_with_trainer
        taken.update(plan.devices)
    with pytest.raises(
        GpuPlacementError, match=f"none are free.*the box has {n}.*Scale rollout down to {n - 1}"
    ):
        plan_gpus("rollout", _devices(n), gpus, 0.85, taken)


def test_several_gpus_per_replica_and_for_the_trainer():
    gpus = GpusSection(trainer=2, per_replica=3)
    assert plan_gpus("trainer", _devices(8), gpus, 0.85, set()).devices == ["0", "1"]
    first = plan_gpus("rollout", _devices(8), gpus, 0.85, set())
    second = plan_gpus("rollout", _devices(8), gpus, 0.85, set(first.devices))
    assert first.devices == ["2", "3", "4"] and second.devices == ["5", "6", "7"]
    with pytest.raises(GpuPlacementError, match=r"needs 3 GPU\(s\)"):
        plan_gpus("rollout", _devices(8), gpus, 0.85, set(first.devices + second.devices))


def test_one_gpu_is_shared_with_an_explicit_split_and_only_once():
    gpus = GpusSection()
    trainer = plan_gpus("trainer", _devices(1), gpus, 0.4, set())
    replica = plan_gpus("rollout", _devices(1), gpus, 0.4, set())
    assert trainer.devices == replica.devices == ["0"]
    assert trainer.shared_with_trainer and replica.shared_with_trainer
    # the default headroom (0.05) stays free for the CUDA contexts: 0.4 + 0.55 of the device
    assert replica.memory_fraction == 0.4 and trainer.memory_fraction == pytest.approx(0.55)
    with pytest.raises(GpuPlacementError, match="another replica already does.*Scale rollout to 1"):
        plan_gpus("rollout", _devices(1), gpus, 0.4, {"0"})
    with pytest.raises(GpuPlacementError, match=r"gpu_memory_utilization \(0.85\) must be at most"):
        plan_gpus("rollout", _devices(1), gpus, 0.85, set())
    with pytest.raises(GpuPlacementError, match="needs 1 GPU.*of its own"):
        plan_gpus("rollout", _devices(1), GpusSection(share_with_trainer=False), 0.4, set())


@pytest.mark.parametrize(
    ("rollout", "headroom", "trainer"),
    [(0.4, 0.05, 0.55), (0.5, 0.1, 0.4), (0.3, 0.0, 0.7), (0.25, 0.2, 0.55)],
)
def test_a_shared_gpu_leaves_headroom_and_the_trainer_takes_the_rest(rollout, headroom, trainer):
    gpus = GpusSection(shared_headroom_fraction=headroom)
    plan = plan_gpus("trainer", _devices(1), gpus, rollout, set())
    assert plan.shared_with_trainer and plan.memory_fraction == pytest.approx(trainer)
    assert plan_gpus("rollout", _devices(1), gpus, rollout, set()).memory_fraction == rollout
    assert rollout + headroom + plan.memory_fraction == pytest.approx(1.0)
    # with a GPU of its own the trainer is not capped, whatever the headroom
    assert plan_gpus("trainer", _devices(2), gpus, rollout, set()).memory_fraction is None


def test_a_split_that_leaves_the_trainer_nothing_is_refused():
    with pytest.raises(
        ValueError, match=r"shared_rollout_fraction \(0.9\) \+ shared_headroom_fraction \(0.1\)"
    ):
        GpusSection(shared_rollout_fraction=0.9, shared_headroom_fraction=0.1)
    with pytest.raises(GpuPlacementError, match=r"would get nothing.*\(0.96\).*\(0.05\)"):
        plan_gpus("trainer", _devices(1), GpusSection(), 0.96, set())


def test_too_few_gpus_name_what_is_missing():
    with pytest.raises(GpuPlacementError, match=r"trainer needs 2 GPU\(s\).*has 1"):
        plan_gpus("trainer", _devices(1), GpusSection(trainer=2), 0.4, set())
    with pytest.raises(GpuPlacementError, match="no GPU found"):
        plan_gpus("rollout", [], GpusSection(), 0.4, set())


def test_claims_lock_distinct_gpus_and_free_them(tmp_path, monkeypatch):
    monkeypatch.setenv("RPO_GPU_DEVICES", "0,1,2")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    gpus = GpusSection(claim_dir=str(tmp_path))
    first = claim_gpus("rollout", gpus, 0.85)
    assert first.plan.devices == ["1"] and os.environ["CUDA_VISIBLE_DEVICES"] == "1"
    second = claim_gpus("rollout", gpus, 0.85)
    assert second.plan.devices == ["2"]
    with pytest.raises(GpuPlacementError, match="none are free"):
        claim_gpus("rollout", gpus, 0.85)
    first.release()  # a replica that stops frees its GPU for the next one
    third = claim_gpus("rollout", gpus, 0.85)
    assert third.plan.devices == ["1"]
    second.release()
    third.release()
    assert claim_gpus("rollout", GpusSection(), 0.85) is None  # outside compose: no claims


def test_a_replica_without_a_free_gpu_fails_at_start_with_one_message(tmp_path, tiny_model_dir):
    holder = subprocess.Popen(  # another replica's process holds GPU 1
        [
            sys.executable,
            "-c",
            "import fcntl, sys, time; fh = open(sys.argv[1], 'a'); fcntl.flock(fh, fcntl.LOCK_EX); "
            "print('held', flush=True); time.sleep(60)",
            str(tmp_path / "gpu-1.lock"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        out = subprocess.run(
            [sys.executable, "-m", "services.cli", "serve", "rollout", "--model", str(tiny_model_dir)],
            env={**os.environ, "RPO_GPU_DEVICES": "0,1", "RPO_GPUS__CLAIM_DIR": str(tmp_path)},
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        holder.kill()
        holder.wait()
    assert out.returncode == 2, out.stderr
    assert "needs 1 GPU(s)" in out.stderr and "other replicas hold 1" in out.stderr
    assert "Traceback" not in out.stderr
