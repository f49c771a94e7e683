"""Writing results: loudness-normalised (true-peak limited) MP3, or WAV, FLAC, OGG, with
the request in its tags."""

from __future__ import annotations

import io
import re
import shutil
import warnings
from collections.abc import Mapping
from functools import cache, reduce

import numpy as np
import pyloudnorm
from mutagen.id3 import TIT2, TPE1, TXXX, Encoding
from mutagen.wave import WAVE
from scipy.ndimage import minimum_filter1d, uniform_filter1d
from scipy.signal import resample_poly

from generation.audio.loop import loop_bpm
from generation.audio.stored import content_hash
from generation.engine.results import GenerationResult
from generation.errors import OutputTooLarge
from generation.origin import Origin
from generation.request import AudioClip, GenerationRequest

with warnings.catch_warnings():
    # pydub warns at import when no ffmpeg is on PATH; _configure_ffmpeg supplies one.
    warnings.simplefilter("ignore", RuntimeWarning)
    from pydub import AudioSegment

#: Loudness of every result, in LUFS (the level streaming services normalise to).
TARGET_LOUDNESS = -14.0
#: Highest true peak after normalisation, in dBTP, to leave the MP3 encoder headroom.
TRUE_PEAK_CEILING = -1.0
#: How a true peak is found: the signal oversampled this many times.
OVERSAMPLING = 4
#: Samples whose true peaks are measured at once: the oversampled copy is this long, times
#: :data:`OVERSAMPLING` and the channels, whatever the track's length.
PEAK_BLOCK = 1 << 15
#: How far, in samples either side, ``resample_poly``'s oversampling filter reaches (its
#: half length is 10 periods of the slower rate).
_FILTER_REACH = 10
#: The limiter's ramps (look-ahead before a peak, release after it) and hold, in seconds.
LIMITER_RAMP = 0.02
LIMITER_HOLD = 0.05
#: Gain-then-limit passes to reach the target loudness.
LOUDNESS_PASSES = 4
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
    """A file name for a result: the prompt as a slug, then the seed (and the stem)."""
    slug = re.sub(r"[^a-z0-9]+", "-", request.prompt.lower()).strip("-")[:40] or "musicgen"
    stem = f"-{request.stem}" if request.stem else ""
    return f"{slug}-{request.seed}{stem}.mp3"


def request_tags(
    request: GenerationRequest,
    origin: Origin | None = None,
    clip_hashes: Mapping[str, str] | None = None,
    *,
    seconds: float | None = None,
) -> dict[str, str]:
    """ID3 tags that make a result reproducible: the prompt as title, every option as TXXX,
    and for a melody or an intro its content hash and, from ``origin``, its source (the job
    and take whose end was continued, or the uploaded file's name).

    ``clip_hashes`` gives the hashes of clips the request does not carry (read back from the
    store without them); the others are hashed, which blocks for long clips: run it off the
    event loop. ``seconds``, the result's length, gives a loop's tempo.
    """
    parameters = request.parameters()
    if request.loop and seconds:
        parameters["bpm"] = f"{loop_bpm(request.loop, seconds):.2f}"
    known = clip_hashes or {}
    for option in ("melody", "continuation"):
        clip: AudioClip | None = getattr(request, option)
        if clip is not None:
            parameters[f"{option}_sha256"] = content_hash(clip)
        elif option in known:
            parameters[f"{option}_sha256"] = known[option]
    if origin is not None:
        parameters.update(origin.tags())
    tags = {
        "title": request.prompt,
        "artist": "musicgen-bot",
        "comment": f"MusicGen {request.model}, seed {request.seed}",
    }
    tags.update({f"musicgen_{key}": value for key, value in parameters.items()})
    return tags


def kept_audio(result: GenerationResult) -> np.ndarray:
    """What the store keeps of a result: music normalised (:func:`normalise_loudness`); a
    stem as separated, so the stems keep their balance and add up to the track (normalising
    a near-silent vocal stem would raise its noise by tens of dB).

    Blocking: run it off the event loop.
    """
    if result.request.stem:
        return result.audio
    return normalise_loudness(result.audio, result.sample_rate)


def normalise_loudness(audio: np.ndarray, sample_rate: int) -> np.ndarray:
    """Bring ``audio`` ([channels, samples]) to :data:`TARGET_LOUDNESS` (integrated, as
    ITU-R BS.1770 measures it), its true peaks limited to :data:`TRUE_PEAK_CEILING`.

    A gain sets the loudness, then :func:`limit_true_peaks` turns down only the few
    milliseconds around peaks that would pass the ceiling, so one loud transient does not
    make the whole track quieter; as limiting lowers the loudness a little, the gain is
    corrected and the limiter rerun on the original (up to :data:`LOUDNESS_PASSES` times)
    until the loudness is within 0.1 LU. The true peaks are measured once: those of the
    audio times a gain are the gain times them. Works in float32: beyond the result, it
    holds the loudness meter's copy of the track, a few arrays as long as one channel and
    one oversampled block (never the oversampled track).
    Silence, and clips too short to measure (under 0.4 s), are returned unchanged.
    Blocking (about 0.3 s of CPU a minute of stereo audio): run it off the event loop.
    """
    meter = pyloudnorm.Meter(sample_rate)
    if audio.shape[-1] < int(meter.block_size * sample_rate):
        return audio
    source = audio.astype(np.float32, copy=False)
    loudness = meter.integrated_loudness(source.T)
    if not np.isfinite(loudness):
        return audio
    peaks = true_peaks(source)
    gain = 1.0
    for _ in range(LOUDNESS_PASSES):
        gain *= 10 ** ((TARGET_LOUDNESS - loudness) / 20)
        out = limit_true_peaks(source, sample_rate, gain=gain, peaks=peaks)
        loudness = meter.integrated_loudness(out.T)
        if abs(loudness - TARGET_LOUDNESS) < 0.1:
            break
    return out


def true_peaks(audio: np.ndarray) -> np.ndarray:
    """Each sample's true peak: the highest magnitude, over the channels, of the signal
    :data:`OVERSAMPLING` times oversampled between it and its neighbours (as BS.1770).

    Measured a block of :data:`PEAK_BLOCK` samples at a time, so the oversampled signal
    never needs more memory than one block of it.
    """
    length = audio.shape[-1]
    peaks = np.empty(length, dtype=np.float32)
    for start in range(0, length, PEAK_BLOCK):
        stop = min(start + PEAK_BLOCK, length)
        # The signal between samples n - 1 and n counts for both.
        first = max(start - 1, 0)
        per_sample = _oversampled_peaks(audio, first, stop)
        previous = per_sample[:-1] if start > 0 else np.r_[per_sample[:1], per_sample[:-1]]
        np.maximum(per_sample[start - first :], previous, out=peaks[start:stop])
    return peaks


def _oversampled_peaks(audio: np.ndarray, start: int, stop: int) -> np.ndarray:
    """The highest oversampled magnitude over the channels in each of the periods that
    samples ``start`` to ``stop`` begin, as if the whole track were oversampled."""
    # The oversampling filter reaches _FILTER_REACH samples either side: give it those.
    first, last = max(start - _FILTER_REACH, 0), min(stop + _FILTER_REACH, audio.shape[-1])
    upsampled = resample_poly(audio[:, first:last], OVERSAMPLING, 1, axis=-1)
    upsampled = upsampled[:, (start - first) * OVERSAMPLING : (stop - first) * OVERSAMPLING]
    magnitude = np.abs(upsampled, out=upsampled).max(axis=0).reshape(-1, OVERSAMPLING)
    # Pairwise maxima over the columns: far faster than a reduction along the short axis.
    phases = [magnitude[:, phase] for phase in range(OVERSAMPLING)]
    return reduce(np.maximum, phases)


def limit_true_peaks(
    audio: np.ndarray,
    sample_rate: int,
    ceiling_db: float = TRUE_PEAK_CEILING,
    *,
    gain: float = 1.0,
    peaks: np.ndarray | None = None,
) -> np.ndarray:
    """``audio`` times ``gain``, turned down where its true peaks pass ``ceiling_db`` dBTP,
    and only there.

    A look-ahead limiter: the gain a sample needs is held for :data:`LIMITER_HOLD` s
    after it and reached over :data:`LIMITER_RAMP` s before it and after the hold (a
    minimum filter, then a moving average, so the smoothed gain never exceeds what any
    sample needs). ``peaks`` are ``audio``'s :func:`true_peaks`, when already measured.
    """
    ceiling = 10 ** (ceiling_db / 20)
    if peaks is None:
        peaks = true_peaks(audio)
    needed = peaks * np.float32(gain)
    np.maximum(needed, 1e-12, out=needed)
    np.divide(np.float32(ceiling), needed, out=needed)
    np.minimum(needed, 1.0, out=needed)
    if needed.min() >= 1.0:
        return audio * np.float32(gain)
    ramp = max(1, int(LIMITER_RAMP * sample_rate))
    hold = int(LIMITER_HOLD * sample_rate)
    # Each sample's gain is the least needed from ``hold`` samples before it to ``ramp``
    # after it; averaging the last ``ramp`` of those keeps every sample's own need.
    window = hold + ramp
    held = minimum_filter1d(needed, window, origin=hold - window // 2, mode="nearest")
    smooth = uniform_filter1d(held, ramp, origin=ramp // 2 - ramp + 1, mode="nearest")
    curve = np.multiply(smooth, np.float32(gain), out=held)
    limited = audio * curve
    overshoot = _limited_peak(limited, smooth) / ceiling  # between samples, after the gain
    if overshoot > 1.0:
        limited /= np.float32(overshoot)
    return limited


def _limited_peak(limited: np.ndarray, smooth: np.ndarray) -> float:
    """The highest true peak of ``limited`` in the blocks that the limiter's gain ``smooth``
    turned down (the rest is the audio times one gain, whose peaks were under the ceiling)."""
    highest = 0.0
    length = limited.shape[-1]
    for start in range(0, length, PEAK_BLOCK):
        stop = min(start + PEAK_BLOCK, length)
        reach = slice(max(start - _FILTER_REACH, 0), min(stop + _FILTER_REACH, length))
        if smooth[reach].min() < 1.0:
            highest = max(highest, float(_oversampled_peaks(limited, start, stop).max()))
    return highest


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
