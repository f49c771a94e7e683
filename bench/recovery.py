"""Start-up recovery of a long queue: time and memory of :meth:`JobService.start`.

Builds a temporary database through the real store: ``--jobs`` queued jobs, each with a
melody taken from ``--uploads`` distinct clips (kept once each, as members' repeated uploads
are). Then each run starts a fresh process that opens the database and runs the real
``JobService.start`` (with a real, unloaded engine), and reports its wall time and how much
its peak resident memory grew. ``--decode`` also loads every job's clips afterwards, as the
recovery did before jobs were read without their audio, for comparison.

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
from dataclasses import replace
from pathlib import Path

import numpy as np

from generation.engine.musicgen import MusicGenEngine
from generation.jobs.job import Job
from generation.jobs.service import JobService
from generation.jobs.sqlite import SqliteStore
from generation.request import AudioClip, GenerationRequest

SAMPLE_RATE = 32_000


def memory_kib(field: str) -> int:
    """``VmRSS`` (resident now) or ``VmHWM`` (peak) of this process, in KiB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


async def build(database: Path, jobs: int, uploads: int, seconds: float) -> None:
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
        await store.add(Job(0, request, guild_id=number % 100, channel_id=1, user_id=number))
    await store.close()


class Listener:
    """Nobody to tell: recovery queues the jobs, none runs (the service is not woken)."""

    def queue_moved(self, estimates: object) -> None:
        pass


async def recover(database: Path, decode: bool) -> dict[str, float]:
    engine = MusicGenEngine(device="cpu")
    store = await SqliteStore.open(database)
    service = JobService(engine, store, Listener())  # type: ignore[arg-type]
    service.worker.accepting = False  # recover, run nothing
    before = memory_kib("VmRSS")
    started = time.perf_counter()
    await service.start()
    if decode:
        for job in service.queue.runnable():
            await store.load_uploads(job)
    seconds = time.perf_counter() - started
    grown = (memory_kib("VmHWM") - before) / 1024
    queued = len(service.queue.runnable())
    service.worker.close()
    await store.close()
    return {"seconds": seconds, "peak_rss_growth_mib": grown, "queued": queued}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--uploads", type=int, default=500)
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each clip")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--decode", action="store_true", help="also load every job's clips")
    parser.add_argument("--recover", type=Path, help=argparse.SUPPRESS)  # one timed run
    args = parser.parse_args()
    if args.recover:
        print(json.dumps(asyncio.run(recover(args.recover, args.decode))))
        return
    with tempfile.TemporaryDirectory() as folder:
        database = Path(folder) / "bot.sqlite3"
        started = time.perf_counter()
        asyncio.run(build(database, args.jobs, args.uploads, args.seconds))
        print(
            f"built {args.jobs} queued jobs with {args.uploads} distinct {args.seconds:g} s "
            f"melodies in {time.perf_counter() - started:.1f} s "
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
            runs.append(json.loads(output.splitlines()[-1]))
            print(
                f"  run: {runs[-1]['seconds']:.3f} s, peak RSS +"
                f"{runs[-1]['peak_rss_growth_mib']:.0f} MiB, {runs[-1]['queued']:.0f} queued"
            )
        print(
            f"recovery{' + decoding every clip' if args.decode else ''}: median "
            f"{statistics.median(r['seconds'] for r in runs):.3f} s, peak RSS growth median "
            f"{statistics.median(r['peak_rss_growth_mib'] for r in runs):.0f} MiB"
        )


if __name__ == "__main__":
    main()
