"""The single generation worker: takes jobs from the fair queue and runs them one at a time.

The model runs on a one-thread executor, so the event loop (and the Discord heartbeat) keeps
going while it decodes; progress crosses back to the loop with ``call_soon_threadsafe``. The
worker task starts when there is work and returns when the queue is empty.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Protocol

from .engine import GenerationResult, ProgressCallback
from .errors import GenerationCancelled, GenerationError
from .queue import FairQueue, Job, JobStatus
from .request import GenerationRequest

log = logging.getLogger(__name__)


class Generator(Protocol):
    """What the worker runs jobs on: :class:`generation.engine.MusicGenEngine`."""

    def generate(
        self,
        request: GenerationRequest,
        *,
        progress: ProgressCallback | None = None,
        cancel: threading.Event | None = None,
    ) -> GenerationResult: ...


class JobListener(Protocol):
    """Told of each job's life; the Discord layer implements it to talk to members."""

    async def job_started(self, job: Job) -> None: ...
    async def job_progress(self, job: Job) -> None: ...
    async def job_finished(self, job: Job, result: GenerationResult) -> None: ...
    async def job_failed(self, job: Job, error: GenerationError) -> None: ...
    async def job_cancelled(self, job: Job) -> None: ...


class GenerationRate:
    """Seconds of work per second of audio, per model, learnt from finished jobs."""

    def __init__(self, initial: float = 1.0, smoothing: float = 0.3) -> None:
        self.initial = initial
        self.smoothing = smoothing
        self._rates: dict[str, float] = {}

    def observe(self, result: GenerationResult) -> None:
        model = result.request.model
        rate = result.generation_seconds / max(result.seconds, 1e-6)
        previous = self._rates.get(model)
        self._rates[model] = (
            rate if previous is None else (previous + self.smoothing * (rate - previous))
        )

    def seconds_for(self, request: GenerationRequest) -> float:
        return self._rates.get(request.model, self.initial) * request.duration


class Worker:
    """Runs queued jobs one at a time and reports on them to ``listener``.

    Args:
        generator: Runs one request (blocking); it is only ever called from one thread.
        queue: Where jobs wait.
        listener: Told when jobs start, progress, finish, fail or are cancelled.
        progress_interval: Least time between two progress reports for a job, in seconds.
    """

    def __init__(
        self,
        generator: Generator,
        queue: FairQueue,
        listener: JobListener,
        *,
        progress_interval: float = 5.0,
    ) -> None:
        self.generator = generator
        self.queue = queue
        self.listener = listener
        self.progress_interval = progress_interval
        self.rate = GenerationRate()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generation")
        self._task: asyncio.Task[None] | None = None
        self._reports: set[asyncio.Task[None]] = set()

    @property
    def busy(self) -> bool:
        return self._task is not None and not self._task.done()

    def wake(self) -> None:
        """Start working through the queue, unless already at it."""
        if not self.busy:
            self._task = asyncio.get_running_loop().create_task(self._drain(), name="worker")

    async def join(self) -> None:
        """Wait until the worker has run out of jobs."""
        while self.busy:
            assert self._task is not None
            await asyncio.shield(self._task)

    def cancel(self, job: Job) -> bool:
        """Cancel ``job``: a queued one leaves the queue now (returns True), a running one
        stops at its next step (returns False; the listener hears of it then)."""
        if job.status is JobStatus.QUEUED:
            self.queue.remove(job)
            job.status = JobStatus.CANCELLED
            job.finished_at = time.time()
            return True
        job.cancel_event.set()
        return False

    def eta(self, job: Job) -> float:
        """Seconds until ``job`` is likely to be done."""
        ahead = 0.0
        running = self.queue.running
        if running is not None:
            ahead += self.rate.seconds_for(running.request) * (1 - running.fraction_done)
            if running is job:
                return ahead
        for queued in self.queue.service_order():
            ahead += self.rate.seconds_for(queued.request)
            if queued is job:
                break
        return ahead

    def run_blocking(self, function: Callable[[], object]) -> asyncio.Future:
        """Run ``function`` on the generation thread (e.g. loading a model at start-up)."""
        return asyncio.get_running_loop().run_in_executor(self._executor, function)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _drain(self) -> None:
        while (job := self.queue.next_job()) is not None:
            await self._run(job)

    async def _run(self, job: Job) -> None:
        loop = asyncio.get_running_loop()
        job.status = JobStatus.RUNNING
        job.started_at = time.time()
        self.queue.running = job
        log.info(
            "job %d started: %s, %.0f s, guild %d",
            job.id,
            job.request.model,
            job.request.duration,
            job.guild_id,
        )
        await self._notify(self.listener.job_started(job))
        last_report = time.monotonic()

        def on_progress(done: int, total: int) -> None:  # on the event loop
            nonlocal last_report
            job.progress = (done, total)
            now = time.monotonic()
            if now - last_report >= self.progress_interval and done < total:
                last_report = now
                self._spawn(self.listener.job_progress(job))

        def progress(done: int, total: int) -> None:  # on the generation thread
            loop.call_soon_threadsafe(on_progress, done, total)

        generate = partial(
            self.generator.generate, job.request, progress=progress, cancel=job.cancel_event
        )
        try:
            result = await loop.run_in_executor(self._executor, generate)
        except GenerationCancelled:
            self._settle(job, JobStatus.CANCELLED)
            log.info("job %d cancelled", job.id)
            await self._notify(self.listener.job_cancelled(job))
        except GenerationError as error:
            self._settle(job, JobStatus.FAILED, str(error))
            log.warning("job %d failed: %s", job.id, error)
            await self._notify(self.listener.job_failed(job, error))
        except Exception:
            log.exception("job %d crashed", job.id)
            error = GenerationError("Something went wrong while generating; please try again.")
            self._settle(job, JobStatus.FAILED, str(error))
            await self._notify(self.listener.job_failed(job, error))
        else:
            self.rate.observe(result)
            self._settle(job, JobStatus.DONE)
            log.info("job %d finished in %.1f s", job.id, result.generation_seconds)
            await self._notify(self.listener.job_finished(job, result))

    def _settle(self, job: Job, status: JobStatus, error: str | None = None) -> None:
        job.status = status
        job.error = error
        job.finished_at = time.time()
        self.queue.running = None

    async def _notify(self, report: Awaitable[None]) -> None:
        """Wait for pending progress reports, then deliver ``report``; a listener's failure
        is logged and never stops the worker."""
        if self._reports:
            await asyncio.gather(*self._reports, return_exceptions=True)
        try:
            await report
        except Exception:
            log.exception("job listener failed")

    def _spawn(self, report: Awaitable[None]) -> None:
        task = asyncio.get_running_loop().create_task(self._guarded(report))
        self._reports.add(task)
        task.add_done_callback(self._reports.discard)

    @staticmethod
    async def _guarded(report: Awaitable[None]) -> None:
        try:
            await report
        except Exception:
            log.exception("job listener failed")
