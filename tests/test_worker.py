"""The worker runs real generations off the event loop and reports each job's life."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import pytest

from generation.audio.output import normalise_loudness
from generation.engine.results import GenerationResult
from generation.errors import GenerationError, Undeliverable
from generation.jobs.estimates import Estimate
from generation.jobs.job import FairQueue, Job, JobStatus
from generation.jobs.sqlite import SqliteStore
from generation.jobs.worker import DELIVERY_FAILED, Backoff, Worker
from generation.request import GenerationRequest

REQUEST = GenerationRequest(prompt="lo-fi", model="debug", duration=1.0, seed=1)


class Recorder:
    """A JobListener that writes down what it hears."""

    def __init__(self) -> None:
        self.events: list[tuple[str, int]] = []
        self.results: dict[int, list[GenerationResult]] = {}
        self.errors: dict[int, GenerationError] = {}
        self.moves: list[list[tuple[int, int, float | None]]] = []

    def queue_moved(self, estimates: Sequence[Estimate]) -> None:
        self.moves.append([(e.job.id, e.position, e.seconds) for e in estimates])

    async def job_started(self, job: Job) -> None:
        self.events.append(("started", job.id))

    async def job_progress(self, job: Job) -> None:
        self.events.append(("progress", job.id))

    async def job_finished(self, job: Job, results: list[GenerationResult]) -> str:
        self.events.append(("finished", job.id))
        self.results[job.id] = results
        return f"https://example.invalid/{job.id}"

    async def job_failed(self, job: Job, error: GenerationError) -> None:
        self.events.append(("failed", job.id))
        self.errors[job.id] = error

    async def job_cancelled(self, job: Job) -> None:
        self.events.append(("cancelled", job.id))


@pytest.fixture
def queue():
    return FairQueue()


@pytest.fixture
def recorder():
    return Recorder()


@pytest.fixture
async def store(tmp_path):
    store = await SqliteStore.open(tmp_path / "jobs.sqlite3")
    yield store
    await store.close()


@pytest.fixture
async def worker(engine, queue, store, recorder):
    worker = Worker(engine, queue, store, recorder, progress_interval=0.0)
    yield worker
    await worker.stop(grace=60)
    worker.close()


@pytest.fixture
def submit(queue, store):
    async def submit(request: GenerationRequest = REQUEST, guild: int = 1) -> Job:
        job = await store.add(Job(0, request, guild, 1, 1))
        queue.add(job)
        return job

    return submit


async def test_the_event_loop_keeps_running_while_a_model_generates(
    worker, queue, recorder, submit
):
    await submit(replace(REQUEST, duration=8.0))
    gaps: list[float] = []

    async def heartbeat() -> None:
        last = time.monotonic()
        while worker.busy:
            await asyncio.sleep(0.01)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    worker.wake()
    await asyncio.gather(heartbeat(), worker.join())
    assert ("finished", 1) in recorder.events
    assert len(gaps) > 20  # the loop ticked all through the generation
    assert max(gaps) < 0.5


async def test_each_job_is_reported_started_progressing_and_finished(
    worker, queue, recorder, submit
):
    job = await submit()
    worker.wake()
    await worker.join()
    kinds = [kind for kind, _ in recorder.events]
    assert kinds[0] == "started" and kinds[-1] == "finished"
    assert "progress" in kinds
    assert job.status is JobStatus.DONE
    assert job.progress[0] == job.progress[1] > 0
    assert recorder.results[job.id][0].audio.shape == (1, 32_000)
    assert worker.queue.running == []


async def test_a_running_job_can_be_cancelled(worker, queue, recorder, submit):
    job = await submit(replace(REQUEST, duration=20.0))
    after = await submit()

    async def cancel_once_started() -> None:
        while job.progress[0] < 5:
            await asyncio.sleep(0.01)
        assert worker.cancel(job) is False  # stops at its next step

    worker.wake()
    await asyncio.gather(cancel_once_started(), worker.join())
    assert job.status is JobStatus.CANCELLED
    assert job.progress[0] < job.progress[1]
    assert ("cancelled", job.id) in recorder.events
    assert after.status is JobStatus.DONE


async def test_a_queued_job_leaves_the_queue_at_once(worker, queue, submit):
    job = await submit()
    assert worker.cancel(job) is True
    assert queue.runnable() == []


async def test_a_failing_job_fails_alone(worker, queue, recorder, submit):
    broken = await submit(replace(REQUEST, model="facebook/musicgen-large"))  # cannot download
    fine = await submit()
    worker.wake()
    await worker.join()
    assert broken.status is JobStatus.FAILED
    assert "facebook/musicgen-large" in recorder.errors[broken.id].args[0]
    assert fine.status is JobStatus.DONE


async def test_a_listener_that_raises_does_not_stop_the_worker(
    engine, queue, store, submit, caplog
):
    class Broken(Recorder):
        async def job_started(self, job: Job) -> None:
            raise RuntimeError("Discord is down")

    broken = Broken()
    worker = Worker(engine, queue, store, broken)
    first, second = await submit(), await submit()
    worker.wake()
    await worker.join()
    await worker.stop(grace=60)
    worker.close()
    assert first.status is second.status is JobStatus.DONE
    assert [kind for kind, _ in broken.events] == ["finished", "finished"]
    assert "job listener failed" in caplog.text


async def test_eta_adds_up_the_jobs_ahead(worker, queue, submit):
    worker.rates.load({("debug", 1): 2.0})  # seconds of work per second of audio
    first = await submit(replace(REQUEST, duration=10.0))
    second = await submit(replace(REQUEST, duration=5.0), guild=2)
    assert worker.estimate(first).seconds == pytest.approx(20.0)
    assert worker.estimate(second).seconds == pytest.approx(30.0)
    assert [e.position for e in worker.forecast()] == [1, 2]


async def test_the_jobs_behind_hear_where_they_stand_as_a_batch_starts(worker, recorder, submit):
    worker.rates.load({("debug", 1): 2.0})
    first = await submit(replace(REQUEST, duration=2.0))
    second = await submit(replace(REQUEST, duration=1.0), guild=2)
    worker.wake()
    await worker.join()
    # Taken: the second is next, after all of the first (2 s of work per second of audio).
    assert recorder.moves[0] == [(second.id, 1, pytest.approx(4.0 + 2.0))]
    assert first.status is second.status is JobStatus.DONE


async def test_the_rate_is_learnt_from_finished_jobs_and_kept(worker, store, recorder, submit):
    job = await submit()
    worker.wake()
    await worker.join()
    (result,) = recorder.results[job.id]
    expected = result.generation_seconds / result.seconds
    assert worker.rates.seconds(REQUEST) == pytest.approx(expected * REQUEST.duration)
    assert await store.generation_rates("cpu") == {("debug", 1): pytest.approx(expected)}


async def test_compatible_jobs_of_several_servers_share_each_step_and_arrive_apart(
    engine, worker, recorder, submit
):
    jobs = [await submit(replace(REQUEST, prompt=f"tune {n}", seed=n), guild=n) for n in (1, 2, 3)]
    batch_sizes: list[int] = []
    hook = engine.load("debug").lm.transformer.register_forward_hook(
        lambda module, args, output: batch_sizes.append(args[0].shape[0])
    )
    try:
        worker.wake()
        await worker.join()
    finally:
        hook.remove()
    assert set(batch_sizes) == {2 * 3}  # three requests and their guidance twins, every step
    for job in jobs:
        assert job.status is JobStatus.DONE
        (result,) = recorder.results[job.id]
        assert result.request == job.request
        alone = normalise_loudness(engine.generate(job.request).audio, 32_000)
        np.testing.assert_allclose(result.audio, alone, atol=1e-4)
    assert sorted(job_id for kind, job_id in recorder.events if kind == "finished") == [
        job.id for job in jobs
    ]


async def test_a_job_with_takes_gets_a_result_per_seed_kept_for_later(
    worker, queue, store, recorder
):
    job = await store.add(Job(0, REQUEST, 1, 1, 1, takes=3))
    queue.add(job)
    worker.wake()
    await worker.join()
    results = recorder.results[job.id]
    assert [result.request.seed for result in results] == [1, 2, 3]
    assert not np.allclose(results[0].audio, results[1].audio, atol=1e-3)
    stored = await worker.stored_results(job)
    for kept, delivered in zip(stored, results, strict=True):
        assert kept.request == delivered.request
        np.testing.assert_allclose(kept.audio, delivered.audio, atol=1e-6)  # 24-bit FLAC


async def test_cancelling_one_job_of_a_batch_lets_the_others_finish(
    worker, queue, recorder, submit
):
    stopped = await submit(replace(REQUEST, duration=3.0))
    kept = await submit(replace(REQUEST, duration=3.0, seed=2), guild=2)

    async def cancel_once_started() -> None:
        while stopped.progress[0] < 5:
            await asyncio.sleep(0.01)
        assert worker.cancel(stopped) is False
        assert queue.running == [stopped, kept]

    worker.wake()
    await asyncio.gather(cancel_once_started(), worker.join())
    assert stopped.status is JobStatus.CANCELLED
    assert ("cancelled", stopped.id) in recorder.events
    assert kept.status is JobStatus.DONE
    assert kept.progress[0] == kept.progress[1]


async def test_a_job_that_breaks_its_batch_fails_alone(worker, recorder, submit):
    broken = await submit(replace(REQUEST, prompt="x" * 5000))  # past the prompt limit
    fine = await submit(guild=2)
    worker.wake()
    await worker.join()
    assert broken.status is JobStatus.FAILED
    assert "prompt" in recorder.errors[broken.id].args[0].lower()
    assert fine.status is JobStatus.DONE
    assert broken.attempts == fine.attempts == 1


async def test_requests_sent_together_to_an_idle_worker_share_the_first_batch(
    worker, recorder, submit
):
    first = await submit()
    worker.wake()  # as the job service does for each job it queues
    await asyncio.sleep(0)
    later = [await submit(replace(REQUEST, seed=seed), guild=seed) for seed in (2, 3)]
    for _ in later:
        worker.wake()
    await worker.join()
    assert {job.started_at for job in [first, *later]} == {first.started_at}


#: Quick retries, so a test sees a store come back (or not) in well under a second.
QUICK = Backoff(first=0.02, longest=0.1, tries=20)


class ReadOnlyOnStart(Recorder):
    """Makes the database refuse every write as a job starts, for ``seconds``."""

    def __init__(self, store: SqliteStore, seconds: float) -> None:
        super().__init__()
        self.store = store
        self.seconds = seconds
        self.reopening: list[asyncio.Task] = []

    async def job_started(self, job: Job) -> None:
        await super().job_started(job)
        await refuse_writes(self.store, self.seconds, self.reopening)


async def refuse_writes(store: SqliteStore, seconds: float, reopening: list[asyncio.Task]) -> None:
    """The real store, made to refuse writes as a read-only database does, for a while."""
    await store._db.execute("PRAGMA query_only = ON")

    async def allow_later() -> None:
        await asyncio.sleep(seconds)
        await store._db.execute("PRAGMA query_only = OFF")

    reopening.append(asyncio.get_running_loop().create_task(allow_later()))


async def test_a_job_whose_end_the_database_refuses_is_recorded_once_it_takes_writes_again(
    engine, queue, store, submit
):
    listener = ReadOnlyOnStart(store, seconds=0.3)
    worker = Worker(engine, queue, store, listener, store_retry=QUICK)
    first, second = await submit(), await submit()
    worker.wake()
    await worker.join()
    await worker.stop(grace=60)
    worker.close()
    for job in (first, second):  # the worker kept serving
        stored = await store.get(job.id)
        assert (stored.status, stored.delivered) == (JobStatus.DONE, True)
        assert ("finished", job.id) in listener.events
    assert (await store.load_result(first)) is not None


async def test_a_job_whose_end_is_never_recorded_is_still_told_and_the_worker_goes_on(
    engine, queue, store, submit
):
    listener = ReadOnlyOnStart(store, seconds=0.5)
    worker = Worker(engine, queue, store, listener, store_retry=Backoff(0.01, 0.01, tries=3))
    job = await submit()
    worker.wake()
    await worker.join()
    await asyncio.gather(*listener.reopening)
    listener.seconds = 0.0
    later = await submit()
    worker.wake()
    await worker.join()
    await worker.stop(grace=60)
    worker.close()
    assert ("finished", job.id) in listener.events  # told, though the store could not say so
    assert (await store.get(job.id)).status is JobStatus.RUNNING  # so a restart runs it again
    assert ("finished", later.id) in listener.events
    assert (await store.get(later.id)).status is JobStatus.DONE


async def test_a_job_the_store_will_not_claim_for_a_while_waits_then_runs_once(
    worker, queue, store, recorder, submit
):
    worker.store_retry = QUICK
    job = await submit()
    reopening: list[asyncio.Task] = []
    await refuse_writes(store, 0.3, reopening)
    worker.wake()
    await worker.join()
    await worker.stop(grace=60)
    stored = await store.get(job.id)
    assert (stored.status, stored.attempts, stored.delivered) == (JobStatus.DONE, 1, True)
    assert queue.runnable() == []


async def test_a_job_the_store_never_claims_goes_back_to_the_queue(
    worker, queue, store, recorder, submit
):
    worker.store_retry = Backoff(0.01, 0.01, tries=2)
    job = await submit()
    reopening: list[asyncio.Task] = []
    await refuse_writes(store, 60.0, reopening)
    queue.take([job])  # one batch, as the worker's loop runs it
    await worker._run([job])
    assert queue.runnable() == [job]
    assert job.status is JobStatus.QUEUED
    assert recorder.events == []
    await store._db.execute("PRAGMA query_only = OFF")
    reopening[0].cancel()
    worker.wake()
    await worker.join()
    await worker.stop(grace=60)
    assert (await store.get(job.id)).status is JobStatus.DONE


async def test_a_deleted_results_folder_is_made_again(worker, store, recorder, submit):
    job = await submit()
    shutil.rmtree(store.results)
    worker.wake()
    await worker.join()
    await worker.stop(grace=60)
    assert ("finished", job.id) in recorder.events
    assert (await store.get(job.id)).delivered
    assert store.result_path(job).exists()


class FailsToDeliver(Recorder):
    """Delivering fails ``times`` times (Discord is down), then works."""

    def __init__(self, times: int, error: Exception) -> None:
        super().__init__()
        self.times = times
        self.error = error

    async def job_finished(self, job: Job, results: list[GenerationResult]) -> str:
        if self.times:
            self.times -= 1
            raise self.error
        return await super().job_finished(job, results)


async def deliver_with(engine, queue, store, submit, listener) -> Job:
    worker = Worker(engine, queue, store, listener, delivery_retry=replace(QUICK, tries=4))
    job = await submit()
    worker.wake()
    await worker.join()
    while worker._deliveries:
        await asyncio.sleep(0.01)
    await worker.stop(grace=60)
    worker.close()
    stored = await store.get(job.id)
    assert stored is not None
    return stored


async def test_a_failed_delivery_is_tried_again_and_each_try_counted(engine, queue, store, submit):
    listener = FailsToDeliver(2, ConnectionError("Discord is down"))
    job = await deliver_with(engine, queue, store, submit, listener)
    assert ("finished", job.id) in listener.events
    assert (job.delivered, job.delivery_attempts, job.delivery_failure) == (True, 2, None)


async def test_a_delivery_that_always_fails_is_given_up_and_kept_for_history(
    engine, queue, store, submit
):
    listener = FailsToDeliver(100, ConnectionError("Discord is down"))
    job = await deliver_with(engine, queue, store, submit, listener)
    assert (job.delivered, job.delivery_attempts) == (False, 4)
    assert job.delivery_failure == DELIVERY_FAILED
    assert await store.undelivered() == []  # no restart tries it again


async def test_an_outcome_nobody_can_receive_is_kept_for_history_at_once(
    engine, queue, store, submit
):
    listener = FailsToDeliver(100, Undeliverable("the channel and direct messages refuse it"))
    job = await deliver_with(engine, queue, store, submit, listener)
    assert (job.delivered, job.delivery_attempts) == (False, 0)
    assert job.delivery_failure == "the channel and direct messages refuse it"
