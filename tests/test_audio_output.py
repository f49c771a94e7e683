"""MP3 results: duration, channels, loudness and tags read back from the written file."""

from __future__ import annotations

import io
from dataclasses import replace

import numpy as np
import pyloudnorm
import pytest
from mutagen.id3 import ID3
from mutagen.mp3 import MP3

from generation.audio_input import AudioLimits, decode_audio
from generation.audio_output import (
    MP3_BITRATES,
    TARGET_LOUDNESS,
    encode_mp3,
    encode_mp3_within,
    estimated_mp3_bytes,
    normalise_loudness,
    pick_bitrate,
    request_tags,
)
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


@pytest.mark.parametrize("amplitude", [0.01, 0.9])
def test_loudness_is_normalised(amplitude):
    noise = np.random.default_rng(0).standard_normal((2, 5 * SR)).astype(np.float32)
    audio = normalise_loudness(amplitude * noise / np.abs(noise).max(), SR)
    decoded = decode_audio(encode_mp3(audio, SR, bitrate=320), AudioLimits()).samples
    loudness = pyloudnorm.Meter(SR).integrated_loudness(decoded.T.astype(np.float64))
    assert loudness == pytest.approx(TARGET_LOUDNESS, abs=1.0)
    assert np.abs(audio).max() <= 10 ** (-1 / 20) + 1e-6


def test_silence_and_very_short_clips_are_left_alone():
    silence = np.zeros((1, SR), dtype=np.float32)
    assert np.array_equal(normalise_loudness(silence, SR), silence)
    blip = sine(0.1, 440.0)
    assert np.array_equal(normalise_loudness(blip, SR), blip)


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


def test_request_tags_record_audio_inputs_by_length():
    from generation.request import AudioClip

    request = replace(
        GenerationRequest(prompt="p", model="debug-melody", seed=1),
        melody=AudioClip(sine(2.0, 440.0), SR),
    )
    assert request_tags(request)["musicgen_melody"] == "2.0 s"
