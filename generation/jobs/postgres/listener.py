"""LISTEN on one dedicated connection and call the store's listeners on the event loop.

The connection is opened lazily (on the first subscription) and opened again when it drops;
each time it is listening again, every listener is called once with "" (notifications sent
meanwhile were lost: read the state again). The first connection counts too: what was sent
before it listened is lost the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os

import psycopg
from psycopg import sql

from generation.jobs.store import Channel, Listener

log = logging.getLogger(__name__)

#: How the listening connection shows in ``pg_stat_activity`` (one per process).
APPLICATION_NAME = f"musicgen-bot listener {os.getpid()}"

#: Seconds between tries at connecting again, doubling up to the last.
RECONNECT_DELAYS = (0.5, 1.0, 2.0, 5.0, 10.0)


class Listening:
    """The listeners per channel, and the task that feeds them."""

    def __init__(self, conninfo: str, address: str) -> None:
        self._conninfo = conninfo
        self._address = address
        self._listeners: dict[Channel, list[Listener]] = {channel: [] for channel in Channel}
        self._task: asyncio.Task[None] | None = None

    def subscribe(self, channel: Channel, listener: Listener) -> None:
        self._listeners[Channel(channel)].append(listener)
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._listen(), name="postgres-listener"
            )

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _listen(self) -> None:
        failures = 0
        while True:
            try:
                connection = await psycopg.AsyncConnection.connect(
                    self._conninfo, autocommit=True, application_name=APPLICATION_NAME
                )
            except psycopg.OperationalError as error:
                delay = RECONNECT_DELAYS[min(failures, len(RECONNECT_DELAYS) - 1)]
                failures += 1
                log.warning(
                    "event=listen-connect-failed address=%s retry_in=%.1f error=%s",
                    self._address,
                    delay,
                    error,
                )
                await asyncio.sleep(delay)
                continue
            failures = 0
            try:
                async with connection:
                    await self._receive(connection)
            except psycopg.Error as error:  # dropped: listen again on a new connection
                log.warning("event=listen-dropped address=%s error=%s", self._address, error)

    async def _receive(self, connection: psycopg.AsyncConnection) -> None:
        for channel in Channel:
            await connection.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel.value)))
        self._call_all("")
        async for notify in connection.notifies():
            self._call(Channel(notify.channel), notify.payload)

    def _call_all(self, payload: str) -> None:
        for channel in Channel:
            self._call(channel, payload)

    def _call(self, channel: Channel, payload: str) -> None:
        for listener in list(self._listeners[channel]):
            try:
                listener(payload)
            except Exception:  # one listener's bug must not stop the notifications
                log.exception("event=listener-failed channel=%s", channel.value)
