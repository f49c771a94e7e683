"""The PostgreSQL job store: :class:`PostgresStore` (see the package's docstring)."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import math
import statistics
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import asdict, fields, replace
from typing import Any

import numpy as np
import psycopg
import soundfile
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from generation.audio.stored import StoredClip, to_grid
from generation.errors import DamagedResult, DamagedUpload, ResultMissing
from generation.jobs.job import Job, JobStatus, ReplyAddress
from generation.jobs.postgres import queries as q
from generation.jobs.postgres.listener import Listening
from generation.jobs.postgres.schema import migrate
from generation.jobs.retention import DAY, Retention
from generation.jobs.store import (
    MEDIAN_OF,
    Channel,
    Expired,
    GuildSettings,
    Jam,
    Listener,
    Pruned,
    Segment,
    Stats,
    StoreError,
    Turn,
    WorkerInfo,
)
from generation.origin import Origin
from generation.request import AudioClip, GenerationRequest, batch_key

log = logging.getLogger(__name__)

Connection = psycopg.AsyncConnection[dict]

_AUDIO_OPTIONS = ("melody", "continuation")

#: Seconds to wait for the server when connecting, and for a free connection of the pool.
CONNECT_TIMEOUT = 10
#: The longest any one statement may run, in milliseconds (a stuck query fails, named).
STATEMENT_TIMEOUT_MS = 60_000
#: The most job ids one heartbeat may carry (a worker runs one batch at a time).
MAX_HEARTBEAT_JOBS = 1_000


class PostgresStore:
    """The bot's database on a PostgreSQL server, shared by a gateway and its workers.
    Open with :meth:`open`, close with :meth:`close`."""

    def __init__(self, pool: AsyncConnectionPool, conninfo: str, address: str) -> None:
        self._pool = pool
        self._listening = Listening(conninfo, address)
        #: The server and database, without any password (for messages and logs).
        self.address = address

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
            kwargs={"row_factory": dict_row, "connect_timeout": CONNECT_TIMEOUT},
            configure=_configure,
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

    # Submitting and the queue

    async def add(self, job: Job) -> Job:
        """Record a new job, not yet released, with its uploaded clips; give it its id and
        its place in the fair order.

        Each clip is put on the store's 24-bit grid first, and the job runs that clip, so what
        is kept is exactly what ran; a clip the store already holds is not stored again.
        """
        uploads = {}
        for option in _AUDIO_OPTIONS:
            clip: AudioClip | None = getattr(job.request, option)
            if clip is not None:
                uploads[option] = await asyncio.to_thread(_on_grid, clip)
        job.request = replace(
            job.request, **{option: stored.clip for option, (stored, _) in uploads.items()}
        )
        async with self._transaction() as db:
            tag = await _value(db, q.NEXT_TAG, {"guild_id": job.guild_id})
            job.id = await _value(
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
                    _request_json(job.request),
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
            if uploads:
                await db.execute("SELECT pg_advisory_xact_lock_shared(%s)", (q.UPLOADS_LOCK,))
            for option, (stored, digest) in uploads.items():
                await _keep_upload(db, job.id, option, stored, digest)
        return job

    async def release(self, job: Job, reply: ReplyAddress | None) -> None:
        """Record where the requester waits (if anywhere) and let workers claim the job;
        nothing happens to a job that is no longer queued (cancelled meanwhile)."""
        async with self._transaction() as db:
            cursor = await db.execute(
                """UPDATE jobs SET released = true,
                       reply_application_id = COALESCE(%(app)s, reply_application_id),
                       reply_token = CASE WHEN %(set)s THEN %(token)s ELSE reply_token END,
                       reply_expires_at = COALESCE(%(expires)s, reply_expires_at),
                       reply_message_id = COALESCE(%(message)s, reply_message_id),
                       reply_max_upload_bytes = COALESCE(%(max_bytes)s, reply_max_upload_bytes)
                   WHERE id = %(id)s AND status = 'queued'""",
                {
                    "id": job.id,
                    "set": reply is not None,
                    "app": reply.application_id if reply else None,
                    "token": reply.token if reply else None,
                    "expires": reply.expires_at if reply else None,
                    "message": reply.message_id if reply else None,
                    "max_bytes": reply.max_upload_bytes if reply else None,
                },
            )
            if cursor.rowcount == 1:
                await _notify(db, Channel.QUEUE)
        if reply is not None:
            job.reply = reply

    async def set_reply(self, job: Job, reply: ReplyAddress) -> None:
        """Record where the requester waits for the answer."""
        job.reply = reply
        async with self._transaction() as db:
            await db.execute(
                """UPDATE jobs SET reply_application_id = %s, reply_token = %s,
                       reply_expires_at = %s, reply_message_id = %s, reply_max_upload_bytes = %s
                   WHERE id = %s""",
                (
                    reply.application_id,
                    reply.token,
                    reply.expires_at,
                    reply.message_id,
                    reply.max_upload_bytes,
                    job.id,
                ),
            )

    async def live_counts(self, guild_id: int, user_id: int) -> tuple[int, int]:
        """The member's and the server's live jobs (queued, released or not, or running)."""
        async with self._read() as db:
            row = await (
                await db.execute(q.LIVE_COUNTS, {"guild_id": guild_id, "user_id": user_id})
            ).fetchone()
        assert row is not None
        return row["member"], row["server"]

    async def position(self, job: Job) -> int | None:
        """1 for the job claimed next, and so on; None if ``job`` cannot be claimed now."""
        async with self._read() as db:
            row = await (await db.execute(q.POSITION, {"id": job.id})).fetchone()
        return None if row is None else next(iter(row.values()))

    async def queued(self, guild_id: int) -> list[Job]:
        """A server's queued, released jobs in queue order (paused or not), without audio."""
        return await self._jobs(
            "WHERE guild_id = %s AND status = 'queued' AND released ORDER BY fair_tag, id",
            (guild_id,),
            with_audio=False,
        )

    async def queue_order(self) -> list[Job]:
        """Every claimable job in queue order, without audio (one index scan)."""
        return await self._jobs(f"WHERE {q.CLAIMABLE} ORDER BY fair_tag, id", (), with_audio=False)

    async def running(self) -> list[Job]:
        """The jobs running now, with their progress and worker, without audio."""
        return await self._jobs(
            "WHERE status = 'running' ORDER BY started_at, id", (), with_audio=False
        )

    async def request_cancel(self, job_id: int) -> JobStatus | None:
        """Cancel a queued job now (CANCELLED), or ask the worker running it to stop
        (RUNNING, and ``Channel.CANCEL`` carries its id); None if the job is not live."""
        async with self._transaction() as db:
            cursor = await db.execute(
                """UPDATE jobs SET status = 'cancelled', finished_at = %s
                   WHERE id = %s AND status = 'queued'""",
                (time.time(), job_id),
            )
            if cursor.rowcount == 1:
                await _notify(db, Channel.JOBS, str(job_id))
                return JobStatus.CANCELLED
            cursor = await db.execute(
                """UPDATE jobs SET cancel_requested = true
                   WHERE id = %s AND status = 'running'""",
                (job_id,),
            )
            if cursor.rowcount == 1:
                await _notify(db, Channel.CANCEL, str(job_id))
                return JobStatus.RUNNING
        return None

    # Workers

    async def claim(
        self,
        worker_id: str,
        *,
        models: Sequence[str] | None,
        loaded: Sequence[str],
        max_rows: int,
        max_model_wait: float,
        lease_seconds: float,
        now: float | None = None,
    ) -> list[Job]:
        """Take the next batch for a worker, in fair order, and lease it.

        The head is the first claimable job (of ``models``, unless None). While it has waited
        less than ``max_model_wait`` for a model the worker has not ``loaded``, the first job
        for a loaded model goes first instead (if any). Jobs with the first one's batch key
        then join in queue order while the takes stay within ``max_rows`` (the first always
        goes). Rows another claim holds are skipped (``FOR UPDATE SKIP LOCKED``), so two
        workers never take the same job. The jobs come without their clips, in queue order.
        """
        if max_rows < 1:
            raise ValueError(f"max_rows must be at least 1, not {max_rows}")
        now = time.time() if now is None else now
        models = None if models is None else list(models)
        async with self._transaction() as db:
            head = await _row(db, q.CLAIM_HEAD, {"models": models})
            if head is None:
                return []
            preferred = [m for m in loaded if models is None or m in models]
            if (
                preferred
                and head["model"] not in preferred
                and now - head["submitted_at"] < max_model_wait
            ):
                head = await _row(db, q.CLAIM_HEAD, {"models": preferred}) or head
            chosen, room = [head], max_rows - head["takes"]
            if room > 0:
                joining = await (
                    await db.execute(
                        q.CLAIM_BATCH,
                        {"batch_key": head["batch_key"], "first": head["id"], "room": room},
                    )
                ).fetchall()
                for row in joining:
                    if row["takes"] <= room:
                        chosen.append(row)
                        room -= row["takes"]
            rows = await (
                await db.execute(
                    q.LEASE,
                    {
                        "ids": [row["id"] for row in chosen],
                        "now": now,
                        "worker_id": worker_id,
                        "lease_seconds": lease_seconds,
                    },
                )
            ).fetchall()
            await db.execute(q.ADVANCE_CLOCK, {"tag": max(row["fair_tag"] for row in chosen)})
            await _notify(db, Channel.JOBS)
        rows.sort(key=lambda row: (row["fair_tag"], row["id"]))
        return [_job_without_audio(row) for row in rows]

    async def heartbeat(
        self, worker_id: str, job_ids: Sequence[int], lease_seconds: float, now: float | None = None
    ) -> set[int]:
        """Extend the leases of those of ``job_ids`` still running under ``worker_id`` (and
        mark the worker seen); returns the ids it must stop: cancel requested, or no longer
        its own (the lease was lost)."""
        if len(job_ids) > MAX_HEARTBEAT_JOBS:
            raise ValueError(
                f"A heartbeat carries at most {MAX_HEARTBEAT_JOBS} jobs, not {len(job_ids)}."
            )
        now = time.time() if now is None else now
        async with self._transaction() as db:
            rows = await (
                await db.execute(
                    q.EXTEND_LEASES,
                    {
                        "ids": list(job_ids),
                        "now": now,
                        "lease_seconds": lease_seconds,
                        "worker_id": worker_id,
                    },
                )
            ).fetchall()
            await db.execute("UPDATE workers SET seen_at = %s WHERE id = %s", (now, worker_id))
        held = {row["id"] for row in rows if not row["cancel_requested"]}
        return set(job_ids) - held

    async def requeue_expired(self, max_attempts: int, now: float | None = None) -> int:
        """Queue again the running jobs whose lease ran out (``now=math.inf``: every running
        job), failing for good those that used up ``max_attempts``; returns how many moved.
        One sweeper runs at a time: another one finding it busy returns 0."""
        now = time.time() if now is None else now
        async with self._transaction() as db:
            if not await _value(db, "SELECT pg_try_advisory_xact_lock(%s)", (q.SWEEP_LOCK,)):
                return 0
            rows = await (
                await db.execute(
                    q.REQUEUE_EXPIRED,
                    {
                        "max_attempts": max_attempts,
                        "now": math.inf if math.isinf(now) else now,
                        "given_up": q.GIVEN_UP,
                    },
                )
            ).fetchall()
            if rows:
                await _notify(db, Channel.QUEUE)
                await _notify(db, Channel.JOBS)
        return len(rows)

    async def set_progress(self, job: Job, done: int, total: int) -> None:
        """Record a running job's progress (the worker throttles its calls)."""
        async with self._transaction() as db:
            cursor = await db.execute(
                """UPDATE jobs SET progress_done = %s, progress_total = %s
                   WHERE id = %s AND status = 'running' AND attempts = %s""",
                (done, total, job.id, job.attempts),
            )
            if cursor.rowcount == 1:
                await _notify(db, Channel.JOBS, str(job.id))
        job.progress = (done, total)

    async def register_worker(self, info: WorkerInfo) -> None:
        async with self._transaction() as db:
            await db.execute(
                """INSERT INTO workers VALUES (%s, %s, %s, %s, %s, %s, %s, %s)
                   ON CONFLICT (id) DO UPDATE SET host = excluded.host,
                       device = excluded.device, models = excluded.models,
                       loaded = excluded.loaded, jobs = excluded.jobs,
                       started_at = excluded.started_at, seen_at = excluded.seen_at""",
                (
                    info.id,
                    info.host,
                    info.device,
                    list(info.models),
                    list(info.loaded),
                    list(info.jobs),
                    info.started_at,
                    info.seen_at,
                ),
            )

    async def update_worker(
        self, worker_id: str, loaded: Sequence[str], jobs: Sequence[int]
    ) -> None:
        """Record the models a worker holds in memory and the jobs it runs now."""
        async with self._transaction() as db:
            await db.execute(
                "UPDATE workers SET loaded = %s, jobs = %s WHERE id = %s",
                (list(loaded), list(jobs), worker_id),
            )

    async def forget_worker(self, worker_id: str) -> None:
        async with self._transaction() as db:
            await db.execute("DELETE FROM workers WHERE id = %s", (worker_id,))

    async def workers(self, seen_since: float) -> list[WorkerInfo]:
        """The workers whose last heartbeat was at ``seen_since`` or later."""
        async with self._read() as db:
            rows = await (
                await db.execute(
                    "SELECT * FROM workers WHERE seen_at >= %s ORDER BY id", (seen_since,)
                )
            ).fetchall()
        return [
            WorkerInfo(
                id=row["id"],
                host=row["host"],
                device=row["device"],
                models=tuple(row["models"]),
                loaded=tuple(row["loaded"]),
                jobs=tuple(row["jobs"]),
                started_at=row["started_at"],
                seen_at=row["seen_at"],
            )
            for row in rows
        ]

    # A job's life

    async def finish(self, job: Job, status: JobStatus, error: str | None = None) -> bool:
        """Record how a job ended (the requester is told next: see :meth:`mark_delivered`).
        Fenced: False, and nothing changes, unless the job is as ``job`` holds it."""
        finished_at = time.time()
        async with self._transaction() as db:
            cursor = await db.execute(
                """UPDATE jobs SET status = %s, error = %s, finished_at = %s,
                       generation_seconds = %s, lease_expires_at = NULL,
                       cancel_requested = false, progress_done = NULL, progress_total = NULL
                   WHERE id = %s AND status = %s AND attempts = %s""",
                (
                    status.value,
                    error,
                    finished_at,
                    job.generation_seconds,
                    job.id,
                    job.status.value,
                    job.attempts,
                ),
            )
            if cursor.rowcount != 1:
                return False
            await _notify(db, Channel.JOBS, str(job.id))
        job.status, job.error, job.finished_at = status, error, finished_at
        return True

    async def requeue(self, job: Job, *, count_attempt: bool = True) -> bool:
        """Put a job that was running back in the queue, keeping its place in the fair
        order; ``count_attempt=False`` (a shutdown) gives the attempt back. Fenced like
        :meth:`finish`."""
        async with self._transaction() as db:
            cursor = await db.execute(
                """UPDATE jobs SET status = 'queued', started_at = NULL,
                       attempts = attempts - %s, worker_id = NULL, lease_expires_at = NULL,
                       cancel_requested = false, progress_done = NULL, progress_total = NULL
                   WHERE id = %s AND status = %s AND attempts = %s""",
                (0 if count_attempt else 1, job.id, job.status.value, job.attempts),
            )
            if cursor.rowcount != 1:
                return False
            await _notify(db, Channel.QUEUE)
            await _notify(db, Channel.JOBS, str(job.id))
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

    async def undelivered(self) -> list[Job]:
        """Jobs that ended without their requester being told, and are still to be (without
        their uploads: an outcome is delivered from the job and its stored tracks)."""
        return await self._jobs(
            """WHERE status IN ('done', 'failed', 'cancelled') AND NOT delivered
               AND delivery_failure IS NULL ORDER BY id""",
            (),
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
                    _decoded, row["flac"], row["exponent"]
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
        flac = await asyncio.to_thread(_flac, audio, sample_rate)
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
            row = await _row(
                db, "SELECT flac FROM results WHERE job_id = %s AND take = %s", (job.id, take)
            )
        if row is None:
            raise ResultMissing(job.id)
        try:
            audio, sample_rate = await asyncio.to_thread(_read_flac, row["flac"])
        except soundfile.SoundFileError as error:
            log.warning("job=%d event=result-damaged take=%d error=%s", job.id, take, error)
            raise DamagedResult(job.id) from error
        return audio, sample_rate

    # Retention

    async def prune(self, retention: Retention, now: float | None = None) -> Pruned:
        """Delete what ``retention`` no longer keeps, and expired interaction tokens.

        A job whose result or uploads were deleted keeps its row (history, and the date for
        :class:`Expired`); a job past ``jobs_days`` goes with its results, and a relay jam
        goes once all its turns have.
        """
        now = time.time() if now is None else now
        tokens = await self.clear_expired_tokens(now)
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

    # Server settings

    async def guild_settings(self, guild_id: int) -> GuildSettings:
        async with self._read() as db:
            row = await _row(
                db, "SELECT settings FROM guild_settings WHERE guild_id = %s", (guild_id,)
            )
        if row is None:
            return GuildSettings(guild_id)
        values = json.loads(row["settings"])
        known = {f.name for f in fields(GuildSettings)}
        values = {key: value for key, value in values.items() if key in known}
        for key in ("allowed_models", "allowed_channels"):
            values[key] = tuple(values.get(key, ()))
        return GuildSettings(guild_id=guild_id, **values)

    async def save_guild_settings(self, settings: GuildSettings) -> None:
        """Save a server's settings; pausing or resuming it changes what can be claimed."""
        values = asdict(settings)
        del values["guild_id"]
        async with self._transaction() as db:
            await db.execute(
                """INSERT INTO guild_settings VALUES (%s, %s)
                   ON CONFLICT (guild_id) DO UPDATE SET settings = excluded.settings""",
                (settings.guild_id, json.dumps(values)),
            )
            if settings.paused:
                await db.execute(
                    "INSERT INTO paused_guilds VALUES (%s) ON CONFLICT DO NOTHING",
                    (settings.guild_id,),
                )
            else:
                cursor = await db.execute(
                    "DELETE FROM paused_guilds WHERE guild_id = %s", (settings.guild_id,)
                )
                if cursor.rowcount:
                    await _notify(db, Channel.QUEUE)

    async def paused_guilds(self) -> list[int]:
        async with self._read() as db:
            rows = await (
                await db.execute("SELECT guild_id FROM paused_guilds ORDER BY guild_id")
            ).fetchall()
        return [row["guild_id"] for row in rows]

    # Generation rates

    async def generation_rates(self, device: str) -> dict[tuple[str, int], float]:
        """Seconds of work per second of audio learnt on ``device``, by (model, batch size)."""
        async with self._read() as db:
            rows = await (
                await db.execute(
                    """SELECT model, rows, seconds_per_second FROM generation_rates
                       WHERE device = %s""",
                    (device,),
                )
            ).fetchall()
        return {(row["model"], row["rows"]): row["seconds_per_second"] for row in rows}

    async def save_generation_rate(self, device: str, model: str, rows: int, rate: float) -> None:
        async with self._transaction() as db:
            await db.execute(
                """INSERT INTO generation_rates VALUES (%s, %s, %s, %s, %s)
                   ON CONFLICT (device, model, rows) DO UPDATE SET
                       seconds_per_second = excluded.seconds_per_second,
                       updated_at = excluded.updated_at""",
                (device, model, rows, rate, time.time()),
            )

    # Relay jams

    async def add_jam(self, jam: Jam) -> None:
        async with self._transaction() as db:
            await db.execute(
                "INSERT INTO jams VALUES (%s, %s, %s, %s, %s, %s, %s)",
                (
                    jam.thread_id,
                    jam.guild_id,
                    jam.channel_id,
                    jam.user_id,
                    jam.title,
                    jam.timeline_message_id,
                    time.time(),
                ),
            )

    async def jam(self, thread_id: int) -> Jam | None:
        async with self._read() as db:
            row = await _row(
                db,
                """SELECT thread_id, guild_id, channel_id, user_id, title, timeline_message_id
                   FROM jams WHERE thread_id = %s""",
                (thread_id,),
            )
        return None if row is None else Jam(**row)

    async def jams_started_by(self, guild_id: int, user_id: int) -> list[int]:
        """The threads of the jams a member started in a server."""
        async with self._read() as db:
            rows = await (
                await db.execute(
                    "SELECT thread_id FROM jams WHERE guild_id = %s AND user_id = %s",
                    (guild_id, user_id),
                )
            ).fetchall()
        return [row["thread_id"] for row in rows]

    async def jam_of_job(self, job_id: int) -> Jam | None:
        """The jam that ``job_id`` is a turn of, if any."""
        turn = await self.turn_of_job(job_id)
        return None if turn is None else await self.jam(turn[0])

    async def turn_of_job(self, job_id: int) -> tuple[int, int] | None:
        """The jam (its thread) and the turn that ``job_id`` is, if it is a jam's turn."""
        async with self._read() as db:
            row = await _row(
                db,
                "SELECT thread_id, position FROM jam_segments WHERE job_id = %s LIMIT 1",
                (job_id,),
            )
        return None if row is None else (row["thread_id"], row["position"])

    async def replace_segment(self, jam: Jam, position: int, job: Job) -> Segment:
        """Make ``job`` (another take of it) the jam's turn ``position``."""
        async with self._transaction() as db:
            await db.execute(
                """UPDATE jam_segments SET job_id = %s, user_id = %s
                   WHERE thread_id = %s AND position = %s""",
                (job.id, job.user_id, jam.thread_id, position),
            )
        return Segment(position, job.id, job.user_id)

    async def add_segment(self, jam: Jam, job: Job) -> Segment:
        """Make ``job`` the jam's next turn (the jam's row is locked while it is counted, so
        two turns added at once get positions one after the other)."""
        async with self._transaction() as db:
            await db.execute("SELECT 1 FROM jams WHERE thread_id = %s FOR UPDATE", (jam.thread_id,))
            position = await _value(
                db,
                "SELECT COUNT(*) + 1 FROM jam_segments WHERE thread_id = %s",
                (jam.thread_id,),
            )
            await db.execute(
                "INSERT INTO jam_segments VALUES (%s, %s, %s, %s)",
                (jam.thread_id, position, job.id, job.user_id),
            )
        return Segment(position, job.id, job.user_id)

    async def segments(self, thread_id: int) -> list[Segment]:
        """A jam's turns, in order."""
        async with self._read() as db:
            rows = await (
                await db.execute(
                    """SELECT position, job_id, user_id FROM jam_segments
                       WHERE thread_id = %s ORDER BY position""",
                    (thread_id,),
                )
            ).fetchall()
        return [Segment(**row) for row in rows]

    async def turns(self, thread_id: int) -> list[Turn]:
        """A jam's turns in order, read in one query, without decoding any audio."""
        async with self._read() as db:
            rows = await (
                await db.execute(
                    """SELECT jobs.*, jam_segments.position, jam_segments.user_id AS player,
                           CASE WHEN job_uploads.job_id IS NULL THEN 0.0
                               ELSE job_uploads.seconds END AS intro_seconds
                       FROM jam_segments JOIN jobs ON jobs.id = jam_segments.job_id
                       LEFT JOIN job_uploads ON job_uploads.job_id = jobs.id
                           AND job_uploads.option = 'continuation'
                       WHERE jam_segments.thread_id = %s ORDER BY jam_segments.position""",
                    (thread_id,),
                )
            ).fetchall()
        return [
            Turn(
                Segment(row["position"], row["id"], row["player"]),
                _job_from_row(row),
                row["intro_seconds"],
            )
            for row in rows
        ]

    # Internals

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
        """The jobs ``where`` selects; ``with_audio=False`` leaves their clips in the store
        (marking the jobs that have some)."""
        async with self._read() as db:
            rows = await (
                await db.execute(
                    f"""SELECT *, EXISTS (SELECT 1 FROM job_uploads
                                          WHERE job_uploads.job_id = jobs.id) AS has_uploads
                        FROM jobs {where}""",  # type: ignore[arg-type]  # our own SQL
                    parameters,
                )
            ).fetchall()
            if not with_audio:
                return [_job_without_audio(row) for row in rows]
            jobs = []
            for row in rows:
                job = _job_from_row(row)
                job.request = await _with_uploads(db, job.id, job.request)
                jobs.append(job)
        return jobs


async def _configure(connection: Connection) -> None:
    """Each pooled connection: no statement runs forever."""
    await connection.set_autocommit(True)
    await connection.execute(f"SET statement_timeout = {STATEMENT_TIMEOUT_MS}")
    await connection.set_autocommit(False)


async def _row(db: Connection, query: str, parameters: object = None) -> dict | None:
    return await (await db.execute(query, parameters)).fetchone()  # type: ignore[arg-type]


async def _value(db: Connection, query: str, parameters: object = None) -> Any:
    row = await _row(db, query, parameters)
    assert row is not None, query
    return next(iter(row.values()))


async def _notify(db: Connection, channel: Channel, payload: str = "") -> None:
    """NOTIFY inside the caller's transaction: listeners hear it once it commits."""
    await db.execute("SELECT pg_notify(%s, %s)", (channel.value, payload))


async def _with_uploads(
    db: Connection, job_id: int, request: GenerationRequest
) -> GenerationRequest:
    rows = await (
        await db.execute(
            """SELECT job_uploads.option, uploads.exponent, uploads.flac
               FROM job_uploads JOIN uploads ON uploads.hash = job_uploads.hash
               WHERE job_uploads.job_id = %s""",
            (job_id,),
        )
    ).fetchall()
    clips = {}
    for row in rows:
        clips[row["option"]] = await asyncio.to_thread(_decoded, row["flac"], row["exponent"])
    return replace(request, **clips) if clips else request


async def _keep_upload(
    db: Connection, job_id: int, option: str, stored: StoredClip, digest: str
) -> None:
    """Make ``stored`` the job's ``option`` clip, storing its FLAC unless it is already there
    (the caller holds :data:`queries.UPLOADS_LOCK` shared, so a prune cannot delete it before
    the job refers to it)."""
    known = await _row(db, "SELECT 1 FROM uploads WHERE hash = %s", (digest,))
    if known is None:
        flac = await asyncio.to_thread(stored.flac)
        await db.execute(
            "INSERT INTO uploads VALUES (%s, %s, %s) ON CONFLICT (hash) DO NOTHING",
            (digest, stored.exponent, flac),
        )
    await db.execute(
        "INSERT INTO job_uploads (job_id, option, hash, seconds) VALUES (%s, %s, %s, %s)",
        (job_id, option, digest, stored.seconds),
    )


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


def _decoded(flac: bytes, exponent: int) -> AudioClip:
    return StoredClip.from_flac(flac, exponent).clip


def _on_grid(clip: AudioClip) -> tuple[StoredClip, str]:
    """``clip`` as the store keeps it, and its content hash (CPU work: run it in a thread)."""
    stored = to_grid(clip)
    return stored, stored.content_hash


def _flac(audio: np.ndarray, sample_rate: int) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, audio.T, sample_rate, format="FLAC", subtype="PCM_24")
    return buffer.getvalue()


def _read_flac(flac: bytes) -> tuple[np.ndarray, int]:
    audio, sample_rate = soundfile.read(io.BytesIO(flac), dtype="float32", always_2d=True)
    return np.ascontiguousarray(audio.T), sample_rate


def _request_json(request: GenerationRequest) -> str:
    values = {
        f.name: getattr(request, f.name)
        for f in fields(GenerationRequest)
        if f.name not in _AUDIO_OPTIONS
    }
    return json.dumps(values)


def _job_without_audio(row: dict) -> Job:
    job = _job_from_row(row)
    job.uploads_in_store = bool(row["has_uploads"])
    return job


def _job_from_row(row: dict) -> Job:
    reply = None
    if row["reply_message_id"] is not None:  # kept after the token is forgotten, to link to
        reply = ReplyAddress(
            row["reply_application_id"],
            row["reply_token"],
            row["reply_expires_at"],
            row["reply_message_id"],
            row["reply_max_upload_bytes"],
        )
    return Job(
        id=row["id"],
        request=GenerationRequest(**json.loads(row["request"])),
        takes=row["takes"],
        origin=Origin.from_json(row["origin"]),
        guild_id=row["guild_id"],
        channel_id=row["channel_id"],
        user_id=row["user_id"],
        status=JobStatus(row["status"]),
        reply=reply,
        attempts=row["attempts"],
        worker_id=row["worker_id"],
        progress=(row["progress_done"] or 0, row["progress_total"] or 0),
        submitted_at=row["submitted_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        generation_seconds=row["generation_seconds"],
        error=row["error"],
        delivered=row["delivered"],
        result_url=row["result_url"],
        result_expired_at=row["result_expired_at"],
        uploads_expired_at=row["uploads_expired_at"],
        delivery_attempts=row["delivery_attempts"],
        delivery_failure=row["delivery_failure"],
    )
