"""The queue in the store, as a worker serves it: servers in turn, each first in first out,
paused servers skipped, jobs not yet released counted but not run."""

from __future__ import annotations

import pytest

from generation.jobs.job import Job, JobStatus
from generation.jobs.scheduling import BatchPolicy
from generation.jobs.sqlite import SqliteStore
from generation.jobs.store import GuildSettings
from generation.request import GenerationRequest

from .job_helpers import Recorder, System, submit

REQUEST = GenerationRequest(prompt="p", model="debug", duration=0.5, seed=1)
ONE_AT_A_TIME = BatchPolicy(max_rows=1)


@pytest.fixture
async def store(tmp_path):
    store = await SqliteStore.open(tmp_path / "jobs.sqlite3")
    yield store
    await store.close()


@pytest.fixture
async def system(store, engine):
    system = System(store, Recorder(), engine)
    await system.start()
    yield system
    await system.stop()


async def served(system: System, *jobs: Job) -> list[int]:
    """Run ``jobs`` one at a time; the order they started in."""
    await system.worker(batch_policy=ONE_AT_A_TIME)
    stored = await system.settled(*jobs)
    assert all(job.status is JobStatus.DONE for job in stored)
    return [job.id for job in sorted(stored, key=lambda job: job.started_at)]


async def test_servers_are_served_in_turn(system, store):
    busy = [await submit(store, REQUEST, guild=1) for _ in range(4)]
    single = await submit(store, REQUEST, guild=2)
    # The single job is delayed by at most one job of the busy server.
    assert [job.id for job in await store.queued(1)] == [job.id for job in busy]
    assert await store.position(single) == 2
    assert await served(system, *busy, single) == [busy[0].id, single.id] + [
        job.id for job in busy[1:]
    ]


async def test_each_server_is_first_in_first_out(system, store):
    jobs = [await submit(store, REQUEST, guild=1, user=user) for user in (1, 2, 3)]
    assert await served(system, *jobs) == [job.id for job in jobs]


async def test_a_server_arriving_while_another_runs_waits_for_at_most_one_more_job(store):
    a1, _, a3, a4 = [await submit(store, REQUEST, guild=1) for _ in range(4)]
    claimed = await store.claim(
        "w", models=None, loaded=(), max_rows=1, max_model_wait=0, lease_seconds=60
    )
    assert [job.id for job in claimed] == [a1.id]  # a1 runs
    b1 = await submit(store, REQUEST, guild=2)
    order = [entry.job_id for entry in await store.queue_order()]
    assert order.index(b1.id) <= 1  # ahead of a3 and a4
    assert order.index(a3.id) > order.index(b1.id)
    assert order[-1] == a4.id


async def test_paused_servers_are_skipped_and_keep_their_jobs(system, store):
    await store.save_guild_settings(GuildSettings(1, paused=True))
    paused = await submit(store, REQUEST, guild=1)
    other = await submit(store, REQUEST, guild=2)
    await system.worker(batch_policy=ONE_AT_A_TIME)
    (other,) = await system.settled(other)
    assert other.status is JobStatus.DONE
    assert (await store.get(paused.id)).status is JobStatus.QUEUED
    assert [job.id for job in await store.queued(1)] == [paused.id]
    assert await store.position(paused) is None  # it waits for an admin, not for its turn
    await store.save_guild_settings(GuildSettings(1, paused=False))  # the worker hears it
    (paused,) = await system.settled(paused)
    assert paused.status is JobStatus.DONE


async def test_a_job_not_yet_released_counts_towards_the_limits_but_does_not_run(system, store):
    held = await store.add(Job(0, REQUEST, 1, 10, 1))  # its requester is not told yet
    assert await store.live_counts(1, 1) == (1, 1)
    other = await submit(store, REQUEST, guild=2)
    await system.worker(batch_policy=ONE_AT_A_TIME)
    await system.settled(other)
    assert (await store.get(held.id)).status is JobStatus.QUEUED
    await store.release(held, None)
    (held,) = await system.settled(held)
    assert held.status is JobStatus.DONE
    assert await store.live_counts(1, 1) == (0, 0)


async def test_a_job_cancelled_before_release_stays_cancelled(system, store):
    held = await store.add(Job(0, REQUEST, 1, 10, 1))
    assert await store.request_cancel(held.id) is JobStatus.CANCELLED
    await store.release(held, None)  # the requester was told after all: nothing to run
    await system.worker()
    (held,) = await system.settled(held)
    assert (held.status, held.attempts) == (JobStatus.CANCELLED, 0)
