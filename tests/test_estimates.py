"""Generation rates and the queue's forecast: one pass over the store's queue order gives what
claiming batch after batch gives."""

from __future__ import annotations

import json
import random

import pytest

from generation.jobs.estimates import GenerationRates, WorkAhead, eta, forecast, rate_key
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


async def claimed_one_batch_at_a_time(store: SqliteStore, rates, policy) -> dict[int, float]:
    """The ETAs of the claimable jobs, claiming each batch from the store as a worker does
    (with no model loaded: plain turns)."""
    ahead, etas = 0.0, {}
    while batch := await store.claim(
        "w",
        models=None,
        loaded=(),
        max_rows=policy.max_rows,
        max_model_wait=0,
        lease_seconds=60,
    ):
        ahead += rates.seconds(batch[0].request, sum(job.takes for job in batch))
        etas |= {job.id: ahead for job in batch}
    return etas


@pytest.mark.parametrize("seed", range(20))
async def test_the_forecast_batches_the_queue_as_the_store_claims_it(tmp_path, seed):
    chance = random.Random(seed)
    store = await SqliteStore.open(tmp_path / "jobs.sqlite3")
    rates = GenerationRates("cpu")
    policy = BatchPolicy(max_rows=chance.choice([1, 2, 4, 6]))
    await store.save_guild_settings(GuildSettings(4, paused=True))
    for _ in range(39):
        request = GenerationRequest(
            prompt="x",
            model=chance.choice(["debug", "debug-stereo"]),
            duration=chance.choice([1.0, 2.0]),
            seed=1,
        )
        takes = chance.choice([1, 1, 2, 3, 4])
        job = await store.add(Job(0, request, chance.randint(1, 4), 1, 1, takes=takes))
        await store.release(job, None)
    order = await store.queue_order()
    try:
        estimates = forecast(order, [], rates, policy)
        halved = forecast(order, [], rates, policy, workers=2)
        expected = await claimed_one_batch_at_a_time(store, rates, policy)
    finally:
        await store.close()

    assert all(entry.guild_id != 4 for entry in order)  # paused: it waits for an admin
    assert [e.job_id for e in estimates] == [entry.job_id for entry in order]
    assert [e.position for e in estimates] == list(range(1, len(estimates) + 1))
    assert set(expected) == {entry.job_id for entry in order}
    for estimate, shared in zip(estimates, halved, strict=True):
        assert estimate.seconds == pytest.approx(expected[estimate.job_id])
        assert shared.seconds == pytest.approx(estimate.seconds / 2)  # two workers


def test_the_running_batch_counts_what_is_left_of_it():
    rates = GenerationRates("cpu")
    rates.load({("debug", 1): 1.0})
    running = Job(1, GenerationRequest(prompt="x", model="debug", duration=10.0), 1, 1, 1)
    running.progress, running.worker_id = (30, 100), "w"
    waiting = QueueEntry(2, 1, "debug", 5.0, 1, "key")
    (estimate,) = forecast([waiting], [running], rates, BatchPolicy())
    assert (estimate.job_id, estimate.position) == (2, 1)
    assert estimate.seconds == pytest.approx(7.0 + 5.0)


def test_workers_run_side_by_side_so_the_longest_running_batch_counts():
    rates = GenerationRates("cpu")
    rates.load({("debug", 1): 1.0})
    long = Job(1, GenerationRequest(prompt="x", model="debug", duration=10.0), 1, 1, 1)
    short = Job(2, GenerationRequest(prompt="y", model="debug", duration=4.0), 2, 1, 1)
    long.worker_id, short.worker_id = "a", "b"
    waiting = QueueEntry(3, 1, "debug", 5.0, 1, "key")
    (estimate,) = forecast([waiting], [long, short], rates, BatchPolicy(), workers=2)
    assert estimate.seconds == pytest.approx(10.0 + 5.0 / 2)


async def test_the_eta_of_one_job_counts_the_work_ahead_in_full_batches(tmp_path):
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
    rates.load({("debug", 1): 1.0, ("debug", 2): 1.5, ("debug-stereo", 2): 3.0})
    policy = BatchPolicy(max_rows=2)
    # A full batch of two and one of one, the other model's batch, then its own.
    expected = 1.5 * 2.0 + 1.0 * 2.0 + 3.0 * 1.0 + 1.0 * 2.0
    assert eta(ahead, job, [], rates, policy) == pytest.approx(expected)
    assert eta(ahead, job, [], rates, policy, workers=2) == pytest.approx(expected / 2)


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
    first, second = forecast(entries, [], rates, BatchPolicy())
    assert first.seconds == pytest.approx(300.0)
    assert second.seconds == pytest.approx(300.0 + 60.0)
