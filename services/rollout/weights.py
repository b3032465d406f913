"""Versioned weight updates of a replica: receive one safetensors body, check it, apply it atomically.

Bodies arrive through the replica's weight data plane (`services.rollout.weight_plane`, its own port) and are
read in a thread straight into one of two spool files; the NCCL data plane drives the same updater.

Guarantees:
- nothing changes until the whole push is checked: the version is strictly greater than the served one
  (409 otherwise), the header names exactly the served model's tensors with their shapes and the served
  dtype, the byte layout is consistent, and the XXH3-128 of the whole body equals the
  `X-Content-XXH3-128` header (422 naming the field or tensor otherwise); a rejected push leaves the old weights serving;
- generation requests never fail because of a push: each holds a shared slot of `PolicyGate` for its whole
  decode, and the apply takes the exclusive slot, so in-flight requests finish on the old weights, new ones
  wait and run on the new weights; the version a reply carries is the one its tokens came from;
- after a load, vLLM's prefix (KV) cache is reset, so no block computed with old weights is reused;
- versions only move forward, one push at a time; if a load fails half way, the previous weights are
  loaded again and the replica keeps serving its old version (503 to the pusher), else it reports itself
  not ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import mmap
import os
import shutil
import struct
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import xxhash

from services.errors import Conflict, InvalidInput, Unavailable
from services.schemas.rollout import CHECKSUM_HEADER

log = logging.getLogger("rpo.rollout.weights")

MAX_HEADER_BYTES = 100 * 2**20
"""Largest safetensors JSON header accepted (the format's own limit)."""
DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
_RECEIVE_CHUNK_BYTES = 8 * 2**20
"""Bytes read from the socket and hashed at a time (big enough to amortise the calls, small enough to stay in
cache between landing and hashing)."""


# ---------------------------------------------------------------------------------------------------------
# Generation / update exclusion


class PolicyGate:
    """Shared slots for generation, one exclusive slot for a weight apply; a waiting apply goes first (new
    generation waits behind it, so a push is never starved by a stream of requests)."""

    def __init__(self) -> None:
        self._cond = asyncio.Condition()
        self._shared = 0
        self._exclusive = False
        self._waiting_exclusive = 0

    @property
    def busy(self) -> bool:
        """An apply holds or waits for the exclusive slot."""
        return self._exclusive or self._waiting_exclusive > 0

    @contextlib.asynccontextmanager
    async def shared(self) -> AsyncIterator[None]:
        async with self._cond:
            await self._cond.wait_for(lambda: not self._exclusive and self._waiting_exclusive == 0)
            self._shared += 1
        try:
            yield
        finally:
            async with self._cond:
                self._shared -= 1
                self._cond.notify_all()

    async def acquire_exclusive(self) -> None:
        async with self._cond:
            self._waiting_exclusive += 1
            try:
                await self._cond.wait_for(lambda: not self._exclusive and self._shared == 0)
            finally:
                self._waiting_exclusive -= 1
            self._exclusive = True

    async def release_exclusive(self) -> None:
        async with self._cond:
            self._exclusive = False
            self._cond.notify_all()

    @contextlib.asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        await self.acquire_exclusive()
        try:
            yield
        finally:
            await self.release_exclusive()


# ---------------------------------------------------------------------------------------------------------
# What a push must contain


@dataclass(frozen=True)
class TensorSpec:
    dtype: str
    """safetensors dtype code (F32, BF16, ...)."""
    shape: tuple[int, ...]


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (no tensor data is read)."""
    with path.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        if length > MAX_HEADER_BYTES:
            raise ValueError(f"{path}: safetensors header of {length} bytes")
        return json.loads(f.read(length))


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The safetensors files of an HF model directory (one file, or the shards its index names)."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / s for s in shards]
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    found = sorted(model_dir.glob("*.safetensors"))
    if not found:
        raise ValueError(
            f"{model_dir}: no safetensors weights (HTTP weight pushes need them to check against)"
        )
    return found


class WeightManifest:
    """Names, shapes and dtypes a push must carry: the served checkpoint's tensors, floating ones in the
    served dtype. A tied LM head (`lm_head.weight` absent from a tied checkpoint) may be sent or not."""

    def __init__(self, expected: dict[str, TensorSpec], optional: dict[str, TensorSpec] | None = None):
        self.expected = expected
        self.optional = optional or {}

    @classmethod
    def from_model_dir(cls, model_dir: Path, served_dtype: str) -> WeightManifest:
        expected: dict[str, TensorSpec] = {}
        for path in checkpoint_files(model_dir):
            for name, info in read_safetensors_header(path).items():
                if name == "__metadata__":
                    continue
                dtype = served_dtype if info["dtype"] in FLOAT_DTYPES else info["dtype"]
                expected[name] = TensorSpec(dtype, tuple(info["shape"]))
        optional = {}
        config_path = model_dir / "config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        tied = config.get(
            "tie_word_embeddings", config.get("text_config", {}).get("tie_word_embeddings", False)
        )
        embed = expected.get("model.embed_tokens.weight")
        if tied and embed is not None and "lm_head.weight" not in expected:
            optional["lm_head.weight"] = embed
        return cls(expected, optional)

    @property
    def total_bytes(self) -> int:
        return sum(math.prod(s.shape) * DTYPE_BYTES[s.dtype] for s in self.expected.values())

    def check(self, header: dict[str, Any]) -> int:
        """Check a push's header; returns the data size it announces. Raises InvalidInput naming the tensor."""
        tensors = {k: v for k, v in header.items() if k != "__metadata__"}
        for name in sorted(self.expected):
            if name not in tensors:
                raise InvalidInput(
                    f"the push lacks tensor {name!r} ({len(self.expected) - len(tensors.keys() & self.expected.keys())} "
                    "of the served model's tensors are missing); a push carries every tensor",
                    field=f"weights.{name}",
                )
        spans = []
        for name, info in tensors.items():
            field = f"weights.{name}"
            spec = self.expected.get(name) or self.optional.get(name)
            if spec is None:
                raise InvalidInput(
                    f"unknown tensor {name!r}: the served model has no such weight", field=field
                )
            if not isinstance(info, dict):
                raise InvalidInput(f"tensor {name!r}: header entry is not an object", field=field)
            dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
            if dtype != spec.dtype:
                raise InvalidInput(
                    f"tensor {name!r} has dtype {dtype}; the replica serves {spec.dtype} (cast before pushing)",
                    field=field,
                )
            if not isinstance(shape, list) or tuple(shape) != spec.shape:
                raise InvalidInput(
                    f"tensor {name!r} has shape {shape}; the served model's is {list(spec.shape)}",
                    field=field,
                )
            if (
                not isinstance(offsets, list)
                or len(offsets) != 2
                or not all(isinstance(o, int) and o >= 0 for o in offsets)
                or offsets[1] - offsets[0] != math.prod(spec.shape) * DTYPE_BYTES[spec.dtype]
            ):
                raise InvalidInput(
                    f"tensor {name!r}: data_offsets {offsets} do not fit its shape", field=field
                )
            spans.append((offsets[0], offsets[1], name))
        spans.sort()
        end = 0
        for start, stop, name in spans:
            if start != end:
                raise InvalidInput(
                    f"tensor {name!r}: data starts at byte {start}, expected {end} (overlap or gap)",
                    field=f"weights.{name}",
                )
            end = stop
        return end


# ---------------------------------------------------------------------------------------------------------
# Receiving a push


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
    (length,) = struct.unpack("<Q", body.read(8))
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
    return struct.pack("<Q", length) + raw, tensors, data_bytes


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


# ---------------------------------------------------------------------------------------------------------
# The updater


@dataclass
class AppliedPush:
    version: int
    tensors: int
    bytes: int
    receive_seconds: float
    apply_seconds: float


class WeightUpdater:
    """Owns the served version and every change of weights (HTTP pushes and the NCCL data plane)."""

    def __init__(
        self,
        engine: Any,
        manifest: WeightManifest,
        initial_files: list[Path],
        spool_dir: str | None,
        on_version: Callable[[int], None] = lambda version: None,
    ):
        self.engine = engine
        self.on_version = on_version
        """Called with each version the replica starts serving (the `rpo_policy_version` gauge)."""
        self.manifest = manifest
        self.gate = PolicyGate()
        self.version = 0
        self.broken: str | None = None
        """Set when a failed load could not be undone: the replica then reports itself not ready."""
        self._update_lock = asyncio.Lock()
        self._receiving = False
        self._current_files = [str(p) for p in initial_files]
        self._serving_slot: int | None = None
        """Which of the two spool files holds the served weights (None: the checkpoint they were loaded from).
        A push is written into the other one, so the served weights stay on disk to fall back to."""
        root = spool_root(spool_dir, manifest.total_bytes)
        root.mkdir(parents=True, exist_ok=True)
        self.spool_dir = Path(tempfile.mkdtemp(prefix="rpo-weights-", dir=root))
        self._nccl_version: int | None = None
        self._nccl_watchdog: asyncio.TimerHandle | None = None

    @property
    def updating(self) -> bool:
        return self._receiving or self.gate.busy or self._nccl_version is not None

    def close(self) -> None:
        shutil.rmtree(self.spool_dir, ignore_errors=True)

    def _check_version(self, version: int) -> None:
        if version <= self.version:
            raise Conflict(
                f"version {version} is not newer than the served version {self.version} (versions only move forward)",
                field="version",
            )

    async def push(self, version: int, body: PushBody, checksum: str | None) -> AppliedPush:
        """Receive, check and apply one HTTP push (see the module docstring for what is guaranteed).

        `body` is read in a worker thread; a push refused before its body is read still reads and drops the
        body, so the pusher gets the answer instead of a broken pipe."""
        try:
            if (
                not checksum
                or len(checksum) != 32
                or any(c not in "0123456789abcdefABCDEF" for c in checksum)
            ):
                raise InvalidInput(
                    f"a push needs the hex XXH3-128 of its body (32 hex digits) in {CHECKSUM_HEADER}",
                    field=CHECKSUM_HEADER,
                )
            self._check_version(version)
        except (InvalidInput, Conflict):
            await asyncio.to_thread(body.discard)
            raise
        async with self._update_lock:  # one push at a time; a retry of the same version waits, then gets 409
            try:
                self._check_version(version)
            except Conflict:
                await asyncio.to_thread(body.discard)
                raise
            self._receiving = True
            slot = 0 if self._serving_slot is None else 1 - self._serving_slot
            target = self.spool_dir / f"slot-{slot}.safetensors"
            try:
                spooled = await asyncio.to_thread(receive_push, body, self.manifest, checksum, target)
            finally:
                self._receiving = False
            # Shielded: once a load has started it runs to its end (version moved, or the old weights back)
            # even if the pusher disconnects or the server shuts down meanwhile.
            apply_seconds = await asyncio.shield(self._apply([str(target)], version))
            self._serving_slot = slot
            return AppliedPush(version, spooled.tensors, spooled.bytes, spooled.seconds, apply_seconds)

    async def _apply(self, files: list[str], version: int) -> float:
        async with self.gate.exclusive():
            started = time.perf_counter()
            try:
                await self.engine.load_weights(files)
            except Exception as exc:
                log.exception("loading version %d failed; loading the previous weights again", version)
                try:
                    await self.engine.load_weights(self._current_files)
                    await self.engine.reset_prefix_cache()
                except Exception as restore_exc:
                    self.broken = f"a failed weight load could not be undone: {restore_exc}"
                    raise Unavailable(
                        f"apply failed ({exc}); restoring the previous weights failed too ({restore_exc}): "
                        "this replica is out of service",
                        retry_after_seconds=30,
                    ) from None
                raise Unavailable(
                    f"apply failed ({type(exc).__name__}: {exc}); version {self.version} still serves",
                    retry_after_seconds=5,
                ) from None
            await self.engine.reset_prefix_cache()
            self.version = version
            self.on_version(version)
            self._current_files = files
            return time.perf_counter() - started

    # -- NCCL data plane: start / update* / finish, the exclusive slot held in between ---------------------
    async def nccl_start(self, version: int, timeout_seconds: float) -> None:
        """Open an NCCL update; if it is not finished within `timeout_seconds`, the replica gives the slot
        back and reports itself out of service (its weights may be half received)."""
        await self._update_lock.acquire()
        try:
            self._check_version(version)
            await self.gate.acquire_exclusive()
        except BaseException:
            self._update_lock.release()
            raise
        try:
            await self.engine.nccl_start()
        except Exception as exc:
            await self.gate.release_exclusive()
            self._update_lock.release()
            raise Unavailable(f"start of NCCL weight update failed: {exc}") from None
        self._nccl_version = version
        self._nccl_watchdog = asyncio.get_running_loop().call_later(
            timeout_seconds, lambda: asyncio.ensure_future(self._nccl_expired(version))
        )

    async def _nccl_expired(self, version: int) -> None:
        if self._nccl_version != version:
            return
        self.broken = f"the NCCL update of version {version} was not finished in time"
        log.error("%s; out of service until restarted", self.broken)
        self._nccl_version = None
        await self.gate.release_exclusive()
        self._update_lock.release()

    async def nccl_update(self, version: int, update_info: Any) -> None:
        if self._nccl_version != version:
            raise Conflict(f"no NCCL update of version {version} is open (start it first)", field="version")
        try:
            await self.engine.nccl_update(update_info)
        except Exception as exc:
            self.broken = f"an NCCL weight update failed half way: {exc}"
            raise Unavailable(
                f"NCCL receive failed: {exc}; this replica is out of service", retry_after_seconds=30
            ) from None

    async def nccl_finish(self, version: int) -> None:
        if self._nccl_version != version:
            raise Conflict(f"no NCCL update of version {version} is open (start it first)", field="version")
        try:
            await self.engine.nccl_finish(version)
            await self.engine.reset_prefix_cache()
            self.version = version
            self.on_version(version)
        finally:
            self._nccl_version = None
            if self._nccl_watchdog is not None:
                self._nccl_watchdog.cancel()
            await self.gate.release_exclusive()
            self._update_lock.release()
