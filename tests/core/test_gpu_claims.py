"""GPU placement on a compose box: the plan against fake device lists (1, 2, 4, 8 GPUs, too few), the
claims through real file locks and several real processes (a replica in the middle of its claim never
makes a GPU look taken; replicas starting together get distinct GPUs, the surplus ones stop), and a surplus
replica stopping at start with one line and status 0 (compose's `restart: on-failure` leaves it stopped)."""

import json
import os
import subprocess
import sys
import time

import pytest

from services.core.config import GpusSection
from services.core.gpu_claims import MUTEX_NAME, GpuPlacementError, NoFreeGpu, claim_gpus, plan_gpus


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
    with pytest.raises(NoFreeGpu, match="none are free"):
        claim_gpus("rollout", gpus, 0.85)
    first.release()  # a replica that stops frees its GPU for the next one
    third = claim_gpus("rollout", gpus, 0.85)
    assert third.plan.devices == ["1"]
    second.release()
    third.release()
    assert claim_gpus("rollout", GpusSection(), 0.85) is None  # outside compose: no claims


def test_a_surplus_replica_stops_at_start_with_one_line_and_status_0(tmp_path, tiny_model_dir):
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
    assert out.returncode == 0, out.stderr  # not a failure: compose's restart: on-failure leaves it stopped
    said = [line for line in out.stderr.splitlines() if "is not needed and stops" in line]
    assert len(said) == 1 and "needs 1 GPU(s)" in said[0] and "other replicas hold 1" in said[0]
    assert "Traceback" not in out.stderr


CLAIMER = """
import json, sys, time
from pathlib import Path
from services.core.config import GpusSection
from services.core.gpu_claims import NoFreeGpu, claim_gpus
go = Path(sys.argv[2])
while not go.exists():
    time.sleep(0.001)
try:
    claim = claim_gpus("rollout", GpusSection(claim_dir=sys.argv[1]), 0.85)
except NoFreeGpu as exc:
    print(json.dumps({"surplus": str(exc)}), flush=True)
else:
    print(json.dumps({"gpus": claim.plan.devices}), flush=True)
    time.sleep(float(sys.argv[3]))  # hold it while the others claim
"""


def _claimers(tmp_path, n: int, devices: str, hold_seconds: float) -> list[subprocess.Popen]:
    env = {**os.environ, "RPO_GPU_DEVICES": devices}
    return [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                CLAIMER,
                str(tmp_path / "claims"),
                str(tmp_path / "go"),
                str(hold_seconds),
            ],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(n)
    ]


def test_a_replica_in_the_middle_of_its_claim_never_makes_a_gpu_look_taken(tmp_path):
    """Another replica is testing GPU 1 (it holds the claim mutex and GPU 1's lock, as a claim does while it
    reads which GPUs are held) and then lets it go; the replica claiming meanwhile gets GPU 1."""
    claims = tmp_path / "claims"
    claims.mkdir()
    prober = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, sys, time\n"
            "mutex = open(sys.argv[1], 'a'); fcntl.flock(mutex, fcntl.LOCK_EX)\n"
            "gpu = open(sys.argv[2], 'a'); fcntl.flock(gpu, fcntl.LOCK_EX)\n"
            "print('probing', flush=True); time.sleep(1.5)\n"
            "gpu.close(); mutex.close()  # GPU 1 was free: it only tested it\n"
            "time.sleep(30)",
            str(claims / MUTEX_NAME),
            str(claims / "gpu-1.lock"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert prober.stdout.readline().strip() == "probing"
        (tmp_path / "go").touch()
        started = time.monotonic()
        [claimer] = _claimers(tmp_path, 1, "0,1", 0.0)
        out, _ = claimer.communicate(timeout=60)
    finally:
        prober.kill()
        prober.wait()
    assert json.loads(out) == {"gpus": ["1"]}
    assert time.monotonic() - started >= 1.0  # it waited for the other claim instead of giving up


def test_replicas_starting_together_get_distinct_gpus_and_the_surplus_ones_stop(tmp_path):
    procs = _claimers(tmp_path, 5, "0,1,2,3", 3.0)  # the trainer keeps 0: three GPUs for five replicas
    time.sleep(2.0)  # every process imported and waiting
    (tmp_path / "go").touch()
    results = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
    got = sorted(r["gpus"][0] for r in results if "gpus" in r)
    surplus = [r["surplus"] for r in results if "surplus" in r]
    assert got == ["1", "2", "3"], results
    assert len(surplus) == 2 and all("other replicas hold 1, 2, 3" in s for s in surplus), surplus
