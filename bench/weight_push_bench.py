"""Weight push over HTTP for a ~100 MB model against a plain loopback copy of the same bytes, in one run.

The model is a Qwen2 built locally (hidden 1024, 2 layers, random float32 weights: ~101 MB). "push" is the
trainer's call, `trainer.weights.http_wire.push_weights`, to `rpo serve rollout` running as its own process:
it asks the replica's version (and weight port), lays the tensors out as one safetensors body (header +
XXH3-128 over the tensors, read in place), streams it over HTTP to the weight port; the replica checks the
header, reads the body into its spool file while hashing it, loads it into vLLM in place, resets the prefix
cache and answers with the new version. "transfer" is that call less the replica's apply (what the HTTP data
plane costs); "whole call" includes the load into vLLM. "loopback copy" sends the very same bytes (the same
pieces of the same body) over a plain TCP socket on 127.0.0.1 to a thread of this process that reads them
into a buffer and acknowledges. The two take turns for R rounds; medians.

    python bench/weight_push_bench.py [--rounds 5] [--hidden 1024] [--layers 2]

Prints a Markdown table. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def build_model(out: Path, layers: int, hidden: int, intermediate: int) -> Path:
    from services.models.tiny_model import build_tiny_model

    if not (out / "config.json").exists():
        build_tiny_model(
            out, num_layers=layers, hidden_size=hidden, intermediate_size=intermediate, init_std=0.02, seed=0
        )
    return out


class LoopbackSink:
    """A TCP server thread on 127.0.0.1 that reads `size` bytes into one buffer, then answers b"k"."""

    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(1)
        self.address = self.listener.getsockname()

    def receive(self, size: int) -> None:
        buffer = bytearray(size)
        view = memoryview(buffer)
        conn, _ = self.listener.accept()
        with conn:
            got = 0
            while got < size:
                n = conn.recv_into(view[got:], min(size - got, 16 * 2**20))
                if n == 0:
                    raise RuntimeError(f"loopback sender closed after {got} of {size} bytes")
                got += n
            conn.sendall(b"k")

    def copy(self, body) -> float:
        """Seconds to send every piece of `body` and get the acknowledgement."""
        receiver = threading.Thread(target=self.receive, args=(body.length,))
        receiver.start()
        started = time.perf_counter()
        with socket.create_connection(self.address, timeout=60) as sock:
            for piece in body.pieces():
                sock.sendall(piece)
            if sock.recv(1) != b"k":
                raise RuntimeError("no acknowledgement from the loopback sink")
        seconds = time.perf_counter() - started
        receiver.join()
        return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--models-dir", default=str(REPO / ".cache" / "bench-models"))
    parser.add_argument(
        "--spool-dir", default=None, help="rollout.spool_dir of the replica (default: the system temp dir)"
    )
    args = parser.parse_args()

    from safetensors.torch import load_file

    from services.core.http_client import RetryPolicy
    from tests.fixtures.rollout import start_rollout_server
    from trainer.weights.http_wire import SafetensorsBody, materialize, push_weights

    name = f"qwen2-l{args.layers}-h{args.hidden}-i{args.intermediate}"
    model_dir = build_model(Path(args.models_dir) / name, args.layers, args.hidden, args.intermediate)
    weights = load_file(str(model_dir / "model.safetensors"))
    tensors = materialize(weights)
    reference_body = SafetensorsBody(tensors)
    size = reference_body.length

    overrides = ["rollout.kv_cache_bytes=67108864"]
    if args.spool_dir:
        overrides.append(f"rollout.spool_dir={args.spool_dir}")
    server = start_rollout_server(model_dir, Path(args.models_dir).parent / "bench-logs", overrides=overrides)
    policy = RetryPolicy(read_timeout_seconds=300, max_attempts=1, max_total_seconds=300)
    sink = LoopbackSink()
    copies, pushes, receives, applies, hashes = [], [], [], [], []
    try:
        sink.copy(reference_body)  # warm-up of both paths (version 1)
        push_weights(server.url, weights, 1, policy=policy)
        for round_ in range(args.rounds):
            copies.append(sink.copy(reference_body))
            started = time.perf_counter()
            SafetensorsBody(tensors)  # what the client's layout + checksum cost alone
            hashes.append(time.perf_counter() - started)
            started = time.perf_counter()
            result = push_weights(server.url, weights, round_ + 2, policy=policy)
            pushes.append(time.perf_counter() - started)
            receives.append(result.reply.receive_seconds)
            applies.append(result.reply.apply_seconds)
    finally:
        server.stop()

    copy_s, push_s = statistics.median(copies), statistics.median(pushes)
    transfer_s = statistics.median(p - a for p, a in zip(pushes, applies, strict=True))
    gb = size / 1e9
    print(
        f"Command: python bench/weight_push_bench.py --rounds {args.rounds} --hidden {args.hidden} --layers {args.layers}"
    )
    print(
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}; model {name}: {len(tensors)} tensors, {size / 2**20:.1f} MiB"
    )
    print()
    print("| path | seconds (median) | GB/s | vs loopback copy |")
    print("|---|---|---|---|")
    print(f"| loopback copy (TCP, same bytes) | {copy_s:.3f} | {gb / copy_s:.2f} | 100% |")
    print(
        f"| HTTP push, transfer (body sent, received, checked) | {transfer_s:.3f} | {gb / transfer_s:.2f} | "
        f"{copy_s / transfer_s:.0%} |"
    )
    print(
        f"| HTTP push, whole call (until the new version serves) | {push_s:.3f} | {gb / push_s:.2f} | {copy_s / push_s:.0%} |"
    )
    print()
    print(
        f"Inside the push (medians): the client's layout + XXH3-128 of the body {statistics.median(hashes):.3f} s; "
        f"the replica receiving the body into its spool file and checking it {statistics.median(receives):.3f} s; "
        f"waiting for generation, loading into vLLM and resetting the prefix cache "
        f"{statistics.median(applies):.3f} s."
    )


if __name__ == "__main__":
    main()
