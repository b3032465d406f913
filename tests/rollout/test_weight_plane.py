"""The weight port's own checks, on a real `WeightPlane` and `WeightUpdater` in this process (no engine: every
request here is refused before anything would be loaded), over real loopback HTTP; and the receive path's
spool files. Full pushes through a replica are in test_weights.py."""

from __future__ import annotations

import asyncio
import http.client
import io
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import xxhash
from prometheus_client import CollectorRegistry
from pydantic import SecretStr
from rollout_helpers import load_weights

from services.core.schemas.rollout import CHECKSUM_HEADER, WEIGHTS_MEDIA_TYPE
from services.core.weight_wire import WeightManifest
from services.rollout.metrics import RolloutMetrics
from services.rollout.weight_plane import WeightPlane
from services.rollout.weight_receive import PushBody, receive_push
from services.rollout.weight_updater import WeightUpdater
from trainer.weights.http_wire import SafetensorsBody, materialize

TOKEN = "weights-secret"


def _body_bytes(model_dir: Path) -> bytes:
    return b"".join(bytes(p) for p in SafetensorsBody(materialize(load_weights(model_dir))).pieces())


@pytest.fixture(scope="module")
def plane(tiny_model_dir, tmp_path_factory) -> Iterator[WeightPlane]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    manifest = WeightManifest.from_model_dir(tiny_model_dir, "F32")
    updater = WeightUpdater(None, manifest, [], str(tmp_path_factory.mktemp("spool")))
    body_limit = 2 * manifest.total_bytes
    weight_plane = WeightPlane(
        updater,
        RolloutMetrics(CollectorRegistry()),
        "test-replica",
        loop=loop,
        host="127.0.0.1",
        port=0,
        api_token=SecretStr(TOKEN),
        max_body_bytes=body_limit,
    ).start()
    yield weight_plane
    weight_plane.close()
    updater.close()
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=10)


def _put(plane: WeightPlane, path: str, content: bytes = b"", **headers: str) -> httpx.Response:
    base = {"Authorization": f"Bearer {TOKEN}", "Content-Type": WEIGHTS_MEDIA_TYPE}
    return httpx.put(
        f"http://127.0.0.1:{plane.port}{path}", content=content, headers=base | headers, timeout=30
    )


def _error(reply: httpx.Response, status: int) -> dict:
    assert reply.status_code == status, reply.text
    return reply.json()["error"]


def test_the_weight_port_refuses_what_it_cannot_take_and_names_why(plane, tiny_model_dir):
    body = _body_bytes(tiny_model_dir)
    good = {CHECKSUM_HEADER: xxhash.xxh3_128_hexdigest(body)}

    assert (
        "bearer token"
        in _error(_put(plane, "/v1/weights/1", body, Authorization="Bearer nope", **good), 401)["message"]
    )
    assert _error(_put(plane, "/v1/models", body, **good), 404)["message"].startswith("no such path")
    moved = httpx.get(f"http://127.0.0.1:{plane.port}/v1/weights/1", timeout=10)
    assert _error(moved, 405)["message"] == "the weight port takes PUT /v1/weights/{version} only"
    too_big = plane.max_body_bytes + 1  # announced, never sent: refused on the header alone
    connection = http.client.HTTPConnection("127.0.0.1", plane.port, timeout=10)
    connection.putrequest("PUT", "/v1/weights/1")
    for name, value in {"Authorization": f"Bearer {TOKEN}", "Content-Length": str(too_big), **good}.items():
        connection.putheader(name, value)
    connection.endheaders()
    reply = connection.getresponse()
    assert reply.status == 413 and reply.getheader("Connection") == "close"
    error = json.loads(reply.read())["error"]
    connection.close()
    assert error["field"] == "Content-Length" and str(too_big) in error["message"]
    error = _error(_put(plane, "/v1/weights/1", body, **{"Content-Type": "application/json"}, **good), 415)
    assert error["field"] == "Content-Type"
    error = _error(_put(plane, "/v1/weights/1", body, **{CHECKSUM_HEADER: "0" * 32}), 422)
    assert error["field"] == CHECKSUM_HEADER and xxhash.xxh3_128_hexdigest(body) in error["message"]
    error = _error(_put(plane, "/v1/weights/1", body, **{CHECKSUM_HEADER: "abc"}), 422)
    assert error["field"] == CHECKSUM_HEADER and "32 hex digits" in error["message"]
    error = _error(_put(plane, "/v1/weights/0", body, **good), 409)
    assert error["field"] == "version"
    assert plane.updater.version == 0 and not plane.updater.updating


def test_a_body_without_a_content_length_is_refused(plane):
    def chunks() -> Iterator[bytes]:
        yield b"\x00" * 16

    reply = httpx.put(
        f"http://127.0.0.1:{plane.port}/v1/weights/1",
        content=chunks(),  # httpx sends an iterator without a length as chunked
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": WEIGHTS_MEDIA_TYPE},
        timeout=10,
    )
    assert _error(reply, 411)["field"] == "Content-Length"


def test_receive_writes_the_body_into_its_slot_and_checks_it_in_one_pass(tiny_model_dir, tmp_path):
    """What the apply loads is byte for byte what was sent; a wrong checksum is caught after the last byte."""
    body = _body_bytes(tiny_model_dir)
    manifest = WeightManifest.from_model_dir(tiny_model_dir, "F32")
    target = tmp_path / "slot-0.safetensors"
    spooled = receive_push(
        PushBody(io.BufferedReader(io.BytesIO(body)), len(body)),
        manifest,
        xxhash.xxh3_128_hexdigest(body),
        target,
    )
    assert target.read_bytes() == body
    assert spooled.bytes == len(body) and spooled.tensors == len(manifest.expected)

    with pytest.raises(Exception, match="XXH3-128 of the body") as caught:
        receive_push(PushBody(io.BytesIO(body), len(body)), manifest, "f" * 32, target)
    assert caught.value.field == CHECKSUM_HEADER

    truncated = PushBody(io.BytesIO(body[:-10]), len(body))  # the sender stops 10 bytes early
    with pytest.raises(Exception, match=f"ended after {len(body) - 10} of its {len(body)} bytes"):
        receive_push(truncated, manifest, xxhash.xxh3_128_hexdigest(body), target)
