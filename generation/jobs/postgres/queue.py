"""The queue's operations on PostgreSQL: release, the fair order, claims and leases,
heartbeats, expired leases, cancels, progress and the workers' records (SQL in :mod:`.queries`)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

from psycopg.rows import tuple_row

from generation.jobs.estimates import WorkAhead
from generation.jobs.job import Job, JobStatus, QueueEntry, ReplyAddress
from generation.jobs.postgres import queries as q
from generation.jobs.postgres.db import Connection, Database, fetch_row, fetch_value, notify
from generation.jobs.postgres.rows import job_without_audio
from generation.jobs.store import ENTRY_CHUNK, Channel, WorkerInfo, gave_up

log = logging.getLogger(__name__)

#: The most job ids one heartbeat may carry (a worker runs one batch at a time).
MAX_HEARTBEAT_JOBS = 1_000


class QueueOperations(Database):
    """The queue's part of :class:`~.store.PostgresStore`."""

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
                await notify(db, Channel.QUEUE)
        if reply is not None:
            job.reply = reply

    async def live_counts(self, guild_id: int, user_id: int) -> tuple[int, int]:
        """The member's and the server's live jobs (queued, released or not, or running)."""
        async with self._read() as db:
            row = await (
                await db.execute(q.LIVE_COUNTS, {"guild_id": guild_id, "user_id": user_id})
            ).fetchone()
        assert row is not None
        return row["member"], row["server"]

    async def position(self, job: Job) -> int | None:
        """1 + the claimable jobs ahead of ``job`` (one index range); None if it is not
        queued, or its server is paused. A job not yet released has its place already."""
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

    async def queue_length(self) -> int:
        """Queued jobs in every server, released or not (one index-only count)."""
        async with self._read() as db:
            return await fetch_value(db, q.QUEUE_LENGTH)

    async def work_ahead(self, job: Job) -> list[WorkAhead]:
        """The claimable jobs ahead of ``job``, their takes summed by batch key (one index
        range); none if ``job`` is not queued."""
        async with self._read() as db:
            rows = await (await db.execute(q.WORK_AHEAD, {"id": job.id})).fetchall()
        return [WorkAhead(**row) for row in rows]

    async def queue_order(self) -> list[QueueEntry]:
        """Every claimable job in queue order, as the forecast needs it (one index range),
        turned into entries a chunk at a time so that a long queue never holds the event
        loop."""
        entries: list[QueueEntry] = []
        async with self._read() as db:
            cursor = db.cursor(row_factory=tuple_row)
            await cursor.execute(q.QUEUE_ORDER)
            while rows := await cursor.fetchmany(ENTRY_CHUNK):
                entries += [QueueEntry(*row) for row in rows]
                await asyncio.sleep(0)
        return entries

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
                await notify(db, Channel.JOBS, str(job_id))
                return JobStatus.CANCELLED
            cursor = await db.execute(
                """UPDATE jobs SET cancel_requested = true
                   WHERE id = %s AND status = 'running'""",
                (job_id,),
            )
            if cursor.rowcount == 1:
                await notify(db, Channel.CANCEL, str(job_id))
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
        then join in queue order, each the next one whose takes fit the room left (the first
        always goes), found one index seek at a time. Rows another claim holds are skipped
        (``FOR UPDATE SKIP LOCKED``), so two workers never take the same job. The jobs come
        without their clips (with what they were: :attr:`Job.clips`), in queue order.
        """
        if max_rows < 1:
            raise ValueError(f"max_rows must be at least 1, not {max_rows}")
        now = time.time() if now is None else now
        models = None if models is None else list(models)
        async with self._transaction() as db:
            head = await fetch_row(db, q.CLAIM_HEAD, {"models": models})
            if head is None:
                return []
            preferred = [m for m in loaded if models is None or m in models]
            if (
                preferred
                and head["model"] not in preferred
                and now - head["submitted_at"] < max_model_wait
            ):
                head = await fetch_row(db, q.CLAIM_HEAD, {"models": preferred}) or head
            chosen = [head, *await _joiners(db, head, max_rows - head["takes"])]
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
            await notify(db, Channel.JOBS)
        rows.sort(key=lambda row: (row["fair_tag"], row["id"]))
        return [job_without_audio(row) for row in rows]

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
            if not await fetch_value(db, "SELECT pg_try_advisory_xact_lock(%s)", (q.SWEEP_LOCK,)):
                return 0
            rows = await (await db.execute(q.EXPIRED, {"now": now})).fetchall()
            again = [row["id"] for row in rows if row["attempts"] < max_attempts]
            given_up = [row for row in rows if row["attempts"] >= max_attempts]
            if again:
                await db.execute(q.REQUEUE_EXPIRED, {"ids": again})
            if given_up:
                await db.execute(
                    q.GIVE_UP_EXPIRED,
                    {
                        "ids": [row["id"] for row in given_up],
                        "errors": [gave_up(row["attempts"]) for row in given_up],
                        "finished_at": time.time(),
                    },
                )
            if rows:
                await notify(db, Channel.QUEUE)
                await notify(db, Channel.JOBS)
        if rows:
            log.info("event=requeued-expired jobs=%s", ",".join(str(row["id"]) for row in rows))
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
                await notify(db, Channel.JOBS, str(job.id))
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
        """Record the models a worker holds in memory and the jobs it runs now (it is seen)."""
        async with self._transaction() as db:
            await db.execute(
                "UPDATE workers SET loaded = %s, jobs = %s, seen_at = %s WHERE id = %s",
                (list(loaded), list(jobs), time.time(), worker_id),
            )

    async def forget_worker(self, worker_id: str) -> None:
        async with self._transaction() as db:
            await db.execute("DELETE FROM workers WHERE id = %s", (worker_id,))

    async def workers(self, seen_since: float) -> list[WorkerInfo]:
        """The workers whose last heartbeat was at ``seen_since`` or later."""
        async with self._read() as db:
            rows = await (
                await db.execute(
                    "SELECT * FROM workers WHERE seen_at >= %s ORDER BY started_at, id",
                    (seen_since,),
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


async def _joiners(db: Connection, first: dict, room: int) -> list[dict]:
    """The claimable jobs that join ``first``'s batch: its batch key, in queue order, each the
    next one whose takes fit the ``room`` left (at most ``room`` index seeks), locked."""
    joining: list[dict] = []
    after_tag, after_id = first["fair_tag"], first["id"]
    while room > 0:
        row = await fetch_row(
            db,
            q.CLAIM_JOINER,
            {
                "batch_key": first["batch_key"],
                "room": room,
                "first": first["id"],
                "after_tag": after_tag,
                "after_id": after_id,
            },
        )
        if row is None:
            break
        joining.append(row)
        room -= row["takes"]
        after_tag, after_id = row["fair_tag"], row["id"]
    return joining
