"""The job service across restarts: nothing accepted is lost, and one bad job fails alone."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from generation.errors import InvalidOption, QueueFull
from generation.jobs.job import Job, JobStatus, QueueLimits
from generation.jobs.service import JobService, RateLimited
from generation.jobs.sqlite import SqliteStore
from generation.request import GenerationRequest

from .test_worker import Recorder

REQUEST = GenerationRequest(prompt="lo-fi", model="debug", duration=1.0, seed=1)


async def open_service(engine, database, recorder, **options) -> JobService:
    service = JobService(engine, await SqliteStore.open(database), recorder, **options)
    await service.start()
    return service


async def submit(
    service: JobService, request: GenerationRequest = REQUEST, guild: int = 1, user: int = 1
) -> Job:
    job = await service.submit(request, guild_id=guild, channel_id=1, user_id=user)
    await service.release(job, None)
    return job


async def test_queued_jobs_resume_in_order_after_a_restart(engine, database):
    first = Recorder()
    service = await open_service(engine, database, first)
    service.pause(1)  # as an admin would; the jobs wait
    jobs = [await submit(service, replace(REQUEST, prompt=f"tune {n}")) for n in range(3)]
    await service.shutdown(grace=10)
    assert first.events == []

    second = Recorder()
    service = await open_service(engine, database, second)  # not paused: the pause was not saved
    await service.worker.join()
    await service.shutdown(grace=10)
    assert [event for event in second.events if event[0] == "finished"] == [
        ("finished", job.id) for job in jobs
    ]


async def test_a_job_running_when_the_bot_died_runs_again(engine, database):
    store = await SqliteStore.open(database)
    job = await store.add(Job(0, REQUEST, 1, 1, 1))
    await store.claim(job)  # then the process died
    await store.close()

    recorder = Recorder()
    service = await open_service(engine, database, recorder)
    await service.worker.join()
    await service.shutdown(grace=10)
    assert recorder.events.count(("finished", job.id)) == 1
    store = await SqliteStore.open(database)
    stored = await store.get(job.id)
    assert (stored.status, stored.attempts, stored.delivered) == (JobStatus.DONE, 2, True)
    await store.close()


async def test_a_job_that_keeps_killing_the_bot_fails_after_its_attempts(engine, database):
    store = await SqliteStore.open(database)
    job = await store.add(Job(0, REQUEST, 1, 1, 1))
    for _ in range(2):
        await store.claim(job)
        await store.requeue(job)
    await store.claim(job)  # the third start died too
    await store.close()

    recorder = Recorder()
    service = await open_service(engine, database, recorder, max_attempts=3)
    await service.shutdown(grace=10)
    assert recorder.events == [("failed", job.id)]
    assert "stopped 3 times" in str(recorder.errors[job.id])


async def test_a_finished_result_not_yet_delivered_is_delivered_after_a_restart(engine, database):
    recorder = Recorder()

    class DiesWhileDelivering(Recorder):
        async def job_finished(self, job, results):
            raise ConnectionError("the process died here")

    service = await open_service(engine, database, DiesWhileDelivering())
    job = await submit(service)
    await service.worker.join()
    await service.shutdown(grace=10)

    service = await open_service(engine, database, recorder)
    await service.shutdown(grace=10)
    assert recorder.events == [("finished", job.id)]
    assert recorder.results[job.id][0].audio.shape == (1, 32_000)

    again = Recorder()
    service = await open_service(engine, database, again)  # delivered exactly once
    await service.shutdown(grace=10)
    assert again.events == []


async def test_shutdown_stops_a_long_job_and_it_runs_again_after_the_restart(engine, database):
    first = Recorder()
    service = await open_service(engine, database, first)
    job = await submit(service, replace(REQUEST, duration=60.0))
    while job.progress[0] < 3:
        await asyncio.sleep(0.01)
    await service.shutdown(grace=0.0)
    assert ("finished", job.id) not in first.events
    assert ("cancelled", job.id) not in first.events

    second = Recorder()
    service = await open_service(engine, database, second)
    (resumed,) = service.queue.service_order() or service.queue.running
    assert resumed.id == job.id and resumed.attempts == 0
    service.worker.cancel(resumed)  # no need to wait for a minute of audio here
    await service.worker.join()
    await service.shutdown(grace=10)


async def test_a_job_past_its_time_limit_fails_and_the_next_runs(engine, database):
    recorder = Recorder()
    service = await open_service(engine, database, recorder, job_timeout=0.3)
    slow = await submit(service, replace(REQUEST, duration=120.0))
    quick = await submit(service, replace(REQUEST, duration=0.2), guild=2)
    await service.worker.join()
    await service.shutdown(grace=10)
    assert "took longer than 0.3 s" in str(recorder.errors[slow.id])
    assert ("finished", quick.id) in recorder.events


async def test_cancelling_a_queued_job_records_and_reports_it(engine, database):
    recorder = Recorder()
    service = await open_service(engine, database, recorder)
    service.pause(1)
    job = await submit(service)
    assert await service.cancel(job) is True
    await service.shutdown(grace=10)
    assert recorder.events == [("cancelled", job.id)]
    store = await SqliteStore.open(database)
    stored = await store.get(job.id)
    assert (stored.status, stored.delivered) == (JobStatus.CANCELLED, True)
    await store.close()


async def test_the_hourly_limit_says_when_the_next_request_is_possible(engine, database):
    service = await open_service(
        engine, database, Recorder(), hourly_limit=2, limits=QueueLimits(per_user=10)
    )
    service.pause(1)
    await submit(service)
    await submit(service)
    with pytest.raises(RateLimited, match=r"2 tracks an hour.*in about 60 min"):
        await submit(service)
    await submit(service, guild=2)  # per server
    await submit(service, user=2)  # per member
    await service.shutdown(grace=10)


async def test_the_hourly_limit_counts_tracks_not_jobs(engine, database):
    service = await open_service(
        engine, database, Recorder(), hourly_limit=3, limits=QueueLimits(per_user=10)
    )
    service.pause(1)
    await submit(service)
    with pytest.raises(RateLimited, match=r"That makes 4 tracks at once; you can ask for 3"):
        await service.submit(REQUEST, guild_id=1, channel_id=1, user_id=1, takes=4)
    variations = await service.submit(REQUEST, guild_id=1, channel_id=1, user_id=1, takes=2)
    await service.release(variations, None)
    with pytest.raises(RateLimited, match=r"3 tracks an hour.*next one is possible in about 60"):
        await submit(service)
    await service.shutdown(grace=10)


async def test_the_hourly_limit_counts_only_tracks_that_cost_the_member(engine, database):
    service = await open_service(
        engine, database, Recorder(), hourly_limit=2, limits=QueueLimits(per_user=10)
    )
    try:
        service.pause(1)
        assert await service.cancel(await submit(service)) is True  # cancelled while it waited
        store = service.store
        failed, stopped = [await store.add(Job(0, REQUEST, 1, 1, 1)) for _ in range(2)]
        for job, status in ((failed, JobStatus.FAILED), (stopped, JobStatus.CANCELLED)):
            await store.claim(job)
            await store.finish(job, status)  # a failure is ours; a stop after it ran cost GPU
        await submit(service)  # with the stopped one, two tracks this hour
        with pytest.raises(RateLimited) as refused:
            await submit(service)
        assert str(refused.value) == (
            "You can ask for 2 tracks an hour here (failed ones and ones cancelled before "
            "they started do not count); the next one is possible in about 60 min."
        )
    finally:
        await service.shutdown(grace=10)


async def test_queue_limits_hold_between_submit_and_release(engine, database):
    service = await open_service(engine, database, Recorder(), limits=QueueLimits(per_user=1))
    job = await service.submit(REQUEST, guild_id=1, channel_id=1, user_id=1)
    with pytest.raises(QueueFull):
        await service.submit(REQUEST, guild_id=1, channel_id=1, user_id=1)
    await service.release(job, None)
    await service.shutdown(grace=10)


async def test_takes_are_checked_and_kept_with_the_job(engine, database):
    service = await open_service(engine, database, Recorder())
    service.pause(1)
    with pytest.raises(InvalidOption) as caught:
        await service.submit(REQUEST, guild_id=1, channel_id=1, user_id=1, takes=5)
    assert caught.value.option == "takes"
    job = await service.submit(
        replace(REQUEST, seed=None), guild_id=1, channel_id=1, user_id=1, takes=2
    )
    await service.release(job, None)
    await service.shutdown(grace=10)

    store = await SqliteStore.open(database)
    (kept,) = await store.pending()
    await store.close()
    assert kept.takes == 2
    assert kept.request.seed == job.request.seed is not None  # fixed when submitted


async def test_a_request_before_the_jobs_are_recovered_is_asked_to_come_back(engine, database):
    service = JobService(engine, await SqliteStore.open(database), Recorder())
    try:
        with pytest.raises(QueueFull, match="send it again in a few seconds"):
            await service.submit(REQUEST, guild_id=1, channel_id=1, user_id=1)
        await service.start()
        await submit(service)
    finally:
        await service.shutdown(grace=10)
