"""The bot's own path around generation, with the bot's real code: the job service, the
store (where the queue is), the watcher that tells requesters, a generation worker in the same
process (as ``musicgen-bot run`` has), MP3 encoding at the upload limit and an upload.

The upload goes to an HTTP endpoint on this machine (a multipart POST, as discord.py sends
files), so it counts the bot's work to send a file, not the network's time.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import aiohttp
from aiohttp import web

from bot.bot import TICK_SECONDS
from bot.delivery import encode_for_upload
from generation.engine.musicgen import MusicGenEngine
from generation.engine.results import GenerationResult
from generation.errors import GenerationError
from generation.jobs.estimates import Estimate
from generation.jobs.job import Job, QueueLimits
from generation.jobs.scheduling import BatchPolicy
from generation.jobs.service import JobService
from generation.jobs.sqlite import SqliteStore
from generation.jobs.worker import Worker
from generation.request import GenerationRequest

UPLOAD_LIMIT = 25 * 2**20  # Discord's default for bots


@dataclass(frozen=True)
class QueueRun:
    """How ``requests`` concurrent jobs went through the bot, from submission to upload."""

    requests: int
    wall_seconds: float
    generation_seconds: float  # from the first job's start to the last job's end

    @property
    def overhead(self) -> float:
        """The bot's time around generation, as a share of generation time."""
        return (self.wall_seconds - self.generation_seconds) / self.generation_seconds


class _Uploader:
    """A JobListener that delivers as the bot does: MP3 at the upload limit, then a POST;
    it writes down when each job's files were uploaded."""

    def __init__(self, session: aiohttp.ClientSession, url: str, count: int) -> None:
        self.session, self.url, self.count = session, url, count
        self.delivered: dict[int, float] = {}
        self.all_delivered = asyncio.Event()

    def queue_moved(self, estimates: Sequence[Estimate]) -> None:
        pass

    def job_waiting(self, job: Job) -> None:
        pass

    async def job_started(self, job: Job) -> None:
        pass

    async def job_progress(self, job: Job) -> None:
        pass

    async def job_finished(self, job: Job, results: list[GenerationResult]) -> str:
        files, _ = await encode_for_upload(job, results, UPLOAD_LIMIT)
        form = aiohttp.FormData()
        for index, file in enumerate(files):
            form.add_field(f"files[{index}]", file.fp.read(), filename=file.filename)
        async with self.session.post(self.url, data=form) as response:
            response.raise_for_status()
        self.delivered[job.id] = time.perf_counter()
        if len(self.delivered) == self.count:
            self.all_delivered.set()
        return self.url

    async def job_failed(self, job: Job, error: GenerationError) -> None:
        raise RuntimeError(f"job {job.id} failed: {error}")

    async def job_cancelled(self, job: Job) -> None:
        raise RuntimeError(f"job {job.id} was cancelled")


async def _receive(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(text="ok")


async def _timer(service: JobService, worker: Worker) -> None:
    """The bot's timer loop: look at the store now and then, whatever notifications said."""
    while True:
        await asyncio.sleep(TICK_SECONDS)
        await service.watcher.tick()
        await worker.tick()


@dataclass(frozen=True)
class Arrival:
    """A request sent from server ``guild`` ``at`` seconds after a stream starts."""

    at: float
    guild: int
    request: GenerationRequest


async def run_through_queue(
    engine: MusicGenEngine, request: GenerationRequest, count: int, max_batch: int
) -> QueueRun:
    """Submit ``count`` copies of ``request`` (other prompts and seeds) from ``count`` servers
    at once, and time them until every MP3 is uploaded. The model is loaded beforehand, as
    the bot's worker does at start-up."""
    engine.load(request.model)
    stream = [
        Arrival(0.0, index + 1, replace(request, prompt=f"{request.prompt} {index}", seed=None))
        for index in range(count)
    ]
    wall, _, generation = await _run(engine, stream, max_batch, join_running=True)
    return QueueRun(count, wall, generation)


async def run_arrivals(
    engine: MusicGenEngine, stream: Sequence[Arrival], max_batch: int, *, join_running: bool
) -> tuple[float, list[float]]:
    """Send ``stream`` through the bot as it arrives.

    Returns:
        Seconds from its start to the last MP3 uploaded, and each request's time to result
        (its MP3 uploaded, from its arrival).
    """
    wall, times, _ = await _run(engine, stream, max_batch, join_running=join_running)
    return wall, times


async def _run(
    engine: MusicGenEngine, stream: Sequence[Arrival], max_batch: int, *, join_running: bool
) -> tuple[float, list[float], float]:
    app = web.Application(client_max_size=2 * UPLOAD_LIMIT)
    app.router.add_post("/upload", _receive)
    runner = web.AppRunner(app)
    await runner.setup()
    endpoint = socket.socket()
    endpoint.bind(("127.0.0.1", 0))
    await web.SockSite(runner, endpoint).start()
    port = endpoint.getsockname()[1]
    policy = BatchPolicy(max_rows=max_batch)
    count = len(stream)
    with tempfile.TemporaryDirectory() as folder:
        async with aiohttp.ClientSession() as session:
            listener = _Uploader(session, f"http://127.0.0.1:{port}/upload", count)
            store = await SqliteStore.open(Path(folder) / "bench.sqlite3")
            service = JobService(
                store,
                listener,
                limits=QueueLimits(per_user=count, per_guild=count),
                batch_policy=policy,
                recover_running=True,
                device=engine.device,
            )
            await service.start()
            worker = Worker(engine, store, batch_policy=policy, join_running=join_running)
            await worker.start()
            timer = asyncio.get_running_loop().create_task(_timer(service, worker))
            started = time.perf_counter()
            jobs = []
            for arrival in stream:
                await asyncio.sleep(max(0.0, started + arrival.at - time.perf_counter()))
                job = await service.submit(
                    arrival.request, guild_id=arrival.guild, channel_id=1, user_id=1
                )
                await service.release(job, None)
                jobs.append(job)
            await listener.all_delivered.wait()
            finished = max(listener.delivered.values())
            timer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await timer
            await worker.stop(grace=0)
            stored = [await store.get(job.id) for job in jobs]
            await service.shutdown()
    await runner.cleanup()
    times = [
        listener.delivered[job.id] - (started + arrival.at)
        for job, arrival in zip(jobs, stream, strict=True)
    ]
    # Requests decode together: the engine's time is the span from the first start to
    # the last end, not the sum of each job's.
    generation = max(
        (job.finished_at or 0) - min(other.started_at or 0 for other in stored if other)
        for job in stored
        if job
    )
    return finished - started, times, generation


def median_run(
    engine: MusicGenEngine, request: GenerationRequest, count: int, max_batch: int, repeats: int
) -> QueueRun:
    """The run with the median wall time of ``repeats``."""
    runs = [
        asyncio.run(run_through_queue(engine, request, count, max_batch)) for _ in range(repeats)
    ]
    return sorted(runs, key=lambda run: run.wall_seconds)[len(runs) // 2]


if __name__ == "__main__":  # a quick look on a debug model: python -m bench.bot_path
    engine = MusicGenEngine(device="cpu")
    base = GenerationRequest(prompt="lo-fi", model="debug", duration=10.0)
    for count in (1, 4):
        run = median_run(engine, base, count, max_batch=4, repeats=3)
        print(
            f"{count} x 10 s: wall {run.wall_seconds:.2f} s, generation "
            f"{run.generation_seconds:.2f} s, overhead {run.overhead:.1%}"
        )
