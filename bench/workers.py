"""Throughput with 1 and 2 worker processes: ``musicgen-bot worker`` processes sharing a
PostgreSQL database with a gateway side that submits jobs and hears them finish.

The gateway side is what ``musicgen-bot gateway`` runs without Discord: a :class:`JobService`
(jobs submitted and released as ``/music generate`` does) and its watcher, whose listener
notes when each job's outcome reaches it. The workers are ``python -m bot.cli worker``
subprocesses (CPU, ``OMP_NUM_THREADS=1``, the debug model) on a fresh schema of ``--server``
(created and dropped). ``generation.max_batch = 1``: each worker runs one job at a time, so
the ratio measures process parallelism, not batching; jobs differ in duration and seed
anyway. Each round starts the workers, warms them up (model loaded, a job each run), then
submits ``--jobs`` jobs at once from several servers and times them from the submission to
the last outcome heard. Jobs per minute, and the ratio of each round (2 processes to 1, one
after the other), are medians over ``--rounds`` rounds.

    ./dev python -m bench.workers [--jobs 24 --duration 10 --rounds 3]

Jobs of 10 s (a typical request) by default: with jobs of 3 s, each a third of a second of
work for the debug model, the fixed cost of a job and the noise of a shared machine take a
visible share of each round.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from generation.jobs.estimates import Estimate
from generation.jobs.job import Job, QueueLimits
from generation.jobs.postgres import PostgresStore
from generation.jobs.service import JobService
from generation.request import GenerationRequest

from .postgres_schema import DEFAULT_SERVER, fresh_schema

#: Servers the jobs come from, in turn.
SERVERS = 4
#: How often the gateway side's watcher looks at the store (its driver in the gateway).
TICK = 1.0
#: Longest wait for the workers to start, or for a round's jobs, in seconds.
TIMEOUT = 600.0


class Outcomes:
    """The gateway's listener: notes when each job's outcome reaches it."""

    def __init__(self) -> None:
        self.finished: dict[int, float] = {}
        self.failed: dict[int, str] = {}
        self.changed = asyncio.Event()

    def queue_moved(self, estimates: Sequence[Estimate]) -> None:
        pass

    async def job_started(self, job: Job) -> None:
        pass

    async def job_progress(self, job: Job) -> None:
        pass

    async def job_finished(self, job: Job, results: list) -> str | None:
        self.finished[job.id] = time.perf_counter()
        self.changed.set()
        return None

    async def job_failed(self, job: Job, error: Exception) -> str | None:
        self.failed[job.id] = str(error)
        self.changed.set()
        return None

    async def job_cancelled(self, job: Job) -> str | None:
        return await self.job_failed(job, Exception("cancelled"))

    async def until_done(self, ids: Sequence[int]) -> float:
        """Wait until every job in ``ids`` finished; returns when the last one was heard."""
        deadline = time.monotonic() + TIMEOUT
        while not all(job_id in self.finished for job_id in ids):
            if failed := [self.failed[job_id] for job_id in ids if job_id in self.failed]:
                raise RuntimeError(f"jobs failed: {failed}")
            self.changed.clear()
            await asyncio.wait_for(self.changed.wait(), deadline - time.monotonic())
        return max(self.finished[job_id] for job_id in ids)


class Workers:
    """``musicgen-bot worker`` processes on one configuration; their output goes to logs."""

    def __init__(self, config: Path, logs: Path) -> None:
        self.config, self.logs = config, logs
        self.processes: list[tuple[subprocess.Popen, Path]] = []

    def start(self, count: int) -> None:
        environment = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        for _ in range(count):
            log = self.logs / f"worker-{len(self.processes) + 1}.log"
            process = subprocess.Popen(
                [sys.executable, "-m", "bot.cli", "worker", "--config", str(self.config)],
                stdout=log.open("w"),
                stderr=subprocess.STDOUT,
                env=environment,
            )
            self.processes.append((process, log))

    def finished(self) -> list[int]:
        """Jobs each worker finished so far (from its log)."""
        return [log.read_text().count("event=finished") for _, log in self.processes]

    def check_alive(self) -> None:
        for process, log in self.processes:
            if process.poll() is not None:
                raise RuntimeError(f"a worker exited ({log}):\n{log.read_text()[-3000:]}")

    def stop(self) -> None:
        for process, _ in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process, _ in self.processes:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.processes = []


def write_config(path: Path, database: str) -> None:
    path.write_text(
        f"""[generation]
models = ["debug"]
device = "cpu"
max_batch = 1
batch_window = 0

[storage]
database = "{database}"
"""
    )


async def submit(service: JobService, count: int, duration: float, first: int) -> list[int]:
    """``count`` jobs as members of several servers send them; their ids."""
    ids = []
    for number in range(first, first + count):
        request = GenerationRequest(
            prompt=f"tune {number}",
            model="debug",
            duration=round(duration + 0.1 * (number % 5 - 2), 2),  # jobs that cannot share a batch
            seed=number,
        )
        guild = number % SERVERS
        job = await service.submit(request, guild_id=guild, channel_id=guild, user_id=number)
        await service.release(job, None)
        ids.append(job.id)
    return ids


async def drive(service: JobService) -> None:
    """The gateway's timer loop: the watcher looks every :data:`TICK` seconds anyway."""
    while True:
        await service.watcher.tick()
        await asyncio.sleep(TICK)


async def round_(
    service: JobService, outcomes: Outcomes, workers: Workers, count: int, args, first: int
) -> float:
    """Start ``count`` workers, warm them up, time ``args.jobs`` jobs; jobs per minute."""
    workers.start(count)
    try:
        deadline = time.monotonic() + TIMEOUT
        warm_up = 2 * count
        while True:  # until each worker has loaded the model and run a job
            workers.check_alive()
            ids = await submit(service, warm_up, args.duration, first)
            first += warm_up
            await outcomes.until_done(ids)
            if all(workers.finished()):
                break
            if time.monotonic() > deadline:
                raise RuntimeError("the workers did not each run a warm-up job")
        before = workers.finished()
        start = time.perf_counter()
        ids = await submit(service, args.jobs, args.duration, first)
        last = await outcomes.until_done(ids)
        workers.check_alive()
        split = "/".join(str(b - a) for a, b in zip(before, workers.finished(), strict=True))
    finally:
        workers.stop()
    per_minute = args.jobs / (last - start) * 60
    print(
        f"  {count} worker{'s' if count > 1 else ' '}: {args.jobs} jobs in {last - start:.1f} s, "
        f"{per_minute:.1f} jobs/min (jobs per worker: {split})"
    )
    return per_minute


async def main(args: argparse.Namespace) -> None:
    async with fresh_schema(args.server, "bench_workers") as url:
        store = await PostgresStore.open(url)
        outcomes = Outcomes()
        service = JobService(store, outcomes, limits=QueueLimits(per_user=99, per_guild=999))
        await service.start()
        driver = asyncio.get_running_loop().create_task(drive(service))
        rates: dict[int, list[float]] = {1: [], 2: []}
        try:
            with tempfile.TemporaryDirectory() as folder:
                config = Path(folder) / "worker.toml"
                write_config(config, url)
                workers = Workers(config, Path(folder))
                for number in range(args.rounds):
                    print(f"round {number + 1}")
                    for count in rates:
                        first = (number * 2 + count) * 1000
                        rates[count].append(
                            await round_(service, outcomes, workers, count, args, first)
                        )
                    print(f"  ratio {rates[2][-1] / rates[1][-1]:.2f}")
        finally:
            driver.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await driver
            await service.shutdown()
    one, two = (statistics.median(rates[count]) for count in (1, 2))
    ratio = statistics.median(b / a for a, b in zip(rates[1], rates[2], strict=True))
    print(
        f"medians of {args.rounds} rounds: 1 process {one:.1f} jobs/min, 2 processes "
        f"{two:.1f} jobs/min ({args.jobs} jobs of ~{args.duration:g} s, debug model, max_batch 1)"
    )
    print(f"workers: 2 processes serve {ratio:.2f}x the jobs of 1 (target 1.8x)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=24, help="timed jobs per round")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of audio per job")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--server", default=DEFAULT_SERVER, help="the PostgreSQL server")
    asyncio.run(main(parser.parse_args()))
