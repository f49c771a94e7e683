"""Audio for tests: tones as arrays, and as files in each upload format (made with ffmpeg)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import imageio_ffmpeg
import numpy as np

#: ffmpeg encoder and container for each upload format the bot accepts.
FORMATS = {
    "wav": ("pcm_s16le", "wav"),
    "mp3": ("libmp3lame", "mp3"),
    "ogg": ("libopus", "ogg"),
    "flac": ("flac", "flac"),
    "m4a": ("aac", "ipod"),
}


def encode_tone(
    path: Path,
    *,
    seconds: float = 2.0,
    frequency: float = 440.0,
    sample_rate: int = 44_100,
    channels: int = 2,
    fmt: str | None = None,
) -> Path:
    """Write a sine tone to ``path`` in the format its suffix names, with ffmpeg."""
    codec, container = FORMATS[fmt or path.suffix.lstrip(".")]
    subprocess.run(
        [
            imageio_ffmpeg.get_ffmpeg_exe(),
            "-loglevel",
            "error",
            "-y",
            "-f",
            "lavfi",
            "-i",
            f"sine=frequency={frequency}:duration={seconds}:sample_rate={sample_rate}",
            "-ac",
            str(channels),
            "-c:a",
            codec,
            "-f",
            container,
            str(path),
        ],
        check=True,
    )
    return path


def sine(seconds: float, frequency: float, sample_rate: int = 32_000, channels: int = 1):
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    wave = 0.3 * np.sin(2 * np.pi * frequency * t).astype(np.float32)
    return np.repeat(wave[None], channels, axis=0)
