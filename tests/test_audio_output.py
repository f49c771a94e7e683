"""MP3 results: duration, channels, loudness and tags read back from the written file."""

from __future__ import annotations

import io
import tracemalloc
from dataclasses import replace

import numpy as np
import pyloudnorm
import pytest
from mutagen.id3 import ID3
from mutagen.mp3 import MP3
from scipy.signal import resample_poly

from generation.audio.input import AudioLimits, decode_audio
from generation.audio.output import (
    MP3_BITRATES,
    OVERSAMPLING,
    PEAK_BLOCK,
    TARGET_LOUDNESS,
    TRUE_PEAK_CEILING,
    encode_mp3,
    encode_mp3_within,
    estimated_mp3_bytes,
    normalise_loudness,
    pick_bitrate,
    request_tags,
    true_peaks,
)
from generation.audio.stored import content_hash
from generation.errors import OutputTooLarge
from generation.request import GenerationRequest

from .helpers import sine

SR = 32_000


@pytest.mark.parametrize("channels", [1, 2])
def test_mp3_keeps_duration_and_channels(channels):
    data = encode_mp3(sine(3.0, 440.0, channels=channels), SR, bitrate=128)
    info = MP3(io.BytesIO(data)).info
    assert info.channels == channels
    assert info.length == pytest.approx(3.0, abs=0.1)
    assert info.bitrate == 128_000


def test_tags_hold_the_prompt_and_every_parameter():
    request = GenerationRequest(prompt="jazz — späť", model="debug", seed=42, top_p=0.9)
    data = encode_mp3(sine(1.0, 440.0), SR, tags=request_tags(request))
    tags = ID3(io.BytesIO(data))
    assert tags["TIT2"].text == ["jazz — späť"]
    extra = {frame.desc: frame.text[0] for frame in tags.getall("TXXX")}
    assert extra["musicgen_seed"] == "42"
    assert extra["musicgen_model"] == "debug"
    assert extra["musicgen_top_p"] == "0.9"
    for option in (
        "duration",
        "temperature",
        "top_k",
        "cfg_coef",
        "use_sampling",
        "two_step_cfg",
        "extend_stride",
    ):
        assert f"musicgen_{option}" in extra


def loudness_of(audio: np.ndarray) -> float:
    return pyloudnorm.Meter(SR).integrated_loudness(audio.T.astype(np.float64))


def true_peak_db(audio: np.ndarray) -> float:
    """The true peak as BS.1770 defines it: the 4 times oversampled signal's highest value."""
    return 20 * np.log10(np.abs(resample_poly(audio, 4, 1, axis=-1)).max())


@pytest.mark.parametrize("amplitude", [0.01, 0.9])
def test_loudness_is_normalised(amplitude):
    noise = np.random.default_rng(0).standard_normal((2, 5 * SR)).astype(np.float32)
    audio = normalise_loudness(amplitude * noise / np.abs(noise).max(), SR)
    decoded = decode_audio(encode_mp3(audio, SR, bitrate=320), AudioLimits()).samples
    assert loudness_of(decoded) == pytest.approx(TARGET_LOUDNESS, abs=0.5)
    assert np.abs(audio).max() <= 10 ** (TRUE_PEAK_CEILING / 20)


def test_a_loud_transient_is_limited_instead_of_turning_the_track_down():
    rng = np.random.default_rng(1)
    music = 0.02 * rng.standard_normal((2, 8 * SR)).astype(np.float32)  # about -34 LUFS
    music[:, 4 * SR : 4 * SR + 40] = 0.99  # a click at full scale
    audio = normalise_loudness(music, SR)
    assert loudness_of(audio) == pytest.approx(TARGET_LOUDNESS, abs=0.2)
    assert true_peak_db(audio) <= TRUE_PEAK_CEILING + 0.05
    # Only the click was turned down: a second away, the music has the track's gain.
    gain = np.abs(audio[:, : 3 * SR]).mean() / np.abs(music[:, : 3 * SR]).mean()
    assert np.abs(audio[:, 5 * SR :]).mean() / np.abs(music[:, 5 * SR :]).mean() == (
        pytest.approx(gain, rel=0.01)
    )
    decoded = decode_audio(encode_mp3(audio, SR, bitrate=320), AudioLimits()).samples
    assert loudness_of(decoded) == pytest.approx(TARGET_LOUDNESS, abs=0.3)
    assert np.abs(decoded).max() < 0.99  # no clipping in the MP3


def test_loud_dense_music_is_limited_to_the_ceiling():
    chord = sum(sine(4.0, frequency, channels=2) for frequency in (220.0, 277.0, 330.0))
    audio = normalise_loudness(3.0 * chord, SR)  # its peaks far above full scale
    assert loudness_of(audio) == pytest.approx(TARGET_LOUDNESS, abs=0.2)
    assert true_peak_db(audio) <= TRUE_PEAK_CEILING + 0.05


def test_silence_and_very_short_clips_are_left_alone():
    silence = np.zeros((1, SR), dtype=np.float32)
    assert np.array_equal(normalise_loudness(silence, SR), silence)
    blip = sine(0.1, 440.0)
    assert np.array_equal(normalise_loudness(blip, SR), blip)


def music_with_clicks_at_block_edges(seconds: float) -> np.ndarray:
    """Stereo noise with full-scale clicks on and around the edges of true-peak blocks."""
    music = 0.1 * np.random.default_rng(2).standard_normal((2, int(seconds * SR)))
    for edge in range(PEAK_BLOCK, music.shape[-1], PEAK_BLOCK):
        for offset in (-12, -1, 0, 3):
            music[:, edge + offset] = (-1.0) ** offset
    return music.astype(np.float32)


def test_true_peaks_measured_in_blocks_are_those_of_the_whole_track_oversampled():
    music = music_with_clicks_at_block_edges(3.5)
    upsampled = np.abs(resample_poly(music.astype(np.float64), OVERSAMPLING, 1, axis=-1))
    per_sample = upsampled.max(axis=0).reshape(-1, OVERSAMPLING).max(axis=1)
    # Each sample counts the signal between it and the previous one.
    expected = np.maximum(per_sample, np.r_[per_sample[:1], per_sample[:-1]])
    assert np.allclose(true_peaks(music), expected, rtol=1e-5, atol=1e-7)


def peak_allocation(function, *args) -> int:
    """The most memory ``function`` held at once, in bytes (numpy reports to tracemalloc)."""
    tracemalloc.start()
    try:
        function(*args)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_loudness_never_holds_an_oversampled_copy_of_the_track():
    music = music_with_clicks_at_block_edges(30.0)
    # The peaks (one float32 a sample) and one oversampled block, not the oversampled track
    # (OVERSAMPLING times the track's size).
    assert peak_allocation(true_peaks, music) < music.nbytes
    # Besides the result, a few float32 copies of the track or one of its channels.
    assert peak_allocation(normalise_loudness, music, SR) < 6 * music.nbytes


def test_pick_bitrate_is_the_highest_that_fits():
    assert pick_bitrate(10.0, 10 * 2**20) == 320
    limit = estimated_mp3_bytes(60.0, 128)
    assert pick_bitrate(60.0, limit) == 128
    assert pick_bitrate(60.0, limit - 1) == 112
    assert pick_bitrate(600.0, 100_000) is None


def test_encode_within_a_limit_uses_the_highest_bitrate_that_fits():
    audio = sine(20.0, 440.0, channels=2)
    limit = 400_000
    data, bitrate = encode_mp3_within(audio, SR, limit)
    assert len(data) <= limit
    higher = MP3_BITRATES[MP3_BITRATES.index(bitrate) - 1]
    assert len(encode_mp3(audio, SR, bitrate=higher)) > limit
    assert MP3(io.BytesIO(data)).info.length == pytest.approx(20.0, abs=0.1)


def test_nothing_fits_says_so():
    with pytest.raises(OutputTooLarge, match="shorter duration"):
        encode_mp3_within(sine(60.0, 440.0), SR, 50_000)


def test_request_tags_record_audio_inputs_by_length_hash_and_source():
    from generation.origin import Origin, OriginKind
    from generation.request import AudioClip

    intro = AudioClip(sine(2.0, 440.0), SR)
    request = replace(GenerationRequest(prompt="p", model="debug", seed=1), continuation=intro)
    tags = request_tags(request, Origin(OriginKind.CONTINUATION, job_id=4, take=2))
    assert tags["musicgen_continuation"] == "2.0 s"
    assert (tags["musicgen_origin"], tags["musicgen_source_job"]) == ("continuation", "4")
    assert tags["musicgen_source_take"] == "3"
    # The hash names the exact samples: a copy matches, one changed sample does not.
    same = AudioClip(intro.samples.copy(), SR)
    changed = AudioClip(intro.samples.copy(), SR)
    changed.samples[0, 100] += 1e-3
    assert tags["musicgen_continuation_sha256"] == content_hash(same) != content_hash(changed)
    assert content_hash(AudioClip(intro.samples, 44_100)) != content_hash(same)
    melody = replace(GenerationRequest(prompt="p", model="debug-melody"), melody=intro)
    upload = Origin(OriginKind.UPLOAD_MELODY, filename="hum.wav")
    tags = request_tags(melody, upload)
    assert (tags["musicgen_source_file"], tags["musicgen_melody_sha256"]) == (
        "hum.wav",
        content_hash(same),
    )
    assert "musicgen_source_job" not in tags
