"""Generation rates and the queue's forecast: one pass over the store's queue order gives what
a continuous worker claiming job after job gives."""

from __future__ import annotations

import json
import math
import random

import pytest

from generation.jobs.estimates import (
    PLANNED_TAKES,
    GenerationRates,
    WorkAhead,
    eta,
    forecast,
    rate_key,
)
from generation.jobs.job import Job, QueueEntry
from generation.jobs.scheduling import BatchPolicy
from generation.jobs.sqlite import SqliteStore
from generation.jobs.store import GuildSettings
from generation.request import GenerationRequest, batch_key


def test_a_first_guess_follows_the_model_size_and_the_device():
    cpu, gpu = GenerationRates("cpu"), GenerationRates("cuda")
    sizes = ["debug", "facebook/musicgen-small", "facebook/musicgen-medium", "large"]
    assert [cpu.rate(model) for model in sizes] == sorted(cpu.rate(model) for model in sizes)
    for model in sizes:
        assert gpu.rate(model) < cpu.rate(model)
    # A batch costs more than one request, and less than its requests one by one.
    assert cpu.rate("small") < cpu.rate("small", rows=4) < 4 * cpu.rate("small")


def test_learnt_rates_replace_the_guess_and_inform_other_batch_sizes():
    rates = GenerationRates("cpu")
    guess = rates.rate("debug", rows=4) / rates.rate("debug", rows=1)
    assert rates.observe("debug", 1, audio_seconds=10.0, work_seconds=2.0) == 0.2
    assert rates.rate("debug") == 0.2
    assert rates.rate("debug", rows=4) == pytest.approx(0.2 * guess)
    rates.observe("debug", 1, audio_seconds=10.0, work_seconds=4.0)
    assert rates.rate("debug") == pytest.approx(0.2 + rates.smoothing * 0.2)
    assert rates.rate("debug-stereo") == GenerationRates("cpu").rate("debug-stereo")


async def claimed_as_places_free(store: SqliteStore, rates, capacity: int, sharing: int):
    """The ETAs of the claimable jobs, claiming from the store one job at a time whenever
    fewer than ``capacity`` requests decode, as a continuous worker does (with no model
    loaded), each job decoding for its rate at ``sharing`` requests a step."""
    now, decoding, etas = 0.0, [], {}  # decoding: (end, takes)
    while True:
        while sum(takes for _, takes in decoding) >= capacity:
            first = min(decoding)
            decoding.remove(first)
            now = max(now, first[0])
        claimed = await store.claim(
            "w", models=None, loaded=(), max_rows=1, max_model_wait=0, lease_seconds=60
        )
        if not claimed:
            return etas
        (job,) = claimed
        etas[job.id] = now + rates.seconds(job.request, sharing)
        decoding.append((etas[job.id], job.takes))


@pytest.mark.parametrize("seed", range(20))
async def test_the_forecast_starts_jobs_as_the_store_gives_them_to_free_places(tmp_path, seed):
    chance = random.Random(seed)
    store = await SqliteStore.open(tmp_path / "jobs.sqlite3")
    rates = GenerationRates("cpu")
    rates.load({("debug", 1): 0.5, ("debug-stereo", 3): 2.0})
    policy = BatchPolicy(max_rows=chance.choice([1, 2, 4, 6]))
    await store.save_guild_settings(GuildSettings(4, paused=True))
    for _ in range(39):
        request = GenerationRequest(
            prompt="x",
            model=chance.choice(["debug", "debug-stereo"]),
            duration=chance.choice([1.0, 2.0, 5.0]),
            seed=1,
        )
        takes = chance.choice([1, 1, 2, 3, 4])
        job = await store.add(Job(0, request, chance.randint(1, 4), 1, 1, takes=takes))
        await store.release(job, None)
    order = await store.queue_order()
    try:
        estimates = forecast(order, [], rates, policy)
        two_workers = forecast(order, [], rates, policy, workers=2)
        # 39 jobs fill every place: each worker's steps carry max_rows requests.
        alone = await claimed_as_places_free(store, rates, policy.max_rows, policy.max_rows)
        await store.requeue_expired(max_attempts=10, now=math.inf)  # every job back in place
        pooled = await claimed_as_places_free(store, rates, 2 * policy.max_rows, policy.max_rows)
    finally:
        await store.close()

    assert all(entry.guild_id != 4 for entry in order)  # paused: it waits for an admin
    assert [e.job_id for e in estimates] == [entry.job_id for entry in order]
    assert [e.position for e in estimates] == list(range(1, len(estimates) + 1))
    assert set(alone) == {entry.job_id for entry in order}
    for estimate, shared in zip(estimates, two_workers, strict=True):
        assert estimate.seconds == pytest.approx(alone[estimate.job_id])
        assert shared.seconds == pytest.approx(pooled[shared.job_id])  # their places pooled


def test_a_job_starts_at_once_while_a_place_is_free_and_shares_the_steps():
    rates = GenerationRates("cpu")
    rates.load({("debug", 1): 1.0, ("debug", 2): 1.5})
    running = Job(1, GenerationRequest(prompt="x", model="debug", duration=10.0), 1, 1, 1)
    running.progress, running.worker_id = (30, 100), "w"
    waiting = QueueEntry(2, 1, "debug", 5.0, 1, "key")
    (shared,) = forecast([waiting], [running], rates, BatchPolicy(max_rows=2))
    assert (shared.job_id, shared.position) == (2, 1)
    assert shared.seconds == pytest.approx(1.5 * 5.0)  # two requests share its steps
    # One place: it waits for what is left of the running job.
    (alone,) = forecast([waiting], [running], rates, BatchPolicy(max_rows=1))
    assert alone.seconds == pytest.approx(7.0 + 5.0)


def test_with_two_workers_a_job_takes_the_place_that_frees_first():
    rates = GenerationRates("cpu")
    rates.load({("debug", 1): 1.0})
    long = Job(1, GenerationRequest(prompt="x", model="debug", duration=10.0), 1, 1, 1)
    short = Job(2, GenerationRequest(prompt="y", model="debug", duration=4.0), 2, 1, 1)
    long.worker_id, short.worker_id = "a", "b"
    waiting = QueueEntry(3, 1, "debug", 5.0, 1, "key")
    (estimate,) = forecast([waiting], [long, short], rates, BatchPolicy(max_rows=1), workers=2)
    assert estimate.seconds == pytest.approx(4.0 + 5.0)


async def test_the_eta_of_one_job_spreads_the_work_ahead_over_the_places(tmp_path):
    store = await SqliteStore.open(tmp_path / "jobs.sqlite3")
    request = GenerationRequest(prompt="x", model="debug", duration=2.0, seed=1)
    try:
        for guild in (1, 2, 3):  # three rows of one kind ahead
            await store.release(await store.add(Job(0, request, guild, 1, 1)), None)
        other = GenerationRequest(prompt="y", model="debug-stereo", duration=1.0, seed=1)
        await store.release(await store.add(Job(0, other, 4, 1, 1, takes=2)), None)
        job = await store.add(Job(0, request, 5, 1, 1))
        await store.release(job, None)
        ahead = await store.work_ahead(job)
    finally:
        await store.close()
    assert sorted(ahead, key=lambda work: work.model) == [
        WorkAhead("debug", 2.0, 3),
        WorkAhead("debug-stereo", 1.0, 2),
    ]
    rates = GenerationRates("cpu")
    rates.load({("debug", 2): 1.5, ("debug-stereo", 2): 3.0})
    policy = BatchPolicy(max_rows=2)
    # Five requests of 3 s ahead (1.5 * 2 s and 3.0 * 1 s) over two places start at 0, 0,
    # 3, 3 and 6 s; a place frees at 6 s, then its own 3 s.
    assert eta(ahead, job, [], rates, policy) == pytest.approx(6.0 + 3.0)
    # Over four places: at 0, 0, 0, 0 and 3 s; a place frees at 3 s.
    assert eta(ahead, job, [], rates, policy, workers=2) == pytest.approx(3.0 + 3.0)


def test_beyond_the_planned_requests_the_work_ahead_is_spread_over_the_places():
    rates = GenerationRates("cpu")
    rates.load({("debug", 4): 1.0})
    policy = BatchPolicy(max_rows=4)
    count = 10 * PLANNED_TAKES + 2
    ahead = [QueueEntry(index, 1, "debug", 2.0, 1, "key") for index in range(count)]
    job = Job(count, GenerationRequest(prompt="y", model="debug", duration=3.0), 2, 1, 1)
    *_, last = forecast([*ahead, QueueEntry(count, 2, "debug", 3.0, 1, "key")], [], rates, policy)
    estimate = eta([WorkAhead("debug", 2.0, count)], job, [], rates, policy)
    assert last.seconds == pytest.approx(2.0 * (count // 4) + 3.0)
    assert abs(estimate - last.seconds) <= 2.0  # within one request ahead


@pytest.mark.parametrize("running_seconds", [0.0, 3.0, 12.0])
def test_the_eta_of_one_job_is_the_forecast_when_the_work_ahead_fills_the_places(
    running_seconds,
):
    rates = GenerationRates("cpu")
    rates.load({("debug", 4): 1.0})
    policy = BatchPolicy(max_rows=4)
    running = [
        Job(index, GenerationRequest(prompt="x", model="debug", duration=running_seconds), 1, 1, 1)
        for index in range(1, 5)
    ]
    ahead = [QueueEntry(10 + index, 1, "debug", 2.0, 1, "key") for index in range(8)]
    job = Job(20, GenerationRequest(prompt="y", model="debug", duration=3.0), 2, 1, 1)
    *_, last = forecast([*ahead, QueueEntry(20, 2, "debug", 3.0, 1, "key")], running, rates, policy)
    work = [WorkAhead("debug", 2.0, len(ahead))]
    assert eta(work, job, running, rates, policy) == pytest.approx(last.seconds)
    assert last.seconds == pytest.approx(running_seconds + 2 * 2.0 + 3.0)


def test_mbd_decoding_is_estimated_and_learnt_apart_from_encodec():
    rates = GenerationRates("cpu")
    encodec = GenerationRequest(prompt="x", model="small", duration=10.0)
    mbd = GenerationRequest(prompt="x", model="small", duration=10.0, decoder="mbd")
    assert rates.seconds(mbd) > rates.seconds(encodec) > 0  # before any job is timed
    rates.observe(rate_key(mbd), 1, 10.0, 300.0)
    assert rates.seconds(mbd) == pytest.approx(300.0)
    assert rates.seconds(encodec) == pytest.approx(60.0)  # EnCodec's guess is untouched
    # The queue's forecast reads the decoder from the batch key.
    entries = [
        QueueEntry(job, 1, "small", 10.0, 1, json.dumps(batch_key(request), default=list))
        for job, request in ((1, mbd), (2, encodec))
    ]
    first, second = forecast(entries, [], rates, BatchPolicy(max_rows=1))
    assert first.seconds == pytest.approx(300.0)
    assert second.seconds == pytest.approx(300.0 + 60.0)
