"""Durable jobs, results and server settings in one SQLite file (aiosqlite).

One connection does all the writing; WAL lets readers in while it does. The schema carries its
version in ``PRAGMA user_version`` and is migrated forward at start-up. Uploaded audio is kept
in the database with its job; results are FLAC files in a folder beside it, which the store
owns.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import statistics
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import aiosqlite
import numpy as np
import soundfile

from .errors import GenerationError
from .queue import Job, JobStatus, ReplyAddress
from .request import AudioClip, GenerationRequest

#: Each entry migrates the schema from version i to i + 1.
MIGRATIONS: tuple[str, ...] = (
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
    # Deliveries tried and failed; why an outcome is kept for /music history undelivered.
    """
    ALTER TABLE jobs ADD COLUMN delivery_attempts INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE jobs ADD COLUMN delivery_failure TEXT;
    """,
)

_AUDIO_OPTIONS = ("melody", "continuation")
_FINISHED = (JobStatus.DONE, JobStatus.FAILED, JobStatus.CANCELLED)


class StoreError(GenerationError):
    """The database cannot be opened or used; the message says what to do."""


@dataclass(frozen=True)
class GuildSettings:
    """A server's own settings; None (or empty) means "as the bot's configuration says"."""

    guild_id: int
    default_model: str | None = None
    allowed_models: tuple[str, ...] = ()
    max_duration: float | None = None
    max_jobs_per_user: int | None = None
    allowed_channels: tuple[int, ...] = ()
    paused: bool = False


@dataclass(frozen=True)
class Jam:
    """A relay jam: a thread where members take turns carrying one track on."""

    thread_id: int
    guild_id: int
    channel_id: int
    user_id: int
    title: str
    timeline_message_id: int | None = None


@dataclass(frozen=True)
class Segment:
    """One turn of a jam: the job that carried the track on, and who asked for it."""

    position: int
    job_id: int
    user_id: int


@dataclass(frozen=True)
class Stats:
    served: int
    failed: int
    cancelled: int
    median_wait_seconds: float | None
    median_generation_seconds: float | None


class JobStore:
    """The bot's database. Open with :meth:`open`, close with :meth:`close`."""

    def __init__(self, connection: aiosqlite.Connection, path: Path) -> None:
        self._db = connection
        self._writing = asyncio.Lock()  # one transaction at a time on the one connection
        self.path = path
        self.results = path.parent / f"{path.stem}-results"

    @classmethod
    async def open(cls, path: str | Path) -> JobStore:
        """Open (or create) the database at ``path`` and bring its schema up to date.

        Raises:
            StoreError: the file is not a readable SQLite database (it is left untouched), or
                it was written by a newer version of the bot.
        """
        path = Path(path)
        if path.exists():
            await _check_readable(path)
        path.parent.mkdir(parents=True, exist_ok=True)
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
        store = cls(connection, path)
        store.results.mkdir(exist_ok=True)
        return store

    async def close(self) -> None:
        await self._db.close()

    # Jobs

    async def add(self, job: Job) -> Job:
        """Record a new job (with its uploaded audio) and give it its id."""
        async with self._transaction():
            cursor = await self._db.execute(
                """INSERT INTO jobs (guild_id, channel_id, user_id, request, takes, status,
                       reply_application_id, reply_token, reply_expires_at, submitted_at)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                (
                    job.guild_id,
                    job.channel_id,
                    job.user_id,
                    _request_json(job.request),
                    job.takes,
                    job.status.value,
                    job.reply.application_id if job.reply else None,
                    job.reply.token if job.reply else None,
                    job.reply.expires_at if job.reply else None,
                    job.submitted_at,
                ),
            )
            job.id = cursor.lastrowid
            for option in _AUDIO_OPTIONS:
                clip: AudioClip | None = getattr(job.request, option)
                if clip is not None:
                    await self._db.execute(
                        "INSERT INTO uploads VALUES (?, ?, ?, ?, ?)",
                        (
                            job.id,
                            option,
                            clip.sample_rate,
                            clip.channels,
                            clip.samples.astype("<f4").tobytes(),
                        ),
                    )
        return job

    async def set_reply(self, job: Job, reply: ReplyAddress) -> None:
        """Record where the requester waits for the answer."""
        job.reply = reply
        async with self._transaction():
            await self._db.execute(
                """UPDATE jobs SET reply_application_id = ?, reply_token = ?,
                       reply_expires_at = ?, reply_message_id = ?, reply_max_upload_bytes = ?
                   WHERE id = ?""",
                (
                    reply.application_id,
                    reply.token,
                    reply.expires_at,
                    reply.message_id,
                    reply.max_upload_bytes,
                    job.id,
                ),
            )

    async def claim(self, job: Job) -> bool:
        """Mark a queued job running, counting the attempt; False if it was not queued."""
        async with self._transaction():
            cursor = await self._db.execute(
                """UPDATE jobs SET status = 'running', attempts = attempts + 1, started_at = ?
                   WHERE id = ? AND status = 'queued'""",
                (time.time(), job.id),
            )
        if cursor.rowcount != 1:
            return False
        job.status, job.attempts = JobStatus.RUNNING, job.attempts + 1
        return True

    async def requeue(self, job: Job, *, count_attempt: bool = True) -> None:
        """Put a job that was running back in the queue (to run again)."""
        async with self._transaction():
            await self._db.execute(
                """UPDATE jobs SET status = 'queued', started_at = NULL,
                       attempts = attempts - ? WHERE id = ?""",
                (0 if count_attempt else 1, job.id),
            )
        job.status = JobStatus.QUEUED
        if not count_attempt:
            job.attempts -= 1

    async def finish(self, job: Job, status: JobStatus, error: str | None = None) -> None:
        """Record how a job ended (the requester is told next: see :meth:`mark_delivered`)."""
        job.status, job.error, job.finished_at = status, error, time.time()
        async with self._transaction():
            await self._db.execute(
                """UPDATE jobs SET status = ?, error = ?, finished_at = ?,
                       generation_seconds = ? WHERE id = ?""",
                (status.value, error, job.finished_at, job.generation_seconds, job.id),
            )

    async def mark_delivered(self, job: Job, result_url: str | None = None) -> None:
        job.delivered, job.result_url = True, result_url
        async with self._transaction():
            await self._db.execute(
                "UPDATE jobs SET delivered = 1, result_url = ? WHERE id = ?",
                (result_url, job.id),
            )

    async def count_failed_delivery(self, job: Job) -> None:
        """Count a try at delivering ``job``'s outcome that failed."""
        async with self._transaction():
            await self._db.execute(
                "UPDATE jobs SET delivery_attempts = delivery_attempts + 1 WHERE id = ?",
                (job.id,),
            )
        job.delivery_attempts += 1

    async def keep_undelivered(self, job: Job, reason: str) -> None:
        """Stop trying to deliver ``job``'s outcome: it stays for the member's history."""
        job.delivery_failure = reason
        async with self._transaction():
            await self._db.execute(
                "UPDATE jobs SET delivery_failure = ? WHERE id = ?", (reason, job.id)
            )

    async def get(self, job_id: int) -> Job | None:
        rows = await self._jobs("WHERE id = ?", (job_id,))
        return rows[0] if rows else None

    async def pending(self) -> list[Job]:
        """Queued and running jobs, oldest first: the work to resume after a restart."""
        return await self._jobs("WHERE status IN ('queued', 'running') ORDER BY id", ())

    async def undelivered(self) -> list[Job]:
        """Jobs that ended without their requester being told, and are still to be."""
        return await self._jobs(
            """WHERE status IN ('done', 'failed', 'cancelled') AND delivered = 0
               AND delivery_failure IS NULL ORDER BY id""",
            (),
        )

    async def history(self, guild_id: int, user_id: int, limit: int = 10) -> list[Job]:
        """A member's most recent jobs in a server, newest first."""
        return await self._jobs(
            "WHERE guild_id = ? AND user_id = ? ORDER BY id DESC LIMIT ?",
            (guild_id, user_id, limit),
            with_audio=False,
        )

    async def submitted_since(self, guild_id: int, user_id: int, since: float) -> list[float]:
        """When a member submitted each job in a server since ``since`` (oldest first)."""
        rows = await self._db.execute_fetchall(
            """SELECT submitted_at FROM jobs WHERE guild_id = ? AND user_id = ?
               AND submitted_at >= ? ORDER BY submitted_at""",
            (guild_id, user_id, since),
        )
        return [row[0] for row in rows]

    async def stats(self, guild_id: int) -> Stats:
        rows = await self._db.execute_fetchall(
            """SELECT status, started_at - submitted_at, generation_seconds FROM jobs
               WHERE guild_id = ? AND status IN ('done', 'failed', 'cancelled')""",
            (guild_id,),
        )
        counts = {status: sum(row[0] == status for row in rows) for status in _FINISHED}
        waits = [row[1] for row in rows if row[1] is not None]
        times = [row[2] for row in rows if row[2] is not None]
        return Stats(
            served=counts[JobStatus.DONE],
            failed=counts[JobStatus.FAILED],
            cancelled=counts[JobStatus.CANCELLED],
            median_wait_seconds=statistics.median(waits) if waits else None,
            median_generation_seconds=statistics.median(times) if times else None,
        )

    # Results

    def result_path(self, job: Job, take: int = 0) -> Path:
        return self.results / (f"{job.id}.flac" if take == 0 else f"{job.id}-{take}.flac")

    async def save_result(
        self, job: Job, audio: np.ndarray, sample_rate: int, take: int = 0
    ) -> Path:
        """Keep one take of a job's (normalised) audio, losslessly, for delivery and reuse."""
        path = self.result_path(job, take)
        await asyncio.to_thread(_write_flac, path, audio, sample_rate)
        return path

    async def load_result(self, job: Job, take: int = 0) -> tuple[np.ndarray, int] | None:
        """One take of a job's audio (``[channels, samples]``) and its sample rate."""
        path = self.result_path(job, take)
        if not path.exists():
            return None
        audio, sample_rate = await asyncio.to_thread(
            soundfile.read, path, dtype="float32", always_2d=True
        )
        return np.ascontiguousarray(audio.T), sample_rate

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
        values = asdict(settings)
        del values["guild_id"]
        async with self._transaction():
            await self._db.execute(
                """INSERT INTO guild_settings VALUES (?, ?)
                   ON CONFLICT (guild_id) DO UPDATE SET settings = excluded.settings""",
                (settings.guild_id, json.dumps(values)),
            )

    async def paused_guilds(self) -> list[int]:
        rows = await self._db.execute_fetchall("SELECT guild_id, settings FROM guild_settings")
        return [row[0] for row in rows if json.loads(row[1]).get("paused")]

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

    async def jam_of_job(self, job_id: int) -> Jam | None:
        """The jam that ``job_id`` is a turn of, if any."""
        rows = await self._db.execute_fetchall(
            "SELECT thread_id FROM jam_segments WHERE job_id = ?", (job_id,)
        )
        return await self.jam(rows[0][0]) if rows else None

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

    # Internals

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db, self._writing)

    async def _jobs(self, where: str, parameters: tuple, *, with_audio: bool = True) -> list[Job]:
        rows = await self._db.execute_fetchall(f"SELECT * FROM jobs {where}", parameters)
        jobs = [_job_from_row(row) for row in rows]
        if with_audio:
            for job in jobs:
                job.request = await self._with_uploads(job.id, job.request)
        return jobs

    async def _with_uploads(self, job_id: int, request: GenerationRequest) -> GenerationRequest:
        rows = await self._db.execute_fetchall(
            "SELECT option, sample_rate, channels, samples FROM uploads WHERE job_id = ?",
            (job_id,),
        )
        clips = {}
        for option, sample_rate, channels, samples in rows:
            pcm = np.frombuffer(samples, dtype="<f4").reshape(channels, -1)
            clips[option] = AudioClip(pcm.astype(np.float32), sample_rate)
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
    for target, script in enumerate(MIGRATIONS[version:], start=version + 1):
        await connection.executescript(
            f"BEGIN IMMEDIATE; {script}; PRAGMA user_version = {target}; COMMIT;"
        )


def _write_flac(path: Path, audio: np.ndarray, sample_rate: int) -> None:
    """Write a result whole or not at all, into its folder (made again if it was deleted)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    soundfile.write(partial, audio.T, sample_rate, format="FLAC", subtype="PCM_24")
    partial.replace(path)  # a crash never leaves half a result under the real name


def _request_json(request: GenerationRequest) -> str:
    values = {
        f.name: getattr(request, f.name)
        for f in fields(GenerationRequest)
        if f.name not in _AUDIO_OPTIONS
    }
    return json.dumps(values)


def _job_from_row(row: aiosqlite.Row) -> Job:
    reply = None
    if row["reply_token"] is not None:
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
        guild_id=row["guild_id"],
        channel_id=row["channel_id"],
        user_id=row["user_id"],
        status=JobStatus(row["status"]),
        reply=reply,
        attempts=row["attempts"],
        submitted_at=row["submitted_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        generation_seconds=row["generation_seconds"],
        error=row["error"],
        delivered=bool(row["delivered"]),
        result_url=row["result_url"],
        delivery_attempts=row["delivery_attempts"],
        delivery_failure=row["delivery_failure"],
    )
