"""Carrying a track on: the intro a continuation hears, and stitching continued parts.

A continuation's result starts with its intro (as the model re-decodes it), then the new
music. A track carried on several times (a relay jam) is the first result, then the new part
of each later one; the seams are crossfaded over the end of each intro, where both sides hold
the same music.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from generation.request import WINDOW_SECONDS, AudioClip, GenerationRequest

#: The longest intro a continuation is given: the end of the track is what matters, and half
#: the model's window stays free for the new music (no extended generation for short parts).
MAX_INTRO_SECONDS = WINDOW_SECONDS / 2
#: Crossfade at each seam, in seconds.
CROSSFADE_SECONDS = 0.05


def intro_clip(
    audio: np.ndarray, sample_rate: int, max_seconds: float = MAX_INTRO_SECONDS
) -> AudioClip:
    """The last ``max_seconds`` of ``audio`` ([channels, samples]), as a continuation intro."""
    keep = int(max_seconds * sample_rate)
    tail = audio[:, -keep:] if audio.shape[-1] > keep else audio
    return AudioClip(np.ascontiguousarray(tail, dtype=np.float32), sample_rate)


def continue_request(
    request: GenerationRequest, intro: AudioClip, added_seconds: float
) -> GenerationRequest:
    """``request`` carrying ``intro`` on by ``added_seconds`` (its duration counts the intro)."""
    return replace(request, continuation=intro, melody=None, duration=intro.seconds + added_seconds)


def new_part(audio: np.ndarray, sample_rate: int, intro_seconds: float) -> np.ndarray:
    """What a continuation result adds after its intro of ``intro_seconds``."""
    return audio[:, round(intro_seconds * sample_rate) :]


def stitch(parts: list[tuple[np.ndarray, float]], sample_rate: int) -> np.ndarray:
    """Join results into one track: the first whole, then each one's new part.

    Args:
        parts: Each result's audio ([channels, samples]) and the length of its intro in
            seconds (0 for a result that continues nothing).
        sample_rate: The rate of every part.
    """
    if not parts:
        raise ValueError("nothing to stitch")
    channels = max(audio.shape[0] for audio, _ in parts)
    fade = int(CROSSFADE_SECONDS * sample_rate)
    track = _with_channels(parts[0][0], channels)
    for audio, intro_seconds in parts[1:]:
        audio = _with_channels(audio, channels)
        start = round(intro_seconds * sample_rate)
        overlap = min(fade, start, track.shape[-1], audio.shape[-1] - start)
        if overlap <= 0:
            track = np.concatenate([track, audio[:, start:]], axis=-1)
            continue
        ramp = np.linspace(0.0, 1.0, overlap, dtype=np.float32)
        seam = track[:, -overlap:] * (1 - ramp) + audio[:, start - overlap : start] * ramp
        track = np.concatenate([track[:, :-overlap], seam, audio[:, start:]], axis=-1)
    return track.astype(np.float32, copy=False)


def _with_channels(audio: np.ndarray, channels: int) -> np.ndarray:
    """Mono repeated to stereo when other parts are stereo."""
    if audio.shape[0] == channels:
        return audio
    return np.repeat(audio.mean(axis=0, keepdims=True), channels, axis=0)
