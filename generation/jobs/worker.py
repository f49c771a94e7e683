"""The single generation worker: takes batches of jobs from the fair queue and runs them.

Jobs that can share a pass of the model run together (see :mod:`generation.jobs.scheduling`), each
delivered on its own. The model runs on a one-thread executor, so the event loop (and the
Discord heartbeat) keeps going while it decodes; progress crosses back to the loop with
``call_soon_threadsafe``. The worker task starts when there is work and returns when the queue
is empty.

Every step of a job is recorded in the store before anyone is told of it: a job is claimed
before it runs, its result is saved before it is delivered, and it is marked delivered only
once the listener has delivered it. A restart at any point can pick up from the store.

Nothing after a job is taken leaves it hanging: a write the store refuses is tried again with
back-off; a job that cannot be claimed goes back to the queue; a result that cannot be kept
fails its job; an end the store never takes is told to the requester all the same (the store
still has the job running, so it runs again after a restart). A delivery that fails is tried
again with back-off, each try counted in the store, and kept for the member's history when
nobody can be told.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import partial
from typing import Protocol, TypeVar

from generation.audio.output import normalise_loudness
from generation.engine.musicgen import CancelFlag, GenerationResult, ProgressCallback
from generation.errors import GenerationCancelled, GenerationError, Undeliverable
from generation.jobs.estimates import Estimate, GenerationRates, forecast
from generation.jobs.job import FairQueue, Job, JobStatus
from generation.jobs.scheduling import BatchPolicy, plan_batch
from generation.jobs.store import JobStore
from generation.request import GenerationRequest

log = logging.getLogger(__name__)

T = TypeVar("T")

#: The requester is told this when a track was made but could not be saved.
NOT_KEPT = "The track was made but could not be saved on the bot's side; please try again."
#: Kept as the reason when every try at a delivery failed.
DELIVERY_FAILED = "it could not be delivered"


@dataclass(frozen=True)
class Backoff:
    """How to try again something that failed: ``tries`` in all, waiting ``first`` seconds
    after the first failure, then twice as long each time, up to ``longest``."""

    first: float = 1.0
    longest: float = 30.0
    tries: int = 8

    def delays(self, tried: int = 0) -> Iterator[float]:
        """The waits before each try left, when ``tried`` tries have already failed."""
        for attempt in range(tried, self.tries - 1):
            yield min(self.first * 2**attempt, self.longest)


class Generator(Protocol):
    """What the worker runs jobs on: :class:`generation.engine.musicgen.MusicGenEngine`."""

    #: Where the models run ("cpu", "cuda", ...): generation rates are learnt per device.
    device: str

    @property
    def loaded_models(self) -> Sequence[str]: ...

    def generate_batch(
        self,
        requests: Sequence[GenerationRequest],
        *,
        progress: ProgressCallback | None = None,
        cancel: CancelFlag | None = None,
    ) -> list[GenerationResult]: ...


class JobListener(Protocol):
    """Told of each job's life; the Discord layer implements it to talk to members.

    ``job_finished``, ``job_failed`` and ``job_cancelled`` deliver the outcome to the
    requester and return a link to it, if there is one; if they raise, the delivery is tried
    again later, unless they raise :class:`~generation.errors.Undeliverable` (nobody can be
    told: the outcome is kept for the member's history).
    ``queue_moved`` hears every queued job's position and ETA whenever they change; it
    runs on the event loop and must return at once.
    """

    def queue_moved(self, estimates: Sequence[Estimate]) -> None: ...
    async def job_started(self, job: Job) -> None: ...
    async def job_progress(self, job: Job) -> None: ...
    async def job_finished(self, job: Job, results: list[GenerationResult]) -> str | None: ...
    async def job_failed(self, job: Job, error: GenerationError) -> str | None: ...
    async def job_cancelled(self, job: Job) -> str | None: ...


class Worker:
    """Runs queued jobs a batch at a time, records them, and reports on them to ``listener``.

    Args:
        generator: Runs a batch of requests (blocking); only ever called from one thread.
        queue: Where jobs wait.
        store: Where every job's state and result is kept.
        listener: Told when jobs start, progress, finish, fail or are cancelled.
        progress_interval: Least time between two progress reports for a job, in seconds.
        job_timeout: Longest a batch may run, in seconds; None for no limit.
        batch_policy: How jobs are grouped into batches.
        store_retry: How a write the store refuses (a locked or read-only database, a full
            disk) is tried again.
        delivery_retry: How a delivery that fails is tried again (its tries are counted in
            the store, across restarts).
    """

    def __init__(
        self,
        generator: Generator,
        queue: FairQueue,
        store: JobStore,
        listener: JobListener,
        *,
        progress_interval: float = 5.0,
        job_timeout: float | None = None,
        batch_policy: BatchPolicy | None = None,
        store_retry: Backoff = Backoff(first=0.5, longest=30.0, tries=8),
        delivery_retry: Backoff = Backoff(first=10.0, longest=600.0, tries=6),
    ) -> None:
        self.generator = generator
        self.queue = queue
        self.store = store
        self.listener = listener
        self.progress_interval = progress_interval
        self.job_timeout = job_timeout
        self.batch_policy = batch_policy or BatchPolicy()
        self.store_retry = store_retry
        self.delivery_retry = delivery_retry
        self.rates = GenerationRates(generator.device)
        self.accepting = True
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generation")
        self._task: asyncio.Task[None] | None = None
        self._reports: set[asyncio.Task[None]] = set()
        self._deliveries: set[asyncio.Task[None]] = set()
        #: Deliveries waiting to try again: a shutdown leaves them to the next start.
        self._waiting: set[asyncio.Task] = set()

    @property
    def busy(self) -> bool:
        return self._task is not None and not self._task.done()

    def wake(self) -> None:
        """Start working through the queue, unless already at it or stopping."""
        if self.accepting and not self.busy:
            self._task = asyncio.get_running_loop().create_task(self._drain(), name="worker")

    async def join(self) -> None:
        """Wait until the worker has run out of jobs."""
        while self.busy:
            assert self._task is not None
            await asyncio.shield(self._task)

    async def stop(self, grace: float) -> None:
        """Take no more jobs; give the running batch ``grace`` seconds, then stop it and put
        its jobs back in the queue to run again after a restart. Deliveries under way
        complete."""
        self.accepting = False
        if self._task is not None and not self._task.done():
            try:
                await asyncio.wait_for(asyncio.shield(self._task), grace)
            except TimeoutError:
                for job in self.queue.running:
                    log.info("job=%d event=stopped reason=shutdown (it will run again)", job.id)
                    job.stop("shutdown")
                await self._task
        for task in self._waiting:
            task.cancel()
        if self._deliveries:
            await asyncio.gather(*self._deliveries, return_exceptions=True)

    def cancel(self, job: Job) -> bool:
        """Cancel ``job``: a queued one leaves the queue now (returns True), a running one
        stops (returns False; the listener hears of it when its batch ends: at the next step
        when it runs alone, or when the other jobs in its batch are done)."""
        if job.status is JobStatus.QUEUED and job not in self.queue.running:
            self.queue.remove(job)
            return True
        job.stop("cancelled")
        return False

    def forecast(self) -> list[Estimate]:
        """Every queued job's position and ETA, in the order they will run."""
        return forecast(
            self.queue.service_order(),
            self.queue.running,
            self.rates,
            self.batch_policy,
            self.queue.is_paused,
        )

    def estimate(self, job: Job) -> Estimate:
        """A queued (or held) job's position and ETA."""
        return next(estimate for estimate in self.forecast() if estimate.job is job)

    def queue_changed(self) -> None:
        """Tell the listener where every queued job stands now (they moved, or their ETA
        did)."""
        try:
            self.listener.queue_moved(self.forecast())
        except Exception:
            log.exception("job listener failed")

    async def load_rates(self) -> None:
        """Take up the generation rates learnt before the last restart."""
        self.rates.load(await self.store.generation_rates(self.rates.device))

    def run_blocking(self, function: Callable[[], object]) -> asyncio.Future:
        """Run ``function`` on the generation thread (e.g. loading a model at start-up)."""
        return asyncio.get_running_loop().run_in_executor(self._executor, function)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def deliver_later(self, job: Job, results: list[GenerationResult] | None = None) -> None:
        """:meth:`deliver` in the background, so the next batch need not wait for an upload."""
        task = asyncio.get_running_loop().create_task(self.deliver(job, results))
        self._deliveries.add(task)
        task.add_done_callback(self._deliveries.discard)

    async def deliver(self, job: Job, results: list[GenerationResult] | None = None) -> None:
        """Tell the requester how ``job`` ended, and record that they were told.

        A failed delivery is tried again after a while (see ``delivery_retry``); one that
        failed every try, or that nobody can receive, is kept for the member's history.
        ``results`` (one per take) are read back from the store when not given (after a
        restart).
        """
        if self._reports:  # let progress edits land before the outcome replaces them
            await asyncio.gather(*self._reports, return_exceptions=True)
        delays = self.delivery_retry.delays(job.delivery_attempts)
        while True:
            try:
                url = await self._tell(job, results)
                break
            except Undeliverable as refused:
                log.warning("job=%d event=undeliverable reason=%r", job.id, str(refused))
                await self._keep_undelivered(job, str(refused))
                return
            except Exception as error:
                await self._write(
                    "count-delivery", job, partial(self.store.count_failed_delivery, job)
                )
                delay = next(delays, None)
                log.warning(
                    "job=%d event=delivery-failed attempt=%d error=%r (%s)",
                    job.id,
                    job.delivery_attempts,
                    error,
                    "given up" if delay is None else f"trying again in {delay:g} s",
                    exc_info=delay is None,
                )
                if delay is None:
                    await self._keep_undelivered(job, DELIVERY_FAILED)
                    return
                if not await self._wait(delay):
                    return  # shutting down: the next start delivers it
        await self._write("mark-delivered", job, partial(self.store.mark_delivered, job, url))
        log.info("job=%d event=delivered status=%s", job.id, job.status.value)

    async def _tell(self, job: Job, results: list[GenerationResult] | None) -> str | None:
        if job.status is JobStatus.DONE:
            if results is None:
                results = await self.stored_results(job)
            return await self.listener.job_finished(job, results)
        if job.status is JobStatus.CANCELLED:
            return await self.listener.job_cancelled(job)
        return await self.listener.job_failed(job, GenerationError(job.error or ""))

    async def _keep_undelivered(self, job: Job, reason: str) -> None:
        await self._write(
            "keep-undelivered", job, partial(self.store.keep_undelivered, job, reason)
        )

    async def _wait(self, delay: float) -> bool:
        """Sleep ``delay`` seconds; False if a shutdown cut it short."""
        if not self.accepting:
            return False
        task = asyncio.current_task()
        assert task is not None
        self._waiting.add(task)
        try:
            await asyncio.sleep(delay)
        except asyncio.CancelledError:
            if self.accepting:
                raise
            return False
        finally:
            self._waiting.discard(task)
        return True

    async def stored_results(self, job: Job) -> list[GenerationResult]:
        """A finished job's takes, read back from the store.

        Raises:
            GenerationError: a take's file is missing.
        """
        results = []
        for take, request in enumerate(job.take_requests()):
            audio, sample_rate = await self.store.load_result(job, take)
            seconds = job.generation_seconds or 0.0
            results.append(GenerationResult(request, audio, sample_rate, seconds))
        return results

    async def _drain(self) -> None:
        await asyncio.sleep(self.batch_policy.window)
        while self.accepting:
            batch = plan_batch(
                self.queue.runnable(),
                policy=self.batch_policy,
                loaded_models=self.generator.loaded_models,
                now=time.time(),
            )
            if not batch:
                return
            self.queue.take(batch)
            await self._run(batch)

    async def _run(self, batch: list[Job]) -> None:
        self.queue.running = batch
        self.queue_changed()  # the jobs behind moved up, and wait for this batch
        claimed: list[Job] = []
        outcomes: dict[int, list[GenerationResult]] = {}
        try:
            claimed = await self._claim(batch)
            ready = await self._with_uploads(claimed)
            self.queue.running = ready
            started_at = time.time()
            for job in ready:
                job.started_at = started_at
                log.info(
                    "job=%d event=started attempt=%d model=%s duration=%g guild=%d batch=%s",
                    job.id,
                    job.attempts,
                    job.request.model,
                    job.request.duration,
                    job.guild_id,
                    ",".join(str(other.id) for other in ready),
                )
                await self._guarded(self.listener.job_started(job))
            if ready:
                outcomes = await self._generate(ready)
        finally:
            self.queue.running = []
        for job in claimed:  # those that failed to load their clips too
            if job.status is not JobStatus.QUEUED:  # stopped by shutdown: waits for the restart
                self.deliver_later(job, outcomes.get(job.id))

    async def _with_uploads(self, jobs: list[Job]) -> list[Job]:
        """Load the clips of the jobs read back after a restart (:meth:`JobStore.load_uploads`,
        decoded on a thread); a job whose clip expired or is damaged fails, and its requester
        is told. Returns the jobs ready to run."""
        ready = []
        for job in jobs:
            try:
                await self.store.load_uploads(job)
            except Exception as error:
                await self._failed(job, error)
            else:
                ready.append(job)
        return ready

    async def _claim(self, batch: list[Job]) -> list[Job]:
        """Mark the batch's jobs running in the store; those it will not take (after trying
        again) go back to the front of the queue, to be tried again."""
        claimed = []
        for index, job in enumerate(batch):
            try:
                taken = await self._retrying("claim", job, partial(self.store.claim, job))
            except Exception:
                log.exception("job=%d event=not-claimed (queued again)", job.id)
                self.queue.put_back(batch[index:])
                break
            if taken:
                claimed.append(job)
            else:
                log.warning("job=%d event=skipped (not queued in the store)", job.id)
        return claimed

    async def _generate(self, jobs: list[Job]) -> dict[int, list[GenerationResult]]:
        """Run the batch and record each job's outcome; returns the results of the jobs that
        succeeded, one per take, by job id."""
        loop = asyncio.get_running_loop()
        last_report = time.monotonic()

        def on_progress(done: int, total: int) -> None:  # on the event loop
            nonlocal last_report
            for job in jobs:
                job.progress = (done, total)
            now = time.monotonic()
            if now - last_report >= self.progress_interval and done < total:
                last_report = now
                for job in jobs:
                    if not job.cancel_event.is_set():
                        self._spawn(self.listener.job_progress(job))
                self.queue_changed()  # the jobs waiting behind are closer

        def progress(done: int, total: int) -> None:  # on the generation thread
            loop.call_soon_threadsafe(on_progress, done, total)

        requests = [request for job in jobs for request in job.take_requests()]
        generate = partial(
            self.generator.generate_batch, requests, progress=progress, cancel=_AllStopped(jobs)
        )
        running = loop.run_in_executor(self._executor, generate)
        try:
            results = await asyncio.wait_for(asyncio.shield(running), self.job_timeout)
        except TimeoutError:
            for job in jobs:
                job.stop("timeout")
            with contextlib.suppress(Exception):
                await running  # it stops at its next step
            error = GenerationError(
                f"Generation took longer than {self.job_timeout:g} s and was stopped: "
                "try a shorter duration or a smaller model."
            )
            for job in jobs:
                await self._failed(job, error)
            return {}
        except GenerationCancelled:
            for job in jobs:
                await self._stopped(job)
            return {}
        except Exception as error:
            if len(jobs) > 1:  # find the job at fault: each runs alone, and fails alone
                log.warning(
                    "batch=%s event=failed error=%r (running its jobs one by one)",
                    ",".join(str(job.id) for job in jobs),
                    error,
                )
                alone: dict[int, list[GenerationResult]] = {}
                for job in jobs:
                    alone |= await self._generate([job])
                return alone
            await self._failed(jobs[0], error)
            return {}
        await self._learn(results)
        outcomes = {}
        for job in jobs:
            takes, results = results[: job.takes], results[job.takes :]
            if job.stop_reason == "cancelled":  # while the rest of its batch went on
                await self._stopped(job)
            elif (kept := await self._finished(job, takes)) is not None:
                outcomes[job.id] = kept
        return outcomes

    async def _learn(self, results: list[GenerationResult]) -> None:
        """Learn the batch's generation rate, and keep it for after a restart."""
        first = results[0]
        model, rows = first.request.model, len(results)
        rate = self.rates.observe(model, rows, first.seconds, first.generation_seconds)
        try:
            await self.store.save_generation_rate(self.rates.device, model, rows, rate)
        except Exception:  # a nicety: the jobs' own records matter, and they are tried again
            log.exception("model=%s event=rate-not-kept (known until the bot stops)", model)

    async def _finished(
        self, job: Job, results: list[GenerationResult]
    ) -> list[GenerationResult] | None:
        """Normalise and keep each take, then record the job done; returns the takes, or
        None when they could not be kept (the job failed)."""
        loop = asyncio.get_running_loop()
        normalised = []
        for result in results:
            audio = await loop.run_in_executor(
                None, normalise_loudness, result.audio, result.sample_rate
            )
            normalised.append(replace(result, audio=audio))
        try:
            for take, result in enumerate(normalised):
                save = partial(self.store.save_result, job, result.audio, result.sample_rate, take)
                await self._retrying("save-result", job, save)
        except Exception as error:
            log.error("job=%d event=result-not-kept", job.id, exc_info=error)
            await self._end(job, JobStatus.FAILED, NOT_KEPT)
            return None
        job.generation_seconds = results[0].generation_seconds
        await self._end(job, JobStatus.DONE)
        log.info("job=%d event=finished seconds=%.1f", job.id, job.generation_seconds)
        return normalised

    async def _stopped(self, job: Job) -> None:
        if job.stop_reason == "shutdown":
            # If the store refuses, it still has the job running: it runs again all the same.
            await self._write("requeue", job, partial(self.store.requeue, job, count_attempt=False))
            job.status = JobStatus.QUEUED
        else:
            await self._end(job, JobStatus.CANCELLED)
            log.info("job=%d event=cancelled while=running", job.id)

    async def _failed(self, job: Job, error: BaseException) -> None:
        if isinstance(error, GenerationError):
            message = str(error)
            log.warning("job=%d event=failed error=%r", job.id, message)
        else:
            log.error("job=%d event=failed error=crash", job.id, exc_info=error)
            message = "Something went wrong while generating; please try again."
        await self._end(job, JobStatus.FAILED, message)

    async def _end(self, job: Job, status: JobStatus, error: str | None = None) -> None:
        """Record how ``job`` ended. If the store never takes it, the requester is told all
        the same; the store still has the job running, so it runs again after a restart."""
        await self._write("finish", job, partial(self.store.finish, job, status, error))
        job.status, job.error = status, error

    async def _write(self, what: str, job: Job, write: Callable[[], Awaitable[object]]) -> None:
        """:meth:`_retrying`, logging a write that never succeeds instead of raising it."""
        try:
            await self._retrying(what, job, write)
        except Exception:
            log.exception("job=%d event=%s-not-recorded", job.id, what)

    async def _retrying(self, what: str, job: Job, write: Callable[[], Awaitable[T]]) -> T:
        """Await ``write()``, trying again with back-off while it fails (the
        store refuses writes, the disk is full); the last failure is raised."""
        delays = self.store_retry.delays()
        while True:
            try:
                return await write()
            except Exception as error:
                delay = next(delays, None)
                if delay is None:
                    raise
                log.warning(
                    "job=%d event=%s-failed error=%r (trying again in %g s)",
                    job.id,
                    what,
                    error,
                    delay,
                )
                await asyncio.sleep(delay)

    def _spawn(self, report: Awaitable[None]) -> None:
        task = asyncio.get_running_loop().create_task(self._guarded(report))
        self._reports.add(task)
        task.add_done_callback(self._reports.discard)

    async def _guarded(self, report: Awaitable[None]) -> None:
        """Await a listener call; its failure is logged and never stops the worker."""
        try:
            await report
        except Exception:
            log.exception("job listener failed")


class _AllStopped:
    """A batch's cancel flag: set once every job in the batch has been asked to stop."""

    def __init__(self, jobs: Sequence[Job]) -> None:
        self._jobs = jobs

    def is_set(self) -> bool:
        return all(job.cancel_event.is_set() for job in self._jobs)
