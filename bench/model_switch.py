"""How long the event loop stalls while the engine switches models.

A probe on the event loop sleeps 1 ms at a time and records how late each wake-up is, while
the generation thread (a one-thread executor, as the worker's) loads the debug models in
turn: with no memory budget one model stays loaded, so each load unloads the other one, as a
model switch does in the bot. ``--full-gc`` adds the full ``gc.collect()`` the engine used to
run after each unload, to compare. The stall is what every other coroutine (the Discord
heartbeat, commands) waits while the switch holds the GIL.

    ./dev python -m bench.model_switch --switches 20
    ./dev python -m bench.model_switch --switches 20 --full-gc
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from generation.engine.musicgen import MusicGenEngine

MODELS = ("debug", "debug-stereo")
TICK = 0.001


async def probe(stop: asyncio.Event, lateness: list[float]) -> None:
    """Sleep ``TICK`` at a time until ``stop``; record how late each wake-up was."""
    while not stop.is_set():
        asked = time.perf_counter()
        await asyncio.sleep(TICK)
        lateness.append(time.perf_counter() - asked - TICK)


async def switch_stalls(switches: int, full_gc: bool) -> tuple[list[float], list[float]]:
    """The worst stall of the event loop during each switch, and each switch's length."""
    engine = MusicGenEngine(device="cpu")
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generation")
    loop = asyncio.get_running_loop()

    def switch(name: str) -> None:
        engine.load(name)
        if full_gc:
            gc.collect()

    await loop.run_in_executor(executor, switch, MODELS[0])
    stalls, lengths = [], []
    for turn in range(1, switches + 1):
        stop, lateness = asyncio.Event(), []
        watching = asyncio.create_task(probe(stop, lateness))
        await asyncio.sleep(0.05)  # the probe's baseline
        lateness.clear()
        started = time.perf_counter()
        await loop.run_in_executor(executor, switch, MODELS[turn % len(MODELS)])
        lengths.append(time.perf_counter() - started)
        await asyncio.sleep(0.01)
        stop.set()
        await watching
        stalls.append(max(lateness))
    executor.shutdown()
    return stalls, lengths


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--switches", type=int, default=10)
    parser.add_argument("--full-gc", action="store_true", help="collect after each switch")
    args = parser.parse_args(argv)
    stalls, lengths = asyncio.run(switch_stalls(args.switches, args.full_gc))
    ms = [stall * 1000 for stall in stalls]
    print(
        f"{args.switches} switches{' with a full gc.collect()' if args.full_gc else ''}: "
        f"event-loop stall median {statistics.median(ms):.1f} ms, max {max(ms):.1f} ms; "
        f"switch median {statistics.median(lengths) * 1000:.0f} ms"
    )


if __name__ == "__main__":
    main()
