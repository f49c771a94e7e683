"""Durable jobs, results and server settings in one SQLite file (aiosqlite).

One process owns the file (:mod:`.ownership`) and one connection does all the writing; WAL
lets readers in while it does. The schema carries its version in ``PRAGMA user_version`` and
is migrated forward at start-up. Uploaded audio is kept in the database once per content
(FLAC, named by its hash), shared by the jobs that use it; results are FLAC files in a folder
beside it, which the store owns. :meth:`SqliteStore.prune`
applies the retention policy; interaction tokens are cleared once they are of no more use.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import sqlite3
import statistics
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import asdict, fields, replace
from pathlib import Path

import aiosqlite
import numpy as np
import soundfile

from generation.audio.stored import StoredClip
from generation.errors import DamagedResult, DamagedUpload, ResultMissing
from generation.jobs.estimates import WorkAhead
from generation.jobs.job import ClipRecord, Job, JobStatus, QueueEntry, ReplyAddress
from generation.jobs.ownership import InUse, Ownership
from generation.jobs.records import (
    AUDIO_OPTIONS,
    clip_records,
    decoded,
    job_from_row,
    on_grid,
    request_json,
)
from generation.jobs.retention import DAY, Retention
from generation.jobs.store import (
    ENTRY_CHUNK,
    MEDIAN_OF,
    UNDELIVERED_AT_ONCE,
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
    gave_up,
)
from generation.request import AudioClip, GenerationRequest, batch_key

log = logging.getLogger(__name__)

#: A migration written in Python, run inside the migration's transaction.
Migration = Callable[[aiosqlite.Connection], Awaitable[None]]


#: The queue's columns, tables and indexes (version 11): every read of the queue is an index
#: range, whatever its length.
QUEUE_SCHEMA = """
ALTER TABLE jobs ADD COLUMN model TEXT;
ALTER TABLE jobs ADD COLUMN duration REAL;
ALTER TABLE jobs ADD COLUMN batch_key TEXT;
ALTER TABLE jobs ADD COLUMN released INTEGER NOT NULL DEFAULT 1;
ALTER TABLE jobs ADD COLUMN fair_tag REAL NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN worker_id TEXT;
ALTER TABLE jobs ADD COLUMN lease_expires_at REAL;
ALTER TABLE jobs ADD COLUMN cancel_requested INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN progress_done INTEGER;
ALTER TABLE jobs ADD COLUMN progress_total INTEGER;
CREATE TABLE queue_clock (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    virtual_time REAL NOT NULL
);
INSERT INTO queue_clock VALUES (1, 0);
CREATE TABLE guild_tags (guild_id INTEGER PRIMARY KEY, last_tag REAL NOT NULL);
CREATE TABLE paused_guilds (guild_id INTEGER PRIMARY KEY);
CREATE TABLE workers (
    id TEXT PRIMARY KEY,
    host TEXT NOT NULL,
    device TEXT NOT NULL,
    models TEXT NOT NULL,
    loaded TEXT NOT NULL DEFAULT '[]',
    jobs TEXT NOT NULL DEFAULT '[]',
    started_at REAL NOT NULL,
    seen_at REAL NOT NULL
);
CREATE INDEX jobs_queue ON jobs (fair_tag, id) WHERE status = 'queued' AND released = 1;
CREATE INDEX jobs_queue_by_model ON jobs (model, fair_tag, id)
    WHERE status = 'queued' AND released = 1;
CREATE INDEX jobs_queue_by_key ON jobs (batch_key, fair_tag, id)
    WHERE status = 'queued' AND released = 1;
CREATE INDEX jobs_running ON jobs (lease_expires_at) WHERE status = 'running';
CREATE INDEX jobs_undelivered ON jobs (id)
    WHERE status IN ('done', 'failed', 'cancelled') AND delivered = 0
    AND delivery_failure IS NULL;
"""


async def _store_uploads_once(db: aiosqlite.Connection) -> None:
    """Version 4: each upload kept once, as FLAC, named by its content hash; jobs refer to
    it. Every version-3 upload (float32 PCM, one copy per job) moves over, one at a time."""
    for statement in (
        "ALTER TABLE uploads RENAME TO uploads_v3",
        """CREATE TABLE uploads (
               hash TEXT PRIMARY KEY,
               exponent INTEGER NOT NULL,
               flac BLOB NOT NULL
           )""",
        """CREATE TABLE job_uploads (
               job_id INTEGER NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
               option TEXT NOT NULL,
               hash TEXT NOT NULL,
               PRIMARY KEY (job_id, option)
           )""",
        "CREATE INDEX job_uploads_by_hash ON job_uploads (hash)",
        "ALTER TABLE jobs ADD COLUMN result_expired_at REAL",
        "ALTER TABLE jobs ADD COLUMN uploads_expired_at REAL",
        "CREATE INDEX jobs_by_finish ON jobs (finished_at) WHERE finished_at IS NOT NULL",
        "CREATE INDEX jobs_with_token ON jobs (reply_expires_at) WHERE reply_token IS NOT NULL",
    ):
        await db.execute(statement)
    for job_id, option in await db.execute_fetchall("SELECT job_id, option FROM uploads_v3"):
        ((sample_rate, channels, samples),) = await db.execute_fetchall(
            "SELECT sample_rate, channels, samples FROM uploads_v3 WHERE job_id = ? AND option = ?",
            (job_id, option),
        )
        pcm = np.frombuffer(samples, dtype="<f4").reshape(channels, -1)
        stored, digest = await asyncio.to_thread(on_grid, AudioClip(pcm, sample_rate))
        await _keep_flac(db, stored, digest)
        await db.execute("INSERT INTO job_uploads VALUES (?, ?, ?)", (job_id, option, digest))
    await db.execute("DROP TABLE uploads_v3")


async def _keep_upload_lengths(db: aiosqlite.Connection) -> None:
    """Version 7: each job's clip keeps its length, so a jam knows its turns' intros without
    decoding them (and after the clips expire). Read from each stored FLAC's header."""
    await db.execute("ALTER TABLE job_uploads ADD COLUMN seconds REAL")
    for digest, flac in await db.execute_fetchall("SELECT hash, flac FROM uploads"):
        info = await asyncio.to_thread(soundfile.info, io.BytesIO(flac))
        await db.execute(
            "UPDATE job_uploads SET seconds = ? WHERE hash = ?", (info.duration, digest)
        )


async def _queue_in_the_store(db: aiosqlite.Connection) -> None:
    """Version 11: the queue lives in the store. Each job carries what the claim orders and
    batches by (its model, duration, batch key, fair tag), a lease while it runs, and its
    progress; servers' tags, the virtual time and the workers are kept beside. Queued jobs
    take their tags servers in turn, oldest first, as the in-memory queue served them."""
    for statement in QUEUE_SCHEMA.split(";"):  # executescript would commit the migration
        if statement.strip():
            await db.execute(statement)
    rows = await db.execute_fetchall(
        """SELECT id, request, EXISTS (SELECT 1 FROM job_uploads WHERE job_id = jobs.id)
           FROM jobs"""
    )
    updates = []
    for job_id, stored_request, has_uploads in rows:
        request = GenerationRequest(**json.loads(stored_request))
        key = _key_of_job(job_id) if has_uploads else _key(request)
        updates.append((request.model, request.duration, key, job_id))
    await db.executemany(
        "UPDATE jobs SET model = ?, duration = ?, batch_key = ? WHERE id = ?", updates
    )
    await db.execute(
        """UPDATE jobs SET fair_tag = (SELECT tag FROM (
               SELECT id, ROW_NUMBER() OVER (PARTITION BY guild_id ORDER BY id) AS tag
               FROM jobs WHERE status IN ('queued', 'running')) AS ranked
           WHERE ranked.id = jobs.id)
           WHERE status IN ('queued', 'running')"""
    )
    await db.execute(
        """INSERT INTO guild_tags SELECT guild_id, MAX(fair_tag) + 1 FROM jobs
           WHERE status IN ('queued', 'running') GROUP BY guild_id"""
    )
    for guild_id, settings in await db.execute_fetchall(
        "SELECT guild_id, settings FROM guild_settings"
    ):
        if json.loads(settings).get("paused"):
            await db.execute("INSERT INTO paused_guilds VALUES (?)", (guild_id,))


#: Each entry migrates the schema from version i to i + 1: a script, or a :data:`Migration`.
MIGRATIONS: tuple[str | Migration, ...] = (
    """
    CREATE TABLE jobs (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        guild_id INTEGER NOT NULL,
        channel_id INTEGER NOT NULL,
        user_id INTEGER NOT NULL,
        request TEXT NOT NULL,
        status TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        reply_application_id INTEGER,
        reply_token TEXT,
        reply_expires_at REAL,
        reply_message_id INTEGER,
        reply_max_upload_bytes INTEGER,
        submitted_at REAL NOT NULL,
        started_at REAL,
        finished_at REAL,
        generation_seconds REAL,
        error TEXT,
        delivered INTEGER NOT NULL DEFAULT 0,
        result_url TEXT
    );
    CREATE INDEX jobs_by_status ON jobs (status, id);
    CREATE INDEX jobs_by_requester ON jobs (guild_id, user_id, submitted_at);
    CREATE TABLE uploads (
        job_id INTEGER NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
        option TEXT NOT NULL,
        sample_rate INTEGER NOT NULL,
        channels INTEGER NOT NULL,
        samples BLOB NOT NULL,
        PRIMARY KEY (job_id, option)
    );
    CREATE TABLE guild_settings (
        guild_id INTEGER PRIMARY KEY,
        settings TEXT NOT NULL
    );
    """,
    "ALTER TABLE jobs ADD COLUMN takes INTEGER NOT NULL DEFAULT 1;",
    """
    CREATE TABLE jams (
        thread_id INTEGER PRIMARY KEY,
        guild_id INTEGER NOT NULL,
        channel_id INTEGER NOT NULL,
        user_id INTEGER NOT NULL,
        title TEXT NOT NULL,
        timeline_message_id INTEGER,
        created_at REAL NOT NULL
    );
    CREATE TABLE jam_segments (
        thread_id INTEGER NOT NULL REFERENCES jams (thread_id) ON DELETE CASCADE,
        position INTEGER NOT NULL,
        job_id INTEGER NOT NULL REFERENCES jobs (id),
        user_id INTEGER NOT NULL,
        PRIMARY KEY (thread_id, position)
    );
    """,
    _store_uploads_once,
    """
    ALTER TABLE jobs ADD COLUMN origin TEXT;
    CREATE INDEX jobs_by_member ON jobs (guild_id, user_id, status, id);
    CREATE INDEX jobs_by_guild ON jobs (guild_id, status, id);
    """,
    """
    CREATE TABLE generation_rates (
        device TEXT NOT NULL,
        model TEXT NOT NULL,
        rows INTEGER NOT NULL,
        seconds_per_second REAL NOT NULL,
        updated_at REAL NOT NULL,
        PRIMARY KEY (device, model, rows)
    );
    """,
    _keep_upload_lengths,
    # Deliveries tried and failed; why an outcome is kept for /music history undelivered.
    """
    ALTER TABLE jobs ADD COLUMN delivery_attempts INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE jobs ADD COLUMN delivery_failure TEXT;
    """,
    # /music stats at any history size: jobs counted per server and status as they are
    # written (triggers, so in the same transaction, whoever writes), and the recent finished
    # jobs read through an index.
    """
    CREATE TABLE job_counts (
        guild_id INTEGER NOT NULL,
        status TEXT NOT NULL,
        jobs INTEGER NOT NULL,
        PRIMARY KEY (guild_id, status)
    ) WITHOUT ROWID;
    INSERT INTO job_counts SELECT guild_id, status, COUNT(*) FROM jobs GROUP BY guild_id, status;
    CREATE TRIGGER jobs_counted_on_insert AFTER INSERT ON jobs BEGIN
        INSERT OR IGNORE INTO job_counts VALUES (new.guild_id, new.status, 0);
        UPDATE job_counts SET jobs = jobs + 1
            WHERE guild_id = new.guild_id AND status = new.status;
    END;
    CREATE TRIGGER jobs_counted_on_update AFTER UPDATE OF status ON jobs
    WHEN old.status != new.status BEGIN
        UPDATE job_counts SET jobs = jobs - 1
            WHERE guild_id = old.guild_id AND status = old.status;
        INSERT OR IGNORE INTO job_counts VALUES (new.guild_id, new.status, 0);
        UPDATE job_counts SET jobs = jobs + 1
            WHERE guild_id = new.guild_id AND status = new.status;
    END;
    CREATE TRIGGER jobs_counted_on_delete AFTER DELETE ON jobs BEGIN
        UPDATE job_counts SET jobs = jobs - 1
            WHERE guild_id = old.guild_id AND status = old.status;
    END;
    CREATE INDEX jobs_finished_by_guild ON jobs (guild_id, finished_at)
        WHERE finished_at IS NOT NULL;
    """,
    _queue_in_the_store,
)

#: A finished job whose requester has been told (or who could not be, so it was kept for
#: their history): the retention policy may apply to it.
_SETTLED = (
    "status IN ('done', 'failed', 'cancelled') AND (delivered = 1 OR delivery_failure IS NOT NULL)"
)


#: A job workers may claim: queued, released by its requester, its server not paused.
CLAIMABLE = """status = 'queued' AND released = 1
    AND guild_id NOT IN (SELECT guild_id FROM paused_guilds)"""
#: What a claim needs of the claimable jobs, to choose among them.
CLAIMABLE_HEADS = f"""SELECT id, model, submitted_at, batch_key, takes, fair_tag FROM jobs
    WHERE {CLAIMABLE}"""
#: A run that ends (or goes back to the queue) leaves no lease, progress or cancel request.
ENDED = """worker_id = NULL, lease_expires_at = NULL, cancel_requested = 0,
    progress_done = NULL, progress_total = NULL"""
SET_REPLY = """UPDATE jobs SET reply_application_id = ?, reply_token = ?, reply_expires_at = ?,
    reply_message_id = ?, reply_max_upload_bytes = ? WHERE id = ?"""


#: Workers not heard from since ``?``: they died without saying goodbye.
FORGET_SILENT_WORKERS = "DELETE FROM workers WHERE seen_at < ?"

#: :meth:`SqliteStore.stats`' reads: each goes through an index, never over a server's history.
STATS_COUNTS = "SELECT status, jobs FROM job_counts WHERE guild_id = ?"
STATS_RECENT = """SELECT started_at - submitted_at, generation_seconds FROM jobs
    WHERE guild_id = ? AND finished_at IS NOT NULL AND status IN ('done', 'failed', 'cancelled')
    ORDER BY finished_at DESC LIMIT ?"""


class SqliteStore:
    """The bot's database. Open with :meth:`open`, close with :meth:`close`."""

    def __init__(
        self, connection: aiosqlite.Connection, path: Path, ownership: Ownership | None = None
    ) -> None:
        self._db = connection
        self._ownership = ownership
        self._writing = asyncio.Lock()  # one transaction at a time on the one connection
        self._listeners: dict[Channel, list[Listener]] = {}
        self.path = path
        self.results = path.parent / f"{path.stem}-results"

    @classmethod
    async def open(cls, path: str | Path, *, owner: bool = True) -> SqliteStore:
        """Open (or create) the database at ``path`` and bring its schema up to date.

        The owner (the bot: it runs and recovers the jobs) holds the database alone until
        :meth:`close`, so two bots never run the same jobs. ``owner=False`` is for what only
        reads, or deletes what retention no longer keeps (``musicgen-bot prune``): it may
        open the database beside its owner, and must never run or recover jobs.

        Raises:
            StoreError: another process owns the database (``owner`` only), the file is not
                a readable SQLite database (it is left untouched), or it was written by a
                newer version of the bot.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        ownership = await _own(path) if owner else None
        try:
            return await cls._open(path, ownership)
        except BaseException:
            if ownership is not None:
                ownership.release()
            raise

    @classmethod
    async def _open(cls, path: Path, ownership: Ownership | None) -> SqliteStore:
        if path.exists():
            await _check_readable(path)
        # Autocommit: transactions are the explicit BEGIN IMMEDIATE ... COMMIT below.
        connection = await aiosqlite.connect(path, isolation_level=None)
        connection.row_factory = aiosqlite.Row
        try:
            await connection.execute("PRAGMA busy_timeout = 5000")
            await connection.execute_fetchall("PRAGMA journal_mode = WAL")
            await connection.execute("PRAGMA foreign_keys = ON")
            await _migrate(connection, path)
        except BaseException:
            await connection.close()
            raise
        store = cls(connection, path, ownership)
        store.results.mkdir(exist_ok=True)
        return store

    async def close(self) -> None:
        try:
            await self._db.close()
        finally:
            if self._ownership is not None:
                self._ownership.release()

    # Jobs

    async def add(self, job: Job) -> Job:
        """Record a new job (with its uploaded audio) and give it its id.

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
        key = _key(job.request)  # of the clips as stored
        async with self._transaction():
            tag = await self._next_tag(job.guild_id)
            cursor = await self._db.execute(
                """INSERT INTO jobs (guild_id, channel_id, user_id, request, takes, origin,
                       status, reply_application_id, reply_token, reply_expires_at,
                       submitted_at, model, duration, batch_key, released, fair_tag)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0, ?)""",
                (
                    job.guild_id,
                    job.channel_id,
                    job.user_id,
                    request_json(job.request),
                    job.takes,
                    job.origin.to_json() if job.origin else None,
                    job.status.value,
                    job.reply.application_id if job.reply else None,
                    job.reply.token if job.reply else None,
                    job.reply.expires_at if job.reply else None,
                    job.submitted_at,
                    job.request.model,
                    job.request.duration,
                    key,
                    tag,
                ),
            )
            job.id = cursor.lastrowid
            for option, (stored, digest) in uploads.items():
                await _keep_upload(self._db, job.id, option, stored, digest)
        return job

    async def release(self, job: Job, reply: ReplyAddress | None) -> None:
        """Record where the requester waits (if anywhere) and let workers claim the job; a
        job cancelled meanwhile stays cancelled."""
        if reply is not None:
            job.reply = reply
        async with self._transaction():
            if reply is not None:
                await self._db.execute(SET_REPLY, (*_reply_values(reply), job.id))
            await self._db.execute(
                "UPDATE jobs SET released = 1 WHERE id = ? AND status = 'queued'", (job.id,)
            )
        self._notify(Channel.QUEUE)

    async def live_counts(self, guild_id: int, user_id: int) -> tuple[int, int]:
        ((member, server),) = await self._db.execute_fetchall(
            """SELECT COALESCE(SUM(user_id = ?), 0), COUNT(*) FROM jobs
               WHERE guild_id = ? AND status IN ('queued', 'running')""",
            (user_id, guild_id),
        )
        return member, server

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
        """Take the next batch for ``worker_id`` and lease it for ``lease_seconds``.

        The first job is the next claimable one in fair order (for one of ``models``, if
        given), unless its model is not ``loaded`` and it has waited less than
        ``max_model_wait``: then the next one for a loaded model goes first, so models are
        not swapped back and forth. Jobs with the first's batch key join it in fair order
        while their takes fit in ``max_rows``. Each claim counts an attempt.
        """
        now = time.time() if now is None else now
        async with self._transaction():
            head = await self._first_claimable(models)
            if head is None:
                return []
            first = head
            if (
                loaded
                and head["model"] not in loaded
                and now - head["submitted_at"] < max_model_wait
            ):
                wanted = [m for m in loaded if models is None or m in models]
                first = await self._first_claimable(wanted) or head
            chosen = [first, *await self._batch_for(first, max_rows - first["takes"])]
            ids = [row["id"] for row in chosen]
            marks = ", ".join("?" * len(ids))
            await self._db.execute(
                f"""UPDATE jobs SET status = 'running', attempts = attempts + 1,
                        started_at = ?, worker_id = ?, lease_expires_at = ?,
                        cancel_requested = 0, progress_done = NULL, progress_total = NULL
                    WHERE id IN ({marks}) AND status = 'queued'""",
                (now, worker_id, now + lease_seconds, *ids),
            )
            await self._db.execute(
                "UPDATE queue_clock SET virtual_time = MAX(virtual_time, ?)",
                (max(row["fair_tag"] for row in chosen),),
            )
            jobs = await self._jobs(f"WHERE id IN ({marks})", tuple(ids), with_audio=False)
        self._notify(Channel.JOBS)
        order = {job_id: index for index, job_id in enumerate(ids)}
        return sorted(jobs, key=lambda job: order[job.id])

    async def heartbeat(
        self, worker_id: str, job_ids: Sequence[int], lease_seconds: float, now: float | None = None
    ) -> set[int]:
        """Extend the leases of ``worker_id``'s running jobs among ``job_ids``; returns those
        it must stop: cancelled, or no longer its own (its lease ran out and the job moved)."""
        now = time.time() if now is None else now
        marks = ", ".join("?" * len(job_ids))
        async with self._transaction():
            await self._db.execute("UPDATE workers SET seen_at = ? WHERE id = ?", (now, worker_id))
            if not job_ids:
                return set()
            await self._db.execute(
                f"""UPDATE jobs SET lease_expires_at = ?
                    WHERE id IN ({marks}) AND status = 'running' AND worker_id = ?""",
                (now + lease_seconds, *job_ids, worker_id),
            )
            rows = await self._db.execute_fetchall(
                f"""SELECT id FROM jobs WHERE id IN ({marks}) AND status = 'running'
                    AND worker_id = ? AND cancel_requested = 0""",
                (*job_ids, worker_id),
            )
        return set(job_ids) - {row[0] for row in rows}

    async def requeue_expired(self, max_attempts: int, now: float | None = None) -> int:
        """Queue again every running job whose lease ran out before ``now`` (``math.inf``:
        every running job, which only the owner of an SQLite database may do at start-up),
        keeping its place; a job that used up ``max_attempts`` fails for good."""
        now = time.time() if now is None else now
        async with self._transaction():
            rows = await self._db.execute_fetchall(
                """SELECT id, attempts FROM jobs
                   WHERE status = 'running' AND lease_expires_at < ?""",
                (now,),
            )
            for job_id, attempts in rows:
                if attempts >= max_attempts:
                    await self._db.execute(
                        f"UPDATE jobs SET {ENDED}, status = 'failed', error = ?, "
                        "finished_at = ? WHERE id = ?",
                        (gave_up(attempts), time.time(), job_id),
                    )
                else:
                    await self._db.execute(
                        f"UPDATE jobs SET {ENDED}, status = 'queued', started_at = NULL "
                        "WHERE id = ?",
                        (job_id,),
                    )
        if rows:
            log.info("event=requeued-expired jobs=%s", ",".join(str(row[0]) for row in rows))
            self._notify(Channel.QUEUE)
            self._notify(Channel.JOBS)
        return len(rows)

    async def requeue(self, job: Job, *, count_attempt: bool = True) -> bool:
        """Put a job its worker is stopping back in the queue, in its place; False if the
        job is no longer the caller's (see :meth:`finish`)."""
        async with self._transaction():
            cursor = await self._db.execute(
                f"""UPDATE jobs SET {ENDED}, status = 'queued', started_at = NULL,
                        attempts = attempts - ? WHERE id = ? AND status = ? AND attempts = ?
                        AND worker_id IS ?""",
                (0 if count_attempt else 1, job.id, job.status.value, job.attempts, job.worker_id),
            )
        if cursor.rowcount != 1:
            return False
        job.status, job.worker_id = JobStatus.QUEUED, None
        if not count_attempt:
            job.attempts -= 1
        self._notify(Channel.QUEUE)
        return True

    async def finish(self, job: Job, status: JobStatus, error: str | None = None) -> bool:
        """Record how a job ended (the requester is told next: see :meth:`mark_delivered`).

        Fenced: it applies only while the job is in the store as ``job`` says (same status
        attempt and worker); False, and nothing changed, when it is not (its worker lost the
        lease, and the job was queued again or ran elsewhere)."""
        finished_at = time.time()
        async with self._transaction():
            cursor = await self._db.execute(
                f"""UPDATE jobs SET {ENDED}, status = ?, error = ?, finished_at = ?,
                        generation_seconds = ?
                    WHERE id = ? AND status = ? AND attempts = ? AND worker_id IS ?""",
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
        job.status, job.error, job.finished_at = status, error, finished_at
        job.worker_id = None
        self._notify(Channel.JOBS)
        return True

    async def request_cancel(self, job_id: int) -> JobStatus | None:
        async with self._transaction():
            cursor = await self._db.execute(
                """UPDATE jobs SET status = 'cancelled', finished_at = ?
                   WHERE id = ? AND status = 'queued'""",
                (time.time(), job_id),
            )
            if cursor.rowcount == 1:
                cancelled: JobStatus | None = JobStatus.CANCELLED
            else:
                cursor = await self._db.execute(
                    """UPDATE jobs SET cancel_requested = 1
                       WHERE id = ? AND status = 'running'""",
                    (job_id,),
                )
                cancelled = JobStatus.RUNNING if cursor.rowcount == 1 else None
        if cancelled is JobStatus.CANCELLED:
            self._notify(Channel.JOBS)
        elif cancelled is JobStatus.RUNNING:
            self._notify(Channel.CANCEL, str(job_id))
        return cancelled

    async def set_progress(self, job: Job, done: int, total: int) -> None:
        job.progress = (done, total)
        async with self._transaction():
            await self._db.execute(
                """UPDATE jobs SET progress_done = ?, progress_total = ?
                   WHERE id = ? AND status = 'running' AND attempts = ?""",
                (done, total, job.id, job.attempts),
            )
        self._notify(Channel.JOBS)

    async def running(self) -> list[Job]:
        return await self._jobs("WHERE status = 'running' ORDER BY id", (), with_audio=False)

    async def queued(self, guild_id: int) -> list[Job]:
        return await self._jobs(
            """WHERE guild_id = ? AND status = 'queued' AND released = 1
               ORDER BY fair_tag, id""",
            (guild_id,),
            with_audio=False,
        )

    async def position(self, job: Job) -> int | None:
        """1 + the claimable jobs ahead of ``job`` (counted through the queue's index); None
        if it is not queued, or its server is paused. A job not yet released counts as
        claimable."""
        rows = await self._db.execute_fetchall(
            """SELECT fair_tag FROM jobs WHERE id = ? AND status = 'queued'
               AND guild_id NOT IN (SELECT guild_id FROM paused_guilds)""",
            (job.id,),
        )
        if not rows:
            return None
        ((ahead,),) = await self._db.execute_fetchall(
            f"SELECT COUNT(*) FROM jobs WHERE {CLAIMABLE} AND (fair_tag, id) < (?, ?)",
            (rows[0][0], job.id),
        )
        return ahead + 1

    async def queue_length(self) -> int:
        """Queued jobs in every server (from the running counts: as many rows as servers)."""
        ((count,),) = await self._db.execute_fetchall(
            "SELECT COALESCE(SUM(jobs), 0) FROM job_counts WHERE status = 'queued'"
        )
        return count

    async def work_ahead(self, job: Job) -> list[WorkAhead]:
        """The claimable jobs ahead of ``job``, summed by batch key (one index range)."""
        rows = await self._db.execute_fetchall(
            f"""SELECT MIN(model), MIN(duration), SUM(takes) FROM jobs WHERE {CLAIMABLE}
                AND (fair_tag, id) < (SELECT fair_tag, id FROM jobs WHERE id = ?)
                GROUP BY batch_key""",
            (job.id,),
        )
        return [WorkAhead(*row) for row in rows]

    async def queue_order(self) -> list[QueueEntry]:
        """Every claimable job in queue order (one index range), turned into entries a chunk
        at a time so that a long queue never holds the event loop."""
        rows = await self._db.execute_fetchall(
            f"""SELECT id, guild_id, model, duration, takes, batch_key FROM jobs
                WHERE {CLAIMABLE} ORDER BY fair_tag, id"""
        )
        entries: list[QueueEntry] = []
        for start in range(0, len(rows), ENTRY_CHUNK):
            entries += [QueueEntry(*row) for row in rows[start : start + ENTRY_CHUNK]]
            await asyncio.sleep(0)
        return entries

    # Workers

    async def register_worker(self, info: WorkerInfo) -> None:
        async with self._transaction():
            await self._db.execute(
                """INSERT INTO workers VALUES (?, ?, ?, ?, ?, ?, ?, ?)
                   ON CONFLICT (id) DO UPDATE SET seen_at = excluded.seen_at""",
                (
                    info.id,
                    info.host,
                    info.device,
                    json.dumps(info.models),
                    json.dumps(info.loaded),
                    json.dumps(info.jobs),
                    info.started_at,
                    info.seen_at,
                ),
            )

    async def update_worker(
        self, worker_id: str, loaded: Sequence[str], jobs: Sequence[int]
    ) -> None:
        async with self._transaction():
            await self._db.execute(
                "UPDATE workers SET loaded = ?, jobs = ?, seen_at = ? WHERE id = ?",
                (json.dumps(list(loaded)), json.dumps(list(jobs)), time.time(), worker_id),
            )

    async def forget_worker(self, worker_id: str) -> None:
        async with self._transaction():
            await self._db.execute("DELETE FROM workers WHERE id = ?", (worker_id,))

    async def workers(self, seen_since: float) -> list[WorkerInfo]:
        rows = await self._db.execute_fetchall(
            "SELECT * FROM workers WHERE seen_at >= ? ORDER BY started_at", (seen_since,)
        )
        return [
            WorkerInfo(
                id=row["id"],
                host=row["host"],
                device=row["device"],
                models=tuple(json.loads(row["models"])),
                loaded=tuple(json.loads(row["loaded"])),
                jobs=tuple(json.loads(row["jobs"])),
                started_at=row["started_at"],
                seen_at=row["seen_at"],
            )
            for row in rows
        ]

    # Notifications

    def subscribe(self, channel: Channel, listener: Listener) -> None:
        """Call ``listener`` after each commit that notifies ``channel`` (in this process:
        one process owns an SQLite database)."""
        self._listeners.setdefault(channel, []).append(listener)

    def _notify(self, channel: Channel, payload: str = "") -> None:
        loop = asyncio.get_running_loop()
        for listener in self._listeners.get(channel, ()):
            loop.call_soon(listener, payload)

    async def _next_tag(self, guild_id: int) -> float:
        """The fair tag of a job the server queues now (start-time fair queuing): its start,
        the later of the virtual time (the tag last claimed) and the end of the server's
        previous job, each job costing 1. A server that was idle starts at the virtual time,
        so it goes before the next job of a server that queued many."""
        ((tag,),) = await self._db.execute_fetchall(
            """SELECT MAX((SELECT virtual_time FROM queue_clock),
                   COALESCE((SELECT last_tag FROM guild_tags WHERE guild_id = ?), 0))""",
            (guild_id,),
        )
        await self._db.execute(
            """INSERT INTO guild_tags VALUES (?, ?)
               ON CONFLICT (guild_id) DO UPDATE SET last_tag = excluded.last_tag""",
            (guild_id, tag + 1),
        )
        return tag

    async def _batch_for(self, first: aiosqlite.Row, room: int) -> list[aiosqlite.Row]:
        """The claimable jobs that join ``first``'s batch: its batch key, in fair order, each
        the next one whose takes fit the ``room`` left (at most ``room`` index seeks)."""
        joining: list[aiosqlite.Row] = []
        after = (first["fair_tag"], first["id"])
        while room > 0:
            rows = await self._db.execute_fetchall(
                f"""{CLAIMABLE_HEADS} AND batch_key = ? AND takes <= ? AND id != ?
                    AND (fair_tag, id) > (?, ?) ORDER BY fair_tag, id LIMIT 1""",
                (first["batch_key"], room, first["id"], *after),
            )
            if not rows:
                break
            joining.append(rows[0])
            room -= rows[0]["takes"]
            after = (rows[0]["fair_tag"], rows[0]["id"])
        return joining

    async def _first_claimable(self, models: Sequence[str] | None) -> aiosqlite.Row | None:
        if models is None:
            rows = await self._db.execute_fetchall(
                f"{CLAIMABLE_HEADS} ORDER BY fair_tag, id LIMIT 1"
            )
        else:
            marks = ", ".join("?" * len(models))
            rows = await self._db.execute_fetchall(
                f"{CLAIMABLE_HEADS} AND model IN ({marks}) ORDER BY fair_tag, id LIMIT 1",
                tuple(models),
            )
        return rows[0] if rows else None

    async def mark_delivered(self, job: Job, result_url: str | None = None) -> None:
        """Record that the requester was told; their interaction token is forgotten."""
        job.delivered, job.result_url = True, result_url
        if job.reply is not None:
            job.reply = replace(job.reply, token=None)
        async with self._transaction():
            await self._db.execute(
                "UPDATE jobs SET delivered = 1, result_url = ?, reply_token = NULL WHERE id = ?",
                (result_url, job.id),
            )

    async def clear_expired_tokens(self, now: float | None = None) -> int:
        """Forget the interaction tokens that expired; returns how many."""
        async with self._transaction():
            cursor = await self._db.execute(
                """UPDATE jobs SET reply_token = NULL
                   WHERE reply_token IS NOT NULL AND reply_expires_at <= ?""",
                (time.time() if now is None else now,),
            )
        return cursor.rowcount

    async def count_failed_delivery(self, job: Job) -> None:
        """Count a try at delivering ``job``'s outcome that failed."""
        async with self._transaction():
            await self._db.execute(
                "UPDATE jobs SET delivery_attempts = delivery_attempts + 1 WHERE id = ?",
                (job.id,),
            )
        job.delivery_attempts += 1

    async def keep_undelivered(self, job: Job, reason: str) -> None:
        """Stop trying to deliver ``job``'s outcome: it stays for the member's history (and
        its interaction token is forgotten)."""
        job.delivery_failure, job.reply = reason, None
        async with self._transaction():
            await self._db.execute(
                "UPDATE jobs SET delivery_failure = ?, reply_token = NULL WHERE id = ?",
                (reason, job.id),
            )

    async def get(self, job_id: int) -> Job | None:
        rows = await self._jobs("WHERE id = ?", (job_id,))
        return rows[0] if rows else None

    async def waiting_with_reply(self, now: float) -> list[Job]:
        """Queued jobs whose requester can still be reached through their interaction
        (token valid at ``now``), without audio: their status messages show their place."""
        return await self._jobs(
            """WHERE status = 'queued' AND reply_token IS NOT NULL AND reply_expires_at > ?
               ORDER BY id""",
            (now,),
            with_audio=False,
        )

    async def undelivered(self, limit: int = UNDELIVERED_AT_ONCE) -> list[Job]:
        """The oldest ``limit`` jobs that ended without their requester being told, and are
        still to be (without their uploads: an outcome is delivered from the job and its
        stored tracks)."""
        return await self._jobs(
            """WHERE status IN ('done', 'failed', 'cancelled') AND delivered = 0
               AND delivery_failure IS NULL ORDER BY id LIMIT ?""",
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
        rows = await self._db.execute_fetchall(
            """SELECT job_uploads.option, uploads.exponent, uploads.flac
               FROM job_uploads LEFT JOIN uploads ON uploads.hash = job_uploads.hash
               WHERE job_uploads.job_id = ?""",
            (job.id,),
        )
        if any(flac is None for _, _, flac in rows):
            job.uploads_expired_at = job.uploads_expired_at or time.time()
            raise Expired.uploads(job)
        clips = {}
        for option, exponent, flac in rows:
            try:
                clips[option] = await asyncio.to_thread(decoded, flac, exponent)
            except soundfile.SoundFileError as error:
                log.warning("job=%d event=upload-damaged option=%s error=%s", job.id, option, error)
                raise DamagedUpload(job.id, option) from error
        job.request = replace(job.request, **clips)
        job.uploads_in_store = False

    async def history(self, guild_id: int, user_id: int, limit: int = 10) -> list[Job]:
        """A member's most recent jobs in a server, newest first."""
        return await self._jobs(
            "WHERE guild_id = ? AND user_id = ? ORDER BY id DESC LIMIT ?",
            (guild_id, user_id, limit),
            with_audio=False,
        )

    async def finished_jobs(
        self, guild_id: int, user_id: int | None = None, limit: int = 25
    ) -> list[Job]:
        """The most recent finished (done) jobs in a server, a member's only if ``user_id``
        is given; newest first, read through an index and without their audio."""
        member = "AND user_id = ?" if user_id is not None else ""
        parameters = (guild_id,) if user_id is None else (guild_id, user_id)
        return await self._jobs(
            f"WHERE guild_id = ? {member} AND status = 'done' ORDER BY id DESC LIMIT ?",
            (*parameters, limit),
            with_audio=False,
        )

    async def takes_since(
        self, guild_id: int, user_id: int, since: float
    ) -> list[tuple[float, int]]:
        """When a member submitted each job in a server since ``since``, and its takes
        (oldest first): the jobs that count against the hourly limit, those that made or
        will make tracks, or ran before they were cancelled. A failed job, or one cancelled
        before it started, cost the member nothing."""
        rows = await self._db.execute_fetchall(
            """SELECT submitted_at, takes FROM jobs WHERE guild_id = ? AND user_id = ?
               AND submitted_at >= ? AND status != 'failed'
               AND NOT (status = 'cancelled' AND started_at IS NULL)
               ORDER BY submitted_at""",
            (guild_id, user_id, since),
        )
        return [(row[0], row[1]) for row in rows]

    async def stats(self, guild_id: int) -> Stats:
        """A server's finished jobs counted (all those kept), and the medians of its last
        :data:`MEDIAN_OF` finished jobs: two reads through indexes, whatever its history."""
        counts = dict(await self._db.execute_fetchall(STATS_COUNTS, (guild_id,)))
        rows = await self._db.execute_fetchall(STATS_RECENT, (guild_id, MEDIAN_OF))
        waits = [row[0] for row in rows if row[0] is not None]
        times = [row[1] for row in rows if row[1] is not None]
        return Stats(
            served=counts.get(JobStatus.DONE.value, 0),
            failed=counts.get(JobStatus.FAILED.value, 0),
            cancelled=counts.get(JobStatus.CANCELLED.value, 0),
            median_wait_seconds=statistics.median(waits) if waits else None,
            median_generation_seconds=statistics.median(times) if times else None,
            median_of=MEDIAN_OF,
        )

    # Results

    def result_path(self, job: Job, take: int = 0) -> Path:
        return self.result_file(job.id, take)

    async def save_result(
        self, job: Job, audio: np.ndarray, sample_rate: int, take: int = 0
    ) -> Path:
        """Keep one take of a job's (normalised) audio, losslessly, for delivery and reuse."""
        path = self.result_path(job, take)
        await asyncio.to_thread(_write_flac, path, audio, sample_rate)
        return path

    async def load_result(self, job: Job, take: int = 0) -> tuple[np.ndarray, int]:
        """One take of a job's audio (``[channels, samples]``) and its sample rate.

        Raises:
            Expired: the retention policy deleted it.
            ResultMissing: the file is gone otherwise.
            DamagedResult: the file is there but cannot be read.
        """
        if job.result_expired_at is not None:
            raise Expired.track(job)
        path = self.result_path(job, take)
        if not path.exists():
            raise ResultMissing(job.id)
        try:
            audio, sample_rate = await asyncio.to_thread(
                soundfile.read, path, dtype="float32", always_2d=True
            )
        except soundfile.SoundFileError as error:
            log.warning("job=%d event=result-damaged path=%s error=%s", job.id, path, error)
            raise DamagedResult(job.id) from error
        return np.ascontiguousarray(audio.T), sample_rate

    # Retention

    async def prune(self, retention: Retention, now: float | None = None) -> Pruned:
        """Delete what ``retention`` no longer keeps, and expired interaction tokens.

        A job whose result or uploads were deleted keeps its row (history, and the date for
        :class:`Expired`); a job past ``jobs_days`` goes with its files, and a relay jam goes
        once all its turns have. Files are deleted on a worker thread. Workers not heard from
        for a day (killed, never stopped cleanly) are forgotten.
        """
        now = time.time() if now is None else now
        tokens = await self.clear_expired_tokens(now)
        async with self._transaction():
            await self._db.execute(FORGET_SILENT_WORKERS, (now - DAY,))
        results = jobs = 0
        if retention.jobs_days:
            jobs = await self._delete_jobs(now - retention.jobs_days * DAY)
        if retention.results_days:
            results = await self._expire_results(now - retention.results_days * DAY, now)
        if retention.uploads_days:
            async with self._transaction():
                await self._db.execute(
                    f"""UPDATE jobs SET uploads_expired_at = ?
                        WHERE {_SETTLED} AND finished_at < ? AND uploads_expired_at IS NULL
                        AND id IN (SELECT job_id FROM job_uploads)""",
                    (now, now - retention.uploads_days * DAY),
                )
        async with self._transaction():
            cursor = await self._db.execute(
                """DELETE FROM uploads WHERE hash NOT IN (
                       SELECT job_uploads.hash FROM job_uploads
                       JOIN jobs ON jobs.id = job_uploads.job_id
                       WHERE jobs.uploads_expired_at IS NULL)"""
            )
        return Pruned(results=results, uploads=cursor.rowcount, jobs=jobs, tokens=tokens)

    async def _expire_results(self, cutoff: float, now: float) -> int:
        rows = await self._db.execute_fetchall(
            f"""SELECT id, takes FROM jobs WHERE {_SETTLED} AND status = 'done'
                AND finished_at < ? AND result_expired_at IS NULL""",
            (cutoff,),
        )
        await asyncio.to_thread(self._delete_result_files, rows)
        async with self._transaction():
            await self._db.executemany(
                "UPDATE jobs SET result_expired_at = ? WHERE id = ?",
                [(now, job_id) for job_id, _ in rows],
            )
        return len(rows)

    async def _delete_jobs(self, cutoff: float) -> int:
        """Delete the settled jobs that finished before ``cutoff``, and the jams all of whose
        turns did."""
        async with self._transaction():
            await self._db.execute(
                f"""DELETE FROM jams WHERE created_at < :cutoff AND NOT EXISTS (
                        SELECT 1 FROM jam_segments JOIN jobs ON jobs.id = jam_segments.job_id
                        WHERE jam_segments.thread_id = jams.thread_id
                        AND NOT ({_SETTLED} AND finished_at < :cutoff))""",
                {"cutoff": cutoff},
            )
        rows = await self._db.execute_fetchall(
            f"""SELECT id, takes FROM jobs WHERE {_SETTLED} AND finished_at < ?
                AND id NOT IN (SELECT job_id FROM jam_segments)""",
            (cutoff,),
        )
        await asyncio.to_thread(self._delete_result_files, rows)
        async with self._transaction():
            await self._db.executemany(
                "DELETE FROM jobs WHERE id = ?", [(job_id,) for job_id, _ in rows]
            )
        return len(rows)

    def _delete_result_files(self, jobs: Iterable[tuple[int, int]]) -> None:
        """Delete the result files of ``(job id, takes)`` (blocking: run it in a thread)."""
        for job_id, takes in jobs:
            for take in range(takes):
                self.result_file(job_id, take).unlink(missing_ok=True)

    def result_file(self, job_id: int, take: int) -> Path:
        return self.results / (f"{job_id}.flac" if take == 0 else f"{job_id}-{take}.flac")

    # Server settings

    async def guild_settings(self, guild_id: int) -> GuildSettings:
        rows = await self._db.execute_fetchall(
            "SELECT settings FROM guild_settings WHERE guild_id = ?", (guild_id,)
        )
        if not rows:
            return GuildSettings(guild_id)
        values = json.loads(rows[0][0])
        known = {f.name for f in fields(GuildSettings)}
        values = {key: value for key, value in values.items() if key in known}
        for key in ("allowed_models", "allowed_channels"):
            values[key] = tuple(values.get(key, ()))
        return GuildSettings(guild_id=guild_id, **values)

    async def save_guild_settings(self, settings: GuildSettings) -> None:
        """Keep a server's settings; pausing or resuming its queue takes effect at the next
        claim, in every process."""
        values = asdict(settings)
        del values["guild_id"]
        async with self._transaction():
            await self._db.execute(
                """INSERT INTO guild_settings VALUES (?, ?)
                   ON CONFLICT (guild_id) DO UPDATE SET settings = excluded.settings""",
                (settings.guild_id, json.dumps(values)),
            )
            if settings.paused:
                await self._db.execute(
                    "INSERT OR IGNORE INTO paused_guilds VALUES (?)", (settings.guild_id,)
                )
            else:
                await self._db.execute(
                    "DELETE FROM paused_guilds WHERE guild_id = ?", (settings.guild_id,)
                )
        if not settings.paused:
            self._notify(Channel.QUEUE)

    async def paused_guilds(self) -> list[int]:
        rows = await self._db.execute_fetchall("SELECT guild_id FROM paused_guilds")
        return [row[0] for row in rows]

    # Generation rates

    async def generation_rates(self, device: str) -> dict[tuple[str, int], float]:
        """Seconds of work per second of audio learnt on ``device``, by (model, batch size)."""
        rows = await self._db.execute_fetchall(
            "SELECT model, rows, seconds_per_second FROM generation_rates WHERE device = ?",
            (device,),
        )
        return {(model, batch): rate for model, batch, rate in rows}

    async def save_generation_rate(self, device: str, model: str, rows: int, rate: float) -> None:
        async with self._transaction():
            await self._db.execute(
                """INSERT INTO generation_rates VALUES (?, ?, ?, ?, ?)
                   ON CONFLICT (device, model, rows) DO UPDATE SET
                       seconds_per_second = excluded.seconds_per_second,
                       updated_at = excluded.updated_at""",
                (device, model, rows, rate, time.time()),
            )

    # Relay jams

    async def add_jam(self, jam: Jam) -> None:
        async with self._transaction():
            await self._db.execute(
                "INSERT INTO jams VALUES (?, ?, ?, ?, ?, ?, ?)",
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
        rows = await self._db.execute_fetchall(
            """SELECT thread_id, guild_id, channel_id, user_id, title, timeline_message_id
               FROM jams WHERE thread_id = ?""",
            (thread_id,),
        )
        return Jam(*rows[0]) if rows else None

    async def jams_started_by(self, guild_id: int, user_id: int) -> list[int]:
        """The threads of the jams a member started in a server."""
        rows = await self._db.execute_fetchall(
            "SELECT thread_id FROM jams WHERE guild_id = ? AND user_id = ?", (guild_id, user_id)
        )
        return [row[0] for row in rows]

    async def jam_of_job(self, job_id: int) -> Jam | None:
        """The jam that ``job_id`` is a turn of, if any."""
        rows = await self._db.execute_fetchall(
            "SELECT thread_id FROM jam_segments WHERE job_id = ?", (job_id,)
        )
        return await self.jam(rows[0][0]) if rows else None

    async def turn_of_job(self, job_id: int) -> tuple[int, int] | None:
        """The jam (its thread) and the turn that ``job_id`` is, if it is a jam's turn."""
        rows = await self._db.execute_fetchall(
            "SELECT thread_id, position FROM jam_segments WHERE job_id = ?", (job_id,)
        )
        return (rows[0][0], rows[0][1]) if rows else None

    async def replace_segment(self, jam: Jam, position: int, job: Job) -> Segment:
        """Make ``job`` (another take of it) the jam's turn ``position``."""
        segment = Segment(position, job.id, job.user_id)
        async with self._transaction():
            await self._db.execute(
                """UPDATE jam_segments SET job_id = ?, user_id = ?
                   WHERE thread_id = ? AND position = ?""",
                (job.id, job.user_id, jam.thread_id, position),
            )
        return segment

    async def add_segment(self, jam: Jam, job: Job) -> Segment:
        """Make ``job`` the jam's next turn."""
        async with self._transaction():
            rows = await self._db.execute_fetchall(
                "SELECT COUNT(*) FROM jam_segments WHERE thread_id = ?", (jam.thread_id,)
            )
            segment = Segment(rows[0][0] + 1, job.id, job.user_id)
            await self._db.execute(
                "INSERT INTO jam_segments VALUES (?, ?, ?, ?)",
                (jam.thread_id, segment.position, segment.job_id, segment.user_id),
            )
        return segment

    async def segments(self, thread_id: int) -> list[Segment]:
        """A jam's turns, in order."""
        rows = await self._db.execute_fetchall(
            """SELECT position, job_id, user_id FROM jam_segments WHERE thread_id = ?
               ORDER BY position""",
            (thread_id,),
        )
        return [Segment(*row) for row in rows]

    async def turns(self, thread_id: int) -> list[Turn]:
        """A jam's turns in order, read in one query, without decoding any audio."""
        rows = await self._db.execute_fetchall(
            """SELECT jobs.*, jam_segments.position, jam_segments.user_id AS player,
                   CASE WHEN job_uploads.job_id IS NULL THEN 0.0 ELSE job_uploads.seconds END
                       AS intro_seconds
               FROM jam_segments JOIN jobs ON jobs.id = jam_segments.job_id
               LEFT JOIN job_uploads ON job_uploads.job_id = jobs.id
                   AND job_uploads.option = 'continuation'
               WHERE jam_segments.thread_id = ? ORDER BY jam_segments.position""",
            (thread_id,),
        )
        return [
            Turn(
                Segment(row["position"], row["id"], row["player"]),
                job_from_row(row),
                row["intro_seconds"],
            )
            for row in rows
        ]

    # Internals

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db, self._writing)

    async def _jobs(self, where: str, parameters: tuple, *, with_audio: bool = True) -> list[Job]:
        """The jobs ``where`` selects; ``with_audio=False`` leaves their clips in the store
        (marking the jobs that have some)."""
        rows = await self._db.execute_fetchall(
            f"""SELECT *, (SELECT json_group_object(option, json_array(seconds, hash))
                    FROM job_uploads WHERE job_uploads.job_id = jobs.id) AS clips
                FROM jobs {where}""",
            parameters,
        )
        jobs = [job_from_row(row) for row in rows]
        for job, row in zip(jobs, rows, strict=True):
            job.clips = clip_records(json.loads(row["clips"]))
            if with_audio:
                job.request = await self._with_uploads(job.id, job.request)
            else:
                job.uploads_in_store = bool(job.clips)
        return jobs

    async def _with_uploads(self, job_id: int, request: GenerationRequest) -> GenerationRequest:
        rows = await self._db.execute_fetchall(
            """SELECT job_uploads.option, uploads.exponent, uploads.flac
               FROM job_uploads JOIN uploads ON uploads.hash = job_uploads.hash
               WHERE job_uploads.job_id = ?""",
            (job_id,),
        )
        clips = {}
        for option, exponent, flac in rows:
            clips[option] = await asyncio.to_thread(decoded, flac, exponent)
        return replace(request, **clips) if clips else request


class _Transaction:
    """``async with``: commit on success, roll back on error; one at a time."""

    def __init__(self, db: aiosqlite.Connection, lock: asyncio.Lock) -> None:
        self._db = db
        self._lock = lock

    async def __aenter__(self) -> None:
        await self._lock.acquire()
        try:
            await self._db.execute("BEGIN IMMEDIATE")
        except BaseException:
            self._lock.release()
            raise

    async def __aexit__(self, kind: object, error: object, traceback: object) -> None:
        try:
            await self._db.execute("COMMIT" if error is None else "ROLLBACK")
        finally:
            self._lock.release()


async def _own(path: Path) -> Ownership:
    try:
        return await asyncio.to_thread(Ownership.take, path)
    except InUse as error:
        raise StoreError(
            f"The database {path} is in use by another musicgen-bot process: stop it first "
            "(one bot owns a database; two would run and deliver the same jobs twice)."
        ) from error
    except OSError as error:
        raise StoreError(f"Cannot lock the database {path} ({error}).") from error


async def _check_readable(path: Path) -> None:
    """Read the file without writing to it; refuse it with a clear error if it is damaged."""
    try:
        async with aiosqlite.connect(f"file:{path}?mode=ro", uri=True) as connection:
            rows = await connection.execute_fetchall("PRAGMA quick_check")
            result = rows[0] if rows else None
    except sqlite3.DatabaseError as error:
        raise StoreError(_unreadable(path, str(error))) from error
    if result is None or result[0] != "ok":
        raise StoreError(_unreadable(path, result[0] if result else "no answer"))


def _unreadable(path: Path, detail: str) -> str:
    return (
        f"The database {path} cannot be read ({detail}). It was left as it is: restore a "
        "backup, or move it away to start with an empty one."
    )


async def _migrate(connection: aiosqlite.Connection, path: Path) -> None:
    ((version,),) = await connection.execute_fetchall("PRAGMA user_version")
    if version > len(MIGRATIONS):
        raise StoreError(
            f"The database {path} has schema version {version}, newer than this bot knows "
            f"({len(MIGRATIONS)}): upgrade the bot."
        )
    for target, migration in enumerate(MIGRATIONS[version:], start=version + 1):
        if isinstance(migration, str):
            await connection.executescript(
                f"BEGIN IMMEDIATE; {migration}; PRAGMA user_version = {target}; COMMIT;"
            )
            continue
        await connection.execute("BEGIN IMMEDIATE")
        try:
            await migration(connection)
            await connection.execute(f"PRAGMA user_version = {target}")
        except BaseException:
            await connection.execute("ROLLBACK")
            raise
        await connection.execute("COMMIT")


async def _keep_upload(
    db: aiosqlite.Connection, job_id: int, option: str, stored: StoredClip, digest: str
) -> None:
    """Make ``stored`` the job's ``option`` clip (see :func:`_keep_flac`)."""
    await _keep_flac(db, stored, digest)
    await db.execute(
        "INSERT INTO job_uploads (job_id, option, hash, seconds) VALUES (?, ?, ?, ?)",
        (job_id, option, digest, stored.seconds),
    )


async def _keep_flac(db: aiosqlite.Connection, stored: StoredClip, digest: str) -> None:
    """Store ``stored``'s FLAC unless already there (in the caller's transaction, so a
    prune cannot delete it before a job refers to it)."""
    known = await db.execute_fetchall("SELECT 1 FROM uploads WHERE hash = ?", (digest,))
    if not known:
        flac = await asyncio.to_thread(stored.flac)
        await db.execute(
            "INSERT INTO uploads (hash, exponent, flac) VALUES (?, ?, ?)",
            (digest, stored.exponent, flac),
        )


def _write_flac(path: Path, audio: np.ndarray, sample_rate: int) -> None:
    """Write a result whole or not at all, into its folder (made again if it was deleted)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    soundfile.write(partial, audio.T, sample_rate, format="FLAC", subtype="PCM_24")
    partial.replace(path)  # a crash never leaves half a result under the real name


def _reply_values(reply: ReplyAddress) -> tuple:
    return (
        reply.application_id,
        reply.token,
        reply.expires_at,
        reply.message_id,
        reply.max_upload_bytes,
    )


def _key(request: GenerationRequest) -> str:
    """A request's :func:`generation.request.batch_key` as the store keeps it."""
    return json.dumps(batch_key(request), default=list)


def _key_of_job(job_id: int) -> str:
    """The batch key of a job whose clips are not at hand: it runs alone."""
    return json.dumps(["job", job_id])
