"""The job service: what a front end submits to. It checks the limits, records jobs in the
store (where the queue is), places them in it, cancels them, and recovers after a restart."""

from __future__ import annotations

import asyncio
import logging
import math
import time

from generation.errors import InvalidOption, QueueFull
from generation.jobs.estimates import Estimate, GenerationRates, eta
from generation.jobs.job import MAX_TAKES, Job, JobStatus, QueueLimits, ReplyAddress
from generation.jobs.scheduling import BatchPolicy
from generation.jobs.store import JobStore
from generation.jobs.watcher import JobListener, Watcher
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
    """Submits, cancels and places jobs: the gateway's side of the queue, which lives in the
    store (workers, in this process or others, claim from it).

    Args:
        store: The database.
        listener: Talks to the requesters.
        limits: Live jobs per member and per server.
        hourly_limit: Jobs a member may submit in a server per hour; 0 for no limit.
        max_attempts: Times a job may be started before it fails for good.
        batch_policy: How workers group jobs into batches (for ETAs).
        recover_running: Whether jobs the store has running belong to a dead process and go
            back to the queue at :meth:`start` (the owner of an SQLite database); on a shared
            database their leases decide.
        device: Where the generation runs, for ETAs before any worker reports.
        lease_seconds: How long a worker holds a job without a heartbeat; one not heard from
            for that long no longer counts in ETAs.
    """

    def __init__(
        self,
        store: JobStore,
        listener: JobListener,
        *,
        limits: QueueLimits | None = None,
        hourly_limit: int = 0,
        max_attempts: int = 3,
        batch_policy: BatchPolicy | None = None,
        recover_running: bool = False,
        device: str = "cpu",
        lease_seconds: float = 60.0,
    ) -> None:
        self.store = store
        self.limits = limits or QueueLimits()
        self.hourly_limit = hourly_limit
        self.max_attempts = max_attempts
        self.batch_policy = batch_policy or BatchPolicy()
        self.recover_running = recover_running
        self.rates = GenerationRates(device)
        self.watcher = Watcher(
            store,
            listener,
            rates=self.rates,
            batch_policy=self.batch_policy,
            worker_silence=lease_seconds,
        )
        self._submitting = asyncio.Lock()
        #: Whether :meth:`start` has picked up the last run's jobs; until then new jobs are
        #: refused, so none goes ahead of them or past the limits.
        self.started = False

    async def start(self, now: float | None = None) -> None:
        """Pick up where the last run stopped: jobs that were running when it died go back to
        the queue (the owner of an SQLite database only; within ``max_attempts``), and the
        watcher delivers outcomes never delivered. Jobs are read without their audio.
        ``now`` is the chat platform's clock, which its interaction tokens expire by."""
        self.rates.load(await self.store.generation_rates(self.rates.device))
        if self.recover_running:
            for worker in await self.store.workers(seen_since=0.0):  # the dead process's
                await self.store.forget_worker(worker.id)
            moved = await self.store.requeue_expired(self.max_attempts, now=math.inf)
            if moved:
                log.info("event=recovered jobs=%d (running when the bot stopped)", moved)
        await self.watcher.start(time.time() if now is None else now)
        self.started = True
        log.info("event=service-started queued=%d", await self.store.queue_length())

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
        """Record a request (``takes`` variations of it, generated together), made from
        ``origin`` if given; it counts towards the limits at once, and runs once
        :meth:`release` d.

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
            await self.check_room(guild_id, user_id, per_user_limit)
            await self._check_hourly_limit(guild_id, user_id, takes)
            job = Job(0, request, guild_id, channel_id, user_id, takes=takes, origin=origin)
            job = await self.store.add(job)
        log.info(
            "job=%d event=queued guild=%d user=%d model=%s duration=%g",
            job.id,
            guild_id,
            user_id,
            request.model,
            request.duration,
        )
        return job

    async def check_room(
        self, guild_id: int, user_id: int, per_user_limit: int | None = None
    ) -> None:
        """Raise :class:`StartingUp` or :class:`QueueFull` now if :meth:`submit` would."""
        self._check_started()
        per_user = self.limits.per_user if per_user_limit is None else per_user_limit
        member, server = await self.store.live_counts(guild_id, user_id)
        if member >= per_user:
            raise QueueFull(
                f"You already have {per_user} jobs queued or running here: "
                "wait for one to finish, or cancel one."
            )
        if server >= self.limits.per_guild:
            raise QueueFull(
                f"This server's queue is full ({self.limits.per_guild} jobs): try again later."
            )

    def _check_started(self) -> None:
        if not self.started:
            raise StartingUp(
                "The bot has just started and is picking up its queue: send it again in a "
                "few seconds."
            )

    async def release(self, job: Job, reply: ReplyAddress | None) -> None:
        """Record where the requester waits for the answer (if anywhere), then let workers
        claim the job: it must not start before its requester has been told it is
        accepted."""
        await self.store.release(job, reply)
        self.watcher.changed()

    async def estimate(self, job: Job) -> Estimate | None:
        """A queued job's place and ETA; None if it is not waiting (it started, or its
        server is paused)."""
        position = await self.store.position(job)
        if position is None:
            return None
        ahead = await self.store.work_ahead(job)
        running = await self.store.running()
        queued = await self.store.queue_length()
        seconds = eta(
            ahead, job, running, self.rates, self.batch_policy, self.watcher.workers, queued
        )
        return Estimate(job.id, position, seconds)

    async def cancel(self, job: Job) -> bool:
        """Cancel a live job; True when it was queued (it is now cancelled, and its requester
        is being told), False when it is running and will stop at its next step."""
        outcome = await self.store.request_cancel(job.id)
        if outcome is JobStatus.CANCELLED:
            log.info("job=%d event=cancelled while=queued", job.id)
            self.watcher.changed()
            return True
        return False

    async def shutdown(self) -> None:
        """Stop watching (deliveries under way complete) and close the store."""
        await self.watcher.stop()
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
