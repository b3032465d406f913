"""Checkpoints: the bookkeeping (atomic completion, newest, pruning), the stop request;
and end to end, a training process killed with SIGKILL mid-run and resumed with `--resume`."""

from __future__ import annotations

import os
import signal

import pytest

from trainer.checkpoint import STATE_FILE, Checkpointer, StopRequest, TrainerState


def _state(step: int) -> TrainerState:
    return TrainerState(
        step=step, policy_version=step, cursor={"epoch": 0, "position": step}, run_id="r", mode="rpo"
    )


def test_only_complete_checkpoints_count_and_the_last_k_are_kept(tmp_path):
    ckpt = Checkpointer(tmp_path / "checkpoints", keep=2)
    assert ckpt.latest() is None
    for step in (5, 10, 15):
        partial = ckpt.begin(step)
        (partial / "learner").mkdir()
        ckpt.commit(partial, _state(step))
    assert [p.name for p in ckpt.complete()] == ["step-00000010", "step-00000015"]  # step 5 pruned
    # A save that crashed half-way (no state file, still .partial) is never picked, and is cleaned up.
    crashed = ckpt.begin(20)
    (crashed / "learner").mkdir()
    assert ckpt.latest().name == "step-00000015"
    assert Checkpointer.read_state(ckpt.latest()).policy_version == 15
    ckpt.prune()
    assert not crashed.exists()


def test_saving_the_same_step_twice_replaces_it(tmp_path):
    ckpt = Checkpointer(tmp_path, keep=3)
    ckpt.commit(ckpt.begin(4), _state(4))
    again = _state(4)
    again.policy_version = 99
    ckpt.commit(ckpt.begin(4), again)
    assert len(ckpt.complete()) == 1 and Checkpointer.read_state(ckpt.latest()).policy_version == 99
    assert (ckpt.latest() / STATE_FILE).is_file()


def test_sigterm_asks_for_a_stop_after_the_step():
    stop = StopRequest()
    try:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.signal_name == "SIGTERM"
        os.kill(os.getpid(), signal.SIGINT)  # a second signal: Ctrl-C now interrupts at once
        pytest.fail("a second Ctrl-C should raise KeyboardInterrupt")
    except KeyboardInterrupt:
        pass
    finally:
        stop.close()
    assert signal.getsignal(signal.SIGTERM) is not stop._handle
