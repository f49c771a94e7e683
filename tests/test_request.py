"""Every option's range and default, and every rejection, before anything runs."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from generation.engine.models import CATALOGUE
from generation.errors import InvalidOption
from generation.request import AudioClip, GenerationRequest, validate_request

from .helpers import sine

BASE = GenerationRequest(prompt="energetic rock music", model="debug")
MELODY_SPEC = CATALOGUE["debug-melody"]


def clip(seconds: float) -> AudioClip:
    return AudioClip(sine(seconds, 220.0), 32_000)


def test_defaults_match_the_musicgen_command_line():
    assert (BASE.temperature, BASE.top_k, BASE.top_p, BASE.cfg_coef) == (1.0, 250, 0.0, 3.0)
    assert (BASE.use_sampling, BASE.two_step_cfg, BASE.extend_stride) == (True, False, 18.0)


@pytest.mark.parametrize(
    "changes",
    [
        {"temperature": 0.0},
        {"temperature": 2.0},
        {"top_k": 0},
        {"top_k": 2048},
        {"top_p": 0.0},
        {"top_p": 1.0},
        {"cfg_coef": 0.0},
        {"extend_stride": 29.5},
        {"duration": 120.0},
        {"duration": 0.5},
        {"seed": 0},
        {"prompt": "x" * 1000},
        {"prompt": "verse\nchorus\r\n\tbridge"},
        {"prompt": "café ☕ 音楽"},
    ],
)
def test_values_at_the_edges_of_their_ranges_are_accepted(changes):
    validate_request(replace(BASE, **changes), CATALOGUE["debug"])


@pytest.mark.parametrize(
    ("changes", "option"),
    [
        ({"temperature": 2.01}, "temperature"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 2049}, "top_k"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": -0.5}, "top_p"),
        ({"cfg_coef": -1.0}, "cfg_coef"),
        ({"cfg_coef": 1000.0}, "cfg_coef"),
        ({"extend_stride": 0.0}, "extend_stride"),
        ({"extend_stride": 30.0}, "extend_stride"),
        ({"duration": 0.0}, "duration"),
        ({"duration": 121.0}, "duration"),
        ({"prompt": "   "}, "prompt"),
        ({"prompt": "x" * 1001}, "prompt"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**32}, "seed"),
    ],
)
def test_out_of_range_values_are_rejected_naming_the_option(changes, option):
    with pytest.raises(InvalidOption) as caught:
        validate_request(replace(BASE, **changes), CATALOGUE["debug"])
    assert caught.value.option == option


@pytest.mark.parametrize("character", ["\x00", "\x1b", "\x7f", "\x85", "\ud800"])
def test_a_prompt_with_a_control_character_is_refused_saying_where(character):
    with pytest.raises(InvalidOption) as caught:
        validate_request(replace(BASE, prompt=f"lo-fi{character} beat"), CATALOGUE["debug"])
    assert caught.value.option == "prompt"
    assert f"U+{ord(character):04X}" in str(caught.value)
    assert "at character 6: remove it" in str(caught.value)


def test_max_duration_is_configurable():
    long = replace(BASE, duration=200.0)
    validate_request(long, CATALOGUE["debug"], max_duration=300.0)
    with pytest.raises(InvalidOption, match="at most 60"):
        validate_request(long, CATALOGUE["debug"], max_duration=60.0)


def test_melody_on_a_model_without_melody_conditioning_is_rejected():
    with pytest.raises(InvalidOption, match="cannot follow a melody") as caught:
        validate_request(replace(BASE, melody=clip(2)), CATALOGUE["debug-stereo"])
    assert caught.value.option == "melody"
    validate_request(replace(BASE, melody=clip(2)), MELODY_SPEC)


def test_melody_and_continuation_together_are_rejected():
    both = replace(BASE, melody=clip(2), continuation=clip(2))
    with pytest.raises(InvalidOption, match="not both"):
        validate_request(both, MELODY_SPEC)


@pytest.mark.parametrize("intro_seconds", [10.0, 12.0])
def test_a_continuation_clip_must_be_shorter_than_the_duration(intro_seconds):
    request = replace(BASE, duration=10.0, continuation=clip(intro_seconds))
    with pytest.raises(InvalidOption, match="must be longer than the intro") as caught:
        validate_request(request, CATALOGUE["debug"])
    assert caught.value.option == "continuation"


def test_a_continuation_clip_must_fit_the_window():
    request = replace(BASE, duration=60.0, continuation=clip(31))
    with pytest.raises(InvalidOption, match="window"):
        validate_request(request, CATALOGUE["debug"])


def test_with_seed_fixes_a_seed_once():
    seeded = BASE.with_seed()
    assert seeded.seed is not None
    assert seeded.with_seed() is seeded
    assert replace(BASE, seed=7).with_seed().seed == 7
