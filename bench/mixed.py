"""Mixed traffic: a fixed, seeded stream of requests from several servers, arriving over time,
each with its own duration and options, through the bot's job service, worker, store and MP3
encoding; against plain audiocraft running the same requests in sequence, and against the
batch-at-a-time worker this one replaced (:class:`generation.jobs.worker.Worker` with
``join_running=False``) on the same stream.

Run it as a section of ``bench/throughput.py`` (``--sections mixed``), or alone:
``OMP_NUM_THREADS=1 ./dev python -m bench.mixed [--model debug]``.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from audiocraft.models import MusicGen

if __package__ in (None, ""):  # run as a script: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bot_path import Arrival, run_arrivals
from generation.engine.debug_models import offline_demucs
from generation.engine.export import export_checkpoint
from generation.engine.musicgen import MusicGenEngine
from generation.engine.request_decoding import audiocraft_tokens
from generation.request import AudioClip, GenerationRequest

PROMPTS = (
    "lo-fi hip hop beat with mellow piano chords",
    "driving synthwave with a punchy bassline",
    "acoustic folk guitar, warm and slow",
    "epic orchestral build-up with big drums",
    "funky disco groove with slap bass and strings",
    "ambient pads over a soft pulse",
)
#: The options members change most, for the quarter of requests that do.
SAMPLING_CHANGES = (
    {"temperature": 0.8, "top_p": 0.9},
    {"top_k": 50, "cfg_coef": 5.0},
    {"temperature": 1.2, "top_k": 120},
)


@dataclass(frozen=True)
class StreamRun:
    """How a stream went through the bot: seconds from its start to the last MP3 uploaded,
    and each request's time to result (its MP3 uploaded, from its arrival)."""

    wall_seconds: float
    time_to_result: list[float]


def mixed_stream(model: str, count: int = 8, seed: int = 0) -> list[Arrival]:
    """``count`` requests (at least 8) from ``count // 2 + 1`` servers over 10 s: durations
    5-30 s and one of 35 s (extended generation), a quarter with other sampling options, one
    continuing an intro and one following a melody."""
    if count < 8:
        raise ValueError("A mixed stream has at least 8 requests.")
    draw = random.Random(seed)
    sample_rate = 32_000
    seconds = np.arange(3 * sample_rate) / sample_rate
    intro = AudioClip((0.3 * np.sin(2 * np.pi * 220 * seconds))[None].astype(np.float32), 32_000)
    tune = AudioClip((0.3 * np.sin(2 * np.pi * 330 * seconds))[None].astype(np.float32), 32_000)
    arrivals = sorted(draw.uniform(0.0, 10.0) for _ in range(count))
    arrivals[0] = 0.0
    changed = set(draw.sample(range(count), k=count // 4))
    extended, continued, melodic = draw.sample(range(count), k=3)
    stream = []
    for index, at in enumerate(arrivals):
        request = GenerationRequest(
            prompt=draw.choice(PROMPTS),
            model=model,
            duration=float(draw.choice(range(5, 31))),
            seed=draw.randrange(2**31),
        )
        if index in changed:
            request = replace(request, **draw.choice(SAMPLING_CHANGES))
        if index == extended:
            request = replace(request, duration=35.0)
        if index == continued:
            request = replace(request, continuation=intro)
        if index == melodic:
            request = replace(request, melody=tune)
        stream.append(Arrival(at, guild=1 + index % (count // 2 + 1), request=request))
    return stream


def describe(request: GenerationRequest) -> str:
    """What sets a request apart, for the table."""
    parts = []
    defaults = GenerationRequest(prompt="", model="")
    for option in ("temperature", "top_k", "top_p", "cfg_coef"):
        if getattr(request, option) != getattr(defaults, option):
            parts.append(f"{option} {getattr(request, option):g}")
    if request.continuation is not None:
        parts.append(f"intro {request.continuation.seconds:g} s")
    if request.melody is not None:
        parts.append(f"melody {request.melody.seconds:g} s")
    return ", ".join(parts) or "defaults"


def plain_seconds(plain: MusicGen, request: GenerationRequest) -> float:
    """Wall seconds of plain audiocraft generating ``request`` (its own call, as its command
    line or demo would)."""
    torch.manual_seed(request.seed or 0)
    started = time.perf_counter()
    audiocraft_tokens(plain, request)
    return time.perf_counter() - started


def through_bot(
    checkpoint: Path, stream: Sequence[Arrival], max_batch: int, *, join_running: bool
) -> StreamRun:
    """Run ``stream`` through the bot on a fresh engine that has loaded ``checkpoint``."""
    engine = MusicGenEngine(device="cpu", max_requests=max_batch)
    with offline_demucs():
        engine.load(str(checkpoint))
    try:
        wall, times = asyncio.run(
            run_arrivals(engine, stream, max_batch, join_running=join_running)
        )
    finally:
        engine.close()
    return StreamRun(wall, times)


def percentile(values: Sequence[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def _progress(line: str) -> None:
    """A part's result as soon as it is known (a run takes an hour on a small CPU)."""
    print(f"  ({line})", flush=True)


def run_mixed(plain: MusicGen, count: int, max_batch: int) -> float:
    """Print the mixed-traffic section; returns the ratio to plain audiocraft."""
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = export_checkpoint(plain, plain.lm.cfg, Path(folder))
        stream = mixed_stream(str(checkpoint), count)
        continuous = through_bot(checkpoint, stream, max_batch, join_running=True)
        _progress(f"continuous: all done in {continuous.wall_seconds:.1f} s")
        plain_times = [plain_seconds(plain, arrival.request) for arrival in stream]
        _progress(f"plain audiocraft in sequence: {sum(plain_times):.1f} s")
        batches = through_bot(checkpoint, stream, max_batch, join_running=False)
    servers = len({arrival.guild for arrival in stream})
    print(
        f"\n## mixed traffic: {len(stream)} requests from {servers} servers over "
        f"{stream[-1].at:.1f} s, through the bot (generation.max_batch {max_batch}), "
        f"{torch.get_num_threads()} threads"
    )
    print(
        "request  server  arrives s  seconds  options                      plain s  "
        "to result s  batch-at-a-time s"
    )
    for index, arrival in enumerate(stream):
        request = arrival.request
        print(
            f"{index + 1:7d}  {arrival.guild:6d}  {arrival.at:9.1f}  {request.duration:7.0f}  "
            f"{describe(request):27.27s}  {plain_times[index]:7.1f}  "
            f"{continuous.time_to_result[index]:11.1f}  {batches.time_to_result[index]:17.1f}"
        )
    for name, run in (("continuous", continuous), ("batch-at-a-time", batches)):
        print(
            f"{name}: all done in {run.wall_seconds:.1f} s; time to result p50 "
            f"{statistics.median(run.time_to_result):.1f} s, p95 "
            f"{percentile(run.time_to_result, 0.95):.1f} s"
        )
    worse = [
        index + 1
        for index, (new, old) in enumerate(
            zip(continuous.time_to_result, batches.time_to_result, strict=True)
        )
        if new > old
    ]
    print(f"requests slower than under the batch-at-a-time worker: {worse or 'none'}")
    total_plain = sum(plain_times)
    print(f"plain audiocraft in sequence: {total_plain:.1f} s")
    # Where a shared step costs more than one alone (a CPU), batch at a time's schedule is
    # the only one that slows no request against it: what that schedule gives up.
    print(f"batch-at-a-time: {total_plain / batches.wall_seconds:.2f}x plain audiocraft")
    ratio = total_plain / continuous.wall_seconds
    print(f"mixed traffic: {ratio:.2f}x plain audiocraft")
    return ratio


def main(argv: Sequence[str] | None = None) -> None:
    from bench.models import build_small_musicgen

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["small", "debug"], default="small")
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--max-batch", type=int, default=8)
    args = parser.parse_args(argv)
    if args.model == "small":
        plain = build_small_musicgen(melody=True)
    else:
        from generation.engine.debug_models import build_debug_model

        plain = build_debug_model("debug-melody")
    run_mixed(plain, args.requests, args.max_batch)


if __name__ == "__main__":
    main()
