"""Carrying tracks on: the intro a continuation hears, and stitching the parts."""

from __future__ import annotations

import numpy as np
import pytest

from generation.audio.continuation import (
    CROSSFADE_SECONDS,
    MAX_INTRO_SECONDS,
    continue_request,
    intro_clip,
    new_part,
    stitch,
)
from generation.request import GenerationRequest

from .helpers import sine

RATE = 32_000


def test_a_long_track_gives_its_last_part_as_intro():
    audio = np.arange(40 * RATE, dtype=np.float32)[None]
    intro = intro_clip(audio, RATE)
    assert intro.seconds == MAX_INTRO_SECONDS
    np.testing.assert_array_equal(intro.samples[0], audio[0, -int(MAX_INTRO_SECONDS * RATE) :])


def test_a_short_track_is_the_whole_intro():
    audio = sine(2.0, 440.0, RATE, channels=2)
    assert intro_clip(audio, RATE).seconds == 2.0


def test_a_continuation_lasts_the_intro_plus_what_it_adds():
    intro = intro_clip(sine(3.0, 440.0, RATE), RATE)
    request = GenerationRequest(prompt="more", model="debug", melody=intro)
    continued = continue_request(request, intro, 5.0)
    assert continued.duration == 8.0
    assert continued.continuation is intro and continued.melody is None


def test_stitching_keeps_the_first_whole_and_each_new_part():
    first = sine(2.0, 220.0, RATE)
    second = np.concatenate([first[:, -RATE:], sine(1.5, 330.0, RATE)], axis=-1)  # 1 s intro
    third = np.concatenate([second[:, -RATE // 2 :], sine(1.0, 440.0, RATE)], axis=-1)
    track = stitch([(first, 0.0), (second, 1.0), (third, 0.5)], RATE)
    assert track.shape == (1, int(4.5 * RATE))
    fade = int(CROSSFADE_SECONDS * RATE)
    np.testing.assert_array_equal(track[:, : 2 * RATE - fade], first[:, :-fade])
    np.testing.assert_allclose(
        track[:, 2 * RATE : int(3.5 * RATE)], new_part(second, RATE, 1.0), atol=1e-6
    )
    np.testing.assert_array_equal(track[:, int(3.5 * RATE) :], new_part(third, RATE, 0.5))
    # The seam blends the end of the track so far into the intro the next part heard.
    np.testing.assert_allclose(track[:, 2 * RATE - fade : 2 * RATE], first[:, -fade:], atol=1e-6)


def test_stitching_mono_and_stereo_gives_stereo():
    track = stitch([(sine(1.0, 220.0, RATE), 0.0), (sine(2.0, 220.0, RATE, 2), 1.0)], RATE)
    assert track.shape == (2, 2 * RATE)


def test_nothing_to_stitch_is_an_error():
    with pytest.raises(ValueError):
        stitch([], RATE)
