"""Seamless loops: a track cut to whole bars at its beats, its end crossfaded into its start.

librosa's beat tracker finds the beats; a straight line fitted through them gives the beat
period to the sample (the tracker's own positions step by its hop, about 4 ms here), so the
loop is a whole number of beats long. The loop is the audio from one beat to the beat
``beats`` later, and its first :data:`CROSSFADE_SECONDS` are a crossfade of the start with
the audio just after the end: played on repeat, the last sample runs into what followed it in
the track, and the crossfade carries that back into the loop. No click, no gap.

The loop's length is a whole number of bars of :data:`BEATS_PER_BAR` beats, so its tempo
follows from its length alone (:func:`loop_bpm`): the store keeps the audio, not the tempo.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from generation.errors import GenerationError

#: Loops hold whole bars of four beats.
BEATS_PER_BAR = 4
#: The most bars a loop may hold.
MAX_LOOP_BARS = 16
#: How long the end fades into the start (at most a quarter beat).
CROSSFADE_SECONDS = 0.05
#: Beat tracking resolution, in samples (4 ms at 32 kHz).
_HOP = 128


@dataclass(frozen=True, eq=False)
class Loop:
    """A loop's audio (``[channels, samples]``) and tempo."""

    audio: np.ndarray
    bpm: float
    beats: int


def loop_bpm(bars: int, seconds: float) -> float:
    """The tempo of a loop of ``bars`` bars lasting ``seconds``."""
    return 60.0 * bars * BEATS_PER_BAR / seconds


def make_loop(audio: np.ndarray, sample_rate: int, bars: int) -> Loop:
    """Cut ``audio`` (``[channels, samples]``) to a seamless loop of ``bars`` bars.

    Blocking (about 1.2 s for 30 s of stereo on one core once warm; see
    :func:`prepare_beat_tracking` for the first call in a process): run it off the event loop.

    Raises:
        GenerationError: the track has no beat to follow, or is too short for ``bars`` bars
            at its tempo (saying which duration would do).
    """
    beats = bars * BEATS_PER_BAR
    first, period = beat_grid(audio, sample_rate)
    length = round(beats * period)
    fade = min(int(CROSSFADE_SECONDS * sample_rate), int(period / 4))
    samples = audio.shape[-1]
    start = round(first % period)  # the grid's first beat in the track
    if start + length + fade > samples:
        bpm = 60.0 * sample_rate / period
        needed = (start + length + fade) / sample_rate
        raise GenerationError(
            f"At {bpm:.0f} BPM, {bars} bar{'s' if bars > 1 else ''} take {needed:.1f} s but "
            f"{samples / sample_rate:.1f} s were generated: ask for a duration of at least "
            f"{np.ceil(needed + 0.5):.0f} s or fewer bars."
        )
    end = start + length
    out = audio[:, start:end].astype(np.float32, copy=True)
    ramp = np.sin(0.5 * np.pi * (np.arange(fade, dtype=np.float32) + 0.5) / fade)
    out[:, :fade] = out[:, :fade] * ramp**2 + audio[:, end : end + fade] * (1 - ramp**2)
    return Loop(out, bpm=loop_bpm(bars, length / sample_rate), beats=beats)


def prepare_beat_tracking() -> None:
    """Import the beat tracker now rather than at the first loop (a worker does it as it
    starts): importing it compiles librosa's numba code, about 8 s on one core, in stretches
    that hold the GIL for up to a tenth of a second, which would stall the event loop (and
    its heartbeats) in the middle of a job."""
    import librosa.beat
    import librosa.onset  # noqa: F401


def beat_grid(audio: np.ndarray, sample_rate: int) -> tuple[float, float]:
    """The track's beat grid: where a beat falls and the beat period, both in samples.

    Raises:
        GenerationError: the beat tracker found too few beats to follow.
    """
    import librosa

    mono = np.asarray(audio, dtype=np.float32).mean(axis=0)
    strength = librosa.onset.onset_strength(y=mono, sr=sample_rate, hop_length=_HOP)
    _, frames = librosa.beat.beat_track(
        onset_envelope=strength, sr=sample_rate, hop_length=_HOP, trim=True
    )
    if len(frames) < 3:
        raise GenerationError(
            "The track has no steady beat to loop on; try again with another seed or a "
            "prompt with a clear rhythm."
        )
    # The tracker leans its beats towards its tempo estimate (a coarse grid of tempi): move
    # each to the strongest onset within an eighth of a beat, then number the beats (a beat
    # the tracker skipped keeps its number) and fit a line through (number, position) by
    # least squares: the period to well under a sample.
    spacing = float(np.median(np.diff(frames)))
    reach = max(1, int(spacing / 8))
    onsets = np.array(
        [
            f - reach + np.argmax(strength[max(0, f - reach) : f + reach + 1]) + max(0, reach - f)
            for f in frames
        ],
        dtype=np.float64,
    )
    numbers = np.round((onsets - onsets[0]) / spacing)
    period, first = np.polyfit(numbers, onsets * _HOP, 1)
    return float(first), float(period)
