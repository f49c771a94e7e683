"""Generation speed and memory on this machine: ``./dev python bench/throughput.py [--quick]``.

Every ratio is against a baseline measured in the same run: plain audiocraft (unmodified
``MusicGen``), one ``generate`` call per request, in sequence. Sections (each a function, so
more can be added, e.g. one through the bot's queue):

- ``steps``: per-step latency for 1, 4, 8 requests a step: the engine's shared decoding loop in
  float32 and in the CPU's native precision, transformers' MusicGen decoder in the same
  precision, the weight-read floor, and plain audiocraft.
- ``throughput``: aggregate throughput of N concurrent requests of ``--seconds`` each.
- ``duration``: time against duration (beyond 30 s, extended generation).
- ``rss``: peak resident memory of a process that loads the model and generates.
- ``output``: the bot's own work on a finished clip (loudness, MP3).
- ``queue``: N concurrent requests through the bot's job service, queue, worker, store, MP3
  encoding and upload (``bench/bot_path.py``), and the bot's time around generation.
- ``cuda``: real-time factor for 1 and 4 requests and GPU memory, when a GPU is present.
- ``mixed``: a seeded stream of requests with their own durations, options and arrival times
  through the bot, against plain audiocraft in sequence and the batch-at-a-time worker
  (``bench/mixed.py``).
- ``past``: a step of the shared loop late in a window: its past kept in the weights' dtype
  or in float32, attended by the engine's kernel or by PyTorch's attention (the loop's
  before), its weights packed or not.
- ``attention``: the attention over the past alone, the engine's kernel against PyTorch's, at
  equal pasts and at pasts of each request's own length.

Times on a shared machine are noisy: sections interleave what they compare and print medians
(wall clock, and CPU time of this process, which other processes disturb less).
"""

from __future__ import annotations

import argparse
import copy
import multiprocessing
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):  # run as a script: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from audiocraft.models import MusicGen

from bench.models import build_peer, build_plain_and_optimised
from bench.steps import (
    PROMPT,
    LoopVariant,
    attending_with,
    attention_seconds,
    audiocraft_step,
    late_loops,
    loop_step,
    loop_steps,
    peer_step,
    pytorch_attention,
    weight_read_floor,
)
from generation.engine.decoding import optimise_for_decoding

TEXT_TOKENS = 18  # about what T5 makes of PROMPT; the peer cross-attends to this many


def table(title: str, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Print an aligned table."""
    cells = [[str(c) for c in header]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print(f"\n## {title}")
    for i, row in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def section_steps(plain: MusicGen, fast: MusicGen, args: argparse.Namespace) -> None:
    """(a) Median ms per decoding step at 1, 4 and 8 requests: the engine's shared loop in
    float32 and in the CPU's native precision, transformers' MusicGen decoder in the same
    precision, the weight-read floor of that precision, and plain audiocraft (float32)."""
    from generation.engine.precision import resolve_precision

    precisions = sorted({"fp32", resolve_precision("auto", "cpu")}, reverse=True)
    plain_times = {
        batch: statistics.median(
            audiocraft_step(plain, batch, args.steps).wall for _ in range(args.repeats)
        )
        for batch in args.batches
    }
    rows = []
    for precision in precisions:
        model = decoding_copy(plain, precision)
        peer = build_peer(args.model).to(_DTYPES[precision])
        floor = weight_read_floor(model)
        for batch in args.batches:
            runs = [
                (loop_step(model, batch, args.steps), peer_step(peer, batch, args.steps, 18))
                for _ in range(args.repeats)
            ]
            ours = statistics.median(run[0].wall for run in runs)
            theirs = statistics.median(run[1].wall for run in runs)
            rows.append(
                [
                    batch,
                    precision,
                    1000 * ours,
                    1000 * theirs,
                    1000 * floor,
                    1000 * plain_times[batch],
                    ours / theirs,
                    ours / floor,
                    plain_times[batch] / ours,
                ]
            )
        del model, peer
    table(
        f"(a) ms per step, median of {args.repeats} runs x {args.steps} steps "
        f"(first steps of a generation, {torch.get_num_threads()} threads)",
        [
            "requests",
            "precision",
            "engine",
            "transformers",
            "weight-read floor",
            "plain fp32",
            "engine/transformers",
            "engine/floor",
            "x plain",
        ],
        rows,
    )


def decoding_copy(plain: MusicGen, precision: str) -> MusicGen:
    """``plain`` as the engine decodes it in ``precision``: its LM copied whole (the
    precision casts it), its codec shared (weight norm cannot be deep-copied)."""
    from generation.engine.precision import apply_precision

    model = MusicGen(plain.name, plain.compression_model, copy.deepcopy(plain.lm))
    apply_precision(model, precision)
    optimise_for_decoding(model)
    return model


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def generate_seconds(model: MusicGen, requests: int, seconds: float) -> float:
    """Wall seconds of one ``generate`` call for ``requests`` prompts of ``seconds`` each."""
    model.set_generation_params(duration=seconds, use_sampling=True, top_k=250, extend_stride=18)
    torch.manual_seed(0)
    started = time.perf_counter()
    model.generate([PROMPT] * requests)
    return time.perf_counter() - started


def warm_generate_seconds(model: MusicGen, requests: int, seconds: float) -> float:
    """:func:`generate_seconds` of a second call: on a GPU, each new shape (one per step, as
    the past grows) costs its kernels' set-up on first use, which a server pays once."""
    generate_seconds(model, requests, seconds)
    return generate_seconds(model, requests, seconds)


_plain_single: dict[float, float] = {}


def plain_single_seconds(plain: MusicGen, args: argparse.Namespace) -> float:
    """The median of ``args.repeats`` single plain calls of ``args.seconds``, measured once a
    run: N requests in sequence take N times this (each call is independent)."""
    if args.seconds not in _plain_single:
        runs = [generate_seconds(plain, 1, args.seconds) for _ in range(args.repeats)]
        _plain_single[args.seconds] = statistics.median(runs)
    return _plain_single[args.seconds]


def section_throughput(plain: MusicGen, fast: MusicGen, args: argparse.Namespace) -> None:
    """(b) Aggregate throughput of N concurrent requests against sequential plain calls."""
    baseline_one = plain_single_seconds(plain, args)
    rows = []
    for n in args.concurrency:
        sequential = n * baseline_one
        timings = {
            "optimised, in sequence": n * generate_seconds(fast, 1, args.seconds),
            "plain, one batched call": generate_seconds(plain, n, args.seconds),
            "optimised, one batched call": generate_seconds(fast, n, args.seconds),
        }
        rows.append(
            [n, "plain, in sequence (baseline)", sequential, n * args.seconds / sequential, 1.0]
        )
        for name, wall in timings.items():
            rows.append([n, name, wall, n * args.seconds / wall, sequential / wall])
    table(
        f"(b) {args.seconds:g} s requests, N at once",
        ["N", "how", "wall s", "audio s per s", "x baseline"],
        rows,
    )


def section_duration(plain: MusicGen, fast: MusicGen, args: argparse.Namespace) -> None:
    """(c) Time against duration for one request (optimised; plain too with --plain-durations)."""
    rows = []
    for seconds in args.durations:
        steps = _count_steps(fast, seconds)
        wall = generate_seconds(fast, 1, seconds)
        row = [seconds, steps, wall, wall / seconds, 1000 * wall / steps]
        if args.plain_durations:
            base = generate_seconds(plain, 1, seconds)
            row += [base, base / wall]
        rows.append(row)
    header = ["seconds", "steps", "wall s", "real-time factor", "ms per step"]
    if args.plain_durations:
        header += ["plain wall s", "x plain"]
    table("(c) one request, optimised, against duration", header, rows)


def _count_steps(model: MusicGen, seconds: float) -> int:
    from generation.engine.request_decoding import planned_steps
    from generation.request import GenerationRequest

    request = GenerationRequest(prompt=PROMPT, model=model.name, duration=seconds)
    return planned_steps(model, request)


def section_rss(plain: MusicGen, fast: MusicGen, args: argparse.Namespace) -> None:
    """(d) Resident memory of a fresh process that serves as the bot does: its engine loads
    the model from a checkpoint folder (the plain model, exported) and generates; in the
    CPU's native precision (``auto``) and in float32, where they differ."""
    import tempfile

    from generation.engine.export import export_checkpoint
    from generation.engine.precision import resolve_precision

    precisions = dict.fromkeys(resolve_precision(p, "cpu") for p in ("auto", "fp32"))
    context = multiprocessing.get_context("spawn")
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        model = "debug"
        if args.model == "small":
            model = str(export_checkpoint(plain, plain.lm.cfg, Path(folder)))
        for precision in precisions:
            with context.Pool(1) as pool:
                sizes = pool.apply(_rss_child, (model, precision, args.rss_seconds, args.threads))
            rows.append([args.model, precision, args.rss_seconds, *(s / 2**30 for s in sizes)])
    table(
        "(d) resident memory of one process that loads the model and generates, GiB",
        ["model", "precision", "generated s", "peak while loading", "loaded", "peak generating"],
        rows,
    )


def _rss_child(
    model: str, precision: str, seconds: float, threads: int | None
) -> tuple[int, int, int]:
    import gc

    from bench.memory import peak_resident_bytes, reset_peak
    from generation.engine.musicgen import MusicGenEngine, _resident_bytes
    from generation.request import GenerationRequest

    if threads:
        torch.set_num_threads(threads)
    engine = MusicGenEngine(device="cpu", precision=precision)
    engine.load(model)
    loading = peak_resident_bytes()  # the imports' too: what the host must hold
    gc.collect()
    loaded = _resident_bytes()
    reset_peak()
    engine.generate(GenerationRequest(prompt=PROMPT, model=model, duration=seconds))
    return loading, loaded, peak_resident_bytes()


def _build_one(model: str) -> MusicGen:
    if model == "debug":
        from generation.engine.debug_models import build_debug_model

        return build_debug_model("debug")
    from bench.models import build_small_musicgen

    return build_small_musicgen()


def section_output(plain: MusicGen, fast: MusicGen, args: argparse.Namespace) -> None:
    """(e) The bot's own work on a finished clip: loudness and MP3, against generating it."""
    import numpy as np

    from generation.audio.output import encode_mp3, normalise_loudness

    sample_rate = fast.sample_rate
    rng = np.random.default_rng(0)
    audio = (0.1 * rng.standard_normal((1, int(args.seconds * sample_rate)))).astype(np.float32)
    times = []
    for _ in range(3):
        started = time.perf_counter()
        encode_mp3(normalise_loudness(audio, sample_rate), sample_rate)
        times.append(time.perf_counter() - started)
    encode = statistics.median(times)
    generation = generate_seconds(fast, 1, args.seconds)
    table(
        f"(e) bot work on a {args.seconds:g} s clip (queue and upload: see the worker's section)",
        ["loudness + MP3 s", "generation s (optimised)", "share"],
        [[encode, generation, encode / generation]],
    )


def section_cuda(plain: MusicGen, fast: MusicGen, args: argparse.Namespace) -> None:
    """(f) On a GPU: real-time factor of 1, 8 and 32 concurrent requests through the engine's
    shared decoding loop (fp16 autocast, as audiocraft on a GPU), against plain audiocraft
    generating one request and the same number as one batched call."""
    if not torch.cuda.is_available():
        print("\n## (f) CUDA: no GPU here, skipped")
        return
    import tempfile

    from generation.engine.export import export_checkpoint
    from generation.engine.musicgen import MusicGenEngine
    from generation.request import GenerationRequest

    if args.model == "debug":
        from generation.engine.debug_models import build_debug_model

        gpu_plain = build_debug_model("debug", "cuda")
    else:
        from bench.models import build_small_musicgen

        gpu_plain = build_small_musicgen("cuda")
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = export_checkpoint(plain, plain.lm.cfg, Path(folder))
        engine = MusicGenEngine(device="cuda", max_requests=max(args.cuda_requests))
        engine.load(str(checkpoint))
        request = GenerationRequest(prompt=PROMPT, model=str(checkpoint), duration=args.seconds)
        plain_one = warm_generate_seconds(gpu_plain, 1, args.seconds)
        for n in args.cuda_requests:
            requests = [replace(request, seed=seed) for seed in range(n)]
            # Warm-up: the kernels for n requests' shapes are chosen on their first use.
            engine.generate_batch([replace(r, duration=1.0) for r in requests])
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            started = time.perf_counter()
            engine.generate_batch(requests)
            torch.cuda.synchronize()
            wall = time.perf_counter() - started
            memory = torch.cuda.max_memory_allocated() / 2**30
            plain_batch = warm_generate_seconds(gpu_plain, n, args.seconds) if n > 1 else plain_one
            audio = n * args.seconds
            speed_ups = [n * plain_one / wall, plain_batch / wall]
            rows.append([n, wall, wall / args.seconds, audio / wall, memory, *speed_ups])
            print(f"  {n} requests: {wall:.2f} s, plain one by one {n * plain_one:.2f} s")
        engine.close()
    table(
        f"(f) CUDA {torch.cuda.get_device_name()}, fp16 autocast, {args.seconds:g} s requests "
        "sent together to the engine",
        [
            "requests",
            "wall s",
            "real-time factor",
            "audio s per s",
            "max GPU GiB",
            "x plain one by one",
            "x plain one batch",
        ],
        rows,
    )


def section_queue(plain: MusicGen, fast: MusicGen, args: argparse.Namespace) -> None:
    """(g) N concurrent requests through the bot, against sequential plain calls.

    The plain model is exported as a checkpoint folder and loaded by the bot's engine through
    ``MusicGen.get_pretrained`` (which applies the decoding speed-ups), as a released model is.
    """
    import asyncio
    import tempfile

    from bench.bot_path import run_through_queue
    from generation.engine.export import export_checkpoint
    from generation.engine.musicgen import MusicGenEngine
    from generation.request import GenerationRequest

    baseline_one = plain_single_seconds(plain, args)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = export_checkpoint(plain, plain.lm.cfg, Path(folder))
        engine = MusicGenEngine(device="cpu")
        request = GenerationRequest(prompt=PROMPT, model=str(checkpoint), duration=args.seconds)
        for n in args.concurrency:
            run = asyncio.run(run_through_queue(engine, request, n, args.max_batch))
            sequential = n * baseline_one
            rows.append(
                [
                    n,
                    sequential,
                    run.wall_seconds,
                    n * args.seconds / run.wall_seconds,
                    sequential / run.wall_seconds,
                    run.overhead,
                ]
            )
    table(
        f"(g) {args.seconds:g} s requests from N servers at once, through the bot "
        f"(generation.max_batch {args.max_batch}): submitted until every MP3 is uploaded",
        [
            "N",
            "plain in sequence s",
            "bot wall s",
            "audio s per s",
            "x baseline",
            "bot overhead / generation",
        ],
        rows,
    )


def section_mixed(plain: MusicGen, fast: MusicGen, args: argparse.Namespace) -> None:
    """(h) Mixed traffic through the bot (``bench/mixed.py``), on a melody-capable model of
    the same size; its last line is the ratio to plain audiocraft."""
    from bench.mixed import run_mixed

    if args.model == "small":
        from bench.models import build_small_musicgen

        melodic = build_small_musicgen(melody=True)
    else:
        from generation.engine.debug_models import build_debug_model

        melodic = build_debug_model("debug-melody")
    run_mixed(melodic, args.mixed_requests, args.max_batch)


def section_past(plain: MusicGen, fast: MusicGen, args: argparse.Namespace) -> None:
    """(i) Median ms per step of the engine's shared loop late in a window (``--past`` steps
    of past, the largest of ``--batches`` requests) in the CPU's native precision: its past
    kept in the weights' dtype and in float32, attended by the engine's kernel
    (``generation/engine/past_attention.py``) or by PyTorch's attention as the loop did
    before it, and its weights packed for oneDNN or in PyTorch's layout; the loops' steps
    are timed in turn."""
    from generation.engine.precision import resolve_precision
    from generation.engine.shared_step import attention_dtype

    precision = resolve_precision("auto", "cpu")
    model = decoding_copy(plain, precision)
    batch = max(args.batches)
    weights = _DTYPES[precision]
    engines = LoopVariant(attention_dtype(model) or weights)
    variants = [
        engines,
        LoopVariant(torch.float32, attend=pytorch_attention),
        LoopVariant(engines.past_dtype, packed=False),
    ]
    if weights != torch.float32:
        variants[2:2] = [
            LoopVariant(torch.float32),
            LoopVariant(weights, attend=pytorch_attention),
        ]
    loops = late_loops(model, batch, args.past, variants)
    times: list[list[float]] = [[] for _ in loops]
    for _ in range(args.repeats):
        for variant, loop, runs in zip(variants, loops, times, strict=True):
            with attending_with(variant.attend):
                runs.append(loop_steps(loop, args.steps).wall)
    rows = [
        [
            batch,
            args.past,
            str(variant.past_dtype).removeprefix("torch.") + (" *" if variant == engines else ""),
            "this engine's" if variant.attend is engines.attend else "PyTorch's",
            "packed for oneDNN" if variant.packed else "PyTorch's layout",
            1000 * statistics.median(runs),
        ]
        for variant, runs in zip(variants, times, strict=True)
    ]
    table(
        f"(i) ms per step late in a window, median of {args.repeats} runs x {args.steps} steps "
        f"({precision} weights, {torch.get_num_threads()} threads; * the engine's choice)",
        ["requests", "steps of past", "past kept in", "attention", "weights", "engine"],
        rows,
    )


def section_attention(plain: MusicGen, fast: MusicGen, args: argparse.Namespace) -> None:
    """(j) Median ms of the attention over the past alone, one step of every layer, for the
    largest of ``--batches`` requests (2 rows each) in the past's dtype on this CPU: the
    engine's kernel against PyTorch's attention (once per run of rows of equal past), with
    every row at ``--past`` steps, and with each request's past its own, evenly from half to
    1.5 times ``--past`` (a request and its CFG twin share one), as in real traffic."""
    from generation.engine import past_attention
    from generation.engine.precision import resolve_precision

    dtype = _DTYPES[resolve_precision("auto", "cpu")]  # a past in the weights' own dtype
    past_attention.warm_up(dtype)
    batch = max(args.batches)
    pasts = {
        "equal": np.full(2 * batch, args.past, dtype=np.int64),
        "each its own": np.repeat(np.linspace(args.past / 2, 1.5 * args.past, batch), 2).astype(
            np.int64
        ),
    }
    rows = []
    for name, lengths in pasts.items():
        ours, theirs = (
            attention_seconds(plain, lengths, attend, dtype, args.repeats)
            for attend in (past_attention.attend, pytorch_attention)
        )
        rows.append(
            [
                batch,
                name,
                f"{lengths.min()}-{lengths.max()}",
                1000 * ours,
                1000 * theirs,
                ours / theirs,
            ]
        )
    table(
        f"(j) ms of attention over the past, every layer once, median of {args.repeats} runs "
        f"({str(dtype).removeprefix('torch.')} past, {torch.get_num_threads()} threads)",
        ["requests", "pasts", "steps", "engine's kernel", "PyTorch's", "kernel/PyTorch"],
        rows,
    )


SECTIONS: dict[str, Callable[[MusicGen, MusicGen, argparse.Namespace], None]] = {
    "steps": section_steps,
    "throughput": section_throughput,
    "duration": section_duration,
    "rss": section_rss,
    "output": section_output,
    "cuda": section_cuda,
    "queue": section_queue,
    "mixed": section_mixed,
    "past": section_past,
    "attention": section_attention,
}


def _numbers(kind: type) -> Callable[[str], list]:
    return lambda text: [kind(x) for x in text.split(",") if x]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short run: fewer steps, 1 s clips")
    parser.add_argument("--model", choices=["small", "debug"], default="small")
    parser.add_argument("--sections", type=_numbers(str), default=list(SECTIONS))
    parser.add_argument("--batches", type=_numbers(int), default=[1, 4, 8])
    parser.add_argument("--steps", type=int, default=12, help="timed steps per run in (a)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per median")
    parser.add_argument("--concurrency", type=_numbers(int), default=[1, 2, 4, 8])
    parser.add_argument("--seconds", type=float, default=10.0, help="clip length in (b), (e)")
    parser.add_argument("--durations", type=_numbers(float), default=[10, 30, 45, 60])
    parser.add_argument("--plain-durations", action="store_true", help="plain runs in (c)")
    parser.add_argument("--rss-seconds", type=float, default=10.0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--max-batch", type=int, default=8, help="generation.max_batch in (g), (h)")
    parser.add_argument("--mixed-requests", type=int, default=8, help="requests in (h)")
    parser.add_argument("--past", type=int, default=440, help="steps of past in (i), (j)")
    parser.add_argument("--cuda-requests", type=_numbers(int), default=[1, 8, 32])
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.repeats, args.seconds, args.rss_seconds = 5, 1, 1.0, 1.0
        args.batches, args.concurrency, args.durations = [1, 4], [1, 4], [1.0, 2.0]
    unknown = set(args.sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections: {', '.join(sorted(unknown))}")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"model {args.model}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"sections {', '.join(args.sections)}"
    )
    plain, fast = build_plain_and_optimised(args.model)
    for name in args.sections:
        SECTIONS[name](plain, fast, args)


if __name__ == "__main__":
    main()
