"""How a worker's claims go: servers in turn at every place, the loaded model first for a
while; and how the batch-at-a-time worker (the benchmark's baseline) forms its batches:
compatible jobs together, takes as rows."""

from __future__ import annotations

from dataclasses import replace

import pytest

from generation.jobs.job import Job, JobStatus
from generation.jobs.scheduling import BatchPolicy
from generation.jobs.sqlite import SqliteStore
from generation.request import AudioClip, GenerationRequest

from .helpers import sine
from .job_helpers import Recorder, System, submit

REQUEST = GenerationRequest(prompt="lo-fi", model="debug", duration=0.5, seed=1)


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


async def batches(system: System, *jobs: Job, **policy) -> list[list[int]]:
    """Let a batch-at-a-time worker run ``jobs``; the batches it claimed, in order (a claim
    starts its jobs at one time)."""
    await system.worker(batch_policy=BatchPolicy(**policy), join_running=False)
    stored = await system.settled(*jobs)
    assert all(job.status is JobStatus.DONE for job in stored)
    by_start: dict[float, list[int]] = {}
    for job in sorted(stored, key=lambda job: (job.started_at, job.id)):
        by_start.setdefault(job.started_at, []).append(job.id)
    return list(by_start.values())


def ids(*jobs: Job) -> list[int]:
    """A batch's jobs (which of them went first within it is not seen from outside)."""
    return sorted(job.id for job in jobs)


@pytest.mark.parametrize("max_rows", [3, 5])
async def test_compatible_jobs_from_every_server_share_a_batch_in_turn(system, store, max_rows):
    a1, a2, a3 = [await submit(store, replace(REQUEST, prompt=f"a{n}"), 1) for n in range(3)]
    b1 = await submit(store, REQUEST, 2)
    c1 = await submit(store, replace(REQUEST, prompt="c", seed=None), 3)
    planned = await batches(system, a1, a2, a3, b1, c1, max_rows=max_rows)
    # Each server gets a row before any gets a second one.
    if max_rows == 3:
        assert planned == [ids(a1, b1, c1), ids(a2, a3)]
    else:
        assert planned == [ids(a1, b1, c1, a2, a3)]


async def test_jobs_with_other_options_wait_for_a_batch_of_their_own(system, store):
    a1 = await submit(store, REQUEST, 1)
    longer = await submit(store, replace(REQUEST, duration=1.0), 2)
    a2 = await submit(store, REQUEST, 1)
    assert await batches(system, a1, longer, a2) == [ids(a1, a2), ids(longer)]


async def test_takes_count_as_rows(system, store):
    variations = await submit(store, REQUEST, 1, takes=3)
    b1 = await submit(store, REQUEST, 2)
    c1 = await submit(store, REQUEST, 3)  # no room left for it
    assert await batches(system, variations, b1, c1, max_rows=4) == [
        ids(variations, b1),
        ids(c1),
    ]


async def test_a_job_with_more_takes_than_rows_runs_alone_all_together(system, store):
    alone = await submit(store, REQUEST, 1, takes=4)
    other = await submit(store, REQUEST, 2)
    assert await batches(system, alone, other, max_rows=2) == [ids(alone), ids(other)]


@pytest.mark.parametrize("max_model_wait", [120.0, 0.0])
async def test_jobs_for_the_loaded_model_go_first_for_a_while(
    engine, system, store, max_model_wait
):
    engine.load("debug")
    stereo = await submit(store, replace(REQUEST, model="debug-stereo"), 1)
    mono = await submit(store, REQUEST, 2)
    planned = await batches(system, stereo, mono, max_model_wait=max_model_wait)
    if max_model_wait:
        assert planned == [ids(mono), ids(stereo)]  # the model is not swapped for one job
    else:  # once the other model's job has waited long enough, the model is switched
        assert planned == [ids(stereo), ids(mono)]


async def test_taking_a_batch_gives_each_of_its_servers_its_turn(system, store):
    a1, b1 = await submit(store, REQUEST, 1), await submit(store, REQUEST, 2)
    a2, b2 = await submit(store, REQUEST, 1), await submit(store, REQUEST, 2)
    c1 = await submit(store, replace(REQUEST, duration=1.0), 3)
    # c waited while a and b were served: it goes before their second jobs.
    assert await batches(system, a1, b1, a2, b2, c1, max_rows=2) == [
        ids(a1, b1),
        ids(c1),
        ids(a2, b2),
    ]


async def test_jobs_whose_clips_are_in_the_store_batch_with_their_own_kind(system, store):
    """Their batch key is known from the clips as kept, so they need not run alone."""
    intro = AudioClip(sine(0.5, 330.0), 32_000)
    extending = replace(REQUEST, duration=1.0, continuation=intro)
    first = await submit(store, extending, 1)
    second = await submit(store, replace(extending, seed=2), 2)
    plain = await submit(store, REQUEST, 3)
    assert await batches(system, first, second, plain) == [ids(first, second), ids(plain)]


async def test_a_job_that_fits_joins_however_many_too_big_ones_are_ahead_of_it(system, store):
    first = await submit(store, REQUEST, 1)
    too_big = [await submit(store, REQUEST, guild, takes=2) for guild in range(2, 9)]
    small = await submit(store, REQUEST, 9)
    planned = await batches(system, first, *too_big, small, max_rows=2)
    assert planned[0] == ids(first, small)


async def test_a_continuous_worker_takes_one_job_at_a_time_servers_in_turn(system, store):
    a1, a2, a3 = [await submit(store, replace(REQUEST, prompt=f"a{n}"), 1) for n in range(3)]
    b1 = await submit(store, replace(REQUEST, top_k=10), 2)
    c1 = await submit(store, replace(REQUEST, duration=1.0), 3)
    await system.worker(batch_policy=BatchPolicy(max_rows=5))
    stored = await system.settled(a1, a2, a3, b1, c1)
    claimed = [job.id for job in sorted(stored, key=lambda job: job.started_at)]
    # Each server gets a place before any gets a second one, whatever their options.
    assert claimed == [a1.id, b1.id, c1.id, a2.id, a3.id]
