"""Versioned weight updates of a replica: take one checked push, apply it atomically.

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
With LoRA (`train.lora`), the base stays loaded and a push is the step's adapter (services/core/adapter_wire.py):
it is spooled into a directory of its own in PEFT's layout and served from the next request on (vLLM's
`add_lora`), under the same gate, checks and version rules; a failed load leaves the previous adapter serving.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.core.adapter_wire import write_adapter_config
from services.core.config_training import LoraSection
from services.core.errors import Conflict, InvalidInput, Unavailable
from services.core.schemas.rollout import CHECKSUM_HEADER
from services.core.weight_wire import WeightManifest
from services.rollout.policy_gate import PolicyGate
from services.rollout.weight_receive import PushBody, receive_push, spool_root

log = logging.getLogger("rpo.rollout.weights")


@dataclass(frozen=True)
class AdapterTarget:
    """What a LoRA replica serves adapters on: the settings they must have been trained with, the base."""

    lora: LoraSection
    base_model: str


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
        adapter: AdapterTarget | None = None,
    ):
        self.engine = engine
        self.adapter = adapter
        """Set on a LoRA replica: pushes are adapters (module docstring)."""
        self._adapter_dir: Path | None = None
        """The directory of the adapter serving (None: the base alone, version 0)."""
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
            if self.adapter is not None:
                target = self.spool_dir / f"adapter-v{version}" / "adapter_model.safetensors"
                target.parent.mkdir()
            try:
                spooled = await asyncio.to_thread(receive_push, body, self.manifest, checksum, target)
            except BaseException:
                if self.adapter is not None:
                    shutil.rmtree(target.parent, ignore_errors=True)
                raise
            finally:
                self._receiving = False
            # Shielded: once a load has started it runs to its end (version moved, or the old weights back)
            # even if the pusher disconnects or the server shuts down meanwhile.
            if self.adapter is not None:
                apply_seconds = await asyncio.shield(self._apply_adapter(target.parent, version))
            else:
                apply_seconds = await asyncio.shield(self._apply([str(target)], version))
                self._serving_slot = slot
            return AppliedPush(version, spooled.tensors, spooled.bytes, spooled.seconds, apply_seconds)

    async def _apply_adapter(self, directory: Path, version: int) -> float:
        assert self.adapter is not None
        write_adapter_config(directory, self.adapter.lora, self.adapter.base_model)
        async with self.gate.exclusive():
            started = time.perf_counter()
            try:
                await self.engine.load_adapter(version, str(directory))
            except Exception as exc:
                log.exception(
                    "loading the adapter of version %d failed; the previous one still serves", version
                )
                shutil.rmtree(directory, ignore_errors=True)
                raise Unavailable(
                    f"apply failed ({type(exc).__name__}: {exc}); version {self.version} still serves",
                    retry_after_seconds=5,
                ) from None
            await self.engine.reset_prefix_cache()
            previous, self._adapter_dir = self._adapter_dir, directory
            if previous is not None:
                shutil.rmtree(previous, ignore_errors=True)
            self.version = version
            self.on_version(version)
            return time.perf_counter() - started

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
