"""Reaching under either store in tests: raw SQL (to set up the past, or look at rows),
and the moves a worker makes, written once for both stores."""

from __future__ import annotations

import sqlite3

import psycopg

from generation.jobs.job import Job, JobStatus
from generation.jobs.postgres import PostgresStore
from generation.jobs.sqlite import SqliteStore
from generation.jobs.store import JobStore

_URLS: dict[int, str] = {}


def remember_url(store: PostgresStore, url: str) -> None:
    _URLS[id(store)] = url


def forget_url(store: PostgresStore) -> None:
    _URLS.pop(id(store), None)


def url_of(store: PostgresStore) -> str:
    return _URLS[id(store)]


async def sql(store: JobStore, statement: str, parameters: tuple = ()) -> list[tuple]:
    """Run ``statement`` (``?`` placeholders) on ``store``'s database beside the store."""
    if isinstance(store, SqliteStore):
        connection = sqlite3.connect(store.path)
        try:
            with connection:
                return connection.execute(statement, parameters).fetchall()
        finally:
            connection.close()
    async with await psycopg.AsyncConnection.connect(url_of(store), autocommit=True) as db:
        cursor = await db.execute(statement.replace("?", "%s"), parameters)
        return await cursor.fetchall() if cursor.description else []


async def start(store: JobStore, job: Job, worker_id: str = "worker") -> Job:
    """Release ``job`` and claim it (it must be the only claimable job): it runs."""
    await store.release(job, None)
    (claimed,) = await store.claim(
        worker_id, models=None, loaded=(), max_rows=1, max_model_wait=0.0, lease_seconds=60.0
    )
    assert claimed.id == job.id
    job.status, job.attempts, job.worker_id = claimed.status, claimed.attempts, claimed.worker_id
    assert job.status is JobStatus.RUNNING
    return job


async def has_result(store: JobStore, job: Job, take: int = 0) -> bool:
    if isinstance(store, SqliteStore):
        return store.result_path(job, take).exists()
    rows = await sql(store, "SELECT 1 FROM results WHERE job_id = ? AND take = ?", (job.id, take))
    return bool(rows)


async def lose_result(store: JobStore, job: Job, take: int = 0) -> None:
    """Delete a result behind the store's back (by hand, or a lost disk)."""
    if isinstance(store, SqliteStore):
        store.result_path(job, take).unlink()
    else:
        await sql(store, "DELETE FROM results WHERE job_id = ? AND take = ?", (job.id, take))


async def upload_rows(store: JobStore) -> tuple[int, int]:
    """(stored clips, job references to them)."""
    counts = []
    for table in ("uploads", "job_uploads"):
        ((count,),) = await sql(store, f"SELECT COUNT(*) FROM {table}")
        counts.append(count)
    return counts[0], counts[1]
