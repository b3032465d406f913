"""Receiving a push: the body is read in a thread straight from the socket into one of two spool files
(memory-mapped), hashed as it lands, and checked against the manifest and the `X-Content-XXH3-128` header
before anything changes.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import xxhash

from services.core.errors import InvalidInput
from services.core.schemas.rollout import CHECKSUM_HEADER
from services.core.weight_wire import HEADER_LENGTH, MAX_HEADER_BYTES, WeightManifest

_RECEIVE_CHUNK_BYTES = 8 * 2**20
"""Bytes read from the socket and hashed at a time (big enough to amortise the calls, small enough to stay in
cache between landing and hashing)."""


@dataclass
class SpooledPush:
    path: Path
    tensors: int
    bytes: int
    seconds: float


class PushBody:
    """The body of one push as the data plane hands it over: `length` bytes (its Content-Length) still to be
    read from `reader`, a blocking file-like object with `readinto` (the request's socket stream)."""

    def __init__(self, reader: Any, length: int):
        self.reader = reader
        self.length = length
        self.consumed = 0

    def readinto(self, view: memoryview) -> int:
        """Fill `view` from the body (never past its end); raises if the sender stops early."""
        got = 0
        while got < len(view):
            n = self.reader.readinto(view[got:])
            if not n:
                raise InvalidInput(
                    f"the body ended after {self.consumed + got} of its {self.length} bytes (Content-Length)",
                    field="body",
                )
            got += n
        self.consumed += got
        return got

    def read(self, size: int) -> bytes:
        buffer = bytearray(size)
        self.readinto(memoryview(buffer))
        return bytes(buffer)

    def discard(self) -> None:
        """Read and drop what is left, so the sender gets the answer rather than a broken pipe."""
        scratch = memoryview(bytearray(min(_RECEIVE_CHUNK_BYTES, max(1, self.length - self.consumed))))
        while self.consumed < self.length:
            self.readinto(scratch[: min(len(scratch), self.length - self.consumed)])


def _checked_header(body: PushBody, manifest: WeightManifest) -> tuple[bytes, int, int]:
    """(the body's first 8 + header bytes, their header's tensor count, its data size), checked against the
    manifest and the body's length before any tensor byte is read."""
    if body.length < 10:
        raise InvalidInput(f"a body of {body.length} bytes is no safetensors file", field="body")
    (length,) = HEADER_LENGTH.unpack(body.read(8))
    if length > MAX_HEADER_BYTES or length < 2 or 8 + length > body.length:
        raise InvalidInput(
            f"safetensors header length {length} is not plausible for a body of {body.length} bytes",
            field="body",
        )
    raw = body.read(length)
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("not an object")
    except ValueError as exc:
        raise InvalidInput(f"the safetensors header is not a JSON object: {exc}", field="body") from None
    data_bytes = manifest.check(header)
    if 8 + length + data_bytes != body.length:
        raise InvalidInput(
            f"the body has {body.length} bytes (Content-Length); its header announces {8 + length + data_bytes}",
            field="body",
        )
    tensors = sum(1 for k in header if k != "__metadata__")
    return HEADER_LENGTH.pack(length) + raw, tensors, data_bytes


def receive_push(body: PushBody, manifest: WeightManifest, checksum: str, target: Path) -> SpooledPush:
    """Read one safetensors body into the file `target`, checking its header first and its XXH3-128 on the
    way (one pass: each piece is hashed right after it lands). Blocking: runs in a thread.

    The bytes go straight from the socket into `target`'s pages (a shared memory map of the file, which the
    vLLM worker then maps again to load it), so the body is never copied in user space. On a bad header the
    rest of the body is read and dropped and `target` is left as it was.
    """
    started = time.perf_counter()
    try:
        prefix, tensors, data_bytes = _checked_header(body, manifest)
    except InvalidInput:
        body.discard()
        raise
    hasher = xxhash.xxh3_128(prefix)
    size = len(prefix) + data_bytes
    fd = os.open(target, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if os.fstat(fd).st_size != size:
            os.ftruncate(fd, size)
        mapped = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
    finally:
        os.close(fd)
    with mapped, memoryview(mapped) as view:
        view[: len(prefix)] = prefix
        position = len(prefix)
        while position < size:
            with view[position : min(size, position + _RECEIVE_CHUNK_BYTES)] as piece:
                body.readinto(piece)
                hasher.update(piece)
                position += len(piece)
    digest = hasher.hexdigest()
    if digest != checksum.lower():
        raise InvalidInput(
            f"XXH3-128 of the body is {digest}, the {CHECKSUM_HEADER} header says {checksum}",
            field=CHECKSUM_HEADER,
        )
    return SpooledPush(target, tensors, size, time.perf_counter() - started)


def spool_root(configured: str | None, model_bytes: int) -> Path:
    """Where pushes are written: `rollout.spool_dir`, else shared memory (/dev/shm) when it has room for two
    models and some margin, else the system's temporary directory."""
    if configured:
        return Path(configured)
    shm = Path("/dev/shm")
    with contextlib.suppress(OSError):
        if shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > 2 * model_bytes + 2**28:
            return shm
    return Path(tempfile.gettempdir())
