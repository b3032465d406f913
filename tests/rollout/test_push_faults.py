"""A weight push whose connection drops half-way through the body, on a real replica: the old weights keep
serving and the next push succeeds. (The cache commit's faults are the trainer's: tests/trainer.)"""

from __future__ import annotations

import socket

import httpx
from rollout_helpers import PROMPTS, greedy, hf_greedy, random_weights, version_of

from services.core.schemas.rollout import CHECKSUM_HEADER, WEIGHTS_MEDIA_TYPE
from trainer.weights.http_wire import SafetensorsBody, materialize


def test_a_push_cut_half_way_leaves_the_old_weights_serving_and_the_next_push_succeeds(
    tied_replica, tmp_path
):
    url = tied_replica.url
    served, tokens_before = greedy(url)
    new = random_weights(tmp_path / "w", tied=True, seed=900 + served)
    body = SafetensorsBody(materialize(new), {"rpo_policy_version": str(served + 1)})
    data = b"".join(bytes(p) for p in body.pieces())
    port = httpx.get(url + "/v1/weights/version", timeout=10).json()["weight_port"]
    head = (
        f"PUT /v1/weights/{served + 1} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {WEIGHTS_MEDIA_TYPE}\r\n"
        f"Content-Length: {len(data)}\r\n{CHECKSUM_HEADER}: {body.checksum}\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head.encode() + data[: len(data) // 2])  # then the connection drops
    # The replica keeps serving the old version, with the old weights, and stays ready.
    assert httpx.get(url + "/readyz", timeout=10).status_code == 200
    assert greedy(url) == (served, tokens_before)
    # The next push of that same version goes through (the cut one left nothing half-applied).
    tied_replica.push(new)
    assert tied_replica.version == served + 1 and version_of(url) == served + 1
    assert greedy(url) == (served + 1, hf_greedy(tied_replica.reference(), PROMPTS, 24))
