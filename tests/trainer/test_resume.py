"""Checkpoints: the bookkeeping (atomic completion, newest, pruning), the stop request;
and end to end, a training process killed with SIGKILL mid-run and resumed with `--resume`."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from tests.trainer.training_helpers import (
    Trainer,
    replica_version,
    run_config,
    run_trainer,
    seed,
    wait_for_step,
)
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


# ------------------------------------------------------------------------------------------------------------
# End to end: SIGKILL a training process mid-run, then `rpo train --resume`


def test_a_run_killed_with_sigkill_resumes_from_its_last_checkpoint(
    tmp_path, warm_model_dir, rollout_cache_url, training_replicas, rollout_server_factory
):
    import httpx
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from services.core.clients.cache import SyncCacheClient, read_export_file
    from services.core.schemas.rollout import GenerateRequest, GenerateResponse
    from trainer.checkpoint import CACHE_FILE, HF_DIR
    from trainer.telemetry.progress import read_records

    url = training_replicas[0].url
    cfg, config_file = run_config(
        tmp_path, warm_model_dir, rollout_cache_url, [url], "train.max_steps=6", "train.checkpoint_every=2"
    )
    seed(cfg)
    run_dir = Path(cfg.train.run_dir)
    trainer = Trainer(config_file, log_path=tmp_path / "first.log")
    wait_for_step(run_dir, 3, trainer)
    trainer.kill()  # SIGKILL to the whole process group: no handler runs, nothing is saved

    checkpoint = Checkpointer(run_dir / "checkpoints", keep=2).latest()
    state = Checkpointer.read_state(checkpoint)
    assert state.step in (2, 4) and state.step < max(r["step"] for r in read_records(run_dir, "step")) + 1
    ids = [f"arith-train-{i:05d}" for i in range(48)]
    with SyncCacheClient(rollout_cache_url) as cache:
        killed = cache.read_entries(cfg.services.run_id, ids)
        assert any(
            e is not None and e.last_step and e.last_step > state.step for e in killed
        )  # lost steps' updates

        # A fresh start on the same run id is refused: the cache holds trained steps (a reused id).
        fresh = Trainer(config_file, log_path=tmp_path / "fresh.log")
        assert fresh.wait() == 2, fresh.output()[-3000:]
        assert f"run id {cfg.services.run_id!r} already holds a cache" in fresh.output()
        assert "--resume" in fresh.output() and "Traceback" not in fresh.output()
        assert cache.stats(cfg.services.run_id).trained_steps >= state.step  # nothing was deleted

        # Resume without further steps: the restored state is exactly the checkpoint's.
        run_trainer(
            config_file, "--resume", "--set", f"train.max_steps={state.step}", log_path=tmp_path / "a.log"
        )
        resumed = read_records(run_dir, "resume")[-1]
        assert (resumed["step"], resumed["policy_version"]) == (state.step, state.policy_version)
        _, snapshot = read_export_file(checkpoint / CACHE_FILE)
        restored = {e.question_id: e.model_dump() for e in cache.read_entries(cfg.services.run_id, ids) if e}
        assert restored == {e.question_id: e.model_dump() for e in snapshot}

        # Resume to the end, with `services.run_id: auto`: the run id is the checkpoint's; the lost steps
        # are trained again, the replica ends at the trainer's version.
        output = run_trainer(
            config_file, "--resume", "--set", "services.run_id=auto", log_path=tmp_path / "b.log"
        )
        assert f"run id {cfg.services.run_id} (services.run_id=auto)" in output
    records = read_records(run_dir, None)
    last_resume = max(i for i, r in enumerate(records) if r["kind"] == "resume")
    after = [r for r in records[last_resume:] if r["kind"] == "step"]
    assert [r["step"] for r in after] == list(range(state.step + 1, 7))
    assert replica_version(url) == after[-1]["policy_version"]
    last = Checkpointer(run_dir / "checkpoints", keep=2).latest()
    assert Checkpointer.read_state(last).step == 6
    assert (run_dir / "final" / "config.json").is_file()
    # Every checkpoint is also an HF model directory: the last one holds the final policy's exact weights,
    # readable by every user, loaded by transformers and served by a replica with transformers' greedy tokens.
    hf = last / HF_DIR
    assert (
        load_file(hf / "model.safetensors").keys()
        == load_file(run_dir / "final" / "model.safetensors").keys()
    )
    final = load_file(run_dir / "final" / "model.safetensors")
    assert all(torch.equal(t, final[k]) for k, t in load_file(hf / "model.safetensors").items())
    assert all(f.stat().st_mode & 0o444 == 0o444 for f in hf.iterdir())
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(hf)
    prompt = tokenizer("12+34=")["input_ids"]
    with torch.no_grad():
        expected = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)[0][
            len(prompt) :
        ]
    replica = rollout_server_factory(hf)
    reply = httpx.post(
        replica.url + "/v1/generate",
        content=GenerateRequest(prompts=[prompt], n=1, max_tokens=12, temperature=0.0).model_dump_json(),
        headers={"content-type": "application/json"},
        timeout=120,
    )
    assert reply.status_code == 200, reply.text
    served = GenerateResponse.model_validate_json(reply.content).results[0][0].token_ids
    want = expected.tolist()
    if tokenizer.eos_token_id in want:  # the replica stops after EOS, EOS included
        want = want[: want.index(tokenizer.eos_token_id) + 1]
    assert served == want
