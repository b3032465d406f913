"""Decode throughput through the rollout service against vLLM's offline `LLM.generate`, in one run.

For each model: the same P token-id prompts, n samples each, up to T new tokens, the same sampling (temperature
1, per-prompt seeds) and the same engine settings (float32, eager, KV cache size, max_num_seqs, log-probs of
the sampled tokens in processed mode, as the service asks for them). "offline" is `vllm.LLM.generate` in this
process; "service" is `rpo serve rollout` started as its own process and called over HTTP with the typed
client (msgpack), once as one request holding every prompt and once as C concurrent requests. Both engines
stay loaded and the paths take turns round by round (only one works at a time), so a change in the
machine's load hits every path alike. Tokens/s counts the tokens actually decoded (a sample may stop at
EOS; the same seeds give the same count on every path), median of R rounds.

    python bench/rollout_bench.py [--prompts 64] [--samples 4] [--max-tokens 128] [--rounds 5]

Prints a Markdown table. Models are built locally (random weights; nothing is downloaded).
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import random
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SERVICE_SETTINGS = [
    f"rollout.kv_cache_bytes={512 * 2**20}",
    "rollout.max_num_seqs=256",
    "model.max_model_len=1024",
]
"""The engine settings of both paths (the replica gets them as --set, the offline engine through the same
`engine_kwargs`)."""
MODELS = {
    # name: (layers, hidden, intermediate)
    "tiny (0.8M params, 2 layers x 128)": (2, 128, 384),
    "small (13M params, 4 layers x 512)": (4, 512, 1536),
}


def build_model(out: Path, layers: int, hidden: int, intermediate: int) -> Path:
    from services.models.tiny_model import build_tiny_model

    if not (out / "config.json").exists():
        build_tiny_model(
            out, num_layers=layers, hidden_size=hidden, intermediate_size=intermediate, init_std=0.2, seed=0
        )
    return out


def make_prompts(count: int, length: int) -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(3, 131) for _ in range(length)] for _ in range(count)]


class Offline:
    """`vllm.LLM` in this process with exactly the replica's engine settings (the same `engine_kwargs`)."""

    def __init__(self, model_dir: Path, args: argparse.Namespace):
        from vllm import LLM

        from services.core.config import load_config
        from services.rollout.engine import engine_kwargs

        self.args = args
        self.llm = LLM(**engine_kwargs(load_config(None, SERVICE_SETTINGS), model_dir, on_cpu=True))

    def params(self, i: int):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        return SamplingParams(
            n=self.args.samples,
            max_tokens=self.args.max_tokens,
            temperature=1.0,
            seed=1000 + i,  # the replica seeds prompt i of a request with seed + i: the same seeds
            logprobs=0,
            detokenize=False,
            output_kind=RequestOutputKind.FINAL_ONLY,
        )

    def run(self, prompts: list[list[int]]) -> tuple[int, float]:
        from vllm.inputs import tokens_input

        inputs = [tokens_input(p) for p in prompts]
        started = time.perf_counter()
        outputs = self.llm.generate(inputs, [self.params(i) for i in range(len(inputs))], use_tqdm=False)
        seconds = time.perf_counter() - started
        return sum(len(c.token_ids) for o in outputs for c in o.outputs), seconds

    def close(self) -> None:
        self.llm.llm_engine.engine_core.shutdown()
        del self.llm
        gc.collect()


class Served:
    """The same prompts through `rpo serve rollout` (its own process), with the typed client (msgpack)."""

    def __init__(self, model_dir: Path, args: argparse.Namespace, log_dir: Path):
        from services.core.http_client import RetryPolicy
        from tests.fixtures.rollout import start_rollout_server

        self.args = args
        self.server = start_rollout_server(model_dir, log_dir, overrides=SERVICE_SETTINGS)
        self.policy = RetryPolicy(read_timeout_seconds=600, max_attempts=1, max_total_seconds=600)

    def _request(self, prompts: list[list[int]], start: int, stop: int):
        from services.core.schemas.rollout import GenerateRequest

        return GenerateRequest(
            prompts=prompts[start:stop],
            n=self.args.samples,
            max_tokens=self.args.max_tokens,
            temperature=1.0,
            seed=1000 + start,
        )

    def run(self, prompts: list[list[int]], concurrency: int) -> tuple[int, float]:
        """All prompts in `concurrency` requests sent at once (1: one request holding every prompt)."""
        from services.core.clients.rollout import RolloutClient

        chunk = -(-len(prompts) // concurrency)
        clients = [RolloutClient(self.server.url, policy=self.policy) for _ in range(concurrency)]
        try:
            with ThreadPoolExecutor(max_workers=concurrency) as pool:
                started = time.perf_counter()
                replies = list(
                    pool.map(
                        lambda k: clients[k].generate(self._request(prompts, k * chunk, (k + 1) * chunk)),
                        range(concurrency),
                    )
                )
                seconds = time.perf_counter() - started
        finally:
            for client in clients:
                client.close()
        return sum(len(s.token_ids) for rep in replies for r in rep.results for s in r), seconds

    def close(self) -> None:
        self.server.stop()


def measure(model_dir: Path, prompts: list[list[int]], args: argparse.Namespace, log_dir: Path) -> dict:
    """Tokens/s per path, rounds interleaved (offline, one request, C concurrent, offline, ...) so that a
    change in the machine's load hits every path alike. Both engines stay loaded; only one works at a time."""
    served = Served(model_dir, args, log_dir)
    offline = Offline(model_dir, args)
    paths = {
        "offline LLM.generate": lambda p: offline.run(p),
        "service, one request": lambda p: served.run(p, 1),
        f"service, {args.concurrency} concurrent requests": lambda p: served.run(p, args.concurrency),
    }
    try:
        for run in paths.values():
            run(prompts[:8])  # warm-up
        rates: dict[str, list[float]] = {name: [] for name in paths}
        tokens: dict[str, set[int]] = {name: set() for name in paths}
        for _ in range(args.rounds):
            for name, run in paths.items():
                count, seconds = run(prompts)
                rates[name].append(count / seconds)
                tokens[name].add(count)
        return {"rates": rates, "tokens": tokens}
    finally:
        offline.close()
        served.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--samples", type=int, default=4, help="n per prompt (G)")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--models-dir", default=str(REPO / ".cache" / "bench-models"))
    args = parser.parse_args()

    prompts = make_prompts(args.prompts, args.prompt_tokens)
    rows = []
    log_dir = Path(args.models_dir).parent / "bench-logs"
    for name, (layers, hidden, intermediate) in MODELS.items():
        model_dir = build_model(
            Path(args.models_dir) / f"qwen2-l{layers}-h{hidden}-i{intermediate}",
            layers,
            hidden,
            intermediate,
        )
        result = measure(model_dir, prompts, args, log_dir)
        base = statistics.median(result["rates"]["offline LLM.generate"])
        for path, rates in result["rates"].items():
            rate = statistics.median(rates)
            rows.append((name, path, rate, rate / base, sorted(result["tokens"][path])))

    print(
        f"Command: python bench/rollout_bench.py --prompts {args.prompts} --samples {args.samples} "
        f"--max-tokens {args.max_tokens} --concurrency {args.concurrency} --rounds {args.rounds}"
    )
    print(
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    )
    print()
    print("| model | path | tokens decoded per round | tokens/s (median) | vs offline |")
    print("|---|---|---|---|---|")
    for name, path, rate, ratio, counts in rows:
        print(f"| {name} | {path} | {'/'.join(f'{c:,}' for c in counts)} | {rate:,.0f} | {ratio:.0%} |")


if __name__ == "__main__":
    main()
