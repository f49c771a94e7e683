"""``musicgen-bot migrate``: move an SQLite bot's history into PostgreSQL, so a community
that outgrows one GPU keeps its jobs, results, uploads, settings and jams.

The SQLite database is opened as its owner (so no bot runs on it meanwhile), its jobs that
were running are queued again (their process is gone), and every table is copied row by row
with PostgreSQL's ``COPY``, keeping the ids (links, jams and history refer to them). Results
move from FLAC files into the database, one file at a time. The target must be empty: a
migration is never mixed with another bot's jobs.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import aiosqlite
import psycopg
from psycopg import sql

from generation.jobs.postgres import PostgresStore
from generation.jobs.sqlite import SqliteStore
from generation.jobs.store import StoreError

#: Tables copied as they are (SQLite name, PostgreSQL name), parents before children.
TABLES: tuple[tuple[str, str], ...] = (
    ("jobs", "jobs"),
    ("uploads", "uploads"),
    ("job_uploads", "job_uploads"),
    ("guild_settings", "guild_settings"),
    ("paused_guilds", "paused_guilds"),
    ("generation_rates", "generation_rates"),
    ("jams", "jams"),
    ("jam_segments", "jam_segments"),
    ("guild_tags", "guild_tags"),
)
#: Rows read from SQLite at a time: memory stays bounded whatever the history.
CHUNK = 500


@dataclass(frozen=True)
class Moved:
    """What a migration copied: rows by table, and result files."""

    rows: dict[str, int]
    results: int


async def migrate(source: SqliteStore, target: str, *, max_attempts: int) -> Moved:
    """Copy ``source`` into the PostgreSQL database ``target`` (created or migrated to the
    current schema; it must hold no job).

    Raises:
        StoreError: the target cannot be reached, or already holds jobs.
    """
    await source.requeue_expired(max_attempts, now=math.inf)  # their process is gone
    store = await PostgresStore.open(target)  # creates the schema
    await store.close()
    try:
        connection = await psycopg.AsyncConnection.connect(target)
    except psycopg.OperationalError as error:
        raise StoreError(f"Cannot reach the PostgreSQL database: {error}") from error
    async with (
        aiosqlite.connect(f"file:{source.path}?mode=ro", uri=True) as reading,
        connection,
        connection.transaction(),
    ):
        await _check_empty(connection)
        rows = {}
        for sqlite_table, table in TABLES:
            rows[table] = await _copy_table(reading, connection, sqlite_table, table)
        await _copy_clock(reading, connection)
        results = await _copy_results(source, reading, connection)
        await connection.execute(
            "SELECT setval(pg_get_serial_sequence('jobs', 'id'), "
            "GREATEST((SELECT MAX(id) FROM jobs), 1))"
        )
    return Moved(rows, results)


async def _check_empty(connection: psycopg.AsyncConnection) -> None:
    cursor = await connection.execute("SELECT EXISTS (SELECT 1 FROM jobs)")
    (has_jobs,) = await cursor.fetchone()
    if has_jobs:
        raise StoreError(
            "The PostgreSQL database already holds jobs: migrate into an empty database "
            "(or a new schema), so that two bots' histories are never mixed."
        )


async def _copy_table(
    reading: aiosqlite.Connection,
    connection: psycopg.AsyncConnection,
    sqlite_table: str,
    table: str,
) -> int:
    """Copy the columns both tables have; returns the rows copied."""
    target_columns = await _columns(connection, table)
    source_columns = [
        row[1] for row in await reading.execute_fetchall(f"PRAGMA table_info({sqlite_table})")
    ]
    columns = [name for name in source_columns if name in target_columns]
    copy = sql.SQL("COPY {} ({}) FROM STDIN").format(
        sql.Identifier(table), sql.SQL(", ").join(map(sql.Identifier, columns))
    )
    booleans = {index for index, name in enumerate(columns) if target_columns[name] == "boolean"}
    count = 0
    async with connection.cursor() as cursor, cursor.copy(copy) as writer:
        async for chunk in _chunks(reading, sqlite_table, columns):
            for row in chunk:
                await writer.write_row(
                    [bool(value) if index in booleans else value for index, value in enumerate(row)]
                )
            count += len(chunk)
    return count


async def _copy_clock(reading: aiosqlite.Connection, connection: psycopg.AsyncConnection) -> None:
    ((virtual_time,),) = await reading.execute_fetchall("SELECT virtual_time FROM queue_clock")
    await connection.execute("UPDATE fair_clock SET virtual_time = %s", (virtual_time,))


async def _copy_results(
    source: SqliteStore, reading: aiosqlite.Connection, connection: psycopg.AsyncConnection
) -> int:
    """Every kept result file, one at a time, into ``results``."""
    count = 0
    jobs = await reading.execute_fetchall(
        "SELECT id, takes FROM jobs WHERE status = 'done' AND result_expired_at IS NULL"
    )
    for job_id, takes in jobs:
        for take in range(takes):
            path = source.result_file(job_id, take)
            try:
                flac = await asyncio.to_thread(path.read_bytes)
            except FileNotFoundError:
                continue  # lost before the migration: /music show says so, as before
            await connection.execute(
                "INSERT INTO results (job_id, take, flac) VALUES (%s, %s, %s)",
                (job_id, take, flac),
            )
            count += 1
    return count


async def _columns(connection: psycopg.AsyncConnection, table: str) -> dict[str, str]:
    cursor = await connection.execute(
        """SELECT column_name, data_type FROM information_schema.columns
           WHERE table_schema = current_schema() AND table_name = %s""",
        (table,),
    )
    return dict(await cursor.fetchall())


async def _chunks(
    reading: aiosqlite.Connection, table: str, columns: Sequence[str]
) -> AsyncIterator[list[tuple]]:
    """The rows of ``table``, :data:`CHUNK` at a time, in rowid order."""
    names = ", ".join(f'"{name}"' for name in columns)
    last = -1
    while True:
        rows = await reading.execute_fetchall(
            f"SELECT rowid, {names} FROM {table} WHERE rowid > ? ORDER BY rowid LIMIT ?",
            (last, CHUNK),
        )
        if not rows:
            return
        last = rows[-1][0]
        yield [tuple(row[1:]) for row in rows]
