"""Costs of the studio tools: ``OMP_NUM_THREADS=1 ./dev python -m bench.studio``.

- Decoding: EnCodec (the model's own decoder) against MultiBand Diffusion, in seconds of work
  per second of audio, on the debug models' tokens: the tiny random-weight MBD of
  :mod:`generation.engine.mbd` (2 bands x 20 denoising passes; the released one has 4 bands).
- Loops: :func:`generation.audio.loop.make_loop` on a 30 s track with a beat (beat tracking,
  the grid fit and the crossfade), warm (the first call in a process also compiles librosa's
  numba code: printed apart).
- Stems: :func:`generation.engine.stems.separate` with the tiny random-weight HTDemucs and
  with an HTDemucs built with demucs' default arguments (random weights: the order of the
  released htdemucs' cost without its download; its exact layout may differ).

Each figure is the median of ``--repeats`` runs in this process, after one warm-up run.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch


def timed(run: Callable[[], object], repeats: int) -> float:
    """The median wall time of ``run`` over ``repeats`` calls, after one warm-up call."""
    run()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def beat_track(seconds: float, sample_rate: int = 32_000, bpm: float = 123.0) -> np.ndarray:
    """Stereo music with a tone burst on every beat over two held tones."""
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    since = t % (60.0 / bpm)
    burst = 0.5 * np.clip(since / 0.004, 0, 1) * np.exp(-since / 0.03) * np.sin(2e3 * np.pi * t)
    mono = 0.3 * np.sin(2 * np.pi * 220.3 * t) + burst
    return np.stack([mono, 0.8 * mono]).astype(np.float32)


def decoding(seconds: float, repeats: int) -> None:
    from generation.engine.debug_models import build_debug_model
    from generation.engine.mbd import decode_tokens, load_mbd

    for name in ("debug", "debug-stereo"):
        model = build_debug_model(name)
        model.set_generation_params(duration=seconds)
        _, tokens = model.generate(["bench"], return_tokens=True)
        mbd = load_mbd(model, debug=True)
        encodec = timed(lambda: model.generate_audio(tokens), repeats)  # noqa: B023
        diffusion = timed(
            lambda: decode_tokens(mbd, tokens, model.compression_model),  # noqa: B023
            repeats,
        )
        print(
            f"decode {seconds:g} s of {name}: EnCodec {encodec / seconds * 1000:.1f} ms per "
            f"second of audio, MBD (tiny, {len(mbd.DPs)} bands x 20 passes) "
            f"{diffusion / seconds * 1000:.1f} ms per second: {diffusion / encodec:.0f}x"
        )


def loops(seconds: float, repeats: int) -> None:
    from generation.audio.loop import make_loop

    track = beat_track(seconds)
    started = time.perf_counter()
    make_loop(track, 32_000, bars=4)
    first = time.perf_counter() - started
    warm = timed(lambda: make_loop(track, 32_000, bars=4), repeats)
    print(
        f"loop of 4 bars from {seconds:g} s of stereo: {warm * 1000:.0f} ms warm "
        f"({first:.1f} s for the first call in a process, librosa's compilation included)"
    )


def stems(seconds: float, repeats: int) -> None:
    from demucs.htdemucs import HTDemucs

    from generation.audio.stems import STEMS
    from generation.engine.debug_models import tiny_htdemucs
    from generation.engine.stems import separate
    from generation.request import AudioClip

    clip = AudioClip(beat_track(seconds), 32_000)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        full = HTDemucs(sources=list(STEMS)).eval()
    for label, model in (("tiny HTDemucs", tiny_htdemucs()), ("default-size HTDemucs", full)):
        size = sum(p.numel() for p in model.parameters()) / 1e6
        spent = timed(lambda: separate(model, clip, "cpu"), repeats)  # noqa: B023
        print(
            f"stems of {seconds:g} s of stereo, {label} ({size:.2f} M parameters): "
            f"{spent:.2f} s, {spent / seconds:.2f} s per second of audio"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="audio decoded and split")
    parser.add_argument("--loop-seconds", type=float, default=30.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    print(f"torch threads: {torch.get_num_threads()}")
    decoding(args.seconds, args.repeats)
    loops(args.loop_seconds, args.repeats)
    stems(args.seconds, args.repeats)


if __name__ == "__main__":
    main()
