"""World size 2 under DeepSpeed's launcher (CPU ranks, gloo) against world size 1 on the same batch.

Each run is `tests/trainer/learner/scripts/learner_steps.py` in subprocesses: two learner steps on a fixed batch of
11 samples in groups of 4 (split 6 / 5 over two ranks, so one rank's last micro-batch is short or a zero-weight padding
one), then the weights. Step 1's loss and gradient norm must agree to float tolerance (the gradient is that
of the whole-batch loss on both); step 2's loss depends on the update, so it checks the step too. Two of
the cases also save a two-rank checkpoint after step 1 and resume it in two fresh ranks.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "scripts" / "learner_steps.py"
REPO = Path(__file__).resolve().parents[3]
TIMEOUT_SECONDS = 300  # per launch; about 15 s on an idle 2-core machine
NATIVE_ABORT = "terminate called without an active exception"
"""What a rank prints when it aborts in native code (a C++ thread torn down while still running)."""


def test_shards_cover_the_list_in_order_and_differ_by_at_most_one():
    from trainer.dist import shard_bounds

    # 11 items over 2 ranks: 6 + 5; over 4 ranks: 3 + 3 + 3 + 2; 3 items over 4 ranks: 1 + 1 + 1 + 0.
    assert [shard_bounds(11, 2, r) for r in range(2)] == [(0, 6), (6, 11)]
    assert [shard_bounds(11, 4, r) for r in range(4)] == [(0, 3), (3, 6), (6, 9), (9, 11)]
    assert [shard_bounds(3, 4, r) for r in range(4)] == [(0, 1), (1, 2), (2, 3), (3, 3)]


def test_a_world_of_one_leaves_no_launch_environment_to_child_processes(tiny_model_dir):
    """In a plain process the learner makes a world of one; a trainer started from that process (as `rpo run`
    and the tests do) must not see RANK/MASTER_PORT and take itself for a rank of that world."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from trainer import dist

    before = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    dist.init_distributed()
    assert dist.world_size() == 1 and dist.rank() == 0 and dist.is_main()
    assert {k: os.environ.get(k) for k in before} == before
    assert dist.broadcast_object({"a": 1}) == {"a": 1} and dist.sum_over_ranks([1.5, 2]) == [1.5, 2.0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(world_size: int, model_dir: Path, out_dir: Path, tag: str, *args: str) -> dict:
    out = out_dir / f"{tag}-ws{world_size}.json"
    weights = out_dir / f"{tag}-ws{world_size}.safetensors"
    script_args = [
        str(SCRIPT),
        "--model",
        str(model_dir),
        "--out",
        str(out),
        "--weights",
        str(weights),
        *args,
    ]
    if world_size == 1:
        cmd = [sys.executable, *script_args]
    else:
        launcher = ["-m", "deepspeed.launcher.runner", "--no_local_rank", "--num_gpus", str(world_size)]
        cmd = [sys.executable, *launcher, "--master_port", str(_free_port()), *script_args]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT_SECONDS)
    if proc.returncode != 0 and NATIVE_ABORT in proc.stderr:
        # A rank aborted inside the CPU collectives' native code (seen once in CI, in a ZeRO-3 backward;
        # not reproduced in 4 reruns): one more launch, said in the test's output; a second abort fails.
        print(f"{' '.join(cmd)}: a rank aborted ({NATIVE_ABORT!r}); launching once more")
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT_SECONDS)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    result = json.loads(out.read_text())
    assert result["world_size"] == world_size
    from safetensors.torch import load_file

    result["weights"] = load_file(str(weights))
    return result


def _compare(one: dict, two: dict, lr: float) -> dict[str, float]:
    first1, first2 = one["steps"][0], two["steps"][0]
    second1, second2 = one["steps"][1], two["steps"][1]
    diffs = {
        "loss_step1": abs(first1["loss"] - first2["loss"]),
        "grad_norm_step1_rel": abs(first1["grad_norm"] - first2["grad_norm"]) / first1["grad_norm"],
        "loss_step2": abs(second1["loss"] - second2["loss"]),
        "kl_step2": abs(second1["kl"] - second2["kl"]),
        "weights_max": max(
            (one["weights"][k] - two["weights"][k]).abs().max().item() for k in one["weights"]
        ),
        "weights_off_fraction": sum(
            int(((one["weights"][k] - two["weights"][k]).abs() > 0.01 * lr).sum()) for k in one["weights"]
        )
        / sum(t.numel() for t in one["weights"].values()),
    }
    assert one["names"] == two["names"]
    assert diffs["loss_step1"] < 1e-6 and diffs["grad_norm_step1_rel"] < 1e-5, diffs
    assert diffs["loss_step2"] < 1e-5 and diffs["kl_step2"] < 1e-5, diffs
    # Adam's first steps move each weight by about lr; rank-order float noise may shift a weight whose
    # gradient is near Adam's eps (1e-8) by a fraction of that, never by a whole step, and only a few do.
    assert diffs["weights_max"] < 0.5 * lr and diffs["weights_off_fraction"] < 1e-4, diffs
    for key in ("tokens", "sequences", "policy_version"):
        assert first1[key] == first2[key], key
    return diffs


CASES = {
    # ZeRO-2, GRPO with the KL term (frozen reference copy on each rank), micro-batches of 2.
    "zero2-grpo": ["--set", "train.zero_stage=2", "--set", "algorithm.beta=0.04"],
    # ZeRO-2, DAPO (token-level normaliser over the whole batch), suffix-only loss, two updates per batch.
    "zero2-dapo": [
        "--set", "train.zero_stage=2", "--set", "algorithm.algorithm=dapo",
        "--set", "algorithm.loss_on_suffix_only=true", "--set", "train.updates_per_batch=2",
    ],
    # ZeRO-3, GRPO with the KL term (reference as a ZeRO-3 engine), micro-batches of 4: ranks run 4 + 2 and
    # 4 + 1 samples; world size 1 runs 4 + 4 + 3.
    "zero3-grpo": ["--set", "train.zero_stage=3", "--set", "algorithm.beta=0.04", "--set", "train.micro_batch_size=4"],
    # ZeRO-3 with 3 samples: ranks hold 2 and 1, micro-batches of 1: rank 1 runs one zero-weight padding pass.
    "zero3-padding": ["--set", "train.zero_stage=3", "--set", "train.micro_batch_size=1", "--samples", "3"],
    # ZeRO-3, GRPO with the KL term, micro-batches of 3, gradient checkpointing: two ranks in the shared
    # layout (the group of q1 straddles them) against one rank in the per-response layout.
    "zero3-shared": [
        "--set", "train.zero_stage=3", "--set", "algorithm.beta=0.04", "--set", "train.micro_batch_size=3",
        "--set", "train.gradient_checkpointing=true",
    ],
}  # fmt: skip

WORLD_OF_ONE = {"zero3-shared": ["--set", "train.share_prefix=false"]}
"""Extra arguments of a case's world-size-1 run."""


RESUMED = {"zero2-grpo", "zero3-grpo"}
"""Cases whose two-rank run also saves a checkpoint after step 1, which two fresh ranks then resume."""


@pytest.mark.parametrize("case", list(CASES))
def test_world_size_two_gives_the_world_size_one_step(tiny_model_dir, tmp_path, case):
    lr = 1e-4
    args = ["--set", f"train.lr={lr}", "--set", "train.micro_batch_size=2", *CASES[case]]
    ckpt = tmp_path / "learner"
    extra = ["--save", str(ckpt), "--save-after", "1"] if case in RESUMED else []
    one = _run(1, tiny_model_dir, tmp_path, case, *args, *WORLD_OF_ONE.get(case, []))
    two = _run(2, tiny_model_dir, tmp_path, case, *args, "--export", str(tmp_path / "export"), *extra)
    diffs = _compare(one, two, lr)
    print(case, {k: f"{v:.2e}" for k, v in diffs.items()})
    # The export of the two ranks (gathered under ZeRO-3) holds the weights rank 0 reported.
    from safetensors.torch import load_file

    exported = load_file(str(tmp_path / "export" / "model.safetensors"))
    assert sorted(exported) == two["names"]
    assert all(bool((exported[k].float() == two["weights"][k]).all()) for k in exported)
    if case in RESUMED:
        _check_resume(tiny_model_dir, tmp_path, args, ckpt, two)


def _check_resume(model_dir: Path, tmp_path: Path, args: list[str], ckpt: Path, straight: dict) -> None:
    """Two ranks saved after step 1 (each its optimizer partition and RNG); two fresh ranks load it and take
    step 2: the same loss, gradient norm and weights as the run that went on."""
    resumed = _run(2, model_dir, tmp_path, "resumed", *args, "--load", str(ckpt), "--steps", "1")
    assert resumed["client_state"] == {"saved_after": 1}
    want, have = straight["steps"][1], resumed["steps"][0]
    for key in ("loss", "kl", "grad_norm", "lr", "policy_version"):
        assert have[key] == pytest.approx(want[key], rel=1e-7, abs=1e-9), key
    for name, tensor in straight["weights"].items():
        assert (resumed["weights"][name] - tensor).abs().max().item() <= 1e-7, name
