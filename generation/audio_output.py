"""Writing results: loudness-normalised MP3 (or WAV, FLAC, OGG) with the request in its tags."""

from __future__ import annotations

import io
import re
import shutil
import warnings
from functools import cache

import numpy as np
import pyloudnorm
from mutagen.id3 import TIT2, TPE1, TXXX, Encoding
from mutagen.wave import WAVE

from .errors import OutputTooLarge
from .request import GenerationRequest

with warnings.catch_warnings():
    # pydub warns at import when no ffmpeg is on PATH; _configure_ffmpeg supplies one.
    warnings.simplefilter("ignore", RuntimeWarning)
    from pydub import AudioSegment

#: Loudness of every result, in LUFS (the level streaming services normalise to).
TARGET_LOUDNESS = -14.0
#: Highest sample peak after normalisation, in dBFS, to leave the MP3 encoder headroom.
PEAK_CEILING = -1.0
#: MPEG-1 Layer III bitrates, highest first, in kbit/s.
MP3_BITRATES = (320, 256, 224, 192, 160, 128, 112, 96, 80, 64, 56, 48, 40, 32)
DEFAULT_BITRATE = 192
#: Room for the ID3 tag and the encoder's Xing frame, in bytes.
_CONTAINER_OVERHEAD = 8 * 1024


@cache
def _configure_ffmpeg() -> None:
    """Point pydub at an ffmpeg binary: the system's, else the one imageio-ffmpeg ships."""
    if shutil.which("ffmpeg") is None:
        import imageio_ffmpeg

        AudioSegment.converter = imageio_ffmpeg.get_ffmpeg_exe()


def mp3_filename(request: GenerationRequest) -> str:
    """A file name for a result: the prompt as a slug, then the seed."""
    slug = re.sub(r"[^a-z0-9]+", "-", request.prompt.lower()).strip("-")[:40] or "musicgen"
    return f"{slug}-{request.seed}.mp3"


def request_tags(request: GenerationRequest) -> dict[str, str]:
    """ID3 tags that make a result reproducible: the prompt as title, every option as TXXX."""
    parameters = request.parameters()
    tags = {
        "title": request.prompt,
        "artist": "musicgen-bot",
        "comment": f"MusicGen {request.model}, seed {request.seed}",
    }
    tags.update({f"musicgen_{key}": value for key, value in parameters.items()})
    return tags


def normalise_loudness(audio: np.ndarray, sample_rate: int) -> np.ndarray:
    """Scale ``audio`` ([channels, samples]) to :data:`TARGET_LOUDNESS`, peaks capped.

    Silence, and clips too short to measure (under 0.4 s), are returned unchanged.
    """
    meter = pyloudnorm.Meter(sample_rate)
    if audio.shape[-1] < int(meter.block_size * sample_rate):
        return audio
    loudness = meter.integrated_loudness(audio.T.astype(np.float64))
    if not np.isfinite(loudness):
        return audio
    gain = 10 ** ((TARGET_LOUDNESS - loudness) / 20)
    peak = float(np.abs(audio).max()) * gain
    ceiling = 10 ** (PEAK_CEILING / 20)
    if peak > ceiling:
        gain *= ceiling / peak
    return (audio * gain).astype(np.float32)


def encode_mp3(
    audio: np.ndarray,
    sample_rate: int,
    *,
    tags: dict[str, str] | None = None,
    bitrate: int = DEFAULT_BITRATE,
) -> bytes:
    """Encode float ``audio`` ([channels, samples]) as a constant-bitrate MP3.

    ``tags`` become ID3v2 frames: ``title``, ``artist``, ``comment`` and the other standard
    names map to their frames, any other key to a ``TXXX`` frame of that name.
    """
    out = io.BytesIO()
    _segment(audio, sample_rate).export(out, format="mp3", bitrate=f"{bitrate}k", tags=tags or {})
    return out.getvalue()


def _segment(audio: np.ndarray, sample_rate: int) -> AudioSegment:
    """Float ``audio`` ([channels, samples]) as 16-bit PCM, ready for ffmpeg."""
    _configure_ffmpeg()
    pcm = (np.clip(audio, -1.0, 1.0) * 32767).astype("<i2")
    return AudioSegment(
        pcm.T.tobytes(), frame_rate=sample_rate, sample_width=2, channels=audio.shape[0]
    )


def estimated_mp3_bytes(seconds: float, bitrate: int) -> int:
    """The size of a constant-bitrate MP3 of ``seconds``, container included."""
    return int(seconds * bitrate * 1000 / 8) + _CONTAINER_OVERHEAD


def pick_bitrate(seconds: float, max_bytes: int) -> int | None:
    """The highest MP3 bitrate at which ``seconds`` of audio fit in ``max_bytes``, if any."""
    for bitrate in MP3_BITRATES:
        if estimated_mp3_bytes(seconds, bitrate) <= max_bytes:
            return bitrate
    return None


def encode_mp3_within(
    audio: np.ndarray,
    sample_rate: int,
    max_bytes: int,
    *,
    tags: dict[str, str] | None = None,
    max_bitrate: int = MP3_BITRATES[0],
) -> tuple[bytes, int]:
    """Encode at the highest bitrate (up to ``max_bitrate``) whose file fits ``max_bytes``.

    Returns:
        The MP3 and its bitrate in kbit/s.

    Raises:
        OutputTooLarge: not even the lowest bitrate fits.
    """
    seconds = audio.shape[-1] / sample_rate
    first = pick_bitrate(seconds, max_bytes)
    if first is not None:
        candidates = [b for b in MP3_BITRATES if b <= min(first, max_bitrate)]
        for bitrate in candidates:
            data = encode_mp3(audio, sample_rate, tags=tags, bitrate=bitrate)
            if len(data) <= max_bytes:
                return data, bitrate
    raise OutputTooLarge(
        f"{seconds:.0f} s of audio does not fit in {max_bytes / 2**20:.2f} MiB even at "
        f"{MP3_BITRATES[-1]} kbit/s: ask for a shorter duration."
    )


#: ffmpeg's codec and settings for each format but MP3 (16-bit PCM for WAV and FLAC, and
#: Vorbis at quality 6, about 190 kbit/s, in OGG).
_FFMPEG_FORMATS = {
    "wav": {"codec": None, "parameters": None},
    "flac": {"codec": "flac", "parameters": None},
    "ogg": {"codec": "libvorbis", "parameters": ["-q:a", "6"]},
}
#: ID3 frames for the tags with a standard frame; every other tag is a TXXX frame, as ffmpeg
#: writes them in an MP3.
_ID3_FRAMES = {"title": TIT2, "artist": TPE1}


def encode_audio(
    audio: np.ndarray, sample_rate: int, audio_format: str, *, tags: dict[str, str] | None = None
) -> bytes:
    """Encode float ``audio`` ([channels, samples]) as "mp3", "wav", "flac" or "ogg".

    ``tags`` go where each format keeps them: ID3 in MP3 and WAV (an ``id3`` chunk), Vorbis
    comments in FLAC and OGG, under the same names.
    """
    if audio_format == "mp3":
        return encode_mp3(audio, sample_rate, tags=tags)
    settings = _FFMPEG_FORMATS[audio_format]
    out = io.BytesIO()
    # ffmpeg writes Vorbis comments for any tag, but only a few fixed ones in a WAV.
    ffmpeg_tags = None if audio_format == "wav" else tags
    _segment(audio, sample_rate).export(out, format=audio_format, tags=ffmpeg_tags, **settings)
    if audio_format == "wav" and tags:
        _add_id3_chunk(out, tags)
    return out.getvalue()


def _add_id3_chunk(wav: io.BytesIO, tags: dict[str, str]) -> None:
    """Tag a WAV file in place with the ID3 frames an MP3 of the same result has."""
    wave = WAVE(wav)
    wave.add_tags()
    for key, value in tags.items():
        if key in _ID3_FRAMES:
            wave.tags.add(_ID3_FRAMES[key](encoding=Encoding.UTF8, text=value))
        else:
            wave.tags.add(TXXX(encoding=Encoding.UTF8, desc=key, text=value))
    wav.seek(0)
    wave.save(wav)
