"""Decoding uploaded audio (WAV, MP3, OGG/Opus, FLAC, M4A) safely, in-process with PyAV.

Every upload, from the bot or the command line, is decoded here. An upload is untrusted:
its size is checked before it is read; the demuxers are limited to audio containers (no
playlists, no network protocols); a rate outside :attr:`AudioLimits.min_input_rate` to
:attr:`AudioLimits.max_input_rate` is refused; each decoded frame's length is checked
before it is resampled, so a file that declares a tiny rate cannot expand into gigabytes;
decoding stops at the time budget; at most :data:`MAX_DECODERS` decoders run at once; and
at most :data:`MAX_PENDING_DECODES` uploads are held at once, from before they are downloaded.
A decoder thus holds at most ``max_seconds`` x ``sample_rate`` x 2 channels of float32
PCM (twice that while the chunks are joined) plus one codec frame. Metadata is never read,
and its encoding never stops a decode.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np

from generation.errors import AudioInputError
from generation.request import AudioClip

log = logging.getLogger(__name__)

#: Audio containers an upload may use: WAV, MP3, Ogg (Vorbis, Opus), FLAC, MP4/M4A, WebM,
#: raw AAC. Anything else (playlists, images, concat lists) is refused before demuxing.
ALLOWED_DEMUXERS = "wav,mp3,ogg,flac,mov,mp4,m4a,matroska,webm,aac"
SUPPORTED_FORMATS = "WAV, MP3, OGG/Opus, FLAC or M4A"

#: Decoders that may run at once in this process (members' uploads and the command line
#: alike). One more upload than that waits for a free decoder, for up to its time budget.
MAX_DECODERS = 2
#: Uploads held at once, from their download to the end of their decode (the running
#: decoders included); more are refused before they are downloaded, not queued without bound.
MAX_PENDING_DECODES = 4 * MAX_DECODERS

#: Damaged packets skipped (as ffmpeg does) before the file is refused as unreadable.
MAX_DAMAGED_PACKETS = 16

_decoder_slots = threading.BoundedSemaphore(MAX_DECODERS)
_pending_slots = threading.BoundedSemaphore(MAX_PENDING_DECODES)
# Their own threads, so uploads waiting for a decoder never hold the loop's default
# executor (the store reads and writes files there).
_decode_threads = ThreadPoolExecutor(MAX_PENDING_DECODES, thread_name_prefix="audio-decode")


@dataclass(frozen=True)
class AudioLimits:
    """Bounds on one uploaded clip.

    Args:
        max_bytes: Largest file accepted.
        max_seconds: Longest audio accepted.
        timeout_seconds: Wall-clock budget for decoding (and for waiting for a decoder).
        sample_rate: Rate the audio is resampled to while decoding.
        min_input_rate: Lowest sample rate a file may declare (telephone audio is 8 kHz).
        max_input_rate: Highest sample rate a file may declare (studio audio tops at 384 kHz).
    """

    max_bytes: int = 25 * 1024 * 1024
    max_seconds: float = 120.0
    timeout_seconds: float = 30.0
    sample_rate: int = 32_000
    min_input_rate: int = 8_000
    max_input_rate: int = 384_000


def read_audio_file(path: str | os.PathLike[str], limits: AudioLimits, label: str) -> AudioClip:
    """Decode the file at ``path``, checking its size before reading it."""
    path = Path(path)
    try:
        size = path.stat().st_size
        check_size(size, limits, label)
        data = path.read_bytes()
    except OSError as error:
        raise AudioInputError(f"Cannot read the {label} file {path}: {error.strerror}.") from error
    return decode_audio(data, limits, label)


def check_size(size: int, limits: AudioLimits, label: str) -> None:
    """Refuse a file over ``limits.max_bytes`` before any of it is read."""
    if size > limits.max_bytes:
        raise AudioInputError(
            f"The {label} file is {size / 2**20:.1f} MiB; the limit is "
            f"{limits.max_bytes / 2**20:.0f} MiB."
        )
    if size == 0:
        raise AudioInputError(f"The {label} file is empty.")


async def decode_upload(
    read: Callable[[], Awaitable[bytes]], limits: AudioLimits, label: str
) -> AudioClip:
    """Download an upload with ``read``, then :func:`decode_audio` it off the event loop, on
    the decoders' own threads.

    The upload's place among the :data:`MAX_PENDING_DECODES` is taken before ``read`` is
    called, so uploads beyond them are never downloaded (their bytes never held).

    Raises:
        AudioInputError: as :func:`decode_audio`, or every pending place is taken.
    """
    with pending_slot(label):
        data = await read()
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(_decode_threads, decode_audio, data, limits, label)


@contextlib.contextmanager
def pending_slot(label: str) -> Iterator[None]:
    """Hold one of the :data:`MAX_PENDING_DECODES` places for an upload, or refuse at once.

    Raises:
        AudioInputError: every place is taken.
    """
    if not _pending_slots.acquire(blocking=False):
        raise _busy(label)
    try:
        yield
    finally:
        _pending_slots.release()


def decode_audio(data: bytes, limits: AudioLimits, label: str = "audio") -> AudioClip:
    """Decode an uploaded clip to float32 ``[channels, samples]`` at ``limits.sample_rate``.

    Args:
        data: The file's bytes.
        limits: Size, length, rate and time bounds.
        label: What the clip is for ("melody", "continuation"), used in error messages.

    Raises:
        AudioInputError: too large, too long, at an absurd rate, too slow to decode,
            corrupt, not audio, or every decoder is busy; never anything else.
    """
    check_size(len(data), limits, label)
    with decoder_slot(limits, label):
        try:
            return _decode(data, limits, label)
        except AudioInputError:
            raise
        except (av.error.FFmpegError, ValueError, EOFError) as error:
            raise _unreadable(label) from error
        except Exception as error:  # a decoder's surprise must not reach the member raw
            log.warning("decoding a %s upload failed unexpectedly", label, exc_info=True)
            raise _unreadable(label) from error


@contextlib.contextmanager
def decoder_slot(limits: AudioLimits, label: str) -> Iterator[None]:
    """Hold one of the :data:`MAX_DECODERS` decoders, waiting up to the time budget.

    Raises:
        AudioInputError: no decoder came free in time.
    """
    if not _decoder_slots.acquire(timeout=limits.timeout_seconds):
        raise _busy(label)
    try:
        yield
    finally:
        _decoder_slots.release()


def _decode(data: bytes, limits: AudioLimits, label: str) -> AudioClip:
    deadline = time.monotonic() + limits.timeout_seconds
    with av.open(
        io.BytesIO(data),
        options={"format_whitelist": ALLOWED_DEMUXERS, "protocol_whitelist": "none"},
        metadata_errors="replace",
        timeout=limits.timeout_seconds,
    ) as container:
        if not container.streams.audio:
            raise AudioInputError(f"The {label} file has no audio in it.")
        stream = container.streams.audio[0]
        if stream.codec_context is None:
            raise AudioInputError(
                f"The {label} file's audio codec is not one we can decode: "
                f"upload {SUPPORTED_FORMATS}."
            )
        if stream.codec_context.sample_rate:  # 0 when probing did not get that far
            _check_rate(stream.codec_context.sample_rate, limits, label)
        layout = "mono" if stream.codec_context.channels == 1 else "stereo"
        resampler = _Resampler(layout, limits.sample_rate)
        seconds, damaged = 0.0, 0
        for packet in container.demux(stream):
            try:
                frames = packet.decode()
            except av.error.InvalidDataError:
                # Skipped as ffmpeg does: files joined end to end have a tag at the join.
                damaged += 1
                if damaged > MAX_DAMAGED_PACKETS:
                    raise
                continue
            for frame in frames:
                # Checked before resampling: a frame at 8 Hz is minutes of audio at 32 kHz.
                _check_rate(frame.sample_rate, limits, label)
                seconds += frame.samples / frame.sample_rate
                if seconds > limits.max_seconds:
                    raise _too_long(label, limits)
                resampler.add(frame)
            if time.monotonic() > deadline:
                raise AudioInputError(f"The {label} file took too long to decode.")
        samples = resampler.finish()
    if samples is None or samples.shape[-1] == 0:
        if damaged:
            raise _unreadable(label)
        raise AudioInputError(f"The {label} file has no audio in it.")
    if samples.shape[-1] > int(limits.max_seconds * limits.sample_rate):
        raise _too_long(label, limits)
    return AudioClip(samples, limits.sample_rate)


class _Resampler:
    """Frames to float32 ``[channels, samples]`` at one rate and layout, whatever each
    frame's own format: a stream may change rate or channels mid-way (MP3s joined end to
    end), and PyAV's resampler takes only the format of its first frame."""

    def __init__(self, layout: str, rate: int) -> None:
        self.layout, self.rate = layout, rate
        self.chunks: list[np.ndarray] = []
        self.resampler: av.AudioResampler | None = None
        self.source: tuple[str, str, int] | None = None

    def add(self, frame: av.AudioFrame) -> None:
        source = (frame.format.name, frame.layout.name, frame.sample_rate)
        if source != self.source:
            self._flush()
            self.resampler = av.AudioResampler(format="fltp", layout=self.layout, rate=self.rate)
            self.source = source
        assert self.resampler is not None
        self._keep(self.resampler.resample(frame))

    def finish(self) -> np.ndarray | None:
        self._flush()
        if not self.chunks:
            return None
        return np.ascontiguousarray(np.concatenate(self.chunks, axis=-1), dtype=np.float32)

    def _flush(self) -> None:
        if self.resampler is not None:
            self._keep(self.resampler.resample(None))

    def _keep(self, frames: list[av.AudioFrame]) -> None:
        self.chunks.extend(out.to_ndarray() for out in frames)


def _check_rate(rate: int, limits: AudioLimits, label: str) -> None:
    if not limits.min_input_rate <= rate <= limits.max_input_rate:
        raise AudioInputError(
            f"The {label} file's sample rate is {rate:,} Hz: upload audio at "
            f"{limits.min_input_rate:,} to {limits.max_input_rate:,} Hz."
        )


def _too_long(label: str, limits: AudioLimits) -> AudioInputError:
    return AudioInputError(
        f"The {label} clip is longer than {limits.max_seconds:g} seconds: trim it and try again."
    )


def _unreadable(label: str) -> AudioInputError:
    return AudioInputError(
        f"The {label} file is not audio we can read: upload {SUPPORTED_FORMATS}."
    )


def _busy(label: str) -> AudioInputError:
    return AudioInputError(
        f"Too many uploads are being decoded right now: send the {label} again in a moment."
    )
