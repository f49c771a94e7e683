"""Start-up recovery of a long queue: time and memory of :meth:`JobService.start`.

Builds a temporary database through the real store: ``--jobs`` queued, released jobs, each
with a melody taken from ``--uploads`` distinct clips (kept once each, as members' repeated
uploads are), the last ``--replies`` of them with a live interaction token (their requesters
still wait on their message). Then each run starts a fresh process that opens the database
and runs the real ``JobService.start`` as the bot that owns an SQLite database does: running
jobs go back to the queue, and the watcher hears of the jobs with a live token (read without
their audio). It reports the time ``start`` took, the time until the watcher's first look
placed every queued job (ETAs), and how much the peak resident memory grew.

``--decode`` also loads every queued job's clips afterwards, read as a worker reads the jobs
it runs (``store.queued`` per server, then ``store.load_uploads``), and keeps them, as the
recovery did before jobs were read without their audio, for comparison: 1.3 MB per 10 s clip,
so use it with fewer jobs.

    ./dev python -m bench.recovery --jobs 10000 --uploads 500 --runs 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from generation.jobs.estimates import Estimate
from generation.jobs.job import Job, ReplyAddress
from generation.jobs.service import JobService
from generation.jobs.sqlite import SqliteStore
from generation.request import AudioClip, GenerationRequest

SAMPLE_RATE = 32_000
#: How long the built jobs' interaction tokens stay valid (Discord's are 15 minutes).
TOKEN_SECONDS = 900.0


def memory_kib(field: str) -> int:
    """``VmRSS`` (resident now) or ``VmHWM`` (peak) of this process, in KiB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


async def build(database: Path, jobs: int, uploads: int, seconds: float, replies: int) -> None:
    store = await SqliteStore.open(database)
    rng = np.random.default_rng(0)
    clips = [
        AudioClip(
            rng.uniform(-0.5, 0.5, (1, int(seconds * SAMPLE_RATE))).astype(np.float32), SAMPLE_RATE
        )
        for _ in range(uploads)
    ]
    base = GenerationRequest(prompt="a tune", model="debug-melody", duration=5.0, seed=1)
    for number in range(jobs):
        request = replace(base, melody=clips[number % uploads])
        job = await store.add(Job(0, request, guild_id=number % 100, channel_id=1, user_id=number))
        reply = None
        if number >= jobs - replies:
            expires_at = time.time() + TOKEN_SECONDS
            reply = ReplyAddress(1, f"token-{number}", expires_at, number, 25 * 2**20)
        await store.release(job, reply)
    await store.close()


class Listener:
    """Hears what recovery tells: the jobs whose requesters wait, and every queued job's
    place once the watcher has looked (none runs: there is no worker, so nothing else is
    heard)."""

    def __init__(self, queued: int) -> None:
        self.queued = queued
        self.waiting = 0
        self.placed: set[int] = set()
        self.all_placed = asyncio.Event()

    def job_waiting(self, job: Job) -> None:
        self.waiting += 1

    def queue_moved(self, estimates: Sequence[Estimate]) -> None:
        self.placed.update(estimate.job_id for estimate in estimates)
        if len(self.placed) >= self.queued:
            self.all_placed.set()


async def recover(database: Path, decode: bool) -> dict[str, float]:
    store = await SqliteStore.open(database)
    listener = Listener(await store.queue_length())
    service = JobService(store, listener, recover_running=True)  # type: ignore[arg-type]
    before = memory_kib("VmRSS")
    started = time.perf_counter()
    await service.start()
    seconds = time.perf_counter() - started
    await listener.all_placed.wait()
    placed_seconds = time.perf_counter() - started
    kept = []
    if decode:
        servers = {entry.guild_id for entry in await store.queue_order()}
        for guild_id in sorted(servers):
            for job in await store.queued(guild_id):
                await store.load_uploads(job)
                kept.append(job)
    decode_seconds = time.perf_counter() - started - placed_seconds
    grown = (memory_kib("VmHWM") - before) / 1024
    await service.shutdown()
    return {
        "seconds": seconds,
        "placed_seconds": placed_seconds,
        "decode_seconds": decode_seconds,
        "peak_rss_growth_mib": grown,
        "queued": len(listener.placed),
        "waiting": listener.waiting,
        "decoded": len(kept),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--uploads", type=int, default=500)
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each clip")
    parser.add_argument(
        "--replies", type=int, default=500, help="jobs whose requester still waits (live token)"
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--decode", action="store_true", help="also load (and keep) every queued job's clips"
    )
    parser.add_argument("--recover", type=Path, help=argparse.SUPPRESS)  # one timed run
    args = parser.parse_args()
    if args.recover:
        print(json.dumps(asyncio.run(recover(args.recover, args.decode))))
        return
    with tempfile.TemporaryDirectory() as folder:
        database = Path(folder) / "bot.sqlite3"
        started = time.perf_counter()
        asyncio.run(build(database, args.jobs, args.uploads, args.seconds, args.replies))
        print(
            f"built {args.jobs} queued jobs with {args.uploads} distinct {args.seconds:g} s "
            f"melodies, {args.replies} with a live token, in {time.perf_counter() - started:.1f} s "
            f"({database.stat().st_size / 2**20:.0f} MiB database)"
        )
        runs = []
        for _ in range(args.runs):
            command = [sys.executable, "-m", "bench.recovery", "--recover", str(database)]
            output = subprocess.run(
                command + (["--decode"] if args.decode else []),
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            run = json.loads(output.splitlines()[-1])
            runs.append(run)
            decoded = f", {run['decoded']} jobs' clips in {run['decode_seconds']:.3f} s"
            print(
                f"  run: {run['seconds']:.3f} s (every job placed at "
                f"{run['placed_seconds']:.3f} s{decoded if args.decode else ''}), peak RSS +"
                f"{run['peak_rss_growth_mib']:.0f} MiB, {run['queued']} queued, "
                f"{run['waiting']} told they wait"
            )
        median = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
        print(
            f"recovery{' + decoding every clip' if args.decode else ''}: median "
            f"{median['seconds']:.3f} s (every job placed at {median['placed_seconds']:.3f} s"
            + (f", clips loaded in {median['decode_seconds']:.3f} s" if args.decode else "")
            + f"), peak RSS growth median {median['peak_rss_growth_mib']:.0f} MiB"
        )


if __name__ == "__main__":
    main()
