"""The gateway's side of the job system: it watches the store and tells each requester how
their job is doing: started, progress, its place in the queue, and how it ended.

Workers (in this process or others) only write to the store; a ``JOBS`` notification wakes
the watcher, and its driver (a timer loop) makes it look every few seconds anyway, so nothing
depends on a notification arriving. An outcome is delivered exactly once by the one gateway:
it is marked delivered in the store once the listener has delivered it, and a restart
delivers what was not. A failed delivery is tried again with back-off, each try counted in
the store, and kept for the member's history when nobody can be told.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Protocol

from generation.engine.results import GenerationResult
from generation.errors import GenerationError, Undeliverable
from generation.jobs.estimates import Estimate, GenerationRates, forecast
from generation.jobs.job import Job, JobStatus
from generation.jobs.retry import DELIVERY_RETRY, STORE_RETRY, Backoff, retrying
from generation.jobs.scheduling import BatchPolicy
from generation.jobs.store import Channel, JobStore, WorkerInfo

log = logging.getLogger(__name__)

#: Kept as the reason when every try at a delivery failed.
DELIVERY_FAILED = "it could not be delivered"
#: Seconds between two reads of the rates the workers learnt (they move slowly).
RATES_INTERVAL = 60.0
#: Estimates handed to the listener at a time, so a long queue never holds the event loop.
CHUNK = 500


class JobListener(Protocol):
    """Told of each job's life; the Discord layer implements it to talk to members.

    ``job_finished``, ``job_failed`` and ``job_cancelled`` deliver the outcome to the
    requester and return a link to it, if there is one; if they raise, the delivery is tried
    again later, unless they raise :class:`~generation.errors.Undeliverable` (nobody can be
    told: the outcome is kept for the member's history).
    ``queue_moved`` hears queued jobs' positions and ETAs (in chunks) when they change; it
    runs on the event loop and must return at once. ``job_waiting`` hears, at start-up, of
    each queued job whose requester can still be reached (the process that answered them
    may have been another, or this one before a restart).
    """

    def queue_moved(self, estimates: Sequence[Estimate]) -> None: ...
    def job_waiting(self, job: Job) -> None: ...
    async def job_started(self, job: Job) -> None: ...
    async def job_progress(self, job: Job) -> None: ...
    async def job_finished(self, job: Job, results: list[GenerationResult]) -> str | None: ...
    async def job_failed(self, job: Job, error: GenerationError) -> str | None: ...
    async def job_cancelled(self, job: Job) -> str | None: ...


class Watcher:
    """Turns what the store records into what requesters hear.

    Args:
        store: The shared store.
        listener: Talks to the requesters.
        rates: Generation rates, for ETAs (refreshed from the store).
        batch_policy: How workers form batches, for ETAs.
        worker_silence: Seconds without a heartbeat after which a worker no longer counts
            (its lease: it has lost its jobs by then).
        store_retry: How a write the store refuses is tried again.
        delivery_retry: How a delivery that fails is tried again.
    """

    def __init__(
        self,
        store: JobStore,
        listener: JobListener,
        *,
        rates: GenerationRates,
        batch_policy: BatchPolicy,
        worker_silence: float = 60.0,
        store_retry: Backoff = STORE_RETRY,
        delivery_retry: Backoff = DELIVERY_RETRY,
    ) -> None:
        self.store = store
        self.listener = listener
        self.rates = rates
        self.batch_policy = batch_policy
        self.worker_silence = worker_silence
        self.store_retry = store_retry
        self.delivery_retry = delivery_retry
        #: Live workers, for ETAs (at least 1: a job waits for a worker to come).
        self.workers = 1
        self.accepting = True
        self._task: asyncio.Task[None] | None = None
        self._again = False
        self._workers_seen: set[str] | None = None
        self._rates_at = float("-inf")
        #: Running jobs the listener was told about, and the progress it last heard.
        self._running: dict[int, tuple[int, int]] = {}
        self._delivering: dict[int, asyncio.Task[None]] = {}
        self._reports: set[asyncio.Task[None]] = set()
        #: Deliveries waiting to try again: a shutdown leaves them to the next start.
        self._waiting: set[asyncio.Task] = set()

    async def start(self, now: float) -> None:
        """Start watching: the listener hears of the queued jobs it can still reach (their
        interaction tokens are valid at ``now``), then of every change."""
        for job in await self.store.waiting_with_reply(now):
            self.listener.job_waiting(job)
        self.store.subscribe(Channel.JOBS, lambda _: self.changed())
        self.store.subscribe(Channel.QUEUE, lambda _: self.changed())
        self.changed()

    def changed(self) -> None:
        """Look at the store soon (a notification came, or this process changed the queue):
        one look at a time, and one more if anything changed during it."""
        if not self.accepting:
            return
        if self._task is not None and not self._task.done():
            self._again = True
            return
        self._task = asyncio.get_running_loop().create_task(self._watch(), name="watcher")

    async def tick(self) -> None:
        """Look at the store (its driver calls it every few seconds: a notification may have
        been lost with a connection)."""
        self.changed()

    async def settle(self) -> None:
        """Wait until what the store holds now has been told (tests, shutdown)."""
        await self._look()
        while self._delivering or self._reports:
            await asyncio.gather(*self._delivering.values(), *self._reports, return_exceptions=True)

    async def stop(self) -> None:
        """Stop watching; deliveries under way complete, those waiting to try again are left
        to the next start."""
        self.accepting = False
        if self._task is not None:
            with contextlib.suppress(Exception):
                await self._task
        for task in self._waiting:
            task.cancel()
        if self._delivering:
            await asyncio.gather(*self._delivering.values(), return_exceptions=True)

    async def _watch(self) -> None:
        self._again = True
        while self._again and self.accepting:
            self._again = False
            try:
                await self._look()
            except Exception:
                log.exception("watching the jobs failed (tried again next tick)")

    async def _look(self) -> None:
        running = await self.store.running()
        live = {job.id for job in running}
        for job_id in list(self._running):
            if job_id not in live:
                del self._running[job_id]
        for job in running:
            told = self._running.get(job.id)
            if told is None:
                self._running[job.id] = job.progress
                self._spawn(self.listener.job_started(job))
            elif job.progress != told and job.progress[0] > 0:
                self._running[job.id] = job.progress
                self._spawn(self.listener.job_progress(job))
        for job in await self.store.undelivered():
            if job.id not in self._delivering:
                self._deliver_later(job)
        await self._refresh_estimates(running)

    async def _refresh_estimates(self, running: list[Job]) -> None:
        """Give the listener every queued job's place and ETA, a chunk at a time."""
        workers = await self.store.workers(time.time() - self.worker_silence)
        self.workers = max(1, len(workers))
        self._log_workers(workers)
        if time.monotonic() - self._rates_at >= RATES_INTERVAL:
            self._rates_at = time.monotonic()
            for device in {worker.device for worker in workers}:
                self.rates.load(await self.store.generation_rates(device))
        order = await self.store.queue_order()
        if not order:
            return
        # One pass over the whole queue: on a thread, so the event loop runs meanwhile.
        estimates = await asyncio.to_thread(
            forecast, order, running, self.rates, self.batch_policy, self.workers
        )
        for start in range(0, len(estimates), CHUNK):
            try:
                self.listener.queue_moved(estimates[start : start + CHUNK])
            except Exception:
                log.exception("job listener failed")
            await asyncio.sleep(0)

    def _log_workers(self, workers: Sequence[WorkerInfo]) -> None:
        """Log the live workers whenever they change (one came, one went silent)."""
        seen = {worker.id for worker in workers}
        if seen == self._workers_seen:
            return
        self._workers_seen = seen
        described = ", ".join(f"{worker.id} ({worker.device})" for worker in workers)
        if workers:
            log.info("event=workers live=%d workers=%s", len(workers), described)
        else:
            log.warning("event=workers live=0 (queued jobs wait for a worker)")

    def _deliver_later(self, job: Job) -> None:
        task = asyncio.get_running_loop().create_task(self.deliver(job))
        self._delivering[job.id] = task
        task.add_done_callback(lambda _: self._delivering.pop(job.id, None))

    async def deliver(self, job: Job) -> None:
        """Tell the requester how ``job`` ended, and record that they were told.

        A failed delivery is tried again after a while (see ``delivery_retry``); one that
        failed every try, or that nobody can receive, is kept for the member's history.
        """
        if self._reports:  # let progress edits land before the outcome replaces them
            await asyncio.gather(*self._reports, return_exceptions=True)
        delays = self.delivery_retry.delays(job.delivery_attempts)
        while True:
            try:
                url = await self._tell(job)
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

    async def _tell(self, job: Job) -> str | None:
        if job.status is JobStatus.DONE:
            return await self.listener.job_finished(job, await self.stored_results(job))
        if job.status is JobStatus.CANCELLED:
            return await self.listener.job_cancelled(job)
        return await self.listener.job_failed(job, GenerationError(job.error or ""))

    async def stored_results(self, job: Job) -> list[GenerationResult]:
        """A finished job's takes, read back from the store.

        Raises:
            GenerationError: a take is missing.
        """
        results = []
        for take, request in enumerate(job.take_requests()):
            audio, sample_rate = await self.store.load_result(job, take)
            seconds = job.generation_seconds or 0.0
            results.append(GenerationResult(request, audio, sample_rate, seconds))
        return results

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

    async def _write(self, what: str, job: Job, write: Callable[[], Awaitable[object]]) -> None:
        try:
            await retrying(what, job.id, write, self.store_retry)
        except Exception:
            log.exception("job=%d event=%s-not-recorded", job.id, what)

    def _spawn(self, report: Awaitable[None]) -> None:
        task = asyncio.get_running_loop().create_task(self._guarded(report))
        self._reports.add(task)
        task.add_done_callback(self._reports.discard)

    async def _guarded(self, report: Awaitable[None]) -> None:
        """Await a listener call; its failure is logged and never stops the watcher."""
        try:
            await report
        except Exception:
            log.exception("job listener failed")
