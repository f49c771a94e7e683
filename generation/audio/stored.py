"""Uploaded audio as the store keeps it: on FLAC's 24-bit grid, named by a hash of its content.

A clip is put on the grid once, when its job is recorded, and the job runs that clip, so the
FLAC the store keeps is exactly what the job ran (and runs again after a restart): the round
trip is lossless. Loud clips (peaks at or above full scale, which decoders can produce) are
scaled down by a power of two first and back up when read, so nothing is clipped.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

import numpy as np
import soundfile

from generation.request import AudioClip

_BITS = 24
_FULL_SCALE = 2 ** (_BITS - 1)


@dataclass(frozen=True, eq=False)
class StoredClip:
    """A clip on the 24-bit grid: ``samples`` (int32 ``[channels, frames]``) times
    ``2 ** exponent / 2 ** 23`` gives the audio."""

    samples: np.ndarray
    sample_rate: int
    exponent: int

    @property
    def clip(self) -> AudioClip:
        scale = np.float32(2.0**self.exponent / _FULL_SCALE)  # exact: a power of two
        return AudioClip(self.samples.astype(np.float32) * scale, self.sample_rate)

    @property
    def seconds(self) -> float:
        return self.samples.shape[-1] / self.sample_rate

    @property
    def content_hash(self) -> str:
        """SHA-256 of the audio itself (rate, channels, samples): equal clips, equal hashes."""
        digest = hashlib.sha256(
            f"pcm24:{self.sample_rate}:{self.samples.shape[0]}:{self.exponent}:".encode()
        )
        digest.update(np.ascontiguousarray(self.samples, dtype="<i4").data)
        return digest.hexdigest()

    def flac(self) -> bytes:
        buffer = io.BytesIO()
        # libsndfile takes int32 full scale and keeps the top 24 bits: exact for our grid.
        soundfile.write(
            buffer,
            (self.samples << 8).T,
            self.sample_rate,
            format="FLAC",
            subtype="PCM_24",
        )
        return buffer.getvalue()

    @classmethod
    def from_flac(cls, data: bytes, exponent: int) -> StoredClip:
        samples, sample_rate = soundfile.read(io.BytesIO(data), dtype="int32", always_2d=True)
        return cls(np.ascontiguousarray(samples.T >> 8), sample_rate, exponent)


def to_grid(clip: AudioClip) -> StoredClip:
    """``clip`` on the 24-bit grid (non-finite samples become silence); putting a clip that
    is already on the grid there again gives the same samples."""
    # One float32 copy, worked on in place: memory stays at about twice the clip's.
    audio = clip.samples.astype(np.float32)
    np.nan_to_num(audio, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
    peak = float(np.max(np.abs(audio))) if audio.size else 0.0
    exponent = int(np.floor(np.log2(peak))) + 1 if peak >= 1.0 else 0
    audio *= np.float32(_FULL_SCALE / 2.0**exponent)
    np.rint(audio, out=audio)
    np.clip(audio, -_FULL_SCALE, _FULL_SCALE - 1, out=audio)
    samples = audio.astype(np.int32)
    return StoredClip(samples, clip.sample_rate, exponent)


def content_hash(clip: AudioClip) -> str:
    """The hash the store files ``clip`` under (the same for the clip before and after it was
    stored): for tags and for telling uploads apart."""
    return to_grid(clip).content_hash
