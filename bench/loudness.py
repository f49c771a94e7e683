"""Cost of loudness normalisation on one take: ``./dev python bench/loudness.py``.

Each run is a fresh process that builds a take (chords, noise and drum-like transients that
the limiter has to catch), then times :func:`generation.audio.output.normalise_loudness` on
it: CPU seconds and how far the peak resident memory grew above the process's size before the
call (the take itself included in that size). Prints the median of ``--repeats`` runs, and
the result's loudness and true peak, to show the behaviour.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.memory import peak_resident_bytes, reset_peak


def take(seconds: float, sample_rate: int, channels: int) -> np.ndarray:
    """A music-like float32 take, built a second at a time so no temporary outgrows it."""
    rng = np.random.default_rng(0)
    audio = np.empty((channels, int(seconds * sample_rate)), dtype=np.float32)
    t = np.arange(sample_rate) / sample_rate
    kick = np.exp(-t[: sample_rate // 8] * 40) * np.sin(2 * np.pi * 60 * t[: sample_rate // 8])
    for start in range(0, audio.shape[-1], sample_rate):
        second = start // sample_rate
        chord = sum(np.sin(2 * np.pi * f * (t + second)) for f in (220.0, 277.2, 329.6))
        block = 0.1 * chord + 0.02 * rng.standard_normal((channels, sample_rate))
        for beat in range(0, sample_rate, sample_rate // 2):  # a kick every half second
            block[:, beat : beat + kick.size] += 0.6 * kick
        stop = min(start + sample_rate, audio.shape[-1])
        audio[:, start:stop] = block[:, : stop - start]
    return audio


def one_run(seconds: float, sample_rate: int, channels: int) -> dict[str, float]:
    """Time one normalisation in this process (call it in a fresh one)."""
    import pyloudnorm
    from scipy.signal import resample_poly

    from generation.audio.output import normalise_loudness

    audio = take(seconds, sample_rate, channels)
    reset_peak()
    rss_before = peak_resident_bytes()
    cpu = time.process_time()
    out = normalise_loudness(audio, sample_rate)
    cpu = time.process_time() - cpu
    peak_growth = peak_resident_bytes() - rss_before
    loudness = pyloudnorm.Meter(sample_rate).integrated_loudness(out.T.astype(np.float64))
    true_peak = 20 * np.log10(np.abs(resample_poly(out, 4, 1, axis=-1)).max())
    return {
        "cpu_s": cpu,
        "peak_mib": peak_growth / 2**20,
        "lufs": loudness,
        "dbtp": float(true_peak),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--sample-rate", type=int, default=32_000)
    parser.add_argument("--channels", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per median")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(one_run(args.seconds, args.sample_rate, args.channels)))
        return
    command = [sys.executable, __file__, "--child", "--seconds", str(args.seconds)]
    command += ["--sample-rate", str(args.sample_rate), "--channels", str(args.channels)]
    runs = [
        json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
        for _ in range(args.repeats)
    ]
    median = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
    print(
        f"normalise_loudness, {args.seconds:g} s x {args.channels} channels at "
        f"{args.sample_rate} Hz, median of {args.repeats} fresh processes:\n"
        f"  CPU {median['cpu_s']:.2f} s, peak RSS +{median['peak_mib']:.0f} MiB; "
        f"result {median['lufs']:.2f} LUFS, true peak {median['dbtp']:.2f} dBTP"
    )


if __name__ == "__main__":
    main()
