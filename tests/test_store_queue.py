"""The queue in the store (both stores): fair order, release, pauses, claims and their
leases, batches, model affinity, heartbeats, expired leases, fencing, cancels, workers and
notifications. Each test runs on SQLite and on PostgreSQL (the ``store`` fixture)."""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import replace

import pytest

from generation.jobs.estimates import WorkAhead
from generation.jobs.job import Job, JobStatus, QueueEntry, ReplyAddress
from generation.jobs.postgres import PostgresStore
from generation.jobs.store import Channel, GuildSettings, JobStore, WorkerInfo
from generation.request import AudioClip, GenerationRequest

from .helpers import sine
from .stores import sql, url_of

REQUEST = GenerationRequest(prompt="lo-fi", model="debug", duration=5.0, seed=1)
LEASE = 30.0
GIVEN_UP = (
    "It stopped 2 times while generating, so it was given up: try a shorter duration or a "
    "smaller model."
)


async def queue(store: JobStore, guild_id: int, user_id: int = 1, **changes) -> Job:
    """A released job of ``guild_id`` (``changes`` to the request, or ``takes``)."""
    takes = changes.pop("takes", 1)
    job = await store.add(Job(0, replace(REQUEST, **changes), guild_id, 2, user_id, takes=takes))
    await store.release(job, None)
    return job


async def claim(
    store: JobStore,
    worker_id: str = "w1",
    *,
    models=None,
    loaded=(),
    max_rows: int = 1,
    max_model_wait: float = 0.0,
    now: float | None = None,
) -> list[Job]:
    return await store.claim(
        worker_id,
        models=models,
        loaded=loaded,
        max_rows=max_rows,
        max_model_wait=max_model_wait,
        lease_seconds=LEASE,
        now=now,
    )


def ids(jobs) -> list[int]:
    """The ids of jobs, or of queue entries."""
    return [getattr(job, "id", None) or job.job_id for job in jobs]


async def test_servers_take_turns_whoever_queued_more(store):
    busy = [await queue(store, guild_id=1) for _ in range(3)]
    late = await queue(store, guild_id=2)
    order = [busy[0].id, late.id, busy[1].id, busy[2].id]
    assert ids(await store.queue_order()) == order
    assert [await store.position(job) for job in (*busy, late)] == [1, 3, 4, 2]
    assert ids(await store.queued(1)) == ids(busy)
    claimed = []
    for _ in order:
        claimed += await claim(store)
    assert ids(claimed) == order
    assert await claim(store) == []


async def test_a_server_arriving_after_claims_goes_before_the_busy_ones_next_job(store):
    busy = [await queue(store, guild_id=1) for _ in range(4)]
    assert ids(await claim(store)) == [busy[0].id]
    assert ids(await claim(store)) == [busy[1].id]
    late = await queue(store, guild_id=2)  # it starts at the virtual time: the job claimed last
    assert ids(await store.queue_order()) == [late.id, busy[2].id, busy[3].id]


async def test_a_held_job_counts_toward_the_limits_but_cannot_be_claimed(store):
    ahead = await queue(store, guild_id=2)
    held = await store.add(Job(0, REQUEST, 1, 2, 7))
    assert await store.live_counts(1, 7) == (1, 1)
    assert await store.live_counts(1, 8) == (0, 1)
    # It has its place already (the requester is shown it before the release)...
    assert await store.position(held) == 2
    # ...but no worker can take it yet.
    assert ids(await store.queue_order()) == [ahead.id] and await store.queued(1) == []
    assert ids(await claim(store)) == [ahead.id]
    assert await claim(store) == []
    reply = ReplyAddress(9, "token", time.time() + 900, 55, 1024)
    await store.release(held, reply)
    assert (await store.get(held.id)).reply == reply
    assert await store.position(held) == 1
    (running,) = await claim(store)
    assert await store.live_counts(1, 7) == (1, 1)  # running still counts
    await store.finish(running, JobStatus.DONE)
    assert await store.live_counts(1, 7) == (0, 0)


async def test_releasing_a_job_cancelled_meanwhile_does_nothing(store):
    job = await store.add(Job(0, REQUEST, 1, 2, 3))
    assert await store.request_cancel(job.id) is JobStatus.CANCELLED
    await store.release(job, None)
    assert (await store.get(job.id)).status is JobStatus.CANCELLED
    assert await claim(store) == []


async def test_a_paused_server_is_skipped_and_has_no_position(store):
    paused = await queue(store, guild_id=1)
    other = await queue(store, guild_id=2)
    await store.save_guild_settings(GuildSettings(1, paused=True))
    assert await store.position(paused) is None
    assert await store.position(other) == 1
    assert ids(await store.queued(1)) == [paused.id]  # still its server's queue
    assert ids(await store.queue_order()) == [other.id]
    assert ids(await claim(store)) == [other.id]
    assert await claim(store) == []
    await store.save_guild_settings(GuildSettings(1, paused=False))
    assert await store.paused_guilds() == []
    assert ids(await claim(store)) == [paused.id]


async def test_a_claim_leases_the_job_and_counts_the_attempt(store):
    melody = AudioClip(sine(1.0, 440.0), 32_000)
    job = await queue(store, guild_id=1, melody=melody)
    now = time.time()
    (claimed,) = await claim(store, "gpu-1", now=now)
    assert claimed.id == job.id
    assert (claimed.status, claimed.attempts, claimed.worker_id) == (
        JobStatus.RUNNING,
        1,
        "gpu-1",
    )
    assert claimed.started_at == pytest.approx(now)
    # Without its audio: the worker loads it to run it.
    assert claimed.uploads_in_store and claimed.request.melody is None
    await store.load_uploads(claimed)
    assert claimed.request.melody.samples.shape == melody.samples.shape
    (running,) = await store.running()
    assert (running.id, running.worker_id, running.progress) == (job.id, "gpu-1", (0, 0))
    assert await store.position(job) is None and await store.queue_order() == []
    # The lease runs out LEASE seconds after the claim, not before.
    assert await store.requeue_expired(3, now=now + LEASE - 1) == 0
    assert await store.requeue_expired(3, now=now + LEASE + 1) == 1


async def test_a_batch_takes_jobs_of_the_same_key_up_to_max_rows(store):
    first = await queue(store, guild_id=1, takes=2)
    other_duration = await queue(store, guild_id=2, duration=8.0)
    too_big = await queue(store, guild_id=3, takes=3)
    fits = await queue(store, guild_id=4)
    also_fits = await queue(store, guild_id=5)
    left = await queue(store, guild_id=6)
    batch = await claim(store, max_rows=4)
    assert ids(batch) == [first.id, fits.id, also_fits.id]  # 2 + 1 + 1 takes, in queue order
    assert all(job.status is JobStatus.RUNNING for job in batch)
    assert ids(await store.queue_order()) == [other_duration.id, too_big.id, left.id]
    # The first job always goes, even when it alone has more takes than max_rows.
    assert ids(await claim(store, max_rows=1)) == [other_duration.id]
    assert ids(await claim(store, max_rows=2)) == [too_big.id]


async def test_a_job_that_fits_joins_however_many_too_big_ones_are_ahead_of_it(store):
    first = await queue(store, guild_id=1)
    pair = await queue(store, guild_id=2, takes=2)
    # Each fitted the room left after the first (3), but not after the pair joined (1).
    too_big = [await queue(store, guild_id=guild, takes=2) for guild in range(3, 13)]
    fits = await queue(store, guild_id=13)
    assert ids(await claim(store, max_rows=4)) == [first.id, pair.id, fits.id]
    assert ids(await store.queue_order()) == ids(too_big)


async def test_the_queue_order_and_the_work_ahead_are_read_without_requests(store):
    first = await queue(store, guild_id=1, takes=2)
    longer = await queue(store, guild_id=2, duration=8.0)
    second = await queue(store, guild_id=3, takes=3)
    paused = await queue(store, guild_id=4, model="small")
    job = await queue(store, guild_id=5)
    held = await store.add(Job(0, REQUEST, 6, 2, 1))
    await store.save_guild_settings(GuildSettings(4, paused=True))
    entries = await store.queue_order()
    assert all(isinstance(entry, QueueEntry) for entry in entries)
    assert [(e.job_id, e.guild_id, e.model, e.duration, e.takes) for e in entries] == [
        (first.id, 1, "debug", 5.0, 2),
        (longer.id, 2, "debug", 8.0, 1),
        (second.id, 3, "debug", 5.0, 3),
        (job.id, 5, "debug", 5.0, 1),
    ]
    keys = [entry.batch_key for entry in entries]
    assert keys[0] == keys[2] == keys[3] != keys[1]
    # Summed by batch key: the paused server's job and those behind are not ahead.
    ahead = await store.work_ahead(job)
    assert sorted(ahead, key=lambda work: work.duration) == [
        WorkAhead("debug", 5.0, 5),
        WorkAhead("debug", 8.0, 1),
    ]
    assert await store.work_ahead(first) == []
    # Every queued job counts, held or paused; a running one does not.
    assert await store.queue_length() == 6
    await claim(store)
    assert await store.queue_length() == 5
    assert await store.work_ahead(first) == []  # no longer queued
    assert {held.id, paused.id}.isdisjoint(ids(await store.queue_order()))


async def test_a_worker_prefers_a_loaded_model_for_a_while(store):
    small = await queue(store, guild_id=1, model="small")
    debug = await queue(store, guild_id=2, model="debug")
    now = time.time()
    # The head waited less than max_model_wait: the worker with debug loaded takes debug's.
    assert ids(await claim(store, loaded=["debug"], max_model_wait=60.0, now=now)) == [debug.id]
    await store.requeue(debug)
    # Once the head has waited long enough, it goes first, whatever is loaded.
    assert ids(await claim(store, loaded=["debug"], max_model_wait=60.0, now=now + 61)) == [
        small.id
    ]


async def test_a_worker_takes_only_the_models_it_serves(store):
    small = await queue(store, guild_id=1, model="small")
    debug = await queue(store, guild_id=2, model="debug")
    assert ids(await claim(store, models=["debug"])) == [debug.id]
    assert await claim(store, models=["medium"]) == []
    assert ids(await claim(store, models=["small", "debug"])) == [small.id]


async def test_no_loaded_model_waiting_means_the_head_goes(store):
    small = await queue(store, guild_id=1, model="small")
    assert ids(await claim(store, loaded=["debug"], max_model_wait=600.0)) == [small.id]


async def test_two_claims_at_once_never_take_the_same_job(store):
    jobs = [await queue(store, guild_id=guild) for guild in range(1, 13)]
    other = await PostgresStore.open(url_of(store)) if isinstance(store, PostgresStore) else store
    try:
        taken: list[int] = []
        while True:
            first, second = await asyncio.gather(
                claim(store, "w1", max_rows=2), claim(other, "w2", max_rows=2)
            )
            if not first and not second:
                break
            assert not set(ids(first)) & set(ids(second))
            taken += ids(first) + ids(second)
    finally:
        if other is not store:
            await other.close()
    assert sorted(taken) == ids(jobs)
    assert {job.worker_id for job in await store.running()} == {"w1", "w2"}


async def test_a_heartbeat_extends_the_lease_and_names_the_jobs_to_stop(store):
    await store.register_worker(WorkerInfo("w1", "host", "cpu", ("debug",), started_at=1.0))
    kept = await queue(store, guild_id=1)
    cancelled = await queue(store, guild_id=2)
    now = time.time()
    claimed = await claim(store, max_rows=2, now=now)
    assert ids(claimed) == [kept.id, cancelled.id]
    assert await store.heartbeat("w1", [kept.id, cancelled.id], LEASE, now=now + 20) == set()
    assert await store.requeue_expired(3, now=now + LEASE + 1) == 0  # extended to now + 50
    assert [w.id for w in await store.workers(seen_since=now + 20)] == ["w1"]
    assert await store.request_cancel(cancelled.id) is JobStatus.RUNNING
    stop = await store.heartbeat("w1", [kept.id, cancelled.id, 999_999], LEASE, now=now + 40)
    assert stop == {cancelled.id, 999_999}  # cancel requested; not this worker's
    # Another worker holds no lease on these.
    assert await store.heartbeat("w2", [kept.id], LEASE, now=now + 40) == {kept.id}


async def test_expired_leases_go_back_to_the_queue_then_fail_for_good(store):
    job = await queue(store, guild_id=1)
    later = await queue(store, guild_id=1)
    now = time.time()
    assert ids(await claim(store, now=now)) == [job.id]
    assert await store.requeue_expired(2, now=now + LEASE + 1) == 1
    again = await store.get(job.id)
    assert (again.status, again.attempts, again.worker_id) == (JobStatus.QUEUED, 1, None)
    assert await store.position(again) == 1  # it kept its place, ahead of the later job
    assert ids(await claim(store, now=now + 100)) == [job.id]
    assert await store.requeue_expired(2, now=math.inf) == 1  # every running job
    failed = await store.get(job.id)
    assert (failed.status, failed.attempts, failed.error) == (JobStatus.FAILED, 2, GIVEN_UP)
    assert failed.finished_at is not None
    assert ids(await store.queue_order()) == [later.id]
    assert (await store.stats(1)).failed == 1


async def test_a_worker_that_lost_its_lease_is_fenced_out(store):
    job = await queue(store, guild_id=1)
    now = time.time()
    (lost,) = await claim(store, "w1", now=now)
    await store.requeue_expired(3, now=now + LEASE + 1)
    (current,) = await claim(store, "w2", now=now + LEASE + 2)
    assert current.attempts == 2
    assert await store.finish(lost, JobStatus.DONE) is False
    assert (lost.status, lost.finished_at) == (JobStatus.RUNNING, None)  # left as it was
    assert await store.requeue(lost) is False
    assert await store.heartbeat("w1", [job.id], LEASE) == {job.id}
    assert (await store.get(job.id)).status is JobStatus.RUNNING
    assert await store.finish(current, JobStatus.DONE) is True
    assert (await store.get(job.id)).status is JobStatus.DONE


async def test_the_fence_names_the_worker_that_holds_the_job(store):
    job = await queue(store, guild_id=1)
    (stale,) = await claim(store, "w1")
    # Given back without counting the attempt (as a shutdown does), then taken by another
    # worker: the same status and attempt as the first worker holds, but not its run.
    assert await store.requeue(await store.get(job.id), count_attempt=False) is True
    (current,) = await claim(store, "w2")
    assert (current.attempts, stale.attempts) == (1, 1)
    assert await store.finish(stale, JobStatus.DONE) is False
    assert await store.requeue(stale) is False
    assert (await store.get(job.id)).worker_id == "w2"
    assert await store.finish(current, JobStatus.DONE) is True
    assert current.worker_id is None  # the run ended: no worker holds it
    ended = await store.get(job.id)
    assert (ended.status, ended.worker_id, ended.progress) == (JobStatus.DONE, None, (0, 0))


async def test_cancelling_a_queued_job_ends_it_and_a_running_one_asks_its_worker(store):
    held = await store.add(Job(0, REQUEST, 1, 2, 3))
    queued = await queue(store, guild_id=1)
    running = await queue(store, guild_id=2)
    await store.save_guild_settings(GuildSettings(1, paused=True))
    (running,) = await claim(store)
    for job in (held, queued):
        assert await store.request_cancel(job.id) is JobStatus.CANCELLED
        cancelled = await store.get(job.id)
        assert cancelled.status is JobStatus.CANCELLED and cancelled.finished_at is not None
    assert await store.request_cancel(running.id) is JobStatus.RUNNING
    assert (await store.get(running.id)).status is JobStatus.RUNNING  # until its worker stops
    assert await store.finish(running, JobStatus.CANCELLED) is True
    assert await store.request_cancel(running.id) is None  # no longer live
    assert await store.request_cancel(999_999) is None


async def test_progress_is_recorded_for_running_jobs(store):
    await queue(store, guild_id=1)
    (job,) = await claim(store)
    await store.set_progress(job, 30, 250)
    assert job.progress == (30, 250)
    (running,) = await store.running()
    assert running.progress == (30, 250)
    await store.requeue(job, count_attempt=False)
    assert await store.running() == []
    assert (await store.get(job.id)).progress == (0, 0)


async def test_workers_advertise_themselves(store):
    info = WorkerInfo("w1", "gpu-box", "cuda:0", ("debug", "small"), started_at=10.0, seen_at=20.0)
    await store.register_worker(info)
    await store.register_worker(WorkerInfo("w2", "old-box", "cpu", (), seen_at=5.0))
    assert await store.workers(seen_since=10.0) == [info]
    await store.update_worker("w1", ["debug"], [4, 5])
    (updated,) = await store.workers(seen_since=10.0)
    assert (updated.loaded, updated.jobs) == (("debug",), (4, 5))
    await store.forget_worker("w1")
    assert await store.workers(seen_since=0.0) == [
        WorkerInfo("w2", "old-box", "cpu", (), seen_at=5.0)
    ]


async def listen(store: JobStore, *channels: Channel) -> list[asyncio.Queue[str]]:
    """A queue of payloads per channel; PostgreSQL's first "" (listening now) is taken."""
    queues: list[asyncio.Queue[str]] = []
    for channel in channels:
        queues.append(asyncio.Queue())
        store.subscribe(channel, queues[-1].put_nowait)
    if isinstance(store, PostgresStore):
        for received in queues:
            assert await asyncio.wait_for(received.get(), 10) == ""
    return queues


async def test_releasing_notifies_the_queue_and_cancelling_a_running_job_its_worker(store):
    work, cancels = await listen(store, Channel.QUEUE, Channel.CANCEL)
    job = await store.add(Job(0, REQUEST, 1, 2, 3))
    assert work.empty()  # held: nothing to claim yet
    await store.release(job, None)
    await asyncio.wait_for(work.get(), 10)
    await claim(store)
    assert await store.request_cancel(job.id) is JobStatus.RUNNING
    assert await asyncio.wait_for(cancels.get(), 10) == str(job.id)


async def test_resuming_a_paused_server_notifies_the_queue(store):
    await store.save_guild_settings(GuildSettings(1, paused=True))
    job = await queue(store, guild_id=1)
    (work,) = await listen(store, Channel.QUEUE)
    await store.save_guild_settings(GuildSettings(1, paused=False))
    await asyncio.wait_for(work.get(), 10)
    assert ids(await claim(store)) == [job.id]


async def test_a_job_ending_notifies_the_jobs_channel(store):
    (jobs,) = await listen(store, Channel.JOBS)
    await queue(store, guild_id=1)
    (job,) = await claim(store)
    await asyncio.wait_for(jobs.get(), 10)  # started
    await store.finish(job, JobStatus.DONE)
    await asyncio.wait_for(jobs.get(), 10)  # ended


async def test_the_stored_queue_columns_follow_the_request(store):
    job = await queue(store, guild_id=1, model="small", duration=12.5)
    ((model, duration, batch_key),) = await sql(
        store, "SELECT model, duration, batch_key FROM jobs WHERE id = ?", (job.id,)
    )
    assert (model, duration) == ("small", 12.5)
    assert batch_key.startswith('["small", 12.5')
