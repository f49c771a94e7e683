"""Decoding uploaded audio (WAV, MP3, OGG/Opus, FLAC, M4A) safely, in-process with PyAV.

An upload is untrusted: its size is checked before it is read, the demuxers are limited to
audio containers (no playlists, no network protocols), decoding stops as soon as the audio
runs past its limit or the time budget, and the output is resampled to a fixed rate with at
most two channels, so a small file cannot expand into gigabytes of PCM.
"""

from __future__ import annotations

import io
import os
import time
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np

from .errors import AudioInputError
from .request import AudioClip

#: Audio containers an upload may use: WAV, MP3, Ogg (Vorbis, Opus), FLAC, MP4/M4A, WebM,
#: raw AAC. Anything else (playlists, images, concat lists) is refused before demuxing.
ALLOWED_DEMUXERS = "wav,mp3,ogg,flac,mov,mp4,m4a,matroska,webm,aac"
SUPPORTED_FORMATS = "WAV, MP3, OGG/Opus, FLAC or M4A"


@dataclass(frozen=True)
class AudioLimits:
    """Bounds on one uploaded clip.

    Args:
        max_bytes: Largest file accepted.
        max_seconds: Longest audio accepted.
        timeout_seconds: Wall-clock budget for decoding.
        sample_rate: Rate the audio is resampled to while decoding.
    """

    max_bytes: int = 25 * 1024 * 1024
    max_seconds: float = 120.0
    timeout_seconds: float = 30.0
    sample_rate: int = 32_000


def read_audio_file(path: str | os.PathLike[str], limits: AudioLimits, label: str) -> AudioClip:
    """Decode the file at ``path``, checking its size before reading it."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as error:
        raise AudioInputError(f"Cannot read the {label} file {path}: {error.strerror}.") from error
    check_size(size, limits, label)
    return decode_audio(path.read_bytes(), limits, label)


def check_size(size: int, limits: AudioLimits, label: str) -> None:
    """Refuse a file over ``limits.max_bytes`` before any of it is read."""
    if size > limits.max_bytes:
        raise AudioInputError(
            f"The {label} file is {size / 2**20:.1f} MiB; the limit is "
            f"{limits.max_bytes / 2**20:.0f} MiB."
        )
    if size == 0:
        raise AudioInputError(f"The {label} file is empty.")


def decode_audio(data: bytes, limits: AudioLimits, label: str = "audio") -> AudioClip:
    """Decode an uploaded clip to float32 ``[channels, samples]`` at ``limits.sample_rate``.

    Args:
        data: The file's bytes.
        limits: Size, length and time bounds.
        label: What the clip is for ("melody", "continuation"), used in error messages.

    Raises:
        AudioInputError: too large, too long, too slow to decode, corrupt, or not audio.
    """
    check_size(len(data), limits, label)
    deadline = time.monotonic() + limits.timeout_seconds
    max_samples = int(limits.max_seconds * limits.sample_rate)
    try:
        with av.open(
            io.BytesIO(data),
            options={"format_whitelist": ALLOWED_DEMUXERS, "protocol_whitelist": "none"},
            timeout=limits.timeout_seconds,
        ) as container:
            if not container.streams.audio:
                raise AudioInputError(f"The {label} file has no audio in it.")
            stream = container.streams.audio[0]
            channels = 1 if stream.codec_context.channels == 1 else 2
            resampler = av.AudioResampler(
                format="fltp",
                layout="mono" if channels == 1 else "stereo",
                rate=limits.sample_rate,
            )
            chunks: list[np.ndarray] = []
            decoded = 0
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    chunk = out.to_ndarray()
                    decoded += chunk.shape[-1]
                    chunks.append(chunk)
                if decoded > max_samples:
                    raise _too_long(label, limits)
                if time.monotonic() > deadline:
                    raise AudioInputError(f"The {label} file took too long to decode.")
            chunks.extend(out.to_ndarray() for out in resampler.resample(None))
    except av.error.FFmpegError as error:
        raise AudioInputError(
            f"The {label} file is not audio we can read: upload {SUPPORTED_FORMATS}."
        ) from error
    if not chunks:
        raise AudioInputError(f"The {label} file has no audio in it.")
    samples = np.concatenate(chunks, axis=-1).astype(np.float32, copy=False)
    if samples.shape[-1] == 0:
        raise AudioInputError(f"The {label} file has no audio in it.")
    if samples.shape[-1] > max_samples:
        raise _too_long(label, limits)
    return AudioClip(np.ascontiguousarray(samples), limits.sample_rate)


def _too_long(label: str, limits: AudioLimits) -> AudioInputError:
    return AudioInputError(
        f"The {label} clip is longer than {limits.max_seconds:g} seconds: trim it and try again."
    )
