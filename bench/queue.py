"""A queue that stays fast at any size: what each command does against a store holding
``--jobs`` queued jobs over ``--servers`` servers, and the longest the event loop is held.

The jobs are built through the store's own API (``add`` then ``release``, as the gateway
queues them), servers taking turns, in a temporary SQLite database, or in a fresh schema on
the PostgreSQL server ``--postgres`` names (created and dropped). A probe task sleeps 1 ms at a
time and records how late it wakes: that lateness is how long something else held the loop.
Each command runs ``--runs`` times; per command, the median wall time and the longest and
99th-percentile hold. The commands are what the gateway does:

- generate: ``check_room``, ``submit``, ``release`` and ``estimate`` for a job of a new server;
- queue view: ``/music queue`` of a full server (``running``, ``queued``, an estimate per job);
- cancel: ``get`` and ``JobService.cancel`` of a queued job (those generate added);
- position: the position of the job last in the queue;
- ETA refresh: the watcher's refresh of every queued job's place and ETA (chunked).

    ./dev python -m bench.queue [--jobs 20000 --servers 1000] [--postgres URL]
"""

from __future__ import annotations

import argparse
import asyncio
import math
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack, suppress
from pathlib import Path

from generation.jobs.estimates import Estimate
from generation.jobs.job import Job, QueueLimits
from generation.jobs.service import JobService
from generation.jobs.sqlite import SqliteStore
from generation.jobs.store import JobStore
from generation.request import GenerationRequest

from .postgres_schema import fresh_schema

#: How long the probe sleeps; how late it wakes is the hold it saw.
PROBE = 0.001
#: The servers that submit during the benchmark: ids above the built ones, so none is full.
NEW_SERVERS = 1_000_000
#: Requests of a few kinds, so the forecast plans batches of several keys.
DURATIONS = (5.0, 10.0, 15.0, 20.0, 30.0)
#: Jobs added at once while building (the store's pool serves them side by side).
BUILD_AT_ONCE = 32


class LoopProbe:
    """Sleeps :data:`PROBE` at a time on the loop and records how late each wake-up came."""

    def __init__(self) -> None:
        self.lateness: list[float] = []
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._probe())

    async def stop(self) -> None:
        assert self._task is not None
        self._task.cancel()
        with suppress(asyncio.CancelledError):
            await self._task

    async def _probe(self) -> None:
        while True:
            start = time.perf_counter()
            await asyncio.sleep(PROBE)
            self.lateness.append(time.perf_counter() - start - PROBE)


class Listener:
    """Nobody to tell: it only counts the estimates the watcher hands over."""

    def __init__(self) -> None:
        self.estimates = 0

    def queue_moved(self, estimates: Sequence[Estimate]) -> None:
        self.estimates += len(estimates)

    async def job_started(self, job: Job) -> None:
        pass

    async def job_progress(self, job: Job) -> None:
        pass

    async def job_finished(self, job: Job, results: list) -> str | None:
        return None

    async def job_failed(self, job: Job, error: Exception) -> str | None:
        return None

    async def job_cancelled(self, job: Job) -> str | None:
        return None


def request(number: int) -> GenerationRequest:
    return GenerationRequest(
        prompt=f"tune {number}", model="debug", duration=DURATIONS[number % len(DURATIONS)]
    )


async def build(store: JobStore, jobs: int, servers: int) -> Job:
    """``jobs`` queued, released jobs, servers taking turns; returns the last one."""

    async def queue(number: int) -> Job:
        guild = number % servers
        job = Job(0, request(number).with_seed(), guild, guild, number % 7)
        job = await store.add(job)
        await store.release(job, None)
        return job

    last = None
    for start in range(0, jobs, BUILD_AT_ONCE):
        added = await asyncio.gather(*map(queue, range(start, min(jobs, start + BUILD_AT_ONCE))))
        last = added[-1]
    assert last is not None
    return last


async def measure(
    name: str, probe: LoopProbe, runs: int, command: Callable[[int], Awaitable[object]]
) -> tuple[str, float, float, float]:
    """Run ``command(run)`` ``runs`` times; the median wall time, the longest and the 99th
    percentile loop hold, in seconds."""
    await asyncio.sleep(0.01)  # the probe's wake-ups from before belong to no command
    first = len(probe.lateness)
    times = []
    for run in range(runs):
        start = time.perf_counter()
        await command(run)
        times.append(time.perf_counter() - start)
    await asyncio.sleep(0.01)  # the probe wakes after the last hold and records it
    holds = sorted(probe.lateness[first:])
    p99 = holds[min(len(holds) - 1, math.ceil(0.99 * len(holds)) - 1)]
    return name, statistics.median(times), holds[-1], p99


async def bench(store: JobStore, jobs: int, servers: int, runs: int) -> float:
    """Build the queue in ``store``, time each command; returns the longest hold."""
    start = time.perf_counter()
    last = await build(store, jobs, servers)
    seconds = time.perf_counter() - start
    print(f"built {jobs:,} queued jobs over {servers:,} servers in {seconds:.1f} s")
    listener = Listener()
    service = JobService(store, listener, limits=QueueLimits(per_user=runs, per_guild=runs))
    await service.start()
    await service.watcher.stop()  # the refresh is timed as a command of its own
    submitted: list[Job] = []

    async def generate(run: int) -> None:
        guild = NEW_SERVERS + run
        await service.check_room(guild, 1)
        job = await service.submit(request(run), guild_id=guild, channel_id=guild, user_id=1)
        await service.release(job, None)
        assert await service.estimate(job) is not None
        submitted.append(job)

    async def queue_view(run: int) -> None:
        guild = run * 37 % servers
        _running = [job for job in await store.running() if job.guild_id == guild]
        shown = [(job, await service.estimate(job)) for job in await store.queued(guild)]
        assert len(shown) == jobs // servers
        await store.paused_guilds()

    async def cancel(run: int) -> None:
        job = await store.get(submitted[run].id)
        assert job is not None and await service.cancel(job)

    async def position(run: int) -> None:
        assert await store.position(last) == jobs

    async def refresh(run: int) -> None:
        await service.watcher._refresh_estimates(await store.running())

    probe = LoopProbe()
    probe.start()
    results = [
        await measure("generate", probe, runs, generate),
        await measure("queue view", probe, runs, queue_view),
        await measure("cancel", probe, runs, cancel),
        await measure("position of the last job", probe, runs, position),
        await measure("ETA refresh", probe, runs, refresh),
    ]
    await probe.stop()
    assert listener.estimates >= runs * jobs, listener.estimates  # each refresh placed all
    print(f"{'command':<26}{'median':>10}{'longest hold':>14}{'p99 hold':>10}  ({runs} runs each)")
    for name, median, longest, p99 in results:
        print(f"{name:<26}{median * 1000:>8.1f} ms{longest * 1000:>11.1f} ms{p99 * 1000:>7.1f} ms")
    return max(longest for _, _, longest, _ in results)


async def main(jobs: int, servers: int, runs: int, postgres: str | None) -> None:
    async with AsyncExitStack() as stack:
        if postgres:
            from generation.jobs.postgres import PostgresStore

            url = await stack.enter_async_context(fresh_schema(postgres, "bench_queue"))
            store: JobStore = await PostgresStore.open(url)
            where = "PostgreSQL"
        else:
            folder = stack.enter_context(tempfile.TemporaryDirectory())
            store = await SqliteStore.open(Path(folder) / "bench.sqlite3")
            where = "SQLite"
        try:
            longest = await bench(store, jobs, servers, runs)
        finally:
            await store.close()
    print(
        f"longest event-loop hold at {jobs:,} queued jobs ({where}): "
        f"{longest * 1000:.0f} ms (target 50 ms)"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=20_000, help="queued jobs")
    parser.add_argument("--servers", type=int, default=1_000, help="servers they are spread over")
    parser.add_argument("--runs", type=int, default=20, help="runs of each command")
    parser.add_argument("--postgres", metavar="URL", help="a PostgreSQL server to use instead")
    args = parser.parse_args()
    asyncio.run(main(args.jobs, args.servers, args.runs, args.postgres))
