"""The job system as the bot runs it, for tests: a real SQLite store, a real worker on the tiny
models, the gateway's watcher, and a listener that writes down what requesters would hear."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence

from generation.engine.results import GenerationResult
from generation.errors import GenerationError
from generation.jobs.estimates import Estimate, GenerationRates
from generation.jobs.job import Job, JobStatus
from generation.jobs.retry import Backoff
from generation.jobs.scheduling import BatchPolicy
from generation.jobs.sqlite import SqliteStore
from generation.jobs.store import Channel, JobStore
from generation.jobs.watcher import Watcher
from generation.jobs.worker import Leases, Worker
from generation.request import GenerationRequest

REQUEST = GenerationRequest(prompt="lo-fi", model="debug", duration=0.5, seed=1)
#: Quick retries, so a test sees a store come back (or not) in well under a second.
QUICK = Backoff(first=0.02, longest=0.1, tries=20)
#: Leases short enough that a lost one is noticed within a test.
SHORT = Leases(seconds=0.5, heartbeat=0.1, sweep=0.1, poll=0.1)
ENDED = (JobStatus.DONE, JobStatus.FAILED, JobStatus.CANCELLED)


class Recorder:
    """A JobListener that writes down what it hears (the Discord layer's place)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, int]] = []
        self.progress: dict[int, list[tuple[int, int]]] = {}
        self.results: dict[int, list[GenerationResult]] = {}
        self.errors: dict[int, GenerationError] = {}
        self.moves: list[list[tuple[int, int, float]]] = []
        self._heard = asyncio.Event()

    def _hear(self, kind: str, job: Job) -> None:
        self.events.append((kind, job.id))
        self._heard.set()

    async def until(self, condition: Callable[[], bool], timeout: float = 60.0) -> None:
        """Wait until what was heard satisfies ``condition``."""

        async def wait() -> None:
            while not condition():
                self._heard.clear()
                await self._heard.wait()

        await asyncio.wait_for(wait(), timeout)

    def job_waiting(self, job: Job) -> None:
        self._hear("waiting", job)

    def queue_moved(self, estimates: Sequence[Estimate]) -> None:
        self.moves.append([(e.job_id, e.position, e.seconds) for e in estimates])

    async def job_started(self, job: Job) -> None:
        self._hear("started", job)

    async def job_progress(self, job: Job) -> None:
        self.progress.setdefault(job.id, []).append(job.progress)
        self._hear("progress", job)

    async def job_finished(self, job: Job, results: list[GenerationResult]) -> str:
        self.results[job.id] = results
        self._hear("finished", job)
        return f"https://example.invalid/{job.id}"

    async def job_failed(self, job: Job, error: GenerationError) -> None:
        self.errors[job.id] = error
        self._hear("failed", job)

    async def job_cancelled(self, job: Job) -> None:
        self._hear("cancelled", job)

    def kinds(self, job: Job) -> list[str]:
        return [kind for kind, job_id in self.events if job_id == job.id]


async def submit(
    store: JobStore, request: GenerationRequest = REQUEST, guild: int = 1, user: int = 1, **job
) -> Job:
    """Record and release a job, as the job service does once its requester was told."""
    added = await store.add(Job(0, request, guild, guild * 10, user, **job))
    await store.release(added, None)
    return added


async def until_stored(
    store: JobStore, condition: Callable[[], Awaitable[bool]], timeout: float = 60.0
) -> None:
    """Wait (on the store's notifications, with a poll in case one is missed) until
    ``condition()`` holds."""
    changed = asyncio.Event()
    for channel in (Channel.JOBS, Channel.QUEUE):
        store.subscribe(channel, lambda _: changed.set())

    async def wait() -> None:
        while not await condition():
            changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), 0.2)

    await asyncio.wait_for(wait(), timeout)


async def ended(store: JobStore, *jobs: Job, timeout: float = 60.0) -> list[Job]:
    """Wait until every one of ``jobs`` has ended in the store; returns them as stored."""

    async def all_ended() -> bool:
        stored = [await store.get(job.id) for job in jobs]
        return all(job is not None and job.status in ENDED for job in stored)

    await until_stored(store, all_ended, timeout)
    return [await store.get(job.id) for job in jobs]


class System:
    """A store, a watcher telling ``recorder``, and workers made on demand; stops them all."""

    def __init__(self, store: SqliteStore, recorder: Recorder, engine) -> None:
        self.store = store
        self.recorder = recorder
        self.engine = engine
        self.policy = BatchPolicy()
        self.watcher = Watcher(
            store,
            recorder,
            rates=GenerationRates("cpu"),
            batch_policy=self.policy,
            store_retry=QUICK,
            delivery_retry=QUICK,
        )
        self.workers: list[Worker] = []
        self._timer: asyncio.Task | None = None

    async def start(self) -> None:
        """Start watching, and the timer loop that drives the watcher and the workers (as
        the bot's does, quicker)."""
        await self.watcher.start(time.time())
        self._timer = asyncio.get_running_loop().create_task(self._tick())

    async def _tick(self) -> None:
        ticked: dict[str, float] = {}
        while True:
            await asyncio.sleep(0.1)
            await self.watcher.tick()
            for worker in self.workers:
                now = asyncio.get_running_loop().time()
                if worker.accepting and now - ticked.get(worker.id, 0.0) >= worker.leases.poll:
                    ticked[worker.id] = now
                    await worker.tick()

    async def worker(self, *, start: bool = True, **options) -> Worker:
        options.setdefault("progress_interval", 0.0)
        options.setdefault("leases", SHORT)
        options.setdefault("store_retry", QUICK)
        worker = Worker(self.engine, self.store, **options)
        self.workers.append(worker)
        if start:
            await worker.start()
        return worker

    async def settled(self, *jobs: Job) -> list[Job]:
        """Wait until ``jobs`` ended and their requesters were told; returns them stored."""
        stored = await ended(self.store, *jobs)
        await until_stored(self.store, self._all_told)
        await self.watcher.settle()
        return [await self.store.get(job.id) for job in stored]

    async def _all_told(self) -> bool:
        await self.watcher.settle()
        return not await self.store.undelivered()

    async def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._timer
        for worker in self.workers:
            await worker.stop(grace=60)
        await self.watcher.stop()
