"""The PostgreSQL job store: :class:`PostgresStore` (see the package's docstring): opening,
submitting, a job's life, results and retention."""

from __future__ import annotations

import asyncio
import json
import logging
import statistics
import time
from dataclasses import replace

import numpy as np
import psycopg
import soundfile
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from generation.errors import DamagedResult, DamagedUpload, ResultMissing
from generation.jobs.job import ClipRecord, Job, JobStatus
from generation.jobs.postgres import queries as q
from generation.jobs.postgres.db import (
    APPLICATION_NAME,
    CONNECT_TIMEOUT,
    configure,
    fetch_row,
    fetch_value,
    notify,
)
from generation.jobs.postgres.listener import Listening
from generation.jobs.postgres.queue import QueueOperations
from generation.jobs.postgres.rows import flac_of, keep_flac, read_flac
from generation.jobs.postgres.schema import migrate
from generation.jobs.postgres.servers import ServersAndJams
from generation.jobs.records import AUDIO_OPTIONS, decoded, on_grid, request_json
from generation.jobs.retention import DAY, Retention
from generation.jobs.store import (
    MEDIAN_OF,
    UNDELIVERED_AT_ONCE,
    Channel,
    Expired,
    Listener,
    Pruned,
    Stats,
    StoreError,
)
from generation.request import AudioClip, batch_key

log = logging.getLogger(__name__)


class PostgresStore(QueueOperations, ServersAndJams):
    """The bot's database on a PostgreSQL server, shared by a gateway and its workers.
    Open with :meth:`open`, close with :meth:`close`."""

    def __init__(self, pool: AsyncConnectionPool, conninfo: str, address: str) -> None:
        super().__init__(pool, address)
        self._listening = Listening(conninfo, address)

    @classmethod
    async def open(cls, url: str, *, max_connections: int = 10) -> PostgresStore:
        """Connect to the server at ``url`` (a libpq URL; ``options=-csearch_path=...``
        picks a schema) and bring the schema up to date.

        Raises:
            StoreError: the server cannot be reached or refuses the login (the message names
                it, without the password), or its schema is newer than this bot knows.
        """
        address = public_address(url)
        try:
            connection = await psycopg.AsyncConnection.connect(
                url, connect_timeout=CONNECT_TIMEOUT, row_factory=dict_row
            )
        except psycopg.OperationalError as error:
            raise StoreError(
                f"Cannot connect to the PostgreSQL database {address} ({_first_line(error)}): "
                "start the server, or correct storage.database."
            ) from error
        async with connection:
            await migrate(connection, address)
        pool = AsyncConnectionPool(
            url,
            min_size=1,
            max_size=max_connections,
            kwargs={
                "row_factory": dict_row,
                "connect_timeout": CONNECT_TIMEOUT,
                "application_name": APPLICATION_NAME,
            },
            configure=configure,
            check=AsyncConnectionPool.check_connection,  # a server restart costs no query
            timeout=CONNECT_TIMEOUT,
            open=False,
        )
        try:
            await pool.open(wait=True, timeout=CONNECT_TIMEOUT)
        except PoolTimeout as error:
            await pool.close()
            raise StoreError(
                f"Cannot connect to the PostgreSQL database {address}: start the server, or "
                "correct storage.database."
            ) from error
        return cls(pool, url, address)

    async def close(self) -> None:
        try:
            await self._listening.close()
        finally:
            await self._pool.close()

    def subscribe(self, channel: Channel, listener: Listener) -> None:
        """Call ``listener`` on the event loop whenever ``channel`` is notified (and with ""
        whenever the store starts listening again: read the state again)."""
        self._listening.subscribe(channel, listener)

    # Submitting

    async def add(self, job: Job) -> Job:
        """Record a new job, not yet released, with its uploaded clips; give it its id and
        its place in the fair order.

        Each clip is put on the store's 24-bit grid first, and the job runs that clip, so what
        is kept is exactly what ran; a clip the store already holds is not stored again.
        """
        uploads = {}
        for option in AUDIO_OPTIONS:
            clip: AudioClip | None = getattr(job.request, option)
            if clip is not None:
                uploads[option] = await asyncio.to_thread(on_grid, clip)
        job.request = replace(
            job.request, **{option: stored.clip for option, (stored, _) in uploads.items()}
        )
        job.clips = {
            option: ClipRecord(stored.seconds, digest)
            for option, (stored, digest) in uploads.items()
        }
        async with self._transaction() as db:
            if uploads:  # first, so the server's tag is locked only for a moment
                await db.execute("SELECT pg_advisory_xact_lock_shared(%s)", (q.UPLOADS_LOCK,))
            for stored, digest in uploads.values():
                await keep_flac(db, stored, digest)
            tag = await fetch_value(db, q.NEXT_TAG, {"guild_id": job.guild_id})
            job.id = await fetch_value(
                db,
                """INSERT INTO jobs (guild_id, channel_id, user_id, request, takes, origin,
                       model, duration, batch_key, status, fair_tag, reply_application_id,
                       reply_token, reply_expires_at, submitted_at)
                   VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
                   RETURNING id""",
                (
                    job.guild_id,
                    job.channel_id,
                    job.user_id,
                    request_json(job.request),
                    job.takes,
                    job.origin.to_json() if job.origin else None,
                    job.request.model,
                    job.request.duration,
                    json.dumps(list(batch_key(job.request))),
                    job.status.value,
                    tag,
                    job.reply.application_id if job.reply else None,
                    job.reply.token if job.reply else None,
                    job.reply.expires_at if job.reply else None,
                    job.submitted_at,
                ),
            )
            for option, (stored, digest) in uploads.items():
                await db.execute(
                    "INSERT INTO job_uploads (job_id, option, hash, seconds) "
                    "VALUES (%s, %s, %s, %s)",
                    (job.id, option, digest, stored.seconds),
                )
        return job

    # A job's life

    async def finish(self, job: Job, status: JobStatus, error: str | None = None) -> bool:
        """Record how a job ended (the requester is told next: see :meth:`mark_delivered`).

        Fenced: it applies only while the job is in the store as ``job`` holds it (same
        status, attempt and worker); False, and nothing changed, when it is not (its worker
        lost the lease, and the job was queued again or ran elsewhere)."""
        finished_at = time.time()
        async with self._transaction() as db:
            cursor = await db.execute(
                f"""UPDATE jobs SET {q.ENDED}, status = %s, error = %s, finished_at = %s,
                       generation_seconds = %s
                   WHERE id = %s AND status = %s AND attempts = %s
                   AND worker_id IS NOT DISTINCT FROM %s""",
                (
                    status.value,
                    error,
                    finished_at,
                    job.generation_seconds,
                    job.id,
                    job.status.value,
                    job.attempts,
                    job.worker_id,
                ),
            )
            if cursor.rowcount != 1:
                return False
            await notify(db, Channel.JOBS, str(job.id))
        job.status, job.error, job.finished_at = status, error, finished_at
        job.worker_id = None
        return True

    async def requeue(self, job: Job, *, count_attempt: bool = True) -> bool:
        """Put a job that was running back in the queue, keeping its place in the fair
        order; ``count_attempt=False`` (a shutdown) gives the attempt back. Fenced like
        :meth:`finish`."""
        async with self._transaction() as db:
            cursor = await db.execute(
                f"""UPDATE jobs SET {q.ENDED}, status = 'queued', started_at = NULL,
                       attempts = attempts - %s
                   WHERE id = %s AND status = %s AND attempts = %s
                   AND worker_id IS NOT DISTINCT FROM %s""",
                (
                    0 if count_attempt else 1,
                    job.id,
                    job.status.value,
                    job.attempts,
                    job.worker_id,
                ),
            )
            if cursor.rowcount != 1:
                return False
            await notify(db, Channel.QUEUE)
            await notify(db, Channel.JOBS, str(job.id))
        job.status, job.worker_id, job.progress = JobStatus.QUEUED, None, (0, 0)
        if not count_attempt:
            job.attempts -= 1
        return True

    async def mark_delivered(self, job: Job, result_url: str | None = None) -> None:
        """Record that the requester was told; their interaction token is forgotten."""
        job.delivered, job.result_url = True, result_url
        if job.reply is not None:
            job.reply = replace(job.reply, token=None)
        async with self._transaction() as db:
            await db.execute(
                """UPDATE jobs SET delivered = true, result_url = %s, reply_token = NULL
                   WHERE id = %s""",
                (result_url, job.id),
            )

    async def clear_expired_tokens(self, now: float | None = None) -> int:
        """Forget the interaction tokens that expired; returns how many."""
        async with self._transaction() as db:
            cursor = await db.execute(
                """UPDATE jobs SET reply_token = NULL
                   WHERE reply_token IS NOT NULL AND reply_expires_at <= %s""",
                (time.time() if now is None else now,),
            )
        return cursor.rowcount

    async def count_failed_delivery(self, job: Job) -> None:
        """Count a try at delivering ``job``'s outcome that failed."""
        async with self._transaction() as db:
            await db.execute(
                "UPDATE jobs SET delivery_attempts = delivery_attempts + 1 WHERE id = %s",
                (job.id,),
            )
        job.delivery_attempts += 1

    async def keep_undelivered(self, job: Job, reason: str) -> None:
        """Stop trying to deliver ``job``'s outcome: it stays for the member's history (and
        its interaction token is forgotten)."""
        job.delivery_failure, job.reply = reason, None
        async with self._transaction() as db:
            await db.execute(
                "UPDATE jobs SET delivery_failure = %s, reply_token = NULL WHERE id = %s",
                (reason, job.id),
            )

    async def get(self, job_id: int) -> Job | None:
        jobs = await self._jobs("WHERE id = %s", (job_id,))
        return jobs[0] if jobs else None

    async def waiting_with_reply(self, now: float) -> list[Job]:
        """Queued jobs whose requester can still be reached through their interaction
        (token valid at ``now``), without audio: their status messages show their place."""
        return await self._jobs(
            """WHERE status = 'queued' AND reply_token IS NOT NULL AND reply_expires_at > %s
               ORDER BY id""",
            (now,),
            with_audio=False,
        )

    async def undelivered(self, limit: int = UNDELIVERED_AT_ONCE) -> list[Job]:
        """The oldest ``limit`` jobs that ended without their requester being told, and are
        still to be (without their uploads: an outcome is delivered from the job and its
        stored tracks)."""
        return await self._jobs(
            """WHERE status IN ('done', 'failed', 'cancelled') AND NOT delivered
               AND delivery_failure IS NULL ORDER BY id LIMIT %s""",
            (limit,),
            with_audio=False,
        )

    async def load_uploads(self, job: Job) -> None:
        """Give ``job``'s request the clips it was given, from the store (decoded on a
        thread), if they are still there.

        Raises:
            Expired: a clip was deleted (retention, or by hand) since the job was queued.
            DamagedUpload: a clip is there but cannot be decoded.
        """
        if not job.uploads_in_store:
            return
        async with self._read() as db:
            rows = await (
                await db.execute(
                    """SELECT job_uploads.option, uploads.exponent, uploads.flac
                       FROM job_uploads LEFT JOIN uploads ON uploads.hash = job_uploads.hash
                       WHERE job_uploads.job_id = %s""",
                    (job.id,),
                )
            ).fetchall()
        if any(row["flac"] is None for row in rows):
            job.uploads_expired_at = job.uploads_expired_at or time.time()
            raise Expired.uploads(job)
        clips = {}
        for row in rows:
            try:
                clips[row["option"]] = await asyncio.to_thread(
                    decoded, row["flac"], row["exponent"]
                )
            except soundfile.SoundFileError as error:
                log.warning(
                    "job=%d event=upload-damaged option=%s error=%s", job.id, row["option"], error
                )
                raise DamagedUpload(job.id, row["option"]) from error
        job.request = replace(job.request, **clips)
        job.uploads_in_store = False

    async def history(self, guild_id: int, user_id: int, limit: int = 10) -> list[Job]:
        """A member's most recent jobs in a server, newest first."""
        return await self._jobs(
            "WHERE guild_id = %s AND user_id = %s ORDER BY id DESC LIMIT %s",
            (guild_id, user_id, limit),
            with_audio=False,
        )

    async def finished_jobs(
        self, guild_id: int, user_id: int | None = None, limit: int = 25
    ) -> list[Job]:
        """The most recent finished (done) jobs in a server, a member's only if ``user_id``
        is given; newest first, read through an index and without their audio."""
        member = "AND user_id = %s" if user_id is not None else ""
        parameters = (guild_id,) if user_id is None else (guild_id, user_id)
        return await self._jobs(
            f"WHERE guild_id = %s {member} AND status = 'done' ORDER BY id DESC LIMIT %s",
            (*parameters, limit),
            with_audio=False,
        )

    async def takes_since(
        self, guild_id: int, user_id: int, since: float
    ) -> list[tuple[float, int]]:
        """When a member submitted each job in a server since ``since``, and its takes
        (oldest first): those that count against the hourly limit (see the SQLite store)."""
        async with self._read() as db:
            rows = await (
                await db.execute(
                    """SELECT submitted_at, takes FROM jobs WHERE guild_id = %s
                       AND user_id = %s AND submitted_at >= %s AND status <> 'failed'
                       AND NOT (status = 'cancelled' AND started_at IS NULL)
                       ORDER BY submitted_at""",
                    (guild_id, user_id, since),
                )
            ).fetchall()
        return [(row["submitted_at"], row["takes"]) for row in rows]

    async def stats(self, guild_id: int) -> Stats:
        """A server's finished jobs counted (all those kept), and the medians of its last
        :data:`MEDIAN_OF` finished jobs: two reads through indexes, whatever its history."""
        async with self._read() as db:
            counts = {
                row["status"]: row["jobs"]
                for row in await (await db.execute(q.STATS_COUNTS, (guild_id,))).fetchall()
            }
            rows = [
                tuple(row.values())
                for row in await (
                    await db.execute(q.STATS_RECENT, (guild_id, MEDIAN_OF))
                ).fetchall()
            ]
        waits = [wait for wait, _ in rows if wait is not None]
        times = [seconds for _, seconds in rows if seconds is not None]
        return Stats(
            served=counts.get(JobStatus.DONE.value, 0),
            failed=counts.get(JobStatus.FAILED.value, 0),
            cancelled=counts.get(JobStatus.CANCELLED.value, 0),
            median_wait_seconds=statistics.median(waits) if waits else None,
            median_generation_seconds=statistics.median(times) if times else None,
            median_of=MEDIAN_OF,
        )

    # Results

    async def save_result(
        self, job: Job, audio: np.ndarray, sample_rate: int, take: int = 0
    ) -> None:
        """Keep one take of a job's (normalised) audio, losslessly (FLAC, 24-bit), in the
        database, where every process reaches it."""
        flac = await asyncio.to_thread(flac_of, audio, sample_rate)
        async with self._transaction() as db:
            await db.execute(
                """INSERT INTO results VALUES (%s, %s, %s)
                   ON CONFLICT (job_id, take) DO UPDATE SET flac = excluded.flac""",
                (job.id, take, flac),
            )

    async def load_result(self, job: Job, take: int = 0) -> tuple[np.ndarray, int]:
        """One take of a job's audio (``[channels, samples]``) and its sample rate.

        Raises:
            Expired: the retention policy deleted it.
            ResultMissing: it is gone otherwise.
            DamagedResult: it is there but cannot be decoded.
        """
        if job.result_expired_at is not None:
            raise Expired.track(job)
        async with self._read() as db:
            row = await fetch_row(
                db, "SELECT flac FROM results WHERE job_id = %s AND take = %s", (job.id, take)
            )
        if row is None:
            raise ResultMissing(job.id)
        try:
            audio, sample_rate = await asyncio.to_thread(read_flac, row["flac"])
        except soundfile.SoundFileError as error:
            log.warning("job=%d event=result-damaged take=%d error=%s", job.id, take, error)
            raise DamagedResult(job.id) from error
        return audio, sample_rate

    # Retention

    async def prune(self, retention: Retention, now: float | None = None) -> Pruned:
        """Delete what ``retention`` no longer keeps, and expired interaction tokens.

        A job whose result or uploads were deleted keeps its row (history, and the date for
        :class:`Expired`); a job past ``jobs_days`` goes with its results, and a relay jam
        goes once all its turns have. Workers not heard from for a day are forgotten.
        """
        now = time.time() if now is None else now
        tokens = await self.clear_expired_tokens(now)
        async with self._transaction() as db:
            # Workers not heard from for a day died without saying goodbye.
            await db.execute("DELETE FROM workers WHERE seen_at < %s", (now - DAY,))
        results = jobs = 0
        if retention.jobs_days:
            jobs = await self._delete_jobs(now - retention.jobs_days * DAY)
        if retention.results_days:
            results = await self._expire_results(now - retention.results_days * DAY, now)
        async with self._transaction() as db:
            if retention.uploads_days:
                await db.execute(
                    f"""UPDATE jobs SET uploads_expired_at = %s
                        WHERE {q.SETTLED} AND finished_at < %s AND uploads_expired_at IS NULL
                        AND id IN (SELECT job_id FROM job_uploads)""",
                    (now, now - retention.uploads_days * DAY),
                )
        async with self._transaction() as db:
            await db.execute("SELECT pg_advisory_xact_lock(%s)", (q.UPLOADS_LOCK,))
            cursor = await db.execute(
                """DELETE FROM uploads WHERE NOT EXISTS (
                       SELECT 1 FROM job_uploads JOIN jobs ON jobs.id = job_uploads.job_id
                       WHERE job_uploads.hash = uploads.hash
                       AND jobs.uploads_expired_at IS NULL)"""
            )
        return Pruned(results=results, uploads=cursor.rowcount, jobs=jobs, tokens=tokens)

    async def _expire_results(self, cutoff: float, now: float) -> int:
        async with self._transaction() as db:
            cursor = await db.execute(
                f"""UPDATE jobs SET result_expired_at = %s
                    WHERE {q.SETTLED} AND status = 'done' AND finished_at < %s
                    AND result_expired_at IS NULL
                    RETURNING id""",
                (now, cutoff),
            )
            expired = [row["id"] for row in await cursor.fetchall()]
            await db.execute("DELETE FROM results WHERE job_id = ANY(%s)", (expired,))
        return len(expired)

    async def _delete_jobs(self, cutoff: float) -> int:
        """Delete the settled jobs that finished before ``cutoff`` (their results go with
        them), and the jams all of whose turns did."""
        async with self._transaction() as db:
            await db.execute(
                f"""DELETE FROM jams WHERE created_at < %(cutoff)s AND NOT EXISTS (
                        SELECT 1 FROM jam_segments JOIN jobs ON jobs.id = jam_segments.job_id
                        WHERE jam_segments.thread_id = jams.thread_id
                        AND NOT ({q.SETTLED} AND finished_at < %(cutoff)s))""",
                {"cutoff": cutoff},
            )
            cursor = await db.execute(
                f"""DELETE FROM jobs WHERE {q.SETTLED} AND finished_at < %s
                    AND NOT EXISTS (SELECT 1 FROM jam_segments WHERE job_id = jobs.id)""",
                (cutoff,),
            )
        return cursor.rowcount


def public_address(url: str) -> str:
    """``url`` without its password (and other options): for messages and logs."""
    try:
        parts = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "(an address that cannot be parsed)"
    user = f"{parts['user']}@" if parts.get("user") else ""
    host = parts.get("host") or "localhost"
    port = f":{parts['port']}" if parts.get("port") else ""
    return f"postgresql://{user}{host}{port}/{parts.get('dbname', '')}"


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
