"""The job service: what a front end submits to. It ties the fair queue, the store and the
worker together, recovers after a restart, and shuts down without losing a job."""

from __future__ import annotations

import asyncio
import logging
import time

from generation.errors import InvalidOption, QueueFull
from generation.jobs.job import MAX_TAKES, FairQueue, Job, JobStatus, QueueLimits, ReplyAddress
from generation.jobs.scheduling import BatchPolicy
from generation.jobs.store import JobStore
from generation.jobs.worker import Generator, JobListener, Worker
from generation.origin import Origin
from generation.request import GenerationRequest

log = logging.getLogger(__name__)

HOUR = 3600.0


class RateLimited(QueueFull):
    """A member reached the hourly limit; ``retry_at`` is when they can ask again."""

    def __init__(self, message: str, retry_at: float) -> None:
        super().__init__(message)
        self.retry_at = retry_at


class StartingUp(QueueFull):
    """The service is still recovering the last run's jobs."""


class JobService:
    """Submits, cancels, pauses and recovers jobs.

    Args:
        generator: Runs requests (the engine).
        store: The database.
        listener: Talks to the requesters.
        limits: Live jobs per member and per server.
        hourly_limit: Jobs a member may submit in a server per hour; 0 for no limit.
        max_attempts: Times a job may be started before it fails for good (a job that was
            running when the bot died runs again).
        progress_interval: Least time between two progress reports for a job, in seconds.
        job_timeout: Longest a batch may run, in seconds; None for no limit.
        batch_policy: How the worker groups jobs into batches.
    """

    def __init__(
        self,
        generator: Generator,
        store: JobStore,
        listener: JobListener,
        *,
        limits: QueueLimits | None = None,
        hourly_limit: int = 0,
        max_attempts: int = 3,
        progress_interval: float = 5.0,
        job_timeout: float | None = None,
        batch_policy: BatchPolicy | None = None,
    ) -> None:
        self.store = store
        self.queue = FairQueue(limits)
        self.worker = Worker(
            generator,
            self.queue,
            store,
            listener,
            progress_interval=progress_interval,
            job_timeout=job_timeout,
            batch_policy=batch_policy,
        )
        self.hourly_limit = hourly_limit
        self.max_attempts = max_attempts
        self._submitting = asyncio.Lock()
        #: Whether :meth:`start` has put the jobs of the last run back in the queue; until
        #: then new jobs are refused, so none goes ahead of them or past the limits.
        self.started = False

    async def start(self) -> None:
        """Pick up where the last run stopped: queued jobs in their order, jobs that were
        running when it died (within ``max_attempts``), and outcomes never delivered.

        Jobs are read without their audio (each job's clips are loaded when it runs), so a
        long queue is recovered in little time and memory."""
        await self.worker.load_rates()
        for guild_id in await self.store.paused_guilds():
            self.queue.pause(guild_id)
        for job in await self.store.pending():
            if job.status is JobStatus.RUNNING:
                if job.attempts >= self.max_attempts:
                    await self.store.finish(
                        job,
                        JobStatus.FAILED,
                        f"It stopped {job.attempts} times while generating, so it was given "
                        "up: try a shorter duration or a smaller model.",
                    )
                    continue
                await self.store.requeue(job, count_attempt=True)
                log.info("job=%d event=requeued (running when the bot stopped)", job.id)
            self.queue.add(job)
        for job in await self.store.undelivered():
            self.worker.deliver_later(job)
        self.started = True
        self.worker.queue_changed()
        self.worker.wake()

    async def submit(
        self,
        request: GenerationRequest,
        *,
        guild_id: int,
        channel_id: int,
        user_id: int,
        per_user_limit: int | None = None,
        takes: int = 1,
        origin: Origin | None = None,
    ) -> Job:
        """Record and queue a request (``takes`` variations of it, generated together), made
        from ``origin`` if given.

        Raises:
            InvalidOption: ``takes`` is out of range.
            StartingUp: :meth:`start` has not finished.
            QueueFull: the member or server has too many live jobs.
            RateLimited: the member reached the hourly limit.
        """
        if not 1 <= takes <= MAX_TAKES:
            raise InvalidOption("takes", f"Ask for 1 to {MAX_TAKES} takes.")
        request = request.with_seed()
        async with self._submitting:
            self.check_room(guild_id, user_id, per_user_limit)
            await self._check_hourly_limit(guild_id, user_id, takes)
            job = Job(0, request, guild_id, channel_id, user_id, takes=takes, origin=origin)
            job = await self.store.add(job)
            self.queue.hold(job)
        log.info(
            "job=%d event=queued guild=%d user=%d model=%s duration=%g",
            job.id,
            guild_id,
            user_id,
            request.model,
            request.duration,
        )
        return job

    def check_room(self, guild_id: int, user_id: int, per_user_limit: int | None = None) -> None:
        """Raise :class:`StartingUp` or :class:`QueueFull` now if :meth:`submit` would."""
        self._check_started()
        self.queue.check_room(guild_id, user_id, per_user_limit)

    def _check_started(self) -> None:
        if not self.started:
            raise StartingUp(
                "The bot has just started and is picking up its queue: send it again in a "
                "few seconds."
            )

    async def release(self, job: Job, reply: ReplyAddress | None) -> None:
        """Record where the requester waits for the answer (if anywhere), then queue the
        job: it must not start before its requester has been told it is accepted."""
        try:
            if reply is not None:
                await self.store.set_reply(job, reply)
        finally:
            if job.status is JobStatus.QUEUED:
                self.queue.add(job)
                self.worker.queue_changed()
                self.worker.wake()

    async def cancel(self, job: Job) -> bool:
        """Cancel a live job; True when it was queued (it is now cancelled, and its requester
        is being told), False when it is running and will stop at its next step."""
        if not self.worker.cancel(job):
            return False
        await self.store.finish(job, JobStatus.CANCELLED)
        log.info("job=%d event=cancelled while=queued", job.id)
        self.worker.deliver_later(job)
        self.worker.queue_changed()
        return True

    def pause(self, guild_id: int) -> None:
        self.queue.pause(guild_id)
        self.worker.queue_changed()

    def resume(self, guild_id: int) -> None:
        self.queue.resume(guild_id)
        self.worker.queue_changed()
        self.worker.wake()

    async def shutdown(self, grace: float) -> None:
        """Stop taking jobs, give the running batch ``grace`` seconds, and close the store."""
        await self.worker.stop(grace)
        self.worker.close()
        await self.store.close()

    async def _check_hourly_limit(self, guild_id: int, user_id: int, takes: int) -> None:
        """Refuse a request whose ``takes`` would bring the member's tracks in the last hour
        above the limit (a job of four variations is four tracks; failed ones, and ones
        cancelled before they started, are not counted)."""
        limit = self.hourly_limit
        if not limit:
            return
        if takes > limit:
            raise RateLimited(
                f"That makes {takes} tracks at once; you can ask for {limit} tracks an hour "
                "here: ask for fewer.",
                float("inf"),
            )
        now = time.time()
        recent = await self.store.takes_since(guild_id, user_id, now - HOUR)
        over = sum(count for _, count in recent) + takes - limit
        if over <= 0:
            return
        # The request fits once the oldest tracks, ``over`` of them at least, are an hour old.
        freed, retry_at = 0, now + HOUR
        for submitted_at, count in recent:
            freed += count
            if freed >= over:
                retry_at = submitted_at + HOUR
                break
        minutes = max(1, round((retry_at - now) / 60))
        raise RateLimited(
            f"You can ask for {limit} tracks an hour here (failed ones and ones cancelled "
            "before they started do not count); "
            + ("the next one is" if takes == 1 else f"these {takes} are")
            + f" possible in about {minutes} min.",
            retry_at,
        )
