"""Generation / weight-update exclusion on a replica: generation requests never fail because of a push.
Each request holds a shared slot for its whole decode; an update takes the exclusive slot, so in-flight
requests finish on the old weights, new ones wait and run on the new weights, and the version a reply
carries is the one its tokens came from.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator


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
