"""``/music stats`` at a long history: one server with 300,000 finished jobs (and a few other
servers), in a temporary database built with the store's own schema.

Prints the median of 5 calls of :meth:`SqliteStore.stats` against the full scan it replaced
(every finished job of the server read, counted and sorted in Python).

    ./dev python -m bench.stats [--jobs 300000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

import aiosqlite

from generation.jobs.sqlite import STATS_RECENT, SqliteStore

SERVER = 1
RUNS = 5
OUTCOMES = ("done",) * 8 + ("failed", "cancelled")


def build(path: Path, jobs: int) -> None:
    """``jobs`` finished jobs for :data:`SERVER` (a tenth of that for each of 4 others)."""
    request = json.dumps({"prompt": "lo-fi", "model": "debug", "duration": 10.0})
    connection = sqlite3.connect(path)
    rows = (
        (guild, guild, 1, request, OUTCOMES[n % len(OUTCOMES)], n, n + 1 + n % 7, n + 20, n % 13)
        for guild, count in [(SERVER, jobs)] + [(other, jobs // 10) for other in range(2, 6)]
        for n in range(count)
    )
    with connection:
        connection.executemany(
            """INSERT INTO jobs (guild_id, channel_id, user_id, request, status, submitted_at,
                   started_at, finished_at, generation_seconds, delivered)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 1)""",
            rows,
        )
    connection.close()


async def full_scan(path: Path) -> tuple[int, int, int, float, float]:
    """What ``/music stats`` computed before: the server's whole history, read (through
    aiosqlite, as the store reads) and sorted."""
    async with aiosqlite.connect(path) as connection:
        rows = await connection.execute_fetchall(
            """SELECT status, started_at - submitted_at, generation_seconds FROM jobs
               WHERE guild_id = ? AND status IN ('done', 'failed', 'cancelled')""",
            (SERVER,),
        )
    counts = [sum(row[0] == status for row in rows) for status in ("done", "failed", "cancelled")]
    waits = [row[1] for row in rows if row[1] is not None]
    times = [row[2] for row in rows if row[2] is not None]
    return (*counts, statistics.median(waits), statistics.median(times))


async def median_seconds(call) -> float:
    """The median time of :data:`RUNS` awaits of ``call()``."""
    times = []
    for _ in range(RUNS):
        start = time.perf_counter()
        await call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


async def main(jobs: int) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "bench.sqlite3"
        store = await SqliteStore.open(path)
        await store.close()
        start = time.perf_counter()
        build(path, jobs)
        print(
            f"built {jobs:,} finished jobs (+{4 * (jobs // 10):,}) in "
            f"{time.perf_counter() - start:.1f} s"
        )
        before = await median_seconds(lambda: full_scan(path))
        store = await SqliteStore.open(path)
        try:
            stats = await store.stats(SERVER)
            now = await median_seconds(lambda: store.stats(SERVER))
        finally:
            await store.close()
        connection = sqlite3.connect(path)
        plan = connection.execute(f"EXPLAIN QUERY PLAN {STATS_RECENT}", (SERVER, 1)).fetchall()
        connection.close()
        print(f"served {stats.served:,}, failed {stats.failed:,}, cancelled {stats.cancelled:,}")
        print(f"medians of the last {stats.median_of:,}: plan {' '.join(row[3] for row in plan)}")
        print(f"stats, median of {RUNS}: full scan {before * 1000:.1f} ms, now {now * 1000:.2f} ms")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=300_000, help="the server's finished jobs")
    asyncio.run(main(parser.parse_args().jobs))
