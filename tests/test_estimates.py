"""Generation rates and the queue's forecast: one pass gives what planning batch after batch
gives."""

from __future__ import annotations

import random

import pytest

from generation.jobs.estimates import GenerationRates, forecast
from generation.jobs.job import FairQueue, Job
from generation.jobs.scheduling import BatchPolicy, plan_batch
from generation.request import GenerationRequest


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


def planned_one_batch_at_a_time(queue: FairQueue, rates, policy) -> dict[int, float]:
    """The ETAs of the runnable jobs, planning each batch as the worker does."""
    order, ahead, etas = queue.runnable(), 0.0, {}
    while order:
        batch = plan_batch(order, policy=policy, loaded_models=(), now=0.0)
        ahead += rates.seconds(batch[0].request, sum(job.takes for job in batch))
        etas |= {job.id: ahead for job in batch}
        order = [job for job in order if job not in batch]
    return etas


@pytest.mark.parametrize("seed", range(20))
def test_the_forecast_batches_the_queue_as_the_worker_would(seed):
    chance = random.Random(seed)
    queue, rates = FairQueue(), GenerationRates("cpu")
    policy = BatchPolicy(max_rows=chance.choice([1, 2, 4, 6]))
    for job_id in range(1, 40):
        request = GenerationRequest(
            prompt="x",
            model=chance.choice(["debug", "debug-stereo"]),
            duration=chance.choice([1.0, 2.0]),
        )
        takes = chance.choice([1, 1, 2, 3, 4])
        queue.add(
            Job(
                job_id, request, guild_id=chance.randint(1, 4), channel_id=1, user_id=1, takes=takes
            )
        )
    queue.pause(4)

    estimates = forecast(queue.service_order(), [], rates, policy, queue.is_paused)

    expected = planned_one_batch_at_a_time(queue, rates, policy)
    assert [e.job for e in estimates] == queue.service_order()
    assert [e.position for e in estimates] == list(range(1, len(estimates) + 1))
    for estimate in estimates:
        if estimate.job.guild_id == 4:
            assert estimate.seconds is None  # paused: it waits for an admin
        else:
            assert estimate.seconds == pytest.approx(expected[estimate.job.id])


def test_the_running_batch_counts_what_is_left_of_it():
    rates = GenerationRates("cpu")
    rates.load({("debug", 1): 1.0})
    running = Job(1, GenerationRequest(prompt="x", model="debug", duration=10.0), 1, 1, 1)
    running.progress = (30, 100)
    waiting = Job(2, GenerationRequest(prompt="y", model="debug", duration=5.0), 1, 1, 1)
    (estimate,) = forecast([waiting], [running], rates, BatchPolicy(), lambda guild: False)
    assert estimate.seconds == pytest.approx(7.0 + 5.0)
