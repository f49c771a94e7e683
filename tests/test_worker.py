"""The worker claims from the store, runs real generations off the event loop, holds its jobs
by lease, and records each outcome there; the watcher tells the requesters."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Awaitable, Iterator
from contextlib import contextmanager
from dataclasses import replace

import numpy as np
import pytest

from generation.audio.output import normalise_loudness
from generation.errors import Undeliverable
from generation.jobs.job import Job, JobStatus
from generation.jobs.retry import Backoff
from generation.jobs.sqlite import SqliteStore
from generation.jobs.store import Channel
from generation.jobs.watcher import DELIVERY_FAILED
from generation.jobs.worker import Leases
from generation.request import AudioClip

from .helpers import sine
from .job_helpers import QUICK, REQUEST, Recorder, System, ended, submit, until_stored


@pytest.fixture
def recorder():
    return Recorder()


@pytest.fixture
async def store(tmp_path):
    store = await SqliteStore.open(tmp_path / "jobs.sqlite3")
    yield store
    await store.close()


@pytest.fixture
async def system(store, recorder, engine):
    system = System(store, recorder, engine)
    await system.start()
    yield system
    await system.stop()


async def test_the_event_loop_keeps_running_while_a_model_generates(system, store):
    # A loop too: the audio thread runs the beat tracker, whose first import would hold the
    # GIL for tenths of a second at a time had the worker not made it as it started.
    job = await submit(store, replace(REQUEST, duration=8.0, loop=2))
    gaps: list[float] = []
    await system.worker()
    last = time.monotonic()
    while (await store.get(job.id)).status is not JobStatus.DONE:
        await asyncio.sleep(0.01)
        now = time.monotonic()
        gaps.append(now - last)
        last = now
    assert len(gaps) > 20  # the loop ticked all through the generation
    assert max(gaps) < 0.2


async def test_each_job_is_reported_started_progressing_and_finished(system, store, recorder):
    job = await submit(store, replace(REQUEST, duration=2.0))
    worker = await system.worker()
    (stored,) = await system.settled(job)
    kinds = recorder.kinds(job)
    assert kinds[0] == "started" and kinds[-1] == "finished" and kinds.count("finished") == 1
    assert "progress" in kinds
    heard = recorder.progress[job.id]
    assert heard == sorted(heard) and all(0 < done < total for done, total in heard)
    assert (stored.status, stored.attempts, stored.delivered) == (JobStatus.DONE, 1, True)
    assert stored.worker_id is None and stored.progress == (0, 0)  # the lease went with the run
    assert recorder.results[job.id][0].audio.shape == (1, 64_000)
    assert worker.running == [] and await store.running() == []


async def test_progress_is_written_at_most_once_per_interval(system, store):
    writes: list[float] = []
    store.subscribe(Channel.JOBS, lambda _: writes.append(time.monotonic()))
    job = await submit(store, replace(REQUEST, duration=8.0))
    await system.worker(progress_interval=0.2)
    started = time.monotonic()
    await ended(store, job)
    took = time.monotonic() - started
    progress_writes = len(writes) - 2  # the claim and the finish notify too
    # 8 s of audio is 400 steps: unthrottled, that many writes.
    assert 1 <= progress_writes <= took / 0.2 + 2 < 400


async def test_a_cancel_in_the_store_stops_a_running_job_at_its_next_step(system, store, recorder):
    job = await submit(store, replace(REQUEST, duration=30.0))
    after = await submit(store, guild=2)
    # No heartbeat, no timer: only the CANCEL notification can reach the worker in time.
    await system.worker(leases=Leases(seconds=600, heartbeat=300, sweep=300, poll=300))
    await recorder.until(lambda: any(done >= 5 for done, _ in recorder.progress.get(job.id, [])))
    asked = time.monotonic()
    assert await store.request_cancel(job.id) is JobStatus.RUNNING
    await ended(store, job)
    assert time.monotonic() - asked < 2.0
    stored, done = await system.settled(job, after)
    assert (stored.status, stored.delivered) == (JobStatus.CANCELLED, True)
    assert recorder.kinds(job)[-1] == "cancelled"
    assert max(done for done, _ in recorder.progress[job.id]) < 30 * 50  # it did not run out
    assert done.status is JobStatus.DONE


async def test_cancelling_one_job_of_a_batch_lets_the_others_finish(system, store, recorder):
    stopped = await submit(store, replace(REQUEST, duration=4.0))
    kept = await submit(store, replace(REQUEST, duration=4.0, seed=2), guild=2)
    await system.worker()
    await recorder.until(
        lambda: any(done >= 5 for done, _ in recorder.progress.get(stopped.id, []))
    )
    assert {job.id for job in await store.running()} == {stopped.id, kept.id}
    assert await store.request_cancel(stopped.id) is JobStatus.RUNNING
    stopped, kept = await system.settled(stopped, kept)
    assert stopped.status is JobStatus.CANCELLED
    assert recorder.kinds(stopped)[-1] == "cancelled"
    assert kept.status is JobStatus.DONE
    assert recorder.results[kept.id][0].audio.shape == (1, 4 * 32_000)


async def test_a_failing_job_fails_alone(system, store, recorder):
    broken = await submit(store, replace(REQUEST, model="facebook/musicgen-large"))
    fine = await submit(store)
    await system.worker()
    broken, fine = await system.settled(broken, fine)
    assert broken.status is JobStatus.FAILED
    assert "facebook/musicgen-large" in recorder.errors[broken.id].args[0]
    assert fine.status is JobStatus.DONE


async def test_a_job_that_cannot_run_fails_alone_and_the_others_run(system, store, recorder):
    broken = await submit(store, replace(REQUEST, prompt="x" * 5000))  # past the prompt limit
    fine = await submit(store, guild=2)
    await system.worker()
    broken, fine = await system.settled(broken, fine)
    assert broken.status is JobStatus.FAILED
    assert "prompt" in recorder.errors[broken.id].args[0].lower()
    assert fine.status is JobStatus.DONE
    assert broken.attempts == fine.attempts == 1


async def test_a_job_past_its_time_limit_fails_and_the_next_runs(system, store, recorder):
    # The limit sits well apart from both jobs' times on a slow, shared CPU: the quick one takes
    # about 0.7 s beside the slow one, the slow one more than 30 s.
    slow = await submit(store, replace(REQUEST, duration=120.0))
    quick = await submit(store, guild=2)
    await system.worker(job_timeout=3.0)
    slow, quick = await system.settled(slow, quick)
    assert slow.status is JobStatus.FAILED
    assert "took longer than 3 s" in str(recorder.errors[slow.id])
    assert quick.status is JobStatus.DONE


async def test_a_listener_that_raises_does_not_stop_the_watcher(engine, store, caplog):
    class Broken(Recorder):
        async def job_started(self, job: Job) -> None:
            raise RuntimeError("Discord is down")

    broken = Broken()
    system = System(store, broken, engine)
    await system.start()
    try:
        first, second = await submit(store), await submit(store, guild=2)
        await system.worker()
        first, second = await system.settled(first, second)
    finally:
        await system.stop()
    assert first.status is second.status is JobStatus.DONE
    assert [kind for kind, _ in broken.events if kind != "progress"] == ["finished", "finished"]
    assert "job listener failed" in caplog.text


async def test_the_rate_is_learnt_from_finished_jobs_and_kept(system, store, recorder):
    job = await submit(store)
    worker = await system.worker()
    await system.settled(job)
    (result,) = recorder.results[job.id]
    expected = result.generation_seconds / result.seconds
    assert worker.rates.seconds(REQUEST) == pytest.approx(expected * REQUEST.duration)
    assert await store.generation_rates("cpu") == {("debug", 1): pytest.approx(expected)}
    later = await system.worker()  # another worker, or this one after a restart
    assert later.rates.rate("debug") == pytest.approx(expected)


async def test_a_loops_rate_is_learnt_per_second_generated_not_per_second_kept(
    system, store, recorder
):
    job = await submit(store, replace(REQUEST, duration=8.0, loop=2))
    worker = await system.worker()
    await system.settled(job)
    (result,) = recorder.results[job.id]
    assert result.seconds < 8.0  # cut to 2 bars
    expected = result.generation_seconds / 8.0
    assert worker.rates.rate("debug") == pytest.approx(expected)


@contextmanager
def rows_per_pass(engine, model: str = "debug") -> Iterator[list[int]]:
    """The rows of each pass of ``model``'s LM (its first output head) in this block."""
    rows: list[int] = []
    hook = (
        engine.load(model)
        .lm.linears[0]
        .register_forward_hook(lambda module, args, output: rows.append(output.shape[0]))
    )
    try:
        yield rows
    finally:
        hook.remove()


async def test_jobs_of_several_servers_share_each_step_and_arrive_apart(
    engine, system, store, recorder
):
    # Long enough that the last is claimed before the first is done.
    changes = [{"duration": 4.0}, {"duration": 3.0, "top_p": 0.5}, {"cfg_coef": 5.0}]
    jobs = [
        await submit(store, replace(REQUEST, prompt=f"tune {n}", seed=n, **change), guild=n)
        for n, change in enumerate(changes, start=1)
    ]
    with rows_per_pass(engine) as rows:
        await system.worker()
        stored = await system.settled(*jobs)
    assert max(rows) == 2 * 3  # three requests and their guidance twins in one pass
    for job in stored:
        assert job.status is JobStatus.DONE
        (result,) = recorder.results[job.id]
        assert result.request == job.request
        alone = normalise_loudness(engine.generate(job.request).audio, 32_000)
        np.testing.assert_allclose(result.audio, alone, atol=1e-4)
    assert sorted(job_id for kind, job_id in recorder.events if kind == "finished") == [
        job.id for job in jobs
    ]


async def test_a_job_with_takes_gets_a_result_per_seed_kept_for_later(system, store, recorder):
    job = await submit(store, takes=3)
    await system.worker()
    (job,) = await system.settled(job)
    results = recorder.results[job.id]
    assert [result.request.seed for result in results] == [1, 2, 3]
    assert not np.allclose(results[0].audio, results[1].audio, atol=1e-3)
    stored = await system.watcher.stored_results(job)
    for kept, delivered in zip(stored, results, strict=True):
        assert kept.request == delivered.request
        np.testing.assert_allclose(kept.audio, delivered.audio, atol=1e-6)  # 24-bit FLAC


async def test_requests_sent_to_an_idle_worker_decode_together(engine, system, store):
    await system.worker()
    await asyncio.sleep(0.3)  # the worker found nothing, and waits for work
    with rows_per_pass(engine) as rows:
        # Long enough that the last arrives before the first is done.
        long = replace(REQUEST, duration=4.0)
        jobs = [await submit(store, replace(long, seed=seed), guild=seed) for seed in (1, 2, 3)]
        stored = await system.settled(*jobs)
    assert all(job.status is JobStatus.DONE for job in stored)
    assert max(rows) == 2 * 3


async def test_a_job_with_a_clip_loads_it_from_the_store_when_it_runs(
    engine, system, store, recorder
):
    intro = AudioClip(sine(0.5, 330.0), 32_000)
    job = await submit(store, replace(REQUEST, duration=1.0, continuation=intro))
    (claimed,) = await store.queued(1)
    assert claimed.uploads_in_store and claimed.request.continuation is None  # not read yet
    await system.worker()
    (stored,) = await system.settled(job)
    assert stored.status is JobStatus.DONE
    (result,) = recorder.results[job.id]
    alone = normalise_loudness(engine.generate(job.request).audio, 32_000)  # the clip as kept
    np.testing.assert_allclose(result.audio, alone, atol=1e-4)


async def test_a_job_whose_clip_expired_fails_and_says_so(system, store, recorder):
    intro = AudioClip(sine(0.5, 330.0), 32_000)
    job = await submit(store, replace(REQUEST, duration=1.0, continuation=intro))
    await store._db.execute("DELETE FROM uploads")  # deleted by hand while the job waited
    fine = await submit(store, guild=2)
    await system.worker()
    job, fine = await system.settled(job, fine)
    assert (job.status, job.delivered) == (JobStatus.FAILED, True)
    message = str(recorder.errors[job.id])
    assert f"The audio job #{job.id} was given" in message and "upload it again" in message
    assert fine.status is JobStatus.DONE


async def test_a_deleted_results_folder_is_made_again(system, store, recorder):
    job = await submit(store)
    shutil.rmtree(store.results)
    await system.worker()
    (job,) = await system.settled(job)
    assert ("finished", job.id) in recorder.events and job.delivered
    assert store.result_path(job).exists()


# Leases: a worker holds its jobs only while it heartbeats.


async def test_a_job_whose_worker_stopped_heartbeating_runs_once_elsewhere(system, store, recorder):
    job = await submit(store)
    (dead,) = await store.claim(
        "dead-worker", models=None, loaded=(), max_rows=4, max_model_wait=0, lease_seconds=0.3
    )  # then its process died
    assert (dead.id, dead.status, dead.attempts) == (job.id, JobStatus.RUNNING, 1)
    await system.worker()  # its sweep finds the lease run out, and queues the job again
    (job,) = await system.settled(job)
    assert (job.status, job.attempts, job.delivered) == (JobStatus.DONE, 2, True)
    assert recorder.kinds(job).count("finished") == 1
    # The dead worker coming back cannot overwrite the run that counted.
    assert await store.finish(dead, JobStatus.FAILED, "late") is False
    assert await store.requeue(dead) is False
    assert dead.status is JobStatus.RUNNING and dead.error is None
    stored = await store.get(job.id)
    assert (stored.status, stored.error) == (JobStatus.DONE, None)


async def test_a_worker_that_lost_its_lease_stops_and_writes_nothing(
    system, store, recorder, caplog
):
    job = await submit(store, replace(REQUEST, duration=30.0))
    worker = await system.worker(leases=Leases(seconds=600, heartbeat=0.1, sweep=300, poll=0.1))
    await recorder.until(lambda: any(done >= 5 for done, _ in recorder.progress.get(job.id, [])))
    # Another worker's sweep saw the lease out (a stalled machine): the job is queued again.
    assert await store.requeue_expired(3, now=time.time() + 3600) == 1
    await until_stored(store, lambda: _idle(worker))
    stored = await store.get(job.id)
    assert "lease-lost" in caplog.text
    assert stored.status in (JobStatus.QUEUED, JobStatus.RUNNING)  # to run again, not ended
    assert "finished" not in recorder.kinds(job) and "cancelled" not in recorder.kinds(job)
    await store.request_cancel(job.id)  # no need to wait for its next run here


async def _idle(worker) -> bool:
    return worker.running == [] or worker.running[0].attempts > 1


async def test_stopping_the_worker_requeues_its_jobs_without_counting_an_attempt(
    system, store, recorder
):
    job = await submit(store, replace(REQUEST, duration=60.0))
    worker = await system.worker()
    await recorder.until(lambda: bool(recorder.progress.get(job.id)))
    await worker.stop(grace=0.0)
    stored = await store.get(job.id)
    assert (stored.status, stored.attempts, stored.worker_id) == (JobStatus.QUEUED, 0, None)
    assert await store.position(stored) == 1  # its place kept
    await system.watcher.settle()
    assert "finished" not in recorder.kinds(job) and "cancelled" not in recorder.kinds(job)
    assert await store.workers(0) == []  # it said it went


# The store refuses writes for a while (read-only, locked, disk full): retried with back-off.


async def refuse_writes(store: SqliteStore, until: Awaitable[None]) -> asyncio.Task:
    """The real store, made to refuse writes as a read-only database does, until ``until``."""
    await store._db.execute("PRAGMA query_only = ON")

    async def allow_later() -> None:
        await until
        await store._db.execute("PRAGMA query_only = OFF")

    return asyncio.get_running_loop().create_task(allow_later())


async def test_a_job_whose_end_the_database_refuses_is_recorded_once_it_takes_writes_again(
    system, store, recorder
):
    first, second = await submit(store), await submit(store, replace(REQUEST, duration=1.0))
    reopening: list[asyncio.Task] = []

    async def refuse_once_started() -> None:
        await recorder.until(lambda: bool(recorder.progress.get(first.id)))
        reopening.append(await refuse_writes(store, asyncio.sleep(0.5)))  # past its end

    await system.worker()
    await asyncio.gather(refuse_once_started(), ended(store, first, second))
    stored = await system.settled(first, second)
    for job in stored:  # the worker kept serving
        assert (job.status, job.delivered, job.attempts) == (JobStatus.DONE, True, 1)
        assert recorder.kinds(job).count("finished") == 1
    assert (await store.load_result(stored[0])) is not None


async def logged(caplog: pytest.LogCaptureFixture, text: str, timeout: float = 60.0) -> None:
    """Wait until ``text`` has been logged."""

    async def wait() -> None:
        while text not in caplog.text:
            await asyncio.sleep(0.01)

    await asyncio.wait_for(wait(), timeout)


async def test_a_job_whose_end_is_never_recorded_runs_again_when_its_lease_runs_out(
    system, store, recorder, caplog
):
    job = await submit(store, replace(REQUEST, duration=2.0))  # runs on well past its start
    await system.worker(store_retry=Backoff(0.01, 0.01, tries=3))
    await recorder.until(lambda: bool(recorder.progress.get(job.id)))
    gave_up = logged(caplog, f"job={job.id} event=finish-not-recorded")
    await (await refuse_writes(store, gave_up))
    (job,) = await system.settled(job)
    assert (job.status, job.delivered, job.attempts) == (JobStatus.DONE, True, 2)
    assert recorder.kinds(job).count("finished") == 1  # told once, of the run that counted


async def test_a_job_the_store_will_not_claim_for_a_while_waits_then_runs_once(
    system, store, caplog
):
    await system.worker()
    job = await submit(store)
    reopening = await refuse_writes(store, asyncio.sleep(0.3))  # it waits for more requests first
    await reopening
    assert (await store.get(job.id)).status is JobStatus.QUEUED
    assert "event=claim-failed" in caplog.text
    (job,) = await system.settled(job)
    assert (job.status, job.attempts, job.delivered) == (JobStatus.DONE, 1, True)


# Delivery: the watcher tells each outcome once, tries again when it fails, keeps what fails.


class FailsToDeliver(Recorder):
    """Delivering fails ``times`` times (Discord is down), then works."""

    def __init__(self, times: int, error: Exception) -> None:
        super().__init__()
        self.times = times
        self.error = error

    async def job_finished(self, job, results):
        if self.times:
            self.times -= 1
            raise self.error
        return await super().job_finished(job, results)


async def deliver_with(engine, store, listener) -> Job:
    system = System(store, listener, engine)
    system.watcher.delivery_retry = replace(QUICK, tries=4)
    await system.start()
    try:
        job = await submit(store)
        await system.worker()
        (job,) = await system.settled(job)
    finally:
        await system.stop()
    return job


async def test_a_failed_delivery_is_tried_again_and_each_try_counted(engine, store):
    listener = FailsToDeliver(2, ConnectionError("Discord is down"))
    job = await deliver_with(engine, store, listener)
    assert listener.kinds(job).count("finished") == 1
    assert (job.delivered, job.delivery_attempts, job.delivery_failure) == (True, 2, None)


async def test_a_delivery_that_always_fails_is_given_up_and_kept_for_history(engine, store):
    listener = FailsToDeliver(100, ConnectionError("Discord is down"))
    job = await deliver_with(engine, store, listener)
    assert (job.delivered, job.delivery_attempts) == (False, 4)
    assert job.delivery_failure == DELIVERY_FAILED
    assert await store.undelivered() == []  # no restart tries it again
    assert [job.id for job in await store.history(1, 1)] == [job.id]


async def test_an_outcome_nobody_can_receive_is_kept_for_history_at_once(engine, store):
    listener = FailsToDeliver(100, Undeliverable("the channel and direct messages refuse it"))
    job = await deliver_with(engine, store, listener)
    assert (job.delivered, job.delivery_attempts) == (False, 0)
    assert job.delivery_failure == "the channel and direct messages refuse it"
