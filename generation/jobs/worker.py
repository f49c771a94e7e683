"""A generation worker: claims jobs from the store, runs them on the engine, and records each
outcome there; the gateway (:mod:`generation.jobs.watcher`) tells the requesters.

The engine decodes continuously (every request on a model shares every step), so the worker
claims a job whenever the engine has a free place, one at a time in the queue's fair order,
and each job runs and ends on its own, whatever else decodes beside it.

Any number of workers may share a store. A claim leases its jobs; the worker renews the
lease by heartbeat while it generates, and each heartbeat says which of its jobs were
cancelled (a ``CANCEL`` notification makes it beat at once, so a cancel reaches the next
decoding step). A worker that stops heartbeating (killed, machine lost) loses its jobs to
:meth:`JobStore.requeue_expired`, which every worker runs from time to time, and every write
it makes about a job is fenced, so it cannot overwrite the job's next run.

The model runs on the engine's own thread, so the event loop keeps going while it decodes;
progress crosses back to the loop with ``call_soon_threadsafe`` and is written to the store
at most once per ``progress_interval`` for each job. Nothing after a claim leaves a job
hanging: a write the store refuses is tried again with back-off; a job whose end is never
recorded is queued again when its lease runs out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from functools import partial
from typing import Protocol

from generation.audio.output import kept_audio
from generation.engine.results import CancelFlag, GenerationResult, ProgressCallback
from generation.errors import GenerationCancelled, GenerationError
from generation.jobs.estimates import GenerationRates, rate_key
from generation.jobs.job import Job, JobStatus
from generation.jobs.retry import STORE_RETRY, Backoff, retrying
from generation.jobs.scheduling import BatchPolicy
from generation.jobs.store import Channel, JobStore, WorkerInfo
from generation.request import GenerationRequest

log = logging.getLogger(__name__)

#: Seconds a worker with jobs running waits before it claims one more while another worker
#: is idle, so that the idle one, which claims at once, takes the job: jobs spread over the
#: GPUs first, then share steps on each.
BUSY_CLAIM_DELAY = 0.5

#: The requester is told this when a track was made but could not be saved.
NOT_KEPT = "The track was made but could not be saved on the bot's side; please try again."


class Generator(Protocol):
    """What the worker runs jobs on: :class:`generation.engine.musicgen.MusicGenEngine`."""

    #: Where the models run ("cpu", "cuda", ...): generation rates are learnt per device.
    device: str

    @property
    def loaded_models(self) -> Sequence[str]: ...

    @property
    def free_places(self) -> int:
        """How many more requests would start decoding now."""
        ...

    def submit(
        self,
        request: GenerationRequest,
        *,
        progress: ProgressCallback | None = None,
        cancel: CancelFlag | None = None,
    ) -> Future[GenerationResult]: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Leases:
    """How a worker holds its jobs.

    Args:
        seconds: How long a claim (or a heartbeat) holds a job; a worker silent that long
            loses it to another.
        heartbeat: Seconds between heartbeats while generating (well under ``seconds``).
        sweep: Seconds between looks for other workers' expired leases.
        poll: Seconds an idle worker waits for a notification before looking at the queue
            anyway (a notification lost with a connection is not waited for forever).
    """

    seconds: float = 60.0
    heartbeat: float = 10.0
    sweep: float = 15.0
    poll: float = 5.0


class Worker:
    """Claims and runs jobs until stopped.

    Args:
        generator: Decodes requests (see :class:`Generator`).
        store: Where the queue is and every job's state and result is kept.
        models: The models this worker serves; None for any.
        batch_policy: How long a job for a model not loaded may be passed over, and (without
            ``join_running``) how big a batch may be.
        join_running: Whether a job may join requests already decoding (continuous
            batching). False is the worker this one replaced, kept as the benchmark's
            baseline: a batch of jobs with one batch key, claimed only when nothing runs,
            runs to its end before the next.
        owns_generator: Whether closing the worker closes ``generator`` (a worker process's
            own engine) or leaves it to whoever shares it.
        leases: How it holds its jobs.
        max_attempts: Times a job may be started before it fails for good.
        progress_interval: Least time between two progress writes for a job, in seconds.
        job_timeout: Longest a job may run, in seconds; None for no limit.
        store_retry: How a write the store refuses is tried again.
    """

    def __init__(
        self,
        generator: Generator,
        store: JobStore,
        *,
        models: Sequence[str] | None = None,
        batch_policy: BatchPolicy | None = None,
        leases: Leases | None = None,
        max_attempts: int = 3,
        progress_interval: float = 5.0,
        job_timeout: float | None = None,
        store_retry: Backoff = STORE_RETRY,
        join_running: bool = True,
        owns_generator: bool = False,
    ) -> None:
        self.generator = generator
        self.join_running = join_running
        self.owns_generator = owns_generator
        self.store = store
        self.models = tuple(models) if models is not None else None
        self.batch_policy = batch_policy or BatchPolicy()
        self.leases = leases or Leases()
        self.max_attempts = max_attempts
        self.progress_interval = progress_interval
        self.job_timeout = job_timeout
        self.store_retry = store_retry
        self.rates = GenerationRates(generator.device)
        self.id = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self.accepting = True
        #: The jobs generating now.
        self.running: list[Job] = []
        self._jobs: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None
        self._writes: set[asyncio.Task[None]] = set()
        self._beaten_at = self._swept_at = float("-inf")

    @property
    def info(self) -> WorkerInfo:
        now = time.time()
        return WorkerInfo(
            id=self.id,
            host=socket.gethostname(),
            device=self.generator.device,
            models=self.models or (),
            loaded=tuple(self.generator.loaded_models),
            started_at=now,
            seen_at=now,
        )

    async def start(self) -> None:
        """Advertise the worker, take up the rates learnt before, and start serving."""
        self.rates.load(await self.store.generation_rates(self.rates.device))
        await self.store.register_worker(self.info)
        self.store.subscribe(Channel.QUEUE, lambda _: self.wake())
        self.store.subscribe(Channel.CANCEL, self._on_cancel)
        self.wake()
        log.info(
            "worker=%s event=started device=%s models=%s",
            self.id,
            self.generator.device,
            ",".join(self.models) if self.models else "any",
        )

    @property
    def busy(self) -> bool:
        return self._task is not None and not self._task.done()

    def wake(self) -> None:
        """Work through the queue now, unless already at it or stopping: a task that claims
        jobs while the engine has room and there is something to claim, then returns."""
        if self.accepting and not self.busy:
            self._task = asyncio.get_running_loop().create_task(self._drain(), name="worker")

    async def tick(self) -> None:
        """What a worker does every few seconds (its driver calls it: a timer loop): renew
        the leases of the jobs it runs, queue again other workers' expired ones now and
        then, and look at the queue (a notification may have been lost)."""
        await self._beat()  # idle too: the gateway counts the workers it hears from
        if time.monotonic() - self._swept_at >= self.leases.sweep:
            self._swept_at = time.monotonic()
            await self._sweep()
        self.wake()

    async def serve_forever(self) -> None:
        """Drive :meth:`tick` every ``leases.poll`` seconds until :meth:`stop` (a worker
        process's main loop)."""
        while self.accepting:
            await self.tick()
            await asyncio.sleep(self.leases.poll)

    async def stop(self, grace: float) -> None:
        """Claim no more jobs; give the running ones ``grace`` seconds, then stop them and put
        them back in the queue, for this worker after a restart or for another now."""
        self.accepting = False
        if self._task is not None:
            await self._task
        if self._jobs:
            _, unfinished = await asyncio.wait(self._jobs, timeout=grace)
            if unfinished:
                for job in self.running:
                    log.info("job=%d event=stopped reason=shutdown (it will run again)", job.id)
                    job.stop("shutdown")
                await asyncio.wait(unfinished)
        if self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)
        with contextlib.suppress(Exception):
            await self.store.forget_worker(self.id)
        self.close()

    def close(self) -> None:
        """Stop the engine's decoding if it is the worker's own (what the end of the process
        does)."""
        if self.owns_generator:
            self.generator.close()

    def run_blocking(self, function: Callable[[], object]) -> asyncio.Future:
        """Run blocking ``function`` off the event loop (e.g. loading a model at start-up)."""
        return asyncio.get_running_loop().run_in_executor(None, function)

    def _on_cancel(self, payload: str) -> None:
        if self.running and (not payload or any(str(job.id) == payload for job in self.running)):
            self._spawn(self.running[0], self._beat)

    async def _drain(self) -> None:
        await asyncio.sleep(self.batch_policy.window)  # let requests sent together meet
        while self.accepting and self._has_room():
            if self.running and await self._idle_worker_elsewhere():
                await asyncio.sleep(BUSY_CLAIM_DELAY)  # it claims first
            try:
                claimed = await self._claim()
            except Exception:
                log.exception(
                    "worker=%s event=claim-failed (tried again at the next tick)", self.id
                )
                return
            if not claimed:
                return
            for job in await self._with_uploads(claimed):
                self._start(job, batch=claimed)

    async def _idle_worker_elsewhere(self) -> bool:
        try:
            workers = await self.store.workers(time.time() - self.leases.seconds)
        except Exception:
            log.warning("worker=%s event=workers-unread", self.id, exc_info=True)
            return False
        return any(worker.id != self.id and not worker.jobs for worker in workers)

    def _has_room(self) -> bool:
        if not self.join_running:
            return not self.running
        decoding = sum(job.takes for job in self.running)
        return decoding < self.batch_policy.max_rows and self.generator.free_places > 0

    async def _sweep(self) -> None:
        """Queue again the jobs of workers that stopped heartbeating."""
        try:
            await self.store.requeue_expired(self.max_attempts)
        except Exception:
            log.exception("worker=%s event=sweep-failed (tried again later)", self.id)

    async def _claim(self) -> list[Job]:
        return await self.store.claim(
            self.id,
            models=self.models,
            loaded=self.generator.loaded_models,
            # Continuous: one job at a time, so servers take turns at every place.
            max_rows=self.batch_policy.max_rows if not self.join_running else 1,
            max_model_wait=self.batch_policy.max_model_wait,
            lease_seconds=self.leases.seconds,
        )

    def _start(self, job: Job, *, batch: Sequence[Job]) -> None:
        """Hand ``job``'s takes to the engine now (so its places are taken before the next
        claim), and follow them in a task of their own: the job ends on its own."""
        self.running.append(job)
        log.info(
            "job=%d event=started attempt=%d model=%s duration=%g guild=%d claimed-with=%s",
            job.id,
            job.attempts,
            job.request.model,
            job.request.duration,
            job.guild_id,
            ",".join(str(other.id) for other in batch),
        )
        progress = self._progress_of(job)
        try:
            takes = [
                self.generator.submit(
                    request, progress=partial(progress, take), cancel=job.cancel_event
                )
                for take, request in enumerate(job.take_requests())
            ]
        except Exception as error:  # the request does not fit the engine
            job.stop("failed")  # a take already submitted stops
            run = self._failed(job, error)
        else:
            run = self._generate(job, takes)
        task = asyncio.get_running_loop().create_task(self._run(job, run), name=f"job-{job.id}")
        self._jobs.add(task)
        task.add_done_callback(self._jobs.discard)

    def _progress_of(self, job: Job) -> Callable[[int, int, int], None]:
        """A callback for the decoding thread, given (take, steps done, steps in all): the
        takes' steps are summed on the event loop and written at most once per
        ``progress_interval``; they keep the leases beating too."""
        loop = asyncio.get_running_loop()
        steps = [(0, 0)] * job.takes
        reported_at = time.monotonic()

        def update(take: int, done: int, total: int) -> None:  # on the event loop
            nonlocal reported_at
            steps[take] = (done, total)
            now = time.monotonic()
            if now - self._beaten_at >= self.leases.heartbeat:
                self._beaten_at = now
                self._spawn(job, self._beat)
            done, total = sum(s[0] for s in steps), sum(s[1] for s in steps)
            if now - reported_at >= self.progress_interval and done < total:
                reported_at = now
                if not job.cancel_event.is_set():
                    self._spawn(job, partial(self.store.set_progress, job, done, total))

        return lambda take, done, total: loop.call_soon_threadsafe(update, take, done, total)

    async def _run(self, job: Job, run: Awaitable[None]) -> None:
        self._beaten_at = time.monotonic()
        try:
            await self._write("update-worker", job, self._advertise)
            await run
        finally:
            self.running.remove(job)
            await self._write("update-worker", job, self._advertise)
            self.wake()

    async def _advertise(self) -> None:
        await self.store.update_worker(
            self.id, self.generator.loaded_models, [job.id for job in self.running]
        )

    async def _with_uploads(self, jobs: list[Job]) -> list[Job]:
        """Load the claimed jobs' clips; a job whose clip expired or is damaged fails, and its
        requester is told. Returns the jobs ready to run."""
        ready = []
        for job in jobs:
            try:
                await self.store.load_uploads(job)
            except Exception as error:
                await self._failed(job, error)
            else:
                ready.append(job)
        return ready

    async def _beat(self) -> None:
        """Renew the running jobs' leases, and stop the jobs the store says to: cancelled
        ones, and ones whose lease was lost (another worker may run them now)."""
        jobs = list(self.running)
        self._beaten_at = time.monotonic()
        try:
            stopped = await self.store.heartbeat(
                self.id, [job.id for job in jobs], self.leases.seconds
            )
        except Exception:
            log.exception("worker=%s event=heartbeat-failed", self.id)
            return
        for job in jobs:
            if job.id in stopped and not job.cancel_event.is_set():
                current = await self.store.get(job.id)
                lost = current is None or current.status is not JobStatus.RUNNING
                job.stop("lost" if lost or current.worker_id != self.id else "cancelled")
                log.info("job=%d event=stopping reason=%s", job.id, job.stop_reason)

    async def _generate(self, job: Job, takes: list[Future[GenerationResult]]) -> None:
        """Wait for the job's takes and record its outcome."""
        waits = [asyncio.wrap_future(take) for take in takes]
        for wait in waits:  # a take that fails after another did is not left unread
            wait.add_done_callback(lambda done: done.cancelled() or done.exception())
        running = asyncio.gather(*waits)
        try:
            results = await asyncio.wait_for(asyncio.shield(running), self.job_timeout)
        except TimeoutError:
            job.stop("timeout")
            with contextlib.suppress(Exception):
                await running  # each take stops at its next step
            await self._failed(
                job,
                GenerationError(
                    f"Generation took longer than {self.job_timeout:g} s and was stopped: "
                    "try a shorter duration or a smaller model."
                ),
            )
            return
        except GenerationCancelled:
            if job.stop_reason is None:  # the engine stopped: the process is ending
                job.stop("shutdown")
            await self._stopped(job)
            return
        except Exception as error:
            job.stop("failed")  # its other takes stop too
            await self._failed(job, error)
            return
        if not results[0].request.stem:  # a split is no measure of the model's rate
            await self._learn(results)
        if job.stop_reason is not None:  # cancelled or lost as its last step ended
            await self._stopped(job)
        else:
            await self._finished(job, results)

    async def _learn(self, results: list[GenerationResult]) -> None:
        """Learn the generation rate at the number of requests that shared the job's steps,
        and keep it for every process to plan with."""
        first = results[0]
        model, rows = rate_key(first.request), max(round(first.shared_with), len(results))
        # Per second generated: a loop keeps fewer seconds than it made.
        rate = self.rates.observe(model, rows, first.request.duration, first.generation_seconds)
        try:
            await self.store.save_generation_rate(self.rates.device, model, rows, rate)
        except Exception:  # a nicety: the jobs' own records matter, and they are tried again
            log.exception("model=%s event=rate-not-kept (known until the worker stops)", model)

    async def _finished(self, job: Job, results: list[GenerationResult]) -> None:
        """Normalise and keep each take, then record the job done (or failed, when the takes
        could not be kept)."""
        loop = asyncio.get_running_loop()
        try:
            for take, result in enumerate(results):
                audio = await loop.run_in_executor(None, kept_audio, result)
                save = partial(self.store.save_result, job, audio, result.sample_rate, take)
                await retrying("save-result", job.id, save, self.store_retry)
        except Exception as error:
            log.error("job=%d event=result-not-kept", job.id, exc_info=error)
            await self._end(job, JobStatus.FAILED, NOT_KEPT)
            return
        job.generation_seconds = results[0].generation_seconds
        if await self._end(job, JobStatus.DONE):
            log.info("job=%d event=finished seconds=%.1f", job.id, job.generation_seconds)

    async def _stopped(self, job: Job) -> None:
        if job.stop_reason == "lost":
            log.warning("job=%d event=lease-lost (another worker runs it)", job.id)
        elif job.stop_reason == "shutdown":
            requeue = partial(self.store.requeue, job, count_attempt=False)
            await self._write("requeue", job, requeue)
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

    async def _end(self, job: Job, status: JobStatus, error: str | None = None) -> bool:
        """Record how ``job`` ended; False if it was not recorded (the store refused every
        try, or the job is no longer this worker's: its lease ran out). Either way the
        store still holds the job's real state, and its lease decides what happens next."""
        try:
            ended = await retrying(
                "finish", job.id, partial(self.store.finish, job, status, error), self.store_retry
            )
        except Exception:
            log.exception("job=%d event=finish-not-recorded (it runs again)", job.id)
            return False
        if not ended:
            log.warning("job=%d event=finish-fenced (no longer this worker's)", job.id)
        return ended

    async def _write(self, what: str, job: Job, write: Callable[[], Awaitable[object]]) -> None:
        """:func:`retrying` ``write``, logging one that never succeeds instead of raising."""
        try:
            await retrying(what, job.id, write, self.store_retry)
        except Exception:
            log.exception("job=%d event=%s-not-recorded", job.id, what)

    def _spawn(self, job: Job, write: Callable[[], Awaitable[object]]) -> None:
        """Write progress (or beat) in the background: generation does not wait for it."""

        async def guarded() -> None:
            try:
                await write()
            except Exception:
                log.warning("job=%d event=write-failed", job.id, exc_info=True)

        task = asyncio.get_running_loop().create_task(guarded())
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)
