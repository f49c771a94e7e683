"""Connections from the pool, transactions, and the small helpers every part of the
PostgreSQL store uses."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from generation.jobs.job import Job
from generation.jobs.postgres.queries import CLIPS
from generation.jobs.postgres.rows import job_from_row, job_without_audio, with_uploads
from generation.jobs.store import (
    Channel,
    StoreError,
)

Connection = psycopg.AsyncConnection[dict]

#: How the pool's connections show in ``pg_stat_activity`` (one name per process).
APPLICATION_NAME = f"musicgen-bot {os.getpid()}"

#: Seconds to wait for the server when connecting, and for a free connection of the pool.
CONNECT_TIMEOUT = 10
#: The longest any one statement may run, in milliseconds (a stuck query fails, named).
STATEMENT_TIMEOUT_MS = 60_000


class Database:
    """The pool the store's parts share, and how they use it."""

    def __init__(self, pool: AsyncConnectionPool, address: str) -> None:
        self._pool = pool
        #: The server and database, without any password (for messages and logs).
        self.address = address

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[Connection]:
        """A connection in a transaction: committed on success, rolled back on error."""
        async with self._connection() as db, db.transaction():
            yield db

    @asynccontextmanager
    async def _read(self) -> AsyncIterator[Connection]:
        async with self._connection() as db:
            yield db

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[Connection]:
        try:
            async with self._pool.connection() as db:
                yield db
        except PoolTimeout as error:
            raise StoreError(
                f"No connection to the PostgreSQL database {self.address} within "
                f"{CONNECT_TIMEOUT} s: is the server up, and are its connections not all used?"
            ) from error

    async def _jobs(
        self, where: str, parameters: Sequence[object], *, with_audio: bool = True
    ) -> list[Job]:
        """The jobs ``where`` selects, each with its clips' lengths and hashes;
        ``with_audio=False`` leaves the clips themselves in the store (marking the jobs that
        have some)."""
        async with self._read() as db:
            rows = await (
                await db.execute(
                    f"SELECT *, {CLIPS} FROM jobs {where}",  # type: ignore[arg-type]  # our SQL
                    parameters,
                )
            ).fetchall()
            if not with_audio:
                return [job_without_audio(row) for row in rows]
            jobs = []
            for row in rows:
                job = job_from_row(row)
                job.request = await with_uploads(db, job.id, job.request)
                jobs.append(job)
        return jobs


async def configure(connection: Connection) -> None:
    """Each pooled connection: no statement runs forever."""
    await connection.set_autocommit(True)
    await connection.execute(f"SET statement_timeout = {STATEMENT_TIMEOUT_MS}")
    await connection.set_autocommit(False)


async def fetch_row(db: Connection, query: str, parameters: object = None) -> dict | None:
    return await (await db.execute(query, parameters)).fetchone()  # type: ignore[arg-type]


async def fetch_value(db: Connection, query: str, parameters: object = None) -> Any:
    row = await fetch_row(db, query, parameters)
    assert row is not None, query
    return next(iter(row.values()))


async def notify(db: Connection, channel: Channel, payload: str = "") -> None:
    """NOTIFY inside the caller's transaction: listeners hear it once it commits."""
    await db.execute("SELECT pg_notify(%s, %s)", (channel.value, payload))
