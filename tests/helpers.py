"""Audio for tests: tones as arrays, and as files in each upload format (made with ffmpeg)."""

from __future__ import annotations

import io
import struct
import subprocess
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import soundfile

#: ffmpeg encoder and container for each upload format the bot accepts.
FORMATS = {
    "wav": ("pcm_s16le", "wav"),
    "mp3": ("libmp3lame", "mp3"),
    "ogg": ("libopus", "ogg"),
    "flac": ("flac", "flac"),
    "m4a": ("aac", "ipod"),
}


def peak_resident_bytes() -> int:
    """This process's peak resident set size (Linux's VmHWM). Not ``ru_maxrss``: a process
    started by another begins with the other's, so a child's growth under it would read 0."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise OSError("/proc/self/status has no VmHWM line")


def reset_peak() -> None:
    """Start this process's peak resident set size again from what is resident now."""
    Path("/proc/self/clear_refs").write_text("5")


def encode_tone(
    path: Path,
    *,
    seconds: float = 2.0,
    frequency: float = 440.0,
    sample_rate: int = 44_100,
    channels: int = 2,
    fmt: str | None = None,
    title: bytes | None = None,
) -> Path:
    """Write a sine tone to ``path`` in the format its suffix names, with ffmpeg; ``title``
    goes in its title tag byte for byte (ffmpeg copies it)."""
    codec, container = FORMATS[fmt or path.suffix.lstrip(".")]
    tags = [] if title is None else ["-metadata", b"title=" + title]
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
            *tags,
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


def riff_wav(fmt: bytes, data: bytes, *chunks: bytes) -> bytes:
    """A WAV file from its ``fmt `` chunk body, its ``data`` and any further whole chunks."""
    body = b"WAVE" + _chunk(b"fmt ", fmt) + b"".join(chunks) + _chunk(b"data", data)
    return _chunk(b"RIFF", body)


def _chunk(name: bytes, body: bytes) -> bytes:
    return name + struct.pack("<I", len(body)) + body + b"\0" * (len(body) % 2)


def ima_adpcm_wav(sample_rate: int, block_align: int = 4096) -> bytes:
    """One block of IMA-ADPCM: ``(block_align - 4) * 2 + 1`` samples at ``sample_rate``."""
    per_block = (block_align - 4) * 2 + 1
    fmt = struct.pack(
        "<HHIIHHHH",
        0x0011,  # WAVE_FORMAT_IMA_ADPCM
        1,
        sample_rate,
        sample_rate * block_align // per_block,
        block_align,
        4,
        2,
        per_block,
    )
    block = bytes(4) + bytes(range(256)) * (block_align // 256)
    return riff_wav(fmt, block[:block_align], _chunk(b"fact", struct.pack("<I", per_block)))


def wav_without_decoder() -> bytes:
    """A WAV whose format tag (0x9999) no decoder knows."""
    return riff_wav(struct.pack("<HHIIHH", 0x9999, 1, 8_000, 16_000, 2, 16), bytes(1000))


def with_id3v1(mp3: bytes, title: bytes) -> bytes:
    """``mp3`` with an ID3v1 tag (128 bytes, its text in Latin-1 by definition) at its end
    instead of its ID3v2 tag at its start (ffmpeg reads ID3v1 only when there is no ID3v2)."""
    if mp3.startswith(b"ID3"):
        mp3 = mp3[10 + sum(byte << (7 * (3 - i)) for i, byte in enumerate(mp3[6:10])) :]
    fields = [title.ljust(30, b"\0"), bytes(30), bytes(30), b"2024", bytes(30), b"\xff"]
    return mp3 + b"TAG" + b"".join(fields)


def encode_titled_tone(path: Path, title: bytes, *, seconds: float = 1.0) -> Path:
    """A mono tone whose title tag holds ``title``'s bytes as they are."""
    return encode_tone(path, seconds=seconds, channels=1, title=title)


def as_stored(audio: np.ndarray, sample_rate: int) -> np.ndarray:
    """A result as the store keeps it, and the gateway delivers it: 24-bit FLAC."""
    buffer = io.BytesIO()
    soundfile.write(buffer, audio.T, sample_rate, format="FLAC", subtype="PCM_24")
    buffer.seek(0)
    stored, _ = soundfile.read(buffer, dtype="float32", always_2d=True)
    return np.ascontiguousarray(stored.T)
