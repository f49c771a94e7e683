"""Trying again what failed: store writes the database refused, deliveries Discord refused."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class Backoff:
    """How to try again something that failed: ``tries`` in all, waiting ``first`` seconds
    after the first failure, then twice as long each time, up to ``longest``."""

    first: float = 1.0
    longest: float = 30.0
    tries: int = 8

    def delays(self, tried: int = 0) -> Iterator[float]:
        """The waits before each try left, when ``tried`` tries have already failed."""
        for attempt in range(tried, self.tries - 1):
            yield min(self.first * 2**attempt, self.longest)


#: How a write the store refuses (a locked or read-only database, a full disk, a lost
#: connection) is tried again.
STORE_RETRY = Backoff(first=0.5, longest=30.0, tries=8)
#: How a delivery that fails (Discord is down, the channel is gone) is tried again.
DELIVERY_RETRY = Backoff(first=10.0, longest=600.0, tries=6)


async def retrying(
    what: str, job_id: int, write: Callable[[], Awaitable[T]], backoff: Backoff = STORE_RETRY
) -> T:
    """Await ``write()``, trying again with ``backoff`` while it fails; the last failure is
    raised."""
    delays = backoff.delays()
    while True:
        try:
            return await write()
        except Exception as error:
            delay = next(delays, None)
            if delay is None:
                raise
            log.warning(
                "job=%d event=%s-failed error=%r (trying again in %g s)", job_id, what, error, delay
            )
            await asyncio.sleep(delay)
