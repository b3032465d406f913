"""Greedy parity after a weight push (run by scripts/gpu_smoke.sh): a replica started on the warm tiny
model receives the weights of a trained policy over HTTP, then its greedy continuations must equal
transformers' greedy continuations of that policy, token for token. On a GPU by default; `--cpu` runs the
replica on vLLM's CPU engine and transformers on CPU (what the test suite runs). Prints one line; exit 1
on a mismatch. Usage: python scripts/gpu_smoke.py [--cpu] BASE_MODEL_DIR TRAINED_MODEL_DIR WORK_DIR"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import httpx
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from services.core.config import load_config
from services.supervisor.processes import Supervisor, free_port, rpo_command, write_run_config
from trainer.weight_push import push_weights

PROMPTS = ["Q: 12+7+30=?\nA: ", "Q: 401+96=?\nA: ", "Q: 5+5+5+5=?\nA: "]


def main(base: Path, trained: Path, work: Path, *, cpu: bool = False) -> int:
    tokenizer = AutoTokenizer.from_pretrained(trained)
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # CPU: a small KV cache and no reward workers (parity scores nothing); GPU: 30% of the device
    device_settings = (
        ["rollout.kv_cache_bytes=134217728", "rollout.reward_workers=0"]
        if cpu
        else ["rollout.gpu_memory_utilization=0.3"]
    )
    device = "cpu" if cpu else "cuda"
    cfg = load_config(None, [f"model.path={base}", *device_settings, f"rollout.port={port}"])
    config_file, env = write_run_config(cfg, work / "parity.yaml")
    with Supervisor(work / "logs") as supervisor:
        child = supervisor.start(
            "rollout", rpo_command("serve", "rollout", "--config", str(config_file)), env=env, url=url
        )
        supervisor.wait_ready(child, 600)
        weights = {}
        for shard in sorted(trained.glob("*.safetensors")):
            weights.update(load_file(shard))
        started = time.monotonic()
        push_weights(url, weights, 1, timeout_seconds=300)
        push_seconds = time.monotonic() - started
        reply = httpx.post(
            url + "/v1/generate",
            json={"prompts": prompts, "max_tokens": 24, "temperature": 0.0},
            timeout=120,
        ).json()
    served = [r[0]["token_ids"] for r in reply["results"]]
    model = AutoModelForCausalLM.from_pretrained(trained, torch_dtype=torch.float32).to(device).eval()
    expected = []
    for ids in prompts:
        out = model.generate(torch.tensor([ids]).to(device), max_new_tokens=24, do_sample=False)
        expected.append(out[0, len(ids) :].tolist())
    # the replica stops at EOS (kept); transformers pads after it: compare up to the replica's length
    same = (
        all(e[: len(s)] == s for s, e in zip(served, expected, strict=True)) and reply["policy_version"] == 1
    )
    print(
        f"parity after a push: {'same' if same else 'DIFFERENT'} greedy tokens on {len(prompts)} prompts, "
        f"version {reply['policy_version']}, push {push_seconds:.2f} s"
    )
    return 0 if same else 1


if __name__ == "__main__":
    cpu = "--cpu" in sys.argv[1:]
    paths = [a for a in sys.argv[1:] if a != "--cpu"]
    if len(paths) != 3 or any(a.startswith("-") for a in paths):
        sys.exit("usage: python scripts/gpu_smoke.py [--cpu] BASE_MODEL_DIR TRAINED_MODEL_DIR WORK_DIR")
    sys.exit(main(Path(paths[0]), Path(paths[1]), Path(paths[2]), cpu=cpu))
