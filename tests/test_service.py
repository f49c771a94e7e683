"""The job service on the store: limits, places and ETAs, cancels, and restarts where nothing
accepted is lost and nothing is delivered twice."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import replace

import pytest

from generation.errors import InvalidOption, QueueFull
from generation.jobs.job import Job, JobStatus, QueueLimits
from generation.jobs.scheduling import BatchPolicy
from generation.jobs.service import JobService, RateLimited, StartingUp
from generation.jobs.sqlite import SqliteStore
from generation.jobs.store import GuildSettings
from generation.jobs.worker import Worker
from generation.request import GenerationRequest

from .job_helpers import QUICK, SHORT, Recorder, ended

REQUEST = GenerationRequest(prompt="lo-fi", model="debug", duration=0.5, seed=1)


class Bot:
    """One run of the bot's job system: the service on an SQLite database it owns, a worker
    if asked for, and the timer loop that drives them."""

    def __init__(self, service: JobService, worker: Worker | None) -> None:
        self.service = service
        self.store = service.store
        self.worker = worker
        self._timer = asyncio.get_running_loop().create_task(self._tick())

    @classmethod
    async def start(cls, database, recorder, *, engine=None, batch_policy=None, **options) -> Bot:
        store = await SqliteStore.open(database)
        policy = batch_policy or BatchPolicy()
        service = JobService(store, recorder, recover_running=True, batch_policy=policy, **options)
        await service.start()
        worker = None
        if engine is not None:
            worker = Worker(
                engine,
                store,
                batch_policy=policy,
                leases=SHORT,
                progress_interval=0.0,
                store_retry=QUICK,
                max_attempts=service.max_attempts,
            )
            await worker.start()
        return cls(service, worker)

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(0.1)
            await self.service.watcher.tick()
            if self.worker is not None and self.worker.accepting:
                await self.worker.tick()

    async def submit(self, request=REQUEST, guild: int = 1, user: int = 1, **options) -> Job:
        job = await self.service.submit(
            request, guild_id=guild, channel_id=1, user_id=user, **options
        )
        await self.service.release(job, None)
        return job

    async def told(self, *jobs: Job) -> list[Job]:
        """Wait until ``jobs`` ended and their outcomes were delivered (or tried)."""
        await ended(self.store, *jobs)
        await self.service.watcher.settle()
        return [await self.store.get(job.id) for job in jobs]

    async def stop(self, grace: float = 60.0) -> None:
        self._timer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._timer
        if self.worker is not None:
            await self.worker.stop(grace)
        await self.service.shutdown()


async def place(bot: Bot, job: Job) -> tuple[int, float] | None:
    estimate = await bot.service.estimate(job)
    return None if estimate is None else (estimate.position, estimate.seconds)


@pytest.fixture
async def bots():
    """Start bots with ``await bots(...)`` (arguments of :meth:`Bot.start`); any left
    running at the end are stopped."""
    started: list[Bot] = []

    async def start(*args, **kwargs) -> Bot:
        bot = await Bot.start(*args, **kwargs)
        started.append(bot)
        return bot

    yield start
    for bot in started:
        if not bot._timer.done():
            await bot.stop()


async def test_queued_jobs_resume_in_order_after_a_restart(bots, engine, database):
    first = Recorder()
    bot = await bots(database, first)  # no worker: the jobs wait
    jobs = [await bot.submit(replace(REQUEST, prompt=f"tune {n}")) for n in range(3)]
    await bot.stop()
    assert first.events == []

    second = Recorder()
    bot = await bots(database, second, engine=engine, batch_policy=BatchPolicy(max_rows=1))
    await bot.told(*jobs)
    await bot.stop()
    finished = [event for event in second.events if event[0] == "finished"]
    assert finished == [("finished", job.id) for job in jobs]


async def test_a_job_running_when_the_bot_died_runs_again(bots, engine, database):
    store = await SqliteStore.open(database)
    job = await store.add(Job(0, REQUEST, 1, 1, 1))
    await store.release(job, None)
    await store.claim(  # then the process died, its lease held for a minute more
        "old", models=None, loaded=(), max_rows=1, max_model_wait=0, lease_seconds=60
    )
    await store.close()

    recorder = Recorder()
    bot = await bots(database, recorder, engine=engine)
    (stored,) = await bot.told(job)
    await bot.stop()
    assert recorder.events.count(("finished", job.id)) == 1
    assert (stored.status, stored.attempts, stored.delivered) == (JobStatus.DONE, 2, True)


async def test_a_job_that_keeps_killing_the_bot_fails_after_its_attempts(bots, database):
    store = await SqliteStore.open(database)
    job = await store.add(Job(0, REQUEST, 1, 1, 1))
    await store.release(job, None)
    claim = {"models": None, "loaded": (), "max_rows": 1, "max_model_wait": 0}
    for _ in range(2):
        (running,) = await store.claim("old", **claim, lease_seconds=60)
        assert await store.requeue(running)
    await store.claim("old", **claim, lease_seconds=60)  # the third start died too
    await store.close()

    recorder = Recorder()
    bot = await bots(database, recorder, max_attempts=3)
    await bot.told(job)
    await bot.stop()
    assert recorder.events == [("failed", job.id)]
    assert "stopped 3 times" in str(recorder.errors[job.id])


async def test_a_finished_result_not_yet_delivered_is_delivered_after_a_restart(
    bots, engine, database
):
    class DiesWhileDelivering(Recorder):
        async def job_finished(self, job, results):
            self._hear("tried", job)
            raise ConnectionError("the process died here")

    dying = DiesWhileDelivering()
    bot = await bots(database, dying, engine=engine)
    job = await bot.submit()
    await dying.until(lambda: ("tried", job.id) in dying.events)
    await bot.stop()  # the next try, minutes away, is left to the next start

    recorder = Recorder()
    bot = await bots(database, recorder)
    await bot.service.watcher.settle()
    await bot.stop()
    assert recorder.events == [("finished", job.id)]
    assert recorder.results[job.id][0].audio.shape == (1, 16_000)

    again = Recorder()
    bot = await bots(database, again)  # delivered exactly once
    await bot.service.watcher.settle()
    await bot.stop()
    assert again.events == []


async def test_shutdown_stops_a_long_job_and_it_waits_for_the_next_start(bots, engine, database):
    first = Recorder()
    bot = await bots(database, first, engine=engine)
    job = await bot.submit(replace(REQUEST, duration=60.0))
    await first.until(lambda: bool(first.progress.get(job.id)))
    await bot.stop(grace=0.0)
    assert "finished" not in first.kinds(job) and "cancelled" not in first.kinds(job)

    bot = await bots(database, Recorder())
    stored = await bot.store.get(job.id)
    assert (stored.status, stored.attempts) == (JobStatus.QUEUED, 0)  # no attempt counted
    assert (await bot.service.estimate(stored)).position == 1
    await bot.stop()


async def test_cancelling_a_queued_job_records_and_reports_it(bots, database):
    recorder = Recorder()
    bot = await bots(database, recorder)
    job = await bot.submit()
    assert await bot.service.cancel(job) is True
    (stored,) = await bot.told(job)
    await bot.stop()
    assert recorder.events == [("cancelled", job.id)]
    assert (stored.status, stored.delivered) == (JobStatus.CANCELLED, True)


async def test_cancelling_a_running_job_stops_it_at_its_next_step(bots, engine, database):
    recorder = Recorder()
    bot = await bots(database, recorder, engine=engine)
    job = await bot.submit(replace(REQUEST, duration=30.0))
    await recorder.until(lambda: bool(recorder.progress.get(job.id)))
    assert await bot.service.cancel(job) is False  # it stops at its next step
    (stored,) = await bot.told(job)
    await bot.stop()
    assert (stored.status, stored.delivered) == (JobStatus.CANCELLED, True)
    assert recorder.kinds(job)[-1] == "cancelled"


async def test_a_queued_job_hears_its_place_and_eta(bots, database):
    recorder = Recorder()
    bot = await bots(database, recorder, batch_policy=BatchPolicy(max_rows=2))
    # Seconds of work per second of audio, alone and with two requests sharing the steps.
    bot.service.rates.load({("debug", 1): 2.0, ("debug", 2): 3.0})
    first = await bot.submit(replace(REQUEST, duration=10.0))
    second = await bot.submit(replace(REQUEST, duration=5.0), guild=2)
    # Two places: both start at once and share their steps.
    assert await place(bot, first) == (1, pytest.approx(30.0))
    assert await place(bot, second) == (2, pytest.approx(15.0))
    third = await bot.submit(replace(REQUEST, duration=4.0), guild=3)
    # The third takes the place the second frees.
    assert await place(bot, third) == (3, pytest.approx(15.0 + 12.0))
    bot.service.watcher.eta_interval = 0.0
    await bot.service.watcher.settle()
    assert recorder.moves[-1] == [
        (first.id, 1, pytest.approx(30.0)),
        (second.id, 2, pytest.approx(15.0)),
        (third.id, 3, pytest.approx(27.0)),
    ]
    # The first starts: the third is next, after the second (what is left of the first
    # ends later).
    await bot.store.claim(
        "w", models=None, loaded=(), max_rows=1, max_model_wait=0, lease_seconds=60
    )
    (running,) = await bot.store.running()
    await bot.store.set_progress(running, 50, 100)
    assert await place(bot, third) == (2, pytest.approx(15.0 + 12.0))
    await bot.service.watcher.settle()
    assert recorder.moves[-1] == [
        (second.id, 1, pytest.approx(15.0)),
        (third.id, 2, pytest.approx(27.0)),
    ]
    # A paused server's jobs wait for an admin: no place, no ETA.
    await bot.store.save_guild_settings(GuildSettings(2, paused=True))
    assert await bot.service.estimate(second) is None
    await bot.stop()


async def test_the_hourly_limit_says_when_the_next_request_is_possible(bots, database):
    bot = await bots(database, Recorder(), hourly_limit=2, limits=QueueLimits(per_user=10))
    await bot.submit()
    await bot.submit()
    with pytest.raises(RateLimited, match=r"2 tracks an hour.*in about 60 min"):
        await bot.submit()
    await bot.submit(guild=2)  # per server
    await bot.submit(user=2)  # per member
    await bot.stop()


async def test_the_hourly_limit_counts_tracks_not_jobs(bots, database):
    bot = await bots(database, Recorder(), hourly_limit=3, limits=QueueLimits(per_user=10))
    await bot.submit()
    with pytest.raises(RateLimited, match=r"That makes 4 tracks at once; you can ask for 3"):
        await bot.submit(takes=4)
    await bot.submit(takes=2)
    with pytest.raises(RateLimited, match=r"3 tracks an hour.*next one is possible in about 60"):
        await bot.submit()
    await bot.stop()


async def test_the_hourly_limit_counts_only_tracks_that_cost_the_member(bots, database):
    bot = await bots(database, Recorder(), hourly_limit=2, limits=QueueLimits(per_user=10))
    assert await bot.service.cancel(await bot.submit()) is True  # cancelled while it waited
    store = bot.store
    for status in (JobStatus.FAILED, JobStatus.CANCELLED):
        job = await store.add(Job(0, REQUEST, 1, 1, 1))
        await store.release(job, None)
        (running,) = await store.claim(
            "w", models=None, loaded=(), max_rows=1, max_model_wait=0, lease_seconds=60
        )
        assert await store.finish(running, status)  # a failure is ours; a stop cost GPU
    await bot.submit()  # with the stopped one, two tracks this hour
    with pytest.raises(RateLimited) as refused:
        await bot.submit()
    assert str(refused.value) == (
        "You can ask for 2 tracks an hour here (failed ones and ones cancelled before "
        "they started do not count); the next one is possible in about 60 min."
    )
    await bot.stop()


async def test_limits_count_queued_and_running_jobs(bots, database):
    bot = await bots(database, Recorder(), limits=QueueLimits(per_user=2, per_guild=3))
    await bot.submit()
    await bot.store.claim(
        "w", models=None, loaded=(), max_rows=1, max_model_wait=0, lease_seconds=60
    )
    await bot.submit()
    with pytest.raises(QueueFull, match="already have 2 jobs"):
        await bot.service.check_room(1, 1)
    await bot.service.check_room(1, 1, per_user_limit=3)  # a server's own, higher limit
    with pytest.raises(QueueFull, match="already have 2 jobs"):
        await bot.submit()
    await bot.submit(guild=2)  # the limit is per server
    await bot.submit(user=2)
    with pytest.raises(QueueFull, match="queue is full"):
        await bot.submit(user=3)
    await bot.stop()


async def test_queue_limits_hold_between_submit_and_release(bots, database):
    bot = await bots(database, Recorder(), limits=QueueLimits(per_user=1))
    job = await bot.service.submit(REQUEST, guild_id=1, channel_id=1, user_id=1)
    assert await bot.store.queue_order() == []  # recorded, not yet to be claimed
    with pytest.raises(QueueFull):
        await bot.service.submit(REQUEST, guild_id=1, channel_id=1, user_id=1)
    await bot.service.release(job, None)
    assert [entry.job_id for entry in await bot.store.queue_order()] == [job.id]
    await bot.stop()


async def test_takes_are_checked_and_kept_with_the_job(bots, database):
    bot = await bots(database, Recorder())
    with pytest.raises(InvalidOption) as caught:
        await bot.submit(takes=5)
    assert caught.value.option == "takes"
    job = await bot.submit(replace(REQUEST, seed=None), takes=2)
    await bot.stop()

    store = await SqliteStore.open(database)
    kept = await store.get(job.id)
    await store.close()
    assert kept.takes == 2
    assert kept.request.seed == job.request.seed is not None  # fixed when submitted


async def test_a_request_before_the_jobs_are_recovered_is_asked_to_come_back(database):
    service = JobService(await SqliteStore.open(database), Recorder())
    try:
        with pytest.raises(StartingUp, match="send it again in a few seconds"):
            await service.submit(REQUEST, guild_id=1, channel_id=1, user_id=1)
        await service.start()
        job = await service.submit(REQUEST, guild_id=1, channel_id=1, user_id=1)
        await service.release(job, None)
    finally:
        await service.shutdown()
